r"""Expand a list or grid of config overrides into runs with distinct workdirs; run them locally one after
another, or submit them as one SLURM array.

    python launch/sweep.py --config=configs/quickstart.py --root=runs/sweep \
        --grid optim.lr=1e-3,5e-4 --grid loss.exponent=1,2 --dry_run
    python launch/sweep.py --config=configs/quickstart.py:tiny --root=/tmp/sw --list "optim.lr=1e-3" \
        --list "optim.lr=1e-4 model.remat=full"
    python launch/sweep.py ... --config.train.stop_at=100           # an override added to every run
    python launch/sweep.py ... --slurm [--sbatch_args="--nodes=2"]    # one array task per run (launch/slurm.sbatch)

Each --grid is FIELD=V1,V2,... and the sweep runs the Cartesian product; each --list is a whole run, a
space-separated set of FIELD=VALUE. Every field is checked against the config before anything starts (a
misspelt one fails with the closest field named). Each run's workdir is ROOT/<field-value_...> (readable,
unique), and ROOT/sweep.json lists the runs. --dry_run prints the commands. Re-running the sweep resumes
unfinished runs (the trainer resumes from a workdir's checkpoints).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_item(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not FIELD=VALUE")
    field, value = item.split("=", 1)
    field = field.removeprefix("--").removeprefix("config.")
    if not re.fullmatch(r"[A-Za-z_][\w.]*", field):
        raise ValueError(f"override {item!r}: {field!r} is not a config field path")
    return field, value


def expand_grid(items: list[str]) -> list[list[tuple[str, str]]]:
    """FIELD=V1,V2 items -> every combination (first field varies slowest)."""
    axes = []
    for item in items:
        field, values = parse_item(item)
        axes.append([(field, v) for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)] if axes else []


def expand_list(runs: list[str]) -> list[list[tuple[str, str]]]:
    return [[parse_item(item) for item in shlex.split(run)] for run in runs]


def run_name(overrides: list[tuple[str, str]]) -> str:
    name = "_".join(f"{f.split('.')[-1]}-{v}" for f, v in overrides) or "base"
    return re.sub(r"[^\w.\-]+", "", name)[:150]


def build_runs(config: str, root: str, overrides: list[list[tuple[str, str]]], extra: list[str]) -> list[dict]:
    runs, seen = [], {}
    for ov in overrides:
        name = run_name(ov)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}_{seen[name]}"
        workdir = os.path.join(root, name)
        args = [f"--config={config}", f"--workdir={workdir}"] + [f"--config.{f}={v}" for f, v in ov] + extra
        runs.append({"name": name, "workdir": workdir, "overrides": dict(ov), "args": args})
    return runs


def local_command(run: dict, python: str = sys.executable) -> list[str]:
    return [python, "-m", "jepa.train", *run["args"]]


SLURM_SCRIPT = os.path.join(REPO, "launch", "slurm.sbatch")


def slurm_command(runs: list[dict], root: str, sbatch_args: str) -> tuple[list[str], str]:
    """(sbatch command, script): an array job whose task i runs launch/slurm.sbatch with run i's args, under the
    same #SBATCH settings (nodes, GPUs, time limit, the SIGTERM warning and requeue)."""
    with open(SLURM_SCRIPT, encoding="utf-8") as f:
        directives = [line.rstrip("\n") for line in f if line.startswith("#SBATCH")]
    lines = ["#!/bin/bash", *directives, "set -euo pipefail", "case $SLURM_ARRAY_TASK_ID in"]
    for i, run in enumerate(runs):
        lines.append(f"  {i}) ARGS=({' '.join(shlex.quote(a) for a in run['args'])}) ;;")
    lines += ["esac", f'exec bash {shlex.quote(SLURM_SCRIPT)} "${{ARGS[@]}}"']
    script = os.path.join(root, "sweep_array.sh")
    cmd = ["sbatch", f"--array=0-{len(runs) - 1}", *shlex.split(sbatch_args), script]
    return cmd, "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """`python launch/sweep.py --config=FILE --root=DIR --grid ... | --list ...` (argv: after the program name)."""
    from absl import flags

    from jepa import cli
    args = list(sys.argv[1:] if argv is None else argv)
    with cli.flag_scope():
        config = cli.define_config_file(args, "the runs' config file (path.py[:arg]); --config.FIELD=VALUE "
                                        "overrides are added to every run")
        root = flags.DEFINE_string("root", None, "parent of the run workdirs")
        grid = flags.DEFINE_multi_string("grid", [], "FIELD=V1,V2,... (repeat for more fields; Cartesian product)")
        runs_list = flags.DEFINE_multi_string("list", [], 'a run, "FIELD=V FIELD2=V2" (repeat for more runs)')
        slurm = flags.DEFINE_boolean("slurm", False, "submit a SLURM array instead of running locally")
        sbatch_args = flags.DEFINE_string("sbatch_args", "", "extra sbatch options, e.g. --nodes=2")
        dry_run = flags.DEFINE_boolean("dry_run", False, "print the commands only")
        keep_going = flags.DEFINE_boolean("keep_going", False, "locally: continue after a failed run")
        cli.parse(args, required=("config", "root"))
        if grid.value and runs_list.value:
            raise cli.UsageError("use --grid or --list, not both")
        try:
            overrides = expand_grid(grid.value) if grid.value else expand_list(runs_list.value)
        except ValueError as e:
            raise cli.UsageError(str(e)) from None
        if not overrides:
            raise cli.UsageError("nothing to sweep: give --grid or --list")
        cli.check_overrides(config.value, [f"--config.{f}" for ov in overrides for f, _ in ov])
        extra = [a for a in args if a.startswith("--config.")]  # validated by the config flag
        runs = build_runs(cli.flag_value(args, "config"), root.value, overrides, extra)
        return _launch(runs, root.value, slurm=slurm.value, sbatch_args=sbatch_args.value, dry_run=dry_run.value,
                       keep_going=keep_going.value)


def _launch(runs: list[dict], root: str, *, slurm: bool, sbatch_args: str, dry_run: bool, keep_going: bool) -> int:
    """Submits, prints or runs the sweep's runs; the exit code."""
    if slurm:
        cmd, script = slurm_command(runs, root, sbatch_args)
        if dry_run:
            print(script)
            print(shlex.join(cmd))
            return 0
        os.makedirs(root, exist_ok=True)
        with open(cmd[-1], "w") as f:
            f.write(script)
        return subprocess.call(cmd)
    if dry_run:
        for run in runs:
            print(shlex.join(local_command(run)))
        return 0
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "sweep.json"), "w") as f:
        json.dump([{k: r[k] for k in ("name", "workdir", "overrides")} for r in runs], f, indent=2)
    failed = []
    for run in runs:
        print(f"sweep: {run['name']}", file=sys.stderr, flush=True)
        code = subprocess.call(local_command(run), cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
        if code:
            failed.append(run["name"])
            if not keep_going:
                break
    if failed:
        print(f"sweep: failed runs: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from jepa import cli
    cli.run(main, __doc__)
