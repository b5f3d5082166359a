"""Tests for jepa/masks.py: static shapes, validity, the block procedure, and the absence of positional bias."""

import math

import numpy as np
import pytest

from jepa.masks import MaskSpec, MultiBlockMasker, describe, specs_from_config

GRID = (8, 16, 16)          # 16 frames x 256 px, tubelet 2, patch 16: 2048 tokens
SMALL = (4, 8, 8)
DEFAULT_SPECS = (MaskSpec("short", 8, 0.15), MaskSpec("long", 2, 0.7))


# ------------------------------------------------------------------ reference-style helpers (independent code)
def reference_unions(grid, spec, batch_size, rng):
    """The plain reference procedure, written with loops: one block size per batch, positions per sample and
    block, target = union, empty context redrawn.  -> bool [B, T, H, W]."""
    T, H, W = grid
    ar = rng.uniform(*spec.aspect_ratio)
    keep = int(H * W * spec.spatial_scale)
    h = min(max(int(round(math.sqrt(keep * ar))), 1), H)
    w = min(max(int(round(math.sqrt(keep / ar))), 1), W)
    t = max(1, int(T * spec.temporal_scale))
    out = np.zeros((batch_size, T, H, W), bool)
    for b in range(batch_size):
        while True:
            m = np.zeros((T, H, W), bool)
            for _ in range(spec.num_blocks):
                s, top, left = rng.integers(0, T - t + 1), rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
                m[s:s + t, top:top + h, left:left + w] = True
            if not m.all():
                break
        out[b] = m
    return out


def reference_truncate(unions):
    """Reference-style lengths: every sample's sorted lists cut to the batch minimum (highest indices dropped)."""
    u = unions.reshape(len(unions), -1)
    ctx = [np.flatnonzero(~r) for r in u]
    tgt = [np.flatnonzero(r) for r in u]
    nc, nt = min(map(len, ctx)), min(map(len, tgt))
    return np.stack([c[:nc] for c in ctx]), np.stack([t[:nt] for t in tgt])


def target_freq(grid, tgt_batches):
    """Per time step [T] and per spatial position [H, W] fraction of samples where the token is a target."""
    T, H, W = grid
    cnt = np.zeros(T * H * W)
    total = 0
    for tgt in tgt_batches:
        np.add.at(cnt, tgt.ravel(), 1)
        total += len(tgt)
    f = cnt.reshape(T, H, W) / total
    return f.mean(axis=(1, 2)), f.mean(axis=0)


