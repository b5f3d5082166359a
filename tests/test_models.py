"""Tests of jepa/models: shapes and parameter counts for every size, 3D RoPE facts, the encoder against an
independent PyTorch-style reference written here (Conv3d patch embedding, per-slice rotate_queries_or_keys),
predictor invariances, init statistics, scan / remat / bfloat16 variants, and the pure functional boundary."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jepa import config as config_lib
from jepa import models
from jepa.models import layers, rope
from jepa.models.predictor import Predictor
from jepa.models.vit import ENCODER_SIZES, VisionTransformer, token_grid
from jepa.optim import decay_mask

SMALL = dict(width=48, depth=2, heads=2, mlp_dim=96, patch_size=4, tubelet_size=2)


def small_encoder(random: float | None = None, seed: int = 0, **kw):
    """A small encoder: initialised as in training, or (random=scale) with random values everywhere, built
    without running the initialisers (zero biases / unit scales would hide layout mistakes)."""
    return make(VisionTransformer, random, seed, **{**SMALL, **kw})


def make(cls, random, seed, **kw):
    if random is None:
        return cls(**kw, rngs=nnx.Rngs(seed))
    abstract = nnx.eval_shape(lambda: cls(**kw, rngs=nnx.Rngs(seed)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed + 1)
    leaves = [jnp.asarray(rng.standard_normal(x.shape) * random, jnp.float32) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


@functools.cache
def _apply(graphdef):
    return jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))


def run(model, *args):
    """model(*args) under jit (eager NNX calls dispatch op by op and are much slower)."""
    graphdef, params = nnx.split(model, nnx.Param)
    return _apply(graphdef)(params, *args)


def video_of(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def model_config(**enc):
    """config.model (every field declared by jepa.config) with a tiny-size encoder, patch 16, float32."""
    c = config_lib.base_config().model
    c.encoder.update(size="tiny", width=0, depth=0, heads=0, mlp_dim=0, patch_size=16, tubelet_size=2)
    c.encoder.update(enc)
    c.predictor.update(width=384, depth=12, heads=12, num_mask_tokens=10)
    c.rope_layout, c.dtype, c.remat = "reference", "float32", "none"
    return c


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------ sizes, shapes, parameter counts


def expected_block_params(w, m):
    # LN1 (2w) + qkv (w*3w + 3w) + proj (w*w + w) + LN2 (2w) + fc1 (w*m + m) + fc2 (m*w + w)
    return 2 * w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (w * m + m) + (m * w + w)


def expected_encoder_params(w, d, m, patch=16, tubelet=2, c=3):
    return (c * tubelet * patch * patch * w + w) + d * expected_block_params(w, m) + 2 * w


def expected_predictor_params(enc_w, w, d, m, n_mask):
    return (enc_w * w + w) + n_mask * w + d * expected_block_params(w, m) + 2 * w + (w * enc_w + enc_w)


@pytest.mark.parametrize("size", list(ENCODER_SIZES))
def test_sizes_shapes_and_param_counts(size):
    cfg = model_config(size=size)
    grid = token_grid(4, 32, 16, 2)  # (2, 2, 2)
    enc = nnx.eval_shape(lambda: models.build_encoder(cfg, nnx.Rngs(0)))  # no allocation
    pred = nnx.eval_shape(lambda: models.build_predictor(cfg, grid, nnx.Rngs(0)))
    d = ENCODER_SIZES[size]
    w, depth, m = d["width"], d["depth"], d["mlp_dim"]
    assert count(nnx.state(enc, nnx.Param)) == expected_encoder_params(w, depth, m)
    assert count(nnx.state(pred, nnx.Param)) == expected_predictor_params(w, 384, 12, 4 * 384, 10)

    graphdef, params = nnx.split(enc, nnx.Param)
    video = jax.ShapeDtypeStruct((2, 4, 32, 32, 3), jnp.float32)
    idx = jax.ShapeDtypeStruct((2, 3), jnp.int32)
    out = jax.eval_shape(lambda p, v, i: nnx.merge(graphdef, p)(v, i), params, video, idx)
    assert out.shape == (2, 3, w) and out.dtype == jnp.float32
    out = jax.eval_shape(lambda p, v: nnx.merge(graphdef, p)(v), params, video)
    assert out.shape == (2, 8, w)
    pgraph, pparams = nnx.split(pred, nnx.Param)
    ctx = jax.ShapeDtypeStruct((2, 3, w), jnp.float32)
    tgt = jax.ShapeDtypeStruct((2, 5), jnp.int32)
    out = jax.eval_shape(lambda p, c, i, t: nnx.merge(pgraph, p)(c, i, t, 1), pparams, ctx, idx, tgt)
    assert out.shape == (2, 5, w)


def test_published_sizes_and_vit_giant_count():
    assert ENCODER_SIZES["large"] == dict(width=1024, depth=24, heads=16, mlp_dim=4096)
    assert ENCODER_SIZES["huge"] == dict(width=1280, depth=32, heads=16, mlp_dim=5120)
    assert ENCODER_SIZES["giant"] == dict(width=1408, depth=40, heads=22, mlp_dim=6144)
    enc = nnx.eval_shape(lambda: models.build_encoder(model_config(size="giant"), nnx.Rngs(0)))
    n = count(nnx.state(enc, nnx.Param))
    assert 1.00e9 < n < 1.02e9, n  # ViT-g/16: ~1.01B
    # ViT-L/16, tubelet 2, written out: patch embed 3*2*16*16*1024 + 1024, 24 blocks, final LN.
    enc = nnx.eval_shape(lambda: models.build_encoder(model_config(size="large"), nnx.Rngs(0)))
    per_block = 4 * 1024 ** 2 + 2 * 1024 * 4096 + 9 * 1024 + 4096
    assert count(nnx.state(enc, nnx.Param)) == 3 * 2 * 16 * 16 * 1024 + 1024 + 24 * per_block + 2 * 1024


def test_config_overrides_and_resolved_dims():
    cfg = model_config(size="small", depth=3, mlp_dim=100, patch_size=8)
    cfg.predictor.update(width=32, depth=1, heads=2, num_mask_tokens=4)
    dims = models.resolved_dims(cfg)
    assert dims["encoder"] == dict(width=384, depth=3, heads=6, mlp_dim=100, patch_size=8, tubelet_size=2)
    assert dims["predictor"] == dict(width=32, depth=1, heads=2, num_mask_tokens=4, mlp_dim=128)
    enc = nnx.eval_shape(lambda: models.build_encoder(cfg, nnx.Rngs(0)))
    assert enc.blocks.fc1_kernel.shape == (3, 384, 100) and enc.patch_kernel.shape == (2, 8, 8, 3, 384)
    pred = nnx.eval_shape(lambda: models.build_predictor(cfg, (2, 4, 4), nnx.Rngs(0)))
    assert pred.mask_tokens.shape == (4, 32) and pred.proj_kernel.shape == (32, 384)
    for bad, match in [(dict(size="enormous"), "size"), (dict(width=-1), "width")]:
        with pytest.raises(ValueError, match=match):
            models.resolved_dims(model_config(**bad))
    cfg.dtype = "float16"
    with pytest.raises(ValueError, match="dtype"):
        models.build_encoder(cfg, nnx.Rngs(0))


def test_token_grid_and_input_errors():
    assert token_grid(16, 256, 16, 2) == (8, 16, 16)
    assert token_grid(8, (64, 96), 8, 2) == (4, 8, 12)
    with pytest.raises(ValueError, match="tubelet_size"):
        token_grid(7, 64, 8, 2)
    with pytest.raises(ValueError, match="patch_size"):
        token_grid(8, 60, 8, 2)
    enc = small_encoder()
    with pytest.raises(ValueError, match="patch_size"):
        enc(jnp.zeros((1, 4, 10, 8, 3)))
    with pytest.raises(ValueError, match="video"):
        enc(jnp.zeros((1, 4, 8, 8)))
    with pytest.raises(ValueError, match="token_idx"):
        enc(jnp.zeros((1, 4, 8, 8, 3)), jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="heads"):
        VisionTransformer(width=50, depth=1, heads=3, mlp_dim=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rope_layout"):
        VisionTransformer(width=48, depth=1, heads=2, mlp_dim=8, rope_layout="bogus", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="remat"):
        VisionTransformer(width=48, depth=1, heads=2, mlp_dim=8, remat="some", rngs=nnx.Rngs(0))


# ------------------------------------------------------------------ RoPE


def hand_angles(pos, d, layout):
    """Per-element angles of one slice, written out element by element."""
    half = d // 2
    out = []
    for j in range(d):
        i = j % half if layout == "reference" else j // 2
        out.append(pos * (1.0 / 10000 ** (i / half)))
    return np.array(out)


def hand_rotate(x, angles):
    """x [D] rotated with per-element angles: (x[2i], x[2i+1]) -> x*cos + (-x[2i+1], x[2i])*sin."""
    y = np.empty_like(x)
    y[0::2], y[1::2] = -x[1::2], x[0::2]
    return x * np.cos(angles) + y * np.sin(angles)


@pytest.mark.parametrize("layout", rope.LAYOUTS)
def test_rope_tables_match_hand_construction(layout):
    head_dim = 14  # slices of 2*((14//3)//2) = 4, remainder 2
    assert rope.slice_dim(head_dim) == 4 and rope.slice_dim(64) == 20 and rope.slice_dim(32) == 10
    grid = (3, 4, 5)
    cos, sin = rope.rope_tables(grid, head_dim, layout)
    pos = rope.grid_positions(grid)
    x = np.random.default_rng(0).standard_normal((1, 1, len(pos), head_dim)).astype(np.float32)
    got = np.asarray(rope.apply_rope(jnp.asarray(x), jnp.asarray(cos)[None, None], jnp.asarray(sin)[None, None]))
    for n, (t, h, w) in enumerate(pos):
        ang = np.concatenate([hand_angles(t, 4, layout), hand_angles(h, 4, layout), hand_angles(w, 4, layout)])
        np.testing.assert_allclose(np.cos(ang), cos[n, :12], atol=1e-6)
        want = np.concatenate([hand_rotate(x[0, 0, n, :12].astype(np.float64), ang), x[0, 0, n, 12:]])
        np.testing.assert_allclose(got[0, 0, n], want, atol=1e-5)
        np.testing.assert_array_equal(got[0, 0, n, 12:], x[0, 0, n, 12:])  # remainder untouched, bit for bit
    # the two layouts: reference tiles [f0, f1, f0, f1], interleaved repeats [f0, f0, f1, f1]
    np.testing.assert_allclose(rope.axis_angles(np.array([2.0]), 4, "reference")[0], [2, 0.02, 2, 0.02])
    np.testing.assert_allclose(rope.axis_angles(np.array([2.0]), 4, "interleaved")[0], [2, 2, 0.02, 0.02])


def test_rope_odd_head_dim_leaves_last_element():
    cos, sin = rope.rope_tables((2, 2, 2), 7, "interleaved")  # slices of 2, rotated 6, last element alone
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 8, 7))
    y = rope.apply_rope(x, jnp.asarray(cos)[None, None], jnp.asarray(sin)[None, None])
    np.testing.assert_array_equal(y[..., 6], x[..., 6])
    assert not np.allclose(y[..., :6], x[..., :6])


def rope_scores(layout, shift, head_dim=32):
    """q.k scores of random q, k at grid positions moved by `shift` (t, h, w) inside a larger grid."""
    base = np.array([[0, 0, 0], [1, 2, 3], [2, 1, 0], [0, 3, 1]])
    grid = (6, 8, 8)
    flat = lambda p: (p[:, 0] * grid[1] + p[:, 1]) * grid[2] + p[:, 2]
    idx = jnp.asarray(flat(base + np.asarray(shift)))[None]
    cos, sin = rope.token_tables(rope.rope_tables(grid, head_dim, layout), idx)
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((1, 1, 4, head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 4, head_dim)), jnp.float32)
    q, k = rope.apply_rope(q, cos[:, None], sin[:, None]), rope.apply_rope(k, cos[:, None], sin[:, None])
    return np.asarray(jnp.einsum("bhqd,bhkd->bhqk", q, k))


def test_rope_scores_depend_only_on_relative_positions():
    # the true rotation (interleaved layout): shifting every position leaves all q.k scores unchanged
    ref = rope_scores("interleaved", (0, 0, 0))
    for shift in [(1, 0, 0), (0, 3, 0), (0, 0, 4), (3, 2, 1)]:
        np.testing.assert_allclose(rope_scores("interleaved", shift), ref, rtol=1e-4, atol=1e-4)
        # the reference layout is not a rotation per pair: scores move with absolute positions (the quirk)
        assert not np.allclose(rope_scores("reference", shift), rope_scores("reference", (0, 0, 0)), atol=1e-3)


# ------------------------------------------------------------------ encoder against an independent reference


def torch_style_encoder(params, video, token_idx, *, heads, patch, tubelet, layout):
    """The reference computation written independently: Conv3d on (B, C, T, H, W) with the (width, C, t, p, p)
    weight, flatten to time-major tokens, drop to token_idx, blocks with rotate_queries_or_keys per slice."""
    p = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
    w_conv = p["patch_kernel"].transpose(4, 3, 0, 1, 2)  # ours (t, p, p, C, w) -> torch (w, C, t, p, p)
    x = jax.lax.conv_general_dilated(jnp.asarray(video).transpose(0, 4, 1, 2, 3), jnp.asarray(w_conv),
                                     window_strides=(tubelet, patch, patch), padding="VALID",
                                     dimension_numbers=("NCDHW", "OIDHW", "NCDHW"),
                                     precision=jax.lax.Precision.HIGHEST)
    x = np.asarray(x) + p["patch_bias"][None, :, None, None, None]
    b, width, t_, h_, w_ = x.shape
    x = x.reshape(b, width, -1).transpose(0, 2, 1)  # flatten(2).transpose(1, 2): time-major, then h, then w
    ids = np.asarray(token_idx)
    x = np.take_along_axis(x, ids[..., None], axis=1).astype(np.float64)
    t_ids, rem = ids // (h_ * w_), ids % (h_ * w_)
    h_ids, w_ids = rem // w_, rem % w_

    def ln(z, s, bias):
        mu = z.mean(-1, keepdims=True)
        var = ((z - mu) ** 2).mean(-1, keepdims=True)
        return (z - mu) / np.sqrt(var + 1e-6) * s + bias

    def rotate(z, pos, d):  # rotate_queries_or_keys: z [B, H, N, d], pos [B, N]
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
        freq = pos[:, None, :, None] * omega
        if layout == "reference":
            emb_sin, emb_cos = np.tile(np.sin(freq), 2), np.tile(np.cos(freq), 2)
        else:
            emb_sin, emb_cos = np.repeat(np.sin(freq), 2, -1), np.repeat(np.cos(freq), 2, -1)
        y = np.stack([-z[..., 1::2], z[..., 0::2]], axis=-1).reshape(z.shape)
        return z * emb_cos + y * emb_sin

    from scipy.special import erf
    hd = width // heads
    d = 2 * ((hd // 3) // 2)
    blocks = p["blocks"]
    for i in range(blocks["qkv_kernel"].shape[0]):
        bp = {k: v[i] for k, v in blocks.items()}
        h = ln(x, bp["norm1_scale"], bp["norm1_bias"])
        qkv = (h @ bp["qkv_kernel"] + bp["qkv_bias"]).reshape(b, -1, 3, heads, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv
        parts_q, parts_k, s = [], [], 0
        for pos in (t_ids, h_ids, w_ids):
            parts_q.append(rotate(q[..., s:s + d], pos, d))
            parts_k.append(rotate(k[..., s:s + d], pos, d))
            s += d
        q = np.concatenate(parts_q + [q[..., s:]], -1)
        k = np.concatenate(parts_k + [k[..., s:]], -1)
        att = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = (att @ v).transpose(0, 2, 1, 3).reshape(b, -1, width)
        x = x + o @ bp["proj_kernel"] + bp["proj_bias"]
        h = ln(x, bp["norm2_scale"], bp["norm2_bias"]) @ bp["fc1_kernel"] + bp["fc1_bias"]
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = x + h @ bp["fc2_kernel"] + bp["fc2_bias"]
    return ln(x, p["norm_scale"], p["norm_bias"])


@pytest.mark.parametrize("layout", rope.LAYOUTS)
def test_encoder_matches_reference_computation(layout):
    pytest.importorskip("scipy")
    enc = small_encoder(0.3, rope_layout=layout, width=42, heads=2)  # head_dim 21: slices 10, remainder 1
    video = video_of((2, 4, 12, 8, 3))  # grid (2, 3, 2): 12 tokens
    idx = jnp.asarray([[11, 0, 5, 7, 3], [2, 9, 10, 1, 4]], jnp.int32)
    want = torch_style_encoder(nnx.state(enc, nnx.Param), video, idx, heads=2, patch=4, tubelet=2, layout=layout)
    np.testing.assert_allclose(np.asarray(run(enc, video, idx)), want, rtol=2e-4, atol=2e-4)
    full = torch_style_encoder(nnx.state(enc, nnx.Param), video, np.tile(np.arange(12), (2, 1)), heads=2,
                               patch=4, tubelet=2, layout=layout)
    np.testing.assert_allclose(np.asarray(run(enc, video)), full, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("scan", [True, False])
def test_encoder_returns_intermediate_layers_of_a_manual_forward(scan):
    """return_layers: block i's output after the final LayerNorm equals the reference computation run on the
    first i + 1 blocks; the output itself is unchanged, and only the requested blocks come back."""
    pytest.importorskip("scipy")
    enc = small_encoder(0.3, depth=3, scan=scan)
    video = video_of((2, 4, 12, 8, 3))
    idx = jnp.asarray([[11, 0, 5, 7, 3], [2, 9, 10, 1, 4]], jnp.int32)
    graphdef, params = nnx.split(enc, nnx.Param)
    x, out = jax.jit(lambda p: nnx.merge(graphdef, p)(video, idx, return_layers=(0, -2)))(params)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(run(enc, video, idx)))
    assert sorted(out["blocks"]) == [0, 1]
    pure = nnx.to_pure_dict(params)
    for i in (0, 1):
        head = nnx.state(small_encoder(0.3, depth=i + 1), nnx.Param)  # the first i + 1 blocks
        nnx.replace_by_pure_dict(head, dict(pure, blocks={k: v[:i + 1] for k, v in pure["blocks"].items()}))
        want = torch_style_encoder(head, video, idx, heads=2, patch=4, tubelet=2, layout="reference")
        np.testing.assert_allclose(np.asarray(out["blocks"][i]), want, rtol=2e-4, atol=2e-4)
    _, last = jax.jit(lambda p: nnx.merge(graphdef, p)(video, idx, return_layers=(-1,)))(params)
    np.testing.assert_array_equal(np.asarray(last["blocks"][2]), np.asarray(x))
    with pytest.raises(ValueError, match="return_layers: 3 is out of range"):
        enc(video, idx, return_layers=(3,))


def test_encoder_token_order_equivariance_and_subset():
    enc = small_encoder(0.3)
    video = video_of((2, 4, 16, 16, 3))  # grid (2, 4, 4): 32 tokens
    rng = np.random.default_rng(0)
    idx = np.stack([np.sort(rng.choice(32, 10, replace=False)) for _ in range(2)]).astype(np.int32)
    out = run(enc, video, jnp.asarray(idx))
    perm = rng.permutation(10)
    np.testing.assert_allclose(run(enc, video, jnp.asarray(idx[:, perm])), out[:, perm], rtol=1e-5, atol=1e-5)
    # the subset differs from the full clip's outputs at those tokens (attention sees fewer tokens) ...
    full = run(enc, video)
    assert not np.allclose(np.take_along_axis(np.asarray(full), idx[..., None], 1), out, atol=1e-3)
    # ... and all tokens in grid order equal the full clip
    np.testing.assert_allclose(run(enc, video, jnp.tile(jnp.arange(32, dtype=jnp.int32), (2, 1))), full, atol=1e-5)


# ------------------------------------------------------------------ init, predictor


def test_init_statistics():
    enc = VisionTransformer(width=256, depth=4, heads=4, mlp_dim=512, patch_size=8, rngs=nnx.Rngs(0))
    b = enc.blocks
    for name in ("qkv_kernel", "fc1_kernel"):
        assert abs(float(jnp.std(b.__getattribute__(name)[...])) - 0.02) < 5e-4
    assert abs(float(jnp.std(enc.patch_kernel[...])) - 0.02) < 5e-4
    assert float(jnp.max(jnp.abs(b.qkv_kernel[...]))) <= 2.0  # the reference truncates at +-2 (absolute)
    for name in ("proj_kernel", "fc2_kernel"):
        stds = np.std(np.asarray(b.__getattribute__(name)[...]), axis=(1, 2))
        np.testing.assert_allclose(stds, 0.02 / np.sqrt(2.0 * np.arange(1, 5)), rtol=0.05)
    for name in layers.Blocks.PARAM_NAMES:
        value = np.asarray(getattr(b, name)[...])
        if name.endswith("_bias"):
            assert not value.any(), name
        if name.endswith("_scale"):
            assert (value == 1).all(), name
    assert not np.asarray(enc.patch_bias[...]).any() and (np.asarray(enc.norm_scale[...]) == 1).all()


def small_predictor(random: float | None = None, grid=(2, 4, 4), seed: int = 0, **kw):
    return make(Predictor, random, seed, encoder_width=48, width=32, depth=2, heads=2, num_mask_tokens=3,
                grid=grid, **kw)


def predictor_inputs(seed=0, nc=9, nt=7):
    rng = np.random.default_rng(seed)
    perm = np.stack([rng.permutation(32) for _ in range(2)])
    ctx = jnp.asarray(np.sort(perm[:, :nc], 1), jnp.int32)
    tgt = jnp.asarray(np.sort(perm[:, nc:nc + nt], 1), jnp.int32)
    return video_of((2, nc, 48), seed), ctx, tgt


def test_predictor_mask_tokens_and_mask_index():
    pred = small_predictor()
    assert not np.asarray(pred.mask_tokens[...]).any()  # zero init
    context, ctx, tgt = predictor_inputs()
    out0 = run(pred, context, ctx, tgt, 0)
    assert out0.shape == (2, 7, 48) and out0.dtype == jnp.float32
    np.testing.assert_allclose(run(pred, context, ctx, tgt, 2), out0)  # identical while the tokens are equal
    pred.mask_tokens[...] = jax.random.normal(jax.random.PRNGKey(3), (3, 32))
    assert not np.allclose(run(pred, context, ctx, tgt, 2), run(pred, context, ctx, tgt, 0), atol=1e-4)
    # a traced mask index (e.g. inside jit) selects the same token as the python int
    graphdef, params = nnx.split(pred, nnx.Param)
    f = jax.jit(lambda p, i: nnx.merge(graphdef, p)(context, ctx, tgt, i))
    np.testing.assert_allclose(f(params, jnp.int32(2)), run(pred, context, ctx, tgt, 2), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mask_index"):
        pred(context, ctx, tgt, 3)
    with pytest.raises(ValueError, match="context_tokens"):
        pred(context[..., :10], ctx, tgt, 0)


def test_predictor_order_invariance_no_sort_needed():
    pred = small_predictor(0.3)
    context, ctx, tgt = predictor_inputs()
    out = run(pred, context, ctx, tgt, 1)
    pc, pt = np.random.default_rng(1).permutation(9), np.random.default_rng(2).permutation(7)
    out2 = run(pred, context[:, pc], ctx[:, pc], tgt[:, pt], 1)
    np.testing.assert_allclose(out2, out[:, pt], rtol=1e-5, atol=1e-5)
    # positions matter: moving the targets elsewhere changes the predictions
    assert not np.allclose(run(pred, context, ctx, (tgt + 1) % 32, 1), out, atol=1e-4)


# ------------------------------------------------------------------ variants and the functional boundary


def test_pure_boundary_only_params():
    enc, pred = small_encoder(), small_predictor()
    for model in (enc, pred):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        assert len(jax.tree.leaves(rest)) == 0
    graphdef, params = nnx.split(enc, nnx.Param)
    pure = nnx.to_pure_dict(params)
    video = video_of((2, 4, 8, 8, 3))
    f = jax.jit(lambda p, v: nnx.merge(graphdef, nnx.State(p))(v))
    np.testing.assert_allclose(f(pure, video), run(enc, video), rtol=1e-5, atol=1e-5)
    mask = decay_mask(pure)
    assert mask["blocks"]["qkv_kernel"] is True and mask["patch_kernel"] is True
    assert mask["blocks"]["qkv_bias"] is False and mask["norm_scale"] is False
    assert mask["blocks"]["norm1_scale"] is False  # stacked [depth, width]: excluded by name, not by ndim
    pmask = decay_mask(nnx.to_pure_dict(nnx.state(pred, nnx.Param)))
    assert pmask["mask_tokens"] is True and pmask["blocks"]["norm1_scale"] is False  # as the reference


def loss_and_grads(model, video, idx):
    graphdef, params = nnx.split(model, nnx.Param)
    loss = lambda p: jnp.mean(jnp.square(nnx.merge(graphdef, p)(video, idx)))
    return jax.jit(jax.value_and_grad(loss))(params)


def test_scan_unrolled_and_remat_agree():
    video = video_of((2, 4, 8, 8, 3))
    idx = jnp.asarray([[0, 3, 5, 6], [1, 2, 4, 7]], jnp.int32)
    ref_loss, ref_grads = loss_and_grads(small_encoder(0.3, depth=3), video, idx)
    for kw in [dict(scan=False), dict(remat="full"), dict(remat="dots")]:
        loss, grads = loss_and_grads(small_encoder(0.3, depth=3, **kw), video, idx)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, ref_grads)


def test_custom_derivatives_match_autodiff():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16)) * 3
    np.testing.assert_allclose(layers.gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda z: jnp.sum(jnp.sin(layers.gelu(z))))(x),
                               jax.grad(lambda z: jnp.sum(jnp.sin(jax.nn.gelu(z, approximate=False))))(x),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.grad(lambda z: jnp.sum(jnp.sin(layers.softmax(z))))(x),
                               jax.grad(lambda z: jnp.sum(jnp.sin(jax.nn.softmax(z))))(x), rtol=1e-5, atol=1e-6)
    s, b = jnp.linspace(0.5, 1.5, 16), jnp.linspace(-1, 1, 16)

    def plain_ln(z):
        mu = z.mean(-1, keepdims=True)
        return (z - mu) / jnp.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * s + b

    np.testing.assert_allclose(layers.layer_norm(x, s, b, jnp.float32), plain_ln(x), rtol=1e-5, atol=1e-5)
    g1 = jax.grad(lambda z: jnp.sum(jnp.sin(layers.layer_norm(z, s, b, jnp.float32))))(x)
    g2 = jax.grad(lambda z: jnp.sum(jnp.sin(plain_ln(z))))(x)
    np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_runs():
    video = video_of((2, 4, 8, 8, 3))
    idx = jnp.asarray([[0, 3, 5, 6], [1, 2, 4, 7]], jnp.int32)
    f32 = small_encoder(0.05)
    bf16 = small_encoder(0.05, dtype=jnp.bfloat16)
    out = run(bf16, video, idx)
    assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    np.testing.assert_allclose(out, run(f32, video, idx), atol=0.1)
    loss, grads = loss_and_grads(bf16, video, idx)
    assert np.isfinite(float(loss)) and all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    pred = small_predictor(0.05, dtype=jnp.bfloat16)
    context, ctx, tgt = predictor_inputs()
    assert run(pred, context, ctx, tgt, 0).dtype == jnp.float32


# ------------------------------------------------------------------ the objective's numerics and the step benchmark


def pinned_loss_setup():
    """A tiny V-JEPA config (fields that change the loss set explicitly), its token grid and a fixed batch."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("quickstart_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    c.data.num_frames, c.data.resolution = 8, 32
    c.model.encoder.update(size="tiny", width=48, depth=2, heads=2, mlp_dim=96, patch_size=8, tubelet_size=2)
    c.model.predictor.update(width=24, depth=2, heads=2, num_mask_tokens=4)
    c.model.rope_layout, c.model.dtype, c.model.remat = "reference", "float32", "none"
    c.loss.exponent = 1.0
    c.loss.variance_weight = c.loss.covariance_weight = 0.0  # the V-JEPA 2 loss alone
    c.mask.types.long.mask_token, c.mask.types.short.mask_token = 1, 0
    grid = token_grid(8, 32, 8, 2)  # (4, 4, 4): 64 tokens
    rng = np.random.default_rng(7)
    batch = {"video": rng.integers(0, 256, (3, 8, 32, 32, 3), dtype=np.uint8)}
    for name, nc, nt in (("long", 9, 40), ("short", 20, 33)):
        perm = np.stack([rng.permutation(64) for _ in range(3)])
        batch[f"{name}/context_idx"] = perm[:, :nc].astype(np.int32)
        batch[f"{name}/target_idx"] = perm[:, nc:nc + nt].astype(np.int32)
    return c, grid, batch


