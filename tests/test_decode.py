"""Decoding with real media written by PyAV: frame-exact seeking per codec, resizing, images, VFR, bad files."""
import os

import av
import media
import numpy as np
import pytest

from jepa.data import decode as D

N = 60             # frames per test video; gop 8 so that seeking actually skips keyframes
H, W = 61, 97      # odd sizes on purpose


@pytest.fixture(scope="module")
def frames():
    return media.index_frames(N, H, W)


@pytest.fixture(scope="module")
def videos(tmp_path_factory, frames):
    d = tmp_path_factory.mktemp("videos")
    out = {}
    for codec, ext in [("h264", "mp4"), ("mpeg4", "mp4"), ("vp9", "webm"), ("mjpeg", "avi"), ("h264", "mov"),
                       ("hevc", "mkv"), ("av1", "mkv")]:
        out[f"{codec}.{ext}"] = media.write_video(d / f"v_{codec}.{ext}", frames, codec=codec, gop=8)
    return out


@pytest.mark.parametrize("key", ["h264.mp4", "mpeg4.mp4", "vp9.webm", "mjpeg.avi", "h264.mov", "hevc.mkv", "av1.mkv"])
def test_decode_picks_exact_frames_every_codec(videos, frames, key):
    path = videos[key]
    idx = np.array([33, 0, 13, 14, 30, 59, 41, 41])   # unsorted, repeated, crossing keyframes
    clip = D.decode_frames(path, idx)
    assert clip.dtype == np.uint8 and clip.shape == (len(idx), H, W, 3)
    assert [media.read_index(f) for f in clip] == idx.tolist()
    # pixel values agree with what was encoded, within codec tolerance
    assert np.abs(clip.astype(int) - frames[idx]).mean() < 4


@pytest.mark.parametrize("key", ["h264.mp4", "vp9.webm"])
def test_bytes_and_path_agree_and_resize_short_side(videos, key):
    path = videos[key]
    idx = np.array([5, 9, 50])
    from_path = D.decode_frames(path, idx, short_side=32)
    with open(path, "rb") as f:
        from_bytes = D.decode_frames(f.read(), idx, short_side=32)
    np.testing.assert_array_equal(from_path, from_bytes)
    assert from_path.shape == (3, 32, round(W * 32 / H), 3)
    assert [media.read_index(f) for f in from_path] == idx.tolist()


def test_resize_portrait_keeps_aspect(tmp_path):
    path = media.write_video(tmp_path / "tall.mp4", media.index_frames(6, 80, 40), codec="mpeg4")
    clip = D.decode_frames(path, [1, 2], short_side=20)
    assert clip.shape == (2, 40, 20, 3)


def test_short_video_repeats_last_frame_through_sampling(tmp_path):
    for n in (1, 2, 3):
        path = media.write_video(tmp_path / f"short{n}.mp4", media.index_frames(n, 32, 48), codec="h264")
        assert D.probe(path, verify=True)["num_frames"] == n
        idx = D.sample_frame_indices(n, 8, 2, np.random.default_rng(0))   # clamped to the last frame
        assert idx.max() == n - 1
        assert [media.read_index(f) for f in D.decode_frames(path, idx)] == idx.tolist()
        with pytest.raises(D.DecodeError, match=f"frame {n + n % 2} is past the end of the video \\({n} frames\\)"):
            D.decode_frames(path, np.arange(8) * 2)   # asking past the end is an error, not a frozen clip


