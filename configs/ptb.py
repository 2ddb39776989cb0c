"""AWD-LSTM-MoS on Penn Treebank with the paper's hyperparameters (docs/reference.md section 5).

    mos-jax download ptb --dest data/ptb
    mos-jax train --config configs/ptb.py --workdir runs/ptb
"""

from mos_jax.config import default_config


def get_config():
    return default_config()  # the defaults are the paper's PTB recipe
