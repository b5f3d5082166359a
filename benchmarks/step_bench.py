"""Throughput of the REAL V-JEPA train step (the function jepa/train.py jits) against the matmul peak.

    python benchmarks/step_bench.py --config=configs/quickstart.py
    python benchmarks/step_bench.py --config=configs/quickstart.py --config.train.global_batch_size=16
    python benchmarks/step_bench.py --config=configs/quickstart.py --tuned_env   # re-exec with TUNED_ENV
    python benchmarks/step_bench.py --config=configs/quickstart.py --profile=/tmp/prof   # + the costliest ops
    python benchmarks/step_bench.py --config=configs/vjepa2_vitl16.py --config.model.attention=cudnn \
        --config.model.dtype=bfloat16 --config.train.global_batch_size=32 --config.model.remat=none   # on a GPU

The step is the trainer's own (jepa.train.build_run: objective, optimiser, schedules, gradient accumulation,
EMA, jit with the trainer's shardings and donation), fed real masks from the pipeline's masker plus random uint8
clips (the step's cost does not depend on pixel values). It prints the compile time (persistent cache off
unless --cache), the best and median step time, clips/s, the analytic GFLOP/s (jepa.metrics.vjepa_step_flops,
as the trainer logs it), the matmul peak measured in the config's compute dtype (jepa.metrics.measure_matmul_peak)
and the % of that peak (on accelerators also MFU against the nominal peak, jepa.metrics.nominal_peak_flops),
plus process CPU time and page faults per step (on a shared machine wall time is inflated by the load; CPU time
much less so). `uptime` load is printed before and after.

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
from absl import flags

from jepa import config as config_lib
from jepa import masks, sharding, train
from jepa import metrics as metrics_lib

TUNED_ENV = train.PROCESS_ENV  # what `python -m jepa.train` sets for itself


def reexec_with(env: dict[str, str]) -> None:
    """Replaces this process with the same command line under `env` (no-op when already set): glibc and
    OpenBLAS read these variables only at process start."""
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    import sys
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})


PROFILED_STEPS = 3


def print_op_table(trace_dir: str, top: int = 25) -> None:
    """Where a step's time goes: the most expensive XLA ops (CPU thunks, GPU kernels) of the newest perfetto
    trace in `trace_dir`, in ms per step, per trace process (host threads, each GPU stream). Ops running at the
    same time on different threads or streams overlap, so the columns can add up to more than the step."""
    import collections
    import glob
    import gzip
    import json
    import re

    path = max(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    host_frames = re.compile(r"^(\$|ThunkExecutor|SlinkyThreadPool|end: |PjitFunction|CommonPjRt|.*::)")
    per_op, per_kind, per_process = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or host_frames.match(e["name"]):
            continue
        process = processes.get(e["pid"], str(e["pid"]))
        per_op[(process, e["name"])] += e["dur"]
        per_kind[(process, re.sub(r"[._]\d+$", "", e["name"]))] += e["dur"]  # fusion.12 -> fusion
        per_process[process] += e["dur"]
    print(f"profile ({path}), ms per step:")
    for process, us in per_process.most_common():
        print(f"  {us / PROFILED_STEPS / 1e3:9.2f}  all ops of {process}")
    for title, table in (("kinds", per_kind), ("ops", per_op)):
        print(f"  top {title}:")
        for (process, name), us in table.most_common(top):
            print(f"  {us / PROFILED_STEPS / 1e3:9.2f}  {name[:100]}  [{process[:40]}]")


def build_step(config):
    """(jitted train step, initial state, batch, analytic FLOPs per step): the trainer's own step
    (jepa.train.build_run on the config's mesh), real masks from the pipeline's masker, random uint8 clips."""
    mesh = sharding.make_mesh(config.mesh)
    run = train.build_run(config, mesh)
    state = run.init_state(jax.random.PRNGKey(config.seed))
    b = config.train.global_batch_size
    rng = np.random.default_rng(0)
    res = config.data.resolution
    h, w = (res, res) if isinstance(res, int) else tuple(res)
    local = {"video": rng.integers(0, 256, (b, config.data.num_frames, h, w, 3), dtype=np.uint8)}
    local.update(masks.make_masker(config)(b, rng))
    batch = sharding.global_batch({k: local[k] for k in train.data_keys(config)}, mesh)
    return run.train_step, state, batch, train.training_flops(config, run.grid)


def main(argv=None) -> None:
    """`python benchmarks/step_bench.py --config=FILE[:ARG] [--flags] [--config.FIELD=VALUE ...]` (argv: the
    arguments after the program name)."""
    from jepa import cli
    with cli.flag_scope():
        define_flags(argv)
        cli.parse(argv, required=("config",))
        bench()


def bench() -> None:
    """Builds, compiles and times the step as the parsed flags say."""
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
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; " + " ".join(
              f"{k}={os.environ.get(k, '')!r}" for k in ("GLIBC_TUNABLES", "OPENBLAS_NUM_THREADS", "XLA_FLAGS")))
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
        with jax.profiler.trace(flags.FLAGS.profile, create_perfetto_trace=True):
            for _ in range(PROFILED_STEPS):
                state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
        print_op_table(flags.FLAGS.profile)
    best, med = min(times), float(np.median(times))
    b = config.train.global_batch_size
    print(f"train step: batch {b}, {flops / 1e9:.1f} analytic GFLOP/step, compile {compile_s:.1f} s, "
          f"first loss {loss:.5f}")
    print(f"  best {best * 1e3:.0f} ms (median {med * 1e3:.0f} ms) -> {b / best:.1f} clips/s, "
          f"{flops / best / 1e9:.1f} GFLOP/s (median {flops / med / 1e9:.1f}); process CPU time per step "
          f"{min(cpu):.2f} s (median {float(np.median(cpu)):.2f} s; load inflates wall time, less so this); "
          f"{faults:.0f} page faults per step")
    if flags.FLAGS.peak:
        device = jax.local_devices()[0]
        dtype = jnp.dtype(config.model.dtype)
        accelerator = device.platform != "cpu"
        per_device = flops / jax.device_count()
        peak = metrics_lib.measure_matmul_peak(dtype, n=8192 if accelerator else 2048)
        print(f"  {dtype.name} matmul peak measured {peak / 1e9:.1f} GFLOP/s per device -> "
              f"{100 * per_device / best / peak:.1f}% of it (median {100 * per_device / med / peak:.1f}%)")
        if metrics_lib.nominal_peak_flops(device.device_kind):
            nominal = metrics_lib.device_peak_flops(device, dtype)  # the table's peak, as the trainer's MFU uses
            print(f"  MFU against the nominal {nominal / 1e12:.0f} TFLOP/s of a {device.device_kind}: "
                  f"{100 * per_device / best / nominal:.1f}% (median {100 * per_device / med / nominal:.1f}%)")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def define_flags(argv=None) -> None:
    """Command-line flags (defined here, not at import, so tests can import build_step)."""
    from jepa import cli
    cli.define_config_file(argv)
    flags.DEFINE_integer("reps", 10, "timed steps")
    flags.DEFINE_bool("cache", False, "use config.train.compilation_cache (off: compile time is measured honestly)")
    flags.DEFINE_bool("peak", True, "measure the matmul peak in the config's compute dtype")
    flags.DEFINE_string("profile", "", "write a jax.profiler trace of 3 steps to this directory and print the top ops")
    flags.DEFINE_bool("tuned_env", False, "re-execute with TUNED_ENV (allocator and OpenBLAS settings) first")


if __name__ == "__main__":
    from jepa import cli
    cli.run(main, __doc__)
