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
from jepa import workdir as workdir_lib
from jepa.data import pipeline
from jepa.data import sources as sources_lib
from jepa.models import channels as channels_lib

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
    check_state: Callable  # (state, batch) -> (its loss, all parameters finite); run before every save


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

    def check_state(state, batch):
        """A state's own loss (on the first micro-batch of the batch it was just trained on) and whether all its
        parameters are finite: a state is saved only when both are, so a diverged state is never "last good"."""
        micro = jax.tree.map(lambda x: x[:x.shape[0] // num_micro], batch)
        loss, _ = objective.loss(state["params"], state["ema"], micro, state["step"])
        leaves = jax.tree.leaves((state["params"], state["ema"]))
        return loss, jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))

    batch_shardings = {k: sharding.batch_sharding(mesh) for k in objective.data_keys()}
    # Traced under the mesh: the models pin their activations' batch dimension to data x fsdp (FSDP gathers
    # weights rather than all-reducing activations; see jepa.sharding.constrain_activations).
    train_step, check_state = sharding.traced_under(mesh, train_step), sharding.traced_under(mesh, check_state)
    return Run(
        grid=grid, objective=objective, abstract_state=abstract_state, state_shardings=state_shardings,
        init_state=jax.jit(init_state, out_shardings=state_shardings),
        train_step=jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                           out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0),
        check_state=jax.jit(check_state, in_shardings=(state_shardings, batch_shardings),
                            out_shardings=sharding.replicated(mesh)))


def adopt_encoder_config(config) -> None:
    """World-model runs (config.encoder_from set): take the frozen encoder's architecture from the pretraining
    run's config.json, so the world-model config never has to repeat it."""
    if not config.encoder_from:
        return
    from jepa import runs
    pre = runs.load_config(config.encoder_from)
    with config.unlocked():
        config.model.encoder = pre.model.encoder
        config.model.rope_layout = pre.model.rope_layout
        config.model.channels = pre.model.channels  # validate() then refuses a multi-channel encoder
    logging.info("encoder architecture from %s: %s", config.encoder_from, dict(config.model.encoder))


def load_frozen_encoder(config, state, mesh):
    """Puts the pretraining run's EMA encoder (config.encoder_from) into the state's target slot, and into
    params["encoder"] when world_model.train_encoder trains it, unless config.encoder_weights is "random" (the
    baseline world model on an untrained encoder)."""
    if not config.encoder_from or config.encoder_weights == "random":
        return state
    from jepa import runs
    encoder, step = runs.load_encoder(config.encoder_from, config, weights="ema", mesh=mesh)
    trained = config.objective == "ac" and config.world_model.train_encoder
    logging.info("%s encoder: EMA weights of %s at step %d", "trained" if trained else "frozen", config.encoder_from,
                 step)
    # may_alias=False: two slots of the (donated) state must never share a buffer.
    put = lambda slot: jax.device_put(encoder, jax.tree.map(lambda x: x.sharding, slot), may_alias=False)
    state = {**state, "ema": put(state["ema"])}
    if trained:
        state["params"] = {**state["params"], "encoder": put(state["params"]["encoder"])}
    return state


def fresh_state(config, run: Run, mesh):
    """The state of a run with no checkpoint: initialised, with the frozen encoder (world model) or another run's
    weights (train.init_from) put in."""
    state = load_frozen_encoder(config, run.init_state(jax.random.PRNGKey(config.seed)), mesh)
    if config.train.init_from:
        from jepa import convert, runs
        if convert.is_source(config.train.init_from):  # a Hugging Face folder or a Meta checkpoint file
            other, other_step = convert.external_weights(config.train.init_from, config, run.abstract_state), 0
        else:  # not the optimiser state; restored straight onto the trainer's layout
            other, other_step = runs.load_state_parts(config.train.init_from, ["params", "ema"],
                                                      target=run.abstract_state)
        state = {**state, "params": other["params"], "ema": other["ema"]}
        logging.info("initialised weights from %s (step %d)", config.train.init_from, other_step)
    return state


def lock_workdir(workdir: str) -> workdir_lib.WorkdirLock | None:
    """Process 0 takes the workdir's lock; every process fails when it cannot (see jepa/workdir.py)."""
    lock, error = None, None
    if jax.process_index() == 0:
        lock = workdir_lib.WorkdirLock(workdir)
        try:
            lock.acquire()
        except workdir_lib.WorkdirLockedError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if failed and error is None:
            raise workdir_lib.WorkdirLockedError(f"workdir {workdir} is in use by another run (see process 0)")
    if error is not None:
        raise error
    return lock


