"""World-dataset probe benchmark: a run's EMA encoder vs the same architecture at random initialisation.

    python benchmarks/probe_bench.py --workdir=RUN [--probe=linear,ridge,attentive] [--target=keypoints[-1],states]
        [--config.FIELD=...]

Same as `python -m jepa.probe benchmark ...` (see jepa/probe.py): domain classification accuracy and per-domain
normalised R^2 of the last frame's image keypoints (positions) and their image velocity, fitted on train, chosen
on validation, reported on test.
"""

import sys

from jepa import cli, probe


def main(argv=None) -> dict:
    """`python benchmarks/probe_bench.py --workdir=RUN [--flags]`: `python -m jepa.probe benchmark` (argv: the
    arguments after the program name)."""
    return probe.main(["benchmark", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    cli.run(main, __doc__)
