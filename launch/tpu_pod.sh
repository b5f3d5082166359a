#!/bin/bash
# Run the same training command on every worker of a Cloud TPU pod slice (multi-controller JAX).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [--project=P] -- --config=configs/vjepa2_vitl16.py --workdir=gs://bucket/runs/vitl
#
# Copies this repository to every worker (gcloud ... scp --worker=all), installs it, and starts
#   python -m jepa.train ARGS --config.distributed.mode=on
# on all workers at once; jax.distributed.initialize() discovers the pod topology from the TPU metadata.
# The workdir must be shared (a gs:// bucket or a filesystem every worker mounts). Maintenance events are
# delivered as SIGTERM / preemption notices: all workers save at the same step and exit 42; rerun to resume.
# DRY_RUN=1 prints the gcloud commands instead of running them.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 TPU_NAME ZONE [--project=P] -- TRAIN_ARGS..." >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
GCLOUD_EXTRA=()
while [[ $# -gt 0 && "$1" != "--" ]]; do GCLOUD_EXTRA+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
TRAIN_ARGS=$(printf ' %q' "$@")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REMOTE_DIR=${REMOTE_DIR:-jepa}
run() { if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" "${GCLOUD_EXTRA[@]}" --worker=all)
run gcloud compute tpus tpu-vm scp --recurse "$REPO" "$TPU_NAME:~/$REMOTE_DIR" --zone="$ZONE" "${GCLOUD_EXTRA[@]}" --worker=all
run "${SSH[@]}" --command="cd ~/$REMOTE_DIR && pip install -q -e '.[tpu]'"  # JAX's TPU build, pinned like the CPU one
# Same command on all workers; logs per worker in ~/jepa_train.log.
run "${SSH[@]}" --command="cd ~/$REMOTE_DIR && export TPU_STDERR_LOG_LEVEL=1 TPU_MIN_LOG_LEVEL=1 && \
  python -m jepa.train${TRAIN_ARGS} --config.distributed.mode=on 2>&1 | tee ~/jepa_train.log"
