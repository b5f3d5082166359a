"""The action-conditioned world model (V-JEPA 2-AC), CEM planning and surprise: unit tests on the pieces and
behaviour tests through the real CLIs on the tiny world-model config."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, child_error, load_config, local_config
from flax import nnx

from jepa import planning
from jepa.models import ac_predictor, rope
from jepa.models.ac_predictor import ACPredictor


@pytest.fixture
def wm_config(world_dir, jax_cache):
    return local_config(world_dir, jax_cache, name="world_model")


@pytest.fixture(scope="module")
def wm_run(tmp_path_factory, world_dir, jax_cache):
    """A tiny world model trained 120 steps (random frozen encoder) on the tiny world dataset (~25 s)."""
    from jepa import train as train_lib
    c = local_config(world_dir, jax_cache, name="world_model")
    c.train.total_steps = 120
    c.train.checkpoint_every = 120
    c.train.log_every = 10
    c.train.global_batch_size = 8
    c.optim.lr = 3e-3
    workdir = str(tmp_path_factory.mktemp("wm_run"))
    train_lib.train(c, workdir)
    return workdir


def small_predictor(seed=0, **kw):
    args = dict(encoder_width=16, grid_hw=(2, 3), action_dim=3, state_dim=4, width=24, depth=2, heads=2)
    args.update(kw)
    return ACPredictor(**args, rngs=nnx.Rngs(seed))


# ---------------------------------------------------------------- the predictor


def test_block_causal_mask_sees_itself_and_the_past_only():
    m = ac_predictor.block_causal_mask(3, 2)
    step = np.repeat(np.arange(3), 2)
    assert m.shape == (6, 6)
    assert np.array_equal(m, step[:, None] >= step[None, :])
    assert m[0, :2].all() and not m[0, 2:].any() and m[-1].all()


def test_outputs_never_depend_on_later_steps():
    pred = small_predictor()
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(2, 4, 6, 16)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
    s = jnp.asarray(rng.normal(size=(2, 4, 4)), jnp.float32)
    out_z, out_s = pred(z, a, s)
    assert out_z.shape == (2, 4, 6, 16) and out_s.shape == (2, 4, 4)
    # Change everything from step 2 on: steps 0 and 1 must not move; step 2 must.
    z2, a2, s2 = z.at[:, 2:].add(1.0), a.at[:, 2:].add(1.0), s.at[:, 2:].add(1.0)
    new_z, new_s = pred(z2, a2, s2)
    np.testing.assert_array_equal(np.asarray(new_z[:, :2]), np.asarray(out_z[:, :2]))
    np.testing.assert_array_equal(np.asarray(new_s[:, :2]), np.asarray(out_s[:, :2]))
    assert float(jnp.abs(new_z[:, 2] - out_z[:, 2]).max()) > 1e-3
    # The action of step 1 changes the prediction made at step 1 (the next frame), not the one at step 0.
    z3, _ = pred(z, a.at[:, 1].add(1.0), s)
    np.testing.assert_array_equal(np.asarray(z3[:, 0]), np.asarray(out_z[:, 0]))
    assert float(jnp.abs(z3[:, 1] - out_z[:, 1]).max()) > 1e-3


def test_action_and_state_tokens_rotate_in_time_only():
    head_dim, hw = 24, (2, 3)
    cos, sin = ac_predictor.ac_rope_tables(3, hw, head_dim, "reference")
    per_step = 2 + 6
    d = rope.slice_dim(head_dim)
    patch_cos, _ = rope.rope_tables((3, *hw), head_dim, "reference")
    for t in range(3):
        for j in range(2):  # action, state: time slice as the patches of the step, no height/width rotation
            row = t * per_step + j
            np.testing.assert_allclose(cos[row, :d], patch_cos[t * 6, :d], rtol=1e-6)
            np.testing.assert_array_equal(cos[row, d:], 1.0)
            np.testing.assert_array_equal(sin[row, d:], 0.0)
        np.testing.assert_array_equal(cos[t * per_step + 2:(t + 1) * per_step], patch_cos[t * 6:(t + 1) * 6])


def test_predictor_rejects_bad_shapes():
    pred = small_predictor()
    with pytest.raises(ValueError, match="z must be"):
        pred(jnp.zeros((1, 2, 5, 16)), jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 4)))
    with pytest.raises(ValueError, match="actions / states"):
        pred(jnp.zeros((1, 2, 6, 16)), jnp.zeros((1, 2, 2)), jnp.zeros((1, 2, 4)))


# ---------------------------------------------------------------- the objective


def _objective_and_batch(wm_config):
    from jepa import objectives
    wm_config.data.num_frames = 4
    objective = objectives.build(wm_config)
    params, encoder = objective.init(jax.random.PRNGKey(0), wm_config)
    rng = np.random.default_rng(0)
    batch = {"video": jnp.asarray(rng.integers(0, 255, (2, 4, 64, 64, 3)), jnp.uint8),
             "actions": jnp.asarray(rng.uniform(-1, 1, (2, 4, 6)), jnp.float32),
             "states": jnp.asarray(rng.normal(size=(2, 4, 32)), jnp.float32)}
    return objective, params, encoder, batch


def test_losses_on_a_known_answer(wm_config):
    """A predictor whose output projection is zero predicts LayerNorm(0) = 0 everywhere: teacher forcing must then
    cost mean |z_1..z_3| and the rollout mean |z_1..z_R| of the frozen encoder's frame representations."""
    objective, params, encoder, batch = _objective_and_batch(wm_config)
    pred = params["predictor"]
    pred = {**pred, "proj_kernel": jnp.zeros_like(pred["proj_kernel"]), "proj_bias": jnp.zeros_like(pred["proj_bias"])}
    loss, aux = objective.loss({"predictor": pred}, encoder, batch)
    z = objective.encode_frames(encoder, batch["video"])
    np.testing.assert_allclose(float(jnp.mean(jnp.abs(z), axis=-1).mean()), 0.7979, rtol=0.05)  # LN: E|N(0,1)|
    r, c = objective.rollout_steps, objective.context_frames
    assert c == 2  # the rollout starts from two observed frames (velocities), frames c .. c + r - 1 are its targets
    np.testing.assert_allclose(float(aux["loss/teacher_forcing"]), float(jnp.mean(jnp.abs(z[:, 1:]))), rtol=1e-6)
    np.testing.assert_allclose(float(aux["loss/rollout"]), float(jnp.mean(jnp.abs(z[:, c:c + r]))), rtol=1e-6)
    np.testing.assert_allclose(float(loss), float(aux["loss/teacher_forcing"] + aux["loss/rollout"]), rtol=1e-6)


