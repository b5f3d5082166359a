"""benchmarks/pod_projection.py (the pod-scale plan on paper) and benchmarks/gpu_levers.sh (the GPU lever runs)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO
from flax import nnx

from jepa import models, sharding

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import pod_projection as pp  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def tiny_facts():
    return pp.model_facts("tiny", pp.load_config("configs/quickstart.py:tiny"))


def test_state_byte_formula_matches_the_real_train_state(tiny_facts):
    """The per-parameter byte count (params + Adam moments + EMA encoder, float32) is the trainer's real state:
    a new state array or dtype makes the formula drift and this fail."""
    real = sharding.replicated_bytes(tiny_facts.abstract_state)
    scalars = sum(np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tiny_facts.abstract_state) if x.ndim == 0)
    assert tiny_facts.state_bytes() == real - scalars
    assert tiny_facts.state_bytes_per_chip(1, 1) == real
    # The parameter counts are the models' own.
    config = pp.load_config("configs/quickstart.py:tiny")
    encoder = nnx.eval_shape(lambda: models.build_encoder(config.model, nnx.Rngs(0)))
    assert tiny_facts.encoder_params == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(encoder)))


def test_state_per_chip_follows_the_sharding_rules(tiny_facts):
    """fsdp divides the large arrays; biases and scales stay replicated, so per chip is a little above 1/fsdp;
    the data axis replicates."""
    full = tiny_facts.state_bytes_per_chip(1, 1)
    assert tiny_facts.state_bytes_per_chip(8, 1) == full
    per_chip = tiny_facts.state_bytes_per_chip(1, 8)
    assert full / 8 < per_chip < full / 8 * 1.2
    assert tiny_facts.state_bytes_per_chip(4, 2) == tiny_facts.state_bytes_per_chip(1, 2)


@pytest.fixture(scope="module")
def vitl_facts():
    return pp.model_facts("ViT-L", pp.load_config("ViT-L"))


@pytest.mark.parametrize("fsdp", [8, 64])
def test_vit_l_state_shards_over_fsdp_with_replicated_biases(vitl_facts, fsdp):
    """The trainer accepts fsdp meshes for ViT-L (its stacked [24, 1024+] biases and scales are replicated by rule,
    not refused as unsharded) and the projection's per-chip state is the real layout's."""
    from jax.sharding import AbstractMesh
    shardings = sharding.state_shardings(vitl_facts.abstract_state, AbstractMesh((1, fsdp, 1), sharding.AXES))
    per_chip = sharding.bytes_per_device(vitl_facts.abstract_state, shardings)
    assert vitl_facts.state_bytes_per_chip(1, fsdp) == per_chip
    assert vitl_facts.state_bytes() / fsdp < per_chip < vitl_facts.state_bytes() / fsdp + 1e7  # + replicated vectors


def test_meshes_the_trainer_refuses_are_never_recommended(vitl_facts):
    """fsdp=256 cannot split the 384-wide predictor: the trainer refuses the mesh, so the projection lists it as a
    candidate with its unsharded arrays (replicated, they also inflate its state) and recommends another."""
    from jax.sharding import AbstractMesh
    with pytest.raises(ValueError, match="fsdp=256"):
        sharding.state_shardings(vitl_facts.abstract_state, AbstractMesh((1, 256, 1), sharding.AXES))
    tight = dataclasses.replace(pp.PLATFORMS["TPU v5p"], hbm_bytes=2 * vitl_facts.state_bytes() / 100)  # fsdp >= 128
    row = pp.project(vitl_facts, tight, 256, 8, gather_bytes=4, grad_bytes=4)
    refused = [c for c in row["candidates"] if c["mesh"] == (1, 256, 1)][0]
    assert any("predictor/blocks/fc1_kernel" in a for a in refused["unsharded"])
    assert row["mesh"] == (2, 128, 1)
    assert all(not c["unsharded"] for c in row["candidates"] if c["mesh"][1] <= 128)


def test_comm_model_and_mesh_choice(tiny_facts):
    facts = dataclasses.replace(tiny_facts, encoder_params=1000, predictor_params=100, mask_types=2)
    v = pp.comm_bytes(facts, data=1, fsdp=1, gather_bytes=4, grad_bytes=4)
    assert v == {"fsdp": 0.0, "data": 0.0}
    v = pp.comm_bytes(facts, data=1, fsdp=8, gather_bytes=2, grad_bytes=4)
    # EMA forward + 2 masks x (forward + backward) gathers in bf16, 2 masks x grad reduce-scatters in fp32
    assert v["fsdp"] == pytest.approx(7 / 8 * ((1000 + 4 * 1100) * 2 + 2 * 1100 * 4)) and v["data"] == 0
    v = pp.comm_bytes(facts, data=4, fsdp=2, gather_bytes=4, grad_bytes=4)
    assert v["data"] == pytest.approx(2 * 2 * 3 / 4 * 1100 / 2 * 4)  # per mask type's backward
    # H100: an fsdp group of 8 stays on NVLink, 16 crosses InfiniBand (9x slower per direction)
    h100 = pp.PLATFORMS["H100"]
    vol = {"fsdp": 1e9, "data": 0.0}
    assert pp.comm_seconds(h100, vol, 1, 16) / pp.comm_seconds(h100, vol, 1, 8) == pytest.approx(9.0)
    tpu = pp.PLATFORMS["TPU v5p"]
    assert pp.comm_seconds(tpu, vol, 1, 256) == pytest.approx(1e9 / (600e9 / 2 * pp.LINK_EFFICIENCY))
    # the peaks are the trainer's MFU table's
    from jepa import metrics
    assert h100.peak_flops == metrics.nominal_peak_flops("H100") and tpu.peak_flops == metrics.nominal_peak_flops(
        "TPU v5p")
    row = pp.project(tiny_facts, h100, 64, 4, gather_bytes=4, grad_bytes=4)
    best = min((c for c in row["candidates"] if c["fits"]), key=lambda c: c["comm_s"])
    assert row["mesh"] == best["mesh"] and row["comm_ms"] == pytest.approx(best["comm_s"] * 1e3)
    m = row["measured"]
    assert m["step_overlapped_ms"] == pytest.approx(max(m["compute_ms"], row["comm_ms"]))
    assert m["step_serial_ms"] == pytest.approx(m["compute_ms"] + row["comm_ms"])
    hide = m["min_batch_hiding_comm"]  # the smallest batch whose compute covers the communication
    assert hide * tiny_facts.flops_per_clip / (h100.peak_flops * pp.MEASURED_MFU) >= best["comm_s"]
    assert (hide - 1) * tiny_facts.flops_per_clip / (h100.peak_flops * pp.MEASURED_MFU) < best["comm_s"] or hide == 1
    tiny_hbm = dataclasses.replace(h100, hbm_bytes=1.0)
    with pytest.raises(ValueError, match="does not fit"):
        pp.project(tiny_facts, tiny_hbm, 8, 4, gather_bytes=4, grad_bytes=4)


def test_projection_table_for_vit_l(tmp_path):
    """The command prints the table for the real ViT-L recipe (303.9 M encoder parameters, as the README's
    conversion table) and writes every row as JSON."""
    out_json = tmp_path / "plan.json"
    out = subprocess.run([sys.executable, "benchmarks/pod_projection.py", "--models=ViT-L", "--chips=8,64",
                          f"--json={out_json}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ViT-L: 303,885,312 encoder + 22,086,016 predictor parameters" in out.stdout
    rows = json.loads(out_json.read_text())
    assert [(r["platform"], r["chips"]) for r in rows] == [("TPU v5p", 8), ("TPU v5p", 64), ("H100", 8),
                                                           ("H100", 64)]
    assert sum(line.startswith("| ViT-L |") for line in out.stdout.splitlines()) == 4
    for r in rows:
        assert r["batch_per_chip"] == 32 and r["measured"]["compute_ms"] > 0 and r["state_gib"] > 0
        assert r["mesh"][0] * r["mesh"][1] == r["chips"]
    bad = subprocess.run([sys.executable, "benchmarks/pod_projection.py", "--models=ViT-Q"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "ViT-Q" in bad.stderr and "config file" in bad.stderr


HLO = """HloModule m

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %ag = f32[8,4]{1,0} all-gather(f32[1,4]{1,0} %x), channel_id=1, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %rs = bf16[2,4]{1,0} reduce-scatter(bf16[8,4]{1,0} %y), replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add
  ROOT %t = (s32[], f32[8,4]) tuple(%i, %ag)
}

