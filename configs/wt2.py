"""AWD-LSTM-MoS on WikiText-2 with the paper's hyperparameters (docs/reference.md section 5).

    mos-jax download wikitext-2 --dest data/wikitext-2
    mos-jax train --config configs/wt2.py --workdir runs/wt2
"""

from mos_jax.config import default_config


def get_config():
    c = default_config()
    c.data.dir = "data/wikitext-2"
    c.data.batch_size = 15
    c.data.small_batch_size = 5
    c.data.max_seq_len_delta = 20
    c.model.emsize = 300
    c.model.nhid = 1150
    c.model.nhidlast = 650
    c.model.dropouth = 0.2
    c.model.dropouti = 0.55
    c.optim.lr = 15.0
    c.train.seed = 1882
    c.finetune.lr = 20.0
    return c
