"""jepa.data.pipeline: batches, determinism, exact resume, sharding, mixing, bad files, eval mode, workers.

Sources are real: in-memory world-episode records (the record format of jepa_world) and mp4 files written with
PyAV (tests/media.py), read as video records with bytes, through a manifest, or through TFDS.
"""

import logging
import os

import media
import numpy as np
import pytest

from jepa import config as config_lib
from jepa import masks
from jepa.data import clips, pipeline, sources


def episode(n_frames=12, size=24, label=0, domain=0, seed=0):
    """A world-episode record whose frame t is the flat grey level 10*t (+ a per-episode offset) everywhere."""
    level = (10 * np.arange(n_frames) + seed % 7).astype(np.uint8)
    frames = np.broadcast_to(level[:, None, None, None], (n_frames, size, size, 3)).copy()
    actions = np.zeros((n_frames, 6), np.float32)
    actions[:, 0] = np.arange(n_frames)
    actions[:, 1] = seed
    states = np.zeros((n_frames, 32), np.float32)
    states[:, 0] = np.arange(n_frames) * 2
    return {"frames": frames, "actions": actions, "states": states, "rewards": np.zeros(n_frames, np.float32),
            "action_dim": 2, "state_dim": 1, "num_qpos": 1, "domain": domain, "task": "test", "seed": seed,
            "label": label}


def episodes(n, label=None, **kw):
    """n episodes with seeds 0..n-1; label = the seed unless given."""
    return [episode(label=i if label is None else label, seed=i, **kw) for i in range(n)]


def small_config(**data):
    """4 frames x 32 px, patch 8 / tubelet 2 (grid 2x4x4), per-process batch 4; sources given per test."""
    c = config_lib.base_config()
    c.seed = 3
    c.data.sources = {}
    c.data.num_frames, c.data.frame_step, c.data.resolution = 4, 2, 32
    c.data.num_workers, c.data.prefetch_buffer = 0, 1
    for k, v in data.items():
        setattr(c.data, k, v)
    c.model.encoder.patch_size, c.model.encoder.tubelet_size = 8, 2
    c.mask.types = {"short": config_lib.mask_type(2, 0.15, 0), "long": config_lib.mask_type(1, 0.5, 1)}
    c.train.global_batch_size = 4
    return c


def with_sources(c, sources: dict, weights: dict | None = None):
    c.data.sources = {k: config_lib.world_source("tiny", weight=(weights or {}).get(k, 1.0)) for k in sources}
    return c


def take(ds, n, state=None):
    it = iter(ds)
    try:
        if state is not None:
            it.set_state(state)
        return [next(it) for _ in range(n)]
    finally:
        if hasattr(it, "close"):
            it.close()


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def frame_levels(video):
    """Grey level of each frame of a [T,H,W,3] uint8 clip of flat frames."""
    return video[..., 0].astype(np.float64).mean(axis=(1, 2))


@pytest.fixture(scope="module")
def mp4s(tmp_path_factory):
    """Six 40-frame 64x64 H.264 files (bar-coded frame numbers; square, so a centre crop keeps every bar)."""
    d = tmp_path_factory.mktemp("videos")
    paths = []
    for i in range(6):
        frames = media.index_frames(40, height=64, width=64)
        paths.append(media.write_video(str(d / f"v{i}.mp4"), frames, fps=20, gop=8))
    return d, paths


def video_record(path, label=0, data=None):
    return {"video": open(path, "rb").read() if data is None else data, "path": path, "label": label,
            "num_frames": -1, "fps": -1.0, "duration": -1.0, "height": -1, "width": -1, "is_image": False}


# ---------------------------------------------------------------- batches


