"""Finetune stage for the tiny model (goes with configs/tiny.py): seconds on a CPU.

    mos-jax finetune --config configs/tiny_finetune.py --workdir runs/tiny-ft \
        --config.finetune.init_from runs/tiny
"""

from pathlib import Path

from mos_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("tiny.py"))
    c.finetune.init_from = "runs/tiny"  # tiny.py's lr 20 and 3 epochs
    return c
