"""Grain input pipeline: configured sources -> shuffled, mixed, per-process sharded clips -> batches with masks.

Everything up to the masks is a `grain.MapDataset` indexed by position, so a batch is a pure function of
(config, seed, process, batch position): iterator state restore (get_state/set_state, Orbax) reproduces exactly
the next batch, with or without `mp_prefetch` workers. Unreadable files never stop a run: the clip is taken from
a deterministically chosen substitute record and the element's "skipped" field counts the failures.

    ds = build_pipeline(config)                  # per-process batches (spec "Batch")
    it = iter(ds); batch = next(it); ...; it.close()
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from jepa import masks as masks_lib
from jepa.data import decode, transforms
from jepa.data import workers as workers_lib
from jepa.envs import A_MAX, S_MAX

log = logging.getLogger(__name__)

SOURCE_KINDS = ("world", "tfds", "manifest")
# Fields of a source config that are not passed on to jepa.data.world.world_source as generation options.
_SOURCE_FIELDS = ("kind", "name", "data_dir", "split", "path", "weight", "preset")


# ---------------------------------------------------------------- sources


def _source_dict(source_cfg: Any) -> dict:
    if isinstance(source_cfg, ml_collections.ConfigDict):
        return source_cfg.to_dict()
    return dict(source_cfg)


def open_source(source_cfg: Any):
    """Opens one entry of config.data.sources as a random-access source (len / getitem returning records)."""
    cfg = _source_dict(source_cfg)
    kind = cfg.get("kind")
    if kind not in SOURCE_KINDS:
        raise ValueError(f"data source {cfg}: kind {kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    missing = [f for f in _SOURCE_FIELDS if f not in cfg]
    if missing:
        raise ValueError(f"data source {cfg}: missing field(s) {missing} (build sources with jepa.config's "
                         "world_source, folder_source or manifest_source)")
    if kind == "world":
        from jepa import config as config_lib
        from jepa.data import world
        options = {k: v for k, v in cfg.items() if k not in _SOURCE_FIELDS and v not in (None, "", 0)}
        # An empty data_dir means the default cache directory.
        return world.world_source(cfg["data_dir"] or config_lib.DEFAULT_DATA_DIR, cfg["split"],
                                  preset=cfg["preset"], **options)
    if kind == "tfds":
        import tensorflow_datasets as tfds
        if not cfg["name"]:
            raise ValueError(f"data source {cfg}: kind 'tfds' needs a dataset name")
        # Register our builders (jepa_video_folder, jepa_world) so TFDS reads them with their own code.
        from jepa.data import video_folder, world  # noqa: F401
        return tfds.data_source(cfg["name"], data_dir=cfg["data_dir"] or None, split=cfg["split"])
    from jepa.data import video_folder
    if not cfg["path"]:
        raise ValueError(f"data source {cfg}: kind 'manifest' needs a path (folder or .csv/.jsonl manifest)")
    return video_folder.ManifestSource(cfg["path"])


class LazySource:
    """A configured source that pickles as its config and reopens in each process (Grain spawns workers)."""

    def __init__(self, source_cfg: Any, opened: Any = None):
        self._cfg = _source_dict(source_cfg)
        self._src = opened
        self._len = len(opened) if opened is not None else None
        self._lock = threading.Lock()

    def _open(self):
        if self._src is None:
            with self._lock:
                if self._src is None:
                    self._src = open_source(self._cfg)
                    self._len = len(self._src)
        return self._src

    def __len__(self) -> int:
        if self._len is None:
            self._open()
        return self._len

    def __getitem__(self, index: int):
        return self._open()[index]

    def __getstate__(self):
        return {"cfg": self._cfg, "len": self._len}

    def __setstate__(self, state):
        self._cfg, self._len, self._src, self._lock = state["cfg"], state["len"], None, threading.Lock()

    def __repr__(self) -> str:
        c = self._cfg
        return f"LazySource({c.get('kind')}: {c.get('name') or c.get('path')}, split={c.get('split')})"


def _sources_from_config(config, sources: Mapping[str, Any] | None) -> tuple[list[str], list[Any], list[float]]:
    """(names sorted, sources, weights). `sources` overrides opening by name (in-memory sources for tests)."""
    cfg_sources = config.data.sources
    names = sorted(sources.keys() if sources is not None else cfg_sources.keys())
    if not names:
        raise ValueError("config.data.sources: no data source configured")
    opened, weights = [], []
    for name in names:
        scfg = cfg_sources[name] if name in cfg_sources else None
        # In-memory sources (the `sources` argument) that config.data.sources does not name weigh 1.
        weight = float(scfg.weight) if scfg is not None else 1.0
        if not weight > 0:
            raise ValueError(f"config.data.sources.{name}.weight: must be > 0, got {weight}")
        if sources is not None:
            src = sources[name]
        else:
            src = LazySource(scfg, opened=open_source(scfg))
        if len(src) == 0:
            raise ValueError(f"config.data.sources.{name}: the source {src!r} has no records")
        opened.append(src)
        weights.append(weight)
    return names, opened, weights


# ---------------------------------------------------------------- clips


def _is_world(record: Mapping) -> bool:
    return "frames" in record


def _record_name(record: Mapping, source_name: str, index: int) -> str:
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


def _mix64(*values: int) -> int:
    """A stable 64-bit hash of integers (substitute-record choice must not depend on Python's hash seed)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0])


def _name_seed(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


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


class ClipMaker:
    """Record -> clip element: read, pick frames, decode (resize on decode), augment, normalise.

    The stages are separate methods so `jepa.data.bench` can time them one by one. Elements are
    (source id, record index) for training and (source id, record index, segment, valid) for evaluation.
    """

    def __init__(self, names: Sequence[str], sources: Sequence[Any], settings: ClipSettings, *, train: bool,
                 world: bool, seed: int):
        self.names, self.sources, self.s = list(names), list(sources), settings
        self.train, self.world, self.seed = train, world, int(seed)

    # -- stages
    def read(self, sid: int, index: int) -> Mapping:
        return self.sources[sid][index]

    def frame_indices(self, record: Mapping, rng: np.random.Generator | None, segment: int = 0) -> np.ndarray:
        s = self.s
        if _is_world(record):
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
        if _is_world(record):
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
        out = {"label": np.int32(record.get("label", -1))}
        if self.world:
            actions = np.zeros((len(indices), A_MAX), np.float32)
            states = np.zeros((len(indices), S_MAX), np.float32)
            domain = -1
            if _is_world(record):
                a, st = np.asarray(record["actions"], np.float32), np.asarray(record["states"], np.float32)
                actions[:, :a.shape[1]] = a[indices, :A_MAX]
                states[:, :st.shape[1]] = st[indices, :S_MAX]
                domain = int(record["domain"])
            out.update(actions=actions, states=states, domain=np.int32(domain))
        return out

    def _media(self, record: Mapping):
        video = record.get("video", b"")
        return video if len(video) else record["path"]

    # -- the whole record -> element transform
    def substitute(self, sid: int, index: int, attempt: int) -> int:
        n = len(self.sources[sid])
        if n == 1:
            return index
        return (index + 1 + _mix64(self.seed, sid, index, attempt) % (n - 1)) % n

    def make(self, sid: int, index: int, rng: np.random.Generator | None, segment: int = 0) -> dict:
        tried = []
        for attempt in range(self.s.max_decode_retries + 1):
            record = self.read(sid, index)
            try:
                indices = self.frame_indices(record, rng, segment)
                clip = self.decode(record, indices)
            except (decode.DecodeError, OSError) as e:
                name = _record_name(record, self.names[sid], index)
                tried.append(name)
                _warn_bad_file(name, e)
                index = self.substitute(sid, index, attempt)
                continue
            element = {"video": self.augment(clip, rng), **self.extras(record, indices),
                       "skipped": np.int32(attempt)}
            return element
        raise RuntimeError(f"data source {self.names[sid]!r}: {len(tried)} records in a row failed to decode "
                           f"(config.data.max_decode_retries={self.s.max_decode_retries}): {tried}. Most of this "
                           f"source is unreadable; run jepa.data.pipeline.check_sources(config) for a report.")

    def __call__(self, element, rng: np.random.Generator) -> dict:
        if self.train:
            sid, index = element
            return self.make(int(sid), int(index), rng)
        sid, index, segment, valid = element
        out = self.make(int(sid), int(index), None, int(segment))
        out["valid"] = np.bool_(valid and out["skipped"] == 0)
        out.update(source=np.int32(sid), index=np.int64(index), segment=np.int32(segment))
        return out


# ---------------------------------------------------------------- masks


class _BatchMasks:
    """Adds multi-block masks to a batch, drawn from (seed, batch position) only: restores are exact.

    Every process draws the masks of the whole global batch and keeps the rows of its own clips (process p
    holds global clips p, p + P, p + 2P, ...), so a clip gets the same mask whatever the process count."""

    def __init__(self, grid, specs, length_quantile: float, seed: int, process_index: int, process_count: int):
        self.grid, self.specs, self.q = tuple(grid), list(specs), float(length_quantile)
        self.seed, self.process_index, self.process_count = int(seed), int(process_index), int(process_count)
        self._masker = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_masker"] = None  # rebuilt (deterministically) in each worker
        return state

    def masker(self):
        if self._masker is None:
            self._masker = masks_lib.MultiBlockMasker(self.grid, self.specs, length_quantile=self.q)
        return self._masker

    def __call__(self, batch_index: int, batch: dict) -> dict:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 0x6D61736B, int(batch_index)])
        local_size = int(np.shape(batch["video"])[0])
        drawn = self.masker()(local_size * self.process_count, rng)
        batch.update({k: v[self.process_index::self.process_count] for k, v in drawn.items()})
        return batch


