"""V-JEPA 2 predictor: a narrow ViT that fills in one mask token per target position.

context tokens [B, Nc, enc_w] -> Linear(enc_w -> w); append mask_tokens[mask_index] once per target position;
every token sits at its true (t, h, w) grid position through 3D RoPE; pre-LN blocks; LayerNorm and
Linear(w -> enc_w) on the target tokens only.

No sort: the reference sorts context + mask tokens by position before the blocks and un-sorts after. Without an
attention mask and without absolute position embeddings, self-attention is permutation-equivariant once each
token carries its own RoPE position, and LayerNorm / MLP act per token, so the order changes nothing; we keep
[context, targets] order and read the targets from the tail.

Checkpoint conversion (reference -> ours): predictor_embed.weight.T / bias -> embed_kernel / embed_bias;
mask_tokens.{i} (1, 1, w) -> mask_tokens[i]; predictor_blocks.{i}.* -> blocks.* as in jepa/models/vit.py;
predictor_norm -> norm_scale / norm_bias; predictor_proj.weight.T / bias -> proj_kernel / proj_bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jepa.models import channels as channels_lib
from jepa.models import layers
from jepa.models import rope as rope_lib
from jepa.models.vit import check_token_idx


class Predictor(nnx.Module):
    """Only nnx.Param state: `nnx.split(model, nnx.Param)` captures everything."""

    def __init__(self, *, encoder_width: int, width: int = 384, depth: int = 12, heads: int = 12,
                 mlp_dim: int | None = None, num_mask_tokens: int = 10, grid: Sequence[int],
                 rope_layout: str = "reference", dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none",
                 scan: bool = True, attention_impl: str = "einsum", residual_dtype=jnp.float32,
                 channels: Sequence[str] = ("video",), rngs: nnx.Rngs):
        if encoder_width <= 0:
            raise ValueError(f"encoder_width must be positive, got {encoder_width}")
        if num_mask_tokens <= 0:
            raise ValueError(f"num_mask_tokens must be positive, got {num_mask_tokens}")
        grid = tuple(int(g) for g in grid)
        if len(grid) != 3 or min(grid) <= 0:
            raise ValueError(f"grid must be three positive sizes (T', H', W'), got {grid}")
        self.blocks = layers.Blocks(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, dtype=dtype,
                                    param_dtype=param_dtype, remat=remat, scan=scan,
                                    attention_impl=attention_impl, residual_dtype=residual_dtype, rngs=rngs)
        self.encoder_width, self.width, self.depth, self.heads = encoder_width, width, depth, heads
        self.mlp_dim, self.num_mask_tokens, self.grid = self.blocks.mlp_dim, num_mask_tokens, grid
        self.rope_layout, self.dtype = rope_lib.check_layout(rope_layout), dtype
        self.embed_kernel = nnx.Param(layers.trunc_normal(rngs.params(), (encoder_width, width), dtype=param_dtype))
        self.embed_bias = nnx.Param(jnp.zeros((width,), param_dtype))
        self.mask_tokens = nnx.Param(jnp.zeros((num_mask_tokens, width), param_dtype))  # zero init, as released
        self.norm_scale = nnx.Param(jnp.ones((width,), param_dtype))
        self.norm_bias = nnx.Param(jnp.zeros((width,), param_dtype))
        self.proj_kernel = nnx.Param(layers.trunc_normal(rngs.params(), (width, encoder_width), dtype=param_dtype))
        self.proj_bias = nnx.Param(jnp.zeros((encoder_width,), param_dtype))
        # Several observation channels: token indices span the joint sequence (jepa/models/channels.py) and each
        # mask token gets the embedding of the channel it fills in (created last: video-only weights unchanged).
        self.channels = channels_lib.check(channels)
        if channels_lib.is_multi(self.channels):
            self.channel_embed = nnx.Param(layers.trunc_normal(rngs.params(), (len(self.channels), width),
                                                               dtype=param_dtype))

    def __call__(self, context_tokens: jax.Array, context_idx: jax.Array, target_idx: jax.Array,
                 mask_index, with_context: bool = False) -> jax.Array:
        """context_tokens [B, Nc, encoder_width] at grid indices context_idx [B, Nc]; predictions float32
        [B, Nt, encoder_width] for target_idx [B, Nt]. mask_index: which mask token (python int or traced
        int scalar, e.g. the mask type). with_context: predictions for the context positions too,
        [B, Nc + Nt, encoder_width] in [context, targets] order (the V-JEPA 2.1 context loss reads them)."""
        b, nc = context_tokens.shape[:2]
        num_tokens = channels_lib.num_tokens(self.channels, self.grid)
        if context_tokens.ndim != 3 or context_tokens.shape[-1] != self.encoder_width:
            raise ValueError(f"context_tokens must be [B, Nc, {self.encoder_width}], got "
                             f"{tuple(context_tokens.shape)}")
        check_token_idx(context_idx, b, num_tokens, "context_idx")
        check_token_idx(target_idx, b, num_tokens, "target_idx")
        if context_idx.shape[1] != nc:
            raise ValueError(f"context_idx has {context_idx.shape[1]} tokens, context_tokens {nc}")
        if isinstance(mask_index, int) and not 0 <= mask_index < self.num_mask_tokens:
            raise ValueError(f"mask_index {mask_index} out of range [0, {self.num_mask_tokens})")
        nt = target_idx.shape[1]
        x = layers.dense(context_tokens, self.embed_kernel[...], self.embed_bias[...], self.dtype)
        mask = self.mask_tokens[...][mask_index].astype(x.dtype)
        mask = jnp.broadcast_to(mask, (b, nt, self.width))
        if channels_lib.is_multi(self.channels):
            which = jnp.take(jnp.asarray(channels_lib.token_channel(self.channels, self.grid)), target_idx)
            mask = mask + jnp.take(self.channel_embed[...], which, axis=0).astype(x.dtype)
        x = jnp.concatenate([x, mask], axis=1)
        positions = jnp.concatenate([context_idx, target_idx], axis=1).astype(jnp.int32)
        tables = channels_lib.rope_tables(self.channels, self.grid, self.width // self.heads, self.rope_layout)
        x = self.blocks(x, tables, positions)
        x = x if with_context else x[:, nc:]
        x = layers.layer_norm(x, self.norm_scale[...], self.norm_bias[...], self.dtype)
        return layers.dense(x, self.proj_kernel[...], self.proj_bias[...], self.dtype).astype(jnp.float32)
