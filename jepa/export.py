"""Embed every clip of a dataset split with a trained run's frozen encoder and write the features to disk.

    python -m jepa.export --workdir=RUN --split=validation --output=DIR [--step=N] [--encoder=ema|online]
        [--features=pooled,patches] [--layers=-1] [--batch_size=32] [--shard_size=512]
        [--config.data.eval_mode=uniform --config.data.num_segments=4 ...]   # overrides of the run's config

Why a separate program: probes, kNN and notebooks then work from fixed features, and a long export (a big
dataset, a big encoder) survives interruption. Features are written per process in shards of `shard_size`
rows (.npy, allow_pickle=False) listed in a per-process manifest with each file's size and sha256; a restart
verifies the manifest, skips finished shards (the data iterator jumps straight to the first missing batch) and
recomputes anything missing or damaged. When every process is done, process 0 writes `index.jsonl` (one line per
row: clip id, source, record index, segment, label, path, frame indices) and `summary.json` (counts, effective
rank and per-dimension std of the pooled embeddings, and a collapse warning).

Rows are (clip, window) pairs: with `--config.data.eval_mode=uniform --config.data.num_segments=K` a long video
gives K windows that share one clip id (probes average their predictions). Padding elements of the evaluation
pipeline and clips that could not be decoded (substituted by the pipeline) are left out.

Layers: `--layers=-1` (default) is the encoder output; other values are block indices (0-based, negative from
the end) whose residual streams pass through the encoder's final LayerNorm, concatenated along the features.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jepa import config as config_lib
from jepa import masks, models, runs, sharding
from jepa import metrics as metrics_lib
from jepa import workdir as workdir_lib
from jepa.data import clips, pipeline
from jepa.data import sources as sources_lib
from jepa.objectives.vjepa import normalize_video

log = logging.getLogger(__name__)

FEATURES = ("pooled", "patches")
TARGET_FIELDS = ("label", "domain", "states", "actions", "segment")
FORMAT_VERSION = 1
_QUIET = logging.getLogger("jepa.export.monitor")  # CollapseMonitor's own warning: reported once, by export()
_QUIET.disabled = True


# ---------------------------------------------------------------- config


def with_split(config: ml_collections.ConfigDict, split: str) -> ml_collections.ConfigDict:
    """A copy of the config whose world/TFDS sources read `split` (manifest sources have no splits)."""
    config = ml_collections.ConfigDict(config.to_dict())
    for source in config.data.sources.values():
        if source.kind in ("world", "tfds"):
            source.split = split
    return config


# ---------------------------------------------------------------- the encoder


def resolve_layers(layers: Sequence[int] | None, depth: int) -> tuple[int, ...]:
    if not layers:
        return (depth - 1,)
    out = []
    for layer in layers:
        i = int(layer) + depth if int(layer) < 0 else int(layer)
        if not 0 <= i < depth:
            raise ValueError(f"--layers: {layer} is out of range for an encoder of depth {depth}")
        out.append(i)
    if len(set(out)) != len(out):
        raise ValueError(f"--layers: {list(layers)} names a block twice")
    return tuple(sorted(out))


def encode_layers(encoder_def, params: Any, video: jax.Array, layers: Sequence[int], **channel_args) -> jax.Array:
    """Features [B, L, len(layers) * width]: the output of each listed block after the encoder's final
    LayerNorm, concatenated (one forward pass; the last block alone is the encoder output). channel_args: the
    other channels' `inputs` and `available` tokens of a multi-channel encoder."""
    _, out = nnx.merge(encoder_def, nnx.State(params))(video, return_layers=layers, **channel_args)
    return jnp.concatenate([out["blocks"][i] for i in layers], axis=-1)


