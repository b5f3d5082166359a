"""Shared fixtures: the tiny world dataset, a JAX compilation cache, the tiny quick-start config, and one tiny
trained run (6 steps) that export / probe / notebook tests read. All session-scoped: generated once."""

from __future__ import annotations

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")


def load_config(arg="tiny", name="quickstart"):
    """get_config(arg) of configs/NAME.py."""
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def local_config(world_dir, jax_cache, arg="tiny", name="quickstart"):
    """A config reading the session's tiny world dataset and compiling into the session's JAX cache."""
    c = load_config(arg, name)
    c.data.sources.world.data_dir = world_dir
    c.train.compilation_cache = jax_cache
    return c


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory):
    """The tiny world dataset, generated once for the whole session."""
    from jepa.data import world
    data_dir = str(tmp_path_factory.mktemp("world"))
    world.prepare_world(data_dir, preset="tiny")
    return data_dir


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture
def tiny_config(world_dir, jax_cache):
    return local_config(world_dir, jax_cache)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, world_dir, jax_cache):
    """A workdir with config.json and checkpoints at steps 3 and 6 of the tiny quick-start config."""
    from jepa import train as train_lib
    c = local_config(world_dir, jax_cache)
    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    train_lib.train(c, workdir)
    return workdir


def child_error(stderr: str, chars: int = 3000) -> str:
    """The part of a failed child process's stderr worth reading: the end, or, when it aborted, what precedes the
    fault handler's thread dump (XLA's fatal "Check failed" line would otherwise scroll out of view)."""
    crash = stderr.find("Fatal Python error")
    return stderr[max(0, crash - chars):crash + 1000] if crash >= 0 else stderr[-chars:]
