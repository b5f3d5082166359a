"""Tests for the embedded MuJoCo world dataset (jepa/data/world.py) and its run-time environments (jepa/envs.py):
real dm_control physics and EGL rendering."""

import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jepa import envs
from jepa.data import world

TINY = world.PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The tiny preset, generated once by two spawned worker processes."""
    d = tmp_path_factory.mktemp("world_tiny")
    world.prepare_world(str(d), preset="tiny", num_workers=2)
    return str(d)


@pytest.fixture(scope="module")
def tiny_records(tiny_dir):
    return {split: [world.world_source(tiny_dir, split, preset="tiny")[i]
                    for i in range(len(world.world_source(tiny_dir, split, preset="tiny")))]
            for split in world.SPLITS}


def _all(records):
    return [r for split in world.SPLITS for r in records[split]]


def test_every_domain_loads_renders_and_fits_the_padding():
    assert len(envs.DOMAINS) == len(set(envs.DOMAINS)) >= 6
    for i, (domain, task) in enumerate(envs.DOMAINS):
        env = envs.make_env(i, seed=0, resolution=32)
        obs = env.reset()
        assert (env.domain, env.task) == (domain, task)
        assert 1 <= env.action_dim <= envs.A_MAX and 2 <= env.state_dim <= envs.S_MAX
        assert obs["frame"].shape == (32, 32, 3) and obs["frame"].dtype == np.uint8 and obs["frame"].std() > 1
        assert obs["state"].shape == (envs.S_MAX,) and not obs["state"][env.state_dim:].any()
        env.close()


def test_environments_load_without_the_dataset_machinery():
    """Planning and surprise step jepa.envs at run time: importing it pulls in neither TFDS nor the dataset
    module (dm_control itself loads when the first environment is made)."""
    import subprocess
    import sys

    code = ("import sys, jepa.envs; heavy = [m for m in ('tensorflow_datasets', 'jepa.data.world', 'dm_control') "
            "if m in sys.modules]; assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_simulate_plays_plans_exactly_as_step_and_leaves_the_env_alone():
    """The planning oracle's model: WorldEnv.simulate on a copy of the physics gives the effector positions that
    stepping the environment itself gives, from the current (mid-episode) state, and changes nothing."""
    for domain in ("reacher", "point_mass"):
        env = envs.make_env(domain, 3, resolution=32)
        try:
            rng = np.random.default_rng(0)
            env.reset(3)
            env.step(rng.uniform(env.action_low, env.action_high))       # start mid-episode, with velocity
            state, here = env.state(), env.effector_position()
            plans = rng.uniform(2 * env.action_low, 2 * env.action_high, (3, 5, env.action_dim))  # clipped too
            simulated = env.simulate(plans)
            np.testing.assert_array_equal(env.state(), state)
            np.testing.assert_array_equal(env.effector_position(), here)
            for plan, positions in zip(plans, simulated):
                env.set_state(state[:env.num_qpos], state[env.num_qpos:env.state_dim])
                stepped = []
                for a in plan:
                    env.step(a)
                    stepped.append(env.effector_position())
                np.testing.assert_allclose(positions, stepped, atol=1e-9)
            with pytest.raises(ValueError, match="actions: expected"):
                env.simulate(plans[0])
        finally:
            env.close()


def test_every_domain_shows_motion_within_action_bounds():
    for i in range(len(envs.DOMAINS)):
        e = world.generate_episode(i, world.episode_seed(7, i), 12, 32)
        env = envs.make_env(i, e["seed"], resolution=32)
        np.testing.assert_array_equal(env.reset()["frame"], e["frames"][0])
        a = e["actions"][:, : e["action_dim"]]
        assert (a >= env.action_low).all() and (a <= env.action_high).all()
        change = np.abs(np.diff(e["frames"].astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
        assert (change > 0).sum() >= 9, (envs.DOMAINS[i], change)
        assert np.abs(e["frames"][-1].astype(np.float32) - e["frames"][0]).mean() > 0.3, envs.DOMAINS[i]
        env.close()


def test_record_shapes_dtypes_and_ranges(tiny_records):
    names = [envs.domain_index(d) for d in TINY["domains"]]
    recs = _all(tiny_records)
    assert len(recs) == TINY["episodes"]
    T, R = TINY["frames"], TINY["resolution"]
    for r in recs:
        assert set(r) == {"frames", "actions", "states", "rewards", "action_dim", "state_dim", "num_qpos", "domain",
                          "task", "seed", "label"}
        assert r["frames"].shape == (T, R, R, 3) and r["frames"].dtype == np.uint8
        assert r["actions"].shape == (T, envs.A_MAX) and r["actions"].dtype == np.float32
        assert r["states"].shape == (T, envs.S_MAX) and r["states"].dtype == np.float32
        assert r["rewards"].shape == (T,) and r["rewards"].dtype == np.float32
        assert r["domain"] in names and r["label"] == r["domain"]
        assert isinstance(r["task"], str) and r["task"] == envs.DOMAINS[r["domain"]][1]
        env = envs.make_env(r["domain"], r["seed"])
        assert (r["action_dim"], r["state_dim"], r["num_qpos"]) == (env.action_dim, env.state_dim, env.num_qpos)
        a, s = r["actions"], r["states"]
        assert not a[:, r["action_dim"]:].any() and not s[:, r["state_dim"]:].any()
        assert (a[:, : r["action_dim"]] >= env.action_low).all() and (a[:, : r["action_dim"]] <= env.action_high).all()
        assert np.isfinite(s).all() and np.isfinite(r["rewards"]).all()
        assert (r["rewards"] >= 0).all() and (r["rewards"] <= 1).all()  # dm_control rewards lie in [0, 1]
        env.close()
    # both domains appear, round-robin
    assert sorted({r["domain"] for r in recs}) == sorted(names)


def test_frames_show_motion(tiny_records):
    for r in _all(tiny_records):
        f = r["frames"].astype(np.float32)
        step_change = np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3))
        assert (step_change > 0).mean() > 0.9, "most consecutive frames must differ"
        assert np.abs(f[-1] - f[0]).mean() > 0.5, "the scene must visibly change over an episode"
        assert np.abs(np.diff(r["states"], axis=0)).max() > 1e-2


def test_actions_are_frame_aligned_by_replay(tiny_records):
    """Replaying the stored actions from the episode seed in a fresh env reproduces every state and frame."""
    r = tiny_records["train"][0]
    env = envs.make_env(r["domain"], r["seed"])
    obs = env.reset()
    np.testing.assert_array_equal(obs["state"], r["states"][0])
    np.testing.assert_array_equal(obs["frame"], r["frames"][0])
    for t in range(len(r["frames"]) - 1):
        obs = env.step(r["actions"][t])
        np.testing.assert_array_equal(obs["state"], r["states"][t + 1])
        np.testing.assert_array_equal(obs["frame"], r["frames"][t + 1])
        assert obs["reward"] == pytest.approx(float(r["rewards"][t + 1]), abs=1e-6)
    env.close()


def test_one_step_from_stored_state_matches_next_state_and_not_a_shifted_action(tiny_records):
    """state t + action t -> state t+1 (from the stored float32 state); action t+1 gives a clearly different result."""
    for r in tiny_records["train"][:2]:
        env = envs.make_env(r["domain"], 0)
        nq, sd, ad = r["num_qpos"], r["state_dim"], r["action_dim"]
        s, a = r["states"].astype(np.float64), r["actions"]
        aligned, shifted = [], []
        for t in range(len(s) - 2):
            for action, errs in ((a[t], aligned), (a[t + 1], shifted)):
                env.set_state(s[t, :nq], s[t, nq:sd])
                nxt = env.step(action[:ad])["state"]
                errs.append(np.abs(nxt[:sd] - s[t + 1, :sd]).max())
        assert max(aligned) < 1e-3, max(aligned)
        assert max(shifted) > 10 * max(aligned) and np.median(shifted) > 1e-3
        env.close()


def test_render_state_reproduces_the_stored_frame(tiny_records):
    r = tiny_records["validation"][0]
    nq, sd = r["num_qpos"], r["state_dim"]
    for t in (0, len(r["frames"]) // 2, len(r["frames"]) - 1):
        img = envs.render_state(r["domain"], r["task"], r["states"][t, :nq], r["states"][t, nq:sd], 64)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert np.abs(img.astype(np.float32) - r["frames"][t]).mean() < 0.5
    with pytest.raises(ValueError, match="task"):
        envs.render_state(r["domain"], "not_a_task", r["states"][0, :nq], r["states"][0, nq:sd])
    with pytest.raises(ValueError, match="qpos"):
        envs.render_state(r["domain"], None, r["states"][0, : nq + 1], r["states"][0, nq:sd])


def test_splits_disjoint_and_cover_all_episodes(tiny_records):
    seeds = {s: [int(r["seed"]) for r in tiny_records[s]] for s in world.SPLITS}
    assert all(len(v) > 0 for v in seeds.values())
    assert len(seeds["train"]) > len(seeds["validation"])
    sets = [set(v) for v in seeds.values()]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    expected = [world.episode_seed(0, i) for i in range(TINY["episodes"])]
    assert seeds["train"] + seeds["validation"] + seeds["test"] == expected  # records in episode order


def test_deterministic_across_worker_counts_and_seeds(tiny_records, tmp_path):
    """The same config generated in-process (no pool) is byte-identical; another seed gives other episodes."""
    again = world.prepare_world(str(tmp_path / "a"), preset="tiny", num_workers=1)
    src = world.WorldSource(again.as_data_source(split="train"))
    for i, r in enumerate(tiny_records["train"]):
        o = src[i]
        for k in ("frames", "actions", "states", "rewards"):
            assert o[k].tobytes() == r[k].tobytes(), k
        assert (o["seed"], o["domain"]) == (r["seed"], r["domain"])

    other = world.prepare_world(str(tmp_path / "b"), preset="tiny", seed=1, episodes=3, frames=8, num_workers=1)
    assert other.builder_config.name != "tiny"
    o = world.WorldSource(other.as_data_source(split="train"))[0]
    r = tiny_records["train"][0]
    assert o["domain"] == r["domain"] and o["seed"] != r["seed"]
    assert not np.array_equal(o["frames"], r["frames"][:8])
    assert not np.array_equal(o["actions"], r["actions"][:8])


def test_shorter_episode_is_a_prefix(tiny_records):
    r = tiny_records["train"][1]
    e = world.generate_episode(r["domain"], r["seed"], 8, 64)
    for k in ("frames", "actions", "states", "rewards"):
        np.testing.assert_array_equal(e[k], r[k][:8])


def test_policies_mix_uniform_and_smooth():
    low, high = -np.ones(2), np.ones(2)
    kinds = {}
    for seed in range(40):
        p = world._Policy(seed, low, high)
        a = np.stack([p() for _ in range(200)])
        assert (a >= low).all() and (a <= high).all()
        lag1 = np.mean([np.corrcoef(a[:-1, j], a[1:, j])[0, 1] for j in range(2)])
        kinds.setdefault(p.kind, []).append(lag1)
    assert set(kinds) == {"uniform", "ou"}
    assert max(abs(c) for c in kinds["uniform"]) < 0.3  # i.i.d.
    assert min(kinds["ou"]) > 0.5  # temporally smooth


def _runs(actions: np.ndarray) -> list[int]:
    """Lengths of the runs of identical consecutive actions."""
    change = np.flatnonzero(np.any(actions[1:] != actions[:-1], axis=1)) + 1
    return np.diff(np.concatenate([[0], change, [len(actions)]])).tolist()


def test_hold_policy_holds_each_action_for_several_frames_inside_the_bounds():
    low, high = np.array([-1.0, 0.0]), np.array([1.0, 2.0])
    lengths = []
    for seed in range(20):
        p = world._Policy(seed, low, high, (("hold", 1.0),))
        assert p.kind == "hold"
        a = np.stack([p() for _ in range(200)])
        assert (a >= low).all() and (a < high).all()
        runs = _runs(a)  # the last hold may be cut short by the end of the draws
        assert min(runs[:-1]) >= world.HOLD_FRAMES[0] and max(runs) <= world.HOLD_FRAMES[1], runs
        lengths += runs[:-1]
        assert len(runs) >= 200 // world.HOLD_FRAMES[1]
    assert min(lengths) > 1 and set(range(world.HOLD_FRAMES[0], world.HOLD_FRAMES[1] + 1)) <= set(lengths)
    a = np.stack([p() for _ in range(2000)])  # the held actions themselves spread over the whole box
    assert (a.min(0) < low + 0.1).all() and (a.max(0) > high - 0.1).all()


def test_control_preset_draws_hold_episodes_and_other_presets_do_not():
    def kinds(preset):
        c = world.make_config(preset)
        return [world._Policy(world.episode_seed(c.seed, i), -np.ones(2), np.ones(2), c.policies).kind
                for i in range(min(c.episodes, 600))]

    control = kinds("control")
    share = {k: control.count(k) / len(control) for k in world.POLICY_KINDS}
    assert 0.42 < share["hold"] < 0.58 and 0.18 < share["uniform"] < 0.32 and 0.18 < share["ou"] < 0.32, share
    for preset in ("tiny", "default", "large", "xlarge"):
        assert "hold" not in kinds(preset), preset
    # a stored control hold episode: held actions, in bounds, frame-aligned as any other episode
    c = world.make_config("control")
    i = control.index("hold")
    e = world._episode_job(c.episode_job(i))
    a = e["actions"][:, : e["action_dim"]]
    env = envs.make_env(e["domain"], e["seed"])
    assert (a >= env.action_low).all() and (a <= env.action_high).all()
    runs = _runs(a)
    assert min(runs[:-1]) >= world.HOLD_FRAMES[0] and max(runs) <= world.HOLD_FRAMES[1] and len(runs) >= 3
    env.close()


def test_random_or_smooth_presets_keep_their_episodes():
    """The policy mix must not move the draws of the presets without holds: their actions are pinned (values computed
    before the hold policy existed), so cached quick-start data and its reported numbers stay valid."""
    import hashlib

    c = world.make_config("default")
    h, kinds = hashlib.sha256(), []
    for i in range(16):
        p = world._Policy(world.episode_seed(c.seed, i), -np.ones(2), np.ones(2), c.policies)
        h.update(np.stack([p() for _ in range(100)]).astype(np.float32).tobytes())
        kinds.append(p.kind)
    assert kinds == ["ou", "ou", "ou", "uniform", "uniform", "ou", "uniform", "ou", "ou", "ou", "ou", "uniform",
                     "ou", "uniform", "uniform", "uniform"]
    assert h.hexdigest() == "57712dae33d4c8bd73eb853ba0f2c0c532a3c96e5e5c39a4040da664fb4ddbcf"
    e = world.generate_episode(*world.make_config("default", frames=30, resolution=32).episode_job(1))
    assert envs.DOMAINS[e["domain"]] == ("reacher", "easy")
    assert hashlib.sha256(e["actions"].tobytes()).hexdigest() == \
        "de7dabce7910ccd3bd0e06105bc3aebb2f394930da1fda2aeef2ed0f2f05aee4"
    np.testing.assert_allclose(e["actions"][[0, 7, 29], :2], [[0.8707674741744995, -0.22643573582172394],
                                                             [0.9629954099655151, -0.9850367903709412],
                                                             [-0.4087672829627991, 0.043009910732507706]])
    np.testing.assert_allclose(e["states"][29, :4], [3.4705591201782227, -2.809262752532959, -2.321702003479004,
                                                    0.07264688611030579], atol=1e-3)


def test_bad_policy_mix_raises_value_error():
    for bad in ((("hold", 1.0), ("spline", 1.0)), (("uniform", 0.0),), (), (("ou", 1.0), ("ou", 2.0)), "hold",
                (("uniform", float("nan")),)):
        with pytest.raises(ValueError, match="policies"):
            world._Policy(0, -np.ones(1), np.ones(1), bad)


def test_prepare_twice_generates_once(tiny_dir):
    def snapshot():
        out = {}
        for root, _, files in os.walk(tiny_dir):
            for f in files:
                st = os.stat(os.path.join(root, f))
                out[os.path.join(root, f)] = (st.st_ino, st.st_mtime_ns)
        return out

    before = snapshot()
    assert any(p.endswith(tuple(f"-of-{n:05d}" for n in range(1, 10))) for p in before)
    t0 = time.time()
    b = world.prepare_world(tiny_dir, preset="tiny", num_workers=2)
    assert time.time() - t0 < 3.0
    assert snapshot() == before
    assert b.info.splits["train"].num_examples + b.info.splits["validation"].num_examples + \
        b.info.splits["test"].num_examples == TINY["episodes"]


def test_reads_back_through_tfds_data_source(tiny_dir, tiny_records):
    raw = tfds.data_source("jepa_world/tiny", split="train", data_dir=tiny_dir)
    assert len(raw) == len(tiny_records["train"])
    r = raw[0]
    np.testing.assert_array_equal(r["frames"], tiny_records["train"][0]["frames"])
    src = world.world_source(tiny_dir, "test", preset="tiny")
    batch = src.__getitems__([0])
    assert isinstance(batch[0]["task"], str) and batch[0]["frames"].shape == (TINY["frames"], 64, 64, 3)


def test_bad_options_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        world.make_config("huge")
    with pytest.raises(ValueError, match="episodes"):
        world.make_config("tiny", episodes=2)
    with pytest.raises(ValueError, match="domain"):
        world.make_config("tiny", domains=["cartpole", "no_such_domain"])
    with pytest.raises(ValueError, match="domains"):
        world.make_config("tiny", domains="cartpole")
    with pytest.raises(ValueError, match="split"):
        world.world_source(str(tmp_path), "training", preset="tiny")
    with pytest.raises(ValueError, match="action"):
        env = envs.make_env("cartpole", 0)
        env.reset()
        env.step(np.zeros(3))
    assert world.make_config("default").name == "default"
    assert world.make_config("default", domains=[f"{d}/{t}" for d, t in envs.DOMAINS]).name == "default"
    assert world.make_config("default", seed=3).name != "default"


def test_image_keypoints_match_dm_control_camera_and_the_rendered_frame(tiny_records):
    from dm_control.mujoco.engine import Camera
    r = tiny_records["train"][1]
    nq, sd = int(r["num_qpos"]), int(r["state_dim"])
    kp = envs.image_keypoints(r["domain"], r["states"][:3], nq)
    assert kp.shape == (3, envs.MAX_KEYPOINTS, 2) and kp.dtype == np.float32
    env = envs.make_env(r["domain"], 0)
    geoms = np.flatnonzero(env.physics.model.geom_bodyid > 0)
    for t in range(3):  # dm_control's own camera matrix gives pixel coordinates (pixel centres at integers)
        env.set_state(r["states"][t, :nq], r["states"][t, nq:sd])
        m = Camera(env.physics, 64, 64, env.camera_id).matrix
        h = np.concatenate([env.physics.data.geom_xpos[geoms], np.ones((len(geoms), 1))], axis=1) @ m.T
        np.testing.assert_allclose(kp[t, :len(geoms)] * 64 - 0.5, h[:, :2] / h[:, 2:3], atol=1e-3)
    assert not kp[:, len(geoms):].any()
    env.close()
    # point_mass: the keypoint sits on the rendered point. Pixels where frame A differs from both B and C (the point
    # elsewhere) are A's point alone.
    renders = [envs.render_state("point_mass", None, q, [0.0, 0.0]).astype(np.float32)
               for q in ([0.1, -0.12], [-0.2, 0.2], [0.2, 0.2])]
    only_a = (np.abs(renders[0] - renders[1]).sum(-1) > 30) & (np.abs(renders[0] - renders[2]).sum(-1) > 30)
    rows, cols = np.nonzero(only_a)
    assert len(rows) >= 3
    u, v = envs.image_keypoints("point_mass", np.array([[0.1, -0.12, 0.0, 0.0]]), 2)[0, 0] * 64 - 0.5
    assert abs(cols.mean() - u) < 1.5 and abs(rows.mean() - v) < 1.5, (cols.mean(), rows.mean(), u, v)


def test_generation_survives_a_worker_that_dies(tmp_path):
    """A worker killed mid-job (a renderer segfault) must cost a retry, not hang the ordered results forever."""
    import _crashing_jobs
    marker = str(tmp_path / "crashed")
    jobs = [(i, 5, marker) for i in range(12)]
    assert list(world.ordered_results(_crashing_jobs.crash_once, jobs, workers=2)) == [2 * i for i in range(12)]
    assert os.path.exists(marker)
    with pytest.raises(RuntimeError, match="worker processes died 4 times"):
        list(world.ordered_results(_crashing_jobs.always_crash, [(0, 0, "")] * 3, workers=2))
