"""The embedded real-physics "world" dataset: DeepMind Control Suite episodes rendered by MuJoCo on the CPU.

Why: the quick start and the world-model (action-conditioned) experiments need real video with actions and physics
states, generated locally in minutes with no download. Episodes are cached once as a TFDS ArrayRecord dataset
("jepa_world", builder `World`) and read back as a random-access data source (len / getitem). The environments
that render them (domains, cameras, stepping) are `jepa.envs`, which planning and surprise use at run time.

Episode semantics (one record per episode, format in the team spec "World episode record"):
  - frame t is rendered from the physics at control step t; frame 0 is the reset state (dm_control's own randomised
    initial state for the task, seeded by the episode seed).
  - actions[t] is the action applied AFTER frame t: applying it (held for the domain's `action_repeat` dm_control
    control steps) takes the physics from states[t] to states[t+1], which renders as frames[t+1]. The last frame's
    action is the action the policy draws next (never applied), so an episode of T frames is an exact prefix of the
    same episode with more frames.
  - states[t] = concat(qpos, qvel) at frame t, zero-padded to S_MAX; rewards[t] = the task reward of the physics at
    frame t (what dm_control's step returns on arriving there; not summed over the action repeat).
  - the per-episode policy is drawn from the episode seed with the preset's policy mix ("policies"): uniform-random
    actions (i.i.d. per frame), temporally smooth Ornstein-Uhlenbeck noise with random stiffness/scale, or "hold"
    (piecewise constant: a uniform action held for 5 to 20 frames, then the next), always inside the action-spec
    bounds. Every preset mixes uniform and smooth equally, except "control", which gives half its episodes to hold
    (planning's goals are one constant action held for several steps).
  - the record's "seed" and the preset's policy mix determine the episode (initial state and actions):
    `generate_episode(domain, seed, frames, resolution, policies)` (`WorldConfig.episode_job(i)` gives these
    arguments) reproduces it, and `jepa.envs.make_env(domain, seed).reset()` its first state.

Determinism: episode i of a config uses seed `episode_seed(seed, i)` and domain `domains[i % len(domains)]`
(round-robin); the same config gives byte-identical frames whatever the number of workers.

Generation runs in `spawn`ed worker processes (EGL contexts are created inside each): scripts that call
prepare_world with num_workers > 1 need an `if __name__ == "__main__":` guard. Prepare on one process before several
processes read the same data_dir (two concurrent preparations of one config race on the final rename).

Splits by episode, in episode order: "train" (first ~80%), "validation" (next ~10%), "test" (last ~10%); with
round-robin domains each block of len(domains) consecutive episodes holds every domain once.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jepa.data import workers
from jepa.envs import A_MAX, DOMAINS, S_MAX, WorldEnv, domain_index

# Per-episode action policies (see _Policy) and the mix a preset draws them from, as (kind, weight) pairs.
POLICY_KINDS = ("uniform", "ou", "hold")
RANDOM_OR_SMOOTH = (("uniform", 1.0), ("ou", 1.0))
# Planning's goals are one constant action held for 10 steps (2 world-model blocks of 5), so the control preset
# gives half its episodes to held actions; its other half (300 episodes) keeps as many uniform and smooth episodes
# as a 300-episode random-or-smooth preset would, for coverage of fast-varying actions.
CONTROL_POLICIES = (("uniform", 1.0), ("ou", 1.0), ("hold", 2.0))

# episodes = total over all domains (round-robin), frames per episode, square resolution, domains (None = all nine),
# policies = the per-episode policy mix.
# Cost: ~4.5 ms of CPU per 64x64 frame (~6 ms at 128x128) for render + physics; ~1.35 KB per 64x64 frame on disk
# (zlib), ~11.6 KB at 128x128. "default" took 138 s on 2 shared cores (about 80 s projected on 2 idle ones).
PRESETS: dict[str, dict] = {
    "tiny": dict(episodes=6, frames=24, resolution=64, domains=("cartpole", "reacher"),  # ~5 s; for tests
                 policies=RANDOM_OR_SMOOTH),
    "default": dict(episodes=384, frames=100, resolution=64, domains=None,  # quick start: 38k frames, 50 MB
                    policies=RANDOM_OR_SMOOTH),
    "large": dict(episodes=8000, frames=200, resolution=64, domains=None,  # 1.6M frames, ~2.2 GB, ~2 CPU-hours
                  policies=RANDOM_OR_SMOOTH),
    "xlarge": dict(episodes=10000, frames=200, resolution=128, domains=None,  # 2M frames, ~23 GB, ~3.5 CPU-hours
                   policies=RANDOM_OR_SMOOTH),
    # World-model (action-conditioned) training data for the planning tasks: 36k frames, 9.5 MB; 108 s on 2 shared
    # cores.
    "control": dict(episodes=600, frames=60, resolution=64, domains=("reacher", "point_mass"),
                    policies=CONTROL_POLICIES),
}

SPLITS = ("train", "validation", "test")


# --------------------------------------------------------------------------------------------------------------------
# Seeds, policies
# --------------------------------------------------------------------------------------------------------------------

def episode_seed(seed: int, index: int) -> int:
    """The seed of episode `index` of a dataset made with global `seed` (fits a uint32 for MuJoCo task RNGs)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)[0])


