"""Surprise: how far what happened is from what the model predicted, and a paired violation-of-expectation benchmark.

    python -m jepa.surprise benchmark --workdir=runs/wm [--video_workdir=runs/quickstart] [--pairs=200]

Per-step surprise = mean |predicted - observed| next representation (layer-normalised encoder outputs). The
benchmark scores a clip over sliding windows: from `context` observed frames it rolls out `horizon` frames
open-loop and averages the error over them. Scorers, all on the same clips:
  - action-conditioned: the world model (jepa.planning.WorldModel), rolled out with the clip's actions;
  - video: a V-JEPA pretraining run; windows of its num_frames, the last tubelet step predicted from the context
    encoder's tokens of the earlier steps and compared with the EMA encoder's tokens;
  - persistence: z_{t+1} = z_t in the world model's encoder space, and pixel difference, the same on pixels
    (change detectors: the baselines).
Paired evaluation (IntPhys; Garrido et al. 2025): every impossible clip is paired with the same episode window
unaltered, rendered through the same path; the two differ only from the event (clip frame `event_frame`) on.
Appearance tier: "teleport" (the clip jumps `jump` episode frames ahead), "vanish" (the moving bodies stop being drawn).
Dynamics tier, which a change detector cannot see: "freeze" (the picture stops while the actions go on),
"reversal" (the motion retraces itself backwards), both only in windows where the bodies truly move at least one
encoder patch after the event; "mass" (every body 5x heavier) and "actuator" (the actuators' sign flipped),
re-simulated in MuJoCo from the state before the event; "action_mismatch" (the real frames, the actions of
another episode of the domain from the event on).
A clip's score is the mean or the max of its window scores. Reported per kind and tier, with bootstrap 95%
intervals (episodes resampled: the pairs of one episode share its scene and policy): relative accuracy (the
impossible clip scores above its twin, ties half), AUROC (impossible vs possible clips) and absolute accuracy
(balanced, the threshold at the 90th percentile of the possible clips' scores).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jepa import workdir as workdir_lib
from jepa.data.clips import action_blocks

log = logging.getLogger(__name__)

APPEARANCE = ("teleport", "vanish")
DYNAMICS = ("freeze", "reversal", "mass", "actuator", "action_mismatch")
TIERS = {"appearance": APPEARANCE, "dynamics": DYNAMICS}
VIOLATIONS = APPEARANCE + DYNAMICS
# Invisible unless the bodies move: windows qualify only where the true motion after the event reaches one patch.
NEEDS_MOTION = ("freeze", "reversal")
# The model changes of the re-simulated kinds (jepa.envs.changed_env).
PHYSICS_CHANGES = {"mass": {"mass_scale": 5.0}, "actuator": {"actuator_sign": -1.0}}
# Geoms hidden by "vanish" (rgba alpha 0): the bodies that move.
VANISH_GEOMS = {"reacher": ("arm", "hand", "finger"), "point_mass": ("pointmass",),
                "cartpole": ("cart", "pole_1")}
SCORERS = ("action-conditioned", "video", "persistence", "pixel difference")
AGGREGATES = ("mean", "max")      # a clip's score: of its window scores
METRICS = ("relative_accuracy", "auroc", "absolute_accuracy")
POSSIBLE_QUANTILE = 0.9           # absolute accuracy: threshold at this quantile of the possible clips' scores


# ---------------------------------------------------------------- scores


def ac_surprise(model, frames: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """World model (jepa.planning.WorldModel): per-step surprise [T - 1] of frames [T, H, W, 3], actions [T, A]."""
    z = model.encode(frames)
    predicted = model.predict_next(z[:-1], np.asarray(actions[:-1], np.float32))
    return np.asarray(jnp.mean(jnp.abs(predicted - z[1:]), axis=(1, 2)))


class VideoPredictor:
    """A V-JEPA pretraining run's online encoder + predictor and EMA encoder, for per-step video surprise."""

    def __init__(self, workdir: str, step: int | None = None):
        from jepa import objectives, runs
        from jepa.objectives.vjepa import gather_tokens, layer_norm, normalize_video
        self.config = runs.load_config(workdir)
        if self.config.objective != "vjepa":
            raise ValueError(f"--video_workdir={workdir}: not a V-JEPA pretraining run (config.objective is "
                             f"{self.config.objective!r})")
        state, self.step = runs.load_state_parts(workdir, ["params/encoder", "params/predictor", "ema"], step)
        self.params, self.ema = state["params"], state["ema"]
        self.objective = objectives.build(self.config)
        self.tubelet = int(self.config.model.encoder.tubelet_size)
        obj = self.objective

        def step_surprise(params, ema, video, ctx, tgt):
            video = normalize_video(video)
            targets = gather_tokens(layer_norm(obj.encode(ema, video)), tgt)
            pred = obj.predict(params["predictor"], obj.encode(params["encoder"], video, ctx), ctx, tgt, 0)
            return jnp.mean(jnp.abs(layer_norm(pred) - targets))
        self._step_surprise = jax.jit(step_surprise)

        def last_step_surprise(params, ema, windows, ctx, tgt):  # windows [B, T, H, W, 3]; ctx, tgt [1, n]
            video = normalize_video(windows)
            ctx, tgt = (jnp.broadcast_to(i, (video.shape[0], i.shape[1])) for i in (ctx, tgt))
            targets = gather_tokens(layer_norm(obj.encode(ema, video)), tgt)
            pred = obj.predict(params["predictor"], obj.encode(params["encoder"], video, ctx), ctx, tgt, 0)
            return jnp.mean(jnp.abs(layer_norm(pred) - targets), axis=(1, 2))
        self._last_step_surprise = jax.jit(last_step_surprise)

    def surprise(self, frames: np.ndarray) -> np.ndarray:
        """frames uint8 [T, H, W, 3] (T a multiple of the tubelet size, H and W the run's resolution) ->
        surprise [T' - 1] of tubelet steps 1..T'-1."""
        if frames.shape[0] != int(self.config.data.num_frames):
            raise ValueError(f"video surprise: clips of {frames.shape[0]} frames, the pretraining run's predictor "
                             f"was built for {self.config.data.num_frames} (config.data.num_frames)")
        t = frames.shape[0] // self.tubelet
        patch = int(self.config.model.encoder.patch_size)
        hw = (frames.shape[1] // patch) * (frames.shape[2] // patch)
        video = jnp.asarray(frames[None], jnp.uint8)
        out = []
        for step in range(1, t):  # context: every token of steps < step; targets: the tokens of `step`
            ctx = jnp.arange(step * hw, dtype=jnp.int32)[None]
            tgt = jnp.arange(step * hw, (step + 1) * hw, dtype=jnp.int32)[None]
            out.append(float(self._step_surprise(self.params, self.ema, video, ctx, tgt)))
        return np.asarray(out)

    def window_surprise(self, frames: np.ndarray) -> np.ndarray:
        """frames uint8 [T, H, W, 3] (T >= the run's num_frames) -> surprise [T - num_frames + 1]: in every window of
        num_frames consecutive frames, of the last tubelet step predicted from the steps before it."""
        num = int(self.config.data.num_frames)
        res = int(self.config.data.resolution)
        if frames.shape[0] < num or frames.shape[1:3] != (res, res):
            raise ValueError(f"video surprise: clips of {frames.shape[0]} frames at {frames.shape[1]}x{frames.shape[2]}"
                             f"; the pretraining run's predictor needs at least {num} frames (config.data.num_frames)"
                             f" at {res}x{res} (config.data.resolution)")
        patch = int(self.config.model.encoder.patch_size)
        hw = (res // patch) ** 2
        last = num // self.tubelet - 1  # the target tubelet step; context: every token before it
        ctx = jnp.arange(last * hw, dtype=jnp.int32)[None]
        tgt = jnp.arange(last * hw, (last + 1) * hw, dtype=jnp.int32)[None]
        windows = np.stack([frames[i:i + num] for i in range(frames.shape[0] - num + 1)])
        return np.asarray(self._last_step_surprise(self.params, self.ema, jnp.asarray(windows, jnp.uint8), ctx, tgt))


class ClipScorer:
    """Window surprise of a clip for every scorer: {name: [windows]} (see the module docstring). Window t observes
    frames t .. t + context - 1 and predicts the `horizon` frames after them."""

    def __init__(self, model, video: VideoPredictor | None = None, context: int = 2, horizon: int = 2):
        if context < 1 or horizon < 1:
            raise ValueError(f"context and horizon must be >= 1, got {context} and {horizon}")
        self.model, self.video, self.context, self.horizon = model, video, int(context), int(horizon)
        objective, c, h = model.objective, self.context, self.horizon

        def windows(predictor_params, z, frames, actions, states):
            starts = jnp.arange(z.shape[0] - c - h + 1)[:, None]
            seen, ahead = starts + jnp.arange(c)[None], starts + c + jnp.arange(h)[None]
            predicted = objective.rollout(predictor_params, z[seen], actions[starts + jnp.arange(c + h - 1)[None]],
                                          states[seen])                                  # [B, h, N, D]
            pixels = frames.astype(jnp.float32) / 255.0
            last = starts[:, 0] + c - 1  # persistence: every frame ahead looks like the last one seen
            err = lambda p, t: jnp.mean(jnp.abs(p - t), axis=tuple(range(1, t.ndim)))
            return {"action-conditioned": err(predicted, z[ahead]),
                    "persistence": err(z[last][:, None], z[ahead]),
                    "pixel difference": err(pixels[last][:, None], pixels[ahead])}
        self._windows = jax.jit(windows)

    def __call__(self, clip: dict) -> dict[str, np.ndarray]:
        frames = np.asarray(clip["frames"])
        if frames.shape[0] < self.context + self.horizon:
            raise ValueError(f"clips of {frames.shape[0]} frames are shorter than context {self.context} + horizon "
                             f"{self.horizon}")
        z = self.model.encode(frames)
        out = self._windows(self.model.predictor_params, z, jnp.asarray(frames),
                            jnp.asarray(clip["actions"], jnp.float32), jnp.asarray(clip["states"], jnp.float32))
        out = {k: np.asarray(v) for k, v in out.items()}
        if self.video is not None:
            out["video"] = self.video.window_surprise(frames)
        return out


# ---------------------------------------------------------------- metrics


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting half."""
    from scipy.stats import rankdata
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if not len(pos) or not len(neg):
        raise ValueError("auroc needs at least one positive and one negative score")
    ranks = rankdata(np.concatenate([pos, neg]))  # ties share their mean rank: half a win each
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def relative_accuracy(possible: Sequence[float], impossible: Sequence[float]) -> float:
    """Fraction of pairs whose impossible clip scores above its possible twin, ties counting half."""
    pos, imp = np.asarray(possible, np.float64), np.asarray(impossible, np.float64)
    if pos.shape != imp.shape or not len(pos):
        raise ValueError(f"relative accuracy needs paired scores, got {pos.shape} possible and {imp.shape} impossible")
    return float(np.mean(imp > pos) + 0.5 * np.mean(imp == pos))


def absolute_accuracy(possible: Sequence[float], impossible: Sequence[float],
                      quantile: float = POSSIBLE_QUANTILE) -> float:
    """Balanced accuracy of "impossible when the score is above the `quantile` of the possible clips' scores"."""
    pos, imp = np.asarray(possible, np.float64), np.asarray(impossible, np.float64)
    if not len(pos) or not len(imp):
        raise ValueError("absolute accuracy needs possible and impossible scores")
    threshold = np.quantile(pos, quantile)
    return float((np.mean(imp > threshold) + np.mean(pos <= threshold)) / 2)


METRIC_FNS = {"relative_accuracy": relative_accuracy, "auroc": lambda pos, imp: auroc(imp, pos),
              "absolute_accuracy": absolute_accuracy}


def bootstrap_indices(groups: Sequence, resamples: int, seed: int = 0) -> list[np.ndarray]:
    """Pair indices of `resamples` bootstrap resamples that draw whole groups (e.g. episodes) with replacement."""
    if resamples < 1:
        raise ValueError(f"bootstrap: resamples must be >= 1, got {resamples}")
    _, inverse = np.unique(np.asarray(groups), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    rng = np.random.default_rng([seed, 0xB007])
    return [np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
            for _ in range(resamples)]


def with_interval(metric, possible, impossible, resampled: Sequence[np.ndarray], level: float = 0.95) -> dict:
    """{"value", "low", "high"}: the metric on all pairs and its percentile bootstrap interval over `resampled`."""
    pos, imp = np.asarray(possible, np.float64), np.asarray(impossible, np.float64)
    values = [metric(pos[i], imp[i]) for i in resampled]
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return {"value": metric(pos, imp), "low": float(low), "high": float(high)}


# ---------------------------------------------------------------- paired clips


@dataclasses.dataclass(frozen=True)
class Window:
    """Episode frames start, start + step, ..., start + (length - 1) * step (step: the world model's action block),
    with the event, the first altered frame, at clip frame `at`."""

    start: int
    length: int
    at: int
    step: int = 1

    def __post_init__(self):
        if not 2 <= self.at < self.length:
            raise ValueError(f"event_frame: {self.at} must lie in [2, length={self.length}): two frames before it show "
                             "the motion the event breaks")
        if self.start < 0 or self.step < 1:
            raise ValueError(f"window: start {self.start} must be >= 0 and step {self.step} >= 1")

    @property
    def frames(self) -> np.ndarray:
        return self.start + self.step * np.arange(self.length)


def clip_of(record: dict, window: Window) -> dict:
    """The unaltered clip {"frames" uint8 [L, R, R, 3], "actions" [L, step * A_MAX], "states" [L, S_MAX]}."""
    idx = window.frames
    if idx[-1] >= len(record["frames"]):
        raise ValueError(f"window: frames up to {idx[-1]} pass the episode end ({len(record['frames'])} frames)")
    return {"frames": np.asarray(record["frames"])[idx],
            "actions": action_blocks(record["actions"], idx, window.step),
            "states": np.asarray(record["states"], np.float32)[idx]}


def make_pair(record: dict, kind: str, window: Window, *, jump: int = 8,
              other: dict | None = None) -> tuple[dict, dict]:
    """(possible, impossible) clips of the record's window (see clip_of), identical before clip frame window.at.
    jump: "teleport"'s skip in episode frames; other: the record whose actions "action_mismatch" takes."""
    from jepa import envs
    w, at = window, window.at
    idx = w.frames
    possible = clip_of(record, w)
    impossible = {k: v.copy() for k, v in possible.items()}
    frames, states = np.asarray(record["frames"]), np.asarray(record["states"], np.float32)
    nq, nv = int(record["num_qpos"]), int(record["state_dim"]) - int(record["num_qpos"])
    domain, seed, res = envs.DOMAINS[int(record["domain"])][0], int(record["seed"]), frames.shape[1]
    if kind == "teleport":
        src = idx[at:] + jump
        if src[-1] >= len(frames):
            raise ValueError(f"teleport: frames up to {idx[-1]} plus a jump of {jump} pass the episode end "
                             f"({len(frames)} frames)")
        impossible["frames"][at:], impossible["states"][at:] = frames[src], states[src]
    elif kind == "freeze":
        impossible["frames"][at:] = frames[idx[at - 1]]
        impossible["states"][at:] = states[idx[at - 1]]
        impossible["states"][at:, nq:nq + nv] = 0.0   # the state the picture shows: at rest
    elif kind == "reversal":  # clip frame at - 1 + m shows the episode's frame m steps before clip frame at - 1
        src = idx[at - 1] - w.step * np.arange(1, w.length - at + 1)
        if src[-1] < 0:
            raise ValueError(f"reversal: the window starting at {w.start} has too few frames before it to retrace")
        impossible["frames"][at:], impossible["states"][at:] = frames[src], states[src]
        impossible["states"][at:, nq:nq + nv] *= -1.0
    elif kind == "vanish":
        if domain not in VANISH_GEOMS:
            raise ValueError(f"vanish: no hidden-body list for {domain!r} (have {sorted(VANISH_GEOMS)})")
        possible["frames"] = envs.render_states(domain, seed, states[idx], res)
        impossible["frames"] = possible["frames"].copy()
        impossible["frames"][at:] = envs.render_states(domain, seed, states[idx[at:]], res, VANISH_GEOMS[domain])
    elif kind in PHYSICS_CHANGES:
        before = envs.render_states(domain, seed, states[idx[:at]], res)
        applied = np.asarray(record["actions"])[idx[at - 1]:idx[-1]]  # from the frame before the event to the end
        for clip, change in ((possible, {}), (impossible, PHYSICS_CHANGES[kind])):
            f, s = envs.resimulate(domain, seed, states[idx[at - 1]], applied, res, **change)
            clip["frames"] = np.concatenate([before, f[w.step - 1::w.step]])
            clip["states"] = np.concatenate([states[idx[:at]], s[w.step - 1::w.step]])
    elif kind == "action_mismatch":
        if other is None or int(other["domain"]) != int(record["domain"]) or other["seed"] == record["seed"]:
            raise ValueError("action_mismatch: needs `other`, another episode of the same domain")
        if idx[-1] >= len(other["actions"]):
            raise ValueError(f"action_mismatch: the other episode has {len(other['actions'])} frames, the window "
                             f"needs {idx[-1] + 1}")
        impossible["actions"][at - 1:] = action_blocks(other["actions"], idx[at - 1:], w.step)
    else:
        raise ValueError(f"violation: {kind!r} is not one of {VIOLATIONS}")
    return possible, impossible


def valid_starts(kind: str, frames: int, length: int, at: int, step: int = 1, jump: int = 8) -> np.ndarray:
    """Window starts in an episode of `frames` frames at which `kind` can be built (motion not considered)."""
    last = frames - 1 - step * (length - 1) - (jump if kind == "teleport" else 0)
    first = max(0, step * (length - 2 * at + 1)) if kind == "reversal" else 0
    return np.arange(first, last + 1)


def motion_pixels(keypoints: np.ndarray, window: Window, resolution: int) -> float:
    """Largest image distance in pixels any body's keypoint (jepa.envs.image_keypoints) travels from the frame
    before the event to a later frame of the window."""
    kp = np.asarray(keypoints, np.float64)[window.frames]
    return float(np.max(np.linalg.norm(kp[window.at:] - kp[window.at - 1], axis=-1)) * resolution)


@dataclasses.dataclass(frozen=True)
class PairSpec:
    kind: str
    episode: int
    start: int
    other: int = -1  # action_mismatch: the episode whose actions are taken


def plan_pairs(source, kinds: Sequence[str], pairs: int, length: int, at: int, *, step: int = 1, jump: int = 8,
               min_motion: float = 8.0, seed: int = 0) -> dict[str, list[PairSpec]]:
    """`pairs` windows per kind, cycling over the episodes of `source` that have a qualifying window (each
    episode's windows in a seeded random order). min_motion: pixels the bodies must move for NEEDS_MOTION."""
    from jepa import envs
    episodes = []
    for e in range(len(source)):
        r = source[e]
        episodes.append({"domain": int(r["domain"]), "frames": len(r["frames"]), "states": np.asarray(r["states"]),
                         "num_qpos": int(r["num_qpos"]), "resolution": int(np.asarray(r["frames"]).shape[1])})
    out = {}
    for kind in kinds:
        eligible = []
        for e, ep in enumerate(episodes):
            starts = valid_starts(kind, ep["frames"], length, at, step, jump)
            other = -1
            if kind == "action_mismatch":
                others = [o for o in range(len(episodes)) if o != e and episodes[o]["domain"] == ep["domain"]
                          and episodes[o]["frames"] >= ep["frames"]]
                if not others:
                    continue
                other = next((o for o in others if o > e), others[0])  # the next episode of the domain
            if kind in NEEDS_MOTION and len(starts):
                if "keypoints" not in ep:
                    ep["keypoints"] = envs.image_keypoints(ep["domain"], ep["states"], ep["num_qpos"])
                starts = np.asarray([s for s in starts if motion_pixels(
                    ep["keypoints"], Window(int(s), length, at, step), ep["resolution"]) >= min_motion], int)
            if len(starts):
                rng = np.random.default_rng([seed, VIOLATIONS.index(kind), e])
                eligible.append((e, rng.permutation(starts), other))
        if not eligible:
            raise ValueError(f"{kind}: no window of {length} frames (event at {at}, step {step}) qualifies in the "
                             f"{len(episodes)} episodes" + (f" (bodies moving >= {min_motion} px after the event)"
                                                           if kind in NEEDS_MOTION else ""))
        specs = []
        for p in range(pairs):
            e, starts, other = eligible[p % len(eligible)]
            specs.append(PairSpec(kind, e, int(starts[(p // len(eligible)) % len(starts)]), other))
        out[kind] = specs
    return out


def world_records(config, split: str):
    from jepa.data import sources as sources_lib
    sources = [s for s in config.data.sources.values() if s.kind == "world"]
    if not sources:
        raise ValueError("surprise: the run's config.data.sources has no world dataset source")
    cfg = dict(sources[0].to_dict(), split=split)
    return sources_lib.open_source(cfg)


def calibrate_threshold(model, quantile: float = 0.99, split: str = "validation", max_clips: int = 32,
                        length: int = 8, config=None) -> float:
    """The `quantile` of the planning monitor's per-block surprise over unaltered episodes of the run's `split`
    (of the world dataset of `config`, default the model's own config): each episode's first `length` frames
    taken world_model.action_block steps apart, scored by jepa.planning.monitor_surprise, i.e. under the
    monitor's exact conditions (the planner's context frames and states, its one-step prediction)."""
    from jepa.planning import monitor_surprise
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"plan.surprise_quantile must lie in (0, 1], got {quantile}")
    config = config if config is not None else model.config
    source = world_records(config, split)
    k = model.action_block
    values = []
    for i in range(min(len(source), max_clips)):
        r = source[i]
        n = min(length, (len(r["frames"]) - 1) // k + 1)  # frames k steps apart, with every action between them
        if n < 2:
            continue
        idx = np.arange(n) * k
        values.append(monitor_surprise(model, np.asarray(r["frames"])[idx], np.asarray(r["states"])[idx],
                                       np.asarray(r["actions"])[:(n - 1) * k], int(config.plan.context_frames)))
    if not values:
        raise ValueError(f"surprise calibration: no episode of {split!r} spans two frames "
                         f"world_model.action_block={k} steps apart")
    threshold = float(np.quantile(np.concatenate(values), quantile))
    log.info("surprise threshold %.4f (quantile %.3f of %d blocks on %s)", threshold, quantile,
             sum(len(v) for v in values), split)
    return threshold


def summarize(scores: dict, resamples: int = 1000, seed: int = 0) -> dict:
    """Metrics with bootstrap intervals from per-pair scores {"episode": [P], scorer: {"possible": {aggregate: [P]},
    "impossible": {...}}}: {scorer: {aggregate: {metric: {"value", "low", "high"}}}}. Every scorer and aggregate is
    measured on the same resamples (so their intervals are comparable)."""
    resampled = bootstrap_indices(scores["episode"], resamples, seed)
    return {name: {agg: {m: with_interval(METRIC_FNS[m], per["possible"][agg], per["impossible"][agg], resampled)
                         for m in METRICS} for agg in AGGREGATES}
            for name, per in scores.items() if name != "episode"}


def pool(per_kind: Sequence[dict]) -> dict:
    """Per-pair scores of several kinds (summarize's layout) concatenated, for a tier's row."""
    out = {"episode": np.concatenate([k["episode"] for k in per_kind])}
    for name in per_kind[0]:
        if name != "episode":
            out[name] = {side: {agg: np.concatenate([k[name][side][agg] for k in per_kind]) for agg in AGGREGATES}
                         for side in ("possible", "impossible")}
    return out


def markdown_table(result: dict) -> str:
    """The benchmark's result as a Markdown table: a row per tier, kind and scorer."""
    names = {"relative_accuracy": "rel. acc.", "auroc": "AUROC", "absolute_accuracy": "abs. acc."}
    head = ["tier", "violation", "pairs", "scorer"] + [f"{names[m]} ({agg})" for m in METRICS for agg in AGGREGATES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cell = lambda v: f"{v['value']:.2f} ({v['low']:.2f}-{v['high']:.2f})"
    for tier, kinds in TIERS.items():
        rows = [(tier, "all", result["tiers"][tier])] if tier in result["tiers"] else []
        rows += [(tier, k, result["kinds"][k]) for k in kinds if k in result["kinds"]]
        for t, kind, entry in rows:
            for name, per in entry["scores"].items():
                values = [cell(per[agg][m]) for m in METRICS for agg in AGGREGATES]
                lines.append("| " + " | ".join([t, kind, str(entry["pairs"]), name, *values]) + " |")
    return "\n".join(lines) + "\n"


def benchmark(workdir: str, *, video_workdir: str = "", split: str = "test", pairs: int = 200, length: int = 8,
              event_frame: int = 0, context: int = 0, horizon: int = 2, jump: int = 8,
              kinds: Sequence[str] = VIOLATIONS, resamples: int = 1000, seed: int = 0, output: str = "", config=None,
              progress: bool = False) -> dict:
    """The paired violation benchmark (module docstring) of a world-model run and, with video_workdir, a V-JEPA run.

    event_frame 0: length // 2; context 0: the run's world_model.context_frames; clips take every
    world_model.action_block-th frame, as the model was trained. config: the world model run's config with changes
    (its world data; default the run's own). output: writes surprise_benchmark.json and .md there. `progress`: a
    bar over the pairs."""
    from tqdm.auto import tqdm

    from jepa.planning import WorldModel
    unknown = [k for k in kinds if k not in VIOLATIONS]
    if unknown or not kinds:
        raise ValueError(f"kinds: {list(kinds)} must list some of {', '.join(VIOLATIONS)}")
    if pairs < 1:
        raise ValueError(f"pairs: must be >= 1, got {pairs}")
    begin = time.perf_counter()
    model = WorldModel.load(workdir)
    video = VideoPredictor(video_workdir) if video_workdir else None
    step = int(model.config.world_model.action_block)
    context = context or int(model.config.world_model.context_frames)
    at = event_frame or length // 2
    Window(0, length, at, step)  # checks the event frame
    if length < context + horizon:
        raise ValueError(f"length: {length} frames do not hold context {context} + horizon {horizon}")
    if video is not None and length < int(video.config.data.num_frames):
        raise ValueError(f"length: {length} frames, the video predictor (--video_workdir={video_workdir}) needs at "
                         f"least its config.data.num_frames={video.config.data.num_frames}")
    scorer = ClipScorer(model, video, context, horizon)
    source = world_records(config if config is not None else model.config, split)
    patch = int(model.config.model.encoder.patch_size)
    plan = plan_pairs(source, kinds, pairs, length, at, step=step, jump=jump, min_motion=patch, seed=seed)
    records = collections.OrderedDict()  # a few decoded episodes: pairs run episode by episode

    def record(e: int) -> dict:
        if e not in records:
            records[e] = source[e]
            if len(records) > 4:
                records.popitem(last=False)
        records.move_to_end(e)
        return records[e]

    names = [n for n in SCORERS if n != "video" or video is not None]
    scores = {}
    bar = tqdm(total=sum(len(v) for v in plan.values()), desc=f"surprise: {len(kinds)} violations x {pairs} pairs, "
               f"{', '.join(names)} on {split}", unit="pair", file=sys.stderr, disable=not progress)
    for kind, specs in plan.items():
        per = {"episode": [], **{n: {s: {a: [] for a in AGGREGATES} for s in ("possible", "impossible")}
                                 for n in names}}
        for spec in sorted(specs, key=lambda s: (s.episode, s.start)):
            other = record(spec.other) if spec.other >= 0 else None
            pair = make_pair(record(spec.episode), kind, Window(spec.start, length, at, step), jump=jump, other=other)
            per["episode"].append(spec.episode)
            for side, clip in zip(("possible", "impossible"), pair):
                for n, series in scorer(clip).items():
                    per[n][side]["mean"].append(float(np.mean(series)))
                    per[n][side]["max"].append(float(np.max(series)))
            bar.update(1)
        scores[kind] = {k: (np.asarray(v) if k == "episode" else {s: {a: np.asarray(x) for a, x in d.items()}
                                                                     for s, d in v.items()})
                        for k, v in per.items()}
    bar.close()
    result = {"protocol": {"split": split, "pairs": pairs, "length": length, "event_frame": at, "context": context,
                           "horizon": horizon, "jump": jump, "action_block": step, "min_motion_pixels": patch,
                           "possible_quantile": POSSIBLE_QUANTILE, "bootstrap_resamples": resamples, "seed": seed,
                           "workdir": workdir, "video_workdir": video_workdir},
              "kinds": {}, "tiers": {}}
    for kind, per in scores.items():
        result["kinds"][kind] = {"tier": next(t for t, ks in TIERS.items() if kind in ks), "pairs": len(per["episode"]),
                                 "episodes": len(np.unique(per["episode"])), "scores": summarize(per, resamples, seed)}
    for tier, members in TIERS.items():
        present = [scores[k] for k in members if k in scores]
        if present:
            pooled = pool(present)
            result["tiers"][tier] = {"kinds": [k for k in members if k in scores], "pairs": len(pooled["episode"]),
                                     "scores": summarize(pooled, resamples, seed)}
    result["pair_scores"] = {kind: {k: (v.tolist() if k == "episode" else
                                        {s: {a: x.tolist() for a, x in d.items()} for s, d in v.items()})
                                    for k, v in per.items()} for kind, per in scores.items()}
    result["seconds"] = time.perf_counter() - begin
    if output:
        workdir_lib.write_json(workdir_lib.path(output) / "surprise_benchmark.json", result)
        (workdir_lib.path(output) / "surprise_benchmark.md").write_text(markdown_table(result))
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m jepa.surprise benchmark --workdir=RUN [--flags] [--config.FIELD=VALUE ...]` (argv: the arguments
    after the program name); returns the result."""
    from absl import flags

    from jepa import cli
    with cli.flag_scope():
        workdir, config = cli.define_run_config(argv, "a world-model run (configs/world_model.py)")
        video = flags.DEFINE_string("video_workdir", "", "a V-JEPA pretraining run (its predictor is scored too)")
        split = flags.DEFINE_string("split", "test", "world dataset split the episodes come from")
        pairs = flags.DEFINE_integer("pairs", 200, "pairs (impossible clip + unaltered twin) per violation",
                                     lower_bound=1)
        length = flags.DEFINE_integer("length", 8, "frames per clip (every world_model.action_block-th frame)",
                                      lower_bound=3)
        event = flags.DEFINE_integer("event_frame", 0, "clip frame of the event, the first altered one (0: length/2)",
                                     lower_bound=0)
        context = flags.DEFINE_integer("context", 0, "observed frames per window (0: world_model.context_frames)",
                                       lower_bound=0)
        horizon = flags.DEFINE_integer("horizon", 2, "frames rolled out open-loop per window", lower_bound=1)
        jump = flags.DEFINE_integer("jump", 8, "teleport: episode frames skipped", lower_bound=1)
        kinds = flags.DEFINE_list("kinds", list(VIOLATIONS), "violations, a comma list of " + ", ".join(VIOLATIONS))
        resamples = flags.DEFINE_integer("bootstrap", 1000, "bootstrap resamples for the 95% intervals", lower_bound=1)
        seed = flags.DEFINE_integer("seed", 0, "seed of the windows and the bootstrap")
        output = flags.DEFINE_string("output", "", "write surprise_benchmark.json and surprise_benchmark.md here")
        cli.parse(argv, commands=("benchmark",), command_required=True, required=("workdir",))
        if not kinds.value or any(k not in VIOLATIONS for k in kinds.value):
            raise cli.UsageError(f"--kinds: {','.join(kinds.value)!r} must list some of {', '.join(VIOLATIONS)}")
        result = benchmark(workdir.value, video_workdir=video.value, split=split.value, pairs=pairs.value,
                           length=length.value, event_frame=event.value, context=context.value,
                           horizon=horizon.value, jump=jump.value, kinds=kinds.value, resamples=resamples.value,
                           seed=seed.value, output=output.value, config=config.value, progress=True)
    print(markdown_table(result), end="")
    return result


def run() -> None:
    """Entry of `python -m jepa.surprise` and the `jepa-surprise` console script."""
    from jepa import cli
    cli.run(main, __doc__)


if __name__ == "__main__":
    run()
