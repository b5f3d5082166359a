"""Probes on frozen embeddings: linear (pooled vectors), ridge (the patch-token map, closed form) and attentive
(patch tokens); each fits a grid (lr x wd trained in parallel in one jitted program, or ridge strengths), chosen on
validation, reported on test.

    python -m jepa.probe --features=EXP_TRAIN --val_features=EXP_VAL --test_features=EXP_TEST \
        --task=classification --target=label --probe=linear [--lrs=1e-3,3e-3 --wds=0.01,0.1]
    python -m jepa.probe --workdir=RUN --task=regression --target=keypoints[-1] --probe=ridge   # encode on the fly
    python -m jepa.probe benchmark --workdir=RUN    # world dataset: domain accuracy and keypoint R^2 vs random init

Targets: `label` / `domain` (classification; predictions averaged over the windows of one clip id, i.e.
multi-segment evaluation); for regression `states` (qpos then qvel, zero-padded) or `keypoints` (image positions
of the moving geoms, then their displacement since the previous sampled frame), on every sampled frame or on frame
t of the window (`keypoints[t]`, e.g. keypoints[-1]; patch-token probes then read the tokens of that frame's
tubelet). Regression targets are normalised per domain and dimension with the training split's statistics;
padding dimensions and constant ones are masked out. R^2 is 1 - SSE / SST summed over (domain, dimension) pairs
against the test set's own within-domain mean, separately for positions and velocities.

The attentive probe: one cross-attention block with a learned query per output head, then a linear layer, after
`depth` pre-LN self-attention blocks over the patch tokens (default 0, V-JEPA's attentive pooler; V-JEPA 2's has 3
blocks before it, --depth=3); it adds learned token-position embeddings (see ProbeModel). All grid members start
from the same initialisation and see the same minibatches; only their learning rate and weight decay differ. With
depth 0 the grid reads one shared copy of each batch (apply_grid): the 20-member default grid on 1232 windows of
256 x 192 tokens trains in about a minute of CPU time; every self-attention block costs each member a full pass
over the token map, about 50 times more.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jepa import workdir as workdir_lib
from jepa.models import layers as layers_lib

log = logging.getLogger(__name__)

PROBES = ("linear", "ridge", "attentive")
BENCHMARK_EPISODES = 1152  # 3x the default preset: ~13 validation and ~13 test episodes per domain
RIDGE_ALPHAS = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)  # x the mean eigenvalue of the training Gram matrix
DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
DEFAULT_WDS = (0.001, 0.01, 0.1, 0.4)


# ---------------------------------------------------------------- targets


@dataclasses.dataclass
class Task:
    """What a probe learns on one split: inputs, targets, masks and how rows group into clips."""
    x: np.ndarray                 # [N, D] pooled or [N, L, D] patches
    y: np.ndarray                 # [N] int classes, or [N, K] float normalised targets
    mask: np.ndarray | None       # [N, K] valid regression outputs (None for classification)
    groups: np.ndarray            # [N] clip index (rows of one clip share it)
    domain: np.ndarray            # [N] (-1 when unknown)
    part: np.ndarray | None       # [N, K] 0 = position, 1 = velocity (regression on states)


REGRESSION_TARGETS = ("states", "keypoints")


def parse_target(target: str) -> tuple[str, int | None]:
    m = re.fullmatch(r"(label|domain|states|keypoints)(?:\[(-?\d+)\])?", target.strip())
    if not m or (m.group(2) is not None and m.group(1) not in REGRESSION_TARGETS):
        raise ValueError(f"--target: {target!r} is not one of label, domain, states, states[FRAME], keypoints, "
                         "keypoints[FRAME]")
    return m.group(1), None if m.group(2) is None else int(m.group(2))


def state_stats(feats, name: str, frame: int | None) -> dict:
    """Per-domain mean/std of a regression target (training split) and which dimensions are real (not
    padding/constant), plus how many leading dimensions are positions."""
    values, domains = _regression_values(feats, name, frame)
    stats = {}
    for d in np.unique(domains):
        s = values[domains == d].reshape(-1, values.shape[-1])
        mean, std = s.mean(0), s.std(0)
        dims, num_pos = _target_dims(feats, name, domains == d)
        valid = (std > 1e-6) & (np.arange(values.shape[-1]) < dims)
        stats[int(d)] = {"mean": mean, "std": np.where(valid, std, 1.0), "valid": valid, "num_pos": num_pos}
    return stats


def add_keypoints(feats) -> None:
    """Caches targets["keypoints"] [N, T, MAX_KEYPOINTS, 2]: the image positions of the moving geoms in each
    sampled frame, computed from the stored physics states (jepa.envs.image_keypoints)."""
    if "keypoints" in feats.targets:
        return
    from jepa import envs
    states, domains = _regression_values(feats, "states", None)
    out = np.zeros((*states.shape[:2], envs.MAX_KEYPOINTS, 2), np.float32)
    for i, (row, d) in enumerate(zip(feats.rows, domains)):
        out[i] = envs.image_keypoints(int(d), states[i], int(row["num_qpos"]))
    feats.targets["keypoints"] = out


def _regression_values(feats, name: str, frame: int | None) -> tuple[np.ndarray, np.ndarray]:
    """[N, T, S] targets and [N] domains. states: qpos then qvel. keypoints: geom image positions (u, v) then their
    displacement since the previous sampled frame (image velocity)."""
    if "states" not in feats.targets or "domain" not in feats.targets:
        raise ValueError(f"--target={name} needs features of the world dataset (no 'states'/'domain' arrays)")
    if name == "keypoints":
        add_keypoints(feats)
        kp = feats.targets["keypoints"]
        kp = kp.reshape(*kp.shape[:2], -1)
        if kp.shape[1] < 2:
            raise ValueError("--target=keypoints needs windows of at least 2 frames (image velocity)")
        step = np.concatenate([kp[:, 1:2] - kp[:, :1], kp[:, 1:] - kp[:, :-1]], axis=1)
        values = np.concatenate([kp, step], axis=-1)
    else:
        values = np.asarray(feats.targets["states"], np.float32)          # [N, T, S]
    if frame is not None:
        if not -values.shape[1] <= frame < values.shape[1]:
            raise ValueError(f"--target: frame {frame} is out of range for windows of {values.shape[1]} frames")
        values = values[:, frame:frame + 1 if frame != -1 else None]
    return values, np.asarray(feats.targets["domain"])


def _target_dims(feats, name: str, rows_mask) -> tuple[int, int]:
    """(real dimensions, leading position dimensions) of one domain's rows."""
    rows = [r for r, keep in zip(feats.rows, rows_mask) if keep]
    if not rows or "state_dim" not in rows[0]:
        raise ValueError(f"--target={name}: the features' rows lack state_dim/num_qpos (export the world dataset)")
    if name == "keypoints":
        from jepa import envs
        return 4 * envs.MAX_KEYPOINTS, 2 * envs.MAX_KEYPOINTS
    return int(rows[0]["state_dim"]), int(rows[0]["num_qpos"])


