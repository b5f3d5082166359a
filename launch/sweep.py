"""Expand a list or grid of config overrides into runs with distinct workdirs; run them locally one after
another, or submit them as one SLURM array.

    python launch/sweep.py --config=configs/quickstart.py --root=runs/sweep \
        --grid optim.lr=1e-3,5e-4 loss.exponent=1,2 --dry_run
    python launch/sweep.py --config=configs/quickstart.py:tiny --root=/tmp/sw --list "optim.lr=1e-3" "optim.lr=1e-4"
    python launch/sweep.py ... --slurm [--sbatch_args="--nodes=2"]      # one array task per run (launch/slurm.sbatch)

--grid takes FIELD=V1,V2,... items and runs the Cartesian product; --list takes whole runs, each a
space-separated set of FIELD=VALUE. Each run's workdir is ROOT/<field-value_...> (readable, unique), and
ROOT/sweep.json lists the runs. --dry_run prints the commands. Re-running the sweep resumes unfinished runs (the
trainer resumes from a workdir's checkpoints).
"""

from __future__ import annotations

import argparse
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


def slurm_command(runs: list[dict], root: str, sbatch_args: str) -> tuple[list[str], str]:
    """(sbatch command, script): an array job whose task i runs launch/slurm.sbatch's srun with run i's args."""
    lines = ["#!/bin/bash", "set -euo pipefail", "case $SLURM_ARRAY_TASK_ID in"]
    for i, run in enumerate(runs):
        lines.append(f"  {i}) ARGS=({' '.join(shlex.quote(a) for a in run['args'])}) ;;")
    lines += ["esac", f'exec bash {shlex.quote(os.path.join(REPO, "launch", "slurm.sbatch"))} "${{ARGS[@]}}"']
    script = os.path.join(root, "sweep_array.sh")
    cmd = ["sbatch", f"--array=0-{len(runs) - 1}", *shlex.split(sbatch_args), script]
    return cmd, "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--root", required=True, help="parent of the run workdirs")
    p.add_argument("--grid", nargs="*", default=[], help="FIELD=V1,V2,... (Cartesian product)")
    p.add_argument("--list", nargs="*", default=[], help='runs, each "FIELD=V FIELD2=V2"')
    p.add_argument("--extra", nargs="*", default=[], help="flags added to every run, e.g. --config.train.stop_at=100")
    p.add_argument("--slurm", action="store_true", help="submit a SLURM array instead of running locally")
    p.add_argument("--sbatch_args", default="")
    p.add_argument("--dry_run", action="store_true", help="print the commands only")
    p.add_argument("--keep_going", action="store_true", help="locally: continue after a failed run")
    a = p.parse_args(argv)
    if a.grid and a.list:
        p.error("use --grid or --list, not both")
    try:
        overrides = expand_grid(a.grid) if a.grid else expand_list(a.list)
    except ValueError as e:
        p.error(str(e))
    if not overrides:
        p.error("nothing to sweep: give --grid or --list")
    runs = build_runs(a.config, a.root, overrides, a.extra)
    if a.slurm:
        cmd, script = slurm_command(runs, a.root, a.sbatch_args)
        if a.dry_run:
            print(script)
            print(shlex.join(cmd))
            return 0
        os.makedirs(a.root, exist_ok=True)
        with open(cmd[-1], "w") as f:
            f.write(script)
        return subprocess.call(cmd)
    if a.dry_run:
        for run in runs:
            print(shlex.join(local_command(run)))
        return 0
    os.makedirs(a.root, exist_ok=True)
    with open(os.path.join(a.root, "sweep.json"), "w") as f:
        json.dump([{k: r[k] for k in ("name", "workdir", "overrides")} for r in runs], f, indent=2)
    failed = []
    for run in runs:
        print(f"sweep: {run['name']}", file=sys.stderr, flush=True)
        code = subprocess.call(local_command(run), cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
        if code:
            failed.append(run["name"])
            if not a.keep_going:
                break
    if failed:
        print(f"sweep: failed runs: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
