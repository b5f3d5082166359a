"""Video and image decoding with PyAV (FFmpeg ships inside the `av` wheel: no system ffmpeg needed).

Why this module exists: every data source (video folders, manifests, world episodes) ends in "give me frames
i_0..i_{T-1} of this clip as uint8 RGB". Decoding is the most expensive part of the input pipeline, so clips are
decoded by seeking to the keyframe before the first wanted frame and stopping at the last wanted frame, and frames
are resized by FFmpeg's swscale while being converted to RGB (no extra full-resolution copy).

Frame indices are presentation-order frame numbers. For constant frame rate streams they are computed from each
frame's pts (``round((pts - start) * time_base * fps)``); for variable frame rate streams a demux-only pass (no
decoding) collects the packet timestamps up to the last wanted frame, so index ``i`` is exactly the i-th frame in
presentation order; streams without timestamps are decoded sequentially from the start.

Every failure to read a file (corrupt, truncated, empty, not a video, unknown codec, unreadable) raises
`DecodeError` naming the file and the reason, so callers can skip bad files with one ``except``. That includes a
wanted frame the stream never reaches: a truncated file keeps a header that counts the lost frames, and padding with
the last decoded frame would make frozen clips.
"""
from __future__ import annotations

import io
import math
import os
import time
from fractions import Fraction
from typing import Any

import av
import numpy as np

__all__ = ["DecodeError", "probe", "sample_frame_indices", "frame_step_for_fps", "decode_frames",
           "set_default_threads", "read_record_clip", "IMAGE_SUFFIXES", "VIDEO_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".gif",
                  ".3gp", ".ogv", ".ts", ".mts", ".m2ts")

# Errors PyAV / the OS raise while reading media; anything in this set becomes a DecodeError.
_READ_ERRORS = (av.error.FFmpegError, OSError, ValueError, EOFError, IndexError, RuntimeError, ZeroDivisionError,
                OverflowError, MemoryError, UnicodeError)

# Frame-count margin for the demux-only timestamp scan (decoders may reorder a few frames: B-frames).
_REORDER_MARGIN = 32

# Frames a healthy stream may fall short of what its header declares: an mp4 edit list that trims the B-frame delay
# hides up to 2 counted frames (x264's B-pyramid), and frame numbers come from rounded timestamps (1 more). A larger
# shortfall means the data stops early (a truncated download); at frame_step >= 3 the slack repeats at most one
# sampled frame of a clip.
_END_SLACK = 3

# Codecs whose decoder, with skip_frame "NONREF", drops exactly the pictures no other picture references: H.264
# marks them in every slice (nal_ref_idc 0). Not HEVC: its sub-layer non-reference ("_N") pictures may still be
# referenced by pictures of a higher temporal sub-layer.
_SKIP_NONREF_CODECS = frozenset({"h264"})

# Decoder threads when decode_frames is not told (set_default_threads; 0 = FFmpeg's choice).
_default_threads = 0

# probe(verify=True) decodes the last group of pictures from packets it keeps; a longer one is not held.
_TAIL_BYTES = 64 << 20


class DecodeError(Exception):
    """A media file could not be read; the message names the file and the reason."""


# ----------------------------------------------------------------------------------------------- opening

def _source_name(src: Any, name: str | None) -> str:
    if name:
        return name.decode() if isinstance(name, bytes) else str(name)
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    try:
        return f"<{len(src)} bytes in memory>"
    except TypeError:
        return repr(src)


def _as_input(src: Any, name: str):
    """Returns what av.open accepts (a path or a BytesIO), raising DecodeError for missing/empty input."""
    if isinstance(src, np.ndarray):
        src = src.item() if src.ndim == 0 else src.tobytes()
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise DecodeError(f"{name}: empty data (0 bytes)")
        return io.BytesIO(bytes(src))
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise DecodeError(f"{name}: cannot access file ({e.strerror or e})") from e
        if size == 0:
            raise DecodeError(f"{name}: empty file (0 bytes)")
        if os.path.isdir(path):
            raise DecodeError(f"{name}: is a directory, not a media file")
        if not os.access(path, os.R_OK):
            raise DecodeError(f"{name}: permission denied (file is not readable)")
        return path
    raise TypeError(f"expected a path or encoded bytes, got {type(src).__name__}")


