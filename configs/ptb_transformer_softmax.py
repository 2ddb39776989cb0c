"""The softmax twin of configs/ptb_transformer.py, at the same parameter budget.

The same Transformer and training, with the tied softmax head in place of MoS; the
parameters MoS's latent and prior projections hold (66,560) go to the feed-forward
width instead: d_ff 642 instead of 512, 1,753,620 parameters in all (260 more than the
MoS model, 0.015%).

    mos-jax train --config configs/ptb_transformer_softmax.py --config.data.dir ../shared/data/ptb
"""

from pathlib import Path

from mos_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("ptb_transformer.py"))
    c.model.head = "softmax"
    c.model.d_ff = 642
    return c
