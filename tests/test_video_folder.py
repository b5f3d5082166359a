"""VideoFolder TFDS builder, manifests, ManifestSource and the prepare CLI, on real media files."""
import json
import os
import subprocess
import sys

import media
import pytest

from jepa.data import decode as D
from jepa.data import video_folder as vf

FRAMES = media.index_frames(12, 32, 48)


def _tree(root):
    """cats/{a.mp4,b.webm}, dogs/{c.avi, deep/d.mp4}, top.png (unlabeled), notes.txt (ignored), dogs/bad.mp4."""
    os.makedirs(root / "cats")
    os.makedirs(root / "dogs" / "deep")
    media.write_video(root / "cats" / "a.mp4", FRAMES, codec="h264")
    media.write_video(root / "cats" / "b.webm", FRAMES[:9], codec="vp9")
    media.write_video(root / "dogs" / "c.avi", FRAMES, codec="mjpeg")
    media.write_video(root / "dogs" / "deep" / "d.mp4", FRAMES, codec="mpeg4")
    media.write_image(root / "top.png", FRAMES[5])
    (root / "notes.txt").write_text("not media")
    (root / "dogs" / "bad.mp4").write_bytes(b"\x00garbage" * 50)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return _tree(tmp_path_factory.mktemp("src") / "videos")


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    builder = vf.prepare_video_folder(str(tree), str(data_dir), name="pets", num_workers=2)
    return builder, data_dir


def test_folder_labels_metadata_and_read_back(prepared, tree):
    builder, data_dir = prepared
    source = vf.video_folder_source(str(data_dir), "train", name="pets")
    assert len(source) == 5 and source.class_names == ["cats", "dogs"]
    records = {os.path.relpath(r["path"], tree): r for r in (source[i] for i in range(len(source)))}
    assert {k: r["label"] for k, r in records.items()} == {
        "cats/a.mp4": 0, "cats/b.webm": 0, "dogs/c.avi": 1, os.path.join("dogs", "deep", "d.mp4"): 1, "top.png": -1}
    a = records["cats/a.mp4"]
    assert isinstance(a["video"], bytes) and a["video"] == (tree / "cats" / "a.mp4").read_bytes()
    assert (a["num_frames"], a["fps"], a["height"], a["width"], a["is_image"]) == (12, 25.0, 32, 48, False)
    assert a["duration"] == pytest.approx(12 / 25, abs=1e-3)
    assert records["cats/b.webm"]["num_frames"] == 9
    assert records["top.png"]["is_image"] and records["top.png"]["num_frames"] == 1
    clip = D.read_record_clip(records["dogs/c.avi"], [3, 11, 7])     # decodes from the stored bytes
    assert [media.read_index(f) for f in clip] == [3, 11, 7]


def test_bad_files_skipped_counted_and_reported(prepared):
    builder, _ = prepared
    report = vf.read_report(builder)
    assert (report["total_files"], report["usable"], report["skipped"]) == (6, 5, 1)
    assert report["skipped_examples"][0]["path"].endswith("bad.mp4")
    assert "bad.mp4" in report["skipped_examples"][0]["reason"]
    assert report["examples_per_split"]["train"] == 5
    assert os.path.exists(os.path.join(builder.data_dir, vf.REPORT_FILE))


def test_several_names_share_a_data_dir_and_validation_split(prepared, tree):
    _, data_dir = prepared
    vf.prepare_video_folder(str(tree / "cats"), str(data_dir), name="cats_only", validation_fraction=0.5)
    train = vf.video_folder_source(str(data_dir), "train", name="cats_only")
    val = vf.video_folder_source(str(data_dir), "validation", name="cats_only")
    paths = sorted([train[i]["path"] for i in range(len(train))] + [val[i]["path"] for i in range(len(val))])
    assert len(train) == 1 and len(val) == 1 and paths == sorted(str(tree / "cats" / f) for f in ("a.mp4", "b.webm"))
    assert all(val[i]["label"] == -1 for i in range(len(val)))   # files at the root of src: unlabeled
    # the split is a function of the relative path only
    assert vf._in_validation("b.webm", 0.5) == (val[0]["path"].endswith("b.webm"))
    assert len(vf.video_folder_source(str(data_dir), "train", name="pets")) == 5   # first dataset untouched
    with pytest.raises(ValueError, match="no prepared video folder 'nothing'"):
        vf.video_folder_source(str(data_dir), "train", name="nothing")
    with pytest.raises(ValueError, match="split 'test'"):
        vf.video_folder_source(str(data_dir), "test", name="pets")


