"""Orbax checkpoints holding the train state and the Grain iterator together.

A checkpoint is one Orbax step directory with two items: `state` (params, EMA params, optimiser state,
step, RNG) and `data` (the Grain iterator state, so a resumed run sees exactly the batches it would have
seen). Orbax writes into a temporary directory and renames it when complete, so a crash or a kill during
a save never damages the last good checkpoint: `latest_step` only reports finished ones.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    def __init__(self, workdir: str, *, save_every: int, keep: int, async_save: bool = True):
        self.directory = checkpoint_dir(workdir)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                                 enable_async_checkpointing=async_save, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any, *, force: bool = False) -> bool:
        """Starts a (possibly asynchronous) save when `step` is due, or always with force."""
        args = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        saved = self.manager.save(step, args=ocp.args.Composite(**args), force=force)
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

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
        data_dir = os.path.join(self.directory, str(step), "data")
        own = os.path.join(data_dir, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
        if not os.path.isdir(data_dir) or os.path.exists(own):
            return None
        saved = sorted(f for f in os.listdir(data_dir) if f.startswith("process_") and f.endswith(".json"))
        if not saved:
            return None
        path = os.path.join(data_dir, saved[0])
        with open(path) as f:
            return path, json.load(f)

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_state(workdir: str, abstract_state: Any, step: int | None = None, *,
               partial: bool = False) -> tuple[Any, int]:
    """The train state of another run (for init_from and export), without its data iterator. partial: abstract_state
    holds only some of the saved entries (e.g. {"ema": ...}), and only those are read from disk (export, planning
    and init_from never need the optimiser state, two more copies of the parameters under AdamW)."""
    manager = ocp.CheckpointManager(checkpoint_dir(workdir))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {checkpoint_dir(workdir)}")
    restore = (ocp.args.PyTreeRestore(abstract_state, partial_restore=True) if partial
               else ocp.args.StandardRestore(abstract_state))
    restored = manager.restore(step, args=ocp.args.Composite(state=restore))
    manager.close()
    return restored["state"], step


def abstract_like(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
