"""Finetune stage for configs/tiny_transformer.py: averaged AdamW from the best training
weights at a constant learning rate of 3e-3 (a tenth of training's peak; no warm-up or
decay), at most 3 epochs: seconds on a CPU.

    mos-jax finetune --config configs/tiny_transformer_finetune.py \
        --workdir runs/tiny_transformer-ft --config.finetune.init_from runs/tiny_transformer
"""

from pathlib import Path

from mos_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("tiny_transformer.py"))
    c.finetune.init_from = "runs/tiny_transformer"  # tiny_transformer.py's finetune keys
    c.optim.warmup_steps = 0  # the schedule was the training run's
    c.optim.decay_steps = 0
    return c