def _is_image_format(container) -> bool:
    fmt = container.format.name
    return fmt == "image2" or fmt.endswith("_pipe")


class _Opened:
    """Context manager: opens the container, picks the first video stream, always closes."""

    def __init__(self, src, name):
        self.src, self.name = src, name
        self.container = None

    def __enter__(self):
        source = _as_input(self.src, self.name)
        try:
            self.container = av.open(source, mode="r", metadata_errors="ignore")
        except _READ_ERRORS as e:
            raise DecodeError(f"{self.name}: not a readable media file ({_reason(e)})") from e
        streams = self.container.streams.video
        if not streams:
            self.container.close()
            raise DecodeError(f"{self.name}: no video stream (container {self.container.format.name!r}; "
                              "audio only, or truncated/damaged)")
        stream = streams[0]
        codec = stream.codec_context
        if codec is None or getattr(codec, "name", "none") in ("none", None):
            self.container.close()
            raise DecodeError(f"{self.name}: unsupported codec (FFmpeg has no decoder for the video stream)")
        return self.container, stream, _is_image_format(self.container)

    def __exit__(self, *exc):
        if self.container is not None:
            try:
                self.container.close()
            except _READ_ERRORS:
                pass
        return False


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _fps(stream) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return float(rate)
    return float("nan")


def _is_vfr(stream) -> bool:
    """True when the average rate and the base (r_frame_rate) rate disagree: timestamps are not a regular grid."""
    avg, base = stream.average_rate, stream.base_rate
    if not avg or not base or avg <= 0 or base <= 0:
        return True
    return abs(float(avg) - float(base)) > 0.01 * float(base)


# ----------------------------------------------------------------------------------------------- conversion

def _target_size(height: int, width: int, short_side: int | None) -> tuple[int, int]:
    """(height, width) with the short side equal to `short_side`, aspect kept (None: unchanged)."""
    if not short_side:
        return height, width
    if height <= width:
        return int(short_side), max(1, int(round(width * short_side / height)))
    return max(1, int(round(height * short_side / width))), int(short_side)


def _to_rgb(frame, short_side: int | None) -> np.ndarray:
    h, w = _target_size(frame.height, frame.width, short_side)
    if (h, w) == (frame.height, frame.width):
        return frame.to_ndarray(format="rgb24")
    return frame.reformat(width=w, height=h, format="rgb24", interpolation="BILINEAR").to_ndarray()


def _resize_array(clip: np.ndarray, short_side: int | None) -> np.ndarray:
    """Resizes a uint8 [T,H,W,3] array with swscale (same filter as decoding) so the short side is `short_side`."""
    t, h, w = clip.shape[:3]
    nh, nw = _target_size(h, w, short_side)
    if (nh, nw) == (h, w):
        return clip
    out = np.empty((t, nh, nw, 3), np.uint8)
    for i in range(t):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(clip[i]), format="rgb24")
        out[i] = frame.reformat(width=nw, height=nh, interpolation="BILINEAR").to_ndarray()
    return out


# ----------------------------------------------------------------------------------------------- probe

def _tag_seconds(stream) -> float | None:
    """The track's own duration tag (Matroska "DURATION" / "DURATION-eng", "HH:MM:SS.fraction") in seconds."""
    for key, value in stream.metadata.items():
        if key.upper().split("-")[0] == "DURATION":
            try:
                h, m, sec = str(value).strip().split(":")
                return int(h) * 3600 + int(m) * 60 + float(sec)
            except ValueError:
                return None
    return None


