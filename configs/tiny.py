"""A tiny MoS model on a small synthetic corpus: seconds on a CPU, for tests and trials.

One LSTM layer suffices for the first-order synthetic chain and learns within a few
short epochs (a deeper tiny model needs far more steps to get going): valid perplexity
goes from about 45 to about 26 in 3 epochs (the chain's true perplexity is 13.1).
"""

from mos_jax.config import default_config


def get_config():
    c = default_config()
    c.data.dir = "synthetic"
    c.data.synthetic.vocab_size = 50
    c.data.synthetic.train_tokens = 20_000
    c.data.synthetic.valid_tokens = 1_000
    c.data.synthetic.test_tokens = 1_000
    c.data.batch_size = 8
    c.data.eval_batch_size = 8
    c.data.test_batch_size = 4
    c.data.bptt = 20
    c.data.max_seq_len_delta = 10
    c.model.nlayers = 1
    c.model.emsize = 16
    c.model.nhid = 16
    c.model.nhidlast = 16
    c.model.n_experts = 4
    for rate in ("dropout", "dropouti", "dropoutl", "wdrop"):
        c.model[rate] = 0.1
    c.model.dropouth = 0.0  # no layer in between
    c.model.dropoute = 0.05
    c.optim.lr = 20.0
    c.optim.alpha = 0.0  # AR/TAR slow this small model down more than they help
    c.optim.beta = 0.0
    c.train.seed = 0
    c.train.max_epochs = 3
    c.train.log_every_steps = 10
    c.finetune.lr = 20.0
    c.finetune.max_epochs = 3
    return c
