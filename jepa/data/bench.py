"""Input-pipeline benchmark: per-stage time and end-to-end clips/s, to see whether data keeps the accelerators fed.

    python -m jepa.data.bench --config=configs/quickstart.py [--config.data.num_frames=16] [--batches=N] [--workers=N]
    python -m jepa.data.bench --synthetic_720p [--batches=N] [--workers=N]   # 16x224x224 clips from 10 s 720p H.264
    python -m jepa.data.bench --per_core [--levers] [--config=FILE] [--workers=N]  # clips/s per core, cores to feed

The per-stage breakdown (read, decode, augment, mask, batch) runs the pipeline's own stage functions directly on
records in this process, one clip at a time; the end-to-end number iterates the real Grain pipeline with the
configured (or --workers) prefetch processes, after a warm-up batch (its time is printed separately).

--per_core measures what a data worker costs: CPU seconds per training clip (the ViT-L recipe's by default:
16 x 256^2 at 4 fps) of one process with a single-threaded decoder, from 10 s H.264 files at 360p and 720p with a
2 s and x264's default keyframe interval, written once with PyAV into --rate_dir. CPU time, not wall time, so the
figure holds on a machine shared with other jobs; the cores needed to feed --rate_target clips/s follow from it.
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


# ---------------------------------------------------------------- per-core data rate from real-like video

# Source sizes by name; other sizes are given as WIDTHxHEIGHT.
SIZES = {"360p": (640, 360), "720p": (1280, 720)}


def parse_size(text: str) -> tuple[int, int]:
    """(width, height) of "360p", "720p" or "WIDTHxHEIGHT" (even numbers: H.264 4:2:0 needs them)."""
    if text in SIZES:
        return SIZES[text]
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"source size {text!r} is not one of {sorted(SIZES)} or WIDTHxHEIGHT") from None
    if width < 16 or height < 16 or width % 2 or height % 2:
        raise ValueError(f"source size {text!r}: width and height must be even and >= 16")
    return width, height


def _texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3] random texture with detail at every scale from 4 to 256 px (like natural images)."""
    import cv2
    img = np.full((height, width, 3), 128.0, np.float32)
    for scale, amplitude in [(4, 40), (16, 50), (64, 60), (256, 50)]:
        small = rng.standard_normal((height // scale + 2, width // scale + 2, 3)).astype(np.float32)
        big = cv2.resize(small, (width + 2 * scale, height + 2 * scale), interpolation=cv2.INTER_CUBIC)
        img += amplitude * big[scale:scale + height, scale:scale + width]
    return np.clip(img, 0, 255).astype(np.uint8)


def write_source_video(path: str, width: int, height: int, *, seconds: float = 10.0, fps: int = 30,
                       gop: int = 250, bits_per_pixel: float = 0.09, seed: int = 0) -> str:
    """Writes an H.264 mp4 as pretraining sources come: x264 defaults (High profile, CABAC, 3 B-frames with
    B-pyramid, 3 reference frames), a keyframe every `gop` frames, and the bit rate of web video
    (`bits_per_pixel` per frame: 0.09 gives 2.5 Mbit/s at 720p30, 0.62 Mbit/s at 360p30).

    The picture pans over a textured scene with a moving patch and sensor-like noise, so that the encoder spends
    the whole bit rate (flat synthetic patterns compress to a fraction of it and decode faster than real video).
    Written under a temporary name and renamed, so an interrupted run leaves no half file behind.
    """
    import av
    rng = np.random.default_rng(seed)
    frames = int(round(seconds * fps))
    scene = _texture(height + 2 * max(1, height // 6), width + 2 * frames + 8, rng)
    noise = [rng.integers(-3, 4, (height, width, 3), dtype=np.int16) for _ in range(7)]
    patch = scene[:height // 6, :width // 6]
    tmp = f"{path}.partial.mp4"
    with av.open(tmp, "w") as container:
        stream = container.add_stream("h264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = int(bits_per_pixel * width * height * fps)
        stream.options = {"x264-params": f"keyint={gop}:min-keyint={gop}"}
        for t in range(frames):
            y = int(height // 6 * (1 + np.sin(t / 40.0)))
            img = scene[y:y + height, 2 * t:2 * t + width].astype(np.int16)
            row = (5 * t) % (height - patch.shape[0] + 1)
            img[row:row + patch.shape[0], width // 3:width // 3 + patch.shape[1]] = patch
            img = np.clip(img + noise[t % len(noise)], 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
    return path


def source_videos(folder: str, width: int, height: int, gop: int, *, files: int, seconds: float, fps: int,
                  bits_per_pixel: float) -> list[str]:
    """The `files` videos of one kind in `folder`, written when missing (the name holds every setting)."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k in range(files):
        name = f"h264_{width}x{height}_{fps}fps_{seconds:g}s_gop{gop}_bpp{bits_per_pixel:g}_{k}.mp4"
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            t0 = time.perf_counter()
            write_source_video(path, width, height, seconds=seconds, fps=fps, gop=gop,
                               bits_per_pixel=bits_per_pixel, seed=k)
            print(f"wrote {name} ({os.path.getsize(path) * 8 / seconds / 1e6:.2f} Mbit/s) in "
                  f"{time.perf_counter() - t0:.1f} s")
        paths.append(path)
    return paths


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """One way of decoding clips (the levers of jepa.data.decode, one by one)."""
    label: str
    seek: bool = True
    skip_unwanted: bool = True
    resize_on_decode: bool = True
    threads: int = 1


LEVERS = (
    DecodeOptions("from start, every frame", seek=False, skip_unwanted=False),
    DecodeOptions("seek, every frame", skip_unwanted=False),
    DecodeOptions("seek, skip unwanted non-ref (default)"),
    DecodeOptions("same, no resize on decode", resize_on_decode=False),
    DecodeOptions("same, frame threads (FFmpeg's count)", threads=0),
)


def _records(paths: list[str]) -> list[dict]:
    from jepa.data import decode
    out = []
    for path in paths:
        info = decode.probe(path)
        out.append({"path": path, "num_frames": info["num_frames"], "fps": info["fps"],
                    "height": info["height"], "width": info["width"]})
    return out


def time_clips(records: list[dict], settings, clips_count: int, seed: int,
               options: tuple[DecodeOptions, ...] = (LEVERS[2],)) -> list[dict]:
    """Makes `clips_count` training clips the way the pipeline does (random window at the clip settings' frame
    step, decode, random resized crop + flip) in this process, once per entry of `options`: CPU ms per clip by
    phase and clips per CPU second, one dict per option.

    Each clip is made with every option in turn (same window, same crop) before the next clip, so that the load
    of a shared machine drifts alike for every option.
    """
    from jepa.data import decode
    maker = clips.ClipMaker([], [], settings, train=True, world=False, seed=seed)
    rng = np.random.default_rng(seed)
    stats: list[dict] = [{} for _ in options]
    crop, total = [0.0] * len(options), [0.0] * len(options)
    for k in range(clips_count):
        record = records[k % len(records)]
        indices = maker.frame_indices(record, rng)
        for j, o in enumerate(options):
            t0 = time.process_time()
            short_side = maker.short_side(record) if o.resize_on_decode else None
            clip = decode.decode_frames(record["path"], indices, short_side, threads=o.threads,
                                        skip_unwanted=o.skip_unwanted, seek=o.seek, stats=stats[j])
            t1 = time.process_time()
            maker.augment(clip, np.random.default_rng([seed, k]))
            t2 = time.process_time()
            crop[j] += t2 - t1
            total[j] += t2 - t0
    out = []
    for j in range(len(options)):
        per = {key: (1e3 * v if isinstance(v, float) else v) / clips_count for key, v in stats[j].items()}
        per["crop"] = 1e3 * crop[j] / clips_count
        per["total"] = 1e3 * total[j] / clips_count
        per["clips_per_cpu_s"] = clips_count / max(total[j], 1e-9)
        out.append(per)
    return out


def _worker_clips(args) -> float:
    records, settings, clips_count, seed = args
    from jepa.data import decode
    decode.set_default_threads(1)
    return time_clips(records, settings, clips_count, seed)[0]["total"]


def time_workers(records: list[dict], settings, clips_count: int, workers: int) -> float:
    """Clips/s (wall) of `workers` processes making `clips_count` clips each (single-threaded decoders)."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        pool.map(_worker_clips, [(records, settings, 1, 1000 + w) for w in range(workers)])  # imports, warm-up
        t0 = time.perf_counter()
        pool.map(_worker_clips, [(records, settings, clips_count, w) for w in range(workers)])
        wall = time.perf_counter() - t0
    return workers * clips_count / wall


def run_rates(config, *, sizes: list[str], gops: list[int], folder: str, files: int, seconds: float, fps: int,
              bits_per_pixel: float, clips_count: int, workers: int, target: float, host_cores: int,
              levers: bool) -> dict:
    """Per-core clips/s for each (source size, keyframe interval), the cores that feed `target` clips/s, the
    aggregate rate of `workers` processes and, with `levers`, the rate of each decoding lever on the same clips."""
    from jepa.data import decode
    settings = clips.clip_settings(config)
    print(f"clips: {settings.num_frames} frames x {settings.resolution}px, frame_step {settings.frame_step}, "
          f"target_fps {settings.target_fps:g} (> 0: frame step from each video's fps), training crop + flip; sources: "
          f"{files} x {seconds:g} s {fps} fps H.264 per kind (x264 defaults, {bits_per_pixel:g} bit/pixel) in "
          f"{folder}")
    print(f"per core = clips per CPU second of one process with a single-threaded decoder; "
          f"{os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    header = (f"{'source':>9} {'GOP':>4} {'Mbit/s':>6} | CPU ms/clip: {'open+seek':>9} {'lead-in (frames)':>16} "
              f"{'window (frames)':>16} {'convert':>7} {'crop':>5} {'total':>6} | {'clips/s/core':>12} "
              f"{'cores for ' + format(target, 'g') + '/s':>15}")
    print(header)
    results = {}
    for size in sizes:
        width, height = parse_size(size)
        for gop in gops:
            paths = source_videos(folder, width, height, gop, files=files, seconds=seconds, fps=fps,
                                  bits_per_pixel=bits_per_pixel)
            records = _records(paths)
            mbps = sum(os.path.getsize(p) for p in paths) * 8 / (len(paths) * seconds * 1e6)
            r = time_clips(records, settings, clips_count, seed=0)[0]
            step = decode.frame_step_for_fps(records[0]["fps"], settings.target_fps) if settings.target_fps > 0 \
                else settings.frame_step
            r["frame_step"] = step
            cores = target / r["clips_per_cpu_s"]
            print(f"{size:>9} {gop:>4} {mbps:>6.2f} | {'':>12} {r.get('open_seek', 0):>9.1f} "
                  f"{r.get('lead_in', 0):>9.1f} ({r.get('frames_lead_in', 0):>4.0f}) "
                  f"{r.get('window', 0):>9.1f} ({r.get('frames_window', 0):>4.0f}) {r.get('convert', 0):>7.1f} "
                  f"{r['crop']:>5.1f} {r['total']:>6.1f} | {r['clips_per_cpu_s']:>12.2f} {cores:>15.1f}"
                  f"   (frame step {step})")
            results[(size, gop)] = dict(r, mbps=mbps, cores=cores, records=records)
    print("(lead-in / window: decoding before / inside the clip's window, frames decoded in parentheses; "
          "convert: YUV -> RGB with the resize to the decode short side; crop: random resized crop + flip)")
    if workers:
        for (size, gop), r in results.items():
            rate = time_workers(r["records"], settings, max(2, clips_count // workers), workers)
            r["workers_clips_per_s"] = rate
            print(f"{size} GOP {gop}: {workers} processes: {rate:.2f} clips/s (wall) = {rate / workers:.2f} per "
                  f"process; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if levers:
        print("levers, one at a time on the same clips (clips/s per core; frame threads: CPU of all threads):")
        print(f"{'source':>9} {'GOP':>4} | " + " | ".join(o.label for o in LEVERS))
        for (size, gop), r in results.items():
            rates = [x["clips_per_cpu_s"] for x in time_clips(r["records"], settings, clips_count, seed=1,
                                                              options=LEVERS)]
            r["levers"] = dict(zip((o.label for o in LEVERS), rates))
            print(f"{size:>9} {gop:>4} | " + " | ".join(f"{x:.2f}" for x in rates))
    feeders = max(1, host_cores - 1)   # the trainer's own process keeps a core
    print(f"on a {host_cores}-core host ({feeders} cores decoding, one for the trainer) the accelerator waits for "
          f"data (1 - supply / {target:g} clips/s): " + ", ".join(
              f"{size} GOP {gop} {100 * max(0.0, 1 - feeders * r['clips_per_cpu_s'] / target):.0f}%"
              for (size, gop), r in results.items()))
    for r in results.values():
        del r["records"]
    return {f"{size}_gop{gop}": r for (size, gop), r in results.items()}


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
    flags.DEFINE_boolean("per_core", False, "clips/s per CPU core from H.264 sources written locally (x264 "
                         "defaults, web bit rate), for the clips of --config (default: the ViT-L recipe), and the "
                         "cores that feed --rate_target clips/s; --workers: also time that many processes "
                         "(default: every core; 0: none)")
    flags.DEFINE_list("rate_sizes", ["360p", "720p"], "source sizes: 360p, 720p or WIDTHxHEIGHT")
    flags.DEFINE_list("rate_gops", ["60", "250"], "keyframe intervals in frames (60: 2 s at 30 fps, as web video "
                      "is cut for streaming; 250: x264's default)")
    flags.DEFINE_integer("rate_files", 2, "videos per kind", lower_bound=1)
    flags.DEFINE_float("rate_seconds", 10.0, "length of each video", lower_bound=0.1)
    flags.DEFINE_integer("rate_fps", 30, "frame rate of the videos", lower_bound=1)
    flags.DEFINE_float("rate_bpp", 0.09, "bit rate in bits per pixel per frame (0.09: 2.5 Mbit/s at 720p30)",
                       lower_bound=0.001)
    flags.DEFINE_integer("rate_clips", 24, "clips timed per kind and lever", lower_bound=1)
    flags.DEFINE_float("rate_target", 77.0, "clips/s to feed (77: the ViT-L/16 step on one H200)", lower_bound=0)
    flags.DEFINE_integer("rate_host_cores", 16, "cores of the host whose data wait is estimated", lower_bound=1)
    flags.DEFINE_string("rate_dir", os.path.join(tempfile.gettempdir(), "jepa_data_bench"),
                        "folder of the written videos (kept: later runs reuse them)")
    flags.DEFINE_boolean("levers", False, "with --per_core: also time each decoding lever on the same clips")


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
            if f.per_core:
                from jepa import config as config_lib
                try:
                    gops = [int(g) for g in f.rate_gops]
                    for size in f.rate_sizes:
                        parse_size(size)
                except ValueError as e:
                    raise cli.UsageError(f"--rate_sizes / --rate_gops: {e}") from None
                if min(gops, default=0) < 1:
                    raise cli.UsageError(f"--rate_gops: keyframe intervals must be >= 1, got {f.rate_gops}")
                config = config_flag.value or config_lib.vjepa2_recipe("large")
                workers = (os.cpu_count() or 1) if f.workers is None else f.workers
                return run_rates(config, sizes=list(f.rate_sizes), gops=gops, folder=f.rate_dir,
                                 files=f.rate_files, seconds=f.rate_seconds, fps=f.rate_fps,
                                 bits_per_pixel=f.rate_bpp, clips_count=f.rate_clips, workers=workers,
                                 target=f.rate_target, host_cores=f.rate_host_cores, levers=f.levers)
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
