"""Orbax checkpoints holding the train state and the Grain iterator together, sealed with checksums.

A checkpoint is one Orbax step directory with two items: `state` (params, EMA params, optimiser state, step) and
`data` (the Grain iterator state, so a resumed run sees exactly the batches it would have seen). Orbax writes into
a temporary directory and renames it when complete, so a kill during a save never damages the last good checkpoint.

Once a save has finished, process 0 seals it: `CHECKSUMS.json` in the step directory lists every file's size and
SHA-256. Restoring verifies the seal first, so a truncated, deleted, rewritten or bit-flipped file is named instead
of restoring silently or ending in a storage-library traceback. A damaged checkpoint is moved aside (never deleted)
to `damaged_checkpoints/` and, unless fallback is refused, the newest intact earlier checkpoint is restored.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from jepa import workdir as workdir_lib

SEAL_NAME = "CHECKSUMS.json"
DAMAGED_DIR = "damaged_checkpoints"


class CheckpointDamagedError(RuntimeError):
    """A checkpoint failed verification or restore; the message names the step and what is wrong."""


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    return workdir_lib.path(workdir) / "checkpoints"


# ---------------------------------------------------------------- seals (checksums)


def _files(step_dir: epath.Path) -> list[epath.Path]:
    """Every file below step_dir except the seal (epath has no recursive glob on object stores)."""
    found, todo = [], [step_dir]
    while todo:
        for p in todo.pop().iterdir():
            if p.is_dir():
                todo.append(p)
            elif not p.name.startswith(SEAL_NAME):
                found.append(p)
    return sorted(found)


def seal(step_dir: epath.Path) -> None:
    """Writes the checksum list of a finished step directory (atomically: a partial list is never read)."""
    files = {os.fspath(p.relative_to(step_dir)): {"size": workdir_lib.file_size(p),
                                                  "sha256": workdir_lib.file_sha256(p)} for p in _files(step_dir)}
    tmp = step_dir / (SEAL_NAME + ".tmp")
    tmp.write_text(json.dumps({"files": files, "sealed": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    tmp.replace(step_dir / SEAL_NAME)


def verify(step_dir: epath.Path) -> tuple[bool | None, str]:
    """(True, "") when every sealed file is present with its size and checksum; (False, what is wrong) when not;
    (None, why) when the step has no seal (the run stopped between finishing the save and sealing it)."""
    seal_file = step_dir / SEAL_NAME
    if not seal_file.exists():
        return None, "it has no checksum list (the run stopped before sealing it)"
    try:
        sealed = json.loads(seal_file.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return False, f"its checksum list {seal_file} is unreadable ({e})"
    problems = []
    for name, want in sorted(sealed.items()):
        p = step_dir / name
        if not p.exists():
            problems.append(f"{name} is missing")
        elif workdir_lib.file_size(p) != want["size"]:
            problems.append(f"{name} has {workdir_lib.file_size(p)} bytes, {want['size']} were written")
        elif workdir_lib.file_sha256(p) != want["sha256"]:
            problems.append(f"{name} has other contents than were written (checksum mismatch)")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        return False, "; ".join(problems[:3]) + more
    return True, ""


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _finalized(step_dir: epath.Path) -> bool:
    """Whether Orbax has finished a step: locally its temporary directory is renamed to the step's name once complete;
    on object stores it writes into the final name and adds commit_success.txt last."""
    return step_dir.is_dir() and (workdir_lib.is_local(step_dir) or (step_dir / "commit_success.txt").exists())


def _steps_on_disk(directory: epath.Path) -> list[int]:
    """Finished step directories, newest first."""
    if not directory.exists():
        return []
    return sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit() and _finalized(p)), reverse=True)


def _move_aside(workdir_root: epath.Path, step_dir: epath.Path) -> epath.Path:
    """Moves a damaged step out of the checkpoint directory (so rotation and resume never pick it again) and keeps
    it for inspection."""
    target_root = workdir_root / DAMAGED_DIR
    target_root.mkdir(parents=True, exist_ok=True)
    target = target_root / f"{step_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    step_dir.rename(target)
    return target


class CheckpointMismatchError(RuntimeError):
    """An intact checkpoint that does not fit the state it is restored into (another model or config)."""


def _restore_verified(directory: epath.Path, step: int, restore_fn) -> tuple[Any, str | None]:
    """(restored, None), or (None, what is wrong) when the step is damaged. A step whose checksums match but that
    does not restore is not damage: it raises CheckpointMismatchError. An unsealed step that fails to restore cannot
    be told apart from damage and counts as damaged."""
    step_dir = directory / str(step)
    intact, why = verify(step_dir)
    if intact is False:
        return None, why
    if intact is None:
        logging.info("checkpoint step %d in %s: %s; restoring it unverified", step, directory, why)
    try:
        return restore_fn(step), None
    except Exception as e:  # storage-level failures and structure mismatches alike surface as assorted errors
        if intact:
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {directory} is intact (its checksums match) but does not restore into "
                f"this run's state: {_short(e)}. Was it written with another model or config?") from e
        return None, f"restoring it failed ({_short(e)})"


def _restore_newest_intact(directory: epath.Path, restore_fn, *, fallback: bool, what: str) -> tuple[Any, int] | None:
    """Tries the steps newest first. A damaged step is named in one paragraph and either raised (fallback=False) or
    moved aside (process 0) before the next older one is tried. Returns (restored, step), or None when there is no
    checkpoint at all."""
    damaged = []
    for step in _steps_on_disk(directory):
        restored, why = _restore_verified(directory, step, restore_fn)
        if why is None:
            return restored, step
        older = [s for s in _steps_on_disk(directory) if s < step]
        message = f"{what}: checkpoint step {step} in {directory} is damaged: {why}. "
        if not fallback:
            raise CheckpointDamagedError(
                message + (f"Intact-looking earlier steps: {older}. " if older else "There is no earlier step. ") +
                "Nothing was deleted; move the damaged step directory away (or pass "
                "--config.train.checkpoint_fallback=True) to resume from an earlier one.")
        if jax.process_index() == 0:
            moved = _move_aside(directory.parent, step_dir=directory / str(step))
            message += f"It was moved to {moved} (not deleted). "
        damaged.append(step)
        logging.warning(message + ("Falling back to the newest earlier checkpoint." if older else
                                   "No earlier checkpoint is left."))
    if damaged:
        raise CheckpointDamagedError(f"{what}: every checkpoint in {directory} is damaged (steps {damaged}, moved "
                                     f"to {directory.parent / DAMAGED_DIR}); nothing to resume from.")
    return None


# ---------------------------------------------------------------- the trainer's checkpointer


class Checkpointer:
    """Saves asynchronously every `save_every` steps, keeps the newest `keep`, seals finished saves in a background
    thread, and restores the newest intact checkpoint."""

    def __init__(self, workdir: str, *, save_every: int, keep: int, async_save: bool = True,
                 fallback: bool = True):
        if keep < 1:
            raise ValueError(f"keep={keep}: at least one checkpoint must be kept")
        self.directory = checkpoint_dir(workdir)
        self.fallback = fallback
        self.manager = self._manager(save_every, keep, async_save)
        self._options = (save_every, keep, async_save)
        self._sealer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jepa-seal")
        self._sealing: list[concurrent.futures.Future] = []
        self._closing = False

    def _manager(self, save_every: int, keep: int, async_save: bool) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                                 enable_async_checkpointing=async_save, create=True))

    def save(self, step: int, state: Any, data_iter: Any, *, force: bool = False) -> bool:
        """Starts a (possibly asynchronous) save when `step` is due, or always with force; process 0 seals it in
        the background as soon as Orbax has finished it."""
        args = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
            if jax.process_index() == 0:
                self._sealing.append(self._sealer.submit(self._seal_when_finished, step))
        return saved

    def _seal_when_finished(self, step: int, timeout_s: float = 3600.0) -> None:
        """Waits until Orbax has finalized the step (locally: the temporary directory renamed to the step's name;
        on object stores: its commit_success.txt written), then seals it. A kill before that leaves an unsealed,
        still complete checkpoint that is restored unverified."""
        step_dir = self.directory / str(step)
        deadline = time.monotonic() + timeout_s
        while not _finalized(step_dir):
            if time.monotonic() > deadline or self._closing:
                return
            time.sleep(0.05)
        try:
            seal(step_dir)
        except FileNotFoundError:
            pass  # rotated out (keep reached) while sealing: nothing left to seal
        except Exception as e:  # the checkpoint itself is complete; it is restored unverified later
            logging.warning("checkpoint step %d: could not write its checksum list (%s)", step, e)

    def restore_latest(self, abstract_state: Any, data_iter: Any = None) -> tuple[Any, int] | None:
        """(state, step) of the newest intact checkpoint, falling back past damaged ones (see module docstring);
        None when the workdir has no checkpoint."""
        def restore(step):
            return self.restore(step, abstract_state, data_iter)

        found = _restore_newest_intact(self.directory, restore, fallback=self.fallback, what="resume")
        if found is not None and found[1] != self.manager.latest_step():
            self.manager.close()  # damaged steps were moved: Orbax must re-read the directory
            self.manager = self._manager(*self._options)
        return found

    def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
        """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs), and the iterator in place.

        The shardings may differ from the saving run's (another mesh or device count): Orbax reshards. Grain
        stores one iterator file per process (`process_{i}-of-{n}.json`); when the process count changed, the
        file of a saving process is used instead. That is exact for this pipeline, whose state is
        {"next_index": batches consumed} on every process: batch k covers global stream positions
        [k * global_batch, (k + 1) * global_batch) whatever the process count, so no clip is repeated or skipped,
        but each process now reads a different slice of them and masks (drawn per process) differ."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        foreign = None
        if data_iter is not None:
            foreign = self._foreign_iterator_state(step)
            if foreign is None:
                args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        if foreign is not None:
            path, state = foreign
            logging.warning("checkpoint step %d was saved by another process count; data iterator state %s "
                            "taken from %s", step, state, path)
            data_iter.set_state(state)
        return restored["state"]

    def _foreign_iterator_state(self, step: int) -> tuple[str, Any] | None:
        """(file, state) of a saved iterator when this process's own file is missing; None when present."""
        data_dir = self.directory / str(step) / "data"
        own = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if not data_dir.is_dir() or own.exists():
            return None
        saved = sorted(p for p in data_dir.iterdir() if p.name.startswith("process_") and p.name.endswith(".json"))
        if not saved:
            return None
        return os.fspath(saved[0]), json.loads(saved[0].read_text())

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        """Until every save started so far is finished and sealed."""
        self.manager.wait_until_finished()
        for future in self._sealing:
            future.result()
        self._sealing = []

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._closing = True  # a save that failed never finalizes: do not wait for it
            self._sealer.shutdown(wait=True)
            self.manager.close()


