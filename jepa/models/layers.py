"""Transformer blocks shared by the encoder and the predictor: stacked parameters, one `lax.scan` over depth.

Every block has the same shapes, so the parameters of all blocks are stored stacked along a leading depth axis
(as MaxText does) and the forward pass scans one block body over them: compile time does not grow with depth.
`scan=False` unrolls the same body in a Python loop (identical maths): compile time then grows with depth,
but on CPU the step is ~15% faster for small models (no stacking of per-layer residuals into [depth, ...]
buffers; see benchmarks/model_bench.py --unroll). Optional per-block rematerialisation wraps the body in
`jax.checkpoint`.

LayerNorm, GELU and softmax carry hand-written derivatives (custom_jvp) so that the backward pass keeps one
array per op instead of several autodiff intermediates: on CPU the step is bound by memory traffic outside the
matmuls as much as by the matmuls.

Dtype policy: parameters float32; matmuls run in the compute dtype (bfloat16 on accelerators, float32 on
CPU); LayerNorm (statistics and affine), softmax and RoPE run in float32; the residual stream is float32 by
default (as under PyTorch autocast, where bfloat16 matmul outputs are added to a float32 residual), or the
compute dtype (`residual_dtype`): on accelerators the float32 residual's adds, casts and LayerNorm inputs are
memory-bound elementwise fusions, and a bfloat16 stream halves their traffic and the activations kept for the
backward pass.

Block (pre-LN, as the reference): x += proj(attn(rope(qkv(LN1(x))))); x += fc2(gelu(fc1(LN2(x)))).
Parameter layout per block (Linear kernels are (in, out), i.e. the transpose of the reference's (out, in)):
    norm1_scale/bias [w], qkv_kernel [w, 3w] (output columns: q, k, v; each head-major, as the reference's
    reshape(B, N, 3, heads, head_dim)), qkv_bias [3w], proj_kernel [w, w], proj_bias [w], norm2_scale/bias [w],
    fc1_kernel [w, m], fc1_bias [m], fc2_kernel [m, w], fc2_bias [w]; each stacked to [depth, ...].
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jepa import sharding
from jepa.models import rope as rope_lib

LN_EPS = 1e-6
INIT_STD = 0.02
REMAT_POLICIES = ("none", "full", "dots")
RESIDUAL_DTYPES = ("float32", "compute")  # config.model.residual_dtype: float32 or the compute dtype


def trunc_normal(key: jax.Array, shape, std: float = INIT_STD, dtype=jnp.float32) -> jax.Array:
    """The reference's trunc_normal_(std=0.02): a normal with std `std` truncated to [-2, 2] in absolute value
    (i.e. at 100 std for 0.02, so the standard deviation is 0.02; jax.nn.initializers.truncated_normal would
    cut at 2 std and give 0.0176)."""
    bound = 2.0 / std
    return (jax.random.truncated_normal(key, -bound, bound, shape, jnp.float32) * std).astype(dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _normalize(x: jax.Array, eps: float) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mean
    return xc * jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + eps)


@_normalize.defjvp
def _normalize_jvp(eps, primals, tangents):
    # Hand-written derivative: the backward pass keeps only xhat and 1/std per token (plain autodiff keeps
    # several full-size intermediates, which costs memory bandwidth on CPU).
    (x,), (t,) = primals, tangents
    mean = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mean
    rstd = jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + eps)
    xhat = xc * rstd
    tc = t - jnp.mean(t, axis=-1, keepdims=True)
    return xhat, (tc - xhat * jnp.mean(tc * xhat, axis=-1, keepdims=True)) * rstd


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, dtype, eps: float = LN_EPS) -> jax.Array:
    """LayerNorm in float32 (biased variance, as torch), output cast to the compute dtype."""
    xhat = _normalize(x.astype(jnp.float32), eps)
    return (xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype) -> jax.Array:
    y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
    return y if bias is None else y + bias.astype(dtype)


ATTENTION_IMPLS = ("einsum", "xla", "cudnn")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "einsum",
              mask: jax.Array | None = None) -> jax.Array:
    """Softmax attention, head-major q/k/v [B, H, N, D] -> [B, H, N, D]; q carries the scale. mask: optional bool
    [Nq, Nk] (broadcastable), True where a query may attend to a key; None = every token sees every token.

    "einsum": two batched matmuls with scores and softmax in float32 (default; the head-major layout keeps
    both matmuls free of transposes, ~3x faster on CPU than [B, N, H, D] einsums); "xla" / "cudnn":
    jax.nn.dot_product_attention with that implementation (benchmarks/model_bench.py compares them; "cudnn"
    is the fused kernel on NVIDIA GPUs, bfloat16 / float16 only).
    """
    if impl == "einsum":
        s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        if mask is not None:
            s = jnp.where(mask, s, MASKED_SCORE)
        p = softmax(s).astype(v.dtype)
        return jnp.einsum("bhqk,bhkd->bhqd", p, v)
    if impl in ("xla", "cudnn"):
        t = lambda a: a.transpose(0, 2, 1, 3)
        if mask is not None:
            mask = jnp.broadcast_to(mask, (*q.shape[:3], k.shape[2]))
        return t(jax.nn.dot_product_attention(t(q), t(k), t(v), scale=1.0, implementation=impl, mask=mask))
    raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")


MASKED_SCORE = -1e30  # finite: a fully masked row stays NaN-free (every query sees at least itself here)


_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * (1 + erf(x / sqrt 2)) / 2, as torch.nn.GELU() computes it. (jax.nn.gelu(approximate=False)
    goes through erfc, about 2.5x slower on CPU; the two differ by ~1e-6.) The custom derivative
    Phi(x) + x phi(x) makes the backward pass keep one array instead of several intermediates."""
    return x * (0.5 + 0.5 * jax.lax.erf(x * _SQRT_HALF))


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    cdf = 0.5 + 0.5 * jax.lax.erf(x * _SQRT_HALF)
    return x * cdf, t * (cdf + x * jnp.exp(-0.5 * jnp.square(x)) * _INV_SQRT_2PI)


