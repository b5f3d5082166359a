"""Dataset preparation command line.

  python -m jepa.data.prepare dmc --data_dir=DIR [--preset=default --episodes=N --frames=T --resolution=R
                                                  --domains=cartpole,reacher --seed=0 --num_workers=N]
  python -m jepa.data.prepare video_folder --src=DIR_OR_MANIFEST --data_dir=DIR [--name=default
                                           --validation_fraction=0.0 --num_workers=N]

Both are cached: running again with the same options reuses the prepared data. Prints examples per split and, for
video folders, the files that were skipped (also stored in prepare_report.json next to the shards).
"""
from __future__ import annotations

import argparse
import logging
import sys


def _positive_or_none(text: str) -> int | None:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jepa.data.prepare", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dmc = sub.add_parser("dmc", help="generate the DeepMind Control world-model episodes (jepa_world)")
    dmc.add_argument("--data_dir", required=True)
    dmc.add_argument("--preset", default="default")
    dmc.add_argument("--episodes", type=int, default=None)
    dmc.add_argument("--frames", type=int, default=None)
    dmc.add_argument("--resolution", type=int, default=None)
    dmc.add_argument("--domains", default=None, help="comma-separated domain names")
    dmc.add_argument("--seed", type=int, default=0)
    dmc.add_argument("--num_workers", type=_positive_or_none, default=None)
    dmc.set_defaults(run=_dmc)
    vf = sub.add_parser("video_folder", help="pack a folder or .csv/.jsonl manifest of videos (jepa_video_folder)")
    vf.add_argument("--src", required=True, help="folder (labels = sub-folders) or manifest .csv/.jsonl")
    vf.add_argument("--data_dir", required=True)
    vf.add_argument("--name", default="default", help="config name; lets several folders share one data_dir")
    vf.add_argument("--validation_fraction", type=float, default=0.0)
    vf.add_argument("--num_workers", type=_positive_or_none, default=None)
    vf.set_defaults(run=_video_folder)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
