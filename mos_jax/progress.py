"""Progress output on long work, and the metrics log of a work directory.

`Progress` redraws one status line on a terminal (`\\r`) and prints plain lines at most
every `every_s` seconds elsewhere (logs, CI). It shows finished work only: an update
may carry a `ready` marker (an array of the step's results, computed asynchronously),
and the line counts that update once the marker is ready. `MetricsWriter` appends one JSON record per
evaluation to `metrics.jsonl` and mirrors scalars to TensorBoard when `tensorboardX` is
installed. `counter` is the `(done, total)` callback form of a `Progress` line.
"""

from __future__ import annotations

import collections
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable


class Progress:
    """Step, tokens/s, loss and lr of a long loop, on stderr.

    `done` and `tokens` count the work handed over (the caller's counts); the line
    shows `shown_done` and `shown_tokens`, the work known to be finished: updates
    without a `ready` marker at once, the others once their marker `is_ready()`
    (checked without waiting, in order; `close` waits for the last).
    """

    def __init__(self, label: str, total: int, batch_size: int, start: int = 0,
                 every_s: float = 10.0, stream=None):
        self.label, self.total, self.batch_size = label, total, batch_size
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = every_s
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.done = start
        self.shown_done, self.shown_tokens = start, 0
        self._unfinished: collections.deque = collections.deque()  # (done, tokens, ready)
        self.loss = self.lr = None
        self._last_print = self.t0  # no line before `every_s` has passed

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.elapsed, 1e-9)

    def update(self, done: int, rows: int, loss: float | None = None,
               lr: float | None = None, ready=None) -> None:
        """`done` units so far, `rows` more rows of `batch_size` tokens. `ready`: an
        array the update's work produces, when that work may not have finished yet
        (asynchronous dispatch); without it the work counts as finished, and so does
        every earlier update's."""
        self.done = done
        self.tokens += rows * self.batch_size
        if ready is None:
            self._unfinished.clear()
            self.shown_done, self.shown_tokens = done, self.tokens
        else:
            self._unfinished.append((done, self.tokens, ready))
        if loss is not None:
            self.loss = loss
        if lr is not None:
            self.lr = lr
        now = time.perf_counter()
        if self.tty or now - self._last_print >= self.every_s:
            self._last_print = now
            self._emit(final=False)

    def count(self, done: int, total: int) -> None:
        """A callback `(done, total)` of cumulative counts (rows of `batch_size`
        tokens), as `mos_jax.evaluate` reports finished work."""
        self.total = total
        self.update(done, done - self.done)

    def _settle(self, wait: bool = False) -> None:
        """Count the updates whose work has finished (all of them with `wait`)."""
        while self._unfinished:
            done, tokens, ready = self._unfinished[0]
            if wait and hasattr(ready, "block_until_ready"):
                ready.block_until_ready()
            elif not wait and hasattr(ready, "is_ready") and not ready.is_ready():
                break
            self._unfinished.popleft()
            self.shown_done, self.shown_tokens = done, tokens

    def _line(self) -> str:
        self._settle()
        rate = self.shown_tokens / max(self.elapsed, 1e-9)
        parts = [f"{self.label}: {self.shown_done}/{self.total}", f"{rate:,.0f} tok/s"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.3g}")
        return " | ".join(parts)

    def _emit(self, final: bool) -> None:
        if self.tty:
            end = "\n" if final else ""
            print("\r" + self._line().ljust(78), end=end, file=self.stream, flush=True)
        else:
            print(self._line(), file=self.stream, flush=True)

    def close(self) -> None:
        self._settle(wait=True)
        if self.tty:
            self._emit(final=True)


def counter(label: str, tokens_per_unit: int, stream=None) -> Callable[[int, int], None]:
    """A `(done, total)` callback of cumulative counts of units of `tokens_per_unit`
    tokens (rows, windows), as evaluation and dynamic evaluation report their work: a
    `Progress` line, closed when `done == total`."""
    line = Progress(label, 0, tokens_per_unit, stream=stream)

    def callback(done: int, total: int) -> None:
        line.count(done, total)
        if done == total:
            line.close()
    return callback


class MetricsWriter:
    """`metrics.jsonl` in `workdir` (one JSON object a line), plus TensorBoard."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        try:
            from tensorboardX import SummaryWriter  # optional
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
        except ImportError:
            pass

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, float):
                    self._tb.add_scalar(f"{record.get('mode', 'run')}/{k}", v,
                                        record["step"])
            self._tb.flush()


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------- peak memory

def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes (getrusage's `ru_maxrss`, which
    is KiB on Linux and bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def peak_device_bytes() -> int | None:
    """Peak bytes in use on this process's first local device, where the backend
    reports it (GPU, TPU; not CPU), else None. A local device: a process can ask only
    its own devices' statistics (`jax.devices()[0]` is another host's on every process
    but the first)."""
    import jax
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # backends without memory statistics
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats \
        else None


def peak_memory() -> dict[str, Any]:
    """Device peak bytes where reported, else the process's peak RSS, in MiB."""
    device = peak_device_bytes()
    if device is not None:
        return {"peak_memory_mb": round(device / 2 ** 20),
                "memory_kind": "device peak_bytes_in_use"}
    return {"peak_memory_mb": round(peak_rss_bytes() / 2 ** 20),
            "memory_kind": "process peak RSS"}