def saved_steps(workdir: str | os.PathLike) -> list[int]:
    """A run's finished checkpoint steps, newest first (not verified; see load_state)."""
    return _steps_on_disk(checkpoint_dir(workdir))


def load_state(workdir: str, abstract_state: Any, step: int | None = None, *,
               partial: bool = False) -> tuple[Any, int]:
    """The train state of another run (for init_from and export), without its data iterator. partial: abstract_state
    holds only some of the saved entries (e.g. {"ema": ...}), and only those are read from disk (export, planning
    and init_from never need the optimiser state, two more copies of the parameters under AdamW).

    The checkpoint is verified against its seal. With step=None the newest intact step is used (a damaged newer one
    is named in a warning and left in place: another run owns this workdir); a damaged step asked for by number
    raises CheckpointDamagedError."""
    directory = checkpoint_dir(workdir)
    restore = (ocp.args.PyTreeRestore(abstract_state, partial_restore=True,
                                      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
               if partial else ocp.args.StandardRestore(abstract_state))
    with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        steps = [step] if step is not None else _steps_on_disk(directory)
        if not steps:
            raise FileNotFoundError(f"no finished checkpoint in {directory}")
        for candidate in steps:
            if not (directory / str(candidate)).exists():
                raise FileNotFoundError(f"no checkpoint of step {candidate} in {directory}")
            restored, why = _restore_verified(directory, candidate, lambda s: manager.restore(
                s, args=ocp.args.Composite(state=restore))["state"])
            if why is None:
                return restored, candidate
            message = f"checkpoint step {candidate} in {directory} is damaged: {why}."
            if step is not None:
                raise CheckpointDamagedError(message)
            logging.warning("%s Trying the next older step.", message)
    raise CheckpointDamagedError(f"every checkpoint in {directory} is damaged (steps {steps})")


def abstract_like(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
