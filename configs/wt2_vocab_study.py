"""The vocabulary study on WikiText-2: one small 1-layer AWD-LSTM at one width, BPE
vocabularies of several sizes, softmax, MoS, adaptive softmax and adaptive MoS
(`mos-jax study --vocab-sizes`, README "Findings").

The LSTM side of the PTB width study (configs/ptb_study_lstm.py: width 64, MoS with 4
components, light dropout, AdamW at lr 1e-2 with a cosine decay to a tenth) on
WikiText-2 cut into BPE pieces (`data.tokenizer = bpe`; the study sets
`data.vocab_size` to each size). The vocabulary is frequency-ordered for every head
(`data.vocab_order = frequency`), so every head of a cell sees the same ids. Epochs
are validated on the first 40,000 pieces of the validation split; the study's final
perplexity of the best weights is on the whole split, per piece and per word.

    mos-jax study --config configs/wt2_vocab_study.py \
        --config.data.dir ../shared/data/wikitext-2 --vocab-sizes 2000,8000,32000 \
        --heads softmax,mos,adaptive,adaptive_mos --steps 600 --evals 3 \
        --workdir runs/wt2-vocab-study
"""

from pathlib import Path

from mos_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("ptb_study_lstm.py"))
    c.data.dir = "data/wikitext-2"
    c.data.tokenizer = "bpe"
    c.data.vocab_size = 8000
    c.data.vocab_order = "frequency"
    c.optim.warmup_steps = 50
    c.optim.decay_steps = 600
    c.train.steps_per_epoch = 200
    c.train.max_epochs = 3
    c.train.eval_max_tokens = 40000
    return c