def test_world_batch_shapes_dtypes_and_masks():
    c = small_config()
    srcs = {"w": episodes(8)}
    ds = pipeline.build_pipeline(with_sources(c, srcs), process_index=0, process_count=1, sources=srcs)
    (b,) = take(ds, 1)
    lengths = masks.mask_lengths(c)
    expected = {"video", "label", "skipped", "actions", "states", "domain"}
    expected |= {f"{n}/{k}" for n in ("short", "long") for k in ("context_idx", "target_idx")}
    assert set(b) == expected
    assert b["video"].shape == (4, 4, 32, 32, 3) and b["video"].dtype == np.uint8
    assert b["label"].dtype == np.int32 and b["skipped"].dtype == np.int32 and b["domain"].dtype == np.int32
    assert b["actions"].shape == (4, 4, 2 * 6) and b["states"].shape == (4, 4, 32)  # frame_step 2: 2 actions
    assert b["actions"].dtype == np.float32 and b["states"].dtype == np.float32
    assert (b["skipped"] == 0).all()
    for name, (nc, nt) in lengths.items():
        ctx, tgt = b[f"{name}/context_idx"], b[f"{name}/target_idx"]
        assert ctx.shape == (4, nc) and tgt.shape == (4, nt) and ctx.dtype == tgt.dtype == np.int32
        for i in range(4):
            assert not set(ctx[i].tolist()) & set(tgt[i].tolist())
            assert ctx[i].min() >= 0 and max(ctx[i].max(), tgt[i].max()) < 2 * 4 * 4


def test_world_actions_states_align_with_frames():
    c = small_config(frame_step=3)
    srcs = {"w": episodes(6, n_frames=20)}
    for b in take(pipeline.build_pipeline(with_sources(c, srcs), process_index=0, process_count=1, sources=srcs), 3):
        for i in range(4):
            seed = int(b["actions"][i, 0, 1])
            t = b["actions"][i, :, 0]
            np.testing.assert_allclose(frame_levels(b["video"][i]), 10 * t + seed % 7, atol=1.5)
            np.testing.assert_array_equal(b["states"][i, :, 0], 2 * t)
            assert (np.diff(t) == 3).all()
            assert b["label"][i] == seed and b["domain"][i] == 0


def test_world_padding_comes_from_the_environments_without_heavy_imports():
    """The pipeline pads actions / states to the environments' A_MAX / S_MAX, and importing it (as every spawned
    data worker does) pulls in neither TFDS nor MuJoCo."""
    import subprocess
    import sys

    from jepa import envs
    assert (clips.A_MAX, clips.S_MAX) == (envs.A_MAX, envs.S_MAX)
    code = ("import sys, jepa.data.pipeline; heavy = [m for m in ('tensorflow_datasets', 'dm_control', 'mujoco') "
            "if m in sys.modules]; assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_batch_size_must_divide_by_process_count():
    c = small_config()
    c.train.global_batch_size = 6
    srcs = {"w": episodes(4)}
    with pytest.raises(ValueError, match="global_batch_size=6.*process count"):
        pipeline.build_pipeline(with_sources(c, srcs), process_index=0, process_count=4, sources=srcs)


def test_bad_source_kind_is_named():
    with pytest.raises(ValueError, match="kind 'hdf5'"):
        sources.open_source({"kind": "hdf5", "name": "x", "data_dir": "", "split": "train", "path": ""})


# ---------------------------------------------------------------- determinism and resume


def test_same_seed_same_batches_other_seed_differs():
    c = small_config()
    srcs = {"w": episodes(10)}
    c = with_sources(c, srcs)
    a = take(pipeline.build_pipeline(c, process_index=0, process_count=1, sources=srcs), 3)
    b = take(pipeline.build_pipeline(c, process_index=0, process_count=1, sources=srcs), 3)
    for x, y in zip(a, b):
        assert_same(x, y)
    other = take(pipeline.build_pipeline(c, process_index=0, process_count=1, sources=srcs, seed=4), 3)
    assert not all(np.array_equal(x["video"], y["video"]) for x, y in zip(a, other))
    assert not all(np.array_equal(x["short/target_idx"], y["short/target_idx"]) for x, y in zip(a, other))


def test_get_state_set_state_resumes_exactly():
    c = small_config()
    srcs = {"w": episodes(5)}  # several epochs in 8 batches: resume must also keep the per-epoch reshuffle
    ds = pipeline.build_pipeline(with_sources(c, srcs), process_index=0, process_count=1, sources=srcs)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    rest = [next(it) for _ in range(5)]
    fresh = pipeline.build_pipeline(c, process_index=0, process_count=1, sources=srcs)
    for x, y in zip(rest, take(fresh, 5, state=state)):
        assert_same(x, y)
    # A state taken at the start also restores (a new run resumed before its first step).
    it2 = iter(fresh)
    first_state = it2.get_state()
    first = next(it2)
    assert_same(first, take(fresh, 1, state=first_state)[0])


def test_orbax_checkpoint_restores_iterator(tmp_path):
    import grain
    import orbax.checkpoint as ocp
    c = small_config()
    srcs = {"w": episodes(6)}
    ds = pipeline.build_pipeline(with_sources(c, srcs), process_index=0, process_count=1, sources=srcs)
    it = iter(ds)
    next(it), next(it)
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
        mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        expected = next(it)
        it2 = iter(pipeline.build_pipeline(c, process_index=0, process_count=1, sources=srcs))
        mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    assert_same(expected, next(it2))


# ---------------------------------------------------------------- sharding and mixing


def test_processes_see_disjoint_records_covering_everything():
    c = small_config()
    srcs = {"w": episodes(16)}
    c = with_sources(c, srcs)
    seen = []
    for p in range(2):
        batches = take(pipeline.build_pipeline(c, process_index=p, process_count=2, sources=srcs), 4)
        assert batches[0]["video"].shape[0] == 2  # global 4 over 2 processes
        seen.append(np.concatenate([b["label"] for b in batches]).tolist())
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(16))