# VJEPA.loss on pinned_loss_setup() with params from PRNGKey(0) and ema = 1.5 * encoder params, computed with
# the objective before the CPU speed work (its SVD-based effective rank included): the loss, its parts and the
# gradient must not move beyond float32 round-off when the compute is reorganised.
PINNED = {"loss": 0.8011913299560547, "loss/long": 0.8009396195411682, "loss/short": 0.8014430403709412,
          "repr/std": 0.9739060401916504, "repr/effective_rank": 44.59557342529297}
PINNED_GRAD_NORM = 16.491792678833008


def test_vjepa_loss_matches_pinned_values():
    from jepa.objectives.vjepa import VJEPA

    c, grid, batch = pinned_loss_setup()
    objective = VJEPA.from_config(c, grid)
    params, _ = objective.init(jax.random.PRNGKey(0), c)
    ema = jax.tree.map(lambda x: x * 1.5, params["encoder"])
    (loss, aux), grads = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))(params, ema, batch)
    got = {"loss": float(loss), **{k: float(v) for k, v in aux.items()}}
    for key, want in PINNED.items():
        assert got[key] == pytest.approx(want, rel=1e-5 if key != "repr/effective_rank" else 2e-4), key
    grad_norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))))
    assert grad_norm == pytest.approx(PINNED_GRAD_NORM, rel=1e-4)


