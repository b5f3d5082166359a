"""Orbax checkpoints holding the train state and the Grain iterator together.

A checkpoint is one Orbax step directory with two items: `state` (params, EMA params, optimiser state,
step, RNG) and `data` (the Grain iterator state, so a resumed run sees exactly the batches it would have
seen). Orbax writes into a temporary directory and renames it when complete, so a crash or a kill during
a save never damages the last good checkpoint: `latest_step` only reports finished ones.
"""

from __future__ import annotations

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
        """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs), and the iterator in place."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def load_state(workdir: str, abstract_state: Any, step: int | None = None) -> tuple[Any, int]:
    """The train state of another run (for init_from and export), without its data iterator."""
    manager = ocp.CheckpointManager(checkpoint_dir(workdir))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {checkpoint_dir(workdir)}")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    manager.close()
    return restored["state"], step


def abstract_like(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