@dataclasses.dataclass(frozen=True)
class ChannelSpec:
    """What embedding a multi-channel run needs besides video: its channels, grid and vector statistics."""
    channels: tuple[str, ...]
    grid: tuple[int, int, int]
    vector_mean: tuple[float, ...]
    vector_std: tuple[float, ...]
    withheld: tuple[str, ...] = ()  # channels embedded as absent from every clip (partial observation)

    @classmethod
    def from_config(cls, config, withheld: Sequence[str] = ()) -> ChannelSpec | None:
        chans = models.model_channels(config.model)
        bad = [c for c in withheld if c not in chans[1:]]
        if bad:
            raise ValueError(f"withheld channels {bad}: only channels of the run other than video can be withheld "
                             f"({list(chans[1:])})")
        if len(chans) == 1:
            return None
        return cls(chans, tuple(masks.clip_token_grid(config)), tuple(config.data.vector_mean),
                   tuple(config.data.vector_std), tuple(withheld))

    def batch_keys(self) -> list[str]:
        return [models.channels.CHANNELS[c].batch_key for c in self.channels[1:]] + ["present"]


def make_embed_fn(encoder_def, layers: Sequence[int], features: Sequence[str], mesh,
                  channels: ChannelSpec | None = None):
    """jit(params, uint8 video [B, T, H, W, 3]) -> {"pooled": [B, D], "patches": [B, L, D]} sharded over the
    batch axes of `mesh` (parameters replicated); encoder_def: the encoder's nnx graph definition.

    With several channels (`channels`), jit(params, video, {batch key: array}) where the dict holds the other
    channels' fields and "present" [B, C]: "pooled" is the fused embedding (mean over every token a clip has, all
    channels) and "pooled_<channel>" the mean over each channel's tokens."""
    features = tuple(features)

    def embed(params, video, extra=None):
        if channels is None:
            tokens = encode_layers(encoder_def, params, normalize_video(video), layers).astype(jnp.float32)
            out = {"pooled": tokens.mean(axis=1)}
        else:
            inputs = {}
            for name in channels.channels[1:]:
                values = extra[models.channels.CHANNELS[name].batch_key]
                if name == "vector":
                    values = models.channels.normalize_vector(values, channels.vector_mean, channels.vector_std)
                inputs[name] = values
            present = extra["present"].astype(bool)
            if channels.withheld:
                present = present & jnp.asarray([c not in channels.withheld for c in channels.channels])
            available = models.channels.available_tokens(present, channels.channels, channels.grid)
            tokens = encode_layers(encoder_def, params, normalize_video(video), layers, inputs=inputs,
                                   available=available).astype(jnp.float32)
            weight = available.astype(jnp.float32)[..., None]
            out = {"pooled": (tokens * weight).sum(axis=1) / weight.sum(axis=1)}
            for name, pooled in models.channels.per_channel_mean(tokens, channels.channels, channels.grid).items():
                out[f"pooled_{name}"] = pooled
        if "patches" in features:
            out["patches"] = tokens
        return out

    # Parameters keep whatever layout they have (replicated from a checkpoint, FSDP-sharded in the trainer).
    return jax.jit(embed, out_shardings=sharding.batch_sharding(mesh))


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in global order (= its local batch order)."""
    shards = {}
    for s in x.addressable_shards:
        start = s.index[0].start or 0
        shards.setdefault(start, s.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)


# ---------------------------------------------------------------- batches and row metadata


@dataclasses.dataclass
class Plan:
    """What one process embeds: sources, batch geometry and how many batches it yields."""
    config: ml_collections.ConfigDict
    names: list[str]
    sources: list[Any]
    batch_size: int               # global
    local_batch: int
    num_batches: int              # per process
    num_elements: int             # records x segments, all processes


def make_plan(config, batch_size: int, process_index: int, process_count: int) -> Plan:
    if batch_size < 1:
        raise ValueError(f"--batch_size: must be >= 1, got {batch_size}")
    multiple = math.lcm(jax.device_count(), process_count)
    batch_size = int(math.ceil(batch_size / multiple) * multiple)
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.global_batch_size = batch_size
    config.data.num_workers = min(int(config.data.num_workers), 2)
    names = sorted(config.data.sources.keys())
    sources = [sources_lib.LazySource(config.data.sources[n], opened=sources_lib.open_source(config.data.sources[n]))
               for n in names]
    total = sum(len(s) for s in sources) * int(config.data.num_segments)
    if total == 0:
        raise ValueError("the configured data sources have no records for this split")
    local = batch_size // process_count
    per_process = math.ceil(total / process_count)
    return Plan(config=config, names=names, sources=sources, batch_size=batch_size, local_batch=local,
                num_batches=math.ceil(per_process / local), num_elements=total)


class RowInfo:
    """Per-row metadata the batch does not carry: the record's path, the window's frame indices, and for world
    episodes num_qpos / state_dim (what separates positions from velocities in `states`)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.maker = clips.ClipMaker(plan.names, plan.sources, clips.clip_settings(plan.config), train=False,
                                        world=False, seed=int(plan.config.seed))
        self._cache: dict[tuple[int, int], dict] = {}

    def __call__(self, sid: int, index: int, segment: int, label: int) -> dict:
        key = (sid, index)
        if key not in self._cache:
            self._cache.clear()  # segments of one record are consecutive
            record = self.plan.sources[sid][index]
            path = record.get("path", "") if hasattr(record, "get") else ""
            if isinstance(path, bytes):
                path = path.decode("utf-8", "replace")
            info = {"path": str(path or "")}
            for field in ("num_qpos", "state_dim", "seed"):
                if field in record:
                    info[field] = int(np.asarray(record[field]))
            info["_record"] = record
            self._cache[key] = info
        info = dict(self._cache[key])
        record = info.pop("_record")
        try:
            frames = self.maker.frame_indices(record, None, segment)
            info["frame_indices"] = [int(f) for f in np.asarray(frames)]
        except Exception as e:  # noqa: BLE001 - metadata only; the clip itself decoded in the pipeline
            log.warning("frame indices of %s[%d] unavailable: %s", self.plan.names[sid], index, e)
            info["frame_indices"] = []
        name = self.plan.names[sid]
        return {"clip_id": f"{name}/{index}", "source": name, "index": int(index), "segment": int(segment),
                "label": int(label), **info}


