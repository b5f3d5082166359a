"""The planner's cached rollout and its action parametrisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, local_config

from jepa import config as config_lib
from jepa import objectives, planning
from jepa.envs import A_MAX, S_MAX
from jepa.objectives.vjepa import layer_norm


def _full_recompute_rollout(objective, params, z, actions, states):
    """The rollout as the definition says: every imagined frame re-reads the whole sequence so far."""
    k = z.shape[1]
    for i in range(actions.shape[1] - k + 1):
        z_next, s_next = objective.predict(params, z, actions[:, :k + i], states)
        z = jnp.concatenate([z, z_next[:, -1:]], axis=1)
        states = jnp.concatenate([states, s_next[:, -1:]], axis=1)
    return z[:, k:]


@pytest.mark.parametrize("state_source,action_to_patches", [("none", False), ("physics", True)])
def test_cached_rollout_equals_full_recompute(world_dir, jax_cache, state_source, action_to_patches):
    """The KV-cached rollout (one predictor step per imagined frame) and a cache of the shared observed context
    (batch 1, as the planner uses it) give the predictions of recomputing the whole sequence every step."""
    c = local_config(world_dir, jax_cache, name="world_model")
    c.world_model.update(state_source=state_source, action_to_patches=action_to_patches)
    objective = objectives.build(c)
    params = objective.init(jax.random.PRNGKey(0), c)[0]["predictor"]
    rng = np.random.default_rng(0)
    b, k, horizon = 3, 2, 3
    n = (c.data.resolution // c.model.encoder.patch_size) ** 2
    width = c.world_model.action_block * A_MAX
    z = layer_norm(jnp.asarray(rng.normal(size=(b, k, n, c.model.encoder.width)), jnp.float32))
    actions = jnp.asarray(rng.normal(size=(b, k + horizon - 1, width)), jnp.float32)
    states = jnp.asarray(rng.normal(size=(b, k, S_MAX)), jnp.float32)

    expected = _full_recompute_rollout(objective, params, z, actions, states)
    np.testing.assert_allclose(objective.rollout(params, z, actions, states), expected, atol=2e-5)

    # Shared context: the first k - 1 observed steps are those of row 0 for every row.
    shared = lambda x: jnp.broadcast_to(x[:1, :k - 1], (b, k - 1, *x.shape[2:]))
    z_s, a_s, s_s = (jnp.concatenate([shared(x), x[:, k - 1:]], axis=1) for x in (z, actions, states[:, :k]))
    expected = _full_recompute_rollout(objective, params, z_s, a_s, s_s)
    context = objective.observe(params, z[:1, :k - 1], actions[:1, :k - 1], states[:1, :k - 1])
    got = objective.rollout(params, z_s[:, k - 1:], a_s[:, k - 1:], s_s[:, k - 1:], context)
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_hold_searches_one_action_per_block():
    """block_actions "hold": every block of the plan is one action held for its steps, the energy sees every
    step, and the optimum of a held target is found; "free" plans each step."""
    block, horizon = 4, 2
    target = jnp.asarray([[0.5, -0.3]] * block + [[-0.4, 0.6]] * block)
    seen = []

    def energy(a):
        jax.debug.callback(lambda x: seen.append(np.asarray(x)), a)
        return jnp.sum(jnp.square(a - target[None]), axis=(1, 2))
    settings = planning.CEMSettings(horizon=horizon, samples=128, elites=8, iterations=10, min_std=0.01)
    plan, _ = planning.cem(energy, jax.random.PRNGKey(0), -jnp.ones(2), jnp.ones(2), settings,
                           length=horizon * block, block=block)
    plan = np.asarray(plan)
    assert plan.shape == (horizon * block, 2)
    blocks = plan.reshape(horizon, block, 2)
    assert np.array_equal(blocks, np.repeat(blocks[:, :1], block, axis=1))
    np.testing.assert_allclose(plan, target, atol=0.03)
    samples = seen[0]
    assert samples.shape == (128, horizon * block, 2)
    assert np.array_equal(samples.reshape(128, horizon, block, 2), np.repeat(samples.reshape(
        128, horizon, block, 2)[:, :, :1], block, axis=2))

    free = planning.CEMSettings(horizon=horizon, samples=128, elites=8, iterations=2, block_actions="free")
    plan, _ = planning.cem(energy, jax.random.PRNGKey(0), -jnp.ones(2), jnp.ones(2), free,
                           length=horizon * block, block=block)
    assert not np.array_equal(np.asarray(plan)[0], np.asarray(plan)[1])


def test_block_actions_is_validated():
    with pytest.raises(ValueError, match="plan.block_actions"):
        planning.CEMSettings(block_actions="repeat")
    c = load_config("", "world_model")
    c.plan.block_actions = "repeat"
    with pytest.raises(config_lib.ConfigError, match="plan.block_actions"):
        config_lib.validate(c)


def test_plan_bench_times_a_planning_call(capsys):
    """benchmarks/plan_bench.py runs on the tiny world model and prints the call time, the FLOPs of the cached
    rollout (fewer than re-reading the sequence) and the rate against the matmul peak."""
    import importlib.util
    import os
    import re
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "plan_bench.py")
    spec = importlib.util.spec_from_file_location("plan_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--config=configs/world_model.py:tiny", "--reps=1",
                 "--config.world_model.context_frames=2", "--config.world_model.action_block=2",
                 "--config.data.frame_step=2", "--config.plan.episode_steps=4", "--config.plan.goal_steps=4"])
    out = capsys.readouterr().out
    assert re.search(r"s per environment action", out), out
    cached, full = map(float, re.search(r"([\d.]+) GFLOP with the cached rollout, ([\d.]+) GFLOP", out).groups())
    assert 0 < cached < full
    assert "% of the float32 matmul peak" in out


def test_episode_seeds_refuse_goals_too_close_to_ever_qualify():
    """point_mass moves ~1.5 cm per step: a 1-step goal never lies two success radii away, so the search must stop
    and say which field to raise instead of looping over seeds forever."""
    from jepa.plan import episode_seeds
    with pytest.raises(ValueError, match="plan.goal_steps=1"):
        episode_seeds("point_mass", 1, goal_steps=1, resolution=16)
