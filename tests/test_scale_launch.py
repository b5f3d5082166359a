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
                          "--list", "optim.lr=1e-3 model.remat=full", "optim.lr=1e-4", "--dry_run"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and "--workdir=/tmp/x/lr-1e-3_remat-full" in lines[0] and "-m jepa.train" in lines[0]
    out = subprocess.run([sys.executable, "launch/sweep.py", "--config=c.py", "--root=/tmp/x", "--grid",
                          "seed=0,1,2", "--slurm", "--dry_run"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "sbatch --array=0-2" in out.stdout and "2) ARGS=(" in out.stdout


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