@pytest.mark.parametrize("ext,codec", [("mp4", "h264"), ("webm", "vp9"), ("mkv", "mpeg4")])
def test_variable_frame_rate_indexes_by_frame_order(tmp_path, frames, ext, codec):
    gaps = np.random.default_rng(0).choice([0.02, 0.05, 0.1], N - 1)
    times = np.concatenate([[0.0], np.cumsum(gaps)])
    path = media.write_video(tmp_path / f"vfr.{ext}", frames, codec=codec, gop=8, times=times)
    info = D.probe(path)
    assert info["num_frames"] == N
    assert info["duration"] == pytest.approx(times[-1], abs=0.15)
    idx = np.array([5, 17, 40, 41, 59, 59])
    assert [media.read_index(f) for f in D.decode_frames(path, idx)] == idx.tolist()
    with pytest.raises(D.DecodeError, match="vfr"):
        D.decode_frames(path, [59, 70])


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".webp"])
def test_images_are_clips_of_one_frame(tmp_path, frames, ext):
    path = media.write_image(tmp_path / f"img{ext}", frames[37])
    info = D.probe(path)
    assert info["is_image"] and info["num_frames"] == 1 and (info["height"], info["width"]) == (H, W)
    clip = D.decode_frames(path, [0, 4, 9, 100])
    assert clip.shape == (4, H, W, 3)
    assert all(media.read_index(f) == 37 for f in clip)
    assert np.abs(clip[0].astype(int) - frames[37]).mean() < 3
    assert D.decode_frames(path, [0], short_side=30).shape == (1, 30, round(W * 30 / H), 3)


def test_probe_metadata(videos):
    info = D.probe(videos["h264.mp4"])
    assert info == {"num_frames": N, "fps": 25.0, "duration": pytest.approx(N / 25), "height": H, "width": W,
                    "is_image": False}
    webm = D.probe(videos["vp9.webm"])       # no frame count in the container: counted by demuxing
    assert webm["num_frames"] == N and webm["fps"] == pytest.approx(25.0)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return media.make_corrupt_files(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "zero_byte", "non_video", "unsupported_codec",
                                  "audio_only", "unreadable"])
def test_bad_files_raise_decode_error_naming_file(bad_files, kind):
    path = bad_files[kind]
    if kind == "unreadable" and not media.permission_blocks_reading(path):
        pytest.skip("running as root: chmod 000 does not prevent reading")
    for call in (lambda: D.probe(path), lambda: D.decode_frames(path, [0, 3]),
                 lambda: D.read_record_clip({"path": path, "video": b""}, [0])):
        with pytest.raises(D.DecodeError) as e:
            call()
        assert os.path.basename(path) in str(e.value)
    if kind != "unreadable":
        with open(path, "rb") as f:
            data = f.read()
        with pytest.raises(D.DecodeError, match=os.path.basename(path)):
            D.read_record_clip({"path": path, "video": data}, [0])


# ------------------------------------------------------------------------------------------- truncated files

CUTS = [("h264", "mp4", False), ("hevc", "mp4", True), ("mpeg4", "mp4", True), ("mjpeg", "avi", False),
        ("vp9", "webm", False), ("h264", "mkv", True)]


@pytest.fixture(scope="module")
def cut_videos(tmp_path_factory, frames):
    """Downloads that stopped at frame 30 of 60 (inside=True: halfway through that frame's data). The headers sit
    before the frame data (mp4 with faststart, avi, mkv/webm), so the files open and still declare 60 frames."""
    d = tmp_path_factory.mktemp("cut")
    out = {}
    for codec, ext, inside in CUTS:
        whole = media.write_video(d / f"whole_{codec}.{ext}", frames, codec=codec, gop=8, faststart=ext == "mp4")
        out[f"{codec}.{ext}"] = media.cut_file(whole, d / f"cut_{codec}.{ext}", 30, inside=inside)
    return out


@pytest.mark.parametrize("key", [f"{c}.{e}" for c, e, _ in CUTS])
def test_window_past_the_cut_raises_instead_of_repeating_the_last_frame(cut_videos, key):
    path = cut_videos[key]
    assert [media.read_index(f) for f in D.decode_frames(path, [3, 12, 20])] == [3, 12, 20]   # before the cut
    data = open(path, "rb").read()
    for idx in ([20, 36, 52], [50, 55, 59]):   # across the cut; wholly past it
        for record in ({"path": path}, {"video": data, "path": path}):   # the file, or its bytes in a dataset
            with pytest.raises(D.DecodeError, match="truncated|failed to decode") as e:
                D.read_record_clip(record, idx)
            assert os.path.basename(path) in str(e.value)