def quadrant_ratio(freq_hw):
    """Bottom-right over top-left quadrant of a spatial frequency map."""
    H, W = freq_hw.shape
    return freq_hw[H // 2:, W // 2:].sum() / freq_hw[:H // 2, :W // 2].sum()


@pytest.fixture(scope="module")
def masker():
    return MultiBlockMasker(GRID, DEFAULT_SPECS, length_quantile=0.1)


# ------------------------------------------------------------------ shapes and validity
def test_static_shapes_and_valid_indices():
    m = MultiBlockMasker(SMALL, DEFAULT_SPECS)
    n = m.num_tokens
    rng = np.random.default_rng(0)
    for b in (1, 3, 7, 3, 16):
        out = m(b, rng)
        assert sorted(out) == ["long/context_idx", "long/target_idx", "short/context_idx", "short/target_idx"]
        for s in DEFAULT_SPECS:
            nc, nt = m.lengths[s.name]
            ctx, tgt = out[f"{s.name}/context_idx"], out[f"{s.name}/target_idx"]
            assert ctx.shape == (b, nc) and tgt.shape == (b, nt)
            assert ctx.dtype == np.int32 and tgt.dtype == np.int32
            for a in (ctx, tgt):
                assert a.min() >= 0 and a.max() < n
                assert (np.diff(a, axis=1) > 0).all()             # sorted and unique
            for c, t in zip(ctx, tgt, strict=True):
                assert np.intersect1d(c, t).size == 0             # disjoint


def test_lengths_auto_are_valid_and_quantile(masker):
    n = masker.num_tokens
    rng = np.random.default_rng(5)
    for s in DEFAULT_SPECS:
        nc, nt = masker.lengths[s.name]
        assert nc >= 1 and nt >= 1 and nc + nt <= n
        sizes = np.concatenate([reference_unions(GRID, s, 16, rng).reshape(16, -1).sum(1) for _ in range(25)])
        assert 0.02 <= np.mean(sizes < nt) <= 0.2                 # ~10% of samples need a target fill
        assert 0.02 <= np.mean(n - sizes < nc) <= 0.2             # ~10% need a context fill


def test_static_lists_follow_the_union(masker):
    """Subsample when there is enough, fill only when there is not."""
    rng = np.random.default_rng(1)
    for s in DEFAULT_SPECS:
        nc, nt = masker.lengths[s.name]
        for _ in range(4):
            union, ctx, tgt = masker.sample(s.name, 32, rng)
            for u, c, t in zip(union, ctx, tgt, strict=True):
                comp = np.flatnonzero(~u)
                if comp.size >= nc:
                    assert not u[c].any()
                else:
                    assert np.isin(comp, c).all()
                if u.sum() - u[c].sum() >= nt:
                    assert u[t].all()


def test_single_block_is_one_box():
    """num_blocks=1, no subsampling: the target is one (t, h, w) box spanning the temporal extent."""
    T, H, W = SMALL
    spec = MaskSpec("one", 1, 0.25, temporal_scale=0.5, aspect_ratio=(1.0, 1.0), num_context=256 - 32,
                    num_target=32)
    m = MultiBlockMasker(SMALL, [spec])
    assert m.lengths["one"] == (224, 32)
    out = m(16, np.random.default_rng(2))
    starts = set()
    for c, t in zip(out["one/context_idx"], out["one/target_idx"], strict=True):
        tt, hh, ww = np.unravel_index(t, (T, H, W))
        assert (tt.max() - tt.min() + 1, hh.max() - hh.min() + 1, ww.max() - ww.min() + 1) == (2, 4, 4)
        np.testing.assert_array_equal(np.sort(np.concatenate([c, t])), np.arange(T * H * W))
        starts.add((tt.min(), hh.min(), ww.min()))
    assert len(starts) > 4                                        # positions vary per sample


def test_block_size_shared_across_batch_and_drawn_per_call():
    spec = MaskSpec("one", 1, 0.3, temporal_scale=0.75, aspect_ratio=(0.5, 2.0))
    m = MultiBlockMasker((4, 12, 12), [spec])
    rng = np.random.default_rng(3)
    sizes = set()
    for _ in range(20):
        union = m.draw_blocks("one", 8, rng)
        dims = set()
        for u in union:
            tt, hh, ww = np.nonzero(u)
            d = (np.ptp(tt) + 1, np.ptp(hh) + 1, np.ptp(ww) + 1)
            assert np.prod(d) == u.sum()                          # a full box
            dims.add(tuple(int(x) for x in d))
        assert len(dims) == 1                                     # one size for the whole batch
        (d,) = dims
        assert d[0] == 3                                          # int(4 * 0.75)
        sizes.add(d)
    assert len(sizes) > 1                                         # a new size each call


def test_block_size_formula():
    m = MultiBlockMasker(GRID, DEFAULT_SPECS)
    rng = np.random.default_rng(4)
    seen = set()
    for _ in range(200):
        t, h, w = m.block_size("short", rng)
        assert t == 8 and 1 <= h <= 16 and 1 <= w <= 16
        seen.add((h, w))
    keep = int(256 * 0.15)
    expect = {(min(round(math.sqrt(keep * a)), 16), min(round(math.sqrt(keep / a)), 16))
              for a in np.linspace(0.75, 1.5, 2001)}
    assert seen <= expect and len(seen) >= 3


def test_coverage_matches_reference_procedure(masker):
    """Our vectorised draw has the same union size as the plain loop procedure; short ~ <= 1-(1-0.15)^8."""
    rng_a, rng_b = np.random.default_rng(6), np.random.default_rng(7)
    for s in DEFAULT_SPECS:
        ours = np.mean([masker.draw_blocks(s.name, 16, rng_a).mean() for _ in range(32)])
        ref = np.mean([reference_unions(GRID, s, 16, rng_b).mean() for _ in range(32)])
        assert abs(ours - ref) < 0.02, (s.name, ours, ref)
        nc, nt = masker.lengths[s.name]
        assert nt / masker.num_tokens < ours and nc / masker.num_tokens < 1 - ours
    short = np.mean([masker.draw_blocks("short", 16, rng_a).mean() for _ in range(32)])
    assert 0.55 < short < 1 - (1 - 0.15) ** 8 + 0.01             # overlaps and edges make it a bit lower


def test_determinism():
    a = MultiBlockMasker(GRID, DEFAULT_SPECS)
    b = MultiBlockMasker(GRID, DEFAULT_SPECS)
    assert a.lengths == b.lengths
    x, y = a(4, np.random.default_rng(42)), b(4, np.random.default_rng(42))
    z = a(4, np.random.default_rng(43))
    for k in x:
        np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x[k], z[k]) for k in x)


