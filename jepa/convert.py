"""Convert V-JEPA 2 weights between this project's workdirs and the released formats.

    python -m jepa.convert --source=vjepa2-vitl-fpc64-256 --workdir=runs/vitl          # Hugging Face folder
    python -m jepa.convert --source=vitl.pt --workdir=runs/vitl --resolution=256        # Meta checkpoint file
    python -m jepa.convert export --workdir=runs/vitl --format=hf --output=out/vitl-hf  # back to transformers
    python -m jepa.convert export --workdir=runs/vitl --format=meta --output=out/vitl.pt

Sources, told apart by content:
  - a Hugging Face `VJEPA2Model` folder (config.json with model_type "vjepa2", model.safetensors or a sharded
    index), as `save_pretrained` writes it and the Hub serves it (`facebook/vjepa2-vit*-fpc*-*`);
  - a checkpoint file of facebookresearch/vjepa2: a dict with `encoder` / `target_encoder` / `predictor` state
    dicts (keys may carry `module.` / `backbone.` prefixes), read from safetensors (keys "encoder.<name>", ...) or
    with `torch.load(weights_only=True)`, which refuses pickled code.

The result is an ordinary workdir: config.json (the architecture read from the source) and an Orbax checkpoint
at step 0 holding {"params": {"encoder", "predictor"}, "ema", "step"} (no optimiser state), which jepa.export,
jepa.probe and `--config.train.init_from` read like any run. `--config.train.init_from` also takes a source
directly (`external_weights`).

Layout mapping (reference -> ours; Linear weights are (out, in), ours (in, out)):
  - patch embedding Conv3d (w, C, t, p, p) -> patch_kernel (t, p, p, C, w) (jepa/models/vit.py);
  - block i -> index i of the stacked block parameters (jepa/models/layers.py); Meta's fused qkv is ours as is,
    Hugging Face's separate query / key / value are concatenated in that order;
  - predictor mask tokens (n, 1, 1, w) or mask_tokens.{i} (1, 1, w) -> mask_tokens (n, w).
Every source key must be used (the absolute position tables that RoPE checkpoints still carry, and the
classification head of `VJEPA2ForVideoClassification`, are the only keys skipped) and every parameter found,
so a layout mismatch fails with the keys named instead of loading partly.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

# Heads of the released sizes, by width: Meta's files carry no config, and heads are not visible in the shapes.
RELEASED_HEADS = {1024: 16, 1280: 16, 1408: 22, 384: 12}
# Released V-JEPA 2 checkpoints (Hugging Face names; Meta's files are vitl.pt, vith.pt, vitg.pt, vitg-384.pt).
RELEASED = ("facebook/vjepa2-vitl-fpc64-256", "facebook/vjepa2-vith-fpc64-256", "facebook/vjepa2-vitg-fpc64-256",
            "facebook/vjepa2-vitg-fpc64-384")
FORMATS = ("hf", "meta")
LN_EPS = 1e-6

_BLOCK_PARAMS = (  # ours <- (reference module, parameter, transposed)
    ("norm1_scale", "norm1", "weight", False), ("norm1_bias", "norm1", "bias", False),
    ("proj_kernel", "attn.proj", "weight", True), ("proj_bias", "attn.proj", "bias", False),
    ("norm2_scale", "norm2", "weight", False), ("norm2_bias", "norm2", "bias", False),
    ("fc1_kernel", "mlp.fc1", "weight", True), ("fc1_bias", "mlp.fc1", "bias", False),
    ("fc2_kernel", "mlp.fc2", "weight", True), ("fc2_bias", "mlp.fc2", "bias", False),
)


class ConversionError(ValueError):
    """A source that cannot be converted; the message names the file and what is wrong."""


# ---------------------------------------------------------------- reference state dicts <-> our parameters


class _Keys:
    """A flat state dict read once: `take` marks keys used, `check_all_used` names the rest."""

    def __init__(self, sd: Mapping[str, Any], where: str, ignore: Callable[[str], bool] = lambda k: False):
        self.sd, self.where, self.used = sd, where, set()
        self.ignore = ignore

    def has(self, key: str) -> bool:
        return key in self.sd

    def take(self, key: str) -> np.ndarray:
        if key not in self.sd:
            near = sorted(k for k in self.sd if k.rsplit(".", 1)[0] == key.rsplit(".", 1)[0])[:4]
            raise ConversionError(f"{self.where}: no parameter {key!r}" + (f" (found {near})" if near else ""))
        self.used.add(key)
        return np.asarray(self.sd[key], np.float32)

    def check_all_used(self) -> None:
        left = sorted(k for k in self.sd if k not in self.used and not self.ignore(k))
        if left:
            more = f" and {len(left) - 8} more" if len(left) > 8 else ""
            raise ConversionError(f"{self.where}: parameters this model has no place for: {left[:8]}{more}")


def _depth(sd: Mapping[str, Any], prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not found:
        return 0
    if found != set(range(max(found) + 1)):
        raise ConversionError(f"blocks {prefix}*: indices {sorted(found)} are not 0..{max(found)}")
    return max(found) + 1


def _blocks_from(keys: _Keys, prefix: str, style: str) -> dict[str, np.ndarray]:
    """Stacked block parameters from blocks `prefix{i}.`; style "meta" (fused qkv, `attn.`) or "hf"."""
    depth = _depth(keys.sd, prefix)
    if depth == 0:
        raise ConversionError(f"{keys.where}: no blocks {prefix}0, {prefix}1, ...")
    per_block = []
    for i in range(depth):
        p = f"{prefix}{i}."
        name = (lambda m: m.replace("attn.", "attention.")) if style == "hf" else (lambda m: m)
        block = {ours: (w.T if t else w) for ours, mod, par, t in _BLOCK_PARAMS
                 for w in [keys.take(f"{p}{name(mod)}.{par}")]}
        if style == "meta":
            block["qkv_kernel"] = keys.take(f"{p}attn.qkv.weight").T
            width = block["qkv_kernel"].shape[0]
            block["qkv_bias"] = (keys.take(f"{p}attn.qkv.bias") if keys.has(f"{p}attn.qkv.bias")
                                 else np.zeros(3 * width, np.float32))
        else:
            parts = [keys.take(f"{p}attention.{n}.weight").T for n in ("query", "key", "value")]
            block["qkv_kernel"] = np.concatenate(parts, axis=1)
            block["qkv_bias"] = np.concatenate([
                keys.take(f"{p}attention.{n}.bias") if keys.has(f"{p}attention.{n}.bias")
                else np.zeros(parts[0].shape[1], np.float32) for n in ("query", "key", "value")])
        per_block.append(block)
    return {name: np.stack([b[name] for b in per_block]) for name in per_block[0]}


def _blocks_to(blocks: Mapping[str, Any], prefix: str, style: str) -> dict[str, np.ndarray]:
    out = {}
    depth = np.shape(blocks["qkv_kernel"])[0]
    for i in range(depth):
        p = f"{prefix}{i}."
        name = (lambda m: m.replace("attn.", "attention.")) if style == "hf" else (lambda m: m)
        for ours, mod, par, t in _BLOCK_PARAMS:
            w = np.asarray(blocks[ours][i], np.float32)
            out[f"{p}{name(mod)}.{par}"] = w.T if t else w
        qkv_w, qkv_b = np.asarray(blocks["qkv_kernel"][i], np.float32).T, np.asarray(blocks["qkv_bias"][i], np.float32)
        if style == "meta":
            out[f"{p}attn.qkv.weight"], out[f"{p}attn.qkv.bias"] = qkv_w, qkv_b
        else:
            for n, w, b in zip(("query", "key", "value"), np.split(qkv_w, 3, axis=0), np.split(qkv_b, 3)):
                out[f"{p}attention.{n}.weight"], out[f"{p}attention.{n}.bias"] = w, b
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# Top-level names: (patch embedding, blocks prefix, final norm) per style.
_ENC_NAMES = {"meta": ("patch_embed.proj", "blocks.", "norm"),
              "hf": ("encoder.embeddings.patch_embeddings.proj", "encoder.layer.", "encoder.layernorm")}
_PRED_NAMES = {"meta": ("predictor_embed", "predictor_blocks.", "predictor_norm", "predictor_proj"),
               "hf": ("predictor.embeddings.predictor_embeddings", "predictor.layer.", "predictor.layernorm",
                      "predictor.proj")}


def encoder_from(keys: _Keys, style: str) -> dict:
    patch, blocks, norm = _ENC_NAMES[style]
    kernel = keys.take(f"{patch}.weight")
    if kernel.ndim != 5:
        raise ConversionError(f"{keys.where}: {patch}.weight has shape {kernel.shape}, expected a Conv3d weight "
                              "(width, channels, tubelet, patch, patch)")
    return {"patch_kernel": kernel.transpose(2, 3, 4, 1, 0), "patch_bias": keys.take(f"{patch}.bias"),
            "blocks": _blocks_from(keys, blocks, style),
            "norm_scale": keys.take(f"{norm}.weight"), "norm_bias": keys.take(f"{norm}.bias")}


def encoder_to(params: Mapping[str, Any], style: str) -> dict[str, np.ndarray]:
    patch, blocks, norm = _ENC_NAMES[style]
    kernel = np.asarray(params["patch_kernel"], np.float32)
    return {f"{patch}.weight": np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2)),
            f"{patch}.bias": np.asarray(params["patch_bias"], np.float32),
            **_blocks_to(params["blocks"], blocks, style),
            f"{norm}.weight": np.asarray(params["norm_scale"], np.float32),
            f"{norm}.bias": np.asarray(params["norm_bias"], np.float32)}


def predictor_from(keys: _Keys, style: str) -> dict:
    embed, blocks, norm, proj = _PRED_NAMES[style]
    if style == "hf":
        tokens = keys.take("predictor.embeddings.mask_tokens")
        tokens = tokens.reshape(tokens.shape[0], tokens.shape[-1])
    else:
        n = sum(1 for k in keys.sd if re.fullmatch(r"mask_tokens\.\d+", k))
        if n == 0:
            raise ConversionError(f"{keys.where}: no mask tokens (mask_tokens.0, ...): a predictor without "
                                  "learned mask tokens cannot be loaded here")
        tokens = np.stack([keys.take(f"mask_tokens.{i}").reshape(-1) for i in range(n)])
    return {"embed_kernel": keys.take(f"{embed}.weight").T, "embed_bias": keys.take(f"{embed}.bias"),
            "mask_tokens": tokens, "blocks": _blocks_from(keys, blocks, style),
            "norm_scale": keys.take(f"{norm}.weight"), "norm_bias": keys.take(f"{norm}.bias"),
            "proj_kernel": keys.take(f"{proj}.weight").T, "proj_bias": keys.take(f"{proj}.bias")}


def predictor_to(params: Mapping[str, Any], style: str) -> dict[str, np.ndarray]:
    embed, blocks, norm, proj = _PRED_NAMES[style]
    f32 = lambda x: np.asarray(x, np.float32)
    tokens = f32(params["mask_tokens"])
    if style == "hf":
        token_entries = {"predictor.embeddings.mask_tokens": tokens[:, None, None, :]}
    else:
        token_entries = {f"mask_tokens.{i}": tokens[i][None, None, :] for i in range(tokens.shape[0])}
    return {f"{embed}.weight": np.ascontiguousarray(f32(params["embed_kernel"]).T),
            f"{embed}.bias": f32(params["embed_bias"]), **token_entries,
            **_blocks_to(params["blocks"], blocks, style),
            f"{norm}.weight": f32(params["norm_scale"]), f"{norm}.bias": f32(params["norm_bias"]),
            f"{proj}.weight": np.ascontiguousarray(f32(params["proj_kernel"]).T),
            f"{proj}.bias": f32(params["proj_bias"])}


# ---------------------------------------------------------------- reading sources


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 numpy (bfloat16 files included: read through JAX)."""
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise ConversionError(f"{path}: reading safetensors needs the `safetensors` package "
                              "(pip install -e \".[interop]\")") from e
    try:
        with safe_open(path, framework="numpy") as f:
            out = {k: f.get_tensor(k).astype(np.float32) for k in f.keys() if f.get_slice(k).get_dtype() != "BF16"}
            bf16 = [k for k in f.keys() if k not in out]
        if bf16:  # numpy has no bfloat16: those go through JAX
            with safe_open(path, framework="flax") as f:
                out.update({k: np.asarray(f.get_tensor(k), np.float32) for k in bf16})
        return out
    except Exception as e:  # noqa: BLE001 - any failure to parse the file is the user's to fix
        raise ConversionError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _torch_load(path: str) -> Any:
    """torch.load with weights_only=True: tensors, containers and numbers only; pickled code is refused."""
    try:
        import torch
    except ImportError as e:
        raise ConversionError(f"{path}: reading a PyTorch checkpoint needs torch (pip install -e \".[interop]\"), "
                              "or convert it to safetensors first") from e
    import pickle
    try:
        try:  # memory-mapped: only the tensors converted are read (released files also hold optimiser state)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            raise
        except Exception:  # noqa: BLE001 - files in torch's legacy (non-zip) format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError for disallowed objects, others for damaged files
        text = str(e)
        # torch's message: what the unpickler rejected comes after this marker, advice to unpickle anyway before it
        why = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0] if "WeightsUnpickler error:" in \
            text else " ".join(text.split())[:200]
        raise ConversionError(
            f"{path}: refused to load: not a checkpoint of plain tensors that torch.load(weights_only=True) accepts "
            f"({type(e).__name__}: {why}). Pickled code is never executed here; save the state dicts alone (or as "
            "safetensors) and convert that file.") from None


