"""The command lines: one absl + config-override idiom (help, misspelt fields, subcommands), quiet logs, and the
package as installed (console scripts, shipped configs, metadata)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import subprocess
import sys
import time
import warnings

import pytest
from conftest import REPO, load_config

from jepa import cli
from jepa import constraints as constraints_lib
from jepa import convert as convert_lib
from jepa import export as export_lib
from jepa import guard as guard_lib
from jepa import plan as plan_lib
from jepa import probe as probe_lib
from jepa import surprise as surprise_lib
from jepa import train as train_lib
from jepa.data import bench as data_bench
from jepa.data import prepare

CONSOLE_SCRIPTS = {"jepa-train": "jepa.train:run", "jepa-export": "jepa.export:run", "jepa-probe": "jepa.probe:run",
                   "jepa-plan": "jepa.plan:run", "jepa-surprise": "jepa.surprise:run",
                   "jepa-prepare": "jepa.data.prepare:run", "jepa-data-bench": "jepa.data.bench:run_cli",
                   "jepa-convert": "jepa.convert:run", "jepa-constraints": "jepa.constraints:run",
                   "jepa-guard": "jepa.guard:run"}


def _script(folder: str, name: str):
    """A launch/ or benchmarks/ script as a module (its folder on sys.path, as when it runs)."""
    path = os.path.join(REPO, folder, f"{name}.py")
    sys.path.insert(0, os.path.dirname(path))
    try:
        spec = importlib.util.spec_from_file_location(f"{folder}_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.dirname(path))
    return module


def _run_dir(tmp_path, name="quickstart"):
    """A workdir holding only a run's config.json (no checkpoints: any work beyond parsing would fail)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(load_config("tiny", name).to_json_best_effort())
    return str(tmp_path)


ENTRY_POINTS = {  # name -> (main, argv prefix, flags its --helpfull must list)
    "jepa.train": (train_lib.main, [], ["--workdir", "--config"]),
    "jepa.export": (export_lib.main, [], ["--split", "--output", "--layers", "--config"]),
    "jepa.probe": (probe_lib.main, [], ["--val_features", "--probe", "--config"]),
    "jepa.probe benchmark": (probe_lib.main, ["benchmark"], ["--episodes", "--num_segments"]),
    "jepa.plan": (plan_lib.main, [], ["--domain", "--monitor", "--config"]),
    "jepa.plan benchmark": (plan_lib.main, ["benchmark"], ["--baseline_workdir", "--domains"]),
    "jepa.surprise benchmark": (surprise_lib.main, ["benchmark"], ["--video_workdir", "--kinds", "--config"]),
    "jepa.constraints fit": (constraints_lib.main, ["fit"], ["--max_rows", "--config"]),
    "jepa.constraints benchmark": (constraints_lib.main, ["benchmark"], ["--oracle_planner", "--episodes"]),
    "jepa.guard benchmark": (guard_lib.main, ["benchmark"], ["--ensemble", "--faults", "--config"]),
    "jepa.data.prepare": (prepare.main, [], ["--data_dir", "--src", "--preset"]),
    "jepa.convert": (convert_lib.main, [], ["--source", "--workdir", "--encoder_only"]),
    "jepa.convert export": (convert_lib.main, ["export"], ["--format", "--output"]),
    "jepa.data.bench": (data_bench.main, [], ["--synthetic_720p", "--batches", "--config"]),
    "launch/local.py": (lambda argv: _script("launch", "local").main(argv), [], ["--num_processes", "--log_dir"]),
    "launch/sweep.py": (lambda argv: _script("launch", "sweep").main(argv), [], ["--grid", "--list", "--slurm"]),
    "benchmarks/model_bench.py": (lambda argv: _script("benchmarks", "model_bench").main(argv), [],
                                  ["--pred_width", "--attention"]),
    "benchmarks/step_bench.py": (lambda argv: _script("benchmarks", "step_bench").main(argv), [],
                                 ["--tuned_env", "--profile", "--config"]),
    "benchmarks/step_ceiling.py": (lambda argv: _script("benchmarks", "step_ceiling").main(argv), [],
                                   ["--reps", "--config"]),
    "benchmarks/scale_bench.py": (lambda argv: _script("benchmarks", "scale_bench").main(argv), [],
                                  ["--mesh", "--devices", "--config"]),
    "benchmarks/probe_bench.py": (lambda argv: _script("benchmarks", "probe_bench").main(argv), [],
                                  ["--episodes", "--workdir"]),
    "benchmarks/convert_bench.py": (lambda argv: _script("benchmarks", "convert_bench").main(argv), [],
                                    ["--size", "--meta"]),
    "benchmarks/plan_bench.py": (lambda argv: _script("benchmarks", "plan_bench").main(argv), [],
                                 ["--reps", "--config"]),
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_every_command_line_answers_helpfull(name, capsys):
    """Help is printed by absl while parsing, before any work (no model is built, nothing compiles)."""
    main, prefix, expected = ENTRY_POINTS[name]
    start = time.perf_counter()
    with pytest.raises(SystemExit):
        main([*prefix, "--helpfull"])
    out = capsys.readouterr().out
    for flag in [*expected, "--verbosity", "--helpfull"]:
        assert re.search(rf"--(\[no\])?{flag[2:]}\b", out), (name, flag)
    assert time.perf_counter() - start < 20


def test_helpfull_from_python_dash_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jepa.plan", "benchmark", "--helpfull"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=120)
    assert "Model-predictive control" in proc.stdout and "--baseline_workdir" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_a_misspelt_field_fails_before_any_work_with_a_short_message(tmp_path):
    workdir = _run_dir(tmp_path / "run")
    out = tmp_path / "features"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jepa.export", f"--workdir={workdir}", "--split=train",
                           f"--output={out}", "--config.data.num_segmnts=2"], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=120)
    assert proc.returncode == cli.USAGE_EXIT_CODE
    assert "--config.data.num_segmnts: config.data has no field 'num_segmnts'; did you mean " \
           "--config.data.num_segments?" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3 and "Traceback" not in proc.stderr
    assert not out.exists() and time.perf_counter() - start < 60


