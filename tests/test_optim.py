"""Schedules, decay mask, AdamW step, clipping, EMA and gradient accumulation against hand-computed numbers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jepa import optim


def cfg(**kw):
    c = optim.default_optim_config()
    c.update(kw)
    return c


def vals(schedule, steps):
    return [float(schedule(s)) for s in steps]


def test_defaults_are_published_values():
    c = optim.default_optim_config()
    assert (c.lr, c.start_lr, c.warmup_steps, c.schedule) == (5.25e-4, 1e-4, 12000, "warmup_constant")
    assert (c.weight_decay, c.b1, c.b2, c.eps, c.grad_clip, c.ema_momentum) == (0.04, 0.9, 0.999, 1e-8, 0.0, 0.99925)


def test_warmup_constant():
    s = optim.lr_schedule(cfg(lr=1.0, start_lr=0.2, warmup_steps=10), 100)
    np.testing.assert_allclose(vals(s, [0, 5, 10, 50, 99, 100, 1000]), [0.2, 0.6, 1.0, 1.0, 1.0, 1.0, 1.0],
                               rtol=1e-6)


def test_published_warmup_numbers():
    s = optim.lr_schedule(optim.default_optim_config(), 240000)
    np.testing.assert_allclose(vals(s, [0, 6000, 12000, 200000]), [1e-4, 3.125e-4, 5.25e-4, 5.25e-4], rtol=1e-5)


def test_warmup_constant_cooldown():
    # warmup 0..10, constant to 80, linear 1.0 -> 0.1 over steps 80..100
    s = optim.lr_schedule(cfg(lr=1.0, start_lr=0.0, final_lr=0.1, warmup_steps=10, cooldown_steps=20,
                              schedule="warmup_constant_cooldown"), 100)
    np.testing.assert_allclose(vals(s, [0, 5, 10, 50, 80, 90, 95, 100, 200]),
                               [0.0, 0.5, 1.0, 1.0, 1.0, 0.55, 0.325, 0.1, 0.1], rtol=1e-6, atol=1e-7)


def test_cooldown_phase():
    s = optim.lr_schedule(cfg(lr=2.0, final_lr=0.0, warmup_steps=0, schedule="cooldown"), 40)
    np.testing.assert_allclose(vals(s, [0, 10, 20, 30, 40, 50]), [2.0, 1.5, 1.0, 0.5, 0.0, 0.0], atol=1e-7)


def test_cosine():
    s = optim.lr_schedule(cfg(lr=1.0, start_lr=0.0, final_lr=0.0, warmup_steps=10, schedule="cosine"), 110)
    expect = [0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi * 0.25)), 0.5, 0.0, 0.0]
    np.testing.assert_allclose(vals(s, [0, 5, 10, 35, 60, 110, 150]), expect, rtol=1e-5, atol=1e-7)


def test_schedule_is_jittable_and_bad_values_raise():
    s = optim.lr_schedule(cfg(lr=1.0, start_lr=0.0, warmup_steps=10), 100)
    assert float(jax.jit(s)(jnp.int32(5))) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="optim.schedule"):
        optim.lr_schedule(cfg(schedule="linear"), 100)
    with pytest.raises(ValueError, match="cooldown_steps"):
        optim.lr_schedule(cfg(schedule="warmup_constant_cooldown", warmup_steps=50, cooldown_steps=60), 100)
    with pytest.raises(ValueError, match="total_steps"):
        optim.lr_schedule(cfg(), 0)


def test_weight_decay_schedule():
    const = optim.weight_decay_schedule(cfg(weight_decay=0.04, final_weight_decay=0.04), 100)
    np.testing.assert_allclose(vals(const, [0, 50, 100]), [0.04] * 3, rtol=1e-6)
    ramp = optim.weight_decay_schedule(cfg(weight_decay=0.04, final_weight_decay=0.4), 100)
    np.testing.assert_allclose(vals(ramp, [0, 50, 100, 200]), [0.04, 0.22, 0.4, 0.4], rtol=1e-5)
    np.testing.assert_allclose(float(ramp(25)), 0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi / 4)), rtol=1e-5)


def test_ema_momentum_schedule():
    const = optim.ema_momentum_schedule(cfg(), 1000)
    np.testing.assert_allclose(vals(const, [0, 999]), [0.99925] * 2, rtol=1e-7)
    ramp = optim.ema_momentum_schedule(cfg(ema_momentum=0.998, final_ema_momentum=1.0), 1000)
    np.testing.assert_allclose(vals(ramp, [0, 500, 1000, 2000]), [0.998, 0.999, 1.0, 1.0], rtol=1e-7)


def nested_params():
    return {
        "encoder": {"patch_embed": {"kernel": jnp.ones((2, 2, 3, 4)), "bias": jnp.ones((4,))},
                    "blocks": [{"attn": {"qkv": {"kernel": jnp.ones((4, 12)), "bias": jnp.ones((12,))}},
                                "norm1": {"scale": jnp.ones((4,)), "bias": jnp.ones((4,))}}],
                    "pos_bias": jnp.ones((3, 4))},  # a >= 2-D parameter named "bias": still excluded
        "predictor": {"mask_tokens": jnp.ones((2, 4)), "gate": jnp.ones(())},
    }


def test_decay_mask_nested():
    m = optim.decay_mask(nested_params())
    assert m["encoder"]["patch_embed"] == {"kernel": True, "bias": False}
    assert m["encoder"]["blocks"][0]["attn"]["qkv"] == {"kernel": True, "bias": False}
    assert m["encoder"]["blocks"][0]["norm1"] == {"scale": False, "bias": False}
    assert m["encoder"]["pos_bias"] is False
    assert m["predictor"] == {"mask_tokens": True, "gate": False}  # mask tokens decayed, as in the reference
    m2 = optim.decay_mask(nested_params(), no_decay_names=("mask_token",))
    assert m2["predictor"]["mask_tokens"] is False and m2["encoder"]["patch_embed"]["kernel"] is True


def test_decay_mask_on_nnx_state():
    from flax import nnx
    lin = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
    _, state = nnx.split(lin, nnx.Param)
    m = optim.decay_mask(state)
    flat = {tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in p): v
            for p, v in jax.tree_util.tree_flatten_with_path(m)[0]}
    assert flat == {("bias", "value"): False, ("kernel", "value"): True}
    opt = optim.make_optimizer(cfg(warmup_steps=0), 10)
    opt.update(jax.tree.map(jnp.ones_like, state), opt.init(state), state)  # structures agree


def test_adamw_single_step_matches_hand_computation():
    c = cfg(lr=0.1, start_lr=0.1, warmup_steps=0, weight_decay=0.5, final_weight_decay=0.5, b1=0.9, b2=0.999,
            eps=1e-8)
    params = {"w": jnp.array([[1.0, -2.0], [3.0, 0.5]]), "b": jnp.array([1.0, 2.0])}
    grads = {"w": jnp.array([[0.1, -0.2], [0.0, 4.0]]), "b": jnp.array([0.5, -1.0])}
    opt = optim.make_optimizer(c, 100)
    updates, state = opt.update(grads, opt.init(params), params)
    for k, decayed in (("w", True), ("b", False)):
        g, p = np.asarray(grads[k]), np.asarray(params[k])
        m_hat = (0.1 * g) / (1 - 0.9)
        v_hat = (0.001 * g * g) / (1 - 0.999)
        expect = -0.1 * (m_hat / (np.sqrt(v_hat) + 1e-8) + (0.5 * p if decayed else 0.0))
        np.testing.assert_allclose(np.asarray(updates[k]), expect, rtol=1e-5, atol=1e-7)
    hp = optim.current_hparams(state)
    assert float(hp["lr"]) == pytest.approx(0.1) and float(hp["wd"]) == pytest.approx(0.5)


def test_hparams_follow_schedules_inside_jit():
    c = cfg(lr=1.0, start_lr=0.0, warmup_steps=4, weight_decay=0.0, final_weight_decay=1.0)
    params = {"w": jnp.ones((2, 2))}
    opt = optim.make_optimizer(c, 8)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.tree.map(jnp.ones_like, params), state, params)
        return optax_apply(params, updates), state, optim.current_hparams(state)

    seen = []
    for _ in range(5):
        params, state, hp = step(params, state)
        seen.append((float(hp["lr"]), float(hp["wd"])))
    lrs, wds = zip(*seen)
    np.testing.assert_allclose(lrs, [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)
    np.testing.assert_allclose(wds, [0.5 * (1 - math.cos(math.pi * s / 8)) for s in range(5)], atol=1e-6)


def optax_apply(params, updates):
    return jax.tree.map(lambda p, u: p + u, params, updates)


def test_grad_clipping_on_and_off():
    params = {"w": jnp.zeros((2,))}
    grads = {"w": jnp.array([3.0, 4.0])}  # global norm 5
    base = dict(lr=1.0, start_lr=1.0, warmup_steps=0, weight_decay=0.0, final_weight_decay=0.0)
    # One Adam step gives ~sign(g) either way, so check the gradient AdamW received via its first moment.
    clipped = optim.make_optimizer(cfg(grad_clip=1.0, **base), 10)
    unclipped = optim.make_optimizer(cfg(grad_clip=0.0, **base), 10)
    s_c, s_u = clipped.init(params), unclipped.init(params)
    _, s_c = clipped.update(grads, s_c, params)
    _, s_u = unclipped.update(grads, s_u, params)
    adam_c = s_c[1].inner_state[0]
    adam_u = s_u[1].inner_state[0]
    # first moment after one step = (1 - b1) * g_seen
    np.testing.assert_allclose(np.asarray(adam_c.mu["w"]), 0.1 * np.array([0.6, 0.8]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(adam_u.mu["w"]), 0.1 * np.array([3.0, 4.0]), rtol=1e-5)
    with pytest.raises(ValueError, match="grad_clip"):
        optim.make_optimizer(cfg(grad_clip=-1.0), 10)


def test_ema_update_maths():
    ema = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(10.0)}}
    new = {"a": jnp.array([3.0, 0.0]), "b": {"c": jnp.array(0.0)}}
    out = jax.jit(optim.ema_update)(ema, new, jnp.float32(0.9))
    np.testing.assert_allclose(np.asarray(out["a"]), [1.2, 1.8], rtol=1e-6)
    np.testing.assert_allclose(float(out["b"]["c"]), 9.0, rtol=1e-6)
    same = optim.ema_update(ema, new, 1.0)
    np.testing.assert_allclose(np.asarray(same["a"]), [1.0, 2.0])


def _mean_loss_and_grad(params, batch, rng):
    def loss_fn(p):
        pred = batch["x"] @ p["w"] + p["b"]
        err = (pred - batch["y"]) ** 2
        return jnp.mean(err), {"mae": jnp.mean(jnp.abs(pred - batch["y"])), "rng_sum": jnp.sum(
            jax.random.key_data(rng)).astype(jnp.float32)}
    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def test_gradient_accumulation_matches_full_batch():
    k = jax.random.split(jax.random.key(0), 3)
    batch = {"x": jax.random.normal(k[0], (16, 5)), "y": jax.random.normal(k[1], (16, 3))}
    params = {"w": jax.random.normal(k[2], (5, 3)), "b": jnp.zeros((3,))}
    rng = jax.random.key(7)
    (loss1, aux1), g1 = optim.accumulate_gradients(_mean_loss_and_grad, params, batch, 1, rng)
    (loss4, aux4), g4 = jax.jit(optim.accumulate_gradients, static_argnums=(0, 3))(
        _mean_loss_and_grad, params, batch, 4, rng)
    np.testing.assert_allclose(float(loss4), float(loss1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(aux4["mae"]), float(aux1["mae"]), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # a different rng reached the micro-batches: their mean key sum differs from the unfolded key's
    assert float(aux4["rng_sum"]) != float(aux1["rng_sum"])


def test_gradient_accumulation_bad_divisibility_raises():
    batch = {"x": jnp.ones((10, 5)), "y": jnp.ones((10, 3))}
    params = {"w": jnp.ones((5, 3)), "b": jnp.zeros((3,))}
    with pytest.raises(ValueError, match="'x'.*num_micro"):
        optim.accumulate_gradients(_mean_loss_and_grad, params, batch, 4, jax.random.key(0))
