"""Launchers (launch/) and the scale-related config knobs."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, load_config

from jepa import config as config_lib
from jepa import train as train_lib

sys.path.insert(0, os.path.join(REPO, "launch"))
import local  # noqa: E402
import sweep  # noqa: E402

sys.path.pop(0)


def test_sweep_grid_expands_to_distinct_workdirs():
    runs = sweep.build_runs("configs/quickstart.py", "/r", sweep.expand_grid(["optim.lr=1e-3,5e-4",
                                                                               "loss.exponent=1,2"]), [])
    assert [r["name"] for r in runs] == ["lr-1e-3_exponent-1", "lr-1e-3_exponent-2", "lr-5e-4_exponent-1",
                                         "lr-5e-4_exponent-2"]
    assert len({r["workdir"] for r in runs}) == 4
    assert "--config.loss.exponent=2" in runs[1]["args"]
    # the same name twice still gets two workdirs
    twice = sweep.build_runs("c.py", "/r", sweep.expand_list(["optim.lr=1", "optim.lr=1"]), [])
    assert twice[0]["workdir"] != twice[1]["workdir"]
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        sweep.expand_grid(["optim.lr"])


def test_sweep_dry_run_prints_commands_locally_and_as_slurm_array():
    out = subprocess.run([sys.executable, "launch/sweep.py", "--config=configs/quickstart.py:tiny", "--root=/tmp/x",
                          "--list", "optim.lr=1e-3 model.remat=full", "--list", "optim.lr=1e-4", "--dry_run",
                          "--config.train.stop_at=3"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and "--workdir=/tmp/x/lr-1e-3_remat-full" in lines[0] and "-m jepa.train" in lines[0]
    assert all(line.endswith("--config.train.stop_at=3") for line in lines)  # an override for every run
    out = subprocess.run([sys.executable, "launch/sweep.py", "--config=configs/quickstart.py:tiny", "--root=/tmp/x",
                          "--grid", "seed=0,1,2", "--slurm", "--dry_run"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "sbatch --array=0-2" in out.stdout and "2) ARGS=(" in out.stdout
    # every array task runs under launch/slurm.sbatch's settings: the SIGTERM warning and requeue included
    assert "#SBATCH --signal=B:TERM@120" in out.stdout and "#SBATCH --requeue" in out.stdout
    bad = subprocess.run([sys.executable, "launch/sweep.py", "--config=configs/quickstart.py:tiny", "--root=/tmp/x",
                          "--grid", "optim.lrr=1e-3,1e-4", "--dry_run"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "did you mean --config.optim.lr?" in bad.stderr and not bad.stdout


FAKE_SRUN = """#!/bin/bash
# Records its call, then runs one "training process": it reports TERM and exits with $CHILD_CODE.
echo "srun $*" >> "$LOG"
exec bash -c 'trap "echo child-got-TERM >> \"$LOG\"; exit $CHILD_CODE" TERM; echo child-started >> "$LOG";
              while true; do sleep 0.05; done'
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$LOG"
"""


def _sbatch_with_fakes(tmp_path, child_code: int) -> tuple[int, list[str], str]:
    """Runs launch/slurm.sbatch with bash (fake srun and scontrol first on PATH), sends SIGTERM to the batch
    shell once the training process runs, and returns (its exit code, the recorded calls, its output)."""
    import signal
    import time
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", LOG=str(log), CHILD_CODE=str(child_code),
               SLURM_JOB_ID="4242", SLURM_NNODES="2")
    proc = subprocess.Popen(["bash", os.path.join(REPO, "launch", "slurm.sbatch"), "--config=c.py", "--workdir=w"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "child-started" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # what SLURM does 120 s before the time limit (--signal=B:TERM@120)
        out, _ = proc.communicate(timeout=30)
    finally:  # a training process the script failed to stop must not outlive the test
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.returncode, log.read_text().splitlines(), out


def test_slurm_script_forwards_sigterm_to_srun_and_requeues_on_42(tmp_path):
    code, calls, out = _sbatch_with_fakes(tmp_path, 42)
    assert code == 0, out
    assert calls[0].startswith("srun ") and "-m jepa.train --config=c.py --workdir=w" in calls[0]
    assert calls[1:] == ["child-started", "child-got-TERM", "scontrol requeue 4242"], out


def test_slurm_script_passes_other_exit_codes_on_without_requeue(tmp_path):
    code, calls, out = _sbatch_with_fakes(tmp_path, 3)
    assert code == 3, out
    assert "child-got-TERM" in calls and not any(c.startswith("scontrol") for c in calls)


def test_local_launcher_gives_each_process_its_id_and_devices():
    cmds = local.commands(["python", "-m", "jepa.train"], 3, 1234)
    assert [c[-1] for c in cmds] == [f"--config.distributed.process_id={i}" for i in range(3)]
    assert all("--config.distributed.coordinator_address=127.0.0.1:1234" in c for c in cmds)
    env = local.process_env(2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"})
    assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=2" and env["JAX_PLATFORMS"] == "cpu"


def test_knob_fields_are_validated():
    c = load_config("tiny")
    assert c.model.attention == "einsum" and c.distributed.mode == "auto"
    c.model.attention = "flash"
    with pytest.raises(ValueError, match="config.model.attention"):
        config_lib.validate(c)
    c.model.attention = "cudnn"  # float32 compute: cudnn's fused attention needs bf16/fp16
    with pytest.raises(ValueError, match="config.model.attention"):
        config_lib.validate(c)
    c = load_config("tiny")
    c.distributed.coordinator_address = "127.0.0.1:1"
    c.distributed.num_processes = 2
    with pytest.raises(ValueError, match="config.distributed.coordinator_address"):
        config_lib.validate(c)


@pytest.mark.slow
def test_remat_accumulation_and_xla_attention_keep_the_losses(tmp_path, tiny_config):
    """remat=dots, grad_accum_steps=2 and jax.nn.dot_product_attention change how, not what, is computed (for a
    loss that is a mean over clips: the variance / covariance terms take their statistics per micro-batch)."""
    tiny_config.loss.variance_weight = tiny_config.loss.covariance_weight = 0.0
    tiny_config.train.stop_at = 3
    tiny_config.train.peak_flops = 1e11
    base = train_lib.train(tiny_config, str(tmp_path / "base")).losses
    tiny_config.model.remat = "dots"
    tiny_config.optim.grad_accum_steps = 2
    tiny_config.model.attention = "xla"
    knobs = train_lib.train(tiny_config, str(tmp_path / "knobs")).losses
    np.testing.assert_allclose(knobs, base, rtol=1e-4)
    tiny_config.model.dtype = "bfloat16"
    tiny_config.model.remat = "full"
    bf16 = train_lib.train(tiny_config, str(tmp_path / "bf16")).losses
    np.testing.assert_allclose(bf16, base, rtol=5e-2)  # bfloat16 matmuls: ~3 significant digits
