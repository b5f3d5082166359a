"""Probes on synthetic features with known answers, the grid's choice, kNN, and evaluators during training."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from jepa import evaluators as evaluators_lib
from jepa import probe as probe_lib
from jepa import runs
from jepa.export import Features


def synthetic(n, d=16, classes=3, segments=1, seed=0, tokens=0, domains=2):
    """Features where the label is a linear function of the pooled vector, and states (2 qpos, 2 qvel, padding)
    are linear in it per domain. With tokens > 0, patches hide the class in ONE token (mean pooling dilutes it)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).normal(size=(classes, d)) * 3
    y = rng.integers(0, classes, n // segments).repeat(segments)
    x = centers[y] + rng.normal(size=(n, d))
    dom = np.arange(n // segments).repeat(segments) % domains
    w = np.random.default_rng(7).normal(size=(d, 4))
    states = np.zeros((n, 2, 32), np.float32)
    states[:, :, :4] = (x @ w)[:, None, :] * (1 + dom[:, None, None])
    rows = [{"clip_id": f"c/{i // segments}", "segment": i % segments, "state_dim": 4, "num_qpos": 2}
            for i in range(n)]
    patches = None
    if tokens:
        patches = rng.normal(size=(n, tokens, d)).astype(np.float32)
        patches[np.arange(n), rng.integers(0, tokens, n)] += centers[y] * 2
    return Features(pooled=x.astype(np.float32), patches=patches,
                    targets={"label": y.astype(np.int32), "domain": dom.astype(np.int32), "states": states},
                    rows=rows, meta={})


def test_grid_picks_the_learning_rate_that_learns():
    tr, va, te = synthetic(256, seed=0), synthetic(96, seed=1), synthetic(96, seed=2)
    r = probe_lib.run_probe(tr, va, te, task="classification", target="label", probe="linear",
                            lrs=(1e-7, 3e-2), wds=(0.0, 0.01), epochs=10, batch_size=32)
    assert r["best"]["lr"] == 3e-2
    by_lr = {g["lr"]: g["val"] for g in r["grid"]}
    assert by_lr[3e-2] > 0.9 and by_lr[1e-7] < 0.7
    assert r["test"]["accuracy"] > 0.9


def test_linear_regression_recovers_states_per_domain():
    tr, va, te = synthetic(256, seed=0), synthetic(96, seed=1), synthetic(96, seed=2)
    r = probe_lib.run_probe(tr, va, te, task="regression", target="states", probe="linear",
                            lrs=(0.0, 3e-2), wds=(0.0,), epochs=40, batch_size=32)
    assert r["best"]["lr"] == 3e-2
    assert r["test"]["r2"] > 0.9 and r["test"]["r2_pos"] > 0.9 and r["test"]["r2_vel"] > 0.9
    untrained = [g for g in r["grid"] if g["lr"] == 0.0][0]
    assert untrained["val"] < 0.1
    r1 = probe_lib.run_probe(tr, va, te, task="regression", target="states[-1]", probe="linear",
                             lrs=(3e-2,), wds=(0.0,), epochs=40, batch_size=32)
    assert r1["test"]["r2"] > 0.9


def test_per_domain_regression_handles_domains_whose_states_mean_different_things():
    """Domain 1's states are a different linear map of the features than domain 0's: one shared head cannot fit
    both, one head per domain can."""
    def remapped(n, seed):
        f = synthetic(n, seed=seed)
        other = np.random.default_rng(11).normal(size=(16, 4))
        d1 = f.targets["domain"] == 1
        f.targets["states"][d1, :, :4] = (f.pooled[d1] @ other)[:, None, :]
        return f
    feats = {"train": remapped(256, 0), "validation": remapped(96, 1), "test": remapped(96, 2)}
    kw = dict(probe="linear", lrs=(3e-2,), wds=(0.0,), epochs=40, batch_size=32)
    shared = probe_lib.run_probe(feats["train"], feats["validation"], feats["test"], task="regression",
                                 target="states", **kw)
    per = probe_lib.per_domain_regression(feats, target="states", **kw)
    assert sorted(per["per_domain"]) == [0, 1]
    assert per["test"]["r2"] > 0.9 and shared["test"]["r2"] < 0.8
    subset = probe_lib.select_rows(feats["test"], feats["test"].targets["domain"] == 1)
    assert len(subset) == 48 and (subset.targets["domain"] == 1).all()


def test_regression_metric_known_answers():
    feats = synthetic(40, seed=3)
    stats = probe_lib.state_stats(feats, "states", None)
    task = probe_lib.make_task(feats, "regression", "states", "linear", stats)
    assert task.y.shape == (40, 64) and task.mask.sum() == 40 * 2 * 4  # padding dims masked
    perfect = probe_lib.regression_metrics(task.y[None], task)
    np.testing.assert_allclose([perfect["r2"][0], perfect["r2_pos"][0], perfect["r2_vel"][0]], 1.0)
    means = np.zeros_like(task.y)
    for d in (0, 1):
        means[task.domain == d] = task.y[task.domain == d].mean(0)
    assert abs(probe_lib.regression_metrics(means[None], task)["r2"][0]) < 1e-6


def test_attentive_probe_finds_the_one_informative_token():
    tr = synthetic(256, seed=0, tokens=8)
    va, te = synthetic(96, seed=1, tokens=8), synthetic(96, seed=2, tokens=8)
    for f in (tr, va, te):  # pooled vectors are the (diluted) token means
        f.pooled = f.patches.mean(1)
    r = probe_lib.run_probe(tr, va, te, task="classification", target="label", probe="attentive",
                            lrs=(3e-3,), wds=(0.01,), epochs=15, batch_size=32, depth=1, heads=2)
    assert r["test"]["accuracy"] > 0.9


def test_ridge_fits_a_wide_linear_map_in_closed_form():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, 20))                    # 600 features that mix 20 latent factors, like embeddings
    x = z @ rng.normal(size=(20, 600)) + 0.1 * rng.normal(size=(300, 600))
    y = z @ rng.normal(size=(20, 3)) + 0.1 * rng.normal(size=(300, 3))
    (pred,) = probe_lib.fit_ridge(x[:200], y[:200], [x[200:]], alphas=(1e-3, 1e6))
    r2 = 1 - ((pred - y[200:]) ** 2).sum((1, 2)) / ((y[200:] - y[200:].mean(0)) ** 2).sum()
    assert r2[0] > 0.95 and abs(r2[1]) < 0.05  # more features than rows: still fits; a huge alpha predicts the mean


