"""Video folders and manifests as data sources: a TFDS builder (`VideoFolder`) and a no-preparation `ManifestSource`.

Why: training reads random clips from random videos, so sources need cheap random access. `VideoFolder` packs the
encoded files (bytes, not decoded frames: small on disk, decoded per clip) plus probed metadata into ArrayRecord
shards that `tfds.data_source` / Grain read by index. `ManifestSource` skips preparation and opens files in place.

Inputs (`src`):
- a folder: labels are the immediate sub-folder names, sorted (class index = position); media directly in the root
  get label -1. Sub-folders are searched recursively; hidden files and non-media suffixes are ignored.
- a manifest: `.csv` with a header `path[,label]`, or `.jsonl` lines {"path": ..., "label": ...}. Relative paths
  resolve against the manifest's folder. Integer labels are kept as given; string labels map to indices of the
  sorted unique names; a missing label is -1.

Several folders in one data_dir: each preparation is a builder config named by `name` (default "default"), stored in
`<data_dir>/jepa_video_folder/<name>/1.0.0/`; read back with `video_folder_source(data_dir, split, name)`.
Every file is verified to its end (`probe(verify=True)`: all packets read, the last group of pictures decoded), so
truncated downloads, whose headers still declare the lost frames, are caught here rather than at train time. Files
that fail are skipped with a warning and listed in `prepare_report.json` next to the shards (counts, examples,
reasons); more than half unusable raises ValueError.
"""
from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jepa.data.decode import IMAGE_SUFFIXES, VIDEO_SUFFIXES, DecodeError, probe

__all__ = ["VideoFolder", "VideoFolderConfig", "ManifestSource", "prepare_video_folder", "video_folder_source",
           "list_media", "read_report", "REPORT_FILE"]

log = logging.getLogger(__name__)
REPORT_FILE = "prepare_report.json"
MEDIA_SUFFIXES = VIDEO_SUFFIXES + IMAGE_SUFFIXES
_MAX_EXAMPLES = 20


# ----------------------------------------------------------------------------------------------- listing

def _is_media(filename: str) -> bool:
    return not filename.startswith(".") and filename.lower().endswith(MEDIA_SUFFIXES)


def _label_indices(raw: list, src: str) -> tuple[list[int], list[str]]:
    """Maps manifest labels (ints, int-like strings, names, or None) to ints; returns (labels, class names)."""
    def as_int(v):
        if isinstance(v, bool):
            return None
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v):
            return int(v)
        return None

    present = [v for v in raw if v is not None and v != ""]
    ints = [as_int(v) for v in present]
    if all(i is not None for i in ints):
        labels = [-1 if v is None or v == "" else as_int(v) for v in raw]
        top = max([lab for lab in labels if lab >= 0], default=-1)
        return labels, [str(i) for i in range(top + 1)]
    if any(i is not None for i in ints) and any(not isinstance(v, str) for v in present):
        raise ValueError(f"{src}: labels mix numbers and names; use one kind")
    names = sorted({str(v) for v in present})
    lookup = {n: i for i, n in enumerate(names)}
    return [-1 if v is None or v == "" else lookup[str(v)] for v in raw], names


def list_media(src: str) -> tuple[list[tuple[str, int]], list[str]]:
    """[(absolute path, label)] sorted by path, and the class names, from a folder or a .csv/.jsonl manifest."""
    src = os.fspath(src)
    if os.path.isdir(src):
        root = os.path.abspath(src)
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
        items = [(os.path.join(root, f), -1) for f in sorted(os.listdir(root))
                 if os.path.isfile(os.path.join(root, f)) and _is_media(f)]
        for label, cls in enumerate(classes):
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls)):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                items += [(os.path.join(dirpath, f), label) for f in sorted(filenames) if _is_media(f)]
        return sorted(items), classes
    if not os.path.isfile(src):
        raise ValueError(f"{src}: not a folder or a manifest file (does not exist)")
    base = os.path.dirname(os.path.abspath(src))
    paths, raw = [], []
    if src.lower().endswith(".csv"):
        with open(src, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "path" not in [c.strip() for c in reader.fieldnames]:
                raise ValueError(f"{src}: a .csv manifest needs a header row 'path[,label]', got {reader.fieldnames}")
            for row in reader:
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                if row.get("path"):
                    paths.append(row["path"])
                    raw.append(row.get("label") or None)
    elif src.lower().endswith(".jsonl"):
        with open(src) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{src}:{lineno}: invalid JSON ({e})") from e
                if not isinstance(entry, dict) or not entry.get("path"):
                    raise ValueError(f"{src}:{lineno}: each line needs an object with a 'path'")
                paths.append(str(entry["path"]))
                raw.append(entry.get("label"))
    else:
        raise ValueError(f"{src}: manifest must end in .csv or .jsonl")
    if not paths:
        raise ValueError(f"{src}: manifest lists no files")
    labels, classes = _label_indices(raw, src)
    items = [(p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p)), lab) for p, lab in zip(paths, labels)]
    return items, classes


