"""V-JEPA multi-block 3D masks, in numpy, with static shapes.

The procedure per mask type (same in V-JEPA 1 and 2):
  * the block SIZE is drawn once per call (shared by every sample and block of the batch): an aspect ratio
    ``ar`` drawn UNIFORMLY in ``aspect_ratio`` (as the reference does; not log-uniform),
    ``keep = int(H*W*spatial_scale)``, ``h = round(sqrt(keep*ar))``, ``w = round(sqrt(keep/ar))``, both clipped
    to ``[1, H]`` / ``[1, W]``, and a temporal extent ``t = max(1, int(T*temporal_scale))``;
  * the block POSITIONS are drawn per sample and per block (uniform start in time, top, left);
  * target = union of the ``num_blocks`` blocks, context = its complement; a sample whose context is empty is
    redrawn (positions only, up to ``_EMPTY_REDRAWS`` times, after which the static fill below takes over).

Static-shape scheme (a deliberate difference from the reference).  The reference truncates every sample's
sorted index lists to the batch minimum, so shapes change every batch (an XLA recompile) and the HIGHEST indices
are always the ones dropped: late frames and bottom-right patches systematically lose context and targets.
Here every mask type has fixed ``(num_context, num_target)`` -- given in the spec, or fixed at construction as
the ``length_quantile`` quantile of the context / target sizes over a deterministic Monte-Carlo run (fixed seed,
``_MC_SAMPLES`` samples) -- and per sample:
  * context: if the complement has more than ``num_context`` tokens a uniformly random subset is kept; if fewer,
    uniformly random target-union tokens are moved into the context to make up the count;
  * target: from the tokens not in the context, a uniformly random subset of the union is kept; if the union
    (minus the tokens moved out) is too small, uniformly random leftover complement tokens are added;
  * both lists are sorted ascending and always disjoint (``num_context + num_target <= T*H*W``).
Random subsets drop tokens uniformly over positions, so the positional target frequency follows the block
placement, not the token order (see ``describe``).  Block positions are NOT redrawn to hit the counts (that
would bias the overlap distribution); with the default quantile 0.1 about 10% of samples get a small fill.

Indices are into the time-major flattened token grid: ``idx = (t*H + h)*W + w``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_MC_SEED = 20240611     # fixed: the automatic lengths must not depend on the caller's rng
_MC_SAMPLES = 4096      # samples in the Monte-Carlo run that fixes the automatic lengths
_MC_BATCH = 16          # samples per block-size draw in that run (the size is drawn once per call)
_EMPTY_REDRAWS = 10     # position redraws for samples whose context came out empty


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """One mask type. ``num_context`` / ``num_target`` of 0 mean "fix automatically from a quantile"."""

    name: str
    num_blocks: int
    spatial_scale: float
    temporal_scale: float = 1.0
    aspect_ratio: tuple = (0.75, 1.5)
    num_context: int = 0
    num_target: int = 0

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"MaskSpec {self.name!r}: {field} {why}")

        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            bad("name", f"must be a non-empty string without '/', got {self.name!r}")
        if not _is_int(self.num_blocks) or self.num_blocks < 1:
            bad("num_blocks", f"must be an integer >= 1, got {self.num_blocks!r}")
        for field in ("spatial_scale", "temporal_scale"):
            v = getattr(self, field)
            if not _is_real(v) or not 0.0 < v <= 1.0:
                bad(field, f"must be in (0, 1], got {v!r}")
        ar = self.aspect_ratio
        try:
            lo, hi = (float(a) for a in ar)
        except (TypeError, ValueError):
            bad("aspect_ratio", f"must be a (min, max) pair, got {ar!r}")
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo <= hi):
            bad("aspect_ratio", f"must satisfy 0 < min <= max, got {ar!r}")
        object.__setattr__(self, "aspect_ratio", (lo, hi))
        for field in ("num_context", "num_target"):
            v = getattr(self, field)
            if not _is_int(v) or v < 0:
                bad(field, f"must be an integer >= 0 (0 = automatic), got {v!r}")
        object.__setattr__(self, "num_blocks", int(self.num_blocks))
        object.__setattr__(self, "num_context", int(self.num_context))
        object.__setattr__(self, "num_target", int(self.num_target))


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


_SPEC_FIELDS = ("num_blocks", "spatial_scale", "temporal_scale", "aspect_ratio", "num_context", "num_target")


def specs_from_config(types: Mapping[str, Any]) -> list[MaskSpec]:
    """``config.mask.types`` (name -> fields, as `jepa.config.mask_type` declares them) as MaskSpecs, in the
    config's iteration order (a ConfigDict iterates sorted by name), the same order as ``config.mask.types.keys()``
    used for the predictor's mask index."""
    specs = []
    for name, t in types.items():
        missing = [f for f in _SPEC_FIELDS if f not in t]
        if missing:
            raise ValueError(f"config.mask.types.{name}: missing field(s) {missing} (build mask types with "
                             "jepa.config.mask_type)")
        specs.append(MaskSpec(name=name, **{f: t[f] for f in _SPEC_FIELDS}))
    return specs


