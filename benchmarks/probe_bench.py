"""World-dataset probe benchmark: a run's EMA encoder vs the same architecture at random initialisation.

    python benchmarks/probe_bench.py --workdir=RUN [--probe=linear,attentive] [--epochs=30] [--config.FIELD=...]

Same as `python -m jepa.probe benchmark ...` (see jepa/probe.py): domain classification accuracy and per-domain
normalised physical-state R^2 (positions, velocities), fitted on train, chosen on validation, reported on test.
"""

import sys

from jepa import probe

if __name__ == "__main__":
    probe.main(["benchmark", *sys.argv[1:]])
