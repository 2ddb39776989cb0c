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
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mos_jax import dynamic_eval as de
from mos_jax import evaluate, heads
from mos_jax import model as model_lib
from mos_jax import parallel, train
from mos_jax.batching import make_windows
from mos_jax.errors import ConfigError

WORKLOADS = ("train", "eval", "dynamic_eval")


def model_flops_per_token(mc: model_lib.ModelConfig, context: int = 70
                          ) -> dict[str, int]:
    """Forward matmul FLOPs per token (2 per multiply-add), by part.

    The encoder's as it declares them (keyed by its name, `lstm` or `transformer`;
    the Transformer's attention depends on the window, `context` tokens); the head's as
    the head declares it (`mos_jax.heads.Head.flops_per_token`), so a head of your own
    is counted too.
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


def peak_memory() -> dict[str, Any]:
    """Device peak bytes where reported, else the process's peak RSS."""
    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # some backends do not implement it
        pass
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_memory_mb": round(stats["peak_bytes_in_use"] / 2 ** 20),
                "memory_kind": "device peak_bytes_in_use"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_memory_mb": round(rss / 1024), "memory_kind": "process peak RSS"}


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
    plan = parallel.local_plan(s.num_devices, c.parallel.strategy)
    step = train.build_train_step(c, mc, plan, batch_size=batch, bptt=bptt, seed=0)
    params = model_lib.init_params(mc, jax.random.key(0))
    holder = {"state": train.init_state(mc, params, batch, step.tx)}
    del params
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
                    "first_step_s": round(first, 2),
                    "compile_s": round(first - statistics.median(times), 2),
                    "tokens_per_s": _summary(times, batch * bptt), **peak_memory()}


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
