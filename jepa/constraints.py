"""Constraints on predicted outcomes: rules a planned trajectory must keep, read from the world model's latents.

    python -m jepa.constraints fit --workdir=runs/wm            # the latent -> physical readout, saved in the run
    python -m jepa.plan --workdir=runs/wm --domain=point_mass --config.plan.constraints="keep_out(x=0,y=0,r=0.05)"
    python -m jepa.constraints benchmark --workdir=runs/wm --output=runs/constraints_bench [--episodes=50]

A constraint is declared in `config.plan.constraints` (";"-separated, validated with the config before any work):
  keep_out(x=, y=, r=)          the effector (x, y) stays outside the disc of radius r (metres) around (x, y)
  joint_band(joint=, lo=, hi=)  qpos[joint] stays outside [lo, hi] (radians for hinges, wrapped to [-pi, pi))
  joint_limit(joint=, lo=, hi=) qpos[joint] stays inside [lo, hi]
  action_rate(max=)             |a_t - a_t-1| <= max in every action dimension (the previous executed action
                                included; zeros before the first)
Each maps a physical path [S, T, 2 + num_qpos] (effector x, y, then qpos, one row per environment step) and the
actions [S, T, A] to a violation amount >= 0 per step (penetration depth, angle inside the band or past the limit,
excess rate), summed per sample; 0 means the rule holds. The planner combines it with the energy as
`plan.constraint_mode` says (jepa.planning.cem: reject, penalty or augmented Lagrangian).

Where the path comes from:
  - learned: a ridge readout from the world model's frame representations to (x, y, qpos) per domain, fitted on
    the frozen latents of the run's training data (`fit`; hinge angles as cos/sin), saved as WORKDIR/readout.npz
    (+ readout.json with the validation R^2 and error), applied to every predicted block and interpolated
    linearly between the current frame and the block ends to one point per environment step;
  - oracle: the true simulator (WorldEnv.simulate from the current physics state) plays the sampled actions.

API for other modules (e.g. a gate deciding whether to act):
    readout = load_readout(workdir)                        # {domain: ReadoutHead}
    rules = parse(config.plan.constraints)
    p = predicted_violation(model, readout[domain], rules, z, states, plan, past_actions)   # in [0, 1]
`predicted_violation` rolls the plan out with the world model and returns the probability that some step breaks
some rule, with the readout's validation error as a Gaussian around each read value (the maximum over steps and
rules: a lower bound on the union).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import re
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jepa import workdir as workdir_lib

log = logging.getLogger(__name__)

# kind -> its parameters, in order. "joint" is an index into qpos; the rest are floats.
KINDS: dict[str, tuple[str, ...]] = {
    "keep_out": ("x", "y", "r"),
    "joint_band": ("joint", "lo", "hi"),
    "joint_limit": ("joint", "lo", "hi"),
    "action_rate": ("max",),
}
READOUT_FILE = "readout.npz"
REPORT_FILE = "readout.json"
FEATURES = ("patches", "mean")       # the readout's input: every patch token, or their mean
RIDGE_ALPHAS = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)  # x the mean eigenvalue of the training Gram matrix
_HINGE = 3                           # mujoco.mjtJoint.mjJNT_HINGE


# ---------------------------------------------------------------- declaring constraints


@dataclasses.dataclass(frozen=True)
class Constraint:
    kind: str
    values: tuple[float, ...]   # the kind's parameters in KINDS order ("joint" as a float)

    @property
    def joint(self) -> int:
        return int(self.values[0]) if self.kind in ("joint_band", "joint_limit") else -1

    def __str__(self) -> str:
        args = ",".join(f"{n}={int(v) if n == 'joint' else v:g}" for n, v in zip(KINDS[self.kind], self.values))
        return f"{self.kind}({args})"


_ITEM = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.S)


def parse(text: str) -> tuple[Constraint, ...]:
    """`config.plan.constraints` -> the constraints ("" -> none). ValueError naming the item and what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"must be a string of ';'-separated constraints, got {type(text).__name__}")
    out = []
    for item in (i for i in text.split(";") if i.strip()):
        m = _ITEM.match(item)
        if not m:
            raise ValueError(f"{item.strip()!r} is not KIND(NAME=VALUE, ...); kinds: {', '.join(KINDS)}")
        kind, body = m.group(1), m.group(2)
        if kind not in KINDS:
            raise ValueError(f"{item.strip()!r}: unknown kind {kind!r} (one of {', '.join(KINDS)})")
        given: dict[str, float] = {}
        for arg in (a for a in body.split(",") if a.strip()):
            name, eq, value = (s.strip() for s in arg.partition("="))
            if not eq or name not in KINDS[kind]:
                raise ValueError(f"{item.strip()!r}: {arg.strip()!r} is not one of {kind}'s parameters "
                                 f"{', '.join(n + '=' for n in KINDS[kind])}")
            if name in given:
                raise ValueError(f"{item.strip()!r}: {name} given twice")
            try:
                v = float(value)
            except ValueError:
                raise ValueError(f"{item.strip()!r}: {name}={value!r} is not a number") from None
            if not math.isfinite(v):
                raise ValueError(f"{item.strip()!r}: {name}={value} is not finite")
            given[name] = v
        missing = [n for n in KINDS[kind] if n not in given]
        if missing:
            raise ValueError(f"{item.strip()!r}: missing {', '.join(missing)}")
        c = Constraint(kind, tuple(given[n] for n in KINDS[kind]))
        why = _invalid(c)
        if why:
            raise ValueError(f"{item.strip()!r}: {why}")
        out.append(c)
    return tuple(out)


