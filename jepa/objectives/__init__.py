"""Training objectives, picked by name (`config.objective`).

An objective owns its models' graph definitions and provides, with static shapes throughout:
    init(rng, config) -> (trainable params, target-encoder params)   # the train state's "params" and "ema"
    loss(params, target, batch, step) -> (loss, aux metrics)
    update_target(target, params, momentum) -> target               # EMA for V-JEPA, frozen for V-JEPA 2-AC
    data_keys() -> the batch fields the step consumes; needs_masks: whether batches carry mask indices;
    has_ema: whether the target encoder is an EMA of the trained one (logged momentum)
    step_flops(config) -> analytic FLOPs of one train step
"""

from __future__ import annotations

from jepa import masks
from jepa.objectives.ac import ActionConditioned
from jepa.objectives.vjepa import VJEPA

OBJECTIVES = ("vjepa", "ac")


def build(config, grid=None):
    """The objective config.objective names; grid: the clip token grid."""
    name = config.objective
    if name == "vjepa":
        return VJEPA.from_config(config, masks.clip_token_grid(config) if grid is None else grid)
    if name == "ac":
        return ActionConditioned.from_config(config)
    raise ValueError(f"config.objective: {name!r} is not one of {OBJECTIVES}")