%cond (p: (s32[], f32[8,4])) -> pred[] {
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

ENTRY %main (a: f32[16]) -> f32[16] {
  %w = (s32[], f32[8,4]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %ars = (f32[16]{0}, f32[4]{0}) all-reduce-start(f32[16]{0} %a, f32[4]{0} %b), replica_groups={{0,1,2,3,4,5,6,7}}
  %ard = (f32[16]{0}, f32[4]{0}) all-reduce-done(%ars)
  ROOT %r = f32[16]{0} get-tuple-element(%ard), index=0
}
"""


def test_collective_bytes_weights_loops_and_ring_shares():
    got = pp.collective_bytes(HLO, devices=8)
    assert got["all-gather"] == pytest.approx(3 * 8 * 4 * 4 * 7 / 8)        # 3 trips x 128 B x (n-1)/n
    assert got["reduce-scatter"] == pytest.approx(3 * 2 * 4 * 2 * 3)         # 3 trips x 16 B shard x (n-1), n=4
    assert got["all-reduce"] == pytest.approx((16 + 4) * 4 * 2 * 7 / 8)      # start counted once, done not
    with pytest.raises(ValueError, match="ENTRY"):
        pp.collective_bytes("HloModule m\n", devices=8)


@pytest.mark.slow
def test_check_mode_matches_xla_memory_analysis_on_8_devices():
    """--check compiles the real step on 8 simulated devices for the 8-chip mesh and (1, 8, 1) and asserts XLA's
    argument bytes are the projected state per chip plus the batch shard."""
    out = subprocess.run([sys.executable, "benchmarks/pod_projection.py", "--models=configs/quickstart.py:tiny",
                          "--chips=8", "--check", "--batch_per_chip=2", "--tolerance=0.001"], cwd=REPO,
                         capture_output=True, text=True, timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    checks = [line for line in out.stdout.splitlines() if line.startswith("check ")]
    assert len(checks) == 2 and all(line.endswith(": OK") for line in checks)
    assert "mesh (1, 8, 1)" in checks[-1]


# ------------------------------------------------------------------ benchmarks/gpu_levers.sh


def test_gpu_levers_dry_run_lists_one_step_bench_per_lever():
    script = os.path.join(REPO, "benchmarks", "gpu_levers.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    out = subprocess.run(["bash", script, "--dry_run"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    commands = [line for line in out.stdout.splitlines() if "benchmarks/step_bench.py" in line]
    names = [line.split(":", 1)[0] for line in commands]
    assert names[0] == "baseline" and len(set(names)) == len(names) >= 7
    joined = "\n".join(commands)
    for lever in ("--config.model.residual_dtype=compute", "--xla_gpu_enable_latency_hiding_scheduler=true",
                  "--xla_gpu_enable_triton_gemm=false", "--config.train.global_batch_size=64",
                  "--config.model.remat=dots"):
        assert lever in joined, lever
    assert all("--config.model.attention=cudnn" in c and "--config.model.dtype=bfloat16" in c for c in commands)
