"""Model throughput on this machine: encoder forward+backward GFLOP/s against the float32 matmul peak, and the
compile time of a value_and_grad of encoder + predictor (the V-JEPA step's model part).

    python benchmarks/model_bench.py                      # the quick-start shape (configs/quickstart.py)
    python benchmarks/model_bench.py --attention xla      # jax.nn.dot_product_attention(implementation="xla")
    python benchmarks/model_bench.py --batch 8 --depth 2  # smaller

FLOPs are analytic: 2 x multiply-accumulates of every matmul (patch embedding, qkv, attention scores and
values, output projection, MLP); backward = 2 x forward. Timings are the best of a few repetitions (the
machine may be shared: `uptime` load is printed too).

Memory: XLA's CPU buffers come from glibc malloc, which maps large blocks fresh on every step (page faults,
~10% of the step here). `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/model_bench.py` makes those
mappings transparent huge pages (10x fewer faults); it must be set before the process starts.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jepa.models import Predictor, VisionTransformer, token_grid


def block_flops(tokens: int, width: int, mlp_dim: int) -> float:
    """Forward FLOPs of one block for one sequence of `tokens` tokens."""
    n, w, m = tokens, width, mlp_dim
    return 2.0 * (n * w * 3 * w + 2 * n * n * w + n * w * w + 2 * n * w * m)


def encoder_flops(batch: int, tokens: int, width: int, depth: int, mlp_dim: int, patch_dim: int) -> float:
    return batch * (2.0 * tokens * patch_dim * width + depth * block_flops(tokens, width, mlp_dim))


def predictor_flops(batch: int, nc: int, nt: int, enc_width: int, width: int, depth: int, mlp_dim: int) -> float:
    n = nc + nt
    return batch * (2.0 * nc * enc_width * width + depth * block_flops(n, width, mlp_dim)
                    + 2.0 * nt * width * enc_width)


def best_time(fn, *args, reps: int = 5) -> tuple[float, float]:
    """(best, median) seconds of `reps` calls after a warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    best, _ = best_time(f, a, b, reps=reps)
    return 2.0 * n ** 3 / best / 1e9


def _define_flags() -> None:
    from absl import flags
    for name, default, help_string in (
            ("batch", 32, "clips per step"), ("frames", 8, "frames per clip"), ("resolution", 64, "pixels"),
            ("patch", 8, "patch size"), ("tubelet", 2, "tubelet size"), ("width", 192, "encoder width"),
            ("depth", 6, "encoder blocks"), ("heads", 3, "encoder heads"), ("mlp", 768, "encoder MLP units"),
            ("pred_width", 96, "predictor width"), ("pred_depth", 4, "predictor blocks"),
            ("pred_heads", 3, "predictor heads"), ("context", 96, "context tokens per clip for the predictor step"),
            ("reps", 5, "timed repetitions (best is kept)")):
        flags.DEFINE_integer(name, default, help_string, lower_bound=1)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype")
    flags.DEFINE_enum("remat", "none", ["none", "full", "dots"], "rematerialisation policy")
    flags.DEFINE_enum("attention", "einsum", ["einsum", "xla", "cudnn"], "attention implementation")
    flags.DEFINE_boolean("unroll", False, "Python loop over blocks instead of lax.scan")
    flags.DEFINE_boolean("skip_peak", False, "do not measure the matmul peak")


