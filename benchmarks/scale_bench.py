"""Ahead-of-time compilation of the real train step for a config and mesh, without running it: per-device
parameter / train-state / temporary bytes from XLA's memory analysis, and analytic TFLOP/s + MFU for a
measured or assumed step time against the nominal peaks in jepa.metrics (H100, H200, A100, TPU v4/v5e/v5p).

    python benchmarks/scale_bench.py --config=configs/quickstart.py:tiny --devices=8 --mesh=1,8,1
    python benchmarks/scale_bench.py --config=configs/vjepa2_vitl16.py --devices=8 --mesh=1,8,1 \
        --batch=64 --step_time=1.9 --device_kind=H100
    python benchmarks/scale_bench.py ... --config.model.remat=full --config.optim.grad_accum_steps=2 --verbose

--devices N simulates N CPU devices (XLA_FLAGS, set before jax is imported); on an accelerator host leave it 0 to
compile for the real devices (the numbers are then the accelerator's). The step is jepa.train.build_run's,
lowered from ShapeDtypeStructs (no parameters are initialised, no data is read). CPU memory analysis is indicative
of the sharded layout (state bytes are exact; temp bytes depend on the backend's fusion and scheduling).
Throughput of a real CPU step: benchmarks/step_bench.py.
"""

from __future__ import annotations

import os
import sys


def gib(n: float) -> str:
    return f"{n / 2**30:8.3f} GiB" if n >= 2**30 else f"{n / 2**20:8.3f} MiB"


def abstract_batch(config, mesh) -> dict:
    """The pipeline's batch as ShapeDtypeStructs (uint8 video, int32 index lists), sharded over the batch axes."""
    import jax
    import numpy as np

    from jepa import masks, sharding
    from jepa import train as train_lib

    b = config.train.global_batch_size
    r, t = config.data.resolution, config.data.num_frames
    shard = sharding.batch_sharding(mesh)
    batch = {"video": jax.ShapeDtypeStruct((b, t, r, r, 3), np.uint8, sharding=shard)}
    for name, (n_ctx, n_tgt) in masks.mask_lengths(config).items():
        batch[f"{name}/context_idx"] = jax.ShapeDtypeStruct((b, n_ctx), np.int32, sharding=shard)
        batch[f"{name}/target_idx"] = jax.ShapeDtypeStruct((b, n_tgt), np.int32, sharding=shard)
    return {k: batch[k] for k in train_lib.data_keys(config)}


def compile_step(config, mesh):
    """(jepa.train.build_run's Run, the train step compiled ahead of time for an abstract batch, compile seconds):
    nothing is initialised and no data is read."""
    import time

    from jepa import train as train_lib
    run = train_lib.build_run(config, mesh)
    start = time.perf_counter()
    compiled = run.train_step.lower(run.abstract_state, abstract_batch(config, mesh)).compile()
    return run, compiled, time.perf_counter() - start


def _define_flags(argv) -> None:
    from absl import flags

    from jepa import cli
    cli.define_config_file(argv)
    flags.DEFINE_string("mesh", "-1,1,1", "data,fsdp,tensor (-1 fills)")
    flags.DEFINE_integer("devices", 0, "simulated CPU devices (0: the real ones)", lower_bound=0)
    flags.DEFINE_integer("batch", 0, "global batch (0: the config's)", lower_bound=0)
    flags.DEFINE_float("step_time", 0.0, "measured or assumed seconds per step")
    flags.DEFINE_string("device_kind", "", "peak table key for MFU, e.g. H100, H200, A100, 'TPU v5p'")
    flags.DEFINE_boolean("verbose", False, "print every state array's sharding")