def test_csv_and_jsonl_manifests(tree, tmp_path):
    manifest_dir = tree.parent
    (manifest_dir / "m.csv").write_text("path,label\nvideos/cats/a.mp4,walk\n"
                                        f"{tree / 'dogs' / 'c.avi'},run\nvideos/top.png,\n")
    items, classes = vf.list_media(str(manifest_dir / "m.csv"))
    assert classes == ["run", "walk"]
    assert items == [(str(tree / "cats" / "a.mp4"), 1), (str(tree / "dogs" / "c.avi"), 0), (str(tree / "top.png"), -1)]
    (manifest_dir / "m.jsonl").write_text(json.dumps({"path": "videos/dogs/c.avi", "label": 7}) + "\n\n"
                                          + json.dumps({"path": "videos/cats/b.webm", "label": 2}) + "\n")
    builder = vf.prepare_video_folder(str(manifest_dir / "m.jsonl"), str(tmp_path), name="json")
    src = vf.video_folder_source(str(tmp_path), name="json")
    assert sorted((os.path.basename(src[i]["path"]), src[i]["label"]) for i in range(len(src))) == [
        ("b.webm", 2), ("c.avi", 7)]
    assert builder.info.splits["train"].num_examples == 2
    (manifest_dir / "nohead.csv").write_text("videos/cats/a.mp4,1\n")
    with pytest.raises(ValueError, match="header"):
        vf.list_media(str(manifest_dir / "nohead.csv"))
    (manifest_dir / "m.txt").write_text("x")
    with pytest.raises(ValueError, match=".csv or .jsonl"):
        vf.list_media(str(manifest_dir / "m.txt"))


def test_majority_bad_raises(tmp_path):
    src = tmp_path / "mostly_bad"
    src.mkdir()
    media.write_video(src / "ok.mp4", FRAMES, codec="mpeg4")
    bad = media.make_corrupt_files(tmp_path / "bad")
    for kind in ("corrupt", "truncated", "zero_byte", "non_video"):
        os.replace(bad[kind], src / os.path.basename(bad[kind]))
    with pytest.raises(ValueError, match="4 of 5 media files are unusable") as e:
        vf.prepare_video_folder(str(src), str(tmp_path / "data"))
    assert "corrupt.mp4" in str(e.value)


def test_prepare_reports_truncated_files_with_the_reason(tmp_path):
    """Downloads cut short keep headers that declare every frame: preparation reads each file to its end."""
    src, whole = tmp_path / "src", tmp_path / "whole"
    src.mkdir()
    whole.mkdir()
    media.write_video(src / "ok.mp4", FRAMES, codec="h264", gop=4, faststart=True)
    media.write_video(src / "ok.webm", FRAMES, codec="vp9", gop=4)
    media.write_video(src / "ok.mkv", FRAMES, codec="h264", gop=4, audio_seconds=1.0)
    media.write_video(src / "ok.avi", FRAMES, codec="mjpeg")
    for name, codec, inside in (("cut.mp4", "h264", False), ("cut.webm", "vp9", False), ("mid.mkv", "h264", True)):
        faststart = name.endswith(".mp4")
        full = media.write_video(whole / name, FRAMES, codec=codec, gop=4, faststart=faststart)
        media.cut_file(full, src / name, 6, inside=inside)
    builder = vf.prepare_video_folder(str(src), str(tmp_path / "data"))
    report = vf.read_report(builder)
    assert (report["total_files"], report["usable"], report["skipped"]) == (7, 4, 3)
    reasons = {os.path.basename(e["path"]): e["reason"] for e in report["skipped_examples"]}
    assert sorted(reasons) == ["cut.mp4", "cut.webm", "mid.mkv"]
    assert "cut.mp4: truncated or damaged: the data holds 6 of the 12 frames the container declares" in \
        reasons["cut.mp4"]
    assert "the video data ends at 0.24 s of the 0.48 s the container declares" in reasons["cut.webm"]
    assert "mid.mkv: truncated" in reasons["mid.mkv"]
    source = vf.video_folder_source(str(tmp_path / "data"))
    names = sorted(os.path.basename(source[i]["path"]) for i in range(len(source)))
    assert names == ["ok.avi", "ok.mkv", "ok.mp4", "ok.webm"]


