"""Surprise: how far what happened is from what the model predicted, and a violation-of-expectation benchmark.

    python -m jepa.surprise benchmark --workdir=runs/wm [--video_workdir=runs/quickstart] [--clips=60]

Per-step surprise = mean |predicted - observed| next representation (layer-normalised encoder outputs):
  - action-conditioned predictor (a world-model run): step t predicts frame t + 1 from frames <= t and
    actions <= t (one block-causal pass);
  - video predictor (a V-JEPA pretraining run): tubelet step t' is predicted from the context encoder's tokens of
    steps < t' (the future masked out) and compared with the EMA encoder's tokens of step t'.
Violations are built from the world dataset's held-out episodes (clips of consecutive frames, an event at the
clip's middle frame): "teleport" (the clip jumps ahead `jump` frames in the episode), "freeze" (the picture
stops while actions continue) and "vanish" (the moving body is no longer drawn; frames re-rendered from the
stored physics states). A clip's score is its largest per-step surprise; AUROC separates altered from unaltered
clips (0.5 = chance).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jepa import workdir as workdir_lib

log = logging.getLogger(__name__)

VIOLATIONS = ("teleport", "freeze", "vanish")
# Geoms hidden by "vanish" (rgba alpha 0): the bodies that move.
VANISH_GEOMS = {"reacher": ("arm", "hand", "finger"), "point_mass": ("pointmass",),
                "cartpole": ("cart", "pole_1")}


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


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting half."""
    pos, neg = np.asarray(positive, np.float64), np.asarray(negative, np.float64)
    if not len(pos) or not len(neg):
        raise ValueError("auroc needs at least one positive and one negative score")
    greater = (pos[:, None] > neg[None]).sum()
    ties = (pos[:, None] == neg[None]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


# ---------------------------------------------------------------- violations


def violate(record: dict, kind: str, start: int, length: int, at: int, jump: int = 8) -> np.ndarray:
    """Frames [length, R, R, 3] of the episode window starting at `start`, altered from clip frame `at` on."""
    frames = np.asarray(record["frames"])
    clip = frames[start:start + length].copy()
    if kind == "teleport":
        if start + length + jump > len(frames):
            raise ValueError(f"teleport: window {start}+{length} plus jump {jump} passes the episode end")
        clip[at:] = frames[start + at + jump:start + length + jump]
    elif kind == "freeze":
        clip[at:] = clip[at - 1]
    elif kind == "vanish":
        clip[at:] = render_hidden(record, np.arange(start + at, start + length))
    else:
        raise ValueError(f"violation: {kind!r} is not one of {VIOLATIONS}")
    return clip


_HIDDEN_ENVS: dict = {}


def render_hidden(record: dict, indices: np.ndarray) -> np.ndarray:
    """Frames of the record's physics states at `indices`, re-rendered with the domain's moving bodies hidden."""
    from jepa import envs
    domain = envs.DOMAINS[int(record["domain"])][0]
    if domain not in VANISH_GEOMS:
        raise ValueError(f"vanish: no hidden-body list for {domain!r} (have {sorted(VANISH_GEOMS)})")
    resolution = int(np.asarray(record["frames"]).shape[1])
    key = (domain, resolution)
    if key not in _HIDDEN_ENVS:
        env = envs.make_env(domain, int(record["seed"]), resolution)
        for geom in VANISH_GEOMS[domain]:
            env.physics.named.model.geom_rgba[geom, 3] = 0.0
        _HIDDEN_ENVS[key] = env
    env = _HIDDEN_ENVS[key]
    env.reset(int(record["seed"]))  # the episode's own randomised scene (e.g. reacher's target)
    nq, nv = int(record["num_qpos"]), int(record["state_dim"]) - int(record["num_qpos"])
    out = []
    for i in indices:
        s = np.asarray(record["states"][i], np.float64)
        env.set_state(s[:nq], s[nq:nq + nv])
        out.append(env.render())
    return np.stack(out)


def world_records(config, split: str):
    from jepa.data import pipeline
    sources = [s for s in config.data.sources.values() if s.kind == "world"]
    if not sources:
        raise ValueError("surprise: the run's config.data.sources has no world dataset source")
    cfg = dict(sources[0].to_dict(), split=split)
    return pipeline.open_source(cfg)


def calibrate_threshold(model, quantile: float = 0.99, split: str = "validation", max_clips: int = 32,
                        length: int = 8, config=None) -> float:
    """The `quantile` of per-step world-model surprise over unaltered clips of the run's `split` (of the world
    dataset of `config`, default the model's own config)."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"plan.surprise_quantile must lie in (0, 1], got {quantile}")
    source = world_records(config if config is not None else model.config, split)
    values = []
    for i in range(min(len(source), max_clips)):
        r = source[i]
        n = min(length, len(r["frames"]))
        values.append(ac_surprise(model, np.asarray(r["frames"][:n]), np.asarray(r["actions"][:n])))
    threshold = float(np.quantile(np.concatenate(values), quantile))
    log.info("surprise threshold %.4f (quantile %.3f of %d steps on %s)", threshold, quantile,
             sum(len(v) for v in values), split)
    return threshold


def benchmark(workdir: str, *, video_workdir: str = "", split: str = "test", clips: int = 60, length: int = 8,
              jump: int = 8, kinds: Sequence[str] = VIOLATIONS, output: str = "", config=None,
              progress: bool = False) -> dict:
    """AUROC of clip surprise (max over steps), altered vs unaltered, per violation kind and predictor.
    config: the world model run's config with changes (its world data; default the run's own). `progress`: a bar
    over the clips."""
    from tqdm.auto import tqdm

    from jepa.planning import WorldModel
    model = WorldModel.load(workdir)
    scorers = {"action-conditioned": lambda frames, actions: ac_surprise(model, frames, actions)}
    if video_workdir:
        video = VideoPredictor(video_workdir)
        scorers["video"] = lambda frames, actions: video.surprise(frames)
    source = world_records(config if config is not None else model.config, split)
    at = length // 2
    scores = {name: {"unaltered": [], **{k: [] for k in kinds}} for name in scorers}
    for i in tqdm(range(min(clips, len(source))), desc=f"surprise: {', '.join(scorers)} predictor(s) on {split} "
                  "clips", unit="clip", file=sys.stderr, disable=not progress):
        r = source[i]
        num = len(r["frames"])
        if num < length + jump:
            raise ValueError(f"episodes of {num} frames are too short for clips of {length} plus a jump of {jump}")
        start = int(np.random.default_rng([i, 0x5A]).integers(0, num - length - jump + 1))
        actions = np.asarray(r["actions"][start:start + length])
        variants = {"unaltered": np.asarray(r["frames"][start:start + length])}
        for k in kinds:
            variants[k] = violate(r, k, start, length, at, jump)
        for name, fn in scorers.items():
            for k, frames in variants.items():
                scores[name][k].append(float(np.max(fn(frames, actions))))
    result = {"clips": min(clips, len(source)), "length": length, "event_frame": at, "jump": jump, "auroc": {},
              "mean_score": {}}
    for name, per in scores.items():
        result["auroc"][name] = {k: auroc(per[k], per["unaltered"]) for k in kinds}
        result["mean_score"][name] = {k: float(np.mean(v)) for k, v in per.items()}
    if output:
        workdir_lib.write_json(workdir_lib.path(output) / "surprise_benchmark.json", result)
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m jepa.surprise benchmark --workdir=RUN [--flags] [--config.FIELD=VALUE ...]` (argv: the arguments
    after the program name); returns the result."""
    from absl import flags

    from jepa import cli
    with cli.flag_scope():
        workdir, config = cli.define_run_config(argv, "a world-model run (configs/world_model.py)")
        video = flags.DEFINE_string("video_workdir", "", "a V-JEPA pretraining run (its predictor is scored too)")
        split = flags.DEFINE_string("split", "test", "world dataset split the clips come from")
        clips = flags.DEFINE_integer("clips", 60, "clips (one per episode)", lower_bound=1)
        length = flags.DEFINE_integer("length", 8, "frames per clip", lower_bound=2)
        jump = flags.DEFINE_integer("jump", 8, "teleport: frames skipped", lower_bound=1)
        kinds = flags.DEFINE_list("kinds", list(VIOLATIONS), "violations, a comma list of " + ", ".join(VIOLATIONS))
        output = flags.DEFINE_string("output", "", "write surprise_benchmark.json here")
        cli.parse(argv, commands=("benchmark",), command_required=True, required=("workdir",))
        if not kinds.value or any(k not in VIOLATIONS for k in kinds.value):
            raise cli.UsageError(f"--kinds: {','.join(kinds.value)!r} must list some of {', '.join(VIOLATIONS)}")
        result = benchmark(workdir.value, video_workdir=video.value, split=split.value, clips=clips.value,
                           length=length.value, jump=jump.value, kinds=kinds.value, output=output.value,
                           config=config.value, progress=True)
    print(json.dumps(result["auroc"], indent=1))
    return result


def run() -> None:
    """Entry of `python -m jepa.surprise` and the `jepa-surprise` console script."""
    from jepa import cli
    cli.run(main, __doc__)


if __name__ == "__main__":
    run()
