"""A small causal Transformer with a MoS head on Penn Treebank: minutes per epoch on a
2-core CPU.

Two pre-LayerNorm blocks, d_model = emsize = 128, 4 heads, d_ff 512, rotary
positions, a 4-component MoS head tied to the 10k-word embedding: 1,753,360
parameters. Trained with AdamW (lr 1e-3, decoupled decay 0.01, gradient norm clipped
at 1), a linear warm-up over 200 steps and a cosine decay to a tenth over the 4,000
steps of 10 epochs cut to 400 steps (307k tokens) each. A window of up to 64 tokens is
the model's whole context (no carry); validation and test score in sliding windows of
64 tokens, stride 32 (each target sees at least 32 earlier tokens). Its softmax twin
with the same parameter budget is configs/ptb_transformer_softmax.py.

    mos-jax train --config configs/ptb_transformer.py --config.data.dir ../shared/data/ptb
"""

from mos_jax.config import default_config


def get_config():
    c = default_config()
    c.data.dir = "data/ptb"
    c.data.batch_size = 12
    c.data.bptt = 64  # the training window and the evaluation context
    c.data.max_seq_len_delta = 0  # windows of at most 64 tokens
    c.model.encoder = "transformer"
    c.model.head = "mos"
    c.model.n_experts = 4
    c.model.emsize = 128
    c.model.d_model = 0  # = emsize
    c.model.nlayers = 2
    c.model.n_heads = 4
    c.model.d_ff = 512
    c.model.attn_dropout = 0.1
    c.model.resid_dropout = 0.2
    c.model.dropoute = 0.0
    c.model.dropoutl = 0.1
    c.model.eval_stride = 32
    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.wdecay = 0.01
    c.optim.clip = 1.0
    c.optim.asgd = False  # no NT-ASGD averaging for Adam
    c.optim.alpha = 0.0  # AR/TAR are the LSTM's regularisers
    c.optim.beta = 0.0
    c.optim.warmup_steps = 200
    c.optim.decay_steps = 4000
    c.optim.min_lr_ratio = 0.1
    c.train.steps_per_epoch = 400
    c.train.max_epochs = 10
    c.train.log_every_steps = 100
    return c
