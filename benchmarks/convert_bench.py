"""Time to convert a released-size V-JEPA 2 checkpoint and load it here, from a random-initialised full-size
transformers `VJEPA2Model` written locally (nothing downloaded).

    python benchmarks/convert_bench.py [--size=large|huge|giant] [--dir=/tmp/convert_bench] [--meta]

Prints one JSON line: checkpoint size, seconds to write it (not part of the figure), to convert it into a workdir
(read + map + Orbax save) and to load the converted encoder with `jepa.runs.load_encoder`; with --meta, the same
for a facebookresearch/vjepa2 .pt file of the same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import jax
from absl import flags

from jepa import cli, convert, models, runs

SIZES = {name: models.ENCODER_SIZES[name] for name in ("large", "huge", "giant")}


def _du(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(argv=None) -> dict:
    with cli.flag_scope():
        size = flags.DEFINE_enum("size", "large", list(SIZES), "released encoder size")
        folder = flags.DEFINE_string("dir", "/tmp/convert_bench", "scratch folder (emptied first)")
        meta = flags.DEFINE_bool("meta", False, "also time a Meta .pt file of the same weights")
        cli.parse(argv)
        import torch
        import transformers
        dims = SIZES[size.value]
        shutil.rmtree(folder.value, ignore_errors=True)
        hf_dir, workdir = os.path.join(folder.value, "hf"), os.path.join(folder.value, "run")
        t0 = time.perf_counter()
        config = transformers.VJEPA2Config(hidden_size=dims["width"], num_hidden_layers=dims["depth"],
                                           num_attention_heads=dims["heads"],
                                           mlp_ratio=convert._mlp_ratio(dims["mlp_dim"], dims["width"]))
        transformers.VJEPA2Model(config).save_pretrained(hf_dir)
        result = {"size": size.value, "checkpoint_bytes": _du(hf_dir), "write_s": round(time.perf_counter() - t0, 1)}
        t0 = time.perf_counter()
        convert.convert_in(hf_dir, workdir)
        result["hf_convert_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        params, _ = runs.load_encoder(workdir)
        result["load_encoder_s"] = round(time.perf_counter() - t0, 1)
        result["encoder_params"] = sum(x.size for x in jax.tree.leaves(params))
        if meta.value:
            pt = os.path.join(folder.value, "vjepa2.pt")
            convert.export(workdir, pt, "meta")
            result["meta_bytes"] = _du(pt)
            t0 = time.perf_counter()
            convert.convert_in(pt, os.path.join(folder.value, "run_meta"))
            result["meta_convert_s"] = round(time.perf_counter() - t0, 1)
        result["torch"] = torch.__version__
        shutil.rmtree(folder.value, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    cli.run(lambda argv: main(sys.argv[1:] if argv is None else argv), __doc__)
