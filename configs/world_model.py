"""V-JEPA 2-AC world model: an action-conditioned predictor on a frozen pretrained encoder, for planning.

    python -m jepa.train --config=configs/quickstart.py --workdir=runs/quickstart          # pretrain (once)
    python -m jepa.train --config=configs/world_model.py --workdir=runs/wm --config.encoder_from=runs/quickstart
    python -m jepa.plan --workdir=runs/wm --domain=reacher --episodes=10                     # plan with it
    python -m jepa.train --config=configs/world_model.py:tiny --workdir=/tmp/wm   # seconds, random encoder; tests

The encoder's architecture and EMA weights come from the pretraining run (`encoder_from`); with
`--config.encoder_weights=random` the same architecture starts from random weights (the planning baseline).
Data: the world dataset's "control" preset (reacher and point_mass episodes with their actions), clips of
frames `world_model.action_block` steps apart, each carrying the actions between it and the next frame, with no
crop or flip (either would break the action semantics). One latent step covers a block of 5 environment steps,
so the planner's 2 blocks cover the goal's 10 steps; the rollout loss and the planner start from 2 observed
frames (velocities are visible).
"""

from jepa import config as cfg


def get_config(arg: str = ""):
    # encoder_from, encoder_weights, world_model.*, model.ac_predictor and plan.* keep jepa/config.py's defaults.
    c = cfg.base_config()
    c.objective = "ac"

    c.data.sources = {"control": cfg.world_source("control")}
    c.data.num_frames = 4
    c.world_model.update(action_block=5, context_frames=2, rollout_steps=2)
    c.data.frame_step = c.world_model.action_block  # validate() holds them equal
    c.data.resolution = 64
    c.data.crop_scale = (1.0, 1.0)
    c.data.crop_aspect = (1.0, 1.0)
    c.data.hflip = False

    # Same as configs/quickstart.py; replaced by encoder_from's architecture when that is set.
    c.model.encoder.update(size="tiny", width=0, depth=6, heads=0, mlp_dim=0, patch_size=8, tubelet_size=2)
    c.model.dtype = "float32"

    c.optim.lr = 1e-3
    c.optim.start_lr = 1e-4
    c.optim.warmup_steps = 30
    c.optim.schedule = "warmup_constant_cooldown"
    c.optim.cooldown_steps = 100
    c.optim.weight_decay = c.optim.final_weight_decay = 0.04

    c.train.global_batch_size = 32
    c.train.total_steps = 400
    c.train.log_every = 10
    c.train.checkpoint_every = 100

    if arg == "tiny":  # runlocal-style: random tiny encoder, a few seconds
        c.encoder_weights = "random"
        c.data.sources = {"world": cfg.world_source("tiny")}
        c.data.num_workers = 0
        c.model.encoder.update(size="tiny", width=64, depth=2, heads=2, mlp_dim=128, patch_size=8, tubelet_size=2)
        c.model.ac_predictor.update(width=64, depth=1, heads=2, mlp_dim=0)
        c.optim.warmup_steps = 2
        c.optim.cooldown_steps = 2
        c.train.global_batch_size = 4
        c.train.total_steps = 6
        c.train.log_every = 1
        c.train.checkpoint_every = 3
        c.world_model.action_block = c.data.frame_step = 1
        c.plan.update(samples=16, elites=4, iterations=2, episode_steps=3, goal_steps=3)
    elif arg:
        raise ValueError(f"configs/world_model.py: unknown variant {arg!r} (expected '' or 'tiny')")
    return c
