"""Finetune stage for configs/ptb_transformer.py: averaged AdamW from the best training
weights at a small constant learning rate (1e-4, no warm-up or decay), at most 5 epochs,
stopped by the non-monotone rule like every finetune.

    mos-jax finetune --config configs/ptb_transformer_finetune.py --workdir runs/ptb_transformer-ft \
        --config.finetune.init_from runs/ptb_transformer --config.data.dir ../shared/data/ptb
"""

from pathlib import Path

from mos_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("ptb_transformer.py"))
    c.finetune.init_from = "runs/ptb_transformer"
    c.finetune.lr = 1e-4
    c.finetune.max_epochs = 5
    c.optim.warmup_steps = 0  # the schedule was the training run's
    c.optim.decay_steps = 0
    return c
