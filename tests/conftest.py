"""Shared fixtures: the tiny world dataset, a JAX compilation cache, the tiny quick-start config, and one tiny
trained run (6 steps) that export / probe / notebook tests read. All session-scoped: generated once."""

from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")


def load_config(arg="tiny"):
    sys.path.insert(0, os.path.join(REPO, "configs"))
    try:
        import quickstart
    finally:
        sys.path.pop(0)
    return quickstart.get_config(arg)


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
    c = load_config("tiny")
    c.data.sources.world.data_dir = world_dir
    c.train.compilation_cache = jax_cache
    return c


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, world_dir, jax_cache):
    """A workdir with config.json and checkpoints at steps 3 and 6 of the tiny quick-start config."""
    from jepa import train as train_lib
    c = load_config("tiny")
    c.data.sources.world.data_dir = world_dir
    c.train.compilation_cache = jax_cache
    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    train_lib.train(c, workdir)
    return workdir