@pytest.mark.parametrize("main,argv,suggestion", [
    (train_lib.main, ["--config=configs/quickstart.py:tiny", "--workdir=W", "--config.train.totl_steps=3"],
     "--config.train.total_steps"),
    (data_bench.main, ["--config=configs/quickstart.py:tiny", "--config.data.num_workrs=0"],
     "--config.data.num_workers"),
    (probe_lib.main, ["benchmark", "--workdir=RUN", "--config.data.sources.world.data_dri=/x"],
     "--config.data.sources.world.data_dir"),
    (plan_lib.main, ["benchmark", "--workdir=WM", "--config.plan.sampels=8"], "--config.plan.samples"),
    (plan_lib.main, ["--workdir=WM", "--config.pln.samples=8"], "--config.plan"),
    (surprise_lib.main, ["benchmark", "--workdir=WM", "--config.data.resolutoin=32"], "--config.data.resolution"),
])
def test_misspelt_fields_are_named_for_config_files_and_saved_runs(tmp_path, main, argv, suggestion):
    run, wm = _run_dir(tmp_path / "run"), _run_dir(tmp_path / "wm", "world_model")
    argv = [a.replace("=RUN", f"={run}").replace("=WM", f"={wm}").replace("=W", f"={tmp_path / 'w'}")
            for a in argv]
    with pytest.raises(cli.UsageError, match=f"did you mean {re.escape(suggestion)}"):
        main(argv)
    assert not (tmp_path / "w").exists()


