"""Dataset preparation command line.

  python -m jepa.data.prepare dmc --data_dir=DIR [--preset=default --episodes=N --frames=T --resolution=R
                                                  --domains=cartpole,reacher --seed=0 --num_workers=N]
  python -m jepa.data.prepare video_folder --src=DIR_OR_MANIFEST --data_dir=DIR [--name=default
                                           --validation_fraction=0.0 --num_workers=N]

Both are cached: running again with the same options reuses the prepared data. Prints examples per split and, for
video folders, the files that were skipped (also stored in prepare_report.json next to the shards).
"""
from __future__ import annotations

import sys
import types

from absl import flags


def _splits(builder) -> dict[str, int]:
    return {name: info.num_examples for name, info in sorted(builder.info.splits.items())}


def _dmc(args) -> int:
    from jepa.data import world  # imported here: MuJoCo is only needed for this command
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    builder = world.prepare_world(args.data_dir, preset=args.preset, episodes=args.episodes, frames=args.frames,
                                  resolution=args.resolution, domains=domains, seed=args.seed,
                                  num_workers=args.num_workers)
    print(f"prepared {builder.name}/{builder.builder_config.name} in {builder.data_dir}")
    for split, n in _splits(builder).items():
        print(f"  {split}: {n} episodes")
    return 0


def _video_folder(args) -> int:
    from jepa.data import video_folder
    builder = video_folder.prepare_video_folder(args.src, args.data_dir, name=args.name,
                                                validation_fraction=args.validation_fraction,
                                                num_workers=args.num_workers)
    report = video_folder.read_report(builder)
    print(f"prepared {builder.name}/{builder.builder_config.name} in {builder.data_dir}")
    for split, n in _splits(builder).items():
        print(f"  {split}: {n} examples")
    if report:
        classes = report.get("class_names", [])
        print(f"  classes: {len(classes)}" + (f" ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})"
                                                if classes else ""))
        print(f"  files: {report['total_files']} found, {report['usable']} usable, {report['skipped']} skipped")
        for entry in report.get("skipped_examples", []):
            print(f"    skipped: {entry['reason']}")
    return 0


# Flags of each command; a flag of the other command is an error rather than silently ignored.
COMMAND_FLAGS = {
    "dmc": ("data_dir", "preset", "episodes", "frames", "resolution", "domains", "seed", "num_workers"),
    "video_folder": ("src", "data_dir", "name", "validation_fraction", "num_workers"),
}


def _define_flags() -> None:
    flags.DEFINE_string("data_dir", None, "where the TFDS dataset is written (both commands)")
    flags.DEFINE_string("preset", "default", "dmc: world preset (tiny, default, control, large, ...)")
    flags.DEFINE_integer("episodes", None, "dmc: episodes (default: the preset's)", lower_bound=1)
    flags.DEFINE_integer("frames", None, "dmc: frames per episode (default: the preset's)", lower_bound=1)
    flags.DEFINE_integer("resolution", None, "dmc: frame size in pixels (default: the preset's)", lower_bound=1)
    flags.DEFINE_string("domains", None, "dmc: comma-separated domain names (default: the preset's)")
    flags.DEFINE_integer("seed", 0, "dmc: generation seed")
    flags.DEFINE_string("src", None, "video_folder: folder (labels = sub-folders) or manifest .csv/.jsonl")
    flags.DEFINE_string("name", "default", "video_folder: config name; lets several folders share one data_dir")
    flags.DEFINE_float("validation_fraction", 0.0, "video_folder: share of files held out for validation")
    flags.DEFINE_integer("num_workers", None, "worker processes (default: automatic)", lower_bound=0)


def main(argv=None) -> int:
    """`python -m jepa.data.prepare dmc|video_folder --flags` (argv: the arguments after the program name)."""
    from jepa import cli
    with cli.flag_scope():
        _define_flags()
        command = cli.parse(argv, commands=tuple(COMMAND_FLAGS), command_required=True)
        FLAGS = flags.FLAGS
        stray = [n for n in set().union(*COMMAND_FLAGS.values()) - set(COMMAND_FLAGS[command]) if FLAGS[n].present]
        if stray:
            raise cli.UsageError(f"{', '.join('--' + n for n in sorted(stray))}: not a flag of {command}")
        missing = [n for n in ("src", "data_dir") if n in COMMAND_FLAGS[command] and not FLAGS[n].value]
        if missing:
            raise cli.UsageError(f"{command} needs {', '.join('--' + n for n in missing)}")
        args = types.SimpleNamespace(**{n: FLAGS[n].value for n in COMMAND_FLAGS[command]})
    try:
        return _dmc(args) if command == "dmc" else _video_folder(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run() -> None:
    """Entry of `python -m jepa.data.prepare` and the `jepa-prepare` console script."""
    from jepa import cli
    cli.run(main, __doc__)


if __name__ == "__main__":
    run()
