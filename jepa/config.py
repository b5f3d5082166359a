"""The one place that lists every config field, with the published V-JEPA 2 values as defaults.

Experiment files in configs/ start from `base_config()` and change what differs; the trainer locks the
result, so a misspelt `--config.field=value` override fails before any work starts, and `validate` rejects
inconsistent values (e.g. a resolution the patch size does not divide) with a message naming the field.
"""

from __future__ import annotations

import os

import ml_collections

ConfigDict = ml_collections.ConfigDict

DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "jepa", "data")


def world_source(preset: str = "default", split: str = "train", weight: float = 1.0, episodes: int = 0) -> ConfigDict:
    """The embedded MuJoCo world dataset: generated once into data_dir, then read as a TFDS ArrayRecord dataset.
    episodes > 0 replaces the preset's episode count (a dataset of its own, cached beside the preset)."""
    return ConfigDict(dict(kind="world", name="jepa_world", data_dir=DEFAULT_DATA_DIR, split=split, path="",
                           weight=weight, preset=preset, episodes=episodes))


def folder_source(name: str, data_dir: str = DEFAULT_DATA_DIR, split: str = "train",
                  weight: float = 1.0) -> ConfigDict:
    """A TFDS ArrayRecord dataset, e.g. one made by `python -m jepa.data.prepare video_folder`."""
    return ConfigDict(dict(kind="tfds", name=name, data_dir=data_dir, split=split, path="", weight=weight,
                           preset=""))


def manifest_source(path: str, weight: float = 1.0) -> ConfigDict:
    """A folder of videos or a CSV/JSON-lines manifest read directly, with no preparation step."""
    return ConfigDict(dict(kind="manifest", name="", data_dir="", split="train", path=path, weight=weight,
                           preset=""))


def mask_type(num_blocks: int, spatial_scale: float, mask_token: int) -> ConfigDict:
    """One multi-block mask type; `mask_token` picks the predictor's learned mask token (reference order:
    short-range 0, long-range 1), so released predictor weights line up whatever the names sort to."""
    return ConfigDict(dict(num_blocks=num_blocks, spatial_scale=spatial_scale, temporal_scale=1.0,
                           aspect_ratio=(0.75, 1.5), num_context=0, num_target=0, mask_token=mask_token))


# Periodic evaluations during training (config.evals.NAME, run by jepa/evaluators.py): the fields of every kind,
# then each kind's own.
_EVAL_COMMON = dict(every=1000, train_split="train", eval_split="validation", max_clips=256, batch_size=32,
                    layers=(-1,))
_EVAL_FIELDS = {
    "knn": dict(k=20, temperature=0.07, target="label"),
    "probe": dict(task="classification", target="label", probe="linear", epochs=20, depth=1,
                  lrs=(1e-3, 3e-3, 1e-2), wds=(0.001, 0.1)),
}
EVAL_KINDS = tuple(_EVAL_FIELDS)


