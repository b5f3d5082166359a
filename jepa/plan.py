"""Model-predictive control in the real MuJoCo environment with a trained world model, and its benchmark.

    python -m jepa.plan --workdir=runs/wm --domain=reacher --episodes=5 [--config.plan.samples=256 ...]
    python -m jepa.plan benchmark --workdir=runs/wm --baseline_workdir=runs/wm_random --output=runs/plan_bench

An episode: the environment starts from the seed's initial state; the goal is where `plan.goal_steps` steps of
one random constant action take it (so it is reachable), shown to the planner only as a rendered image. Each
step the planner encodes the current frame, runs CEM on the latent energy (jepa/planning.py), executes the first
`plan.execute_steps` actions of the plan and observes. Success: the effector (reacher's finger tip, point_mass's
point) ends within `SUCCESS_RADIUS` of its goal position.

A surprise monitor compares every executed step's predicted next representation with the observed one and
flags steps above a threshold calibrated on unaltered validation clips (jepa/surprise.py); a flagged step drops
the rest of the current plan, so the next step re-plans.

The benchmark runs a fixed set of seeded episodes per domain with: CEM on the world model, CEM on the baseline
world model (same architecture and training, randomly initialised frozen encoder), and uniformly random
actions; it reports success rates, final distances and planning time per action, and saves an energy-landscape
plot (energy vs. offset of one action dimension around the true action of a one-step goal) with the landscape
error: the mean |offset| of the energy minimum over the episode seeds and action dimensions (0 = the energy is
lowest at the true action).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jepa import workdir as workdir_lib
from jepa.planning import CEMSettings, WorldModel

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
    try:
        while len(seeds) < count:
            goal = make_goal(env, seed, goal_steps)
            if np.linalg.norm(env.effector_position() - goal.position) >= 2 * SUCCESS_RADIUS[env.domain]:
                seeds.append(seed)
            seed += 1
    finally:
        env.close()
    return seeds


@dataclasses.dataclass
class Monitor:
    """Flags executed steps whose surprise (mean |predicted - observed| next representation) exceeds threshold.
    `model` names the world model in the messages."""
    threshold: float
    replan: bool = True
    model: str = "world model"


def run_episode(model: WorldModel, env, seed: int, *, policy: str = "cem", settings: CEMSettings | None = None,
                episode_steps: int = 25, goal_steps: int = 10, execute_steps: int = 1, context_frames: int = 1,
                monitor: Monitor | None = None, record: bool = False) -> dict:
    """One MPC episode toward the seed's goal. policy: "cem" (plan with the world model) or "random".
    The planner and the monitor condition on the latest `context_frames` frames and the actions between them."""
    if policy not in ("cem", "random"):
        raise ValueError(f"policy: {policy!r} is not one of cem, random")
    settings = settings or CEMSettings()
    goal = make_goal(env, seed, goal_steps)
    obs = env.reset(seed)
    z_goal = model.encode(goal.frame[None])[0]
    low, high = env.action_low, env.action_high
    rng = np.random.default_rng([int(seed), 0xAC7])
    key = jax.random.PRNGKey(seed)
    if context_frames < 1:
        raise ValueError(f"plan.context_frames must be >= 1, got {context_frames}")
    seen = [model.encode(obs["frame"][None])[0]]   # representations of the observed frames
    done: list[np.ndarray] = []                    # the actions executed between them
    dist = lambda: float(np.linalg.norm(env.effector_position() - goal.position))
    out = {"seed": int(seed), "distance": [dist()], "energy": [], "surprise": [], "flagged": [], "plan_time": [],
           "actions": []}
    frames = [obs["frame"]] if record else None
    queue: list[np.ndarray] = []
    previous = None
    for t in range(episode_steps):
        k = min(context_frames, len(seen))
        z, past = jnp.stack(seen[-k:]), (np.stack(done[-(k - 1):]) if k > 1 else None)
        if policy == "random":
            action = rng.uniform(low, high)
        else:
            if not queue:
                warm = None if previous is None else np.concatenate([previous[1:], previous[-1:]], axis=0)
                key, sub = jax.random.split(key)
                start = time.perf_counter()
                plan, info = model.plan(z, None, z_goal, low, high, settings, sub, init_mean=warm,
                                        past_actions=past)
                out["plan_time"].append(time.perf_counter() - start)
                out["energy"].append(float(info["best_energy"][-1]))
                queue, previous = list(plan[:execute_steps]), plan
            action = queue.pop(0)
        action = np.asarray(action, np.float32)
        context_actions = np.concatenate([past, action[None]]) if past is not None else action[None]
        predicted = model.predict_next(z, context_actions)[-1]
        obs = env.step(action)
        seen.append(model.encode(obs["frame"][None])[0])
        done.append(action)
        seen, done = seen[-context_frames:], done[-context_frames:]
        surprise = float(np.mean(np.abs(np.asarray(predicted) - np.asarray(seen[-1]))))
        out["surprise"].append(surprise)
        if monitor is not None and surprise > monitor.threshold:
            out["flagged"].append(t)
            log.info("%s, %s episode seed %d, step %d: surprise %.4f above the calibrated threshold %.4f%s",
                     monitor.model, env.domain, seed, t, surprise, monitor.threshold,
                     "; re-planning" if monitor.replan and policy == "cem" else "")
            if monitor.replan:
                queue = []
        out["actions"].append(np.asarray(action, np.float64).tolist())
        out["distance"].append(dist())
        if record:
            frames.append(obs["frame"])
    radius = SUCCESS_RADIUS[env.domain]
    out.update(domain=env.domain, policy=policy, initial_distance=out["distance"][0],
               final_distance=out["distance"][-1], success=out["distance"][-1] < radius)
    if record:
        out["frames"], out["goal_frame"] = np.stack(frames), goal.frame
    return out


def evaluate(model: WorldModel, domain: str, seeds: Sequence[int], policy: str, config,
             monitor: Monitor | None = None, *, name: str = "", progress: bool = False) -> dict:
    """Episodes over `seeds`: success rate, final distances, planning time per action (None without planning).
    `progress`: a bar over the episodes and a line per episode, labelled with the domain and `name` (the
    method)."""
    from tqdm.auto import tqdm

    from jepa.envs import make_env
    p = config.plan
    settings = CEMSettings.from_config(p)
    label = f"{domain}, {name or policy}"
    env = make_env(domain, seeds[0], int(config.data.resolution))
    episodes = []
    try:
        bar = tqdm(seeds, desc=label, unit="episode", file=sys.stderr, disable=not progress)
        for i, s in enumerate(bar):
            e = run_episode(model, env, s, policy=policy, settings=settings, episode_steps=int(p.episode_steps),
                            goal_steps=int(p.goal_steps), execute_steps=int(p.execute_steps),
                            context_frames=int(p.context_frames), monitor=monitor)
            episodes.append(e)
            if progress:
                bar.write(f"{label}, episode {i + 1}/{len(seeds)} (seed {s}): {episode_line(e)}", file=sys.stderr)
    finally:
        env.close()
    times = [t for e in episodes for t in e["plan_time"][1:]]  # the first plan of a run includes compilation
    return {"success_rate": float(np.mean([e["success"] for e in episodes])),
            "final_distance": float(np.mean([e["final_distance"] for e in episodes])),
            "initial_distance": float(np.mean([e["initial_distance"] for e in episodes])),
            "plan_seconds_per_action": float(np.mean(times)) if times else None,
            "flagged_steps": int(sum(len(e["flagged"]) for e in episodes)),
            "episodes": [{k: e[k] for k in ("seed", "success", "initial_distance", "final_distance", "flagged")}
                         for e in episodes]}


def episode_line(e: dict) -> str:
    """One episode's outcome in words: success, distances and the steps the surprise monitor flagged."""
    flagged = f"surprise flagged steps {e['flagged']}" if e["flagged"] else "no step flagged"
    return (f"{'success' if e['success'] else 'missed'}, final distance {e['final_distance']:.3f} m from "
            f"{e['initial_distance']:.3f} m, {flagged}")


