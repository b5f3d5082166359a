"""How fast could the V-JEPA train step be on this machine with XLA's own matmul kernels? A roofline from parts.

    python benchmarks/step_ceiling.py --config=configs/quickstart.py --tuned_env

Times every matmul of one train step in isolation, at the step's exact shapes, with the kernels XLA picks for
them (jnp.dot / the attention einsums, jitted, best of --reps), and sums them by pass: the EMA target encoder
(forward), then per mask type the context encoder and the predictor (forward + backward: dX and dW of every
linear layer, the attention vjp). That sum is the step time if LayerNorm, GELU, RoPE, softmax, gathers, the
optimiser, EMA and every copy were free and the matmuls ran back to back: the best % of the matmul peak any
rewrite of the step above XLA could reach. The real step (benchmarks/step_bench.py, same process, same
machine) is timed beside it. FLOPs are the analytic ones the trainer logs (jepa.metrics).

The attention rows use the same head-major einsums as jepa.models.layers.attention (softmax included); small
heads (the predictor's 32-dim ones, ~200 tokens) run far below the peak on CPU.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import step_bench  # benchmarks/ is on sys.path when this file runs as a script
from absl import flags
from model_bench import best_time  # benchmarks/ is on sys.path

from jepa import config as config_lib
from jepa import masks, models
from jepa import metrics as metrics_lib
from jepa.models import layers


class Timer:
    """Times each distinct (kind, shape) once; random float32/compute-dtype inputs."""

    def __init__(self, dtype, reps: int):
        self.dtype, self.reps, self.cache = dtype, reps, {}
        self.key = jax.random.PRNGKey(0)

    def _rand(self, *shape):
        self.key, k = jax.random.split(self.key)
        return jax.random.normal(k, shape, jnp.float32).astype(self.dtype)

    def linear(self, m: int, k: int, n: int, backward: bool) -> float:
        """x [m, k] @ w [k, n]; with backward also dx = dy @ w^T and dw = x^T @ dy."""
        key = ("linear", m, k, n, backward)
        if key not in self.cache:
            x, w, dy = self._rand(m, k), self._rand(k, n), self._rand(m, n)
            t = best_time(jax.jit(jnp.dot), x, w, reps=self.reps)[0]
            if backward:
                t += best_time(jax.jit(lambda dy, w: dy @ w.T), dy, w, reps=self.reps)[0]
                t += best_time(jax.jit(lambda x, dy: x.T @ dy), x, dy, reps=self.reps)[0]
            self.cache[key] = t
        return self.cache[key]

    def attention(self, b: int, h: int, n: int, d: int, backward: bool) -> float:
        """Head-major softmax attention [b, h, n, d]; with backward the vjp (forward included)."""
        key = ("attention", b, h, n, d, backward)
        if key not in self.cache:
            q, k, v = self._rand(b, h, n, d), self._rand(b, h, n, d), self._rand(b, h, n, d)
            if backward:
                fn = jax.jit(lambda q, k, v, g: jax.vjp(layers.attention, q, k, v)[1](g))
                self.cache[key] = best_time(fn, q, k, v, self._rand(b, h, n, d), reps=self.reps)[0]
            else:
                self.cache[key] = best_time(jax.jit(layers.attention), q, k, v, reps=self.reps)[0]
        return self.cache[key]


def transformer_seconds(timer: Timer, batch: int, tokens: int, dims: dict, backward: bool) -> dict[str, float]:
    """Matmul time of `depth` blocks on [batch, tokens, width]: linear layers and attention apart."""
    w, depth, heads, m = dims["width"], dims["depth"], dims["heads"], dims["mlp_dim"]
    rows = batch * tokens
    linear = sum(timer.linear(rows, k, n, backward) for k, n in ((w, 3 * w), (w, w), (w, m), (m, w)))
    attention = timer.attention(batch, heads, tokens, w // heads, backward)
    return {"linear": depth * linear, "attention": depth * attention}


def ceiling(config, reps: int) -> dict[str, dict[str, float]]:
    """Seconds of matmul per pass of one train step: {pass: {"linear": s, "attention": s}}."""
    dims = models.resolved_dims(config.model)
    enc, pred = dims["encoder"], dims["predictor"]
    e = config.model.encoder
    patch_dim = int(e.tubelet_size) * int(e.patch_size) ** 2 * 3
    b = int(config.train.global_batch_size)
    tokens = int(np.prod(masks.clip_token_grid(config)))
    timer = Timer(jnp.dtype(config.model.dtype), reps)
    passes = {}
    target = transformer_seconds(timer, b, tokens, enc, backward=False)
    target["linear"] += timer.linear(b * tokens, patch_dim, enc["width"], False)
    passes["target encoder (forward)"] = target
    for name, (nc, nt) in masks.mask_lengths(config).items():
        context = transformer_seconds(timer, b, nc, enc, backward=True)
        context["linear"] += timer.linear(b * nc, patch_dim, enc["width"], True)
        passes[f"{name}: context encoder ({nc} tokens)"] = context
        predictor = transformer_seconds(timer, b, nc + nt, pred, backward=True)
        predictor["linear"] += (timer.linear(b * nc, enc["width"], pred["width"], True)
                                + timer.linear(b * nt, pred["width"], enc["width"], True))
        passes[f"{name}: predictor ({nc}+{nt} tokens)"] = predictor
    return passes


def main(argv=None) -> None:
    """`python benchmarks/step_ceiling.py --config=FILE[:ARG] [--reps=N] [--tuned_env] [--config.FIELD=VALUE ...]`
    (argv: the arguments after the program name)."""
    from jepa import cli
    with cli.flag_scope():
        cli.define_config_file(argv)
        flags.DEFINE_integer("reps", 10, "timed repetitions per matmul and of the real step (best is kept)",
                             lower_bound=1)
        flags.DEFINE_bool("tuned_env", False, "re-execute with step_bench.TUNED_ENV (allocator, OpenBLAS) first")
        cli.parse(argv, required=("config",))
        report()


def report() -> None:
    """Times the matmuls and the real step as the parsed flags say, and prints the comparison."""
    if flags.FLAGS.tuned_env:
        step_bench.reexec_with(step_bench.TUNED_ENV)
    jax.config.update("jax_enable_compilation_cache", False)
    config = flags.FLAGS.config
    config_lib.validate(config)
    flops = step_bench.train.training_flops(config)
    peak = metrics_lib.measure_matmul_peak(jnp.dtype(config.model.dtype))
    passes = ceiling(config, flags.FLAGS.reps)
    step, state, batch, _ = step_bench.build_step(config)
    compiled = step.lower(state, batch).compile()
    times = []  # the step donates its state: time it by hand
    for _ in range(flags.FLAGS.reps + 1):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    real = min(times[1:])
    linear = sum(p["linear"] for p in passes.values())
    attention = sum(p["attention"] for p in passes.values())
    total = linear + attention
    print(f"device {jax.devices()[0].device_kind}, {jnp.dtype(config.model.dtype).name} matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s; {flops / 1e9:.1f} analytic GFLOP per step")
    print("matmul time per pass, each matmul alone at its best (ms): linear layers + attention")
    for name, p in passes.items():
        print(f"  {name:40s} {1e3 * p['linear']:8.1f} + {1e3 * p['attention']:7.1f}")
    print(f"  {'all':40s} {1e3 * linear:8.1f} + {1e3 * attention:7.1f} = {1e3 * total:.1f} ms")
    print(f"ceiling (matmuls only, nothing else): {flops / total / 1e9:.1f} GFLOP/s = "
          f"{100 * flops / total / peak:.1f}% of the peak; attention is {100 * attention / total:.0f}% of it")
    print(f"real train step: best {1e3 * real:.1f} ms = {flops / real / 1e9:.1f} GFLOP/s = "
          f"{100 * flops / real / peak:.1f}% of the peak; matmuls alone are {100 * total / real:.0f}% of it")


if __name__ == "__main__":
    from jepa import cli
    cli.run(main, __doc__)
