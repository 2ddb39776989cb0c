"""Sampling text from a trained language model.

`sample` feeds a prompt through the model (one forward pass over all its words, no
dropout, the carry starting from zeros), then draws `n_words` words one after the other,
each from `softmax(log p(. | history) / temperature)` over the full vocabulary, the
drawn word fed back as the next input. The whole loop is one jitted `jax.lax.scan`, so
a sample costs one compiled program per (model, prompt length, length) and no Python
work per word. With a placement plan (`mos_jax.parallel`) the loop is one mapped
program: samples split over the data axis, the vocabulary over the model axis, the
same words on every layout. The Transformer generates with a key/value cache
(`Transformer.generation_state`): each word costs one position, not the whole prefix.

Words and ids convert through the corpus (`Corpus.encode` splits a prompt on whitespace
and names any word outside the vocabulary; `Corpus.decode`); `render` joins words into
text, `<eos>` as a line break.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mos_jax import model as model_lib
from mos_jax import parallel
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


def _draw(key: jax.Array, logp: jax.Array, temperature: jax.Array, columns: int,
          first: jax.Array | int):
    """Words [B] drawn from `softmax(logp / temperature)` [B, V], and their
    log-probabilities at T = 1.

    `jax.random.categorical` itself, column by column of a `[columns, V]` batch whose
    columns `first .. first + B` these are: the Gumbel noise of the whole batch is
    drawn from `key` (every device of a mapped body draws the same) and this block's
    rows of it taken, so that each column's word depends on the key, `columns` and
    its global index, never on how the columns are split over devices."""
    noise = jax.random.gumbel(key, (columns, logp.shape[-1]), logp.dtype)
    if logp.shape[0] != columns:
        noise = jax.lax.dynamic_slice_in_dim(noise, first, logp.shape[0], axis=0)
    word = jnp.argmax(noise + logp / temperature, axis=-1).astype(jnp.int32)
    return word, jnp.take_along_axis(logp, word[:, None], axis=-1)[:, 0]


def _sample_body(config: ModelConfig, n_words: int, columns: int, data_axis: str | None,
                 params: Params, prompt: jax.Array, temperature: jax.Array,
                 key_data: jax.Array):
    """Words [n_words, B] after `prompt` [P, B] (this device's B of `columns` columns,
    split over `data_axis`), and their log-probabilities at T = 1. `key_data`: the
    seed's key as `jax.random.key_data` (a plain array, placed like any other)."""
    keys = jax.random.split(jax.random.wrap_key_data(key_data), n_words)
    first = 0 if data_axis is None else jax.lax.axis_index(data_axis) * prompt.shape[1]
    draw = functools.partial(_draw, temperature=temperature, columns=columns, first=first)

    # the zero carry (LSTM) or an empty key/value cache for every position (Transformer)
    carry = config.encoder_cls.generation_state(config, prompt.shape[1],
                                                prompt.shape[0] + n_words)
    out = model_lib.apply(config, params, prompt, carry, None, return_logprobs=True)

    first_word, first_logp = draw(keys[0], out.logprobs[-1])

    def step(state, k):
        carry, word = state
        out = model_lib.apply(config, params, word[None, :], carry, None,
                              return_logprobs=True)
        nxt, logp = draw(k, out.logprobs[0])
        return (out.carry, nxt), (nxt, logp)

    _, (rest, rest_logp) = jax.lax.scan(step, (out.carry, first_word), keys[1:])
    words = jnp.concatenate([first_word[None], rest])
    return words, jnp.concatenate([first_logp[None], rest_logp])


@functools.lru_cache(maxsize=16)
def _sampler(plan: parallel.Plan, config: ModelConfig, n_words: int, columns: int):
    """`_sample_body` mapped by `plan`: `(params, prompt [P, B], temperature, key_data) ->
    (words, logprobs)` `[n_words, B]`, the columns split over the data axis; one
    program per (plan, model, prompt length, length, columns)."""
    data_axis = plan.axis_name if plan.n_data > 1 else None
    body = functools.partial(_sample_body, config, n_words, columns, data_axis)
    return plan.map(body, in_axes=(None, 1, None, None), out_axes=(1, 1))


def sample(model_config: ModelConfig, params: Params, prompt_ids: Sequence[int],
           n_words: int, *, temperature: float = 1.0, seed: int = 0,
           num_samples: int | None = None, return_logprobs: bool = False,
           timings: dict | None = None, plan: parallel.Plan | None = None,
           log: Callable[[str], None] | None = None):
    """Sample `n_words` words that follow `prompt_ids`.

    Args:
      prompt_ids: at least one word id; the model reads them all before the first
        draw (the carry starts from zeros, so the prompt is the whole history).
      temperature: > 0; the log-probabilities are divided by it before each draw, so
        below 1 sharpens the distribution (towards the most likely word, the greedy
        path) and above 1 flattens it.
      seed: the PRNG seed; the same seed, prompt and model give the same words, on
        any placement plan.
      num_samples: None for one sample `[n_words]`, else `num_samples` independent
        samples `[num_samples, n_words]` drawn in parallel.
      return_logprobs: also return `log p(word | history)` of every sampled word under
        the model itself (temperature 1), same shape as the ids, float32.
      timings: when given, receives `compile_seconds` and `sample_seconds`.
      plan: the placement (`mos_jax.parallel`; default: one device). The samples split
        over its data axis when their number divides by it (else the whole sampling
        runs on one device, with a note to `log`), the vocabulary-sized parameters
        over its model axis; every step's distribution is gathered whole on each
        device of a model group, which all draw the same word. Every layout gives the
        words and log-probabilities of one device.

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
    plan = parallel.resolve(plan)
    plan = plan.for_batch(batch, log, message=(
        f"sampling {batch} column{'s' if batch > 1 else ''} does not split over "
        f"{plan.columns_over()}: it runs on one device"))
    inputs = plan.feed_batch(np.repeat(prompt[:, None], batch, axis=1)[
        :, plan.host_slice(batch)], 1)
    run = _sampler(plan, model_config, int(n_words), batch)
    args = (plan.place_params(params), inputs,
            plan.place(jnp.float32(temperature), plan.replicated),
            plan.place(jax.random.key_data(jax.random.key(seed)), plan.replicated))
    if timings is None:
        words, logp = run(*args)
    else:  # compile apart, to time the sampling alone
        start = time.perf_counter()
        compiled = run.lower(*args).compile()
        compiled_at = time.perf_counter()
        words, logp = jax.block_until_ready(compiled(*args))
        timings["compile_seconds"] = compiled_at - start
        timings["sample_seconds"] = time.perf_counter() - compiled_at
    words = plan.gather_columns(plan.fetch(words, 1)).T  # [B, n_words]
    logp = plan.gather_columns(plan.fetch(logp, 1)).T
    if num_samples is None:
        words, logp = words[0], logp[0]
    return (words, logp) if return_logprobs else words
