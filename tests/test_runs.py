"""Loading a run (jepa/runs.py): its config merged onto today's defaults, only the named parts of its state, and
its encoder (EMA, online, or the trainer's random initialisation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, child_error, load_config

from jepa import checkpoint as ckpt_lib
from jepa import runs


def test_run_config_round_trip_and_old_runs(tmp_path):
    c = load_config("tiny")
    c.data.crop_scale = (0.5, 1.0)
    c.data.sources = {"a": dict(c.data.sources.world), "b": dict(c.data.sources.world, weight=2.0)}
    saved = json.loads(c.to_json_best_effort())
    del saved["evals"]  # a run written before the field existed
    del saved["data"]["sources"]["a"]["episodes"]  # a world source written before the field existed
    del saved["train"]["collapse_warn_rank"]  # a field added to an existing section
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = runs.load_config(str(tmp_path))
    assert loaded.data.crop_scale == (0.5, 1.0)
    assert sorted(loaded.data.sources) == ["a", "b"] and loaded.data.sources.b.weight == 2.0
    assert loaded.data.sources.a.episodes == 0
    assert loaded.model.encoder.width == 64 and loaded.evals.to_dict() == {}
    default = runs.config_lib.base_config().train.collapse_warn_rank
    assert loaded.train.collapse_warn_rank == default
    expected = c.to_dict()
    expected["evals"] = {}
    expected["train"]["collapse_warn_rank"] = default
    assert json.loads(loaded.to_json_best_effort()) == json.loads(json.dumps(expected))


def test_bad_run_directories_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"workdir {tmp_path}: no config.json"):
        runs.load_config(str(tmp_path))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        runs.load_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"data": 3}))
    with pytest.raises(ValueError, match="field data is 3, expected a dict"):
        runs.load_config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no finished checkpoint"):
        runs.checkpoint_step(str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()  # reading a run never creates anything in it


def test_load_state_parts_reads_only_the_named_entries(tiny_run):
    """Export, planning and surprise read the parts of a checkpoint they use, never the optimiser state; the
    parts equal those of a full restore."""
    parts, step = runs.load_state_parts(tiny_run, ["ema", "params/predictor"])
    assert step == 6
    assert set(parts) == {"ema", "params"} and set(parts["params"]) == {"predictor"}
    full, _ = ckpt_lib.load_state(tiny_run, runs.saved_state_tree(tiny_run, step, runs.inference_mesh()), step)
    assert "opt" in full
    for got, want in ((parts["ema"], full["ema"]), (parts["params"]["predictor"], full["params"]["predictor"])):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
    with pytest.raises(ValueError, match=r"state part 'params/decoder': params/decoder is not in the saved state"):
        runs.load_state_parts(tiny_run, ["params/decoder"])
    with pytest.raises(ValueError, match="parts: expected a non-empty list"):
        runs.load_state_parts(tiny_run, "ema")


LAYOUT_SCRIPT = r"""
import sys, jax
from jepa import runs
mesh = runs.inference_mesh()  # 2 devices here; the run saved its state from 1
target = runs.saved_state_tree(sys.argv[1], 3, mesh)
parts, step = runs.load_state_parts(sys.argv[1], ["ema", "params/predictor"], 3, target=target)
assert step == 3 and set(parts) == {"ema", "params"}, (step, list(parts))
for got, want in zip(jax.tree.leaves(parts), jax.tree.leaves({"ema": target["ema"], "params": {"predictor":
                     target["params"]["predictor"]}})):
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want.sharding)
print("ok")
"""


def test_load_state_parts_onto_a_given_layout(tiny_run):
    """init_from: the parts are restored onto the shardings of the abstract state the caller passes, also on
    another device count than the saving run's."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", LAYOUT_SCRIPT, tiny_run], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", child_error(proc.stderr)


def test_online_and_random_encoders_differ_from_ema(tiny_run):
    config = runs.load_config(tiny_run)
    ema, step = runs.load_encoder(tiny_run, config)
    online, _ = runs.load_encoder(tiny_run, config, weights="online")
    old, old_step = runs.load_encoder(tiny_run, step=3)  # the run's own config by default
    assert step == 6 and old_step == 3
    rand, rand_step = runs.load_encoder(tiny_run, config, weights="random")
    assert rand_step == 0
    leaf = lambda p: np.asarray(p["patch_kernel"])
    assert not np.array_equal(leaf(ema), leaf(online)) and not np.array_equal(leaf(ema), leaf(rand))
    assert not np.array_equal(leaf(ema), leaf(old))
    np.testing.assert_array_equal(leaf(rand), leaf(runs.random_encoder(config)))
    with pytest.raises(ValueError, match="--step=5"):
        runs.load_encoder(tiny_run, config, step=5)
    with pytest.raises(ValueError, match="weights: 'target' is not one of"):
        runs.load_encoder(tiny_run, config, weights="target")
    config.model.encoder.depth = 3
    with pytest.raises(ValueError, match="encoder parameters do not match the config"):
        runs.load_encoder(tiny_run, config)