def test_context_token_weights_follow_distance_to_the_masked_region():
    from jepa.objectives.vjepa import context_token_weights

    grid = (1, 1, 6)  # one row of 6 tokens; token 0 is masked, tokens 1..5 are context
    weights = np.asarray(context_token_weights(jnp.asarray([[1, 2, 3, 5]]), grid))
    # token 4 is masked too: distances 1, 2, 1 (to 4), 1 (to 4)
    np.testing.assert_allclose(weights, [[1.0, 2 ** -0.5, 1.0, 1.0]], rtol=1e-6)
    grid = (2, 3, 3)  # 3D: only the last token, (t=1, h=2, w=2), is masked
    weights = np.asarray(context_token_weights(jnp.arange(17)[None], grid))[0]
    # (0,0,0): distance 3; (0,2,2) and (1,2,1): 1
    np.testing.assert_allclose(weights[[0, 8, 16]], [3 ** -0.5, 1.0, 1.0], rtol=1e-6)


def test_predictor_with_context_adds_the_context_positions_only():
    pred = small_predictor(0.05)
    context, ctx, tgt = predictor_inputs()
    targets_only = run(pred, context, ctx, tgt, 0)
    both = pred(context, ctx, tgt, 0, with_context=True)
    assert both.shape == (ctx.shape[0], ctx.shape[1] + tgt.shape[1], targets_only.shape[-1])
    np.testing.assert_allclose(np.asarray(both[:, ctx.shape[1]:]), np.asarray(targets_only), atol=1e-6)


