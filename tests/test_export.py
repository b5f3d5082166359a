"""Export: the run's config and encoder are rebuilt, every clip is embedded once, shards resume exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, child_error, load_config

from jepa import export as export_lib

OVERRIDES = ["--config.data.eval_mode=uniform", "--config.data.num_segments=2"]


def test_run_config_round_trip_and_old_runs(tmp_path):
    c = load_config("tiny")
    c.data.crop_scale = (0.5, 1.0)
    c.data.sources = {"a": dict(c.data.sources.world), "b": dict(c.data.sources.world, weight=2.0)}
    saved = json.loads(c.to_json_best_effort())
    del saved["evals"]  # a run written before the field existed
    del saved["data"]["sources"]["a"]["episodes"]  # a world source written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = export_lib.load_run_config(str(tmp_path))
    assert loaded.data.crop_scale == (0.5, 1.0)
    assert sorted(loaded.data.sources) == ["a", "b"] and loaded.data.sources.b.weight == 2.0
    assert loaded.data.sources.a.episodes == 0
    assert loaded.model.encoder.width == 64 and loaded.evals.to_dict() == {}
    expected = c.to_dict()
    expected["evals"] = {}
    assert json.loads(loaded.to_json_best_effort()) == json.loads(json.dumps(expected))


def test_overrides_parse_types_and_reject_unknown_fields():
    c = load_config("tiny")
    export_lib.apply_overrides(c, ["--config.data.num_segments=3", "--config.data.eval_mode=uniform",
                                   "--config.data.hflip=false", "--config.data.crop_scale=(0.2,1.0)"])
    assert c.data.num_segments == 3 and c.data.eval_mode == "uniform" and c.data.hflip is False
    assert c.data.crop_scale == (0.2, 1.0)
    with pytest.raises(ValueError, match="config.data.num_segmnts does not exist"):
        export_lib.apply_overrides(c, ["--config.data.num_segmnts=2"])
    with pytest.raises(ValueError, match="config.data.resolution"):
        export_lib.apply_overrides(c, ["--config.data.resolution=60"])


def test_layers_last_is_the_encoder_output_and_intermediate_layers_stack():
    c = load_config("tiny")
    objective = export_lib.objective_for(c)
    params = export_lib.random_encoder_params(c)
    video = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 64, 64, 3))
    full = objective.encode(params, video)
    last = export_lib.encode_layers(objective, params, video, export_lib.resolve_layers([-1], 2))
    np.testing.assert_array_equal(np.asarray(full), np.asarray(last))
    both = export_lib.encode_layers(objective, params, video, export_lib.resolve_layers([0, -1], 2))
    assert both.shape == (2, 256, 128)
    np.testing.assert_allclose(np.asarray(both[..., 64:]), np.asarray(full), atol=1e-5)
    assert not np.allclose(np.asarray(both[..., :64]), np.asarray(full), atol=1e-2)
    with pytest.raises(ValueError, match="--layers"):
        export_lib.resolve_layers([2], 2)


def _arrays(path):
    return {f: np.load(os.path.join(path, f), allow_pickle=False) for f in sorted(os.listdir(path))
            if f.endswith(".npy")}


def test_export_round_trip_and_resume(tiny_run, tmp_path):
    kw = dict(split="train", features=("pooled", "patches"), batch_size=2, shard_size=2, overrides=OVERRIDES,
              progress=False)
    straight = export_lib.export(tiny_run, str(tmp_path / "straight"), **kw)
    feats = export_lib.load_features(str(tmp_path / "straight"))
    n_records = 4  # tiny world preset: 6 episodes, train split = the first 4
    assert straight["rows"] == len(feats) == n_records * 2 and straight["clips"] == n_records
    assert feats.pooled.shape == (8, 64) and feats.patches.shape == (8, 256, 64)
    assert feats.clip_ids == [f"world/{i}" for i in range(n_records) for _ in range(2)]
    assert [r["segment"] for r in feats.rows] == [0, 1] * n_records
    assert feats.targets["states"].shape == (8, 8, 32) and feats.targets["domain"].tolist() == \
        feats.targets["label"].tolist()
    np.testing.assert_allclose(feats.pooled, np.asarray(feats.patches).mean(1), atol=1e-5)
    assert all(len(r["frame_indices"]) == 8 and r["num_qpos"] > 0 for r in feats.rows)
    assert feats.rows[0]["frame_indices"] != feats.rows[1]["frame_indices"]  # two windows of one episode
    index = [json.loads(line) for line in open(tmp_path / "straight" / "index.jsonl")]
    assert [r["clip_id"] for r in index] == feats.clip_ids
    assert straight["step"] == 6 and straight["encoder"] == "ema" and straight["effective_rank"] > 1.0

    # interrupted after one shard, then resumed: identical files
    out = str(tmp_path / "resumed")
    assert export_lib.export(tiny_run, out, stop_after_shards=1, **kw) == {}
    with pytest.raises(ValueError, match="not finished"):
        export_lib.load_features(out)
    # damage a finished shard as a crash might: it is detected and recomputed
    manifest = json.load(open(os.path.join(out, "manifest-p000.json")))
    assert len(manifest["shards"]) == 1
    with open(os.path.join(out, "p000-s00000.pooled.npy"), "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    resumed = export_lib.export(tiny_run, out, **kw)
    a, b = _arrays(str(tmp_path / "straight")), _arrays(out)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert {k: v for k, v in resumed.items() if k != "workdir"} == \
        {k: v for k, v in straight.items() if k != "workdir"}

    # a different export into the same directory is refused
    with pytest.raises(ValueError, match="holds a different export"):
        export_lib.export(tiny_run, out, **dict(kw, features=("pooled",)))


def test_load_state_parts_reads_only_the_named_entries(tiny_run):
    """Export, planning and surprise read the parts of a checkpoint they use, never the optimiser state; the
    parts equal those of a full restore."""
    from jepa import checkpoint as ckpt_lib

    step = export_lib.checkpoint_step(tiny_run)
    parts = export_lib.load_state_parts(tiny_run, step, ["ema", "params/predictor"])
    assert set(parts) == {"ema", "params"} and set(parts["params"]) == {"predictor"}
    full, _ = ckpt_lib.load_state(tiny_run, export_lib.abstract_from_metadata(tiny_run, step,
                                                                              export_lib.export_mesh()), step)
    assert "opt" in full
    for got, want in ((parts["ema"], full["ema"]), (parts["params"]["predictor"], full["params"]["predictor"])):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)


def test_online_and_random_encoders_differ_from_ema(tiny_run):
    config = export_lib.load_run_config(tiny_run)
    ema, step = export_lib.load_encoder_params(tiny_run, config)
    online, _ = export_lib.load_encoder_params(tiny_run, config, encoder="online")
    old, old_step = export_lib.load_encoder_params(tiny_run, config, step=3)
    assert step == 6 and old_step == 3
    rand = export_lib.random_encoder_params(config)
    leaf = lambda p: np.asarray(p["patch_kernel"])
    assert not np.array_equal(leaf(ema), leaf(online)) and not np.array_equal(leaf(ema), leaf(rand))
    assert not np.array_equal(leaf(ema), leaf(old))
    with pytest.raises(ValueError, match="--step=5"):
        export_lib.load_encoder_params(tiny_run, config, step=5)
    feats = export_lib.embed_split(config, ema, "validation", max_clips=1)
    assert len(feats) == 1 and feats.pooled.shape == (1, 64)


@pytest.mark.slow
def test_cli_export_then_probe(tiny_run, tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    dirs = {}
    for split in ("train", "validation", "test"):
        dirs[split] = str(tmp_path / split)
        proc = subprocess.run([sys.executable, "-m", "jepa.export", f"--workdir={tiny_run}", f"--split={split}",
                               f"--output={dirs[split]}", "--batch_size=4", "--no_progress", *OVERRIDES],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, child_error(proc.stderr)
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["split"] == split and summary["num_segments"] == 2
    proc = subprocess.run([sys.executable, "-m", "jepa.probe", f"--features={dirs['train']}",
                           f"--val_features={dirs['validation']}", f"--test_features={dirs['test']}",
                           "--task=classification", "--target=domain", "--probe=linear", "--lrs=0.01,0.1",
                           "--wds=0.01", "--epochs=5", f"--output={tmp_path / 'result.json'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, child_error(proc.stderr)
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(result["grid"]) == 2 and result["rows"] == {"train": 8, "val": 2, "test": 2}
    assert 0.0 <= result["test"]["accuracy"] <= 1.0
