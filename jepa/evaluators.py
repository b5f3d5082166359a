"""Periodic evaluations during training (big_vision style): config.evals lists them, the trainer calls `run_due`.

    config.evals = {
        "knn": dict(every=500, k=20),                                    # kind defaults to the entry's name
        "probe": dict(every=1000, task="classification", target="label", probe="linear"),
        "states": dict(kind="probe", every=1000, task="regression", target="states[-1]"),
    }

Each evaluator embeds a fixed set of clips (the first `max_clips` records of `train_split` and `eval_split`,
decoded once and kept in memory as uint8) with the current EMA target encoder, then
  - knn: cosine-similarity k-nearest-neighbour classification (votes weighted by exp(sim / temperature)),
  - probe: the jepa.probe grid (linear on pooled features by default) fitted on the train clips but every
    fourth, the grid member chosen on those held-out train clips, and its score on the eval clips,
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

from jepa import config as config_lib
from jepa import export as export_lib
from jepa import models
from jepa import probe as probe_lib
from jepa.data import pipeline

log = logging.getLogger(__name__)

KINDS = config_lib.EVAL_KINDS


def _settings(name: str, entry) -> dict:
    """An entry of config.evals on top of its kind's fields as jepa.config.evaluation declares them; the kind
    defaults to the entry's name."""
    entry = dict(entry.to_dict() if isinstance(entry, ml_collections.ConfigDict) else entry)
    kind = entry.get("kind") or name
    if kind not in KINDS:
        raise ValueError(f"config.evals.{name}.kind: {kind!r} is not one of {', '.join(KINDS)}")
    settings = config_lib.evaluation(kind).to_dict()
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


def _gather(tree: dict) -> dict:
    """Every process's rows of each array, concatenated in process order (arrays have the same shape on every
    process: the evaluation plan gives each one the same number of equal batches)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils
    return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(tree, tiled=True).items()}


class _Clips:
    """The first `max_clips` records of one split as in-memory uint8 batches (this process's share), plus the
    targets and row metadata of every process's valid rows."""

    def __init__(self, config, split: str, max_clips: int, batch_size: int):
        pi, pc = jax.process_index(), jax.process_count()
        cfg = export_lib.with_split(config, split)
        plan = export_lib.make_plan(cfg, batch_size, pi, pc)
        plan.sources = [export_lib.Head(s, max_clips) for s in plan.sources]
        total = sum(len(s) for s in plan.sources) * int(plan.config.data.num_segments)
        plan.num_batches = math.ceil(math.ceil(total / pc) / plan.local_batch)
        ds = pipeline.build_pipeline(plan.config, process_index=pi, process_count=pc, train=False, masks=False,
                                     sources=dict(zip(plan.names, plan.sources)))
        it = iter(ds)
        self.videos, local = [], []
        try:
            for _ in range(plan.num_batches):
                b = next(it)
                self.videos.append(np.asarray(b["video"]))
                local.append({k: np.asarray(b[k]) for k in ("source", "index", "segment", "label",
                                                            *export_lib.TARGET_FIELDS) if k in b})
                local[-1]["valid"] = np.asarray(b["valid"], np.int32)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        rows = _gather({k: np.concatenate([b[k] for b in local]) for k in local[0]})
        self.keep = rows.pop("valid").astype(bool)
        info = export_lib.RowInfo(plan)
        self.rows = [info(int(s), int(j), int(g), int(lab)) for s, j, g, lab in
                     zip(*(rows[k][self.keep] for k in ("source", "index", "segment", "label")))]
        self.targets = {k: v[self.keep] for k, v in rows.items() if k in export_lib.TARGET_FIELDS}
        self.meta = export_lib.features_meta(plan.config, split, [], ("pooled",))

    def embed(self, embed_fn, params, mesh) -> export_lib.Features:
        from jepa import sharding
        pooled = [export_lib.local_rows(embed_fn(params, sharding.global_batch({"video": v}, mesh)["video"])["pooled"])
                  for v in self.videos]
        pooled = _gather({"pooled": np.concatenate(pooled)})["pooled"][self.keep]
        return export_lib.concat_features([{"pooled": pooled, **self.targets, "rows": self.rows}], self.meta)


class Evaluator:
    """One config.evals entry: fixed clips, a jitted embedding function, and a metric on the embeddings."""

    def __init__(self, name: str, settings: dict, config, mesh, objective):
        self.name, self.s, self.config, self.mesh = name, settings, config, mesh
        depth = models.resolved_dims(config.model)["encoder"]["depth"]
        self.embed_fn = export_lib.make_embed_fn(objective.encoder_def,
                                                 export_lib.resolve_layers(settings["layers"], depth), ("pooled",),
                                                 mesh)
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
        return probe_metrics(train, val, self.s, name=self.name)


SELECT_EVERY = 4  # every 4th training clip selects the probe's grid member; the others fit it


def probe_metrics(train, val, settings: dict, *, name: str = "probe") -> dict[str, float]:
    """The probe grid fitted on most training clips, its member chosen on the held-out rest (every
    SELECT_EVERY-th clip), and that member's metrics on `val`: the reported figure comes from clips used neither
    for fitting nor for selection."""
    clips = list(dict.fromkeys(train.clip_ids))
    if len(clips) < 2:
        raise ValueError(f"config.evals.{name}: the probe needs at least 2 training clips (one held out to choose "
                         f"the grid member), got {len(clips)}; raise max_clips")
    held_out = {c for i, c in enumerate(clips) if i % SELECT_EVERY == SELECT_EVERY - 1} or {clips[-1]}
    select = np.asarray([c in held_out for c in train.clip_ids])
    r = probe_lib.run_probe(probe_lib.select_rows(train, ~select), probe_lib.select_rows(train, select), val,
                            task=settings["task"], target=settings["target"], probe=settings["probe"],
                            lrs=settings["lrs"], wds=settings["wds"], epochs=int(settings["epochs"]),
                            depth=int(settings["depth"]))
    return {k: v for k, v in r["test"].items() if np.isfinite(v)}


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
    """The evaluators listed in config.evals (none when it is empty)."""
    evals = config.evals
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