# A hold lasts 5 to 20 frames: at least one world-model block (5 env steps), reaching past the planner's 10-step
# goal horizon, and at most a third of a control episode (60 frames) so each episode still shows several actions.
HOLD_FRAMES = (5, 20)


def _resolve_policies(policies) -> tuple[tuple[str, float], ...]:
    """The policy mix as (kind, weight) pairs; raises ValueError naming `policies` when it is malformed."""
    try:
        pairs = tuple((str(k), float(w)) for k, w in (policies.items() if isinstance(policies, dict) else policies))
    except (TypeError, ValueError) as e:
        raise ValueError(f"policies: expected (kind, weight) pairs, got {policies!r}") from e
    kinds = [k for k, _ in pairs]
    if not pairs or len(set(kinds)) != len(kinds) or any(k not in POLICY_KINDS for k in kinds):
        raise ValueError(f"policies: kinds must be distinct ones of {POLICY_KINDS}, got {kinds}")
    if not all(np.isfinite(w) and w > 0 for _, w in pairs):
        raise ValueError(f"policies: weights must be finite and > 0, got {pairs}")
    return pairs


class _Policy:
    """Random actions inside [low, high], of one kind drawn from the seed with the mix's weights: i.i.d. uniform,
    Ornstein-Uhlenbeck (smooth), or hold (piecewise constant: a uniform action held for HOLD_FRAMES frames).

    The draws before the kind's own ones (kind, OU stiffness/scale/start) are the same for every mix, and the kind
    draw is one uniform number against the cumulative weights: an equal uniform/ou mix picks uniform exactly when
    that number is below 0.5, so adding a kind to one preset's mix leaves every other preset's episodes alone."""

    def __init__(self, seed: int, low: np.ndarray, high: np.ndarray, policies=RANDOM_OR_SMOOTH):
        pairs = _resolve_policies(policies)
        self.rng = np.random.default_rng([int(seed), 0x9E3779B9])
        self.low, self.high = low.astype(np.float64), high.astype(np.float64)
        weights = np.array([w for _, w in pairs])
        cumulative = np.cumsum(weights) / weights.sum()
        pick = int(np.searchsorted(cumulative, self.rng.random(), side="right"))
        self.kind = pairs[min(pick, len(pairs) - 1)][0]  # min: rounding may leave cumulative[-1] just below 1
        self.theta = self.rng.uniform(0.05, 0.3)   # pull back to the centre per frame
        self.sigma = self.rng.uniform(0.1, 0.4)    # noise per frame, in units of the half range
        self.x = self.rng.uniform(self.low, self.high)
        self.hold_left = 0                         # frames the held action still lasts (hold kind)

    def __call__(self) -> np.ndarray:
        if self.kind == "uniform":
            a = self.rng.uniform(self.low, self.high)
        elif self.kind == "hold":
            if self.hold_left == 0:
                self.x = self.rng.uniform(self.low, self.high)
                self.hold_left = int(self.rng.integers(HOLD_FRAMES[0], HOLD_FRAMES[1] + 1))
            self.hold_left -= 1
            a = self.x
        else:
            centre, half = (self.high + self.low) / 2, (self.high - self.low) / 2
            a = self.x
            noise = self.rng.standard_normal(self.low.shape)
            self.x = np.clip(self.x + self.theta * (centre - self.x) + self.sigma * half * noise, self.low, self.high)
        return np.asarray(a, np.float64)


_EPISODE_ENVS: dict[tuple[int, int], WorldEnv] = {}


