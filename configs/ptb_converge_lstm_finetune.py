"""Finetune stage for configs/ptb_converge_lstm.py: configs/ptb_study_lstm_finetune.py's
stage (averaged AdamW at a small constant learning rate, at most 2 epochs) on the
converged study's model.

    mos-jax finetune --config configs/ptb_converge_lstm_finetune.py \
        --workdir runs/ptb_converge_lstm-ft --config.finetune.init_from runs/ptb_converge_lstm \
        --config.data.dir ../shared/data/ptb
"""

from pathlib import Path

from mos_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("ptb_converge_lstm.py"))
    study = load_config_file(Path(__file__).with_name("ptb_study_lstm_finetune.py"))
    c.finetune = study.finetune
    c.finetune.init_from = "runs/ptb_converge_lstm"
    c.optim.warmup_steps = 0  # the schedule was the training run's
    c.optim.decay_steps = 0
    return c
