"""Optimisation pieces for V-JEPA 2 pretraining: schedules, AdamW with a decay mask, EMA and gradient accumulation.

Everything is configured from `config.optim` (see `default_optim_config()` for the fields and the published V-JEPA 2
values). Schedules are plain functions of the (0-based) optimiser step, so they can be evaluated inside `jax.jit`;
the value at step t is the one applied by the t-th update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("warmup_constant", "warmup_constant_cooldown", "cosine", "cooldown")


def default_optim_config() -> ml_collections.ConfigDict:
    """`config.optim` defaults: the published V-JEPA 2 main phase (AdamW, 12k warmup 1e-4 -> 5.25e-4, constant)."""
    return ml_collections.ConfigDict(dict(
        lr=5.25e-4, start_lr=1e-4, final_lr=0.0, warmup_steps=12000, schedule="warmup_constant",
        cooldown_steps=12000, weight_decay=0.04, final_weight_decay=0.04, b1=0.9, b2=0.999, eps=1e-8,
        grad_clip=0.0, ema_momentum=0.99925, final_ema_momentum=0.99925, grad_accum_steps=1))


def _check(cfg, total_steps: int) -> None:
    if int(total_steps) <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule: {cfg.schedule!r} is not one of {', '.join(SCHEDULES)}")
    if cfg.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.schedule != "warmup_constant" and cfg.warmup_steps > total_steps:
        raise ValueError(f"optim.warmup_steps={cfg.warmup_steps} exceeds total_steps={total_steps}")
    if cfg.schedule == "warmup_constant_cooldown":
        if cfg.cooldown_steps <= 0:
            raise ValueError(f"optim.cooldown_steps must be > 0 for warmup_constant_cooldown, got "
                             f"{cfg.cooldown_steps}")
        if total_steps - cfg.cooldown_steps < cfg.warmup_steps:
            raise ValueError(f"optim.cooldown_steps={cfg.cooldown_steps} overlaps the warmup: warmup_steps="
                             f"{cfg.warmup_steps} + cooldown_steps must be <= total_steps={total_steps}")


def _linear(step, start_value, end_value, begin, length):
    """Linear from start_value at `begin` to end_value at `begin + length`, clamped outside."""
    frac = jnp.clip((step - begin) / max(length, 1), 0.0, 1.0)
    return start_value + (end_value - start_value) * frac


def lr_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Learning rate per step.

    warmup_constant: linear start_lr -> lr over warmup_steps, then constant (V-JEPA 2 main phase).
    warmup_constant_cooldown: the same, then linear lr -> final_lr over the last cooldown_steps of total_steps.
    cooldown: linear lr -> final_lr from the end of the (usually zero) warmup to total_steps (the separate
      V-JEPA 2 cool-down phase, started from a pretrained run).
    cosine: warmup, then cosine lr -> final_lr reaching final_lr at total_steps.
    After total_steps the last value is held.
    """
    c = optim_cfg
    _check(c, total_steps)
    w, total = int(c.warmup_steps), int(total_steps)
    lr, start, final = float(c.lr), float(c.start_lr), float(c.final_lr)
    kind = c.schedule
    cd_start = total - int(c.cooldown_steps)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = _linear(step, start, lr, 0, w) if w > 0 else jnp.full_like(step, lr)
        if kind == "warmup_constant":
            after = jnp.full_like(step, lr)
        elif kind == "warmup_constant_cooldown":
            after = _linear(step, lr, final, cd_start, total - cd_start)
        elif kind == "cooldown":
            after = _linear(step, lr, final, w, total - w)
        else:  # cosine
            frac = jnp.clip((step - w) / max(total - w, 1), 0.0, 1.0)
            after = final + 0.5 * (lr - final) * (1.0 + jnp.cos(math.pi * frac))
        return jnp.where(step < w, warm, after)

    return schedule


def _ramp_schedule(start: float, final: float, total_steps: int, ramp) -> optax.Schedule:
    """Constant `start` when `final` equals it, else ramp(step as float32)."""
    if int(total_steps) <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        return jnp.full_like(step, start) if start == final else ramp(step)

    return schedule


