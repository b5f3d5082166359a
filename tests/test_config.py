"""jepa/config.py: every field is declared there once, and validate's allowed values are the code's own constants."""

import pytest

from jepa import config as config_lib


def test_world_model_planning_and_model_fields_are_base_config_fields():
    """The fields the world model, planning, surprise and the model builders read exist in every config, so
    no reader needs a fallback default (an old run's config.json is merged onto these)."""
    c = config_lib.base_config()
    assert c.objective == "vjepa" and c.encoder_from == "" and c.encoder_weights == "pretrained"
    assert (c.world_model.rollout_steps, c.world_model.state_source) == (2, "none")
    assert (c.world_model.action_block, c.world_model.context_frames) == (1, 2)
    assert set(c.model.ac_predictor) == {"width", "depth", "heads", "mlp_dim"}
    assert c.model.predictor.mlp_dim == 0 and c.model.scan is True and c.model.attention == "einsum"
    assert set(c.plan) == {"horizon", "samples", "elites", "iterations", "momentum", "init_std", "min_std",
                           "energy_steps", "energy_norm", "optimizer", "temperature", "block_actions", "execute_steps",
                           "context_frames", "episode_steps", "goal_steps", "surprise_quantile",
                           "constraints", "constraint_mode", "constraint_weight", "guard_coverage",
                           "guard_hold_limit", "guard_surprise_window", "guard_fault_quantile", "guard_fault_blocks",
                           "guard_calibration_episodes"}
    assert c.plan.context_frames == 0 and c.plan.surprise_quantile == 0.99


def test_recipes_change_values_not_fields():
    """configs/*.py override values of base_config's fields and add none of their own (sub-sections are updated,
    not replaced, so no field goes missing)."""
    from conftest import load_config

    def fields(c, prefix=""):
        out = set()
        for k, v in c.items():
            if prefix + k in ("data.sources", "mask.types", "evals"):  # keyed by user-chosen names
                continue
            out |= fields(v, f"{prefix}{k}.") if isinstance(v, config_lib.ConfigDict) else {prefix + k}
        return out

    base = fields(config_lib.base_config())
    for name, arg in [("quickstart", ""), ("quickstart", "tiny"), ("world_model", ""), ("world_model", "tiny"),
                      ("vjepa2_vitl16", ""), ("vjepa2_vitg16", "384,cooldown")]:
        assert fields(load_config(arg, name)) == base, (name, arg)


@pytest.mark.parametrize("field, constant", [
    ("objective", "jepa.objectives:OBJECTIVES"),
    ("model.dtype", "jepa.models:DTYPES"),
    ("model.remat", "jepa.models:REMAT_POLICIES"),
    ("model.attention", "jepa.models:ATTENTION_IMPLS"),
    ("model.rope_layout", "jepa.models:ROPE_LAYOUTS"),
    ("distributed.mode", "jepa.sharding:DISTRIBUTED_MODES"),
    ("world_model.state_source", "jepa.objectives.ac:STATE_SOURCES"),
    ("encoder_weights", "jepa.objectives.ac:ENCODER_WEIGHTS"),
    ("plan.energy_steps", "jepa.planning:ENERGY_STEPS"),
    ("plan.energy_norm", "jepa.planning:ENERGY_NORMS"),
    ("plan.optimizer", "jepa.planning:OPTIMIZERS"),
])
def test_validate_accepts_exactly_the_values_the_code_dispatches_on(field, constant):
    import importlib

    module, name = constant.split(":")
    allowed = tuple(getattr(importlib.import_module(module), name))
    for value in allowed + ("float16", "no_such_value"):
        c = config_lib.base_config()
        c.objective, c.encoder_weights, c.encoder_from = "ac", "random", "runs/pretrained"  # world-model checks too
        c.data.num_frames, c.model.dtype = 4, "bfloat16"  # rollout_steps 2 < 4; cudnn needs bfloat16
        c.data.frame_step = c.world_model.action_block  # a world model's clips keep whole action blocks
        section, _, key = field.rpartition(".")
        (c[section] if section else c)[key] = value
        if value in allowed:
            config_lib.validate(c)
        else:
            with pytest.raises(ValueError, match=f"config.{field}: '{value}' is not one of|config.{field}: unknown"):
                config_lib.validate(c)


def test_source_kinds_are_the_pipelines():
    from jepa.data import sources

    c = config_lib.base_config()
    for kind in sources.SOURCE_KINDS:
        c.data.sources.world.kind, c.data.sources.world.path = kind, "x.csv"
        config_lib.validate(c)
    c.data.sources.world.kind = "hdf5"
    with pytest.raises(ValueError, match="config.data.sources.world.kind: 'hdf5' is not one of world, tfds"):
        config_lib.validate(c)


def test_evaluation_entries_are_declared_here_and_read_by_the_evaluators():
    from jepa import evaluators

    knn = config_lib.evaluation("knn", every=500)
    assert knn.kind == "knn" and knn.every == 500 and knn.k == 20 and knn.max_clips == 256
    assert evaluators.KINDS == config_lib.EVAL_KINDS == ("knn", "probe")
    # A partial entry (a hand-written dict, or an old run's) gets the declared defaults; the kind is the name.
    assert evaluators._settings("probe", {"every": 7}) == dict(config_lib.evaluation("probe", every=7).to_dict())
    with pytest.raises(ValueError, match="unknown field"):
        config_lib.evaluation("knn", epochs=3)
    with pytest.raises(ValueError, match="not one of knn, probe"):
        config_lib.evaluation("svm")