def _check_complete(name: str, container, stream, count: int, begin: float, end: float | None,
                    last_corrupt: bool) -> None:
    """Raises DecodeError when the stream's packets (all of them were read) stop short of what the header declares.

    count: video packets; begin / end: earliest pts / latest pts + duration in seconds; last_corrupt: the last packet
    was cut short. Declared sizes: the frame count of mp4/mov/avi headers; for Matroska/WebM (no count) the segment
    duration, tightened by the track's DURATION tag when that is shorter (a stale tag can then only weaken the
    check). Streaming formats (MPEG-TS, fragmented mp4) declare neither: cut, they are a shorter video, and the
    frames that are there decode as they are.
    """
    if last_corrupt:
        raise DecodeError(f"{name}: truncated: the data ends inside frame {count - 1} of the video stream")
    declared = stream.frames if stream.frames and stream.frames > 0 else 0
    # AVI counts dropped frames (empty chunks, which yield no packet) in its header, and their timestamps still
    # advance: the frames the timestamps reach count too
    rate = next((float(r) for r in (stream.base_rate, stream.average_rate) if r and r > 0), 0.0)
    reached = round((end - begin) * rate) if end is not None and math.isfinite(begin) else 0
    if declared and max(count, reached) < declared - _END_SLACK:
        raise DecodeError(f"{name}: truncated or damaged: the data holds {count} of the {declared} frames the "
                          "container declares")
    if declared or end is None or not container.duration or not container.format.name.startswith("matroska"):
        return
    segment = container.duration / av.time_base
    track = _tag_seconds(stream)
    fps = _fps(stream)
    if track is not None and 0 < track <= segment:
        expected, slack = track, (_END_SLACK / fps if fps > 0 else 1.0)
    else:   # the segment spans every track, and an audio track may run on past the video
        expected, slack = segment, max(1.0, 0.05 * segment)
    if end < expected - slack:
        raise DecodeError(f"{name}: truncated or damaged: the video data ends at {end:.2f} s of the "
                          f"{expected:.2f} s the container declares")


def _check_tail(name: str, stream, tail: list | None) -> None:
    """Decodes the packets from the last keyframe to the end; DecodeError when that fails or yields no frame.

    The packets were kept from the demux pass: seeking back to the last keyframe instead is unreliable in formats
    without an index (MPEG-TS lands past it and decodes nothing).
    """
    if not tail:   # no keyframe flags, or a last group of pictures over _TAIL_BYTES: the packet checks stand alone
        return
    codec = stream.codec_context
    try:
        codec.flush_buffers()
        decoded = sum(len(codec.decode(packet)) for packet in tail) + len(codec.decode(None))
    except _READ_ERRORS as e:
        raise DecodeError(f"{name}: truncated or damaged: the end of the video does not decode ({_reason(e)})") \
            from e
    if not decoded:
        raise DecodeError(f"{name}: truncated or damaged: no frame decodes from the last keyframe to the end")


def probe(path_or_bytes, *, name: str | None = None, verify: bool = False) -> dict:
    """Metadata of a video or image: num_frames, fps, duration (s), height, width, is_image.

    Decodes the first frame (proves the codec works). When the container does not store a frame count (webm/mkv),
    frames are counted with a demux-only pass (reads packets, decodes nothing). Images: num_frames 1, fps 0.
    verify=True (dataset preparation) reads every packet whatever the container and decodes from the last keyframe
    to the end. Whenever every packet is read, data that stops short of what the header declares raises
    DecodeError (a truncated file keeps a header that promises the frames that were cut off), and num_frames is
    the packets found when the header counts more (AVI counts dropped frames, stored as empty chunks).
    """
    name = _source_name(path_or_bytes, name)
    try:
        with _Opened(path_or_bytes, name) as (container, stream, is_image):
            stream.thread_type = "AUTO"
            known = stream.frames if stream.frames and stream.frames > 0 else 0
            every_packet = not is_image and (verify or not known)
            first = None
            count = 0
            end = tail = None
            begin, tail_bytes, last_corrupt, untimed = math.inf, 0, False, False
            for packet in container.demux(stream):
                if packet.size == 0:      # flush packet at end of stream
                    continue
                count += 1
                last_corrupt = packet.is_corrupt
                if packet.pts is not None and stream.time_base:
                    stop = float((packet.pts + (packet.duration or 0)) * stream.time_base)
                    end = stop if end is None else max(end, stop)
                    begin = min(begin, float(packet.pts * stream.time_base))
                    untimed = untimed or not packet.duration
                if verify:     # keep the packets since the last keyframe (bounded) to decode the end later
                    if packet.is_keyframe:
                        tail, tail_bytes = [], 0
                    if tail is not None:
                        tail.append(packet)
                        tail_bytes += packet.size
                        if tail_bytes > _TAIL_BYTES:
                            tail = None
                if first is None:
                    for frame in packet.decode():
                        first = frame
                        break
                if first is not None and not every_packet:
                    break
            if first is None:             # decoders with delay: drain
                for frame in stream.decode(None):
                    first = frame
                    break
            if first is None:
                raise DecodeError(f"{name}: no decodable video frames")
            if is_image:
                return dict(num_frames=1, fps=0.0, duration=0.0, height=first.height, width=first.width,
                            is_image=True)
            if every_packet:
                _check_complete(name, container, stream, count, begin, end, last_corrupt)
            if verify:
                _check_tail(name, stream, tail)
            # packets read beat a header count that includes frames stored as empty chunks (AVI's dropped frames)
            num_frames = min(known, count) if known and every_packet else known or count
            fps = _fps(stream)
            if stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            elif every_packet and end is not None and end > begin:
                # the video's own span: Matroska stores no per-stream duration, and the container's covers every
                # track (an audio track running on past the video would lower the frame rate computed below)
                duration = end - begin
                if untimed and count > 1:   # packets without durations (FLV): the span misses the last frame's
                    duration *= count / (count - 1)
            elif container.duration:
                duration = container.duration / av.time_base
            elif fps > 0:
                duration = num_frames / fps
            else:
                duration = float("nan")
            if (not known and duration > 0) or not math.isfinite(fps) or fps <= 0:
                # counted frames (mkv/webm): nominal rates there may not describe variable-rate streams
                fps = num_frames / duration if duration > 0 else 0.0
            return dict(num_frames=int(num_frames), fps=float(fps), duration=float(duration),
                        height=int(first.height), width=int(first.width), is_image=False)
    except DecodeError:
        raise
    except _READ_ERRORS as e:
        raise DecodeError(f"{name}: failed to decode ({_reason(e)})") from e


