"""V-JEPA 2 pretraining: one readable trainer file.

    python -m jepa.train --config=configs/quickstart.py[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]

Sections: setup -> mesh -> data -> model and state -> train step -> checkpoints -> loop.
A workdir that already holds checkpoints resumes from the latest one (parameters, EMA, optimiser, step and
the data iterator), so re-running the same command after a crash or preemption continues exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jepa import checkpoint as ckpt_lib
from jepa import config as config_lib
from jepa import evaluators as evaluators_lib
from jepa import metrics as metrics_lib
from jepa import models, objectives, optim, sharding
from jepa.data import pipeline

PREEMPTED_EXIT_CODE = 42  # SIGTERM: checkpoint saved, run can be resumed with the same command


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf; the message names the step and the last good checkpoint."""


@dataclasses.dataclass
class TrainResult:
    losses: list[float]       # the loss of every step this invocation ran
    final_step: int
    workdir: str


# ---------------------------------------------------------------- setup


def setup_runtime(config) -> None:
    """Persistent compilation cache (a second run skips compiling) and the multi-process runtime
    (jax.distributed, gloo collectives on CPU; config.distributed, see jepa/sharding.py)."""
    if "distributed" in config:
        sharding.initialize_distributed(config.distributed)
    if config.train.compilation_cache and jax.default_backend() == "cpu" and jax.local_device_count() > 1:
        # Measured with jaxlib 0.10.2: an SPMD train step loaded from the cache on several CPU devices of one
        # process deadlocks in its collectives (XLA's 40 s rendezvous timeout then aborts the run); compiling
        # afresh works. tests/test_sharding.py runs the 2x2x2 mesh twice on one cache to catch this.
        logging.warning("persistent compilation cache off: %d CPU devices in this process (a multi-device "
                        "executable loaded from the cache deadlocks on XLA:CPU)", jax.local_device_count())
    elif config.train.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.train.compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def data_keys(config) -> list[str]:
    """The batch fields the train step consumes (everything else stays on the host)."""
    return objectives.build(config).data_keys()


@dataclasses.dataclass(frozen=True)
class Run:
    """What a config compiles to: the objective, the state layout, and the jitted (sharded) functions."""

    grid: tuple[int, int, int] | None  # the clip token grid (V-JEPA); None for the world model
    objective: Any         # jepa.objectives: VJEPA or ActionConditioned
    abstract_state: Any    # ShapeDtypeStructs carrying their shardings (restore targets)
    state_shardings: Any
    init_state: Callable   # rng -> train state, created already sharded
    train_step: Callable   # (state, batch) -> (state, metrics); pure, state donated


def build_run(config, mesh) -> Run:
    objective = objectives.build(config)
    grid = getattr(objective, "grid", None)
    total_steps = config.train.total_steps
    tx = optim.make_optimizer(config.optim, total_steps)
    lr_fn = optim.lr_schedule(config.optim, total_steps)
    ema_fn = optim.ema_momentum_schedule(config.optim, total_steps)

    def init_state(rng):
        params, target = objective.init(rng, config)
        return {"params": params, "ema": target, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    abstract_state = jax.eval_shape(init_state, jax.random.PRNGKey(0))
    state_shardings = sharding.state_shardings(abstract_state, mesh)
    abstract_state = ckpt_lib.abstract_like(abstract_state, state_shardings)
    num_micro = config.optim.grad_accum_steps

    def train_step(state, batch):
        def loss_and_grad(params, micro_batch, rng):
            del rng  # the objective is deterministic given the batch (masks come from the data pipeline)
            return jax.value_and_grad(objective.loss, has_aux=True)(params, state["ema"], micro_batch,
                                                                    state["step"])

        (loss, aux), grads = optim.accumulate_gradients(loss_and_grad, state["params"], batch, num_micro,
                                                         jax.random.PRNGKey(0))
        updates, opt_state = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        momentum = ema_fn(state["step"])
        ema = objective.update_target(state["ema"], params, momentum)
        metrics = {"loss": loss, **aux, "lr": lr_fn(state["step"]), "grad_norm": optax.global_norm(grads)}
        if objective.has_ema:
            metrics["ema_momentum"] = momentum
        new_state = {"params": params, "ema": ema, "opt": opt_state, "step": state["step"] + 1}
        return new_state, metrics

    batch_shardings = {k: sharding.batch_sharding(mesh) for k in objective.data_keys()}
    return Run(
        grid=grid, objective=objective, abstract_state=abstract_state, state_shardings=state_shardings,
        init_state=jax.jit(init_state, out_shardings=state_shardings),
        train_step=jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                           out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0))