@pytest.mark.parametrize("key", [f"{c}.{e}" for c, e, _ in CUTS])
def test_verify_reports_cut_files(cut_videos, key):
    path = cut_videos[key]
    with pytest.raises(D.DecodeError, match="truncated") as e:
        D.probe(path, verify=True)
    assert os.path.basename(path) in str(e.value)
    if key.endswith(("mkv", "webm")):   # no frame count in the header: plain probe reads every packet, and checks
        with pytest.raises(D.DecodeError, match="ends at 1.2.? s of the 2.40 s the container declares"):
            D.probe(path)


def test_verify_decodes_the_end(tmp_path, frames):
    """A file whose last group of pictures is garbage (the frame count intact) passes probe, not verification."""
    path = media.write_video(tmp_path / "bad_end.mp4", frames, codec="h264", gop=8)
    with av.open(path) as container:
        keys = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size and p.is_keyframe]
    pos, size = keys[-1]
    data = bytearray(open(path, "rb").read())
    data[pos:pos + size] = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    open(path, "wb").write(bytes(data))
    assert D.probe(path)["num_frames"] == N
    with pytest.raises(D.DecodeError, match="bad_end.mp4: truncated or damaged: the end of the video does not decode"):
        D.probe(path, verify=True)


@pytest.fixture(scope="module")
def more_healthy(tmp_path_factory, frames):
    """Healthy files whose headers differ from the plain case: counted frames that never show (an edit list),
    no frame count (fragmented mp4, MPEG-TS, Matroska), an audio track longer than the video, variable frame rate."""
    d = tmp_path_factory.mktemp("healthy")
    times = np.concatenate([[0.0], np.cumsum(np.random.default_rng(1).choice([0.02, 0.05, 0.1], N - 1))])
    return {
        "hidden.mp4": media.write_video(d / "hidden.mp4", media.index_frames(N + 2, H, W), gop=8, hidden=2),
        "fragmented.mp4": media.write_video(d / "fragmented.mp4", frames, gop=8, fragmented=True),
        "h264.ts": media.write_video(d / "v.ts", frames, gop=8),
        "audio.mkv": media.write_video(d / "audio.mkv", frames, gop=8, audio_seconds=4.0),
        "audio.webm": media.write_video(d / "audio.webm", frames, codec="vp9", gop=8, audio_seconds=4.0),
        "audio.mp4": media.write_video(d / "audio.mp4", frames, gop=8, audio_seconds=4.0, faststart=True),
        "vfr.webm": media.write_video(d / "vfr.webm", frames, codec="vp9", gop=8, times=times),
        "one.mkv": media.write_video(d / "one.mkv", frames[:1]),
    }


@pytest.mark.parametrize("key", ["h264.mp4", "mpeg4.mp4", "vp9.webm", "mjpeg.avi", "h264.mov", "hevc.mkv", "av1.mkv",
                                 "hidden.mp4", "fragmented.mp4", "h264.ts", "audio.mkv", "audio.webm", "audio.mp4",
                                 "vfr.webm", "one.mkv"])
