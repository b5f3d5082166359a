"""Test helpers that write REAL media files with PyAV (no mocks): videos, images and broken files.

Frames made by `index_frames` carry their frame number as a bar code (one vertical bar per bit, bright = 1), which
survives lossy codecs and resizing; `read_index` reads it back. Tests decode chosen indices and check the codes, which
proves that seeking lands on the right frames.

Codec notes (checked with the PyAV 18 wheel, which bundles FFmpeg 8 with libx264, libx265, libvpx, SVT-AV1):
- "h264" uses libx264. yuv420p needs even width and height, so odd sizes (e.g. 97x61) are written as yuv444p (High
  4:4:4 profile) instead of padding/cropping: the decoded frame keeps the exact odd size. Same for "hevc".
- "mpeg4", "vp9", "av1" accept odd sizes in yuv420p.
- "mjpeg" needs full-range yuvj420p; its natural container is .avi.
- Variable frame rate: pass `times` (seconds, increasing); pts are set by hand in a 1/1000 s time base.
"""
from __future__ import annotations

import os
import warnings
from fractions import Fraction

import av
import numpy as np

CODECS = {"h264": "libx264", "hevc": "libx265", "vp9": "libvpx-vp9", "vp8": "libvpx", "mpeg4": "mpeg4",
          "mjpeg": "mjpeg", "av1": "libsvtav1", "ffv1": "ffv1"}
_EVEN_ONLY = {"libx264", "libx265"}


def _encoder(codec: str) -> str:
    name = CODECS.get(codec, codec)
    try:
        av.codec.Codec(name, "w")
        return name
    except (av.error.FFmpegError, ValueError, av.codec.codec.UnknownCodecError):
        warnings.warn(f"encoder {name!r} is not in this PyAV build; writing mpeg4 instead")
        return "mpeg4"


def index_frames(n: int, height: int = 48, width: int = 64, bits: int = 8) -> np.ndarray:
    """uint8 [n, H, W, 3]: frame i shows i in binary as `bits` vertical bars (bright 230 = 1, dark 25 = 0)."""
    if n > 2 ** bits:
        raise ValueError(f"{n} frames need more than {bits} bits")
    frames = np.empty((n, height, width, 3), np.uint8)
    edges = np.linspace(0, width, bits + 1).round().astype(int)
    for i in range(n):
        for b in range(bits):
            frames[i, :, edges[b]:edges[b + 1]] = 230 if (i >> b) & 1 else 25
    return frames


