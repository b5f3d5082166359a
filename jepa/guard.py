"""Check before acting: a gate that decides, before every executed block, whether the planner may act, and
consequence checks that, after it, name a broken actuator or a changed world.

    python -m jepa.plan --workdir=runs/wm --guard --ensemble=runs/wm_s1,runs/wm_s2 --domain=point_mass
    python -m jepa.guard benchmark --workdir=runs/wm --ensemble=runs/wm_s1,runs/wm_s2 --output=runs/guard_bench

The gate reads three signals before each block the planner wants to execute:
  - disagreement: the spread of an ensemble's one-step predictions for that block (the run plus others trained
    with other seeds on the same frozen encoder): mean over patches and dimensions of the std across members;
  - surprise: the largest observed surprise (mean |predicted - observed| next representation) of the latest
    `plan.guard_surprise_window` blocks;
  - violation: the predicted probability that the plan breaks a constraint, when a violation scorer is given.
It acts when every signal lies below its threshold, else holds (executes the safe block: zero action, for one
block, and re-plans after it); `plan.guard_hold_limit` holds in a row, or a fault named by the consequence check,
stop the episode (no further action). Thresholds come from nominal planning episodes (no fault, seeds of their
own): the per-signal quantile q is the smallest at which the gate acts on `plan.guard_coverage` of their blocks.
A threshold 0 never acts; inf always acts. Every decision is logged with its reason and signal values.

The consequence check, after each executed block, predicts the observed next representation (and physical
state, for models trained with world_model.state_source "physics") from the same context for the executed block
and for counterfactual ones (every actuator dead, inverted or halved, and each
actuator alone dead, inverted or halved). Each hypothesis's evidence in a block is how much better it explains
the observation than the executed block, relatively: 1 - error(hypothesis) / error(executed) (summed over the
representation and the state); the score sums it
over the latest `plan.guard_fault_blocks` executed blocks (a lasting fault keeps favouring the same hypothesis,
noise does not) and takes the best hypothesis. A score above the margin (the `plan.guard_fault_quantile` of
nominal episodes' scores) names the fault: that hypothesis ("actuator 0 inverted").

The benchmark runs seeded episodes per domain, a fault injected at the middle block of every other one
(jepa.envs.inject_fault: an actuator inverted, dead or weakened, every body 5x heavier, the camera moved, a new
obstacle), each episode twice on the same seed: unguarded (the gate logs, never refuses) and guarded. It reports the
detection AUROC of the consequence score and of surprise per fault (faulty episodes' largest score from the fault on
vs nominal episodes' over the same blocks), the median delay to detection in environment steps, false alarms on
nominal episodes, the gate's coverage of nominal blocks, and violations of each episode's rule
(jepa.constraints.episode_rules, measured on the true state) with and without the gate; JSON, Markdown and a
risk-coverage plot (risk: the fraction of acted blocks that come after a fault; coverage: the fraction of nominal
blocks acted on, over the per-signal quantile)."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import weakref
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jepa import workdir as workdir_lib
from jepa.planning import WorldModel, pad_states

log = logging.getLogger(__name__)

SIGNALS = ("disagreement", "surprise", "violation")
DECISIONS = ("act", "hold", "stop")
# What each injected fault should be explained by (the hypotheses of `counterfactuals` for actuator 0).
EXPECTED_HYPOTHESIS = {"actuator_inverted": "actuator 0 inverted", "actuator_dead": "actuator 0 dead",
                       "actuator_weak": "actuator 0 weakened"}


# ---------------------------------------------------------------- settings and thresholds


@dataclasses.dataclass(frozen=True)
class GuardSettings:
    coverage: float = 0.95         # fraction of nominal blocks the calibrated gate acts on
    hold_limit: int = 3            # consecutive holds that stop the episode
    surprise_window: int = 2       # recent surprise: the largest of the latest this many blocks
    fault_quantile: float = 0.99   # consequence margin: this quantile of nominal blocks' scores
    fault_blocks: int = 3          # executed blocks whose consequence evidence is summed
    calibration_episodes: int = 10  # nominal episodes the thresholds are calibrated on

    @classmethod
    def from_config(cls, plan_cfg) -> GuardSettings:
        """From config.plan's guard_* fields (checked by jepa.config.validate)."""
        return cls(**{f.name: type(f.default)(plan_cfg[f"guard_{f.name}"]) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class Thresholds:
    """The gate acts when every available signal is strictly below its threshold (0: never; inf: always); the
    consequence check names a fault above `fault_margin` (inf: never)."""
    disagreement: float = math.inf
    surprise: float = math.inf
    violation: float = math.inf
    fault_margin: float = math.inf
    quantile: float | None = None   # the per-signal quantile calibration chose (None: set by hand)

    @classmethod
    def constant(cls, value: float) -> Thresholds:
        """Every signal's threshold `value`, no fault detection."""
        return cls(disagreement=value, surprise=value, violation=value)


def coverage_thresholds(signals: dict[str, np.ndarray], coverage: float, grid: int = 1001
                        ) -> tuple[dict[str, float], float]:
    """Per-signal thresholds at the smallest common quantile q whose gate (act when every signal < its threshold)
    acts on at least `coverage` of the rows: signals {name: [n]} of nominal blocks -> ({name: threshold}, q).
    Thresholds sit just above the quantile, so q = 1 acts on every row."""
    if not signals:
        raise ValueError("coverage_thresholds: no signal to calibrate")
    values = {k: np.asarray(v, np.float64) for k, v in signals.items()}
    n = {len(v) for v in values.values()}
    if len(n) != 1 or 0 in n:
        raise ValueError(f"coverage_thresholds: signals need one value per block each, got lengths "
                         f"{ {k: len(v) for k, v in values.items()} }")
    for k, v in values.items():
        if not np.all(np.isfinite(v)):
            raise ValueError(f"coverage_thresholds: signal {k!r} has non-finite values")
    for q in np.linspace(0.0, 1.0, grid):
        thr = {k: float(np.nextafter(np.quantile(v, q), np.inf)) for k, v in values.items()}
        if acted(values, thr).mean() >= coverage:
            return thr, float(q)
    raise AssertionError("unreachable: q = 1 acts on every row")


def acted(signals: dict[str, np.ndarray], thresholds: dict[str, float]) -> np.ndarray:
    """[n] bool: the rows on which the gate acts (every signal strictly below its threshold)."""
    rows = np.ones(len(next(iter(signals.values()))), bool)
    for k, v in signals.items():
        rows &= np.asarray(v, np.float64) < thresholds[k]
    return rows


# ---------------------------------------------------------------- ensemble and counterfactual predictions


class Ensemble:
    """Predictors of several world-model runs on one frozen encoder (the first: the planning model). Their
    one-step predictions for a block come from one jitted call (the members' parameters stacked and vmapped)."""

    def __init__(self, models: Sequence[WorldModel], names: Sequence[str]):
        if len(models) < 2:
            raise ValueError(f"ensemble: needs at least 2 world models, got {len(models)}")
        first = models[0]
        for m, name in zip(models[1:], names[1:]):
            check_compatible(first, names[0], m, name)
        self.models, self.names = list(models), list(names)
        self.params = jax.tree.map(lambda *x: jnp.stack(x), *[m.predictor_params for m in models])
        obj = first.objective

        def spread(params, z, states, past, block):
            seq = jnp.concatenate([past, block], axis=0)[None]

            def one(p):
                return obj.predict(p, z[None], seq, states[None])[0][0, -1]
            return jnp.mean(jnp.std(jax.vmap(one)(params), axis=0))
        self._spread = jax.jit(spread)

    @classmethod
    def load(cls, model: WorldModel, name: str, workdirs: Sequence[str]) -> Ensemble:
        """`model` (the planning run, at `name`) and the runs in `workdirs`."""
        return cls([model, *(WorldModel.load(w) for w in workdirs)], [name, *workdirs])

    def disagreement(self, z: jax.Array, states: np.ndarray | None, past_actions: np.ndarray | None,
                     block: np.ndarray) -> float:
        """Mean over patches and dimensions of the std across members of the next-frame prediction after
        `block` [action_block, A] from the observed frames z [k, N, D] (states, past_actions as in
        WorldModel.next_prediction)."""
        m = self.models[0]
        k = z.shape[0]
        return float(self._spread(self.params, z, pad_states(states, k), m._past(past_actions, k),
                                  m.blocks(np.asarray(block, np.float32))))


def check_compatible(first: WorldModel, first_name: str, other: WorldModel, name: str) -> None:
    """Raises ValueError naming `name` unless `other` predicts in `first`'s representation space from the same
    inputs: same world-model settings and predictor shapes, and the same frozen encoder weights."""
    for field in ("action_block", "context_frames", "state_source", "action_to_patches"):
        a, b = first.config.world_model[field], other.config.world_model[field]
        if a != b:
            raise ValueError(f"ensemble: {name} has world_model.{field}={b!r}, {first_name} has {a!r}")
    shapes = lambda p: jax.tree.map(lambda x: tuple(x.shape), p)
    if shapes(first.predictor_params) != shapes(other.predictor_params):
        raise ValueError(f"ensemble: {name}'s predictor differs in shape from {first_name}'s "
                         "(model.ac_predictor)")
    same = shapes(first.encoder_params) == shapes(other.encoder_params) and all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(first.encoder_params), jax.tree.leaves(other.encoder_params)))
    if not same:
        raise ValueError(f"ensemble: {name}'s frozen encoder differs from {first_name}'s; members must share it "
                         "(train them with the same --config.encoder_from and another --config.seed)")