def test_global_batch_is_independent_of_the_process_count():
    """Process p holds global clips p, p+P, ...: with their masks, P processes feed exactly the clips and masks
    one process would (in another row order), so a run's losses do not depend on how many hosts feed it."""
    c = small_config()
    srcs = {"w": episodes(16, label=None)}
    c = with_sources(c, srcs)
    whole = take(pipeline.build_pipeline(c, process_index=0, process_count=1, sources=srcs), 3)
    parts = [take(pipeline.build_pipeline(c, process_index=p, process_count=2, sources=srcs), 3) for p in range(2)]
    for i, full in enumerate(whole):
        for p in range(2):
            for key in ("video", "label", "short/context_idx", "short/target_idx", "long/target_idx"):
                np.testing.assert_array_equal(parts[p][i][key], full[key][p::2], err_msg=key)


def test_mixture_frequencies_follow_weights():
    c = small_config(num_frames=2, frame_step=1, hflip=False)
    c.train.global_batch_size = 20
    srcs = {"a": episodes(7, n_frames=2, size=8, label=0), "b": episodes(5, n_frames=2, size=8, label=1)}
    c = with_sources(c, srcs, {"a": 0.7, "b": 0.3})
    labels = np.concatenate([b["label"] for b in take(
        pipeline.build_pipeline(c, process_index=0, process_count=1, sources=srcs, masks=False), 20)])
    assert labels.size == 400
    assert abs(np.mean(labels == 0) - 0.7) < 0.05


# ---------------------------------------------------------------- video files, bad input


def test_video_records_decode_to_clips(mp4s):
    _, paths = mp4s
    srcs = {"v": [video_record(p, label=i) for i, p in enumerate(paths)]}
    c = small_config(frame_step=3)
    c.data.sources = {"v": config_lib.manifest_source("unused")}
    (b,) = take(pipeline.build_pipeline(c, process_index=0, process_count=1, sources=srcs), 1)
    assert b["video"].shape == (4, 4, 32, 32, 3) and "actions" not in b
    assert (b["skipped"] == 0).all() and b["video"].dtype == np.uint8


