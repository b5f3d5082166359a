"""Observation channels: what the encoder reads besides (or with) video, picked by name (`config.model.channels`).

Every channel turns its part of a batch into tokens of the encoder's width that sit on the shared time axis of the
clip's token grid (T', H', W'):

    "video"   tubelets of `tubelet_size` frames x patch x patch pixels (jepa/models/vit.py), at grid positions
              (t, h, w); T'·H'·W' tokens, indices [0, T'·H'·W') of the joint token sequence.
    "vector"  a dense multivariate series sampled per frame (batch field `states`: for the world dataset qpos then
              qvel, zero-padded to S_MAX). One token per tubelet time step t: the step's `tubelet_size` frames of
              normalised values concatenated and projected linearly (the same kernel = stride construction as the
              video tubelet, so the order of values inside the step, i.e. velocity, is kept). It sits at RoPE
              position (t, 0, 0) with the height and width slices unrotated, exactly as the action-conditioned
              predictor's action and state tokens: it lines up with the video tubelet t in time and has no place in
              the image; the channel embedding, not the position, tells it from the video patch at (t, 0, 0).
              T' tokens, indices [T'·H'·W' + t] of the joint sequence.

Channels are concatenated in `config.model.channels` order (video first, always). A learned channel embedding per
channel is added to its tokens only when more than one channel is configured, so a video-only model has exactly the
parameters and numbers it always had.

Vector values are normalised per dimension with the train split's mean and std (`vector_statistics`, stored in the
run's config as `data.vector_mean` / `data.vector_std`, reused by export and probes); dimensions that never vary
(S_MAX zero padding) get std 1, so they stay exactly 0 and never divide by zero.

Masks over channels x time are `ChannelMasker` (static counts, constant by construction; see its docstring).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jepa.models import layers

# Values per frame of the world dataset's `states`: jepa.envs.S_MAX (not imported: jepa.envs loads MuJoCo).
S_MAX = 32


@dataclasses.dataclass(frozen=True)
class Channel:
    """One registered channel: the batch field it reads, its per-frame size and the source kinds that carry it."""
    name: str
    batch_key: str                 # the batch field holding the channel's values
    source_kinds: tuple[str, ...]  # config.data.sources kinds that provide it
    dim: int = 0                   # values per frame (0: not a vector series)

    def num_tokens(self, grid: Sequence[int]) -> int:
        t, h, w = grid
        return t * h * w if self.name == "video" else t

    def positions(self, grid: Sequence[int]) -> np.ndarray:
        """int [num_tokens, 3] (t, h, w) RoPE positions of the channel's tokens."""
        from jepa.models.rope import grid_positions
        if self.name == "video":
            return grid_positions(grid)
        t = np.arange(int(grid[0]))
        return np.stack([t, np.zeros_like(t), np.zeros_like(t)], axis=-1)


CHANNELS = {
    "video": Channel("video", "video", ("world", "tfds", "manifest")),
    "vector": Channel("vector", "states", ("world",), dim=S_MAX),
}
NAMES = tuple(CHANNELS)


def check(channels: Sequence[str]) -> tuple[str, ...]:
    """The configured channel names as a tuple; ValueError for unknown names, duplicates or video not first."""
    channels = tuple(str(c) for c in channels)
    unknown = [c for c in channels if c not in CHANNELS]
    if unknown:
        raise ValueError(f"unknown channel(s) {unknown} (known: {', '.join(NAMES)})")
    if len(set(channels)) != len(channels):
        raise ValueError(f"{list(channels)} names a channel twice")
    if not channels or channels[0] != "video":
        raise ValueError(f"{list(channels)} must start with 'video' (the channel every clip has; masks fill their "
                         "fixed counts from it)")
    return channels


def is_multi(channels: Sequence[str]) -> bool:
    return len(tuple(channels)) > 1


def offsets(channels: Sequence[str], grid: Sequence[int]) -> dict[str, tuple[int, int]]:
    """name -> (start, stop) of its tokens in the joint token sequence."""
    out, start = {}, 0
    for name in channels:
        n = CHANNELS[name].num_tokens(grid)
        out[name] = (start, start + n)
        start += n
    return out


