"""Probe benchmarks.

World-dataset benchmark: a run's EMA encoder vs the same architecture at random initialisation.

    python benchmarks/probe_bench.py --workdir=RUN [--probe=linear,ridge,attentive] [--target=keypoints[-1],states]
        [--config.FIELD=...]

Same as `python -m jepa.probe benchmark ...` (see jepa/probe.py): domain classification accuracy and per-domain
normalised R^2 of the last frame's image keypoints (positions) and their image velocity, fitted on train, chosen
on validation, reported on test.

README example shape: the attentive probe on an export of the quick-start encoder's shape.

    python benchmarks/probe_bench.py example [--data=/tmp/probe_example] [--rows=1232] [jepa.probe flags ...]

writes (once) a synthetic export of 1232 / 152 / 152 windows (train / validation / test; 4 windows per clip)
x 256 patch tokens x 192 dims with 9 classes, in jepa.export's own format (shards, manifests), then runs the
README's `python -m jepa.probe ... --probe=attentive` command on it in a child process and prints its wall time,
peak resident memory and accuracy. Every patch token shows one of 9 class directions plus noise; in each window 8
tokens at random places also carry a faint shared marker direction, and they show the clip's class (the others a
random one), so mean pooling dilutes the class and attention has to find it. Flags after `example` that this
script does not know go to jepa.probe (e.g. `--epochs=5`, `--depth=1`).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from jepa import cli, probe

EXAMPLE_ROWS = {"train": 1232, "val": 152, "test": 152}  # the quick-start export: 308 / 38 / 38 clips x 4 windows
EXAMPLE_TOKENS, EXAMPLE_WIDTH, EXAMPLE_CLASSES, EXAMPLE_SEGMENTS = 256, 192, 9, 4


def write_example_export(output: str, split: str, rows: int, *, seed: int, tokens: int = EXAMPLE_TOKENS,
                         width: int = EXAMPLE_WIDTH, classes: int = EXAMPLE_CLASSES,
                         segments: int = EXAMPLE_SEGMENTS, shard_size: int = 512) -> None:
    """A finished export directory (jepa.export's shards and manifest, float32 like the real one) of `rows`
    windows with a learnable class signal in a few patch tokens; see the module docstring."""
    from jepa import export as export_lib
    if rows % segments:
        raise ValueError(f"--rows: {rows} is not a multiple of {segments} windows per clip")
    rng = np.random.default_rng(seed)
    fixed = np.random.default_rng(1234)  # the same class directions, offsets and scales in every split
    centers = fixed.normal(size=(classes, width)).astype(np.float32)
    offset = fixed.normal(size=width).astype(np.float32)
    scale = fixed.uniform(0.5, 2.0, size=width).astype(np.float32)
    marker = fixed.normal(size=width).astype(np.float32)
    labels = rng.integers(0, classes, rows // segments).repeat(segments)
    os.makedirs(output, exist_ok=True)
    manifest = {"fingerprint": {"format": export_lib.FORMAT_VERSION, "workdir": "synthetic", "step": 0,
                                "encoder": "synthetic", "split": split, "layers": [5],
                                "features": ["pooled", "patches"], "width": width, "depth": 6, "grid": [4, 8, 8],
                                "num_frames": 8, "resolution": 64, "eval_mode": "uniform",
                                "num_segments": segments},
                "shards": [], "complete": False}
    for shard, start in enumerate(range(0, rows, shard_size)):
        n = min(shard_size, rows - start)
        y = labels[start:start + n]
        # every token shows some class direction; 8 of them, marked by a shared direction, show the clip's own
        token_class = rng.integers(0, classes, (n, tokens))
        marked = np.argsort(rng.random((n, tokens)), axis=1)[:, :8]
        token_class[np.arange(n)[:, None], marked] = y[:, None]
        patches = rng.normal(size=(n, tokens, width)).astype(np.float32) + 0.3 * centers[token_class]
        patches[np.arange(n)[:, None], marked] += 0.6 * marker
        patches = patches * scale + offset
        rows_meta = [{"clip_id": f"world/{(start + i) // segments}", "source": "world",
                      "index": (start + i) // segments, "segment": (start + i) % segments, "label": int(y[i])}
                     for i in range(n)]
        record = {"pooled": patches.mean(1), "patches": patches, "label": y.astype(np.int32),
                  "segment": np.asarray([r["segment"] for r in rows_meta], np.int32), "rows": rows_meta}
        manifest["shards"].append(export_lib._write_shard(output, 0, shard, [record]))
    manifest["complete"] = True
    export_lib._save_json(export_lib.manifest_path(output, 0), manifest)


def example(argv: list[str]) -> dict:
    """`example [--data=DIR] [--rows=N] [jepa.probe flags]`: the README's attentive probe on the example shape,
    timed in a child process (wall time and peak resident memory of that process)."""
    data, rows, rest = "/tmp/probe_example", EXAMPLE_ROWS["train"], []
    for arg in argv:
        if arg.startswith("--data="):
            data = arg.split("=", 1)[1]
        elif arg.startswith("--rows="):
            rows = int(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    sizes = {split: max(EXAMPLE_SEGMENTS, n * rows // EXAMPLE_ROWS["train"] // EXAMPLE_SEGMENTS * EXAMPLE_SEGMENTS)
             for split, n in EXAMPLE_ROWS.items()}
    dirs = {split: os.path.join(data, f"{split}-{n}") for split, n in sizes.items()}
    start = time.perf_counter()
    for seed, (split, path) in enumerate(dirs.items()):
        if not os.path.exists(os.path.join(path, "manifest-p000.json")):
            write_example_export(path, split, sizes[split], seed=seed)
    print(f"data: {data} ({sizes['train']} / {sizes['val']} / {sizes['test']} windows x {EXAMPLE_TOKENS} tokens "
          f"x {EXAMPLE_WIDTH}, {EXAMPLE_CLASSES} classes; {time.perf_counter() - start:.0f} s)", flush=True)
    cmd = [sys.executable, "-m", "jepa.probe", f"--features={dirs['train']}", f"--val_features={dirs['val']}",
           f"--test_features={dirs['test']}", "--task=classification", "--target=label", "--probe=attentive", *rest]
    print(" ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # Linux: KiB
    if proc.returncode:
        raise RuntimeError(f"jepa.probe exited with {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    summary = {"wall_s": round(wall, 1), "peak_rss_gib": round(peak_gib, 2), "best": result["best"],
               "val": result["val"], "test": result["test"], "grid": len(result["grid"])}
    print(f"attentive probe, {summary['grid']} lr x wd: {wall:.1f} s wall, peak RSS {peak_gib:.2f} GiB; best "
          f"{result['best']}; test accuracy {result['test']['accuracy']:.3f} (clips), "
          f"{result['test']['window_accuracy']:.3f} (windows)")
    return summary


def main(argv=None):
    """`python benchmarks/probe_bench.py [example] [--flags]` (argv: the arguments after the program name)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["example"]:
        return example(argv[1:])
    return probe.main(["benchmark", *argv])


if __name__ == "__main__":
    cli.run(main, __doc__)