def test_healthy_files_pass_verification(videos, more_healthy, key):
    path = {**videos, **more_healthy}[key]
    info = D.probe(path, verify=True)
    assert info == D.probe(path)
    assert info["num_frames"] == {"hidden.mp4": N + 2, "one.mkv": 1}.get(key, N)
    last = info["num_frames"] - 1
    assert D.decode_frames(path, [0, last // 2, last]).shape[0] == 3


def test_audio_track_longer_than_the_video_leaves_its_rate(more_healthy):
    for key in ("audio.mkv", "audio.webm", "audio.mp4"):
        info = D.probe(more_healthy[key])
        assert info["fps"] == pytest.approx(25.0) and info["duration"] == pytest.approx(N / 25, abs=0.01), key


def test_header_counting_hidden_frames_is_not_truncation(more_healthy):
    """The header counts 62 frames, an edit list shows 60: the sampler may ask for frames 60 and 61, which never
    show, and the last shown frame stands in (a couple of frames of slack); further past the end is an error."""
    path = more_healthy["hidden.mp4"]
    info = D.probe(path, verify=True)
    assert info["num_frames"] == N + 2 and info["duration"] == pytest.approx(N / 25)
    clip = D.decode_frames(path, [0, 30, N - 1, N, N + 1])
    assert [media.read_index(f) for f in clip] == [2, 32, N + 1, N + 1, N + 1]   # frames 0 and 1 are hidden
    with pytest.raises(D.DecodeError, match="hidden.mp4: frame 66 is past the end of the video \\(62 frames\\)"):
        D.decode_frames(path, [N - 1, N + 6])


def test_avi_with_dropped_frames_is_not_truncation(tmp_path, frames):
    """Capture software stores dropped frames as empty AVI chunks: the header counts 60, 48 frames are there, and
    their timestamps reach the end. Verification keeps the file and stores the frames that are there."""
    dropped = set(range(2, N, 5))
    path = media.write_avi_with_drops(tmp_path / "drops.avi", frames, dropped)
    assert D.probe(path)["num_frames"] == N
    info = D.probe(path, verify=True)
    assert info["num_frames"] == N - len(dropped) and info["fps"] == pytest.approx(25.0)
    kept = [i for i in range(N) if i not in dropped]
    idx = [0, 1, 2, 30, 46, 47]   # positions in frame order, up to the last frame there is
    assert [media.read_index(f) for f in D.decode_frames(path, idx)] == [kept[i] for i in idx]


def test_missing_file_and_bad_arguments(tmp_path, videos):
    with pytest.raises(D.DecodeError, match="nope.mp4"):
        D.decode_frames(str(tmp_path / "nope.mp4"), [0])
    with pytest.raises(D.DecodeError, match="empty"):
        D.probe(b"")
    with pytest.raises(ValueError, match="indices"):
        D.decode_frames(videos["h264.mp4"], [-1])
    with pytest.raises(ValueError, match="indices"):
        D.decode_frames(videos["h264.mp4"], [])


def test_read_record_clip_dispatch(videos, frames):
    episode = {"frames": frames[:10], "actions": np.zeros((10, 6), np.float32)}
    clip = D.read_record_clip(episode, [2, 4, 20])
    np.testing.assert_array_equal(clip, frames[[2, 4, 9]])
    small = D.read_record_clip(episode, [1], short_side=30)
    assert small.shape == (1, 30, round(W * 30 / H), 3) and media.read_index(small[0]) == 1
    with open(videos["mpeg4.mp4"], "rb") as f:
        data = f.read()
    by_bytes = D.read_record_clip({"video": data, "path": b"x.mp4"}, [7, 8])
    by_path = D.read_record_clip({"video": b"", "path": videos["mpeg4.mp4"]}, [7, 8])
    np.testing.assert_array_equal(by_bytes, by_path)
    assert [media.read_index(f) for f in by_path] == [7, 8]
    with pytest.raises(ValueError, match="no 'frames'"):
        D.read_record_clip({"video": b"", "path": ""}, [0])


# ------------------------------------------------------------------------------------------- index sampling

def test_random_window_within_bounds_and_evenly_spaced():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(300):
        idx = D.sample_frame_indices(100, 8, 4, rng)
        assert idx.dtype == np.int64 and idx.shape == (8,)
        assert idx.min() >= 0 and idx.max() <= 99 and (np.diff(idx) == 4).all()
        assert idx[0] + 8 * 4 <= 100          # the whole window fits
        starts.add(int(idx[0]))
    assert min(starts) == 0 and max(starts) == 100 - 32 and len(starts) > 40   # spread over all starts


def test_sampling_deterministic_for_a_seed():
    a = [D.sample_frame_indices(500, 16, 2, np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(a[0], a[1])
    b = D.sample_frame_indices(500, 16, 2, np.random.default_rng(8))
    assert not np.array_equal(a[0], b)


def test_center_uniform_and_segments():
    np.testing.assert_array_equal(D.sample_frame_indices(100, 4, 5, None, mode="center"), [40, 45, 50, 55])
    segs = [D.sample_frame_indices(120, 4, 2, None, mode="uniform", num_segments=3, segment=k) for k in range(3)]
    assert [s[0] for s in segs] == [16, 56, 96]       # centred in partitions [0,40), [40,80), [80,120)
    assert all(s.max() < 120 and (np.diff(s) == 2).all() for s in segs)
    over = [D.sample_frame_indices(40, 4, 5, None, mode="uniform", num_segments=3, segment=k) for k in range(3)]
    assert [o[0] for o in over] == [0, 10, 20]         # partitions shorter than a window: spread first..last
    rng = np.random.default_rng(0)
    for _ in range(50):
        r = D.sample_frame_indices(120, 4, 2, rng, mode="random", num_segments=3, segment=1)
        assert 40 <= r[0] and r[0] + 8 <= 80


def test_short_video_indices_clamped():
    idx = D.sample_frame_indices(5, 4, 3, np.random.default_rng(0))
    np.testing.assert_array_equal(idx, [0, 3, 4, 4])
    np.testing.assert_array_equal(D.sample_frame_indices(1, 3, 2, None, mode="center"), [0, 0, 0])


def test_sampling_and_fps_argument_errors():
    with pytest.raises(ValueError, match="rng"):
        D.sample_frame_indices(10, 2, 2, None)
    with pytest.raises(ValueError, match="mode"):
        D.sample_frame_indices(10, 2, 2, None, mode="middle")
    with pytest.raises(ValueError, match="segment"):
        D.sample_frame_indices(10, 2, 2, None, mode="uniform", num_segments=2, segment=2)
    with pytest.raises(ValueError, match="total_frames"):
        D.sample_frame_indices(0, 2, 2, None, mode="center")
    assert D.frame_step_for_fps(30, 4) == 8 and D.frame_step_for_fps(25, 30) == 1
    assert D.frame_step_for_fps(60, 8) == 8 and D.frame_step_for_fps(0.0, 4) == 1
    with pytest.raises(ValueError, match="target_fps"):
        D.frame_step_for_fps(30, 0)


# ---------------------------------------------------------------- window decoding equals a full decode

@pytest.fixture(scope="module")
def b_frame_video(tmp_path_factory):
    """120 frames of H.264 with x264's B-frames (some referenced, some not) and a keyframe every 30 frames."""
    path = media.write_video(tmp_path_factory.mktemp("bframes") / "b.mp4", media.index_frames(120, 48, 64),
                             codec="h264", gop=30)
    return path


@pytest.mark.parametrize("step", [1, 3, 8])
def test_window_decode_equals_full_decode(b_frame_video, step):
    """Seeking to the keyframe before the window and not decoding unwanted unreferenced pictures returns the very
    pixels of a decode from the start that decodes every picture, single- and frame-threaded."""
    rng = np.random.default_rng(step)
    fast_frames = full_frames = 0
    for _ in range(4):
        idx = D.sample_frame_indices(120, 8, step, rng)
        fast, full = {}, {}
        clip = D.decode_frames(b_frame_video, idx, threads=1, stats=fast)
        reference = D.decode_frames(b_frame_video, idx, threads=1, skip_unwanted=False, seek=False, stats=full)
        np.testing.assert_array_equal(clip, reference)
        np.testing.assert_array_equal(D.decode_frames(b_frame_video, idx, threads=3), reference)
        np.testing.assert_array_equal(D.decode_frames(b_frame_video, idx, 24, threads=1),
                                      D.decode_frames(b_frame_video, idx, 24, skip_unwanted=False, seek=False))
        assert [media.read_index(f) for f in clip] == idx.tolist()
        fast_frames += fast["frames_lead_in"] + fast["frames_window"]
        full_frames += full["frames_lead_in"] + full["frames_window"]
        assert full["frames_window"] == idx[-1] - idx[0] + 1 and full["frames_lead_in"] == idx[0]
    assert fast_frames < full_frames   # the levers decode fewer pictures, else this test proves nothing


@pytest.mark.parametrize("missing", [6, 10, 18])
def test_missing_frame_stands_in_as_in_a_full_decode(tmp_path, missing):
    """A constant-rate stream missing one frame: the wanted index shows the frame before the gap, as decoding every
    picture does, even when that frame is an unreferenced picture the fast path skipped (it then decodes again)."""
    slots = np.delete(np.arange(201), missing)
    path = media.write_video(tmp_path / "gap.mp4", media.index_frames(200, 48, 64), codec="h264", gop=40,
                             times=slots / 25.0)
    for idx in ([missing], [missing - 4, missing], [missing, missing + 10]):
        clip = D.decode_frames(path, idx, threads=1)
        np.testing.assert_array_equal(clip, D.decode_frames(path, idx, threads=1, skip_unwanted=False))
        assert [media.read_index(f) for f in clip] == [i - (i >= missing) for i in idx]


def test_default_threads(b_frame_video):
    try:
        D.set_default_threads(2)
        assert D._default_threads == 2
        np.testing.assert_array_equal(D.decode_frames(b_frame_video, [5, 40]),
                                      D.decode_frames(b_frame_video, [5, 40], threads=1))
    finally:
        D.set_default_threads(0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            D.set_default_threads(bad)
    with pytest.raises(ValueError, match="threads"):
        D.decode_frames(b_frame_video, [1], threads=-2)


def test_per_core_bench_on_tiny_videos(tmp_path):
    """`python -m jepa.data.bench --per_core --levers` end to end on 1 s videos (written once, then reused)."""
    from jepa import cli
    from jepa.data import bench
    argv = ["--per_core", "--levers", "--rate_sizes=64x48", "--rate_gops=8", "--rate_seconds=1", "--rate_clips=2",
            "--workers=1", f"--rate_dir={tmp_path}"]
    out = bench.main(argv)["64x48_gop8"]
    assert out["clips_per_cpu_s"] > 0 and out["cores"] == pytest.approx(77.0 / out["clips_per_cpu_s"])
    assert out["workers_clips_per_s"] > 0 and len(out["levers"]) == len(bench.LEVERS)
    assert out["frame_step"] == 8 and out["frames_window"] > 0
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2 and all(f.suffix == ".mp4" for f in files)
    mtimes = [f.stat().st_mtime_ns for f in files]
    bench.main(argv[:1] + argv[2:-2] + ["--workers=0", argv[-1]])
    assert [f.stat().st_mtime_ns for f in sorted(tmp_path.iterdir())] == mtimes
    with pytest.raises(cli.UsageError, match="rate_sizes"):
        bench.main(["--per_core", "--rate_sizes=63x48", f"--rate_dir={tmp_path}"])


def test_pipeline_workers_decode_with_their_share_of_the_cores(b_frame_video):
    from jepa.data import pipeline
    cores = len(os.sched_getaffinity(0))
    assert pipeline._decode_threads(1) == cores and pipeline._decode_threads(10 * cores) == 1
    init = pipeline._WorkerInit(pipeline._decode_threads(2))
    try:
        init(0, 2)   # what each Grain worker runs first (outside a worker it only sets the thread count)
        assert D._default_threads == max(1, cores // 2)
        assert D.decode_frames(b_frame_video, [3]).shape == (1, 48, 64, 3)
    finally:
        D.set_default_threads(0)
