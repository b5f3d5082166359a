"""V-JEPA 2 ViT-G/16 pretraining as published. Args: "" | "cooldown" | "384" | "384,cooldown".

    python -m jepa.train --config=configs/vjepa2_vitg16.py --workdir=gs://bucket/vitg
    python -m jepa.train --config=configs/vjepa2_vitg16.py:cooldown --workdir=... --config.train.init_from=MAIN_RUN
"""

from jepa.config import vjepa2_recipe


def get_config(arg: str = ""):
    return vjepa2_recipe("giant", arg)
