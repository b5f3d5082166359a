"""Training metrics: analytic FLOPs and MFU, device peak FLOP/s, collapse diagnostics, metrics.jsonl + TensorBoard
writing, step/data-wait timing and the one-line progress report.

FLOP counting convention (all functions below): FLOPs = 2 x multiply-accumulates of the matrix multiplications
(linear layers, attention scores Q.K^T and attention-weighted values). Elementwise work (LayerNorm, softmax, GELU,
RoPE, residual adds, the loss) is not counted: it is a few percent for ViT widths and is not what MFU measures.
Backward = 2 x forward.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Analytic FLOPs
# ----------------------------------------------------------------------------------------------------------------

def linear_flops(num_tokens: int, in_dim: int, out_dim: int) -> float:
    """A dense layer applied to num_tokens vectors."""
    return 2.0 * num_tokens * in_dim * out_dim


def vit_forward_flops(num_tokens: int, width: int, depth: int, mlp_dim: int | None = None) -> float:
    """Forward FLOPs of `depth` pre-norm transformer blocks on one sequence of num_tokens tokens.

    Per block: qkv projection 2*N*d*3d, attention scores 2*N*N*d, attention x values 2*N*N*d (both summed over
    heads, so the head count does not matter), output projection 2*N*d*d, MLP 2*N*d*m*2.
    mlp_dim defaults to 4 * width.
    """
    n, d = float(num_tokens), float(width)
    m = float(4 * width if mlp_dim is None else mlp_dim)
    per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * m
    return depth * per_block


def patch_embed_flops(num_tokens: int, width: int, patch_size: int = 16, tubelet_size: int = 2,
                      in_channels: int = 3) -> float:
    """The tubelet (3D patch) embedding: a linear map of tubelet_size*patch_size^2*in_channels values per token."""
    return linear_flops(num_tokens, tubelet_size * patch_size * patch_size * in_channels, width)


def _dims(d: Mapping, name: str) -> tuple[int, int, int]:
    try:
        width, depth = int(d["width"]), int(d["depth"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{name} needs 'width' and 'depth', got {d!r}") from e
    mlp = d.get("mlp_dim") or 4 * width
    if width <= 0 or depth <= 0:
        raise ValueError(f"{name}: width and depth must be > 0, got {d!r}")
    return width, depth, int(mlp)


def vjepa_step_flops_breakdown(tokens_per_clip: int, mask_lengths: Mapping[str, Sequence[int]] | Sequence,
                               encoder: Mapping, predictor: Mapping, batch_size: int) -> dict[str, float]:
    """FLOPs of one V-JEPA training step for the whole (global) batch, split by part.

    tokens_per_clip: L = (T/tubelet) * (H/patch) * (W/patch).
    mask_lengths: {mask name: (num_context Nc, num_target Nt)} (MultiBlockMasker.lengths) or a list of pairs.
    encoder: {width, depth, mlp_dim, patch_size=16, tubelet_size=2, in_channels=3}.
    predictor: {width, depth, mlp_dim=4*width}.
    Counted: target (EMA) encoder forward on all L tokens (no backward); per mask type the context encoder
    forward+backward on Nc tokens including their patch embedding (the ViT gathers kept patches first), and the
    predictor forward+backward on Nc+Nt tokens including its input projection (encoder width -> predictor width,
    Nc tokens) and output projection (predictor width -> encoder width, Nt target tokens).
    Backward counted as 2 x forward everywhere (so fwd+bwd = 3 x fwd), including the patch embedding.
    """
    ew, ed, em = _dims(encoder, "encoder")
    pw, pd, pm = _dims(predictor, "predictor")
    embed_kw = dict(patch_size=int(encoder.get("patch_size", 16)), tubelet_size=int(encoder.get("tubelet_size", 2)),
                    in_channels=int(encoder.get("in_channels", 3)))
    pairs = list(mask_lengths.values()) if isinstance(mask_lengths, Mapping) else list(mask_lengths)
    if not pairs:
        raise ValueError("mask_lengths is empty: need (num_context, num_target) per mask type")
    L = int(tokens_per_clip)
    embed = patch_embed_flops(L, ew, **embed_kw)
    out = {"target_encoder": embed + vit_forward_flops(L, ew, ed, em), "context_encoder": 0.0, "predictor": 0.0}
    for pair in pairs:
        nc, nt = (int(v) for v in pair)
        if nc <= 0 or nt <= 0 or nc + nt > L:
            raise ValueError(f"mask_lengths: (num_context={nc}, num_target={nt}) must be > 0 and sum to <= {L}")
        out["context_encoder"] += 3 * (patch_embed_flops(nc, ew, **embed_kw) + vit_forward_flops(nc, ew, ed, em))
        out["predictor"] += 3 * (linear_flops(nc, ew, pw) + vit_forward_flops(nc + nt, pw, pd, pm)
                                 + linear_flops(nt, pw, ew))
    return {k: v * int(batch_size) for k, v in out.items()}


def vjepa_step_flops(tokens_per_clip: int, mask_lengths, encoder: Mapping, predictor: Mapping,
                     batch_size: int) -> float:
    """Total FLOPs of one V-JEPA training step (see vjepa_step_flops_breakdown for what is counted)."""
    return sum(vjepa_step_flops_breakdown(tokens_per_clip, mask_lengths, encoder, predictor, batch_size).values())


def mfu(flops_per_step: float, step_time: float, peak_flops: float) -> float:
    """Model FLOPs utilisation in [0, 1]; peak_flops is the sum over the devices the step runs on."""
    if step_time <= 0 or peak_flops <= 0:
        return float("nan")
    return flops_per_step / step_time / peak_flops


# ----------------------------------------------------------------------------------------------------------------
# Device peak FLOP/s
# ----------------------------------------------------------------------------------------------------------------

# Dense bf16 peaks per device, matched as case-insensitive substrings of jax's `device.device_kind`
# (longest key first, so "H100 PCIe" wins over "H100").
NOMINAL_PEAK_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100": 989e12,   # SXM
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e reports itself as "TPU v5 lite"
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
}


def nominal_peak_flops(device_kind: str) -> float | None:
    """The table's bf16 dense peak for a device kind string, None when unknown (e.g. CPU)."""
    kind = device_kind.lower()
    for key in sorted(NOMINAL_PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in kind:
            return NOMINAL_PEAK_FLOPS[key]
    return None


def measure_matmul_peak(dtype=jnp.float32, n: int = 2048, seconds: float = 2.0, device=None) -> float:
    """Best FLOP/s of an n x n x n matmul on `device` (default: the first local device), timed for ~`seconds`
    after a warm-up; at least 3 timed repetitions."""
    device = device or jax.local_devices()[0]
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(ka, (n, n), jnp.float32).astype(dtype), device)
    b = jax.device_put(jax.random.normal(kb, (n, n), jnp.float32).astype(dtype), device)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best, reps, start = 0.0, 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        dt = time.perf_counter() - t0
        best = max(best, 2.0 * n ** 3 / max(dt, 1e-9))
        reps += 1
    return best