def _invalid(c: Constraint) -> str:
    v = dict(zip(KINDS[c.kind], c.values))
    if c.kind == "keep_out" and not v["r"] > 0:
        return f"r must be > 0, got {v['r']:g}"
    if c.kind in ("joint_band", "joint_limit"):
        if v["joint"] < 0 or v["joint"] != int(v["joint"]):
            return f"joint must be a qpos index (an integer >= 0), got {v['joint']:g}"
        if not v["lo"] < v["hi"]:
            return f"lo must be below hi, got lo={v['lo']:g} hi={v['hi']:g}"
    if c.kind == "action_rate" and not v["max"] > 0:
        return f"max must be > 0, got {v['max']:g}"
    return ""


def check_domain(constraints: Sequence[Constraint], domain: str, num_qpos: int) -> None:
    """ValueError naming plan.constraints when a constraint refers to a joint `domain` does not have."""
    for c in constraints:
        if c.joint >= num_qpos:
            raise ValueError(f"plan.constraints: {c}: {domain} has qpos indices 0..{num_qpos - 1}")


def structure(constraints: Sequence[Constraint]) -> tuple[tuple[str, int], ...]:
    """What a compiled check depends on statically: the kinds and joint indices."""
    return tuple((c.kind, c.joint) for c in constraints)


def values(constraints: Sequence[Constraint]) -> tuple[np.ndarray, ...]:
    """What a compiled check takes as arguments: each constraint's parameters (change them without recompiling)."""
    return tuple(np.asarray(c.values, np.float32) for c in constraints)


# ---------------------------------------------------------------- violation amounts


def wrap(angle, xp=jnp):
    """Angles to [-pi, pi)."""
    return (angle + xp.pi) % (2 * xp.pi) - xp.pi


def step_amounts(struct, vals, path, actions, last_action, hinge, xp=jnp):
    """Violation amount per step [S, T] (0: every rule holds) of physical paths [S, T, 2 + num_qpos] (hinge
    angles wrapped) and actions [S, T, A] after `last_action` [A]; hinge: bool [num_qpos]. xp: numpy or
    jax.numpy (the oracle scores inside a host callback)."""
    total = xp.zeros(path.shape[:2], path.dtype)
    for (kind, joint), v in zip(struct, vals):
        if kind == "keep_out":
            d = xp.sqrt(xp.square(path[..., 0] - v[0]) + xp.square(path[..., 1] - v[1]))
            total = total + xp.maximum(v[2] - d, 0.0)
        elif kind in ("joint_band", "joint_limit"):
            q = path[..., 2 + joint]
            centre, half = (v[1] + v[2]) / 2, (v[2] - v[1]) / 2
            off = xp.abs(wrap(q - centre, xp) if hinge[joint] else q - centre)   # distance from the centre
            total = total + xp.maximum(half - off if kind == "joint_band" else off - half, 0.0)
        else:  # action_rate
            prev = xp.concatenate([xp.broadcast_to(last_action[None, None], (actions.shape[0], 1,
                                                                              actions.shape[2])),
                                   actions[:, :-1]], axis=1)
            total = total + xp.sum(xp.maximum(xp.abs(actions - prev) - v[0], 0.0), axis=-1)
    return total


def hinge_mask(env) -> np.ndarray:
    """bool [num_qpos]: which qpos entries are hinge angles (wrapped, read as cos/sin)."""
    m = env.physics.model
    out = np.zeros(env.num_qpos, bool)
    for j in range(int(m.njnt)):
        if int(m.jnt_type[j]) == _HINGE:
            out[int(m.jnt_qposadr[j])] = True
    return out


def true_path(env) -> np.ndarray:
    """The environment's current physical state [2 + num_qpos]: effector (x, y), qpos with hinges wrapped."""
    q = np.asarray(env.physics.data.qpos, np.float64).copy()
    h = hinge_mask(env)
    q[h] = wrap(q[h], np)
    return np.concatenate([env.effector_position(), q])