# ---------------------------------------------------------------- energy landscape


def energy_landscape(model: WorldModel, env, seed: int, points: int = 41) -> dict:
    """Energy of the true action of the seed's one-step goal with one action dimension swept across its bounds:
    {"offsets": [action_dim, points] (swept value - true value), "energy": [action_dim, points], "true_action"}.
    A good model has its minimum near offset 0."""
    goal = make_goal(env, seed, 1)
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
        energies.append(np.asarray(model.energy(z, None, z_goal, actions[:, None])))
    return {"offsets": np.stack(offsets).tolist(), "energy": np.stack(energies).tolist(),
            "true_action": true.tolist()}


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
    fig.tight_layout()
    with path.open("wb") as f:  # an epath: local or object store
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- benchmark


def describe_encoder(config) -> str:
    """Where a world model's frozen encoder comes from, in words."""
    if config.encoder_weights == "random":
        return "random-init encoder (untrained)"
    return f"EMA encoder of {config.encoder_from or 'its own run'}"


def benchmark(workdir: str, baseline_workdir: str | None, *, domains: Sequence[str] = PLAN_DOMAINS,
              episodes: int = 10, output: str = "", config=None, progress: bool = True) -> dict:
    """CEM with the world model (and the baseline world model), and random actions, on the same seeded episodes
    of each domain; energy landscapes. config: the world model run's config with changes (plan settings, data;
    default: the run's own), used for every method. `progress`: bars and a line per episode."""
    from jepa import surprise as surprise_lib
    from jepa.envs import make_env
    models = {"world model": WorldModel.load(workdir)}
    log.info("world model %s: step %d, %s", workdir, models["world model"].step,
             describe_encoder(models["world model"].config))
    if baseline_workdir:
        baseline = WorldModel.load(baseline_workdir)
        name = "random-encoder world model"
        if baseline.config.encoder_weights != "random":
            name = "baseline world model"
            log.warning("--baseline_workdir=%s: its encoder is not random (config.encoder_weights=%r); reported "
                        "as '%s'", baseline_workdir, baseline.config.encoder_weights, name)
        models[name] = baseline
        log.info("%s %s: step %d, %s", name, baseline_workdir, baseline.step, describe_encoder(baseline.config))
    config = config if config is not None else models["world model"].config
    p = config.plan
    res = int(config.data.resolution)
    monitors = {name: Monitor(surprise_lib.calibrate_threshold(m, float(p.surprise_quantile), config=config),
                              replan=True, model=name) for name, m in models.items()}
    results: dict = {"settings": dict(p), "domains": {}}
    landscapes: dict = {}
    for domain in domains:
        seeds = episode_seeds(domain, episodes, int(p.goal_steps), res)
        per = {}
        methods = [(f"CEM, {name}", model, "cem", monitors[name]) for name, model in models.items()]
        for method, model, policy, monitor in [*methods, ("random actions", models["world model"], "random", None)]:
            per[method] = m = evaluate(model, domain, seeds, policy, config, monitor, name=method, progress=progress)
            log.info("%s, %s: success %.2f, final distance %.3f m from %.3f m over %d episodes", domain, method,
                     m["success_rate"], m["final_distance"], m["initial_distance"], len(seeds))
        results["domains"][domain] = {"seeds": seeds, "success_radius": SUCCESS_RADIUS[domain], "methods": per}
        env = make_env(domain, seeds[0], res)
        (log.info if progress else log.debug)("%s: energy landscapes of %d episodes", domain, len(seeds))
        try:
            lands = {name: [energy_landscape(m, env, s) for s in seeds] for name, m in models.items()}
        finally:
            env.close()
        for name, per_seed in lands.items():  # how far the energy minimum lies from the true action, on average
            per[f"CEM, {name}"]["landscape_error"] = float(np.mean([
                np.abs(np.asarray(land["offsets"])[d, np.argmin(np.asarray(land["energy"])[d])])
                for land in per_seed for d in range(len(land["energy"]))]))
        landscapes[domain] = {name: per_seed[0] for name, per_seed in lands.items()}
    results["energy_landscape"] = landscapes
    if output:
        workdir_lib.write_json(workdir_lib.path(output) / "planning_benchmark.json", results)
        plot_landscapes(landscapes, workdir_lib.path(output) / "energy_landscape.png")
    return results


