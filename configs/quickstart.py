"""Quick start: a small video ViT pretrained with V-JEPA 2 on the embedded MuJoCo world dataset, on a CPU.

    python -m jepa.train --config=configs/quickstart.py --workdir=runs/quickstart
    python -m jepa.train --config=configs/quickstart.py:tiny --workdir=/tmp/t   # seconds; what the tests run
    python -m jepa.train --config=configs/quickstart.py:channels --workdir=runs/channels   # video + proprioception
    python -m jepa.train --config=configs/quickstart.py:tiny,channels --workdir=/tmp/c

Variants (comma-separated): "tiny" (a few seconds), "channels" (observation channels video and vector: the world
data's per-frame states, qpos and qvel, as a second channel; jepa/models/channels.py).

Generation of the world dataset (once, cached) plus pretraining fit in about 15 minutes on 2 CPU cores.
"""

from jepa import config as cfg


def get_config(arg: str = ""):
    c = cfg.base_config()
    c.data.sources = {"world": cfg.world_source("default")}
    c.data.num_frames = 8
    c.data.frame_step = 2
    c.data.resolution = 64
    c.data.num_workers = 1

    c.model.encoder.update(size="tiny", width=0, depth=6, heads=0, mlp_dim=0, patch_size=8, tubelet_size=2)
    c.model.predictor.update(width=96, depth=4, heads=3, num_mask_tokens=10)
    c.model.dtype = "float32"  # CPU: bfloat16 is slower than float32 here

    # VICReg-style variance / covariance terms on the context tokens: with the V-JEPA 2 loss alone the target
    # features collapse to a low rank within these 500 steps (effective rank 45 -> 18 of 192) and lose image
    # velocity; with them the rank grows (45 -> 101) and the probe benchmark reads velocity (README, ablations).
    c.loss.variance_weight = 1.0
    c.loss.covariance_weight = 0.04

    c.optim.lr = 1e-3
    c.optim.start_lr = 1e-4
    c.optim.warmup_steps = 40
    c.optim.schedule = "warmup_constant_cooldown"
    c.optim.cooldown_steps = 100
    c.optim.ema_momentum = 0.996
    c.optim.final_ema_momentum = 0.999

    c.train.global_batch_size = 32
    c.train.total_steps = 500
    c.train.log_every = 10
    c.train.checkpoint_every = 100

    variants = set(a for a in arg.split(",") if a)
    unknown = variants - {"tiny", "channels"}
    if unknown:
        raise ValueError(f"configs/quickstart.py: unknown variant(s) {sorted(unknown)} (expected 'tiny' and/or "
                         "'channels')")
    if "channels" in variants:
        c.model.channels = ("video", "vector")
        c.mask.channel_dropout = 0.25  # a quarter of the clips predict the whole series from video alone
    if "tiny" in variants:  # runlocal-style: a few seconds, for tests and debugging
        c.data.sources = {"world": cfg.world_source("tiny")}
        c.data.num_workers = 0
        c.model.encoder.update(size="tiny", width=64, depth=2, heads=2, mlp_dim=128, patch_size=8, tubelet_size=2)
        c.model.predictor.update(width=32, depth=1, heads=2, num_mask_tokens=10)
        c.optim.warmup_steps = 2
        c.optim.cooldown_steps = 2
        c.train.global_batch_size = 4
        c.train.total_steps = 6
        c.train.log_every = 1
        c.train.checkpoint_every = 3
    return c