def test_context_loss_is_off_by_default_and_ramps_in():
    """context_weight 0 is the V-JEPA 2 loss exactly; with a weight, the loss at step s adds
    weight * min(1, s / warmup) * the per-type context losses (averaged over mask types)."""
    from jepa.objectives.vjepa import VJEPA

    c, grid, batch = pinned_loss_setup()
    plain = VJEPA.from_config(c, grid)
    params, _ = plain.init(jax.random.PRNGKey(0), c)
    ema = jax.tree.map(lambda x: x * 1.5, params["encoder"])
    loss0, aux0 = plain.loss(params, ema, batch)
    assert float(loss0) == pytest.approx(PINNED["loss"], rel=1e-5)
    c.loss.context_weight, c.loss.context_warmup_steps = 0.5, 10
    dense = VJEPA.from_config(c, grid)
    fn = jax.jit(dense.loss)
    at_start, aux = fn(params, ema, batch, 0)
    assert float(at_start) == pytest.approx(float(loss0), rel=1e-6)
    ctx = (float(aux["loss/long_context"]) + float(aux["loss/short_context"])) / 2
    assert ctx > 0
    assert float(fn(params, ema, batch, 5)[0]) == pytest.approx(float(loss0) + 0.25 * ctx, rel=1e-5)
    assert float(fn(params, ema, batch, 50)[0]) == pytest.approx(float(loss0) + 0.5 * ctx, rel=1e-5)
    grads = jax.grad(lambda p: fn(p, ema, batch, 50)[0])(params)
    plain_grads = jax.grad(lambda p: plain.loss(p, ema, batch)[0])(params)
    assert not np.allclose(np.asarray(grads["predictor"]["proj_kernel"]),
                           np.asarray(plain_grads["predictor"]["proj_kernel"]))