# ---------------------------------------------------------------- pipeline


def _process(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        shard = grain.sharding.ShardByJaxProcess()
        process_index = shard.shard_index if process_index is None else process_index
        process_count = shard.shard_count if process_count is None else process_count
    process_index, process_count = int(process_index), int(process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must lie in [0, process_count={process_count})")
    return process_index, process_count


class _EvalElement:
    """Evaluation position -> (source id, record index, segment, valid); positions past the end are padding."""

    def __init__(self, lengths: Sequence[int], num_segments: int):
        self.offsets = np.cumsum([0] + [int(n) for n in lengths])
        self.num_segments = num_segments
        self.total = int(self.offsets[-1]) * num_segments

    def __call__(self, position) -> tuple[int, int, int, bool]:
        position = int(position)
        valid = position < self.total
        position = position if valid else self.total - 1
        record, segment = divmod(position, self.num_segments)
        sid = int(np.searchsorted(self.offsets, record, side="right") - 1)
        return sid, record - int(self.offsets[sid]), segment, valid


def _has_world_records(sources: Sequence[Any]) -> bool:
    return any(_is_world(src[0]) for src in sources)


def build_pipeline(config, *, process_index: int | None = None, process_count: int | None = None,
                   train: bool = True, seed: int | None = None, masks: bool | None = None,
                   sources: Mapping[str, Any] | None = None) -> grain.IterDataset:
    """Per-process batches (spec "Batch") as a checkpointable Grain IterDataset.

    train=True: every source shuffled and repeated forever (reshuffled each epoch), mixed by weight, sharded
    across processes, random window + random resized crop + flip, masks on every batch.
    train=False: each record once (x config.data.num_segments windows), in order, centre crop, no masks unless
    masks=True; the last batch is padded (elements with "valid"=False) so every process yields equally many
    full batches; elements also carry "source", "index", "segment".
    `sources` (name -> random-access source) replaces opening config.data.sources, e.g. in-memory records.
    """
    settings = clip_settings(config)
    process_index, process_count = _process(process_index, process_count)
    seed = int(config.seed if seed is None else seed)
    global_batch = int(config.train.global_batch_size)
    if global_batch % process_count:
        raise ValueError(f"config.train.global_batch_size={global_batch} is not divisible by the process count "
                         f"({process_count}): every process needs the same per-process batch size")
    batch_size = global_batch // process_count
    if batch_size < 1:
        raise ValueError(f"config.train.global_batch_size={global_batch} must be >= 1")
    masks = train if masks is None else masks
    names, srcs, weights = _sources_from_config(config, sources)
    world = _has_world_records(srcs)
    maker = ClipMaker(names, srcs, settings, train=train, world=world, seed=seed)
    clip_seed = _mix64(seed, 0x636C6970) & 0x7FFFFFFF

    if train:
        per_source = []
        for sid, (name, src) in enumerate(zip(names, srcs)):
            shuffle_seed = _mix64(seed, _name_seed(name)) & 0x7FFFFFFF
            ds = grain.MapDataset.range(len(src)).shuffle(seed=shuffle_seed).repeat()
            per_source.append(ds.map(_Tagger(sid)))
        ds = per_source[0] if len(per_source) == 1 else grain.MapDataset.mix(per_source, weights)
        # Clip randomness is keyed on the global stream position, before sharding: processes never share draws.
        ds = ds.random_map(maker, seed=clip_seed)
        ds = ds[process_index::process_count]
        ds = ds.batch(batch_size, drop_remainder=True)
    else:
        element = _EvalElement([len(s) for s in srcs], settings.num_segments)
        per_process = math.ceil(element.total / process_count)
        padded = math.ceil(per_process / batch_size) * batch_size * process_count
        ds = grain.MapDataset.range(padded).map(element)
        ds = ds.random_map(maker, seed=clip_seed)
        ds = ds[process_index::process_count]
        ds = ds.batch(batch_size, drop_remainder=False)
    if masks:
        ds = ds.map_with_index(_BatchMasks(masks_lib.clip_token_grid(config),
                                           masks_lib.specs_from_config(config.mask.types),
                                           float(config.mask.length_quantile), seed, process_index, process_count))
    buffer = max(1, int(config.data.prefetch_buffer))
    workers = int(config.data.num_workers)
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=buffer if workers == 0 else 1,
                                                   prefetch_buffer_size=buffer))
    if workers > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # Grain reads its absl flags; outside app.run (pytest, notebooks) use defaults
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                                   per_worker_buffer_size=buffer),
                                      worker_init_fn=workers_lib.exit_with_parent)
    return ResumableIterDataset(iter_ds, workers)