def test_ridge_probe_chooses_alpha_on_validation_and_classifies():
    tr, va, te = synthetic(120, seed=0, tokens=4), synthetic(48, seed=1, tokens=4), synthetic(48, seed=2, tokens=4)
    r = probe_lib.run_probe(tr, va, te, task="classification", target="label", probe="ridge")
    assert r["test"]["accuracy"] > 0.9 and set(r["best"]) == {"alpha"} and len(r["grid"]) == len(probe_lib.RIDGE_ALPHAS)
    assert r["val"]["accuracy"] == max(g["val"] for g in r["grid"])


def test_frame_tokens_are_the_tubelet_that_holds_the_frame():
    patches = np.repeat(np.arange(4, dtype=np.float32), 6)[None, :, None] * np.ones((2, 1, 5), np.float32)
    meta = {"grid": [4, 2, 3], "num_frames": 8}                         # 4 tubelets of 2 frames, 2x3 tokens each
    assert probe_lib.frame_tokens(patches, meta, -1).shape == (2, 6, 5)
    for frame, tubelet in ((-1, 3), (0, 0), (3, 1), (4, 2), (-8, 0)):
        assert (probe_lib.frame_tokens(patches, meta, frame) == tubelet).all()


def test_attentive_probe_knows_where_a_token_is():
    """The class is WHERE one marked token sits (left or right half); every token's content is otherwise the same
    kind of noise, so only the probe's position embeddings can tell the classes apart."""
    def where(n, seed):
        f = synthetic(n, seed=seed, tokens=8, classes=2)
        rng = np.random.default_rng(seed)
        f.patches = rng.normal(size=f.patches.shape).astype(np.float32) * 0.3
        pos = rng.integers(0, 4, n) + 4 * f.targets["label"]
        f.patches[np.arange(n), pos] += 2.0 * np.random.default_rng(5).normal(size=16).astype(np.float32)
        return f
    tr, va, te = where(256, 0), where(96, 1), where(96, 2)
    kw = dict(task="classification", target="label", lrs=(1e-2,), wds=(0.01,), epochs=15, batch_size=32, depth=0)
    assert probe_lib.run_probe(tr, va, te, probe="attentive", **kw)["test"]["accuracy"] > 0.9
    model = probe_lib.ProbeModel(kind="attentive", width=16, out=2, depth=0, tokens=0)  # no position embeddings:
    task = probe_lib.make_task(tr, "classification", "label", "attentive")               # blind to token order
    params, _, _ = probe_lib.train_grid(model, "classification", task.x, task.y, None, (1e-2,), (0.01,), epochs=15,
                                        batch_size=32)
    te_task = probe_lib.make_task(te, "classification", "label", "attentive")
    acc = (probe_lib.predict_grid(model, params, te_task.x)[0].argmax(-1) == te_task.y).mean()
    assert acc < 0.75


