"""Batching: `batchify`, BPTT windows, random window lengths rounded up to buckets.

Layouts are time-major: a batchified stream is `[n, B]`, column j the contiguous stretch
`ids[j*n : (j+1)*n]` (docs/reference.md section 1). A window at row i of length L has inputs
`rows[i : i+L]` and targets `rows[i+1 : i+1+L]`, with L cut to `n - 1 - i` at the end.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from mos_jax.errors import DataError


def batchify(ids: np.ndarray, batch_size: int) -> np.ndarray:
    """`[n, B]` int32 with `n = len(ids) // B`; the remainder is dropped.

    A view of `ids` when they are int32 (a copy otherwise): column j is the contiguous
    stretch `ids[j*n : (j+1)*n]`, so taking some columns (a host's, `Plan.local_columns`)
    and then windows of rows reads only those stretches, never the whole stream: with
    memory-mapped ids (the id cache), only their pages are read.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise DataError(f"batchify expects a 1-D id stream, got shape {ids.shape}")
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    n = len(ids) // batch_size
    if n < 2:
        raise DataError(
            f"a stream of {len(ids):,} tokens is too short for batch size {batch_size}: "
            f"each of the {batch_size} columns needs at least 2 tokens (an input and a "
            f"target). Use a batch size of at most {max(len(ids) // 2, 1)}.")
    rows = ids[: n * batch_size].reshape(batch_size, n).T
    return rows if rows.dtype == np.int32 else rows.astype(np.int32)


def window(rows: np.ndarray, i: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs `rows[i:i+L]` and targets `rows[i+1:i+1+L]`, L cut at the stream's end."""
    length = min(length, len(rows) - 1 - i)
    if length < 1:
        raise DataError(f"no window starts at row {i} of a {len(rows)}-row stream")
    return rows[i:i + length], rows[i + 1:i + 1 + length]


def padded_window(rows: np.ndarray, i: int, length: int, padded_length: int
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """`window(rows, i, length)` zero-padded at the end to `padded_length` rows.

    Returns inputs and targets of shape `[padded_length, B]` and the true length; the
    model masks the padded steps (they neither score nor advance the carry).
    """
    inputs, targets = window(rows, i, length)
    length = len(inputs)
    if length > padded_length:
        raise ValueError(f"window of {length} rows does not fit in {padded_length}")
    pad = ((0, padded_length - length), (0, 0))
    return np.pad(inputs, pad), np.pad(targets, pad), length


class Windows(NamedTuple):
    """A stream cut into windows: inputs/targets `[n, bptt, B]`, true lengths `[n]`.

    Window k holds rows `k * bptt ...` of the stream; its first `lengths[k]` rows are
    real, the rest zero padding. Windows of length 0 (after the real ones) only pad the
    count to a multiple of a chunk.
    """

    inputs: np.ndarray
    targets: np.ndarray
    lengths: np.ndarray

    def columns(self, cols: slice) -> "Windows":
        """The windows of columns `cols` only (a host's share of the batch)."""
        return Windows(self.inputs[..., cols], self.targets[..., cols], self.lengths)


def cut_windows(inputs: np.ndarray, targets: np.ndarray, bptt: int,
                max_windows: int | None = None, multiple: int = 1) -> Windows:
    """Consecutive windows of `bptt` rows of aligned `inputs` and `targets` `[n, B]`.

    Every row is covered once (at most `max_windows` windows); the last window holds
    what is left, its length recorded, zero-padded. The number of windows is rounded up
    to a multiple of `multiple` with empty (length 0) windows.
    """
    n_rows, batch_size = inputs.shape
    n = -(-n_rows // bptt)
    if max_windows:
        n = min(n, max_windows)
    n_padded = -(-n // multiple) * multiple
    total = n_padded * bptt
    x = np.zeros((total, batch_size), np.int32)
    y = np.zeros((total, batch_size), np.int32)
    used = min(n * bptt, n_rows)
    x[:used] = inputs[:used]
    y[:used] = targets[:used]
    lengths = np.zeros(n_padded, np.int32)
    lengths[:n] = bptt
    lengths[n - 1] = used - (n - 1) * bptt
    shape = (n_padded, bptt, batch_size)
    return Windows(x.reshape(shape), y.reshape(shape), lengths)


def make_windows(ids: np.ndarray, batch_size: int, bptt: int,
                 max_windows: int | None = None, multiple: int = 1,
                 columns: slice | None = None) -> Windows:
    """Batchify `ids` and cut the rows into consecutive windows of `bptt` rows.

    Every target is covered once (inputs `rows[:-1]`, targets `rows[1:]`): the same
    windows of `bptt` rows as the reference's evaluation loop, as arrays. See
    `cut_windows`. `columns` (a host's, `Plan.host_slice`): the windows of those
    columns only, `make_windows(...).columns(columns)` without reading the others.
    """
    rows = batchify(ids, batch_size)
    if columns is not None:
        rows = rows[:, columns]
    return cut_windows(rows[:-1], rows[1:], bptt, max_windows, multiple)


class SlidingWindows(NamedTuple):
    """Overlapping windows of a stream for an encoder without carry.

    inputs/targets `[K, C, B]` (zero-padded), `lengths` `[K]` the real rows of each,
    `first` `[K]` the first row each window scores: rows `first[k]:lengths[k]` of
    window k are the targets it scores, and the windows' scored rows, in order, are
    every target of the stream exactly once.
    """

    inputs: np.ndarray
    targets: np.ndarray
    lengths: np.ndarray
    first: np.ndarray


def sliding_windows(ids: np.ndarray, batch_size: int, context: int, stride: int,
                    columns: slice | None = None) -> SlidingWindows:
    """Batchify `ids` and cut windows of `context` rows, one every `stride` rows
    (of `columns` only, when given: a host's share, the others never read).

    Window k starts at row `k * stride`. The first window scores all its targets;
    every later one only its last `stride` (rows `context - stride` on), so each
    target is scored once, and every target but those of the first window sees at
    least `context - stride` earlier tokens (its own input included, more than that).
    The last window may be short (`lengths`); windows stop once the stream is covered.
    """
    if not 1 <= stride <= context:
        raise DataError(f"a sliding window needs 1 <= stride <= context, got stride "
                        f"{stride} and context {context}: lower model.eval_stride (0: "
                        "half the window)")
    rows = batchify(ids, batch_size)
    if columns is not None:
        rows = rows[:, columns]
    inputs, targets = rows[:-1], rows[1:]
    n, batch_size = inputs.shape
    starts = [0] + list(range(stride, max(n - context, 0) + stride, stride))
    starts = [s for s in starts if s == 0 or s + context - stride < n]
    k = len(starts)
    x = np.zeros((k, context, batch_size), np.int32)
    y = np.zeros((k, context, batch_size), np.int32)
    lengths = np.zeros(k, np.int32)
    first = np.zeros(k, np.int32)
    for i, s in enumerate(starts):
        length = min(context, n - s)
        x[i, :length], y[i, :length] = inputs[s:s + length], targets[s:s + length]
        lengths[i], first[i] = length, 0 if i == 0 else context - stride
    return SlidingWindows(x, y, lengths, first)


def sample_seq_len(rng: np.random.Generator, bptt: int, max_len: int) -> int:
    """The reference's random BPTT length (docs/reference.md section 3).

    `base = bptt` with probability 0.95, else `bptt / 2`; `max(5, int(normal(base, 5)))`
    (int truncates), capped at `max_len`.
    """
    base = bptt if rng.random() < 0.95 else bptt / 2
    return min(max(5, int(rng.normal(base, 5))), max_len)


def default_buckets(bptt: int, max_len: int, multiple: int = 8) -> tuple[int, ...]:
    """A few padded lengths covering 5..max_len, dense near `bptt` where most land.

    For bptt 70, max_len 110: (40, 56, 64, 72, 80, 88, 110).
    """
    fractions = (0.5, 0.75, 0.875, 1.0, 1.125, 1.25)
    sizes = {min(-(-int(np.ceil(f * bptt)) // multiple) * multiple, max_len)
             for f in fractions}
    sizes.add(max_len)
    return tuple(sorted(s for s in sizes if s >= 1))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length`."""
    for b in buckets:
        if length <= b:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}")


@dataclasses.dataclass(frozen=True)
class TrainWindow:
    """One training step's window.

    `seq_len` is the drawn length (it scales the step's lr, as in the reference);
    `length` is the rows actually used (cut at the stream's end); `padded` its bucket.
    """

    start: int
    seq_len: int
    length: int
    padded: int


def train_windows(n_rows: int, rng: np.random.Generator, bptt: int, max_len: int,
                  buckets: Sequence[int] | None = None, start: int = 0
                  ) -> Iterator[TrainWindow]:
    """The windows of one training epoch with random lengths (docs/reference.md section 3).

    Each step draws `sample_seq_len`, advances by that many rows and is padded to its
    bucket. The last window is cut at the stream's end; the epoch ends when fewer than
    one target row remains. `start` resumes mid-epoch (the caller restores `rng`).
    """
    buckets = tuple(buckets or default_buckets(bptt, max_len))
    if max(buckets) < max_len:
        raise ValueError(f"buckets {buckets} do not cover max_len {max_len}")
    i = start
    while i < n_rows - 2:
        seq_len = sample_seq_len(rng, bptt, max_len)
        length = min(seq_len, n_rows - 1 - i)
        yield TrainWindow(i, seq_len, length, bucket_for(length, buckets))
        i += seq_len
