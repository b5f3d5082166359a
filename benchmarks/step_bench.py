"""Throughput of the REAL V-JEPA train step (the function jepa/train.py jits) against the float32 matmul peak.

    python benchmarks/step_bench.py --config=configs/quickstart.py
    python benchmarks/step_bench.py --config=configs/quickstart.py --config.train.global_batch_size=16
    python benchmarks/step_bench.py --config=configs/quickstart.py --tuned_env   # re-exec with TUNED_ENV

The step is rebuilt from the same pieces as jepa/train.py (VJEPA.from_config, optim.make_optimizer, the lr / EMA
schedules, optim.accumulate_gradients, optax updates, EMA update, jit with the same shardings and donation) and
fed real masks from the pipeline's masker plus random uint8 clips (the step's cost does not depend on pixel
values). It prints the compile time (persistent cache off unless --cache), the best and median step time,
clips/s, the analytic GFLOP/s (jepa.metrics.vjepa_step_flops, as the trainer logs it), the measured matmul
peak (jepa.metrics.measure_matmul_peak) and the % of that peak, plus process CPU time and page faults per step
(on a shared machine wall time is inflated by the load; CPU time much less so). `uptime` load is printed
before and after.

Process environment matters on CPU (measured on 2 Zen 5 cores, quick-start step):
  - OPENBLAS_NUM_THREADS=1: jaxlib's LAPACK kernels (eigh/svd for the collapse diagnostics) come from scipy's
    OpenBLAS, whose worker threads compete with XLA's two threads and then spin; a 4096 x 192 SVD took ~1 s
    inside the step (and even the 192 x 192 eigh ~0.2 s) instead of a few ms.
  - GLIBC_TUNABLES (TUNED_ENV below): XLA:CPU mallocs its large per-step buffers and glibc maps them fresh
    with mmap every step (~1000 page faults and kernel page zeroing per step, hundreds of ms of CPU);
    mmap_max=0 + a high trim_threshold + one arena keep the memory in the heap (0 page faults per step), and
    hugetlb=1 backs it with transparent huge pages. Both must be set before the process starts, hence
    --tuned_env re-executes this script with them (jepa/train.py would do the same in its __main__).
"""

from __future__ import annotations

import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from jepa import config as config_lib
from jepa import metrics as metrics_lib
from jepa import models, optim, sharding
from jepa.data import pipeline
from jepa.objectives.vjepa import VJEPA

config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:arg]).", lock_config=True)
flags.DEFINE_integer("reps", 10, "timed steps")
flags.DEFINE_bool("cache", False, "use config.train.compilation_cache (off: compile time is measured honestly)")
flags.DEFINE_bool("peak", True, "measure the float32 matmul peak")
flags.DEFINE_string("profile", "", "write a jax.profiler trace of 3 steps to this directory")
flags.DEFINE_bool("tuned_env", False, "re-execute with TUNED_ENV (allocator and OpenBLAS settings) first")

TUNED_ENV = {
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:"
                      "glibc.malloc.arena_max=1",
    "OPENBLAS_NUM_THREADS": "1",
}


def reexec_with(env: dict[str, str]) -> None:
    """Replaces this process with the same command line under `env` (no-op when already set): glibc and
    OpenBLAS read these variables only at process start."""
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    import sys
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})