PEAK_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jepa", "matmul_peak.json")


def _best_measured_peak(key: str, measured: float, cache_path: str) -> float:
    """The best peak ever measured for `key` on this machine, this measurement included. Why: a peak measured while
    other jobs share the cores is low, which inflates MFU; the best of all start-ups is the machine's figure."""
    try:
        with open(cache_path, encoding="utf-8") as f:
            table = json.load(f)
        table = table if isinstance(table, dict) else {}
    except (OSError, ValueError):
        table = {}
    previous = table.get(key)
    previous = float(previous) if isinstance(previous, (int, float)) else 0.0
    best = max(float(measured), previous)
    if best > previous:
        table[key] = best
        try:
            os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
            tmp = f"{cache_path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(table, f)
            os.replace(tmp, cache_path)
        except OSError as e:  # a read-only home must not stop training
            log.warning("could not record the matmul peak in %s: %s", cache_path, e)
    return best


def device_peak_flops(device=None, dtype=jnp.bfloat16, *, override: float = 0.0, measure_n: int = 2048,
                      measure_seconds: float = 2.0, cache_path: str | None = PEAK_CACHE) -> float:
    """Peak FLOP/s of one device for MFU: `override` when > 0 (config.train.peak_flops), else the nominal table
    (halved for float32 on GPUs, i.e. TF32 tensor-core peak; TPUs run f32 matmuls as bf16 passes), else
    (CPU, unknown accelerators) measured with measure_matmul_peak in `dtype`, kept as the best measurement of this
    machine in `cache_path` (None: this measurement alone)."""
    if override > 0:
        return float(override)
    device = device or jax.local_devices()[0]
    nominal = nominal_peak_flops(device.device_kind)
    if nominal is not None:
        if jnp.dtype(dtype) == jnp.float32 and device.platform == "gpu":
            nominal /= 2
        log.info("peak FLOP/s for %s (%s): nominal %.3g", device.device_kind, jnp.dtype(dtype).name, nominal)
        return nominal
    measured = measure_matmul_peak(dtype, measure_n, measure_seconds, device)
    best = measured
    if cache_path:
        key = f"{device.platform}|{device.device_kind}|{jnp.dtype(dtype).name}|n={measure_n}|cpus={os.cpu_count()}"
        best = _best_measured_peak(key, measured, cache_path)
    log.info("peak FLOP/s for %s (%s): measured %.3g, best on this machine %.3g", device.device_kind,
             jnp.dtype(dtype).name, measured, best)
    return best