def test_rollout_feeds_back_its_own_predictions(wm_config):
    objective, params, encoder, batch = _objective_and_batch(wm_config)
    p = params["predictor"]
    z = objective.encode_frames(encoder, batch["video"])
    a, s = batch["actions"], batch["states"]
    rolled = objective.rollout(p, z[:, :1], a[:, :3], s[:, :1])
    assert rolled.shape == (2, 3, *z.shape[2:])
    step1, _ = objective.predict(p, z[:, :1], a[:, :1], s[:, :1])
    seq = jnp.concatenate([z[:, :1], step1[:, -1:]], axis=1)
    step2, _ = objective.predict(p, seq, a[:, :2], jnp.zeros((2, 2, 32)))
    np.testing.assert_allclose(np.asarray(rolled[:, 0]), np.asarray(step1[:, 0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(rolled[:, 1]), np.asarray(step2[:, -1]), atol=1e-5)
    # Teacher forcing on observed frames differs from the rollout from step 2 on (it sees the true frame 1).
    tf, _ = objective.predict(p, z[:, :2], a[:, :2], s[:, :2])
    assert float(jnp.abs(tf[:, 1] - rolled[:, 1]).max()) > 1e-4


def test_shuffled_action_diagnostic_is_one_for_a_predictor_that_ignores_actions(wm_config):
    objective, params, encoder, batch = _objective_and_batch(wm_config)
    z = objective.encode_frames(encoder, batch["video"])
    a, s = batch["actions"] * 4.0, batch["states"]
    pred = params["predictor"]
    blind = {**pred, "action_kernel": jnp.zeros_like(pred["action_kernel"])}  # the action token is its bias only
    np.testing.assert_allclose(float(objective.shuffle_ratio(blind, z, a, s)), 1.0, rtol=1e-6)
    direct = dataclasses.replace(objective, action_to_patches=True)             # actions move every patch
    assert float(direct.shuffle_ratio(pred, z, a, s)) > 1.0 + 1e-3
    np.testing.assert_allclose(float(direct.shuffle_ratio(blind, z, a, s)), 1.0, rtol=1e-6)
    _, aux = objective.loss(params, encoder, batch)
    assert "diag/action_shuffle_ratio" in aux and float(aux["diag/action_shuffle_ratio"]) > 0


def test_inverse_dynamics_head_trains_the_predictor_to_keep_the_action(wm_config):
    """world_model.inverse_dynamics_weight > 0: a head infers a_t from (z_t, predicted z_t+1); its loss reaches
    the predictor's parameters (with the encoder frozen, that is its point). Off: no head parameters at all."""
    objective, params, encoder, batch = _objective_and_batch(wm_config)
    assert set(params) == {"predictor"}
    from jepa import objectives
    wm_config.world_model.inverse_dynamics_weight = 0.5
    objective = objectives.build(wm_config)
    params, encoder = objective.init(jax.random.PRNGKey(0), wm_config)
    assert set(params) == {"predictor", "inverse"}

    def inverse_loss(p):
        return objective.loss(p, encoder, batch)[1]["loss/inverse_dynamics"]
    loss, aux = objective.loss(params, encoder, batch)
    total = aux["loss/teacher_forcing"] + aux["loss/rollout"] + 0.5 * aux["loss/inverse_dynamics"]
    np.testing.assert_allclose(float(loss), float(total), rtol=1e-6)
    grads = jax.grad(inverse_loss)(params)
    assert float(jnp.abs(grads["predictor"]["proj_kernel"]).max()) > 0
    assert float(jnp.abs(grads["inverse"]["kernel2"]).max()) > 0


def test_action_embedding_added_to_every_patch_token_of_its_step():
    pred = small_predictor()
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(1, 3, 6, 16)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(1, 3, 3)), jnp.float32)
    s = jnp.zeros((1, 3, 4))
    plain, _ = pred(z, a, s)
    direct, _ = pred(z, a, s, action_to_patches=True)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(pred(z, a, s)[0]))
    assert float(jnp.abs(direct - plain).max()) > 1e-3
    moved, _ = pred(z, a.at[:, 2].add(1.0), s, action_to_patches=True)  # still causal: steps 0, 1 unchanged
    np.testing.assert_array_equal(np.asarray(moved[:, :2]), np.asarray(direct[:, :2]))


def test_world_model_config_fails_fast_without_an_encoder():
    from jepa import config as config_lib
    c = load_config("", name="world_model")
    with pytest.raises(ValueError, match="encoder_from"):
        config_lib.validate(c)
    c.encoder_weights = "random"
    c.world_model.rollout_steps = 3  # 2 context frames + 3 rollout steps > 4 frames
    with pytest.raises(ValueError, match="rollout_steps"):
        config_lib.validate(c)
    c.world_model.rollout_steps = 2
    c.evals = {"knn": dict(every=10)}
    with pytest.raises(ValueError, match="config.evals"):
        config_lib.validate(c)


