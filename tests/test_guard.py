"""The gate and the consequence checks (jepa/guard.py): decisions at the threshold extremes, calibration to a target
coverage, faults injected into a running environment, an inverted actuator named by a trained tiny world model,
and the benchmark through its command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, child_error, local_config

from jepa import guard, plan, planning


@pytest.fixture
def wm_config(world_dir, jax_cache):
    return local_config(world_dir, jax_cache, name="world_model")


def untrained(config, seeds=(0,)):
    """World models of the tiny config on one random encoder, a predictor per seed (no training: fast)."""
    from jepa import config as config_lib
    from jepa import objectives
    config_lib.validate(config)
    obj = objectives.build(config)
    _, encoder = obj.init(jax.random.PRNGKey(0), config)
    return [planning.WorldModel(config, encoder, obj.init(jax.random.PRNGKey(s), config)[0]["predictor"], 0)
            for s in seeds]


SETTINGS = planning.CEMSettings(horizon=2, samples=8, elites=2, iterations=1)


def episode(model, g, seed=3, steps=4, shift=None, policy="cem", domain="reacher"):
    from jepa.envs import make_env
    env = make_env(domain, seed, 64)
    try:
        return plan.run_episode(model, env, seed, policy=policy, settings=SETTINGS, episode_steps=steps,
                                goal_steps=2, guard=g, shift=shift)
    finally:
        if shift is not None:
            shift.undo()
        env.close()


# ---------------------------------------------------------------- the gate


def test_zero_thresholds_never_act_and_infinite_ones_always_act(wm_config):
    models = untrained(wm_config, seeds=(0, 1, 2))
    ensemble = guard.Ensemble(models, ["a", "b", "c"])
    settings = guard.GuardSettings(hold_limit=2)
    never = episode(models[0], guard.Guard(models[0], ensemble=ensemble, settings=settings,
                                           thresholds=guard.Thresholds.constant(0.0)), policy="random")
    decisions = [r["decision"] for r in never["guard"]]
    assert decisions == ["hold", "stop"] and never["stopped"] == 1
    assert not np.any(never["actions"])              # only the hold's zero block was executed
    assert "disagreement" in never["guard"][0]["reason"] and ">= 0" in never["guard"][0]["reason"]
    always = episode(models[0], guard.Guard(models[0], ensemble=ensemble, settings=settings), policy="random")
    assert [r["decision"] for r in always["guard"]] == ["act"] * 4 and always["stopped"] is None
    for r in always["guard"]:
        assert r["signals"]["disagreement"] > 0 and r["signals"]["violation"] is None
        assert r["reason"] == "every signal below its threshold" and "consequence" in r
    assert np.any(always["actions"])


def test_a_hold_executes_the_safe_block_and_replans(wm_config):
    """Only the surprise signal refuses (threshold just above 0): the first block (no surprise yet) is acted on,
    every later one held, and the hold limit stops the episode."""
    model = untrained(wm_config)[0]
    g = guard.Guard(model, settings=guard.GuardSettings(hold_limit=2), thresholds=guard.Thresholds(surprise=1e-9))
    e = episode(model, g, steps=5)
    assert [r["decision"] for r in e["guard"]] == ["act", "hold", "stop"] and e["stopped"] == 2
    assert np.any(e["actions"][0]) and not np.any(e["actions"][1])
    assert e["fresh_plans"] == [True, False, True]    # the hold dropped the warm start: block 2 is planned afresh
    assert e["guard"][1]["reason"].startswith("surprise ")


def test_a_watching_gate_records_but_never_refuses(wm_config):
    model = untrained(wm_config)[0]
    e = episode(model, guard.Guard(model, thresholds=guard.Thresholds.constant(0.0), enforce=False),
                policy="random")
    assert [r["decision"] for r in e["guard"]] == ["hold", "hold", "stop", "stop"]
    assert e["stopped"] is None and len(e["actions"]) == 4 and not any(r["enforced"] for r in e["guard"])


def test_predicted_violation_from_the_constraint_readout_can_refuse(wm_config):
    """The violation signal: jepa.constraints' probability for the episode's rule through a readout fitted on the
    run's latents; a threshold at 0 holds with the reason named."""
    from jepa import constraints
    wm_config.plan.update(episode_steps=3, samples=8, elites=2, iterations=1)
    model = untrained(wm_config)[0]
    heads, _ = constraints.fit_readout(model, wm_config, max_rows=200)
    rules = guard.EpisodeRules(model, "reacher", int(wm_config.plan.goal_steps), heads["reacher"])
    seeds = constraints.benchmark_seeds("reacher", 1, int(wm_config.plan.goal_steps), 64, first=2000)
    g = guard.Guard(model, settings=guard.GuardSettings(hold_limit=2), thresholds=guard.Thresholds(violation=0.0))
    (e,) = guard.run_guarded(g, model, "reacher", seeds, wm_config, rules=rules)
    assert [r["decision"] for r in e["guard"]] == ["hold", "stop"]
    assert e["guard"][0]["reason"].startswith("violation ") and 0.0 <= e["guard"][0]["signals"]["violation"] <= 1.0
    assert len(e["violation"]) == 1                      # the hold's step, measured on the true state