# ---------------------------------------------------------------- the readout: latents -> physical values


@dataclasses.dataclass(frozen=True, eq=False)
class ReadoutHead:
    """A linear map from a frame representation [N, D] to (x, y, qpos) of one domain. Hashable by identity (the
    planner compiles one check per head)."""
    domain: str
    feature: str             # "patches": every token, flattened; "mean": their mean
    weight: np.ndarray       # [F, O] float32
    bias: np.ndarray         # [O]
    hinge: np.ndarray        # bool [num_qpos]: read as (cos, sin)
    sigma: np.ndarray        # [2 + num_qpos] RMS validation error per physical value (metres, radians)

    def physical(self, z, xp=jnp):
        """z [..., N, D] -> [..., 2 + num_qpos] (hinge angles in [-pi, pi))."""
        f = z.reshape(*z.shape[:-2], -1) if self.feature == "patches" else z.mean(-2)
        return from_raw(f @ xp.asarray(self.weight) + xp.asarray(self.bias), self.hinge, xp)


def to_raw(path: np.ndarray, hinge: np.ndarray) -> np.ndarray:
    """Physical [N, 2 + nq] -> regression targets [N, O]: x, y, then each qpos, hinges as (cos, sin)."""
    cols = [path[:, :2]]
    for j, h in enumerate(hinge):
        q = path[:, 2 + j:3 + j]
        cols.append(np.concatenate([np.cos(q), np.sin(q)], 1) if h else q)
    return np.concatenate(cols, 1)


def from_raw(raw, hinge, xp=jnp):
    """Regression outputs [..., O] -> physical [..., 2 + nq]."""
    cols, i = [raw[..., :2]], 2
    for h in hinge:
        if h:
            cols.append(xp.arctan2(raw[..., i + 1], raw[..., i])[..., None])
            i += 2
        else:
            cols.append(raw[..., i:i + 1])
            i += 1
    return xp.concatenate(cols, -1)