def _to_numpy(tree: Any, where: str) -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if not hasattr(value, "shape"):
            raise ConversionError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if hasattr(value, "detach"):  # torch tensor (bfloat16 has no numpy dtype: go through float32)
            value = value.detach().float().numpy()
        out[str(key)] = np.asarray(value, np.float32)
    return out


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _clean(key: str) -> str:
    return key.replace("module.", "").replace("backbone.", "")


def is_hf_folder(path: str) -> bool:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    try:
        return _read_json(config).get("model_type") == "vjepa2"
    except (ValueError, AttributeError):
        return False


def is_source(path: str) -> bool:
    """Whether `path` is a released-format source (HF folder or Meta file) rather than a jepa workdir."""
    return bool(path) and (is_hf_folder(path) or os.path.isfile(path))


def read_meta(path: str) -> dict[str, dict[str, np.ndarray]]:
    """{"encoder", "target_encoder", "predictor"} (those present) as flat float32 state dicts, prefixes removed."""
    if path.endswith(".safetensors"):
        flat = _read_safetensors(path)
        raw: dict[str, dict] = {}
        for key, value in flat.items():
            top, _, rest = _clean(key).partition(".")
            raw.setdefault(top, {})[rest] = value
    else:
        raw = _torch_load(path)
        if not isinstance(raw, Mapping):
            raise ConversionError(f"{path}: expected a dict of state dicts, got {type(raw).__name__}")
    parts = {}
    for name in ("encoder", "target_encoder", "predictor"):
        if name in raw:
            if not isinstance(raw[name], Mapping):
                raise ConversionError(f"{path}: entry {name!r} is a {type(raw[name]).__name__}, not a state dict")
            parts[name] = {_clean(k): v for k, v in _to_numpy(raw[name], f"{path} [{name}]").items()}
    if "encoder" not in parts and "target_encoder" not in parts:
        raise ConversionError(f"{path}: no 'encoder' or 'target_encoder' state dict (top-level entries: "
                              f"{sorted(map(str, raw))[:10]}); is it a facebookresearch/vjepa2 checkpoint?")
    return parts


