"""Input-pipeline benchmark: per-stage time and end-to-end clips/s, to see whether data keeps the accelerators fed.

    python -m jepa.data.bench --config=configs/quickstart.py [--config.data.num_frames=16] [--batches=N] [--workers=N]
    python -m jepa.data.bench --synthetic_720p [--batches=N] [--workers=N]   # 16x224x224 clips from 10 s 720p H.264

The per-stage breakdown (read, decode, augment, mask, batch) runs the pipeline's own stage functions directly on
records in this process, one clip at a time; the end-to-end number iterates the real Grain pipeline with the
configured (or --workers) prefetch processes, after a warm-up batch (its time is printed separately).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time

import numpy as np
from absl import flags

from jepa import masks
from jepa.data import clips, pipeline, sources


def write_synthetic_videos(folder: str, count: int = 3, seconds: float = 10.0, fps: int = 30,
                           width: int = 1280, height: int = 720) -> list[str]:
    """Writes `count` H.264 mp4 files of smooth moving patterns (x264 defaults: yuv420p, keyint 250)."""
    import av
    paths = []
    x, y = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    diag = (y[:, None] + x[None, :]).astype(np.int32)  # b channel: a diagonal wave through a lookup table
    for k in range(count):
        path = os.path.join(folder, f"synthetic_720p_{k}.mp4")
        with av.open(path, "w") as container:
            stream = container.add_stream("h264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            img = np.empty((height, width, 3), np.uint8)
            for t in range(int(round(seconds * fps))):
                phase = 0.05 * t + k
                img[..., 0] = (127 + 120 * np.sin(x / 90.0 + phase)).astype(np.uint8)[None, :]
                img[..., 1] = (127 + 120 * np.sin(y / 70.0 - 0.7 * phase)).astype(np.uint8)[:, None]
                lut = (127 + 120 * np.sin(np.arange(width + height) / 150.0 + 0.3 * phase)).astype(np.uint8)
                img[..., 2] = lut[diag]
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        paths.append(path)
    return paths


def synthetic_config(folder: str):
    """16 frames x 224 px, frame step 4, ViT patch 16 / tubelet 2 over a manifest of the synthetic folder."""
    from jepa import config as config_lib
    c = config_lib.base_config()
    c.data.sources = {"synthetic_720p": config_lib.manifest_source(folder)}
    c.data.num_frames, c.data.frame_step, c.data.resolution = 16, 4, 224
    c.model.encoder.patch_size, c.model.encoder.tubelet_size = 16, 2
    c.train.global_batch_size = 8
    return c


@dataclasses.dataclass
class StageTimes:
    read: float = 0.0
    decode: float = 0.0
    augment: float = 0.0
    mask: float = 0.0
    batch: float = 0.0
    clips: int = 0


def time_stages(config, num_clips: int) -> StageTimes:
    """Runs read -> frame pick + decode -> augment per clip, then batch + mask per batch, in this process."""
    settings = clips.clip_settings(config)
    names, srcs, _ = sources.sources_from_config(config, None)
    world = pipeline.has_world_records(srcs)
    maker = clips.ClipMaker(names, srcs, settings, train=True, world=world, seed=int(config.seed))
    masker = masks.make_masker(config)
    batch_size = min(int(config.train.global_batch_size), num_clips)
    rng = np.random.default_rng(0)
    times = StageTimes()
    elements = []
    for k in range(num_clips):
        sid = k % len(srcs)
        index = int(rng.integers(len(srcs[sid])))
        t0 = time.perf_counter()
        record = maker.read(sid, index)
        t1 = time.perf_counter()
        indices = maker.frame_indices(record, rng)
        clip = maker.decode(record, indices)
        t2 = time.perf_counter()
        element = {"video": maker.augment(clip, rng), **maker.extras(record, indices), "skipped": np.int32(0)}
        t3 = time.perf_counter()
        times.read += t1 - t0
        times.decode += t2 - t1
        times.augment += t3 - t2
        times.clips += 1
        elements.append(element)
        if len(elements) == batch_size:
            t4 = time.perf_counter()
            batch = {key: np.stack([e[key] for e in elements]) for key in elements[0]}
            t5 = time.perf_counter()
            batch.update(masker(batch_size, rng))
            t6 = time.perf_counter()
            times.batch += t5 - t4
            times.mask += t6 - t5
            elements = []
    return times


def time_pipeline(config, batches: int) -> tuple[float, float, int]:
    """(seconds to the first batch, clips/s over the next `batches` batches, per-process batch size)."""
    ds = pipeline.build_pipeline(config, process_index=0, process_count=1)
    it = iter(ds)
    try:
        t0 = time.perf_counter()
        first = next(it)
        t1 = time.perf_counter()
        batch_size = int(first["video"].shape[0])
        for _ in range(batches):
            next(it)
        t2 = time.perf_counter()
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
    return t1 - t0, batches * batch_size / max(t2 - t1, 1e-9), batch_size


def run(config, batches: int, stage_clips: int) -> dict:
    d = config.data
    print(f"sources: {', '.join(f'{k} ({v.kind} {v.name or v.path})' for k, v in d.sources.items())}")
    print(f"clips: {d.num_frames} frames x {d.resolution}px, frame_step={d.frame_step}, target_fps={d.target_fps}, "
          f"batch={config.train.global_batch_size}, workers={d.num_workers}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    report = sources.check_sources(config)
    print("preflight: " + ", ".join(f"{k} {v['checked'] - v['failed']}/{v['checked']} ok ({v['records']} records)"
                                    for k, v in report.items()))
    st = time_stages(config, stage_clips)
    per_clip = {k: 1e3 * getattr(st, k) / max(st.clips, 1) for k in ("read", "decode", "augment", "mask", "batch")}
    total = sum(per_clip.values())
    print(f"in-process stages over {st.clips} clips (ms/clip): " +
          "  ".join(f"{k} {v:.1f}" for k, v in per_clip.items()) +
          f"  | total {total:.1f} ms -> {1e3 / max(total, 1e-9):.1f} clips/s on one core")
    first, clips_per_s, bs = time_pipeline(config, batches)
    print(f"end to end ({d.num_workers} workers, batch {bs}): first batch {first:.2f} s, then "
          f"{clips_per_s:.1f} clips/s over {batches} batches; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return {"stages_ms_per_clip": per_clip, "first_batch_s": first, "clips_per_s": clips_per_s}


def _define_flags() -> None:
    flags.DEFINE_integer("batches", 10, "batches timed end to end (after one warm-up batch)", lower_bound=1)
    flags.DEFINE_integer("workers", None, "override config.data.num_workers", lower_bound=0)
    flags.DEFINE_integer("stage_clips", 32, "clips timed stage by stage in this process", lower_bound=1)
    flags.DEFINE_boolean("synthetic_720p", False, "benchmark 16x224x224 clips from synthetic 720p H.264 files "
                         "written to a temporary folder (config optional: a manifest source is used)")
    flags.DEFINE_integer("synthetic_files", 3, "number of synthetic videos", lower_bound=1)
    flags.DEFINE_float("synthetic_seconds", 10.0, "length of each synthetic video", lower_bound=0.1)
    flags.DEFINE_string("synthetic_dir", None, "keep the synthetic videos in this folder (reused when present) "
                        "instead of a temporary one")
    flags.DEFINE_integer("batch_size", None, "override config.train.global_batch_size", lower_bound=1)


def main(argv=None) -> dict:
    """`python -m jepa.data.bench --config=FILE[:ARG] | --synthetic_720p [--flags]` (argv: after the program
    name); returns what `run` measured."""
    from jepa import cli
    with cli.flag_scope():
        config_flag = cli.define_config_file(argv)
        _define_flags()
        cli.parse(argv)
        f = flags.FLAGS
        tmp = None
        try:
            if f.synthetic_720p:
                folder = f.synthetic_dir
                if folder is None:
                    folder = tmp = tempfile.mkdtemp(prefix="jepa_bench_720p_")
                os.makedirs(folder, exist_ok=True)
                if not any(name.endswith(".mp4") for name in os.listdir(folder)):
                    t0 = time.perf_counter()
                    write_synthetic_videos(folder, f.synthetic_files, f.synthetic_seconds)
                    print(f"wrote {f.synthetic_files} x {f.synthetic_seconds:.0f} s 720p H.264 files in "
                          f"{time.perf_counter() - t0:.1f} s to {folder}")
                config = synthetic_config(folder)
                if config_flag.value is not None:  # keep the data source, the rest (batch, workers) from --config
                    user = config_flag.value
                    with user.unlocked():
                        user.data.sources = config.data.sources
                    config = user
            elif config_flag.value is None:
                raise cli.UsageError("give --config=configs/<file>.py[:arg] or --synthetic_720p")
            else:
                config = config_flag.value
            if f.workers is not None:
                config.data.num_workers = f.workers
            if f.batch_size is not None:
                config.train.global_batch_size = f.batch_size
            return run(config, f.batches, f.stage_clips)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)


def run_cli() -> None:
    """Entry of `python -m jepa.data.bench` and the `jepa-data-bench` console script."""
    from jepa import cli
    cli.run(main, __doc__)


if __name__ == "__main__":  # guard: Grain's mp_prefetch workers are spawned and re-import this module
    run_cli()