def test_variance_covariance_terms_separate_spread_from_collapsed_tokens():
    from jepa.objectives.vjepa import variance_covariance

    rng = np.random.default_rng(0)
    spread = jnp.asarray(rng.standard_normal((8, 512, 16)), jnp.float32)
    one_direction = jnp.asarray(rng.standard_normal((8, 512, 1)) * rng.standard_normal(16), jnp.float32)
    var_s, cov_s = (float(v) for v in variance_covariance(spread))
    var_c, cov_c = (float(v) for v in variance_covariance(one_direction))
    # layer-normed white noise: std ~1 per dimension; LayerNorm itself correlates dimensions at -1/(D-1)
    assert var_s < 0.05 and cov_s < 0.1
    assert var_c > 0.1 and cov_c > 100 * cov_s  # one direction: every pair of dimensions correlated
    grads = jax.grad(lambda x: sum(variance_covariance(x)))(one_direction)
    assert np.isfinite(np.asarray(grads)).all() and float(jnp.abs(grads).max()) > 0


def test_collapse_diagnostics_only_on_logged_steps():
    """With train.log_every = 3 the objective computes the effective rank and std only on the steps the trainer
    logs (state step + 1 divisible by 3: the eigendecomposition runs on the host even on GPUs) and zeros
    elsewhere; the loss itself does not depend on the step."""
    from jepa.objectives.vjepa import VJEPA

    c, grid, batch = pinned_loss_setup()
    c.train.log_every = 3
    objective = VJEPA.from_config(c, grid)
    assert objective.diagnostics_every == 3
    params, _ = objective.init(jax.random.PRNGKey(0), c)
    ema = jax.tree.map(lambda x: x * 1.5, params["encoder"])
    fn = jax.jit(objective.loss)
    for step in range(6):
        loss, aux = fn(params, ema, batch, step)
        assert float(loss) == pytest.approx(PINNED["loss"], rel=1e-5)
        if (step + 1) % 3 == 0:
            assert float(aux["repr/effective_rank"]) == pytest.approx(PINNED["repr/effective_rank"], rel=2e-4)
            assert float(aux["repr/std"]) == pytest.approx(PINNED["repr/std"], rel=1e-5)
        else:
            assert float(aux["repr/effective_rank"]) == 0.0 and float(aux["repr/std"]) == 0.0


