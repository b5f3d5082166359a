"""Periodic evaluations during training (big_vision style): config.evals lists them, the trainer calls `run_due`.

    config.evals = {
        "knn": dict(every=500, k=20),                                    # kind defaults to the entry's name
        "probe": dict(every=1000, task="classification", target="label", probe="linear"),
        "states": dict(kind="probe", every=1000, task="regression", target="states[-1]"),
    }

Each evaluator embeds a fixed set of clips (the first `max_clips` records of `train_split` and `eval_split`,
decoded once and kept in memory as uint8) with the current EMA target encoder, then
  - knn: cosine-similarity k-nearest-neighbour classification (votes weighted by exp(sim / temperature)),
  - probe: the jepa.probe grid (linear on pooled features by default) fitted on the train clips, the best grid
    member's score on the eval clips,
and the trainer writes the scalars `eval/NAME/...` to metrics.jsonl and TensorBoard at that step.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jepa import export as export_lib
from jepa import probe as probe_lib
from jepa.data import pipeline

log = logging.getLogger(__name__)

KINDS = ("knn", "probe")
_COMMON = dict(kind="", every=1000, train_split="train", eval_split="validation", max_clips=256, batch_size=32,
               layers=(-1,))
_DEFAULTS = {
    "knn": dict(k=20, temperature=0.07, target="label"),
    "probe": dict(task="classification", target="label", probe="linear", epochs=20, depth=1,
                  lrs=(1e-3, 3e-3, 1e-2), wds=(0.001, 0.1)),
}


def _settings(name: str, entry) -> dict:
    entry = dict(entry.to_dict() if isinstance(entry, ml_collections.ConfigDict) else entry)
    kind = entry.get("kind") or name
    if kind not in KINDS:
        raise ValueError(f"config.evals.{name}.kind: {kind!r} is not one of {', '.join(KINDS)}")
    settings = dict(_COMMON, **_DEFAULTS[kind])
    unknown = sorted(set(entry) - set(settings))
    if unknown:
        raise ValueError(f"config.evals.{name}: unknown field(s) {unknown}; known: {sorted(settings)}")
    settings.update(entry, kind=kind)
    if int(settings["every"]) < 1:
        raise ValueError(f"config.evals.{name}.every: must be >= 1, got {settings['every']}")
    if int(settings["max_clips"]) < 1:
        raise ValueError(f"config.evals.{name}.max_clips: must be >= 1, got {settings['max_clips']}")
    if kind == "probe" and settings["probe"] != "linear":
        raise ValueError(f"config.evals.{name}.probe: {settings['probe']!r}; evaluators embed pooled vectors only, "
                         "so the probe must be 'linear' (patch-token probes: python -m jepa.probe)")
    return settings


class _Clips:
    """The first `max_clips` records of one split as in-memory uint8 batches plus targets and row metadata."""

    def __init__(self, config, split: str, max_clips: int, batch_size: int):
        pi, pc = jax.process_index(), jax.process_count()
        cfg = export_lib.with_split(config, split)
        plan = export_lib.make_plan(cfg, batch_size, pi, pc)
        plan.sources = [export_lib._Head(s, max_clips) for s in plan.sources]
        total = sum(len(s) for s in plan.sources) * int(plan.config.data.num_segments)
        plan.num_batches = math.ceil(math.ceil(total / pc) / plan.local_batch)
        ds = pipeline.build_pipeline(plan.config, process_index=pi, process_count=pc, train=False, masks=False,
                                     sources=dict(zip(plan.names, plan.sources)))
        info = export_lib.RowInfo(plan)
        it = iter(ds)
        self.batches = []
        try:
            for _ in range(plan.num_batches):
                b = next(it)
                keep = np.asarray(b["valid"], bool)
                rows = [info(int(s), int(j), int(g), int(lab)) for s, j, g, lab in
                        zip(b["source"][keep], b["index"][keep], b["segment"][keep], b["label"][keep])]
                targets = {k: np.asarray(b[k])[keep] for k in export_lib.TARGET_FIELDS if k in b}
                self.batches.append((np.asarray(b["video"]), keep, targets, rows))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        self.meta = export_lib._meta(plan.config, split, [], ("pooled",))

    def embed(self, embed_fn, params, mesh) -> export_lib.Features:
        from jepa import sharding
        records = []
        for video, keep, targets, rows in self.batches:
            out = embed_fn(params, sharding.global_batch({"video": video}, mesh)["video"])
            pooled = export_lib.local_rows(out["pooled"])[keep]
            records.append({"pooled": pooled, **targets, "rows": rows})
        feats = export_lib._concat(records, self.meta)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            feats.pooled = np.asarray(multihost_utils.process_allgather(feats.pooled, tiled=True))
            raise NotImplementedError("evaluators: multi-process gathering of targets is not implemented")
        return feats


class Evaluator:
    """One config.evals entry: fixed clips, a jitted embedding function, and a metric on the embeddings."""

    def __init__(self, name: str, settings: dict, config, mesh, objective):
        self.name, self.s, self.config, self.mesh = name, settings, config, mesh
        depth = export_lib.models.resolved_dims(config.model)["encoder"]["depth"]
        self.embed_fn = export_lib.make_embed_fn(objective, export_lib.resolve_layers(settings["layers"], depth),
                                                 ("pooled",), mesh)
        self._clips: dict[str, _Clips] = {}

    @property
    def every(self) -> int:
        return int(self.s["every"])

    def features(self, which: str, params) -> export_lib.Features:
        split = self.s[f"{which}_split"]
        if which not in self._clips:
            self._clips[which] = _Clips(self.config, split, int(self.s["max_clips"]), int(self.s["batch_size"]))
        return self._clips[which].embed(self.embed_fn, params, self.mesh)

    def __call__(self, params) -> dict[str, float]:
        train, val = self.features("train", params), self.features("eval", params)
        if self.s["kind"] == "knn":
            return knn_metrics(train, val, k=int(self.s["k"]), temperature=float(self.s["temperature"]),
                               target=str(self.s["target"]))
        r = probe_lib.run_probe(train, val, val, task=self.s["task"], target=self.s["target"], probe=self.s["probe"],
                                lrs=self.s["lrs"], wds=self.s["wds"], epochs=int(self.s["epochs"]),
                                depth=int(self.s["depth"]))
        return {k: v for k, v in r["val"].items() if np.isfinite(v)}


def knn_metrics(train, val, *, k: int = 20, temperature: float = 0.07, target: str = "label") -> dict[str, float]:
    """Weighted kNN accuracy of `val` clips from `train` windows (cosine similarity of pooled embeddings);
    a clip's vote sums over its windows."""
    name, _ = probe_lib.parse_target(target)
    if name == "states" or name not in train.targets:
        raise ValueError(f"knn target {target!r}: needs a class target present in the features (label, domain)")
    ytr, yva = np.asarray(train.targets[name]), np.asarray(val.targets[name])
    keep_tr, keep_va = ytr >= 0, yva >= 0
    if not keep_tr.any() or not keep_va.any():
        raise ValueError(f"knn target {target!r}: no labelled rows")
    num_classes = int(max(ytr.max(), yva.max())) + 1
    xtr = jnp.asarray(train.pooled[keep_tr], jnp.float32)
    xva = jnp.asarray(val.pooled[keep_va], jnp.float32)
    xtr = xtr / (jnp.linalg.norm(xtr, axis=-1, keepdims=True) + 1e-8)
    xva = xva / (jnp.linalg.norm(xva, axis=-1, keepdims=True) + 1e-8)
    k = min(k, xtr.shape[0])
    sims, idx = jax.lax.top_k(xva @ xtr.T, k)
    votes = jax.nn.one_hot(jnp.asarray(ytr[keep_tr])[idx], num_classes) * jnp.exp(sims / temperature)[..., None]
    votes = np.asarray(votes.sum(1))
    groups = np.asarray([g for g, keep in zip(_group_ids(val), keep_va) if keep])
    clip_votes = probe_lib.group_mean(votes, groups)
    clip_y = np.zeros(len(clip_votes), np.int64)
    clip_y[groups] = yva[keep_va]
    return {"accuracy": float((clip_votes.argmax(-1) == clip_y).mean()),
            "window_accuracy": float((votes.argmax(-1) == yva[keep_va]).mean())}