def iter_embeddings(plan: Plan, embed_fn, params, mesh, *, process_index: int, process_count: int,
                    start_batch: int = 0, progress: bool = True, desc: str = "embed") -> Iterator[dict]:
    """Yields, per batch of this process, {"batch": i, "pooled", ["pooled_<channel>"], ["patches"], targets...,
    "rows": [metadata]} with padding and substituted clips removed."""
    channels = ChannelSpec.from_config(plan.config)
    from tqdm.auto import tqdm

    ds = pipeline.build_pipeline(plan.config, process_index=process_index, process_count=process_count,
                                 train=False, masks=False, sources=dict(zip(plan.names, plan.sources)))
    it = iter(ds)
    if start_batch:
        it.set_state({"next_index": int(start_batch)})
    info = RowInfo(plan)
    bar = tqdm(total=plan.num_batches, initial=start_batch, desc=desc, unit="batch", file=sys.stderr,
               disable=not progress or process_index != 0)
    try:
        for i in range(start_batch, plan.num_batches):
            batch = next(it)
            video = sharding.global_batch({"video": batch["video"]}, mesh)["video"]
            if channels is None:
                out = embed_fn(params, video)
            else:
                out = embed_fn(params, video, sharding.global_batch({k: batch[k] for k in channels.batch_keys()},
                                                                    mesh))
            out = {k: local_rows(v) for k, v in out.items()}
            keep = np.asarray(batch["valid"], bool)
            rec = {k: v[keep] for k, v in out.items()}
            for field in TARGET_FIELDS:
                if field in batch:
                    rec[field] = np.asarray(batch[field])[keep]
            rec["rows"] = [info(int(s), int(j), int(g), int(lab)) for s, j, g, lab in
                           zip(np.asarray(batch["source"])[keep], np.asarray(batch["index"])[keep],
                               np.asarray(batch["segment"])[keep], np.asarray(batch["label"])[keep])]
            rec["batch"] = i
            bar.update(1)
            yield rec
    finally:
        bar.close()
        close = getattr(it, "close", None)
        if close is not None:
            close()


