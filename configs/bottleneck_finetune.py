"""Finetune stage for the softmax-bottleneck demo's model (goes with
configs/bottleneck.py).

    mos-jax finetune --config configs/bottleneck_finetune.py --workdir runs/bottleneck-ft \
        --config.finetune.init_from runs/bottleneck
"""

from pathlib import Path

from mos_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("bottleneck.py"))
    c.finetune.init_from = "runs/bottleneck"
    return c
