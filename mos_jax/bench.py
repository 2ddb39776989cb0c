"""`mos-jax bench`: throughput, compile time, memory and FLOP utilisation of a config.

Random token ids of the config's shapes (the figures depend on shapes only), on the
devices JAX sees. Three workloads, each compiled first (its compile time reported on
its own), then `warmup` untimed calls, then `repeats` timed calls, each ended with
`block_until_ready`:

- `train`: the jitted, donating train step (`mos_jax.train.build_train_step`) over
  the placement plan of `num_devices` devices (`mos_jax.parallel`);
- `eval`: one evaluation window (full forward, per-token log-probabilities);
- `dynamic_eval`: dynamic evaluation's update pass (batch 1, windows of 5), timed over
  chunks of windows (one compiled scan each).

Tokens/s are reported as the median and spread (min, max) over the timed calls. Model
FLOPs per token count the matmuls of the forward pass (`model_flops_per_token`); a
train token costs three times the forward. Achieved FLOP/s divided by a matmul peak
measured on the same device in the same dtype is the model FLOPs utilisation (MFU).
Peak memory is the device's `peak_bytes_in_use` where the device reports it (GPU/TPU),
else the process's peak resident memory (which includes JAX itself and the compiler).
The vocabulary is the config's corpus's (`config_vocab_size`) unless `vocab` is given.

`run_vocab_sweep` (`mos-jax bench --vocab-sizes ... --heads ...`) measures the train
step and evaluation of several heads at several vocabulary sizes, on runs of the zipf
synthetic chain, the heads' timed calls interleaved; `format_sweep` and `plot_sweep`
print and draw it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mos_jax import config as config_lib
from mos_jax import dynamic_eval as de
from mos_jax import evaluate, heads
from mos_jax import model as model_lib
from mos_jax import parallel, train
from mos_jax.batching import make_windows
from mos_jax.errors import ConfigError
from mos_jax.progress import peak_device_bytes, peak_memory, peak_rss_bytes  # noqa: F401

WORKLOADS = ("train", "eval", "dynamic_eval")


def model_flops_per_token(mc: model_lib.ModelConfig, context: int = 70
                          ) -> dict[str, int]:
    """Forward matmul FLOPs per token (2 per multiply-add), by part.

    The encoder's as it declares them (keyed by its name, `lstm` or `transformer`;
    the Transformer's attention depends on the window, `context` tokens); the head's as
    the head declares it (`mos_jax.heads.Head.flops_per_token`), so a head of your own
    is counted too. The head's count is over the rows it computes: the tied heads over
    a vocabulary padded by `model.vocab_multiple` count its padded size V_pad
    (`heads.vocab_rows`; the result's `vocab_rows` in `run_bench`); mixtape and the
    adaptive heads, which compute over the V words, count V.
    """
    encoder = int(mc.encoder_cls.flops_per_token(mc, context))
    head = int(heads.get_head(mc.head).flops_per_token(mc))
    return {mc.encoder: encoder, "head": head, "forward": encoder + head}


def matmul_peak_flops(dtype, n: int | None = None, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n matmul (float32 accumulation) in `dtype` on device 0."""
    if n is None:
        n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    jax.block_until_ready(f(a, a))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(f(a, a))
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def _summary(seconds: list[float], tokens: int) -> dict[str, float]:
    rates = [tokens / s for s in seconds]
    return {"median": round(statistics.median(rates), 1), "min": round(min(rates), 1),
            "max": round(max(rates), 1), "runs": len(rates)}


def _time(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return times


def config_vocab_size(c) -> tuple[int, str]:
    """The vocabulary size of config `c`'s corpus, and where it came from: a synthetic
    corpus's `vocab_size`, else the corpus's own (loaded; a directory's is cached)."""
    source = c.data.dir
    if source == "synthetic":
        return int(c.data.synthetic.vocab_size), "data.synthetic.vocab_size"
    if not source.startswith("tfds:") and not Path(source).is_dir():
        raise ConfigError(
            f"bench takes the vocabulary from the config's corpus, but the corpus "
            f"directory {source} does not exist: give --config.data.dir DIR, or "
            "--vocab N (PTB: 10000, WikiText-2: 33278)")
    return train.load_corpus_from(c).vocab_size, f"the corpus {source}"


@dataclasses.dataclass
class BenchSettings:
    vocab: int | None = None  # None: the config's corpus's (config_vocab_size)
    batch: int = 0  # 0: the config's
    bptt: int = 0
    eval_batch: int = 0
    num_devices: int = 1  # train step devices; 0: all local devices
    warmup: int = 1
    repeats: int = 5
    dyn_windows: int = 32  # windows per timed dynamic-evaluation call
    workloads: tuple[str, ...] = WORKLOADS
    matmul_n: int = 0  # 0: by backend


def _train(c, mc, s: BenchSettings, out: dict, rng) -> None:
    batch, bptt = s.batch or c.data.batch_size, s.bptt or c.data.bptt
    plan = parallel.local_plan(s.num_devices, c.parallel.strategy,
                               int(c.parallel.mesh.model), c.parallel.rules.to_dict())
    step = train.build_train_step(c, mc, plan, batch_size=batch, bptt=bptt, seed=0)
    # initialised in the plan's layout: no device ever holds a whole split parameter
    init = jax.jit(lambda key: train.init_state(
        mc, model_lib.init_params(mc, key), batch, step.tx),
        out_shardings=plan.layout(jax.eval_shape(lambda: train.init_state(
            mc, model_lib.init_params(mc, jax.random.key(0)), batch, step.tx))))
    holder = {"state": init(jax.random.key(0))}
    x = rng.integers(0, mc.vocab_size, size=(bptt, batch)).astype(np.int32)
    y = rng.integers(0, mc.vocab_size, size=(bptt, batch)).astype(np.int32)
    x, y = plan.feed_batch(x), plan.feed_batch(y)

    def run():
        holder["state"], m = step(holder["state"], x, y, bptt, bptt, 20.0)
        return m["loss"]

    t = time.perf_counter()
    jax.block_until_ready(run())
    first = time.perf_counter() - t
    times = _time(run, s.warmup, s.repeats)
    loss = float(run())
    if not np.isfinite(loss):
        raise FloatingPointError(f"the train step's loss is {loss}")
    out["train"] = {"batch": batch, "bptt": bptt, "devices": plan.n_devices,
                    "mesh": [plan.n_data, plan.model_size],
                    **per_device(holder["state"], step, x, y, bptt),
                    "first_step_s": round(first, 2),
                    "compile_s": round(first - statistics.median(times), 2),
                    "tokens_per_s": _summary(times, batch * bptt), **peak_memory()}


_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                "all-to-all")


def per_device(state, step, x, y, bptt) -> dict:
    """Per-device figures of a train step: the most bytes of the state (parameters,
    optimiser state, carry) any one device holds, the compiler's planned step memory
    per device (XLA's memory analysis of the partitioned program: arguments, outputs
    and temporaries), and the collectives in the program (count and the bytes of
    their results per device: each moves about that much)."""
    held: dict = {}
    for leaf in jax.tree_util.tree_leaves(state):
        for shard in getattr(leaf, "addressable_shards", ()):
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    figures = {"state_mb_per_device": round(max(held.values(), default=0) / 2 ** 20, 2)}
    run = getattr(step, "_run", None) or getattr(step, "_jitted", None)
    if run is None or not hasattr(run, "lower"):
        return figures
    args = (state, x, y, bptt, bptt, 20.0)
    compiled = run.lower(*args).compile()
    mem = compiled.memory_analysis()
    if mem is not None:
        figures["step_plan_mb_per_device"] = round(
            (mem.argument_size_in_bytes + mem.output_size_in_bytes
             + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2 ** 20, 2)
    count, moved = 0, 0
    for line in compiled.as_text().splitlines():
        op = next((c for c in _COLLECTIVES if f" {c}(" in line or f" {c}-start(" in line),
                  None)
        if op is None or "=" not in line:
            continue
        count += 1
        moved += _result_bytes(line.split("=", 1)[1].split(op, 1)[0])
    figures["collectives"] = count
    figures["collective_mb_per_step"] = round(moved / 2 ** 20, 3)
    return figures


_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1,
                "u8": 1, "f64": 8, "s64": 8, "u64": 8}


def _result_bytes(text: str) -> int:
    """Bytes of the array shapes in an HLO result type such as `(f32[4,8], f32[])`."""
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", text):
        size = _DTYPE_BYTES.get(dtype)
        if size:
            total += size * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def _eval(c, mc, s: BenchSettings, out: dict, rng) -> None:
    eb, bptt = s.eval_batch or c.data.eval_batch_size, s.bptt or c.data.bptt
    params = model_lib.init_params(mc, jax.random.key(0))
    carry = model_lib.init_carry(mc, eb)
    x = jnp.asarray(rng.integers(0, mc.vocab_size, size=(bptt, eb)), jnp.int32)
    t = time.perf_counter()
    score = evaluate.window_scorer(parallel.local_plan(1, "none"), mc).lower(
        params, carry, x, x, bptt).compile()
    compile_s = time.perf_counter() - t
    holder = {"carry": carry}

    def run():
        logp, holder["carry"] = score(params, holder["carry"], x, x, bptt)
        return logp
    times = _time(run, s.warmup, s.repeats)
    out["eval"] = {"batch": eb, "bptt": bptt, "compile_s": round(compile_s, 2),
                   "tokens_per_s": _summary(times, eb * bptt), **peak_memory()}


def _dynamic_eval(c, mc, s: BenchSettings, out: dict, rng) -> None:
    n = s.dyn_windows
    params = model_lib.init_params(mc, jax.random.key(0))
    # Statistics of a plausible size: updates stay small, so the parameters keep normal
    # float values (NaN or subnormal numbers would slow the arithmetic and distort it).
    ms = jax.tree_util.tree_map(jnp.ones_like, params)
    decrate = de.decay_rates(ms, 0.02)
    decay, step = de.update_coefficients(ms, decrate, 0.002, 0.02, 0.001)
    w = make_windows(rng.integers(0, mc.vocab_size, size=5 * n + 1), 1, 5)  # n windows
    assert int((w.lengths == 5).sum()) == n
    holder = {"params": jax.tree_util.tree_map(jnp.copy, params),
              "carry": model_lib.init_carry(mc, 1)}
    t = time.perf_counter()
    chunk = de.update_chunk(parallel.local_plan(1, "none"), mc).lower(
        holder["params"], holder["carry"], params, decay, step, w.inputs, w.targets,
        w.lengths).compile()
    compile_s = time.perf_counter() - t

    def run():
        holder["params"], holder["carry"], logp = chunk(
            holder["params"], holder["carry"], params, decay, step, w.inputs, w.targets,
            w.lengths)
        return logp
    times = _time(run, s.warmup, s.repeats)
    med = statistics.median(times)
    out["dynamic_eval"] = {"batch": 1, "bptt": 5, "windows_per_call": n,
                           "compile_s": round(compile_s, 2),
                           "tokens_per_s": _summary(times, 5 * n),
                           "s_per_window": round(med / n, 4), **peak_memory()}


def run_bench(c, settings: BenchSettings, log: Callable[[str], None] = print) -> dict:
    """Measure `settings.workloads` for config `c`; returns the JSON-ready result."""
    unknown = set(settings.workloads) - set(WORKLOADS)
    if unknown:
        raise ConfigError(f"unknown workload(s) {sorted(unknown)}: choose from "
                          f"{', '.join(WORKLOADS)}")
    vocab = settings.vocab
    if vocab is None:
        vocab, whence = config_vocab_size(c)
        log(f"bench: V = {vocab:,}, from {whence} (--vocab N for another)")
    mc = train.model_config_from(c, vocab)
    dev = jax.devices()[0]
    flops = model_flops_per_token(mc, settings.bptt or c.data.bptt)
    out: dict[str, Any] = {
        "device": dev.device_kind, "platform": dev.platform,
        "devices_visible": jax.device_count(), "jax": jax.__version__,
        "head": mc.head, "experts": mc.n_experts, "vocab": mc.vocab_size,
        # the rows of the vocabulary-sized parameters, what the head computes and
        # what params and FLOPs count: V, or V padded by model.vocab_multiple
        **({"vocab_rows": mc.padded_vocab_size}
           if mc.padded_vocab_size != mc.vocab_size else {}),
        "compute_dtype": str(mc.dtype), "vocab_chunk": mc.vocab_chunk,
        "params": model_lib.param_count(jax.eval_shape(
            lambda: model_lib.init_params(mc, jax.random.key(0)))),
        "model_flops_per_token": flops}
    rng = np.random.default_rng(0)
    runners = {"train": _train, "eval": _eval, "dynamic_eval": _dynamic_eval}
    for name in settings.workloads:
        log(f"bench: {name} ...")
        runners[name](c, mc, settings, out, rng)
        log(f"bench: {name}: {json.dumps(out[name])}")
    peak = matmul_peak_flops(mc.dtype, settings.matmul_n or None)
    out["matmul_peak_gflops"] = round(peak / 1e9, 1)
    per_token = {"train": 3 * flops["forward"], "eval": flops["forward"],
                 "dynamic_eval": 3 * flops["forward"]}
    for name in settings.workloads:
        achieved = out[name]["tokens_per_s"]["median"] * per_token[name]
        devices = out[name].get("devices", 1)
        out[name]["model_gflops_per_s"] = round(achieved / 1e9, 2)
        out[name]["mfu"] = round(achieved / (peak * devices), 4)
    return out


def format_table(result: dict) -> str:
    lines = [f"{result['device']} ({result['platform']}), {result['head']} head, "
             f"{result['params']:,} parameters, {result['compute_dtype']}, vocab_chunk="
             f"{result['vocab_chunk']}; matmul peak {result['matmul_peak_gflops']} GFLOP/s",
             f"{'workload':<13} {'tokens/s (median [min, max])':<32} {'compile s':>9} "
             f"{'peak MB':>8} {'GFLOP/s':>8} {'MFU':>6}"]
    for name in WORKLOADS:
        if name not in result:
            continue
        r = result[name]
        t = r["tokens_per_s"]
        lines.append(f"{name:<13} {t['median']:>10,.1f} [{t['min']:,.1f}, {t['max']:,.1f}]"
                     .ljust(46) + f" {r['compile_s']:>9} {r['peak_memory_mb']:>8} "
                     f"{r['model_gflops_per_s']:>8} {r['mfu']:>6.1%}")
    return "\n".join(lines)


def main_print(result: dict, out_path=None) -> None:
    print(format_table(result), file=sys.stderr)
    text = json.dumps(result)
    if out_path:
        with open(out_path, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
    print(text)


# --------------------------------------------------------------------------------------
# Cost against vocabulary size: `mos-jax bench --vocab-sizes 10000,33000 --heads ...`.

def parse_vocab_sizes(text: str) -> tuple[int, ...]:
    """`"10000,33000"` -> (10000, 33000): distinct integers >= 2; else one ConfigError."""
    try:
        return tuple(config_lib.parse_int_list(
            str(text), "vocabulary size", "--vocab-sizes 10000,33000,100000", 2,
            skip_empty=False))
    except ConfigError as e:
        raise ConfigError(f"--vocab-sizes {text!r}: {e}") from None


def parse_heads(text: str | None) -> tuple[str, ...]:
    """Head names of `--heads` (None: every registered head), checked as
    `compare-heads` checks them: unknown or repeated names are one error."""
    heads.load_plugins()
    if text is None:
        return tuple(heads.HEADS)
    return tuple(heads.parse_names(text))


def _head_model_config(c, head: str, vocab: int) -> model_lib.ModelConfig:
    """The config's model with `head` and `vocab` words; a tied head (its decoder is
    the embedding) gets the encoder's output width set to emsize."""
    m = config_lib.ConfigDict(dict(c.model.to_dict(), head=head, vocab_size=vocab))
    model_lib.set_tied_width(m)
    return model_lib.ModelConfig.from_dict(m.to_dict())


def _xla_mb(compiled) -> float | None:
    """A compiled program's planned bytes (arguments + outputs + temporaries - aliased),
    in MiB; None where the backend does not say."""
    try:
        m = compiled.memory_analysis()
        total = (m.argument_size_in_bytes + m.output_size_in_bytes
                 + m.temp_size_in_bytes - m.alias_size_in_bytes)
    except Exception:
        return None
    return round(total / 2 ** 20, 2)


def zipf_stream(c, vocab: int, n: int) -> tuple[np.ndarray, float]:
    """`n` token ids of the zipf synthetic chain with `vocab` words (the config's
    `data.synthetic` zipf parameters and seed; successors capped at `vocab`), and the
    chain's entropy rate."""
    from mos_jax import data as data_lib
    s = c.data.synthetic
    chain = data_lib.make_zipf_chain(
        vocab, float(s.zipf_exponent), min(int(s.successors), vocab), float(s.smoothing),
        float(s.successor_peakedness), int(s.seed))
    return chain.sample(n, np.random.default_rng([int(s.seed), 3])), chain.entropy_rate


def _windows(stream: np.ndarray, batch: int, bptt: int, count: int):
    """`count` consecutive (inputs, targets) windows `[bptt, batch]` of `stream`."""
    rows = np.asarray(stream[:batch * (bptt * count + 1)]).reshape(batch, -1).T
    return [(rows[k * bptt:(k + 1) * bptt], rows[k * bptt + 1:(k + 1) * bptt + 1])
            for k in range(count)]


class _Entry:
    """One head at one vocabulary size: its compiled train step and evaluation, their
    state, and the times of its calls."""

    def __init__(self, c, head: str, vocab: int, s: BenchSettings, stream, log):
        self.head, self.vocab = head, vocab
        self.mc = mc = _head_model_config(c, head, vocab)
        self.batch, self.bptt = s.batch or c.data.batch_size, s.bptt or c.data.bptt
        self.eb = s.eval_batch or c.data.eval_batch_size
        self.workloads = [w for w in s.workloads if w in ("train", "eval")]
        self.record: dict[str, Any] = {
            "head": head, "vocab": vocab, "experts": mc.n_experts,
            "nhidlast": mc.nhidlast, "emsize": mc.emsize,
            "params": model_lib.param_count(jax.eval_shape(
                lambda: model_lib.init_params(mc, jax.random.key(0)))),
            "model_flops_per_token": model_flops_per_token(mc, self.bptt)}
        self.times: dict[str, list[float]] = {w: [] for w in self.workloads}
        plan = parallel.local_plan(1, "none")
        params = model_lib.init_params(mc, jax.random.key(0))
        eval_params = jax.tree_util.tree_map(jnp.copy, params)
        n_windows = 4
        if "train" in self.workloads:
            step = train.build_train_step(c, mc, plan, batch_size=self.batch,
                                          bptt=self.bptt, seed=0)
            self.state = train.init_state(mc, params, self.batch, step.tx)
            self.train_windows = [tuple(plan.feed_batch(np.ascontiguousarray(a))
                                        for a in w)
                                  for w in _windows(stream, self.batch, self.bptt,
                                                    n_windows)]
            self.step, self.k_train = step, 0
            t = time.perf_counter()
            jax.block_until_ready(self._train())
            first = time.perf_counter() - t
            compiled = step.compiled((self.bptt, self.batch)) if hasattr(
                step, "compiled") else None
            self.record["train"] = {"batch": self.batch, "bptt": self.bptt,
                                    "first_step_s": round(first, 2),
                                    "xla_memory_mb": _xla_mb(compiled)}
        if "eval" in self.workloads:
            self.params = eval_params  # a copy: the train step donates its state
            self.carry = model_lib.init_carry(mc, self.eb)
            self.eval_windows = [tuple(jnp.asarray(a) for a in w) for w in
                                 _windows(stream, self.eb, self.bptt, n_windows)]
            x, y = self.eval_windows[0]
            t = time.perf_counter()
            self.score = evaluate.window_scorer(plan, mc).lower(
                params, self.carry, x, y, self.bptt).compile()
            self.record["eval"] = {"batch": self.eb, "bptt": self.bptt,
                                   "compile_s": round(time.perf_counter() - t, 2),
                                   "xla_memory_mb": _xla_mb(self.score)}
            self.k_eval = 0
        for _ in range(s.warmup):
            for w in self.workloads:
                jax.block_until_ready(self.call(w))
        self.record.update(peak_memory())
        log(f"bench: {head} at V = {vocab:,} ready: {json.dumps(self.record)}")

    def _train(self):
        x, y = self.train_windows[self.k_train % len(self.train_windows)]
        self.k_train += 1
        self.state, m = self.step(self.state, x, y, self.bptt, self.bptt, 20.0)
        return m["loss"]

    def _eval(self):
        x, y = self.eval_windows[self.k_eval % len(self.eval_windows)]
        self.k_eval += 1
        logp, self.carry = self.score(self.params, self.carry, x, y, self.bptt)
        return logp

    def call(self, workload: str):
        return self._train() if workload == "train" else self._eval()

    def timed(self, workload: str) -> None:
        t = time.perf_counter()
        out = jax.block_until_ready(self.call(workload))
        self.times[workload].append(time.perf_counter() - t)
        if workload == "train" and not np.isfinite(float(out)):
            raise FloatingPointError(f"the {self.head} head's train loss at V = "
                                     f"{self.vocab} is {float(out)}")

    def finish(self) -> dict:
        for w in self.workloads:
            r, times = self.record[w], self.times[w]
            tokens = r["batch"] * r["bptt"]
            r.update(steps=len(times), tokens=tokens * len(times),
                     seconds=round(sum(times), 4),
                     tokens_per_s=_summary(times, tokens))
        return self.record


def run_vocab_sweep(c, vocab_sizes, head_names, settings: BenchSettings,
                    log: Callable[[str], None] = print) -> dict:
    """Tokens/s of the train step and of evaluation, and memory, for every head in
    `head_names` at every vocabulary size in `vocab_sizes` (on one device).

    The input is a stationary run of the zipf synthetic chain of that size
    (`mos_jax.data.make_zipf_chain`, with the config's `data.synthetic` zipf keys):
    a dense head's cost depends on shapes only, but a head whose cost depends on which
    words are targets (an adaptive softmax computing a tail cluster only for the rows
    that need it) is measured honestly only on Zipfian text. Sizes run in increasing
    order; at each, every head is compiled and warmed up, then the timed calls alternate
    between the heads (`repeats` rounds of one train step each, then of one evaluation
    window each), so a drift of the machine's speed hits them alike. Memory per (head,
    V): `xla_memory_mb`, the compiled program's planned bytes, and `peak_memory_mb`,
    `peak_memory()` after its warm-up (on CPU the process's peak so far: cumulative).
    """
    unknown = set(settings.workloads) - {"train", "eval"}
    if unknown:
        raise ConfigError(f"bench --vocab-sizes measures train and eval, not "
                          f"{', '.join(sorted(unknown))}: use --only train,eval")
    import gc
    batch, bptt = settings.batch or c.data.batch_size, settings.bptt or c.data.bptt
    eb = settings.eval_batch or c.data.eval_batch_size
    s = c.data.synthetic
    dev = jax.devices()[0]
    out: dict[str, Any] = {
        "device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
        "compute_dtype": str(train.model_config_from(c, 2).dtype),
        "vocab_chunk": c.model.vocab_chunk, "batch": batch, "bptt": bptt,
        "eval_batch": eb, "warmup": settings.warmup, "repeats": settings.repeats,
        "heads": list(head_names), "vocab_sizes": sorted(vocab_sizes),
        "corpus": (f"zipf synthetic chain (zipf_exponent={s.zipf_exponent}, "
                   f"successors={s.successors}, smoothing={s.smoothing}, "
                   f"successor_peakedness={s.successor_peakedness}, seed={s.seed})"),
        "records": []}
    for vocab in sorted(vocab_sizes):
        t = time.perf_counter()
        need = 4 * bptt * max(batch, eb) + max(batch, eb) + 1
        stream, entropy = zipf_stream(c, vocab, need)
        log(f"bench: V = {vocab:,}: zipf chain and {need:,} tokens in "
            f"{time.perf_counter() - t:.1f} s (its perplexity {math.exp(entropy):.1f})")
        entries = [_Entry(c, h, vocab, settings, stream, log) for h in head_names]
        workloads = entries[0].workloads
        for _ in range(settings.repeats):
            for w in workloads:
                for e in entries:
                    e.timed(w)
        for e in entries:
            rec = e.finish()
            rec["chain_perplexity"] = round(math.exp(entropy), 2)
            out["records"].append(rec)
            log(f"bench: {e.head} at V = {vocab:,}: " + ", ".join(
                f"{w} {rec[w]['tokens_per_s']['median']:,.0f} tokens/s"
                for w in workloads))
        del entries
        gc.collect()
        train.release_free_heap()
    return out


def format_sweep(result: dict) -> str:
    """The sweep's table: one line per (head, V)."""
    lines = [f"{result['device']} ({result['platform']}), {result['compute_dtype']}, "
             f"vocab_chunk={result['vocab_chunk']}, train batch {result['batch']}, eval "
             f"batch {result['eval_batch']}, bptt {result['bptt']}; {result['corpus']}",
             f"{'head':<12} {'V':>8} {'params':>12} {'train tok/s [min, max]':<28} "
             f"{'eval tok/s [min, max]':<28} {'XLA MB tr/ev':>14} {'peak MB':>8}"]

    def rate(r):
        if r is None:
            return "-".ljust(28)
        t = r["tokens_per_s"]
        return f"{t['median']:>9,.0f} [{t['min']:,.0f}, {t['max']:,.0f}]".ljust(28)
    for rec in result["records"]:
        tr, ev = rec.get("train"), rec.get("eval")
        mem = "/".join("-" if r is None or r.get("xla_memory_mb") is None
                       else f"{r['xla_memory_mb']:.0f}" for r in (tr, ev))
        lines.append(f"{rec['head']:<12} {rec['vocab']:>8,} {rec['params']:>12,} "
                     f"{rate(tr)} {rate(ev)} {mem:>14} {rec['peak_memory_mb']:>8}")
    return "\n".join(lines)


def plot_sweep(result: dict, out_png) -> Path:
    """Train and eval tokens/s and the train step's planned memory against V (log-x),
    one line per head, as one PNG."""
    from mos_jax import plot
    plt = plot.pyplot()
    panels = [(w, f"{w} tokens/s") for w in ("train", "eval")
              if any(w in r for r in result["records"])]
    if any((r.get("train", {}).get("xla_memory_mb") or 0) > 0 for r in result["records"]):
        panels.append(("memory", "train step XLA memory (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    axes = np.atleast_1d(axes)
    for ax, (what, label) in zip(axes, panels):
        for head in result["heads"]:
            recs = sorted((r for r in result["records"] if r["head"] == head),
                          key=lambda r: r["vocab"])
            if what == "memory":
                pts = [(r["vocab"], r["train"]["xla_memory_mb"]) for r in recs
                       if (r.get("train", {}).get("xla_memory_mb") or 0) > 0]
            else:
                pts = [(r["vocab"], r[what]["tokens_per_s"]["median"]) for r in recs
                       if what in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=head)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(label)
        if ax is not axes[-1]:
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
    fig.tight_layout()
    title = f"cost against vocabulary size ({result['device']})"
    fig.suptitle(title, fontsize="medium")
    fig.subplots_adjust(top=0.88)
    try:
        return plot.finish(fig, axes[-1], out_png, None, 100)
    finally:
        plt.close(fig)
