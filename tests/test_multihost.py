"""Multi-controller runs with local processes (launch/local.py: jax.distributed on 127.0.0.1, gloo), elastic
restore onto another mesh / device / process count, and preemption (SIGTERM, SIGKILL) of the real CLI.

Run directly, this file is the reference trainer for the multi-process comparison (see `emulated_pipeline`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from conftest import QUICKSTART, REPO, child_error  # noqa: E402

LOSS_RTOL = 1e-5  # see tests/test_sharding.py


def emulated_pipeline(num_processes: int):
    """build_pipeline replacement: the global batch of `num_processes` processes, made in one process.

    Why: the pipeline draws masks per process (keyed on the process index), so a 1-process run sees other
    masks than a 2-process run. Concatenating the real per-process pipelines in process order reproduces the
    multi-process global batch exactly (make_array_from_process_local_data puts process i's rows i-th)."""
    from jepa.data import pipeline

    real = pipeline.build_pipeline

    class Iterator:
        def __init__(self, config, kwargs):
            kwargs = {k: v for k, v in kwargs.items() if k not in ("process_index", "process_count")}
            self.its = [iter(real(config, process_index=i, process_count=num_processes, **kwargs))
                        for i in range(num_processes)]

        def __iter__(self):
            return self

        def __next__(self):
            parts = [next(it) for it in self.its]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

        @property
        def skipped_total(self) -> int:
            return sum(it.skipped_total for it in self.its)

        def get_state(self) -> bytes:
            return json.dumps([it.get_state() for it in self.its]).encode()

        def set_state(self, state: bytes) -> None:
            for it, s in zip(self.its, json.loads(state), strict=True):
                it.set_state(s)

        def close(self):
            for it in self.its:
                it.close()

    class Dataset:
        def __init__(self, config, **kwargs):
            self.config, self.kwargs = config, kwargs

        def __iter__(self):
            return Iterator(self.config, self.kwargs)

    return Dataset


def cli(workdir, overrides):
    return [sys.executable, "-m", "jepa.train", f"--config={QUICKSTART}:tiny", f"--workdir={workdir}", *overrides]


def env_for(devices: int) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def overrides(world_dir, jax_cache, stop_at, every=2, batch=8, mesh=(2, 2, 1)):
    return [f"--config.data.sources.world.data_dir={world_dir}", f"--config.train.compilation_cache={jax_cache}",
            f"--config.train.stop_at={stop_at}", f"--config.train.global_batch_size={batch}",
            "--config.train.peak_flops=1e11", f"--config.train.checkpoint_every={every}",
            f"--config.mesh.data={mesh[0]}", f"--config.mesh.fsdp={mesh[1]}", f"--config.mesh.tensor={mesh[2]}"]


def records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_local(workdir, num_processes, devices, args, timeout=500):
    sys.path.insert(0, os.path.join(REPO, "launch"))
    try:
        import local
    finally:
        sys.path.pop(0)
    procs = local.launch(cli(workdir, args), num_processes, devices, os.path.join(str(workdir), "logs"),
                         env=env_for(devices), cwd=REPO)
    code = local.wait(procs, timeout)
    logs = "\n".join(open(os.path.join(str(workdir), "logs", f"process_{i}.log")).read()
                     for i in range(num_processes))
    return code, logs


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume_on_one(tmp_path, world_dir, jax_cache):
    """2 processes x 2 CPU devices == 1 process x 4 devices on the same global batches; the 2-process checkpoint
    then resumes in 1 process (another process count: the iterator state is taken from a saving process)."""
    multi = tmp_path / "multi"
    code, logs = run_local(multi, 2, 2, overrides(world_dir, jax_cache, stop_at=4))
    assert code == 0, logs[-6000:]
    assert "process 1 of 2, 2 local / 4 global devices" in logs
    assert sorted(os.listdir(multi / "checkpoints")) == ["2", "4"]
    assert sorted(os.listdir(multi / "checkpoints" / "4" / "data")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

    ref = subprocess.run([sys.executable, os.path.abspath(__file__), "2", str(tmp_path / "ref"),
                          *overrides(world_dir, jax_cache, stop_at=4)], cwd=REPO, env=env_for(4),
                         capture_output=True, text=True, timeout=500)
    assert ref.returncode == 0, ref.stderr[-3000:]
    multi_losses = [r["loss"] for r in records(multi)]
    np.testing.assert_allclose(multi_losses, [r["loss"] for r in records(tmp_path / "ref")], rtol=LOSS_RTOL)

    proc = subprocess.run(cli(multi, overrides(world_dir, jax_cache, stop_at=6, mesh=(4, 1, 1))), cwd=REPO,
                          env=env_for(4), capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, child_error(proc.stderr)
    assert "saved by another process count" in proc.stderr
    steps = [r["step"] for r in records(multi)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) for r in records(multi))


RESTORE_SCRIPT = r"""
import json, sys, numpy as np, jax
sys.path.insert(0, "tests")
from conftest import load_config
from jepa import checkpoint, sharding, train
c = load_config("tiny")
c.mesh = dict(data=-1, fsdp=1, tensor=1)
run = train.build_run(c, sharding.make_mesh(c.mesh))
state = checkpoint.Checkpointer(sys.argv[1], save_every=1, keep=3).restore(int(sys.argv[2]), run.abstract_state)
leaves = jax.tree.leaves(state["params"])
assert all(len(x.sharding.device_set) == jax.device_count() for x in leaves)
np.savez(sys.argv[3], *[np.asarray(x) for x in leaves])
"""


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh_and_device_count(tmp_path, tiny_config, world_dir, jax_cache):
    """fsdp=8 on 8 devices -> data=4 on 4 devices: identical parameters, and training continues as if straight."""
    import jax

    from jepa import checkpoint as ckpt_lib
    from jepa import sharding
    from jepa import train as train_lib

    straight, split = tmp_path / "straight", tmp_path / "split"
    for workdir, stop in ((straight, 4), (split, 2)):
        p = subprocess.run(cli(workdir, overrides(world_dir, jax_cache, stop_at=stop, mesh=(1, 8, 1))), cwd=REPO,
                           env=env_for(8), capture_output=True, text=True, timeout=500)
        assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, "-c", RESTORE_SCRIPT, str(split), "2", str(tmp_path / "p.npz")], cwd=REPO,
                       env=env_for(4), capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stderr[-3000:]
    restored = np.load(tmp_path / "p.npz", allow_pickle=False)
    abstract = train_lib.build_run(tiny_config, sharding.make_mesh(tiny_config.mesh)).abstract_state
    saved, _ = ckpt_lib.load_state(str(split), abstract, step=2)
    for i, leaf in enumerate(jax.tree.leaves(saved["params"])):
        np.testing.assert_array_equal(restored[f"arr_{i}"], np.asarray(leaf))

    p = subprocess.run(cli(split, overrides(world_dir, jax_cache, stop_at=4, mesh=(4, 1, 1))), cwd=REPO,
                       env=env_for(4), capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stderr
    np.testing.assert_allclose([r["loss"] for r in records(split)], [r["loss"] for r in records(straight)],
                               rtol=LOSS_RTOL)


def wait_for(path, text, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and text in open(path).read():
            return
        assert proc.poll() is None, open(path).read()[-3000:]
        time.sleep(0.2)
    raise TimeoutError(f"{text!r} not seen in {path}")


@pytest.mark.slow
def test_sigterm_saves_and_exits_42_then_resumes(tmp_path, world_dir, jax_cache):
    from jepa import train as train_lib
    workdir = tmp_path / "run"
    args = overrides(world_dir, jax_cache, stop_at=0, every=1000, batch=4, mesh=(-1, 1, 1))
    args += ["--config.train.total_steps=2000", "--config.optim.cooldown_steps=2"]
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(cli(workdir, args), cwd=REPO, env=env_for(1), stdout=out, stderr=subprocess.STDOUT)
    wait_for(log, "step 3/2000", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == train_lib.PREEMPTED_EXIT_CODE, open(log).read()[-3000:]
    saved = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3
    stop = saved[0] + 2
    p = subprocess.run(cli(workdir, args[:2] + [f"--config.train.stop_at={stop}"] + args[3:]), cwd=REPO,
                       env=env_for(1), capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'} at step {saved[0]}" in p.stderr
    assert [r["step"] for r in records(workdir)][-2:] == [saved[0] + 1, stop]


@pytest.mark.slow
def test_sigkill_during_saves_resumes_from_last_complete_checkpoint(tmp_path, world_dir, jax_cache):
    """Checkpoints every step, killed with SIGKILL mid-run: the rerun resumes from a complete checkpoint."""
    workdir = tmp_path / "run"
    args = overrides(world_dir, jax_cache, stop_at=0, every=1, batch=4, mesh=(-1, 1, 1))
    args += ["--config.train.total_steps=2000", "--config.optim.cooldown_steps=2",
             "--config.train.keep_checkpoints=100"]
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(cli(workdir, args), cwd=REPO, env=env_for(1), stdout=out, stderr=subprocess.STDOUT)
    wait_for(log, "checkpoint: saving step 4", proc)  # logged as the (asynchronous) save of step 4 begins
    proc.kill()
    proc.wait(timeout=60)
    import orbax.checkpoint as ocp
    complete = ocp.CheckpointManager(str(workdir / "checkpoints")).latest_step()
    assert complete is not None and complete >= 3
    p = subprocess.run(cli(workdir, args[:2] + [f"--config.train.stop_at={complete + 1}"] + args[3:]), cwd=REPO,
                       env=env_for(1), capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"at step {complete}" in p.stderr
    assert records(workdir)[-1]["step"] == complete + 1


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, world_dir, jax_cache):
    from jepa import train as train_lib
    sys.path.insert(0, os.path.join(REPO, "launch"))
    try:
        import local
    finally:
        sys.path.pop(0)
    workdir = tmp_path / "run"
    args = overrides(world_dir, jax_cache, stop_at=0, every=1000, batch=8)
    args += ["--config.train.total_steps=2000", "--config.optim.cooldown_steps=2"]
    procs = local.launch(cli(workdir, args), 2, 2, str(workdir / "logs"), env=env_for(2), cwd=REPO)
    wait_for(workdir / "logs" / "process_0.log", "step 3/2000", procs[0])
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=300) for p in procs]
    logs = "".join(open(workdir / "logs" / f"process_{i}.log").read()[-2000:] for i in range(2))
    assert codes == [train_lib.PREEMPTED_EXIT_CODE] * 2, logs
    saved = [s for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
    assert len(saved) == 1, saved
    assert sorted(os.listdir(workdir / "checkpoints" / saved[0] / "data"))[1:] == [
        "process_0-of-2.json", "process_1-of-2.json"]


if __name__ == "__main__":
    # python tests/test_multihost.py NUM_PROCESSES WORKDIR [--config.x=y ...]: the trainer on one process with
    # the global batches of NUM_PROCESSES processes (the reference of the multi-process test).
    from absl import app, flags
    from ml_collections import config_flags

    num, workdir, rest = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    config_flags.DEFINE_config_file("config", None, "config", lock_config=True)

    def main(_):
        from jepa import train as train_lib
        train_lib.pipeline.build_pipeline = emulated_pipeline(num)
        train_lib.train(flags.FLAGS.config, workdir)

    app.run(main, argv=[sys.argv[0], f"--config={QUICKSTART}:tiny", *rest])
