"""Pod-scale plan on paper: projected step time and MFU of V-JEPA 2 pretraining on 8, 64 and 256 chips of TPU v5p
and H100, from the model's analytic FLOPs, its exact train-state bytes and a compute + communication model.

    python benchmarks/pod_projection.py                         # the table (ViT-L and ViT-g, 8 / 64 / 256 chips)
    python benchmarks/pod_projection.py --json=/tmp/plan.json   # also every row, candidate meshes included
    python benchmarks/pod_projection.py --check --models=ViT-L  # + AOT compile on 8 simulated CPU devices

Model (every assumption a named constant or flag below):
  - Compute: the trainer's analytic FLOPs per step (jepa.train.training_flops) at an assumed achievable MFU:
    MEASURED_MFU (ViT-L/16 on one H200, README "On a GPU") and TARGET_MFU.
  - State: params float32 (encoder + predictor) + EMA target encoder float32 + Adam mu and nu float32, i.e.
    STATE_BYTES_PER_PARAM per trainable parameter plus 4 per encoder parameter; per chip exactly as the sharding
    rules of jepa/sharding.py lay the trainer's state out (about 1 / fsdp; biases and scales stay replicated).
  - FSDP traffic per chip and step, fsdp size F, trainable params P = P_enc + P_pred, M mask types: parameters are
    all-gathered for the EMA target encoder's forward (P_enc), each mask type's forward (M x P) and its backward
    (M x P: the scan's backward reads the sharded stacked parameters again), in --gather_dtype; gradients are
    reduce-scattered once per mask type's backward (M x P) in --grad_dtype. A ring moves (F - 1) / F of each.
    This is the traffic of FSDP done right; --check prints what the compiled step moves next to it and, with
    fsdp > 1, asserts at most FSDP_CHECK_SLACK x this volume with each gradient reduce-scatter counted as the
    all-reduce of the whole gradient the CPU backend emits instead (2x the bytes: it forms no reduce-scatters).
  - Data-parallel traffic (data size D > 1): the gradient shard all-reduced inside each mask type's backward
    scan, layer by layer (as the compiled step does: --check counts it), M x 2 (D - 1) / D x P / F.
  - Links: an axis whose device groups stay inside one fast domain (an H100 node of 8; a whole TPU v5p slice)
    moves data at the fast link's per-direction bandwidth, else at the slow one's (InfiniBand), times
    LINK_EFFICIENCY. Headline figures counted in both directions are halved: a ring sends and receives at once.
  - Overlap: "overlapped" assumes the latency-hiding scheduler runs every collective under the matmuls
    (step = max(compute, comm)); "serial" is compute + comm. The batch per chip that hides communication is the
    smallest with compute >= comm.
  - Mesh: among the (data, fsdp, 1) meshes the trainer accepts (every large state array sharded: e.g. the
    384-wide predictor cannot split 256 ways) whose state fits in STATE_HBM_FRACTION of HBM (the rest is left to
    activations), the one with the least communication time (tensor parallelism is not needed at these widths).
  - Batch per chip: the recipe's global batch (3072) / chips, capped at BATCH_CAP per model.
Memory per chip: the state bytes above (--check asserts them against XLA's memory analysis of the real step
compiled for 8 simulated devices, on each 8-chip row's mesh and on (1, 8, 1)) and, with --check, XLA's peak
estimate for that 8-device step (CPU backend: indicative of the activations, not of an accelerator's).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

# ---- public specifications (per chip) ----
# Google Cloud TPU v5p system architecture page: 459 TFLOP/s bf16, 95 GB HBM2e, ICI 4800 Gbps per chip (3D torus).
TPU_V5P_PEAK_FLOPS = 459e12
TPU_V5P_HBM_BYTES = 95e9
TPU_V5P_ICI_BITS_PER_S = 4800e9
# NVIDIA H100 Tensor Core GPU datasheet, SXM: 989 TFLOP/s dense bf16, 80 GB HBM3, NVLink 900 GB/s per GPU.
H100_PEAK_FLOPS = 989e12
H100_HBM_BYTES = 80e9
H100_NVLINK_BYTES_PER_S = 900e9
H100_NODE_GPUS = 8
# NVIDIA DGX H100 datasheet: 8 x 400 Gb/s InfiniBand (ConnectX-7) per node, one per GPU: 50 GB/s per direction.
H100_IB_BYTES_PER_S_PER_DIRECTION = 8 * 400e9 / 8 / H100_NODE_GPUS

# ---- assumptions ----
MEASURED_MFU = 0.299   # ViT-L/16, batch 32, bf16, cuDNN attention on one H200 (README "On a GPU")
TARGET_MFU = 0.45      # the GPU efficiency goal
LINK_EFFICIENCY = 0.75  # share of the per-direction link bandwidth a large ring collective reaches
STATE_HBM_FRACTION = 0.5  # a mesh is a candidate when the train state takes at most this share of HBM
RECIPE_GLOBAL_BATCH = 3072
BATCH_CAP = {"ViT-L": 32, "ViT-g": 16}  # per chip: ViT-L's measured H200 batch; ViT-g has ~3.3x its params
MODELS = {"ViT-L": "configs/vjepa2_vitl16.py", "ViT-g": "configs/vjepa2_vitg16.py"}
CHIPS = (8, 64, 256)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
# --check on fsdp meshes: compiled collective bytes <= this x the model (activations all-reduced over fsdp, i.e.
# GSPMD sharding the residual stream's hidden dimension like the weights, moves >10x).
FSDP_CHECK_SLACK = 1.5
STATE_BYTES_PER_PARAM = 4 + 4 + 4  # trainable param, Adam mu, Adam nu (float32); the EMA copy is counted apart


@dataclasses.dataclass(frozen=True)
class Platform:
    name: str
    peak_flops: float          # dense bf16 per chip
    hbm_bytes: float
    fast_domain: int           # chips sharing the fast link (0: every chip of the slice)
    fast_bw: float             # bytes/s per direction per chip on the fast link
    slow_bw: float             # bytes/s per direction per chip between fast domains


PLATFORMS = {
    "TPU v5p": Platform("TPU v5p", TPU_V5P_PEAK_FLOPS, TPU_V5P_HBM_BYTES, 0, TPU_V5P_ICI_BITS_PER_S / 8 / 2,
                        TPU_V5P_ICI_BITS_PER_S / 8 / 2),
    "H100": Platform("H100", H100_PEAK_FLOPS, H100_HBM_BYTES, H100_NODE_GPUS, H100_NVLINK_BYTES_PER_S / 2,
                     H100_IB_BYTES_PER_S_PER_DIRECTION),
}


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the projection needs from the real model and objective (taken from them, not re-derived)."""
    name: str
    encoder_params: int
    predictor_params: int
    mask_types: int
    flops_per_clip: float      # analytic, as the trainer logs it
    remat: str
    abstract_state: object = dataclasses.field(repr=False, compare=False, default=None)  # the trainer's, as shapes

    @property
    def trainable_params(self) -> int:
        return self.encoder_params + self.predictor_params

    def state_bytes(self) -> int:
        """Train state bytes of one replica: trainable params + Adam moments + the EMA encoder, all float32."""
        return STATE_BYTES_PER_PARAM * self.trainable_params + 4 * self.encoder_params

    def state_bytes_per_chip(self, data: int, fsdp: int) -> int:
        """Exact train-state bytes per chip on a (data, fsdp, 1) mesh: the trainer's state laid out by the
        sharding rules of jepa/sharding.py (arrays no mesh axis divides, e.g. biases, stay replicated)."""
        import numpy as np

        from jepa import sharding
        sizes = {"data": data, "fsdp": fsdp, "tensor": 1}
        specs = sharding.state_specs(self.abstract_state, sizes)
        total = 0
        for x, spec in zip(_leaves(self.abstract_state), _leaves(specs, spec=True), strict=True):
            shape = list(x.shape)
            for i, axes in enumerate(tuple(spec)):
                for axis in (axes,) if isinstance(axes, str) else (axes or ()):
                    shape[i] //= sizes[axis]
            total += math.prod(shape) * np.dtype(x.dtype).itemsize
        return total

    def unsharded(self, fsdp: int) -> list[str]:
        """Large state arrays fsdp cannot shard: the trainer refuses such a mesh (jepa.sharding.state_shardings)."""
        from jepa import sharding
        if fsdp == 1:
            return []
        sizes = {"data": 1, "fsdp": fsdp, "tensor": 1}
        return sharding.unsharded_offenders(self.abstract_state, sharding.state_specs(self.abstract_state, sizes))


