"""The V-JEPA 2 objective: predict the EMA target encoder's representations of masked tokens.

Per mask type, the context encoder sees only the context tokens, the predictor fills in one mask token per
target position, and the loss is mean |prediction - target|^p / p against the layer-normalised (no affine)
outputs of the EMA encoder on the full clip, gathered at the target positions; losses are averaged over
mask types. Token counts per mask type are fixed (jepa/masks.py), so everything here has static shapes.

Optional context loss (V-JEPA 2.1, `config.loss.context_weight` > 0): the predictor also reproduces the targets
at the CONTEXT positions, each token weighted by lambda / sqrt(distance to the nearest masked token), lambda
ramped in linearly over `config.loss.context_warmup_steps`. With the masked-only loss nothing asks the
context tokens to stay local, and detail that is hard to predict from a small context (a small moving object)
is cheapest to drop from the representation altogether.

Optional VICReg-style terms (`config.loss.variance_weight`, `covariance_weight`; on in the quick start): on the
layer-normalised context-encoder tokens of the (micro-)batch, a hinge pushing every dimension's std up to 1 and a
penalty on off-diagonal covariance. They stop the dimensional collapse that short, small-scale runs show (target
effective rank 45 -> 18 in 500 quick-start steps) and keep motion in the features (README, ablations).

With several observation channels (`config.model.channels`, jepa/models/channels.py) token indices run over the
joint sequence of all channels' tokens, the EMA encoder sees every channel a clip has (`present` masks the others
out of its attention) and the context encoder only the context tokens; the loss is unchanged.

Parameters travel as plain nested dicts; the Flax NNX modules are rebuilt from their graph definitions
inside the jitted functions (`nnx.merge`), which is free at run time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jepa import masks, models
from jepa.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from jepa.metrics import effective_rank, vjepa_step_flops
from jepa.models import channels as channels_lib
from jepa.models.rope import grid_positions
from jepa.optim import ema_update

Params = Any


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, in float32 (the targets of the reference)."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def normalize_video(video: jax.Array) -> jax.Array:
    """uint8 clips from the pipeline -> float32 with ImageNet mean/std, on the device."""
    if video.dtype != jnp.uint8:
        raise ValueError(f"batch['video'] must be uint8 [B, T, H, W, 3] as the pipeline yields, got {video.dtype}")
    mean = jnp.asarray(IMAGENET_MEAN) * 255.0
    std = jnp.asarray(IMAGENET_STD) * 255.0
    return (video.astype(jnp.float32) - mean) / std


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, L, D], idx [B, N] -> [B, N, D]."""
    return jnp.take_along_axis(x, idx[..., None], axis=1)


