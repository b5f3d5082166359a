"""World-dataset probe benchmark: a run's EMA encoder vs the same architecture at random initialisation.

    python benchmarks/probe_bench.py --workdir=RUN [--probe=linear,ridge,attentive] [--target=keypoints[-1],states]
        [--config.FIELD=...]

Same as `python -m jepa.probe benchmark ...` (see jepa/probe.py): domain classification accuracy and per-domain
normalised R^2 of the last frame's image keypoints (positions) and their image velocity, fitted on train, chosen
on validation, reported on test.
"""

import sys

from jepa import probe

if __name__ == "__main__":
    probe.main(["benchmark", *sys.argv[1:]])
