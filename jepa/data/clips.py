"""Record -> clip: pick frames, decode, augment; an unreadable record is replaced by a deterministic substitute.

The Grain pipeline (jepa/data/pipeline.py) maps `ClipMaker` over (source, record) positions; `jepa.data.bench`
times its stages one by one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jepa.data import decode, transforms
from jepa.envs import A_MAX, S_MAX

log = logging.getLogger(__name__)


def is_world(record: Mapping) -> bool:
    return "frames" in record


def record_name(record: Mapping, source_name: str, index: int) -> str:
    path = record.get("path") if hasattr(record, "get") else None
    if isinstance(path, bytes):
        path = path.decode("utf-8", "replace")
    return f"{path} ({source_name}[{index}])" if path else f"{source_name}[{index}]"


class _RateLimitedWarning:
    """Logs the first `first` bad files, then one line per `every` with the running count (per process)."""

    def __init__(self, first: int = 10, every: int = 100):
        self.first, self.every, self.count = first, every, 0
        self._lock = threading.Lock()

    def __call__(self, name: str, error: BaseException) -> None:
        with self._lock:
            self.count += 1
            n = self.count
        if n <= self.first or n % self.every == 0:
            log.warning("skipping unreadable clip %s: %s (%d skipped so far in this process%s)", name, error, n,
                        "; further warnings rate-limited" if n == self.first else "")


_warn_bad_file = _RateLimitedWarning()


def mix64(*values: int) -> int:
    """A stable 64-bit hash of integers (substitute-record choice must not depend on Python's hash seed)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0])


@dataclasses.dataclass(frozen=True)
class ClipSettings:
    """What turns a record into a clip; built from config.data by `clip_settings`."""
    num_frames: int
    frame_step: int
    target_fps: float
    resolution: int
    crop_scale: tuple
    crop_aspect: tuple
    hflip: bool
    decode_short_side: int
    eval_mode: str
    num_segments: int
    max_decode_retries: int


def clip_settings(config) -> ClipSettings:
    d = config.data
    s = ClipSettings(
        num_frames=int(d.num_frames), frame_step=int(d.frame_step), target_fps=float(d.target_fps),
        resolution=int(d.resolution), crop_scale=tuple(float(x) for x in d.crop_scale),
        crop_aspect=tuple(float(x) for x in d.crop_aspect), hflip=bool(d.hflip),
        decode_short_side=int(d.decode_short_side), eval_mode=str(d.eval_mode),
        num_segments=int(d.num_segments), max_decode_retries=int(d.max_decode_retries))
    if s.num_frames < 1 or s.frame_step < 1 or s.resolution < 1:
        raise ValueError(f"config.data: num_frames ({s.num_frames}), frame_step ({s.frame_step}) and resolution "
                         f"({s.resolution}) must be >= 1")
    if s.eval_mode not in ("center", "uniform"):
        raise ValueError(f"config.data.eval_mode: {s.eval_mode!r} is not one of 'center', 'uniform'")
    if s.num_segments < 1:
        raise ValueError(f"config.data.num_segments: must be >= 1, got {s.num_segments}")
    if s.max_decode_retries < 0:
        raise ValueError(f"config.data.max_decode_retries: must be >= 0, got {s.max_decode_retries}")
    return s


def action_blocks(actions, frames, block: int) -> np.ndarray:
    """Per kept frame t, the `block` actions applied from frame t on, each zero-padded to A_MAX and concatenated in
    order: float32 [len(frames), block * A_MAX] (actions [T, A <= A_MAX]; steps past the episode end carry zeros)."""
    a = np.asarray(actions, np.float32)[:, :A_MAX]
    padded = np.zeros((a.shape[0] + block, A_MAX), np.float32)
    padded[:a.shape[0], :a.shape[1]] = a
    steps = np.asarray(frames)[:, None] + np.arange(block)[None]                       # [T, block]
    return padded[np.minimum(steps, a.shape[0])].reshape(len(steps), block * A_MAX)


class ClipMaker:
    """Record -> clip element: read, pick frames, decode (resize on decode), augment, normalise.

    The stages are separate methods so `jepa.data.bench` can time them one by one. Elements are
    (source id, record index) for training and (source id, record index, segment, valid) for evaluation.
    """

    def __init__(self, names: Sequence[str], sources: Sequence[Any], settings: ClipSettings, *, train: bool,
                 world: bool, seed: int, channels: Sequence[str] = ("video",)):
        self.names, self.sources, self.s = list(names), list(sources), settings
        self.train, self.world, self.seed = train, world, int(seed)
        self.channels = tuple(channels)

    # -- stages
    def read(self, sid: int, index: int) -> Mapping:
        return self.sources[sid][index]

    def frame_indices(self, record: Mapping, rng: np.random.Generator | None, segment: int = 0) -> np.ndarray:
        s = self.s
        if is_world(record):
            total, fps = int(np.shape(record["frames"])[0]), 0.0
        else:
            total, fps = int(record.get("num_frames", -1)), float(record.get("fps", -1.0))
            if total <= 0 or (s.target_fps > 0 and not fps > 0):  # unknown (-1 / NaN): probe the file
                info = decode.probe(self._media(record))
                total, fps = int(info["num_frames"]), float(info["fps"])
        step = s.frame_step
        if s.target_fps > 0 and fps > 0:
            step = decode.frame_step_for_fps(fps, s.target_fps)
        if self.train:
            return decode.sample_frame_indices(total, s.num_frames, step, rng, mode="random")
        return decode.sample_frame_indices(total, s.num_frames, step, None, mode=s.eval_mode,
                                           num_segments=s.num_segments, segment=segment)

    def short_side(self, record: Mapping) -> int | None:
        """Resize on decode when the video is much larger than needed (saves the decode-side scaler's work)."""
        if is_world(record):
            return None
        target = self.s.decode_short_side or int(math.ceil(1.15 * self.s.resolution))
        h, w = int(record.get("height", -1)), int(record.get("width", -1))
        if h > 0 and w > 0 and min(h, w) <= 1.5 * target and not self.s.decode_short_side:
            return None
        return target

    def decode(self, record: Mapping, indices: np.ndarray) -> np.ndarray:
        clip = decode.read_record_clip(record, indices, short_side=self.short_side(record))
        if clip.ndim != 4 or clip.shape[0] != len(indices) or clip.shape[-1] != 3:
            raise decode.DecodeError(f"decoded clip has shape {clip.shape}, expected ({len(indices)}, H, W, 3)")
        return clip

    def augment(self, clip: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        s = self.s
        if self.train:
            clip = transforms.random_resized_crop(clip, rng, s.resolution, scale=s.crop_scale, aspect=s.crop_aspect)
            if s.hflip:
                clip = transforms.hflip(clip, rng, p=0.5)
        else:
            clip = transforms.center_crop_resize(clip, s.resolution)
        return clip  # uint8: normalised on the device (4x fewer bytes through workers and host-to-device)

    def extras(self, record: Mapping, indices: np.ndarray) -> dict:
        """Label; for world data also the states at the kept frames and, per kept frame t, the block of the
        `frame_step` actions applied between frame t and the next kept frame, in order, each zero-padded to A_MAX:
        actions [T, frame_step * A_MAX] (steps past the episode end carry zeros)."""
        out = {"label": np.int32(record.get("label", -1))}
        if self.world:
            block = self.s.frame_step
            actions = np.zeros((len(indices), block * A_MAX), np.float32)
            states = np.zeros((len(indices), S_MAX), np.float32)
            domain = -1
            if is_world(record):
                actions = action_blocks(record["actions"], indices, block)
                st = np.asarray(record["states"], np.float32)
                states[:, :st.shape[1]] = st[indices, :S_MAX]
                domain = int(record["domain"])
            out.update(actions=actions, states=states, domain=np.int32(domain))
        if len(self.channels) > 1:
            # Which observation channels this clip carries (video always; `vector` = the record's states), so the
            # masks never take an absent channel's tokens as context or targets.
            out["present"] = np.array([name == "video" or (name == "vector" and is_world(record))
                                       for name in self.channels], bool)
        return out

    def _media(self, record: Mapping):
        video = record.get("video", b"")
        return video if len(video) else record["path"]

    # -- the whole record -> element transform
    def substitute(self, sid: int, index: int, attempt: int) -> int:
        n = len(self.sources[sid])
        if n == 1:
            return index
        return (index + 1 + mix64(self.seed, sid, index, attempt) % (n - 1)) % n

    def make(self, sid: int, index: int, rng: np.random.Generator | None, segment: int = 0) -> dict:
        tried = []
        for attempt in range(self.s.max_decode_retries + 1):
            record = self.read(sid, index)
            try:
                indices = self.frame_indices(record, rng, segment)
                clip = self.decode(record, indices)
            except (decode.DecodeError, OSError) as e:
                name = record_name(record, self.names[sid], index)
                tried.append(name)
                _warn_bad_file(name, e)
                index = self.substitute(sid, index, attempt)
                continue
            element = {"video": self.augment(clip, rng), **self.extras(record, indices),
                       "skipped": np.int32(attempt)}
            return element
        raise RuntimeError(f"data source {self.names[sid]!r}: {len(tried)} records in a row failed to decode "
                           f"(config.data.max_decode_retries={self.s.max_decode_retries}): {tried}. Most of this "
                           f"source is unreadable; run jepa.data.sources.check_sources(config) for a report.")

    def __call__(self, element, rng: np.random.Generator) -> dict:
        if self.train:
            sid, index = element
            return self.make(int(sid), int(index), rng)
        sid, index, segment, valid = element
        out = self.make(int(sid), int(index), None, int(segment))
        out["valid"] = np.bool_(valid and out["skipped"] == 0)
        out.update(source=np.int32(sid), index=np.int64(index), segment=np.int32(segment))
        return out