@dataclasses.dataclass(frozen=True)
class VJEPA:
    """Graph definitions of the encoder and predictor plus the objective's settings (all static)."""

    encoder_def: Any
    predictor_def: Any
    grid: tuple[int, int, int]     # (T', H', W') token grid of a clip
    mask_names: tuple[str, ...]
    mask_tokens: tuple[int, ...]   # the predictor mask token of each mask type
    loss_exponent: float = 1.0
    context_weight: float = 0.0      # lambda of the context loss (0 = V-JEPA 2: masked tokens only)
    context_warmup_steps: int = 0    # lambda ramps linearly from 0 over these steps
    variance_weight: float = 0.0     # VICReg-style anti-collapse terms on the context encoder's tokens
    covariance_weight: float = 0.0
    diagnostics_every: int = 1       # collapse diagnostics only on the steps the trainer logs (see gated_...)
    channels: tuple[str, ...] = ("video",)  # observation channels (jepa/models/channels.py), video first
    vector_mean: tuple[float, ...] = ()     # the vector channel's normalisation statistics (config.data)
    vector_std: tuple[float, ...] = ()

    has_ema = True  # the target encoder follows the online one
    needs_masks = True

    @classmethod
    def from_config(cls, config, grid: Sequence[int]) -> VJEPA:
        enc = nnx.eval_shape(lambda: models.build_encoder(config.model, nnx.Rngs(0)))
        pred = nnx.eval_shape(lambda: models.build_predictor(config.model, tuple(grid), nnx.Rngs(0)))
        return cls(encoder_def=nnx.graphdef(enc), predictor_def=nnx.graphdef(pred), grid=tuple(grid),
                   mask_names=tuple(config.mask.types.keys()),
                   mask_tokens=tuple(int(t.mask_token) for t in config.mask.types.values()),
                   loss_exponent=float(config.loss.exponent),
                   context_weight=float(config.loss.context_weight),
                   context_warmup_steps=int(config.loss.context_warmup_steps),
                   variance_weight=float(config.loss.variance_weight),
                   covariance_weight=float(config.loss.covariance_weight),
                   diagnostics_every=int(config.train.log_every),
                   channels=models.model_channels(config.model),
                   vector_mean=tuple(float(x) for x in config.data.get("vector_mean", ())),
                   vector_std=tuple(float(x) for x in config.data.get("vector_std", ())))

    # ---- parameters: (trainable, EMA target encoder) ----
    def init(self, rng: jax.Array, config) -> tuple[dict[str, Params], Params]:
        k_enc, k_pred = jax.random.split(rng)
        enc = models.build_encoder(config.model, nnx.Rngs(k_enc))
        pred = models.build_predictor(config.model, self.grid, nnx.Rngs(k_pred))
        params = {"encoder": nnx.to_pure_dict(nnx.state(enc, nnx.Param)),
                  "predictor": nnx.to_pure_dict(nnx.state(pred, nnx.Param))}
        return params, params["encoder"]

    def update_target(self, target: Params, params: dict[str, Params], momentum) -> Params:
        return ema_update(target, params["encoder"], momentum)

    @property
    def multi_channel(self) -> bool:
        return len(self.channels) > 1

    def data_keys(self) -> list[str]:
        extra = ([channels_lib.CHANNELS[c].batch_key for c in self.channels[1:]] + ["present"]
                 if self.multi_channel else [])
        return ["video", *extra] + [f"{name}/{part}" for name in self.mask_names
                                    for part in ("context_idx", "target_idx")]

    def channel_inputs(self, batch) -> dict[str, jax.Array]:
        """The non-video channels' normalised values from a batch (name -> array)."""
        out = {}
        for name in self.channels[1:]:
            values = batch[channels_lib.CHANNELS[name].batch_key]
            if name == "vector":
                if not self.vector_mean:
                    raise ValueError("the vector channel needs config.data.vector_mean / vector_std (computed by "
                                     "jepa.models.channels.ensure_statistics when a run starts)")
                values = channels_lib.normalize_vector(values, self.vector_mean, self.vector_std)
            out[name] = values
        return out

    @staticmethod
    def step_flops(config) -> float:
        """Analytic model FLOPs of one train step over the global batch (see jepa/metrics.py)."""
        dims = models.resolved_dims(config.model)
        encoder = dict(dims["encoder"], patch_size=config.model.encoder.patch_size,
                       tubelet_size=config.model.encoder.tubelet_size)
        tokens = channels_lib.num_tokens(models.model_channels(config.model), masks.clip_token_grid(config))
        return vjepa_step_flops(tokens, masks.mask_lengths(config), encoder,
                                dims["predictor"], config.train.global_batch_size)

    # ---- forward passes ----
    def encode(self, encoder_params: Params, video: jax.Array, token_idx: jax.Array | None = None,
               inputs=None, available=None) -> jax.Array:
        encoder = nnx.merge(self.encoder_def, nnx.State(encoder_params))
        if not self.multi_channel:
            return encoder(video, token_idx)
        return encoder(video, token_idx, inputs=inputs, available=available)

    def predict(self, predictor_params: Params, context: jax.Array, context_idx: jax.Array,
                target_idx: jax.Array, mask_index: int, with_context: bool = False) -> jax.Array:
        predictor = nnx.merge(self.predictor_def, nnx.State(predictor_params))
        return predictor(context, context_idx, target_idx, mask_index, with_context)

    def targets(self, ema_params: Params, video: jax.Array, inputs=None, available=None) -> jax.Array:
        return jax.lax.stop_gradient(layer_norm(self.encode(ema_params, video, None, inputs, available)))

    # ---- the loss ----
    def distance(self, pred: jax.Array, target: jax.Array) -> jax.Array:
        """Per-token |pred - target|^p / p averaged over features: [B, N, D] -> [B, N]."""
        return jnp.mean(jnp.abs(pred - target) ** self.loss_exponent, axis=-1) / self.loss_exponent

    def context_lambda(self, step) -> jax.Array:
        ramp = 1.0 if self.context_warmup_steps <= 0 else jnp.minimum(
            1.0, jnp.asarray(step, jnp.float32) / self.context_warmup_steps)
        return self.context_weight * ramp

    def loss(self, params: dict[str, Params], ema_params: Params, batch: dict[str, jax.Array], step=0):
        """Returns (loss, aux) with the loss per mask type and collapse diagnostics of the targets; `step`
        drives the context-loss warm-up."""
        video = normalize_video(batch["video"])
        inputs = available = None
        if self.multi_channel:
            # The EMA encoder sees every channel a clip has (a dropped channel included: its tokens are targets);
            # a channel the clip lacks is masked out of its attention, and the masks never pick its tokens.
            inputs = self.channel_inputs(batch)
            available = channels_lib.available_tokens(batch["present"], self.channels, self.grid)
        targets = self.targets(ema_params, video, inputs, available)
        with_context = self.context_weight > 0
        aux, total = {}, 0.0
        for name, mask_token in zip(self.mask_names, self.mask_tokens, strict=True):
            ctx_idx, tgt_idx = batch[f"{name}/context_idx"], batch[f"{name}/target_idx"]
            context = self.encode(params["encoder"], video, ctx_idx, inputs)
            pred = self.predict(params["predictor"], context, ctx_idx, tgt_idx, mask_token, with_context)
            nc = ctx_idx.shape[1]
            pred_tgt = pred[:, nc:] if with_context else pred
            loss = jnp.mean(self.distance(pred_tgt, gather_tokens(targets, tgt_idx)))
            aux[f"loss/{name}"] = loss
            if with_context:
                err = self.distance(pred[:, :nc], gather_tokens(targets, ctx_idx))
                ctx_loss = jnp.mean(err * context_token_weights(ctx_idx, self.grid, self.channels))
                aux[f"loss/{name}_context"] = ctx_loss
                loss = loss + self.context_lambda(step) * ctx_loss
            if self.variance_weight > 0 or self.covariance_weight > 0:
                var, cov = variance_covariance(context)
                aux[f"reg/{name}_variance"], aux[f"reg/{name}_covariance"] = var, cov
                loss = loss + self.variance_weight * var + self.covariance_weight * cov
            total = total + loss
        total = total / len(self.mask_names)
        aux.update(gated_representation_stats(targets, step, self.diagnostics_every))
        return total, aux