# ---------------------------------------------------------------- in-memory features


@dataclasses.dataclass
class Features:
    """Embeddings of one split: arrays share the row order of `rows` (one dict per clip window)."""
    pooled: np.ndarray                      # [N, D] (several channels: fused, the mean over all their tokens)
    patches: np.ndarray | None              # [N, L, D] or None
    targets: dict[str, np.ndarray]          # label [N], and for world data domain [N], states [N, T, S], ...
    rows: list[dict]
    meta: dict
    channels: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # several channels: name -> [N, D]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def clip_ids(self) -> list[str]:
        return [r["clip_id"] for r in self.rows]


def concat_features(records: list[dict], meta: dict) -> Features:
    if not records or sum(len(r["rows"]) for r in records) == 0:
        raise ValueError(f"no valid clips were embedded ({meta.get('split', '?')} split)")
    cat = lambda k: np.concatenate([r[k] for r in records], axis=0)
    targets = {k: cat(k) for k in TARGET_FIELDS if k in records[0]}
    rows = [row for r in records for row in r["rows"]]
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["source"], rows[i]["index"], rows[i]["segment"]))
    take = lambda a: a[np.asarray(order)] if a is not None else None
    per_channel = {k[len("pooled_"):]: take(cat(k)) for k in records[0] if k.startswith("pooled_")}
    return Features(pooled=take(cat("pooled")), patches=take(cat("patches")) if "patches" in records[0] else None,
                    targets={k: take(v) for k, v in targets.items()}, rows=[rows[i] for i in order], meta=meta,
                    channels=per_channel)


def embed_split(config, params, split: str, *, features: Sequence[str] = ("pooled",), layers=None,
                batch_size: int = 32, mesh=None, progress: bool = False, max_clips: int = 0,
                withheld: Sequence[str] = ()) -> Features:
    """Embed one split in memory (probes on the fly, evaluators, notebooks). max_clips > 0 keeps the first
    records of the split only (all their segments). withheld: channels of a multi-channel run embedded as absent
    from every clip (the encoder then reads the others only)."""
    features = _check_features(features)
    config = with_split(config, split)
    mesh = mesh if mesh is not None else runs.inference_mesh()
    layer_ids = resolve_layers(layers, models.resolved_dims(config.model)["encoder"]["depth"])
    embed_fn = make_embed_fn(runs.encoder_def(config), layer_ids, features, mesh,
                             ChannelSpec.from_config(config, withheld))
    pi, pc = jax.process_index(), jax.process_count()
    plan = make_plan(config, batch_size, pi, pc)
    if max_clips > 0:
        plan.sources = [Head(s, max_clips) for s in plan.sources]
        total = sum(len(s) for s in plan.sources) * int(plan.config.data.num_segments)
        plan.num_elements = total
        plan.num_batches = math.ceil(math.ceil(total / pc) / plan.local_batch)
    records = list(iter_embeddings(plan, embed_fn, params, mesh, process_index=pi, process_count=pc,
                                   progress=progress, desc=f"embed {split}"))
    if pc > 1:
        raise NotImplementedError("in-memory embedding gathers one process's rows only; use the export CLI")
    return concat_features(records, features_meta(plan.config, split, layer_ids, features))


class Head:
    """The first n records of a source."""

    def __init__(self, source, n: int):
        self.source, self.n = source, min(int(n), len(source))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.source[index]


def _check_features(features) -> tuple[str, ...]:
    features = tuple(features)
    bad = [f for f in features if f not in FEATURES]
    if bad or "pooled" not in features:
        raise ValueError(f"--features: {','.join(features)!r} must list 'pooled' and optionally 'patches' "
                         f"(unknown: {bad})")
    return features