def num_tokens(channels: Sequence[str], grid: Sequence[int]) -> int:
    return sum(CHANNELS[c].num_tokens(grid) for c in channels)


def positions(channels: Sequence[str], grid: Sequence[int]) -> np.ndarray:
    """int [L, 3]: RoPE (t, h, w) of every token of the joint sequence."""
    return np.concatenate([CHANNELS[c].positions(grid) for c in channels], axis=0)


def token_channel(channels: Sequence[str], grid: Sequence[int]) -> np.ndarray:
    """int [L]: the channel index (in `channels` order) of every token of the joint sequence."""
    return np.concatenate([np.full(CHANNELS[c].num_tokens(grid), i, np.int32) for i, c in enumerate(channels)])


def rope_tables(channels: Sequence[str], grid: Sequence[int], head_dim: int, layout: str):
    """(cos, signed_sin) [L, head_dim] for the joint sequence; equal to rope.rope_tables(grid) for video alone."""
    from jepa.models import rope as rope_lib
    if not is_multi(channels):
        return rope_lib.rope_tables(grid, head_dim, layout)
    pos = positions(channels, grid)
    d = rope_lib.slice_dim(head_dim)
    ang = np.concatenate([rope_lib.axis_angles(pos[:, a], d, layout) for a in range(3)], axis=-1)
    return rope_lib._tables(ang, head_dim, 1.0)


# ---------------------------------------------------------------- tokenizers


