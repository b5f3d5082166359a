#!/usr/bin/env bash
# The GPU efficiency levers of the ViT-L/16 V-JEPA 2 step, measured one at a time with benchmarks/step_bench.py
# (the trainer's own step) on one NVIDIA GPU, then printed as one table (best step, clips/s, TFLOP/s, MFU
# against the nominal dense bf16 peak).
#
#     bash benchmarks/gpu_levers.sh                 # all levers (at most BUDGET_S = 460 s)
#     bash benchmarks/gpu_levers.sh --dry_run       # print the commands only
#     bash benchmarks/gpu_levers.sh --only=baseline,residual_bf16 --reps=10
#
# Every run is the baseline (ViT-L/16, 16 x 256^2 clips, batch 32, bf16 compute, cuDNN attention, no remat: the
# README's 417 ms / 29.9% MFU row) plus ONE change, so each lever's effect is read against the same baseline;
# "combined" stacks the bf16 residual stream and batch 64. Each run compiles afresh (~35 s) and times --reps
# steps; a run that fails (out of memory, a flag this XLA does not know) is reported as such and the rest go on.
# The whole script stays within BUDGET_S seconds: each run gets at most 150 s and what is left of the budget, and
# a lever is skipped when under 60 s are left (levers are ordered by expected value).
# Environment: PYTHON (default python), LOG_DIR (default $OUT or /tmp/gpu_levers: one log per run),
# PEAK_TFLOPS (default 989, the dense bf16 peak of an H100 / H200 SXM), BUDGET_S (default 460), BENCH_FLAGS
# (the baseline's step_bench flags; e.g. a small CPU config to try the script itself).
set -u -o pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
LOG_DIR=${LOG_DIR:-${OUT:-/tmp/gpu_levers}}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
BUDGET_S=${BUDGET_S:-460}
REPS=5
DRY_RUN=0
ONLY=""
for arg in "$@"; do
  case "$arg" in
    --dry_run) DRY_RUN=1 ;;
    --reps=*) REPS=${arg#--reps=} ;;
    --only=*) ONLY=${arg#--only=} ;;
    *) echo "gpu_levers.sh: unknown argument '$arg' (--dry_run, --reps=N, --only=NAME,...)" >&2; exit 2 ;;
  esac
done
if ! [[ "$REPS" =~ ^[1-9][0-9]*$ ]]; then
  echo "gpu_levers.sh: --reps must be a positive integer, got '$REPS'" >&2; exit 2
fi

BASE=${BENCH_FLAGS:-"--config=configs/vjepa2_vitl16.py --config.model.dtype=bfloat16 --config.model.attention=cudnn \
--config.train.global_batch_size=32 --config.model.remat=none"}
BASE="$BASE --peak=false --reps=$REPS"
LHS="--xla_gpu_enable_latency_hiding_scheduler=true"

# name | extra XLA_FLAGS | step_bench flags replacing or adding to BASE's
LEVERS=(
  "baseline||"
  "residual_bf16||--config.model.residual_dtype=compute"
  "latency_hiding|$LHS|"
  "batch_64||--config.train.global_batch_size=64"
  "combined||--config.model.residual_dtype=compute --config.train.global_batch_size=64"
  "remat_dots||--config.model.remat=dots"
  "triton_gemm_off|--xla_gpu_enable_triton_gemm=false|"
)

names=()
for lever in "${LEVERS[@]}"; do names+=("${lever%%|*}"); done
if [[ -n "$ONLY" ]]; then
  IFS=, read -r -a wanted <<< "$ONLY"
  for w in "${wanted[@]}"; do
    [[ " ${names[*]} " == *" $w "* ]] || { echo "gpu_levers.sh: --only: unknown lever '$w' (${names[*]})" >&2; exit 2; }
  done
fi

bench_flags() {  # BASE with the lever's flags in place of the same-named ones
  local extra=$1 flag out=()
  for flag in $BASE; do
    [[ " $extra " == *" ${flag%%=*}="* ]] || out+=("$flag")
  done
  echo "${out[*]} $extra"
}

xla_flags() { local joined="${XLA_FLAGS:-} $1"; echo "${joined# }"; }

[[ $DRY_RUN == 1 ]] || mkdir -p "$LOG_DIR"
rows=()
start=$SECONDS
for lever in "${LEVERS[@]}"; do
  IFS='|' read -r name xla extra <<< "$lever"
  if [[ -n "$ONLY" && ",$ONLY," != *",$name,"* ]]; then continue; fi
  flags=$(bench_flags "$extra")
  cmd="XLA_FLAGS='$(xla_flags "$xla")' $PYTHON benchmarks/step_bench.py $flags"
  if [[ $DRY_RUN == 1 ]]; then echo "$name: $cmd"; continue; fi
  left=$(( BUDGET_S - (SECONDS - start) ))
  if (( left < 60 )); then
    rows+=("| $name | skipped (${left} s of the ${BUDGET_S} s budget left) | | | | | |"); continue
  fi
  log="$LOG_DIR/$name.log"
  echo "== $name: $cmd" | tee "$log"
  # shellcheck disable=SC2086  # BASE / extra are flag lists
  XLA_FLAGS="$(xla_flags "$xla")" timeout $(( left < 150 ? left : 150 )) "$PYTHON" benchmarks/step_bench.py $flags >> "$log" 2>&1
  rc=$?
  # step_bench prints "train step: batch B, G analytic GFLOP/step, compile C s, first loss L" and
  # "  best T ms (median M ms) -> R clips/s, ..."
  row=$(awk -v name="$name" -v peak="$PEAK_TFLOPS" '
    /^train step: batch/ { batch = $4; sub(",", "", batch); gflop = $5; compile = $9; loss = $13 }
    /^  best / { best = $2; median = $5; clips = $8 }
    END {
      if (best == "") exit 1
      tflops = gflop / best  # GFLOP / ms = TFLOP/s
      printf "| %s | %s | %d ms (median %d) | %.1f | %.1f | %.1f%% | %.0f s, loss %s |", name, batch, best, median,
             clips, tflops, 100 * tflops / peak, compile, loss
    }' "$log")
  if [[ $rc != 0 || -z "$row" ]]; then
    why=$(grep -m1 -oE "RESOURCE_EXHAUSTED|[Oo]ut of memory|Unknown flag[^ ]*|No such file[^;]*" "$log" || true)
    row="| $name | failed (exit $rc${why:+: $why}; see $log) | | | | | |"
  fi
  echo "$row"
  rows+=("$row")
done
[[ $DRY_RUN == 1 ]] && exit 0

echo
echo "${BENCH_FLAGS:+step_bench $BENCH_FLAGS; }MFU against ${PEAK_TFLOPS} TFLOP/s; $REPS timed steps per lever;" \
     "logs in $LOG_DIR"
echo "| lever | batch | step (best) | clips/s | TFLOP/s | MFU | compile, first loss |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