def test_truncated_file_read_in_place_is_skipped_and_counted(tmp_path, caplog, monkeypatch):
    """Training straight from a folder: a clip window past the cut is a decode failure, skipped and counted, and
    another file's clip takes its place; no clip is copies of the last frame before the cut."""
    import logging

    from jepa import config as config_lib
    from jepa.data import clips, pipeline

    frames = media.index_frames(40, 64, 64)
    src = tmp_path / "src"
    (src / "a_cut").mkdir(parents=True)
    (src / "b_good").mkdir()
    whole = media.write_video(tmp_path / "whole.mp4", frames, codec="h264", gop=4, faststart=True)
    media.cut_file(whole, src / "a_cut" / "cut.mp4", 2)
    for i in range(3):
        media.write_video(src / "b_good" / f"g{i}.mp4", frames, codec="h264", gop=4)
    c = config_lib.base_config()
    c.seed = 0
    c.data.sources = {"folder": config_lib.manifest_source(str(src))}
    # every clip is frames 0, 12, 24, 36 (the window outgrows the video): from before the cut at frame 2 to past it
    c.data.num_frames, c.data.frame_step, c.data.resolution = 4, 12, 32
    c.data.crop_scale, c.data.crop_aspect, c.data.hflip = (1.0, 1.0), (1.0, 1.0), False
    c.data.num_workers, c.data.prefetch_buffer = 0, 1
    c.train.global_batch_size = 4
    # the per-process warning rate limit is reset: earlier tests in this process may have used it up
    monkeypatch.setattr(clips, "_warn_bad_file", clips._RateLimitedWarning())
    ds = pipeline.build_pipeline(c, process_index=0, process_count=1, masks=False)
    it = iter(ds)
    with caplog.at_level(logging.WARNING, logger="jepa.data.clips"):
        batches = [next(it) for _ in range(2)]
    it.close()
    assert it.skipped_total == sum(int(b["skipped"].sum()) for b in batches) >= 2   # the cut file, once per epoch
    assert all((b["label"] == 1).all() for b in batches)                            # every clip from a good file
    for b in batches:
        for clip in b["video"]:
            codes = [media.read_index(f) for f in clip]
            assert codes == [0, 12, 24, 36]
    assert "cut.mp4" in caplog.text and "truncated" in caplog.text


def test_manifest_source_no_preparation(tree):
    source = vf.ManifestSource(str(tree))
    assert len(source) == 6 and source.class_names == ["cats", "dogs"]
    records = {os.path.basename(source[i]["path"]): source[i] for i in range(len(source))}
    assert records["a.mp4"]["video"] == b"" and records["a.mp4"]["num_frames"] == 12 and records["a.mp4"]["label"] == 0
    assert records["bad.mp4"]["num_frames"] == -1          # unknown: decoding it will raise DecodeError
    with pytest.raises(D.DecodeError, match="bad.mp4"):
        D.read_record_clip(records["bad.mp4"], [0])
    assert [media.read_index(f) for f in D.read_record_clip(records["a.mp4"], [2, 6])] == [2, 6]
    lazy = vf.ManifestSource(str(tree), probe_metadata=False)[0]
    assert lazy["num_frames"] == -1 and lazy["height"] == -1


def test_prepare_cli_video_folder(tree, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "jepa.data.prepare", "video_folder", f"--src={tree}", f"--data_dir={tmp_path}",
           "--name=cli", "--num_workers=2"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "train: 5 examples" in out.stdout and "1 skipped" in out.stdout and "bad.mp4" in out.stdout
    assert len(vf.video_folder_source(str(tmp_path), name="cli")) == 5
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)   # cached: same summary
    assert again.returncode == 0 and "train: 5 examples" in again.stdout
    missing = subprocess.run(cmd[:4] + [f"--src={tmp_path / 'nope'}", f"--data_dir={tmp_path}", "--name=x"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 2 and "nope" in missing.stderr