def _ridge(x: np.ndarray, y: np.ndarray, alphas: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Centred closed-form ridge from x [N, F] to y [N, O] for every alpha (one eigendecomposition of the N x N
    Gram matrix: F may be a whole patch map) -> [(weight [F, O], bias [O])]."""
    x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xm, ym = x64.mean(0), y64.mean(0)
    xc = x64 - xm
    s, u = np.linalg.eigh(xc @ xc.T)
    s = np.maximum(s, 0.0)
    scale = max(float(s.mean()), 1e-12)
    uy = u.T @ (y64 - ym)
    out = []
    for a in alphas:
        w = xc.T @ (u @ (uy / (s + a * scale)[:, None]))
        out.append((w.astype(np.float32), (ym - xm @ w).astype(np.float32)))
    return out


def _errors(pred: np.ndarray, true: np.ndarray, hinge: np.ndarray) -> np.ndarray:
    d = pred - true
    d[:, 2:][:, hinge] = wrap(d[:, 2:][:, hinge], np)
    return d


def _r2(pred_raw: np.ndarray, true_raw: np.ndarray, hinge: np.ndarray) -> np.ndarray:
    """R^2 per physical value [2 + nq]: x, y, each qpos (a hinge over its cos and sin together)."""
    groups, i = [[0], [1]], 2
    for h in hinge:
        groups.append([i, i + 1] if h else [i])
        i += 2 if h else 1
    out = []
    for g in groups:
        sse = float(np.sum(np.square(pred_raw[:, g] - true_raw[:, g])))
        sst = float(np.sum(np.square(true_raw[:, g] - true_raw[:, g].mean(0))))
        out.append(1.0 - sse / max(sst, 1e-12))
    return np.asarray(out)


def _rows(model, config, split: str, max_rows: int, envs: dict) -> dict:
    """{domain: {"patches", "mean", "path", "episode"}} of frames of `split` of the run's world data, for the
    domains with an effector; up to about max_rows rows per domain, spread evenly over the episodes."""
    from jepa.envs import DOMAINS, make_env
    from jepa.surprise import world_records
    source = world_records(config, split)
    per_episode = max(1, math.ceil(2 * max_rows / max(len(source), 1)))
    out: dict[str, dict[str, list]] = {}
    for e in range(len(source)):
        r = source[e]
        domain = DOMAINS[int(r["domain"])][0]
        if domain not in envs:
            env = make_env(domain, 0, int(config.data.resolution))
            if not env.effector:
                env.close()
                envs[domain] = None
            else:
                envs[domain] = env
        env = envs[domain]
        if env is None or len(out.get(domain, {}).get("path", [])) >= max_rows:
            continue
        frames, states = np.asarray(r["frames"]), np.asarray(r["states"], np.float64)
        idx = np.unique(np.linspace(0, len(frames) - 1, min(per_episode, len(frames))).round().astype(int))
        z = np.asarray(model.encode(frames[idx]))
        d = out.setdefault(domain, {"patches": [], "mean": [], "path": [], "episode": []})
        nq = env.num_qpos
        for i, t in enumerate(idx):
            env.set_state(states[t, :nq], states[t, nq:env.state_dim])
            d["patches"].append(z[i].reshape(-1))
            d["mean"].append(z[i].mean(0))
            d["path"].append(true_path(env))
            d["episode"].append(e)
    return {k: {n: np.stack(v) for n, v in d.items()} for k, d in out.items()}


def fit_readout(model, config=None, *, max_rows: int = 2000) -> tuple[dict[str, ReadoutHead], dict]:
    """Fit a ReadoutHead per planning domain on the frozen latents of the run's world data: rows of the "train"
    split, chosen (feature kind and ridge alpha) and scored on "validation" (for a domain with no validation
    episode, on its last quarter of training episodes, at least one). Returns (heads, report)."""
    config = config if config is not None else model.config
    envs: dict = {}
    try:
        train = _rows(model, config, "train", max_rows, envs)
        val = _rows(model, config, "validation", max_rows, envs)
        hinges = {d: hinge_mask(env) for d, env in envs.items() if env is not None}
    finally:
        for env in envs.values():
            if env is not None:
                env.close()
    if not train:
        raise ValueError("readout: the run's world data has no episode of a domain with an effector (planning "
                         "domains: reacher, point_mass)")
    heads, report = {}, {}
    for domain, tr in train.items():
        va, held_out = val.get(domain), "validation split"
        if va is None:  # hold out whole episodes: frames of one episode are not independent
            episodes = np.unique(tr["episode"])
            if len(episodes) < 2:
                raise ValueError(f"readout: {domain} has one training episode and no validation episode")
            cut = episodes[-max(1, len(episodes) // 4)]
            keep = tr["episode"] < cut
            va = {k: v[~keep] for k, v in tr.items()}
            tr = {k: v[keep] for k, v in tr.items()}
            held_out = f"last {int((~keep).sum())} training rows (no validation episode)"
        hinge = hinges[domain]
        y_tr, y_va = to_raw(tr["path"], hinge), to_raw(va["path"], hinge)
        best = None
        scores = {}
        for feature in FEATURES:
            for alpha, (w, b) in zip(RIDGE_ALPHAS, _ridge(tr[feature], y_tr, RIDGE_ALPHAS)):
                r2 = _r2(va[feature] @ w + b, y_va, hinge)
                scores[f"{feature}, alpha {alpha:g}"] = float(r2.mean())
                if best is None or r2.mean() > best[0].mean():
                    best = (r2, feature, alpha, w, b)
        r2, feature, alpha, w, b = best
        pred = from_raw(va[feature] @ w + b, hinge, np)
        sigma = np.sqrt(np.mean(np.square(_errors(pred, va["path"], hinge)), 0)).astype(np.float32)
        heads[domain] = ReadoutHead(domain, feature, w, b, hinge, sigma)
        names = ["x", "y", *(f"qpos{j}" for j in range(len(hinge)))]
        report[domain] = {"feature": feature, "alpha": alpha, "train_rows": len(y_tr), "validation_rows": len(y_va),
                          "validated_on": held_out, "r2": dict(zip(names, map(float, r2))),
                          "rms_error": dict(zip(names, map(float, sigma))), "mean_r2_per_choice": scores}
        log.info("readout %s: %s features, alpha %g, validation R^2 %s", domain, feature, alpha,
                 ", ".join(f"{n} {v:.3f}" for n, v in zip(names, r2)))
    return heads, report


def save_readout(workdir: str, heads: dict[str, ReadoutHead], report: dict | None = None) -> None:
    """WORKDIR/readout.npz (arrays and strings only: loads without pickle) and readout.json (the report)."""
    arrays = {"domains": np.asarray(sorted(heads))}
    for d, h in heads.items():
        arrays.update({f"{d}.feature": np.asarray(h.feature), f"{d}.weight": h.weight, f"{d}.bias": h.bias,
                       f"{d}.hinge": h.hinge, f"{d}.sigma": h.sigma})
    path = workdir_lib.path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    with (path / READOUT_FILE).open("wb") as f:
        np.savez(f, **arrays)
    if report is not None:
        workdir_lib.write_json(path / REPORT_FILE, report)


def load_readout(workdir: str) -> dict[str, ReadoutHead]:
    """The readout heads saved by `python -m jepa.constraints fit --workdir=WORKDIR`."""
    path = workdir_lib.path(workdir) / READOUT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no constraint readout; fit one with `python -m jepa.constraints fit "
                                f"--workdir={workdir}`")
    with path.open("rb") as f, np.load(f, allow_pickle=False) as data:
        return {str(d): ReadoutHead(str(d), str(data[f"{d}.feature"]), data[f"{d}.weight"], data[f"{d}.bias"],
                                    data[f"{d}.hinge"].astype(bool), data[f"{d}.sigma"])
                for d in data["domains"]}


# ---------------------------------------------------------------- checks for the planner


def _interpolate(start, ends, block: int, hinge):
    """Block-end values ends [S, H, R] after start [R] -> one row per environment step [S, H * block, R], linear
    between consecutive block ends (hinge angles along the shorter arc). Why: the rule must hold between the
    frames the model predicts, not only at them."""
    prev = jnp.concatenate([jnp.broadcast_to(start, (ends.shape[0], 1, ends.shape[2])), ends[:, :-1]], 1)
    delta = ends - prev
    angle = jnp.asarray(np.concatenate([[False, False], hinge]))
    delta = jnp.where(angle, wrap(delta), delta)
    frac = jnp.arange(1, block + 1, dtype=ends.dtype) / block                       # [block]
    path = prev[:, :, None] + frac[None, None, :, None] * delta[:, :, None]          # [S, H, block, R]
    path = jnp.where(angle, wrap(path), path)
    return path.reshape(ends.shape[0], -1, ends.shape[2])


@functools.lru_cache(maxsize=64)
def latent_check(head: ReadoutHead, struct: tuple, block: int) -> Callable:
    """The planner's check (jepa.planning.WorldModel.plan) with the learned readout: the path read from the
    current frame and every predicted block, interpolated to environment steps. One function per (head,
    constraints' structure, action block), so the planner compiles it once."""
    def check(vals, z, predicted, actions, last_action):
        path = _interpolate(head.physical(z[-1]), head.physical(predicted), block, head.hinge)
        return jnp.sum(step_amounts(struct, vals, path, actions, last_action, head.hinge), axis=1)
    return check


def oracle_check(env, struct: tuple) -> Callable:
    """The planner's check with the true simulator: every sampled action sequence played from the environment's
    current physics state (WorldEnv.simulate on a copy), the rules checked at every step. Cached on the env."""
    cache = env.__dict__.setdefault("_constraint_checks", {})
    if struct not in cache:
        hinge = hinge_mask(env)

        def host(vals, actions, last_action):
            a = np.asarray(actions, np.float64)
            path = env.simulate(a, qpos=True)
            path[..., 2:][..., hinge] = wrap(path[..., 2:][..., hinge], np)
            amounts = step_amounts(struct, [np.asarray(v, np.float64) for v in vals], path, a,
                                   np.asarray(last_action, np.float64), hinge, np)
            return amounts.sum(1).astype(np.float32)

        def check(vals, z, predicted, actions, last_action):
            return jax.pure_callback(host, jax.ShapeDtypeStruct(actions.shape[:1], jnp.float32), vals, actions,
                                     last_action)
        cache[struct] = check
    return cache[struct]


class EpisodeConstraints:
    """The rules of one episode: what the planner checks (`check`, None: plan without them) and what happened
    (`observe` after every environment step: the true violation amount of that step)."""

    def __init__(self, constraints: Sequence[Constraint], env, check: Callable | None = None):
        check_domain(constraints, env.domain, env.num_qpos)
        self.constraints = tuple(constraints)
        self.structure, self.values, self.check = structure(constraints), values(constraints), check
        self.hinge = hinge_mask(env)
        self.previous = np.zeros(env.action_dim)

    def reset(self, env) -> None:
        self.previous = np.zeros(env.action_dim)

    def observe(self, env, action) -> float:
        a = np.asarray(action, np.float64).reshape(-1)[:env.action_dim]
        amount = step_amounts(self.structure, [np.asarray(v, np.float64) for v in self.values],
                              true_path(env)[None, None], a[None, None], self.previous, self.hinge, np)
        self.previous = a
        return float(amount[0, 0])


def from_config(workdir: str, model, config, domain: str, policy: str = "cem") -> Callable | None:
    """The episodes' rules of `config.plan.constraints` (None when empty) for jepa.plan.evaluate: (env, seed) ->
    EpisodeConstraints. policy "cem" checks them with the readout saved in `workdir` for `domain`, "oracle" with
    the true simulator; "random" actions are only measured."""
    rules = parse(config.plan.constraints)
    if not rules:
        return None
    if policy == "random":
        return lambda env, seed: EpisodeConstraints(rules, env)
    if policy == "oracle":
        return lambda env, seed: EpisodeConstraints(rules, env, oracle_check(env, structure(rules)))
    heads = load_readout(workdir)
    if domain not in heads:
        raise ValueError(f"plan.constraints: the readout in {workdir} covers {', '.join(heads) or 'no domain'}, "
                         f"not {domain}")
    check = latent_check(heads[domain], structure(rules), model.action_block)
    return lambda env, seed: EpisodeConstraints(rules, env, check)


@functools.lru_cache(maxsize=16)
def _read_rollout(model, head: ReadoutHead) -> Callable:
    """Jitted: the physical path [1, T, R] that `head` reads from the model's rollout of one plan."""
    from jepa.planning import latent_energy

    def read(predictor_params, z, states, tokens, past):
        _, predicted = latent_energy(model.objective, predictor_params, z, states, z[-1], tokens, past,
                                     with_predictions=True)
        return _interpolate(head.physical(z[-1]), head.physical(predicted), model.action_block, head.hinge)
    return jax.jit(read)


def predicted_violation(model, head: ReadoutHead, constraints: Sequence[Constraint], z, states, plan,
                        past_actions=None) -> float:
    """Probability in [0, 1] that executing `plan` [H * action_block, A] from the observed frames z [k, N, D]
    (their states [k, S] or None, past_actions [(k - 1) * action_block, A] between them) breaks a rule: the path
    is read from the world model's rollout (as the planner's learned check reads it) and every read value taken as
    Gaussian with the readout's validation RMS error; the maximum over steps and rules. action_rate is exact."""
    from jax.scipy.stats import norm as normal

    from jepa.planning import pad_states
    if not constraints:
        return 0.0
    z = jnp.asarray(z)
    a = jnp.asarray(plan, jnp.float32)[None]
    past = model._past(past_actions, z.shape[0])
    path = np.asarray(_read_rollout(model, head)(model.predictor_params, z, pad_states(states, z.shape[0]),
                                                 model.blocks(a), past))[0]          # [T, R]
    block = model.action_block
    last = (np.asarray(past[-1]).reshape(block, -1)[-1, :a.shape[-1]] if past.shape[0] else np.zeros(a.shape[-1]))
    sig = np.maximum(np.asarray(head.sigma, np.float64), 1e-6)
    p = 0.0
    for c in constraints:
        v = c.values
        if c.kind == "keep_out":
            d = np.hypot(path[:, 0] - v[0], path[:, 1] - v[1])
            prob = normal.cdf((v[2] - d) / float(np.sqrt((sig[0] ** 2 + sig[1] ** 2) / 2)))
        elif c.kind in ("joint_band", "joint_limit"):
            j = c.joint
            q = path[:, 2 + j]
            centre, half = (v[1] + v[2]) / 2, (v[2] - v[1]) / 2
            off = np.abs(wrap(q - centre, np) if head.hinge[j] else q - centre)
            inside = normal.cdf((half - off) / sig[2 + j]) - normal.cdf((-half - off) / sig[2 + j])
            prob = inside if c.kind == "joint_band" else 1.0 - inside
        else:
            amounts = step_amounts(structure([c]), values([c]), path[None], np.asarray(a)[0][None], last,
                                   head.hinge, np)
            prob = (amounts[0] > 0).astype(np.float64)
        p = max(p, float(np.max(prob)))
    return float(min(max(p, 0.0), 1.0))


# ---------------------------------------------------------------- the constrained-reaching benchmark

KEEP_OUT_FRACTION = 0.3   # point_mass: the disc's radius as a fraction of the start-goal distance
BAND_JOINT = 1            # reacher: the wrist
BAND_FRACTION = 0.4       # reacher: the band's width as a fraction of the wrist's start-goal angle
MIN_BAND_MOVE = 0.3       # reacher: episodes whose wrist moves less than this (radians) to the goal are skipped
METHODS = ("unconstrained", "constrained, learned readout", "constrained, oracle (true simulator state)")
# --oracle_planner: the same rule with the true simulator as the planner's model too (what a perfect world model
# and readout would reach; the rule's own cost in success).
ORACLE_PLANNER_METHODS = ("oracle planner, unconstrained", "oracle planner, constrained (true simulator state)")


def episode_rules(env, seed: int, goal_steps: int) -> tuple[Constraint, ...] | None:
    """The benchmark's rule for the episode of `seed` (None: the episode is skipped, as jepa.plan.episode_seeds
    skips goals closer than twice the success radius): point_mass, a keep-out disc
    centred on the straight line halfway between the start and the goal; reacher, a forbidden band of the wrist
    angle halfway between its start and goal angles. Leaves the env reset to the episode's start."""
    from jepa.plan import SUCCESS_RADIUS, make_goal
    goal = make_goal(env, seed, goal_steps)
    start = true_path(env)
    if np.linalg.norm(goal.position - start[:2]) < 2 * SUCCESS_RADIUS[env.domain]:
        return None
    for a in goal.actions:
        env.step(a)
    end = true_path(env)
    env.reset(seed)
    if env.domain == "point_mass":
        centre = (start[:2] + end[:2]) / 2
        r = KEEP_OUT_FRACTION * float(np.linalg.norm(end[:2] - start[:2]))
        return (Constraint("keep_out", (float(centre[0]), float(centre[1]), r)),)
    if env.domain == "reacher":
        q0 = start[2 + BAND_JOINT]
        move = float(wrap(end[2 + BAND_JOINT] - q0, np))
        if abs(move) < MIN_BAND_MOVE:
            return None
        mid, half = float(wrap(q0 + move / 2, np)), BAND_FRACTION * abs(move) / 2
        return (Constraint("joint_band", (float(BAND_JOINT), mid - half, mid + half)),)
    raise ValueError(f"domain: the constrained-reaching benchmark covers point_mass and reacher, not {env.domain}")


def benchmark_seeds(domain: str, count: int, goal_steps: int, resolution: int, first: int = 1000) -> list[int]:
    """The first `count` seeds from `first` that have a rule (the goal is at least twice the success radius away,
    as in jepa.plan.episode_seeds, and reacher's wrist moves enough); ValueError when 100 x count seeds give too
    few (e.g. a goal too few steps away to leave the success radius)."""
    from jepa.envs import make_env
    env = make_env(domain, first, resolution)
    out: list[int] = []
    try:
        for seed in range(first, first + 100 * count):
            if episode_rules(env, seed, goal_steps) is not None:
                out.append(seed)
                if len(out) == count:
                    return out
    finally:
        env.close()
    raise ValueError(f"{domain}: only {len(out)} of seeds {first}..{first + 100 * count - 1} have a goal "
                     f"plan.goal_steps={goal_steps} steps away that the benchmark can use; need {count}")


def benchmark(workdir: str, *, domains: Sequence[str] = ("point_mass", "reacher"), episodes: int = 50,
              first_seed: int = 1000, output: str = "", config=None, progress: bool = True, model=None,
              heads: dict[str, ReadoutHead] | None = None, oracle_planner: bool = False) -> dict:
    """Constrained reaching on each domain's fixed episodes: CEM with the world model unconstrained, constrained
    through the learned readout, and constrained through the true simulator (oracle); success and violations
    per episode with 95% Wilson intervals. oracle_planner: also CEM on the true simulator (jepa.plan.Oracle),
    unconstrained and constrained through it. model, heads: the world model and readout already loaded (default:
    those of `workdir`)."""
    from jepa.plan import evaluate
    from jepa.planning import WorldModel, settings_of
    model = model if model is not None else WorldModel.load(workdir)
    heads = heads if heads is not None else load_readout(workdir)
    config = config if config is not None else model.config
    settings = settings_of(config)
    res = int(config.data.resolution)
    results: dict = {"settings": {**dict(config.plan), "horizon_blocks": settings.horizon,
                                  "action_block": model.action_block},
                     "episodes": episodes, "first_seed": first_seed, "domains": {}}
    missing = [d for d in domains if d not in heads]
    if missing:
        raise ValueError(f"domains {', '.join(missing)}: the readout in {workdir} covers {', '.join(heads)} (the "
                         "run's world data has no episode of them)")
    for domain in domains:
        seeds = benchmark_seeds(domain, episodes, int(config.plan.goal_steps), res, first=first_seed)
        head, per = heads[domain], {}
        # (method, planner policy, check: None / "learned" / "oracle", the unconstrained method it is compared with)
        runs = [(METHODS[0], "cem", None, None), (METHODS[1], "cem", "learned", METHODS[0]),
                (METHODS[2], "cem", "oracle", METHODS[0])]
        if oracle_planner:
            runs += [(ORACLE_PLANNER_METHODS[0], "oracle", None, None),
                     (ORACLE_PLANNER_METHODS[1], "oracle", "oracle", ORACLE_PLANNER_METHODS[0])]
        for method, policy, kind, base in runs:
            def rules(env, seed, kind=kind, head=head):
                found = episode_rules(env, seed, int(config.plan.goal_steps))
                check = (None if kind is None else latent_check(head, structure(found), model.action_block)
                         if kind == "learned" else oracle_check(env, structure(found)))
                return EpisodeConstraints(found, env, check)
            per[method] = m = evaluate(model, domain, seeds, policy, config, name=method, progress=progress,
                                       constraints=rules)
            log.info("%s, %s: success %.2f, violated in %.2f of %d episodes (%.2f violating steps each)", domain,
                     method, m["success_rate"], m["violation_rate"], len(seeds), m["violating_steps"])
            if base is not None:
                b = per[base]
                m["compared_with"] = base
                m["violation_reduction"] = (1 - m["violating_steps"] / b["violating_steps"]
                                            if b["violating_steps"] > 0 else None)
                m["success_change_points"] = 100 * (m["success_rate"] - b["success_rate"])
        results["domains"][domain] = {"seeds": seeds, "methods": per}
    if output:
        out = workdir_lib.path(output)
        out.mkdir(parents=True, exist_ok=True)
        workdir_lib.write_json(out / "constraints_benchmark.json", results)
        (out / "constraints_benchmark.md").write_text(format_markdown(results))
    return results


def format_markdown(results: dict) -> str:
    s = results["settings"]
    head = (f"Constrained reaching, {results['episodes']} episodes per domain (seeds from {results['first_seed']}); "
            f"CEM {s['samples']} samples x {s['iterations']} iterations, horizon {s['horizon_blocks']} blocks of "
            f"{s['action_block']} steps, constraint mode {s['constraint_mode']} (weight {s['constraint_weight']}); "
            f"point_mass: keep-out disc of radius {KEEP_OUT_FRACTION} x the start-goal distance halfway along the "
            f"straight line; reacher: forbidden band of qpos[{BAND_JOINT}] (wrist), {BAND_FRACTION} x its start-goal "
            f"angle wide, halfway.\n\n")
    rows = [("domain", "method", "success [95% CI]", "reached [95% CI]", "episodes violating [95% CI]",
             "violating steps / episode", "violation cut (vs unconstrained)", "success change (points)",
             "plan s/action")]
    rate = lambda m, k: f"{m[k]:.2f} [{m[k + '_ci95'][0]:.2f}, {m[k + '_ci95'][1]:.2f}]"
    for domain, r in results["domains"].items():
        for method, m in r["methods"].items():
            cut = m.get("violation_reduction")
            rows.append((domain, method, rate(m, "success_rate"), rate(m, "reached_rate"),
                         rate(m, "violation_rate"), f"{m['violating_steps']:.2f}",
                         "-" if cut is None else f"{100 * cut:.0f}%",
                         f"{m['success_change_points']:+.0f}" if "success_change_points" in m else "-",
                         "-" if m["plan_seconds_per_action"] is None else f"{m['plan_seconds_per_action']:.3f}"))
    md = lambda r: "| " + " | ".join(r) + " |"
    return head + "\n".join([md(rows[0]), md(tuple("---" for _ in rows[0])), *map(md, rows[1:])]) + "\n"


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m jepa.constraints fit|benchmark --workdir=RUN [--flags] [--config.FIELD=VALUE ...]`."""
    from absl import flags

    from jepa import cli
    from jepa import config as config_lib
    with cli.flag_scope():
        workdir, config_flag = cli.define_run_config(argv, "a world-model run (configs/world_model.py)")
        max_rows = flags.DEFINE_integer("max_rows", 2000, "fit: frames per domain per split", lower_bound=10)
        domains = flags.DEFINE_list("domains", ["point_mass", "reacher"], "benchmark: a comma list of domains")
        episodes = flags.DEFINE_integer("episodes", 50, "benchmark: episodes per domain", lower_bound=1)
        first_seed = flags.DEFINE_integer("first_seed", 1000, "benchmark: the episode set's first seed")
        output = flags.DEFINE_string("output", "", "benchmark: write constraints_benchmark.json and .md here")
        oracle_planner = flags.DEFINE_boolean("oracle_planner", False, "benchmark: also plan with the true "
                                              "simulator (CEM on it), unconstrained and constrained")
        command = cli.parse(argv, commands=("fit", "benchmark"), command_required=True, required=("workdir",))
        for d in domains.value:
            if d not in ("point_mass", "reacher"):
                raise cli.UsageError(f"--domains: {d!r} is not point_mass or reacher")
        config = config_flag.value
        config_lib.validate(config)
        if command == "fit":
            from jepa.planning import WorldModel
            model = WorldModel.load(workdir.value)
            heads, report = fit_readout(model, config, max_rows=max_rows.value)
            save_readout(workdir.value, heads, report)
            print(json.dumps({d: {"feature": r["feature"], "r2": r["r2"]} for d, r in report.items()}))
            return report
        result = benchmark(workdir.value, domains=domains.value, episodes=episodes.value,
                           first_seed=first_seed.value, output=output.value, config=config,
                           oracle_planner=oracle_planner.value)
        sys.stdout.write(format_markdown(result))
        return result


def run() -> None:
    """Entry of `python -m jepa.constraints`."""
    from jepa import cli
    cli.run(main, __doc__)


if __name__ == "__main__":
    run()