# ----------------------------------------------------------------------------------------------------------------
# Representation (collapse) diagnostics: pure jnp, usable inside jit
# ----------------------------------------------------------------------------------------------------------------

def effective_rank(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """exp(Shannon entropy of the normalised singular values) of x [N, D] (Roy & Vetterli 2007; RankMe).
    Between 1 (rank one) and min(N, D) (flat spectrum). Not centred: a shared offset counts as one direction.

    Singular values come from the D x D Gram matrix (its eigenvectors V; the column norms of x V), not an SVD
    of x: inside the train step a LAPACK SVD of 4096 x 192 took ~1 s on CPU next to XLA's threads, this takes a
    few ms and matches the SVD to ~1e-4. Column norms (rather than sqrt(eigenvalue)) stay ~eps * s_max in null
    directions, so a collapsed (rank-1) representation still reads 1.0."""
    if x.ndim != 2:
        raise ValueError(f"effective_rank expects x of shape [N, D], got {x.shape}")
    x = x.astype(jnp.float32)
    if x.shape[0] < x.shape[1]:
        x = x.T  # same singular values; the smaller Gram matrix
    gram = jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST)
    _, v = jnp.linalg.eigh(gram)
    s = jnp.linalg.norm(jnp.dot(x, v, precision=jax.lax.Precision.HIGHEST), axis=0)
    p = s / (jnp.sum(s) + eps)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.exp(entropy)