def variance_covariance(tokens: jax.Array, eps: float = 1e-4) -> tuple[jax.Array, jax.Array]:
    """VICReg's anti-collapse terms on layer-normalised tokens [B, N, D] pooled over batch and positions:
    mean hinge relu(1 - std) per dimension, and the squared off-diagonal covariance summed, over D."""
    x = layer_norm(tokens).reshape(-1, tokens.shape[-1])
    x = x - jnp.mean(x, axis=0)
    std = jnp.sqrt(jnp.mean(jnp.square(x), axis=0) + eps)
    cov = (x.T @ x) / max(x.shape[0] - 1, 1)
    off = cov - jnp.diag(jnp.diag(cov))
    return jnp.mean(jax.nn.relu(1.0 - std)), jnp.sum(jnp.square(off)) / x.shape[-1]


def context_token_weights(context_idx: jax.Array, grid: Sequence[int], channels: Sequence[str] = ("video",)
                          ) -> jax.Array:
    """[B, Nc] -> 1 / sqrt(distance from each context token to the nearest non-context token), distances in
    token-grid units over (t, h, w) (RoPE positions of the joint sequence with several channels): context tokens
    next to the masked region carry most of the context loss."""
    pos = grid_positions(grid) if len(channels) == 1 else channels_lib.positions(channels, grid)
    coords = jnp.asarray(pos, jnp.float32)                                       # [L, 3]
    b = context_idx.shape[0]
    in_context = jnp.zeros((b, coords.shape[0]), bool).at[jnp.arange(b)[:, None], context_idx].set(True)
    d2 = jnp.sum(jnp.square(coords[context_idx][:, :, None, :] - coords[None, None]), axis=-1)  # [B, Nc, L]
    nearest = jnp.min(jnp.where(in_context[:, None, :], jnp.inf, d2), axis=-1)
    return jax.lax.stop_gradient(jax.lax.rsqrt(jnp.sqrt(nearest)))


def gated_representation_stats(tokens: jax.Array, step, every: int) -> dict[str, jax.Array]:
    """representation_stats on the steps the trainer logs (state step + 1 divisible by `every`), zeros otherwise.
    Why: the effective rank needs an eigendecomposition, slow on accelerators; computed every step it made the
    ViT-L/16 step on an H200 2.6% slower (428 vs 417 ms at batch 32, benchmarks/step_bench.py, README)."""
    if every <= 1:
        return representation_stats(tokens)
    skipped = lambda t: {"repr/std": jnp.zeros((), jnp.float32), "repr/effective_rank": jnp.zeros((), jnp.float32)}
    return jax.lax.cond((jnp.asarray(step) + 1) % every == 0, representation_stats, skipped, tokens)


def representation_stats(tokens: jax.Array, max_rows: int = 4096) -> dict[str, jax.Array]:
    """Collapse diagnostics on (a strided subset of) target tokens [B, L, D]: per-dimension std across tokens
    (near 0 = all tokens alike) and effective rank (exp entropy of the singular-value distribution)."""
    x = tokens.reshape(-1, tokens.shape[-1]).astype(jnp.float32)
    x = x[:: max(1, x.shape[0] // max_rows)]
    return {"repr/std": jnp.mean(jnp.std(x, axis=0)), "repr/effective_rank": effective_rank(x)}
