"""Experiment configs (`get_config(arg)` per file), installed as the package `jepa.configs`: a command line's
`--config=quickstart` or `--config=configs/quickstart.py` finds them after a non-editable install too."""