def generate_episode(domain: int | str, seed: int, frames: int, resolution: int = 64,
                     policies=RANDOM_OR_SMOOTH) -> dict:
    """One episode as a world record (numpy); a pure function of its arguments (environments cached per process).

    policies: the mix the episode's policy kind is drawn from ((kind, weight) pairs; a preset's "policies")."""
    i = domain_index(domain)
    if frames < 1:
        raise ValueError(f"frames: must be >= 1, got {frames}")
    key = (i, int(resolution))
    if key not in _EPISODE_ENVS:
        _EPISODE_ENVS[key] = WorldEnv(i, seed, int(resolution))
    env = _EPISODE_ENVS[key]
    policy = _Policy(seed, env.action_low, env.action_high, policies)
    res = int(resolution)
    out = {
        "frames": np.zeros((frames, res, res, 3), np.uint8),
        "actions": np.zeros((frames, A_MAX), np.float32),
        "states": np.zeros((frames, S_MAX), np.float32),
        "rewards": np.zeros((frames,), np.float32),
    }
    obs = env.reset(seed)
    for t in range(frames):
        out["frames"][t], out["states"][t], out["rewards"][t] = obs["frame"], obs["state"], obs["reward"]
        action = policy().astype(np.float32)  # apply exactly the stored float32 values, so replays match bit for bit
        out["actions"][t, : env.action_dim] = action
        if t + 1 < frames:
            obs = env.step(action)
    out.update(action_dim=env.action_dim, state_dim=env.state_dim, num_qpos=env.num_qpos, domain=i,
               task=env.task, seed=int(seed), label=i)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Configs and the TFDS builder
# --------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class WorldConfig(tfds.core.BuilderConfig):
    """Generation options; the config name encodes them so each option set is cached in its own directory."""

    episodes: int = 0
    frames: int = 0
    resolution: int = 64
    domains: tuple[int, ...] = ()
    seed: int = 0
    policies: tuple[tuple[str, float], ...] = RANDOM_OR_SMOOTH

    def episode_domain(self, index: int) -> int:
        return self.domains[index % len(self.domains)]

    def episode_job(self, index: int) -> tuple:
        """The arguments of generate_episode for episode `index`."""
        return (self.episode_domain(index), episode_seed(self.seed, index), self.frames, self.resolution,
                self.policies)

    def split_indices(self) -> dict[str, range]:
        """Episode indices per split: ~80/10/10 in episode order, validation and test get at least one each."""
        n = max(1, round(0.1 * self.episodes))
        n_train = self.episodes - 2 * n
        return {"train": range(0, n_train), "validation": range(n_train, n_train + n),
                "test": range(n_train + n, self.episodes)}


def _resolve_domains(domains) -> tuple[int, ...]:
    if domains is None:
        return tuple(range(len(DOMAINS)))
    if isinstance(domains, (str, bytes)):
        raise ValueError(f"domains: expected a sequence of domain names, got the string {domains!r}")
    idx = tuple(domain_index(d) for d in domains)
    if not idx:
        raise ValueError("domains: must name at least one domain")
    if len(set(idx)) != len(idx):
        raise ValueError(f"domains: {list(domains)} names a domain twice")
    return idx