def _perturbed_grid(model, members, seed=0):
    """Stacked params of `members` probes with every leaf moved off its initial value (biases, LayerNorm shifts and
    the query all non-zero), so that no term of the pooler vanishes by accident."""
    import jax
    params = jax.vmap(model.init)(jax.random.split(jax.random.PRNGKey(seed), members))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [v + 0.3 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)])


def test_shared_input_pooler_is_the_per_member_probe():
    """apply_grid's depth-0 pooler (one shared input, no keys or values) computes what ProbeModel.apply computes
    member by member, outputs and gradients, with and without position embeddings and with several queries."""
    import jax
    import jax.numpy as jnp
    x = jax.random.normal(jax.random.PRNGKey(2), (5, 16, 24)) * 2 + 1  # offset: token centring matters

    @functools.partial(jax.jit, static_argnums=0)
    def both(model, params):  # (outputs, gradients) of the shared-input pooler and of the per-member probe
        per_member = lambda p: jax.vmap(model.apply, in_axes=(0, None))(p, x)
        shared = lambda p: probe_lib.apply_grid(model, p, x)
        grad = lambda f: jax.grad(lambda p: jnp.sum(jnp.sin(f(p))))(params)
        return shared(params), per_member(params), grad(shared), grad(per_member)

    for tokens, heads, queries in ((16, 2, 1), (0, 0, 3)):
        model = probe_lib.ProbeModel(kind="attentive", width=24, out=6, depth=0, tokens=tokens, heads=heads,
                                     num_queries=queries)
        out, ref, g_out, g_ref = both(model, _perturbed_grid(model, 3))
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)
        for a, b in zip(jax.tree.leaves(g_out), jax.tree.leaves(g_ref)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max() + 1))


def _largest_intermediate(closed) -> int:
    """Elements of the largest array any equation of a jaxpr (and the jaxprs inside it) produces."""
    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from walk(inner)
    return max(walk(closed.jaxpr))


def test_grid_training_step_holds_no_per_member_copy_of_the_input():
    """The depth-0 grid's forward and backward pass never makes a [members, batch, tokens, width] array (the
    vmap-ed probe does: x + pos per member, then its keys and values); such arrays made the README example hold
    15 GB. The same check on the vmap-ed depth-1 probe shows that it would notice."""
    import jax
    import jax.numpy as jnp
    g, b, length, d = 4, 8, 32, 16
    x, y = jnp.ones((b, length, d)), jnp.zeros((b,), jnp.int32)

    def largest(depth):
        model = probe_lib.ProbeModel(kind="attentive", width=d, out=3, depth=depth, tokens=length, heads=2)
        params = jax.vmap(model.init)(jax.random.split(jax.random.PRNGKey(0), g))
        step = jax.grad(lambda p: probe_lib.grid_loss(model, "classification", p, x, y, None).sum())
        return _largest_intermediate(jax.make_jaxpr(step)(params))

    assert largest(0) < g * b * length * d // 2
    assert largest(1) >= g * b * length * d


def test_members_trained_in_groups_match_members_trained_together(monkeypatch):
    """Probes with self-attention blocks train their members in groups that fit the activation budget; the
    grouping changes nothing in the result. Predictions in chunks of rows equal predictions at once."""
    tr = synthetic(48, seed=0, tokens=4)
    task = probe_lib.make_task(tr, "classification", "label", "attentive")
    model = probe_lib.ProbeModel(kind="attentive", width=16, out=3, depth=1, tokens=4, heads=2)
    kw = dict(epochs=2, batch_size=16)
    together, _, loss = probe_lib.train_grid(model, "classification", task.x, task.y, None, (1e-3, 1e-2),
                                             (0.0, 0.1), **kw)
    budget = probe_lib.activation_bytes(model, 16, 4) * 2
    assert probe_lib.members_per_group(model, 4, 16, 4, budget=budget) == 2
    monkeypatch.setattr(probe_lib, "ACTIVATION_BUDGET", budget)
    grouped, _, grouped_loss = probe_lib.train_grid(model, "classification", task.x, task.y, None, (1e-3, 1e-2),
                                                    (0.0, 0.1), **kw)
    import jax
    for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(grouped)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss, grouped_loss, rtol=1e-5)
    np.testing.assert_allclose(probe_lib.predict_grid(model, together, task.x, chunk=7),
                               probe_lib.predict_grid(model, together, task.x, chunk=48), rtol=1e-5, atol=1e-6)