def frame_tokens(patches: np.ndarray, meta: dict, frame: int) -> np.ndarray:
    """[N, H'W', D]: the patch tokens of the tubelet that holds window frame `frame` (targets of one frame are
    read from the tokens that saw it; the rest of the window only adds dimensions to fit)."""
    grid, frames = meta.get("grid"), meta.get("num_frames")
    if not grid or not frames or int(np.prod(grid)) != patches.shape[1]:
        return patches
    t_tokens = int(grid[0])
    tubelet = int(frames) // t_tokens
    t = (frame % int(frames)) // tubelet
    return patches.reshape(len(patches), t_tokens, -1, patches.shape[-1])[:, t]


def make_task(feats, kind: str, target: str, probe: str, stats: dict | None = None) -> Task:
    """Inputs and targets of one split. Regression needs `stats` from the training split (state_stats)."""
    name, frame = parse_target(target)
    if probe in ("attentive", "ridge"):
        if feats.patches is None:
            raise ValueError(f"--probe={probe} needs patch features (export with --features=pooled,patches)")
        x = np.asarray(feats.patches, np.float32)
        if kind == "regression" and frame is not None:
            x = frame_tokens(x, feats.meta, frame)
        if probe == "ridge":
            x = x.reshape(len(x), -1)
    elif probe == "linear":
        x = np.asarray(feats.pooled, np.float32)
    else:
        raise ValueError(f"--probe: {probe!r} is not one of {', '.join(PROBES)}")
    ids = feats.clip_ids
    lookup = {c: i for i, c in enumerate(dict.fromkeys(ids))}
    groups = np.asarray([lookup[c] for c in ids], np.int32)
    domain = np.asarray(feats.targets.get("domain", np.full(len(ids), -1)), np.int32)
    if kind == "classification":
        if name == "states":
            raise ValueError("--task=classification needs --target=label or domain")
        y = np.asarray(feats.targets[name] if name in feats.targets else feats.targets["label"], np.int32)
        if name == "domain" and "domain" not in feats.targets:
            raise ValueError("--target=domain: these features have no 'domain' (not the world dataset)")
        keep = y >= 0
        if not keep.any():
            raise ValueError(f"--target={target}: no row has a label (all -1)")
        if keep.all():  # no copy of a large patch array when every row has a label
            return Task(x=x, y=y, mask=None, groups=groups, domain=domain, part=None)
        return Task(x=x[keep], y=y[keep], mask=None, groups=groups[keep], domain=domain[keep], part=None)
    if kind != "regression":
        raise ValueError(f"--task: {kind!r} is not one of classification, regression")
    if name not in REGRESSION_TARGETS:
        raise ValueError("--task=regression needs --target=states, keypoints, states[FRAME] or keypoints[FRAME]")
    if stats is None:
        raise ValueError("regression targets need the training split's statistics (state_stats)")
    states, domains = _regression_values(feats, name, frame)
    n, t, s = states.shape
    y = np.zeros((n, t, s), np.float32)
    mask = np.zeros((n, t, s), np.float32)
    part = np.zeros((n, t, s), np.int32)
    for i, d in enumerate(domains):
        st = stats.get(int(d))
        if st is None:
            continue
        y[i] = (states[i] - st["mean"]) / st["std"]
        mask[i] = st["valid"]
        part[i] = (np.arange(s) >= st["num_pos"]).astype(np.int32)
    return Task(x=x, y=y.reshape(n, -1), mask=mask.reshape(n, -1), groups=groups, domain=domain,
                part=part.reshape(n, -1))


# ---------------------------------------------------------------- probe models (pure functions of param dicts)


def _dense_init(key, fan_in, fan_out):
    return {"kernel": layers_lib.trunc_normal(key, (fan_in, fan_out)), "bias": jnp.zeros((fan_out,))}


def _ln_init(width):
    return {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))}


def _ln(x, p):
    return layers_lib.layer_norm(x, p["scale"], p["bias"], jnp.float32)


def _lin(x, p):
    return layers_lib.dense(x, p["kernel"], p["bias"], jnp.float32)


def _mha(q_in, kv_in, p, heads):
    """Multi-head attention: q_in [B, Q, D], kv_in [B, N, D] -> [B, Q, D]."""
    b, nq, d = q_in.shape
    hd = d // heads
    q = _lin(q_in, p["q"]).reshape(b, nq, heads, hd).transpose(0, 2, 1, 3) / math.sqrt(hd)
    kv = _lin(kv_in, p["kv"]).reshape(b, kv_in.shape[1], 2, heads, hd).transpose(2, 0, 3, 1, 4)
    o = layers_lib.attention(q, kv[0], kv[1])
    return _lin(o.transpose(0, 2, 1, 3).reshape(b, nq, d), p["proj"])