class _CompileCounter:
    """Counts traces of the jitted train step through JAX's monitoring events: after the first step, another one
    means the step was recompiled (new input shapes or dtypes)."""

    count = 0
    _registered = False

    @classmethod
    def start(cls) -> None:
        if not cls._registered:
            jax.monitoring.register_event_duration_secs_listener(cls._listen)
            cls._registered = True

    @classmethod
    def _listen(cls, event: str, duration: float, **kwargs) -> None:
        del duration
        if event == "/jax/core/compile/jaxpr_trace_duration" and kwargs.get("fun_name") == "train_step":
            cls.count += 1


def train(config, workdir: str) -> TrainResult:
    adopt_encoder_config(config)
    config_lib.validate(config)
    setup_runtime(config)
    # SIGTERM from here on (compilation and data start-up included) ends the run cleanly with PREEMPTED_EXIT_CODE.
    # One process keeps its own flag. Several processes must stop at the same step, so there JAX's preemption sync
    # manager (it receives SIGTERM on any process) picks the step: Orbax's reached_preemption(step) turns true on
    # every process at once.
    multi_process = jax.process_count() > 1
    preempted = {"flag": False}
    previous_handler = (signal.getsignal(signal.SIGTERM) if multi_process else
                        signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True)))
    is_main = jax.process_index() == 0
    lock = data_iter = checkpointer = writer = profiling = None
    try:
        lock = lock_workdir(workdir)
        # The vector channel's normalisation statistics, from the train split (or the run's own config.json when it
        # resumes), saved in config.json with the run. Process 0 first: opening the sources may generate the world
        # dataset.
        saved_path = workdir_lib.path(workdir) / "config.json"
        saved = json.loads(saved_path.read_text()) if saved_path.exists() else None
        if is_main and channels_lib.ensure_statistics(config, saved):
            logging.info("vector channel statistics: std %s", [round(x, 3) for x in config.data.vector_std])
        if multi_process:
            sharding.sync("jepa: channel statistics")
            if not is_main:
                channels_lib.ensure_statistics(config, saved)
        if is_main:
            (workdir_lib.path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))

        def leave_if_preempted(where: str) -> None:
            if preempted["flag"]:
                logging.warning("SIGTERM during start-up (%s): nothing new to save; exiting with code %d", where,
                                PREEMPTED_EXIT_CODE)
                raise SystemExit(PREEMPTED_EXIT_CODE)

        # -------------------------------------------------------- mesh
        mesh = sharding.make_mesh(config.mesh)
        logging.info("mesh %s over %d devices (%s), %d process(es)", dict(mesh.shape), mesh.size,
                     jax.devices()[0].device_kind, jax.process_count())

        # -------------------------------------------------------- model, state layout and train step
        run = build_run(config, mesh)
        abstract_state, train_step = run.abstract_state, run.train_step
        total_steps = config.train.total_steps
        num_params = {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in abstract_state["params"].items()}
        num_params["target encoder"] = sum(x.size for x in jax.tree.leaves(abstract_state["ema"]))
        logging.info("parameters (M): %s", ", ".join(f"{k} {v / 1e6:.2f}" for k, v in num_params.items()))

        # -------------------------------------------------------- data
        # Process 0 first: it prepares (generates) a missing world dataset; the others wait, then only read it.
        if is_main:
            sources_lib.check_sources(config)
        sharding.sync("jepa: data sources ready")
        if not is_main:
            sources_lib.check_sources(config)
        dataset = pipeline.build_pipeline(config, process_index=jax.process_index(),
                                          process_count=jax.process_count(), train=True,
                                          masks=run.objective.needs_masks)
        data_iter = iter(dataset)
        keys = run.objective.data_keys()
        leave_if_preempted("data pipeline")

        # -------------------------------------------------------- checkpoints: resume, init_from, or fresh
        checkpointer = ckpt_lib.Checkpointer(workdir, save_every=config.train.checkpoint_every,
                                             keep=config.train.keep_checkpoints,
                                             fallback=config.train.checkpoint_fallback)
        resumed = checkpointer.restore_latest(abstract_state, data_iter)
        if resumed is not None:
            state, last_good = resumed
            logging.info("resumed from %s at step %d", checkpointer.directory, last_good)
        else:
            state, last_good = fresh_state(config, run, mesh), None
        leave_if_preempted("state restored")

        # -------------------------------------------------------- loop
        start_step = int(jax.device_get(state["step"]))
        writer = metrics_lib.MetricsWriter(workdir, enabled=is_main, start_step=start_step)
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
        profile_start, profile_steps = (int(v) for v in config.train.profile_steps)

        end_step = min(total_steps, config.train.stop_at or total_steps)
        losses: list[float] = []
        pending = None  # (step, metrics on device, host info) of the step before: checked one step late

        def stop_diverged(step: int, what: str):
            where = (f"step {last_good} in {checkpointer.directory}" if last_good is not None
                     else "none (no checkpoint was saved yet)")
            raise NonFiniteLossError(f"{what} at step {step}; last good checkpoint: {where}")

        def finish_step(entry):
            step, metrics, host = entry
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            loss = metrics["loss"]
            if not math.isfinite(loss):
                stop_diverged(step, f"loss is {loss}")
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
        _CompileCounter.start()
        traces = None
        while step < end_step:
            if profile_steps and step == profile_start:
                profiling = writer.tensorboard_dir
                jax.profiler.start_trace(profiling)
            with timer.waiting():
                local = next(data_iter)
            batch = sharding.global_batch({k: local[k] for k in keys}, mesh)
            state, metrics = train_step(state, batch)
            step += 1
            if traces is None:
                traces = _CompileCounter.count
            elif _CompileCounter.count != traces:
                logging.warning("train step recompiled at step %d: input shapes or dtypes changed", step)
                traces = _CompileCounter.count
            if pending is not None:
                finish_step(pending)
            pending = (step, metrics, {"data/skipped_total": data_iter.skipped_total})
            if multi_process and checkpointer.reached_preemption(step):
                preempted["flag"] = True
            timer.step()
            if step == start_step + 1:
                timer.reset()  # the first step includes compilation
                logging.info("first step (compile + run) took %.1f s", time.perf_counter() - loop_start)
            if profiling and step == profile_start + profile_steps:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                logging.info("profile of steps %d-%d written to %s", profile_start + 1, step, profiling)
                profiling = None
            evaluators_lib.run_due(evaluators, step, state["ema"], writer, timer)  # those with step % every == 0
            if step % config.train.checkpoint_every == 0 or step == end_step or preempted["flag"]:
                finish_step(pending)  # never checkpoint a state whose loss is not finite...
                pending = None
                own_loss, finite = (float(v) for v in jax.device_get(run.check_state(state, batch)))
                if not (finite and math.isfinite(own_loss)):  # ...nor one whose own next loss is not
                    stop_diverged(step, f"the new state diverged (its own loss on its batch is {own_loss}"
                                        f"{'' if finite else ', some parameters are not finite'}; not saved)")
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
        # The handler stays until the last save is written and the lock released: a SIGTERM while the final
        # checkpoint is still being written must not kill the process mid-save.
        try:
            if profiling:
                jax.profiler.stop_trace()
            for closable in (checkpointer, writer, data_iter):
                close = getattr(closable, "close", None)
                if close is not None:
                    close()
            if lock is not None:
                lock.release()
        finally:
            if not multi_process:
                signal.signal(signal.SIGTERM, previous_handler)
    if preempted["flag"]:  # after the last step: everything is saved, and a rerun returns at once
        logging.warning("SIGTERM after the last step: step %d is saved; exiting with code %d", step,
                        PREEMPTED_EXIT_CODE)
        raise SystemExit(PREEMPTED_EXIT_CODE)
    if data_iter.skipped_total:
        logging.warning("%d unreadable clips were skipped so far in this run (counted across resumes; see the "
                        "warnings naming them)", data_iter.skipped_total)
    return TrainResult(losses=losses, final_step=step, workdir=workdir)


