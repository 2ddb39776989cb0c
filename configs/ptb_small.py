"""A small AWD-LSTM-MoS on Penn Treebank: minutes per epoch on a 2-core CPU.

The "small config" of the benchmarks (emsize 64, nhid 128, nhidlast 64, 4 experts, the
full 10k vocabulary), trained with the paper's procedure at SGD lr 5 (the paper's 20 is
too large this early); dropouts are scaled down for the smaller model. Epochs are cut
to 400 steps (168k tokens, about 2 minutes here) so that two of them take a few
minutes; set --config.train.steps_per_epoch=0 for full passes over the corpus.
BENCHMARKS.md records what it reaches. In 800 steps the model is leaving the unigram
plateau: validation falls every epoch, and the finetune that follows
(configs/ptb_small_finetune.py, averaged SGD at lr 5) takes it further.

Learning rate probed on machine A, commits 3f65aa7 to 23a7528 (none changes training;
SGD, clip 0.25, the default 2 epochs of 400 steps; valid ppl after each epoch; the
finetune from the run's best weights, 2 epochs of averaged SGD, valid ppl after each):

    lr  seed  epochs 1, 2       finetune lr 25                 finetune lr 5
    20   28   807.8, 992.8 (rises; issue 26's figures)
    20    2   741.4, 763.4 (rises)
    10   28   885.3, 750.2
    10    1   834.8, 737.3
    10    2   740.6, 742.9 (rises)
     5   28   835.2, 734.3      1041.2, 985.3 (keeps its start)  669.2, 616.7
     5    1   762.1, 750.3                                     675.9, 627.3
     5    2   738.0, 727.0                                     677.9, 633.0

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
    c.optim.lr = 5.0
    c.train.steps_per_epoch = 400
    c.train.max_epochs = 2
    c.train.log_every_steps = 100
    return c