def counterfactuals(block: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The executed block [k, A] and the blocks a fault would turn it into: [(hypothesis, block [k, A])], the
    executed one first."""
    b = np.asarray(block, np.float32)
    out = [("as commanded", b), ("every actuator dead", np.zeros_like(b)), ("every actuator inverted", -b),
           ("every actuator weakened", 0.5 * b)]
    for i in range(b.shape[-1]):
        for name, scale in (("dead", 0.0), ("inverted", -1.0), ("weakened", 0.5)):
            c = b.copy()
            c[:, i] *= scale
            out.append((f"actuator {i} {name}", c))
    return out


def verdict(evidence: np.ndarray, candidates: list[tuple[str, np.ndarray]], error: float) -> dict:
    """A consequence check's result: the evidence per counterfactual (candidates[1:]), the best one's score and
    name, and the executed block's error."""
    best = int(np.argmax(evidence))
    return {"evidence": evidence, "hypotheses": [name for name, _ in candidates[1:]],
            "score": float(evidence[best]), "hypothesis": candidates[1 + best][0], "error": error}


class Consequences:
    """Prediction errors of the executed and counterfactual blocks against what was observed next, all
    candidates in one jitted call: the representation, and the physical state too when the model predicts it
    (world_model.state_source "physics")."""

    def __init__(self, model: WorldModel):
        self.model = model
        self.uses_state = model.objective.state_source == "physics"
        obj = model.objective

        def errors(params, z, states, past, candidates, observed, observed_state):
            c = candidates.shape[0]
            seq = jnp.concatenate([jnp.broadcast_to(past[None], (c, *past.shape)), candidates[:, None]], axis=1)
            zs = jnp.broadcast_to(z[None], (c, *z.shape))
            ss = jnp.broadcast_to(states[None], (c, *states.shape))
            z_next, s_next = obj.predict(params, zs, seq, ss)                           # [C, k, N, D], [C, k, S]
            return (jnp.mean(jnp.abs(z_next[:, -1] - observed[None]), axis=(1, 2)),
                    jnp.mean(jnp.abs(s_next[:, -1] - observed_state[None]), axis=1))
        self._errors = jax.jit(errors)

    def check(self, z: jax.Array, states: np.ndarray | None, past_actions: np.ndarray | None, block: np.ndarray,
              observed: jax.Array, observed_state: np.ndarray | None = None) -> dict:
        """For `block` [action_block, A] executed from z [k, N, D] and followed by the observed representation
        [N, D] (and physical state [S], read when the model predicts states): {"evidence": [C - 1] per
        counterfactual, 1 - error(hypothesis) / error(executed), summed over the representation and the state,
        "hypotheses": their names, "score": the largest evidence, "hypothesis": its name, "error": the executed
        block's representation error}."""
        m = self.model
        k = z.shape[0]
        cands = counterfactuals(block)
        tokens = jnp.concatenate([m.blocks(c) for _, c in cands], axis=0)             # [C, W]
        if self.uses_state and observed_state is None:
            raise ValueError("observed_state: the model predicts physical states (world_model.state_source="
                             "'physics'); pass the observed one")
        seen_state = pad_states(None if observed_state is None else np.asarray(observed_state)[None], 1)[0]
        err_z, err_s = (np.asarray(e, np.float64) for e in self._errors(
            m.predictor_params, z, pad_states(states, k), m._past(past_actions, k), tokens, observed, seen_state))
        relative = lambda err: np.zeros(len(err) - 1) if err[0] <= 0 else 1.0 - err[1:] / err[0]
        evidence = relative(err_z) + (relative(err_s) if self.uses_state else 0.0)
        return verdict(evidence, cands, float(err_z[0]))


class SimulatorConsequences:
    """The consequence check of a perfect world model (the benchmark's oracle row): each candidate block replayed
    from the true state before it in the dataset's simulator (jepa.envs.resimulate), its error the mean |state
    difference| to the observed state after it. What the learned check would reach with exact predictions, so
    the benchmark can tell the model's share of a miss from the check's."""

    def __init__(self, domain: str, resolution: int = 64):
        self.domain, self.resolution = domain, int(resolution)

    def check(self, z, states: np.ndarray | None, past_actions, block: np.ndarray, observed,
              observed_state: np.ndarray | None = None) -> dict:
        """As Consequences.check; reads only the true states: `states` [k, S] (the last: before the block) and
        `observed_state` [S] (after it)."""
        from jepa.envs import resimulate
        if states is None or observed_state is None:
            raise ValueError("SimulatorConsequences: needs the true states before and after the block")
        cands = counterfactuals(block)
        before, seen = np.asarray(states)[-1], np.asarray(observed_state, np.float64)
        err = np.array([np.mean(np.abs(resimulate(self.domain, 0, before, c, self.resolution)[1][-1] - seen))
                        for _, c in cands])
        # Relative to the larger error, so each block's evidence lies in [-1, 1]: the executed block replays to
        # rounding, and 1 - err / err[0] would let one nominal block outweigh any number of faulty ones in the sum.
        evidence = (err[0] - err[1:]) / np.maximum(np.maximum(err[0], err[1:]), 1e-9)
        return verdict(evidence, cands, float(err[0]))


_CONSEQUENCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------- the gate


class Guard:
    """The gate and the consequence check of one planning loop (jepa.plan.run_episode's `guard`): `reset` at
    the start of an episode, `before` each block (-> "act", "hold" or "stop"), `after` each executed block.
    `records` holds one dict per block of the episode: the decision, its reason, the signals and the check.
    With enforce=False the gate only watches: it records what it would decide and always answers "act".
    violation: (z, states, past_actions, plan) -> the predicted probability that the plan breaks a rule."""

    def __init__(self, model: WorldModel, *, ensemble: Ensemble | None = None,
                 settings: GuardSettings | None = None, thresholds: Thresholds | None = None,
                 violation: Callable[..., float] | None = None, enforce: bool = True,
                 consequences: Consequences | SimulatorConsequences | None = None):
        self.model, self.ensemble, self.violation, self.enforce = model, ensemble, violation, enforce
        self.settings = settings or GuardSettings()
        self.thresholds = thresholds or Thresholds()
        if consequences is None:
            if model not in _CONSEQUENCES:  # one compiled check per model, however many guards use it
                _CONSEQUENCES[model] = Consequences(model)
            consequences = _CONSEQUENCES[model]
        self.consequences = consequences
        self.reset(0)

    def reset(self, seed: int) -> None:
        self.seed, self.records = int(seed), []
        self.holds, self.stopped, self.fault, self.fault_block = 0, False, None, None
        self._surprises: list[float] = []
        self._evidence: list[np.ndarray] = []

    def signals(self, z, states, past_actions, block, plan) -> dict[str, float | None]:
        recent = self._surprises[-self.settings.surprise_window:]
        return {
            "disagreement": (None if self.ensemble is None
                             else self.ensemble.disagreement(z, states, past_actions, block)),
            "surprise": max(recent) if recent else 0.0,
            "violation": None if self.violation is None else float(self.violation(z, states, past_actions, plan)),
        }

    def before(self, t: int, z: jax.Array, states: np.ndarray | None, past_actions: np.ndarray | None,
               block: np.ndarray, plan: np.ndarray | None = None) -> str:
        """Decide on executing `block` [action_block, A] (the first of `plan`, the planner's remaining sequence)
        from the observed frames z (states, past_actions: as for WorldModel.next_prediction) at block t."""
        sig = self.signals(z, states, past_actions, block, block if plan is None else plan)
        thr = dataclasses.asdict(self.thresholds)
        above = [f"{k} {v:.4g} >= {thr[k]:.4g}" for k, v in sig.items() if v is not None and not v < thr[k]]
        if self.stopped:
            decision, reason = "stop", "stopped earlier in the episode"
        elif self.fault is not None:
            decision, reason = "stop", (f"consequence check: the observations up to block {self.fault_block} are "
                                        f"better explained by '{self.fault}'")
        elif above:
            self.holds += 1
            decision = "stop" if self.holds >= self.settings.hold_limit else "hold"
            reason = ", ".join(above) + (f" ({self.holds} holds in a row)" if decision == "stop" else "")
        else:
            self.holds = 0
            decision, reason = "act", "every signal below its threshold"
        self.stopped = decision == "stop"
        self.records.append({"seed": self.seed, "block": int(t), "decision": decision, "reason": reason,
                             "enforced": self.enforce, "signals": sig, "thresholds": {k: thr[k] for k in SIGNALS}})
        return decision if self.enforce else "act"

    def after(self, t: int, z: jax.Array, states: np.ndarray | None, past_actions: np.ndarray | None,
              block: np.ndarray, observed: jax.Array, surprise: float, observed_state: np.ndarray | None = None
              ) -> dict:
        """The consequence check of executed `block` [action_block, A] (from z, states, past_actions) against the
        observed next representation [N, D] and physical state; `surprise`: the planner's one-step surprise of
        that block."""
        self._surprises.append(float(surprise))
        check = self.consequences.check(z, states, past_actions, block, observed, observed_state)
        # A zero block (a hold) has no counterfactual to tell apart: it adds no evidence.
        if np.any(np.asarray(block) != 0):
            self._evidence = [*self._evidence, check["evidence"]][-self.settings.fault_blocks:]
        total = np.sum(self._evidence, axis=0) if self._evidence else np.zeros_like(check["evidence"])
        best = int(np.argmax(total))
        score, hypothesis = float(total[best]), check["hypotheses"][best]
        if score > self.thresholds.fault_margin and self.fault is None:
            self.fault, self.fault_block = hypothesis, int(t)
            log.info("consequence check, episode seed %d, block %d: the observations are better explained by '%s' "
                     "(score %.3f above the margin %.3f over %d blocks)", self.seed, t, hypothesis, score,
                     self.thresholds.fault_margin, len(self._evidence))
        check = {"block_score": check["score"], "block_hypothesis": check["hypothesis"], "error": check["error"],
                 "score": score, "hypothesis": hypothesis}
        check["fault"] = self.fault
        if self.records and self.records[-1]["block"] == t:
            self.records[-1]["consequence"] = check
        return check

    @staticmethod
    def safe_block(low: np.ndarray, high: np.ndarray, steps: int) -> np.ndarray:
        """The hold's block [steps, A]: zero action (the bounds' nearest point to zero)."""
        return np.repeat(np.clip(0.0, low, high)[None], steps, axis=0).astype(np.float32)


@dataclasses.dataclass
class Shift:
    """A fault (jepa.envs.FAULTS) injected into an episode's environment before block `at`; `undo` restores the
    environment (a no-op when nothing was applied)."""
    kind: str
    at: int
    actuator: int = 0
    _restore: Callable[[], None] | None = None

    def apply(self, env) -> None:
        from jepa.envs import inject_fault
        self.undo()
        self._restore = inject_fault(env, self.kind, self.actuator)

    def undo(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None


# ---------------------------------------------------------------- calibration


class EpisodeRules:
    """Per episode: the rule the benchmark measures (jepa.constraints.episode_rules; None: none) and the gate's
    violation signal from the run's constraint readout (None without one)."""

    def __init__(self, model: WorldModel, domain: str, goal_steps: int, head=None):
        self.model, self.domain, self.goal_steps, self.head = model, domain, int(goal_steps), head

    def measure(self, env, seed: int):
        from jepa import constraints
        rules = constraints.episode_rules(env, seed, self.goal_steps)
        return None if rules is None else constraints.EpisodeConstraints(rules, env)

    def signal(self, env, seed: int) -> Callable[..., float] | None:
        from jepa import constraints
        if self.head is None:
            return None
        rules = constraints.episode_rules(env, seed, self.goal_steps) or ()
        return lambda z, states, past, plan: constraints.predicted_violation(self.model, self.head, rules, z,
                                                                             states, plan, past)


def run_guarded(guard: Guard, model: WorldModel, domain: str, seeds: Sequence[int], config, *,
                shifts: Sequence[Shift | None] | None = None, rules: EpisodeRules | None = None,
                label: str = "", progress: bool = False) -> list[dict]:
    """Planning episodes over `seeds` with `guard` (shifts: a Shift or None per episode, undone after it; rules:
    each episode's measured rule and the gate's violation signal): run_episode's results with the guard's
    records ("guard")."""
    from tqdm.auto import tqdm

    from jepa.envs import make_env
    from jepa.plan import run_episode
    from jepa.planning import settings_of
    p = config.plan
    settings = settings_of(config)
    env = make_env(domain, seeds[0], int(config.data.resolution))
    episodes = []
    try:
        for i, s in enumerate(tqdm(seeds, desc=f"{domain}, {label or 'guard'}", unit="episode", file=sys.stderr,
                                   disable=not progress)):
            shift = shifts[i] if shifts is not None else None
            measured = rules.measure(env, s) if rules is not None else None
            guard.violation = rules.signal(env, s) if rules is not None else guard.violation
            try:
                e = run_episode(model, env, s, settings=settings, episode_steps=int(p.episode_steps),
                                goal_steps=int(p.goal_steps), execute_steps=int(p.execute_steps),
                                context_frames=int(p.context_frames), guard=guard, shift=shift,
                                constraints=measured)
            finally:
                if shift is not None:
                    shift.undo()
            e["shift"] = None if shift is None else {"kind": shift.kind, "at": shift.at, "actuator": shift.actuator}
            episodes.append(e)
    finally:
        env.close()
    return episodes


def calibrate(model: WorldModel, domain: str, config, *, ensemble: Ensemble | None = None,
              rules: EpisodeRules | None = None, violation: Callable[..., float] | None = None,
              seeds: Sequence[int] | None = None, first_seed: int = 1000, progress: bool = False,
              consequences: Consequences | SimulatorConsequences | None = None) -> tuple[Thresholds, dict]:
    """Thresholds for `domain` from nominal planning episodes (default: plan.guard_calibration_episodes from a
    seed range of their own), the gate only watching: per-signal thresholds at the quantile that acts on
    plan.guard_coverage of their blocks, the fault margin at plan.guard_fault_quantile of their consequence
    scores (of `consequences`, default the model's own check), and at least 0. Returns (thresholds, {signal:
    [nominal values]})."""
    from jepa.plan import episode_seeds
    settings = GuardSettings.from_config(config.plan)
    if seeds is None:
        seeds = episode_seeds(domain, settings.calibration_episodes, int(config.plan.goal_steps),
                              int(config.data.resolution), first=int(first_seed) + 100_000)
    watcher = Guard(model, ensemble=ensemble, settings=settings, violation=violation, enforce=False,
                    consequences=consequences)
    episodes = run_guarded(watcher, model, domain, seeds, config, rules=rules, label="calibration",
                           progress=progress)
    rows = [r for e in episodes for r in e["guard"]]
    signals = {k: np.asarray([r["signals"][k] for r in rows]) for k in SIGNALS if rows[0]["signals"][k] is not None}
    scores = np.asarray([r["consequence"]["score"] for r in rows if "consequence" in r])
    thr, q = coverage_thresholds(signals, settings.coverage)
    # Never below 0: a fault is named only when its hypothesis explains the observations better than the executed
    # actions do. Nominal scores can all sit below 0 (a check that replays the executed block exactly scores -1
    # there), and a quantile of them would let rounding name faults.
    margin = max(0.0, float(np.quantile(scores, settings.fault_quantile)))
    thresholds = Thresholds(**thr, fault_margin=margin, quantile=q)
    log.info("guard calibrated on %d nominal %s episodes (%d blocks): quantile %.3f, thresholds %s, fault margin "
             "%.4f", len(seeds), domain, len(rows), q, {k: round(v, 5) for k, v in thr.items()},
             thresholds.fault_margin)
    return thresholds, {k: v.tolist() for k, v in signals.items()}


def build(model: WorldModel, workdir: str, ensemble_workdirs: Sequence[str], domain: str, config, *,
          first_seed: int = 1000, progress: bool = False) -> Guard:
    """The calibrated, enforcing guard of `jepa.plan --guard` for `domain`: the ensemble of the run and
    `ensemble_workdirs` (disagreement off without them); the violation signal of config.plan.constraints through
    the run's constraint readout, when both exist."""
    from jepa import constraints
    ensemble = Ensemble.load(model, workdir, ensemble_workdirs) if ensemble_workdirs else None
    if ensemble is None:
        log.warning("guard: no --ensemble runs, so no disagreement signal (train 2+ more runs with another "
                    "--config.seed on the same --config.encoder_from)")
    rules = constraints.parse(config.plan.constraints)
    head = readout_head(workdir, domain) if rules else None
    violation = None
    if head is not None:
        violation = lambda z, states, past, plan: constraints.predicted_violation(model, head, rules, z, states,
                                                                                  plan, past)
    thresholds, _ = calibrate(model, domain, config, ensemble=ensemble, violation=violation,
                              first_seed=first_seed, progress=progress)
    return Guard(model, ensemble=ensemble, settings=GuardSettings.from_config(config.plan),
                 thresholds=thresholds, violation=violation)


def readout_head(workdir: str, domain: str):
    """The run's constraint readout head of `domain` (jepa.constraints fit), or None when the run has none."""
    from jepa import constraints
    path = workdir_lib.path(workdir) / constraints.READOUT_FILE
    if not path.exists():
        log.info("guard: %s has no constraint readout: no predicted-violation signal", workdir)
        return None
    return constraints.load_readout(workdir).get(domain)


# ---------------------------------------------------------------- benchmark


def _first(records: Sequence[dict], pred, start: int = 0) -> int | None:
    """The block of the first record from block `start` on that satisfies pred, or None."""
    return next((r["block"] for r in records if r["block"] >= start and pred(r)), None)


def episode_scores(e: dict, at: int, block: int) -> dict:
    """Detection figures of one watched (unguarded) episode from block `at` on (the fault's block; the same block
    for nominal episodes): the largest consequence score and surprise, the block the consequence check named a
    fault (any block: on nominal episodes, a false alarm), the delay in environment steps from the fault to it
    and to the gate's first refusal, the violating steps before and after `at`."""
    rows = e["guard"]
    scores = [r["consequence"]["score"] for r in rows if "consequence" in r and r["block"] >= at]
    named = _first(rows, lambda r: "consequence" in r and r["consequence"]["fault"] is not None)
    refused = _first(rows, lambda r: r["decision"] != "act", at)
    violation = np.asarray(e.get("violation", []), np.float64) > 0
    return {
        "seed": e["seed"], "shift": e["shift"],
        "consequence_score": max(scores) if scores else 0.0,
        "surprise_score": max(e["surprise"][at:]) if len(e["surprise"]) > at else 0.0,
        "fault_block": named,
        "hypothesis": None if named is None else next(r["consequence"]["fault"] for r in rows if r["block"] == named),
        # a fault named at block b has been seen on blocks at..b: (b - at + 1) blocks of environment steps
        "detection_delay_steps": None if named is None or named < at else (named - at + 1) * block,
        "refusal_delay_steps": None if refused is None else (refused - at) * block,
        "violations_before": int(violation[:at * block].sum()), "violations_after": int(violation[at * block:].sum()),
        "acted_blocks": sum(r["decision"] == "act" for r in rows), "stopped": e["stopped"],
    }


def risk_coverage(watched: Sequence[dict], calibration: dict[str, list], at: int, points: int = 51) -> dict:
    """The risk-coverage curve over the per-signal quantile q (thresholds from the calibration signals): coverage,
    the fraction of nominal blocks the gate acts on; risk, the fraction of blocks acted on (all episodes) that
    come at or after a fault."""
    names = list(calibration)
    rows = [(r, e["shift"] is not None and r["block"] >= at) for e in watched for r in e["guard"]]
    signals = {k: np.asarray([r["signals"][k] for r, _ in rows], np.float64) for k in names}
    bad = np.asarray([b for _, b in rows])
    nominal = np.asarray([e["shift"] is None for e in watched for _ in e["guard"]])
    out = {"quantile": [], "coverage": [], "risk": []}
    for q in np.linspace(0.0, 1.0, points):
        thr = {k: float(np.nextafter(np.quantile(np.asarray(calibration[k]), q), np.inf)) for k in names}
        a = acted(signals, thr)
        out["quantile"].append(float(q))
        out["coverage"].append(float(a[nominal].mean()) if nominal.any() else float("nan"))
        out["risk"].append(float(bad[a].mean()) if a.any() else 0.0)
    return out


def summarize_domain(watched: Sequence[dict], guarded: Sequence[dict], at: int, block: int) -> dict:
    """Per fault kind and pooled: detection AUROC (consequence and surprise), median delays, named hypotheses,
    violations without and with the gate; on nominal episodes, false alarms and the gate's coverage."""
    from jepa.envs import ACTUATOR_FAULTS
    from jepa.surprise import auroc
    w = [episode_scores(e, at, block) for e in watched]
    g = [episode_scores(e, at, block) for e in guarded]
    blocks = max(len(e["guard"]) for e in watched)
    nominal = [i for i, e in enumerate(watched) if e["shift"] is None]
    kinds = sorted({e["shift"]["kind"] for e in watched if e["shift"] is not None})
    groups = {k: [i for i, e in enumerate(watched) if e["shift"] and e["shift"]["kind"] == k] for k in kinds}
    groups["actuator faults"] = [i for k in kinds if k in ACTUATOR_FAULTS for i in groups[k]]
    groups["every fault"] = [i for i, e in enumerate(watched) if e["shift"] is not None]
    median = lambda v: float(np.median(v)) if v else None
    per: dict = {}
    for name, idx in groups.items():
        if not idx:
            continue
        entry = {"episodes": len(idx)}
        for score in ("consequence_score", "surprise_score"):
            entry[f"auroc_{score[:-6]}"] = (auroc([w[i][score] for i in idx], [w[i][score] for i in nominal])
                                           if nominal else None)
        detected = [w[i]["detection_delay_steps"] for i in idx if w[i]["detection_delay_steps"] is not None]
        refused = [g[i]["refusal_delay_steps"] for i in idx if g[i]["refusal_delay_steps"] is not None]
        entry.update(detected=len(detected), median_detection_delay_steps=median(detected),
                     median_refusal_delay_steps=median(refused),
                     hypotheses={h: sum(w[i]["hypothesis"] == h for i in idx)
                                 for h in sorted({w[i]["hypothesis"] for i in idx if w[i]["hypothesis"]})},
                     violations_after_unguarded=float(np.mean([w[i]["violations_after"] for i in idx])),
                     violations_after_guarded=float(np.mean([g[i]["violations_after"] for i in idx])))
        if name in EXPECTED_HYPOTHESIS:
            entry["hypothesis_correct"] = sum(w[i]["hypothesis"] == EXPECTED_HYPOTHESIS[name] for i in idx)
        before, after = entry["violations_after_unguarded"], entry["violations_after_guarded"]
        entry["violations_removed"] = None if before == 0 else float(1.0 - after / before)
        per[name] = entry
    nom = {"episodes": len(nominal)}
    if nominal:
        nom.update(false_alarms=sum(w[i]["fault_block"] is not None for i in nominal),
                   coverage=float(np.mean([g[i]["acted_blocks"] / blocks for i in nominal])),
                   stopped=sum(g[i]["stopped"] is not None for i in nominal),
                   violations_unguarded=float(np.mean([w[i]["violations_before"] + w[i]["violations_after"]
                                                       for i in nominal])),
                   violations_guarded=float(np.mean([g[i]["violations_before"] + g[i]["violations_after"]
                                                     for i in nominal])))
    return {"faults": per, "nominal": nom, "watched": w, "guarded": g}


def benchmark(workdir: str, ensemble_workdirs: Sequence[str] = (), *, domains: Sequence[str] = ("point_mass",
              "reacher"), episodes: int = 50, faults: Sequence[str] | None = None, first_seed: int = 1000,
              output: str = "", config=None, progress: bool = True, oracle_consequences: bool = False) -> dict:
    """Shift detection and the gate with the run in `workdir` and its ensemble (see run_benchmark); the
    predicted-violation signal from the run's constraint readout when it has one."""
    model = WorldModel.load(workdir)
    ensemble = Ensemble.load(model, workdir, ensemble_workdirs) if ensemble_workdirs else None
    return run_benchmark(model, ensemble, heads={d: readout_head(workdir, d) for d in domains}, domains=domains,
                         episodes=episodes, faults=faults, first_seed=first_seed, output=output, config=config,
                         progress=progress, oracle_consequences=oracle_consequences)


def run_benchmark(model: WorldModel, ensemble: Ensemble | None, *, heads: dict | None = None,
                  domains: Sequence[str] = ("point_mass", "reacher"), episodes: int = 50,
                  faults: Sequence[str] | None = None, first_seed: int = 1000, output: str = "", config=None,
                  progress: bool = True, oracle_consequences: bool = False) -> dict:
    """Shift detection and the gate on each domain's seeded episodes (jepa.constraints.benchmark_seeds: each with
    its measured rule), a fault from `faults` (default jepa.envs.FAULTS, in turn) injected at the middle block of
    every other episode; every episode watched (unguarded) and guarded, on the same seed. heads: {domain: the
    constraint readout head or None} for the predicted-violation signal. oracle_consequences: the consequence
    check replays its hypotheses in the true simulator (SimulatorConsequences) instead of the world model."""
    from jepa import constraints
    from jepa.envs import FAULTS
    faults = tuple(faults or FAULTS)
    for f in faults:
        if f not in FAULTS:
            raise ValueError(f"--faults: {f!r} is not one of {', '.join(FAULTS)}")
    config = config if config is not None else model.config
    settings = GuardSettings.from_config(config.plan)
    block = model.action_block
    blocks = int(config.plan.episode_steps) // block
    if blocks < 2:
        raise ValueError(f"plan.episode_steps={config.plan.episode_steps}: the benchmark needs at least 2 blocks of "
                         f"world_model.action_block={block} steps (a fault goes in at the middle one)")
    at = blocks // 2
    results: dict = {"settings": {**{k: v for k, v in dict(config.plan).items() if not k.startswith("guard")},
                                  "guard": dataclasses.asdict(settings), "action_block": block,
                                  "fault_block": at, "blocks": blocks,
                                  "consequences": "simulator" if oracle_consequences else "world model"},
                     "ensemble": ensemble.names if ensemble is not None else [], "episodes": episodes,
                     "first_seed": first_seed,
                     "faults": list(faults), "domains": {}}
    curves, records = {}, []
    for domain in domains:
        rules = EpisodeRules(model, domain, int(config.plan.goal_steps), (heads or {}).get(domain))
        cal_seeds = constraints.benchmark_seeds(domain, settings.calibration_episodes, int(config.plan.goal_steps),
                                                int(config.data.resolution), first=first_seed + 100_000)
        check = SimulatorConsequences(domain, int(config.data.resolution)) if oracle_consequences else None
        thresholds, cal = calibrate(model, domain, config, ensemble=ensemble, rules=rules, seeds=cal_seeds,
                                    progress=progress, consequences=check)
        seeds = constraints.benchmark_seeds(domain, episodes, int(config.plan.goal_steps),
                                            int(config.data.resolution), first=first_seed)
        kinds = [None if i % 2 == 0 else faults[(i // 2) % len(faults)] for i in range(len(seeds))]
        watched = run_guarded(Guard(model, ensemble=ensemble, settings=settings, thresholds=thresholds,
                                    enforce=False, consequences=check), model, domain, seeds, config,
                              shifts=make_shifts(kinds, at), rules=rules, label="unguarded", progress=progress)
        guarded = run_guarded(Guard(model, ensemble=ensemble, settings=settings, thresholds=thresholds,
                                    consequences=check),
                              model, domain, seeds, config, shifts=make_shifts(kinds, at), rules=rules,
                              label="guarded", progress=progress)
        summary = summarize_domain(watched, guarded, at, block)
        curves[domain] = risk_coverage(watched, cal, at)
        curves[domain]["calibrated"] = thresholds.quantile
        results["domains"][domain] = {"seeds": seeds, "calibration_seeds": cal_seeds,
                                      "thresholds": dataclasses.asdict(thresholds), "risk_coverage": curves[domain],
                                      **summary}
        for run, eps in (("unguarded", watched), ("guarded", guarded)):
            for e in eps:
                records += [{"domain": domain, "run": run, "shift": e["shift"], **r} for r in e["guard"]]
        log.info("%s: %s", domain, format_domain_line(results["domains"][domain]))
    if output:
        out = workdir_lib.path(output)
        workdir_lib.write_json(out / "guard_benchmark.json", results)
        (out / "guard_benchmark.md").write_text(format_markdown(results))
        workdir_lib.write_jsonl(out / "decisions.jsonl", records)
        plot_risk_coverage(curves, out / "risk_coverage.png")
    return results


def make_shifts(kinds: Sequence[str | None], at: int) -> list[Shift | None]:
    """A Shift of each kind at block `at` (None: a nominal episode)."""
    return [None if k is None else Shift(k, at) for k in kinds]


def format_domain_line(r: dict) -> str:
    """One domain's headline figures in words."""
    parts = []
    act = r["faults"].get("actuator faults")
    if act:
        parts.append(f"actuator faults AUROC {_num(act['auroc_consequence'])} (consequence), "
                     f"{_num(act['auroc_surprise'])} (surprise), {act['detected']}/{act['episodes']} detected")
    nom = r["nominal"]
    if nom.get("episodes"):
        parts.append(f"nominal: coverage {nom['coverage']:.3f}, {nom['false_alarms']}/{nom['episodes']} false "
                     "alarms")
    return "; ".join(parts)


def _num(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_markdown(results: dict) -> str:
    """The benchmark as Markdown tables, a row per fault kind and one for the nominal episodes, per domain."""
    s = results["settings"]
    lines = [f"Episodes per domain: {results['episodes']} (seeds from {results['first_seed']}), a fault injected "
             f"before block {s['fault_block']} of {s['blocks']} (blocks of {s['action_block']} steps) in every other "
             f"one; ensemble of {len(results['ensemble']) or 'none'}; consequences checked by the "
             f"{s.get('consequences', 'world model')}; gate coverage target {s['guard']['coverage']}, "
             f"{s['guard']['hold_limit']} holds stop, faults named after {s['guard']['fault_blocks']} blocks above "
             f"the {s['guard']['fault_quantile']} quantile.", ""]
    head = ("domain", "fault", "episodes", "AUROC consequence", "AUROC surprise", "detected", "median delay (steps)",
            "correct hypothesis", "violations after: unguarded", "guarded", "removed")
    md = lambda r: "| " + " | ".join(r) + " |"
    lines += [md(head), md(tuple("---" for _ in head))]
    for domain, r in results["domains"].items():
        for name, f in r["faults"].items():
            lines.append(md((domain, name, str(f["episodes"]), _num(f["auroc_consequence"]),
                             _num(f["auroc_surprise"]), str(f["detected"]), _num(f["median_detection_delay_steps"], 1),
                             str(f.get("hypothesis_correct", "-")), _num(f["violations_after_unguarded"]),
                             _num(f["violations_after_guarded"]), _num(f["violations_removed"]))))
    lines += ["", md(("domain", "nominal episodes", "gate coverage", "false alarms", "stopped",
                      "violations: unguarded", "guarded")), md(tuple("---" for _ in range(7)))]
    for domain, r in results["domains"].items():
        n = r["nominal"]
        if n.get("episodes"):
            lines.append(md((domain, str(n["episodes"]), f"{n['coverage']:.3f}", str(n["false_alarms"]),
                             str(n["stopped"]), _num(n["violations_unguarded"]), _num(n["violations_guarded"]))))
    return "\n".join(lines) + "\n"


def plot_risk_coverage(curves: dict, path) -> None:
    """{domain: risk_coverage(...)} -> one PNG: risk vs nominal coverage, the calibrated point marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for domain, c in curves.items():
        (line,) = ax.plot(c["coverage"], c["risk"], marker=".", label=domain)
        if c.get("calibrated") is not None:
            i = int(np.argmin(np.abs(np.asarray(c["quantile"]) - c["calibrated"])))
            ax.plot([c["coverage"][i]], [c["risk"][i]], "o", color=line.get_color(), ms=8, mfc="none")
    ax.set(title="the gate: risk vs coverage", xlabel="coverage (fraction of nominal blocks acted on)",
           ylabel="risk (acted blocks after a fault)")
    ax.legend(fontsize=8)
    workdir_lib.write_png(path, fig)


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m jepa.guard benchmark --workdir=RUN --ensemble=RUN2,RUN3 [--flags] [--config.FIELD=VALUE ...]`."""
    from absl import flags

    from jepa import cli
    from jepa import config as config_lib
    from jepa.envs import FAULTS
    from jepa.plan import PLAN_DOMAINS
    with cli.flag_scope():
        workdir, config_flag = cli.define_run_config(argv, "a world-model run (configs/world_model.py)")
        ensemble = flags.DEFINE_list("ensemble", [], "more world-model runs on the same frozen encoder (other "
                                     "seeds): the gate's disagreement signal")
        domains = flags.DEFINE_list("domains", list(PLAN_DOMAINS), "a comma list of domains")
        episodes = flags.DEFINE_integer("episodes", 50, "episodes per domain (a fault in every other one)",
                                        lower_bound=2)
        faults = flags.DEFINE_list("faults", list(FAULTS), "faults injected in turn: " + ", ".join(FAULTS))
        first_seed = flags.DEFINE_integer("first_seed", 1000, "the episode set: seeds from this one")
        output = flags.DEFINE_string("output", "", "write guard_benchmark.json, .md, decisions.jsonl and "
                                     "risk_coverage.png here")
        oracle = flags.DEFINE_boolean("oracle_consequences", False, "check consequences in the true simulator (a "
                                      "perfect world model's check) instead of the world model")
        cli.parse(argv, commands=("benchmark",), command_required=True, required=("workdir",))
        for d in domains.value:
            if d not in PLAN_DOMAINS:
                raise cli.UsageError(f"--domains: {d!r}: planning tasks are defined for {', '.join(PLAN_DOMAINS)}")
        for f in faults.value:
            if f not in FAULTS:
                raise cli.UsageError(f"--faults: {f!r} is not one of {', '.join(FAULTS)}")
        config = config_flag.value
        config_lib.validate(config)
        result = benchmark(workdir.value, ensemble.value, domains=domains.value, episodes=episodes.value,
                           faults=faults.value, first_seed=first_seed.value, output=output.value, config=config,
                           oracle_consequences=oracle.value)
        print(format_markdown(result), end="")
        return result


def run() -> None:
    """Entry of `python -m jepa.guard`."""
    from jepa import cli
    cli.run(main, __doc__)


if __name__ == "__main__":
    run()
