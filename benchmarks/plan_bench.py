"""Cost of one planning call (CEM / MPPI over the world model) at a config's budget, against the matmul peak.

    python benchmarks/plan_bench.py --config=configs/world_model.py            # random weights, default budget
    python benchmarks/plan_bench.py --config=configs/world_model.py --config.plan.samples=128

Builds the world model of the config with random weights (the cost does not depend on them), then times
WorldModel.plan from `world_model.context_frames` observed frames, as jepa.plan calls it: compile time, the best
and median call, seconds per environment action (a plan serves `plan.execute_steps` blocks of
`world_model.action_block` actions), the compiled FLOPs per call and their rate against the float32 matmul peak
measured in the same run. For comparison it also compiles the same energy with the rollout re-reading the whole
sequence for every imagined frame (what a predictor without its key/value cache does) and prints both FLOP
counts per CEM iteration.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags


def _full_recompute_energy(objective, params, z, states, goal, actions, past):
    """The planner's energy ("last" block, L1) with every imagined frame predicted from the whole sequence."""
    samples, k = actions.shape[0], z.shape[0]
    seq = jnp.concatenate([jnp.broadcast_to(past[None], (samples, *past.shape)), actions], axis=1)
    zs = jnp.broadcast_to(z[None], (samples, *z.shape))
    ss = jnp.broadcast_to(states[None], (samples, *states.shape))
    for i in range(actions.shape[1]):
        z_next, s_next = objective.predict(params, zs, seq[:, :k + i], ss)
        zs = jnp.concatenate([zs, z_next[:, -1:]], axis=1)
        ss = jnp.concatenate([ss, s_next[:, -1:]], axis=1)
    return jnp.mean(jnp.abs(zs[:, -1] - goal[None]), axis=(1, 2))


def bench() -> None:
    from jepa import config as config_lib
    from jepa import metrics as metrics_lib
    from jepa import objectives
    from jepa.planning import WorldModel, latent_energy, pad_blocks, pad_states, settings_of
    config = flags.FLAGS.config
    config.encoder_weights = "random"
    config_lib.validate(config)
    objective = objectives.build(config)
    trainable, encoder = objective.init(jax.random.PRNGKey(0), config)
    model = WorldModel(config, encoder, trainable["predictor"], 0)
    settings = settings_of(config)
    k, block = model.context_frames, model.action_block
    res = int(config.data.resolution)
    rng = np.random.default_rng(0)
    z = model.encode(rng.integers(0, 256, (k + 1, res, res, 3), dtype=np.uint8))
    low, high = -np.ones(2, np.float32), np.ones(2, np.float32)
    past = np.zeros(((k - 1) * block, 2), np.float32) if k > 1 else None
    call = lambda i: model.plan(z[:k], None, z[k], low, high, settings, jax.random.PRNGKey(i), past_actions=past)

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    start = time.perf_counter()
    call(0)
    print(f"compile + first call: {time.perf_counter() - start:.1f} s")
    times = []
    for i in range(flags.FLAGS.reps):
        start = time.perf_counter()
        call(i + 1)
        times.append(time.perf_counter() - start)
    best, med = min(times), float(np.median(times))
    per_action = min(int(config.plan.execute_steps), settings.horizon) * block

    # FLOPs of one CEM iteration's energy call: the cached rollout the planner uses vs full recomputation.
    samples = settings.samples
    acts = pad_blocks(jnp.zeros((samples, settings.horizon * block, 2), jnp.float32), block)
    states, past_tokens = pad_states(None, k), model._past(past, k)
    args = (model.predictor_params, z[:k], states, z[k], acts, past_tokens)
    cached = jax.jit(lambda *a: latent_energy(objective, *a)).lower(*args).compile().cost_analysis()["flops"]
    full = jax.jit(lambda *a: _full_recompute_energy(objective, *a)).lower(*args).compile().cost_analysis()["flops"]
    flops = cached * settings.iterations
    peak = metrics_lib.measure_matmul_peak(jnp.float32)
    print(f"plan call ({settings.optimizer}, {samples} samples x {settings.iterations} iterations, horizon "
          f"{settings.horizon} blocks of {block} steps, {k} context frames, block_actions {settings.block_actions}): "
          f"best {best:.3f} s, median {med:.3f} s, {best / per_action:.3f} s per environment action")
    print(f"energy per iteration: {cached / 1e9:.2f} GFLOP with the cached rollout, {full / 1e9:.2f} GFLOP "
          f"re-reading the sequence ({full / cached:.2f}x)")
    print(f"{flops / best / 1e9:.1f} GFLOP/s = {100 * flops / best / peak:.1f}% of the float32 matmul peak "
          f"measured now ({peak / 1e9:.1f} GFLOP/s)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main(argv=None) -> None:
    """`python benchmarks/plan_bench.py --config=FILE[:ARG] [--reps=N] [--config.FIELD=VALUE ...]`."""
    from jepa import cli
    with cli.flag_scope():
        cli.define_config_file(argv)
        flags.DEFINE_integer("reps", 5, "timed planning calls")
        cli.parse(argv, required=("config",))
        bench()


if __name__ == "__main__":
    from jepa import cli
    cli.run(main, __doc__)