# ---------------------------------------------------------------- CEM


def test_cem_finds_the_minimum_of_a_quadratic():
    target = jnp.asarray([[0.3, -0.6], [-0.2, 0.5], [0.7, 0.1]])
    energy = lambda a: jnp.sum(jnp.square(a - target[None]), axis=(1, 2))
    settings = planning.CEMSettings(horizon=3, samples=256, elites=16, iterations=12, min_std=0.01)
    best, info = jax.jit(lambda k: planning.cem(energy, k, -jnp.ones(2), jnp.ones(2), settings))(
        jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(best), np.asarray(target), atol=0.03)
    best_energy = np.asarray(info["best_energy"])
    assert best_energy.shape == (12,) and best_energy[-1] < 1e-3 * best_energy[0]


def test_mppi_finds_the_minimum_of_a_quadratic():
    target = jnp.asarray([[0.3, -0.6], [-0.2, 0.5]])
    energy = lambda a: jnp.sum(jnp.square(a - target[None]), axis=(1, 2))
    settings = planning.CEMSettings(horizon=2, samples=256, iterations=12, min_std=0.01, optimizer="mppi",
                                    temperature=0.1)
    best, info = jax.jit(lambda k: planning.cem(energy, k, -jnp.ones(2), jnp.ones(2), settings))(
        jax.random.PRNGKey(0))
    np.testing.assert_allclose(np.asarray(best), np.asarray(target), atol=0.05)
    with pytest.raises(ValueError, match="plan.optimizer"):
        planning.CEMSettings(optimizer="adam")


def test_cem_stays_within_bounds():
    low, high = jnp.asarray([-0.5, 0.0]), jnp.asarray([0.5, 2.0])
    seen = []

    def energy(a):  # minimum outside the box: the answer is the nearest corner
        jax.debug.callback(lambda x: seen.append(np.asarray(x)), a)
        return jnp.sum(jnp.square(a - jnp.asarray([3.0, -3.0])), axis=(1, 2))
    settings = planning.CEMSettings(horizon=2, samples=64, elites=8, iterations=6, init_std=3.0)
    best, _ = planning.cem(energy, jax.random.PRNGKey(1), low, high, settings)
    np.testing.assert_allclose(np.asarray(best), np.broadcast_to([0.5, 0.0], (2, 2)), atol=1e-2)
    samples = np.stack(seen)
    assert samples.shape == (6, 64, 2, 2)
    assert np.all(samples >= np.asarray(low)) and np.all(samples <= np.asarray(high))


def test_cem_settings_validate():
    with pytest.raises(ValueError, match="elites"):
        planning.CEMSettings(samples=4, elites=8)
    with pytest.raises(ValueError, match="momentum"):
        planning.CEMSettings(momentum=1.0)


# ---------------------------------------------------------------- trained tiny world model


