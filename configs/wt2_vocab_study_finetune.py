"""Finetune stage for configs/wt2_vocab_study.py: averaged AdamW from the best training
weights at a small constant learning rate (3e-4, no warm-up or decay), at most 2
epochs, stopped by the non-monotone rule like every finetune.

    mos-jax finetune --config configs/wt2_vocab_study_finetune.py \
        --workdir runs/wt2_vocab_study-ft --config.finetune.init_from runs/wt2_vocab_study \
        --config.data.dir ../shared/data/wikitext-2
"""

from pathlib import Path

from mos_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("wt2_vocab_study.py"))
    c.finetune.init_from = "runs/wt2_vocab_study"
    c.finetune.lr = 3e-4
    c.finetune.max_epochs = 2
    c.optim.warmup_steps = 0  # the schedule was the training run's
    c.optim.decay_steps = 0
    return c