def test_predictions_are_averaged_over_the_segments_of_a_clip():
    feats = synthetic(4, segments=2, classes=2)
    task = probe_lib.make_task(feats, "classification", "label", "linear")
    y = task.y
    logits = np.zeros((1, 4, 2))
    logits[0, np.arange(4), y] = [3.0, 0.0, 3.0, 0.0]          # window 0 of each clip confidently right
    logits[0, np.arange(4), 1 - y] = [0.0, 1.0, 0.0, 1.0]      # window 1 mildly wrong
    m = probe_lib.classification_metrics(logits, task)
    assert m["window_accuracy"][0] == 0.5 and m["accuracy"][0] == 1.0


def test_bad_targets_and_probes_are_named():
    feats = synthetic(8)
    with pytest.raises(ValueError, match="--target"):
        probe_lib.parse_target("label[0]")
    with pytest.raises(ValueError, match="--probe=attentive needs patch features"):
        probe_lib.make_task(feats, "classification", "label", "attentive")
    with pytest.raises(ValueError, match="--task=regression needs --target=states"):
        probe_lib.make_task(feats, "regression", "label", "linear")


def test_knn_on_separated_clusters():
    tr, va = synthetic(64, seed=0), synthetic(32, seed=1, segments=2)
    m = evaluators_lib.knn_metrics(tr, va, k=5)
    assert m["accuracy"] > 0.9
    with pytest.raises(ValueError, match="knn target"):
        evaluators_lib.knn_metrics(tr, va, target="states")


def test_eval_settings_are_validated():
    with pytest.raises(ValueError, match="config.evals.x.kind"):
        evaluators_lib._settings("x", {"every": 2})
    with pytest.raises(ValueError, match=r"config.evals.knn: unknown field\(s\) \['kk'\]"):
        evaluators_lib._settings("knn", {"every": 2, "kk": 3})
    assert evaluators_lib._settings("knn", {"every": 2})["k"] == 20
    with pytest.raises(ValueError, match="config.evals.probe.probe: 'ridge'"):
        evaluators_lib._settings("probe", {"probe": "ridge"})


def test_probe_evaluator_reports_on_clips_not_used_to_choose_the_grid_member():
    """The eval split's labels are shifted by one class: the probe that learned scores 0 there, the untrained one
    (lr 0) does better. Choosing on the reported split would pick the untrained probe; the evaluator chooses on
    held-out training clips, so it picks the learned probe and reports its 0."""
    tr, va = synthetic(256, classes=8, seed=0), synthetic(64, classes=8, seed=1)
    va.targets["label"] = (va.targets["label"] + 1) % 8
    settings = evaluators_lib._settings("probe", dict(lrs=(0.0, 3e-2), wds=(0.0,), epochs=10))
    direct = probe_lib.run_probe(tr, va, va, task="classification", lrs=(0.0, 3e-2), wds=(0.0,), epochs=10)
    assert direct["best"]["lr"] == 0.0 and direct["test"]["accuracy"] > 0.0  # what selecting on va reports
    assert evaluators_lib.probe_metrics(tr, va, settings) == {"accuracy": 0.0, "window_accuracy": 0.0}
    with pytest.raises(ValueError, match="config.evals.p: the probe needs at least 2 training clips"):
        evaluators_lib.probe_metrics(probe_lib.select_rows(tr, np.arange(256) == 0), va, settings, name="p")