def test_train_world_model_on_a_frozen_pretrained_encoder(tmp_path, tiny_run, wm_config):
    """--config.encoder_from: architecture and EMA weights of the pretraining run, frozen through training."""
    from jepa import runs
    from jepa import train as train_lib
    wm_config.encoder_from = tiny_run
    wm_config.encoder_weights = "pretrained"
    wm_config.model.encoder.depth = 5  # replaced by the pretraining run's architecture
    result = train_lib.train(wm_config, str(tmp_path / "wm"))
    assert result.final_step == 6 and all(np.isfinite(result.losses))
    pre_config = runs.load_config(tiny_run)
    pretrained, _ = runs.load_encoder(tiny_run, pre_config)
    model = planning.WorldModel.load(str(tmp_path / "wm"))
    assert model.config.model.encoder.depth == pre_config.model.encoder.depth
    for a, b in zip(jax.tree.leaves(pretrained), jax.tree.leaves(model.encoder_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_train_with_action_blocks_and_two_context_frames(tmp_path, wm_config):
    """The trainer end to end with blocks of 2 actions per latent step (clips of frames 2 steps apart) and the
    rollout loss from 2 observed frames; the saved run plans with the same blocks."""
    from jepa import train as train_lib
    from jepa.envs import A_MAX
    wm_config.world_model.update(action_block=2, context_frames=2, rollout_steps=2)
    wm_config.data.frame_step = 2
    wm_config.plan.episode_steps = 4
    wm_config.train.total_steps = wm_config.train.checkpoint_every = 4
    result = train_lib.train(wm_config, str(tmp_path / "wm"))
    assert result.final_step == 4 and all(np.isfinite(result.losses))
    model = planning.WorldModel.load(str(tmp_path / "wm"))
    assert model.action_block == 2 and model.predictor_params["action_kernel"].shape[0] == 2 * A_MAX
    settings = planning.settings_of(model.config)
    assert settings.horizon == 2  # ceil(goal_steps 3 / 2)
    z = model.encode(np.zeros((2, 64, 64, 3), np.uint8))
    plan, _ = model.plan(z, None, z[0], -np.ones(2), np.ones(2), settings, jax.random.PRNGKey(0),
                         past_actions=np.zeros((2, 2)))
    assert plan.shape == (4, 2)


def test_world_model_loss_decreases(wm_run):
    records = [json.loads(line) for line in open(os.path.join(wm_run, "metrics.jsonl"))]
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert "loss/teacher_forcing" in records[-1] and "loss/rollout" in records[-1]
    assert "ema_momentum" not in records[-1]  # the encoder is frozen: no EMA to report


def test_surprise_is_higher_on_a_teleport(wm_run):
    """Clip windows of every training episode, with and without a teleport (a jump of 6 frames ahead) at frame 4:
    the surprise of the step that predicts frame 4 is higher with the teleport in most windows."""
    from jepa import surprise
    model = planning.WorldModel.load(wm_run)
    source = surprise.world_records(model.config, "train")
    at, length = 4, 8
    gaps = []
    for i in range(len(source)):
        r = source[i]
        for start in (0, 3, 6):
            actions = np.asarray(r["actions"][start:start + length])
            clean = surprise.ac_surprise(model, np.asarray(r["frames"][start:start + length]), actions)
            _, teleport = surprise.make_pair(r, "teleport", surprise.Window(start, length, at), jump=6)
            jumped = surprise.ac_surprise(model, teleport["frames"], actions)
            np.testing.assert_allclose(jumped[:at - 1], clean[:at - 1], rtol=1e-5)  # identical before the event
            gaps.append(jumped[at - 1] - clean[at - 1])
    gaps = np.asarray(gaps)
    assert np.mean(gaps > 0) >= 0.75 and gaps.mean() > 0, gaps


def run_module(module, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_plan_cli_end_to_end(tmp_path, wm_run):
    out = tmp_path / "plan"
    proc = run_module("jepa.plan", f"--workdir={wm_run}", "--domain=reacher", "--episodes=1", "--monitor",
                      f"--output={out}", "--config.plan.episode_steps=4")
    assert proc.returncode == 0, child_error(proc.stderr)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0.0 <= summary["success_rate"] <= 1.0 and summary["plan_seconds_per_action"] > 0
    # --monitor: each episode's outcome in words before the averages; progress names domain, method, episode
    assert re.search(r"^  seed \d+: (success|missed), final distance .* m from .* m, ", proc.stdout, re.M)
    assert "reacher, CEM, world model, episode 1/1 (seed " in proc.stderr
    result = json.loads((out / "plan_reacher_cem.json").read_text())
    assert len(result["episodes"]) == 1
    bad = run_module("jepa.plan", f"--workdir={wm_run}", "--domain=cheetah")
    assert bad.returncode != 0 and "planning tasks are defined for" in bad.stderr


def test_planner_actions_stay_within_bounds(wm_run):
    from jepa import plan
    from jepa.envs import make_env
    model = planning.WorldModel.load(wm_run)
    env = make_env("reacher", 5, 64)
    try:
        episode = plan.run_episode(model, env, 5, settings=planning.CEMSettings(horizon=2, samples=16, elites=4,
                                                                                 iterations=2, init_std=4.0),
                                   episode_steps=3, goal_steps=3, execute_steps=2, context_frames=2)
    finally:
        env.close()
    actions = np.asarray(episode["actions"])
    assert actions.shape == (3, 2)
    assert np.all(actions >= env.action_low) and np.all(actions <= env.action_high)
    assert len(episode["plan_time"]) == 2  # execute_steps=2: re-plan every other step
    assert len(episode["distance"]) == 4 and len(episode["surprise"]) == 3


def test_plan_benchmark_cli_end_to_end(tmp_path, wm_run):
    out = tmp_path / "bench"
    proc = run_module("jepa.plan", "benchmark", f"--workdir={wm_run}", f"--baseline_workdir={wm_run}",
                      "--domains=reacher", "--episodes=2", "--first_seed=2000", f"--output={out}",
                      "--config.plan.episode_steps=2")
    assert proc.returncode == 0, child_error(proc.stderr)
    assert "random actions" in proc.stdout and "nan" not in proc.stdout  # no planning time: "-"
    assert "random-encoder world model " in proc.stderr and "random-init encoder (untrained)" in proc.stderr
    report = json.loads((out / "planning_benchmark.json").read_text())
    reacher = report["domains"]["reacher"]
    assert set(reacher["methods"]) == {"CEM, world model", "CEM, random-encoder world model", "random actions",
                                       "oracle (CEM, true simulator)"}
    assert len(reacher["seeds"]) == 2 and min(reacher["seeds"]) >= 2000 and report["first_seed"] == 2000
    for m in reacher["methods"].values():  # both success kinds with their 95% Wilson intervals
        for rate in ("reached_rate", "success_rate"):
            lo, hi = m[f"{rate}_ci95"]
            assert 0.0 <= lo <= m[rate] <= hi <= 1.0
        assert m["reached_rate"] >= m["success_rate"]
    assert reacher["methods"]["oracle (CEM, true simulator)"]["plan_seconds_per_action"] > 0
    fidelity = reacher["methods"]["CEM, world model"]["energy_fidelity"]
    assert set(fidelity) == {"predicted", "true_frames", "pixels"}
    assert all(-1.0 <= v <= 1.0 for v in fidelity.values())
    assert fidelity["pixels"] > 0.2  # raw pixel distance ranks outcomes by true distance
    table = (out / "planning_benchmark.md").read_text()
    assert "| reacher | oracle (CEM, true simulator) |" in table and "reached [95% CI]" in table
    assert (out / "energy_landscape.png").stat().st_size > 1000


def test_surprise_benchmark_cli_end_to_end(tmp_path, wm_run, tiny_run):
    """The paired violation benchmark: every kind, tier, scorer and metric reported with its interval; the video
    predictor cannot tell actions apart (identical frames: exactly chance)."""
    from jepa import surprise
    out = tmp_path / "surprise"
    proc = run_module("jepa.surprise", "benchmark", f"--workdir={wm_run}", f"--video_workdir={tiny_run}",
                      "--split=train", "--pairs=2", "--length=8", "--jump=4", "--bootstrap=20", f"--output={out}")
    assert proc.returncode == 0, child_error(proc.stderr)
    assert "surprise: 7 violations x 2 pairs" in proc.stderr
    report = json.loads((out / "surprise_benchmark.json").read_text())
    assert set(report["kinds"]) == set(surprise.VIOLATIONS) and set(report["tiers"]) == set(surprise.TIERS)
    assert report["tiers"]["dynamics"]["pairs"] == 10 and report["protocol"]["event_frame"] == 4
    for entry in [*report["kinds"].values(), *report["tiers"].values()]:
        assert set(entry["scores"]) == set(surprise.SCORERS)
        for per in entry["scores"].values():
            for agg in surprise.AGGREGATES:
                for m in surprise.METRICS:
                    v = per[agg][m]
                    assert 0.0 <= v["low"] <= v["high"] <= 1.0 and 0.0 <= v["value"] <= 1.0
    mismatch = report["kinds"]["action_mismatch"]["scores"]
    for name in ("video", "persistence", "pixel difference"):
        assert mismatch[name]["mean"]["relative_accuracy"]["value"] == 0.5
    table = (out / "surprise_benchmark.md").read_text()
    assert table == proc.stdout and "| dynamics | action_mismatch | 2 | video | 0.50 (0.50-0.50) |" in table
    bad = run_module("jepa.surprise", "benchmark", f"--workdir={wm_run}", "--kinds=teleport,melt")
    assert bad.returncode != 0 and "--kinds" in bad.stderr


# ---------------------------------------------------------------- action blocks, context frames, planner, oracle


def fresh_model(wm_config, seed=0, **world_model):
    """An untrained world model (random encoder and predictor) of the tiny config with world_model overrides."""
    from jepa import config as config_lib
    from jepa import objectives
    wm_config.world_model.update(**world_model)
    wm_config.data.frame_step = wm_config.world_model.action_block
    wm_config.plan.episode_steps = 4 * wm_config.world_model.action_block
    config_lib.validate(wm_config)
    params, encoder = objectives.build(wm_config).init(jax.random.PRNGKey(seed), wm_config)
    return planning.WorldModel(wm_config, encoder, params["predictor"], 0)


def test_clips_carry_every_action_of_a_skipped_block_in_order():
    """With frame_step 3, the clip's action t is the 3 actions between kept frames t and t + 1, in order, each
    padded to A_MAX (one of each block was kept before and the rest were lost)."""
    from jepa.config import base_config
    from jepa.data import clips
    from jepa.envs import A_MAX, S_MAX
    c = base_config()
    c.data.num_frames, c.data.frame_step = 3, 3
    maker = clips.ClipMaker(["w"], [[]], clips.clip_settings(c), train=True, world=True, seed=0)
    n = 12
    actions = np.zeros((n, A_MAX), np.float32)
    actions[:, 0], actions[:, 1] = np.arange(n), -np.arange(n)           # two action dimensions
    record = {"frames": np.zeros((n, 4, 4, 3), np.uint8), "actions": actions[:, :2].copy(),
              "states": np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 5), np.float32), "domain": 1}
    out = maker.extras(record, np.array([2, 5, 8]))
    assert out["actions"].shape == (3, 3 * A_MAX) and out["states"].shape == (3, S_MAX)
    blocks = out["actions"].reshape(3, 3, A_MAX)
    np.testing.assert_array_equal(blocks[..., 0], [[2, 3, 4], [5, 6, 7], [8, 9, 10]])
    np.testing.assert_array_equal(blocks[..., 1], -blocks[..., 0])
    assert not blocks[..., 2:].any()
    np.testing.assert_array_equal(out["states"][:, 0], [2, 5, 8])
    # Past the episode end: zeros, never a repeated action.
    tail = maker.extras(record, np.array([9, 11, 11]))["actions"].reshape(3, 3, A_MAX)
    np.testing.assert_array_equal(tail[..., 0], [[9, 10, 11], [11, 0, 0], [11, 0, 0]])


def test_world_model_config_keeps_blocks_horizon_and_context_consistent(wm_config):
    from jepa import config as config_lib
    c = wm_config
    c.world_model.action_block = 2
    with pytest.raises(ValueError, match="config.data.frame_step: 1 must equal world_model.action_block=2"):
        config_lib.validate(c)
    c.data.frame_step = 2
    c.plan.goal_steps, c.plan.horizon = 5, 2           # 2 blocks of 2 steps do not reach 5 steps
    with pytest.raises(ValueError, match="config.plan.horizon"):
        config_lib.validate(c)
    c.plan.horizon = 0                                 # derived: ceil(5 / 2) = 3 blocks
    c.plan.episode_steps = 4
    config_lib.validate(c)
    assert planning.settings_of(c).horizon == 3
    c.plan.context_frames = 1                          # the planner must see as many frames as training used
    with pytest.raises(ValueError, match="config.plan.context_frames"):
        config_lib.validate(c)
    c.plan.context_frames = 0
    c.plan.episode_steps = 5
    with pytest.raises(ValueError, match="config.plan.episode_steps"):
        config_lib.validate(c)
    c.plan.episode_steps = 4
    c.data.target_fps = 4.0
    with pytest.raises(ValueError, match="config.data.target_fps"):
        config_lib.validate(c)


def test_planner_defaults_are_no_weaker_than_the_references():
    from jepa.config import base_config
    s = planning.CEMSettings.from_config(base_config().plan, action_block=5)
    assert s.samples >= 256 and s.iterations >= 8 and s.momentum > 0 and s.horizon == 2  # ceil(10 / 5)
    assert (s.energy_steps, s.energy_norm) == ("last", "l1")


def test_action_blocks_reach_the_predictor_in_order(wm_config):
    from jepa.envs import A_MAX
    model = fresh_model(wm_config, action_block=2, context_frames=1, rollout_steps=2)
    assert model.predictor_params["action_kernel"].shape[0] == 2 * A_MAX
    a = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]], np.float32)
    tokens = np.asarray(model.blocks(a))
    assert tokens.shape == (2, 2 * A_MAX)
    np.testing.assert_array_equal(tokens[0, :2], a[0])
    np.testing.assert_array_equal(tokens[0, A_MAX:A_MAX + 2], a[1])
    np.testing.assert_array_equal(tokens[1, :2], a[2])
    frames = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), np.uint8)
    z = model.encode(frames)
    base = np.asarray(model.predict_next(z, a))
    swapped = np.asarray(model.predict_next(z, a[[1, 0, 2, 3]]))   # the same actions, another order in block 0
    assert np.abs(base[0] - swapped[0]).max() > 1e-4
    np.testing.assert_allclose(base[0], np.asarray(model.predict_next(z[:1], a[:2]))[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.predict_next(z, tokens)), base, atol=1e-6)  # tokens as the data has
    with pytest.raises(ValueError, match="whole blocks"):
        model.predict_next(z, a[:3])


