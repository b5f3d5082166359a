"""Tests for jepa/data/transforms.py: boxes in range, pixel-exact crops, flips, normalisation, odd inputs."""

import math

import numpy as np
import pytest

from jepa.data import transforms as tr


def rand_clip(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def ramp_clip(t, h, w):
    """float32 clip whose channel 0 is the column index and channel 1 the row index (linear in both)."""
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    frame = np.stack([xx, yy, np.zeros_like(xx)], -1)
    return np.repeat(frame[None], t, axis=0)


# ------------------------------------------------------------------ shapes and dtypes
def test_shapes_and_dtypes():
    clip = rand_clip((16, 256, 340, 3))
    rng = np.random.default_rng(0)
    out = tr.random_resized_crop(clip, rng, 224)
    assert out.shape == (16, 224, 224, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert tr.center_crop_resize(clip, 224).shape == (16, 224, 224, 3)
    assert tr.hflip(out, rng, 1.0).shape == out.shape
    x = tr.normalize(out)
    assert x.shape == out.shape and x.dtype == np.float32
    f = tr.random_resized_crop(clip.astype(np.float32), rng, 32)
    assert f.shape == (16, 32, 32, 3) and f.dtype == np.float32
    y = tr.train_transform(clip, rng, 64)
    assert y.shape == (16, 64, 64, 3) and y.dtype == np.float32
    assert tr.eval_transform(clip, 64, short_side=73).shape == (16, 64, 64, 3)


# ------------------------------------------------------------------ the random box
def test_box_area_and_aspect_in_range():
    H, W = 256, 340
    rng = np.random.default_rng(1)
    areas, aspects = [], []
    for _ in range(400):
        top, left, h, w = tr.random_resized_crop_box(H, W, rng, (0.3, 1.0), (0.75, 1.35))
        assert 0 <= top and 0 <= left and top + h <= H and left + w <= W and h >= 1 and w >= 1
        areas.append(h * w / (H * W))
        aspects.append(w / h)
    areas, aspects = np.array(areas), np.array(aspects)
    assert areas.min() >= 0.3 * 0.99 and areas.max() <= 1.0
    assert aspects.min() >= 0.75 * 0.99 and aspects.max() <= 1.35 * 1.01
    assert areas.min() < 0.35 and areas.max() > 0.9                       # the whole range is used
    assert aspects.min() < 0.8 and aspects.max() > 1.28
    logs = np.log(aspects)                                                 # log-uniform: symmetric in log space
    mid = (math.log(0.75) + math.log(1.35)) / 2
    assert 0.35 < np.mean(logs < mid) < 0.65


def test_box_fallback_is_centre_crop_with_clamped_aspect():
    rng = np.random.default_rng(2)
    assert tr.random_resized_crop_box(10, 400, rng) == (0, (400 - 14) // 2, 10, 14)   # too wide: h=H, w=H*1.35
    assert tr.random_resized_crop_box(400, 10, rng) == ((400 - 13) // 2, 0, 13, 10)   # too tall: w=W, h=W/0.75
    assert tr.random_resized_crop_box(1, 1, rng) == (0, 0, 1, 1)


def test_crop_uses_the_box_pixel_exactly():
    """random_resized_crop == crop_resize(box drawn with the same generator state); linear maps are exact."""
    clip = ramp_clip(2, 60, 90)
    for seed in range(5):
        box = tr.random_resized_crop_box(60, 90, np.random.default_rng(seed))
        out = tr.random_resized_crop(clip, np.random.default_rng(seed), 32, interpolation="linear")
        np.testing.assert_array_equal(out, tr.crop_resize(clip, box, (32, 32), "linear"))
        top, left, h, w = box
        j = np.arange(32, dtype=np.float32)
        expect_x = left + (j + 0.5) * w / 32 - 0.5                         # pixel-centre mapping
        expect_y = top + (j + 0.5) * h / 32 - 0.5
        inner = slice(2, 30)                                               # away from the replicated border
        np.testing.assert_allclose(out[0, 5, inner, 0], expect_x[inner], atol=2e-3)
        np.testing.assert_allclose(out[1, inner, 5, 1], expect_y[inner], atol=2e-3)


def test_auto_downscale_stays_aligned():
    """The pyramid + bilinear path keeps geometry within a source pixel, and an unresized box is a plain copy."""
    clip = ramp_clip(1, 300, 300)
    out = tr.crop_resize(clip, (10, 20, 280, 280), (64, 64))               # 4.4x: two pyrDown steps
    j = np.arange(64, dtype=np.float32)
    np.testing.assert_allclose(out[0, 32, 8:56, 0], (20 + (j + 0.5) * 280 / 64 - 0.5)[8:56], atol=1.5)
    u = rand_clip((3, 50, 60, 3))
    np.testing.assert_array_equal(tr.crop_resize(u, (5, 7, 20, 30), (20, 30)), u[:, 5:25, 7:37])


def test_one_crop_for_all_frames():
    base = rand_clip((1, 64, 80, 3), seed=3)
    out = tr.random_resized_crop(np.concatenate([base] * 3), np.random.default_rng(4), 40)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])
    shifted = np.concatenate([base, base // 2])                            # frame 1 = frame 0 halved
    o = tr.random_resized_crop(shifted, np.random.default_rng(4), 40, interpolation="nearest")
    np.testing.assert_array_equal(o[1], o[0] // 2)                         # same source pixels in both frames


# ------------------------------------------------------------------ centre crop
def test_center_crop_resize():
    clip = rand_clip((2, 256, 340, 3))
    np.testing.assert_array_equal(tr.center_crop_resize(clip, 224, short_side=256), clip[:, 16:240, 58:282])
    assert tr.center_crop_box(256, 340, 224) == (0, 42, 256, 256)
    assert tr.center_crop_box(340, 256, 224, short_side=256) == (58, 16, 224, 224)   # portrait
    ramp = ramp_clip(1, 100, 200)
    out = tr.center_crop_resize(ramp, 50, interpolation="linear")           # box (0, 50, 100, 100)
    np.testing.assert_allclose(out[0, 25, 2:48, 0], (50 + (np.arange(50) + 0.5) * 2 - 0.5)[2:48], atol=2e-3)


# ------------------------------------------------------------------ flip
def test_hflip():
    clip = rand_clip((4, 9, 11, 3))
    np.testing.assert_array_equal(tr.hflip(clip, np.random.default_rng(0), p=1.0), clip[:, :, ::-1])
    assert tr.hflip(clip, np.random.default_rng(0), p=0.0) is clip
    gray = rand_clip((2, 5, 7, 1))
    np.testing.assert_array_equal(tr.hflip(gray, np.random.default_rng(0), p=1.0), gray[:, :, ::-1])
    rng = np.random.default_rng(5)
    flips = [not np.array_equal(tr.hflip(clip, rng), clip) for _ in range(200)]
    assert 0.38 < np.mean(flips) < 0.62
    view = clip[:, 1:8, 2:10]                                              # non-contiguous input
    np.testing.assert_array_equal(tr.hflip(view, rng, 1.0), view[:, :, ::-1])


# ------------------------------------------------------------------ normalisation
def test_normalize_values_and_round_trip():
    every = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1).reshape(1, 16, 16, 3)
    x = tr.normalize(every)
    expect = (every.astype(np.float64) / 255.0 - tr.IMAGENET_MEAN) / tr.IMAGENET_STD
    np.testing.assert_allclose(x, expect, atol=1e-5)
    np.testing.assert_array_equal(tr.denormalize(x), every)                # exact for every value and channel
    clip = rand_clip((3, 7, 5, 3))
    np.testing.assert_array_equal(tr.denormalize(tr.normalize(clip)), clip)
    assert abs(float(tr.normalize(clip).mean())) < 3
    assert tr.denormalize(np.full((2, 3), 100.0, np.float32)).max() == 255  # clipped, not wrapped
    view = rand_clip((2, 8, 9, 3))[:, ::2]                                 # non-contiguous
    np.testing.assert_allclose(tr.normalize(view), (view / 255.0 - tr.IMAGENET_MEAN) / tr.IMAGENET_STD, atol=1e-5)


# ------------------------------------------------------------------ determinism
def test_determinism():
    clip = rand_clip((4, 64, 90, 3))
    a = tr.train_transform(clip, np.random.default_rng(7), 48)
    b = tr.train_transform(clip, np.random.default_rng(7), 48)
    c = tr.train_transform(clip, np.random.default_rng(8), 48)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ------------------------------------------------------------------ odd and tiny inputs
@pytest.mark.parametrize("shape, size", [
    ((2, 8, 8, 3), 64),          # tiny input, upscaled
    ((1, 1, 1, 3), 4),           # a single pixel
    ((1, 255, 341, 3), 224),     # odd sizes, single frame
    ((3, 7, 13, 3), 5),
    ((2, 31, 17, 1), 16),        # single channel
    ((2, 600, 900, 3), 64),      # large downscale (pyramid path)
])
def test_odd_and_tiny_inputs(shape, size):
    clip = rand_clip(shape)
    rng = np.random.default_rng(0)
    out = tr.random_resized_crop(clip, rng, size)
    assert out.shape == (shape[0], size, size, shape[3]) and out.dtype == np.uint8
    assert tr.center_crop_resize(clip, size).shape == out.shape
    if shape[1:3] == (1, 1):
        assert (out == clip[:, :1, :1]).all()                              # upscaling a constant stays constant


def test_grayscale_like_clips():
    gray = rand_clip((3, 20, 30))
    rgb = tr.to_rgb(gray)
    assert rgb.shape == (3, 20, 30, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert tr.to_rgb(gray[..., None]).shape == (3, 20, 30, 3)
    out = tr.train_transform(gray, np.random.default_rng(0), 16)
    assert out.shape == (3, 16, 16, 3)
    d = tr.denormalize(out)
    np.testing.assert_array_equal(d[..., 0], d[..., 1])                    # still grey after the round trip
    with pytest.raises(ValueError, match="to_rgb"):
        tr.normalize(gray[..., None])


# ------------------------------------------------------------------ errors
def test_bad_inputs_raise():
    clip = rand_clip((2, 16, 16, 3))
    rng = np.random.default_rng(0)
    cases = [
        (lambda: tr.random_resized_crop(clip, rng, 0), "size"),
        (lambda: tr.random_resized_crop(clip, rng, 8, scale=(0.0, 1.0)), "scale"),
        (lambda: tr.random_resized_crop(clip, rng, 8, scale=(0.5, 1.5)), "scale"),
        (lambda: tr.random_resized_crop(clip, rng, 8, scale=(0.9, 0.3)), "scale"),
        (lambda: tr.random_resized_crop(clip, rng, 8, aspect=(1.3, 0.7)), "aspect"),
        (lambda: tr.random_resized_crop(clip[0], rng, 8), r"\[T, H, W, C\]"),
        (lambda: tr.random_resized_crop(clip.astype(np.int64), rng, 8), "dtype"),
        (lambda: tr.random_resized_crop(rand_clip((1, 4, 4, 6)), rng, 8), "channels"),
        (lambda: tr.random_resized_crop(clip, rng, 8, interpolation="magic"), "interpolation"),
        (lambda: tr.crop_resize(clip, (10, 0, 8, 8), (4, 4)), "box"),
        (lambda: tr.center_crop_resize(clip, 8, short_side=4), "short_side"),
        (lambda: tr.hflip(clip, rng, p=1.5), "p must"),
        (lambda: tr.normalize(clip.astype(np.float32)), "uint8"),
        (lambda: tr.to_rgb(rand_clip((1, 4, 4, 2))), "1 or 3 channels"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
