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
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

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
    from jepa.data.world import make_env
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
    """Flags executed steps whose surprise (mean |predicted - observed| next representation) exceeds threshold."""
    threshold: float
    replan: bool = True


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
            log.warning("step %d: surprise %.4f above the calibrated threshold %.4f", t, surprise, monitor.threshold)
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
             monitor: Monitor | None = None) -> dict:
    """Episodes over `seeds`: success rate, final distances, planning time per action."""
    from jepa.data.world import make_env
    p = config.plan
    settings = CEMSettings.from_config(p)
    env = make_env(domain, seeds[0], int(config.data.resolution))
    try:
        episodes = [run_episode(model, env, s, policy=policy, settings=settings,
                                episode_steps=int(p.episode_steps), goal_steps=int(p.goal_steps),
                                execute_steps=int(p.execute_steps), context_frames=int(p.get("context_frames", 1)),
                                monitor=monitor) for s in seeds]
    finally:
        env.close()
    times = [t for e in episodes for t in e["plan_time"][1:]]  # the first plan of a run includes compilation
    return {"success_rate": float(np.mean([e["success"] for e in episodes])),
            "final_distance": float(np.mean([e["final_distance"] for e in episodes])),
            "initial_distance": float(np.mean([e["initial_distance"] for e in episodes])),
            "plan_seconds_per_action": float(np.mean(times)) if times else float("nan"),
            "flagged_steps": int(sum(len(e["flagged"]) for e in episodes)),
            "episodes": [{k: e[k] for k in ("seed", "success", "initial_distance", "final_distance", "flagged")}
                         for e in episodes]}


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


def plot_landscapes(landscapes: dict, path: str) -> None:
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- benchmark


def benchmark(workdir: str, baseline_workdir: str | None, *, domains: Sequence[str] = PLAN_DOMAINS,
              episodes: int = 10, output: str = "", config_overrides: Sequence[str] = ()) -> dict:
    from jepa import export as export_lib
    from jepa import surprise as surprise_lib
    from jepa.data.world import make_env
    models = {"world model": WorldModel.load(workdir)}
    if baseline_workdir:
        models["random-encoder world model"] = WorldModel.load(baseline_workdir)
    config = export_lib.apply_overrides(models["world model"].config, config_overrides)
    p = config.plan
    res = int(config.data.resolution)
    monitors = {name: Monitor(surprise_lib.calibrate_threshold(m, float(p.surprise_quantile)), replan=True)
                for name, m in models.items()}
    results: dict = {"settings": dict(p), "domains": {}}
    landscapes: dict = {}
    for domain in domains:
        seeds = episode_seeds(domain, episodes, int(p.goal_steps), res)
        per = {}
        for name, model in models.items():
            per[f"CEM, {name}"] = evaluate(model, domain, seeds, "cem", config, monitors[name])
            log.info("%s / CEM, %s: %s", domain, name, per[f"CEM, {name}"]["success_rate"])
        per["random actions"] = evaluate(models["world model"], domain, seeds, "random", config)
        results["domains"][domain] = {"seeds": seeds, "success_radius": SUCCESS_RADIUS[domain], "methods": per}
        env = make_env(domain, seeds[0], res)
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
        os.makedirs(output, exist_ok=True)
        plot_landscapes(landscapes, os.path.join(output, "energy_landscape.png"))
        with open(os.path.join(output, "planning_benchmark.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return results


def format_table(results: dict) -> str:
    rows = [("domain", "method", "success", "final dist (m)", "initial dist (m)", "plan s/action", "flagged",
             "landscape err")]
    for domain, r in results["domains"].items():
        for method, m in r["methods"].items():
            rows.append((domain, method, f"{m['success_rate']:.2f}", f"{m['final_distance']:.3f}",
                         f"{m['initial_distance']:.3f}", f"{m['plan_seconds_per_action']:.3f}",
                         str(m["flagged_steps"]), f"{m['landscape_error']:.3f}" if "landscape_error" in m else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths))
    return "\n".join([line(rows[0]), "-+-".join("-" * w for w in widths), *map(line, rows[1:])])


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> dict:
    import argparse

    from jepa.export import split_command
    bench, overrides, rest = split_command(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m jepa.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a world-model run (configs/world_model.py)")
    p.add_argument("--baseline_workdir", default="", help="benchmark: the random-encoder world model run")
    p.add_argument("--domain", default="reacher", help="run: one of " + ", ".join(PLAN_DOMAINS))
    p.add_argument("--domains", default=",".join(PLAN_DOMAINS), help="benchmark: comma list")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--policy", default="cem", choices=("cem", "random"))
    p.add_argument("--monitor", action="store_true", help="run: calibrate and apply the surprise monitor")
    p.add_argument("--output", default="", help="write results (and the benchmark's plot) here")
    args = p.parse_args(rest)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for d in args.domains.split(",") + [args.domain]:
        if d not in SUCCESS_RADIUS:
            p.error(f"domain {d!r}: planning tasks are defined for {', '.join(PLAN_DOMAINS)}")
    if args.episodes < 1:
        p.error("--episodes must be >= 1")
    if bench:
        result = benchmark(args.workdir, args.baseline_workdir or None, domains=args.domains.split(","),
                           episodes=args.episodes, output=args.output, config_overrides=overrides)
        print(format_table(result))
        return result
    from jepa import export as export_lib
    model = WorldModel.load(args.workdir)
    config = export_lib.apply_overrides(model.config, overrides)
    monitor = None
    if args.monitor:
        from jepa import surprise as surprise_lib
        monitor = Monitor(surprise_lib.calibrate_threshold(model, float(config.plan.surprise_quantile)))
    seeds = episode_seeds(args.domain, args.episodes, int(config.plan.goal_steps), int(config.data.resolution))
    result = evaluate(model, args.domain, seeds, args.policy, config, monitor)
    print(json.dumps({k: v for k, v in result.items() if k != "episodes"}))
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, f"plan_{args.domain}_{args.policy}.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