def read_hf(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json as a dict, flat float32 state dict without the `vjepa2.` prefix of classification models)."""
    config = _read_json(os.path.join(path, "config.json"))
    single, index = os.path.join(path, "model.safetensors"), os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        sd = _read_safetensors(single)
    elif os.path.isfile(index):
        files = sorted(set(_read_json(index)["weight_map"].values()))
        sd = {k: v for f in files for k, v in _read_safetensors(os.path.join(path, f)).items()}
    else:
        bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
        hint = f" (found {bins}: save the model again with safe_serialization, the default)" if bins else ""
        raise ConversionError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")
    return config, {k[len("vjepa2."):] if k.startswith("vjepa2.") else k: v for k, v in sd.items()}


# ---------------------------------------------------------------- architecture -> our config


def _size_name(width: int, depth: int, heads: int, mlp_dim: int) -> str | None:
    from jepa.models import ENCODER_SIZES
    for name, dims in ENCODER_SIZES.items():
        if dims == dict(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim):
            return name
    return None


def make_config(encoder: dict, predictor: dict | None, *, enc_heads: int, pred_heads: int, resolution: int,
                num_frames: int):
    """A jepa config describing the converted weights (float32 compute, the reference RoPE layout)."""
    from jepa import config as config_lib
    c = config_lib.base_config()
    t, p, _, channels, width = encoder["patch_kernel"].shape
    if channels != 3:
        raise ConversionError(f"patch embedding has {channels} input channels; this project's encoders take RGB (3)")
    depth, mlp_dim = encoder["blocks"]["fc1_kernel"].shape[0], encoder["blocks"]["fc1_kernel"].shape[2]
    name = _size_name(width, depth, enc_heads, mlp_dim)
    c.model.encoder.size = name or "large"
    if name is None:  # explicit sizes override the named size's
        c.model.encoder.update(dict(width=width, depth=depth, heads=enc_heads, mlp_dim=mlp_dim))
    c.model.encoder.patch_size, c.model.encoder.tubelet_size = int(p), int(t)
    if predictor is not None:
        pw, pd, pm = (predictor["embed_kernel"].shape[1], predictor["blocks"]["fc1_kernel"].shape[0],
                      predictor["blocks"]["fc1_kernel"].shape[2])
        c.model.predictor.update(dict(width=pw, depth=pd, heads=pred_heads, mlp_dim=0 if pm == 4 * pw else pm,
                                      num_mask_tokens=predictor["mask_tokens"].shape[0]))
    c.model.rope_layout = "reference"
    c.model.dtype = "float32"  # the released models' numbers; --config.model.dtype=bfloat16 on accelerators
    c.data.resolution, c.data.num_frames = int(resolution), int(num_frames)
    config_lib.validate(c)
    return c


def _heads(width: int, given: int, what: str, flag: str) -> int:
    heads = given or RELEASED_HEADS.get(width, 0)
    if not heads:
        raise ConversionError(f"the {what} is {width} wide, not a released size: give its attention heads with "
                              f"--{flag}")
    if width % heads:
        raise ConversionError(f"--{flag}={heads} does not divide the {what} width {width}")
    return heads


# ---------------------------------------------------------------- sources -> weights


def from_hf(path: str) -> tuple[dict, dict, dict]:
    """(encoder params, predictor params, HF config) of a transformers VJEPA2Model folder."""
    hf, sd = read_hf(path)
    for field, want in (("layer_norm_eps", LN_EPS), ("hidden_act", "gelu"), ("in_chans", 3)):
        if field in hf and hf[field] != want:
            raise ConversionError(f"{path}/config.json: {field}={hf[field]!r}; this project's models use {want!r}")
    skip = lambda k: k.startswith(("pooler.", "classifier."))  # VJEPA2ForVideoClassification's head
    keys = _Keys(sd, f"{path}/model.safetensors", ignore=skip)
    encoder = encoder_from(keys, "hf")
    predictor = predictor_from(keys, "hf")
    keys.check_all_used()
    if any(skip(k) for k in sd):
        logging.warning("%s: the classification head (pooler, classifier) is not converted", path)
    return encoder, predictor, hf


def from_meta(path: str) -> tuple[dict, dict, dict | None]:
    """(online encoder, EMA target encoder, predictor or None) of a facebookresearch/vjepa2 checkpoint; a missing
    online or target encoder is the other one."""
    parts = read_meta(path)
    skip = lambda k: k in ("pos_embed", "predictor_pos_embed")  # sin-cos tables RoPE models do not use
    encoders = {}
    for name in ("encoder", "target_encoder"):
        if name in parts:
            keys = _Keys(parts[name], f"{path} [{name}]", ignore=skip)
            encoders[name] = encoder_from(keys, "meta")
            keys.check_all_used()
    online = encoders.get("encoder", encoders.get("target_encoder"))
    target = encoders.get("target_encoder", online)
    predictor = None
    if "predictor" in parts:
        if "action_encoder.weight" in parts["predictor"]:
            raise ConversionError(
                f"{path}: its predictor is V-JEPA 2-AC's action-conditioned one (7-dim actions and states, an "
                "extrinsics encoder, no next-state head); jepa's world model pads actions of its own environments "
                "and is trained here with configs/world_model.py. Convert the encoder alone with --encoder_only")
        keys = _Keys(parts["predictor"], f"{path} [predictor]", ignore=skip)
        predictor = predictor_from(keys, "meta")
        keys.check_all_used()
    return online, target, predictor


def read_source(path: str, *, enc_heads: int = 0, pred_heads: int = 0, resolution: int = 0, num_frames: int = 0,
                encoder_only: bool = False):
    """(jepa config, {"params": {"encoder", "predictor"?}, "ema"}) of an HF folder or a Meta file.

    resolution / num_frames: the clip the config describes (default: the HF config's crop_size / frames_per_clip;
    256 px x 16 frames for Meta files, which carry no config)."""
    if is_hf_folder(path):
        encoder, predictor, hf = from_hf(path)
        online = target = encoder
        enc_heads = enc_heads or int(hf.get("num_attention_heads", 0))
        pred_heads = pred_heads or int(hf.get("pred_num_attention_heads", 0))
        resolution = resolution or int(hf.get("crop_size", 256))
        num_frames = num_frames or int(hf.get("frames_per_clip", 16))
    elif os.path.isfile(path):
        if encoder_only:
            parts = read_meta(path)
            name = "target_encoder" if "target_encoder" in parts else "encoder"
            keys = _Keys(parts[name], f"{path} [{name}]", ignore=lambda k: k == "pos_embed")
            online = target = encoder_from(keys, "meta")
            keys.check_all_used()
            predictor = None
        else:
            online, target, predictor = from_meta(path)
        resolution, num_frames = resolution or 256, num_frames or 16
    else:
        raise ConversionError(f"{path}: neither a Hugging Face V-JEPA 2 folder (config.json with model_type "
                              "'vjepa2') nor a checkpoint file")
    if encoder_only:
        predictor = None
    width = online["patch_kernel"].shape[-1]
    enc_heads = _heads(width, enc_heads, "encoder", "encoder_heads")
    if predictor is not None:
        pred_heads = _heads(predictor["embed_kernel"].shape[1], pred_heads, "predictor", "predictor_heads")
    config = make_config(online, predictor, enc_heads=enc_heads, pred_heads=pred_heads or 12,
                         resolution=resolution, num_frames=num_frames)
    params = {"encoder": online} if predictor is None else {"encoder": online, "predictor": predictor}
    return config, {"params": params, "ema": target}


def check_against(weights: dict, expected: Any, where: str) -> None:
    """Raises ConversionError naming the first parameter whose shape differs from `expected` (a tree of arrays or
    ShapeDtypeStructs with the same structure)."""
    import jax
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(weights)}
    want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    for key in sorted(set(got) | set(want)):
        if got.get(key) != want.get(key):
            raise ConversionError(f"{where}: parameter {key} has shape {got.get(key)} in the source but "
                                  f"{want.get(key)} in the model the config describes")


def external_weights(path: str, config, target: Any) -> dict:
    """{"params", "ema"} of a source for `train.init_from`, checked against the trainer's abstract state `target`
    and laid out on its shardings. Raises config.ConfigError (the trainer's command line prints it as one line)."""
    import jax

    from jepa import config as config_lib
    from jepa import models
    try:
        if config.objective != "vjepa":
            raise ConversionError("released checkpoints initialise V-JEPA pretraining runs (objective 'vjepa'); a "
                                  "world model takes its encoder from a converted workdir (--config.encoder_from)")
        dims = models.resolved_dims(config.model)  # heads are not in the weights: the config's are used
        _, weights = read_source(path, enc_heads=dims["encoder"]["heads"], pred_heads=dims["predictor"]["heads"])
        if "predictor" not in weights["params"]:
            raise ConversionError(f"{path}: the source has no predictor")
        wanted = {"params": target["params"], "ema": target["ema"]}
        check_against(weights, wanted, path)
    except ConversionError as e:
        raise config_lib.ConfigError(f"config.train.init_from: {e}") from None
    return jax.tree.map(lambda w, t: jax.device_put(np.asarray(w, t.dtype), t.sharding), weights, wanted)


# ---------------------------------------------------------------- workdirs


def write_workdir(workdir: str, config, weights: dict) -> None:
    """An Orbax workdir at step 0 holding `weights` ({"params", "ema"}) and config.json; the weights are checked
    against the model `config` describes first."""
    import jax
    import jax.numpy as jnp

    from jepa import checkpoint as ckpt_lib
    from jepa import objectives
    from jepa import workdir as workdir_lib
    root = workdir_lib.path(workdir)
    if (root / "config.json").exists() or ckpt_lib.saved_steps(workdir):
        raise ConversionError(f"--workdir={workdir}: already holds a run; convert into a new folder")
    objective = objectives.build(config)
    params, ema = jax.eval_shape(lambda: objective.init(jax.random.PRNGKey(0), config))
    expected = {"params": params if "predictor" in weights["params"] else {"encoder": params["encoder"]},
                "ema": ema}
    check_against(weights, expected, workdir)
    root.mkdir(parents=True, exist_ok=True)
    # One device copy per array: the EMA encoder is often the very arrays of the online one.
    copies: dict[int, Any] = {}

    def device(x):
        if id(x) not in copies:
            copies[id(x)] = jnp.asarray(x)
        return copies[id(x)]

    state = jax.tree.map(device, {**weights, "step": np.zeros((), np.int32)})
    checkpointer = ckpt_lib.Checkpointer(workdir, save_every=1, keep=1, async_save=False)
    try:
        checkpointer.save(0, state, None, force=True)
    finally:
        checkpointer.close()
    (root / "config.json").write_text(config.to_json_best_effort(indent=2))


def read_workdir(workdir: str, weights: str = "ema", step: int | None = None) -> tuple[Any, dict, dict | None]:
    """(config, encoder params, predictor params or None) of a run: the EMA or the online encoder."""
    from jepa import runs
    config = runs.load_config(workdir)
    encoder, _ = runs.load_encoder(workdir, config, weights=weights, step=step)
    try:
        state, _ = runs.load_state_parts(workdir, ["params/predictor"], step)
        predictor = state["params"]["predictor"]
    except ValueError:
        predictor = None
    return config, _numpy_tree(encoder), (_numpy_tree(predictor) if predictor is not None else None)


def _numpy_tree(tree: Mapping) -> dict:
    return {k: _numpy_tree(v) if isinstance(v, Mapping) else np.asarray(v) for k, v in tree.items()}


def _mlp_ratio(mlp_dim: int, width: int) -> float:
    """A ratio whose int(width * ratio) is mlp_dim (transformers sizes the MLP that way; 48/11 for ViT-g gives
    6143.99...)."""
    ratio = mlp_dim / width
    while int(width * ratio) < mlp_dim:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def hf_config(config, dims: dict) -> dict:
    """transformers' VJEPA2Config fields for a model `config` describes."""
    e, p = dims["encoder"], dims["predictor"]
    return {
        "architectures": ["VJEPA2Model"], "model_type": "vjepa2", "torch_dtype": "float32",
        "patch_size": e["patch_size"], "tubelet_size": e["tubelet_size"], "in_chans": 3,
        "crop_size": int(config.data.resolution), "frames_per_clip": int(config.data.num_frames),
        "hidden_size": e["width"], "num_hidden_layers": e["depth"], "num_attention_heads": e["heads"],
        "mlp_ratio": _mlp_ratio(e["mlp_dim"], e["width"]), "layer_norm_eps": LN_EPS, "qkv_bias": True,
        "hidden_act": "gelu", "drop_path_rate": 0.0, "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02, "pred_hidden_size": p["width"], "pred_num_hidden_layers": p["depth"],
        "pred_num_attention_heads": p["heads"], "pred_num_mask_tokens": p["num_mask_tokens"],
        "pred_zero_init_mask_tokens": True, "pred_mlp_ratio": _mlp_ratio(p["mlp_dim"], p["width"]),
    }


def export(workdir: str, output: str, fmt: str, weights: str = "ema", step: int | None = None) -> str:
    """Writes a run's encoder (`weights`: EMA or online) and predictor as a transformers folder (fmt "hf") or a
    Meta checkpoint file ("meta": both encoders, .pt through torch.save, or .safetensors with keys
    "encoder.<name>", "target_encoder.<name>", "predictor.<name>"). Returns the path written."""
    from jepa import models
    if fmt not in FORMATS:
        raise ConversionError(f"--format={fmt}: expected one of {', '.join(FORMATS)}")
    config, encoder, predictor = read_workdir(workdir, weights, step)
    if config.model.rope_layout != "reference":
        raise ConversionError(f"{workdir}: model.rope_layout={config.model.rope_layout!r}; the released formats use "
                              "the 'reference' layout only")
    if config.objective != "vjepa":
        predictor = None  # the world model's action-conditioned predictor has no counterpart in these formats
    if predictor is None and fmt == "hf":
        raise ConversionError(f"{workdir}: no V-JEPA predictor in its checkpoint; transformers' VJEPA2Model needs one")
    if fmt == "hf":
        from safetensors.numpy import save_file
        os.makedirs(output, exist_ok=True)
        sd = {**encoder_to(encoder, "hf"), **predictor_to(predictor, "hf")}
        save_file(sd, os.path.join(output, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(output, "config.json"), "w") as f:
            json.dump(hf_config(config, models.resolved_dims(config.model)), f, indent=2)
        return output
    # Meta's files keep both encoders: the online one from the run next to the EMA target encoder.
    if weights == "online":
        online = encoder
    else:  # only the online encoder: the config and predictor are read already
        from jepa import runs
        online = _numpy_tree(runs.load_encoder(workdir, config, weights="online", step=step)[0])
    parts = {"encoder": encoder_to(online, "meta"), "target_encoder": encoder_to(encoder, "meta")}
    if predictor is not None:
        parts["predictor"] = predictor_to(predictor, "meta")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if output.endswith(".safetensors"):
        from safetensors.numpy import save_file
        save_file({f"{part}.{k}": v for part, sd in parts.items() for k, v in sd.items()}, output,
                  metadata={"format": "pt"})
    else:
        try:
            import torch
        except ImportError as e:
            raise ConversionError(f"--output={output}: writing a .pt file needs torch (pip install -e "
                                  "\".[interop]\"); a .safetensors output does not") from e
        torch.save({part: {k: torch.from_numpy(v) for k, v in sd.items()} for part, sd in parts.items()}, output)
    return output


def convert_in(source: str, workdir: str, **kwargs) -> Any:
    """Converts a source into a new workdir; returns its config."""
    config, weights = read_source(source, **kwargs)
    write_workdir(workdir, config, weights)
    return config


# ---------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    from absl import flags

    from jepa import cli
    with cli.flag_scope():
        source = flags.DEFINE_string("source", None, "import: a Hugging Face V-JEPA 2 folder or a Meta checkpoint "
                                     "file (.pt / .pth / .safetensors)")
        workdir = flags.DEFINE_string("workdir", None, "import: the new workdir; export: the run to export")
        output = flags.DEFINE_string("output", None, "export: the folder (hf) or file (meta) to write")
        fmt = flags.DEFINE_enum("format", "hf", FORMATS, "export: hf (transformers folder) or meta (checkpoint file)")
        weights = flags.DEFINE_enum("weights", "ema", ["ema", "online"], "export: which encoder to write")
        step = flags.DEFINE_integer("step", None, "export: checkpoint step (default: the newest)")
        resolution = flags.DEFINE_integer("resolution", 0, "import: clip resolution of the config (default: the HF "
                                          "config's crop_size; 256 for Meta files)")
        num_frames = flags.DEFINE_integer("num_frames", 0, "import: frames per clip of the config (default: the HF "
                                          "config's frames_per_clip; 16 for Meta files)")
        enc_heads = flags.DEFINE_integer("encoder_heads", 0, "import: encoder attention heads (default: the HF "
                                         "config's, or the released size's for Meta files)")
        pred_heads = flags.DEFINE_integer("predictor_heads", 0, "import: predictor attention heads (default as "
                                          "--encoder_heads)")
        encoder_only = flags.DEFINE_bool("encoder_only", False, "import: the encoder alone (e.g. of V-JEPA 2-AC "
                                         "files, whose action-conditioned predictor has no counterpart here)")
        command = cli.parse(argv, commands=("export",), required=("workdir",))
        try:
            if command == "export":
                if not output.value:
                    raise cli.UsageError("export: --output required")
                path = export(workdir.value, output.value, fmt.value, weights.value, step.value)
                logging.info("wrote %s (%s)", path, fmt.value)
                return 0
            if not source.value:
                raise cli.UsageError("--source required (or the command: export)")
            config = convert_in(source.value, workdir.value, enc_heads=enc_heads.value, pred_heads=pred_heads.value,
                                resolution=resolution.value, num_frames=num_frames.value,
                                encoder_only=encoder_only.value)
        except (ConversionError, FileNotFoundError) as e:  # the message names the input and what is wrong
            raise cli.UsageError(str(e)) from None
        from jepa import models
        dims = models.resolved_dims(config.model)
        logging.info("wrote %s: encoder %s, predictor %s; clips of %d frames at %d px", workdir.value,
                     dims["encoder"], dims["predictor"] if not encoder_only.value else "none",
                     config.data.num_frames, config.data.resolution)
    return 0


def run() -> None:
    from jepa import cli
    cli.run(main, __doc__)


if __name__ == "__main__":
    run()