def _group_ids(feats) -> list[int]:
    lookup = {c: i for i, c in enumerate(dict.fromkeys(feats.clip_ids))}
    return [lookup[c] for c in feats.clip_ids]


def build(config, mesh, objective) -> list[Evaluator]:
    """The evaluators listed in config.evals (none when the field is absent or empty)."""
    evals = config.get("evals") if hasattr(config, "get") else None
    if not evals:
        return []
    return [Evaluator(name, _settings(name, entry), config, mesh, objective) for name, entry in sorted(evals.items())]


def run_due(evaluators: list[Evaluator], step: int, ema_params: Any, writer, timer=None) -> dict[str, float]:
    """Runs the evaluators whose `every` divides `step` on the EMA encoder parameters and writes
    `eval/NAME/METRIC` through the MetricsWriter; the step timer restarts so evaluation time does not count
    as training time."""
    scalars: dict[str, float] = {}
    for ev in evaluators:
        if step % ev.every:
            continue
        start = time.perf_counter()
        for key, value in ev(ema_params).items():
            scalars[f"eval/{ev.name}/{key}"] = float(value)
        scalars[f"eval/{ev.name}/seconds"] = time.perf_counter() - start
        mine = {k.split("/")[-1]: v for k, v in scalars.items() if k.startswith(f"eval/{ev.name}/")}
        log.info("eval %s at step %d: %s", ev.name, step, ", ".join(f"{k} {v:.4g}" for k, v in mine.items()))
    if scalars:
        writer.write(step, scalars)
        if timer is not None:
            timer.reset()
    return scalars