def clip_token_grid(config) -> tuple[int, int, int]:
    """(T', H', W') token grid of the configured clips (``config.data``) for the configured encoder
    (``config.model.encoder``); ValueError when the sizes do not divide."""
    from jepa.models.vit import token_grid  # imported here: spawned data workers draw masks without jax/flax

    e = config.model.encoder
    return tuple(int(x) for x in token_grid(int(config.data.num_frames), int(config.data.resolution),
                                            int(e.patch_size), int(e.tubelet_size)))


class MultiBlockMasker:
    """Draws multi-block 3D masks with fixed per-type token counts (see the module docstring)."""

    def __init__(self, grid: tuple[int, int, int], specs: Sequence[MaskSpec], length_quantile: float = 0.1):
        grid = tuple(grid) if isinstance(grid, (tuple, list)) else grid
        if not isinstance(grid, tuple) or len(grid) != 3 or not all(_is_int(g) and g >= 1 for g in grid):
            raise ValueError(f"grid must be three positive integers (T', H', W'), got {grid!r}")
        self.grid = tuple(int(g) for g in grid)
        self.num_tokens = int(np.prod(self.grid))
        if self.num_tokens < 2:
            raise ValueError(f"grid {self.grid} is too small: a mask needs at least 2 tokens (1 context, 1 target)")
        if not _is_real(length_quantile) or not 0.0 <= length_quantile <= 1.0:
            raise ValueError(f"length_quantile must be in [0, 1], got {length_quantile!r}")
        self.length_quantile = float(length_quantile)
        specs = list(specs)
        if not specs:
            raise ValueError("specs must hold at least one MaskSpec")
        names = [s.name for s in specs if isinstance(s, MaskSpec)]
        if len(names) != len(specs):
            raise ValueError(f"specs must be MaskSpec instances, got {[type(s).__name__ for s in specs]}")
        if len(set(names)) != len(names):
            raise ValueError(f"specs: mask names must be unique, got {names}")
        T, H, W = self.grid
        for s in specs:
            if int(H * W * s.spatial_scale) < 1:
                raise ValueError(f"grid {self.grid} is too small for mask {s.name!r}: spatial_scale "
                                 f"{s.spatial_scale} of {H}x{W} keeps no token (int(H*W*spatial_scale) = 0)")
            if s.num_context and s.num_target and s.num_context + s.num_target > self.num_tokens:
                raise ValueError(f"mask {s.name!r}: num_context + num_target = {s.num_context} + {s.num_target} "
                                 f"exceeds the {self.num_tokens} tokens of grid {self.grid}")
            for field in ("num_context", "num_target"):
                if getattr(s, field) >= self.num_tokens:
                    raise ValueError(f"mask {s.name!r}: {field} = {getattr(s, field)} leaves no token for the "
                                     f"other list in grid {self.grid} ({self.num_tokens} tokens)")
        self.specs = tuple(specs)
        self._spec = {s.name: s for s in specs}
        self.lengths: dict[str, tuple[int, int]] = {s.name: self._fix_lengths(s) for s in specs}

    @classmethod
    def from_config(cls, mask_config, grid: tuple[int, int, int]) -> MultiBlockMasker:
        """From ``config.mask`` (``types`` and ``length_quantile``)."""
        return cls(grid, specs_from_config(mask_config.types), length_quantile=float(mask_config.length_quantile))

    # ---------------------------------------------------------------- drawing
    def block_size(self, name: str, rng: np.random.Generator) -> tuple[int, int, int]:
        """One (t, h, w) block size for mask ``name`` (drawn once per call in the reference)."""
        s = self._spec[name]
        T, H, W = self.grid
        ar = float(rng.uniform(*s.aspect_ratio))
        keep = int(H * W * s.spatial_scale)
        h = min(max(int(round(math.sqrt(keep * ar))), 1), H)
        w = min(max(int(round(math.sqrt(keep / ar))), 1), W)
        t = min(max(int(T * s.temporal_scale), 1), T)
        return t, h, w

    def _positions(self, n: int, k: int, size, rng) -> np.ndarray:
        """Union of k blocks of ``size`` at uniform positions, for n samples -> bool [n, T, H, W]."""
        T, H, W = self.grid
        t, h, w = size
        start = rng.integers(0, T - t + 1, size=(n, k, 1))
        top = rng.integers(0, H - h + 1, size=(n, k, 1))
        left = rng.integers(0, W - w + 1, size=(n, k, 1))
        ts, hs, ws = np.arange(T), np.arange(H), np.arange(W)
        tm = (ts >= start) & (ts < start + t)                     # [n, k, T]
        hm = (hs >= top) & (hs < top + h)                         # [n, k, H]
        wm = (ws >= left) & (ws < left + w)                       # [n, k, W]
        sm = hm[:, :, :, None] & wm[:, :, None, :]                # [n, k, H, W]
        if t == T:                                                # full temporal extent: spatial union only
            return np.broadcast_to(sm.any(axis=1)[:, None], (n, T, H, W))
        return (tm[:, :, :, None, None] & sm[:, :, None]).any(axis=1)

    def draw_blocks(self, name: str, batch_size: int, rng: np.random.Generator,
                    size: tuple[int, int, int] | None = None) -> np.ndarray:
        """The reference procedure before any length fixing: the target union, bool [B, T', H', W']."""
        s = self._spec[name]
        if size is None:
            size = self.block_size(name, rng)
        union = np.array(self._positions(batch_size, s.num_blocks, size, rng))
        for _ in range(_EMPTY_REDRAWS):                           # an empty context is redrawn
            empty = np.flatnonzero(union.reshape(batch_size, -1).all(axis=1))
            if empty.size == 0:
                break
            union[empty] = self._positions(empty.size, s.num_blocks, size, rng)
        return union

    def _select(self, union: np.ndarray, nc: int, nt: int, rng) -> tuple[np.ndarray, np.ndarray]:
        """Fixed-length, disjoint, sorted context/target index lists from target unions [B, N] (see docstring)."""
        b, n = union.shape
        key = rng.random((b, n))                                  # uniform ranks: uniformly random subsets
        ctx_key = key + union                                     # complement tokens first, then union tokens
        ctx = np.argpartition(ctx_key, nc - 1, axis=1)[:, :nc]
        tgt_key = key + ~union                                    # union tokens first, then leftover complement
        np.put_along_axis(tgt_key, ctx, np.inf, axis=1)           # never a context token
        tgt = np.argpartition(tgt_key, nt - 1, axis=1)[:, :nt]
        ctx.sort(axis=1)
        tgt.sort(axis=1)
        return ctx.astype(np.int32), tgt.astype(np.int32)

    def sample(self, name: str, batch_size: int, rng: np.random.Generator):
        """(union bool [B, N], context_idx int32 [B, Nc], target_idx int32 [B, Nt]) for one mask type."""
        union = self.draw_blocks(name, batch_size, rng).reshape(batch_size, self.num_tokens)
        ctx, tgt = self._select(union, *self.lengths[name], rng)
        return union, ctx, tgt

    def __call__(self, batch_size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """{"<name>/context_idx": int32 [B, Nc], "<name>/target_idx": int32 [B, Nt]} for every mask type."""
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        out = {}
        for s in self.specs:
            _, ctx, tgt = self.sample(s.name, int(batch_size), rng)
            out[f"{s.name}/context_idx"] = ctx
            out[f"{s.name}/target_idx"] = tgt
        return out

    # ---------------------------------------------------------------- lengths
    def _fix_lengths(self, s: MaskSpec) -> tuple[int, int]:
        """Explicit counts, or the length_quantile of the Monte-Carlo sizes; always >= 1 and summing <= N."""
        n = self.num_tokens
        nc, nt = s.num_context, s.num_target
        if not (nc and nt):
            rng = np.random.default_rng(_MC_SEED)
            sizes = []
            for _ in range(_MC_SAMPLES // _MC_BATCH):
                sizes.append(self.draw_blocks(s.name, _MC_BATCH, rng).reshape(_MC_BATCH, -1).sum(axis=1))
            tgt_sizes = np.concatenate(sizes)
            q = self.length_quantile
            auto_nc = int(np.floor(np.quantile(n - tgt_sizes, q)))
            auto_nt = int(np.floor(np.quantile(tgt_sizes, q)))
            if nc:
                auto_nt = min(auto_nt, n - nc)
            elif nt:
                auto_nc = min(auto_nc, n - nt)
            nc, nt = nc or max(auto_nc, 1), nt or max(auto_nt, 1)
            if nc + nt > n:                                       # only for quantiles > 0.5: shrink both
                excess = nc + nt - n
                cut = int(math.ceil(excess * nc / (nc + nt)))
                nc, nt = max(nc - cut, 1), max(nt - (excess - cut), 1)
                if nc + nt > n:
                    nc, nt = max(n - nt, 1), n - max(n - nt, 1)
        return nc, nt


def make_masker(config):
    """The masker of a run: ``config.mask`` on the token grid of its clips (`clip_token_grid`); with several
    observation channels (``config.model.channels``) a `jepa.models.channels.ChannelMasker` over channels x time."""
    channels = tuple(config.model.get("channels", ("video",)))
    if len(channels) > 1:
        from jepa.models.channels import ChannelMasker
        return ChannelMasker(clip_token_grid(config), specs_from_config(config.mask.types), channels,
                             length_quantile=float(config.mask.length_quantile),
                             dropout=float(config.mask.get("channel_dropout", 0.0)))
    return MultiBlockMasker.from_config(config.mask, clip_token_grid(config))


def mask_lengths(config) -> dict[str, tuple[int, int]]:
    """name -> (num_context, num_target): the static token counts every batch of a run carries."""
    return dict(make_masker(config).lengths)


def describe(masker: MultiBlockMasker, batch_size: int = 32, num_batches: int = 64, seed: int = 0) -> dict:
    """Statistics of the static scheme against the underlying block procedure, per mask type.

    Per name: token counts and fractions, mean raw (reference-procedure) context/target sizes, how many tokens
    the static lengths moved between lists (``filled_*``: mean per sample; ``*_fill_rate``: fraction of samples
    touched), and positional frequencies: for ``target_freq_t`` [T'] / ``target_freq_hw`` [H', W'] the fraction
    of samples in which a token at that time step / spatial position is a target (averaged over the other axes);
    the same for the context and for the raw union (``raw_target_freq_*``); the bias ratios
    ``target_last_over_first_t`` and ``target_br_over_tl`` (bottom-right / top-left patch).
    """
    T, H, W = masker.grid
    n = masker.num_tokens
    rng = np.random.default_rng(seed)
    stats = {}
    for s in masker.specs:
        nc, nt = masker.lengths[s.name]
        tgt_cnt = np.zeros(n)
        ctx_cnt = np.zeros(n)
        raw_cnt = np.zeros(n)
        raw_sizes, fill_c, fill_t = [], [], []
        for _ in range(num_batches):
            union, ctx, tgt = masker.sample(s.name, batch_size, rng)
            rows = np.arange(batch_size)[:, None]
            raw_cnt += union.sum(axis=0)
            np.add.at(tgt_cnt, tgt.ravel(), 1)
            np.add.at(ctx_cnt, ctx.ravel(), 1)
            raw_sizes.append(union.sum(axis=1))
            fill_c.append(union[rows, ctx].sum(axis=1))           # union tokens moved into the context
            fill_t.append((~union[rows, tgt]).sum(axis=1))        # complement tokens moved into the target
        total = batch_size * num_batches
        raw_sizes, fill_c, fill_t = (np.concatenate(a) for a in (raw_sizes, fill_c, fill_t))
        tf, cf, rf = (c.reshape(T, H, W) / total for c in (tgt_cnt, ctx_cnt, raw_cnt))
        tft, tfhw = tf.mean(axis=(1, 2)), tf.mean(axis=0)
        stats[s.name] = dict(
            tokens=n, num_context=nc, num_target=nt, context_fraction=nc / n, target_fraction=nt / n,
            raw_context_mean=float(n - raw_sizes.mean()), raw_target_mean=float(raw_sizes.mean()),
            filled_context_mean=float(fill_c.mean()), filled_target_mean=float(fill_t.mean()),
            context_fill_rate=float((fill_c > 0).mean()), target_fill_rate=float((fill_t > 0).mean()),
            target_freq_t=tft, target_freq_hw=tfhw,
            context_freq_t=cf.mean(axis=(1, 2)), context_freq_hw=cf.mean(axis=0),
            raw_target_freq_t=rf.mean(axis=(1, 2)), raw_target_freq_hw=rf.mean(axis=0),
            target_last_over_first_t=float(tft[-1] / tft[0]) if tft[0] > 0 else float("nan"),
            target_br_over_tl=float(tfhw[-1, -1] / tfhw[0, 0]) if tfhw[0, 0] > 0 else float("nan"),
        )
    return stats