@pytest.mark.slow
def test_evaluators_run_during_training(tiny_config, tmp_path):
    from jepa import train as train_lib
    tiny_config.evals = {"knn": dict(every=3, k=2, max_clips=4, eval_split="test"),
                         "probe": dict(every=6, max_clips=4, epochs=2, eval_split="test")}
    train_lib.train(tiny_config, str(tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if any(k.startswith("eval/") for k in r)}
    assert sorted(evals) == [3, 6]
    assert 0.0 <= evals[3]["eval/knn/accuracy"] <= 1.0 and "eval/probe/accuracy" not in evals[3]
    assert 0.0 <= evals[6]["eval/probe/accuracy"] <= 1.0 and "eval/knn/accuracy" in evals[6]


EVAL_SCRIPT = r"""
import json, sys
import numpy as np
sys.path.insert(0, "tests")
from conftest import local_config
from jepa import evaluators, runs, sharding
world_dir, out, *dist = sys.argv[1:]
c = local_config(world_dir, "")
c.mesh = dict(data=-1, fsdp=1, tensor=1)
with c.distributed.ignore_type():
    for arg in dist:  # --config.distributed.FIELD=VALUE from launch/local.py
        field, value = arg[len("--config.distributed."):].split("=", 1)
        c.distributed[field] = type(c.distributed[field])(value)
sharding.initialize_distributed(c.distributed)
import jax
c.evals = {"knn": dict(every=1, k=2, max_clips=6, batch_size=4, eval_split="train"),
           "probe": dict(every=1, max_clips=6, batch_size=4, epochs=2, lrs=(1e-3,), wds=(0.0,))}
from jepa import objectives
params = runs.random_encoder(c)
result = {"processes": jax.process_count()}
for ev in evaluators.build(c, sharding.make_mesh(c.mesh), objectives.build(c)):
    result[ev.name] = ev(params)
    feats = ev.features("train", params)
    result[ev.name + "/clips"] = feats.clip_ids
    result[ev.name + "/pooled"] = np.asarray(feats.pooled).tolist()
if jax.process_index() == 0:
    json.dump(result, open(out, "w"))
"""


@pytest.mark.slow
def test_evaluators_gather_every_process_rows(tmp_path, world_dir):
    """2 processes x 1 device embed the same clips, metrics and features as 1 process x 2 devices."""
    import os
    import subprocess
    import sys

    from conftest import REPO
    sys.path.insert(0, os.path.join(REPO, "launch"))
    try:
        import local
    finally:
        sys.path.pop(0)
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable, "-c", EVAL_SCRIPT, world_dir]
    procs = local.launch(cmd + [str(tmp_path / "two.json")], 2, 1, str(tmp_path / "logs"), env=env, cwd=REPO)
    assert local.wait(procs, 500) == 0, open(tmp_path / "logs" / "process_0.log").read()[-4000:]
    one = subprocess.run(cmd + [str(tmp_path / "one.json")], cwd=REPO, env=local.process_env(2, env),
                         capture_output=True, text=True, timeout=500)
    assert one.returncode == 0, one.stderr[-4000:]
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["knn/clips"] == one["knn/clips"] == [f"world/{i}" for i in range(4)]
    np.testing.assert_allclose(two["knn/pooled"], one["knn/pooled"], rtol=1e-4, atol=1e-5)
    assert two["knn"] == one["knn"]
    for key, value in one["probe"].items():
        np.testing.assert_allclose(two["probe"][key], value, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_cli_on_the_fly_probe(tiny_run, capsys):
    result = probe_lib.main([f"--workdir={tiny_run}", "--task=regression", "--target=states[-1]",
                             "--probe=attentive", "--lrs=1e-3", "--wds=0.01", "--epochs=2",
                             "--config.data.eval_mode=uniform", "--config.data.num_segments=2"])
    assert result["rows"] == {"train": 8, "val": 2, "test": 2}
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["probe"] == "attentive"


def test_world_probe_benchmark_compares_the_run_with_random_init(tiny_run, tmp_path):
    """The benchmark end to end on real episodes: every domain needs windows in train, validation and test, so a
    20-episode version of the tiny preset (one episode per domain in validation and in test)."""
    config = runs.load_config(tiny_run)
    config.data.sources.world.data_dir = str(tmp_path)
    result = probe_lib.benchmark(tiny_run, num_segments=2, epochs=2, lrs=(1e-3,), wds=(0.01,), progress=False,
                                 episodes=20, layers=(0, 1), config=config)
    assert list(result) == ["step 6", "random init"]
    for r in result.values():
        assert set(r) == {"linear/domain", "linear/keypoints[-1]", "ridge/domain", "ridge/keypoints[-1]",
                          "effective_rank"}
        kp = r["ridge/keypoints[-1]"]
        assert set(kp["per_domain"]) == {0, 1} and kp["per_domain"][0]["rows"] == {"train": 16, "val": 2, "test": 2}
        assert np.isfinite(kp["test"]["r2_pos"]) and np.isfinite(kp["test"]["r2_vel"])
        assert 0.0 <= r["ridge/domain"]["test"]["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="--layers: 'x' is not a comma list of integers"):
        probe_lib.main(["benchmark", f"--workdir={tiny_run}", "--layers=x"])
    table = probe_lib.format_table(result)
    assert "ridge/keypoints[-1]: test r2_pos" in table and "random init" in table