def read_index(frame: np.ndarray, bits: int = 8) -> int:
    """Reads the bar code written by `index_frames` (centre half of each bar, threshold at mid grey)."""
    h, w = frame.shape[:2]
    edges = np.linspace(0, w, bits + 1)
    value = 0
    for b in range(bits):
        lo, hi = edges[b], edges[b + 1]
        a, z = int(lo + (hi - lo) * 0.3), int(np.ceil(hi - (hi - lo) * 0.3))
        if frame[h // 4: h - h // 4 or h, a:max(z, a + 1)].mean() > 128:
            value |= 1 << b
    return value


def write_video(path, frames, *, fps: float = 25, codec: str = "h264", pix_fmt: str | None = None,
                gop: int | None = None, times=None, crf: int | None = None, faststart: bool = False,
                fragmented: bool = False, hidden: int = 0, audio_seconds: float = 0.0) -> str:
    """Encodes uint8 frames [T,H,W,3] (or [T,H,W] grey) to `path`; the container comes from the suffix.

    gop: keyframe interval (small values make seeking matter in short test videos). times: per-frame timestamps in
    seconds for variable frame rate. crf: x264/x265 quality (default: near-lossless 12 for clean test codes).
    faststart: mp4 index at the front (so a cut file still opens). fragmented: mp4 as moof/mdat fragments after an
    empty moov (DASH/streaming style; no frame count in the header). hidden: the first `hidden` frames get negative
    timestamps, so the mp4 muxer writes an edit list that hides them while the header still counts them (as cameras
    and editors trimming a B-frame delay do). audio_seconds: add a silent AAC (Opus in webm) track that long.
    """
    frames = np.asarray(frames, np.uint8)
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T,H,W,3] or [T,H,W], got {frames.shape}")
    t, h, w = frames.shape[:3]
    enc = _encoder(codec)
    if pix_fmt is None:
        if enc == "mjpeg":
            pix_fmt = "yuvj420p"
        elif enc in _EVEN_ONLY and (h % 2 or w % 2):
            pix_fmt = "yuv444p"
        else:
            pix_fmt = "yuv420p"
    options = {}
    if enc in ("libx264", "libx265"):
        options["crf"] = str(12 if crf is None else crf)
        options["preset"] = "veryfast"
        if enc == "libx265":
            options["x265-params"] = "log-level=error"
    if enc == "libsvtav1":
        options["svtav1-params"] = "verbosity=0"
    if enc in ("libvpx-vp9", "libvpx"):
        options.update({"crf": "10", "b": "0", "deadline": "realtime", "cpu-used": "8"})
    container_options = {"movflags": "+faststart"} if faststart else {}
    if fragmented:
        container_options = {"movflags": "frag_keyframe+empty_moov"}
    out = av.open(str(path), mode="w", options=container_options)
    try:
        rate = Fraction(fps).limit_denominator(1001)
        stream = out.add_stream(enc, rate=rate, options=options)
        audio = None
        if audio_seconds:   # streams must all exist before the first packet is written
            audio = out.add_stream("libopus" if str(path).endswith(".webm") else "aac", rate=48000)
        if hidden and times is not None:
            raise ValueError("hidden frames need a constant frame rate (times=None)")
        shift = Fraction(int(hidden)) / rate
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if enc in ("mpeg4", "mjpeg"):
            stream.codec_context.qmax = 3     # near-lossless: bar codes stay crisp
            stream.codec_context.bit_rate = 20_000_000
        if gop:
            stream.codec_context.gop_size = int(gop)
        if times is not None:
            times = np.asarray(times, float)
            if times.shape != (t,) or (np.diff(times) <= 0).any():
                raise ValueError("times must be increasing, one per frame")
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            if times is not None:
                frame.pts = int(round(times[i] * 1000))
                frame.time_base = Fraction(1, 1000)
            _mux(out, stream, frame, shift)
        _mux(out, stream, None, shift)
        if audio is not None:
            _silence(out, audio, audio_seconds)
    finally:
        out.close()
    return str(path)


def _mux(out, stream, frame, shift: Fraction = Fraction(0)) -> None:
    """Encodes one frame (None flushes the encoder) and writes its packets, `shift` seconds earlier."""
    for packet in stream.encode(frame):
        if shift:
            ticks = round(shift / packet.time_base)
            packet.pts, packet.dts = packet.pts - ticks, packet.dts - ticks
        out.mux(packet)


def _silence(out, stream, seconds: float) -> None:
    """Writes `seconds` of mono silence to the audio `stream` (after the video: muxers interleave by time)."""
    rate, size = stream.codec_context.sample_rate, 960
    for j in range(int(np.ceil(seconds * rate / size))):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, size), np.float32), format="flt", layout="mono")
        frame.sample_rate, frame.pts = rate, j * size
        _mux(out, stream, frame)
    _mux(out, stream, None)