def test_calibration_acts_on_the_target_coverage():
    rng = np.random.default_rng(0)
    nominal = {"disagreement": rng.gamma(2.0, 1.0, 2000), "surprise": rng.normal(1.0, 0.2, 2000)}
    for coverage in (0.5, 0.9, 0.95, 1.0):
        thr, q = guard.coverage_thresholds(nominal, coverage)
        got = guard.acted(nominal, thr).mean()
        assert coverage <= got <= coverage + 0.01, (coverage, got)
        fresh = {"disagreement": rng.gamma(2.0, 1.0, 4000), "surprise": rng.normal(1.0, 0.2, 4000)}
        assert abs(guard.acted(fresh, thr).mean() - coverage) < 0.02     # holds on new nominal blocks too
    assert guard.acted(nominal, guard.coverage_thresholds(nominal, 1.0)[0]).all()
    assert not guard.acted(nominal, {"disagreement": 0.0, "surprise": 0.0}).any()
    assert guard.acted(nominal, {"disagreement": math.inf, "surprise": math.inf}).all()
    with pytest.raises(ValueError, match="non-finite"):
        guard.coverage_thresholds({"surprise": np.array([1.0, np.nan])}, 0.9)


def test_bad_guard_config_fails_before_work_naming_the_field(wm_config, tmp_path):
    from jepa import config as config_lib
    for field, value in [("guard_coverage", 0.0), ("guard_coverage", 1.5), ("guard_hold_limit", 0),
                         ("guard_fault_quantile", 0.0), ("guard_fault_blocks", 0), ("guard_surprise_window", 0),
                         ("guard_calibration_episodes", 0)]:
        c = wm_config.copy_and_resolve_references()
        c.plan[field] = value
        with pytest.raises(config_lib.ConfigError, match=f"config.plan.{field}"):
            config_lib.validate(c)
    # through the command line: one line naming the field, before any model is loaded (the run has no checkpoint)
    (tmp_path / "config.json").write_text(wm_config.to_json_best_effort())
    for module, args in [("jepa.guard", ["benchmark"]), ("jepa.plan", ["--guard"])]:
        proc = run_module(module, *args, f"--workdir={tmp_path}", "--config.plan.guard_coverage=2")
        assert proc.returncode == 2 and "config.plan.guard_coverage: must lie in (0, 1], got 2" in proc.stderr, (
            module, proc.stderr[-2000:])