def test_run_config_overrides_parse_types_and_are_validated(tmp_path):
    workdir = _run_dir(tmp_path)
    argv = [f"--workdir={workdir}", "--config.data.num_segments=3", "--config.data.eval_mode=uniform",
            "--config.data.hflip=false", "--config.data.crop_scale=(0.2,1.0)"]
    with cli.flag_scope():
        _, config = cli.define_run_config(argv)
        cli.parse(argv)
        c = config.value
    assert c.data.num_segments == 3 and c.data.eval_mode == "uniform" and c.data.hflip is False
    assert tuple(c.data.crop_scale) == (0.2, 1.0) and c.model.encoder.width == 64  # the rest is the run's
    with pytest.raises(ValueError, match="config.data.resolution"):  # rejected before the checkpoint is read
        export_lib.main([f"--workdir={workdir}", "--split=train", f"--output={tmp_path / 'o'}",
                         "--config.data.resolution=60"])
    with pytest.raises(cli.UsageError, match="no config.json"):
        export_lib.main([f"--workdir={tmp_path / 'nope'}", "--split=train", f"--output={tmp_path / 'o'}"])


def test_subcommands_and_required_flags(tmp_path):
    with pytest.raises(cli.UsageError, match="give a command: benchmark"):
        surprise_lib.main([f"--workdir={_run_dir(tmp_path, 'world_model')}"])
    with pytest.raises(cli.UsageError, match="unexpected argument 'benchmrk'"):
        plan_lib.main(["benchmrk", f"--workdir={tmp_path}"])
    with pytest.raises(cli.UsageError, match="--split, --output required"):
        export_lib.main([f"--workdir={tmp_path}"])
    with pytest.raises(cli.UsageError, match="planning tasks are defined for reacher, point_mass"):
        plan_lib.main([f"--workdir={tmp_path}", "--domain=cheetah"])
    with pytest.raises(cli.UsageError, match="--src: not a flag of dmc"):
        prepare.main(["dmc", f"--data_dir={tmp_path}", "--src=x"])


def test_installed_config_names_resolve(tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)  # no configs/ here
    try:
        for spec in ("quickstart:tiny", "quickstart.py:tiny", "configs/quickstart.py:tiny"):
            path, _, arg = cli.resolve_config_path(spec).partition(":")
            assert os.path.samefile(path, os.path.join(REPO, "configs", "quickstart.py")) and arg == "tiny"
        assert cli.resolve_config_path("other/quickstart.py") == "other/quickstart.py"  # not ours: left alone
        assert cli.resolve_config_path("nope.py") == "nope.py"
    finally:
        os.chdir(cwd)


