"""Parity with the reference PyTorch models: a small random transformers `VJEPA2Model` saved with
`save_pretrained`, converted into a workdir, must give the same encoder and predictor outputs here (float32,
max abs difference < 1e-5); the workdir exported back must reproduce the torch model; a Meta-format checkpoint
built from the same weights (by a key mapping written here, independently of jepa/convert.py) must convert to
the same numbers; `train.init_from` takes both sources directly. Nothing is downloaded."""

from __future__ import annotations

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import load_config
from flax import nnx

from jepa import config as config_lib
from jepa import convert, models, objectives, runs, sharding
from jepa import train as train_lib

TOL = 1e-5
FRAMES, RES = 16, 64
HF_SMALL = dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=3, mlp_ratio=3.0,   # head_dim 32: 2 unrotated
                pred_hidden_size=48, pred_num_attention_heads=2, pred_num_hidden_layers=2, pred_mlp_ratio=4.0,
                pred_num_mask_tokens=10, patch_size=16, tubelet_size=2, crop_size=RES, frames_per_clip=FRAMES)


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (zero biases, unit norms or zero mask tokens would hide layout mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name and name.endswith("weight") else 0.1 * noise)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.VJEPA2Model(transformers.VJEPA2Config(**HF_SMALL)).eval()
    randomise(model)
    folder = str(tmp_path_factory.mktemp("hf") / "small")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    video = rng.standard_normal((2, FRAMES, RES, RES, 3)).astype(np.float32)           # ours: [B, T, H, W, C]
    num_tokens = (FRAMES // 2) * (RES // 16) ** 2
    ctx, tgt = [], []
    for b in range(2):
        perm = rng.permutation(num_tokens)                                              # any order, any subset
        if b == 0 and num_tokens - 1 not in perm[40:100]:  # transformers sizes the target from sample 0's max
            j = int(np.flatnonzero(perm == num_tokens - 1)[0])
            perm[[j, 40]] = perm[[40, j]]
        ctx.append(perm[:40])
        tgt.append(perm[40:100])
    return video, np.stack(ctx), np.stack(tgt)


def torch_outputs(model, video, ctx, tgt):
    with torch.no_grad():
        out = model(torch.from_numpy(video).permute(0, 1, 4, 2, 3),                   # HF: [B, T, C, H, W]
                    context_mask=[torch.from_numpy(ctx)], target_mask=[torch.from_numpy(tgt)])
    return out.last_hidden_state.numpy(), out.predictor_output.last_hidden_state.numpy()


def our_outputs(workdir, video, ctx, tgt):
    config = runs.load_config(workdir)
    encoder, _ = runs.load_encoder(workdir, config)
    state, _ = runs.load_state_parts(workdir, ["params/predictor"])
    objective = objectives.build(config)
    enc = np.asarray(objective.encode(encoder, jnp.asarray(video)))
    context = jnp.take_along_axis(jnp.asarray(enc), jnp.asarray(ctx)[..., None], axis=1)
    # the reference predictor's default mask token is 1 (the long-range masks' token here)
    pred = objective.predict(state["params"]["predictor"], context, jnp.asarray(ctx), jnp.asarray(tgt), 1)
    return enc, np.asarray(pred)


def max_diff(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


@pytest.fixture(scope="module")
def converted(hf_model, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("runs") / "from_hf")
    convert.main(["--source", hf_model[1], "--workdir", workdir])
    return workdir


def test_hf_config_read(converted):
    config = runs.load_config(converted)
    dims = models.resolved_dims(config.model)
    assert dims["encoder"] == dict(width=64, depth=3, heads=2, mlp_dim=192, patch_size=16, tubelet_size=2)
    assert dims["predictor"] == dict(width=48, depth=2, heads=2, mlp_dim=192, num_mask_tokens=10)
    assert (config.data.resolution, config.data.num_frames, config.model.dtype) == (RES, FRAMES, "float32")


def test_hf_parity(hf_model, converted, inputs):
    """Encoder on the full clip and predictor with context / target masks match transformers in float32."""
    want_enc, want_pred = torch_outputs(hf_model[0], *inputs)
    enc, pred = our_outputs(converted, *inputs)
    assert max_diff(enc, want_enc) < TOL
    assert max_diff(pred, want_pred) < TOL
    assert np.abs(want_pred).mean() > 0.1  # the comparison is not between near-zero outputs
    # What remains is float32 rounding on both sides: against the torch model in float64, ours is as close as
    # torch's own float32 outputs are (measured: 2.6-3.6e-6 vs 4.5-6.0e-6 for the encoder).
    ref_enc, ref_pred = torch_outputs(copy.deepcopy(hf_model[0]).double(), inputs[0].astype(np.float64), *inputs[1:])
    assert max_diff(enc, ref_enc) <= max(1.5 * max_diff(want_enc, ref_enc), 1e-6)
    assert max_diff(pred, ref_pred) <= max(1.5 * max_diff(want_pred, ref_pred), 1e-6)


def test_hf_round_trip(hf_model, converted, inputs, tmp_path):
    """Our workdir exported back loads in transformers with the same weights and outputs."""
    out = str(tmp_path / "hf_out")
    assert convert.main(["export", "--workdir", converted, "--format", "hf", "--output", out]) == 0
    back = transformers.VJEPA2Model.from_pretrained(out).eval()
    original = hf_model[0].state_dict()
    assert set(back.state_dict()) == set(original)
    for key, value in back.state_dict().items():
        assert torch.equal(value, original[key]), key
    want = torch_outputs(hf_model[0], *inputs)
    for got, ref in zip(torch_outputs(back, *inputs), want):
        assert max_diff(got, ref) < 1e-6


def meta_state_dicts(model: torch.nn.Module) -> dict:
    """facebookresearch/vjepa2's checkpoint layout, from a transformers model: fused qkv, `blocks.{i}` and
    `predictor_blocks.{i}`, mask tokens as a list, a DDP `module.` prefix and a sin-cos `pos_embed` it ignores."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}

    def blocks(src: str, dst: str, depth: int) -> dict:
        out = {}
        for i in range(depth):
            s, d = f"{src}.{i}.", f"module.{dst}.{i}."
            for w in ("weight", "bias"):
                out[d + f"attn.qkv.{w}"] = torch.cat([sd[s + f"attention.{n}.{w}"] for n in ("query", "key", "value")])
                out[d + f"attn.proj.{w}"] = sd[s + f"attention.proj.{w}"]
                for m in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                    out[d + f"{m}.{w}"] = sd[s + f"{m}.{w}"]
        return out

    encoder = blocks("encoder.layer", "backbone.blocks", HF_SMALL["num_hidden_layers"])
    for w in ("weight", "bias"):
        encoder[f"module.backbone.patch_embed.proj.{w}"] = sd[f"encoder.embeddings.patch_embeddings.proj.{w}"]
        encoder[f"module.backbone.norm.{w}"] = sd[f"encoder.layernorm.{w}"]
    encoder["module.backbone.pos_embed"] = torch.zeros(1, 128, HF_SMALL["hidden_size"])
    predictor = blocks("predictor.layer", "backbone.predictor_blocks", HF_SMALL["pred_num_hidden_layers"])
    for w in ("weight", "bias"):
        predictor[f"module.backbone.predictor_embed.{w}"] = sd[f"predictor.embeddings.predictor_embeddings.{w}"]
        predictor[f"module.backbone.predictor_norm.{w}"] = sd[f"predictor.layernorm.{w}"]
        predictor[f"module.backbone.predictor_proj.{w}"] = sd[f"predictor.proj.{w}"]
    for i, token in enumerate(sd["predictor.embeddings.mask_tokens"]):
        predictor[f"module.backbone.mask_tokens.{i}"] = token.reshape(1, 1, -1)
    # The online encoder differs from the EMA target encoder that the reference evaluates (and transformers holds).
    online = {k: v + 1.0 for k, v in encoder.items()}
    return {"encoder": online, "target_encoder": encoder, "predictor": predictor, "epoch": 10}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_meta_parity(hf_model, inputs, tmp_path, suffix):
    parts = meta_state_dicts(hf_model[0])
    path = str(tmp_path / f"vjepa2{suffix}")
    if suffix == ".pt":
        torch.save(parts, path)
    else:
        from safetensors.torch import save_file
        save_file({f"{p}.{k}": v.contiguous() for p in ("encoder", "target_encoder", "predictor")
                   for k, v in parts[p].items()}, path)
    workdir = str(tmp_path / "from_meta")
    convert.main(["--source", path, "--workdir", workdir, "--resolution", str(RES), "--num_frames", str(FRAMES),
                  "--encoder_heads", "2", "--predictor_heads", "2"])
    want_enc, want_pred = torch_outputs(hf_model[0], *inputs)
    enc, pred = our_outputs(workdir, *inputs)
    assert max_diff(enc, want_enc) < TOL
    assert max_diff(pred, want_pred) < TOL
    # and back: the Meta file written from the workdir holds the same tensors
    out = str(tmp_path / f"back{suffix}")
    convert.main(["export", "--workdir", workdir, "--format", "meta", "--output", out])
    again = convert.read_meta(out)
    for part in ("encoder", "target_encoder", "predictor"):
        src = {convert._clean(k): v.numpy() for k, v in parts[part].items() if not k.endswith("pos_embed")}
        assert set(again[part]) == set(src)
        for key, value in src.items():
            np.testing.assert_array_equal(again[part][key], value, err_msg=key)


def test_action_conditioned_file_converts_encoder_only(hf_model, tmp_path):
    """V-JEPA 2-AC files: the action-conditioned predictor is refused with the reason, --encoder_only takes the
    encoder (the EMA one) into a workdir that jepa.runs reads."""
    parts = meta_state_dicts(hf_model[0])
    parts["predictor"] = {"module.backbone.action_encoder.weight": torch.zeros(48, 7),
                          "module.backbone.predictor_embed.weight": torch.zeros(48, 64)}
    path = str(tmp_path / "vjepa2-ac.pt")
    torch.save(parts, path)
    with pytest.raises(convert.ConversionError, match="action-conditioned.*--encoder_only"):
        convert.read_source(path, enc_heads=2)
    workdir = str(tmp_path / "ac_encoder")
    convert.main(["--source", path, "--workdir", workdir, "--encoder_only", "--encoder_heads=2",
                  f"--resolution={RES}"])
    encoder, _ = runs.load_encoder(workdir)
    np.testing.assert_array_equal(encoder["norm_bias"], parts["target_encoder"]["module.backbone.norm.bias"].numpy())


class NotATensor:
    """Pickled by reference: torch.load(weights_only=True) must refuse to build it."""


def test_pickled_code_is_refused(hf_model, tmp_path):
    path = str(tmp_path / "evil.pt")
    parts = meta_state_dicts(hf_model[0])
    torch.save({**parts, "extra": NotATensor()}, path)
    with pytest.raises(convert.ConversionError, match="refused to load.*weights_only.*NotATensor"):
        convert.read_source(path, enc_heads=2, pred_heads=2)


def test_layout_mismatch_is_named(hf_model, tmp_path):
    parts = meta_state_dicts(hf_model[0])
    del parts["encoder"]["module.backbone.blocks.1.mlp.fc2.bias"]
    del parts["target_encoder"]
    path = str(tmp_path / "partial.pt")
    torch.save(parts, path)
    with pytest.raises(convert.ConversionError, match=r"blocks\.1\.mlp\.fc2\.bias"):
        convert.read_source(path, enc_heads=2, pred_heads=2)
    parts = meta_state_dicts(hf_model[0])
    parts["encoder"]["module.backbone.blocks.0.attn.extra.weight"] = torch.zeros(2)
    torch.save(parts, path)
    with pytest.raises(convert.ConversionError, match=r"no place for.*attn\.extra\.weight"):
        convert.read_source(path, enc_heads=2, pred_heads=2)
    torch.save(meta_state_dicts(hf_model[0]), path)
    with pytest.raises(convert.ConversionError, match="64 wide, not a released size.*--encoder_heads"):
        convert.read_source(path)


def test_init_from_accepts_sources(hf_model, converted, tmp_path):
    """--config.train.init_from takes the HF folder and a Meta file directly: the trainer's fresh state holds
    the converted weights."""
    config = runs.load_config(converted)
    meta = str(tmp_path / "vjepa2.pt")
    torch.save(meta_state_dicts(hf_model[0]), meta)
    want, _ = runs.load_state_parts(converted, ["params", "ema"])
    mesh = sharding.make_mesh(config.mesh)
    run = train_lib.build_run(config, mesh)
    # Meta's file carries its own online encoder (the EMA one + 1 here); transformers' only the EMA one.
    online = jax.tree.map(lambda x: x + 1.0, want["ema"])
    for source, encoder in ((hf_model[1], want["ema"]), (meta, online)):
        with config.unlocked():
            config.train.init_from = source
        state = train_lib.fresh_state(config, run, mesh)
        jax.tree.map(np.testing.assert_allclose, {"params": state["params"], "ema": state["ema"]},
                     {"params": {"encoder": encoder, "predictor": want["params"]["predictor"]}, "ema": want["ema"]})
    with config.unlocked():
        config.model.predictor.depth = 3
    objective = objectives.build(config)
    params, ema = jax.eval_shape(lambda: objective.init(jax.random.PRNGKey(0), config))
    with pytest.raises(config_lib.ConfigError,
                       match=r"config\.train\.init_from: .*\['predictor'\]\['blocks'\].*shape \(2, .* \(3, "):
        convert.external_weights(meta, config, {"params": params, "ema": ema})


def test_bfloat16_safetensors_are_read(tmp_path):
    from safetensors.torch import save_file
    weights = {"a": torch.randn(3, 4).bfloat16(), "b": torch.randn(2)}
    save_file(weights, str(tmp_path / "w.safetensors"))
    got = convert._read_safetensors(str(tmp_path / "w.safetensors"))
    for key, value in weights.items():
        np.testing.assert_array_equal(got[key], value.float().numpy())


def test_released_parameter_counts():
    """Our parameter counts of every released size equal transformers' for the same config (no allocation)."""
    for width, depth, heads, mlp in ((1024, 24, 16, 4096), (1280, 32, 16, 5120), (1408, 40, 22, 6144)):
        hf = transformers.VJEPA2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                                       mlp_ratio=convert._mlp_ratio(mlp, width))
        with torch.device("meta"):
            model = transformers.VJEPA2Model(hf)
        hf_enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))
        hf_pred = sum(p.numel() for n, p in model.named_parameters() if n.startswith("predictor."))
        c = config_lib.base_config()
        c.model.encoder.update(dict(size="large", width=width, depth=depth, heads=heads, mlp_dim=mlp))
        enc = nnx.eval_shape(lambda c=c: models.build_encoder(c.model, nnx.Rngs(0)))
        pred = nnx.eval_shape(lambda c=c: models.build_predictor(c.model, (8, 16, 16), nnx.Rngs(0)))
        count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
        assert (count(enc), count(pred)) == (hf_enc, hf_pred)