def write_avi_with_drops(path, frames, dropped, *, fps: float = 25) -> str:
    """An MJPEG .avi where the frames numbered in `dropped` are empty chunks, as capture software stores frames it
    dropped: the header counts them and their timestamps advance, but the demuxer yields no packet for them."""
    frames = np.asarray(frames, np.uint8)
    out = av.open(str(path), mode="w")
    try:
        stream = out.add_stream("mjpeg", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuvj420p"
        stream.codec_context.qmax = 3
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                if i in dropped:
                    empty = av.Packet(b"")
                    empty.pts, empty.dts, empty.time_base = packet.pts, packet.dts, packet.time_base
                    empty.stream = stream
                    packet = empty
                out.mux(packet)
        _mux(out, stream, None)
    finally:
        out.close()
    return str(path)


def cut_file(path, dst, frame: int, *, inside: bool = False) -> str:
    """Copies `path` to `dst` cut where the data of video frame `frame` (presentation order) begins, or halfway
    through it with inside=True: a download that stopped early. Headers written before the frame data (mp4 with
    faststart, mkv/webm, avi) survive, so the cut file still opens and still declares the lost frames."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        packets = sorted((p.pts, p.pos, p.size) for p in container.demux(stream) if p.size)
    _, pos, size = packets[frame]
    data = open(path, "rb").read()
    with open(dst, "wb") as f:
        f.write(data[:pos + (size // 2 if inside else 0)])
    return str(dst)


def write_image(path, image) -> str:
    """Writes a uint8 [H,W,3] image; format from the suffix (.png/.jpg/.jpeg/.bmp/.webp) with PyAV's encoders."""
    image = np.asarray(image, np.uint8)
    suffix = os.path.splitext(str(path))[1].lower()
    enc, fmt, pix = {".png": ("png", "image2", "rgb24"), ".jpg": ("mjpeg", "image2", "yuvj444p"),
                     ".jpeg": ("mjpeg", "image2", "yuvj444p"), ".bmp": ("bmp", "image2", "bgr24"),
                     ".webp": ("libwebp", "image2", "yuv420p")}[suffix]
    out = av.open(str(path), mode="w", format=fmt, options={"update": "1"})
    try:
        stream = out.add_stream(enc, rate=1)
        stream.height, stream.width = image.shape[:2]
        stream.pix_fmt = pix
        if enc == "mjpeg":
            stream.codec_context.qmax = 2
        if enc == "libwebp":
            stream.codec_context.options = {"lossless": "1"}
        _mux(out, stream, av.VideoFrame.from_ndarray(image, format="rgb24"))
        _mux(out, stream, None)
    finally:
        out.close()
    return str(path)


def _patch_fourcc(path: str, old: bytes, new: bytes) -> None:
    data = open(path, "rb").read()
    if old not in data:
        raise RuntimeError(f"FourCC {old!r} not found in {path}")
    with open(path, "wb") as f:
        f.write(data.replace(old, new))


def make_corrupt_files(directory) -> dict[str, str]:
    """Writes one file of each broken kind; returns {kind: path}.

    corrupt: random bytes named .mp4; truncated: a valid mp4 cut in half (index at the end, so it is lost);
    zero_byte; non_video: a text file named .mp4; unsupported_codec: an AVI whose FourCC was rewritten to an unknown
    codec ("QQQQ"); audio_only: a .wav with no video stream; unreadable: chmod 000 (root can still read it: tests
    must check `os.access`/open and skip that case).
    """
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    paths = {}
    rng = np.random.default_rng(0)
    paths["corrupt"] = os.path.join(directory, "corrupt.mp4")
    with open(paths["corrupt"], "wb") as f:
        f.write(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    good = write_video(os.path.join(directory, "tmp_good.mp4"), index_frames(20), codec="mpeg4")
    data = open(good, "rb").read()
    os.remove(good)
    paths["truncated"] = os.path.join(directory, "truncated.mp4")
    with open(paths["truncated"], "wb") as f:
        f.write(data[: len(data) // 2])
    paths["zero_byte"] = os.path.join(directory, "zero_byte.mp4")
    open(paths["zero_byte"], "wb").close()
    paths["non_video"] = os.path.join(directory, "non_video.mp4")
    with open(paths["non_video"], "w") as f:
        f.write("this is a text file, not a video\n" * 20)
    paths["unsupported_codec"] = write_video(os.path.join(directory, "unsupported_codec.avi"), index_frames(5),
                                             codec="mpeg4")
    _patch_fourcc(paths["unsupported_codec"], b"FMP4", b"QQQQ")
    paths["audio_only"] = os.path.join(directory, "audio_only.wav")
    out = av.open(paths["audio_only"], mode="w")
    try:
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        _mux(out, stream, frame)
        _mux(out, stream, None)
    finally:
        out.close()
    paths["unreadable"] = write_video(os.path.join(directory, "unreadable.mp4"), index_frames(5), codec="mpeg4")
    os.chmod(paths["unreadable"], 0)
    return paths


def permission_blocks_reading(path) -> bool:
    """True when the OS really refuses to read `path` (False as root, where chmod 000 does not stop reads)."""
    try:
        with open(path, "rb") as f:
            f.read(1)
        return False
    except PermissionError:
        return True
