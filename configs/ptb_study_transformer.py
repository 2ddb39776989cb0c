"""The Transformer side of the PTB width study (`mos-jax study`, README "Findings"):
configs/ptb_transformer.py (2 pre-LayerNorm blocks, 4 attention heads, d_ff = 4 d_model,
MoS with 4 components, windows of 64 tokens over 12 columns, AdamW with a warm-up and a
cosine decay) at a learning rate of 3e-3 instead of 1e-3, 100 warm-up steps, decay
over the study's 2,500 steps in 500-step epochs. The study sets the width (emsize =
d_model, d_ff = 4 d_model). Learning rate probed on machine C over 1,000 steps of MoS
(valid ppl): width 16: 3e-3 565, 1e-2 468; width 64: 3e-3 357. One rate for all
widths, a compromise between the narrow models (which want more) and the wide ones.

    mos-jax study --config configs/ptb_study_lstm.py \
        --transformer-config configs/ptb_study_transformer.py \
        --config.data.dir ../shared/data/ptb --widths 16,32,64 --steps 2500 --evals 5
"""

from pathlib import Path

from mos_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("ptb_transformer.py"))
    c.model.d_ff = 4 * c.model.emsize
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 100
    c.optim.decay_steps = 2500
    c.train.steps_per_epoch = 500
    c.train.max_epochs = 5
    return c
