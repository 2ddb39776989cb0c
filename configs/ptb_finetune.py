"""Finetune stage for PTB: averaged SGD from the best training weights, lr 25.

    mos-jax finetune --config configs/ptb_finetune.py --workdir runs/ptb-ft \
        --config.finetune.init_from runs/ptb
"""

from mos_jax.config import default_config


def get_config():
    c = default_config()
    c.finetune.init_from = "runs/ptb"
    c.finetune.lr = 25.0
    return c
