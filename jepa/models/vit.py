"""Video Vision Transformer encoder of V-JEPA 2 (no CLS token, no absolute position embedding, 3D RoPE).

video [B, T, H, W, C] -> tubelet patches (time-major, then height, then width) -> keep the visible tokens
(`token_idx`) -> linear patch embedding -> pre-LN blocks with 3D RoPE -> final LayerNorm.

The tubelet embedding is the reference's Conv3d(kernel = stride = (tubelet, patch, patch), bias) written as a
reshape plus one matmul (faster than a convolution on CPU, identical maths). Gathering the kept patches before
the matmul rather than after it gives the same tokens and embeds only those.

Checkpoint conversion (reference PyTorch -> ours):
    patch_embed.proj.weight (width, C, t, p, p) -> patch_kernel = weight.transpose(2, 3, 4, 1, 0)  # (t, p, p, C, width)
    patch_embed.proj.bias (width,)            -> patch_bias
    blocks.{i}.norm1.weight / .bias            -> blocks.norm1_scale[i] / blocks.norm1_bias[i]   (same for norm2)
    blocks.{i}.attn.qkv.weight (3w, w) / bias  -> blocks.qkv_kernel[i] = weight.T / blocks.qkv_bias[i]
    blocks.{i}.attn.proj.weight (w, w) / bias  -> blocks.proj_kernel[i] = weight.T / blocks.proj_bias[i]
    blocks.{i}.mlp.fc1 / fc2                    -> blocks.fc1_kernel[i] / fc2_kernel[i] = weight.T, biases as is
    norm.weight / norm.bias                     -> norm_scale / norm_bias
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jepa.models import channels as channels_lib
from jepa.models import layers
from jepa.models import rope as rope_lib

ENCODER_SIZES = {
    "tiny": dict(width=192, depth=12, heads=3, mlp_dim=768),
    "small": dict(width=384, depth=12, heads=6, mlp_dim=1536),
    "base": dict(width=768, depth=12, heads=12, mlp_dim=3072),
    "large": dict(width=1024, depth=24, heads=16, mlp_dim=4096),    # ViT-L/16 as published
    "huge": dict(width=1280, depth=32, heads=16, mlp_dim=5120),     # ViT-H/16
    "giant": dict(width=1408, depth=40, heads=22, mlp_dim=6144),    # ViT-g/16
}


def token_grid(num_frames: int, resolution, patch_size: int, tubelet_size: int) -> tuple[int, int, int]:
    """(T', H', W') token grid of a clip; resolution is an int (square) or (height, width)."""
    h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if patch_size <= 0 or tubelet_size <= 0:
        raise ValueError(f"patch_size ({patch_size}) and tubelet_size ({tubelet_size}) must be positive")
    if num_frames <= 0 or h <= 0 or w <= 0:
        raise ValueError(f"num_frames ({num_frames}) and resolution ({h}x{w}) must be positive")
    if num_frames % tubelet_size:
        raise ValueError(f"num_frames {num_frames} is not divisible by tubelet_size {tubelet_size}")
    if h % patch_size or w % patch_size:
        raise ValueError(f"resolution {h}x{w} is not divisible by patch_size {patch_size}")
    return num_frames // tubelet_size, h // patch_size, w // patch_size


def patchify(video: jax.Array, patch_size: int, tubelet_size: int) -> jax.Array:
    """[B, T, H, W, C] -> [B, L, t*p*p*C] with tokens time-major then h then w, features ordered (t, ph, pw, C)."""
    b, t, h, w, c = video.shape
    tt, hh, ww = t // tubelet_size, h // patch_size, w // patch_size
    x = video.reshape(b, tt, tubelet_size, hh, patch_size, ww, patch_size, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, tt * hh * ww, tubelet_size * patch_size * patch_size * c)


def check_token_idx(token_idx, batch: int, num_tokens: int, name: str = "token_idx") -> None:
    if token_idx.ndim != 2 or token_idx.shape[0] != batch:
        raise ValueError(f"{name} must be [B={batch}, N], got shape {tuple(token_idx.shape)}")
    if not jnp.issubdtype(token_idx.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got {token_idx.dtype}")
    if token_idx.shape[1] > num_tokens:
        raise ValueError(f"{name} has {token_idx.shape[1]} tokens, more than the {num_tokens} of the grid")


class VisionTransformer(nnx.Module):
    """The V-JEPA 2 video encoder. Only nnx.Param state: `nnx.split(model, nnx.Param)` captures everything."""

    def __init__(self, *, width: int, depth: int, heads: int, mlp_dim: int, patch_size: int = 16,
                 tubelet_size: int = 2, in_channels: int = 3, rope_layout: str = "reference", dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: str = "none", scan: bool = True, attention_impl: str = "einsum",
                 residual_dtype=jnp.float32, channels: Sequence[str] = ("video",), rngs: nnx.Rngs):
        if patch_size <= 0 or tubelet_size <= 0 or in_channels <= 0:
            raise ValueError(f"patch_size ({patch_size}), tubelet_size ({tubelet_size}) and in_channels "
                             f"({in_channels}) must be positive")
        self.width, self.depth, self.heads, self.mlp_dim = width, depth, heads, mlp_dim
        self.patch_size, self.tubelet_size, self.in_channels = patch_size, tubelet_size, in_channels
        self.rope_layout = rope_lib.check_layout(rope_layout)
        self.dtype = dtype
        self.blocks = layers.Blocks(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, dtype=dtype,
                                    param_dtype=param_dtype, remat=remat, scan=scan,
                                    attention_impl=attention_impl, residual_dtype=residual_dtype, rngs=rngs)
        # Conv3d weight as (t, p, p, C, width): the matmul kernel after a free reshape (see module docstring).
        self.patch_kernel = nnx.Param(layers.trunc_normal(
            rngs.params(), (tubelet_size, patch_size, patch_size, in_channels, width), dtype=param_dtype))
        self.patch_bias = nnx.Param(jnp.zeros((width,), param_dtype))
        self.norm_scale = nnx.Param(jnp.ones((width,), param_dtype))
        self.norm_bias = nnx.Param(jnp.zeros((width,), param_dtype))
        # Further observation channels (jepa/models/channels.py): created after every video parameter, so a
        # video-only model draws the same initial weights as before channels existed.
        self.channels = channels_lib.check(channels)
        if channels_lib.is_multi(self.channels):
            for name in self.channels[1:]:
                setattr(self, f"{name}_tokenizer", channels_lib.build_tokenizer(
                    name, tubelet_size=tubelet_size, width=width, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
            self.channel_embed = nnx.Param(layers.trunc_normal(rngs.params(), (len(self.channels), width),
                                                               dtype=param_dtype))

    def grid(self, video_shape) -> tuple[int, int, int]:
        _, t, h, w, _ = video_shape
        return token_grid(t, (h, w), self.patch_size, self.tubelet_size)

    def __call__(self, video: jax.Array, token_idx: jax.Array | None = None,
                 return_layers: Sequence[int] = (), *, inputs: Mapping[str, jax.Array] | None = None,
                 available: jax.Array | None = None):
        """video [B, T, H, W, C] float -> float32 [B, N, width] for the tokens token_idx [B, N] (indices into the
        time-major flattened grid, any order; outputs follow that order), or all L grid tokens when None.

        return_layers: block indices (0-based, negative from the end); when given, returns (output,
        {"blocks": {i: block i's output after the final LayerNorm}}) (the reference's `out_layers`: intermediate
        layers share the final norm). The last block's entry is the output itself.

        With more than one channel, `inputs` holds the other channels' normalised values (name -> array) and
        token_idx indexes the joint sequence (channels.offsets); available: optional bool [B, L] over the joint
        sequence, False for tokens of a channel a clip lacks (no token attends to them)."""
        if video.ndim != 5 or video.shape[-1] != self.in_channels:
            raise ValueError(f"video must be [B, T, H, W, {self.in_channels}], got shape {tuple(video.shape)}")
        grid = self.grid(video.shape)
        if channels_lib.is_multi(self.channels):
            return self._call_channels(video, grid, token_idx, return_layers, inputs or {}, available)
        num_tokens = grid[0] * grid[1] * grid[2]
        x = patchify(video, self.patch_size, self.tubelet_size)
        if token_idx is not None:
            check_token_idx(token_idx, video.shape[0], num_tokens)
            x = jnp.take_along_axis(x, token_idx[..., None].astype(jnp.int32), axis=1)
        kernel = self.patch_kernel[...].reshape(-1, self.width)
        x = layers.dense(x, kernel, self.patch_bias[...], self.dtype)
        tables = rope_lib.rope_tables(grid, self.width // self.heads, self.rope_layout)
        norm = lambda x: layers.layer_norm(x, self.norm_scale[...], self.norm_bias[...], jnp.float32)
        if not return_layers:
            return norm(self.blocks(x, tables, token_idx))
        x, blocks = self.blocks(x, tables, token_idx, return_layers=return_layers)
        out = norm(x)
        return out, {"blocks": {i: out if i == self.depth - 1 else norm(h) for i, h in blocks.items()}}

    def _call_channels(self, video, grid, token_idx, return_layers, inputs, available):
        """Every channel tokenized whole, its channel embedding added, joined, then the kept tokens gathered (the
        tokenizers are a small share of the cost; the blocks see only the kept tokens)."""
        missing = [n for n in self.channels[1:] if n not in inputs]
        if missing:
            raise ValueError(f"encoder with channels {list(self.channels)}: inputs lack {missing}")
        num_tokens = channels_lib.num_tokens(self.channels, grid)
        embed = self.channel_embed[...]
        kernel = self.patch_kernel[...].reshape(-1, self.width)
        parts = [layers.dense(patchify(video, self.patch_size, self.tubelet_size), kernel, self.patch_bias[...],
                              self.dtype) + embed[0].astype(self.dtype)]
        for i, name in enumerate(self.channels[1:], start=1):
            tokens = getattr(self, f"{name}_tokenizer")(inputs[name])
            if tokens.shape[1] != grid[0]:
                raise ValueError(f"channel {name!r}: {tokens.shape[1]} time steps, the video has {grid[0]}")
            parts.append(tokens + embed[i].astype(self.dtype))
        x = jnp.concatenate(parts, axis=1)
        mask = None
        if available is not None:
            keys = available if token_idx is None else jnp.take_along_axis(available, token_idx, axis=1)
            mask = keys[:, None, None, :]  # [B, 1 (heads), 1 (queries), N keys]
        if token_idx is not None:
            check_token_idx(token_idx, video.shape[0], num_tokens)
            x = jnp.take_along_axis(x, token_idx[..., None].astype(jnp.int32), axis=1)
        tables = channels_lib.rope_tables(self.channels, grid, self.width // self.heads, self.rope_layout)
        norm = lambda x: layers.layer_norm(x, self.norm_scale[...], self.norm_bias[...], jnp.float32)
        if not return_layers:
            return norm(self.blocks(x, tables, token_idx, mask=mask))
        x, blocks = self.blocks(x, tables, token_idx, mask=mask, return_layers=return_layers)
        out = norm(x)
        return out, {"blocks": {i: out if i == self.depth - 1 else norm(h) for i, h in blocks.items()}}
