"""Finetune stage for WikiText-2: averaged SGD from the best training weights, lr 20.

    mos-jax finetune --config configs/wt2_finetune.py --workdir runs/wt2-ft \
        --config.finetune.init_from runs/wt2
"""

from pathlib import Path

from mos_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("wt2.py"))
    c.finetune.init_from = "runs/wt2"
    c.finetune.lr = 20.0
    return c