def test_manifest_source_eval_center_crop_reads_the_right_frames(mp4s):
    folder, paths = mp4s
    c = small_config(frame_step=1, target_fps=4.0, resolution=64, hflip=False)  # 20 fps files -> step 5
    c.data.sources = {"v": config_lib.manifest_source(str(folder))}
    c.model.encoder.patch_size = 16
    c.train.global_batch_size = 4
    ds = pipeline.build_pipeline(c, process_index=0, process_count=1, train=False)
    batches = take(ds, 2)
    # 6 videos -> 2 batches of 4, the last one padded with 2 invalid elements
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.tolist() == [True] * 6 + [False] * 2
    assert sorted(np.concatenate([b["index"] for b in batches])[:6].tolist()) == list(range(6))
    assert not any(k.endswith("_idx") for k in batches[0])
    # centre window of 4 frames x step 5 in 40 frames: start (40 - 20) // 2 = 10
    clip = batches[0]["video"][0]
    assert [media.read_index(f) for f in clip] == [10, 15, 20, 25]
    again = take(pipeline.build_pipeline(c, process_index=0, process_count=1, train=False), 2)
    for x, y in zip(batches, again):
        assert_same(x, y)


def test_eval_uniform_segments_and_sharding_cover_every_window():
    c = small_config(eval_mode="uniform", num_segments=3, frame_step=1)
    srcs = {"w": episodes(5, n_frames=30)}
    c = with_sources(c, srcs)
    got = []
    for p in range(2):
        batches = take(pipeline.build_pipeline(c, process_index=p, process_count=2, train=False, sources=srcs), 4)
        for b in batches:
            for i in np.flatnonzero(b["valid"]):
                got.append((int(b["index"][i]), int(b["segment"][i]), int(b["actions"][i, 0, 0])))
    assert sorted((r, s) for r, s, _ in got) == [(r, s) for r in range(5) for s in range(3)]
    starts = {s: t for _, s, t in got}
    assert starts[0] < starts[1] < starts[2]