# ------------------------------------------------------------------ positional bias
def test_static_scheme_has_no_positional_bias(masker):
    stats = describe(masker, batch_size=32, num_batches=24, seed=0)
    for s in DEFAULT_SPECS:
        st = stats[s.name]
        ft, fhw = st["target_freq_t"], st["target_freq_hw"]
        assert np.abs(ft / ft.mean() - 1).max() < 0.03, ft        # full temporal extent: flat in time
        assert 0.9 < st["target_last_over_first_t"] < 1.1
        assert 0.9 < quadrant_ratio(fhw) < 1.1
        raw = st["raw_target_freq_hw"]                            # the shape follows the block placement
        assert np.abs(fhw / fhw.mean() - raw / raw.mean()).mean() < 0.05
        assert abs(st["context_freq_t"][-1] / st["context_freq_t"][0] - 1) < 0.1
        assert st["target_fraction"] == st["num_target"] / 2048


def test_reference_truncation_is_biased():
    """The same measure catches the reference's batch-minimum truncation (so the test above can fail)."""
    rng = np.random.default_rng(8)
    for s in DEFAULT_SPECS:
        tgts = [reference_truncate(reference_unions(GRID, s, 24, rng))[1] for _ in range(12)]
        ft, fhw = target_freq(GRID, tgts)
        assert ft[-1] / ft[0] < 0.8, ft
        assert not np.abs(ft / ft.mean() - 1).max() < 0.03


# ------------------------------------------------------------------ lengths and config
def test_explicit_and_partial_lengths():
    m = MultiBlockMasker(SMALL, [MaskSpec("a", 8, 0.15, num_context=50, num_target=100),
                                 MaskSpec("b", 2, 0.7, num_context=200),
                                 MaskSpec("c", 2, 0.7, num_target=250)])
    assert m.lengths["a"] == (50, 100)
    assert m.lengths["b"][0] == 200 and 1 <= m.lengths["b"][1] <= 56
    assert m.lengths["c"][1] == 250 and 1 <= m.lengths["c"][0] <= 6
    out = m(5, np.random.default_rng(0))
    assert out["a/context_idx"].shape == (5, 50) and out["a/target_idx"].shape == (5, 100)


def test_degenerate_spec_always_full_and_high_quantile():
    """A block covering the whole grid never leaves a context: the fill still gives valid, disjoint lists."""
    m = MultiBlockMasker((2, 2, 2), [MaskSpec("all", 3, 1.0, aspect_ratio=(1.0, 1.0))], length_quantile=0.9)
    nc, nt = m.lengths["all"]
    assert nc >= 1 and nt >= 1 and nc + nt <= 8
    out = m(4, np.random.default_rng(0))
    for c, t in zip(out["all/context_idx"], out["all/target_idx"], strict=True):
        assert np.intersect1d(c, t).size == 0
    m2 = MultiBlockMasker(SMALL, DEFAULT_SPECS, length_quantile=1.0)
    for nc, nt in m2.lengths.values():
        assert nc + nt <= 256


def test_from_config():
    from jepa.config import base_config

    cfg = base_config().mask
    specs = specs_from_config(cfg.types)
    assert [s.name for s in specs] == list(cfg.types.keys())     # the config's (ConfigDict: sorted) order
    assert sorted((s.name, s.num_blocks, s.spatial_scale) for s in specs) == [("long", 2, 0.7), ("short", 8, 0.15)]
    m = MultiBlockMasker.from_config(cfg, GRID)
    assert m.lengths == MultiBlockMasker(GRID, DEFAULT_SPECS, cfg.length_quantile).lengths


