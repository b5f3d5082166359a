"""The paired violation-of-expectation benchmark: paired clips, the baselines, the metrics and their bootstrap
intervals. The command line end to end is in tests/test_world_model.py (it reuses the trained tiny world model)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import local_config

from jepa import envs, surprise
from jepa.envs import A_MAX


@pytest.fixture(scope="module")
def records(world_dir):
    from jepa.data import world
    source = world.world_source(world_dir, "train", preset="tiny")
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def random_world_model(world_dir, jax_cache):
    """The tiny world model with freshly initialised weights (its frozen encoder is all the persistence baseline
    needs), one latent step per two environment steps."""
    from jepa import objectives, planning
    config = local_config(world_dir, jax_cache, name="world_model")
    config.world_model.action_block = config.data.frame_step = 2
    objective = objectives.build(config)
    params, encoder = jax.jit(lambda key: objective.init(key, config))(jax.random.PRNGKey(0))  # jitted: 2x faster
    return planning.WorldModel(config, encoder, params["predictor"], 0)


def _domain(record):
    return envs.DOMAINS[int(record["domain"])][0]


@pytest.mark.parametrize("step", [1, 2])
def test_paired_clips_differ_only_after_the_event(records, step):
    for r in records:  # cartpole and reacher
        other = next(o for o in records if o["domain"] == r["domain"] and o["seed"] != r["seed"])
        window = surprise.Window(4, 7, 3, step)
        idx = window.frames
        for kind in surprise.VIOLATIONS:
            possible, impossible = surprise.make_pair(r, kind, window, jump=2, other=other)
            for clip in (possible, impossible):
                assert clip["frames"].shape == (7, 64, 64, 3) and clip["frames"].dtype == np.uint8
                assert clip["actions"].shape == (7, step * A_MAX) and clip["states"].shape == (7, 32)
            for key in ("frames", "states"):
                np.testing.assert_array_equal(possible[key][:3], impossible[key][:3], err_msg=f"{kind} {key}")
            # The action after clip frame 1 moves the picture to frame 2, before the event: the same in both.
            np.testing.assert_array_equal(possible["actions"][:2], impossible["actions"][:2], err_msg=kind)
            if kind == "action_mismatch":
                np.testing.assert_array_equal(possible["frames"], impossible["frames"])
                assert np.abs(possible["actions"][2:] - impossible["actions"][2:]).max(axis=1).min() > 0
            else:
                changed = np.abs(possible["frames"][3:].astype(int) - impossible["frames"][3:]).mean(axis=(1, 2, 3))
                assert changed.max() > 0.5, (_domain(r), kind, changed)
                np.testing.assert_array_equal(possible["actions"], impossible["actions"], err_msg=kind)
            # The twin is the episode itself: stored frames, or the stored states re-rendered / re-simulated.
            assert np.abs(possible["frames"].astype(int) - np.asarray(r["frames"])[idx]).mean() < 0.01, kind
    # Each clip frame carries the `step` actions up to the next clip frame, in order.
    clip = surprise.clip_of(records[0], surprise.Window(4, 7, 3, step))
    a = np.asarray(records[0]["actions"])
    np.testing.assert_array_equal(clip["actions"][1], a[4 + step:4 + 2 * step].reshape(-1))


def test_pairs_refuse_what_cannot_be_built(records):
    r = records[1]
    n = len(r["frames"])
    with pytest.raises(ValueError, match="teleport: .* pass the episode end"):
        surprise.make_pair(r, "teleport", surprise.Window(n - 8, 8, 4), jump=4)
    with pytest.raises(ValueError, match="reversal: .* too few frames"):
        surprise.make_pair(r, "reversal", surprise.Window(0, 8, 4))
    with pytest.raises(ValueError, match="action_mismatch: needs `other`"):
        surprise.make_pair(r, "action_mismatch", surprise.Window(0, 8, 4), other=r)
    with pytest.raises(ValueError, match="event_frame: 1 must lie in"):
        surprise.Window(0, 8, 1)
    with pytest.raises(ValueError, match="not one of"):
        surprise.make_pair(r, "melt", surprise.Window(0, 8, 4))
    # Every planned window can be built.
    for kind in surprise.VIOLATIONS:
        starts = surprise.valid_starts(kind, n, 8, 4, 1, jump=4)
        for s in (starts[0], starts[-1]):
            surprise.make_pair(r, kind, surprise.Window(int(s), 8, 4), jump=4, other=records[3])


def test_freeze_and_reversal_only_where_the_bodies_move_a_patch(records):
    plan = surprise.plan_pairs(records, ("freeze", "reversal", "teleport"), 12, 8, 4, jump=4, min_motion=8.0)
    for kind in ("freeze", "reversal"):
        assert len(plan[kind]) == 12
        for spec in plan[kind]:
            r = records[spec.episode]
            kp = envs.image_keypoints(int(r["domain"]), np.asarray(r["states"]), int(r["num_qpos"]))
            assert surprise.motion_pixels(kp, surprise.Window(spec.start, 8, 4), 64) >= 8.0
    # The filter removes windows: without it freeze may use any start, and some of those are still.
    still = []
    for r in records:
        kp = envs.image_keypoints(int(r["domain"]), np.asarray(r["states"]), int(r["num_qpos"]))
        still += [surprise.motion_pixels(kp, surprise.Window(int(s), 8, 4), 64) < 8.0
                  for s in surprise.valid_starts("freeze", len(r["frames"]), 8, 4)]
    assert any(still) and not all(still)
    with pytest.raises(ValueError, match="freeze: no window .* moving >= 1000"):
        surprise.plan_pairs(records, ("freeze",), 4, 8, 4, min_motion=1000.0)


def test_change_detectors_find_a_freeze_less_surprising(records, random_world_model):
    scorer = surprise.ClipScorer(random_world_model, context=2, horizon=2)
    plan = surprise.plan_pairs(records, ("freeze",), 6, 8, 4, step=2, min_motion=8.0)["freeze"]
    means = {name: ([], []) for name in ("persistence", "pixel difference", "action-conditioned")}
    for spec in plan:
        pair = surprise.make_pair(records[spec.episode], "freeze", surprise.Window(spec.start, 8, 4, 2))
        scores = [scorer(clip) for clip in pair]
        for name, (pos, imp) in means.items():
            assert scores[0][name].shape == (8 - 2 - 2 + 1,)
            pos.append(scores[0][name].mean())
            imp.append(scores[1][name].mean())
        # Windows that see only the frozen picture predict it perfectly.
        assert scores[1]["persistence"][-1] == 0.0 and scores[1]["pixel difference"][-1] == 0.0
    for name in ("persistence", "pixel difference"):
        pos, imp = means[name]
        assert surprise.relative_accuracy(pos, imp) == 0.0, (name, pos, imp)


def test_metrics_on_constructed_scores():
    # relative accuracy: (2 > 1) yes, (2 == 2) half, (5 > 3) yes, (0 > 4) no
    assert surprise.relative_accuracy([1, 2, 3, 4], [2, 2, 5, 0]) == 0.625
    with pytest.raises(ValueError, match="paired scores"):
        surprise.relative_accuracy([1, 2], [1])
    # AUROC by ranks equals the definition, ties included
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 40), rng.integers(0, 5, 30)
    direct = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (40 * 30)
    assert surprise.auroc(pos, neg) == pytest.approx(direct, abs=1e-12)
    assert surprise.auroc([3, 4], [1, 2]) == 1.0 and surprise.auroc([1], [1]) == 0.5
    # absolute accuracy: threshold = the 0.9 quantile of 0..9 = 8.1; 9 of 10 possible clips at or below it,
    # 3 of 4 impossible ones above it
    assert surprise.absolute_accuracy(np.arange(10), [9, 10, 8.5, 1]) == pytest.approx((0.75 + 0.9) / 2)


def test_bootstrap_intervals_on_constructed_scores():
    n = 400
    possible = np.zeros(n)
    impossible = np.where(np.arange(n) < 320, 1.0, -1.0)   # 80% of the pairs ranked right
    metric = surprise.relative_accuracy
    each = surprise.with_interval(metric, possible, impossible, surprise.bootstrap_indices(np.arange(n), 2000))
    half = 1.96 * np.sqrt(0.8 * 0.2 / n)   # the normal approximation of the binomial interval
    assert each["value"] == 0.8
    assert each["low"] == pytest.approx(0.8 - half, abs=0.012) and each["high"] == pytest.approx(0.8 + half, abs=0.012)
    # Resampling episodes: 20 episodes of 20 pairs each, all right or all wrong, leave 20 independent outcomes.
    episodes = np.arange(n) // 20
    grouped = surprise.with_interval(metric, possible, impossible, surprise.bootstrap_indices(episodes, 2000))
    half = 1.96 * np.sqrt(0.8 * 0.2 / 20)
    assert grouped["low"] == pytest.approx(0.8 - half, abs=0.06) and grouped["high"] <= 1.0
    assert grouped["high"] - grouped["low"] > 3 * (each["high"] - each["low"])
    # All pairs right: no interval width. Same seed, same interval.
    right = surprise.with_interval(metric, possible, np.ones(n), surprise.bootstrap_indices(episodes, 200))
    assert (right["value"], right["low"], right["high"]) == (1.0, 1.0, 1.0)
    again = surprise.with_interval(metric, possible, impossible, surprise.bootstrap_indices(episodes, 2000))
    assert again == grouped
    # summarize: every scorer and aggregate measured on the same resamples
    scores = {"episode": episodes, "persistence": {
        "possible": {"mean": possible, "max": possible}, "impossible": {"mean": impossible, "max": -impossible}}}
    summary = surprise.summarize(scores, 2000)
    assert summary["persistence"]["mean"]["relative_accuracy"] == grouped
    assert summary["persistence"]["max"]["relative_accuracy"]["value"] == pytest.approx(0.2)
    assert set(summary["persistence"]["mean"]) == set(surprise.METRICS)


def test_changed_models_for_resimulation(records):
    r = next(r for r in records if _domain(r) == "reacher")
    base = envs.changed_env("reacher")
    heavy = envs.changed_env("reacher", mass_scale=5.0)
    assert envs.changed_env("reacher") is base and base is not heavy
    np.testing.assert_allclose(heavy.physics.model.body_mass[1:], 5 * base.physics.model.body_mass[1:])
    np.testing.assert_allclose(heavy.physics.model.body_inertia[1:], 5 * base.physics.model.body_inertia[1:])
    # Flipped actuators under actions a move exactly as the dataset's model under -a.
    state, actions = np.asarray(r["states"][5]), np.asarray(r["actions"][5:10])
    _, flipped = envs.resimulate("reacher", int(r["seed"]), state, actions, actuator_sign=-1.0)
    _, mirrored = envs.resimulate("reacher", int(r["seed"]), state, -actions)
    _, plain = envs.resimulate("reacher", int(r["seed"]), state, actions)
    np.testing.assert_allclose(flipped, mirrored, atol=1e-6)
    assert np.abs(flipped - plain).max() > 1e-2
    # The unchanged model replays the episode; a hidden body is drawn again afterwards.
    np.testing.assert_allclose(plain, np.asarray(r["states"][6:11]), atol=1e-4)
    hidden = envs.render_states("reacher", int(r["seed"]), r["states"][6:8], hidden_geoms=("arm", "hand"))
    assert np.abs(hidden.astype(int) - r["frames"][6:8]).mean() > 0.1
    np.testing.assert_array_equal(envs.render_states("reacher", int(r["seed"]), r["states"][6:8]), r["frames"][6:8])