class ResumableIterDataset(grain.IterDataset):
    """The pipeline's output with a worker-count-independent iterator state: {"next_index": batches consumed}.

    Why: Grain's mp_prefetch state lists per-worker positions, so a checkpoint taken with N workers cannot be
    restored with M != N (another machine, a tuned config). Every batch is a pure function of its position (the
    dataset is a MapDataset up to here, workers take batches round-robin), so the position alone restores it.
    """

    def __init__(self, parent: grain.IterDataset, num_workers: int):
        super().__init__(parent)
        self.num_workers = int(num_workers)

    def __iter__(self) -> ResumableIterator:
        return ResumableIterator(self._parent.__iter__(), self.num_workers)


def _worker_state(next_index: int, num_workers: int) -> dict:
    """Grain's mp_prefetch state after `next_index` batches (worker j yields batches j, j + n, j + 2n, ...)."""
    if num_workers == 0:
        return {"next_index": next_index}
    n = num_workers
    return {"next_index_in_cycle": next_index % n, "next_index_in_datasets": n,
            "iterators_in_use_indices": list(range(n)),
            "iterators_in_use_states": [{"next_index": (next_index - j + n - 1) // n} for j in range(n)],
            "exhausted": [0] * n, "future_states": {}}


class ResumableIterator(grain.DatasetIterator):
    """Counts the batches it yields and the unreadable clips skipped in them; get_state/set_state (and
    grain.checkpoint with Orbax) carry both, so a resumed run continues the skip count instead of restarting it."""

    def __init__(self, inner: grain.DatasetIterator, num_workers: int):
        super().__init__(inner)
        self._inner, self._num_workers, self._next = inner, num_workers, 0
        self.skipped_total = 0

    def __next__(self):
        batch = next(self._inner)
        self._next += 1
        self.skipped_total += int(np.sum(batch.get("skipped", 0)))
        return batch

    def get_state(self) -> dict:
        return {"next_index": self._next, "skipped_total": self.skipped_total}

    def set_state(self, state: dict) -> None:
        if "next_index" not in state or not set(state) <= {"next_index", "skipped_total"}:
            raise ValueError(f"data iterator state {state!r} is not this pipeline's "
                             "{'next_index': int, 'skipped_total': int} state")
        self._next = int(state["next_index"])
        self.skipped_total = int(state.get("skipped_total", 0))  # absent in checkpoints of older versions
        self._inner.set_state(_worker_state(self._next, self._num_workers))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._inner.close()


class _Tagger:
    def __init__(self, sid: int):
        self.sid = sid

    def __call__(self, index) -> tuple[int, int]:
        return self.sid, int(index)


# ---------------------------------------------------------------- preflight


def check_sources(config, *, sample: int = 32, sources: Mapping[str, Any] | None = None) -> dict:
    """Decodes a clip from up to `sample` evenly spread records per source before training starts.

    Returns name -> {"records", "checked", "failed", "bad": [names]} and logs it; raises ValueError listing
    example bad files when more than half of a source's sample fails (wrong paths, unsupported codec, ...).
    """
    settings = dataclasses.replace(clip_settings(config), max_decode_retries=0)
    names, srcs, _ = _sources_from_config(config, sources)
    maker = ClipMaker(names, srcs, settings, train=False, world=False, seed=int(config.seed))
    report, errors = {}, []
    for name, src in zip(names, srcs):
        n = len(src)
        picks = sorted(set(np.linspace(0, n - 1, min(n, sample)).round().astype(int).tolist()))
        bad, reasons = [], []
        for index in picks:
            record = src[index]
            try:
                maker.decode(record, maker.frame_indices(record, None))
            except (decode.DecodeError, OSError) as e:
                bad.append(_record_name(record, name, index))
                reasons.append(str(e))
        report[name] = {"records": n, "checked": len(picks), "failed": len(bad), "bad": bad}
        log.info("data source %s: %d records, %d/%d sampled clips decoded", name, n, len(picks) - len(bad),
                 len(picks))
        if bad and 2 * len(bad) <= len(picks):
            log.warning("data source %s: %d/%d sampled records are unreadable and will be skipped, e.g. %s", name,
                        len(bad), len(picks), bad[:3])
        if 2 * len(bad) > len(picks):
            examples = "; ".join(f"{b}: {r}" for b, r in list(zip(bad, reasons))[:5])
            errors.append(f"config.data.sources.{name}: {len(bad)}/{len(picks)} sampled records failed to decode, "
                          f"e.g. {examples}")
    if errors:
        raise ValueError("data preflight failed (more than half of a source is unreadable):\n  " +
                         "\n  ".join(errors))
    return report
