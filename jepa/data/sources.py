"""Data sources: config.data.sources entries opened as random-access record sources, and the preflight check
that they decode before training starts."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from jepa.data import clips, decode

log = logging.getLogger(__name__)

SOURCE_KINDS = ("world", "tfds", "manifest")
# Fields of a source config that are not passed on to jepa.data.world.world_source as generation options.
_SOURCE_FIELDS = ("kind", "name", "data_dir", "split", "path", "weight", "preset")


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


def sources_from_config(config, sources: Mapping[str, Any] | None) -> tuple[list[str], list[Any], list[float]]:
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


def check_sources(config, *, sample: int = 32, sources: Mapping[str, Any] | None = None) -> dict:
    """Decodes a clip from up to `sample` evenly spread records per source before training starts.

    Returns name -> {"records", "checked", "failed", "bad": [names]} and logs it; raises ValueError listing
    example bad files when more than half of a source's sample fails (wrong paths, unsupported codec, ...).
    """
    settings = dataclasses.replace(clips.clip_settings(config), max_decode_retries=0)
    names, srcs, _ = sources_from_config(config, sources)
    maker = clips.ClipMaker(names, srcs, settings, train=False, world=False, seed=int(config.seed))
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
                bad.append(clips.record_name(record, name, index))
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