def test_ensemble_members_must_share_the_encoder(wm_config):
    from jepa import objectives
    a, b = untrained(wm_config, seeds=(0, 1))
    other = objectives.build(wm_config).init(jax.random.PRNGKey(7), wm_config)[1]
    c = planning.WorldModel(wm_config, other, b.predictor_params, 0)
    with pytest.raises(ValueError, match="c's frozen encoder differs from a's"):
        guard.Ensemble([a, b, c], ["a", "b", "c"])
    ens = guard.Ensemble([a, b], ["a", "b"])
    z = a.encode(np.zeros((2, 64, 64, 3), np.uint8))
    block = np.ones((1, 2), np.float32)
    d = ens.disagreement(z, None, np.zeros((1, 2)), block)
    p = [np.asarray(m.next_prediction(z, None, np.zeros((1, 2)), block)) for m in (a, b)]
    np.testing.assert_allclose(d, np.std(np.stack(p), axis=0).mean(), rtol=1e-5)
    assert guard.Ensemble([a, a], ["a", "a2"]).disagreement(z, None, np.zeros((1, 2)), block) == 0.0


# ---------------------------------------------------------------- faults and consequence checks


def test_counterfactuals_name_each_actuator_fault():
    b = np.array([[0.5, -1.0]], np.float32)
    cands = dict(guard.counterfactuals(b))
    np.testing.assert_array_equal(cands["as commanded"], b)
    np.testing.assert_array_equal(cands["actuator 0 inverted"], [[-0.5, -1.0]])
    np.testing.assert_array_equal(cands["actuator 1 dead"], [[0.5, 0.0]])
    np.testing.assert_array_equal(cands["every actuator inverted"], -b)
    assert set(guard.EXPECTED_HYPOTHESIS.values()) <= set(cands)


def test_consequence_check_names_the_counterfactual_the_world_follows(wm_config):
    """Observations that follow the model's own prediction for actuator 0 inverted name that fault once the
    evidence of fault_blocks blocks passes the margin; observations that follow the executed block never do. (A
    tiny world model trained on CPU in test time does not learn action effects, so the world here is the model's
    own counterfactual prediction plus noise.)"""
    model = untrained(wm_config)[0]
    rng = np.random.default_rng(0)
    z = model.encode(rng.integers(0, 255, (8, 64, 64, 3), np.uint8))
    # Each block's evidence is at most 1: a margin of 1.2 needs two blocks that favour the same hypothesis.
    g = guard.Guard(model, settings=guard.GuardSettings(fault_blocks=2), thresholds=guard.Thresholds(fault_margin=1.2))

    def run(world, blocks=5):
        g.reset(0)
        past, scores = np.zeros((1, 2), np.float32), []
        for t in range(blocks):
            block = rng.uniform(-1, 1, (1, 2)).astype(np.float32)
            context = z[t:t + 2]
            seen = np.asarray(model.next_prediction(context, None, past, world(block)))
            seen = seen + 1e-4 * rng.normal(size=seen.shape)  # a tenth of what a block changes in the prediction
            scores.append(g.after(t, context, None, past, block, seen, 0.0)["score"])
            past = block
        return scores

    nominal = run(lambda b: b)
    assert g.fault is None and max(nominal) < 0.1, nominal
    run(lambda b: b * np.array([-1.0, 1.0], np.float32))
    assert g.fault == "actuator 0 inverted" and g.fault_block == 1     # the second block's evidence crosses
    run(lambda b: np.zeros_like(b))
    assert g.fault == "every actuator dead"


@pytest.mark.parametrize("domain", ["reacher", "point_mass"])
def test_injected_faults_change_the_running_episode_and_are_undone(domain):
    """Every fault changes what the next step shows (dynamics or picture) and restoring brings back the nominal
    episode exactly; mass x5 changes point_mass too (its constant mass matrix is recomputed)."""
    from jepa.envs import FAULTS, make_env
    env = make_env(domain, 3, 64)
    a = np.array([1.0, 0.5])

    def steps(kind=None):
        env.reset(3)
        env.step(a)
        shift = guard.Shift(kind, 1) if kind else None
        if shift:
            shift.apply(env)
        obs = env.step(a)
        if shift:
            shift.undo()
        return obs
    try:
        nominal = steps()
        for kind in FAULTS:
            faulty = steps(kind)
            assert (np.abs(faulty["state"] - nominal["state"]).max() > 1e-4
                    or np.abs(faulty["frame"].astype(int) - nominal["frame"]).max() > 0), kind
            again = steps()
            np.testing.assert_array_equal(again["state"], nominal["state"])
            np.testing.assert_array_equal(again["frame"], nominal["frame"])
        with pytest.raises(ValueError, match="fault kind"):
            steps("melt")
    finally:
        env.close()


