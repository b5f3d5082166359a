"""V-JEPA 2 ViT-L/16 pretraining as published. Args: "" | "cooldown".

    python -m jepa.train --config=configs/vjepa2_vitl16.py --workdir=gs://bucket/vitl
    python -m jepa.train --config=configs/vjepa2_vitl16.py:cooldown --workdir=... --config.train.init_from=MAIN_RUN
"""

from jepa.config import vjepa2_recipe


def get_config(arg: str = ""):
    if "384" in arg.split(","):
        raise ValueError("the 384 px variant is published for ViT-g only")
    return vjepa2_recipe("large", arg)
