"""Planning in latent space with a trained action-conditioned world model.

    model = WorldModel.load("runs/wm")                  # frozen encoder + AC predictor of a jepa.train run
    z, goal = model.encode(frame[None]), model.encode(goal_frame[None])[0]
    plan, info = model.plan(z, state[None], goal, low, high, CEMSettings(), key)

`cem` is the cross-entropy method as a pure, jitted function of an energy over action sequences: every
iteration draws all samples at once, scores them in one batched call, and refits a diagonal Gaussian to the best
`elites` (optionally blended with the previous fit by `momentum`); samples are clipped to the action bounds, so
every returned plan lies inside them. The world model's energy is the mean L1 distance between the predicted
representation after the last planned action and the goal image's representation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jepa.envs import A_MAX, S_MAX


@dataclasses.dataclass(frozen=True)
class CEMSettings:
    horizon: int = 2          # actions per sequence
    samples: int = 128        # sequences scored per iteration
    elites: int = 12          # best sequences the Gaussian is refitted to
    iterations: int = 5
    momentum: float = 0.0     # new mean/std = momentum * old + (1 - momentum) * elite fit
    init_std: float = 1.0     # initial std, in units of the half action range
    min_std: float = 0.05     # floor on the std, in units of the half action range

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

    @classmethod
    def from_config(cls, plan_cfg) -> CEMSettings:
        return cls(**{f.name: type(f.default)(plan_cfg[f.name]) for f in dataclasses.fields(cls)})


def cem(energy_fn: Callable[[jax.Array], jax.Array], key: jax.Array, low: jax.Array, high: jax.Array,
        settings: CEMSettings, init_mean: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Minimise energy_fn over action sequences [H, A] inside [low, high] (each [A]).

    energy_fn: [S, H, A] -> [S]. init_mean: optional [H, A] warm start (e.g. the previous plan shifted by one).
    Returns (the final mean, clipped: [H, A], {"best_energy": [iterations], "mean_energy": [iterations]}). Sample
    0 of every iteration is the current mean itself, so a good warm start is never lost to sampling noise."""
    s = settings
    low, high = jnp.asarray(low, jnp.float32), jnp.asarray(high, jnp.float32)
    half = (high - low) / 2
    shape = (s.horizon, low.shape[0])
    mean = jnp.broadcast_to((high + low) / 2, shape) if init_mean is None else jnp.asarray(init_mean, jnp.float32)
    std = jnp.broadcast_to(s.init_std * half, shape)

    def iteration(carry, key):
        mean, std = carry
        noise = jax.random.normal(key, (s.samples, *shape))
        samples = jnp.clip(mean + std * noise, low, high).at[0].set(jnp.clip(mean, low, high))
        energy = energy_fn(samples)
        _, top = jax.lax.top_k(-energy, s.elites)
        elite = samples[top]
        fit_mean, fit_std = elite.mean(0), jnp.maximum(elite.std(0), s.min_std * half)
        mean = s.momentum * mean + (1 - s.momentum) * fit_mean
        std = s.momentum * std + (1 - s.momentum) * fit_std
        return (mean, std), (energy.min(), energy.mean())

    (mean, _), (best, avg) = jax.lax.scan(iteration, (mean, std), jax.random.split(key, s.iterations))
    return jnp.clip(mean, low, high), {"best_energy": best, "mean_energy": avg}