def test_effective_rank_matches_svd():
    """The Gram-matrix effective rank used inside the train step against a float64 numpy SVD."""
    from jepa.metrics import effective_rank

    def svd_rank(x):
        s = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
        p = s / s.sum()
        p = p[p > 0]
        return float(np.exp(-np.sum(p * np.log(p))))

    rng = np.random.default_rng(0)
    spectrum = np.exp(-np.arange(64) / 8.0)
    cases = {
        "decaying": rng.standard_normal((512, 64)) * spectrum,
        "rank 5": rng.standard_normal((300, 5)) @ rng.standard_normal((5, 64)),
        "wide": rng.standard_normal((20, 64)),
        "rank 1": np.outer(rng.standard_normal(100), rng.standard_normal(64)),
    }
    for name, x in cases.items():
        x = jnp.asarray(x, jnp.float32)
        assert float(jax.jit(effective_rank)(x)) == pytest.approx(svd_rank(x), rel=2e-3, abs=2e-3), name
    assert float(effective_rank(jnp.asarray(cases["rank 5"], jnp.float32))) < 5.01


def test_step_bench_runs_the_trainers_step():
    """benchmarks/step_bench.py builds the trainer's step: its loss is VJEPA.loss on the same state and batch.
    (Its FLOP count is jepa.train.training_flops, checked against the step's matmuls in tests/test_metrics.py.)"""
    import importlib.util
    import pathlib

    from jepa.objectives.vjepa import VJEPA

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "step_bench.py"
    spec = importlib.util.spec_from_file_location("step_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    c, grid, _ = pinned_loss_setup()
    c.train.global_batch_size = 2
    step, state, batch, _ = bench.build_step(c)
    objective = VJEPA.from_config(c, grid)
    want = float(jax.jit(objective.loss)(state["params"], state["ema"], batch)[0])
    new_state, metrics = step(state, batch)  # donates `state`
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)
    assert int(new_state["step"]) == 1 and np.isfinite(float(metrics["grad_norm"]))