def main(argv=None) -> int:
    """`python benchmarks/scale_bench.py --config=FILE[:ARG] [--flags] [--config.FIELD=VALUE ...]` (argv: the
    arguments after the program name)."""
    import types

    from absl import flags

    from jepa import cli
    argv = list(sys.argv[1:] if argv is None else argv)
    devices = cli.flag_value(argv, "devices")
    if devices and devices != "0":  # XLA reads this when jax is first imported, i.e. before the config file loads
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={devices}")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with cli.flag_scope():
        _define_flags(argv)
        cli.parse(argv, required=("config",))
        names = ("config", "mesh", "devices", "batch", "step_time", "device_kind", "verbose")
        args = types.SimpleNamespace(**{n: flags.FLAGS[n].value for n in names})
    import jax
    import numpy as np

    from jepa import config as config_lib
    from jepa import metrics as metrics_lib
    from jepa import sharding
    from jepa import train as train_lib

    config = args.config
    if args.batch:
        config.train.global_batch_size = args.batch
    config.mesh = dict(zip(sharding.AXES, (int(x) for x in args.mesh.split(",")), strict=True))
    config_lib.validate(config)
    mesh = sharding.make_mesh(config.mesh)
    run, compiled, compile_s = compile_step(config, mesh)
    b = config.train.global_batch_size
    mem = compiled.memory_analysis()

    params = run.abstract_state["params"]
    param_shardings = run.state_shardings["params"]
    full_state = sharding.replicated_bytes(run.abstract_state)
    state_dev = sharding.bytes_per_device(run.abstract_state, run.state_shardings)
    params_dev = sharding.bytes_per_device(params, param_shardings)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    overrides = [a for a in argv if a.startswith("--config.")]
    print(f"config {cli.flag_value(argv, 'config')} {' '.join(overrides)} | global batch {b} | mesh "
          f"{dict(mesh.shape)} on {mesh.size} x {jax.devices()[0].device_kind}")
    print(f"parameters          {n_params / 1e6:10.2f} M")
    print(f"params per device   {gib(params_dev)}   (replicated {gib(sharding.replicated_bytes(params))})")
    print(f"state per device    {gib(state_dev)}   (params + EMA + Adam; replicated {gib(full_state)}, "
          f"ratio {state_dev / full_state:.3f})")
    if mem is not None:
        print(f"XLA argument bytes  {gib(mem.argument_size_in_bytes)}   output {gib(mem.output_size_in_bytes)}   "
              f"alias {gib(mem.alias_size_in_bytes)}")
        print(f"XLA temp bytes      {gib(mem.temp_size_in_bytes)}   generated code "
              f"{mem.generated_code_size_in_bytes / 2**20:.1f} MiB")
        peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
        print(f"peak per device    ~{gib(peak)}   (arguments + outputs - donated + temp)")
    print(f"compile time        {compile_s:10.1f} s")
    if args.verbose:
        print(sharding.describe(run.abstract_state, run.state_shardings))

    flops = train_lib.training_flops(config, run.grid)
    print(f"model FLOPs/step    {flops:10.4g}  ({flops / mesh.size:.4g} per device)")
    if args.step_time > 0:
        kind = args.device_kind or jax.devices()[0].device_kind
        peak_flops = metrics_lib.nominal_peak_flops(kind)
        achieved = flops / args.step_time / mesh.size
        print(f"step time {args.step_time:.3f} s -> {achieved / 1e12:.2f} TFLOP/s per device, "
              f"{b / args.step_time:.1f} clips/s")
        if peak_flops:
            print(f"MFU vs {kind} nominal bf16 peak {peak_flops / 1e12:.0f} TFLOP/s: "
                  f"{metrics_lib.mfu(flops, args.step_time, peak_flops * mesh.size):.1%}")
        else:
            print(f"no nominal peak for {kind!r} (table: {', '.join(metrics_lib.NOMINAL_PEAK_FLOPS)})")
    else:
        print("(give --step_time [--device_kind] for TFLOP/s and MFU)")
        for kind in ("H100", "H200", "A100", "TPU v4", "TPU v5e", "TPU v5p"):
            peak_flops = metrics_lib.nominal_peak_flops(kind)
            print(f"  at 50% MFU on {kind:8s}: {flops / (0.5 * peak_flops * mesh.size):8.3f} s/step")
    return 0


if __name__ == "__main__":
    from jepa import cli
    cli.run(main, __doc__)