def adopt_encoder_config(config) -> None:
    """World-model runs (config.encoder_from set): take the frozen encoder's architecture from the pretraining
    run's config.json, so the world-model config never has to repeat it."""
    if not config.get("encoder_from"):
        return
    from jepa.export import load_run_config
    pre = load_run_config(config.encoder_from)
    with config.unlocked():
        config.model.encoder = pre.model.encoder
        config.model.rope_layout = pre.model.rope_layout
    logging.info("encoder architecture from %s: %s", config.encoder_from, dict(config.model.encoder))


def load_frozen_encoder(config, state, mesh):
    """Puts the pretraining run's EMA encoder (config.encoder_from) into the state's target slot, unless
    config.encoder_weights is "random" (the baseline world model on an untrained encoder)."""
    if not config.get("encoder_from") or config.encoder_weights == "random":
        return state
    from jepa.export import load_encoder_params
    encoder, step = load_encoder_params(config.encoder_from, config, mesh=mesh)
    logging.info("frozen encoder: EMA weights of %s at step %d", config.encoder_from, step)
    return {**state, "ema": jax.device_put(encoder, jax.tree.map(lambda x: x.sharding, state["ema"]))}


def train(config, workdir: str) -> TrainResult:
    adopt_encoder_config(config)
    config_lib.validate(config)
    setup_runtime(config)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    # ------------------------------------------------------------ mesh
    mesh = sharding.make_mesh(config.mesh)
    logging.info("mesh %s over %d devices (%s), %d process(es)", dict(mesh.shape), mesh.size,
                 jax.devices()[0].device_kind, jax.process_count())

    # ------------------------------------------------------------ model, state layout and train step
    run = build_run(config, mesh)
    abstract_state, train_step = run.abstract_state, run.train_step
    total_steps = config.train.total_steps
    num_params = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in abstract_state["params"].items()}
    num_params["target encoder"] = sum(x.size for x in jax.tree.leaves(abstract_state["ema"]))
    logging.info("parameters (M): %s", ", ".join(f"{k} {v / 1e6:.2f}" for k, v in num_params.items()))

    # ------------------------------------------------------------ data
    # Process 0 first: it prepares (generates) a missing world dataset; the others wait, then only read it.
    if is_main:
        pipeline.check_sources(config)
    sharding.sync("jepa: data sources ready")
    if not is_main:
        pipeline.check_sources(config)
    dataset = pipeline.build_pipeline(config, process_index=jax.process_index(),
                                      process_count=jax.process_count(), train=True,
                                      masks=run.objective.needs_masks)
    data_iter = iter(dataset)
    keys = run.objective.data_keys()

    # ------------------------------------------------------------ checkpoints: resume, init_from, or fresh
    checkpointer = ckpt_lib.Checkpointer(workdir, save_every=config.train.checkpoint_every,
                                         keep=config.train.keep_checkpoints)
    last_good = checkpointer.latest_step()
    if last_good is not None:
        state = checkpointer.restore(last_good, abstract_state, data_iter)
        logging.info("resumed from %s at step %d", checkpointer.directory, last_good)
    else:
        state = load_frozen_encoder(config, run.init_state(jax.random.PRNGKey(config.seed)), mesh)
        if config.train.init_from:
            weights = {"params": abstract_state["params"], "ema": abstract_state["ema"]}  # not the optimiser
            other, other_step = ckpt_lib.load_state(config.train.init_from, weights, partial=True)
            state = {**state, "params": other["params"], "ema": other["ema"]}
            logging.info("initialised weights from %s (step %d)", config.train.init_from, other_step)

    # ------------------------------------------------------------ loop
    start_step = int(jax.device_get(state["step"]))
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
    evaluators = evaluators_lib.build(config, mesh, run.objective)  # config.evals: periodic kNN / probes
    timer = metrics_lib.StepTimer()
    width = models.resolved_dims(config.model)["encoder"]["width"]
    monitor = metrics_lib.CollapseMonitor(min_rank=config.train.collapse_warn_rank * width)
    step_flops = run.objective.step_flops(config)
    peak = metrics_lib.device_peak_flops(jax.devices()[0], jnp.dtype(config.model.dtype),
                                         override=config.train.peak_flops)
    progress = metrics_lib.ProgressLine(total_steps, clips_per_step=config.train.global_batch_size,
                                        flops_per_step=step_flops, peak_flops_per_device=peak,
                                        num_devices=jax.device_count(), timer=timer)
    logging.info("analytic model FLOPs per step %.4g; peak per device %.4g FLOP/s", step_flops, peak)

    # Preemption: one process keeps its own SIGTERM flag. Several processes must stop at the same step, so
    # there JAX's preemption sync manager (it receives SIGTERM on any process) picks the step: Orbax's
    # reached_preemption(step) turns true on every process at once.
    multi_process = jax.process_count() > 1
    preempted = {"flag": False}
    previous_handler = (signal.getsignal(signal.SIGTERM) if multi_process else
                        signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True)))

    end_step = min(total_steps, config.train.stop_at or total_steps)
    losses: list[float] = []
    pending = None  # (step, metrics on device, host info) of the step before: checked one step late
    skipped_total = 0
    compiled_cache_size = None

    def finish_step(entry):
        step, metrics, host = entry
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        loss = metrics["loss"]
        if not math.isfinite(loss):
            where = (f"step {last_good} in {checkpointer.directory}" if last_good is not None
                     else "none (no checkpoint was saved yet)")
            raise NonFiniteLossError(f"loss is {loss} at step {step}; last good checkpoint: {where}")
        losses.append(loss)
        if step % run.objective.diagnostics_every == 0:  # see objectives.vjepa.gated_representation_stats
            monitor.update(step, effective_rank=metrics["repr/effective_rank"], std=metrics["repr/std"])
        else:  # the step computed no diagnostics (zeros): log none
            metrics = {k: v for k, v in metrics.items() if not k.startswith("repr/")}
        if step % config.train.log_every == 0 or step == end_step:
            metrics.update(host, **progress.stats())
            writer.write(step, metrics)
            logging.info(progress.line(step, metrics))

    step = start_step
    loop_start = time.perf_counter()
    try:
        while step < end_step:
            with timer.waiting():
                local = next(data_iter)
            skipped_total += int(np.sum(local.get("skipped", 0)))
            batch = sharding.global_batch({k: local[k] for k in keys}, mesh)
            state, metrics = train_step(state, batch)
            step += 1
            cache_size = train_step._cache_size()
            if compiled_cache_size is None:
                compiled_cache_size = cache_size
            elif cache_size != compiled_cache_size:
                logging.warning("train step recompiled at step %d (%d compiled versions): input shapes or "
                                "dtypes changed", step, cache_size)
                compiled_cache_size = cache_size
            if pending is not None:
                finish_step(pending)
            pending = (step, metrics, {"data/skipped_total": skipped_total})
            if multi_process and checkpointer.reached_preemption(step):
                preempted["flag"] = True
            timer.step()
            if step == start_step + 1:
                timer.reset()  # the first step includes compilation
                logging.info("first step (compile + run) took %.1f s", time.perf_counter() - loop_start)
            evaluators_lib.run_due(evaluators, step, state["ema"], writer, timer)  # those with step % every == 0
            if step % config.train.checkpoint_every == 0 or step == end_step or preempted["flag"]:
                finish_step(pending)  # never checkpoint a state whose loss is not finite
                pending = None
                checkpointer.save(step, state, data_iter, force=True)
                last_good = step
            if preempted["flag"]:
                checkpointer.close()
                logging.warning("SIGTERM: saved step %d to %s; exiting with code %d", step,
                                checkpointer.directory, PREEMPTED_EXIT_CODE)
                raise SystemExit(PREEMPTED_EXIT_CODE)
        if pending is not None:
            finish_step(pending)
    finally:
        if not multi_process:
            signal.signal(signal.SIGTERM, previous_handler)
        checkpointer.close()
        writer.close()
        close = getattr(data_iter, "close", None)
        if close is not None:
            close()
    if skipped_total:
        logging.warning("%d unreadable clips were skipped during this run (see warnings above)", skipped_total)
    return TrainResult(losses=losses, final_step=step, workdir=workdir)