# ----------------------------------------------------------------------------------------------- sampling

def frame_step_for_fps(video_fps: float, target_fps: float) -> int:
    """Frame step that brings `video_fps` to about `target_fps`: max(1, round(video_fps / target_fps)).

    Unknown video fps (<= 0 or NaN, e.g. images or unprobed records) gives 1.
    """
    if not target_fps or target_fps <= 0 or not math.isfinite(target_fps):
        raise ValueError(f"target_fps must be a positive number, got {target_fps!r}")
    if video_fps is None or not math.isfinite(video_fps) or video_fps <= 0:
        return 1
    return max(1, int(round(video_fps / target_fps)))


def sample_frame_indices(total_frames: int, num_frames: int, frame_step: int, rng: np.random.Generator | None,
                         mode: str = "random", num_segments: int = 1, segment: int = 0) -> np.ndarray:
    """Indices of one clip: `num_frames` frames `frame_step` apart inside a window of num_frames*frame_step frames.

    mode "random": window start uniform over the video (over partition `segment` of `num_segments` equal
    partitions when that partition holds a whole window); "center": the centred window; "uniform": window
    `segment` of `num_segments` windows spread evenly over the video (centred in its partition when partitions
    hold a window, else spread from the first to the last possible start). Indices past the end are clamped to
    the last frame, so short videos repeat their last frame.
    """
    total_frames, num_frames, frame_step = int(total_frames), int(num_frames), int(frame_step)
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if num_frames < 1 or frame_step < 1:
        raise ValueError(f"num_frames and frame_step must be >= 1, got {num_frames}, {frame_step}")
    if mode not in ("random", "center", "uniform"):
        raise ValueError(f"mode must be 'random', 'center' or 'uniform', got {mode!r}")
    if num_segments < 1 or not 0 <= segment < num_segments:
        raise ValueError(f"need 0 <= segment < num_segments, got segment={segment}, num_segments={num_segments}")
    window = num_frames * frame_step
    max_start = max(0, total_frames - window)
    part = total_frames / num_segments
    if mode == "random":
        if rng is None:
            raise ValueError("mode='random' needs an rng (np.random.Generator)")
        if num_segments > 1 and part >= window:
            lo = int(math.ceil(segment * part))
            hi = int(math.floor((segment + 1) * part)) - window
            start = int(rng.integers(lo, max(lo, hi) + 1))
        else:
            start = int(rng.integers(0, max_start + 1))
    elif mode == "center":
        start = max_start // 2
    else:
        if part >= window:
            start = int(segment * part + (part - window) / 2)
        elif num_segments > 1:
            start = int(round(segment * max_start / (num_segments - 1)))
        else:
            start = max_start // 2
    start = min(max(start, 0), max_start)
    idx = start + np.arange(num_frames, dtype=np.int64) * frame_step
    return np.minimum(idx, total_frames - 1)


