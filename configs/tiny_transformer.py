"""The tiny model of configs/tiny.py with a causal Transformer encoder: about a minute
on a 2-core CPU, most of it compiling.

Same synthetic corpus (50 words, 20,000 training tokens), batch, width (emsize =
d_model = 16) and MoS head (4 components) as configs/tiny.py; one pre-LayerNorm block
with 2 attention heads, windows of at most 20 tokens (a window is the whole context).
tiny.py's SGD at lr 20 does not train a Transformer (over 3 epochs its validation
perplexity went 182 -> 345 -> 235), so this file has its own optimiser: AdamW at lr
3e-2 (decoupled decay 0.01, gradient norm clipped at 1), a linear warm-up over 30 steps
and a cosine decay to a tenth over the 3 epochs (429 steps), no NT-ASGD averaging.
Valid perplexity 20.6 -> 18.4 -> 17.2 (test 16.4; the chain's true perplexity is 13.1,
the training text's unigram perplexity 47.4).

Learning rate probed on a busy 2-core CPU, valid ppl after epochs 1 / 3 (the first
four with random window lengths up to bptt + 10 and a decay over 375 steps): 3e-3
29.0 / 23.5; 1e-2 22.1 / 18.6; 3e-2 21.0 / 16.8; 1e-1 26.3 / 18.8; with windows of at
most 20 tokens: 1e-2 21.8 / 18.6, 3e-2 20.7 / 17.3.

    mos-jax train --config configs/tiny_transformer.py
"""

from pathlib import Path

from mos_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("tiny.py"))
    c.data.max_seq_len_delta = 0  # windows of at most bptt = 20 tokens, its whole context
    c.model.encoder = "transformer"
    c.model.n_heads = 2
    c.model.d_model = 0  # = emsize
    c.model.d_ff = 0  # = 4 d_model
    c.model.attn_dropout = 0.0
    c.model.resid_dropout = 0.1
    c.optim.name = "adamw"
    c.optim.lr = 3e-2
    c.optim.wdecay = 0.01
    c.optim.clip = 1.0
    c.optim.asgd = False  # no NT-ASGD averaging for Adam
    c.optim.warmup_steps = 30
    c.optim.decay_steps = 430
    c.optim.min_lr_ratio = 0.1
    c.finetune.lr = 3e-3  # a tenth of the peak (configs/tiny_transformer_finetune.py)
    return c