def training_flops(config, grid=None) -> float:
    """Analytic model FLOPs of one train step over the global batch (see jepa/metrics.py)."""
    return objectives.build(config, grid).step_flops(config)


# ---------------------------------------------------------------- command line


def main(argv) -> None:
    del argv
    from absl import flags
    config = flags.FLAGS.config
    result = train(config, flags.FLAGS.workdir)
    print(json.dumps({"final_step": result.final_step, "final_loss": result.losses[-1] if result.losses else None}))


# Read by glibc and OpenBLAS only when a process starts. Measured on the quick-start CPU step
# (benchmarks/step_bench.py): XLA's per-step buffers were mmapped fresh every step (~200k page faults, ~17% of
# CPU time) until glibc keeps them in a huge-page heap; scipy's OpenBLAS threads (jaxlib's LAPACK) spun against
# XLA's own threads. The price: the process keeps its peak memory instead of returning it to the OS.
PROCESS_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:"
                      "glibc.malloc.arena_max=1",
}


def relaunch_with_process_env(module: str = "jepa.train") -> None:
    """Re-executes this command once with PROCESS_ENV set (values the user set win; JEPA_ENV_SET=1 skips)."""
    import sys
    if os.environ.get("JEPA_ENV_SET") or sys.platform != "linux":
        return
    env = {**PROCESS_ENV, **os.environ, "JEPA_ENV_SET": "1"}
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


if __name__ == "__main__":
    relaunch_with_process_env()
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file (path.py[:arg]).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard files go.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
