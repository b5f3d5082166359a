"""Behaviour tests of the trainer: the real CLI and the real train() on the tiny quick-start config."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import QUICKSTART, REPO, child_error

from jepa import checkpoint as ckpt_lib
from jepa import config as config_lib
from jepa import sharding
from jepa import train as train_lib


def run_cli(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "jepa.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_end_to_end(tmp_path, world_dir, jax_cache):
    workdir = tmp_path / "run"
    proc = run_cli(f"--config={QUICKSTART}:tiny", f"--workdir={workdir}",
                   f"--config.data.sources.world.data_dir={world_dir}",
                   f"--config.train.compilation_cache={jax_cache}")
    assert proc.returncode == 0, child_error(proc.stderr)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["final_step"] == 6
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "loss/short", "loss/long", "lr", "ema_momentum", "repr/effective_rank", "perf/mfu",
                "perf/clips_per_s", "data/skipped_total"):
        assert key in records[-1], key
    assert any(name.startswith("events") for _, _, files in os.walk(workdir / "tensorboard") for name in files)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
    assert "step 6/6" in proc.stderr  # the progress line


def test_collapse_diagnostics_on_logged_steps_only(tmp_path, tiny_config):
    """With log_every = 2 the step computes the effective rank on steps 2 and 4 only (objectives.vjepa.
    gated_representation_stats); the final step 5 is logged without them, and the run is unaffected otherwise."""
    tiny_config.train.log_every = 2
    tiny_config.train.stop_at = 5
    train_lib.train(tiny_config, str(tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    for r in records[:2]:
        assert r["repr/effective_rank"] > 1 and r["repr/std"] > 0
    assert not any(k.startswith("repr/") for k in records[2])


def test_misspelt_override_fails_before_any_work(tmp_path):
    start = time.time()
    proc = run_cli(f"--config={QUICKSTART}:tiny", f"--workdir={tmp_path / 'run'}", "--config.train.totl_steps=3",
                   timeout=120)
    assert proc.returncode != 0
    assert "totl_steps" in proc.stderr
    assert not (tmp_path / "run").exists()
    assert time.time() - start < 60


def test_inconsistent_value_fails_with_the_field_named(tmp_path):
    proc = run_cli(f"--config={QUICKSTART}:tiny", f"--workdir={tmp_path / 'run'}", "--config.data.resolution=60",
                   timeout=120)
    assert proc.returncode == 2
    assert "error: config.data.resolution: 60 is not divisible" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_same_seed_same_losses(tmp_path, tiny_config):
    a = train_lib.train(tiny_config, str(tmp_path / "a"))
    b = train_lib.train(tiny_config, str(tmp_path / "b"))
    assert len(a.losses) == 6
    assert a.losses == b.losses
    tiny_config.seed = 1
    c = train_lib.train(tiny_config, str(tmp_path / "c"))
    assert c.losses != a.losses


def params_of(workdir, config):
    state, step = ckpt_lib.load_state(workdir, abstract_state_for(config))
    return jax.tree.map(np.asarray, state), step


def abstract_state_for(config):
    return train_lib.build_run(config, sharding.make_mesh(config.mesh)).abstract_state


def test_resume_continues_exactly(tmp_path, tiny_config):
    tiny_config.train.total_steps = 8
    tiny_config.train.checkpoint_every = 4
    straight = train_lib.train(tiny_config, str(tmp_path / "straight"))

    tiny_config.train.stop_at = 4
    first = train_lib.train(tiny_config, str(tmp_path / "resumed"))
    tiny_config.train.stop_at = 0
    second = train_lib.train(tiny_config, str(tmp_path / "resumed"))
    assert first.final_step == 4 and second.final_step == 8
    assert first.losses + second.losses == straight.losses

    a, step_a = params_of(str(tmp_path / "straight"), tiny_config)
    b, step_b = params_of(str(tmp_path / "resumed"), tiny_config)
    assert step_a == step_b == 8
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_init_from_copies_weights_and_restarts_the_step(tmp_path, tiny_config):
    train_lib.train(tiny_config, str(tmp_path / "pre"))
    pre, _ = params_of(str(tmp_path / "pre"), tiny_config)
    tiny_config.train.init_from = str(tmp_path / "pre")
    tiny_config.train.total_steps = 1
    tiny_config.optim.schedule = "warmup_constant"
    tiny_config.optim.warmup_steps = 0
    tiny_config.optim.lr = 0.0
    tiny_config.optim.start_lr = 0.0
    result = train_lib.train(tiny_config, str(tmp_path / "cool"))
    assert result.final_step == 1
    cool, step = params_of(str(tmp_path / "cool"), tiny_config)
    assert step == 1
    # lr 0 and weight decay scaled by lr: the weights are exactly those of the other run
    jax.tree.map(np.testing.assert_array_equal, cool["params"], pre["params"])


def test_non_finite_loss_stops_with_step_and_checkpoint_named(tmp_path, tiny_config):
    tiny_config.optim.lr = 1e30
    tiny_config.optim.start_lr = 1e30
    tiny_config.train.total_steps = 40
    tiny_config.train.checkpoint_every = 1
    with pytest.raises(train_lib.NonFiniteLossError, match=r"at step \d+; last good checkpoint: (step \d+|none)"):
        train_lib.train(tiny_config, str(tmp_path / "nan"))


def test_diverged_state_is_never_saved_as_last_good(tmp_path, tiny_config):
    """The loss of step N is computed with the parameters of step N-1, so a finite loss can come with exploded
    parameters: those must not be checkpointed (and rotate out a good checkpoint) as the "last good" one."""
    tiny_config.train.total_steps = 40
    tiny_config.train.checkpoint_every = 1
    tiny_config.train.keep_checkpoints = 2
    tiny_config.optim.warmup_steps = 0
    tiny_config.optim.start_lr = tiny_config.optim.lr = 1e3  # a few finite-loss steps, then divergence
    with pytest.raises(train_lib.NonFiniteLossError) as error:
        train_lib.train(tiny_config, str(tmp_path / "run"))
    named = re.search(r"last good checkpoint: step (\d+)", str(error.value))
    saved = sorted(int(s) for s in os.listdir(tmp_path / "run" / "checkpoints") if s.isdigit())
    assert (named is None and not saved) or int(named.group(1)) == saved[-1], (str(error.value), saved)
    if saved:  # every checkpoint left is a state whose own loss is finite: resuming from it trains on
        tiny_config.optim.start_lr = tiny_config.optim.lr = 0.0
        tiny_config.train.total_steps = saved[-1] + 1
        result = train_lib.train(tiny_config, str(tmp_path / "run"))
        assert all(np.isfinite(result.losses)) and len(result.losses) == 1


@pytest.mark.parametrize("override, field", [
    (dict(keep_checkpoints=0), "train.keep_checkpoints"), (dict(checkpoint_every=0), "train.checkpoint_every"),
    (dict(log_every=0), "train.log_every"), (dict(lr=-1.0), "optim.lr"), (dict(dtype="float16"), "model.dtype"),
    (dict(grad_accum_steps=0), "optim.grad_accum_steps")])
def test_invalid_values_fail_in_validate_with_the_field_named(tiny_config, override, field):
    (name, value), = override.items()
    section = {"lr": tiny_config.optim, "grad_accum_steps": tiny_config.optim, "dtype": tiny_config.model}.get(
        name, tiny_config.train)
    section[name] = value
    with pytest.raises(ValueError, match=f"^config.{field}: "):
        config_lib.validate(tiny_config)


def test_compile_counter_sees_a_retrace_of_the_train_step():
    train_lib._CompileCounter.start()

    @jax.jit
    def train_step(x):
        return x * 2

    train_step(np.ones(3, np.float32))
    before = train_lib._CompileCounter.count
    train_step(np.ones(3, np.float32))
    assert train_lib._CompileCounter.count == before  # same shapes: no new trace
    train_step(np.ones(4, np.float32))
    assert train_lib._CompileCounter.count == before + 1


def test_profile_steps_write_a_trace_for_tensorboard(tmp_path, tiny_config):
    tiny_config.train.profile_steps = (1, 2)
    tiny_config.train.stop_at = 4
    train_lib.train(tiny_config, str(tmp_path / "run"))
    traces = list((tmp_path / "run" / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_loss_decreases_over_50_steps(tmp_path, tiny_config):
    tiny_config.train.total_steps = 50
    tiny_config.optim.lr = 1e-3
    tiny_config.optim.warmup_steps = 5
    tiny_config.optim.cooldown_steps = 5
    tiny_config.train.checkpoint_every = 50
    losses = train_lib.train(tiny_config, str(tmp_path / "run")).losses
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