def _load_benchmark(name: str):
    import importlib.util
    import pathlib
    import sys

    folder = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))  # the benchmarks import one another, as they do when run as scripts
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def test_step_ceiling_times_every_pass_of_the_step():
    """benchmarks/step_ceiling.py: the target encoder pass plus a context-encoder and a predictor pass per mask
    type, each with positive linear and attention matmul times."""
    from jepa import masks

    ceiling = _load_benchmark("step_ceiling")
    c, _, _ = pinned_loss_setup()
    c.train.global_batch_size = 2
    passes = ceiling.ceiling(c, reps=1)
    lengths = masks.mask_lengths(c)
    assert len(passes) == 1 + 2 * len(lengths)
    assert all(p["linear"] > 0 and p["attention"] > 0 for p in passes.values())


def test_step_bench_op_table_reads_a_real_trace(tmp_path, capsys):
    """step_bench --profile: the perfetto trace of real steps is summarised as XLA ops in ms per step."""
    bench = _load_benchmark("step_bench")
    c, _, _ = pinned_loss_setup()
    c.train.global_batch_size = 2
    step, state, batch, _ = bench.build_step(c)
    state, metrics = step(state, batch)  # compile outside the trace, as step_bench does
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(bench.PROFILED_STEPS):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    bench.print_op_table(str(tmp_path))
    out = capsys.readouterr().out
    assert "all ops of" in out and "top kinds:" in out and "fusion" in out


