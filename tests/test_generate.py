"""Sampling text (mos_jax.generate) and the `mos-jax generate` command."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax import cli, data, generate, model, train
from mos_jax.errors import ConfigError, DataError, MosJaxError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
V = 20
NO_DROPOUT = dict(dropout=0.0, dropouth=0.0, dropouti=0.0, dropoute=0.0, dropoutl=0.0,
                  wdrop=0.0)
jit_apply = jax.jit(model.apply, static_argnums=0, static_argnames="return_logprobs")
# 99.99% quantile of chi-square with V - 1 = 19 degrees of freedom.
CHI2_19 = 50.8


def make(scale=1.0, bias_scale=0.0, seed=0):
    """A tiny MoS model; `scale` multiplies every weight, plus a random decoder bias."""
    config = model.ModelConfig(vocab_size=V, emsize=8, nhid=12, nhidlast=10, nlayers=2,
                               head="mos", n_experts=3, **NO_DROPOUT)
    params = model.init_params(config, jax.random.key(seed))
    params = jax.tree_util.tree_map(lambda x: x * scale, params)
    bias = bias_scale * jax.random.normal(jax.random.key(seed + 1), (V,))
    params["head"]["decoder_bias"] = params["head"]["decoder_bias"] + bias
    return config, params


def logprobs_after(config, params, words):
    """log p(. | words) [V] and the carry, in one forward pass from zeros."""
    out = jit_apply(config, params, jnp.asarray(np.asarray(words)[:, None]),
                    model.init_carry(config, 1), return_logprobs=True)
    return np.asarray(out.logprobs[-1, 0], np.float64), out.carry


def step(config, params, word, carry):
    out = jit_apply(config, params, jnp.asarray([[word]]), carry, return_logprobs=True)
    return np.asarray(out.logprobs[0, 0], np.float64), out.carry


def chi2(counts, p):
    expected = counts.sum() * p
    return float(np.sum((counts - expected) ** 2 / expected))


PROMPT = [3, 1, 4, 1, 5]


def test_same_seed_same_words_other_seed_other_words():
    config, params = make()
    a = generate.sample(config, params, PROMPT, 25, seed=7)
    assert a.shape == (25,) and a.dtype == np.int32
    assert a.min() >= 0 and a.max() < V
    np.testing.assert_array_equal(a, generate.sample(config, params, PROMPT, 25, seed=7))
    assert not np.array_equal(a, generate.sample(config, params, PROMPT, 25, seed=8))
    many = generate.sample(config, params, PROMPT, 25, seed=7, num_samples=4)
    assert many.shape == (4, 25)
    assert len({tuple(row) for row in many}) == 4  # independent samples


def test_each_step_is_scored_on_the_carry_of_the_sampled_history():
    """The returned log-probs equal a plain loop of model.apply over the same words."""
    config, params = make(scale=2.0)
    ids, logp = generate.sample(config, params, PROMPT, 12, temperature=1.3, seed=3,
                                return_logprobs=True)
    dist, carry = logprobs_after(config, params, PROMPT)
    for t, word in enumerate(ids):
        assert logp[t] == pytest.approx(dist[word], abs=1e-5)
        dist, carry = step(config, params, word, carry)


def test_near_zero_temperature_is_the_greedy_path():
    config, params = make(scale=3.0)
    got = generate.sample(config, params, PROMPT, 15, temperature=1e-6, seed=0)
    dist, carry = logprobs_after(config, params, PROMPT)
    greedy = []
    for _ in range(15):
        word = int(np.argmax(dist))
        greedy.append(word)
        dist, carry = step(config, params, word, carry)
    np.testing.assert_array_equal(got, greedy)
    # Any seed: the noise cannot beat the scaled gaps.
    np.testing.assert_array_equal(
        generate.sample(config, params, PROMPT, 15, temperature=1e-6, seed=99), greedy)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_first_word_frequencies_follow_the_tempered_distribution(temperature):
    config, params = make(scale=2.0, bias_scale=1.0)
    n = 20_000
    first = generate.sample(config, params, PROMPT, 1, temperature=temperature, seed=5,
                            num_samples=n)[:, 0]
    counts = np.bincount(first, minlength=V)
    dist, _ = logprobs_after(config, params, PROMPT)
    tempered = np.exp(dist / temperature)
    tempered /= tempered.sum()
    assert chi2(counts, tempered) < CHI2_19
    if temperature != 1.0:  # and the test can tell the temperature apart
        assert chi2(counts, np.exp(dist)) > 10 * CHI2_19


def test_a_bias_only_model_draws_every_word_from_softmax_of_the_bias():
    """Zero weights but the decoder bias: every step's distribution is softmax(b)."""
    config, params = make(scale=0.0)
    bias = np.random.default_rng(0).standard_normal(V).astype(np.float32)
    params["head"]["decoder_bias"] = jnp.asarray(bias)
    words = generate.sample(config, params, [0], 50, seed=1, num_samples=400)
    p = np.exp(bias - bias.max())
    p /= p.sum()
    assert chi2(np.bincount(words.ravel(), minlength=V), p) < CHI2_19
    # Per position as well (here the 50th word: the carry changes nothing).
    assert chi2(np.bincount(words[:, -1], minlength=V), p) < CHI2_19