def make_config(preset: str = "default", *, episodes: int | None = None, frames: int | None = None,
                resolution: int | None = None, domains: Sequence[str] | None = None, seed: int = 0) -> WorldConfig:
    """A WorldConfig from a preset plus overrides; named after the preset when nothing differs from it."""
    if preset not in PRESETS:
        raise ValueError(f"preset: {preset!r} is not one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    ep = p["episodes"] if episodes is None else episodes
    fr = p["frames"] if frames is None else frames
    res = p["resolution"] if resolution is None else resolution
    dom = _resolve_domains(p["domains"] if domains is None else domains)
    for name, v, lo in (("episodes", ep, 3), ("frames", fr, 2), ("resolution", res, 8)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name}: must be an int >= {lo}, got {v!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed: must be a non-negative int, got {seed!r}")
    same = (ep, fr, res, dom, seed) == (p["episodes"], p["frames"], p["resolution"],
                                        _resolve_domains(p["domains"]), 0)
    name = preset if same else (f"{preset}_e{ep}_f{fr}_r{res}_d{'x'.join(map(str, dom))}_s{seed}")
    desc = (f"{ep} episodes x {fr} frames at {res}x{res}, domains "
            f"{', '.join('/'.join(DOMAINS[i]) for i in dom)}, seed {seed}")
    policies = _resolve_policies(p["policies"])
    desc += f", policies {', '.join(f'{k} x{w:g}' for k, w in policies)}"
    return WorldConfig(name=name, description=desc, episodes=int(ep), frames=int(fr), resolution=int(res),
                       domains=dom, seed=int(seed), policies=policies)


def _episode_job(args) -> dict:
    """Worker entry point (module level so spawn can import it)."""
    domain, seed, frames, resolution, policies = args
    return generate_episode(domain, seed, frames, resolution, policies)


def _worker_init() -> None:
    # One llvmpipe thread per worker: the workers already fill the cores, extra raster threads only contend.
    os.environ.setdefault("LP_NUM_THREADS", "1")
    workers.exit_with_parent()  # a killed trainer or prepare command leaves no generation worker behind


class World(tfds.core.GeneratorBasedBuilder):
    """DeepMind Control Suite episodes with frames, actions, physics states and rewards (see the module docstring)."""

    name = "jepa_world"
    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.0.0": "First release.",
                     "1.1.0": "point_mass/easy added (label 8) to every preset; the control preset.",
                     "1.2.0": "The control preset: 600 episodes, half of them with held (piecewise-constant) "
                              "actions. Every other preset's data is unchanged."}
    BUILDER_CONFIGS = [make_config(p) for p in PRESETS]
    DEFAULT_CONFIG_NAME = "default"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS's own lookup needs the importlib_resources backport (not installed); this file is the answer anyway.
        from etils import epath

        return epath.Path(__file__)

    def __init__(self, *, num_workers: int | None = None, **kwargs):
        self._num_workers = num_workers
        self._pool = None      # shared over the three splits during one preparation
        self._progress = None
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        t, r = c.frames, c.resolution
        f = tfds.features
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=f.FeaturesDict({
                "frames": f.Tensor(shape=(t, r, r, 3), dtype=np.uint8, encoding=f.Encoding.ZLIB),
                "actions": f.Tensor(shape=(t, A_MAX), dtype=np.float32),
                "states": f.Tensor(shape=(t, S_MAX), dtype=np.float32),
                "rewards": f.Tensor(shape=(t,), dtype=np.float32),
                "action_dim": f.Scalar(dtype=np.int32),
                "state_dim": f.Scalar(dtype=np.int32),
                "num_qpos": f.Scalar(dtype=np.int32),
                "domain": f.Scalar(dtype=np.int32),
                "task": f.Text(),
                "seed": f.Scalar(dtype=np.int64),
                "label": f.ClassLabel(names=[f"{d}/{t}" for d, t in DOMAINS]),
            }),
            disable_shuffling=True,  # records in episode order
            homepage="https://github.com/google-deepmind/dm_control",
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(idx) for split, idx in self.builder_config.split_indices().items()}

    def _generate_examples(self, indices: range) -> Iterator[tuple[int, dict]]:
        c = self.builder_config
        jobs = [c.episode_job(i) for i in indices]
        for i, ep in zip(indices, ordered_results(_episode_job, jobs, self._workers(), self)):
            if self._progress is not None:
                self._progress.update(1)
            yield i, ep

    def _workers(self) -> int:
        c = self.builder_config
        if self._num_workers is not None:
            n = self._num_workers
        else:  # small datasets: spawning workers (~2 s each) costs more than it saves
            n = 1 if c.episodes * c.frames <= _IN_PROCESS_FRAMES else _available_cpus()
        return max(1, min(int(n), c.episodes))


_IN_PROCESS_FRAMES = 1000


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _make_pool(n: int):
    from concurrent.futures import ProcessPoolExecutor
    ctx = multiprocessing.get_context("spawn")  # EGL contexts and dm_control are created inside each worker
    return ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init)


MAX_WORKER_CRASHES = 3