@pytest.mark.parametrize("domain", ["reacher", "point_mass"])
def test_a_new_obstacle_stops_the_effector_that_passes_freely_without_it(domain):
    """The obstacle fault turns contacts on for its box alone: driven at it, the effector never gets past the box's
    centre (along the line from where the fault began to the box), where the nominal episode passes it."""
    from jepa.envs import OBSTACLE_HALF_SIZE, inject_fault, make_env
    a = np.array([1.0, 0.0])
    env = make_env(domain, 3, 64)

    def furthest(box=None):
        env.reset(3)
        for _ in range(2):
            env.step(a)
        start, restore = env.effector_position(), None
        if box is None:
            restore = inject_fault(env, "obstacle")
            box = env.physics.named.model.geom_pos["fault_obstacle"][:2].copy()
        heading = (box - start) / np.linalg.norm(box - start)
        past = [float((env.step(a) and env.effector_position() - box) @ heading) for _ in range(8)]
        if restore:
            restore()
        return max(past), box
    try:
        blocked, box = furthest()
        free, _ = furthest(box)
    finally:
        env.close()
    assert blocked < 0 and free > OBSTACLE_HALF_SIZE / 2, (blocked, free)


@pytest.mark.parametrize("domain", ["reacher", "point_mass"])
def test_simulator_consequences_name_an_injected_actuator_fault(domain):
    """The oracle check replays each hypothesis in the true simulator: a block executed under an inverted actuator
    is explained by exactly that hypothesis, and a nominal block by none (every hypothesis explains it worse)."""
    from jepa.envs import inject_fault, make_env
    check = guard.SimulatorConsequences(domain)
    block = np.tile(np.array([[0.8, -0.6]], np.float32), (5, 1))
    env = make_env(domain, 3, 64)

    def executed(fault):
        env.reset(3)
        env.step(block[0])
        before = env.state()
        restore = inject_fault(env, fault) if fault else None
        for a in block:
            after = env.step(a)["state"]
        if restore:
            restore()
        return check.check(None, before[None], None, block, None, observed_state=after)
    try:
        faulty, nominal = executed("actuator_inverted"), executed(None)
    finally:
        env.close()
    assert faulty["hypothesis"] == "actuator 0 inverted" and faulty["score"] > 0.9, faulty["score"]
    assert nominal["score"] < 0 and nominal["error"] < 1e-4, (nominal["score"], nominal["error"])


def run_module(module, *args, timeout=900):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------- the benchmark