def evaluation(kind: str, **fields) -> ConfigDict:
    """One entry of config.evals: every field of a `kind` evaluation ("knn" or "probe") with its default, the given
    `fields` replacing some, e.g. `c.evals = {"knn": evaluation("knn", every=500)}`."""
    if kind not in _EVAL_FIELDS:
        raise ValueError(f"evaluation kind {kind!r} is not one of {', '.join(EVAL_KINDS)}")
    entry = dict(_EVAL_COMMON, **_EVAL_FIELDS[kind], kind=kind)
    unknown = sorted(set(fields) - set(entry))
    if unknown:
        raise ValueError(f"evaluation {kind!r}: unknown field(s) {unknown}; known: {sorted(entry)}")
    return ConfigDict(dict(entry, **fields))


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.objective = "vjepa"              # "vjepa" (pretraining) | "ac" (world model: configs/world_model.py)

    # ---- data (jepa/data: sources.py, clips.py, pipeline.py) ----
    c.data = ConfigDict()
    c.data.sources = ConfigDict({"world": world_source()})
    c.data.num_frames = 16
    c.data.frame_step = 4
    c.data.target_fps = 0.0            # > 0: pick frame_step per video from its fps (4 fps in the paper)
    c.data.resolution = 256
    c.data.crop_scale = (0.3, 1.0)
    c.data.crop_aspect = (0.75, 1.35)
    c.data.hflip = True
    c.data.num_workers = 0             # Grain multiprocess prefetch workers (0 = in the main process)
    c.data.prefetch_buffer = 2
    c.data.decode_short_side = 0       # 0 = auto (a little above the crop resolution)
    c.data.eval_mode = "center"
    c.data.num_segments = 1
    c.data.max_decode_retries = 8
    # Per-dimension mean / std of the "vector" channel (model.channels) over the train split: () = computed when a
    # run starts and saved in its config.json, so export and probes normalise exactly as training did.
    c.data.vector_mean = ()
    c.data.vector_std = ()

    # ---- masks (jepa/masks.py): short-range and long-range multi-block masks ----
    c.mask = ConfigDict()
    c.mask.types = ConfigDict({"short": mask_type(8, 0.15, 0), "long": mask_type(2, 0.7, 1)})
    c.mask.length_quantile = 0.1       # static per-type token counts: this quantile of the drawn sizes
    c.mask.channel_dropout = 0.0       # several channels: probability, per clip, that a non-video channel is hidden
                                       # from the context encoder for the whole clip (its tokens become targets)

    # ---- model (jepa/models) ----
    c.model = ConfigDict()
    c.model.encoder = ConfigDict(dict(size="large", width=0, depth=0, heads=0, mlp_dim=0, patch_size=16,
                                      tubelet_size=2))
    c.model.predictor = ConfigDict(dict(width=384, depth=12, heads=12, mlp_dim=0, num_mask_tokens=10))  # 0: 4 x width
    c.model.rope_layout = "reference"  # or "interleaved"
    # Observation channels the encoder reads, video first (jepa/models/channels.py): "video" and "vector" (the per-
    # frame `states` series of the world data). The data pipeline yields what these need.
    c.model.channels = ("video",)
    c.model.dtype = "bfloat16"         # compute dtype; parameters stay float32
    c.model.remat = "none"             # "none" | "full" | "dots"
    c.model.attention = "einsum"       # "einsum" | "xla" | "cudnn" (fused kernel on NVIDIA GPUs, bf16/fp16)
    c.model.scan = True                # one lax.scan over the blocks (False: a Python loop, e.g. for profiles)
    c.model.residual_dtype = "float32"  # transformer residual stream: "float32" | "compute" (model.dtype; LayerNorm
                                        # statistics stay float32)
    # The world model's action-conditioned, block-causal predictor (objective "ac"; mlp_dim 0 = 4 x width).
    c.model.ac_predictor = ConfigDict(dict(width=128, depth=4, heads=4, mlp_dim=0))

    # ---- objective (jepa/objectives/vjepa.py) ----
    # context_weight > 0 adds the V-JEPA 2.1 context loss (predict the targets at visible tokens too, weighted by
    # 1/sqrt(distance to the masked region)), ramped in over context_warmup_steps.
    # variance_weight / covariance_weight > 0 add VICReg-style anti-collapse terms on the context tokens (batch
    # statistics: with optim.grad_accum_steps > 1 they are taken per micro-batch).
    c.loss = ConfigDict(dict(exponent=1.0, context_weight=0.0, context_warmup_steps=0, variance_weight=0.0,
                             covariance_weight=0.0))

    # ---- world model (objective "ac": jepa/objectives/ac.py; the recipe is configs/world_model.py) ----
    c.encoder_from = ""                # the pretraining run's workdir (architecture + EMA encoder weights)
    c.encoder_weights = "pretrained"   # or "random": same architecture, untrained (the planning baseline)
    c.world_model = ConfigDict(dict(
        rollout_steps=2,               # autoregressive steps of the rollout loss (the reference's 2)
        state_source="none",           # "none": vision only; "physics": feed the padded (qpos, qvel) state
        action_block=1,                # environment steps per latent step: their actions form one action token
                                       # (data.frame_step must equal it, so clips keep every action in order)
        context_frames=2,              # observed frames the rollout loss starts from (>= 2 show velocities)
        action_to_patches=False,       # also add each step's action embedding to every patch token of the step
        inverse_dynamics_weight=0.0,   # > 0: infer the action from (z_t, predicted z_t+1); weight of that L1 loss
        train_encoder=False,           # True: train the encoder with the predictor (PLDM-style, from encoder_from's
                                       # weights), kept from collapse by loss.variance_weight / covariance_weight
    ))

    # ---- planning and surprise with a world model (jepa/planning.py, jepa/plan.py, jepa/surprise.py) ----
    # The reference's CEM is horizon 2, 400 samples, top 10, 10 iterations on a GPU.
    c.plan = ConfigDict(dict(
        horizon=0,                     # planned blocks; 0: ceil(goal_steps / world_model.action_block)
        samples=256, elites=16, iterations=8, momentum=0.1, init_std=1.0, min_std=0.05,
        energy_steps="last",           # "last": the last planned block's prediction vs the goal; "all": every block
        energy_norm="l1",              # "l1": mean |prediction - goal| over patches and dims; "l2": mean squared
        optimizer="cem",               # "cem" (refit to the elites) or "mppi" (all samples, weights exp(-E / T))
        temperature=0.5,               # mppi: T in units of the iteration's energy std
        block_actions="hold",          # "hold": one action per block, held for its steps; "free": each step's own
        execute_steps=1,               # blocks (world_model.action_block actions each) executed per plan
        context_frames=0,              # latest frames the planner conditions on; 0: world_model.context_frames
        episode_steps=20,              # control steps per planning episode (a multiple of the action block)
        goal_steps=10,                 # the goal: where one random constant action takes the system in this many steps
        surprise_quantile=0.99,        # monitor threshold: this quantile of surprise on unaltered clips
        # The gate and consequence checks of `--guard` (jepa/guard.py), calibrated on nominal planning episodes.
        guard_coverage=0.95,           # fraction of nominal blocks the gate acts on
        guard_hold_limit=3,            # holds in a row (zero action for a block) that stop the episode
        guard_surprise_window=2,       # recent surprise: the largest over the latest this many blocks
        guard_fault_quantile=0.99,     # consequence margin: this quantile of nominal blocks' scores
        guard_fault_blocks=3,          # consequence check: executed blocks whose evidence is summed
        guard_calibration_episodes=10,  # nominal episodes the thresholds are calibrated on
        # Rules on the predicted outcome (jepa/constraints.py), ";"-separated, "" for none: keep_out(x=,y=,r=)
        # (effector outside a disc), joint_band(joint=,lo=,hi=) (a qpos outside a band), joint_limit(joint=,lo=,
        # hi=) (inside limits), action_rate(max=) (|a_t - a_t-1| per dimension); read from the world model's
        # latents by the readout of `python -m jepa.constraints fit`.
        constraints="",
        constraint_mode="reject",      # "reject" violating samples, "penalty" (+ weight x violation), "lagrangian"
        constraint_weight=100.0,       # penalty weight, or the augmented Lagrangian's rho, per unit of violation
    ))

    # ---- optimisation (jepa/optim.py): published V-JEPA 2 values ----
    c.optim = ConfigDict(dict(
        lr=5.25e-4, start_lr=1e-4, final_lr=0.0, warmup_steps=12000, schedule="warmup_constant",
        cooldown_steps=12000, weight_decay=0.04, final_weight_decay=0.04, b1=0.9, b2=0.999, eps=1e-8,
        grad_clip=0.0, ema_momentum=0.99925, final_ema_momentum=0.99925, grad_accum_steps=1))

    # ---- trainer (jepa/train.py) ----
    c.train = ConfigDict()
    c.train.global_batch_size = 3072
    c.train.total_steps = 240000
    c.train.stop_at = 0                # > 0: leave after this step (schedules still span total_steps)
    c.train.log_every = 10
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3       # >= 1; the newest is never rotated out before a newer one is saved
    c.train.checkpoint_fallback = True  # resume from the newest intact checkpoint when a newer one is damaged
    c.train.init_from = ""             # another run's workdir: start from its weights (cool-down, fine-tuning)
    c.train.collapse_warn_rank = 0.05  # warn when effective rank falls below this fraction of the width
    c.train.peak_flops = 0.0           # per device; 0 = nominal table on accelerators, measured on CPU
    c.train.profile_steps = (0, 0)     # (first step, number of steps) traced into workdir/tensorboard; (0, 0) off
    c.train.compilation_cache = os.path.join(os.path.expanduser("~"), ".cache", "jepa", "jax")

    # ---- periodic evaluations during training (jepa/evaluators.py): name -> dict(kind=knn|probe, every, ...)
    c.evals = ConfigDict({})

    # ---- mesh (jepa/sharding.py): -1 fills the remaining devices ----
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    # ---- multi-process runtime (jepa/sharding.py initialize_distributed) ----
    # mode "auto": start jax.distributed when coordinator_address is set or the environment is a multi-process
    # SLURM / Open MPI / TPU-pod job; "on": always (auto-detected arguments unless given); "off": never.
    c.distributed = ConfigDict(dict(mode="auto", coordinator_address="", num_processes=0, process_id=-1,
                                    local_device_ids="", timeout_s=300))
    return c


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the field (`config.data.resolution: ...`)."""


def validate(c: ConfigDict) -> None:
    """Fail before any work on values that cannot work together."""
    def need(ok: bool, field: str, why: str):
        if not ok:
            raise ConfigError(f"config.{field}: {why}")

    # The allowed values are the constants the code itself dispatches on (imported here: jax is loaded lazily).
    from jepa.constraints import parse as parse_constraints
    from jepa.data.sources import SOURCE_KINDS
    from jepa.models import ATTENTION_IMPLS, DTYPES, REMAT_POLICIES, RESIDUAL_DTYPES, ROPE_LAYOUTS
    from jepa.models import channels as channels_lib
    from jepa.objectives import OBJECTIVES
    from jepa.objectives.ac import ENCODER_WEIGHTS, STATE_SOURCES
    from jepa.planning import BLOCK_ACTIONS, CONSTRAINT_MODES, ENERGY_NORMS, ENERGY_STEPS, OPTIMIZERS
    from jepa.sharding import DISTRIBUTED_MODES

    def one_of(values) -> str:
        return ", ".join(values)

    d, e = c.data, c.model.encoder
    objective = c.objective
    need(objective in OBJECTIVES, "objective", f"{objective!r} is not one of {one_of(OBJECTIVES)}")
    need(objective == "ac" or d.num_frames % e.tubelet_size == 0, "data.num_frames",
         f"{d.num_frames} is not divisible by model.encoder.tubelet_size={e.tubelet_size}")
    if objective == "ac":
        need(c.world_model.state_source in STATE_SOURCES, "world_model.state_source",
             f"{c.world_model.state_source!r} is not one of {one_of(STATE_SOURCES)}")
        wm, p = c.world_model, c.plan
        need(wm.context_frames >= 1, "world_model.context_frames", f"must be >= 1, got {wm.context_frames}")
        need(1 <= wm.rollout_steps <= d.num_frames - wm.context_frames, "world_model.rollout_steps",
             f"{wm.rollout_steps} must lie in [1, data.num_frames - world_model.context_frames = "
             f"{d.num_frames - wm.context_frames}]")
        need(wm.action_block >= 1, "world_model.action_block", f"must be >= 1, got {wm.action_block}")
        need(wm.inverse_dynamics_weight >= 0, "world_model.inverse_dynamics_weight",
             f"must be >= 0, got {wm.inverse_dynamics_weight}")
        # Predictions and targets from one trained encoder: a constant representation is a perfect prediction.
        need(not wm.train_encoder or c.loss.variance_weight > 0 or c.loss.covariance_weight > 0,
             "world_model.train_encoder", "training the encoder with the predictor needs loss.variance_weight or "
             "loss.covariance_weight > 0 (both are 0): without them the encoder collapses to a constant")
        need(wm.train_encoder or (c.loss.variance_weight == 0 and c.loss.covariance_weight == 0),
             "loss.variance_weight", f"variance_weight={c.loss.variance_weight} and covariance_weight="
             f"{c.loss.covariance_weight} act on a trained encoder only: set both to 0 for a frozen one, or "
             "world_model.train_encoder=True")
        # A clip keeps the frame_step actions between two kept frames as one block: they must be the model's block.
        need(d.frame_step == wm.action_block, "data.frame_step",
             f"{d.frame_step} must equal world_model.action_block={wm.action_block} (each latent step's action "
             "token holds the actions of the environment steps between its frames)")
        need(d.target_fps == 0, "data.target_fps", f"must be 0 for a world model (got {d.target_fps}): the frame "
             "step is world_model.action_block")
        need(p.context_frames in (0, wm.context_frames), "plan.context_frames",
             f"{p.context_frames} must be 0 (derived) or equal world_model.context_frames={wm.context_frames}: "
             "the planner conditions on as many frames as the model was trained from")
        need(p.goal_steps >= 1, "plan.goal_steps", f"must be >= 1, got {p.goal_steps}")
        need(p.horizon == 0 or p.horizon * wm.action_block >= p.goal_steps, "plan.horizon",
             f"{p.horizon} blocks of world_model.action_block={wm.action_block} steps do not reach plan.goal_steps="
             f"{p.goal_steps} (0 derives the shortest horizon that does)")
        need(p.horizon >= 0, "plan.horizon", f"must be >= 0, got {p.horizon}")
        need(p.episode_steps >= 1 and p.episode_steps % wm.action_block == 0, "plan.episode_steps",
             f"{p.episode_steps} must be a positive multiple of world_model.action_block={wm.action_block}")
        need(p.execute_steps >= 1, "plan.execute_steps", f"must be >= 1, got {p.execute_steps}")
        need(p.energy_steps in ENERGY_STEPS, "plan.energy_steps",
             f"{p.energy_steps!r} is not one of {one_of(ENERGY_STEPS)}")
        need(p.optimizer in OPTIMIZERS, "plan.optimizer", f"{p.optimizer!r} is not one of {one_of(OPTIMIZERS)}")
        need(p.block_actions in BLOCK_ACTIONS, "plan.block_actions",
             f"{p.block_actions!r} is not one of {one_of(BLOCK_ACTIONS)}")
        need(p.temperature > 0, "plan.temperature", f"must be > 0, got {p.temperature}")
        need(p.energy_norm in ENERGY_NORMS, "plan.energy_norm",
             f"{p.energy_norm!r} is not one of {one_of(ENERGY_NORMS)}")
        for field, ok, why in [("guard_coverage", 0 < p.guard_coverage <= 1, "must lie in (0, 1]"),
                               ("guard_fault_quantile", 0 < p.guard_fault_quantile <= 1, "must lie in (0, 1]"),
                               ("guard_hold_limit", p.guard_hold_limit >= 1, "must be >= 1"),
                               ("guard_surprise_window", p.guard_surprise_window >= 1, "must be >= 1"),
                               ("guard_fault_blocks", p.guard_fault_blocks >= 1, "must be >= 1"),
                               ("guard_calibration_episodes", p.guard_calibration_episodes >= 1, "must be >= 1")]:
            need(ok, f"plan.{field}", f"{why}, got {p[field]}")
        need(p.constraint_mode in CONSTRAINT_MODES, "plan.constraint_mode",
             f"{p.constraint_mode!r} is not one of {one_of(CONSTRAINT_MODES)}")
        need(p.constraint_weight > 0, "plan.constraint_weight", f"must be > 0, got {p.constraint_weight}")
        try:
            parse_constraints(p.constraints)
        except ValueError as err:
            raise ConfigError(f"config.plan.constraints: {err}") from None
        need(c.encoder_weights in ENCODER_WEIGHTS, "encoder_weights",
             f"{c.encoder_weights!r} is not one of {one_of(ENCODER_WEIGHTS)}")
        need(c.encoder_weights == "random" or bool(c.encoder_from), "encoder_from",
             "the world model needs a pretraining run's workdir (or --config.encoder_weights=random)")
        need(not c.evals, "evals", "periodic evaluations (kNN, probes) embed clips with the V-JEPA clip "
             "encoder; world-model runs do not run them (probe the pretraining run instead)")
    need(d.resolution % e.patch_size == 0, "data.resolution",
         f"{d.resolution} is not divisible by model.encoder.patch_size={e.patch_size}")
    need(len(d.sources) > 0, "data.sources", "no data source configured")
    for name, s in d.sources.items():
        need(s.kind in SOURCE_KINDS, f"data.sources.{name}.kind", f"{s.kind!r} is not one of {one_of(SOURCE_KINDS)}")
        need(s.weight > 0, f"data.sources.{name}.weight", f"must be > 0, got {s.weight}")
        need(s.kind != "manifest" or bool(s.path), f"data.sources.{name}.path", "a manifest source needs a path")
    try:
        chans = channels_lib.check(c.model.channels)
    except ValueError as err:
        raise ConfigError(f"config.model.channels: {err}") from None
    for name, s in d.sources.items():
        for ch in chans:
            need(s.kind in channels_lib.CHANNELS[ch].source_kinds, "model.channels",
                 f"channel {ch!r} needs a source that carries it ({', '.join(channels_lib.CHANNELS[ch].source_kinds)}"
                 f" kinds); data.sources.{name} is a {s.kind!r} source without it")
    need(objective != "ac" or chans == ("video",), "model.channels",
         f"{list(chans)}: the world model (objective 'ac') reads video only; its encoder_from run must be a "
         "video-only encoder")
    need(len(chans) == 1 or not c.evals, "evals", "periodic evaluations embed video only; with several "
         "model.channels export the run and probe the export (python -m jepa.export, jepa.probe)")
    need(0.0 <= c.mask.channel_dropout < 1.0, "mask.channel_dropout",
         f"must lie in [0, 1), got {c.mask.channel_dropout}")
    if "vector" in chans:
        dim = channels_lib.CHANNELS["vector"].dim
        for field in ("vector_mean", "vector_std"):
            v = d[field]
            need(len(v) in (0, dim), f"data.{field}", f"must be () (computed at train start) or {dim} values, got "
                 f"{len(v)}")
        need(len(d.vector_mean) == len(d.vector_std), "data.vector_std",
             f"{len(d.vector_std)} values, data.vector_mean has {len(d.vector_mean)}")
        need(all(float(x) > 0 for x in d.vector_std), "data.vector_std", "every std must be > 0")
    need(len(c.mask.types) > 0, "mask.types", "at least one mask type is needed")
    for name, t in c.mask.types.items():
        need(0 <= t.mask_token < c.model.predictor.num_mask_tokens, f"mask.types.{name}.mask_token",
             f"{t.mask_token} is not below model.predictor.num_mask_tokens={c.model.predictor.num_mask_tokens}")
    need(c.model.dtype in DTYPES, "model.dtype",
         f"{c.model.dtype!r} is not one of {one_of(DTYPES)} (float16 would need loss scaling, which is not built)")
    need(c.model.remat in REMAT_POLICIES, "model.remat",
         f"unknown policy {c.model.remat!r} (one of {one_of(REMAT_POLICIES)})")
    need(c.model.residual_dtype in RESIDUAL_DTYPES, "model.residual_dtype",
         f"{c.model.residual_dtype!r} is not one of {one_of(RESIDUAL_DTYPES)}")
    need(c.model.attention in ATTENTION_IMPLS, "model.attention",
         f"unknown implementation {c.model.attention!r} (one of {one_of(ATTENTION_IMPLS)})")
    need(c.model.attention != "cudnn" or c.model.dtype == "bfloat16",
         "model.attention", f"'cudnn' needs model.dtype bfloat16, got {c.model.dtype!r}")
    need(c.model.rope_layout in ROPE_LAYOUTS, "model.rope_layout",
         f"unknown layout {c.model.rope_layout!r} (one of {one_of(ROPE_LAYOUTS)})")
    need(c.loss.exponent > 0, "loss.exponent", "must be > 0")
    need(c.loss.context_weight >= 0, "loss.context_weight", "must be >= 0")
    need(c.loss.context_warmup_steps >= 0, "loss.context_warmup_steps", "must be >= 0")
    need(c.loss.variance_weight >= 0, "loss.variance_weight", "must be >= 0")
    need(c.loss.covariance_weight >= 0, "loss.covariance_weight", "must be >= 0")
    need(c.train.global_batch_size > 0, "train.global_batch_size", "must be > 0")
    need(c.optim.grad_accum_steps >= 1, "optim.grad_accum_steps", f"must be >= 1, got {c.optim.grad_accum_steps}")
    need(c.train.global_batch_size % c.optim.grad_accum_steps == 0, "optim.grad_accum_steps",
         f"{c.optim.grad_accum_steps} does not divide train.global_batch_size={c.train.global_batch_size}")
    need(c.train.total_steps > 0, "train.total_steps", "must be > 0")
    need(c.train.stop_at >= 0, "train.stop_at", f"must be >= 0 (0 = run to train.total_steps), got {c.train.stop_at}")
    need(c.train.log_every >= 1, "train.log_every", f"must be >= 1, got {c.train.log_every}")
    need(c.train.checkpoint_every >= 1, "train.checkpoint_every", f"must be >= 1, got {c.train.checkpoint_every}")
    need(c.train.keep_checkpoints >= 1, "train.keep_checkpoints",
         f"must be >= 1 (with 0 every checkpoint would be deleted as soon as it is saved), got "
         f"{c.train.keep_checkpoints}")
    need(len(c.train.profile_steps) == 2 and min(c.train.profile_steps) >= 0, "train.profile_steps",
         f"must be (first step, number of steps) with both >= 0, got {c.train.profile_steps}")
    for field in ("lr", "start_lr", "final_lr", "weight_decay", "final_weight_decay", "grad_clip"):
        need(c.optim[field] >= 0, f"optim.{field}", f"must be >= 0, got {c.optim[field]}")
    need(c.optim.warmup_steps >= 0 and c.optim.cooldown_steps >= 0, "optim.warmup_steps",
         f"warmup_steps and cooldown_steps must be >= 0, got {c.optim.warmup_steps}, {c.optim.cooldown_steps}")
    need(c.distributed.mode in DISTRIBUTED_MODES, "distributed.mode",
         f"{c.distributed.mode!r} is not one of {one_of(DISTRIBUTED_MODES)}")
    need(not c.distributed.coordinator_address or
         (c.distributed.num_processes >= 1 and 0 <= c.distributed.process_id < c.distributed.num_processes),
         "distributed.coordinator_address",
         f"needs num_processes >= 1 and 0 <= process_id < num_processes, got num_processes="
         f"{c.distributed.num_processes} process_id={c.distributed.process_id}")
    need(0.0 <= c.optim.ema_momentum <= 1.0 and 0.0 <= c.optim.final_ema_momentum <= 1.0,
         "optim.ema_momentum", "must lie in [0, 1]")


def vjepa2_recipe(size: str, arg: str = ""):
    """Shared body of the published V-JEPA 2 recipes (ViT-L/H/g at 16 frames x 256 px, global batch 3072).

    Variants by argument: "" (main phase: 12k warmup + constant lr), "cooldown" (64 frames, linear decay over 12k
    steps, initialised from the main run given by --config.train.init_from), "384" (ViT-g at 384 px).
    Data mixture fields point at TFDS datasets prepared with `python -m jepa.data.prepare video_folder`; the
    published weights are Kinetics-710 0.335, SSv2 0.10, HowTo100M 0.565.
    """
    c = base_config()
    c.data.sources = {
        "k710": folder_source("jepa_video_folder/k710", weight=0.335),
        "ssv2": folder_source("jepa_video_folder/ssv2", weight=0.10),
        "howto100m": folder_source("jepa_video_folder/howto100m", weight=0.565),
    }
    c.data.num_frames = 16
    c.data.target_fps = 4.0
    c.data.resolution = 256
    c.data.num_workers = 16
    c.model.encoder.size = size
    c.model.remat = "full"
    c.train.global_batch_size = 3072
    c.train.total_steps = 240000  # 12k warmup + 228k constant
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    variants = set(a for a in arg.split(",") if a)
    unknown = variants - {"cooldown", "384"}
    if unknown:
        raise ValueError(f"unknown variant(s) {sorted(unknown)}; expected 'cooldown' and/or '384'")
    if "384" in variants:
        c.data.resolution = 384
    if "cooldown" in variants:
        c.data.num_frames = 64
        c.optim.schedule = "cooldown"
        c.optim.warmup_steps = 0
        c.train.total_steps = 12000
        c.train.init_from = ""  # set to the main run's workdir on the command line
    return c
