"""V-JEPA 2 models in Flax NNX behind a pure functional boundary.

    enc = build_encoder(config.model, nnx.Rngs(0))
    graphdef, params = nnx.split(enc, nnx.Param)   # the models hold nothing but nnx.Param state
    out = nnx.merge(graphdef, params)(video, token_idx)

Block parameters are stacked along a leading depth axis (one `lax.scan` over blocks), so e.g. the blocks'
biases and LayerNorm scales are 2-D [depth, width]: `jepa.optim.decay_mask` selects them by name, not by ndim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jepa.models import channels
from jepa.models.ac_predictor import ACPredictor
from jepa.models.layers import ATTENTION_IMPLS, REMAT_POLICIES, RESIDUAL_DTYPES, Blocks
from jepa.models.predictor import Predictor
from jepa.models.rope import LAYOUTS as ROPE_LAYOUTS
from jepa.models.vit import ENCODER_SIZES, VisionTransformer, token_grid

__all__ = ["ATTENTION_IMPLS", "DTYPES", "ENCODER_SIZES", "ROPE_LAYOUTS", "REMAT_POLICIES", "RESIDUAL_DTYPES",
           "ACPredictor", "Blocks", "Predictor", "VisionTransformer", "build_ac_predictor", "build_encoder",
           "build_predictor", "channels", "compute_dtype", "model_channels", "residual_dtype", "resolved_dims",
           "token_grid"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(model_cfg):
    name = str(model_cfg.dtype)
    if name not in DTYPES:
        raise ValueError(f"config.model.dtype must be one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]


def residual_dtype(model_cfg):
    """The transformer blocks' residual-stream dtype: float32, or the compute dtype ("compute")."""
    name = str(model_cfg.residual_dtype)
    if name not in RESIDUAL_DTYPES:
        raise ValueError(f"config.model.residual_dtype must be one of {RESIDUAL_DTYPES}, got {name!r}")
    return jnp.float32 if name == "float32" else compute_dtype(model_cfg)


def model_channels(model_cfg) -> tuple[str, ...]:
    """config.model.channels as a checked tuple (("video",) for configs saved before the field existed)."""
    return channels.check(model_cfg.get("channels", ("video",)))


def resolved_dims(model_cfg) -> dict[str, dict[str, int]]:
    """Encoder and predictor sizes after applying ENCODER_SIZES defaults and explicit (> 0) overrides.

    -> {"encoder": {width, depth, heads, mlp_dim, patch_size, tubelet_size},
        "predictor": {width, depth, heads, mlp_dim, num_mask_tokens}}"""
    enc = model_cfg.encoder
    size = str(enc.size)
    if size not in ENCODER_SIZES:
        raise ValueError(f"config.model.encoder.size must be one of {tuple(ENCODER_SIZES)}, got {size!r}")
    dims = dict(ENCODER_SIZES[size])
    for key in ("width", "depth", "heads", "mlp_dim"):
        value = int(enc[key])
        if value < 0:
            raise ValueError(f"config.model.encoder.{key} must be >= 0 (0 = the size's default), got {value}")
        if value > 0:
            dims[key] = value
    dims["patch_size"] = int(enc.patch_size)
    dims["tubelet_size"] = int(enc.tubelet_size)
    pred = model_cfg.predictor
    pdims = {key: int(pred[key]) for key in ("width", "depth", "heads", "num_mask_tokens")}
    for key, value in pdims.items():
        if value <= 0:
            raise ValueError(f"config.model.predictor.{key} must be positive, got {value}")
    pdims["mlp_dim"] = int(pred.mlp_dim) or 4 * pdims["width"]
    return {"encoder": dims, "predictor": pdims}


def _common(model_cfg) -> dict[str, Any]:
    return dict(rope_layout=str(model_cfg.rope_layout), dtype=compute_dtype(model_cfg),
                remat=str(model_cfg.remat), scan=bool(model_cfg.scan), attention_impl=str(model_cfg.attention),
                residual_dtype=residual_dtype(model_cfg))


def build_encoder(model_cfg, rngs: nnx.Rngs) -> VisionTransformer:
    """The context / target encoder described by config.model."""
    d = resolved_dims(model_cfg)["encoder"]
    return VisionTransformer(**d, **_common(model_cfg), channels=model_channels(model_cfg), rngs=rngs)


def build_predictor(model_cfg, grid: Sequence[int], rngs: nnx.Rngs) -> Predictor:
    """The predictor for clips with token grid (T', H', W') (see `token_grid`)."""
    dims = resolved_dims(model_cfg)
    p = dims["predictor"]
    return Predictor(encoder_width=dims["encoder"]["width"], width=p["width"], depth=p["depth"], heads=p["heads"],
                     mlp_dim=p["mlp_dim"], num_mask_tokens=p["num_mask_tokens"], grid=tuple(grid),
                     **_common(model_cfg), channels=model_channels(model_cfg), rngs=rngs)


def build_ac_predictor(model_cfg, grid_hw: Sequence[int], action_dim: int, state_dim: int,
                       rngs: nnx.Rngs) -> ACPredictor:
    """The action-conditioned predictor described by config.model.ac_predictor, for frames with an (H', W')
    patch grid."""
    p = model_cfg.ac_predictor
    for key in ("width", "depth", "heads"):
        if int(p[key]) <= 0:
            raise ValueError(f"config.model.ac_predictor.{key} must be positive, got {p[key]}")
    return ACPredictor(encoder_width=resolved_dims(model_cfg)["encoder"]["width"], grid_hw=tuple(grid_hw),
                       action_dim=action_dim, state_dim=state_dim, width=int(p.width), depth=int(p.depth),
                       heads=int(p.heads), mlp_dim=int(p.mlp_dim) or None, **_common(model_cfg),
                       rngs=rngs)
