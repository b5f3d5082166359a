"""The action-conditioned world model (V-JEPA 2-AC), CEM planning and surprise: unit tests on the pieces and
behaviour tests through the real CLIs on the tiny world-model config."""

from __future__ import annotations

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
    r = objective.rollout_steps
    np.testing.assert_allclose(float(aux["loss/teacher_forcing"]), float(jnp.mean(jnp.abs(z[:, 1:]))), rtol=1e-6)
    np.testing.assert_allclose(float(aux["loss/rollout"]), float(jnp.mean(jnp.abs(z[:, 1:r + 1]))), rtol=1e-6)
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


def test_world_model_config_fails_fast_without_an_encoder():
    from jepa import config as config_lib
    c = load_config("", name="world_model")
    with pytest.raises(ValueError, match="encoder_from"):
        config_lib.validate(c)
    c.encoder_weights = "random"
    c.world_model.rollout_steps = 4
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
            jumped = surprise.ac_surprise(model, surprise.violate(r, "teleport", start, length, at, jump=6), actions)
            np.testing.assert_allclose(jumped[:at - 1], clean[:at - 1], rtol=1e-5)  # identical before the event
            gaps.append(jumped[at - 1] - clean[at - 1])
    gaps = np.asarray(gaps)
    assert np.mean(gaps > 0) >= 0.75 and gaps.mean() > 0, gaps


def test_violations_alter_only_frames_after_the_event(world_dir):
    from jepa import envs, surprise
    from jepa.data import world
    source = world.world_source(world_dir, "train", preset="tiny")
    r = next(source[i] for i in range(len(source)) if envs.DOMAINS[int(source[i]["domain"])][0] == "reacher")
    frames = np.asarray(r["frames"])
    for kind in surprise.VIOLATIONS:
        clip = surprise.violate(r, kind, 2, 8, 4, jump=6)
        np.testing.assert_array_equal(clip[:4], frames[2:6])
        assert np.abs(clip[4:].astype(int) - frames[6:10]).sum() > 0, kind
    hidden = surprise.render_hidden(r, np.arange(6, 8))
    assert np.abs(hidden.astype(int) - frames[6:8]).mean() > 0.1
    assert surprise.auroc([3, 4], [1, 2]) == 1.0 and surprise.auroc([1], [1]) == 0.5


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


def test_plan_and_surprise_benchmarks_write_their_reports(tmp_path, wm_run, tiny_run):
    out = tmp_path / "bench"
    proc = run_module("jepa.plan", "benchmark", f"--workdir={wm_run}", f"--baseline_workdir={wm_run}",
                      "--domains=reacher", "--episodes=1", f"--output={out}", "--config.plan.episode_steps=2")
    assert proc.returncode == 0, child_error(proc.stderr)
    assert "random actions" in proc.stdout and "nan" not in proc.stdout  # no planning time: "-"
    assert "random-encoder world model " in proc.stderr and "random-init encoder (untrained)" in proc.stderr
    report = json.loads((out / "planning_benchmark.json").read_text())
    assert set(report["domains"]["reacher"]["methods"]) == {"CEM, world model", "CEM, random-encoder world model",
                                                             "random actions"}
    assert (out / "energy_landscape.png").stat().st_size > 1000
    proc = run_module("jepa.surprise", "benchmark", f"--workdir={wm_run}", f"--video_workdir={tiny_run}",
                      "--clips=2", "--split=train", f"--output={out}")
    assert proc.returncode == 0, child_error(proc.stderr)
    auroc = json.loads((out / "surprise_benchmark.json").read_text())["auroc"]
    assert set(auroc) == {"action-conditioned", "video"}
    assert all(0.0 <= v <= 1.0 for per in auroc.values() for v in per.values())