def ordered_results(fn, jobs: Sequence, workers: int, holder=None) -> Iterator:
    """fn(job) for every job, in order, on `workers` spawned processes (0 or 1: in this process).

    Why not multiprocessing.Pool: when a worker dies (a segfault in the renderer), Pool replaces it but loses its
    task, and the ordered iterator waits forever. Here a dead worker breaks the pool, so the unfinished jobs are
    resubmitted to a fresh one (episodes are pure functions of their seed: the output is unchanged); after
    MAX_WORKER_CRASHES crashes it raises. `holder._pool` (prepare_world's pool for all splits) is used and replaced
    when present."""
    from concurrent.futures.process import BrokenProcessPool
    if workers <= 1:
        yield from map(fn, jobs)
        return
    pool = getattr(holder, "_pool", None)
    own = pool is None
    pool = _make_pool(workers) if own else pool
    done, crashes = 0, 0
    try:
        while done < len(jobs):
            try:
                for result in pool.map(fn, jobs[done:]):
                    done += 1
                    yield result
            except BrokenProcessPool as e:
                crashes += 1
                if crashes > MAX_WORKER_CRASHES:
                    raise RuntimeError(f"world generation: worker processes died {crashes} times (the last while job "
                                       f"{done} of {len(jobs)}, {jobs[done]!r}, was unfinished); see the system log "
                                       "(dmesg) for the crash") from e
                logging.getLogger(__name__).warning(
                    "world generation: a worker process died; restarting the pool and resuming at job %d (%d/%d)",
                    done, crashes, MAX_WORKER_CRASHES)
                pool.shutdown(wait=False, cancel_futures=True)
                pool = _make_pool(workers)
                if not own:
                    holder._pool = pool
    finally:
        if own:
            pool.shutdown(wait=False, cancel_futures=True)


def prepare_world(data_dir: str, *, preset: str = "default", episodes: int | None = None, frames: int | None = None,
                  resolution: int | None = None, domains: Sequence[str] | None = None, seed: int = 0,
                  num_workers: int | None = None) -> tfds.core.DatasetBuilder:
    """Generate the world dataset once (parallel workers, progress bar), cached under data_dir; return the builder.

    num_workers: generator processes (None = the CPUs available, or this process alone for at most 1000 frames;
    1 or 0 = in this process). It does not change the output, so it is not part of the cache key.
    """
    if num_workers is not None and (not isinstance(num_workers, (int, np.integer)) or num_workers < 0):
        raise ValueError(f"num_workers: must be an int >= 0 or None, got {num_workers!r}")
    config = make_config(preset, episodes=episodes, frames=frames, resolution=resolution, domains=domains, seed=seed)
    # TFDS wants the registered config by name for presets, a config object for anything else.
    builder = World(data_dir=os.fspath(data_dir), config=config.name if config.name in PRESETS else config,
                    num_workers=num_workers)
    if builder.is_prepared():
        return builder
    from tqdm.auto import tqdm

    n = builder._workers()
    builder._pool = _make_pool(n) if n > 1 else None
    builder._progress = tqdm(total=config.episodes, desc=f"jepa_world/{config.name}: episodes ({n} workers)",
                             unit="ep", file=sys.stderr)
    from tensorflow_datasets.core.utils import tqdm_utils

    tfds_bars = tqdm_utils._active  # TFDS's nested per-split bars would interleave with ours: off while we generate
    tqdm_utils.display_progress_bar(False)
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    finally:
        tqdm_utils.display_progress_bar(tfds_bars)
        builder._progress.close()
        if builder._pool is not None:
            builder._pool.shutdown(wait=False, cancel_futures=True)
        builder._pool = builder._progress = None
    return builder


def world_source(data_dir: str, split: str = "train", **options):
    """Random-access source (len / getitem) over one split; prepares the dataset first when it is missing.

    options: the keyword arguments of prepare_world. Records follow the spec's "World episode record" (the TFDS
    numpy decoding: "task" is returned as str).
    """
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {SPLITS}")
    builder = prepare_world(data_dir, **options)
    return WorldSource(builder.as_data_source(split=split))


class WorldSource:
    """The TFDS ArrayRecord data source of one split, with "task" decoded to str as the spec's record says.

    Why a wrapper: TFDS's numpy decoding returns Text features as bytes. `data_source` is the raw TFDS source.
    """

    def __init__(self, data_source):
        self.data_source = data_source
        self.dataset_info = data_source.dataset_info

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int) -> dict:
        return _fix_record(self.data_source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [_fix_record(r) for r in self.data_source.__getitems__(indices)]

    def __repr__(self) -> str:
        return f"WorldSource({self.data_source!r})"


def _fix_record(record: dict) -> dict:
    if isinstance(record.get("task"), bytes):
        record["task"] = record["task"].decode("utf-8")
    return record
