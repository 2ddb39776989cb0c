"""Finetune stage for the small PTB model (goes with configs/ptb_small.py): averaged SGD
from the best training weights, lr 25, at most 2 short epochs (as ptb_small's).

    mos-jax finetune --config configs/ptb_small_finetune.py --workdir runs/ptb_small-ft \
        --config.finetune.init_from runs/ptb_small
"""

from pathlib import Path

from mos_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("ptb_small.py"))
    c.finetune.init_from = "runs/ptb_small"
    c.finetune.lr = 25.0
    c.finetune.max_epochs = 2
    return c
