"""The world's run-time environments: DeepMind Control Suite domains rendered by MuJoCo exactly as the world dataset
(jepa/data/world.py) renders them, for planning and surprise, which step, reset and render the same physics.

    env = make_env("reacher", seed)          # reset() is the dataset episode of that seed's first state
    obs = env.step(action)                   # {"frame": uint8 [R, R, 3], "state": float32 [S_MAX], "reward"}
    goal = render_state("reacher", None, qpos, qvel)

Actions and states are zero-padded to A_MAX / S_MAX in every domain, as in the dataset's records. dm_control is
imported inside the functions that need it: the EGL context belongs to the process that renders.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")  # before any dm_control import (they are lazy, inside functions)

A_MAX = 6
S_MAX = 32


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    """How one (domain, task) is rendered: camera and action repeat chosen so motion is visible at 64x64."""

    domain: str
    task: str
    camera_id: int
    action_repeat: int  # dm_control control steps per frame (the action is held for all of them)
    geom_radius: tuple[tuple[str, float], ...] = ()  # geoms enlarged so they are visible at 64x64
    effector: str = ""  # the geom whose (x, y) position planning tasks steer to a goal ("" = none)


# Seconds between frames = action_repeat * the task's control timestep (noted per line). point_mass/easy (added
# last, so earlier domain indices are unchanged) draws its point 3x larger (radius 3 cm, ~6 px across at 64x64;
# the 1 cm original is 1-2 px) with frames 0.16 s apart so it visibly moves; its mass is set explicitly in the
# model, so only wall contacts change.
_DOMAIN_SPECS = (
    DomainSpec("cartpole", "swingup", camera_id=1, action_repeat=8),    # 0.08 s; camera 1 "lookatcart" (cam 0 is tiny)
    DomainSpec("reacher", "easy", camera_id=0, action_repeat=4, effector="finger"),        # 0.08 s
    DomainSpec("cheetah", "run", camera_id=0, action_repeat=4),         # 0.04 s
    DomainSpec("walker", "walk", camera_id=0, action_repeat=2),         # 0.05 s
    DomainSpec("finger", "spin", camera_id=0, action_repeat=2),         # 0.04 s
    DomainSpec("ball_in_cup", "catch", camera_id=0, action_repeat=4),   # 0.08 s
    DomainSpec("acrobot", "swingup", camera_id=0, action_repeat=4),     # 0.04 s
    DomainSpec("hopper", "hop", camera_id=0, action_repeat=4),          # 0.08 s
    DomainSpec("point_mass", "easy", camera_id=0, action_repeat=8, geom_radius=(("pointmass", 0.03),),
               effector="pointmass"),                                    # 0.16 s
)
# Shadows and reflections off: frames look almost the same at 64x64 and render ~5x faster on llvmpipe (3 ms not 15).
_RENDER_FLAGS = {"shadow": False, "reflection": False}

DOMAINS: tuple[tuple[str, str], ...] = tuple((s.domain, s.task) for s in _DOMAIN_SPECS)


def domain_index(domain: int | str) -> int:
    """Index into DOMAINS from an index, a domain name ("cartpole") or "domain/task"; ValueError when unknown."""
    if isinstance(domain, (int, np.integer)) and not isinstance(domain, bool):
        if 0 <= int(domain) < len(DOMAINS):
            return int(domain)
        raise ValueError(f"domain: index {domain} is out of range [0, {len(DOMAINS)})")
    if isinstance(domain, str):
        for i, (d, t) in enumerate(DOMAINS):
            if domain in (d, f"{d}/{t}"):
                return i
    known = ", ".join(f"{d}/{t}" for d, t in DOMAINS)
    raise ValueError(f"domain: {domain!r} is not one of the world domains ({known})")


class WorldEnv:
    """A dm_control environment with exactly the dataset's settings (camera, action repeat, no time limit).

    Why: planning and evaluation must step the same physics that generated the episodes. `reset()` gives
    the episode's first observation for the env's seed (every time); `step(action)` holds the action for
    `action_repeat` control steps. Observations are
    {"frame": uint8 [R, R, 3], "state": float32 [S_MAX], "reward": float}.
    """

    def __init__(self, domain: int | str, seed: int, resolution: int = 64):
        from dm_control import suite  # lazy: the EGL context belongs to the process that renders

        if not isinstance(resolution, (int, np.integer)) or resolution <= 0:
            raise ValueError(f"resolution: must be a positive int, got {resolution!r}")
        self.domain_index = domain_index(domain)
        spec = _DOMAIN_SPECS[self.domain_index]
        self.domain, self.task, self.camera_id, self.action_repeat = (
            spec.domain, spec.task, spec.camera_id, spec.action_repeat)
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.env = suite.load(spec.domain, spec.task, task_kwargs={"random": self.seed, "time_limit": float("inf")})
        self.physics = self.env.physics
        for geom, radius in spec.geom_radius:
            self.physics.named.model.geom_size[geom, 0] = radius
        self.effector = spec.effector
        aspec = self.env.action_spec()
        self.action_low = np.asarray(aspec.minimum, np.float64).reshape(aspec.shape)
        self.action_high = np.asarray(aspec.maximum, np.float64).reshape(aspec.shape)
        self.action_dim = int(aspec.shape[0])
        self.num_qpos = int(self.physics.model.nq)
        self.state_dim = int(self.physics.model.nq + self.physics.model.nv)
        if self.action_dim > A_MAX or self.state_dim > S_MAX:
            raise ValueError(f"domain: {self.domain}/{self.task} has action_dim {self.action_dim} / state_dim "
                             f"{self.state_dim}, above A_MAX={A_MAX} / S_MAX={S_MAX}")
        self.reset()  # dm_control would otherwise turn the first step() into a reset (e.g. after set_state)

    def reset(self, seed: int | None = None) -> dict:
        """Restart the episode of `seed` (default: the env's seed): the task RNG is re-seeded on every reset, so
        the initial state is the dataset episode's whatever happened before."""
        if seed is not None:
            self.seed = int(seed)
        self.env.task._random = np.random.RandomState(self.seed)  # dm_control keeps the task RNG here
        self.env.reset()
        return self._observe(float(self.env.task.get_reward(self.physics)))

    def step(self, action) -> dict:
        """Apply `action` ([action_dim] or zero-padded [A_MAX]; clipped to the bounds) for one frame."""
        a = np.asarray(action, np.float64).reshape(-1)
        if a.shape[0] not in (self.action_dim, A_MAX):
            raise ValueError(f"action: expected {self.action_dim} (or padded {A_MAX}) values for "
                             f"{self.domain}/{self.task}, got shape {np.shape(action)}")
        a = np.clip(a[: self.action_dim], self.action_low, self.action_high)
        for _ in range(self.action_repeat):
            ts = self.env.step(a)
        return self._observe(float(ts.reward))

    def state(self) -> np.ndarray:
        """float32 [S_MAX]: qpos then qvel, zero-padded."""
        s = np.zeros(S_MAX, np.float32)
        s[: self.state_dim] = np.concatenate([self.physics.data.qpos, self.physics.data.qvel])
        return s

    def effector_position(self) -> np.ndarray:
        """float64 [2]: (x, y) of the domain's effector geom (reacher's finger tip, point_mass's point)."""
        if not self.effector:
            raise ValueError(f"domain: {self.domain}/{self.task} has no effector; planning tasks need one of "
                             f"{[s.domain for s in _DOMAIN_SPECS if s.effector]}")
        return np.array(self.physics.named.data.geom_xpos[self.effector][:2], np.float64)

    def set_state(self, qpos, qvel) -> None:
        """Put the physics in (qpos, qvel) and recompute derived quantities (positions, cameras)."""
        qpos, qvel = np.asarray(qpos, np.float64).reshape(-1), np.asarray(qvel, np.float64).reshape(-1)
        if qpos.shape[0] != self.num_qpos or qvel.shape[0] != self.state_dim - self.num_qpos:
            raise ValueError(f"qpos/qvel: {self.domain}/{self.task} needs {self.num_qpos} and "
                             f"{self.state_dim - self.num_qpos} values, got {qpos.shape[0]} and {qvel.shape[0]}")
        with self.physics.reset_context():
            self.physics.data.qpos[:] = qpos
            self.physics.data.qvel[:] = qvel

    def simulate(self, actions, qpos: bool = False) -> np.ndarray:
        """Effector (x, y) after every step of each action sequence [S, T, action_dim] (clipped to the bounds),
        each started from the current state on a copy of the physics: float64 [S, T, 2], or with `qpos` [S, T,
        2 + num_qpos] (x, y, then the joint positions; constraints check both). The environment itself
        is not changed. Why: the planning oracle scores candidate plans with the true simulator, exactly as
        `step` would play them (the action held for `action_repeat` control steps of dm_control's sub-steps)."""
        import mujoco
        a = np.asarray(actions, np.float64)
        if a.ndim != 3 or a.shape[2] != self.action_dim:
            raise ValueError(f"actions: expected [samples, steps, {self.action_dim}], got shape {a.shape}")
        if not self.effector:
            self.effector_position()  # raises: no effector to report
        a = np.clip(a, self.action_low, self.action_high)
        if getattr(self, "_scratch", None) is None:
            self._scratch = self.physics.copy(share_model=True)
        sim, m = self._scratch, self.physics.model.ptr
        sub_steps = self.env._n_sub_steps * self.action_repeat  # dm_control's physics steps per control step
        out = np.empty((a.shape[0], a.shape[1], 2 + self.num_qpos if qpos else 2))
        for i, sequence in enumerate(a):
            mujoco.mj_copyData(sim.data.ptr, m, self.physics.data.ptr)
            for t, action in enumerate(sequence):
                sim.set_control(action)
                sim.step(sub_steps)
                out[i, t, :2] = sim.named.data.geom_xpos[self.effector][:2]
                if qpos:
                    out[i, t, 2:] = sim.data.qpos
        return out

    def render(self) -> np.ndarray:
        """uint8 [R, R, 3] from the dataset camera."""
        return np.asarray(self.physics.render(self.resolution, self.resolution, camera_id=self.camera_id,
                                              render_flag_overrides=_RENDER_FLAGS), np.uint8)

    def _observe(self, reward: float) -> dict:
        return {"frame": self.render(), "state": self.state(), "reward": reward}

    def close(self) -> None:
        """Free the rendering context."""
        if getattr(self, "_scratch", None) is not None:
            self._scratch.free()
        self.physics.free()


def make_env(domain: int | str, seed: int, resolution: int = 64) -> WorldEnv:
    """The environment of `domain` (index into DOMAINS, name, or "domain/task") with the generation settings."""
    return WorldEnv(domain, seed, resolution)


_RENDER_ENVS: dict[tuple[int, int], WorldEnv] = {}


def render_state(domain: int | str, task: str | None, qpos, qvel, resolution: int = 64) -> np.ndarray:
    """uint8 [R, R, 3]: the dataset camera's view of (qpos, qvel), e.g. goal images for planning.

    `task` must match the domain's task in DOMAINS (None: take it from DOMAINS). Environments are cached per process.
    """
    i = domain_index(domain)
    if task is not None and task != DOMAINS[i][1]:
        raise ValueError(f"task: {task!r} is not the world task of {DOMAINS[i][0]!r} ({DOMAINS[i][1]!r})")
    env = _cached_env(i, resolution)
    env.set_state(qpos, qvel)
    return env.render()


MAX_KEYPOINTS = 16  # keypoint slots: every domain's moving geoms fit


def _cached_env(i: int, resolution: int) -> WorldEnv:
    key = (i, int(resolution))
    if key not in _RENDER_ENVS:
        _RENDER_ENVS[key] = WorldEnv(i, 0, int(resolution))
    return _RENDER_ENVS[key]


def camera_projection(physics, camera_id: int) -> np.ndarray:
    """float64 [3, 4]: world point (homogeneous) -> (u, v, 1) * depth in image coordinates, u right and v down,
    both in [0, 1] over the frame. The camera's current pose (tracking cameras move with the bodies they follow)."""
    pos = np.asarray(physics.data.cam_xpos[camera_id], np.float64)
    rot = np.asarray(physics.data.cam_xmat[camera_id], np.float64).reshape(3, 3)
    focal = 0.5 / np.tan(np.deg2rad(float(physics.model.cam_fovy[camera_id])) / 2)  # square frames
    to_cam = np.concatenate([rot.T, -rot.T @ pos[:, None]], axis=1)   # x right, y up, looking along -z (MuJoCo)
    flip = np.diag([1.0, 1.0, -1.0])                                     # -> (x, y, depth)
    return np.array([[focal, 0.0, 0.5], [0.0, -focal, 0.5], [0.0, 0.0, 1.0]]) @ flip @ to_cam


def image_keypoints(domain: int | str, states: np.ndarray, num_qpos: int) -> np.ndarray:
    """float32 [T, MAX_KEYPOINTS, 2]: where the centre of every geom on a moving body of `domain` appears in the
    dataset camera's frame for each state of `states` [T, >= state_dim] (qpos then qvel), as (u, v) in [0, 1] image
    units; unused slots are zero. Why: raw qpos is a poor probe target (unbounded hinge angles wrap; tracking
    cameras hide root translations); image positions are what a frame shows. Geom centres, not body origins: a
    body's origin sits on its joint (a pole's origin never leaves the cart)."""
    i = domain_index(domain)
    env = _cached_env(i, 64)
    if int(num_qpos) != env.num_qpos:
        raise ValueError(f"num_qpos: {num_qpos} does not match {env.domain}/{env.task} ({env.num_qpos})")
    geoms = np.flatnonzero(np.asarray(env.physics.model.geom_bodyid) > 0)
    if len(geoms) > MAX_KEYPOINTS:
        raise ValueError(f"domain: {env.domain} has {len(geoms)} moving geoms, above MAX_KEYPOINTS={MAX_KEYPOINTS}")
    nv = env.state_dim - env.num_qpos
    states = np.asarray(states, np.float64)
    out = np.zeros((len(states), MAX_KEYPOINTS, 2), np.float32)
    for t, s in enumerate(states):
        env.set_state(s[: env.num_qpos], s[env.num_qpos: env.num_qpos + nv])
        xpos = np.asarray(env.physics.data.geom_xpos[geoms], np.float64)
        h = np.concatenate([xpos, np.ones((len(geoms), 1))], axis=1) @ camera_projection(env.physics, env.camera_id).T
        out[t, :len(geoms)] = h[:, :2] / h[:, 2:3]
    return out


# ---------------------------------------------------------------- re-rendering and re-simulating episodes
# Violation-of-expectation clips (jepa/surprise.py) are rendered here: both clips of a pair go through the same
# renderer, so nothing but the event tells them apart.

_CHANGED_ENVS: dict[tuple[int, int, float, float], WorldEnv] = {}


def changed_env(domain: int | str, resolution: int = 64, *, mass_scale: float = 1.0,
                actuator_sign: float = 1.0) -> WorldEnv:
    """A cached environment of `domain` whose model differs from the dataset's: every body's mass and inertia
    times `mass_scale`, every actuator's gear times `actuator_sign` (1 and 1: the dataset's model). Call
    `reset(seed)` before use: the episode's scene is drawn there."""
    if not mass_scale > 0:
        raise ValueError(f"mass_scale: must be > 0, got {mass_scale}")
    if actuator_sign not in (1.0, -1.0):
        raise ValueError(f"actuator_sign: must be 1 or -1, got {actuator_sign}")
    key = (domain_index(domain), int(resolution), float(mass_scale), float(actuator_sign))
    if key not in _CHANGED_ENVS:
        env = WorldEnv(key[0], 0, key[1])
        model = env.physics.model
        model.body_mass[1:] *= mass_scale      # body 0 is the world
        model.body_inertia[1:] *= mass_scale
        model.actuator_gear[:, 0] *= actuator_sign
        _recompute_constants(env)
        _CHANGED_ENVS[key] = env
    return _CHANGED_ENVS[key]


def render_states(domain: int | str, seed: int, states, resolution: int = 64,
                  hidden_geoms: tuple[str, ...] = ()) -> np.ndarray:
    """uint8 [T, R, R, 3]: the dataset camera's view of each physics state of `states` [T, >= state_dim] (qpos then
    qvel) in the scene of the episode of `seed` (e.g. reacher's target), the geoms `hidden_geoms` not drawn."""
    env = changed_env(domain, resolution)
    env.reset(seed)
    rgba = env.physics.named.model.geom_rgba
    alpha = {g: float(rgba[g, 3]) for g in hidden_geoms}  # KeyError names an unknown geom
    nv = env.state_dim - env.num_qpos
    out = []
    try:
        for g in hidden_geoms:
            rgba[g, 3] = 0.0
        for s in np.asarray(states, np.float64):
            env.set_state(s[:env.num_qpos], s[env.num_qpos:env.num_qpos + nv])
            out.append(env.render())
    finally:
        for g, a in alpha.items():
            rgba[g, 3] = a
    return np.stack(out) if out else np.zeros((0, env.resolution, env.resolution, 3), np.uint8)


def resimulate(domain: int | str, seed: int, state, actions, resolution: int = 64, *, mass_scale: float = 1.0,
               actuator_sign: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Replay `actions` [H, action_dim or A_MAX] (one frame each) from the physics `state` [>= state_dim] of the
    episode of `seed`, in the model changed by `mass_scale` and `actuator_sign` (see changed_env) -> the frames
    uint8 [H, R, R, 3] and states float32 [H, S_MAX] after each action."""
    env = changed_env(domain, resolution, mass_scale=mass_scale, actuator_sign=actuator_sign)
    env.reset(seed)
    s = np.asarray(state, np.float64).reshape(-1)
    env.set_state(s[:env.num_qpos], s[env.num_qpos:env.state_dim])
    frames, states = [], []
    for a in np.asarray(actions, np.float64).reshape(len(actions), -1):
        obs = env.step(a)
        frames.append(obs["frame"])
        states.append(obs["state"])
    if not frames:
        return np.zeros((0, env.resolution, env.resolution, 3), np.uint8), np.zeros((0, S_MAX), np.float32)
    return np.stack(frames), np.stack(states)


# ---------------------------------------------------------------- faults injected into a running episode

# Changes of the world or of an actuator that the guard's benchmark injects mid-episode (jepa/guard.py).
FAULTS = ("actuator_inverted", "actuator_dead", "actuator_weak", "mass", "camera", "obstacle")
ACTUATOR_FAULTS = ("actuator_inverted", "actuator_dead", "actuator_weak")
_FAULT_GEAR = {"actuator_inverted": -1.0, "actuator_dead": 0.0, "actuator_weak": 0.3}


OBSTACLE_HALF_SIZE = 0.03   # m: the "obstacle" fault's box, as wide as point_mass's point


def inject_fault(env: WorldEnv, kind: str, actuator: int = 0, at=None) -> Callable[[], None]:
    """Change the running `env`'s model in place from its next step on and return the function that restores it.
    kind: "actuator_inverted" / "actuator_dead" / "actuator_weak" (gear of `actuator` times -1 / 0 / 0.3), "mass"
    (every body 5x heavier, as changed_env's mass_scale=5), "camera" (the dataset camera moved 10% of its height
    sideways: the frames change, the dynamics do not) or "obstacle" (a new box the effector collides with, centred
    at `at` = (x, y), default 9 cm ahead of the effector along its motion). The physics state is untouched, so the
    episode goes on."""
    model = env.physics.model
    if kind == "obstacle":
        return _add_obstacle(env, at)
    if kind in _FAULT_GEAR:
        if not 0 <= actuator < env.action_dim:
            raise ValueError(f"actuator: {actuator} is not an actuator of {env.domain} (0..{env.action_dim - 1})")
        fields = {"actuator_gear": model.actuator_gear}
        before = {"actuator_gear": model.actuator_gear.copy()}
        model.actuator_gear[actuator, 0] *= _FAULT_GEAR[kind]
    elif kind == "mass":
        fields = {"body_mass": model.body_mass, "body_inertia": model.body_inertia}
        before = {k: v.copy() for k, v in fields.items()}
        model.body_mass[1:] *= 5.0      # body 0 is the world
        model.body_inertia[1:] *= 5.0
        _recompute_constants(env)
    elif kind == "camera":
        fields = {"cam_pos": model.cam_pos}
        before = {"cam_pos": model.cam_pos.copy()}
        model.cam_pos[env.camera_id, 0] += 0.1 * abs(float(model.cam_pos[env.camera_id, 2]))
    else:
        raise ValueError(f"fault kind: {kind!r} is not one of {', '.join(FAULTS)}")

    def restore() -> None:
        for name, array in fields.items():
            array[:] = before[name]
        _recompute_constants(env)
    return restore


def _recompute_constants(env: WorldEnv) -> None:
    """Refresh the model constants MuJoCo derives from masses at compile time. Why: a model whose mass matrix
    does not depend on the configuration (point_mass's two slide joints) keeps its compiled one, so a changed
    body_mass alone would not change the dynamics. A scratch MjData, as mj_setConst overwrites the one it gets."""
    import mujoco
    mujoco.mj_setConst(env.physics.model.ptr, mujoco.MjData(env.physics.model.ptr))


def _add_obstacle(env: WorldEnv, at) -> Callable[[], None]:
    """Swap the running env's physics for the same model compiled with one more world geom (MuJoCo cannot add a
    geom to a compiled model), carrying over the episode's model edits (target placement, geom sizes) and its
    state; the restore function swaps the original back with the state reached, so the episode goes on."""
    import mujoco
    from dm_control import suite
    old = env.physics
    if at is None:
        pos = env.effector_position()
        velocity = np.zeros(6)
        mujoco.mj_objectVelocity(old.model.ptr, old.data.ptr, mujoco.mjtObj.mjOBJ_GEOM,
                                 old.model.geom(env.effector).id, velocity, 0)
        heading = velocity[3:5] if np.linalg.norm(velocity[3:5]) > 1e-6 else np.array([1.0, 0.0])
        at = pos + 0.09 * heading / np.linalg.norm(heading)
    x, y = (float(v) for v in np.asarray(at, np.float64).reshape(2))
    xml, assets = getattr(suite, env.domain).get_model_and_assets()
    xml = xml.decode() if isinstance(xml, bytes) else xml
    h = OBSTACLE_HALF_SIZE
    geom = f'<geom name="fault_obstacle" type="box" pos="{x} {y} {h}" size="{h} {h} {h}" rgba="0.9 0.5 0.1 1"/>'
    if xml.count("</worldbody>") != 1:
        raise ValueError(f"fault kind: 'obstacle' cannot be placed in {env.domain}'s model")
    new = type(old).from_xml_string(xml.replace("</worldbody>", geom + "</worldbody>"), assets)
    for i in range(old.model.ngeom):   # geoms moved or resized by the task or the domain spec
        name = old.model.geom(i).name
        if name:
            j = new.model.geom(name).id
            for field in ("geom_pos", "geom_quat", "geom_size", "geom_rgba"):
                getattr(new.model, field)[j] = getattr(old.model, field)[i]
    # These domains simulate without contacts; turn them on for the obstacle alone: every other geom gets contype
    # bit 2 and no affinity, the obstacle affinity bit 2, so the only possible pairs are (moving geom, obstacle)
    # (the world's geoms share the obstacle's body, which MuJoCo never collides with itself).
    obstacle = new.model.geom("fault_obstacle").id
    new.model.geom_contype[:], new.model.geom_conaffinity[:] = 2, 0
    new.model.geom_contype[obstacle], new.model.geom_conaffinity[obstacle] = 0, 2
    new.model.opt.disableflags &= ~int(mujoco.mjtDisableBit.mjDSBL_CONTACT)
    _carry_state(old, new)
    scratch = getattr(env, "_scratch", None)   # simulate()'s copy of the physics it plans on

    def swap(physics, scratch_copy) -> None:
        env.physics = env.env._physics = physics
        env._scratch = scratch_copy

    swap(new, None)

    def restore() -> None:
        _carry_state(new, old)
        swap(old, scratch)
        new.free()
    return restore


def _carry_state(src, dst) -> None:
    """Copy the dynamic state (time, qpos, qvel, actuator state and controls) between two physics of models with
    the same joints and actuators, and recompute what derives from it."""
    import mujoco
    dst.data.time = src.data.time
    for field in ("qpos", "qvel", "act", "ctrl", "qacc_warmstart"):
        getattr(dst.data, field)[:] = getattr(src.data, field)
    mujoco.mj_forward(dst.model.ptr, dst.data.ptr)