# ------------------------------------------------------------------ residual stream dtype


def _scan_carry_dtypes(fn, *args) -> list[str]:
    """dtypes of every lax.scan carry in fn's jaxpr (the blocks' residual stream), nested jaxprs included."""
    found = []

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "scan":
                found.extend(str(v.aval.dtype) for v in eqn.outvars[:eqn.params["num_carry"]])
            for sub in jax.core.jaxprs_in_params(eqn.params):
                visit(sub)

    visit(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_bfloat16_residual_stream_keeps_the_loss_and_float32_state():
    """model.residual_dtype="compute" with bfloat16 compute: the blocks' residual stream is bfloat16 (scan carry,
    block outputs, scanned or unrolled; "float32" keeps it float32), parameters and gradients stay float32, and
    the V-JEPA loss and gradient stay close to the pinned float32 ones (test_vjepa_loss_matches_pinned_values)."""
    from jepa.objectives.vjepa import VJEPA

    c, grid, batch = pinned_loss_setup()
    c.model.dtype = "bfloat16"
    video = jax.ShapeDtypeStruct(batch["video"].shape, jnp.float32)
    params, _ = VJEPA.from_config(c, grid).init(jax.random.PRNGKey(0), c)  # same shapes for every variant
    for residual, stream in (("float32", jnp.float32), ("compute", jnp.bfloat16)):
        c.model.residual_dtype = residual
        config_lib.validate(c)
        for scan in (True, False):  # shapes and dtypes only: traced, never run
            c.model.scan = scan
            encoder = nnx.merge(VJEPA.from_config(c, grid).encoder_def, nnx.State(params["encoder"]))
            assert encoder.blocks.scan == scan and encoder.blocks.residual_dtype == stream
            out, inner = jax.eval_shape(lambda v, e=encoder: e(v, return_layers=(0,)), video)
            assert out.dtype == jnp.float32 and inner["blocks"][0].dtype == jnp.float32  # final norm: float32
            tables = rope.rope_tables(grid, encoder.width // encoder.heads, "reference")
            x = jax.ShapeDtypeStruct((1, int(np.prod(grid)), encoder.width), jnp.bfloat16)
            assert jax.eval_shape(lambda x, e=encoder, t=tables: e.blocks(x, t, None), x).dtype == stream
            if scan:
                assert _scan_carry_dtypes(lambda v, e=encoder: e(v), video) == [jnp.dtype(stream).name]
    c.model.scan = True  # residual_dtype="compute" from the loop
    objective = VJEPA.from_config(c, grid)
    ema = jax.tree.map(lambda x: x * 1.5, params["encoder"])
    (loss, _), grads = jax.jit(jax.value_and_grad(objective.loss, has_aux=True))(params, ema, batch)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    grad_norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))))
    assert float(loss) == pytest.approx(PINNED["loss"], rel=2e-2)
    assert float(loss) != pytest.approx(PINNED["loss"], rel=1e-6)  # bfloat16 really ran
    assert grad_norm == pytest.approx(PINNED_GRAD_NORM, rel=5e-2)


def test_layer_norm_statistics_are_float32_for_a_bfloat16_stream():
    """A bfloat16 residual of 255s and 258s (both exact in bfloat16): its mean 256.5 is not, so statistics taken
    in bfloat16 would centre it off zero; in float32 the output is exactly -1 / +1."""
    x = jnp.asarray([[255.0, 258.0] * 32], jnp.bfloat16)
    y = layers.layer_norm(x, jnp.ones(64), jnp.zeros(64), jnp.float32)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np.asarray([[-1.0, 1.0] * 32]), atol=1e-5)


def test_residual_dtype_is_validated():
    c = config_lib.base_config()
    c.model.residual_dtype = "float16"
    with pytest.raises(config_lib.ConfigError, match="model.residual_dtype"):
        config_lib.validate(c)
    with pytest.raises(ValueError, match="residual_dtype"):
        models.residual_dtype(c.model)
    with pytest.raises(ValueError, match="residual_dtype must be a float dtype"):
        layers.Blocks(width=48, depth=1, heads=2, residual_dtype=jnp.int32, rngs=nnx.Rngs(0))