def per_dim_std(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Mean over dimensions of the std across rows of layer-normed x [N, D] (no affine, as the V-JEPA targets).
    About 1 for healthy, spread-out embeddings, -> 0 when all rows become the same vector."""
    if x.ndim != 2:
        raise ValueError(f"per_dim_std expects x of shape [N, D], got {x.shape}")
    x = x.astype(jnp.float32)
    x = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + eps)
    return jnp.mean(jnp.std(x, axis=0))


class CollapseMonitor:
    """Host-side watch on (effective rank, std) values logged each step; warns with the numbers on collapse.

    The baseline is the mean of the first `baseline_updates` values. A warning is issued when a value falls below
    `rank_fraction` / `std_fraction` of its baseline, or below the absolute `min_rank` / `min_std` (checked from
    the first update), when the condition starts and then every `repeat_every` updates while it persists.
    """

    def __init__(self, *, rank_fraction: float = 0.2, std_fraction: float = 0.2, min_rank: float = 0.0,
                 min_std: float = 0.0, baseline_updates: int = 5, repeat_every: int = 100,
                 logger: logging.Logger | None = None):
        if baseline_updates < 1:
            raise ValueError(f"baseline_updates must be >= 1, got {baseline_updates}")
        self.fractions = {"effective_rank": rank_fraction, "std": std_fraction}
        self.minimum = {"effective_rank": min_rank, "std": min_std}
        self.baseline_updates, self.repeat_every = baseline_updates, max(1, repeat_every)
        self.logger = logger or log
        self._early: dict[str, list[float]] = {"effective_rank": [], "std": []}
        self._alert_age: dict[str, int] = {}

    def baseline(self, name: str) -> float | None:
        early = self._early[name]
        return sum(early) / len(early) if len(early) >= self.baseline_updates else None

    def update(self, step: int, effective_rank: float | None = None, std: float | None = None) -> list[str]:
        """Feed this step's values; returns the warning messages issued (empty list when healthy)."""
        messages = []
        for name, value in (("effective_rank", effective_rank), ("std", std)):
            if value is None:
                continue
            value = float(value)
            if len(self._early[name]) < self.baseline_updates and math.isfinite(value):
                self._early[name].append(value)
            base = self.baseline(name)
            reasons = []
            if not math.isfinite(value):
                reasons.append("is not finite")
            if value < self.minimum[name]:
                reasons.append(f"is below the absolute threshold {self.minimum[name]:.4g}")
            if base is not None and value < self.fractions[name] * base:
                reasons.append(f"is below {self.fractions[name]:.0%} of its early value {base:.4g}")
            if not reasons:
                self._alert_age.pop(name, None)
                continue
            age = self._alert_age.get(name, -1) + 1
            self._alert_age[name] = age
            if age % self.repeat_every == 0:
                msg = (f"representation collapse? step {step}: target {name} = {value:.4g} "
                       + " and ".join(reasons))
                self.logger.warning(msg)
                messages.append(msg)
        return messages


# ----------------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------------

def _to_float(name: str, value) -> float:
    arr = np.asarray(jax.device_get(value))
    if arr.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got shape {arr.shape}")
    return float(arr.reshape(()))


class MetricsWriter:
    """Writes {"step", "time", **scalars} lines to workdir/metrics.jsonl and TensorBoard scalars under
    workdir/tensorboard. Non-finite values are written as null in the JSON (strict JSON) and as-is to TensorBoard.
    With enabled=False (every process but 0) nothing is created or written.

    A run that starts at `start_step` (resumed from that checkpoint, or 0) first drops the records of later steps,
    written by an earlier attempt that did not reach its next checkpoint, so the file holds one record per step;
    TensorBoard is told to purge them too. Object stores cannot append: there the file is rewritten at most every
    `remote_flush_secs` and on close."""

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True, start_step: int | None = None,
                 remote_flush_secs: float = 60.0):
        from jepa import workdir as workdir_lib
        self.enabled = enabled
        root = workdir_lib.path(workdir)
        self.jsonl_path = root / "metrics.jsonl"
        self.tensorboard_dir = os.fspath(root / "tensorboard")
        self._file = self._tb = None
        self._remote = not workdir_lib.is_local(root)
        self._lines: list[str] = []
        self._remote_flush_secs, self._last_flush = remote_flush_secs, time.monotonic()
        if not enabled:
            return
        root.mkdir(parents=True, exist_ok=True)
        kept = self._records_up_to(start_step)  # start_step None: keep (and append to) every record
        if self._remote:
            self._lines = kept
            self._rewrite()
        else:
            if self.jsonl_path.exists() and start_step is not None:
                tmp = root / "metrics.jsonl.tmp"
                tmp.write_text("".join(kept))
                tmp.replace(self.jsonl_path)
            self._file = open(self.jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(self.tensorboard_dir, flush_secs=30,
                                     purge_step=None if start_step is None else start_step + 1)

    def _records_up_to(self, step: int | None) -> list[str]:
        if not self.jsonl_path.exists():
            return []
        step = math.inf if step is None else step
        kept = []
        for line in self.jsonl_path.read_text().splitlines(keepends=True):
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                pass  # a line cut by a crash while it was written
        return kept

    def _rewrite(self) -> None:
        self.jsonl_path.write_text("".join(self._lines))
        self._last_flush = time.monotonic()

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: _to_float(k, v) for k, v in scalars.items()}
        record = {"step": int(step), "time": time.time()}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        line = json.dumps(record) + "\n"
        if self._remote:
            self._lines.append(line)
            if time.monotonic() - self._last_flush > self._remote_flush_secs:
                self._rewrite()
        else:
            self._file.write(line)
            self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))

    def write_text(self, step: int, name: str, text: str) -> None:
        """E.g. the resolved config at step 0 (TensorBoard only)."""
        if self.enabled and self._tb is not None:
            self._tb.add_text(name, text, int(step))

    def flush(self) -> None:
        if self.enabled:
            if self._remote:
                self._rewrite()
            else:
                self._file.flush()
            if self._tb is not None:
                self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            if self._file is not None:
                self._file.close()
            if self._tb is not None:
                self._tb.close()
            self._file = self._tb = None
            self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------------------------