def _in_validation(relpath: str, fraction: float) -> bool:
    """Deterministic split: hash of the path (relative to src) mapped to [0, 1)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(relpath.encode("utf-8")).digest()[:8], "big")
    return h / 2 ** 64 < fraction


def _probe_one(path: str):
    try:
        return path, probe(path, verify=True), None
    except DecodeError as e:
        return path, None, str(e)


def _probe_all(paths: Sequence[str], num_workers: int | None) -> list:
    """probe(verify=True) every file on a thread pool (PyAV releases the GIL while demuxing/decoding), with a
    progress bar."""
    from tqdm.auto import tqdm
    workers = num_workers or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(tqdm(pool.map(_probe_one, paths), total=len(paths), desc="probing media", unit="file"))


# ----------------------------------------------------------------------------------------------- builder

@dataclasses.dataclass(eq=False)
class VideoFolderConfig(tfds.core.BuilderConfig):
    """One prepared folder/manifest. `src` is only needed to prepare; reading needs just the name."""
    src: str = ""
    validation_fraction: float = 0.0
    num_workers: int | None = None


class VideoFolder(tfds.core.GeneratorBasedBuilder):
    """Encoded video/image files + metadata in ArrayRecord shards (no TensorFlow needed)."""

    name = "jepa_video_folder"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Encoded bytes + probed metadata; label -1 for unlabeled files."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS's own lookup needs the importlib_resources backport (not installed); this file is the answer.
        from etils import epath
        return epath.Path(__file__)

    def __init__(self, *, config: VideoFolderConfig | str | None = None, **kwargs):
        if config is None or isinstance(config, str):
            config = VideoFolderConfig(name=config or "default")
        kwargs.setdefault("file_format", "array_record")
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(shape=(), dtype=np.object_),   # raw encoded file bytes
            "path": tfds.features.Text(),
            "label": tfds.features.Scalar(dtype=np.int64),
            "num_frames": tfds.features.Scalar(dtype=np.int64),
            "fps": tfds.features.Scalar(dtype=np.float32),
            "duration": tfds.features.Scalar(dtype=np.float32),
            "height": tfds.features.Scalar(dtype=np.int64),
            "width": tfds.features.Scalar(dtype=np.int64),
            "is_image": tfds.features.Scalar(dtype=np.bool_),
        })
        return tfds.core.DatasetInfo(builder=self, features=features, metadata=tfds.core.MetadataDict(),
                                     description="Video files from a folder or manifest (jepa).")

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        if not cfg.src:
            raise ValueError(f"dataset {self.name}/{cfg.name} is not prepared and no src was given to prepare it")
        if not 0 <= cfg.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {cfg.validation_fraction}")
        items, classes = list_media(cfg.src)
        if not items:
            raise ValueError(f"{cfg.src}: no media files found (suffixes {', '.join(MEDIA_SUFFIXES)})")
        labels = dict(items)
        results = _probe_all([p for p, _ in items], cfg.num_workers)
        good = [(p, meta) for p, meta, err in results if meta is not None]
        bad = [(p, err) for p, meta, err in results if meta is None]
        for _, err in bad:
            log.warning("skipping unusable file: %s", err)
        root = cfg.src if os.path.isdir(cfg.src) else os.path.dirname(os.path.abspath(cfg.src))
        split_of = {p: "validation" if _in_validation(os.path.relpath(p, root), cfg.validation_fraction) else "train"
                    for p, _ in good}
        report = {"src": os.path.abspath(cfg.src), "total_files": len(items), "usable": len(good),
                  "skipped": len(bad), "skipped_examples": [{"path": p, "reason": e} for p, e in bad[:_MAX_EXAMPLES]],
                  "class_names": classes,
                  "examples_per_split": {s: sum(v == s for v in split_of.values()) for s in ("train", "validation")}}
        if len(bad) * 2 > len(items):
            examples = "; ".join(f"{p} ({e})" for p, e in bad[:5])
            raise ValueError(f"{cfg.src}: {len(bad)} of {len(items)} media files are unusable (more than half), "
                             f"e.g. {examples}")
        self.info.metadata.update({"class_names": classes, "src": report["src"], "skipped": len(bad)})
        os.makedirs(self.data_dir, exist_ok=True)
        with open(os.path.join(self.data_dir, REPORT_FILE), "w") as f:
            json.dump(report, f, indent=1)
        if bad:
            log.warning("%s: skipped %d of %d files (see %s)", cfg.src, len(bad), len(items), REPORT_FILE)
        per_split = {s: [(p, m, labels[p]) for p, m in good if split_of[p] == s] for s in ("train", "validation")}
        if not per_split["train"]:
            raise ValueError(f"{cfg.src}: no usable files left for the train split "
                             f"({len(good)} usable, validation_fraction={cfg.validation_fraction})")
        if cfg.validation_fraction > 0 and not per_split["validation"]:
            log.warning("%s: validation_fraction=%s selected no file; no validation split", cfg.src,
                        cfg.validation_fraction)
        return {s: self._generate_examples(v) for s, v in per_split.items() if v}

    def _generate_examples(self, entries):
        for path, meta, label in entries:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:   # vanished/unreadable since probing: keep going, it was counted as usable
                log.warning("skipping %s: cannot read it any more (%s)", path, e)
                continue
            yield path, {"video": data, "path": path, "label": int(label), "num_frames": int(meta["num_frames"]),
                         "fps": float(meta["fps"]), "duration": float(meta["duration"]),
                         "height": int(meta["height"]), "width": int(meta["width"]),
                         "is_image": bool(meta["is_image"])}


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[a-zA-Z0-9_][a-zA-Z0-9_.\-]*", name):
        raise ValueError(f"name must be letters, digits, '_', '.', '-' (got {name!r})")
    return name


def prepare_video_folder(src: str, data_dir: str, *, name: str | None = None, validation_fraction: float = 0.0,
                         num_workers: int | None = None) -> tfds.core.DatasetBuilder:
    """Prepares (once; cached) `src` into `<data_dir>/jepa_video_folder/<name>/`; returns the builder."""
    cfg = VideoFolderConfig(name=_check_name(name or "default"), src=os.fspath(src),
                            validation_fraction=float(validation_fraction), num_workers=num_workers)
    builder = VideoFolder(config=cfg, data_dir=os.fspath(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder


def read_report(builder_or_dir) -> dict:
    """The preparation report (counts, skipped files) of a prepared dataset ({} if none)."""
    d = builder_or_dir.data_dir if hasattr(builder_or_dir, "data_dir") else os.fspath(builder_or_dir)
    path = os.path.join(d, REPORT_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


class _StrPathSource:
    """Wraps a TFDS data source so records carry "path" as str (TFDS returns Text as bytes)."""

    def __init__(self, source, class_names):
        self._source = source
        self.class_names = class_names

    def __len__(self):
        return len(self._source)

    @staticmethod
    def _fix(record):
        if isinstance(record.get("path"), bytes):
            record["path"] = record["path"].decode("utf-8", errors="replace")
        return record

    def __getitem__(self, index):
        return self._fix(self._source[index])

    def __getitems__(self, indices):
        return [self._fix(r) for r in self._source.__getitems__(indices)]

    def __repr__(self):
        return f"VideoFolderSource({self._source!r})"


def video_folder_source(data_dir: str, split: str = "train", name: str = "default"):
    """Random-access source (len / getitem) over a prepared video folder; records follow the spec."""
    builder = VideoFolder(config=_check_name(name), data_dir=os.fspath(data_dir))
    if not builder.is_prepared():
        raise ValueError(f"no prepared video folder {name!r} in {data_dir} (expected {builder.data_dir}); run "
                         f"`python -m jepa.data.prepare video_folder --src=... --data_dir={data_dir} --name={name}`")
    builder = tfds.builder_from_directory(builder.data_dir)   # reads the stored info (splits, metadata)
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} not in {sorted(builder.info.splits)} for {builder.data_dir}")
    return _StrPathSource(builder.as_data_source(split=split), list(builder.info.metadata.get("class_names", [])))


# ----------------------------------------------------------------------------------------------- manifest source

class ManifestSource:
    """Random access over a folder or manifest without preparation: files are opened where they are.

    Records follow the spec with "video" = b"" and "path" set. With probe_metadata=True (default) metadata is filled
    by probe() on access (a file that fails to probe gets -1 / NaN values; decoding it later raises DecodeError,
    which the pipeline counts as skipped); with False every metadata field is -1 until decoded.
    """

    def __init__(self, src: str, *, probe_metadata: bool = True):
        self.src = os.fspath(src)
        self.items, self.class_names = list_media(self.src)
        if not self.items:
            raise ValueError(f"{self.src}: no media files found")
        self.probe_metadata = probe_metadata

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.items[int(index)]
        is_image = path.lower().endswith(IMAGE_SUFFIXES)
        record = {"video": b"", "path": path, "label": int(label), "num_frames": -1, "fps": -1.0, "duration": -1.0,
                  "height": -1, "width": -1, "is_image": is_image}
        if self.probe_metadata:
            try:
                record.update(probe(path))
            except DecodeError as e:
                log.warning("%s", e)
        return record

    def __repr__(self):
        return f"ManifestSource({self.src!r}, {len(self)} files)"