# ----------------------------------------------------------------------------------------------- decoding

class _Retry(Exception):
    """The fast path did not fit this stream; decode again with `strategy` (the next, more careful one), and
    without skipping unwanted pictures when `skip` is False."""

    def __init__(self, strategy: str, skip: bool = True):
        super().__init__(strategy)
        self.strategy, self.skip = strategy, skip


class _Ended(Exception):
    """The stream ended before a wanted frame; args: (index of the last decoded frame or -1, first missing index)."""


class _Clock:
    """Adds CPU seconds per phase and frame counts to `stats` (jepa.data.bench's breakdown); no-op without it."""

    def __init__(self, stats: dict | None):
        self.stats = stats
        self.t = time.process_time() if stats is not None else 0.0

    def lap(self, key: str) -> None:
        if self.stats is not None:
            now = time.process_time()
            self.stats[key] = self.stats.get(key, 0.0) + now - self.t
            self.t = now

    def count(self, key: str, n: int = 1) -> None:
        if self.stats is not None:
            self.stats[key] = self.stats.get(key, 0) + n


def _ended_message(name: str, stream, last: int, missing: int) -> str:
    declared = stream.frames if stream.frames and stream.frames > 0 else 0
    if declared and missing >= declared:
        return f"{name}: frame {missing} is past the end of the video ({declared} frames)"
    where = (f"nothing decodes from frame {missing} on" if last < 0
             else f"the video stream ends after frame {last}, short of frame {missing}")
    if declared:
        return f"{name}: truncated or damaged: {where} of the {declared} frames the container declares"
    return f"{name}: truncated or damaged (or an index past the end): {where}"


def _scan_pts(container, stream, upto: int):
    """Sorted presentation timestamps of the first `upto + margin` frames (demux only); None if pts are missing."""
    pts = []
    for packet in container.demux(stream):
        if packet.size == 0:
            continue
        if packet.pts is None:
            return None
        pts.append(packet.pts)
        if len(pts) > upto + _REORDER_MARGIN:
            break
    return np.sort(np.asarray(pts, np.int64))


