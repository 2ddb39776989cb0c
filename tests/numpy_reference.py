"""An independent float64 NumPy forward pass of the reference AWD-LSTM-MoS.

Written from docs/reference.md section 2 in the reference's own layouts (PyTorch weights [out, in],
gate rows i, f, g, o) and its own arithmetic (mixing in probability space), sharing no
code with mos_jax (but for `true_ppl`, which draws the synthetic chain with
mos_jax.data). Used by the tests as the ground truth.
"""

from __future__ import annotations

import math

import numpy as np


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x, axis=-1):
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def random_state(rng: np.random.Generator, vocab, emsize, nhid, nhidlast, nlayers,
                 n_experts, head="mos", scale=0.5) -> dict[str, np.ndarray]:
    """Random weights under docs/reference.md's names, U(-scale, scale) everywhere."""
    def u(*shape):
        return rng.uniform(-scale, scale, size=shape)

    state = {"encoder.weight": u(vocab, emsize), "decoder.bias": u(vocab)}
    for l in range(nlayers):
        i = emsize if l == 0 else nhid
        h = nhid if l < nlayers - 1 else nhidlast
        state[f"rnns.{l}.weight_ih"] = u(4 * h, i)
        state[f"rnns.{l}.weight_hh"] = u(4 * h, h)
        state[f"rnns.{l}.bias_ih"] = u(4 * h)
        state[f"rnns.{l}.bias_hh"] = u(4 * h)
    if head in ("mos", "moc"):
        state["prior.weight"] = u(n_experts, nhidlast)
        state["latent.weight"] = u(n_experts * emsize, nhidlast)
        state["latent.bias"] = u(n_experts * emsize)
    return state


def nlayers_of(state):
    return sum(1 for k in state if k.endswith(".weight_hh"))


def lstm_layer(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """x [T, B, I]; returns outputs [T, B, H] and the final (h, c)."""
    outs = []
    for t in range(x.shape[0]):
        gates = x[t] @ w_ih.T + b_ih + h @ w_hh.T + b_hh
        i, f, g, o = np.split(gates, 4, axis=-1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        outs.append(h)
    return np.stack(outs), (h, c)


def zero_carry(state, batch):
    return [(np.zeros((batch, state[f"rnns.{l}.weight_hh"].shape[1])),) * 2
            for l in range(nlayers_of(state))]


def encode(state, inputs, carry):
    """Embedding -> LSTM stack, no dropout. Returns last layer output and new carry."""
    x = state["encoder.weight"][inputs]
    new_carry = []
    for l in range(nlayers_of(state)):
        h, c = carry[l]
        x, (h, c) = lstm_layer(x, h, c, state[f"rnns.{l}.weight_ih"],
                               state[f"rnns.{l}.weight_hh"], state[f"rnns.{l}.bias_ih"],
                               state[f"rnns.{l}.bias_hh"])
        new_carry.append((h, c))
    return x, new_carry


def head_probs(state, output, head):
    """Full next-word distribution p [T, B, V] (probability space, as the reference)."""
    emb, bias = state["encoder.weight"], state["decoder.bias"]
    if head == "softmax":
        return softmax(output @ emb.T + bias)
    n_experts = state["prior.weight"].shape[0]
    prior = softmax(output @ state["prior.weight"].T)  # [T, B, E]
    latent = np.tanh(output @ state["latent.weight"].T + state["latent.bias"])
    latent = latent.reshape(*latent.shape[:-1], n_experts, emb.shape[1])  # [T, B, E, D]
    if head == "moc":
        context = (prior[..., None] * latent).sum(axis=-2)
        return softmax(context @ emb.T + bias)
    probs = softmax(latent @ emb.T + bias)  # [T, B, E, V]
    return (prior[..., None] * probs).sum(axis=-2)


def eval_windows(n_rows, bptt):
    """The reference's evaluation windows `(start, length)` of an `n_rows` stream: every
    target once, in windows of `bptt` rows, the last one shorter."""
    return [(i, min(bptt, n_rows - 1 - i)) for i in range(0, n_rows - 1, bptt)]


def token_logprobs(state, ids, batch_size, bptt, head, epsilon=0.0):
    """log(p + epsilon) of every target in the batchified layout [nrows - 1, B].

    epsilon = 1e-8 reproduces the reference's `log(p + 1e-8)`.
    """
    n = len(ids) // batch_size
    rows = np.asarray(ids[: n * batch_size]).reshape(batch_size, n).T
    carry = zero_carry(state, batch_size)
    out = []
    for i, length in eval_windows(n, bptt):
        inputs, targets = rows[i:i + length], rows[i + 1:i + 1 + length]
        output, carry = encode(state, inputs, carry)
        p = head_probs(state, output, head)
        tp = np.take_along_axis(p, targets[..., None], axis=-1)[..., 0]
        out.append(np.log(tp + epsilon))
    return np.concatenate(out)


def regularized_loss(state, inputs, targets, head, alpha, beta):
    """NLL + alpha mean(out^2) + beta mean((out_{t+1} - out_t)^2), no dropout, zero carry."""
    output, _ = encode(state, inputs, zero_carry(state, inputs.shape[1]))
    p = head_probs(state, output, head)
    tp = np.take_along_axis(p, targets[..., None], axis=-1)[..., 0]
    nll = -np.log(tp).mean()
    ar = np.mean(output ** 2)
    tar = np.mean((output[1:] - output[:-1]) ** 2)
    return nll + alpha * ar + beta * tar


def true_ppl(vocab_size, peakedness, seed):
    """The synthetic Markov chain's perplexity: exp of its entropy rate, with the
    stationary law solved for here (not by the code under test)."""
    from mos_jax import data  # the chain's draw only
    chain = data.make_markov_chain(vocab_size, peakedness, seed)
    p = np.exp(chain.log_transition)
    # pi (P - I) = 0 with sum(pi) = 1, as one least-squares system.
    a = np.vstack([(p - np.eye(vocab_size)).T, np.ones(vocab_size)])
    b = np.zeros(vocab_size + 1)
    b[-1] = 1.0
    pi = np.linalg.lstsq(a, b, rcond=None)[0]
    entropy = -np.sum(pi[:, None] * p * np.log(p))
    return math.exp(entropy)
