"""Model-predictive control in the real MuJoCo environment with a trained world model, and its benchmark.

    python -m jepa.plan --workdir=runs/wm --domain=reacher --episodes=5 [--config.plan.samples=256 ...]
    python -m jepa.plan benchmark --workdir=runs/wm --baseline_workdir=runs/wm_random --output=runs/plan_bench

An episode: the environment starts from the seed's initial state; the goal is where `plan.goal_steps` steps of
one random constant action take it (so it is reachable), shown to the planner only as a rendered image. The
episode advances in blocks of `world_model.action_block` environment steps (one latent step of the model): the
planner encodes the latest `world_model.context_frames` observed frames (with their physics states and the
blocks executed between them), runs CEM on the latent energy over `plan.horizon` blocks (0: the fewest that
cover the goal's steps; jepa/planning.py), executes the first `plan.execute_steps` blocks and observes.
"Final" success: the effector (reacher's finger tip, point_mass's point) ends within `SUCCESS_RADIUS` of its goal
position; "reached" success: it is within the radius at some step.

A surprise monitor compares every executed block's predicted next representation (the planner's own one-step
prediction) with the observed one and flags blocks above a threshold calibrated the same way on unaltered
validation episodes (jepa/surprise.py calibrate_threshold); a flagged block drops the rest of the plan and its
warm start, so the next block is re-planned from a fresh CEM initialisation (counted as a re-plan).

The benchmark runs a fixed set of seeded episodes per domain (`--episodes`, from `--first_seed`) with: CEM on the
world model, CEM on the baseline world model (same architecture and training, randomly initialised frozen
encoder), uniformly random actions, and the oracle (the same CEM with the true simulator as the model, on copies
of the MuJoCo physics: the upper bound); it reports both success rates with 95% Wilson intervals, distances and
planning time per environment action as JSON and a Markdown table, and saves an energy-landscape plot (energy vs.
offset of one action dimension around the true action of a one-block goal) with the landscape error: the mean
|offset| of the energy minimum over the episode seeds and action dimensions (0 = the energy is lowest at the true
action).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jepa import workdir as workdir_lib
from jepa.planning import CEMSettings, WorldModel, cem, settings_of

log = logging.getLogger(__name__)

# Final effector distance to the goal position that counts as success (metres): about the size of reacher's
# target and 1/12 of point_mass's arena.
SUCCESS_RADIUS = {"reacher": 0.05, "point_mass": 0.05}
PLAN_DOMAINS = tuple(SUCCESS_RADIUS)


@dataclasses.dataclass
class Goal:
    frame: np.ndarray        # uint8 [R, R, 3]
    position: np.ndarray     # effector (x, y)
    actions: np.ndarray      # the constant action that reached it, [goal_steps, action_dim]


def make_goal(env, seed: int, goal_steps: int) -> Goal:
    """Where one random constant action, held for goal_steps, takes the episode's initial state; leaves the env
    reset to that initial state."""
    rng = np.random.default_rng([int(seed), 0x60A1])
    action = rng.uniform(env.action_low, env.action_high)
    env.reset(seed)
    obs = None
    for _ in range(goal_steps):
        obs = env.step(action)
    goal = Goal(frame=obs["frame"], position=env.effector_position(),
                actions=np.repeat(action[None], goal_steps, axis=0))
    env.reset(seed)
    return goal


def episode_seeds(domain: str, count: int, goal_steps: int, resolution: int, first: int = 1000) -> list[int]:
    """The first `count` seeds from `first` whose goal lies at least twice the success radius away: the fixed
    episode set of the benchmark (deterministic)."""
    from jepa.envs import make_env
    env = make_env(domain, first, resolution)
    seeds, seed = [], first
    # A goal too close to start from (e.g. point_mass with goal_steps under ~8) never qualifies: give up, loudly,
    # once far more seeds than asked for have been tried instead of searching forever.
    tries = 20 * count + 100
    try:
        while len(seeds) < count:
            if seed - first >= tries:
                raise ValueError(f"plan.goal_steps={goal_steps}: only {len(seeds)} of {seed - first} {domain} "
                                 f"episodes put the goal {2 * SUCCESS_RADIUS[env.domain]} m or more away; "
                                 "raise plan.goal_steps")
            goal = make_goal(env, seed, goal_steps)
            if np.linalg.norm(env.effector_position() - goal.position) >= 2 * SUCCESS_RADIUS[env.domain]:
                seeds.append(seed)
            seed += 1
    finally:
        env.close()
    return seeds


@dataclasses.dataclass
class Monitor:
    """Flags executed blocks whose surprise (mean |predicted - observed| next representation, the planner's own
    one-step prediction) exceeds threshold; with `replan`, a flag discards the rest of the plan and the warm start:
    the next step re-plans from a fresh CEM initialisation. `model` names the world model in the messages."""
    threshold: float
    replan: bool = True
    model: str = "world model"


POLICIES = ("cem", "random", "oracle")


class Oracle:
    """CEM with the true simulator as the model (the benchmark's upper bound): the same settings and horizon as
    the world model's planner; a plan's energy is the effector's distance to the goal position after its last
    block ("last") or averaged over its blocks ("all"), squared for energy_norm "l2". Samples are played on a copy
    of the environment's physics (WorldEnv.simulate), so the real episode is untouched."""

    def __init__(self, env, settings: CEMSettings, block: int):
        self.env, self.settings, self.block = env, settings, int(block)
        self.goal = np.zeros(2)
        length = settings.horizon * self.block

        def energy_np(actions):
            pos = self.env.simulate(np.asarray(actions, np.float64))[:, self.block - 1::self.block]   # block ends
            d = np.linalg.norm(pos - self.goal[None, None], axis=-1)
            d = d if settings.energy_norm == "l1" else d ** 2
            return (d[:, -1] if settings.energy_steps == "last" else d.mean(1)).astype(np.float32)

        def energy(actions):
            return jax.pure_callback(energy_np, jax.ShapeDtypeStruct(actions.shape[:1], jnp.float32), actions)

        def plan_fn(check, key, low, high, mean, values, last):
            fn = energy if check is None else lambda a: (energy(a), check(values, None, None, a, last))
            return cem(fn, key, low, high, settings, mean, length, self.block)
        self._plan = jax.jit(plan_fn, static_argnums=0)

    def plan(self, goal_position, low, high, key, init_mean, check=None, check_values=None,
             last_action=None) -> tuple[np.ndarray, dict]:
        """check: an optional constraint on the sampled actions (jepa.constraints.oracle_check: the simulated
        path) with its check_values; last_action [A]: the last executed action (action-rate rules)."""
        self.goal = np.asarray(goal_position, np.float64)
        last = np.zeros(np.shape(low), np.float32) if last_action is None else np.asarray(last_action, np.float32)
        plan, info = self._plan(check, key, np.asarray(low, np.float32), np.asarray(high, np.float32), init_mean,
                                check_values, last)
        return np.asarray(plan), {k: np.asarray(v) for k, v in info.items()}


def run_episode(model: WorldModel, env, seed: int, *, policy: str = "cem", settings: CEMSettings | None = None,
                episode_steps: int = 25, goal_steps: int = 10, execute_steps: int = 1, context_frames: int = 0,
                monitor: Monitor | None = None, record: bool = False, oracle: Oracle | None = None,
                guard=None, shift=None, constraints=None) -> dict:
    """One MPC episode toward the seed's goal. policy: "cem" (plan with the world model), "random" (uniform
    actions) or "oracle" (CEM on the true simulator: `oracle`, built on `env`). guard: a jepa.guard.Guard that
    decides act / hold / stop before each block and checks its consequences after it (its records in
    out["guard"]); shift: a jepa.guard.Shift applied to `env` before block shift.at (the caller undoes it).
    constraints: a jepa.constraints.EpisodeConstraints: its check (if any) constrains the plans (the oracle's
    only through the true simulator, jepa.constraints.oracle_check), and every executed step's true violation is
    measured (out["violation"], one amount per step).

    The episode advances in blocks of the model's action_block environment steps (one latent step): each
    planning call searches settings.horizon blocks, the first `execute_steps` blocks are executed, then the
    frame is observed. The planner and the monitor condition on the latest `context_frames` observed frames
    (0: the model's world_model.context_frames), their physics states and the blocks executed between them."""
    if policy not in POLICIES:
        raise ValueError(f"policy: {policy!r} is not one of {', '.join(POLICIES)}")
    if policy == "oracle" and (oracle is None or oracle.env is not env):
        raise ValueError("policy 'oracle' needs oracle=Oracle(env, settings, block) built on this episode's env")
    settings = settings or settings_of(model.config)
    block = model.action_block
    context_frames = int(context_frames) or model.context_frames
    if context_frames < 1:
        raise ValueError(f"plan.context_frames must be >= 1, got {context_frames}")
    if episode_steps % block:
        raise ValueError(f"plan.episode_steps={episode_steps} is not a multiple of world_model.action_block={block}")
    goal = make_goal(env, seed, goal_steps)
    obs = env.reset(seed)
    z_goal = model.encode(goal.frame[None])[0]
    low, high = env.action_low, env.action_high
    rng = np.random.default_rng([int(seed), 0xAC7])
    key = jax.random.PRNGKey(seed)
    seen = [model.encode(obs["frame"][None])[0]]   # representations of the observed frames
    states = [obs["state"]]                        # their physics states (the model reads them with "physics")
    done: list[np.ndarray] = []                    # the blocks [block, A] executed between them
    dist = lambda: float(np.linalg.norm(env.effector_position() - goal.position))
    out = {"seed": int(seed), "distance": [dist()], "energy": [], "surprise": [], "flagged": [], "plan_time": [],
           "actions": [], "replans": 0, "fresh_plans": []}
    frames = [obs["frame"]] if record else None
    observed_states = [obs["state"]] if record else None
    queue: list[np.ndarray] = []
    previous, executed = None, 0  # the last plan and how many of its blocks have been executed
    if guard is not None:
        guard.reset(seed)
    if constraints is not None:
        constraints.reset(env)
        out["violation"] = []
    out["stopped"] = None
    for t in range(episode_steps // block):
        if shift is not None and t == shift.at:
            shift.apply(env)
        k = min(context_frames, len(seen))
        z, st = jnp.stack(seen[-k:]), np.stack(states[-k:])
        past = np.concatenate(done[-(k - 1):]) if k > 1 else None
        if policy == "random":
            actions = rng.uniform(low, high, (block, low.shape[0]))
        else:
            if not queue:
                warm = None
                if previous is not None:  # the previous plan shifted by what was executed of it
                    warm = np.concatenate([previous[executed * block:],
                                           np.repeat(previous[-1:], executed * block, axis=0)], axis=0)
                key, sub = jax.random.split(key)
                start = time.perf_counter()
                check = constraints.check if constraints is not None else None
                values = constraints.values if check is not None else None
                if policy == "oracle":
                    plan, info = oracle.plan(goal.position, low, high, sub, warm, check, values,
                                             done[-1][-1] if done else None)
                else:
                    plan, info = model.plan(z, st, z_goal, low, high, settings, sub, init_mean=warm,
                                            past_actions=past, check=check, check_values=values)
                out["plan_time"].append(time.perf_counter() - start)
                out["fresh_plans"].append(warm is None)
                out["energy"].append(float(info["best_energy"][-1]))
                queue = [plan[i * block:(i + 1) * block] for i in range(min(execute_steps, settings.horizon))]
                previous, executed = plan, 0
            actions = queue.pop(0)
            executed += 1
        actions = np.asarray(actions, np.float32)
        if guard is not None:
            rest = actions if previous is None or policy == "random" else previous[(executed - 1) * block:]
            decision = guard.before(t, z, st, past, actions, rest)
            if decision == "stop":
                out["stopped"] = t
                break
            if decision == "hold":  # the safe block, then a fresh plan
                actions = guard.safe_block(low, high, block)
                queue, previous = [], None
        predicted = model.next_prediction(z, st, past, actions)
        for a in actions:
            obs = env.step(a)
            out["actions"].append(np.asarray(a, np.float64).tolist())
            if constraints is not None:
                out["violation"].append(constraints.observe(env, a))
            out["distance"].append(dist())
            if record:
                frames.append(obs["frame"])
                observed_states.append(obs["state"])
        seen.append(model.encode(obs["frame"][None])[0])
        states.append(obs["state"])
        done.append(actions)
        seen, states, done = seen[-context_frames:], states[-context_frames:], done[-context_frames:]
        surprise = float(np.mean(np.abs(np.asarray(predicted) - np.asarray(seen[-1]))))
        out["surprise"].append(surprise)
        if guard is not None:
            guard.after(t, z, st, past, actions, seen[-1], surprise, observed_state=states[-1])
        if monitor is not None and surprise > monitor.threshold:
            out["flagged"].append(t)
            again = monitor.replan and policy == "cem"
            log.info("%s, %s episode seed %d, block %d: surprise %.4f above the calibrated threshold %.4f%s",
                     monitor.model, env.domain, seed, t, surprise, monitor.threshold,
                     "; re-planning from a fresh initialisation" if again else "")
            if again:
                queue, previous = [], None
                out["replans"] += 1
    radius = SUCCESS_RADIUS[env.domain]
    out.update(domain=env.domain, policy=policy, initial_distance=out["distance"][0],
               final_distance=out["distance"][-1], min_distance=float(min(out["distance"])),
               success=out["distance"][-1] < radius, reached=min(out["distance"]) < radius,
               action_block=block)
    if constraints is not None:
        out["violating_steps"] = int(sum(v > 0 for v in out["violation"]))
    if guard is not None:
        out["guard"] = guard.records
    if record:
        out["frames"], out["states"], out["goal_frame"] = np.stack(frames), np.stack(observed_states), goal.frame
    return out


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (sound at 0 and n successes, unlike the normal approximation)."""
    if n < 1:
        raise ValueError(f"wilson_interval: n must be >= 1, got {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def evaluate(model: WorldModel, domain: str, seeds: Sequence[int], policy: str, config,
             monitor: Monitor | None = None, *, name: str = "", progress: bool = False,
             constraints=None, guard=None) -> dict:
    """Episodes over `seeds`: "final" success (within the radius at the end) and "reached" success (at any
    step) with 95% Wilson intervals, distances, planning time per environment action (None without planning).
    `progress`: a bar over the episodes and a line per episode, labelled with the domain and `name` (the
    method). constraints: (env, seed) -> jepa.constraints.EpisodeConstraints of the episode; adds the violation
    rate (episodes with a violating step, Wilson interval) and violating steps per episode. guard: a
    jepa.guard.Guard for every episode; adds the fraction of blocks acted on and its decisions ("decisions")."""
    from tqdm.auto import tqdm

    from jepa.envs import make_env
    p = config.plan
    settings = settings_of(config)
    label = f"{domain}, {name or policy}"
    env = make_env(domain, seeds[0], int(config.data.resolution))
    oracle = Oracle(env, settings, model.action_block) if policy == "oracle" else None
    episodes = []
    try:
        bar = tqdm(seeds, desc=label, unit="episode", file=sys.stderr, disable=not progress)
        for i, s in enumerate(bar):
            e = run_episode(model, env, s, policy=policy, settings=settings, episode_steps=int(p.episode_steps),
                            goal_steps=int(p.goal_steps), execute_steps=int(p.execute_steps),
                            context_frames=int(p.context_frames), monitor=monitor, oracle=oracle,
                            constraints=constraints(env, s) if constraints is not None else None, guard=guard)
            episodes.append(e)
            if progress:
                bar.write(f"{label}, episode {i + 1}/{len(seeds)} (seed {s}): {episode_line(e)}", file=sys.stderr)
    finally:
        env.close()
    # The first plan of a run includes compilation; a plan serves execute_steps blocks of action_block actions.
    per_plan = int(min(int(p.execute_steps), settings.horizon)) * model.action_block
    times = [t / per_plan for e in episodes for t in e["plan_time"][1:]]
    n = len(episodes)
    out = {"episodes_count": n}
    for kind in ("success", "reached"):
        wins = int(sum(e[kind] for e in episodes))
        rate = "success_rate" if kind == "success" else "reached_rate"
        out[rate], out[f"{rate}_ci95"] = wins / n, list(wilson_interval(wins, n))
    out.update({
        "final_distance": float(np.mean([e["final_distance"] for e in episodes])),
        "min_distance": float(np.mean([e["min_distance"] for e in episodes])),
        "initial_distance": float(np.mean([e["initial_distance"] for e in episodes])),
        "plan_seconds_per_action": float(np.mean(times)) if times else None,
        "flagged_steps": int(sum(len(e["flagged"]) for e in episodes)),
        "replans": int(sum(e["replans"] for e in episodes)),
        "episodes": [{k: e[k] for k in ("seed", "success", "reached", "initial_distance", "final_distance",
                                        "min_distance", "flagged", "replans", "violating_steps", "stopped")
                      if k in e}
                     for e in episodes]})
    if constraints is not None:
        bad = int(sum(e["violating_steps"] > 0 for e in episodes))
        out.update(violation_rate=bad / n, violation_rate_ci95=list(wilson_interval(bad, n)),
                   violating_steps=float(np.mean([e["violating_steps"] for e in episodes])),
                   violation_amount=float(np.mean([sum(e["violation"]) for e in episodes])))
    if guard is not None:
        decisions = [r for e in episodes for r in e["guard"]]
        blocks = int(p.episode_steps) // model.action_block
        out.update(acted=sum(r["decision"] == "act" for r in decisions) / (blocks * n), decisions=decisions)
    return out


def episode_line(e: dict) -> str:
    """One episode's outcome in words: success, distances and the steps the surprise monitor flagged."""
    flagged = f"surprise flagged blocks {e['flagged']}" if e["flagged"] else "no block flagged"
    reached = "reached" if e["reached"] else "never reached"
    return (f"{'success' if e['success'] else 'missed'}, final distance {e['final_distance']:.3f} m from "
            f"{e['initial_distance']:.3f} m, {reached} (closest {e['min_distance']:.3f} m), {flagged}")


# ---------------------------------------------------------------- energy landscape


def energy_landscape(model: WorldModel, env, seed: int, points: int = 41, settings: CEMSettings | None = None) -> dict:
    """Energy of the true action of the seed's one-block goal (one constant action held for the model's
    action_block steps) with one action dimension swept across its bounds: {"offsets": [action_dim, points]
    (swept value - true value), "energy": [action_dim, points], "true_action"}. A good model has its minimum near
    offset 0."""
    block = model.action_block
    goal = make_goal(env, seed, block)
    obs = env.reset(seed)
    low, high = env.action_low, env.action_high
    z = model.encode(obs["frame"][None])
    z_goal = model.encode(goal.frame[None])[0]
    true = goal.actions[0]
    offsets, energies = [], []
    for dim in range(true.shape[0]):
        actions = np.repeat(true[None], points, axis=0)
        actions[:, dim] = np.linspace(low[dim], high[dim], points)
        offsets.append(actions[:, dim] - true[dim])
        sequences = np.repeat(actions[:, None], block, axis=1)                       # [points, block, A]
        energies.append(np.asarray(model.energy(z, obs["state"][None], z_goal, sequences, settings=settings)))
    return {"offsets": np.stack(offsets).tolist(), "energy": np.stack(energies).tolist(),
            "true_action": true.tolist()}


def energy_fidelity(model: WorldModel, env, seeds: Sequence[int], goal_steps: int, candidates: int = 32,
                    settings: CEMSettings | None = None) -> dict:
    """How well the planner's energy ranks outcomes, per episode seed: `candidates` constant actions held for
    goal_steps (the goal's own action first, the rest uniform) are played in the simulator, and the true final
    effector distance to the goal is correlated (Pearson, averaged over seeds) with
      - "predicted": the world model's energy of the action sequence from the start frame (what CEM minimises);
      - "true_frames": the same distance (energy_norm) between the encoded true final frame and the goal: the
        best any predictor on this encoder can do;
      - "pixels": mean |pixel difference| of the true final frame and the goal image (a reference cost).
    A low "true_frames" says the encoder's geometry, not the predictor or the search, limits planning."""
    settings = settings or settings_of(model.config)
    dist = (lambda d: jnp.abs(d)) if settings.energy_norm == "l1" else jnp.square
    out: dict[str, list] = {"predicted": [], "true_frames": [], "pixels": []}
    for seed in seeds:
        goal = make_goal(env, seed, goal_steps)
        rng = np.random.default_rng([int(seed), 0xF1D])
        actions = np.concatenate([goal.actions[:1], rng.uniform(env.action_low, env.action_high,
                                                                (candidates - 1, len(env.action_low)))])
        frames, distance = [], []
        for a in actions:
            obs = env.reset(seed)
            for _ in range(goal_steps):
                obs = env.step(a)
            frames.append(obs["frame"])
            distance.append(np.linalg.norm(env.effector_position() - goal.position))
        start = env.reset(seed)
        z_goal = model.encode(goal.frame[None])[0]
        sequences = np.repeat(actions[:, None], math.ceil(goal_steps / model.action_block) * model.action_block, 1)
        scores = {
            "predicted": model.energy(model.encode(start["frame"][None]), start["state"][None], z_goal, sequences,
                                      settings=settings),
            "true_frames": jnp.mean(dist(model.encode(np.stack(frames)) - z_goal[None]), axis=(1, 2)),
            "pixels": np.abs(np.stack(frames).astype(np.float32) - goal.frame.astype(np.float32)).mean((1, 2, 3))}
        for name, e in scores.items():
            out[name].append(float(np.corrcoef(np.asarray(e, np.float64), distance)[0, 1]))
    return {name: float(np.mean(v)) for name, v in out.items()}


def plot_landscapes(landscapes: dict, path) -> None:
    """landscapes: {domain: {model name: energy_landscape(...)}} -> one PNG, a panel per domain."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(landscapes), figsize=(5 * len(landscapes), 3.6), squeeze=False)
    for ax, (domain, per_model) in zip(axes[0], landscapes.items()):
        for (name, land), color in zip(per_model.items(), ("tab:blue", "tab:orange", "tab:green")):
            energy = np.asarray(land["energy"])
            for dim, style in zip(range(energy.shape[0]), ("-", "--", ":")):
                e = energy[dim]
                ax.plot(land["offsets"][dim], (e - e.min()) / max(float(np.ptp(e)), 1e-12), style, color=color,
                        label=f"{name}, action dim {dim}")
        ax.axvline(0.0, color="gray", lw=0.8)
        ax.set(title=f"{domain}: energy around the true action", xlabel="offset from the true action",
               ylabel="energy (min-max scaled)")
        ax.legend(fontsize=7)
    workdir_lib.write_png(path, fig)


# ---------------------------------------------------------------- benchmark


def describe_encoder(config) -> str:
    """Where a world model's encoder comes from, in words."""
    if config.world_model.train_encoder:
        start = "random init" if config.encoder_weights == "random" else f"the EMA encoder of {config.encoder_from}"
        return f"encoder trained with the predictor (from {start})"
    if config.encoder_weights == "random":
        return "random-init encoder (untrained)"
    return f"EMA encoder of {config.encoder_from or 'its own run'}"


def benchmark(workdir: str, baseline_workdir: str | None, *, domains: Sequence[str] = PLAN_DOMAINS,
              episodes: int = 50, first_seed: int = 1000, output: str = "", config=None, oracle: bool = True,
              progress: bool = True, fidelity_episodes: int = 10) -> dict:
    """On the same seeded episodes of each domain: CEM with the world model (and the baseline world model),
    uniformly random actions, and the oracle (CEM with the true simulator, same budget and horizon); energy
    landscapes. config: the world model run's config with changes (plan settings, data; default: the run's own),
    used for every method. `progress`: bars and a line per episode. fidelity_episodes: the seeds
    energy_fidelity scores per domain and model."""
    from jepa import surprise as surprise_lib
    from jepa.envs import make_env
    models = {"world model": WorldModel.load(workdir)}
    log.info("world model %s: step %d, %s", workdir, models["world model"].step,
             describe_encoder(models["world model"].config))
    if baseline_workdir:
        baseline = WorldModel.load(baseline_workdir)
        name = "random-encoder world model"
        if baseline.config.encoder_weights != "random" or baseline.config.world_model.train_encoder:
            name = "baseline world model"
            log.warning("--baseline_workdir=%s: its encoder is not random (%s); reported as '%s'", baseline_workdir,
                        describe_encoder(baseline.config), name)
        models[name] = baseline
        log.info("%s %s: step %d, %s", name, baseline_workdir, baseline.step, describe_encoder(baseline.config))
    config = config if config is not None else models["world model"].config
    p = config.plan
    settings = settings_of(config)
    res = int(config.data.resolution)
    monitors = {name: Monitor(surprise_lib.calibrate_threshold(m, float(p.surprise_quantile), config=config),
                              replan=True, model=name) for name, m in models.items()}
    results: dict = {"settings": {**dict(p), "horizon_blocks": settings.horizon,
                                  "action_block": models["world model"].action_block},
                     "episodes": episodes, "first_seed": first_seed, "domains": {}}
    landscapes: dict = {}
    wm = models["world model"]
    for domain in domains:
        seeds = episode_seeds(domain, episodes, int(p.goal_steps), res, first=first_seed)
        per = {}
        methods = [(f"CEM, {name}", model, "cem", monitors[name]) for name, model in models.items()]
        methods.append(("random actions", wm, "random", None))
        if oracle:
            methods.append(("oracle (CEM, true simulator)", wm, "oracle", None))
        for method, model, policy, monitor in methods:
            per[method] = m = evaluate(model, domain, seeds, policy, config, monitor, name=method, progress=progress)
            log.info("%s, %s: reached %.2f, final %.2f, final distance %.3f m from %.3f m over %d episodes", domain,
                     method, m["reached_rate"], m["success_rate"], m["final_distance"], m["initial_distance"],
                     len(seeds))
        results["domains"][domain] = {"seeds": seeds, "success_radius": SUCCESS_RADIUS[domain], "methods": per}
        env = make_env(domain, seeds[0], res)
        (log.info if progress else log.debug)("%s: energy landscapes of %d episodes", domain, len(seeds))
        try:
            lands = {name: [energy_landscape(m, env, s, settings=settings) for s in seeds]
                     for name, m in models.items()}
            fidelity = {name: energy_fidelity(m, env, seeds[:fidelity_episodes], int(p.goal_steps),
                                              settings=settings) for name, m in models.items()}
        finally:
            env.close()
        for name, per_seed in lands.items():  # how far the energy minimum lies from the true action, on average
            per[f"CEM, {name}"]["landscape_error"] = float(np.mean([
                np.abs(np.asarray(land["offsets"])[d, np.argmin(np.asarray(land["energy"])[d])])
                for land in per_seed for d in range(len(land["energy"]))]))
            per[f"CEM, {name}"]["energy_fidelity"] = fidelity[name]
        landscapes[domain] = {name: per_seed[0] for name, per_seed in lands.items()}
    results["energy_landscape"] = landscapes
    if output:
        out = workdir_lib.path(output)
        workdir_lib.write_json(out / "planning_benchmark.json", results)
        out.mkdir(parents=True, exist_ok=True)
        (out / "planning_benchmark.md").write_text(format_markdown(results))
        plot_landscapes(landscapes, out / "energy_landscape.png")
    return results


def _table_rows(results: dict) -> list[tuple[str, ...]]:
    rows = [("domain", "method", "reached [95% CI]", "final [95% CI]", "final dist (m)", "closest (m)",
             "initial dist (m)", "plan s/action", "flagged / re-plans", "landscape err",
             "energy-distance corr: predicted / true frames / pixels")]
    rate = lambda m, k: f"{m[k]:.2f} [{m[k + '_ci95'][0]:.2f}, {m[k + '_ci95'][1]:.2f}]"
    for domain, r in results["domains"].items():
        for method, m in r["methods"].items():
            rows.append((domain, method, rate(m, "reached_rate"), rate(m, "success_rate"),
                         f"{m['final_distance']:.3f}", f"{m['min_distance']:.3f}", f"{m['initial_distance']:.3f}",
                         _seconds(m["plan_seconds_per_action"]), f"{m['flagged_steps']} / {m['replans']}",
                         f"{m['landscape_error']:.3f}" if "landscape_error" in m else "-",
                         " / ".join(f"{m['energy_fidelity'][k]:.2f}" for k in ("predicted", "true_frames", "pixels"))
                         if "energy_fidelity" in m else "-"))
    return rows


def format_table(results: dict) -> str:
    """The benchmark as an aligned text table."""
    rows = _table_rows(results)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths))
    return "\n".join([line(rows[0]), "-+-".join("-" * w for w in widths), *map(line, rows[1:])])


