"""FLOP formulas (hand counts and XLA's cost analysis), peak FLOP/s, collapse diagnostics, writers, timing."""

import glob
import json
import logging
import math
import os
import re
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jepa import metrics

# ---------------------------------------------------------------- FLOPs

def test_vit_flops_hand_count():
    # N=4, d=8, m=16: qkv 1536 + scores 256 + values 256 + out 512 + mlp 2048 = 4608 per block
    assert metrics.vit_forward_flops(4, 8, 1, 16) == 4608
    assert metrics.vit_forward_flops(4, 8, 2, 16) == 2 * 4608
    assert metrics.vit_forward_flops(4, 8, 1) == metrics.vit_forward_flops(4, 8, 1, 32)  # mlp default 4*width
    assert metrics.patch_embed_flops(10, 8, patch_size=2, tubelet_size=1, in_channels=1) == 2 * 10 * 4 * 8


def test_vjepa_step_flops_hand_count():
    enc = dict(width=8, depth=1, mlp_dim=16, patch_size=2, tubelet_size=1, in_channels=1)
    pred = dict(width=4, depth=1, mlp_dim=8)
    parts = metrics.vjepa_step_flops_breakdown(8, {"m": (4, 2)}, enc, pred, batch_size=2)
    # target: embed 512 + ViT(8 tokens) 10240; context: 3 * (embed of 4 kept patches 256 + 4608);
    # predictor: 3 * (256 + 2112 + 128)
    assert parts == {"target_encoder": 2 * 10752, "context_encoder": 2 * 14592, "predictor": 2 * 7488}
    assert metrics.vjepa_step_flops(8, [(4, 2)], enc, pred, 2) == 65664
    two = metrics.vjepa_step_flops(8, {"a": (4, 2), "b": (4, 2)}, enc, pred, 2)
    assert two == 65664 + 2 * (14592 + 7488)  # the target encoder runs once, the rest per mask type
    with pytest.raises(ValueError, match="mask_lengths"):
        metrics.vjepa_step_flops(8, {"m": (6, 4)}, enc, pred, 2)
    with pytest.raises(ValueError, match="predictor"):
        metrics.vjepa_step_flops(8, {"m": (4, 2)}, enc, {"width": 4}, 2)


def xla_flops(f, *args):
    cost = jax.jit(f).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return cost["flops"]


def _params(n_tok, d, m, key=0):
    k = jax.random.split(jax.random.key(key), 5)
    x = jax.random.normal(k[0], (n_tok, d))
    w = dict(qkv=jax.random.normal(k[1], (d, 3 * d)), out=jax.random.normal(k[2], (d, d)),
             w1=jax.random.normal(k[3], (d, m)), w2=jax.random.normal(k[4], (m, d)))
    return x, w


