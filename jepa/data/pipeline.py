"""Grain input pipeline: configured sources -> shuffled, mixed, per-process sharded clips -> batches with masks.

Everything up to the masks is a `grain.MapDataset` indexed by position, so a batch is a pure function of
(config, seed, process, batch position): iterator state restore (get_state/set_state, Orbax) reproduces exactly
the next batch, with or without `mp_prefetch` workers. Unreadable files never stop a run: the clip is taken from
a deterministically chosen substitute record and the element's "skipped" field counts the failures.

    ds = build_pipeline(config)                  # per-process batches (spec "Batch")
    it = iter(ds); batch = next(it); ...; it.close()
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jepa import masks as masks_lib
from jepa.data import clips, decode
from jepa.data import sources as sources_lib
from jepa.data import workers as workers_lib

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- masks


class _BatchMasks:
    """Adds multi-block masks to a batch, drawn from (seed, batch position) only: restores are exact.

    Every process draws the masks of the whole global batch and keeps the rows of its own clips (process p
    holds global clips p, p + P, p + 2P, ...), so a clip gets the same mask whatever the process count."""

    def __init__(self, grid, specs, length_quantile: float, seed: int, process_index: int, process_count: int,
                 channels=("video",), channel_dropout: float = 0.0):
        self.grid, self.specs, self.q = tuple(grid), list(specs), float(length_quantile)
        self.seed, self.process_index, self.process_count = int(seed), int(process_index), int(process_count)
        self.channels, self.channel_dropout = tuple(channels), float(channel_dropout)
        self._masker = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_masker"] = None  # rebuilt (deterministically) in each worker
        return state

    def masker(self):
        if self._masker is None:
            if len(self.channels) > 1:
                from jepa.models.channels import ChannelMasker
                self._masker = ChannelMasker(self.grid, self.specs, self.channels, length_quantile=self.q,
                                             dropout=self.channel_dropout)
            else:
                self._masker = masks_lib.MultiBlockMasker(self.grid, self.specs, length_quantile=self.q)
        return self._masker

    def __call__(self, batch_index: int, batch: dict) -> dict:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, 0x6D61736B, int(batch_index)])
        local_size = int(np.shape(batch["video"])[0])
        if len(self.channels) > 1:
            # Other processes' rows count as present: a row's masks depend on its own clip only (the draws do not
            # depend on presence), so they are the same whatever the process count.
            present = np.ones((local_size * self.process_count, len(self.channels)), bool)
            present[self.process_index::self.process_count] = batch["present"]
            drawn = self.masker()(local_size * self.process_count, rng, present)
        else:
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


def _name_seed(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def has_world_records(sources: Sequence[Any]) -> bool:
    return any(clips.is_world(src[0]) for src in sources)


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
    settings = clips.clip_settings(config)
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
    names, srcs, weights = sources_lib.sources_from_config(config, sources)
    world = has_world_records(srcs)
    channels = tuple(config.model.get("channels", ("video",)))
    maker = clips.ClipMaker(names, srcs, settings, train=train, world=world, seed=seed, channels=channels)
    clip_seed = clips.mix64(seed, 0x636C6970) & 0x7FFFFFFF

    if train:
        per_source = []
        for sid, (name, src) in enumerate(zip(names, srcs)):
            shuffle_seed = clips.mix64(seed, _name_seed(name)) & 0x7FFFFFFF
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
                                           float(config.mask.length_quantile), seed, process_index, process_count,
                                           channels, float(config.mask.get("channel_dropout", 0.0))))
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
                                      worker_init_fn=_WorkerInit(_decode_threads(workers)))
    return ResumableIterDataset(iter_ds, workers)


def _decode_threads(workers: int) -> int:
    """Decoder threads per worker: its share of the cores this process may use, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:   # no affinity call on this OS
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(workers)))


class _WorkerInit:
    """Grain worker start: end with the trainer (workers.exit_with_parent) and decode with `decode_threads`.

    Why a thread count: FFmpeg's own choice (one thread per core) in each of N workers runs N x cores threads, and
    frame threads cost 4-14% more CPU per clip than one (`python -m jepa.data.bench --per_core --levers`): with a
    worker per core, single-threaded decoders feed more clips; fewer workers get the spare cores as threads.
    """

    def __init__(self, decode_threads: int):
        self.decode_threads = int(decode_threads)

    def __call__(self, worker_index: int = 0, worker_count: int = 1) -> None:
        workers_lib.exit_with_parent(worker_index, worker_count)
        decode.set_default_threads(self.decode_threads)


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