@jax.custom_jvp
def softmax(s: jax.Array) -> jax.Array:
    """Softmax over the last axis; its derivative keeps only the probabilities for the backward pass."""
    e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
    return e / jnp.sum(e, axis=-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    (s,), (t,) = primals, tangents
    y = softmax(s)
    return y, y * (t - jnp.sum(y * t, axis=-1, keepdims=True))


def remat_policy(remat: str):
    """None = no remat; otherwise the jax.checkpoint policy. "dots" saves the outputs of the linear-layer matmuls
    (dots without batch dimensions) and recomputes the rest (attention scores, softmax, GELU, LayerNorm)."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")
    if remat == "none":
        return None
    if remat == "full":
        return jax.checkpoint_policies.nothing_saveable
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def block_forward(x: jax.Array, p: dict, cos_q, sin_q, cos_k, sin_k, *, heads: int, dtype,
                  attention_impl: str = "einsum", mask: jax.Array | None = None) -> jax.Array:
    """One pre-LN transformer block on the residual x [B, N, w] (float32 or the compute dtype: the residual adds
    keep x's dtype); p holds one block's parameters; RoPE tables [B or 1, 1, N, R] (cos_q / sin_q carry the
    attention scale 1/sqrt(head_dim))."""
    return cached_block_forward(x, p, cos_q, sin_q, cos_k, sin_k, heads=heads, dtype=dtype,
                                attention_impl=attention_impl, mask=mask)[0]


def cached_block_forward(x: jax.Array, p: dict, cos_q, sin_q, cos_k, sin_k, *, heads: int, dtype,
                         attention_impl: str = "einsum", mask: jax.Array | None = None,
                         prefix: tuple[jax.Array, jax.Array] | None = None):
    """block_forward that also attends to `prefix`, the keys and values [B or 1, H, M, hd] of M earlier tokens
    (a KV cache: their outputs are not recomputed), with mask [N, M + N]. Returns (x, (keys, values) of all
    M + N tokens), so the caller can extend the cache."""
    b, n, w = x.shape
    hd = w // heads
    h = layer_norm(x, p["norm1_scale"], p["norm1_bias"], dtype)
    # qkv straight into head-major [3, B, H, N, hd]: XLA folds the layout change into the RoPE fusion.
    qkv_kernel = p["qkv_kernel"].reshape(w, 3, heads, hd).astype(dtype)
    qkv = jnp.einsum("bnw,wshd->sbhnd", h, qkv_kernel)
    qkv = qkv + p["qkv_bias"].reshape(3, 1, heads, 1, hd).astype(dtype)
    q = rope_lib.apply_rope(qkv[0], cos_q, sin_q)
    k, v = rope_lib.apply_rope(qkv[1], cos_k, sin_k), qkv[2]
    if prefix is not None:
        k, v = (jnp.concatenate([jnp.broadcast_to(old, (b, *old.shape[1:])).astype(new.dtype), new], axis=2)
                for old, new in zip(prefix, (k, v)))
    o = attention(q, k, v, attention_impl, mask)                                 # [B, H, N, hd]
    proj = jnp.einsum("bhnd,hdw->bnw", o, p["proj_kernel"].reshape(heads, hd, w).astype(dtype))
    x = x + (proj + p["proj_bias"].astype(dtype)).astype(x.dtype)
    h = layer_norm(x, p["norm2_scale"], p["norm2_bias"], dtype)
    h = gelu(dense(h, p["fc1_kernel"], p["fc1_bias"], dtype))
    return x + dense(h, p["fc2_kernel"], p["fc2_bias"], dtype).astype(x.dtype), (k, v)


class Blocks(nnx.Module):
    """`depth` identical pre-LN transformer blocks with 3D RoPE, parameters stacked along axis 0."""

    def __init__(self, *, width: int, depth: int, heads: int, mlp_dim: int | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: str = "none", scan: bool = True, attention_impl: str = "einsum",
                 residual_dtype=jnp.float32, rngs: nnx.Rngs):
        mlp_dim = mlp_dim or 4 * width  # None or 0: the usual 4x expansion
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
        if width <= 0 or depth <= 0 or heads <= 0 or mlp_dim <= 0:
            raise ValueError(f"width, depth, heads and mlp_dim must be positive, got width={width} depth={depth} "
                             f"heads={heads} mlp_dim={mlp_dim}")
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if rope_lib.slice_dim(width // heads) == 0:
            raise ValueError(f"head_dim {width // heads} (width {width} / heads {heads}) is too small for 3D RoPE "
                             "(needs >= 6)")
        remat_policy(remat)  # validates
        self.width, self.depth, self.heads, self.mlp_dim = width, depth, heads, mlp_dim
        self.dtype, self.remat, self.scan, self.attention_impl = dtype, remat, scan, attention_impl
        self.residual_dtype = jnp.dtype(residual_dtype)
        if not jnp.issubdtype(self.residual_dtype, jnp.floating):
            raise ValueError(f"residual_dtype must be a float dtype, got {self.residual_dtype}")
        d, w, m = depth, width, mlp_dim
        # Residual branches of block i (1-based) are divided by sqrt(2 i), as the reference's _rescale_blocks.
        rescale = (1.0 / np.sqrt(2.0 * np.arange(1, d + 1))).astype(np.float32)[:, None, None]
        zeros = lambda *s: jnp.zeros((d, *s), param_dtype)
        ones = lambda *s: jnp.ones((d, *s), param_dtype)
        self.norm1_scale, self.norm1_bias = nnx.Param(ones(w)), nnx.Param(zeros(w))
        self.qkv_kernel = nnx.Param(trunc_normal(rngs.params(), (d, w, 3 * w), dtype=param_dtype))
        self.qkv_bias = nnx.Param(zeros(3 * w))
        self.proj_kernel = nnx.Param(
            (trunc_normal(rngs.params(), (d, w, w)) * rescale).astype(param_dtype))
        self.proj_bias = nnx.Param(zeros(w))
        self.norm2_scale, self.norm2_bias = nnx.Param(ones(w)), nnx.Param(zeros(w))
        self.fc1_kernel = nnx.Param(trunc_normal(rngs.params(), (d, w, m), dtype=param_dtype))
        self.fc1_bias = nnx.Param(zeros(m))
        self.fc2_kernel = nnx.Param(
            (trunc_normal(rngs.params(), (d, m, w)) * rescale).astype(param_dtype))
        self.fc2_bias = nnx.Param(zeros(w))

    PARAM_NAMES = ("norm1_scale", "norm1_bias", "qkv_kernel", "qkv_bias", "proj_kernel", "proj_bias",
                   "norm2_scale", "norm2_bias", "fc1_kernel", "fc1_bias", "fc2_kernel", "fc2_bias")

    def resolve_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        """Block indices (negative from the end) -> sorted distinct indices in [0, depth)."""
        out = set()
        for layer in layers:
            i = int(layer)
            if not -self.depth <= i < self.depth:
                raise ValueError(f"return_layers: {layer} is out of range for {self.depth} blocks")
            out.add(i % self.depth)
        return tuple(sorted(out))

    def __call__(self, x: jax.Array, rope_tables: tuple, token_idx: jax.Array | None,
                 mask: jax.Array | None = None, return_layers: Sequence[int] = ()):
        """x [B, N, w] (any float dtype) -> [B, N, w] in the residual dtype (the stream runs in it).

        rope_tables: (cos, sin) numpy [L, R] over the whole grid (unscaled); token_idx [B, N] picks each token's
        row, or None when x holds every grid token in order. mask: optional bool [N, N], True where query i
        may attend to key j (e.g. block-causal); None = full attention.

        return_layers: block indices (negative from the end); when given, returns (x, {i: the residual stream
        after block i}). The scan then runs in segments that end at the requested blocks, so only those
        outputs are kept (no [depth, ...] stack) and every shape stays static."""
        hd = self.width // self.heads
        cos, sin = rope_tables
        qscale = 1.0 / math.sqrt(hd)
        cos_k, sin_k = (t[:, None] for t in rope_lib.token_tables((cos, sin), token_idx))  # [B|1, 1, N, R]
        cos_q, sin_q = cos_k * qscale, sin_k * qscale
        params = {name: getattr(self, name)[...] for name in self.PARAM_NAMES}

        def body(carry, p):
            # Block boundaries pin the residual stream to the batch axes (no-op without a multi-device mesh).
            x = block_forward(sharding.constrain_activations(carry), p, cos_q, sin_q, cos_k, sin_k, heads=self.heads,
                              dtype=self.dtype, attention_impl=self.attention_impl, mask=mask)
            return sharding.constrain_activations(x), None

        policy = remat_policy(self.remat)
        if policy is not None:
            body = jax.checkpoint(body, policy=policy, prevent_cse=not self.scan)

        def run(x, start: int, stop: int):  # blocks start .. stop - 1
            if self.scan:
                seg = params if (start, stop) == (0, self.depth) else jax.tree.map(lambda a: a[start:stop], params)
                return jax.lax.scan(body, x, seg)[0]
            for i in range(start, stop):
                x, _ = body(x, jax.tree.map(lambda a, i=i: a[i], params))
            return x

        x = x.astype(self.residual_dtype)
        if not return_layers:
            return run(x, 0, self.depth)
        layers = self.resolve_layers(return_layers)
        outputs, start = {}, 0
        for stop in sorted({*layers, self.depth - 1}):
            x = run(x, start, stop + 1)
            if stop in layers:
                outputs[stop] = x
            start = stop + 1
        return x, outputs

    def extend(self, x: jax.Array, rope_tables: tuple, mask: jax.Array, cache: tuple | None = None):
        """Incremental (KV-cached) forward for causal inference: x [B, N, w] are new tokens that attend to the
        cached keys / values of M earlier tokens and to each other as `mask` [N, M + N] allows; rope_tables:
        (cos, sin) [N, R] at the new tokens' positions. cache: (keys, values) [depth, B or 1, H, M, hd], or None
        (M = 0). Returns (the residual stream [B, N, w], the cache of all M + N tokens): what __call__ on the whole
        sequence gives for the new tokens when earlier tokens never attend to later ones."""
        hd = self.width // self.heads
        cos_k, sin_k = (t[:, None] for t in rope_lib.token_tables(rope_tables, None))
        cos_q, sin_q = cos_k * (1.0 / math.sqrt(hd)), sin_k * (1.0 / math.sqrt(hd))
        params = {name: getattr(self, name)[...] for name in self.PARAM_NAMES}

        def body(x, xs):
            p, prefix = xs
            x, kv = cached_block_forward(sharding.constrain_activations(x), p, cos_q, sin_q, cos_k, sin_k,
                                         heads=self.heads, dtype=self.dtype, attention_impl=self.attention_impl,
                                         mask=mask, prefix=prefix)
            return sharding.constrain_activations(x), kv

        policy = remat_policy(self.remat)
        if policy is not None:
            body = jax.checkpoint(body, policy=policy, prevent_cse=not self.scan)
        x = x.astype(self.residual_dtype)
        if self.scan:
            return jax.lax.scan(body, x, (params, cache))
        keys, values = [], []
        for i in range(self.depth):
            x, (k, v) = body(x, jax.tree.map(lambda a, i=i: a[i], (params, cache)))
            keys.append(k)
            values.append(v)
        return x, (jnp.stack(keys), jnp.stack(values))