def _attention(x, w, heads, softmax):
    n, d = x.shape
    q, k, v = jnp.split(x @ w["qkv"], 3, axis=-1)
    q, k, v = (t.reshape(n, heads, d // heads).transpose(1, 0, 2) for t in (q, k, v))
    s = jnp.einsum("hqc,hkc->hqk", q, k)
    if softmax:
        s = jax.nn.softmax(s / math.sqrt(d // heads), axis=-1)
    o = jnp.einsum("hqk,hkc->hqc", s, v).transpose(1, 0, 2).reshape(n, d)
    return o @ w["out"]


def test_flops_match_xla_cost_analysis_matmuls_exactly():
    assert xla_flops(lambda a, b: a @ b, jnp.ones((8, 16)), jnp.ones((16, 4))) == 2 * 8 * 16 * 4
    x, w = _params(32, 64, 128)

    def block_matmuls_only(x, w):  # the counted parts, no elementwise work
        return _attention(x, w, 4, softmax=False), (x @ w["w1"]) @ w["w2"]

    assert xla_flops(block_matmuls_only, x, w) == metrics.vit_forward_flops(32, 64, 1, 128)


def test_flops_close_to_xla_for_a_full_block():
    x, w = _params(64, 64, 256)

    def ln(t):
        return (t - t.mean(-1, keepdims=True)) / jnp.sqrt(t.var(-1, keepdims=True) + 1e-6)

    def block(x, w):
        x = x + _attention(ln(x), w, 4, softmax=True)
        return x + jax.nn.gelu(ln(x) @ w["w1"]) @ w["w2"]

    counted, xla = metrics.vit_forward_flops(64, 64, 1, 256), xla_flops(block, x, w)
    assert counted <= xla <= 1.1 * counted  # elementwise work is the uncounted few percent


def _dot_flops(stablehlo: str) -> int:
    """2 x multiply-accumulates of every dot_general in a StableHLO module: 2 x |result| x |contracted dims|."""
    pattern = re.compile(r"contracting_dims = \[([\d, ]*)\] x .*: \(tensor<([\dx]+)x\w+>, tensor<[^>]*>\) -> "
                         r"tensor<([\dx]+)x\w+>")
    total = 0
    for line in stablehlo.splitlines():
        if "stablehlo.dot_general" in line:
            m = pattern.search(line)
            assert m, f"unparsed dot_general: {line.strip()}"
            contracted = [int(d) for d in m.group(1).split(",") if d.strip()]
            lhs = [int(d) for d in m.group(2).split("x")]
            out = [int(d) for d in m.group(3).split("x")]
            total += 2 * math.prod(out) * math.prod(lhs[d] for d in contracted)
    return total


def test_training_flops_match_the_matmuls_of_the_real_train_step():
    """training_flops (the MFU numerator) against an independent count: the matmuls in the program JAX builds for
    the gradient of the real V-JEPA loss, on a tiny config with the blocks unrolled (a scanned body would appear
    once for all blocks). The two must agree exactly, but for one term: the convention counts every backward as
    2 x forward, while the patch embedding's input is the video, which has no gradient, so its backward is 1 x.
    Dropping or miscounting any matmul in jepa/metrics.py breaks the equality. XLA's own cost analysis of the same
    program is then at most 8 % above the matmuls: the elementwise work (LayerNorm, softmax, GELU, RoPE, the loss)
    the convention leaves out, about 4 % at this width and less at real widths."""
    from conftest import load_config

    from jepa import masks, train
    from jepa.objectives.vjepa import VJEPA

    c = load_config("tiny")
    c.data.num_frames, c.data.resolution = 8, 32
    c.model.encoder.update(width=64, depth=2, heads=2, mlp_dim=256, patch_size=8, tubelet_size=2)
    c.model.predictor.update(width=32, depth=2, heads=2, num_mask_tokens=4)
    c.model.dtype, c.model.remat, c.model.scan = "float32", "none", False
    c.loss.variance_weight = c.loss.covariance_weight = c.loss.context_weight = 0.0   # no extra matmuls
    c.train.global_batch_size = b = 2
    grid = tuple(masks.clip_token_grid(c))
    lengths = masks.mask_lengths(c)
    objective = VJEPA.from_config(c, grid)
    params, ema = jax.eval_shape(lambda: objective.init(jax.random.key(0), c))
    batch = {"video": jax.ShapeDtypeStruct((b, 8, 32, 32, 3), jnp.uint8)}
    for name, (nc, nt) in lengths.items():
        batch[f"{name}/context_idx"] = jax.ShapeDtypeStruct((b, nc), jnp.int32)
        batch[f"{name}/target_idx"] = jax.ShapeDtypeStruct((b, nt), jnp.int32)
    lowered = jax.jit(jax.grad(lambda p, e, x: objective.loss(p, e, x)[0])).lower(params, ema, batch)
    program = lowered.as_text()
    assert "stablehlo.while" not in program and "stablehlo.convolution" not in program   # every matmul is a dot
    matmuls = _dot_flops(program)
    video_grad = b * sum(metrics.patch_embed_flops(nc, 64, 8, 2) for nc, _ in lengths.values())
    assert matmuls == train.training_flops(c, grid) - video_grad
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert matmuls <= cost["flops"] <= 1.08 * matmuls


def test_mfu():
    assert metrics.mfu(100e12, 0.5, 400e12) == pytest.approx(0.5)
    assert math.isnan(metrics.mfu(1.0, 0.0, 1.0))


# ---------------------------------------------------------------- peak FLOP/s

def test_nominal_table_lookup():
    assert metrics.nominal_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.nominal_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert metrics.nominal_peak_flops("NVIDIA H200") == 989e12
    assert metrics.nominal_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert metrics.nominal_peak_flops("TPU v4") == 275e12
    assert metrics.nominal_peak_flops("TPU v5 lite") == 197e12
    assert metrics.nominal_peak_flops("TPU v5p") == 459e12
    assert metrics.nominal_peak_flops("cpu") is None


def test_measured_peak_on_local_device():
    measured = metrics.measure_matmul_peak(jnp.float32, n=128, seconds=0.05)
    assert 1e6 < measured < 1e16
    assert metrics.device_peak_flops(override=123.0) == 123.0
    peak = metrics.device_peak_flops(dtype=jnp.float32, measure_n=128, measure_seconds=0.05, cache_path=None)
    dev = jax.local_devices()[0]
    if metrics.nominal_peak_flops(dev.device_kind) is None:
        assert 1e6 < peak < 1e16
    else:
        assert peak >= 100e12


# ---------------------------------------------------------------- representation diagnostics

def test_effective_rank_full_vs_rank_one():
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(64, 16)))
    assert float(metrics.effective_rank(jnp.asarray(q, jnp.float32))) == pytest.approx(16.0, rel=1e-4)
    g = jax.random.normal(jax.random.key(0), (512, 16))
    assert 14.0 < float(jax.jit(metrics.effective_rank)(g)) <= 16.0
    rng = np.random.default_rng(1)
    rank1 = jnp.asarray(np.outer(rng.normal(size=64), rng.normal(size=16)), jnp.float32)
    assert float(jax.jit(metrics.effective_rank)(rank1)) == pytest.approx(1.0, abs=1e-2)
    with pytest.raises(ValueError, match="N, D"):
        metrics.effective_rank(jnp.ones((2, 3, 4)))


def test_per_dim_std():
    g = jax.random.normal(jax.random.key(0), (2048, 32))
    assert float(jax.jit(metrics.per_dim_std)(g)) == pytest.approx(1.0, abs=0.05)
    same = jnp.tile(g[:1], (100, 1))
    assert float(metrics.per_dim_std(same)) < 1e-3
    # scale-invariant (layer-normed first)
    assert float(metrics.per_dim_std(10 * g)) == pytest.approx(float(metrics.per_dim_std(g)), rel=1e-4)


def test_collapse_monitor_warns_on_collapse(caplog):
    mon = metrics.CollapseMonitor(rank_fraction=0.2, std_fraction=0.2, baseline_updates=3, repeat_every=1000)
    issued = []
    with caplog.at_level(logging.WARNING):
        for i in range(30):
            issued += mon.update(i, effective_rank=100.0 * 0.85 ** i, std=0.9)
    rank_msgs = [m for m in issued if "effective_rank" in m]
    assert len(rank_msgs) == 1  # once when it starts, not every step
    base = (100 + 85 + 72.25) / 3  # mean of the first 3 values
    assert f"early value {base:.4g}" in rank_msgs[0]
    first_bad = next(i for i in range(30) if 100 * 0.85 ** i < 0.2 * base)
    assert f"step {first_bad}:" in rank_msgs[0]
    assert not [m for m in issued if "std" in m]
    assert "representation collapse" in caplog.text


def test_collapse_monitor_quiet_when_healthy_and_absolute_thresholds():
    mon = metrics.CollapseMonitor(min_rank=10.0, min_std=0.1, baseline_updates=3)
    rng = np.random.default_rng(0)
    for i in range(200):
        assert mon.update(i, effective_rank=50 + rng.normal(), std=0.8 + 0.05 * rng.normal()) == []
    low = metrics.CollapseMonitor(min_std=0.1, repeat_every=2)
    msgs = [mon_msgs for i in range(5) for mon_msgs in low.update(i, std=0.01)]
    assert len(msgs) == 3 and "absolute threshold 0.1" in msgs[0]  # updates 0, 2, 4
    fresh = metrics.CollapseMonitor(baseline_updates=1)
    assert fresh.update(0, std=float("nan"))[0].endswith("is not finite")
    assert fresh.baseline("std") is None and fresh.update(1, std=1.0) == []  # nan kept out of the baseline


# ---------------------------------------------------------------- writers

def _read_tb_events(path):
    """Minimal TFRecord reader for an events file: the Event protos."""
    from tensorboardX.proto import event_pb2
    with open(path, "rb") as f:
        data = f.read()
    pos, events = 0, []
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
        pos += 12 + length + 4
    return events


def _read_tb_scalars(path):
    """{tag: [(step, value)]} of an events file."""
    out = {}
    for ev in _read_tb_events(path):
        for v in ev.summary.value:
            out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_metrics_writer_jsonl_and_tensorboard(tmp_path):
    wd = str(tmp_path / "run")
    with metrics.MetricsWriter(wd) as w:
        w.write(10, {"loss": jnp.float32(0.5), "lr": np.float64(1e-4), "n": 3})
        w.write(20, {"loss": jnp.asarray([0.25]), "bad": float("nan")})
        w.write_text(0, "config", "lr: 1e-4")
        with pytest.raises(ValueError, match="'vec'"):
            w.write(30, {"vec": jnp.ones(3)})
    lines = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert [(r["step"], r["loss"]) for r in lines] == [(10, 0.5), (20, 0.25)]
    assert lines[0]["lr"] == pytest.approx(1e-4) and lines[0]["n"] == 3.0 and lines[1]["bad"] is None
    events = glob.glob(os.path.join(wd, "tensorboard", "events.out.tfevents.*"))
    assert len(events) == 1
    scalars = _read_tb_scalars(events[0])
    assert scalars["loss"] == [(10, 0.5), (20, 0.25)]
    # appends on restart
    with metrics.MetricsWriter(wd, tensorboard=False) as w:
        w.write(30, {"loss": 0.125})
    assert len(open(os.path.join(wd, "metrics.jsonl")).readlines()) == 3
    # a run resumed from step 10 drops what an earlier attempt logged after it (one record per step), including a
    # line cut by a crash
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
        f.write('{"step": 40, "lo')
    with metrics.MetricsWriter(wd, start_step=10) as w:
        w.write(20, {"loss": 0.75})
    lines = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert [(r["step"], r["loss"]) for r in lines] == [(10, 0.5), (20, 0.75)]
    # TensorBoard is told to discard the earlier attempt's events from step 11 on
    events = [ev for path in glob.glob(os.path.join(wd, "tensorboard", "events.out.tfevents.*"))
              for ev in _read_tb_events(path)]
    assert any(ev.session_log.status == ev.session_log.START and ev.step == 11 for ev in events)


def test_metrics_writer_disabled_writes_nothing(tmp_path):
    w = metrics.MetricsWriter(str(tmp_path / "other"), enabled=False)
    w.write(1, {"loss": 1.0})
    w.flush()
    w.close()
    assert not (tmp_path / "other").exists()


# ---------------------------------------------------------------- timing and progress

class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_step_timer_maths():
    clock = FakeClock()
    timer = metrics.StepTimer(window=2, clock=clock)
    for wait, compute in ((1.0, 3.0), (0.5, 1.5), (0.0, 1.0)):
        with timer.waiting():
            clock.t += wait
        clock.t += compute
        timer.step()
    # window holds the last two steps: (2.0 s, 0.5 wait) and (1.0 s, 0 wait)
    assert timer.count == 2
    assert timer.step_time == pytest.approx(1.5)
    assert timer.data_wait_share == pytest.approx(0.5 / 3.0)
    with metrics.Timer(clock=clock) as t:
        clock.t += 2.5
    assert t.elapsed == pytest.approx(2.5)
    assert math.isnan(metrics.StepTimer(clock=clock).step_time)


def test_format_progress_has_all_fields():
    m = {"loss": jnp.float32(0.4312), "loss/short": 0.421, "loss/long": 0.4414, "lr": 3.2e-4,
         "ema_momentum": 0.99925, "repr/std": 0.9}
    line = metrics.format_progress(1200, 240000, m, step_time=0.5, data_wait_share=0.031, clips_per_s=48.1,
                                   flops_per_s=312.4e12, mfu=0.316)
    for piece in ("step 1200/240000", "loss 0.4312", "short 0.4210", "long 0.4414", "lr 0.00032",
                  "ema 0.99925", "0.500 s/step", "48.1 clips/s", "data 3%", "312.4 TFLOP/s/dev", "MFU 31.6%",
                  "ETA 33:10:00"):
        assert piece in line, (piece, line)
    assert "\n" not in line
    assert "143.0 GFLOP/s/dev" in metrics.format_progress(1, 2, m, step_time=1.0, flops_per_s=143e9)
    assert metrics.format_duration(3725) == "1:02:05" and metrics.format_duration(float("nan")) == "?"


def test_progress_line_derives_throughput():
    clock = FakeClock()
    timer = metrics.StepTimer(clock=clock)
    pl = metrics.ProgressLine(100, clips_per_step=32, flops_per_step=8e12, peak_flops_per_device=10e12,
                              num_devices=2, timer=timer)
    for _ in range(3):
        with timer.waiting():
            clock.t += 0.1
        clock.t += 0.3
        timer.step()
    s = pl.stats()
    assert s["perf/clips_per_s"] == pytest.approx(80.0)
    assert s["perf/tflops_per_device"] == pytest.approx(10.0)
    assert s["perf/mfu"] == pytest.approx(1.0)
    assert s["perf/data_wait_share"] == pytest.approx(0.25)
    line = pl.line(3, {"loss": 1.0})
    assert "80.0 clips/s" in line and "MFU 100.0%" in line and "data 25%" in line and "ETA 0:00:39" in line


def test_measured_peak_is_the_best_this_machine_has_seen(tmp_path):
    """A peak measured on busy cores is low and would inflate MFU: the cache keeps the best measurement."""
    cache = str(tmp_path / "peak.json")
    assert metrics._best_measured_peak("cpu|x", 5.0, cache) == 5.0
    assert metrics._best_measured_peak("cpu|x", 3.0, cache) == 5.0      # a busy start-up does not lower it
    assert metrics._best_measured_peak("cpu|x", 8.0, cache) == 8.0
    assert metrics._best_measured_peak("cpu|y", 1.0, cache) == 1.0      # keyed per device, dtype and size
    assert json.loads(open(cache).read()) == {"cpu|x": 8.0, "cpu|y": 1.0}
    open(cache, "w").write("not json")
    assert metrics._best_measured_peak("cpu|x", 2.0, cache) == 2.0      # a damaged file is rebuilt, not fatal
    dev = jax.local_devices()[0]
    if metrics.nominal_peak_flops(dev.device_kind) is None:
        key = f"{dev.platform}|{dev.device_kind}|float32|n=128|cpus={os.cpu_count()}"
        json.dump({key: 1e18}, open(cache, "w"))
        assert metrics.device_peak_flops(dtype=jnp.float32, measure_n=128, measure_seconds=0.05,
                                         cache_path=cache) == 1e18
