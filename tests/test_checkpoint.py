"""Checkpoint integrity: seals written at save time, verified on restore; damaged checkpoints named, moved aside
(never deleted) and skipped for the newest intact one; the workdir lock; object-store paths."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import local_config

from jepa import checkpoint as ckpt_lib
from jepa import sharding
from jepa import train as train_lib
from jepa import workdir as workdir_lib


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A private copy of the session's tiny run (checkpoints at steps 3 and 6) that a test may damage."""
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    (workdir / workdir_lib.LOCK_NAME).unlink(missing_ok=True)
    return workdir


@pytest.fixture
def abstract_state(tiny_config):
    """Restore targets for the tiny run's checkpoints."""
    return train_lib.build_run(tiny_config, sharding.make_mesh(tiny_config.mesh)).abstract_state


def _largest_data_file(step_dir):
    files = [p for p in step_dir.rglob("*") if p.is_file() and "state" in p.parts and p.stat().st_size > 1000]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garbage_metadata(step_dir):
    (step_dir / "_CHECKPOINT_METADATA").write_text("{not json")


DAMAGE = {
    "flipped byte": (lambda d: _flip_byte(_largest_data_file(d)), "checksum mismatch"),
    "truncated file": (lambda d: _truncate(_largest_data_file(d)), "bytes"),
    "deleted file": (lambda d: _largest_data_file(d).unlink(), "missing"),
    "garbage metadata": (_garbage_metadata, "_CHECKPOINT_METADATA"),
    "half-populated step": (lambda d: shutil.rmtree(d / "state"), "missing"),
}


def test_saves_are_sealed_with_checksums(run_copy):
    for step in (3, 6):
        sealed = json.loads((run_copy / "checkpoints" / str(step) / ckpt_lib.SEAL_NAME).read_text())["files"]
        assert any(name.startswith("state/") for name in sealed) and any(name.startswith("data/") for name in sealed)
        assert ckpt_lib.verify(run_copy / "checkpoints" / str(step)) == (True, "")


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(run_copy, damage, caplog, abstract_state):
    breaker, reason = DAMAGE[damage]
    breaker(run_copy / "checkpoints" / "6")
    checkpointer = ckpt_lib.Checkpointer(str(run_copy), save_every=3, keep=3)
    with caplog.at_level(logging.WARNING):
        state, step = checkpointer.restore_latest(abstract_state)
    checkpointer.close()
    assert step == 3 and int(state["step"]) == 3
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "checkpoint step 6" in warning and "damaged" in warning and reason in warning, warning
    # moved aside for inspection, never deleted; Orbax no longer sees it
    moved = list((run_copy / ckpt_lib.DAMAGED_DIR).iterdir())
    assert len(moved) == 1 and moved[0].name.startswith("6-")
    assert sorted(os.listdir(run_copy / "checkpoints")) == ["3"]


def test_fallback_refused_names_the_damage_and_touches_nothing(run_copy, abstract_state):
    _flip_byte(_largest_data_file(run_copy / "checkpoints" / "6"))
    checkpointer = ckpt_lib.Checkpointer(str(run_copy), save_every=3, keep=3, fallback=False)
    with pytest.raises(ckpt_lib.CheckpointDamagedError) as error:
        checkpointer.restore_latest(abstract_state)
    checkpointer.close()
    message = str(error.value)
    assert "step 6" in message and "checksum mismatch" in message and "[3]" in message
    assert "\n" not in message  # one paragraph, not a storage-library traceback
    assert sorted(os.listdir(run_copy / "checkpoints")) == ["3", "6"]


def test_unsealed_checkpoint_is_restored_unverified(run_copy, abstract_state):
    """A kill between a finished save and its seal leaves an intact, unsealed step: it is still resumed from."""
    (run_copy / "checkpoints" / "6" / ckpt_lib.SEAL_NAME).unlink()
    checkpointer = ckpt_lib.Checkpointer(str(run_copy), save_every=3, keep=3)
    _, step = checkpointer.restore_latest(abstract_state)
    checkpointer.close()
    assert step == 6


