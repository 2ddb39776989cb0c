"""Finetune stage for PTB (goes with configs/ptb.py): averaged SGD from the best
training weights, lr 25. Its model and data sections are ptb.py's.

    mos-jax finetune --config configs/ptb_finetune.py --workdir runs/ptb-ft \
        --config.finetune.init_from runs/ptb
"""

from pathlib import Path

from mos_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("ptb.py"))
    c.finetune.init_from = "runs/ptb"
    c.finetune.lr = 25.0
    return c
