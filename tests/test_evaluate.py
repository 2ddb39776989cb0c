"""The carried-window scan (`evaluate.scan_windows`) against a step-by-step loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax import batching, evaluate, model, parallel
from mos_jax.batching import batchify, make_windows

CONFIG = model.ModelConfig(vocab_size=13, emsize=4, nhid=6, nhidlast=4, nlayers=2,
                           n_experts=3)
B, BPTT = 3, 5
jit_apply = jax.jit(model.apply, static_argnums=0)


@pytest.fixture(scope="module")
def setup():
    params = model.init_params(CONFIG, jax.random.key(7))
    ids = np.random.default_rng(3).integers(0, 13, size=B * 23 + 2).astype(np.int32)
    rows = batchify(ids, B)  # 23 rows, 22 targets a column: windows 5, 5, 5, 5, 2
    # One time step per call of model.apply, the carry passed on: no windows at all.
    carry, want = model.init_carry(CONFIG, B), []
    for t in range(len(rows) - 1):
        out = jit_apply(CONFIG, params, jnp.asarray(rows[t:t + 1]), carry,
                        jnp.asarray(rows[t + 1:t + 2]))
        carry = out.carry
        want.append(np.asarray(out.target_logprobs[0]))
    return params, ids, np.stack(want), carry


def test_one_window_per_call_equals_the_step_by_step_loop(setup):
    params, ids, want, want_carry = setup
    plan = parallel.local_plan(1, "none")
    score = evaluate.window_scorer(plan, CONFIG)
    calls = []

    def fn(carry, inputs, targets, length):
        assert inputs.shape == (BPTT, B) and isinstance(length, int)
        calls.append(length)
        logp, carry = score(params, carry, inputs, targets, length)
        return carry, logp

    done = []
    carry, rows = evaluate.scan_windows(fn, model.init_carry(CONFIG, B),
                                        make_windows(ids, B, BPTT),
                                        progress=lambda d, n: done.append((d, n)))
    assert calls == [5, 5, 5, 5, 2]
    assert done == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert rows.shape == want.shape == (22, B)
    np.testing.assert_allclose(rows, want, atol=1e-5, rtol=0)
    for got, ref in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(want_carry)):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # token_logprobs is that scan (with its progress in rows).
    progress = []
    logp = evaluate.token_logprobs(CONFIG, params, ids, B, BPTT,
                                   progress=lambda d, n: progress.append((d, n)))
    np.testing.assert_allclose(logp, want, atol=1e-5, rtol=0)
    assert progress == [(5, 22), (10, 22), (15, 22), (20, 22), (22, 22)]


def test_chunks_of_windows_skip_padding_windows_and_keep_the_real_rows(setup):
    params, ids, want, want_carry = setup
    score = evaluate.window_scorer(parallel.local_plan(1, "none"), CONFIG)
    w = make_windows(ids, B, BPTT, multiple=4)  # 5 real windows and 3 empty ones
    assert list(w.lengths) == [5, 5, 5, 5, 2, 0, 0, 0]
    seen = []

    def fn(carry, inputs, targets, lengths):  # a chunk: [2, T, B], lengths [2]
        assert inputs.shape == (2, BPTT, B) and lengths.shape == (2,)
        seen.append(list(lengths))
        outs = []
        for k in range(2):
            logp, new = score(params, jax.tree_util.tree_map(jnp.copy, carry), inputs[k],
                              targets[k], int(lengths[k]))
            carry = new if lengths[k] else carry
            outs.append(logp)
        return carry, jnp.stack(outs)

    done = []
    carry, rows = evaluate.scan_windows(fn, model.init_carry(CONFIG, B), w, per_call=2,
                                        sync=True, progress=lambda d, n: done.append((d, n)))
    assert seen == [[5, 5], [5, 5], [2, 0], [0, 0]]
    assert done == [(2, 5), (4, 5), (5, 5), (5, 5)]
    np.testing.assert_allclose(rows, want, atol=1e-5, rtol=0)
    for got, ref in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(want_carry)):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_a_function_without_output_returns_no_rows(setup):
    _, ids, _, _ = setup
    w = make_windows(ids, B, BPTT)
    count, rows = evaluate.scan_windows(lambda c, x, y, n: (c + n, None), 0, w)
    assert rows is None and count == 22  # every target row once


def test_the_one_device_plan_compiles_the_plain_jitted_program(setup):
    """A one-device plan adds nothing to what runs: its window scorer lowers to the same
    program (donation included) as `jax.jit` of the window function itself."""
    import re
    params = setup[0]
    carry, x = model.init_carry(CONFIG, B), np.zeros((BPTT, B), np.int32)
    plain = jax.jit(evaluate.score_window, static_argnums=0, donate_argnums=2).lower(
        CONFIG, params, carry, x, x, BPTT).as_text()
    planned = evaluate.window_scorer(parallel.local_plan(1, "none"), CONFIG).lower(
        params, carry, x, x, BPTT).as_text()

    def strip(text):  # function names differ (the plan jits a functools.partial)
        return re.sub(r'@[\w.]+|jit_\w+|"[^"]*"', "", text)
    assert "buffer_donor" in plain or "aliasing_output" in plain
    assert strip(planned) == strip(plain)


@jax.jit
def _slow_step(carry, inputs):
    """Tens of milliseconds of work on the CPU: dispatch returns long before it ends."""
    m = jnp.full((128, 128), 1e-3, jnp.float32)
    carry = jax.lax.fori_loop(0, 40, lambda i, c: jnp.tanh(c @ m + 0.1), carry)
    return carry, carry[:2, :3] + inputs[0, 0]


def _slow_windows(n):
    x = np.zeros((n, 2, 3), np.int32)
    return batching.Windows(x, x, np.full(n, 2))


def test_progress_reports_finished_calls_with_one_call_in_flight():
    """Every reported count has its results ready (checked with `is_ready`, which does
    not wait), and while a call is reported the next one is already dispatched."""
    outs, reports = [], []

    def fn(carry, inputs, targets, length):
        carry, out = _slow_step(carry, inputs)
        outs.append(out)
        return carry, out

    def progress(done, total):
        reports.append((done, total, [o.is_ready() for o in outs[:done]], len(outs)))

    _slow_step(jnp.zeros((128, 128)), jnp.zeros((2, 3), jnp.int32))  # compile first
    _, rows = evaluate.scan_windows(fn, jnp.zeros((128, 128)), _slow_windows(5),
                                    progress=progress)
    assert [r[:2] for r in reports] == [(k, 5) for k in range(1, 6)]
    assert all(all(ready) for _, _, ready, _ in reports)
    assert [r[3] for r in reports] == [2, 3, 4, 5, 5]  # the next call was in flight
    assert rows.shape == (5 * 2, 3)


def test_progress_waits_for_a_donated_carry_before_the_next_call():
    """A call with no output (its carry donated to the next) is reported once its carry
    is ready, before the next call is dispatched (a donated buffer cannot be waited on)."""
    step = jax.jit(lambda c, x: _slow_step(c, x)[0], donate_argnums=0)
    carries, reports = [], []

    def fn(carry, inputs, targets, length):
        carry = step(carry, inputs)
        carries.append(carry)
        return carry, None

    def progress(done, total):
        reports.append((done, len(carries), carries[-1].is_ready()))

    step(jnp.zeros((128, 128)), jnp.zeros((2, 3), jnp.int32))
    carry, rows = evaluate.scan_windows(fn, jnp.zeros((128, 128)), _slow_windows(8),
                                        per_call=2, progress=progress)
    assert rows is None and carry.is_ready()
    assert reports == [(2, 1, True), (4, 2, True), (6, 3, True), (8, 4, True)]