# Timing and the progress line
# ----------------------------------------------------------------------------------------------------------------

class Timer:
    """`with Timer() as t: ...` then t.elapsed (seconds)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock, self.elapsed = clock, 0.0

    def __enter__(self):
        self._t0 = self.clock()
        return self

    def __exit__(self, *exc):
        self.elapsed = self.clock() - self._t0


class StepTimer:
    """Step time and data-wait share over the last `window` steps.

    Loop usage: `with timer.waiting(): batch = next(it)`, run the step, `timer.step()`. A step's time is the
    interval between consecutive step() calls (the first interval starts at construction or `reset()`: call it
    after compilation); its wait time is what `waiting()` measured inside that interval. With asynchronous
    dispatch the per-step times only add up correctly when the loop blocks now and then (e.g. on logged metrics),
    so read the smoothed values at logging steps.
    """

    def __init__(self, window: int = 20, clock: Callable[[], float] = time.perf_counter):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.clock = clock
        self._steps: collections.deque = collections.deque(maxlen=window)
        self.reset()

    def reset(self) -> None:
        self._last = self.clock()
        self._wait = 0.0

    @contextlib.contextmanager
    def waiting(self):
        t0 = self.clock()
        try:
            yield
        finally:
            self._wait += self.clock() - t0

    def add_wait(self, seconds: float) -> None:
        self._wait += seconds

    def step(self) -> float:
        """Marks the end of a step; returns its duration."""
        now = self.clock()
        dt = now - self._last
        self._steps.append((dt, min(self._wait, dt)))
        self._last, self._wait = now, 0.0
        return dt

    @property
    def count(self) -> int:
        return len(self._steps)

    @property
    def step_time(self) -> float:
        """Mean step time over the window (nan before the first step)."""
        return sum(d for d, _ in self._steps) / len(self._steps) if self._steps else float("nan")

    @property
    def data_wait_share(self) -> float:
        """Fraction of the window's time spent waiting for data, in [0, 1]."""
        total = sum(d for d, _ in self._steps)
        return sum(w for _, w in self._steps) / total if total > 0 else float("nan")