@pytest.fixture(autouse=True)
def root_logging():
    """The command lines run here in-process set up the root logger: restored after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)
    logging.captureWarnings(False)


def _emit():
    logging.getLogger("jepa.plan").info("our progress line")
    logging.getLogger("jepa.plan").warning("our warning")
    logging.getLogger("absl").info("Found 2 checkpoint steps")
    logging.getLogger("absl").warning("Metadata file does not exist: /x/_CHECKPOINT_METADATA")
    logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
    logging.getLogger("orbax").error("a library error")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("Sharding info not provided when restoring", UserWarning, stacklevel=1)


def test_logs_are_quiet_by_default_and_complete_at_verbosity_1(capsys):
    cli.setup_logging(0)
    _emit()
    quiet = capsys.readouterr().err
    assert "our progress line" in quiet and "WARNING: our warning" in quiet and "a library error" in quiet
    for noise in ("checkpoint steps", "_CHECKPOINT_METADATA", "backend 'tpu'", "Sharding info"):
        assert noise not in quiet, noise
    cli.setup_logging(1)
    _emit()
    verbose = capsys.readouterr().err
    for line in ("our progress line", "checkpoint steps", "_CHECKPOINT_METADATA", "backend 'tpu'",
                 "Sharding info"):
        assert line in verbose, line


def test_plan_reports_episodes_in_words():
    """Per-episode lines name the outcome and the flagged steps; no planning time is "-", not nan."""
    episode = {"seed": 1003, "success": False, "reached": True, "initial_distance": 0.2, "final_distance": 0.1,
               "min_distance": 0.04, "flagged": [2, 5]}
    assert plan_lib.episode_line(episode) == ("missed, final distance 0.100 m from 0.200 m, reached (closest 0.040 m), "
                                              "surprise flagged blocks [2, 5]")
    ci = [0.1, 0.9]
    method = {"success_rate": 0.5, "success_rate_ci95": ci, "reached_rate": 0.5, "reached_rate_ci95": ci,
              "final_distance": 0.1, "min_distance": 0.05, "initial_distance": 0.2, "plan_seconds_per_action": None,
              "flagged_steps": 0, "replans": 0}
    table = plan_lib.format_table({"domains": {"reacher": {"methods": {"random actions": method}}}})
    assert "nan" not in table and "| -" in table


def _read_metadata(dist_info: str) -> str:
    with open(os.path.join(dist_info, "METADATA"), encoding="utf-8") as f:
        return f.read()


def test_setup_declares_the_console_scripts_and_one_jax_range():
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        setup_py = f.read()
    scripts = dict(re.findall(r'"([\w-]+)=([\w.]+:\w+)"', setup_py))
    assert scripts == CONSOLE_SCRIPTS
    for target_name in scripts.values():
        module, func = target_name.split(":")
        assert callable(getattr(importlib.import_module(module), func))
    for extra in ("cuda12", "cuda13", "tpu"):
        assert f'"{extra}": [f"jax[{extra}]{{JAX}}"]' in setup_py
    assert 'f"jax{JAX}"' in setup_py and '"tensorboard": ["tensorboard' in setup_py


@pytest.mark.slow
def test_package_installs_with_configs_console_scripts_and_metadata(tmp_path):
    """A non-editable install (from a copy of the sources) ships the configs, the console scripts and the
    licence; its jax pin and its accelerator extras agree; an installed script finds a config by name."""
    import shutil
    src = tmp_path / "src"
    for folder in ("jepa", "configs"):
        shutil.copytree(os.path.join(REPO, folder), src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "LICENSE", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (target / "jepa" / "configs" / "quickstart.py").is_file()
    dist_info = next(str(p) for p in target.glob("jepa-*.dist-info"))
    meta = _read_metadata(dist_info)
    assert "Requires-Python: >=3.11" in meta and "License: Apache-2.0" in meta
    assert any("Apache License" in p.read_text() for p in target.glob("jepa-*.dist-info/**/LICENSE*"))
    jax_pins = re.findall(r"Requires-Dist: jax(\[\w+\])?([<>=,.\d]+)(?:; extra == \"(\w+)\")?", meta)
    assert {extra for _, _, extra in jax_pins} >= {"", "cuda12", "cuda13", "tpu"}
    assert len({pin for _, pin, _ in jax_pins}) == 1, jax_pins  # one range for every build
    with open(os.path.join(dist_info, "entry_points.txt"), encoding="utf-8") as f:
        scripts = dict(re.findall(r"^(\S+) = (\S+)$", f.read(), re.M))
    assert scripts == CONSOLE_SCRIPTS
    for target_name in scripts.values():
        module, func = target_name.split(":")
        assert callable(getattr(importlib.import_module(module), func))
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    for spec in ("quickstart:tiny", "configs/quickstart.py:tiny"):
        proc = subprocess.run([sys.executable, str(target / "bin" / "jepa-train"), f"--config={spec}",
                               f"--workdir={run_dir / 'w'}", "--config.train.totl_steps=1"], cwd=run_dir, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == cli.USAGE_EXIT_CODE and "did you mean --config.train.total_steps" in proc.stderr
    loaded = subprocess.run([sys.executable, "-c", "import jepa, jepa.configs.world_model as m; "
                             "print(jepa.__file__); print(m.get_config('tiny').objective)"], cwd=run_dir, env=env,
                            capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == [str(target / "jepa" / "__init__.py"), "ac"]


def test_readme_installs_accelerator_jax_through_the_pinned_extras():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("## Installing JAX for accelerators"):]
    section = section[:section.index("\n## ", 3)]
    for extra in ("cuda12", "cuda13", "tpu"):
        assert f'pip install -e ".[{extra}]"' in section, extra
    assert not re.search(r"pip install[^\n`]*(-U|--upgrade)", section)
    assert "tensorboard" in readme and '".[tensorboard]"' in readme
