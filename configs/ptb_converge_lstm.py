"""The LSTM side of the converged PTB width study (issue 23; README "Findings"):
configs/ptb_study_lstm.py trained until its validation perplexity stops improving.

The same model and optimiser (1-layer AWD-LSTM, width set by the study, MoS with 4
components, AdamW at lr 1e-2 with 100 warm-up steps), but 500-step epochs up to 30 of
them, the cosine decay stretched over those 15,000 steps, and early stopping: a run ends
when its best validation perplexity improved by less than 1% per epoch over the last
two epochs (train.min_improvement = 0.01, train.patience = 2). The best weights (by
validation) are the run's result.

    mos-jax study --config configs/ptb_converge_lstm.py \
        --transformer-config configs/ptb_converge_transformer.py \
        --config.data.dir ../shared/data/ptb --widths 16,32,64 --steps 0 \
        --workdir runs/study-ptb-converged
"""

from pathlib import Path

from mos_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("ptb_study_lstm.py"))
    c.train.steps_per_epoch = 500
    c.train.max_epochs = 30
    c.optim.decay_steps = 15000
    c.train.min_improvement = 0.01
    c.train.patience = 2
    return c
