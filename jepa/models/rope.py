"""3D rotary position embedding (RoPE) as in V-JEPA 2, with precomputed per-token cos/sin tables.

Layout of one attention head (head_dim elements), matching the reference `RoPEAttention`:
    [ time slice (d) | height slice (d) | width slice (d) | remainder (head_dim - 3d), not rotated ]
with d = 2 * ((head_dim // 3) // 2). The slice order time, height, width (depth first) is the reference's
(`d_dim`, `h_dim`, `w_dim` in that order, the unrotated rest appended last).

In a slice of size d, frequency i (i < d/2) is 1 / 10000^(i / (d/2)) and elements rotate in adjacent pairs:
    (x[2i], x[2i+1]) -> x * cos + (-x[2i+1], x[2i]) * sin.
Which angle goes to which element depends on the layout:
  - "reference": the d/2 angles are tiled twice, [a0..a(d/2-1), a0..a(d/2-1)] (a quirk of the released code
    that its checkpoints depend on: the pair (x[2i], x[2i+1]) does not share one angle);
  - "interleaved": each angle is repeated for its pair, [a0, a0, a1, a1, ...] (a true rotation per pair).

Positions are integer (t, h, w) token-grid indices, so a masked subset keeps its true positions. The tables are
small numpy constants built at trace time from the (static) grid; per token they are gathered by the token's
flat index, and applying them costs a few elementwise ops that XLA fuses.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("reference", "interleaved")
BASE = 10000.0


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"rope_layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def slice_dim(head_dim: int) -> int:
    """Size of each of the three rotated slices (time, height, width)."""
    return 2 * ((head_dim // 3) // 2)


def axis_angles(positions: np.ndarray, d: int, layout: str) -> np.ndarray:
    """Angles [n, d] for integer positions [n] in one slice of size d, in the given layout."""
    check_layout(layout)
    half = d // 2
    freqs = 1.0 / BASE ** (np.arange(half, dtype=np.float64) / half) if half else np.zeros((0,))
    ang = np.asarray(positions, np.float64)[:, None] * freqs[None, :]
    if layout == "reference":
        return np.concatenate([ang, ang], axis=-1)
    return np.repeat(ang, 2, axis=-1)


def grid_positions(grid: Sequence[int]) -> np.ndarray:
    """int [L, 3]: the (t, h, w) grid index of every token in time-major, then height, then width order."""
    t, h, w = (int(g) for g in grid)
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()], axis=-1)


def rope_angles(grid: Sequence[int], head_dim: int, layout: str) -> np.ndarray:
    """Angles [L, 3d] of every grid token: time, height and width slices concatenated."""
    d = slice_dim(head_dim)
    pos = grid_positions(grid)
    return np.concatenate([axis_angles(pos[:, a], d, layout) for a in range(3)], axis=-1)


def rope_tables(grid: Sequence[int], head_dim: int, layout: str, scale: float = 1.0):
    """(cos, signed_sin) float32 [L, head_dim] ready for `apply_rope`.

    The unrotated remainder gets cos = 1, sin = 0 (x * 1 + y * 0 == x exactly for finite x). The pair-rotation
    sign is folded into the sin table (even elements take -sin) and an optional `scale` (e.g. the attention
    1/sqrt(head_dim) for queries) into both, so applying RoPE is two multiplies and an add.
    """
    return _tables(rope_angles(grid, head_dim, layout), head_dim, scale)


def time_only_tables(steps: np.ndarray, head_dim: int, layout: str):
    """(cos, signed_sin) [n, head_dim] for tokens with a time position only (e.g. action and state tokens of the
    action-conditioned predictor): the time slice rotates by `steps`, the height and width slices not at all."""
    d = slice_dim(head_dim)
    ang = axis_angles(np.asarray(steps), d, layout)
    return _tables(np.concatenate([ang, np.zeros((ang.shape[0], 2 * d))], axis=-1), head_dim, 1.0)


def _tables(ang: np.ndarray, head_dim: int, scale: float):
    pad = head_dim - ang.shape[-1]
    cos = np.concatenate([np.cos(ang), np.ones((ang.shape[0], pad))], axis=-1)
    sin = np.concatenate([np.sin(ang), np.zeros((ang.shape[0], pad))], axis=-1)
    sign = np.tile(np.array([-1.0, 1.0]), (head_dim + 1) // 2)[:head_dim]
    return (cos * scale).astype(np.float32), (sin * sign * scale).astype(np.float32)


def swap_pairs(x: jax.Array) -> jax.Array:
    """(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...) along the last axis (an odd last element stays put)."""
    shape = x.shape
    if shape[-1] % 2:
        return jnp.concatenate([swap_pairs(x[..., :-1]), x[..., -1:]], axis=-1)
    return x.reshape(*shape[:-1], shape[-1] // 2, 2)[..., ::-1].reshape(shape)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [..., head_dim] with per-token tables cos/sin [..., head_dim] from `rope_tables`, broadcastable
    against x (e.g. [B, 1, N, head_dim] for head-major x [B, H, N, head_dim]). Computed in float32, cast back
    to x's dtype."""
    xf = x.astype(jnp.float32)
    return (xf * cos + swap_pairs(xf) * sin).astype(x.dtype)


def token_tables(tables: tuple[np.ndarray, np.ndarray], token_idx: jax.Array | None):
    """Per-token (cos, sin) [B or 1, N, R]: the whole grid when token_idx is None, else gathered rows."""
    cos, sin = (jnp.asarray(t) for t in tables)
    if token_idx is None:
        return cos[None], sin[None]
    return jnp.take(cos, token_idx, axis=0), jnp.take(sin, token_idx, axis=0)