def format_markdown(results: dict) -> str:
    """The benchmark as a Markdown table, with the episode set and the planner settings."""
    rows = _table_rows(results)
    s = results["settings"]
    head = (f"Episodes per domain: {results['episodes']} (seeds from {results['first_seed']}); CEM "
            f"{s['samples']} samples x {s['iterations']} iterations, {s['elites']} elites, momentum {s['momentum']}, "
            f"horizon {s['horizon_blocks']} blocks of {s['action_block']} steps, energy {s['energy_steps']} "
            f"{s['energy_norm']}; goal {s['goal_steps']} steps away, episodes of {s['episode_steps']} steps.\n\n")
    md = lambda r: "| " + " | ".join(r) + " |"
    return head + "\n".join([md(rows[0]), md(tuple("---" for _ in rows[0])), *map(md, rows[1:])]) + "\n"


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m jepa.plan [benchmark] --workdir=RUN [--flags] [--config.FIELD=VALUE ...]` (argv: the arguments
    after the program name); returns the result."""
    from absl import flags

    from jepa import cli
    from jepa import config as config_lib
    with cli.flag_scope():
        workdir, config_flag = cli.define_run_config(argv, "a world-model run (configs/world_model.py)")
        baseline = flags.DEFINE_string("baseline_workdir", "", "benchmark: the random-encoder world model run")
        domain = flags.DEFINE_string("domain", "reacher", "the planning task: one of " + ", ".join(PLAN_DOMAINS))
        domains = flags.DEFINE_list("domains", list(PLAN_DOMAINS), "benchmark: a comma list of domains")
        episodes = flags.DEFINE_integer("episodes", 50, "episodes (benchmark: per domain)", lower_bound=1)
        first_seed = flags.DEFINE_integer("first_seed", 1000, "the episode set: the first --episodes seeds from "
                                          "this one whose goal is far enough (another value, another fixed set)")
        oracle_flag = flags.DEFINE_boolean("oracle", True, "benchmark: include the oracle (CEM on the true "
                                           "simulator, same budget)")
        policy = flags.DEFINE_enum("policy", "cem", POLICIES, "plan with the world model, act at random, or plan "
                                   "with the true simulator (oracle)")
        monitor_flag = flags.DEFINE_boolean("monitor", False, "calibrate and apply the surprise monitor (the "
                                            "benchmark always does)")
        guard_flag = flags.DEFINE_boolean("guard", False, "calibrate and apply the gate and consequence checks "
                                          "(jepa/guard.py); decisions go to guard_DOMAIN_POLICY.jsonl in --output")
        ensemble = flags.DEFINE_list("ensemble", [], "--guard: more world-model runs on the same frozen encoder "
                                     "(other seeds) for the disagreement signal")
        output = flags.DEFINE_string("output", "", "write results (and the benchmark's plot) here")
        bench = cli.parse(argv, commands=("benchmark",), required=("workdir",)) == "benchmark"
        for d in [*domains.value, domain.value]:
            if d not in SUCCESS_RADIUS:
                raise cli.UsageError(f"domain {d!r}: planning tasks are defined for {', '.join(PLAN_DOMAINS)}")
        config = config_flag.value
        config_lib.validate(config)
        if bench:
            result = benchmark(workdir.value, baseline.value or None, domains=domains.value, episodes=episodes.value,
                               first_seed=first_seed.value, output=output.value, config=config,
                               oracle=oracle_flag.value)
            print(format_table(result))
            return result
        model = WorldModel.load(workdir.value)
        log.info("world model %s: step %d, %s", workdir.value, model.step, describe_encoder(model.config))
        monitor = None
        if monitor_flag.value:
            from jepa import surprise as surprise_lib
            monitor = Monitor(surprise_lib.calibrate_threshold(model, float(config.plan.surprise_quantile),
                                                               config=config))
        seeds = episode_seeds(domain.value, episodes.value, int(config.plan.goal_steps), int(config.data.resolution),
                              first=first_seed.value)
        names = {"cem": "CEM, world model", "random": "random actions", "oracle": "oracle (CEM, true simulator)"}
        from jepa import constraints as constraints_lib  # plan.constraints: checked by the run's saved readout
        rules = constraints_lib.from_config(workdir.value, model, config, domain.value, policy.value)
        gate = None
        if guard_flag.value:
            from jepa import guard as guard_lib
            gate = guard_lib.build(model, workdir.value, ensemble.value, domain.value, config,
                                   first_seed=first_seed.value, progress=True)
        result = evaluate(model, domain.value, seeds, policy.value, config, monitor, name=names[policy.value],
                          progress=True, constraints=rules, guard=gate)
        decisions = result.pop("decisions", None)
        if decisions is not None:
            for r in decisions:
                if r["decision"] != "act":
                    print(f"  seed {r['seed']}, block {r['block']}: {r['decision']} ({r['reason']})")
        if monitor is not None:  # the episodes' outcomes and flags, then the averages as before
            print(f"{domain.value}, {policy.value} with the surprise monitor (threshold {monitor.threshold:.4f}):")
            for e in result["episodes"]:
                print(f"  seed {e['seed']}: {episode_line(e)}")
        print(json.dumps({k: v for k, v in result.items() if k != "episodes"}))
        if output.value:
            workdir_lib.write_json(workdir_lib.path(output.value) / f"plan_{domain.value}_{policy.value}.json", result)
            if decisions is not None:
                workdir_lib.write_jsonl(workdir_lib.path(output.value) / f"guard_{domain.value}_{policy.value}.jsonl",
                                        decisions)
    return result


def run() -> None:
    """Entry of `python -m jepa.plan` and the `jepa-plan` console script."""
    from jepa import cli
    cli.run(main, __doc__)


if __name__ == "__main__":
    run()
