"""Load a finished (or running) jepa.train run: its config, parts of its saved state, and modules built from them.

Every program that reads a run (export, probes, evaluators, planning, surprise, and the trainer's
`init_from` / `encoder_from`) goes through this module, so loading stays in one place:

    config = runs.load_config(workdir)                       # config.json merged onto today's defaults
    state, step = runs.load_state_parts(workdir, ["ema", "params/predictor"])   # never the optimiser state
    params, step = runs.load_encoder(workdir, config, weights="ema")            # or "online", "random"
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from jepa import checkpoint as ckpt_lib
from jepa import config as config_lib
from jepa import sharding
from jepa import workdir as workdir_lib

WEIGHTS = ("ema", "online", "random")

# Config fields whose sub-dicts are keyed by user-chosen names: taken whole from the run, never merged.
_NAMED_DICTS = ("data.sources", "mask.types", "evals")


# ---------------------------------------------------------------- config


def _merge(base: ml_collections.ConfigDict, saved: dict, prefix: str = "") -> None:
    """Saved JSON values onto the current defaults: fields added since the run keep their defaults, JSON lists
    become tuples where the default is a tuple, and name-keyed dicts (sources, mask types) are replaced whole."""
    for key, value in saved.items():
        path = f"{prefix}{key}"
        current = base.get(key) if key in base else None
        if path in _NAMED_DICTS or not isinstance(current, ml_collections.ConfigDict):
            if path == "data.sources" and isinstance(value, dict):  # world-source fields added since the run
                value = {name: {**config_lib.world_source().to_dict(), **src} if src.get("kind") == "world" else src
                         for name, src in value.items()}
            if isinstance(value, dict):
                value = ml_collections.ConfigDict(value)
            elif isinstance(value, list) and isinstance(current, tuple):
                value = tuple(value)
            if key in base and current is not None and not isinstance(value, type(current)) and \
                    isinstance(current, (int, float)) and isinstance(value, (int, float)):
                value = type(current)(value)
            with base.ignore_type():
                base[key] = value
        elif isinstance(value, dict):
            _merge(current, value, path + ".")
        else:
            raise ValueError(f"config.json: field {path} is {value!r}, expected a dict")


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config from WORKDIR/config.json, merged onto today's `config.base_config()` so that runs saved
    before a field existed still load (the new field keeps its default)."""
    path = workdir_lib.path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"workdir {workdir}: no config.json (is it a jepa.train workdir?)")
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(saved).__name__}")
    config = config_lib.base_config()
    _merge(config, saved)
    return config


# ---------------------------------------------------------------- state


def inference_mesh():
    """All devices on the batch axis: reading a run for inference needs no parameter sharding at these sizes."""
    return sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))


def checkpoint_step(workdir: str, step: int | None = None) -> int:
    """`step` (checked to exist) or the run's latest finished checkpoint step."""
    steps = ckpt_lib.saved_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"workdir {workdir}: no finished checkpoint in {ckpt_lib.checkpoint_dir(workdir)}")
    if step is None:
        return steps[0]
    if step not in steps:
        raise ValueError(f"--step={step}: no such checkpoint in {workdir} (have {sorted(steps)})")
    return step


def saved_state_tree(workdir: str, step: int, mesh) -> Any:
    """The saved state's tree (shapes, dtypes) read from the checkpoint's metadata, laid out replicated on `mesh`:
    loading does not depend on rebuilding the trainer's optimiser state."""
    import orbax.checkpoint as ocp
    meta = ocp.StandardCheckpointer().metadata(ckpt_lib.checkpoint_dir(workdir) / str(step) / "state")
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    replicated = sharding.replicated(mesh)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=replicated), tree)


def load_state_parts(workdir: str, parts: Sequence[str], step: int | None = None, *, mesh=None,
                     target: Any = None) -> tuple[dict, int]:
    """(the named entries of a run's saved train state as a nested dict, step), e.g. parts ("ema",
    "params/predictor"). Only those entries are read from disk, never the optimiser state (two more copies of
    the parameters under AdamW).

    target: an abstract train state (ShapeDtypeStructs with shardings, e.g. the trainer's) whose entries give
    each part's expected shapes and layout; without it the checkpoint's own metadata does, replicated on `mesh`
    (default: `inference_mesh()`). step=None: the newest intact checkpoint (jepa.checkpoint.load_state)."""
    if isinstance(parts, str) or not parts:
        raise ValueError(f"parts: expected a non-empty list of state entries like 'ema', got {parts!r}")
    if target is None:  # every step of a run saves the same tree: the newest one's metadata describes them all
        target = saved_state_tree(workdir, checkpoint_step(workdir, step),
                                  mesh if mesh is not None else inference_mesh())
    wanted: dict = {}
    for part in parts:
        keys = part.split("/")
        src, dst = target, wanted
        for i, key in enumerate(keys):
            if not isinstance(src, Mapping) or key not in src:
                have = sorted(src) if isinstance(src, Mapping) else []
                raise ValueError(f"state part {part!r}: {'/'.join(keys[:i + 1])} is not in the saved state of "
                                 f"{workdir} (have {have})")
            if i + 1 < len(keys):
                src, dst = src[key], dst.setdefault(key, {})
            else:
                dst[key] = src[key]
    state, step = ckpt_lib.load_state(workdir, wanted, step, partial=True)
    return state, int(step)


# ---------------------------------------------------------------- modules


def random_encoder(config) -> Any:
    """Encoder parameters exactly as the trainer initialises them (same config, same seed): the baseline."""
    from jepa import objectives
    objective = objectives.build(config)
    return jax.jit(lambda rng: objective.init(rng, config)[1])(jax.random.PRNGKey(int(config.seed)))


def load_encoder(workdir: str, config=None, *, weights: str = "ema", step: int | None = None,
                 mesh=None) -> tuple[Any, int]:
    """(encoder parameters, step) of a run: its EMA target encoder, its online encoder, or the same architecture at
    the trainer's random initialisation (step 0). config: the run's config after any overrides (default: the
    run's own); it must describe the saved encoder."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights: {weights!r} is not one of {', '.join(WEIGHTS)}")
    config = load_config(workdir) if config is None else config
    if weights == "random":
        return random_encoder(config), 0
    part = "ema" if weights == "ema" else "params/encoder"
    state, step = load_state_parts(workdir, [part], step, mesh=mesh)
    params = state["ema"] if weights == "ema" else state["params"]["encoder"]
    expected = jax.eval_shape(lambda: random_encoder(config))
    shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), x.dtype), tree)
    if shapes(params) != shapes(expected):
        raise ValueError(f"checkpoint {workdir} step {step}: encoder parameters do not match the config "
                         f"(config.model was changed by an override?)")
    return params, step


def encoder_def(config):
    """The nnx graph definition of the encoder `config.model` describes: `nnx.merge(encoder_def(config),
    nnx.State(params))` is the module (jepa.models.VisionTransformer) holding `params`."""
    from flax import nnx

    from jepa import models
    return nnx.graphdef(nnx.eval_shape(lambda: models.build_encoder(config.model, nnx.Rngs(0))))