def _decode_wanted(container, stream, wanted: np.ndarray, short_side, strategy: str, skip: bool,
                   clock: _Clock) -> dict:
    """Decodes the frames at the sorted unique indices `wanted`; returns {index: rgb array}.

    strategy "grid": seek, index = position of pts on the nominal constant-rate grid (raises _Retry when a pts is
    off the grid: variable frame rate); "table": demux-only pts scan, seek, index = rank of pts (frame order);
    "sequential": decode from the start counting frames (no timestamps needed).
    skip: with a seek strategy and a codec in _SKIP_NONREF_CODECS, packets of unwanted frames go to the decoder
    with skip_frame "NONREF": it drops the pictures no other picture references and decodes the rest as usual.
    """
    first, last = int(wanted[0]), int(wanted[-1])
    tb = stream.time_base
    start = stream.start_time or 0
    index_of = packet_index = None   # pts -> frame index, when we seek
    if first > 0 and tb and strategy == "grid":
        rate = Fraction(stream.average_rate)
        target = start + int(Fraction(first) / rate / tb)

        def packet_index(pts):   # None: off the grid (index_of then asks for the table)
            exact = (pts - start) * tb * rate
            i = round(exact)
            return int(i) if abs(exact - i) <= 0.25 else None

        def index_of(pts):
            i = packet_index(pts)
            if i is None:
                raise _Retry("table")
            return i
    elif first > 0 and tb and strategy == "table":
        table = _scan_pts(container, stream, last)
        if table is None or not len(table):
            raise _Retry("sequential")
        target = int(table[min(first, len(table) - 1)])
        index_of = packet_index = lambda pts: int(np.searchsorted(table, pts, side="left"))  # noqa: E731
    if index_of is not None:
        container.seek(int(target), stream=stream, backward=True, any_frame=False)
    clock.lap("open_seek")
    codec = stream.codec_context
    # A packet is matched to its frame by its pts before decoding, which needs a seek strategy's pts -> index.
    # Frames that may stand in for indices past the end (the last _END_SLACK + 1 before the last wanted one) are
    # always decoded, so the stand-in is the frame a full decode would give.
    skipping = skip and packet_index is not None and codec.name in _SKIP_NONREF_CODECS
    wanted_set = set(wanted.tolist()) if skipping else set()
    keep_from = last - _END_SLACK - 1
    skipped: list[int] = []

    def frames():
        mode = "DEFAULT"
        for packet in container.demux(stream):
            if skipping and packet.pts is not None:
                j = packet_index(packet.pts)
                drop = j is not None and j < keep_from and j not in wanted_set
                if drop:
                    skipped.append(j)
                if mode != ("NONREF" if drop else "DEFAULT"):
                    mode = codec.skip_frame = "NONREF" if drop else "DEFAULT"
            yield from packet.decode()

    def skipped_between(lo, hi) -> bool:
        """Whether a packet sent for skipping lies strictly between frame indices lo and hi."""
        return any(lo < s < hi for s in skipped)

    out: dict[int, np.ndarray] = {}
    cache: dict[int, np.ndarray] = {}

    def rgb(frame, key):
        if key not in cache:
            cache.clear()
            cache[key] = _to_rgb(frame, short_side)
            clock.lap("convert")
        return cache[key]

    wi, counter = 0, 0
    prev, prev_key, prev_index = None, None, -1
    for frame in frames():
        if index_of is not None:
            if frame.pts is None:
                raise _Retry("sequential")
            i = index_of(frame.pts)
            if prev is None and i > first:   # the seek landed after the first wanted frame
                raise _Retry("sequential")
            if skipping and i <= prev_index:   # out of presentation order: no skipping for this stream
                raise _Retry(strategy, skip=False)
        else:
            i = counter
        counter += 1
        clock.lap("lead_in" if i < first else "window")
        clock.count("frames_lead_in" if i < first else "frames_window")
        if i < wanted[wi]:
            prev, prev_key, prev_index = frame, counter, i
            continue
        while wi < len(wanted) and wanted[wi] < i:   # a gap in the timestamps: the frame on screen then
            if skipping and skipped_between(prev_index, int(wanted[wi])):   # ... might be one that was skipped
                raise _Retry(strategy, skip=False)
            out[int(wanted[wi])] = rgb(prev, prev_key) if prev is not None else rgb(frame, counter)
            wi += 1
        if wi < len(wanted) and wanted[wi] == i:
            out[i] = rgb(frame, counter)
            wi += 1
        prev, prev_key, prev_index = frame, counter, i
        if wi == len(wanted):
            break
    clock.count("packets_unwanted", len(skipped))
    if wi < len(wanted):
        # The stream ended before a wanted frame. Within _END_SLACK frames that is a header counting frames that
        # never show, and the last frame stands in; any further and the data stops early (a truncated file), which
        # must fail rather than become a clip of copies of one frame.
        if prev is None or int(wanted[-1]) - prev_index > _END_SLACK:
            raise _Ended(prev_index if prev is not None else -1, int(wanted[wi]))
        if skipping and skipped_between(prev_index, math.inf):
            raise _Retry(strategy, skip=False)
        last_rgb = rgb(prev, prev_key)
        for j in wanted[wi:]:
            out[int(j)] = last_rgb
    return out


def set_default_threads(threads: int) -> None:
    """Decoder threads `decode_frames` uses when not told (0 = FFmpeg's choice, one per core).

    Data workers set it to their share of the cores: FFmpeg's choice in every one of N workers would run N x cores
    threads, and each frame thread decodes a few frames past the end of a clip's window for nothing.
    """
    global _default_threads
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 0:
        raise ValueError(f"threads must be an int >= 0 (0 = FFmpeg's choice), got {threads!r}")
    _default_threads = int(threads)