def format_duration(seconds: float) -> str:
    """h:mm:ss (hours unbounded), '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _first(metrics: Mapping, keys: Iterable[str]):
    for k in keys:
        if k in metrics:
            return _to_float(k, metrics[k])
    return None


def _ok(v) -> bool:
    return v is not None and math.isfinite(v)


def format_progress(step: int, total: int, metrics: Mapping[str, Any], *, step_time: float | None = None,
                    data_wait_share: float | None = None, clips_per_s: float | None = None,
                    flops_per_s: float | None = None, mfu: float | None = None, eta: float | None = None) -> str:
    """One line, e.g. `step 1200/240000 loss 0.4312 (short 0.4210 long 0.4414) lr 3.2e-04 ema 0.99925 | 0.512
    s/step 48.1 clips/s data 3% | 312.4 TFLOP/s/dev MFU 31.6% | ETA 33:59:01`.

    Read from metrics: "loss", "loss/<mask>" (one entry per mask type), "lr" (or "optim/lr"), "ema_momentum" (or
    "ema", "optim/ema_momentum"). Timing fields are shown when given; ETA defaults to step_time * steps left.
    flops_per_s is per device (the unit shown).
    """
    parts = [f"step {step}/{total}"]
    loss = _first(metrics, ["loss"])
    per_mask = [(k.split("/", 1)[1], _to_float(k, v)) for k, v in metrics.items() if k.startswith("loss/")]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if per_mask:
        parts.append("(" + " ".join(f"{n} {v:.4f}" for n, v in per_mask) + ")")
    lr = _first(metrics, ["lr", "optim/lr"])
    if lr is not None:
        parts.append(f"lr {lr:.3g}")
    ema = _first(metrics, ["ema_momentum", "ema", "optim/ema_momentum"])
    if ema is not None:
        parts.append(f"ema {ema:.6g}")
    speed = []
    if _ok(step_time):
        speed.append(f"{step_time:.3f} s/step")
    if _ok(clips_per_s):
        speed.append(f"{clips_per_s:.1f} clips/s")
    if _ok(data_wait_share):
        speed.append(f"data {100 * data_wait_share:.0f}%")
    compute = []
    if _ok(flops_per_s):
        compute.append(f"{flops_per_s / 1e12:.1f} TFLOP/s/dev" if flops_per_s >= 1e12
                       else f"{flops_per_s / 1e9:.1f} GFLOP/s/dev")
    if _ok(mfu):
        compute.append(f"MFU {100 * mfu:.1f}%")
    if eta is None and _ok(step_time):
        eta = step_time * max(total - step, 0)
    line = " ".join(parts)
    for group in (speed, compute):
        if group:
            line += " | " + " ".join(group)
    return line + f" | ETA {format_duration(eta)}"


class ProgressLine:
    """Derives throughput numbers from a StepTimer and formats the progress line.

    clips_per_step: global batch; flops_per_step: vjepa_step_flops for the global batch; peak_flops_per_device and
    num_devices: for MFU (0 = not shown).
    """

    def __init__(self, total_steps: int, *, clips_per_step: int, flops_per_step: float = 0.0,
                 peak_flops_per_device: float = 0.0, num_devices: int = 1, timer: StepTimer | None = None):
        self.total, self.clips, self.flops = int(total_steps), int(clips_per_step), float(flops_per_step)
        self.peak, self.num_devices = float(peak_flops_per_device), max(1, int(num_devices))
        self.timer = timer or StepTimer()

    def stats(self) -> dict[str, float]:
        """Throughput scalars (also worth writing to metrics.jsonl)."""
        t = self.timer.step_time
        out = {"perf/step_time": t, "perf/data_wait_share": self.timer.data_wait_share}
        if _ok(t) and t > 0:
            out["perf/clips_per_s"] = self.clips / t
            if self.flops > 0:
                out["perf/tflops_per_device"] = self.flops / t / self.num_devices / 1e12
                if self.peak > 0:
                    out["perf/mfu"] = mfu(self.flops, t, self.peak * self.num_devices)
        return out

    def line(self, step: int, metrics: Mapping[str, Any]) -> str:
        s = self.stats()
        tflops = s.get("perf/tflops_per_device")
        return format_progress(step, self.total, metrics, step_time=s["perf/step_time"],
                               data_wait_share=s["perf/data_wait_share"], clips_per_s=s.get("perf/clips_per_s"),
                               flops_per_s=None if tflops is None else tflops * 1e12, mfu=s.get("perf/mfu"))