def _episode_model(wm_config, **world_model):
    """A planning-ready untrained model (fast): tiny CEM budget."""
    model = fresh_model(wm_config, **world_model)
    settings = planning.CEMSettings(horizon=2, samples=8, elites=2, iterations=1)
    return model, settings


def test_planner_and_monitor_see_the_observed_physics_state(wm_config):
    """state_source=physics: every planning call and monitor prediction gets the observed states of its context
    frames (not zeros), and the planner's energy depends on them (the rollout carries states forward)."""
    from jepa import plan
    from jepa.envs import make_env
    model, settings = _episode_model(wm_config, state_source="physics", context_frames=2)
    calls = {"plan": [], "predict": []}

    class Recording(planning.WorldModel):
        def plan(self, z, states, *args, **kw):
            calls["plan"].append(None if states is None else np.asarray(states))
            return super().plan(z, states, *args, **kw)

        def next_prediction(self, z, states, *args):
            calls["predict"].append(None if states is None else np.asarray(states))
            return super().next_prediction(z, states, *args)
    model.__class__ = Recording
    env = make_env("reacher", 7, 64)
    try:
        e = plan.run_episode(model, env, 7, settings=settings, episode_steps=3, goal_steps=2, record=True)
    finally:
        env.close()
    observed = e["states"]
    assert len(calls["plan"]) == 3 and len(calls["predict"]) == 3
    for t, (p, q) in enumerate(zip(calls["plan"], calls["predict"])):
        want = observed[max(0, t - 1):t + 1]                 # the latest two observed frames' states
        np.testing.assert_array_equal(p, want)
        np.testing.assert_array_equal(q, want)
        assert np.abs(p).sum() > 0
    z = model.encode(np.asarray(e["frames"][:1]))
    actions = np.zeros((4, 2, 2), np.float32)
    actions[:, :, 0] = np.linspace(-1, 1, 4)[:, None]
    e_true = np.asarray(model.energy(z, observed[:1], z[0], actions))
    e_zero = np.asarray(model.energy(z, None, z[0], actions))
    assert np.abs(e_true - e_zero).max() > 1e-6