def test_benchmark_pipeline_on_untrained_models(wm_config, tmp_path):
    """Calibration, watched and guarded episodes with injected faults, the summary, Markdown, decisions JSONL and
    the risk-coverage PNG, in process on untrained models (the figures mean nothing; the plumbing must hold)."""
    models = untrained(wm_config, seeds=(0, 1, 2))
    ensemble = guard.Ensemble(models, ["run", "s1", "s2"])
    c = wm_config
    c.plan.update(episode_steps=4, guard_calibration_episodes=1, samples=8, elites=2, iterations=1)
    result = guard.run_benchmark(models[0], ensemble, domains=["reacher"], episodes=2,
                                 faults=["actuator_inverted"], first_seed=2000, output=str(tmp_path), config=c,
                                 progress=False)
    r = result["domains"]["reacher"]
    assert len(r["seeds"]) == 2 and result["settings"]["fault_block"] == 2 and result["ensemble"] == ["run", "s1", "s2"]
    assert [w["shift"] for w in r["watched"]] == [None, {"kind": "actuator_inverted", "at": 2, "actuator": 0}]
    fault = r["faults"]["actuator_inverted"]
    assert fault["episodes"] == 1 and 0.0 <= fault["auroc_consequence"] <= 1.0
    assert set(r["faults"]) == {"actuator_inverted", "actuator faults", "every fault"}
    assert 0.0 <= r["nominal"]["coverage"] <= 1.0 and r["nominal"]["episodes"] == 1
    curve = r["risk_coverage"]
    assert len(curve["risk"]) == len(curve["coverage"]) == len(curve["quantile"])
    assert np.all(np.diff(curve["coverage"]) >= 0) and all(0.0 <= x <= 1.0 for x in curve["risk"])
    assert math.isfinite(r["thresholds"]["disagreement"]) and math.isfinite(r["thresholds"]["fault_margin"])
    lines = [json.loads(line) for line in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    assert {x["run"] for x in lines} == {"unguarded", "guarded"} and all("reason" in x for x in lines)
    assert "| reacher | actuator_inverted | 1 |" in (tmp_path / "guard_benchmark.md").read_text()
    assert json.loads((tmp_path / "guard_benchmark.json").read_text())["faults"] == ["actuator_inverted"]
    assert (tmp_path / "risk_coverage.png").stat().st_size > 1000


def test_command_lines_answer_helpfull_with_the_guard_flags(capsys):
    """Help before any work: `jepa.guard benchmark` and `jepa.plan` (its --guard and --ensemble flags)."""
    import re
    for main, argv, names in [(guard.main, ["benchmark"], ["ensemble", "faults", "episodes", "output", "config"]),
                              (plan.main, [], ["guard", "ensemble"])]:
        with pytest.raises(SystemExit):
            main([*argv, "--helpfull"])
        out = capsys.readouterr().out
        for name in names:
            assert re.search(rf"--(\[no\])?{name}\b", out), name


@pytest.mark.slow
def test_guard_cli_end_to_end(tmp_path, world_dir, jax_cache, tiny_run):
    """Three tiny world models on one pretrained encoder (seeds 0-2): `jepa.plan --guard` logs every decision with
    its reason, and `jepa.guard benchmark` writes its four outputs."""
    from jepa import train as train_lib
    runs = []
    for seed in range(3):
        c = local_config(world_dir, jax_cache, name="world_model")
        c.encoder_from, c.encoder_weights, c.seed = tiny_run, "pretrained", seed
        runs.append(str(tmp_path / f"wm{seed}"))
        train_lib.train(c, runs[-1])
    fast = ["--config.plan.guard_calibration_episodes=1", "--config.plan.episode_steps=4"]
    out = tmp_path / "plan"
    proc = run_module("jepa.plan", f"--workdir={runs[0]}", "--domain=reacher", "--episodes=1", "--guard",
                      f"--ensemble={runs[1]},{runs[2]}", f"--output={out}", *fast)
    assert proc.returncode == 0, child_error(proc.stderr)
    assert "guard calibrated on 1 nominal reacher episodes" in proc.stderr
    decisions = [json.loads(x) for x in (out / "guard_reacher_cem.jsonl").read_text().splitlines()]
    assert len(decisions) >= 1 and all(d["decision"] in guard.DECISIONS and d["reason"] for d in decisions)
    assert decisions[0]["signals"]["disagreement"] > 0
    bench = tmp_path / "bench"
    proc = run_module("jepa.guard", "benchmark", f"--workdir={runs[0]}", f"--ensemble={runs[1]},{runs[2]}",
                      "--domains=reacher", "--episodes=2", "--faults=actuator_dead", f"--output={bench}", *fast)
    assert proc.returncode == 0, child_error(proc.stderr)
    for name in ("guard_benchmark.json", "guard_benchmark.md", "decisions.jsonl", "risk_coverage.png"):
        assert (bench / name).stat().st_size > 0, name
    assert "| reacher | actuator_dead | 1 |" in proc.stdout