def training_flops(config, grid=None) -> float:
    """Analytic model FLOPs of one train step over the global batch (see jepa/metrics.py)."""
    return objectives.build(config, grid).step_flops(config)


# ---------------------------------------------------------------- command line


def main(argv=None) -> TrainResult:
    """`python -m jepa.train --config=FILE[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]` (argv: the arguments
    after the program name; default sys.argv[1:]). Prints the final step and loss as one JSON line."""
    from absl import flags

    from jepa import cli
    with cli.flag_scope():
        config = cli.define_config_file(argv)
        workdir = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and TensorBoard files go; a "
                                      "workdir with checkpoints resumes from the latest")
        cli.parse(argv, required=("config", "workdir"))
        result = train(config.value, workdir.value)
    print(json.dumps({"final_step": result.final_step, "final_loss": result.losses[-1] if result.losses else None}))
    return result


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
    """Re-executes this command once as `python -m MODULE ARGS` with PROCESS_ENV set (values the user set win;
    JEPA_ENV_SET=1 skips). Help requests skip it too: they start no step worth tuning."""
    import sys
    if os.environ.get("JEPA_ENV_SET") or sys.platform != "linux" or \
            any(a in ("--help", "--helpfull", "--helpshort", "-h", "-?") for a in sys.argv[1:]):
        return
    env = {**PROCESS_ENV, **os.environ, "JEPA_ENV_SET": "1"}
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def run() -> None:
    """Entry of `python -m jepa.train` and the `jepa-train` console script."""
    from jepa import cli
    relaunch_with_process_env()
    cli.run(main, __doc__)


if __name__ == "__main__":
    run()
