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
from jepa import objectives, runs

OVERRIDES = ["--config.data.eval_mode=uniform", "--config.data.num_segments=2"]


def test_layers_last_is_the_encoder_output_and_intermediate_layers_stack():
    c = load_config("tiny")
    encoder_def = runs.encoder_def(c)
    params = runs.random_encoder(c)
    video = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 64, 64, 3))
    full = objectives.build(c).encode(params, video)
    last = export_lib.encode_layers(encoder_def, params, video, export_lib.resolve_layers([-1], 2))
    np.testing.assert_array_equal(np.asarray(full), np.asarray(last))
    both = export_lib.encode_layers(encoder_def, params, video, export_lib.resolve_layers([0, -1], 2))
    assert both.shape == (2, 256, 128)
    np.testing.assert_allclose(np.asarray(both[..., 64:]), np.asarray(full), atol=1e-5)
    assert not np.allclose(np.asarray(both[..., :64]), np.asarray(full), atol=1e-2)
    with pytest.raises(ValueError, match="--layers"):
        export_lib.resolve_layers([2], 2)


def _arrays(path):
    return {f: np.load(os.path.join(path, f), allow_pickle=False) for f in sorted(os.listdir(path))
            if f.endswith(".npy")}


def test_export_round_trip_and_resume(tiny_run, tmp_path):
    config = runs.load_config(tiny_run)
    config.data.update_from_flattened_dict({"eval_mode": "uniform", "num_segments": 2})  # = OVERRIDES
    kw = dict(split="train", features=("pooled", "patches"), batch_size=2, shard_size=2, config=config,
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


def test_embed_split_in_memory(tiny_run):
    config = runs.load_config(tiny_run)
    ema, _ = runs.load_encoder(tiny_run, config)
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
