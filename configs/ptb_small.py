"""A small AWD-LSTM-MoS on Penn Treebank: minutes per epoch on a 2-core CPU.

The "small config" of the benchmarks (emsize 64, nhid 128, nhidlast 64, 4 experts, the
full 10k vocabulary), trained with the paper's procedure; dropouts are scaled down for
the smaller model. Epochs are cut to 400 steps (168k tokens, about 2 minutes here) so
that two of them take a few minutes; set --config.train.steps_per_epoch=0 for full
passes over the corpus. BENCHMARKS.md records what it reaches.

    mos-jax train --config configs/ptb_small.py --config.data.dir ../shared/data/ptb
"""

from mos_jax.config import default_config


def get_config():
    c = default_config()
    c.data.dir = "data/ptb"
    c.data.bptt = 35
    c.data.max_seq_len_delta = 20
    c.model.emsize = 64
    c.model.nhid = 128
    c.model.nhidlast = 64
    c.model.n_experts = 4
    c.model.dropout = 0.2
    c.model.dropouth = 0.1
    c.model.dropouti = 0.2
    c.model.dropoute = 0.05
    c.model.dropoutl = 0.1
    c.model.wdrop = 0.2
    c.train.steps_per_epoch = 400
    c.train.max_epochs = 2
    c.train.log_every_steps = 100
    return c
