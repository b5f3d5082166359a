"""Planning in latent space with a trained action-conditioned world model.

    model = WorldModel.load("runs/wm")                  # frozen encoder + AC predictor of a jepa.train run
    z, goal = model.encode(frame[None]), model.encode(goal_frame[None])[0]
    plan, info = model.plan(z, state[None], goal, low, high, settings_of(model.config), key)

`cem` is the cross-entropy method as a pure, jitted function of an energy over action sequences: every
iteration draws all samples at once, scores them in one batched call, and refits a diagonal Gaussian to the best
`elites` (optionally blended with the previous fit by `momentum`); samples are clipped to the action bounds, so
every returned plan lies inside them. The world model's energy is the patch-level distance (mean L1 or mean
squared) between the goal image's representation and the predicted representation after the last planned block
(`energy_steps="last"`) or after every block (`"all"`, averaged). An energy may also return each sample's
constraint violation (jepa/constraints.py: rules read from the predicted blocks); `constraint_mode` decides how
the two are ranked.

Action blocks: with world_model.action_block = k one latent step covers k environment steps. Plans and past
actions are environment actions ([H * k, A], [(frames - 1) * k, A]); the model sees each block of k as one
action token (the k actions zero-padded to A_MAX and concatenated in order).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jepa.envs import A_MAX, S_MAX

# plan.energy_steps: which predicted blocks are compared with the goal; plan.energy_norm: the patch-level distance.
ENERGY_STEPS = ("last", "all")
ENERGY_NORMS = ("l1", "l2")
# plan.optimizer: "cem" refits the Gaussian to the elites; "mppi" to all samples weighted by exp(-energy / T).
OPTIMIZERS = ("cem", "mppi")
# plan.block_actions: "hold" searches one action per block, held for its action_block steps (action repeat: a
# search space action_block times smaller); "free" searches every environment action of the block.
BLOCK_ACTIONS = ("hold", "free")
# plan.constraint_mode: how a constraint violation (jepa/constraints.py) enters the energy: "reject" ranks every
# violating sample after every other (the least violating first), "penalty" adds weight x violation, "lagrangian"
# adds lambda x violation + weight / 2 x violation^2 with lambda raised across iterations while the elites violate.
CONSTRAINT_MODES = ("reject", "penalty", "lagrangian")


@dataclasses.dataclass(frozen=True)
class CEMSettings:
    horizon: int = 2          # planned latent steps (blocks of world_model.action_block actions) per sequence
    samples: int = 256        # sequences scored per iteration (all rolled out in one batched call)
    elites: int = 16          # best sequences the Gaussian is refitted to
    iterations: int = 8
    momentum: float = 0.1     # new mean/std = momentum * old + (1 - momentum) * elite fit
    init_std: float = 1.0     # initial std, in units of the half action range
    min_std: float = 0.05     # floor on the std, in units of the half action range
    energy_steps: str = "last"
    energy_norm: str = "l1"
    optimizer: str = "cem"
    temperature: float = 0.5  # mppi: T in units of the iteration's energy std (scale-free across models)
    block_actions: str = "hold"
    constraint_mode: str = "reject"
    constraint_weight: float = 100.0  # penalty weight / augmented-Lagrangian rho, per unit of violation

    def __post_init__(self):
        for name in ("horizon", "samples", "elites", "iterations"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"plan.{name} must be >= 1, got {getattr(self, name)}")
        if self.elites > self.samples:
            raise ValueError(f"plan.elites ({self.elites}) must not exceed plan.samples ({self.samples})")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"plan.momentum must lie in [0, 1), got {self.momentum}")
        if self.init_std <= 0 or self.min_std < 0:
            raise ValueError(f"plan.init_std must be > 0 and plan.min_std >= 0, got {self.init_std}, {self.min_std}")
        if self.energy_steps not in ENERGY_STEPS:
            raise ValueError(f"plan.energy_steps: {self.energy_steps!r} is not one of {', '.join(ENERGY_STEPS)}")
        if self.energy_norm not in ENERGY_NORMS:
            raise ValueError(f"plan.energy_norm: {self.energy_norm!r} is not one of {', '.join(ENERGY_NORMS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"plan.optimizer: {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if not self.temperature > 0:
            raise ValueError(f"plan.temperature must be > 0, got {self.temperature}")
        if self.block_actions not in BLOCK_ACTIONS:
            raise ValueError(f"plan.block_actions: {self.block_actions!r} is not one of {', '.join(BLOCK_ACTIONS)}")
        if self.constraint_mode not in CONSTRAINT_MODES:
            raise ValueError(f"plan.constraint_mode: {self.constraint_mode!r} is not one of "
                             f"{', '.join(CONSTRAINT_MODES)}")
        if not self.constraint_weight > 0:
            raise ValueError(f"plan.constraint_weight must be > 0, got {self.constraint_weight}")

    @classmethod
    def from_config(cls, plan_cfg, action_block: int = 1) -> CEMSettings:
        """From config.plan; plan.horizon 0 becomes the fewest blocks of `action_block` steps that reach
        plan.goal_steps."""
        values = {f.name: type(f.default)(plan_cfg[f.name]) for f in dataclasses.fields(cls)}
        if values["horizon"] == 0:
            values["horizon"] = math.ceil(int(plan_cfg.goal_steps) / int(action_block))
        return cls(**values)


def settings_of(config) -> CEMSettings:
    """A world-model run's planner settings: config.plan with the horizon resolved for its action block."""
    return CEMSettings.from_config(config.plan, int(config.world_model.action_block))