def features_meta(config, split: str, layers, features) -> dict:
    """The description of a set of features stored with them (Features.meta, the export manifest)."""
    dims = models.resolved_dims(config.model)["encoder"]
    return {"split": split, "layers": list(layers), "features": list(features), "width": dims["width"],
            "depth": dims["depth"], "grid": list(masks.clip_token_grid(config)),
            "num_frames": int(config.data.num_frames),
            "resolution": int(config.data.resolution), "eval_mode": str(config.data.eval_mode),
            "num_segments": int(config.data.num_segments), "channels": list(models.model_channels(config.model))}


# ---------------------------------------------------------------- files: shards, manifests, resume


def _atomic_write(path, write) -> None:
    tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
    write(tmp)
    tmp.replace(path)


def _save_npy(path, array: np.ndarray) -> None:
    def write(tmp):
        with tmp.open("wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
    _atomic_write(path, write)


def _save_json(path, obj: Any, lines: bool = False) -> None:
    def write(tmp):
        text = "".join(json.dumps(row) + "\n" for row in obj) if lines else json.dumps(obj, indent=2)
        tmp.write_text(text)
    _atomic_write(path, write)


def manifest_path(output: str, process_index: int):
    return workdir_lib.path(output) / f"manifest-p{process_index:03d}.json"


def _read_manifest(output: str, process_index: int) -> dict | None:
    path = manifest_path(output, process_index)
    return json.loads(path.read_text()) if path.exists() else None


def _verified_shards(output: str, manifest: dict) -> int:
    """Number of leading shards whose files all exist with the recorded size and sha256."""
    done, root = 0, workdir_lib.path(output)
    for shard in manifest.get("shards", []):
        for name, (size, digest) in shard["files"].items():
            path = root / name
            if not path.exists() or workdir_lib.file_size(path) != size or workdir_lib.file_sha256(path) != digest:
                log.warning("export: shard file %s is missing or damaged; recomputing from shard %d", name, done)
                return done
        done += 1
    return done


def _write_shard(output: str, process_index: int, shard: int, records: list[dict]) -> dict:
    root, prefix = workdir_lib.path(output), f"p{process_index:03d}-s{shard:05d}"
    files = {}
    arrays = {k: np.concatenate([r[k] for r in records], axis=0) for k in records[0] if k not in ("rows", "batch")}
    for key, array in arrays.items():
        name = f"{prefix}.{key}.npy"
        _save_npy(root / name, array)
        files[name] = array
    rows_name = f"{prefix}.rows.jsonl"
    _save_json(root / rows_name, [row for r in records for row in r["rows"]], lines=True)
    return {"shard": shard, "rows": int(arrays["pooled"].shape[0]), "arrays": sorted(arrays),
            "files": {n: [workdir_lib.file_size(root / n), workdir_lib.file_sha256(root / n)]
                      for n in [*files, rows_name]}}


def export(workdir: str, output: str, *, split: str, step: int | None = None, encoder: str = "ema",
           features: Sequence[str] = ("pooled",), layers: Sequence[int] | None = None, batch_size: int = 32,
           shard_size: int = 512, config: ml_collections.ConfigDict | None = None, random_init: bool = False,
           progress: bool = True, stop_after_shards: int = 0) -> dict:
    """Writes (or finishes) the export of one split to `output`; returns the summary (process 0) or {}.

    config: the run's config with changes (e.g. `data.eval_mode`, `data.num_segments`; default: the run's own).
    stop_after_shards > 0 returns after writing that many new shards (an interruption, for tests)."""
    features = _check_features(features)
    if shard_size < 1:
        raise ValueError(f"--shard_size: must be >= 1, got {shard_size}")
    config = with_split(config if config is not None else runs.load_config(workdir), split)
    config_lib.validate(config)
    mesh = runs.inference_mesh()
    params, step = runs.load_encoder(workdir, config, weights="random" if random_init else encoder, step=step,
                                     mesh=mesh)
    layer_ids = resolve_layers(layers, models.resolved_dims(config.model)["encoder"]["depth"])
    pi, pc = jax.process_index(), jax.process_count()
    plan = make_plan(config, batch_size, pi, pc)
    batches_per_shard = max(1, shard_size // plan.local_batch)
    meta = features_meta(plan.config, split, layer_ids, features)
    fingerprint = {"format": FORMAT_VERSION, "workdir": os.fspath(workdir_lib.path(workdir)), "step": step,
                   "encoder": "random" if random_init else encoder, "batch_size": plan.batch_size,
                   "batches_per_shard": batches_per_shard, "process_count": pc, "data": plan.config.data.to_dict(),
                   "model": plan.config.model.to_dict(), **meta}
    fingerprint = json.loads(json.dumps(fingerprint))
    workdir_lib.path(output).mkdir(parents=True, exist_ok=True)

    manifest = _read_manifest(output, pi)
    if manifest is not None and manifest["fingerprint"] != fingerprint:
        diff = sorted(k for k in set(fingerprint) | set(manifest["fingerprint"])
                      if fingerprint.get(k) != manifest["fingerprint"].get(k))
        raise ValueError(f"--output={output} holds a different export (differs in {diff}); "
                         f"choose another directory or delete it")
    if manifest is None:
        manifest = {"fingerprint": fingerprint, "shards": [], "complete": False}
    done = _verified_shards(output, manifest)
    manifest["shards"] = manifest["shards"][:done]
    num_shards = math.ceil(plan.num_batches / batches_per_shard)
    if done < num_shards:
        manifest["complete"] = False
        if done:
            log.info("export: resuming %s at shard %d/%d", output, done, num_shards)
        embed_fn = make_embed_fn(runs.encoder_def(config), layer_ids, features, mesh, ChannelSpec.from_config(config))
        pending, written = [], 0
        for rec in iter_embeddings(plan, embed_fn, params, mesh, process_index=pi, process_count=pc,
                                   start_batch=done * batches_per_shard, progress=progress, desc=f"export {split}"):
            pending.append(rec)
            if (rec["batch"] + 1) % batches_per_shard == 0 or rec["batch"] + 1 == plan.num_batches:
                shard = rec["batch"] // batches_per_shard
                manifest["shards"].append(_write_shard(output, pi, shard, pending))
                pending = []
                _save_json(manifest_path(output, pi), manifest)
                written += 1
                if stop_after_shards and written >= stop_after_shards and shard + 1 < num_shards:
                    return {}
    manifest["complete"] = True
    _save_json(manifest_path(output, pi), manifest)
    if pc > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("jepa.export done")
    if pi != 0:
        return {}
    feats = load_features(output)
    _save_json(workdir_lib.path(output) / "index.jsonl", [dict(row, row=i) for i, row in enumerate(feats.rows)],
               lines=True)
    summary = summarize(feats, collapse_rank=float(config.train.collapse_warn_rank))
    summary.update(step=step, encoder=fingerprint["encoder"], workdir=fingerprint["workdir"], split=split)
    _save_json(workdir_lib.path(output) / "summary.json", summary)
    if summary["collapse_warning"]:
        log.warning("export: %s", summary["collapse_warning"])
    return summary


def summarize(feats: Features, *, collapse_rank: float = 0.05, min_std: float = 0.1,
              max_rows: int = 8192) -> dict:
    """Counts and collapse diagnostics of the pooled embeddings (centred: a shared offset is not a direction)."""
    x = np.asarray(feats.pooled, np.float32)
    x = x[:: max(1, len(x) // max_rows)]
    centred = x - x.mean(0, keepdims=True)
    rank = float(metrics_lib.effective_rank(jnp.asarray(centred)))
    std = float(metrics_lib.per_dim_std(jnp.asarray(x)))
    dim = x.shape[1]
    monitor = metrics_lib.CollapseMonitor(min_rank=collapse_rank * min(dim, len(x)), min_std=min_std,
                                          logger=_QUIET)
    messages = monitor.update(0, effective_rank=rank, std=std) if len(x) > 1 else []
    return {"rows": len(feats), "clips": len(set(feats.clip_ids)), "dim": int(dim),
            "patch_tokens": None if feats.patches is None else int(feats.patches.shape[1]),
            "effective_rank": rank, "per_dim_std": std,
            "raw_std": [float(v) for v in np.std(x, axis=0)],
            "collapse_warning": "; ".join(messages) or None, **feats.meta}


def load_features(output: str, *, mmap: bool = True) -> Features:
    """Reads an export directory (all processes' finished shards; patches memory-mapped)."""
    root = workdir_lib.path(output)
    manifests = sorted(p.name for p in root.iterdir() if p.name.startswith("manifest-p") and
                       p.name.endswith(".json")) if root.is_dir() else []
    if not manifests:
        raise FileNotFoundError(f"{output}: not an export directory (no manifest-p*.json)")
    records, meta = [], None
    for name in manifests:
        manifest = json.loads((root / name).read_text())
        if not manifest.get("complete"):
            raise ValueError(f"{output}/{name}: the export is not finished; rerun the export command to resume")
        fp = manifest["fingerprint"]
        meta = {k: fp[k] for k in ("split", "layers", "features", "width", "depth", "grid", "num_frames",
                                   "resolution", "eval_mode", "num_segments", "step", "encoder")}
        meta["channels"] = fp.get("channels", ["video"])
        for shard in manifest["shards"]:
            prefix = name[len("manifest-"):-len(".json")] + f"-s{shard['shard']:05d}"
            rec = {}
            for key in shard["arrays"]:
                path = root / f"{prefix}.{key}.npy"
                if mmap and key == "patches" and workdir_lib.is_local(path):  # memory-mapped: local files only
                    rec[key] = np.load(os.fspath(path), allow_pickle=False, mmap_mode="r")
                else:
                    with path.open("rb") as f:
                        rec[key] = np.load(f, allow_pickle=False)
            rec["rows"] = [json.loads(line) for line in (root / f"{prefix}.rows.jsonl").read_text().splitlines()]
            records.append(rec)
    return concat_features(records, meta)


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m jepa.export --workdir=RUN --split=S --output=DIR [--flags] [--config.FIELD=VALUE ...]` (argv:
    the arguments after the program name); returns the summary it prints."""
    from absl import flags

    from jepa import cli
    with cli.flag_scope():
        workdir, config = cli.define_run_config(argv)
        split = flags.DEFINE_string("split", None, "dataset split to embed, e.g. train, validation, test")
        output = flags.DEFINE_string("output", None, "export directory (resumed when it holds a partial export)")
        step = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
        encoder = flags.DEFINE_enum("encoder", "ema", runs.WEIGHTS, "EMA target encoder, online encoder, or "
                                    "random init (the config's seed) as a baseline")
        feature_list = flags.DEFINE_list("features", ["pooled"], "pooled[,patches]")
        layers = flags.DEFINE_list("layers", ["-1"], "block indices (negative from the end)")
        batch_size = flags.DEFINE_integer("batch_size", 32, "clips per batch (all processes)", lower_bound=1)
        shard_size = flags.DEFINE_integer("shard_size", 512, "rows per shard file (per process)", lower_bound=1)
        no_progress = flags.DEFINE_boolean("no_progress", False, "no progress bar")
        cli.parse(argv, required=("workdir", "split", "output"))
        try:
            layer_ids = [int(x) for x in layers.value if x.strip()]
        except ValueError:
            raise cli.UsageError(f"--layers: {','.join(layers.value)!r} is not a comma list of integers") from None
        config_lib.validate(config.value)
        summary = export(workdir.value, output.value, split=split.value, step=step.value,
                         encoder="ema" if encoder.value == "random" else encoder.value,
                         random_init=encoder.value == "random", features=feature_list.value, layers=layer_ids,
                         batch_size=batch_size.value, shard_size=shard_size.value, config=config.value,
                         progress=not no_progress.value)
    if summary:
        print(json.dumps({k: v for k, v in summary.items() if k != "raw_std"}))
    return summary


def run() -> None:
    """Entry of `python -m jepa.export` and the `jepa-export` console script."""
    from jepa import cli
    cli.run(main, __doc__)


if __name__ == "__main__":
    run()