def test_run_geometry_from_config():
    """A run's token grid follows its clips and encoder; its masker and static lengths follow config.mask."""
    from jepa.config import base_config
    from jepa.masks import clip_token_grid, make_masker, mask_lengths

    c = base_config()                                       # 16 frames x 256 px, patch 16, tubelet 2
    assert clip_token_grid(c) == GRID
    c.data.num_frames, c.data.resolution, c.model.encoder.patch_size = 8, 64, 8
    assert clip_token_grid(c) == SMALL
    c.mask.length_quantile = 0.3
    m = make_masker(c)
    assert m.grid == SMALL and m.length_quantile == 0.3
    assert mask_lengths(c) == MultiBlockMasker(SMALL, specs_from_config(c.mask.types), 0.3).lengths
    c.data.resolution = 60
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        clip_token_grid(c)


def test_specs_from_config_names_a_missing_field():
    with pytest.raises(ValueError, match=r"config.mask.types.odd: missing field\(s\) \['temporal_scale'"):
        specs_from_config({"odd": dict(num_blocks=2, spatial_scale=0.5, aspect_ratio=(1, 1), num_context=0,
                                       num_target=0)})


def test_objectives_do_not_import_the_data_pipeline():
    """Token geometry lives in jepa.masks / jepa.models: the objectives (at import or inside any function) never
    reach for the data pipeline, so the path data -> objective -> train has no back edge."""
    import ast
    import os
    import pathlib
    import subprocess
    import sys

    folder = pathlib.Path(__file__).resolve().parents[1] / "jepa" / "objectives"
    files = sorted(folder.glob("*.py"))
    assert len(files) >= 3
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            assert not any(n.startswith("jepa.data.pipeline") for n in names), (path.name, node.lineno, names)
    code = ("import sys; from jepa import config, objectives; c = config.base_config(); "
            "c.data.num_frames, c.data.resolution = 4, 64; objectives.build(c); "
            "objectives.VJEPA.step_flops(c); "
            "assert 'jepa.data.pipeline' not in sys.modules, 'jepa.data.pipeline was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, field", [
    (dict(spatial_scale=0.0), "spatial_scale"),
    (dict(spatial_scale=1.5), "spatial_scale"),
    (dict(temporal_scale=0.0), "temporal_scale"),
    (dict(temporal_scale=1.01), "temporal_scale"),
    (dict(num_blocks=0), "num_blocks"),
    (dict(num_blocks=1.5), "num_blocks"),
    (dict(aspect_ratio=(1.5, 0.75)), "aspect_ratio"),
    (dict(aspect_ratio=(0.0, 1.0)), "aspect_ratio"),
    (dict(aspect_ratio=3), "aspect_ratio"),
    (dict(num_context=-1), "num_context"),
    (dict(num_target=2.5), "num_target"),
    (dict(name=""), "name"),
])
def test_bad_spec_raises(kwargs, field):
    args = dict(name="m", num_blocks=2, spatial_scale=0.5) | kwargs
    with pytest.raises(ValueError, match=field):
        MaskSpec(**args)


@pytest.mark.parametrize("grid, specs, kwargs, match", [
    ((1, 1, 1), DEFAULT_SPECS, {}, "grid"),
    ((0, 8, 8), DEFAULT_SPECS, {}, "grid"),
    ((8, 8), DEFAULT_SPECS, {}, "grid"),
    ((1, 2, 2), [MaskSpec("m", 1, 0.1)], {}, "grid .* too small"),
    (SMALL, [MaskSpec("m", 1, 0.5, num_context=200, num_target=100)], {}, "num_context \\+ num_target"),
    (SMALL, [MaskSpec("m", 1, 0.5, num_context=256)], {}, "num_context"),
    (SMALL, [MaskSpec("m", 1, 0.5), MaskSpec("m", 2, 0.5)], {}, "unique"),
    (SMALL, [], {}, "specs"),
    (SMALL, DEFAULT_SPECS, dict(length_quantile=1.5), "length_quantile"),
])
def test_bad_masker_raises(grid, specs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiBlockMasker(grid, specs, **kwargs)


def test_bad_call_raises():
    m = MultiBlockMasker(SMALL, DEFAULT_SPECS)
    with pytest.raises(ValueError, match="batch_size"):
        m(0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="rng"):
        m(2, 0)