def test_jepa_export_runs_on_converted_workdir(converted, world_dir, tmp_path):
    """jepa.export reads a converted workdir as it is (here on the tiny world dataset)."""
    from jepa import export as export_lib
    summary = export_lib.main([f"--workdir={converted}", "--split=validation", f"--output={tmp_path / 'feats'}",
                               "--batch_size=2", "--no_progress", f"--config.data.sources.world.data_dir={world_dir}",
                               "--config.data.sources.world.preset=tiny"])
    assert summary["rows"] > 0 and summary["dim"] == HF_SMALL["hidden_size"]


def test_world_model_takes_converted_encoder(converted):
    """A converted workdir is a world model's `encoder_from` (its architecture adopted, its EMA encoder loaded)."""
    config = load_config("tiny", "world_model")
    config.encoder_from = converted
    train_lib.adopt_encoder_config(config)
    encoder, step = runs.load_encoder(converted, config)
    assert step == 0 and encoder["patch_kernel"].shape == (2, 16, 16, 3, HF_SMALL["hidden_size"])


def test_export_refuses_other_rope_layout(converted, tmp_path):
    config_path = os.path.join(converted, "config.json")
    saved = json.loads(open(config_path).read())
    other = str(tmp_path / "interleaved")
    os.makedirs(other)
    for name in os.listdir(converted):
        src = os.path.join(converted, name)
        if name != "config.json":
            os.symlink(src, os.path.join(other, name))
    saved["model"]["rope_layout"] = "interleaved"
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump(saved, f)
    with pytest.raises(convert.ConversionError, match="rope_layout"):
        convert.export(other, str(tmp_path / "out"), "hf")
