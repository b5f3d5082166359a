"""V-JEPA 2-AC action-conditioned predictor: how frame representations evolve under actions.

Inputs per time step t: the frozen encoder's patch tokens z_t [N, enc_w] of frame t (an H' x W' grid), the action
a_t applied after frame t and the state s_t at frame t. Each step becomes the token group
    [action token, state token, N patch tokens]
(actions and states embedded by their own Linear layers, patches by Linear(enc_w -> w)); attention is
block-causal (a token of step t sees every token of steps <= t, nothing later); patch tokens carry 3D RoPE at
(t, h, w), action and state tokens only the time part. The patch outputs of step t, after LayerNorm and
Linear(w -> enc_w), predict z_{t+1}; the state output predicts s_{t+1} (used where rollouts need future states).

Checkpoint conversion (reference vjepa2 `VisionTransformerPredictorAC` -> ours): predictor_embed -> embed_*,
action_encoder -> action_*, state_encoder -> state_*, predictor_blocks.{i} -> blocks.* as in jepa/models/vit.py,
predictor_norm -> norm_*, predictor_proj -> proj_*. (The reference's extrinsics token is not modelled.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jepa.models import layers
from jepa.models import rope as rope_lib

NUM_COND_TOKENS = 2  # action, state


def block_causal_mask(num_steps: int, tokens_per_step: int) -> np.ndarray:
    """bool [L, L] with L = num_steps * tokens_per_step: query i may attend to key j iff step(j) <= step(i)."""
    step = np.repeat(np.arange(num_steps), tokens_per_step)
    return step[:, None] >= step[None, :]


def ac_rope_tables(num_steps: int, grid_hw: tuple[int, int], head_dim: int, layout: str):
    """(cos, sin) [num_steps * (2 + H' W'), head_dim] in token order: per step, the action and state tokens
    (time only) then the patches (time, height, width)."""
    h, w = grid_hw
    patch_cos, patch_sin = rope_lib.rope_tables((num_steps, h, w), head_dim, layout)
    cond_cos, cond_sin = rope_lib.time_only_tables(np.arange(num_steps), head_dim, layout)
    n = h * w

    def interleave(cond, patch):
        cond = np.repeat(cond[:, None], NUM_COND_TOKENS, axis=1)                 # [T, 2, R]
        return np.concatenate([cond, patch.reshape(num_steps, n, -1)], axis=1).reshape(-1, patch.shape[-1])

    return interleave(cond_cos, patch_cos), interleave(cond_sin, patch_sin)


class ACPredictor(nnx.Module):
    """Only nnx.Param state: `nnx.split(model, nnx.Param)` captures everything."""

    def __init__(self, *, encoder_width: int, grid_hw: tuple[int, int], action_dim: int, state_dim: int,
                 width: int = 1024, depth: int = 24, heads: int = 16, mlp_dim: int | None = None,
                 rope_layout: str = "reference", dtype=jnp.float32, param_dtype=jnp.float32, remat: str = "none",
                 scan: bool = True, attention_impl: str = "einsum", residual_dtype=jnp.float32, rngs: nnx.Rngs):
        if min(encoder_width, action_dim, state_dim) <= 0:
            raise ValueError(f"encoder_width ({encoder_width}), action_dim ({action_dim}) and state_dim "
                             f"({state_dim}) must be positive")
        if len(grid_hw) != 2 or min(grid_hw) <= 0:
            raise ValueError(f"grid_hw must be two positive sizes (H', W'), got {grid_hw}")
        self.encoder_width, self.grid_hw = encoder_width, (int(grid_hw[0]), int(grid_hw[1]))
        self.action_dim, self.state_dim = action_dim, state_dim
        self.width, self.heads = width, heads
        self.rope_layout = rope_lib.check_layout(rope_layout)
        self.dtype = dtype
        self.blocks = layers.Blocks(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, dtype=dtype,
                                    param_dtype=param_dtype, remat=remat, scan=scan,
                                    attention_impl=attention_impl, residual_dtype=residual_dtype, rngs=rngs)
        init = lambda *shape: nnx.Param(layers.trunc_normal(rngs.params(), shape, dtype=param_dtype))
        zeros = lambda n: nnx.Param(jnp.zeros((n,), param_dtype))
        self.embed_kernel, self.embed_bias = init(encoder_width, width), zeros(width)
        self.action_kernel, self.action_bias = init(action_dim, width), zeros(width)
        self.state_kernel, self.state_bias = init(state_dim, width), zeros(width)
        self.norm_scale, self.norm_bias = nnx.Param(jnp.ones((width,), param_dtype)), zeros(width)
        self.proj_kernel, self.proj_bias = init(width, encoder_width), zeros(encoder_width)
        self.state_proj_kernel, self.state_proj_bias = init(width, state_dim), zeros(state_dim)

    def __call__(self, z: jax.Array, actions: jax.Array, states: jax.Array, *, action_to_patches: bool = False
                 ) -> tuple[jax.Array, jax.Array]:
        """z [B, T, N, enc_w], actions [B, T, action_dim], states [B, T, state_dim] ->
        (next-frame patch predictions float32 [B, T, N, enc_w], next-state predictions float32 [B, T, state_dim]);
        output t depends only on inputs 0..t. action_to_patches: the action embedding of step t is also added to
        each patch token of step t (DINO-WM style), so every patch sees the action directly, not only through
        attention to the action token."""
        t, per_step = z.shape[1], NUM_COND_TOKENS + z.shape[2]
        x = self._tokens(z, actions, states, action_to_patches)
        tables = ac_rope_tables(t, self.grid_hw, self.width // self.heads, self.rope_layout)
        return self._outputs(self.blocks(x, tables, None, mask=jnp.asarray(block_causal_mask(t, per_step))), t)

    def extend(self, z: jax.Array, actions: jax.Array, states: jax.Array, cache: tuple | None = None, *,
               action_to_patches: bool = False) -> tuple[jax.Array, jax.Array, tuple]:
        """__call__'s outputs for T new steps after the M / (2 + N) steps held in `cache` (their keys and values
        per block, from an earlier call; None: no earlier steps), without recomputing the earlier steps: block-
        causal attention never lets them see later ones. Rollouts extend one step at a time, so each imagined
        step costs one step's tokens. Returns (patches, states, the cache of every step so far); a cache of
        batch 1 serves any batch (observed context shared by all of a planner's samples)."""
        t, per_step = z.shape[1], NUM_COND_TOKENS + z.shape[2]
        start = 0 if cache is None else cache[0].shape[3] // per_step
        x = self._tokens(z, actions, states, action_to_patches)
        cos, sin = ac_rope_tables(start + t, self.grid_hw, self.width // self.heads, self.rope_layout)
        tables = (cos[start * per_step:], sin[start * per_step:])
        mask = np.concatenate([np.ones((t * per_step, start * per_step), bool), block_causal_mask(t, per_step)], 1)
        x, cache = self.blocks.extend(x, tables, jnp.asarray(mask), cache)
        return (*self._outputs(x, t), cache)

    def _tokens(self, z, actions, states, action_to_patches: bool) -> jax.Array:
        """Inputs -> the token sequence [B, T * (2 + N), w]: per step the action, state and patch tokens."""
        b, t, n, e = z.shape
        if n != self.grid_hw[0] * self.grid_hw[1] or e != self.encoder_width:
            raise ValueError(f"z must be [B, T, {self.grid_hw[0] * self.grid_hw[1]}, {self.encoder_width}], "
                             f"got {tuple(z.shape)}")
        if actions.shape != (b, t, self.action_dim) or states.shape != (b, t, self.state_dim):
            raise ValueError(f"actions / states must be [{b}, {t}, {self.action_dim}] / [{b}, {t}, "
                             f"{self.state_dim}], got {tuple(actions.shape)} / {tuple(states.shape)}")
        d = self.dtype
        a = layers.dense(actions, self.action_kernel[...], self.action_bias[...], d)
        s = layers.dense(states, self.state_kernel[...], self.state_bias[...], d)
        p = layers.dense(z, self.embed_kernel[...], self.embed_bias[...], d)
        if action_to_patches:
            p = p + a[:, :, None]
        x = jnp.concatenate([a[:, :, None], s[:, :, None], p], axis=2)            # [B, T, 2 + N, w]
        return x.reshape(b, t * (NUM_COND_TOKENS + n), self.width)

    def _outputs(self, x: jax.Array, t: int) -> tuple[jax.Array, jax.Array]:
        """Block outputs [B, T * (2 + N), w] -> (next-patch predictions, next-state predictions), float32."""
        d = self.dtype
        x = layers.layer_norm(x, self.norm_scale[...], self.norm_bias[...], d)
        x = x.reshape(x.shape[0], t, x.shape[1] // t, self.width)
        patches = layers.dense(x[:, :, NUM_COND_TOKENS:], self.proj_kernel[...], self.proj_bias[...], d)
        state = layers.dense(x[:, :, 1], self.state_proj_kernel[...], self.state_proj_bias[...], d)
        return patches.astype(jnp.float32), state.astype(jnp.float32)