def decode_frames(path_or_bytes, indices, short_side: int | None = None, *, name: str | None = None,
                  threads: int | None = None, skip_unwanted: bool = True, seek: bool = True,
                  stats: dict | None = None) -> np.ndarray:
    """uint8 [len(indices), H, W, 3] RGB frames at `indices` (presentation-order frame numbers, any order/repeats).

    Seeks to the keyframe at or before the first wanted frame and decodes only up to the last one; pictures of
    unwanted frames that no other picture references (H.264) are not decoded at all. skip_unwanted=False decodes
    them too, seek=False decodes from the start: both for benchmarks, the frames returned are the same. With
    `short_side` the frames are resized while converting so min(H, W) == short_side (aspect kept). Images repeat
    their single frame. An index the stream does not reach raises DecodeError (a truncated file whose header still
    counts the lost frames), except within `_END_SLACK` frames of the last decoded one, where the last frame stands
    in: header counts can exceed the frames that show by a few. `threads`: decoder threads (0 = FFmpeg's choice;
    None = `set_default_threads`'s value, 0 unless set). `stats`: a dict to which CPU seconds per phase
    (open_seek, lead_in, window, convert) and counts (frames_lead_in, frames_window: frames decoded;
    packets_unwanted: packets sent with skip_frame "NONREF") are added. Raises DecodeError naming the file for
    anything unreadable.
    """
    name = _source_name(path_or_bytes, name)
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        raise ValueError(f"{name}: indices must not be empty")
    if (idx < 0).any():
        raise ValueError(f"{name}: indices must be >= 0, got {idx.min()}")
    if short_side is not None and int(short_side) < 1:
        raise ValueError(f"short_side must be >= 1 or None, got {short_side}")
    threads = _default_threads if threads is None else int(threads)
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = FFmpeg's choice), got {threads}")
    wanted = np.unique(idx)
    strategy, skip = (None if seek else "sequential"), bool(skip_unwanted)
    clock = _Clock(stats)
    try:
        while True:
            with _Opened(path_or_bytes, name) as (container, stream, is_image):
                stream.thread_type = "AUTO"
                if threads:
                    stream.codec_context.thread_count = threads
                if is_image:
                    for frame in container.decode(stream):
                        one = _to_rgb(frame, short_side)
                        return np.broadcast_to(one, (idx.size,) + one.shape).copy()
                    raise DecodeError(f"{name}: image has no decodable frame")
                if strategy is None:
                    strategy = "table" if _is_vfr(stream) else "grid"
                try:
                    got = _decode_wanted(container, stream, wanted, short_side, strategy, skip, clock)
                except _Retry as retry:
                    if strategy == "sequential":
                        raise DecodeError(f"{name}: inconsistent frame timestamps") from None
                    strategy, skip = retry.strategy, skip and retry.skip
                    continue
                except _Ended as ended:
                    raise DecodeError(_ended_message(name, stream, *ended.args)) from None
                if not got:
                    raise DecodeError(f"{name}: no decodable video frames")
                return np.stack([got[int(i)] for i in idx])
    except DecodeError:
        raise
    except _READ_ERRORS as e:
        raise DecodeError(f"{name}: failed to decode ({_reason(e)})") from e


def read_record_clip(record: dict, indices, short_side: int | None = None) -> np.ndarray:
    """uint8 [T,H,W,3] clip of a data-source record: world episode ("frames" array), video bytes, or "path"."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if "frames" in record:
        frames = np.asarray(record["frames"])
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
            raise ValueError(f"record 'frames' must be uint8 [T,H,W,3] with T >= 1, got shape {frames.shape}")
        if (idx < 0).any():
            raise ValueError(f"indices must be >= 0, got {idx.min()}")
        clip = frames[np.minimum(idx, frames.shape[0] - 1)]
        return _resize_array(clip.astype(np.uint8, copy=False), short_side)
    path = record.get("path")
    if isinstance(path, (bytes, np.bytes_)):
        path = bytes(path).decode("utf-8", errors="replace")
    video = record.get("video")
    if isinstance(video, np.ndarray):
        video = video.item() if video.ndim == 0 else video.tobytes()
    if video is not None and len(video) > 0:
        return decode_frames(video, idx, short_side, name=path or None)
    if path:
        return decode_frames(path, idx, short_side)
    raise ValueError(f"record has no 'frames', no 'video' bytes and no 'path' (keys: {sorted(record)})")