def main(argv=None) -> None:
    """`python benchmarks/model_bench.py [--flags]` (argv: the arguments after the program name)."""
    import types

    from absl import flags

    from jepa import cli
    with cli.flag_scope():
        _define_flags()
        cli.parse(argv)
        args = types.SimpleNamespace(**{name: flags.FLAGS[name].value for name in (
            "batch", "frames", "resolution", "patch", "tubelet", "width", "depth", "heads", "mlp", "pred_width",
            "pred_depth", "pred_heads", "context", "reps", "dtype", "remat", "attention", "unroll", "skip_peak")})

    load = os.getloadavg()
    print(f"device {jax.devices()[0].device_kind} x{jax.device_count()}, load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cpus; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    peak = None if args.skip_peak else matmul_peak()
    if peak:
        print(f"float32 2048^2 matmul peak: {peak:.1f} GFLOP/s")

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    grid = token_grid(args.frames, args.resolution, args.patch, args.tubelet)
    tokens = int(np.prod(grid))
    common = dict(rope_layout="reference", dtype=dtype, remat=args.remat, attention_impl=args.attention,
                  scan=not args.unroll)
    enc = VisionTransformer(width=args.width, depth=args.depth, heads=args.heads, mlp_dim=args.mlp,
                            patch_size=args.patch, tubelet_size=args.tubelet, rngs=nnx.Rngs(0), **common)
    pred = Predictor(encoder_width=args.width, width=args.pred_width, depth=args.pred_depth, heads=args.pred_heads,
                     grid=grid, rngs=nnx.Rngs(1), **common)
    enc_def, enc_params = nnx.split(enc, nnx.Param)
    pred_def, pred_params = nnx.split(pred, nnx.Param)
    rng = np.random.default_rng(0)
    video = jnp.asarray(rng.standard_normal((args.batch, args.frames, args.resolution, args.resolution, 3)),
                        jnp.float32)
    patch_dim = 3 * args.tubelet * args.patch ** 2

    # ---- encoder forward + backward on the full clip
    def enc_loss(params, video):
        out = nnx.merge(enc_def, params)(video)
        return jnp.mean(jnp.square(out))

    step = jax.jit(jax.value_and_grad(enc_loss))
    t0 = time.perf_counter()
    compiled = step.lower(enc_params, video).compile()
    enc_compile = time.perf_counter() - t0
    best, med = best_time(compiled, enc_params, video, reps=args.reps)
    flops = 3 * encoder_flops(args.batch, tokens, args.width, args.depth, args.mlp, patch_dim)
    print(f"encoder fwd+bwd: batch {args.batch} x {tokens} tokens (grid {grid}), width {args.width} depth "
          f"{args.depth} heads {args.heads} mlp {args.mlp}, {args.dtype}, attention={args.attention}, "
          f"remat={args.remat}, {'unrolled' if args.unroll else 'scan'}")
    print(f"  {flops / 1e9:.1f} GFLOP per step, best {best * 1e3:.0f} ms (median {med * 1e3:.0f} ms) -> "
          f"{flops / best / 1e9:.1f} GFLOP/s" + (f" = {100 * flops / best / 1e9 / peak:.0f}% of the matmul peak"
                                               if peak else "") + f"; compile {enc_compile:.1f} s")

    # ---- V-JEPA-like model step: target encoder (no grad) + context encoder + predictor, value_and_grad
    nc = args.context
    perm = np.stack([rng.permutation(tokens) for _ in range(args.batch)])
    ctx_idx = jnp.asarray(np.sort(perm[:, :nc], axis=1), jnp.int32)
    tgt_idx = jnp.asarray(np.sort(perm[:, nc:], axis=1), jnp.int32)
    nt = tokens - nc

    def jepa_loss(params, video, ctx_idx, tgt_idx):
        encoder = nnx.merge(enc_def, params["encoder"])
        target = jax.lax.stop_gradient(encoder(video))
        target = jnp.take_along_axis(target, tgt_idx[..., None], axis=1)
        context = encoder(video, ctx_idx)
        p = nnx.merge(pred_def, params["predictor"])(context, ctx_idx, tgt_idx, 0)
        return jnp.mean(jnp.abs(p - target))

    params = {"encoder": enc_params, "predictor": pred_params}
    step = jax.jit(jax.value_and_grad(jepa_loss))
    t0 = time.perf_counter()
    compiled = step.lower(params, video, ctx_idx, tgt_idx).compile()
    compile_s = time.perf_counter() - t0
    best, med = best_time(compiled, params, video, ctx_idx, tgt_idx, reps=args.reps)
    flops = (encoder_flops(args.batch, tokens, args.width, args.depth, args.mlp, patch_dim)
             + 3 * encoder_flops(args.batch, nc, args.width, args.depth, args.mlp, patch_dim)
             + 3 * predictor_flops(args.batch, nc, nt, args.width, args.pred_width, args.pred_depth,
                                   4 * args.pred_width))
    print(f"encoder+predictor value_and_grad (target enc fwd + context enc {nc} tokens + predictor "
          f"{args.pred_width}x{args.pred_depth}, {nt} targets): compile {compile_s:.1f} s, best "
          f"{best * 1e3:.0f} ms (median {med * 1e3:.0f} ms) -> {flops / best / 1e9:.1f} GFLOP/s"
          + (f" = {100 * flops / best / 1e9 / peak:.0f}% of peak" if peak else ""))
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    from jepa import cli
    cli.run(main, __doc__)
