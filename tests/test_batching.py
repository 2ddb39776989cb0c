"""batchify, windows, random BPTT lengths and buckets."""

import numpy as np
import pytest

import numpy_reference as ref
from mos_jax import batching
from mos_jax.errors import DataError


def test_batchify_by_hand():
    rows = batching.batchify(np.arange(11), 3)
    # n = 3 rows; column j is ids[3j : 3j+3]; the last two ids are dropped.
    assert rows.tolist() == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert rows.dtype == np.int32
    with pytest.raises(DataError, match="at most 5"):
        batching.batchify(np.arange(11), 6)


def test_windows_cut_at_the_end():
    rows = np.arange(10)[:, None]
    x, y = batching.window(rows, 7, 5)
    assert x[:, 0].tolist() == [7, 8] and y[:, 0].tolist() == [8, 9]
    px, py, n = batching.padded_window(rows, 7, 5, 6)
    assert n == 2 and px.shape == (6, 1)
    assert px[:, 0].tolist() == [7, 8, 0, 0, 0, 0] and py[:, 0].tolist() == [8, 9, 0, 0, 0, 0]


def test_seq_len_follows_the_reference_rule():
    rng = np.random.default_rng(0)
    lens = np.array([batching.sample_seq_len(rng, 70, 110) for _ in range(20_000)])
    assert lens.min() >= 5 and lens.max() <= 110
    short = lens < 52  # from the bptt/2 = 35 component (70 - 3.6 sigma)
    assert short.mean() == pytest.approx(0.05, abs=0.006)
    # int() truncates toward zero: the mean of the long component is about 70 - 0.5.
    assert lens[~short].mean() == pytest.approx(69.5, abs=0.15)
    # Same generator state, same draw (the training loop relies on this for resume).
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    assert [batching.sample_seq_len(a, 70, 110) for _ in range(50)] == \
           [batching.sample_seq_len(b, 70, 110) for _ in range(50)]


def test_default_buckets_cover_all_lengths():
    buckets = batching.default_buckets(70, 110)
    assert buckets == (40, 56, 64, 72, 80, 88, 110)
    for length in range(1, 111):
        b = batching.bucket_for(length, buckets)
        assert b >= length and all(c < length for c in buckets if c < b)
    assert len(batching.default_buckets(70, 90)) <= 8


def test_train_windows_tile_the_stream():
    n_rows = 5000
    wins = list(batching.train_windows(n_rows, np.random.default_rng(1), 70, 110))
    assert wins[0].start == 0
    for a, b in zip(wins, wins[1:]):
        assert b.start == a.start + a.seq_len  # advance by the drawn length
        assert a.length == a.seq_len
    last = wins[-1]
    assert last.start + last.length == n_rows - 1  # the last target is the last row
    assert {w.padded for w in wins} <= set(batching.default_buckets(70, 110))
    assert all(w.length <= w.padded for w in wins)


@pytest.mark.parametrize("n_ids, batch, bptt, max_windows, multiple", [
    (83, 3, 8, None, 1), (83, 3, 8, None, 4), (60, 2, 5, 3, 1), (61, 1, 5, None, 128)])
def test_make_windows_are_the_padded_evaluation_windows(n_ids, batch, bptt, max_windows,
                                                        multiple):
    ids = np.arange(n_ids, dtype=np.int32) + 1  # no zeros: padding is visible
    rows = batching.batchify(ids, batch)
    want = [batching.padded_window(rows, i, n, bptt)
            for i, n in ref.eval_windows(len(rows), bptt)][:max_windows]
    w = batching.make_windows(ids, batch, bptt, max_windows, multiple)
    n_padded = -(-len(want) // multiple) * multiple
    assert w.inputs.shape == w.targets.shape == (n_padded, bptt, batch)
    assert list(w.lengths) == [n for _, _, n in want] + [0] * (n_padded - len(want))
    for k, (x, y, _) in enumerate(want):
        np.testing.assert_array_equal(w.inputs[k], x)
        np.testing.assert_array_equal(w.targets[k], y)
    assert not w.inputs[len(want):].any() and not w.targets[len(want):].any()
    half = w.columns(slice(0, 1))
    np.testing.assert_array_equal(half.inputs, w.inputs[..., :1])
    np.testing.assert_array_equal(half.lengths, w.lengths)


def test_memory_mapped_ids_give_the_same_windows(tmp_path):
    """A corpus read from the id cache (memory-mapped) against the same corpus read
    into memory: `batchify` is a view of the mapped file (nothing copied), and the
    training windows of one host's columns (process 0 of 2), the evaluation windows
    and the sliding windows are equal, and equal to the stretches of the stream that
    each column is (column c of `[n, B]` is `ids[c*n : (c+1)*n]`)."""
    from mos_jax import data
    rng = np.random.default_rng(1)
    d = tmp_path / "corpus"
    d.mkdir()
    for s, n_lines in zip(data.SPLITS, (400, 60, 60)):
        (d / f"{s}.txt").write_text("\n".join(
            " ".join(f"w{i}" for i in rng.integers(0, 300, rng.integers(1, 30)))
            for _ in range(n_lines)) + "\n")
    mapped = data.read_corpus(d, cache_dir=tmp_path / "cache")
    memory = data.read_corpus(d, cache=False)
    assert isinstance(mapped.train, np.memmap) and not isinstance(memory.train, np.memmap)

    batch, bptt = 8, 20
    rows = batching.batchify(mapped.train, batch)
    assert np.shares_memory(rows, mapped.train)  # a view: no copy of the split
    n = len(mapped.train) // batch
    host = slice(0, batch // 2)  # the columns of process 0 of 2
    local, local_mem = rows[:, host], batching.batchify(memory.train, batch)[:, host]
    ids = np.asarray(memory.train)
    for w in batching.train_windows(n, np.random.default_rng(0), bptt, bptt + 20):
        x, y, length = batching.padded_window(local, w.start, w.length, w.padded)
        xm, ym, _ = batching.padded_window(local_mem, w.start, w.length, w.padded)
        np.testing.assert_array_equal(x, xm)
        np.testing.assert_array_equal(y, ym)
        for j, c in enumerate(range(batch)[host]):
            start = c * n + w.start
            np.testing.assert_array_equal(x[:length, j], ids[start:start + length])
            np.testing.assert_array_equal(y[:length, j], ids[start + 1:start + 1 + length])

    for split in ("valid", "test"):
        a = batching.make_windows(mapped.split(split), 4, bptt)
        b = batching.make_windows(memory.split(split), 4, bptt)
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
        # a host's columns only: the same as cutting all and keeping its columns
        for u, v in zip(batching.make_windows(mapped.split(split), 4, bptt,
                                              columns=slice(2, 4)), b.columns(slice(2, 4))):
            np.testing.assert_array_equal(u, v)
        a = batching.sliding_windows(mapped.split(split), 4, bptt, 7)
        b = batching.sliding_windows(memory.split(split), 4, bptt, 7)
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
        a = batching.sliding_windows(mapped.split(split), 4, bptt, 7, slice(0, 2))
        for u, v in zip(a, (b.inputs[..., :2], b.targets[..., :2], b.lengths, b.first)):
            np.testing.assert_array_equal(u, v)
