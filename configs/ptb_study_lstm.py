"""A small 1-layer AWD-LSTM on Penn Treebank that learns within a short budget: the
LSTM side of the PTB width study (`mos-jax study`, README "Findings").

One LSTM layer of width emsize = nhid = nhidlast = 64 (the study sets it to each width),
MoS with 4 components, light dropout (no weight drop), no AR/TAR. AdamW (lr 1e-2, no
weight decay, gradient norm clipped at 0.25) with 100 warm-up steps and a cosine decay
to a tenth over 2,500 steps; windows of exactly 35 tokens over 20 columns (one compiled
train step), 500-step epochs. The paper's SGD at lr 20 needs thousands of steps to leave
the unigram plateau at these sizes (configs/ptb_small.py, 800 steps: valid ppl 665 at
lr 20 as first recorded, 993 when re-measured, 734 at its tuned lr 5). Learning rate probed on machine C over 1,000 steps of MoS (valid ppl): width 16:
3e-3 683, 1e-2 472, 3e-2 340; width 64: 1e-2 257, 3e-2 297.

    mos-jax study --config configs/ptb_study_lstm.py \
        --transformer-config configs/ptb_study_transformer.py \
        --config.data.dir ../shared/data/ptb --widths 16,32,64 --steps 2500 --evals 5
    mos-jax train --config configs/ptb_study_lstm.py --config.data.dir ../shared/data/ptb
"""

from mos_jax.config import default_config


def get_config():
    c = default_config()
    c.data.dir = "data/ptb"
    c.data.batch_size = 20
    c.data.bptt = 35
    c.data.max_seq_len_delta = 0
    c.model.nlayers = 1
    c.model.emsize = c.model.nhid = c.model.nhidlast = 64
    c.model.n_experts = 4
    c.model.dropout = 0.1
    c.model.dropouth = 0.0
    c.model.dropouti = 0.1
    c.model.dropoute = 0.0
    c.model.dropoutl = 0.1
    c.model.wdrop = 0.0
    c.optim.name = "adamw"
    c.optim.lr = 1e-2
    c.optim.wdecay = 0.0
    c.optim.clip = 0.25
    c.optim.asgd = False
    c.optim.alpha = 0.0
    c.optim.beta = 0.0
    c.optim.warmup_steps = 100
    c.optim.decay_steps = 2500
    c.optim.min_lr_ratio = 0.1
    c.train.steps_per_epoch = 500
    c.train.max_epochs = 5
    c.train.log_every_steps = 100
    return c
