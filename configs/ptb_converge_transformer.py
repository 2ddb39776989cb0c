"""The Transformer side of the converged PTB width study (issue 23):
configs/ptb_study_transformer.py (2 pre-LayerNorm blocks, MoS with 4 components, AdamW
at lr 3e-3) with the stopping rule of configs/ptb_converge_lstm.py: 500-step epochs up
to 30, the cosine decay over 15,000 steps, and early stopping when the best validation
perplexity improved by less than 1% per epoch over the last two epochs.

    mos-jax study --config configs/ptb_converge_lstm.py \
        --transformer-config configs/ptb_converge_transformer.py \
        --config.data.dir ../shared/data/ptb --widths 16,32,64 --steps 0 \
        --workdir runs/study-ptb-converged
"""

from pathlib import Path

from mos_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("ptb_study_transformer.py"))
    c.train.steps_per_epoch = 500
    c.train.max_epochs = 30
    c.optim.decay_steps = 15000
    c.train.min_improvement = 0.01
    c.train.patience = 2
    return c
