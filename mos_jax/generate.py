"""Sampling text from a trained language model.

`sample` feeds a prompt through the model (one forward pass over all its words, no
dropout, the carry starting from zeros), then draws `n_words` words one after the other,
each from `softmax(log p(. | history) / temperature)` over the full vocabulary, the
drawn word fed back as the next input. The whole loop is one jitted `jax.lax.scan`, so
a sample costs one compiled program per (model, prompt length, length) and no Python
work per word. The Transformer generates with a key/value cache
(`Transformer.generation_state`): each word costs one position, not the whole prefix.

Words and ids convert through the corpus (`Corpus.encode` splits a prompt on whitespace
and names any word outside the vocabulary; `Corpus.decode`); `render` joins words into
text, `<eos>` as a line break.
"""

from __future__ import annotations

import functools
import time
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mos_jax import model as model_lib
from mos_jax.data import EOS
from mos_jax.errors import ConfigError, DataError
from mos_jax.model import ModelConfig, Params


def render(words: Iterable[str]) -> str:
    """Words joined by spaces, each `<eos>` a line break (no space around it)."""
    lines, line = [], []
    for w in words:
        if w == EOS:
            lines.append(" ".join(line))
            line = []
        else:
            line.append(w)
    lines.append(" ".join(line))
    return "\n".join(lines)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _sample(config: ModelConfig, params: Params, prompt: jax.Array, n_words: int,
            temperature: jax.Array, key: jax.Array):
    """Words [n_words, B] after `prompt` [P, B], and their log-probabilities at T = 1."""
    keys = jax.random.split(key, n_words)

    def draw(k, logp):  # logp [B, V] -> word [B], its log-probability [B]
        word = jax.random.categorical(k, logp / temperature, axis=-1).astype(jnp.int32)
        return word, jnp.take_along_axis(logp, word[:, None], axis=-1)[:, 0]

    # the zero carry (LSTM) or an empty key/value cache for every position (Transformer)
    carry = config.encoder_cls.generation_state(config, prompt.shape[1],
                                                prompt.shape[0] + n_words)
    out = model_lib.apply(config, params, prompt, carry, None, return_logprobs=True)

    first, first_logp = draw(keys[0], out.logprobs[-1])

    def step(state, k):
        carry, word = state
        out = model_lib.apply(config, params, word[None, :], carry, None,
                              return_logprobs=True)
        nxt, logp = draw(k, out.logprobs[0])
        return (out.carry, nxt), (nxt, logp)

    _, (rest, rest_logp) = jax.lax.scan(step, (out.carry, first), keys[1:])
    words = jnp.concatenate([first[None], rest])
    return words, jnp.concatenate([first_logp[None], rest_logp])


def sample(model_config: ModelConfig, params: Params, prompt_ids: Sequence[int],
           n_words: int, *, temperature: float = 1.0, seed: int = 0,
           num_samples: int | None = None, return_logprobs: bool = False,
           timings: dict | None = None):
    """Sample `n_words` words that follow `prompt_ids`.

    Args:
      prompt_ids: at least one word id; the model reads them all before the first
        draw (the carry starts from zeros, so the prompt is the whole history).
      temperature: > 0; the log-probabilities are divided by it before each draw, so
        below 1 sharpens the distribution (towards the most likely word, the greedy
        path) and above 1 flattens it.
      seed: the PRNG seed; the same seed, prompt and model give the same words.
      num_samples: None for one sample `[n_words]`, else `num_samples` independent
        samples `[num_samples, n_words]` drawn in parallel.
      return_logprobs: also return `log p(word | history)` of every sampled word under
        the model itself (temperature 1), same shape as the ids, float32.
      timings: when given, receives `compile_seconds` and `sample_seconds`.

    The model runs without dropout; its matmuls use `model_config.compute_dtype`.

    Returns:
      int32 ids, or `(ids, logprobs)` with `return_logprobs`.
    """
    prompt = np.asarray(prompt_ids, dtype=np.int32).reshape(-1)
    if prompt.size == 0:
        raise ConfigError("the prompt is empty: give at least one word to start from")
    if np.any(prompt < 0) or np.any(prompt >= model_config.vocab_size):
        raise DataError(f"prompt ids must lie in [0, {model_config.vocab_size}), got "
                        f"{prompt.min()}..{prompt.max()}")
    if int(n_words) < 1:
        raise ConfigError(f"the number of words to sample must be at least 1, got "
                          f"{n_words}")
    temperature = float(temperature)
    if not temperature > 0 or not np.isfinite(temperature):
        raise ConfigError(f"the temperature must be a positive number, got {temperature} "
                          "(small values approach the most likely words, 1 samples the "
                          "model's own distribution)")
    batch = 1 if num_samples is None else int(num_samples)
    if batch < 1:
        raise ConfigError(f"num_samples must be at least 1, got {num_samples}")
    inputs = jnp.asarray(np.repeat(prompt[:, None], batch, axis=1))
    args = (model_config, params, inputs, int(n_words), jnp.float32(temperature),
            jax.random.key(seed))
    if timings is None:
        words, logp = _sample(*args)
    else:  # compile apart, to time the sampling alone
        start = time.perf_counter()
        compiled = _sample.lower(*args).compile()
        compiled_at = time.perf_counter()
        words, logp = jax.block_until_ready(compiled(*args[1:3], *args[4:]))
        timings["compile_seconds"] = compiled_at - start
        timings["sample_seconds"] = time.perf_counter() - compiled_at
    words, logp = np.asarray(words).T, np.asarray(logp).T  # [B, n_words]
    if num_samples is None:
        words, logp = words[0], logp[0]
    return (words, logp) if return_logprobs else words