def format_table(results: dict) -> str:
    rows = [("domain", "method", "success", "final dist (m)", "initial dist (m)", "plan s/action", "flagged",
             "landscape err")]
    for domain, r in results["domains"].items():
        for method, m in r["methods"].items():
            rows.append((domain, method, f"{m['success_rate']:.2f}", f"{m['final_distance']:.3f}",
                         f"{m['initial_distance']:.3f}", _seconds(m["plan_seconds_per_action"]),
                         str(m["flagged_steps"]), f"{m['landscape_error']:.3f}" if "landscape_error" in m else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths))
    return "\n".join([line(rows[0]), "-+-".join("-" * w for w in widths), *map(line, rows[1:])])


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
        episodes = flags.DEFINE_integer("episodes", 10, "episodes (benchmark: per domain)", lower_bound=1)
        policy = flags.DEFINE_enum("policy", "cem", ("cem", "random"), "plan with the world model, or act at random")
        monitor_flag = flags.DEFINE_boolean("monitor", False, "calibrate and apply the surprise monitor (the "
                                            "benchmark always does)")
        output = flags.DEFINE_string("output", "", "write results (and the benchmark's plot) here")
        bench = cli.parse(argv, commands=("benchmark",), required=("workdir",)) == "benchmark"
        for d in [*domains.value, domain.value]:
            if d not in SUCCESS_RADIUS:
                raise cli.UsageError(f"domain {d!r}: planning tasks are defined for {', '.join(PLAN_DOMAINS)}")
        config = config_flag.value
        config_lib.validate(config)
        if bench:
            result = benchmark(workdir.value, baseline.value or None, domains=domains.value, episodes=episodes.value,
                               output=output.value, config=config)
            print(format_table(result))
            return result
        model = WorldModel.load(workdir.value)
        log.info("world model %s: step %d, %s", workdir.value, model.step, describe_encoder(model.config))
        monitor = None
        if monitor_flag.value:
            from jepa import surprise as surprise_lib
            monitor = Monitor(surprise_lib.calibrate_threshold(model, float(config.plan.surprise_quantile),
                                                               config=config))
        seeds = episode_seeds(domain.value, episodes.value, int(config.plan.goal_steps), int(config.data.resolution))
        result = evaluate(model, domain.value, seeds, policy.value, config, monitor,
                          name="CEM, world model" if policy.value == "cem" else "random actions", progress=True)
        if monitor is not None:  # the episodes' outcomes and flags, then the averages as before
            print(f"{domain.value}, {policy.value} with the surprise monitor (threshold {monitor.threshold:.4f}):")
            for e in result["episodes"]:
                print(f"  seed {e['seed']}: {episode_line(e)}")
        print(json.dumps({k: v for k, v in result.items() if k != "episodes"}))
        if output.value:
            workdir_lib.write_json(workdir_lib.path(output.value) / f"plan_{domain.value}_{policy.value}.json", result)
    return result


def run() -> None:
    """Entry of `python -m jepa.plan` and the `jepa-plan` console script."""
    from jepa import cli
    cli.run(main, __doc__)


if __name__ == "__main__":
    run()