def test_flagged_block_replans_from_a_fresh_initialisation(wm_config):
    """execute_steps=1: a flag must still change what happens next. Every block flagged: each plan starts from
    a fresh CEM initialisation and is counted; none flagged: the plans after the first are warm-started."""
    from jepa import plan
    from jepa.envs import make_env
    model, settings = _episode_model(wm_config)
    env = make_env("reacher", 3, 64)
    try:
        always = plan.run_episode(model, env, 3, settings=settings, episode_steps=3, goal_steps=2,
                                  monitor=plan.Monitor(threshold=-1.0))
        never = plan.run_episode(model, env, 3, settings=settings, episode_steps=3, goal_steps=2,
                                 monitor=plan.Monitor(threshold=float("inf")))
    finally:
        env.close()
    assert always["flagged"] == [0, 1, 2] and always["replans"] == 3
    assert always["fresh_plans"] == [True, True, True]
    assert never["replans"] == 0 and never["fresh_plans"] == [True, False, False]


def test_calibration_scores_exactly_what_the_monitor_scores(wm_config):
    """The monitor's surprises in a real episode (context frames, states, blocks of 2 actions) are reproduced by
    monitor_surprise, which calibrate_threshold scores validation episodes with; teacher forcing on every
    preceding frame (the clip scoring) differs."""
    from jepa import plan, surprise
    from jepa.envs import make_env
    model, settings = _episode_model(wm_config, action_block=2, context_frames=2, state_source="physics")
    env = make_env("reacher", 4, 64)
    try:
        e = plan.run_episode(model, env, 4, policy="random", settings=settings, episode_steps=8, goal_steps=2,
                             record=True)
    finally:
        env.close()
    frames, states = e["frames"][::2], e["states"][::2]                     # the observed frames, a block apart
    got = planning.monitor_surprise(model, frames, states, np.asarray(e["actions"]))
    np.testing.assert_allclose(got, e["surprise"], rtol=1e-5)
    z = model.encode(frames)
    teacher = np.asarray(jnp.abs(model.predict_next(z[:-1], np.asarray(e["actions"]), states[:-1]) - z[1:]
                                 ).mean((1, 2)))
    assert np.abs(teacher[2:] - got[2:]).max() > 1e-4
    threshold = surprise.calibrate_threshold(model, 0.5, split="train", max_clips=2, length=4)
    assert np.isfinite(threshold) and threshold > 0