def _leaves(tree, spec: bool = False) -> list:
    import jax
    from jax.sharding import PartitionSpec
    return jax.tree.leaves(tree, is_leaf=(lambda s: isinstance(s, PartitionSpec)) if spec else None)


def load_config(model: str, batch: int | None = None):
    """get_config(ARG) of a MODELS name or a config file `PATH[:ARG]`, with an optional global batch."""
    import importlib.util
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path, _, arg = MODELS.get(model, model).partition(":")
    path = path if os.path.isabs(path) else os.path.join(repo, path)
    if not os.path.isfile(path):
        raise ValueError(f"--models: {model!r} is neither one of {', '.join(MODELS)} nor a config file")
    spec = importlib.util.spec_from_file_location("pod_projection_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    if batch is not None:
        config.train.global_batch_size = batch
    return config


def model_facts(name: str, config) -> ModelFacts:
    """Parameter counts and the train state's shapes from the trainer itself (jepa.train.build_run on one
    device: jax.eval_shape, nothing initialised) and FLOPs per clip from the trainer's analytic count."""
    import jax
    import numpy as np

    from jepa import masks, sharding
    from jepa import train as train_lib
    config = config.copy_and_resolve_references()
    config.mesh = dict(data=1, fsdp=1, tensor=1)
    run = train_lib.build_run(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
    params = run.abstract_state["params"]
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    b = config.train.global_batch_size
    return ModelFacts(name=name, encoder_params=count(params["encoder"]), predictor_params=count(params["predictor"]),
                      mask_types=len(masks.mask_lengths(config)),
                      flops_per_clip=train_lib.training_flops(config, run.grid) / b,
                      remat=str(config.model.remat), abstract_state=run.abstract_state)


def comm_bytes(facts: ModelFacts, data: int, fsdp: int, gather_bytes: int, grad_bytes: int) -> dict[str, float]:
    """Bytes each chip sends (= receives) per step, per mesh axis (see the module docstring)."""
    p, m = facts.trainable_params, facts.mask_types
    ring = (fsdp - 1) / fsdp
    gathered = facts.encoder_params + 2 * m * p
    return {"fsdp": ring * (gathered * gather_bytes + m * p * grad_bytes),
            "data": m * 2 * (data - 1) / data * p / fsdp * grad_bytes if data > 1 else 0.0}


def comm_seconds(platform: Platform, volumes: dict[str, float], data: int, fsdp: int,
                 efficiency: float = LINK_EFFICIENCY) -> float:
    """Collective time per step: fsdp groups are `fsdp` consecutive chips, data groups stride over them."""
    def bandwidth(span: int) -> float:
        fast = platform.fast_domain == 0 or span <= platform.fast_domain
        return (platform.fast_bw if fast else platform.slow_bw) * efficiency
    return volumes["fsdp"] / bandwidth(fsdp) + volumes["data"] / bandwidth(data * fsdp)


def project(facts: ModelFacts, platform: Platform, chips: int, batch_per_chip: int, *, gather_bytes: int,
            grad_bytes: int, efficiency: float = LINK_EFFICIENCY) -> dict:
    """One table row: the recommended mesh and its projected step; `candidates` holds every mesh considered."""
    if chips <= 0 or batch_per_chip <= 0:
        raise ValueError(f"chips ({chips}) and batch_per_chip ({batch_per_chip}) must be positive")
    candidates = []
    fsdp = 1
    while fsdp <= chips:
        if chips % fsdp == 0:
            data = chips // fsdp
            volumes = comm_bytes(facts, data, fsdp, gather_bytes, grad_bytes)
            state = facts.state_bytes_per_chip(data, fsdp)
            candidates.append(dict(mesh=(data, fsdp, 1), state_bytes=state, comm_bytes=sum(volumes.values()),
                                   comm_s=comm_seconds(platform, volumes, data, fsdp, efficiency),
                                   fits=state <= STATE_HBM_FRACTION * platform.hbm_bytes,
                                   unsharded=facts.unsharded(fsdp)))
        fsdp *= 2
    fitting = [c for c in candidates if c["fits"] and not c["unsharded"]]
    if not fitting:
        raise ValueError(f"{facts.name} on {chips} x {platform.name}: the state does not fit in "
                         f"{STATE_HBM_FRACTION:.0%} of HBM on any (data, fsdp) mesh the trainer accepts")
    best = min(fitting, key=lambda c: (c["comm_s"], -c["mesh"][1]))
    flops_chip = facts.flops_per_clip * batch_per_chip
    row = dict(model=facts.name, platform=platform.name, chips=chips, mesh=best["mesh"],
               batch_per_chip=batch_per_chip, global_batch=batch_per_chip * chips, remat=facts.remat,
               comm_ms=best["comm_s"] * 1e3, comm_gb=best["comm_bytes"] / 1e9, state_gib=best["state_bytes"] / 2**30,
               candidates=candidates)
    for label, mfu in (("measured", MEASURED_MFU), ("target", TARGET_MFU)):
        compute = flops_chip / (platform.peak_flops * mfu)
        overlapped, serial = max(compute, best["comm_s"]), compute + best["comm_s"]
        row[label] = dict(assumed_mfu=mfu, compute_ms=compute * 1e3, step_overlapped_ms=overlapped * 1e3,
                          step_serial_ms=serial * 1e3,
                          mfu_overlapped=flops_chip / overlapped / platform.peak_flops,
                          mfu_serial=flops_chip / serial / platform.peak_flops,
                          min_batch_hiding_comm=max(1, math.ceil(
                              best["comm_s"] * platform.peak_flops * mfu / facts.flops_per_clip)))
    return row


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (compute and step at the measured MFU, then at the target MFU)."""
    head = ("| model | platform | chips | mesh (data, fsdp, tensor) | batch/chip | state GiB/chip | XLA peak GiB/chip "
            "(8 sim. devices) | comm GB/chip | comm ms | compute ms @30% / @45% | step ms overlapped / serial "
            "@30% | MFU overlapped / serial @30% | step ms overlapped @45% | min batch/chip hiding comm "
            "@30% / @45% |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        m, t = r["measured"], r["target"]
        peak = f"{r['aot_peak_gib']:.1f}" if r.get("aot_peak_gib") is not None else "-"
        lines.append(
            f"| {r['model']} | {r['platform']} | {r['chips']} | {r['mesh']} | {r['batch_per_chip']} | "
            f"{r['state_gib']:.2f} | {peak} | {r['comm_gb']:.1f} | {r['comm_ms']:.0f} | "
            f"{m['compute_ms']:.0f} / {t['compute_ms']:.0f} | {m['step_overlapped_ms']:.0f} / "
            f"{m['step_serial_ms']:.0f} | {m['mfu_overlapped']:.1%} / {m['mfu_serial']:.1%} | "
            f"{t['step_overlapped_ms']:.0f} | {m['min_batch_hiding_comm']} / {t['min_batch_hiding_comm']} |")
    return "\n".join(lines)


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8}


def collective_bytes(hlo: str, devices: int) -> dict[str, float]:
    """Bytes one device sends per execution of a compiled module, per collective kind, from its HLO text: each
    collective weighted by how often it runs (while loops by their known trip count; both branches of a
    conditional counted) and by what a ring moves for it (all-gather: (n - 1) / n of the result; reduce-scatter:
    n - 1 result shards; all-reduce: 2 (n - 1) / n of the operand). Groups of unknown size count `devices`."""
    import collections
    import re

    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header:
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            computations[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    op = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
    array = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
    totals: collections.Counter = collections.Counter()

    def group_size(line: str) -> int:
        iota = re.search(r"replica_groups=\[\d+,(\d+)\]<=", line)
        if iota:
            return int(iota.group(1))
        listed = re.search(r"replica_groups=\{\{([\d,]+)\}", line)
        return len(listed.group(1).split(",")) if listed else devices

    def visit(name: str, times: float) -> None:
        for line in computations.get(name, ()):
            found = op.search(line)
            if found and "-done(" not in line:
                size = sum(_DTYPE_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
                           for t, dims in array.findall(found.group(1)))
                n, kind = group_size(line), found.group(2)
                share = {"all-gather": (n - 1) / n, "reduce-scatter": n - 1, "all-reduce": 2 * (n - 1) / n,
                         "all-to-all": (n - 1) / n, "collective-permute": 1.0}[kind]
                totals[kind] += times * size * share
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            body = re.search(r"\bbody=%?([\w.\-]+)", line)
            if body:
                visit(body.group(1), times * (int(trips.group(1)) if trips else 1))
            for callee in re.findall(r"\bcalls=%?([\w.\-]+)", line):
                visit(callee, times)
            branches = re.search(r"branch_computations=\{([^}]*)\}", line)
            for callee in (branches.group(1).replace("%", "").split(", ") if branches else ()):
                visit(callee.strip(), times)

    visit(entry, 1.0)
    return dict(totals)


def check_8_devices(facts: ModelFacts, config, mesh: tuple[int, int, int], tolerance: float, *,
                    gather_bytes: int = 4, grad_bytes: int = 4) -> dict:
    """Compiles the real train step for `mesh` on the 8 simulated devices (scale_bench.compile_step) and asserts
    that XLA's argument bytes per device are the projected state per chip plus the batch shard, within
    `tolerance` (relative). Returns XLA's figures in bytes, plus the compiled step's collective traffic per
    device (`collectives`, from its HLO) next to the modelled one (`modelled_comm`); on a pure data-parallel mesh
    the two must agree within 10% (one gradient all-reduce); with fsdp > 1 (and tensor 1) the compiled bytes
    must stay within FSDP_CHECK_SLACK x `modelled_comm_cpu` (gradient reduce-scatters counted as the CPU
    backend's all-reduces)."""
    import jax

    from jepa import sharding
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import scale_bench
    sys.path.pop(0)
    if jax.device_count() != 8:
        raise RuntimeError(f"--check needs 8 devices, found {jax.device_count()} (XLA_FLAGS is set before jax loads "
                           "when this script runs as a program)")
    config = config.copy_and_resolve_references()
    config.mesh = dict(zip(sharding.AXES, mesh, strict=True))
    jmesh = sharding.make_mesh(config.mesh)
    run, compiled, compile_s = scale_bench.compile_step(config, jmesh)
    mem = compiled.memory_analysis()
    batch = scale_bench.abstract_batch(config, jmesh)
    batch_dev = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in batch.values())
    projected = facts.state_bytes_per_chip(mesh[0], mesh[1])
    got = dict(argument=mem.argument_size_in_bytes, output=mem.output_size_in_bytes, alias=mem.alias_size_in_bytes,
               temp=mem.temp_size_in_bytes, batch=batch_dev, projected_state=projected, compile_s=compile_s,
               state=sharding.bytes_per_device(run.abstract_state, run.state_shardings))
    got["peak"] = got["argument"] + got["output"] - got["alias"] + got["temp"]
    got["collectives"] = collective_bytes(compiled.as_text(), 8)
    got["modelled_comm"] = sum(comm_bytes(facts, mesh[0], mesh[1], gather_bytes, grad_bytes).values())
    ring = (mesh[1] - 1) / mesh[1]
    got["modelled_comm_cpu"] = got["modelled_comm"] + ring * facts.mask_types * facts.trainable_params * grad_bytes
    compiled_comm = sum(got["collectives"].values())
    if mesh[1] > 1 and mesh[2] == 1 and compiled_comm > FSDP_CHECK_SLACK * got["modelled_comm_cpu"]:
        raise AssertionError(f"{facts.name} mesh {mesh}: the compiled step moves {compiled_comm:,.0f} bytes per "
                             f"device, more than {FSDP_CHECK_SLACK}x the FSDP model's {got['modelled_comm_cpu']:,.0f} "
                             f"(activations sharded like the weights? see jepa.sharding.constrain_activations)")
    if mesh[1] == 1 and abs(compiled_comm - got["modelled_comm"]) > 0.1 * got["modelled_comm"]:
        raise AssertionError(f"{facts.name} mesh {mesh}: the compiled step moves {compiled_comm:,.0f} bytes per "
                             f"device, the model {got['modelled_comm']:,.0f}")
    for what, value in (("XLA argument bytes - batch shard", got["argument"] - batch_dev),
                        ("state bytes under the real shardings", got["state"]),
                        ("XLA donated (aliased) bytes", got["alias"])):
        if abs(value - projected) > tolerance * projected:
            raise AssertionError(f"{facts.name} mesh {mesh}: {what} {value:,} differ from the projected state "
                                 f"per chip {projected:,} by more than {tolerance:.1%}")
    return got


def main(argv=None) -> int:
    """`python benchmarks/pod_projection.py [--models=ViT-L,ViT-g] [--check] [--json=PATH]`."""
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, of {', '.join(MODELS)} or config files PATH[:ARG]")
    parser.add_argument("--batch_per_chip", type=int, default=0,
                        help=f"0: recipe global batch {RECIPE_GLOBAL_BATCH} / chips, capped at {BATCH_CAP}")
    parser.add_argument("--chips", default=",".join(map(str, CHIPS)), help="comma-separated chip counts")
    parser.add_argument("--platforms", default=",".join(PLATFORMS), help=f"comma-separated, of {', '.join(PLATFORMS)}")
    parser.add_argument("--gather_dtype", default="float32", choices=DTYPE_BYTES,
                        help="dtype of the parameter all-gathers (params are stored float32)")
    parser.add_argument("--grad_dtype", default="float32", choices=DTYPE_BYTES, help="dtype of gradient reductions")
    parser.add_argument("--link_efficiency", type=float, default=LINK_EFFICIENCY)
    parser.add_argument("--check", action="store_true", help="AOT-compile each model's 8-chip meshes on 8 simulated "
                        "CPU devices and assert the state bytes against XLA's memory analysis")
    parser.add_argument("--tolerance", type=float, default=0.01, help="relative tolerance of --check")
    parser.add_argument("--json", default="", help="also write every row (candidate meshes included) here")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    if not names:
        parser.error("--models is empty")
    if args.batch_per_chip < 0:
        parser.error(f"--batch_per_chip must be >= 0, got {args.batch_per_chip}")
    platforms = [p for p in args.platforms.split(",") if p]
    if any(p not in PLATFORMS for p in platforms):
        parser.error(f"--platforms: unknown in {platforms}; known: {', '.join(PLATFORMS)}")
    try:
        chips_list = [int(c) for c in args.chips.split(",") if c]
    except ValueError:
        parser.error(f"--chips must be comma-separated integers, got {args.chips!r}")
    if not chips_list or min(chips_list) <= 0:
        parser.error(f"--chips must be positive, got {args.chips!r}")
    if not 0 < args.link_efficiency <= 1:
        parser.error(f"--link_efficiency must lie in (0, 1], got {args.link_efficiency}")
    if args.check:  # XLA reads this when jax is first imported
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

    rows = []
    for name in names:
        try:
            config = load_config(name)
        except ValueError as e:
            parser.error(str(e))
        facts = model_facts(name, config)
        for platform in platforms:
            for chips in chips_list:
                batch = args.batch_per_chip or max(1, min(BATCH_CAP.get(name, 32), RECIPE_GLOBAL_BATCH // chips))
                rows.append(project(facts, PLATFORMS[platform], chips, batch,
                                    gather_bytes=DTYPE_BYTES[args.gather_dtype],
                                    grad_bytes=DTYPE_BYTES[args.grad_dtype], efficiency=args.link_efficiency))
        if args.check:
            eight = [r for r in rows if r["model"] == name and r["chips"] == 8]
            batch = eight[0]["batch_per_chip"] if eight else args.batch_per_chip or BATCH_CAP.get(name, 32)
            checked = {}
            for mesh in dict.fromkeys([*(r["mesh"] for r in eight), (1, 8, 1)]):
                config.train.global_batch_size = 8 * batch
                checked[mesh] = got = check_8_devices(facts, config, mesh, args.tolerance,
                                                      gather_bytes=DTYPE_BYTES[args.gather_dtype],
                                                      grad_bytes=DTYPE_BYTES[args.grad_dtype])
                print(f"check {name} mesh {mesh} batch {8 * batch} on 8 simulated devices (compile "
                      f"{got['compile_s']:.0f} s): XLA arguments {got['argument'] / 2**30:.3f} GiB = state "
                      f"{got['state'] / 2**30:.3f} GiB (projected {got['projected_state'] / 2**30:.3f}) + batch "
                      f"{got['batch'] / 2**20:.1f} MiB; temp {got['temp'] / 2**30:.2f} GiB; peak "
                      f"{got['peak'] / 2**30:.2f} GiB: OK", flush=True)
                kinds = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in sorted(got["collectives"].items()))
                print(f"  compiled collectives per device and step: {sum(got['collectives'].values()) / 1e9:.3g} "
                      f"GB ({kinds}); modelled {got['modelled_comm'] / 1e9:.3g} GB"
                      + ("" if mesh[1] == 1 else f", {got['modelled_comm_cpu'] / 1e9:.3g} GB with the gradient "
                         "reduce-scatters as the CPU backend's all-reduces"),
                      flush=True)
            for row in eight:
                row["aot_peak_gib"] = checked[row["mesh"]]["peak"] / 2**30
                row["aot"] = checked[row["mesh"]]
        print(f"{name}: {facts.encoder_params:,} encoder + {facts.predictor_params:,} predictor parameters, "
              f"{facts.mask_types} mask types, {facts.flops_per_clip / 1e12:.2f} TFLOP per clip "
              f"(remat {facts.remat}), state {facts.state_bytes() / 2**30:.2f} GiB per replica", flush=True)
    print(f"assumptions: MFU {MEASURED_MFU:.1%} (measured, H200) / {TARGET_MFU:.0%} (target); gathers "
          f"{args.gather_dtype}, gradient reductions {args.grad_dtype}; links at {args.link_efficiency:.0%} of "
          f"per-direction bandwidth (TPU v5p ICI {PLATFORMS['TPU v5p'].fast_bw / 1e9:.0f} GB/s, H100 NVLink "
          f"{PLATFORMS['H100'].fast_bw / 1e9:.0f} GB/s within {H100_NODE_GPUS}, InfiniBand "
          f"{PLATFORMS['H100'].slow_bw / 1e9:.0f} GB/s between nodes); state <= {STATE_HBM_FRACTION:.0%} of HBM")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
