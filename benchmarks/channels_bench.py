"""Video only vs video + vector (proprioception) on the world data: the quick start trained for the same steps with
`model.channels=("video",)` and `("video", "vector")`, then ridge probes of the joints' positions and velocities
(per domain, R^2 on the test split, the frame at the end of the window) from the frozen EMA encoders.

    python benchmarks/channels_bench.py --workdir=runs/channels_bench [--steps=500] [--windows=4]

Rows: `video` (the video-only run: every token), `video+vector fused` (every token of both channels),
`video+vector, vector withheld` (the multi-channel encoder given video only: the series absent from every clip),
`video+vector: video tokens` / `vector tokens` (the multi-channel run's tokens of one channel, both read).
Runs already in the workdir are reused (resumed to --steps).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jepa import export as export_lib  # noqa: E402
from jepa import probe as probe_lib  # noqa: E402
from jepa import runs  # noqa: E402
from jepa import train as train_lib  # noqa: E402
from jepa.models import channels as channels_lib  # noqa: E402


def _config(arg: str, steps: int):
    from configs import quickstart
    c = quickstart.get_config(arg)
    c.train.total_steps = steps
    c.train.checkpoint_every = steps
    c.optim.warmup_steps = min(int(c.optim.warmup_steps), steps // 5)
    c.optim.cooldown_steps = max(1, min(int(c.optim.cooldown_steps), steps // 5))
    c.train.log_every = 50
    return c


def _tokens(feats: export_lib.Features, channel: str, start: int, stop: int) -> export_lib.Features:
    """The features of one channel's tokens only."""
    return export_lib.Features(pooled=feats.channels[channel], patches=np.asarray(feats.patches)[:, start:stop],
                               targets=feats.targets, rows=feats.rows, meta=feats.meta)


def main(argv=None) -> dict:
    from absl import flags

    from jepa import cli
    with cli.flag_scope():
        workdir = flags.DEFINE_string("workdir", None, "where both runs and the results go")
        steps = flags.DEFINE_integer("steps", 500, "training steps of each run")
        windows = flags.DEFINE_integer("windows", 4, "windows per episode embedded for the probes")
        cli.parse(argv, required=("workdir",))
        out_dir, num_steps = workdir.value, steps.value
        results = {}
        for name, arg in (("video", ""), ("video+vector", "channels")):
            run_dir = os.path.join(workdir.value, name.replace("+", "_"))
            train_lib.train(_config(arg, steps.value), run_dir)
            config = runs.load_config(run_dir)
            config.data.eval_mode = "uniform"
            config.data.num_segments = windows.value
            config.data.num_workers = 0
            params, step = runs.load_encoder(run_dir, config)
            feats = {split: export_lib.embed_split(config, params, split, features=("pooled", "patches"))
                     for split in ("train", "validation", "test")}
            sets = {name if arg == "" else f"{name} fused": feats}
            if arg:
                # The jointly trained encoder reading video alone (the vector channel absent from every clip).
                sets[f"{name}, vector withheld"] = {
                    split: export_lib.embed_split(config, params, split, features=("pooled", "patches"),
                                                  withheld=("vector",)) for split in ("train", "validation", "test")}
                for channel, (a, b) in channels_lib.offsets(config.model.channels, feats["train"].meta["grid"]).items():
                    sets[f"{name}: {channel} tokens"] = {k: _tokens(f, channel, a, b) for k, f in feats.items()}
            for label, fs in sets.items():
                r = probe_lib.per_domain_regression(fs, target="states[-1]", probe="ridge")["test"]
                results[label] = {"step": step, **{k: round(v, 3) for k, v in r.items()}}
                logging.info("%s: %s", label, results[label])
    print(f"| encoder ({num_steps} steps) | R^2 states | positions | velocities |")
    print("|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['r2']:.3f} | {r['r2_pos']:.3f} | {r['r2_vel']:.3f} |")
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    from jepa import cli
    cli.run(main, __doc__)