class VectorTokenizer(nnx.Module):
    """[B, T, dim] normalised values -> [B, T / tubelet, width]: each tubelet time step's frames concatenated
    (frame-major) and projected linearly."""

    def __init__(self, *, dim: int, tubelet_size: int, width: int, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.dim, self.tubelet_size, self.width, self.dtype = dim, tubelet_size, width, dtype
        self.kernel = nnx.Param(layers.trunc_normal(rngs.params(), (tubelet_size * dim, width), dtype=param_dtype))
        self.bias = nnx.Param(jnp.zeros((width,), param_dtype))

    def __call__(self, values: jax.Array) -> jax.Array:
        b, t, d = values.shape
        if d != self.dim or t % self.tubelet_size:
            raise ValueError(f"vector values must be [B, T, {self.dim}] with T divisible by {self.tubelet_size}, "
                             f"got {tuple(values.shape)}")
        x = values.astype(jnp.float32).reshape(b, t // self.tubelet_size, self.tubelet_size * d)
        return layers.dense(x, self.kernel[...], self.bias[...], self.dtype)


def build_tokenizer(name: str, *, tubelet_size: int, width: int, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Module:
    """The tokenizer of a non-video channel (video's tubelet embedding lives in the ViT, where released checkpoints
    put it)."""
    channel = CHANNELS[name]
    if name == "vector":
        return VectorTokenizer(dim=channel.dim, tubelet_size=tubelet_size, width=width, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
    raise ValueError(f"channel {name!r} has no tokenizer")


# ---------------------------------------------------------------- normalisation


def normalize_vector(values: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """(values - mean) / std per dimension, float32 (std is already floored to 1 where a dimension never varies)."""
    mean = jnp.asarray(np.asarray(mean, np.float32))
    std = jnp.asarray(np.asarray(std, np.float32))
    return (values.astype(jnp.float32) - mean) / std


MIN_STD = 1e-6  # below this a dimension is constant (S_MAX padding, a joint that never moves): std 1


def statistics_from_values(values: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-dimension (mean, std) of values [N, dim] (float64 accumulation), constant dimensions getting std 1."""
    v = np.asarray(values, np.float64).reshape(-1, values.shape[-1])
    mean, std = v.mean(axis=0), v.std(axis=0)
    std = np.where(std < MIN_STD, 1.0, std)
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def vector_statistics(config, max_records: int = 256) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the vector channel over the train split of config.data.sources: every frame of up to
    `max_records` evenly spread records per source (the whole split of the quick-start presets)."""
    from jepa.data import sources as sources_lib
    values = []
    for name in sorted(config.data.sources.keys()):
        cfg = dict(config.data.sources[name].to_dict(), split="train")
        src = sources_lib.open_source(cfg)
        n = len(src)
        picks = sorted(set(np.linspace(0, n - 1, min(n, max_records)).round().astype(int).tolist()))
        for i in picks:
            st = np.asarray(src[i]["states"], np.float32)[:, :S_MAX]
            padded = np.zeros((st.shape[0], S_MAX), np.float32)
            padded[:, :st.shape[1]] = st
            values.append(padded)
    if not values:
        raise ValueError("config.data.sources: no train records to compute the vector channel's statistics from")
    return statistics_from_values(np.concatenate(values, axis=0))


def ensure_statistics(config, saved: dict | None = None) -> bool:
    """Fills config.data.vector_mean / vector_std when the vector channel is configured and they are empty: from
    `saved` (the run's config.json as a dict, when it holds them: a resumed run keeps its statistics), else from the
    train data; True when it filled them. The run's config.json then carries them."""
    if "vector" not in tuple(config.model.channels) or len(config.data.vector_mean):
        return False
    kept = (saved or {}).get("data", {})
    if kept.get("vector_mean") and kept.get("vector_std"):
        mean, std = tuple(kept["vector_mean"]), tuple(kept["vector_std"])
    else:
        mean, std = vector_statistics(config)
    with config.unlocked():
        config.data.vector_mean, config.data.vector_std = mean, std
    return True


# ---------------------------------------------------------------- masks over channels x time


class ChannelMasker:
    """Multi-block video masks plus a contiguous masked time block per non-video channel and whole-channel dropout,
    with per-type token counts constant by construction (no padding anywhere).

    Per mask type, the video part is the `MultiBlockMasker` union with its fixed counts (nc_v, nt_v); each non-video
    channel of T' tokens gets one contiguous block of k = clip(round(T' * nt_v / L_v), 1, T' - 1) time steps at a
    uniform start: it is masked in the proportion the video is by that type. Counts per clip:
    num_context = nc_v + sum(T' - k), num_target = nt_v + sum(k).

    A clip that has a channel and keeps it: its T' - k unmasked steps are context and its k masked steps targets,
    exactly; the video lists are drawn as MultiBlockMasker draws them. A non-video channel is hidden from the context
    when the clip lacks it (`present` False) or with probability `dropout` (once per clip: the same for every mask
    type); its context slots then go to video tokens (complement first, then union, uniformly at random, the video
    rule for filling fixed counts). A dropped channel is wholly masked: all its T' steps are targets (the EMA encoder
    sees every channel a clip has), the rest of the target slots video union tokens. An absent channel's tokens are
    neither context nor target; video fills its slots. Video is therefore always present, and
    nc_v + nt_v + sum(T') <= L_v is required (nc_v is lowered to fit when the quantile counts are larger).
    """

    def __init__(self, grid: Sequence[int], specs, channels: Sequence[str], length_quantile: float = 0.1,
                 dropout: float = 0.0):
        from jepa.masks import MultiBlockMasker
        self.channels = check(channels)
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"channel dropout must lie in [0, 1), got {dropout!r}")
        self.dropout = float(dropout)
        self.video = MultiBlockMasker(tuple(grid), specs, length_quantile=length_quantile)
        self.grid, self.specs = self.video.grid, self.video.specs
        self.offsets = offsets(self.channels, self.grid)
        self.num_tokens = num_tokens(self.channels, self.grid)
        lv, steps, extra = self.video.num_tokens, self.grid[0], len(self.channels) - 1
        if steps < 2:
            raise ValueError(f"grid {self.grid}: a masked time block needs at least 2 time steps")
        self.blocks: dict[str, int] = {}
        self.lengths: dict[str, tuple[int, int]] = {}
        for s in self.specs:
            nc_v, nt_v = self.video.lengths[s.name]
            k = min(max(int(round(steps * nt_v / lv)), 1), steps - 1)
            nc_v = min(nc_v, lv - nt_v - steps * extra)  # every slot can be filled from video alone
            if nc_v < 1:
                raise ValueError(f"mask {s.name!r}: {nt_v} video targets leave no context slot for grid "
                                 f"{self.grid} with channels {list(self.channels)}")
            self.blocks[s.name] = k
            self.lengths[s.name] = (nc_v + (steps - k) * extra, nt_v + k * extra)

    def __call__(self, batch_size: int, rng: np.random.Generator, present: np.ndarray | None = None):
        """{"<name>/context_idx", "<name>/target_idx"} int32 [B, N] over the joint sequence, for every mask type.
        present: bool [B, C] (channels in order; video's column is ignored), None = every channel present."""
        b, c = int(batch_size), len(self.channels)
        present = np.ones((b, c), bool) if present is None else np.asarray(present, bool).reshape(b, c)
        # Drawn for every clip whatever its presence, so a clip's masks do not depend on other clips' data.
        dropped = (rng.random((b, c)) < self.dropout) & present
        absent = ~present
        steps, lv = self.grid[0], self.video.num_tokens
        t = np.arange(steps)[None]
        out = {}
        for s in self.specs:
            union_v = self.video.draw_blocks(s.name, b, rng).reshape(b, lv)
            k = self.blocks[s.name]
            # Tiers: each list takes its tokens from the lowest tier up, uniformly at random inside a tier; inf never.
            ctx_tier, tgt_tier = [np.where(union_v, 2.0, 1.0)], [np.where(union_v, 1.0, 2.0)]
            for ci in range(1, c):
                start = rng.integers(0, steps - k + 1, size=(b, 1))
                block = (t >= start) & (t < start + k)
                kept = ~(dropped[:, ci:ci + 1] | absent[:, ci:ci + 1])
                ctx_tier.append(np.where(kept & ~block, 0.0, np.inf))
                tgt_tier.append(np.where((kept & block) | dropped[:, ci:ci + 1], 0.0, np.inf))
            ctx_tier, tgt_tier = np.concatenate(ctx_tier, axis=1), np.concatenate(tgt_tier, axis=1)
            nc, nt = self.lengths[s.name]
            key = rng.random((b, self.num_tokens))
            ctx = np.argpartition(key + ctx_tier, nc - 1, axis=1)[:, :nc]
            tgt_key = key + tgt_tier
            np.put_along_axis(tgt_key, ctx, np.inf, axis=1)                # never a context token
            tgt = np.argpartition(tgt_key, nt - 1, axis=1)[:, :nt]
            ctx.sort(axis=1)
            tgt.sort(axis=1)
            out[f"{s.name}/context_idx"] = ctx.astype(np.int32)
            out[f"{s.name}/target_idx"] = tgt.astype(np.int32)
        return out


def available_tokens(present: jax.Array, channels: Sequence[str], grid: Sequence[int]) -> jax.Array:
    """bool [B, L]: which tokens of the joint sequence carry data (a channel absent from a clip: none of its)."""
    which = jnp.asarray(token_channel(channels, grid))
    return jnp.take(present.astype(bool), which, axis=1)


def per_channel_mean(tokens: jax.Array, channels: Sequence[str], grid: Sequence[int]) -> dict[str, jax.Array]:
    """tokens [B, L, D] of the joint sequence -> name -> [B, D], the mean over each channel's tokens."""
    return {name: tokens[:, a:b].mean(axis=1) for name, (a, b) in offsets(channels, grid).items()}


__all__ = ["CHANNELS", "NAMES", "Channel", "ChannelMasker", "VectorTokenizer", "available_tokens", "build_tokenizer",
           "check", "ensure_statistics", "is_multi", "normalize_vector", "num_tokens", "offsets", "per_channel_mean",
           "positions", "rope_tables", "statistics_from_values", "token_channel", "vector_statistics"]
