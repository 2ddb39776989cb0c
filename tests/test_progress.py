"""Progress lines and the metrics log (JSON lines, TensorBoard when installed)."""

import io
import sys
import types

from mos_jax import progress


def test_metrics_jsonl_and_tensorboard_mirror(tmp_path, monkeypatch):
    calls = []

    class FakeWriter:  # stands in for tensorboardX.SummaryWriter
        def __init__(self, logdir):
            calls.append(("init", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            calls.append("flush")

    monkeypatch.setitem(sys.modules, "tensorboardX",
                        types.SimpleNamespace(SummaryWriter=FakeWriter))
    writer = progress.MetricsWriter(tmp_path)
    writer.write({"mode": "train", "epoch": 1, "step": 40, "valid_ppl": 90.5,
                  "averaging": False})
    writer.write({"mode": "train", "final": True, "test_ppl": 80.25})
    assert progress.read_metrics(tmp_path) == [
        {"mode": "train", "epoch": 1, "step": 40, "valid_ppl": 90.5, "averaging": False},
        {"mode": "train", "final": True, "test_ppl": 80.25}]
    assert calls[0] == ("init", str(tmp_path / "tensorboard"))
    assert ("train/valid_ppl", 90.5, 40) in calls and "flush" in calls
    assert not any(c[0] == "train/test_ppl" for c in calls if isinstance(c, tuple))


def test_progress_lines_off_a_terminal(monkeypatch):
    stream = io.StringIO()
    clock = iter([0.0, 0.5, 11.0, 11.0, 11.0, 30.0, 30.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    p = progress.Progress("train epoch 1", total=3, batch_size=4, every_s=10.0,
                          stream=stream)
    p.update(1, rows=5, loss=4.0, lr=20.0)  # at 0.5 s: too soon for a line
    p.update(2, rows=5)  # at 11 s: one line, 40 tokens in 11 s
    lines = stream.getvalue().splitlines()
    assert lines == ["train epoch 1: 2/3 | 4 tok/s | loss 4.000 | lr 20"]
    assert p.tokens == 40


class Marker:
    """Stands in for a step's result array: ready or not, and waitable."""

    def __init__(self):
        self.ready = False

    def is_ready(self):
        return self.ready

    def block_until_ready(self):
        self.ready = True
        return self


def test_the_line_counts_only_updates_whose_work_is_done(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr(progress.time, "perf_counter", lambda: 10.0)
    p = progress.Progress("train epoch 1", total=9, batch_size=2, every_s=0.0,
                          stream=stream)
    a, b, c = Marker(), Marker(), Marker()
    p.update(1, rows=3, ready=a)  # dispatched, not finished: 0 shown
    a.ready = True
    p.update(2, rows=3, ready=b)  # a finished: 1 shown (6 tokens), b not yet
    c.ready = True  # finished, but after b, which is not: still 1
    p.update(3, rows=3, ready=c)
    p.update(4, rows=3, loss=2.5)  # no marker (the caller fetched the loss): all done
    p.update(5, rows=3, ready=Marker())
    shown = [line.split(" | ")[0] for line in stream.getvalue().splitlines()]
    assert shown == ["train epoch 1: 0/9", "train epoch 1: 1/9", "train epoch 1: 1/9",
                     "train epoch 1: 4/9", "train epoch 1: 4/9"]
    assert (p.done, p.tokens, p.shown_tokens) == (5, 30, 24)
    p.close()  # waits for the last marker
    assert (p.shown_done, p.shown_tokens) == (5, 30)


def test_count_takes_cumulative_rows():
    stream = io.StringIO()
    p = progress.Progress("valid", total=0, batch_size=10, every_s=0.0, stream=stream)
    for done in (20, 40, 45):
        p.count(done, 45)
    assert stream.getvalue().splitlines()[-1].startswith("valid: 45/45 |")
    assert p.tokens == 450


def test_counter_is_a_progress_line_ended_when_all_is_done():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    callback = progress.counter("valid", 10, stream=stream)
    for done in (20, 40):
        callback(done, 45)
    assert "\n" not in stream.getvalue()  # one line, redrawn
    callback(45, 45)
    text = stream.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    assert text.rsplit("\r", 1)[-1].startswith("valid: 45/45 |")
