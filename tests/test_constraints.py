"""Constraints on predicted outcomes (jepa/constraints.py): declaring and validating them, the violation amounts,
the planner's reject / penalty / augmented-Lagrangian modes, the learned readout, the oracle check, the benchmark."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, local_config

from jepa import config as config_lib
from jepa import constraints as C
from jepa import planning


@pytest.fixture
def wm_config(world_dir, jax_cache):
    return local_config(world_dir, jax_cache, name="world_model")


@pytest.fixture(scope="module")
def model(world_dir, jax_cache):
    """An untrained world model (random encoder and predictor) of the tiny config."""
    from jepa import objectives
    c = local_config(world_dir, jax_cache, name="world_model")
    config_lib.validate(c)
    params, encoder = objectives.build(c).init(jax.random.PRNGKey(0), c)
    return planning.WorldModel(c, encoder, params["predictor"], 0)


# ---------------------------------------------------------------- declaring constraints


def test_parse_constraints():
    rules = C.parse(" keep_out(x=0.1, y=-0.05, r=0.06); joint_band(joint=1,lo=0.5,hi=1.2);action_rate(max=0.5) ;")
    assert [c.kind for c in rules] == ["keep_out", "joint_band", "action_rate"]
    assert rules[0].values == (0.1, -0.05, 0.06) and rules[1].joint == 1 and rules[2].joint == -1
    assert C.parse(";".join(map(str, rules))) == rules
    assert C.parse("") == () and C.parse("  ") == ()
    assert C.structure(rules) == (("keep_out", -1), ("joint_band", 1), ("action_rate", -1))


@pytest.mark.parametrize("text, why", [
    ("keep_out(x=0, y=0)", "missing r"),
    ("keep_out(x=0, y=0, r=-1)", "r must be > 0"),
    ("keep_in(x=0, y=0, r=1)", "unknown kind 'keep_in'"),
    ("keep_out(x=0, y=0, r=1, z=2)", "'z=2' is not one of keep_out's parameters"),
    ("joint_band(joint=1.5, lo=0, hi=1)", "joint must be a qpos index"),
    ("joint_limit(joint=0, lo=1, hi=0)", "lo must be below hi"),
    ("action_rate(max=fast)", "is not a number"),
    ("action_rate(max=nan)", "is not finite"),
    ("action_rate(max=1, max=2)", "max given twice"),
    ("keep_out x=0", "is not KIND(NAME=VALUE, ...)"),
])
def test_bad_constraint_configs_fail_with_the_field_named(wm_config, text, why):
    wm_config.plan.constraints = text
    with pytest.raises(config_lib.ConfigError, match=r"^config\.plan\.constraints: ") as e:
        config_lib.validate(wm_config)
    assert why in str(e.value)


def test_bad_constraint_mode_and_weight_fail_with_the_field_named(wm_config):
    wm_config.plan.constraint_mode = "ignore"
    with pytest.raises(config_lib.ConfigError, match=r"config\.plan\.constraint_mode: 'ignore' is not one of"):
        config_lib.validate(wm_config)
    wm_config.plan.constraint_mode = "penalty"
    wm_config.plan.constraint_weight = 0.0
    with pytest.raises(config_lib.ConfigError, match=r"config\.plan\.constraint_weight: must be > 0"):
        config_lib.validate(wm_config)


def test_bad_constraint_config_fails_before_any_work_on_the_command_line(tmp_path, wm_config):
    """The CLI stops on validation: the workdir has a config and no checkpoint, so any work would fail later."""
    (tmp_path / "config.json").write_text(wm_config.to_json())
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "jepa.plan", f"--workdir={tmp_path}", "--domain=point_mass",
                           "--config.plan.constraints=keep_out(x=0,y=0,r=0)"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "config.plan.constraints: 'keep_out(x=0,y=0,r=0)': r must be > 0" in proc.stderr, proc.stderr[-2000:]
    assert "checkpoint" not in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "jepa.constraints", "benchmark", f"--workdir={tmp_path}",
                          "--domains=cheetah"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--domains: 'cheetah' is not point_mass or reacher" in bad.stderr


def test_constraint_on_a_joint_the_domain_lacks_is_named():
    with pytest.raises(ValueError, match=r"plan\.constraints: joint_band\(joint=2,lo=0,hi=1\): point_mass has "
                                         r"qpos indices 0\.\.1"):
        C.check_domain(C.parse("joint_band(joint=2,lo=0,hi=1)"), "point_mass", 2)


# ---------------------------------------------------------------- violation amounts


def test_step_amounts_of_each_kind():
    rules = C.parse("keep_out(x=0,y=0,r=0.1); joint_band(joint=0,lo=3.0,hi=3.2); joint_limit(joint=1,lo=-1,hi=1);"
                    "action_rate(max=0.5)")
    hinge = np.array([True, False])
    # x, y, q0 (hinge), q1 (slide), one sample, three steps
    path = np.array([[[0.05, 0.0, 3.15 - 2 * np.pi, 0.0], [0.3, 0.0, 0.0, 1.5], [0.0, 0.3, 3.0, -1.2]]])
    actions = np.array([[[0.0], [0.8], [0.1]]])
    amounts = C.step_amounts(C.structure(rules), C.values(rules), path, actions, np.array([0.2]), hinge, np)
    # step 0: 5 cm inside the disc; q0 = 3.15 - 2 pi is, wrapped, 0.05 rad from the band's centre 3.1: 0.05
    # inside it; rate |0 - 0.2| is allowed. Step 1: q1 0.5 past its limit; rate 0.8 is 0.3 too fast.
    # Step 2: q0 = 3.0 is on the band's edge; q1 0.2 past; rate 0.7 is 0.2 too fast.
    np.testing.assert_allclose(amounts, [[0.05 + 0.05, 0.5 + 0.3, 0.2 + 0.2]], atol=1e-6)
    jax_amounts = C.step_amounts(C.structure(rules), tuple(map(jnp.asarray, C.values(rules))),
                                 jnp.asarray(path, jnp.float32), jnp.asarray(actions, jnp.float32),
                                 jnp.asarray([0.2]), hinge)
    np.testing.assert_allclose(np.asarray(jax_amounts), amounts, atol=1e-5)


def test_learned_path_is_checked_between_the_predicted_frames():
    """Two block ends on either side of a keep-out disc: the straight path between them crosses it, so the check
    finds a violation that the block ends alone would miss."""
    head = C.ReadoutHead("point_mass", "mean", np.zeros((1, 2 + 2), np.float32), np.zeros(4, np.float32),
                         np.array([False, False]), np.ones(4, np.float32))
    start = jnp.asarray([-0.2, 0.0, -0.2, 0.0])
    ends = jnp.asarray([[[0.2, 0.0, 0.2, 0.0]]])                                  # one sample, one block
    path = C._interpolate(start, ends, 4, head.hinge)
    np.testing.assert_allclose(np.asarray(path)[0, :, 0], [-0.1, 0.0, 0.1, 0.2], atol=1e-6)
    rules = C.parse("keep_out(x=0,y=0,r=0.05)")
    amounts = C.step_amounts(C.structure(rules), C.values(rules), path, jnp.zeros((1, 4, 2)), jnp.zeros(2),
                             head.hinge)
    assert float(amounts[0, 1]) == pytest.approx(0.05) and float(amounts[0, 3]) == 0.0
    # hinge angles go the short way round: from 3.0 to -3.0 passes pi, not 0
    wrapped = C._interpolate(jnp.asarray([0.0, 0.0, 3.0, 0.0]), jnp.asarray([[[0.0, 0.0, -3.0, 0.0]]]), 2,
                             np.array([True, False]))
    assert abs(float(wrapped[0, 0, 2])) == pytest.approx(np.pi, abs=1e-5)


# ---------------------------------------------------------------- the planner's modes


def _quadratic(target, violation):
    """energy |a - target|^2 and a violation function of the action sequence [S, 1, 1]."""
    def energy(a):
        return jnp.sum(jnp.square(a - target), axis=(1, 2)), violation(a)
    return energy


def test_a_constraint_violated_by_construction_rejects_every_sample():
    """Every sample violates: the energy (lowest at 0.8) decides nothing; the least violating (at -0.5) wins."""
    settings = planning.CEMSettings(horizon=1, samples=64, elites=8, iterations=6, constraint_mode="reject")
    violation = lambda a: 1.0 + jnp.abs(a[:, 0, 0] + 0.5)
    plan, info = planning.cem(_quadratic(0.8, violation), jax.random.PRNGKey(0), -jnp.ones(1), jnp.ones(1),
                              settings)
    assert np.all(info["best_violation"] >= 1.0) and float(info["violation"]) >= 1.0
    assert float(plan[0, 0]) == pytest.approx(-0.5, abs=0.1)


def test_world_model_planner_rejects_every_sample_of_an_impossible_rule(model):
    """A keep-out disc covering the whole arena, through the learned readout: every sample violates."""
    from jepa.envs import make_env
    env = make_env("point_mass", 3, 64)
    try:
        obs = env.reset(3)
    finally:
        env.close()
    rules = C.parse("keep_out(x=0,y=0,r=10)")
    z = model.encode(obs["frame"][None])
    head = C.ReadoutHead("point_mass", "mean", np.zeros((z.shape[-1], 4), np.float32), np.zeros(4, np.float32),
                         np.array([False, False]), np.ones(4, np.float32))
    settings = planning.CEMSettings(horizon=2, samples=8, elites=2, iterations=2)
    check = C.latent_check(head, C.structure(rules), model.action_block)
    _, info = model.plan(z, obs["state"][None], z[0], -np.ones(2), np.ones(2), settings, jax.random.PRNGKey(0),
                         check=check, check_values=C.values(rules))
    assert np.all(info["best_violation"] > 9.0) and float(info["violation"]) > 9.0


@pytest.mark.parametrize("mode, weight, tolerance", [("reject", 1.0, 0.05), ("penalty", 1000.0, 0.05),
                                                     ("lagrangian", 10.0, 0.05)])
def test_constraint_modes_keep_the_plan_feasible(mode, weight, tolerance):
    """Energy lowest at 0.5, the rule a <= 0.2: every mode ends at the boundary, not at the unconstrained 0.5."""
    settings = planning.CEMSettings(horizon=1, samples=128, elites=8, iterations=10, constraint_mode=mode,
                                    constraint_weight=weight)
    violation = lambda a: jnp.maximum(a[:, 0, 0] - 0.2, 0.0)
    plan, info = planning.cem(_quadratic(0.5, violation), jax.random.PRNGKey(1), -jnp.ones(1), jnp.ones(1),
                              settings)
    assert float(plan[0, 0]) == pytest.approx(0.2, abs=tolerance)
    free, _ = planning.cem(lambda a: jnp.sum(jnp.square(a - 0.5), axis=(1, 2)), jax.random.PRNGKey(1),
                           -jnp.ones(1), jnp.ones(1), settings)
    assert float(free[0, 0]) == pytest.approx(0.5, abs=0.05)


def test_constrained_search_falls_back_on_a_feasible_sample_when_the_mean_violates():
    """Feasible only at |a| >= 0.5, energy symmetric: the elites split between both sides and their mean (0)
    violates; the returned plan is the best feasible sample instead."""
    settings = planning.CEMSettings(horizon=1, samples=64, elites=16, iterations=1, momentum=0.0)
    violation = lambda a: jnp.maximum(0.5 - jnp.abs(a[:, 0, 0]), 0.0)
    plan, info = planning.cem(_quadratic(0.0, violation), jax.random.PRNGKey(2), -jnp.ones(1), jnp.ones(1),
                              settings)
    assert abs(float(plan[0, 0])) >= 0.5 and float(info["violation"]) == 0.0


def test_cem_settings_validate_constraint_fields():
    with pytest.raises(ValueError, match="plan.constraint_mode"):
        planning.CEMSettings(constraint_mode="soft")
    with pytest.raises(ValueError, match="plan.constraint_weight"):
        planning.CEMSettings(constraint_weight=-1.0)


# ---------------------------------------------------------------- the oracle check


def test_oracle_constraint_never_lets_the_point_enter_the_disc(model):
    """point_mass, a keep-out disc halfway along the straight line to the goal: CEM on the true simulator drives
    the point through it; with the rule checked on the simulated path, not one step enters it, and the goal is
    still reached."""
    from jepa import plan
    from jepa.envs import make_env
    settings = planning.CEMSettings(horizon=10, samples=64, elites=8, iterations=4)
    seed = C.benchmark_seeds("point_mass", 1, 10, 64, first=1005)[0]
    env = make_env("point_mass", seed, 64)
    try:
        rules = C.episode_rules(env, seed, 10)
        oracle = plan.Oracle(env, settings, model.action_block)
        run = lambda check: plan.run_episode(model, env, seed, policy="oracle", settings=settings, episode_steps=10,
                                             goal_steps=10, oracle=oracle,
                                             constraints=C.EpisodeConstraints(rules, env, check))
        free = run(None)
        kept = run(C.oracle_check(env, C.structure(rules)))
    finally:
        env.close()
    assert rules[0].kind == "keep_out" and free["violating_steps"] > 0
    assert kept["violating_steps"] == 0 and max(kept["violation"]) == 0.0 and kept["reached"]


# ---------------------------------------------------------------- the readout


def test_readout_fit_round_trips_through_save_and_load(tmp_path, model):
    heads, report = C.fit_readout(model, max_rows=40)
    assert set(heads) == {"reacher"}  # the tiny world data: cartpole (no effector) and reacher
    h = heads["reacher"]
    assert list(h.hinge) == [True, True] and h.feature in C.FEATURES
    assert set(report["reacher"]["r2"]) == {"x", "y", "qpos0", "qpos1"} and np.all(h.sigma > 0)
    C.save_readout(str(tmp_path), heads, report)
    loaded = C.load_readout(str(tmp_path))["reacher"]
    for name in ("weight", "bias", "hinge", "sigma"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(h, name))
    assert loaded.feature == h.feature
    z = jax.random.normal(jax.random.PRNGKey(0), (3, 64, model.config.model.encoder.width))
    np.testing.assert_allclose(np.asarray(loaded.physical(z)), np.asarray(h.physical(z)), rtol=1e-6)
    angles = np.asarray(h.physical(z))[:, 2:]
    assert np.all(angles >= -np.pi) and np.all(angles <= np.pi)
    assert json.loads((tmp_path / "readout.json").read_text())["reacher"]["feature"] == h.feature
    with pytest.raises(FileNotFoundError, match="python -m jepa.constraints fit"):
        C.load_readout(str(tmp_path / "elsewhere"))
    # plan.constraints through the run's readout (jepa.plan): a domain it does not cover is named
    config = model.config.copy_and_resolve_references()
    assert C.from_config(str(tmp_path), model, config, "reacher") is None      # no rules: nothing to load
    config.plan.constraints = "joint_band(joint=1,lo=0.2,hi=0.6)"
    assert callable(C.from_config(str(tmp_path), model, config, "reacher"))
    with pytest.raises(ValueError, match="covers reacher, not point_mass"):
        C.from_config(str(tmp_path), model, config, "point_mass")


def test_readout_recovers_a_linear_map():
    """Ridge on features that hold the targets linearly: near-perfect held-out R^2, angles through cos/sin."""
    rng = np.random.default_rng(0)
    path = np.concatenate([rng.uniform(-0.3, 0.3, (300, 2)), rng.uniform(-np.pi, np.pi, (300, 1))], 1)
    hinge = np.array([True])
    raw = C.to_raw(path, hinge)
    x = np.concatenate([raw @ rng.normal(size=(4, 12)), rng.normal(size=(300, 4)) * 1e-3], 1)
    (w, b), = C._ridge(x[:200], raw[:200], [1e-6])
    assert np.all(C._r2(x[200:] @ w + b, raw[200:], hinge) > 0.99)
    np.testing.assert_allclose(C.from_raw(x[200:] @ w + b, hinge, np), path[200:], atol=1e-2)


def test_predicted_violation_is_a_probability(model):
    """A readout that always reads the point at (0.1, 0): inside a disc around it (certain), far outside another
    (impossible), on its edge (even odds)."""
    from jepa.envs import make_env
    env = make_env("point_mass", 3, 64)
    try:
        obs = env.reset(3)
    finally:
        env.close()
    z = model.encode(obs["frame"][None])
    head = C.ReadoutHead("point_mass", "mean", np.zeros((z.shape[-1], 4), np.float32),
                         np.array([0.1, 0.0, 0.1, 0.0], np.float32), np.array([False, False]),
                         np.full(4, 0.01, np.float32))
    plan = np.zeros((2, 2), np.float32)
    p = lambda text: C.predicted_violation(model, head, C.parse(text), z, obs["state"][None], plan)
    assert p("keep_out(x=0.1,y=0,r=0.05)") > 0.99
    assert p("keep_out(x=-0.2,y=0,r=0.05)") < 0.01
    assert p("keep_out(x=0.2,y=0,r=0.1)") == pytest.approx(0.5, abs=0.01)
    assert p("") == 0.0
    assert p("action_rate(max=0.5)") == 0.0
    assert C.predicted_violation(model, head, C.parse("action_rate(max=0.5)"), z, obs["state"][None],
                                 np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)) == 1.0


# ---------------------------------------------------------------- the benchmark


@pytest.mark.slow
def test_constraints_benchmark_end_to_end(tmp_path, model):
    """Reacher (the tiny data has no point_mass): every method's success and violation rates with their Wilson
    intervals, JSON and Markdown."""
    heads, _ = C.fit_readout(model, max_rows=40)
    result = C.benchmark("", domains=["reacher"], episodes=1, output=str(tmp_path), model=model, heads=heads,
                         progress=False, oracle_planner=True)
    methods = result["domains"]["reacher"]["methods"]
    assert set(methods) == set(C.METHODS) | set(C.ORACLE_PLANNER_METHODS)
    assert methods[C.ORACLE_PLANNER_METHODS[1]]["violating_steps"] == 0
    assert methods[C.ORACLE_PLANNER_METHODS[1]]["compared_with"] == C.ORACLE_PLANNER_METHODS[0]
    for m in methods.values():
        for rate in ("success_rate", "reached_rate", "violation_rate"):
            lo, hi = m[f"{rate}_ci95"]
            assert 0.0 <= lo <= m[rate] <= hi <= 1.0
        assert m["violating_steps"] >= 0 and len(m["episodes"]) == 1
    assert methods[C.METHODS[2]]["violating_steps"] == 0  # the true simulator's check holds on every step
    report = json.loads((tmp_path / "constraints_benchmark.json").read_text())
    assert report["domains"]["reacher"]["seeds"] == result["domains"]["reacher"]["seeds"]
    table = (tmp_path / "constraints_benchmark.md").read_text()
    assert "| reacher | constrained, learned readout |" in table and "episodes violating [95% CI]" in table