def test_intact_checkpoint_of_another_model_is_named_not_moved(run_copy, tiny_config):
    """A mismatch between the saved state and this run's (another width, say) is not damage: nothing is moved."""
    tiny_config.model.predictor.width = 2 * tiny_config.model.predictor.width
    other = train_lib.build_run(tiny_config, sharding.make_mesh(tiny_config.mesh)).abstract_state
    checkpointer = ckpt_lib.Checkpointer(str(run_copy), save_every=3, keep=3)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="step 6 .* is intact"):
        checkpointer.restore_latest(other)
    checkpointer.close()
    assert sorted(os.listdir(run_copy / "checkpoints")) == ["3", "6"]
    assert not (run_copy / ckpt_lib.DAMAGED_DIR).exists()


def test_load_state_verifies(run_copy, abstract_state):
    abstract = {"ema": abstract_state["ema"]}
    _flip_byte(_largest_data_file(run_copy / "checkpoints" / "6"))
    with pytest.raises(ckpt_lib.CheckpointDamagedError, match="step 6.*checksum mismatch"):
        ckpt_lib.load_state(str(run_copy), abstract, step=6, partial=True)
    _, step = ckpt_lib.load_state(str(run_copy), abstract, partial=True)  # newest intact, left in place
    assert step == 3 and (run_copy / "checkpoints" / "6").exists()


def test_training_resumes_past_a_damaged_checkpoint(run_copy, world_dir, jax_cache):
    """The trainer on a workdir whose newest checkpoint is damaged: resumes from step 3, recomputes steps 4-6
    exactly as the original run did, and metrics.jsonl holds one record per step."""
    original = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    _truncate(_largest_data_file(run_copy / "checkpoints" / "6"))
    config = local_config(world_dir, jax_cache)
    result = train_lib.train(config, str(run_copy))
    assert result.final_step == 6 and len(result.losses) == 3
    records = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in original], rtol=0, atol=0)


# ---------------------------------------------------------------- the workdir lock


def test_second_run_on_a_workdir_fails_clearly(tmp_path, tiny_config):
    workdir = tmp_path / "run"
    with workdir_lib.WorkdirLock(workdir):
        with pytest.raises(workdir_lib.WorkdirLockedError, match=f"in use by another run \\(pid {os.getpid()}"):
            train_lib.train(tiny_config, str(workdir))
        assert not (workdir / "config.json").exists()  # nothing of the running one was touched
    assert not (workdir / workdir_lib.LOCK_NAME).exists()


def test_stale_lock_of_a_dead_process_is_reported_and_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / workdir_lib.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    with caplog.at_level(logging.WARNING), workdir_lib.WorkdirLock(tmp_path):
        assert json.loads((tmp_path / workdir_lib.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and str(dead.pid) in caplog.text


def test_lock_of_another_host_is_not_taken(tmp_path):
    (tmp_path / workdir_lib.LOCK_NAME).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(workdir_lib.WorkdirLockedError, match="host elsewhere.*delete"):
        workdir_lib.WorkdirLock(tmp_path).acquire()


# ---------------------------------------------------------------- paths


def test_object_store_paths_are_kept_and_fail_loudly_without_their_filesystem():
    assert os.fspath(ckpt_lib.checkpoint_dir("/tmp/x/../run")) == "/tmp/run/checkpoints"
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed: gs:// would be reached for real")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="gs://bucket/run.*gcsfs"):
        ckpt_lib.checkpoint_dir("gs://bucket/run")
    with pytest.raises(ValueError, match="unsupported scheme"):
        workdir_lib.path("ftp://host/run")


def test_train_on_an_unreachable_object_store_fails_before_any_work(tmp_path, tiny_config):
    try:
        import gcsfs  # noqa: F401
        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ImportError, match="gcsfs"):
            train_lib.train(tiny_config, "gs://bucket/run")
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "gs:").exists()  # no local look-alike directory