def _attn_init(key, width):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"q": _dense_init(k1, width, width), "kv": _dense_init(k2, width, 2 * width),
            "proj": _dense_init(k3, width, width)}


def _mlp(x, p):
    return _lin(layers_lib.gelu(_lin(x, p["fc1"])), p["fc2"])


def _mlp_init(key, width, hidden):
    k1, k2 = jax.random.split(key)
    return {"fc1": _dense_init(k1, width, hidden), "fc2": _dense_init(k2, hidden, width)}


def default_heads(width: int) -> int:
    for heads in (16, 12, 8, 6, 4, 3, 2):
        if width % heads == 0 and width // heads >= 16:
            return heads
    return 1


@dataclasses.dataclass(frozen=True)
class ProbeModel:
    """Static description of a probe: `init(key) -> params`, `apply(params, x) -> [B, out]`.

    The attentive probe adds a learned embedding per token position before its blocks: our encoders carry position
    only through RoPE (relative), and cross-attention pooling is blind to token order, so without it a probe could
    not tell where in the frame something is (image-position targets score about R^2 = 0)."""
    kind: str            # "linear" | "attentive"
    width: int
    out: int
    tokens: int = 0      # attentive: number of patch tokens (> 0: learned position embeddings)
    depth: int = 0       # attentive: self-attention blocks before the cross-attention pooling
    heads: int = 0       # 0 = default_heads(width)
    num_queries: int = 1  # one learned query (and one linear head of size out/num_queries) per output head
    mlp_ratio: float = 4.0

    def init(self, key) -> dict:
        k_head, k_blocks, k_cross, k_q, k_pos = jax.random.split(key, 5)
        if self.kind == "linear":
            return {"head": _dense_init(k_head, self.width, self.out)}
        if self.out % self.num_queries:
            raise ValueError(f"probe outputs {self.out} are not divisible by num_queries={self.num_queries}")
        hidden = int(self.width * self.mlp_ratio)
        blocks = []
        for k in jax.random.split(k_blocks, self.depth):
            ka, km = jax.random.split(k)
            blocks.append({"ln1": _ln_init(self.width), "attn": _attn_init(ka, self.width),
                           "ln2": _ln_init(self.width), "mlp": _mlp_init(km, self.width, hidden)})
        ka, km = jax.random.split(k_cross)
        cross = {"query": layers_lib.trunc_normal(k_q, (self.num_queries, self.width)), "ln1": _ln_init(self.width),
                 "attn": _attn_init(ka, self.width), "ln2": _ln_init(self.width),
                 "mlp": _mlp_init(km, self.width, hidden)}
        heads = jax.vmap(lambda k: _dense_init(k, self.width, self.out // self.num_queries))(
            jax.random.split(k_head, self.num_queries))
        params = {"blocks": blocks, "cross": cross, "head": heads}
        if self.tokens:
            # on the scale of layer-normed features: at 0.02 (ViT's choice) they take many steps to matter
            params["pos"] = layers_lib.trunc_normal(k_pos, (self.tokens, self.width), std=1.0)
        return params

    def apply(self, params: dict, x: jax.Array) -> jax.Array:
        if self.kind == "linear":
            return _lin(x, params["head"])
        heads = self.heads or default_heads(self.width)
        if "pos" in params:
            x = x + params["pos"]
        for p in params["blocks"]:
            x = x + _mha(_ln(x, p["ln1"]), _ln(x, p["ln1"]), p["attn"], heads)
            x = x + _mlp(_ln(x, p["ln2"]), p["mlp"])
        c = params["cross"]
        q = jnp.broadcast_to(c["query"], (x.shape[0], *c["query"].shape))
        q = q + _mha(q, _ln(x, c["ln1"]), c["attn"], heads)       # the reference does not normalise the query
        q = q + _mlp(_ln(q, c["ln2"]), c["mlp"])
        out = jnp.einsum("bqd,qdo->bqo", q, params["head"]["kernel"]) + params["head"]["bias"]
        return out.reshape(x.shape[0], self.out)


def _decay_mask(params) -> Any:
    """Weight decay on matrices only (kernels), not on biases, LayerNorm parameters or the query."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(k, "key", None) == "kernel" for k in path), params)


# ---------------------------------------------------------------- the grid: one jitted program

ACTIVATION_BUDGET = 1 << 30  # bytes of activations one jitted step or prediction may hold for its grid members


def _pool_grid(model: ProbeModel, params: dict, x: jax.Array) -> jax.Array:
    """[G, B, out] outputs of depth-0 attentive probes (params stacked over G grid members) on one shared input
    x [B, L, D], exactly ProbeModel.apply per member, without a per-member copy of the token map.

    Why: the keys and values of a member's cross-attention are LN(x + pos) W, an [L, D] x [D, 2D] product per row
    and member, and LN(x + pos) itself is a [G, B, L, D] array. With one query per head neither is needed: a head's
    score is (x'_t + p'_t) . u / sigma_t with u = ln1.scale * (W_k q) and x', p' the token-centred input and
    position embedding (biases and the LN shift add the same to every token's score, which softmax ignores); its
    output is (ln1.scale * sum_t a_t (x'_t + p'_t) / sigma_t + ln1.bias) W_v + b_v since the weights sum to 1; and
    sigma_t^2 = (|x'_t|^2 + 2 x'_t . p'_t + |p'_t|^2) / D + eps. Every product is with the shared x' (one
    [B L, D] x [D, G heads] matmul and its transpose), about D / heads times fewer FLOPs per member."""
    c = params["cross"]
    g, nq, d = c["query"].shape
    heads = model.heads or default_heads(d)
    hd = d // heads
    attn = c["attn"]
    qp = (jnp.einsum("gqd,gde->gqe", c["query"], attn["q"]["kernel"]) + attn["q"]["bias"][:, None])
    qp = qp.reshape(g, nq, heads, hd) / math.sqrt(hd)
    w_k = attn["kv"]["kernel"][:, :, :d].reshape(g, d, heads, hd)
    u = jnp.einsum("gdhe,gqhe->gqhd", w_k, qp).reshape(g, nq * heads, d) * c["ln1"]["scale"][:, None]
    xc = x - jnp.mean(x, -1, keepdims=True)                                           # [B, L, D], shared
    var = jnp.sum(jnp.square(xc), -1)[None] / d                                        # [1|G, B, L]
    scores = jnp.einsum("bld,gkd->gblk", xc, u)
    pos = params.get("pos")
    if pos is not None:
        pc = pos - jnp.mean(pos, -1, keepdims=True)                                    # [G, L, D]
        var = var + (2 * jnp.einsum("bld,gld->gbl", xc, pc) + jnp.sum(jnp.square(pc), -1)[:, None]) / d
        scores = scores + jnp.einsum("gld,gkd->glk", pc, u)[:, None]
    inv = jax.lax.rsqrt(var + layers_lib.LN_EPS)[..., None]                            # [G|1, B, L, 1]
    weights = jax.nn.softmax(scores * inv, axis=2) * inv                               # [G, B, L, heads]
    pooled = jnp.einsum("gblk,bld->gbkd", weights, xc)
    if pos is not None:
        pooled = pooled + jnp.einsum("gblk,gld->gbkd", weights, pc)
    pooled = pooled * c["ln1"]["scale"][:, None, None] + c["ln1"]["bias"][:, None, None]  # sum_t a_t LN(x_t + p_t)
    w_v = attn["kv"]["kernel"][:, :, d:].reshape(g, d, heads, hd)
    b_v = attn["kv"]["bias"][:, d:].reshape(g, 1, 1, heads, hd)
    o = jnp.einsum("gbqhd,gdhe->gbqhe", pooled.reshape(g, -1, nq, heads, d), w_v) + b_v
    o = jnp.einsum("gbqd,gde->gbqe", o.reshape(*o.shape[:3], d), attn["proj"]["kernel"]) + attn["proj"]["bias"][
        :, None, None]

    def tail(p, q):  # the block's MLP and the heads, per member on [B, Q, D]
        q = q + _mlp(_ln(q, p["cross"]["ln2"]), p["cross"]["mlp"])
        out = jnp.einsum("bqd,qdo->bqo", q, p["head"]["kernel"]) + p["head"]["bias"]
        return out.reshape(q.shape[0], model.out)

    return jax.vmap(tail)(params, c["query"][:, None] + o)


def shares_input(model: ProbeModel) -> bool:
    """Whether the grid's members read one shared copy of the input (_pool_grid) rather than one each (vmap)."""
    return model.kind == "linear" or (model.kind == "attentive" and model.depth == 0)


def apply_grid(model: ProbeModel, params: dict, x: jax.Array) -> jax.Array:
    """[G, B, out] outputs of the grid members (params stacked over G) on one batch x."""
    if model.kind == "attentive" and model.depth == 0:
        return _pool_grid(model, params, x)
    return jax.vmap(model.apply, in_axes=(0, None))(params, x)


def activation_bytes(model: ProbeModel, rows: int, length: int) -> int:
    """Rough bytes of float32 activations (training: forward and backward) of ONE grid member on `rows` inputs
    of `length` tokens; sizes the groups of members and rows evaluated at once."""
    if model.kind == "linear":
        return 4 * rows * (model.width + model.out) * 4
    heads, q = model.heads or default_heads(model.width), model.num_queries
    per_row = 4 * q * heads * length + 4 * model.width * q * int(4 + model.mlp_ratio)
    if model.depth or not shares_input(model):  # self-attention blocks and vmap-ed members see the whole map
        per_row += model.depth * (3 * heads * length ** 2 + int(12 + 3 * model.mlp_ratio) * length * model.width)
        per_row += 6 * length * model.width
    return 4 * rows * per_row


def members_per_group(model: ProbeModel, grid: int, rows: int, length: int,
                      budget: int = ACTIVATION_BUDGET) -> int:
    """The most grid members (a divisor of `grid`) whose activations on `rows` inputs fit in `budget`."""
    fit = max(1, budget // max(1, activation_bytes(model, rows, length)))
    return max(k for k in range(1, grid + 1) if grid % k == 0 and k <= fit)


def _by_group(fn, group: int, *stacked):
    """fn over the grid in groups of `group` members (leading axis of every leaf), one group after another, so
    that only one group's activations are live; fn(*stacked) at once when one group holds the whole grid."""
    grid = jax.tree.leaves(stacked)[0].shape[0]
    if group >= grid:
        return fn(*stacked)
    split = jax.tree.map(lambda a: a.reshape(grid // group, group, *a.shape[1:]), stacked)
    out = jax.lax.map(lambda args: fn(*args), split)
    return jax.tree.map(lambda a: a.reshape(grid, *a.shape[2:]), out)


def grid_loss(model: ProbeModel, kind: str, params, x, y, mask) -> jax.Array:
    """[G] training losses of the grid members (params stacked over G) on one batch."""
    out = apply_grid(model, params, x)
    if kind == "classification":
        labels = jnp.broadcast_to(y, out.shape[:2])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, labels), axis=1)
    err = jnp.square(out - y[None]) * mask[None]
    return jnp.sum(err, axis=(1, 2)) / jnp.maximum(jnp.sum(mask), 1.0)


def batch_schedule(n: int, batch_size: int, epochs: int, seed: int) -> np.ndarray:
    """[steps, batch] row indices: one fresh permutation per epoch, the same for every grid member."""
    batch_size = min(batch_size, n)
    steps_per_epoch = max(1, n // batch_size)
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(n)[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)
            for _ in range(epochs)]
    return np.concatenate(rows, axis=0).astype(np.int32)


def train_grid(model: ProbeModel, kind: str, x, y, mask, lrs: Sequence[float], wds: Sequence[float], *,
               epochs: int = 20, batch_size: int = 64, warmup: float = 0.1, seed: int = 0, progress: bool = False):
    """Trains len(lrs) x len(wds) probes together in one jitted program per epoch (scan over the epoch's steps);
    `progress` shows a bar over the epochs.

    Members whose input is shared (linear, depth-0 attentive: apply_grid) are trained at once; probes with
    self-attention blocks see the token map once per member, so their members go in groups small enough for
    ACTIVATION_BUDGET. AdamW (decoupled weight decay on kernels), linear warm-up then cosine decay. Returns
    (stacked params [G, ...], the grid as a list of (lr, wd), final minibatch losses [G])."""
    from tqdm.auto import tqdm

    grid = [(float(lr), float(wd)) for lr in lrs for wd in wds]
    if not grid:
        raise ValueError("--lrs / --wds: the grid is empty")
    schedule = batch_schedule(len(x), batch_size, epochs, seed)
    steps = int(schedule.shape[0])
    warm = max(1, int(warmup * steps))
    adam = optax.scale_by_adam()
    init = model.init(jax.random.PRNGKey(seed))
    decay = _decay_mask(init)
    length = int(x.shape[1]) if np.ndim(x) == 3 else 1
    group = members_per_group(model, len(grid), schedule.shape[1], length)
    g_lr = jnp.asarray([g[0] for g in grid], jnp.float32)
    g_wd = jnp.asarray([g[1] for g in grid], jnp.float32)
    mask = jnp.ones((len(x), 1), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)

    def start():
        params = jax.tree.map(lambda p: jnp.broadcast_to(p, (len(grid), *p.shape)), init)
        return params, jax.vmap(adam.init)(params)

    def epoch(params, opt, x, y, mask, g_lr, g_wd, step_ids, schedule):
        def step(carry, inputs):
            i, rows = inputs
            xb, yb, mb = x[rows], y[rows], mask[rows]
            frac = jnp.where(i < warm, (i + 1) / warm,
                             0.5 * (1 + jnp.cos(jnp.pi * (i - warm) / jnp.maximum(steps - warm, 1))))

            def update(p, o, lr, wd):  # one group of members: [k, ...] leaves
                def total(p):
                    losses = grid_loss(model, kind, p, xb, yb, mb)
                    return jnp.sum(losses), losses
                (_, losses), g = jax.value_and_grad(total, has_aux=True)(p)
                u, o = jax.vmap(adam.update)(g, o, p)
                scale = lambda v, a: v.reshape(-1, *([1] * (a.ndim - 1)))
                p = jax.tree.map(lambda p_, u_, d: p_ - scale(lr * frac, p_) * (u_ + scale(jnp.where(d, wd, 0.0),
                                                                                           p_) * p_), p, u, decay)
                return p, o, losses

            params, opt, loss = _by_group(update, group, *carry, g_lr, g_wd)
            return (params, opt), loss

        (params, opt), losses = jax.lax.scan(step, (params, opt), (step_ids, schedule))
        return params, opt, losses[-1]

    params, opt = jax.jit(start)()
    epoch = jax.jit(epoch, donate_argnums=(0, 1))
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y)
    schedule = jnp.asarray(schedule)
    per_epoch = steps // epochs
    (log.info if progress else log.debug)(
        "%s probe: %d lr x wd members (%s), %d rows of %s, %d epochs x %d steps", model.kind, len(grid),
        "one shared input" if group == len(grid) and shares_input(model) else f"in groups of {group}", len(x),
        " x ".join(map(str, x.shape[1:])), epochs, per_epoch)
    last = None
    bar = tqdm(range(epochs), desc=f"{model.kind} probe, {len(grid)} lr x wd", unit="epoch", file=sys.stderr,
               disable=not progress)
    for e in bar:
        ids = slice(e * per_epoch, (e + 1) * per_epoch)
        params, opt, last = epoch(params, opt, x, y, mask, g_lr, g_wd, jnp.arange(steps)[ids], schedule[ids])
        last = np.asarray(last)  # waits for the epoch, so that the bar's rate and ETA are real
        bar.set_postfix(loss=f"{np.nanmin(last):.3g}")
    return params, grid, last


def predict_grid(model: ProbeModel, params, x, chunk: int = 0) -> np.ndarray:
    """[G, N, out] outputs of every grid member (jitted, in chunks of `chunk` rows; 0 = as many as fit in
    ACTIVATION_BUDGET, the last chunk padded so that one program serves every chunk)."""
    grid = jax.tree.leaves(params)[0].shape[0]
    length = int(x.shape[1]) if np.ndim(x) == 3 else 1
    if not chunk:  # forward only: about a third of activation_bytes' training figure
        per_row = max(1, activation_bytes(model, 1, length) // 3)
        chunk = int(min(len(x), max(1, ACTIVATION_BUDGET // (grid * per_row))))
    group = members_per_group(model, grid, chunk, length, budget=3 * ACTIVATION_BUDGET)
    fn = jax.jit(lambda p, xb: _by_group(lambda q: apply_grid(model, q, xb), group, p))
    outs = []
    for i in range(0, len(x), chunk):
        xb = np.asarray(x[i:i + chunk], np.float32)
        n = len(xb)
        if n < chunk:
            xb = np.concatenate([xb, np.zeros((chunk - n, *xb.shape[1:]), np.float32)])
        outs.append(np.asarray(fn(params, jnp.asarray(xb)))[:, :n])
    return np.concatenate(outs, axis=1)


def fit_ridge(x, y, evals: Sequence[np.ndarray], alphas: Sequence[float] = RIDGE_ALPHAS) -> list[np.ndarray]:
    """Closed-form ridge regression from x [N, D] to y [N, K] for every alpha at once (one eigendecomposition of
    the N x N Gram matrix, so D may be large: a whole patch-token map). Alphas are relative to the Gram matrix's
    mean eigenvalue, so one grid fits any feature scale. Returns [G, M, K] predictions for each array in `evals`.
    Why: with a few hundred rows per domain, SGD probes take too few steps to converge; this is exact."""
    x = np.asarray(x, np.float32)                     # kernels in float32 (memory), the solve in float64
    y_mean = np.asarray(y, np.float64).mean(0)
    s, u = np.linalg.eigh((x @ x.T).astype(np.float64))
    s = np.maximum(s, 0.0)
    scale = max(float(s.mean()), 1e-12)
    uy = u.T @ (np.asarray(y, np.float64) - y_mean)                                  # [N, K]
    coef = np.stack([u @ (uy / (s + a * scale)[:, None]) for a in alphas])          # [G, N, K] dual coefficients
    return [np.einsum("mn,gnk->gmk", (np.asarray(e, np.float32) @ x.T).astype(np.float64), coef) + y_mean
            for e in evals]


# ---------------------------------------------------------------- metrics


def group_mean(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Mean over rows of each group along axis -2 ([..., N, C] -> [..., num_groups, C])."""
    num = int(groups.max()) + 1
    onehot = np.zeros((num, len(groups)), np.float32)
    onehot[groups, np.arange(len(groups))] = 1.0
    return np.einsum("gn,...nc->...gc", onehot / onehot.sum(1, keepdims=True), values)


def classification_metrics(logits: np.ndarray, task: Task) -> dict[str, np.ndarray]:
    """Accuracy per grid member, per window and per clip (softmax probabilities averaged over a clip's windows)."""
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    clip_probs = group_mean(probs, task.groups)
    clip_y = np.zeros(clip_probs.shape[-2], np.int64)
    clip_y[task.groups] = task.y
    return {"accuracy": (clip_probs.argmax(-1) == clip_y).mean(-1),
            "window_accuracy": (probs.argmax(-1) == task.y).mean(-1)}


def regression_metrics(pred: np.ndarray, task: Task) -> dict[str, np.ndarray]:
    """R^2 per grid member, 1 - sum(SSE) / sum(SST) over the valid (domain, output) pairs, SST taken around the
    split's own within-domain mean (predicting each domain's mean scores about 0): all outputs, positions only,
    velocities only. Summing before dividing keeps near-constant outputs from dominating."""
    pred = np.asarray(pred, np.float64)
    g = pred.shape[0]
    sse = {p: np.zeros(g) for p in (0, 1)}
    sst = {p: 0.0 for p in (0, 1)}
    for d in np.unique(task.domain):
        rows = task.domain == d
        if rows.sum() < 2:
            continue
        y, m, part = task.y[rows], task.mask[rows], task.part[rows]
        valid = m.all(0)
        for p in (0, 1):
            cols = valid & (part[0] == p)
            if not cols.any():
                continue
            yc = y[:, cols]
            sst[p] += float(np.sum(np.square(yc - yc.mean(0))))
            sse[p] += np.sum(np.square(pred[:, rows][:, :, cols] - yc[None]), axis=(1, 2))
    if sst[0] + sst[1] <= 1e-12:
        raise ValueError("regression: no output has variance in this split (too few rows per domain?)")
    nan = np.full(g, np.nan)
    r2 = lambda e, t: 1.0 - e / t if t > 1e-12 else nan
    return {"r2": r2(sse[0] + sse[1], sst[0] + sst[1]), "r2_pos": r2(sse[0], sst[0]), "r2_vel": r2(sse[1], sst[1])}


# ---------------------------------------------------------------- the whole probe


def run_probe(train, val, test, *, task: str, target: str = "label", probe: str = "linear",
              lrs: Sequence[float] = DEFAULT_LRS, wds: Sequence[float] = DEFAULT_WDS, epochs: int = 20,
              batch_size: int = 64, depth: int = 0, heads: int = 0, seed: int = 0,
              alphas: Sequence[float] = RIDGE_ALPHAS, progress: bool = False) -> dict:
    """Fit the grid on `train` features, choose on `val`, report on `test` (Features from jepa.export).
    linear / attentive: an lr x wd grid trained with AdamW (`progress`: a bar over the epochs); ridge: closed
    form over `alphas`."""
    stats = state_stats(train, *parse_target(target)) if task == "regression" else None
    tr = make_task(train, task, target, probe, stats)
    va = make_task(val, task, target, probe, stats)
    te = make_task(test, task, target, probe, stats)
    if probe != "attentive":  # standardise features with the training split's statistics
        mu, sd = tr.x.mean(0), tr.x.std(0) + 1e-6
        for t in (tr, va, te):
            t.x = (t.x - mu) / sd
    if task == "classification":
        num_classes = int(max(tr.y.max(), va.y.max(), te.y.max())) + 1
        out = num_classes
    else:
        out = tr.y.shape[1]
    metric_fn = classification_metrics if task == "classification" else regression_metrics
    key = "accuracy" if task == "classification" else "r2"
    if probe == "ridge":
        y = np.eye(out, dtype=np.float32)[tr.y] if task == "classification" else tr.y
        val_out, test_out = fit_ridge(tr.x, y, [va.x, te.x], alphas)
        grid = [{"alpha": float(a)} for a in alphas]
    else:
        model = ProbeModel(kind=probe, width=int(tr.x.shape[-1]), out=out, depth=depth, heads=heads,
                           tokens=int(tr.x.shape[1]) if probe == "attentive" else 0)
        params, lr_wd, last_loss = train_grid(model, task, tr.x, tr.y, tr.mask, lrs, wds, epochs=epochs,
                                              batch_size=batch_size, seed=seed, progress=progress)
        val_out, test_out = predict_grid(model, params, va.x), predict_grid(model, params, te.x)
        grid = [{"lr": lr, "wd": wd, "train_loss": float(loss)} for (lr, wd), loss in zip(lr_wd, last_loss)]
    val_m, test_m = metric_fn(val_out, va), metric_fn(test_out, te)
    best = int(np.argmax(np.nan_to_num(val_m[key], nan=-np.inf)))
    return {"task": task, "target": target, "probe": probe, "metric": key,
            "best": {k: v for k, v in grid[best].items() if k != "train_loss"},
            "val": {k: float(v[best]) for k, v in val_m.items()},
            "test": {k: float(v[best]) for k, v in test_m.items()},
            "grid": [{**g, "val": float(val_m[key][i])} for i, g in enumerate(grid)],
            "rows": {"train": len(tr.x), "val": len(va.x), "test": len(te.x)}}


# ---------------------------------------------------------------- world benchmark


def benchmark(workdir: str, *, step: int | None = None, num_segments: int = 8, batch_size: int = 32,
              probes: Sequence[str] = ("linear", "ridge"), targets: Sequence[str] = ("keypoints[-1]",),
              epochs: int = 30, lrs=DEFAULT_LRS, wds=DEFAULT_WDS, config=None, depth: int = 0,
              episodes: int = BENCHMARK_EPISODES, layers: Sequence[int] | None = None,
              progress: bool = True) -> dict:
    """Domain accuracy and per-domain physical-state R^2 (default: image keypoints and their velocity at the
    window's last frame) from frozen embeddings of the world dataset: the run's EMA encoder at `step` (default
    latest) vs the same architecture at random initialisation (the run's config and seed).

    config: the run's config with changes (e.g. another `data.sources.world.data_dir`; default: the run's own).
    layers: encoder blocks whose outputs are probed (concatenated; default the last), e.g. (2,) for a middle one.
    episodes > 0 evaluates on a world dataset of that many episodes (same seed and domains as the run's, so its
    validation and test episodes were never seen in pretraining; generated on first use, then cached); the
    default preset's test split holds only ~4 episodes per domain, too few for stable per-domain R^2. 0 = the
    run's own dataset. `progress`: bars for the embedding and the probes' training, a line per result."""
    import time

    from jepa import config as config_lib
    from jepa import export as export_lib
    from jepa import runs
    config = (config if config is not None else runs.load_config(workdir)).copy_and_resolve_references()
    worlds = [name for name, s in config.data.sources.items() if s.kind == "world"]
    if not worlds:
        raise ValueError(f"{workdir}: the benchmark needs a run on the world dataset (or --config overrides of "
                         "config.data.sources pointing at one)")
    config.data.eval_mode = "uniform"
    config.data.num_segments = int(num_segments)
    for name in worlds:
        if episodes:
            config.data.sources[name].episodes = int(episodes)
    config_lib.validate(config)
    say = log.info if progress else log.debug
    say("probe benchmark: world dataset %s (%s episodes; generated once when missing, then cached), %d windows "
        "per episode, probes %s", ", ".join(config.data.sources[n].preset for n in worlds),
        episodes or "the run's", num_segments, ",".join(probes))
    features = ("pooled", "patches") if set(probes) - {"linear"} else ("pooled",)
    ckpt_params, ckpt_step = runs.load_encoder(workdir, export_lib.with_split(config, "train"), step=step)
    encoders = {f"step {ckpt_step}": ckpt_params, "random init": runs.random_encoder(config)}
    results = {}
    for name, params in encoders.items():
        feats = {split: export_lib.embed_split(config, params, split, features=features, batch_size=batch_size,
                                               layers=layers, progress=progress)
                 for split in ("train", "validation", "test")}
        for probe in probes:
            kw = dict(probe=probe, lrs=lrs, wds=wds, epochs=epochs, depth=depth, progress=progress)
            start = time.perf_counter()
            results.setdefault(name, {})[f"{probe}/domain"] = r = run_probe(
                feats["train"], feats["validation"], feats["test"], task="classification", target="domain", **kw)
            say("probe benchmark [%s] %s/domain: test accuracy %.3f (%.0f s)", name, probe, r["test"]["accuracy"],
                time.perf_counter() - start)
            for target in targets:
                start = time.perf_counter()
                results[name][f"{probe}/{target}"] = r = per_domain_regression(feats, target=target, **kw)
                say("probe benchmark [%s] %s/%s: test r2 %.3f (positions %.3f, velocities %.3f) (%.0f s)", name,
                    probe, target, r["test"]["r2"], r["test"]["r2_pos"], r["test"]["r2_vel"],
                    time.perf_counter() - start)
        summary = export_lib.summarize(feats["test"])
        results[name]["effective_rank"] = summary["effective_rank"]
    return results


def select_rows(feats, keep: np.ndarray):
    """The Features rows where `keep` is True."""
    keep = np.asarray(keep, bool)
    take = lambda a: None if a is None else np.asarray(a)[keep]
    return dataclasses.replace(feats, pooled=take(feats.pooled), patches=take(feats.patches),
                               channels={k: take(v) for k, v in feats.channels.items()},
                               targets={k: take(v) for k, v in feats.targets.items()},
                               rows=[r for r, k in zip(feats.rows, keep) if k])


def per_domain_regression(feats: dict, *, target: str = "states", **probe_kw) -> dict:
    """State regression with one probe grid per domain (state dimensions mean different things in each domain,
    so one shared head would have to route by domain first); test R^2 averaged over domains."""
    per = {}
    for d in np.unique(np.asarray(feats["train"].targets["domain"])):
        split = {k: select_rows(f, np.asarray(f.targets["domain"]) == d) for k, f in feats.items()}
        if min(len(f) for f in split.values()) < 2:
            continue
        per[int(d)] = run_probe(split["train"], split["validation"], split["test"], task="regression",
                                target=target, **probe_kw)
    if not per:
        raise ValueError("per-domain regression: no domain has rows in every split")
    mean = lambda part: {m: float(np.nanmean([r[part][m] for r in per.values()])) for m in ("r2", "r2_pos", "r2_vel")}
    return {"task": "regression", "target": target, "metric": "r2", "val": mean("val"), "test": mean("test"),
            "per_domain": per}


def format_table(results: dict) -> str:
    names = list(results)
    keys = [k for k in results[names[0]] if isinstance(results[names[0]][k], dict)]
    rows = [("", *names)]
    for k in keys:
        if results[names[0]][k]["metric"] == "accuracy":
            rows.append((f"{k}: test accuracy", *[f"{results[n][k]['test']['accuracy']:.3f}" for n in names]))
        else:
            for m in ("r2", "r2_pos", "r2_vel"):
                rows.append((f"{k}: test {m}", *[f"{results[n][k]['test'][m]:.3f}" for n in names]))
    rows.append(("pooled effective rank (test)", *[f"{results[n]['effective_rank']:.1f}" for n in names]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths))
    return "\n".join([line(rows[0]), "-+-".join("-" * w for w in widths), *map(line, rows[1:])])


# ---------------------------------------------------------------- command line


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a comma list of numbers") from None
    if not values or any(not v >= 0 for v in values):
        raise ValueError(f"{flag}: {text!r} must list non-negative numbers")
    return values


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a comma list of integers") from None


def _define_flags() -> None:
    from absl import flags
    flags.DEFINE_string("features", None, "export directory of the training split")
    flags.DEFINE_string("val_features", None, "export directory of the validation split (model selection)")
    flags.DEFINE_string("test_features", None, "export directory of the test split (reported)")
    flags.DEFINE_integer("step", None, "with --workdir: checkpoint step (default: the latest)")
    flags.DEFINE_enum("encoder", "ema", ("ema", "online", "random"), "with --workdir: the encoder to probe")
    flags.DEFINE_string("splits", "train,validation,test", "with --workdir: train,val,test split names")
    flags.DEFINE_enum("task", "classification", ("classification", "regression"), "probe task")
    flags.DEFINE_string("target", "label", "label | domain | states[t] | keypoints[t]; benchmark: regression "
                        "targets, a comma list (default keypoints[-1])")
    flags.DEFINE_string("probe", "", f"{' | '.join(PROBES)} (default linear; benchmark: a comma list, default "
                        "linear,ridge)")
    flags.DEFINE_string("lrs", ",".join(map(str, DEFAULT_LRS)), "learning rates of the grid, a comma list")
    flags.DEFINE_string("wds", ",".join(map(str, DEFAULT_WDS)), "weight decays of the grid, a comma list")
    flags.DEFINE_integer("epochs", 20, "training epochs of linear and attentive probes", lower_bound=1)
    flags.DEFINE_integer("batch_size", 64, "probe training batch", lower_bound=1)
    flags.DEFINE_integer("depth", 0, "attentive probe: self-attention blocks before the cross-attention pooling "
                         "(each makes the grid ~50x slower)", lower_bound=0)
    flags.DEFINE_integer("heads", 0, "attentive probe: attention heads (0 = auto)", lower_bound=0)
    flags.DEFINE_integer("num_segments", 8, "benchmark: windows per episode", lower_bound=1)
    flags.DEFINE_string("layers", "", "benchmark: encoder blocks to probe, a comma list (default: the last)")
    flags.DEFINE_integer("episodes", BENCHMARK_EPISODES, "benchmark: world episodes to evaluate on (generated on "
                         "first use and cached; 0 = the run's own dataset)", lower_bound=0)
    flags.DEFINE_string("output", "", "write the result JSON here")


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m jepa.probe [benchmark] [--flags] [--config.FIELD=VALUE ...]` (argv: the arguments after the
    program name); returns the result it prints."""
    from absl import flags

    from jepa import cli, runs
    from jepa import export as export_lib
    with cli.flag_scope():
        _, config_flag = cli.define_run_config(argv, "a jepa.train run: encode on the fly instead of exported "
                                               "features (benchmark: the run to evaluate)")
        _define_flags()
        bench = cli.parse(argv, commands=("benchmark",)) == "benchmark"
        f = flags.FLAGS
        lrs, wds = _floats(f.lrs, "--lrs"), _floats(f.wds, "--wds")
        probe = f.probe or ("linear,ridge" if bench else "linear")
        if bench:
            if not f.workdir:
                raise cli.UsageError("benchmark needs --workdir")
            targets = ["keypoints[-1]"] if f.target == "label" else f.target.split(",")
            result = benchmark(f.workdir, step=f.step, num_segments=f.num_segments, targets=targets,
                               episodes=f.episodes, layers=_ints(f.layers, "--layers") or None,
                               probes=probe.split(","), epochs=f.epochs, lrs=lrs, wds=wds, config=config_flag.value,
                               depth=f.depth)
            print(format_table(result))
        else:
            if f.workdir:
                splits = f.splits.split(",")
                if len(splits) != 3:
                    raise cli.UsageError("--splits needs three names: train,validation,test")
                config = config_flag.value
                params, _ = runs.load_encoder(f.workdir, export_lib.with_split(config, splits[0]), weights=f.encoder,
                                              step=f.step)
                features = ("pooled", "patches") if probe != "linear" else ("pooled",)
                train, val, test = (export_lib.embed_split(config, params, s, features=features, progress=True)
                                    for s in splits)
            else:
                if not (f.features and f.val_features and f.test_features):
                    raise cli.UsageError("give --features, --val_features and --test_features (export dirs), "
                                         "or --workdir")
                train, val, test = (export_lib.load_features(d) for d in (f.features, f.val_features,
                                                                            f.test_features))
            result = run_probe(train, val, test, task=f.task, target=f.target, probe=probe, lrs=lrs, wds=wds,
                               epochs=f.epochs, batch_size=f.batch_size, depth=f.depth, heads=f.heads, progress=True)
            print(json.dumps(result))
        output = f.output
    if output:
        workdir_lib.write_json(output, result, indent=2)
    return result


def run() -> None:
    """Entry of `python -m jepa.probe` and the `jepa-probe` console script."""
    from jepa import cli
    cli.run(main, __doc__)


if __name__ == "__main__":
    run()