def test_energy_on_the_last_or_every_block_l1_or_l2(wm_config):
    model = fresh_model(wm_config, context_frames=1)
    frames = np.random.default_rng(1).integers(0, 255, (2, 64, 64, 3), np.uint8)
    z = model.encode(frames)
    actions = np.random.default_rng(2).uniform(-1, 1, (3, 2, 2)).astype(np.float32)
    rolled = model.objective.rollout(model.predictor_params, jnp.broadcast_to(z[None, :1], (3, 1, *z.shape[1:])),
                                     model.blocks(actions), jnp.zeros((3, 1, 32)))
    goal = z[1]
    for steps, norm, want in [("last", "l1", jnp.abs(rolled[:, -1] - goal).mean((1, 2))),
                              ("last", "l2", jnp.square(rolled[:, -1] - goal).mean((1, 2))),
                              ("all", "l1", jnp.abs(rolled - goal).mean((1, 2, 3))),
                              ("all", "l2", jnp.square(rolled - goal).mean((1, 2, 3)))]:
        s = planning.CEMSettings(horizon=2, energy_steps=steps, energy_norm=norm)
        np.testing.assert_allclose(np.asarray(model.energy(z[:1], None, goal, actions, settings=s)),
                                   np.asarray(want), rtol=1e-5)
    with pytest.raises(ValueError, match="energy_norm"):
        planning.CEMSettings(energy_norm="l3")


def test_oracle_planner_reaches_a_known_goal(wm_config):
    """CEM with the true simulator reaches the goal of a constant action 4 steps away on reacher."""
    from jepa import plan
    from jepa.envs import make_env
    model = fresh_model(wm_config, action_block=2, context_frames=1)
    settings = planning.CEMSettings(horizon=2, samples=64, elites=8, iterations=5)
    seed = plan.episode_seeds("reacher", 1, 4, 64, first=20)[0]
    env = make_env("reacher", seed, 64)
    try:
        oracle = plan.Oracle(env, settings, model.action_block)
        e = plan.run_episode(model, env, seed, policy="oracle", settings=settings, episode_steps=6, goal_steps=4,
                             oracle=oracle)
        rand = plan.run_episode(model, env, seed, policy="random", settings=settings, episode_steps=6,
                                goal_steps=4)
    finally:
        env.close()
    assert e["reached"] and e["min_distance"] < plan.SUCCESS_RADIUS["reacher"], e["distance"]
    assert e["min_distance"] < rand["min_distance"]


def test_wilson_interval():
    from jepa import plan
    np.testing.assert_allclose(plan.wilson_interval(0, 10), (0.0, 0.2775), atol=1e-4)
    np.testing.assert_allclose(plan.wilson_interval(5, 10), (0.2366, 0.7634), atol=1e-4)
    np.testing.assert_allclose(plan.wilson_interval(50, 50), (0.9287, 1.0), atol=1e-4)


# ---------------------------------------------------------------- the encoder trained with the predictor