def build_step(config):
    """(jitted train step, abstract/initial state, batch, analytic FLOPs per step) exactly as jepa/train.py."""
    enc = config.model.encoder
    grid = models.token_grid(config.data.num_frames, config.data.resolution, enc.patch_size, enc.tubelet_size)
    objective = VJEPA.from_config(config, grid)
    total_steps = config.train.total_steps
    tx = optim.make_optimizer(config.optim, total_steps)
    lr_fn = optim.lr_schedule(config.optim, total_steps)
    ema_fn = optim.ema_momentum_schedule(config.optim, total_steps)
    mesh = sharding.make_mesh(config.mesh)

    def init_state(rng):
        params = objective.init(rng, config, grid)
        return {"params": params, "ema": params["encoder"], "opt": tx.init(params),
                "step": jnp.zeros((), jnp.int32)}

    num_micro = config.optim.grad_accum_steps

    def train_step(state, batch):  # jepa/train.py's train_step, line for line
        def loss_and_grad(params, micro_batch, rng):
            del rng
            return jax.value_and_grad(objective.loss, has_aux=True)(params, state["ema"], micro_batch)

        (loss, aux), grads = optim.accumulate_gradients(loss_and_grad, state["params"], batch, num_micro,
                                                         jax.random.PRNGKey(0))
        updates, opt_state = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        momentum = ema_fn(state["step"])
        ema = optim.ema_update(state["ema"], params["encoder"], momentum)
        metrics = {"loss": loss, **aux, "lr": lr_fn(state["step"]), "ema_momentum": momentum,
                   "grad_norm": optax.global_norm(grads)}
        new_state = {"params": params, "ema": ema, "opt": opt_state, "step": state["step"] + 1}
        return new_state, metrics

    init_rng = jax.random.PRNGKey(config.seed)
    abstract_state = jax.eval_shape(init_state, init_rng)
    state_shardings = sharding.state_shardings(abstract_state, mesh)
    keys = ["video"] + [f"{n}/{k}" for n in config.mask.types for k in ("context_idx", "target_idx")]
    batch_shardings = {k: sharding.batch_sharding(mesh) for k in keys}
    step = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)
    state = jax.jit(init_state, out_shardings=state_shardings)(init_rng)

    b = config.train.global_batch_size
    rng = np.random.default_rng(0)
    res = config.data.resolution
    h, w = (res, res) if isinstance(res, int) else tuple(res)
    local = {"video": rng.integers(0, 256, (b, config.data.num_frames, h, w, 3), dtype=np.uint8)}
    local.update(pipeline.make_masker(config)(b, rng))
    batch = sharding.global_batch({k: local[k] for k in keys}, mesh)

    dims = models.resolved_dims(config.model)
    encoder = dict(dims["encoder"], patch_size=enc.patch_size, tubelet_size=enc.tubelet_size)
    flops = metrics_lib.vjepa_step_flops(int(np.prod(grid)), pipeline.mask_lengths(config), encoder,
                                         dims["predictor"], b)
    return step, state, batch, flops


def main(argv) -> None:
    del argv
    if flags.FLAGS.tuned_env:
        reexec_with(TUNED_ENV)
    config = flags.FLAGS.config
    config_lib.validate(config)
    if flags.FLAGS.cache and config.train.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.train.compilation_cache))
    else:
        jax.config.update("jax_enable_compilation_cache", False)
    load = os.getloadavg()
    print(f"device {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} cpus, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r} "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '')!r} XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    step, state, batch, flops = build_step(config)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    loss = float(metrics["loss"])
    times, cpu = [], []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(flags.FLAGS.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / flags.FLAGS.reps
    if flags.FLAGS.profile:
        with jax.profiler.trace(flags.FLAGS.profile):
            for _ in range(3):
                state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
    best, med = min(times), float(np.median(times))
    b = config.train.global_batch_size
    print(f"train step: batch {b}, {flops / 1e9:.1f} analytic GFLOP/step, compile {compile_s:.1f} s, "
          f"first loss {loss:.5f}")
    print(f"  best {best * 1e3:.0f} ms (median {med * 1e3:.0f} ms) -> {b / best:.1f} clips/s, "
          f"{flops / best / 1e9:.1f} GFLOP/s (median {flops / med / 1e9:.1f}); process CPU time per step "
          f"{min(cpu):.2f} s (median {float(np.median(cpu)):.2f} s; a loaded machine inflates wall time, less so this); "
          f"{faults:.0f} page faults per step")
    if flags.FLAGS.peak:
        peak = metrics_lib.measure_matmul_peak(jnp.float32)
        print(f"  float32 matmul peak {peak / 1e9:.1f} GFLOP/s -> {100 * flops / best / peak:.1f}% of peak "
              f"(median {100 * flops / med / peak:.1f}%)")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