def test_corrupt_files_are_skipped_and_counted(mp4s, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(clips, "_warn_bad_file", clips._RateLimitedWarning())  # a fresh per-process limit
    _, paths = mp4s
    bad = media.make_corrupt_files(tmp_path)
    records = [video_record(p, label=1) for p in paths[:3]]
    records += [video_record(bad["corrupt"], label=-7), video_record(bad["truncated"], label=-7)]
    c = small_config()
    c.train.global_batch_size = 5
    c.data.sources = {"v": config_lib.manifest_source("unused")}
    srcs = {"v": records}
    with caplog.at_level(logging.WARNING, logger="jepa.data.clips"):
        batches = take(pipeline.build_pipeline(c, process_index=0, process_count=1, sources=srcs), 4)
    skipped = sum(int(b["skipped"].sum()) for b in batches)
    assert skipped >= 6  # 4 epochs of 5 records with 2 bad each: at least 8 picks, substitutes may be bad too
    assert all((b["label"] == 1).all() for b in batches)  # every element came from a good file
    assert "corrupt" in caplog.text and "skipping unreadable clip" in caplog.text


def test_skip_count_is_part_of_the_iterator_state(mp4s, tmp_path):
    """data/skipped_total continues across a resume: the count travels with the checkpointed iterator state."""
    _, paths = mp4s
    bad = media.make_corrupt_files(tmp_path)
    records = [video_record(p, label=1) for p in paths[:3]] + [video_record(bad["corrupt"], label=-7)]
    c = small_config()
    c.train.global_batch_size = 4
    c.data.sources = {"v": config_lib.manifest_source("unused")}
    ds = pipeline.build_pipeline(c, process_index=0, process_count=1, sources={"v": records})
    straight = take(ds, 4)
    it = iter(ds)
    first = [next(it), next(it)]
    state = it.get_state()
    it.close()
    assert state["skipped_total"] == sum(int(b["skipped"].sum()) for b in first) > 0
    it = iter(ds)
    it.set_state(state)
    next(it), next(it)
    assert it.skipped_total == sum(int(b["skipped"].sum()) for b in straight)
    it.close()


def test_preflight_reports_and_rejects_mostly_corrupt_source(mp4s, tmp_path):
    _, paths = mp4s
    bad = media.make_corrupt_files(tmp_path)
    c = small_config()
    c.data.sources = {"good": config_lib.manifest_source("x"), "bad": config_lib.manifest_source("y")}
    good = [video_record(p) for p in paths[:4]] + [video_record(bad["zero_byte"])]
    broken = [video_record(bad[k]) for k in ("corrupt", "truncated", "non_video", "audio_only")] + \
        [video_record(paths[0])]
    report = sources.check_sources(c, sources={"good": good})
    assert report["good"] == {"records": 5, "checked": 5, "failed": 1, "bad": [f"{bad['zero_byte']} (good[4])"]}
    with pytest.raises(ValueError, match="sources.bad: 4/5 sampled records failed") as e:
        sources.check_sources(c, sources={"good": good, "bad": broken})
    assert os.path.basename(bad["corrupt"]) in str(e.value) and "good" not in str(e.value).split("sources.bad")[0]


# ---------------------------------------------------------------- workers


def test_mp_prefetch_one_worker_matches_and_resumes(tmp_path):
    """Spawned workers yield the same batches as the main process; get_state and Orbax restores are exact, also
    into a pipeline with another number of workers."""
    import grain
    import orbax.checkpoint as ocp
    c = small_config()
    srcs = {"w": episodes(6)}
    c = with_sources(c, srcs)
    expected = take(pipeline.build_pipeline(c, process_index=0, process_count=1, sources=srcs), 5)
    c.data.num_workers = 1
    ds = pipeline.build_pipeline(c, process_index=0, process_count=1, sources=srcs)
    it = iter(ds)
    try:
        got = [next(it), next(it)]
        state = it.get_state()
        with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
            mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
            mngr.wait_until_finished()
            got.append(next(it))
            it2 = iter(ds)
            try:
                mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
                restored = next(it2)
            finally:
                it2.close()
    finally:
        it.close()
    for x, y in zip(expected[:3], got):
        assert_same(x, y)
    assert_same(expected[2], restored)
    for x, y in zip(expected[2:4], take(ds, 2, state=state)):
        assert_same(x, y)
    # The state is the batch position (and the count of skipped clips), so it restores under another worker count.
    assert state == {"next_index": 2, "skipped_total": 0}
    c.data.num_workers = 0
    for x, y in zip(expected[2:4], take(pipeline.build_pipeline(c, process_index=0, process_count=1,
                                                                 sources=srcs), 2, state=state)):
        assert_same(x, y)
    c.data.num_workers = 2
    for x, y in zip(expected[3:5], take(pipeline.build_pipeline(c, process_index=0, process_count=1,
                                                                 sources=srcs), 2, state={"next_index": 3})):
        assert_same(x, y)


# ---------------------------------------------------------------- configured sources (TFDS, world)


def test_tfds_video_folder_source_through_config(mp4s, tmp_path):
    from jepa.data import video_folder
    folder, _ = mp4s
    video_folder.prepare_video_folder(str(folder), str(tmp_path), name="six", num_workers=1)
    c = small_config()
    c.data.sources = {"six": config_lib.folder_source("jepa_video_folder/six", data_dir=str(tmp_path))}
    src = sources.open_source(c.data.sources.six)
    assert len(src) == 6
    assert sources.check_sources(c)["six"]["failed"] == 0
    (b,) = take(pipeline.build_pipeline(c, process_index=0, process_count=1), 1)
    assert b["video"].shape == (4, 4, 32, 32, 3) and (b["skipped"] == 0).all()


@pytest.mark.slow
def test_world_source_through_config_with_a_worker(tmp_path):
    """Generates the tiny world preset, then reads it in a spawned worker (the source pickles as its config)."""
    c = small_config(num_workers=1)
    c.data.sources = {"world": config_lib.world_source("tiny")}
    c.data.sources.world.data_dir = str(tmp_path)
    c.data.sources.world.num_workers = 1
    assert sources.check_sources(c)["world"]["failed"] == 0
    (b,) = take(pipeline.build_pipeline(c, process_index=0, process_count=1), 1)
    assert b["actions"].shape == (4, 4, 2 * 6) and set(b["domain"].tolist()) <= {0, 1, 2, 3, 4, 5, 6, 7}