def _max_change(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _with(config, **world_model):
    """A copy of config with world_model overrides (and the VICReg weights a frozen encoder must not carry)."""
    config = config.copy_and_resolve_references()
    config.world_model.update(**world_model)
    if not config.world_model.train_encoder:
        config.loss.update(variance_weight=0.0, covariance_weight=0.0)
    return config


def test_train_encoder_params_and_the_ema_copy(wm_config):
    """world_model.train_encoder: params["encoder"] starts as the "ema" encoder and update_target copies it into
    "ema" (what planning, surprise and export read); the VICReg terms join the loss. Off: no params["encoder"] and
    "ema" is returned untouched. (test_train_encoder_cli_run_plans_with_the_trained_encoder runs the trainer;
    test_train_world_model_on_a_frozen_pretrained_encoder checks that a frozen encoder leaves training unchanged.)"""
    from jepa import objectives
    wm_config.world_model.train_encoder = True
    wm_config.loss.update(variance_weight=1.0, covariance_weight=0.04)
    objective, params, ema, batch = _objective_and_batch(wm_config)
    assert set(params) == {"predictor", "encoder"} and _max_change(params["encoder"], ema) == 0
    moved = jax.tree.map(lambda x: x + 1.0, params["encoder"])
    assert objective.update_target(ema, {**params, "encoder": moved}, 0.5) is moved
    loss, aux = jax.jit(objective.loss)(params, ema, batch)
    expected = aux["loss/teacher_forcing"] + aux["loss/rollout"] + aux["reg/variance"] + 0.04 * aux["reg/covariance"]
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    assert float(aux["reg/variance"]) > 0
    frozen = objectives.build(_with(wm_config, train_encoder=False))
    params, ema = jax.eval_shape(lambda: frozen.init(jax.random.PRNGKey(0), wm_config))
    assert set(params) == {"predictor"}
    assert frozen.update_target(ema, {"predictor": None, "encoder": moved}, 0.5) is ema


def test_train_encoder_gradients_reach_the_encoder_through_predictions_and_targets(wm_config):
    """PLDM-style: no stop-gradient on either side, so the encoder gets gradient through the predictor's inputs
    and through the targets; with the encoder frozen, encode_frames stops both."""
    from jepa import objectives
    wm_config.world_model.train_encoder = True
    wm_config.loss.update(variance_weight=1.0, covariance_weight=0.0)
    objective, params, _, batch = _objective_and_batch(wm_config)
    assert set(params) == {"predictor", "encoder"}
    a, s = batch["actions"][:, :-1], batch["states"][:, :-1]

    def path_grads(obj):
        """Encoder gradients of the teacher-forced loss through the inputs only and through the targets only."""
        fixed = jax.lax.stop_gradient(obj.encode_frames(params["encoder"], batch["video"]))
        dist = lambda enc, inputs, targets: jnp.mean(jnp.abs(
            obj.predict(params["predictor"], inputs(enc)[:, :-1], a, s)[0] - targets(enc)[:, 1:]))
        encode = lambda enc: obj.encode_frames(enc, batch["video"])
        through_inputs = jax.grad(lambda enc: dist(enc, encode, lambda _: fixed))
        through_targets = jax.grad(lambda enc: dist(enc, lambda _: fixed, encode))
        largest = lambda g: jnp.abs(g["patch_kernel"]).max()
        both = jax.jit(lambda enc: (largest(through_inputs(enc)), largest(through_targets(enc))))(params["encoder"])
        return tuple(float(g) for g in both)

    g_inputs, g_targets = path_grads(objective)
    assert g_inputs > 0 and g_targets > 0
    assert path_grads(objectives.build(_with(wm_config, train_encoder=False))) == (0.0, 0.0)


def test_train_encoder_needs_the_variance_covariance_terms(wm_config):
    from jepa import config as config_lib
    from jepa.config import ConfigError
    wm_config.world_model.train_encoder = True
    with pytest.raises(ConfigError, match=r"config\.world_model\.train_encoder: .*loss\.variance_weight"):
        config_lib.validate(wm_config)
    wm_config.loss.covariance_weight = 0.04
    config_lib.validate(wm_config)
    wm_config.world_model.train_encoder = False  # the terms would silently do nothing on a frozen encoder
    with pytest.raises(ConfigError, match=r"config\.loss\.variance_weight: .*train_encoder"):
        config_lib.validate(wm_config)


def test_train_encoder_step_flops_count_the_encoder_backward(wm_config):
    from jepa import metrics as metrics_lib
    from jepa import models, objectives
    frozen = objectives.ActionConditioned.step_flops(wm_config)
    trained = objectives.ActionConditioned.step_flops(_with(wm_config, train_encoder=True))
    e = models.resolved_dims(wm_config.model)["encoder"]
    n = (wm_config.data.resolution // e["patch_size"]) ** 2
    backward = (metrics_lib.patch_embed_flops(n, e["width"], e["patch_size"], e["tubelet_size"])
                + 2 * metrics_lib.vit_forward_flops(n, e["width"], e["depth"], e["mlp_dim"]))
    expected = backward * wm_config.data.num_frames * wm_config.train.global_batch_size
    np.testing.assert_allclose(trained - frozen, expected, rtol=1e-9)


def test_train_encoder_starts_from_encoder_from_in_both_slots(tiny_run, wm_config):
    """The trainer puts encoder_from's EMA weights into params["encoder"] as well as "ema", as separate buffers
    (the train step donates its state: two slots sharing one buffer would be donated twice)."""
    from jepa import objectives, runs
    from jepa import train as train_lib
    wm_config.encoder_from, wm_config.encoder_weights = tiny_run, "pretrained"
    wm_config.world_model.train_encoder = True
    wm_config.loss.variance_weight = 1.0
    train_lib.adopt_encoder_config(wm_config)
    # Another seed than the pretraining run's: its EMA encoder is still close to its own initialisation.
    params, ema = objectives.build(wm_config).init(jax.random.PRNGKey(1), wm_config)
    state = train_lib.load_frozen_encoder(wm_config, {"params": params, "ema": ema}, runs.inference_mesh())
    pretrained, _ = runs.load_encoder(tiny_run, wm_config)
    assert _max_change(params["encoder"], pretrained) > 1e-4  # the random init was replaced
    assert _max_change(state["params"]["encoder"], pretrained) == 0 and _max_change(state["ema"], pretrained) == 0
    pointers = lambda tree: {x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)}
    assert not pointers(state["params"]["encoder"]) & pointers(state["ema"])


def test_train_encoder_cli_run_plans_with_the_trained_encoder(tmp_path, tiny_run, world_dir, jax_cache):
    """`jepa.train` from the pretraining run's EMA encoder with the encoder trained: the saved "ema" slot is the
    trained encoder (equal to params/encoder), WorldModel.load plans with it, and its encodings differ from the
    pretrained encoder's."""
    from jepa import runs
    workdir = tmp_path / "wm"
    proc = run_module("jepa.train", "--config=configs/world_model.py:tiny", f"--workdir={workdir}",
                      f"--config.encoder_from={tiny_run}", "--config.encoder_weights=pretrained",
                      "--config.world_model.train_encoder=True", "--config.loss.variance_weight=1",
                      "--config.loss.covariance_weight=0.04", f"--config.data.sources.world.data_dir={world_dir}",
                      f"--config.train.compilation_cache={jax_cache}")
    assert proc.returncode == 0, child_error(proc.stderr)
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert all(np.isfinite(r["loss"]) for r in records) and "reg/variance" in records[-1]
    model = planning.WorldModel.load(str(workdir))
    assert model.config.world_model.train_encoder and model.step == 6
    state, _ = runs.load_state_parts(str(workdir), ["params/encoder"])
    pretrained, _ = runs.load_encoder(tiny_run, runs.load_config(tiny_run))
    assert _max_change(state["params"]["encoder"], model.encoder_params) == 0
    assert _max_change(pretrained, model.encoder_params) > 1e-4
    frames = np.asarray(np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3)), np.uint8)
    before = planning.WorldModel(model.config, pretrained, model.predictor_params, 0).encode(frames)
    assert float(jnp.abs(model.encode(frames) - before).max()) > 1e-3