def weight_decay_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Constant weight_decay when final_weight_decay equals it, else a cosine ramp weight_decay -> final_weight_decay
    over total_steps (the V-JEPA 1 CosineWDSchedule)."""
    wd, final = float(optim_cfg.weight_decay), float(optim_cfg.final_weight_decay)
    return _ramp_schedule(wd, final, total_steps, lambda step: final + 0.5 * (wd - final) * (
        1.0 + jnp.cos(math.pi * jnp.clip(step / total_steps, 0.0, 1.0))))


def ema_momentum_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """EMA momentum: constant ema_momentum (V-JEPA 2), or a linear ramp to final_ema_momentum over total_steps
    (V-JEPA 1 ramped 0.998 -> 1.0)."""
    m0, m1 = float(optim_cfg.ema_momentum), float(optim_cfg.final_ema_momentum)
    return _ramp_schedule(m0, m1, total_steps, lambda step: _linear(step, m0, m1, 0, int(total_steps)))


def _path_names(path) -> list[str]:
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            names.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            names.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            names.append(str(k.idx))
        else:
            names.append(str(k))
    while names and names[-1] in ("value", "raw_value"):  # flax NNX Variable wrappers
        names.pop()
    return names


def decay_mask(params, no_decay_names: tuple[str, ...] = ()) -> Any:
    """Pytree of bools (same structure as params): True where weight decay applies.

    As in the V-JEPA reference: no decay on biases and LayerNorm scales (leaf name contains "bias" or ends in
    "scale": the scanned blocks stack them into [depth, width] arrays, so ndim alone cannot tell) and on every
    other parameter with ndim <= 1. Mask tokens and other >= 2-D embeddings ARE decayed, like the reference's
    (1, 1, D) mask-token parameters; pass e.g. no_decay_names=("mask_token",) to exclude leaves whose path
    contains one of these substrings. Works on nested dicts and on flax NNX `State`s.
    """
    def keep(path, leaf):
        names = _path_names(path)
        leaf_name = names[-1] if names else ""
        full = "/".join(names)
        if "bias" in leaf_name or leaf_name.endswith("scale") or jnp.ndim(leaf) <= 1:
            return False
        return not any(s in full for s in no_decay_names)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim_cfg, total_steps: int) -> optax.GradientTransformation:
    """AdamW with scheduled lr AND scheduled weight decay (decoupled, multiplied by lr as in torch AdamW), the
    decay mask, and global-norm clipping first when grad_clip > 0.

    Always `optax.chain(clip-or-identity, inject_hyperparams(adamw))`, so `current_hparams(opt_state)` can read
    the lr and wd used by the latest update (before any update: the step-0 values).
    """
    c = optim_cfg
    if c.grad_clip < 0:
        raise ValueError(f"optim.grad_clip must be >= 0 (0 = off), got {c.grad_clip}")
    clip = optax.clip_by_global_norm(float(c.grad_clip)) if c.grad_clip > 0 else optax.identity()
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask", "b1", "b2", "eps"))(
        learning_rate=lr_schedule(c, total_steps),
        weight_decay=weight_decay_schedule(c, total_steps),
        b1=float(c.b1), b2=float(c.b2), eps=float(c.eps), mask=decay_mask)
    return optax.chain(clip, adamw)


def _find_hparams(state):
    if hasattr(state, "hyperparams") and isinstance(state.hyperparams, dict):
        return state.hyperparams
    if isinstance(state, (tuple, list)):
        for s in state:
            found = _find_hparams(s)
            if found is not None:
                return found
    return None


def current_hparams(opt_state) -> dict[str, jax.Array]:
    """{"lr", "wd"} used by the most recent update (jit-friendly: just reads the optimiser state)."""
    hp = _find_hparams(opt_state)
    if hp is None:
        raise ValueError("opt_state holds no injected hyperparameters; build it with jepa.optim.make_optimizer")
    return {"lr": hp["learning_rate"], "wd": hp["weight_decay"]}


def ema_update(ema_params, params, momentum):
    """ema <- m * ema + (1 - m) * params, leaf by leaf; momentum may be a traced scalar. Keeps ema dtypes."""
    m = jnp.asarray(momentum, jnp.float32)
    return jax.tree.map(
        lambda e, p: (m * e.astype(jnp.float32) + (1.0 - m) * p.astype(jnp.float32)).astype(e.dtype),
        ema_params, params)


LossAndGrad = Callable[[Any, Any, jax.Array], tuple[tuple[jax.Array, dict], Any]]


def accumulate_gradients(loss_and_grad_fn: LossAndGrad, params, batch, num_micro: int, rng: jax.Array):
    """Average ((loss, aux), grads) over num_micro micro-batches with a `lax.scan` (memory of one micro-batch).

    loss_and_grad_fn(params, micro_batch, rng) -> ((loss, aux_dict), grads). Micro-batch i holds rows
    i, i + num_micro, i + 2 * num_micro, ... of every batch leaf (strided, so a batch sharded over devices along
    its leading dim gives every device an equal share of each micro-batch), and gets rng fold_in(rng, i).
    Loss, aux values and grads are means over micro-batches (exact for per-example means; aux statistics such as
    an effective rank become means of per-micro-batch values). num_micro == 1 calls the function directly.
    """
    num_micro = int(num_micro)
    if num_micro < 1:
        raise ValueError(f"num_micro (optim.grad_accum_steps) must be >= 1, got {num_micro}")
    if num_micro == 1:
        return loss_and_grad_fn(params, batch, rng)

    def split(path, x):
        x = jnp.asarray(x)
        name = "/".join(_path_names(path)) or "batch"
        if x.ndim == 0 or x.shape[0] % num_micro:
            raise ValueError(f"batch[{name!r}] with shape {x.shape}: leading dim is not divisible by "
                             f"num_micro (optim.grad_accum_steps)={num_micro}")
        x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    micro = jax.tree_util.tree_map_with_path(split, batch)
    first = jax.tree.map(lambda x: x[0], micro)
    out_shape = jax.eval_shape(loss_and_grad_fn, params, first, rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), out_shape)

    def body(acc, xs):
        i, mb = xs
        out = loss_and_grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(lambda a, o: a + o.astype(a.dtype), acc, out), None

    total, _ = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro))
    return jax.tree.map(lambda t, s: (t / num_micro).astype(s.dtype), total, out_shape)