class WorldModel:
    """A trained V-JEPA 2-AC run (frozen encoder + action-conditioned predictor) with jitted encode, predict and
    plan. Actions are zero-padded to the model's A_MAX inputs, states to S_MAX."""

    def __init__(self, config, encoder_params: Any, predictor_params: Any, step: int):
        from jepa import objectives
        self.config, self.step = config, step
        self.objective = objectives.build(config)
        self.encoder_params, self.predictor_params = encoder_params, predictor_params
        obj = self.objective
        self._encode = jax.jit(lambda p, frames: obj.encode_frames(p, frames[None])[0])
        self._predict = jax.jit(lambda p, z, a, s: obj.predict(p, z[None], a[None], s[None])[0][0])
        self._energy = jax.jit(functools.partial(latent_energy, obj))
        self._plans: dict[CEMSettings, Callable] = {}

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

    def predict_next(self, z: jax.Array, actions: np.ndarray, states: np.ndarray | None = None) -> jax.Array:
        """Teacher-forced next-frame predictions: z [K, N, D], actions [K, A] -> [K, N, D] (row t predicts
        frame t + 1 from frames 0..t and actions 0..t)."""
        return self._predict(self.predictor_params, z, pad_actions(actions), pad_states(states, z.shape[0]))

    def energy(self, z: jax.Array, states: np.ndarray | None, goal: jax.Array, actions: np.ndarray,
               past_actions: np.ndarray | None = None) -> jax.Array:
        """Energy [S] of action sequences [S, H, A] from the observed frames z [k, N, D] to goal [N, D];
        past_actions [k - 1, A]: the actions executed between the observed frames (None: zeros)."""
        return self._energy(self.predictor_params, z, pad_states(states, z.shape[0]), goal,
                            jnp.asarray(actions, jnp.float32), self._past(past_actions, z.shape[0]))

    def plan(self, z: jax.Array, states: np.ndarray | None, goal: jax.Array, low: np.ndarray, high: np.ndarray,
             settings: CEMSettings, key: jax.Array, init_mean: np.ndarray | None = None,
             past_actions: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """CEM over [H, len(low)] action sequences from the observed frames z [k, N, D] (the newest last; the
        k - 1 actions executed between them in past_actions) to the goal [N, D]."""
        if settings not in self._plans:
            objective = self.objective

            def plan_fn(predictor_params, z, states, goal, low, high, key, init_mean, past):
                energy = lambda a: latent_energy(objective, predictor_params, z, states, goal, a, past)
                return cem(energy, key, low, high, settings, init_mean)
            self._plans[settings] = jax.jit(plan_fn)
        low, high = np.asarray(low, np.float32), np.asarray(high, np.float32)
        mean = (np.broadcast_to((high + low) / 2, (settings.horizon, low.shape[0]))
                if init_mean is None else np.asarray(init_mean, np.float32))
        plan, info = self._plans[settings](self.predictor_params, z, pad_states(states, z.shape[0]), goal, low, high,
                                           key, mean, self._past(past_actions, z.shape[0]))
        return np.asarray(plan), {k: np.asarray(v) for k, v in info.items()}

    @staticmethod
    def _past(past_actions, k: int) -> jax.Array:
        if past_actions is None:
            return jnp.zeros((k - 1, A_MAX), jnp.float32)
        past = pad_actions(np.asarray(past_actions, np.float32).reshape(-1, np.shape(past_actions)[-1]))
        if past.shape[0] != k - 1:
            raise ValueError(f"past_actions: {past.shape[0]} actions for {k} observed frames, need {k - 1}")
        return past


def latent_energy(objective, predictor_params, z, states, goal, actions, past_actions) -> jax.Array:
    """Mean L1 distance between the representation predicted after each action sequence and the goal's.

    z [k, N, D] observed frames (the newest last), states [k, S_MAX], goal [N, D], actions [S, H, A] planned
    from the newest frame, past_actions [k - 1, A_MAX] executed between the observed frames -> [S]. Several
    observed frames show velocities, which a single frame cannot (see plan.context_frames)."""
    samples = actions.shape[0]
    past = jnp.broadcast_to(past_actions[None], (samples, *past_actions.shape))
    seq = jnp.concatenate([past, pad_actions(actions)], axis=1)
    zs = jnp.broadcast_to(z[None], (samples, *z.shape))
    ss = jnp.broadcast_to(states[None], (samples, *states.shape))
    final = objective.rollout(predictor_params, zs, seq, ss)[:, -1]
    return jnp.mean(jnp.abs(final - goal[None]), axis=(1, 2))


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