def cem(energy_fn: Callable[[jax.Array], jax.Array], key: jax.Array, low: jax.Array, high: jax.Array,
        settings: CEMSettings, init_mean: jax.Array | None = None, length: int | None = None, block: int = 1
        ) -> tuple[jax.Array, dict]:
    """Minimise energy_fn over action sequences [H, A] inside [low, high] (each [A]) by CEM or, with
    settings.optimizer "mppi", MPPI; H = `length` (default settings.horizon; the world model plans
    horizon * action_block environment actions).

    energy_fn: [S, H, A] -> [S], or -> ([S] energy, [S] constraint violation >= 0), combined as
    settings.constraint_mode says; a constrained search returns the final mean unless it violates and a sample
    seen violated less, then that sample. init_mean: optional [H, A] warm start (e.g. the previous plan shifted
    by one). Returns (the plan, clipped: [H, A], {"best_energy": [iterations], "mean_energy": [iterations],
    "best_violation": [iterations], "violation": the plan's}). Sample 0 of every iteration is the current mean
    itself, so a good warm start is never lost to sampling noise. block: the steps of one latent block; with
    settings.block_actions "hold" one action per block is searched and held for its steps (energy_fn and the
    returned plan still see every step)."""
    s = settings
    hold = int(block) if s.block_actions == "hold" else 1
    if hold > 1:
        steps = int(length or s.horizon)
        if steps % hold:
            raise ValueError(f"cem: {steps} steps are not whole blocks of {hold}")
        plan, info = cem(lambda a: energy_fn(jnp.repeat(a, hold, axis=1)), key, low, high, settings,
                         None if init_mean is None else jnp.asarray(init_mean)[::hold], steps // hold)
        return jnp.repeat(plan, hold, axis=0), info
    low, high = jnp.asarray(low, jnp.float32), jnp.asarray(high, jnp.float32)
    half = (high - low) / 2
    shape = (int(length or s.horizon), low.shape[0])
    mean = jnp.broadcast_to((high + low) / 2, shape) if init_mean is None else jnp.asarray(init_mean, jnp.float32)
    std = jnp.broadcast_to(s.init_std * half, shape)
    constrained = isinstance(jax.eval_shape(energy_fn, jax.ShapeDtypeStruct((1, *shape), jnp.float32)), tuple)

    def evaluate(samples, lam):
        """(the objective ranked on, energy, violation) of samples [S, H, A]."""
        out = energy_fn(samples)
        if not constrained:
            return out, out, jnp.zeros_like(out)
        energy, violation = out[0], jnp.maximum(out[1], 0.0)
        if s.constraint_mode == "reject":  # every violator after the worst feasible sample, by violation
            objective = jnp.where(violation > 0, energy.max() + 1.0 + violation, energy)
        elif s.constraint_mode == "penalty":
            objective = energy + s.constraint_weight * violation
        else:
            objective = energy + lam * violation + 0.5 * s.constraint_weight * jnp.square(violation)
        return objective, energy, violation

    def iteration(carry, key):
        mean, std, lam, best = carry
        noise = jax.random.normal(key, (s.samples, *shape))
        samples = jnp.clip(mean + std * noise, low, high).at[0].set(jnp.clip(mean, low, high))
        objective, energy, violation = evaluate(samples, lam)
        if s.optimizer == "mppi":
            scale = s.temperature * jnp.maximum(jnp.std(objective), 1e-12)
            w = jax.nn.softmax(-(objective - objective.min()) / scale)
            fit_violation = jnp.sum(w * violation)
            w = w[:, None, None]
            fit_mean = jnp.sum(w * samples, axis=0)
            fit_std = jnp.sqrt(jnp.sum(w * jnp.square(samples - fit_mean), axis=0))
        else:
            _, top = jax.lax.top_k(-objective, s.elites)
            elite = samples[top]
            fit_mean, fit_std, fit_violation = elite.mean(0), elite.std(0), violation[top].mean()
        fit_std = jnp.maximum(fit_std, s.min_std * half)
        mean = s.momentum * mean + (1 - s.momentum) * fit_mean
        std = s.momentum * std + (1 - s.momentum) * fit_std
        if s.constraint_mode == "lagrangian":  # dual ascent on the elites' violation
            lam = lam + s.constraint_weight * fit_violation
        # The least violating sample, the lowest energy among equals: the fallback plan and the reported best.
        i = jnp.argmin(jnp.where(violation == violation.min(), energy, jnp.inf))
        better = (violation[i] < best[1]) | ((violation[i] == best[1]) & (energy[i] < best[2]))
        best = jax.tree.map(lambda new, old: jnp.where(better, new, old), (samples[i], violation[i], energy[i]), best)
        return (mean, std, lam, best), (energy[i], energy.mean(), violation[i])

    best = (jnp.clip(mean, low, high), jnp.float32(jnp.inf), jnp.float32(jnp.inf))
    (mean, _, _, best), (best_energy, avg, best_violation) = jax.lax.scan(
        iteration, (mean, std, jnp.float32(0.0), best), jax.random.split(key, s.iterations))
    plan = jnp.clip(mean, low, high)
    violation = jnp.float32(0.0)
    if constrained:  # the final mean is new: check it, and fall back on the best sample if that violates less
        violation = evaluate(plan[None], 0.0)[2][0]
        fallback = best[1] < violation
        plan, violation = jnp.where(fallback, best[0], plan), jnp.where(fallback, best[1], violation)
    return plan, {"best_energy": best_energy, "mean_energy": avg, "best_violation": best_violation,
                  "violation": violation}


class WorldModel:
    """A trained V-JEPA 2-AC run (frozen encoder + action-conditioned predictor) with jitted encode, predict and
    plan. Actions are environment actions, zero-padded to A_MAX and grouped into the model's blocks of
    `action_block`; states are zero-padded to S_MAX."""

    def __init__(self, config, encoder_params: Any, predictor_params: Any, step: int):
        from jepa import objectives
        self.config, self.step = config, step
        self.objective = objectives.build(config)
        self.action_block = int(config.world_model.action_block)
        self.context_frames = int(config.world_model.context_frames)
        self.encoder_params, self.predictor_params = encoder_params, predictor_params
        obj = self.objective
        self._encode = jax.jit(lambda p, frames: obj.encode_frames(p, frames[None])[0])
        self._predict = jax.jit(lambda p, z, a, s: obj.predict(p, z[None], a[None], s[None])[0][0])
        self._energy = jax.jit(functools.partial(latent_energy, obj), static_argnames=("steps", "norm"))
        self._plans: dict[tuple[CEMSettings, int, Callable | None], Callable] = {}

    @classmethod
    def load(cls, workdir: str, step: int | None = None) -> WorldModel:
        from jepa import config as config_lib
        from jepa import runs
        config = runs.load_config(workdir)
        if config.objective != "ac":
            raise ValueError(f"--workdir={workdir}: not a world-model run (config.objective is "
                             f"{config.objective!r}; train one with configs/world_model.py)")
        config_lib.validate(config)
        state, step = runs.load_state_parts(workdir, ["ema", "params/predictor"], step)
        return cls(config, state["ema"], state["params"]["predictor"], step)

    # ---- representations ----
    def encode(self, frames: np.ndarray) -> jax.Array:
        """uint8 [K, H, W, 3] -> [K, N, D] layer-normalised frame representations."""
        return self._encode(self.encoder_params, jnp.asarray(frames, jnp.uint8))

    def blocks(self, actions) -> jax.Array:
        """Environment actions [..., n * action_block, A] -> action tokens [..., n, action_block * A_MAX]; action
        tokens (the world dataset's clips, jepa.data.clips) pass through unchanged."""
        a = jnp.asarray(actions, jnp.float32)
        if self.action_block > 1 and a.shape[-1] == self.action_block * A_MAX:
            return a
        return pad_blocks(a, self.action_block)

    def predict_next(self, z: jax.Array, actions: np.ndarray, states: np.ndarray | None = None) -> jax.Array:
        """Teacher-forced next-frame predictions: z [K, N, D], actions [K * action_block, A] (block t: the actions
        after frame t; or the tokens [K, action_block * A_MAX]), states [K, S] or None (zeros) -> [K, N, D] (row t
        predicts frame t + 1 from frames 0..t and blocks 0..t)."""
        return self._predict(self.predictor_params, z, self.blocks(actions), pad_states(states, z.shape[0]))

    def next_prediction(self, z: jax.Array, states: np.ndarray | None, past_actions: np.ndarray | None,
                        block: np.ndarray) -> jax.Array:
        """The planner's one-step prediction [N, D] of the frame after executing `block` [action_block, A] from the
        observed frames z [k, N, D] (states [k, S] or None; past_actions [(k - 1) * action_block, A] executed
        between them): the first step of the planner's rollout, which the surprise monitor compares with the
        observed frame."""
        block = np.asarray(block, np.float32).reshape(self.action_block, -1)
        seq = block
        if z.shape[0] > 1:
            if past_actions is None:
                raise ValueError(f"past_actions: needed for {z.shape[0]} observed frames")
            seq = np.concatenate([np.asarray(past_actions, np.float32).reshape(-1, block.shape[-1]), block])
        return self.predict_next(z, seq, states)[-1]

    def energy(self, z: jax.Array, states: np.ndarray | None, goal: jax.Array, actions: np.ndarray,
               past_actions: np.ndarray | None = None, settings: CEMSettings | None = None) -> jax.Array:
        """Energy [S] of action sequences [S, H * action_block, A] from the observed frames z [k, N, D] to goal
        [N, D]; past_actions [(k - 1) * action_block, A]: executed between the observed frames (None: zeros)."""
        s = settings or CEMSettings()
        return self._energy(self.predictor_params, z, pad_states(states, z.shape[0]), goal,
                            self.blocks(actions), self._past(past_actions, z.shape[0]), steps=s.energy_steps,
                            norm=s.energy_norm)

    def plan(self, z: jax.Array, states: np.ndarray | None, goal: jax.Array, low: np.ndarray, high: np.ndarray,
             settings: CEMSettings, key: jax.Array, init_mean: np.ndarray | None = None,
             past_actions: np.ndarray | None = None, check: Callable | None = None,
             check_values: Any = None) -> tuple[np.ndarray, dict]:
        """CEM over [H * action_block, len(low)] environment action sequences from the observed frames z [k, N, D]
        (the newest last; their states [k, S] or None; the (k - 1) * action_block actions executed between them in
        past_actions) to the goal [N, D]. Every iteration rolls all samples out in one jitted call.

        check: an optional constraint, check(check_values, z, predicted [S, H, N, D], actions [S, H * block, A],
        last executed action [A]) -> violation [S] >= 0 (jepa.constraints), combined with the energy as
        settings.constraint_mode says. It is compiled once per check object: pass what changes between calls
        (e.g. a keep-out disc's centre) in check_values."""
        length = settings.horizon * self.action_block
        if (settings, z.shape[0], check) not in self._plans:
            objective, block = self.objective, self.action_block

            def plan_fn(predictor_params, z, states, goal, low, high, key, init_mean, past, values):
                # The last executed environment action: the end of the newest past block (zeros before any).
                last = (past[-1].reshape(block, A_MAX)[-1, :low.shape[0]] if past.shape[0]
                        else jnp.zeros(low.shape, jnp.float32))

                def energy(a):
                    e, predicted = latent_energy(objective, predictor_params, z, states, goal, pad_blocks(a, block),
                                                 past, steps=settings.energy_steps, norm=settings.energy_norm,
                                                 with_predictions=True)
                    return e if check is None else (e, check(values, z, predicted, a, last))
                return cem(energy, key, low, high, settings, init_mean, length, block)
            self._plans[settings, z.shape[0], check] = jax.jit(plan_fn)
        low, high = np.asarray(low, np.float32), np.asarray(high, np.float32)
        mean = (np.broadcast_to((high + low) / 2, (length, low.shape[0]))
                if init_mean is None else np.asarray(init_mean, np.float32))
        if mean.shape != (length, low.shape[0]):
            raise ValueError(f"init_mean: shape {mean.shape}, the plan is {(length, low.shape[0])} (horizon "
                             f"{settings.horizon} x action_block {self.action_block} steps)")
        plan, info = self._plans[settings, z.shape[0], check](
            self.predictor_params, z, pad_states(states, z.shape[0]), goal, low, high, key, mean,
            self._past(past_actions, z.shape[0]), check_values)
        return np.asarray(plan), {k: np.asarray(v) for k, v in info.items()}

    def _past(self, past_actions, k: int) -> jax.Array:
        width = self.action_block * A_MAX
        if past_actions is None or k == 1:
            return jnp.zeros((k - 1, width), jnp.float32)
        a = np.asarray(past_actions, np.float32)
        a = a.reshape(-1, a.shape[-1])
        if a.shape[0] != (k - 1) * self.action_block:
            raise ValueError(f"past_actions: {a.shape[0]} actions for {k} observed frames, need (k - 1) x "
                             f"action_block = {(k - 1) * self.action_block}")
        return self.blocks(a)


def monitor_surprise(model: WorldModel, frames: np.ndarray, states: np.ndarray, actions: np.ndarray,
                     context_frames: int = 0) -> np.ndarray:
    """Per-block surprise [B] of an episode exactly as the planning loop's monitor computes it: frames
    [B + 1, H, W, 3] and states [B + 1, S] observed action_block steps apart, actions [B * action_block, A] (block
    b between frames b and b + 1). Block b's prediction is WorldModel.next_prediction from the latest
    `context_frames` (0: the model's) frames up to b; surprise = mean |prediction - observed frame b + 1|."""
    c = int(context_frames) or model.context_frames
    k = model.action_block
    z = model.encode(np.asarray(frames))
    a = np.asarray(actions, np.float32)
    if a.shape[0] != (z.shape[0] - 1) * k:
        raise ValueError(f"actions: {a.shape[0]} for {z.shape[0]} frames, need (frames - 1) x action_block = "
                         f"{(z.shape[0] - 1) * k}")
    out = []
    for b in range(z.shape[0] - 1):
        first = max(0, b - c + 1)
        past = a[first * k:b * k] if b > first else None
        predicted = model.next_prediction(z[first:b + 1], np.asarray(states)[first:b + 1], past,
                                          a[b * k:(b + 1) * k])
        out.append(float(jnp.mean(jnp.abs(predicted - z[b + 1]))))
    return np.asarray(out)


def latent_energy(objective, predictor_params, z, states, goal, actions, past_actions, *, steps: str = "last",
                  norm: str = "l1", with_predictions: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Patch-level distance between the goal's representation and the predictions after each action sequence.

    z [k, N, D] observed frames (the newest last), states [k, S_MAX], goal [N, D], actions [S, H, W] action tokens
    planned from the newest frame, past_actions [k - 1, W] tokens executed between the observed frames -> [S].
    steps "last": the prediction after the last block; "all": the mean over every block's prediction. norm "l1":
    mean |.|; "l2": mean square. Several observed frames show velocities, which a single frame cannot.
    with_predictions: also return every block's predicted representation [S, H, N, D] (constraints read them)."""
    samples, k = actions.shape[0], z.shape[0]
    # The observed frames before the newest, with the blocks executed between them, are the same for every
    # sample: the predictor encodes them once (batch 1) and each sample's rollout starts at the newest frame.
    context = (objective.observe(predictor_params, z[None, :k - 1], past_actions[None], states[None, :k - 1])
               if k > 1 else None)
    zs = jnp.broadcast_to(z[None, k - 1:], (samples, 1, *z.shape[1:]))
    ss = jnp.broadcast_to(states[None, k - 1:], (samples, 1, states.shape[-1]))
    rolled = objective.rollout(predictor_params, zs, actions, ss, context)         # [S, H, N, D]
    predicted = rolled[:, -1:] if steps == "last" else rolled
    diff = predicted - goal[None, None]
    per = jnp.abs(diff) if norm == "l1" else jnp.square(diff)
    energy = jnp.mean(per, axis=(1, 2, 3))
    return (energy, rolled) if with_predictions else energy


def pad_blocks(actions, block: int) -> jax.Array:
    """Environment actions [..., n * block, A] -> action tokens [..., n, block * A_MAX]: each action zero-padded
    to A_MAX, each block of `block` consecutive actions concatenated in order."""
    a = pad_actions(actions)
    if a.shape[-2] % block:
        raise ValueError(f"actions: {a.shape[-2]} steps are not whole blocks of world_model.action_block={block}")
    return a.reshape(*a.shape[:-2], a.shape[-2] // block, block * A_MAX)


def pad_actions(actions) -> jax.Array:
    """[..., A] -> [..., A_MAX] float32 (zeros after the domain's own action dimensions)."""
    a = jnp.asarray(actions, jnp.float32)
    if a.shape[-1] > A_MAX:
        raise ValueError(f"actions: {a.shape[-1]} dimensions, the world model takes at most {A_MAX}")
    return jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, A_MAX - a.shape[-1])])


def pad_states(states, k: int) -> jax.Array:
    """States [k, S] zero-padded to S_MAX, or zeros when None (models trained with state_source="none")."""
    if states is None:
        return jnp.zeros((k, S_MAX), jnp.float32)
    s = jnp.asarray(states, jnp.float32)
    return jnp.pad(s, [(0, 0)] * (s.ndim - 1) + [(0, S_MAX - s.shape[-1])])