def vocab_corpus(vocab, name="the corpus"):
    """A corpus that is only a vocabulary: what a prompt is encoded with."""
    empty = np.zeros(0, np.int32)
    return data.Corpus(name, tuple(vocab), empty, empty, empty)


def test_words_and_ids():
    corpus = vocab_corpus(("<eos>", "the", "cat", "sat", "<unk>"))
    np.testing.assert_array_equal(corpus.encode(" the  cat\tsat "), [1, 2, 3])
    np.testing.assert_array_equal(corpus.encode(["<unk>", "<eos>"]), [4, 0])
    assert corpus.encode(" the  cat\tsat ").dtype == np.int32
    assert corpus.decode(np.array([1, 2, 0, 3])) == ["the", "cat", "<eos>", "sat"]
    assert generate.render(["the", "cat", "<eos>", "sat", "<eos>"]) == "the cat\nsat\n"
    assert generate.render([]) == ""


def test_unknown_prompt_words_are_named():
    corpus = vocab_corpus(("<eos>", "the", "cat", "<unk>"), "ptb")
    with pytest.raises(DataError) as e:
        corpus.encode("the dog chased the cat mouse", what="prompt word")
    message = str(e.value)
    assert message.startswith("prompt word(s) not in the 4-word vocabulary of ptb")
    assert isinstance(e.value, MosJaxError)
    assert "'dog', 'chased', 'mouse'" in message and "ptb" in message and "<unk>" in message
    assert "'the'" not in message.split("e.g.")[0] and "\n" not in message


def test_argument_errors():
    config, params = make()
    with pytest.raises(ConfigError, match="temperature"):
        generate.sample(config, params, PROMPT, 5, temperature=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        generate.sample(config, params, PROMPT, 5, temperature=float("nan"))
    with pytest.raises(ConfigError, match="empty"):
        generate.sample(config, params, [], 5)
    with pytest.raises(ConfigError, match="at least 1"):
        generate.sample(config, params, PROMPT, 0)
    with pytest.raises(DataError, match="prompt ids"):
        generate.sample(config, params, [V], 5)


# ------------------------------------------------------------------ the command

def test_generate_command(tiny_run, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "sample.txt"
    argv = ["generate", "--workdir", str(tiny_run), "--prompt", "w3 w7", "--words", "20",
            "--seed", "4", "--temperature", "0.8"]
    assert cli.main(argv + ["--out", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.out.rstrip("\n")
    stats = json.loads(captured.err.strip().splitlines()[-1])
    words = text.split()
    assert len(words) == 22 and words[:2] == ["w3", "w7"]  # no <eos> in this corpus
    assert out.read_text() == text + "\n"
    assert stats["words"] == 20 and stats["prompt_words"] == 2
    assert stats["words_per_s"] > 0 and stats["seconds"] > 0 and stats["sample_ppl"] > 1
    # The library with the same seed gives the same words.
    _, corpus, config, params = train.load_best(tiny_run)
    ids = generate.sample(config, params, corpus.encode(["w3", "w7"]), 20,
                          temperature=0.8, seed=4)
    assert words[2:] == corpus.decode(ids)
    # Without a prompt (no <eos> in the synthetic vocabulary): the first train word.
    assert cli.main(["generate", "--workdir", str(tiny_run), "--words", "5"]) == 0
    words = capsys.readouterr().out.split()
    assert len(words) == 6 and words[0] == corpus.vocab[corpus.train[0]]


def test_generate_command_errors(tiny_run, capsys):
    capsys.readouterr()
    base = ["generate", "--workdir", str(tiny_run)]
    assert cli.main(base + ["--prompt", "w3 cat w7 dog"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    assert "'cat', 'dog'" in err and "vocabulary" in err
    assert cli.main(base + ["--temperature", "0"]) == 2
    assert "--temperature" in capsys.readouterr().err
    assert cli.main(base + ["--words", "0"]) == 2
    assert "--words" in capsys.readouterr().err
    # The placement: refused in one line naming the flag given, before any compile.
    for flags, named in ((["--model-shards", "3"], "--model-shards 3 does not divide"),
                         (["--model-shards", "0"], "--model-shards must be at least 1"),
                         (["--num-devices", "2"], "asked for 2 devices (--num-devices)")):
        assert cli.main(base + flags) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1, err
        assert named in err and "parallel.mesh" not in err, err
