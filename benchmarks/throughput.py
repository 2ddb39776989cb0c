"""Train-step and evaluation throughput, first-step compile time and peak memory.

    python benchmarks/throughput.py --config configs/ptb.py [--batch 12] [--bptt 70]
        [--steps 10] [--eval-steps 10] [--head mos] [--vocab 10000]

Random token ids (the figures depend on shapes only). Each workload compiles once
(timed separately), runs one warm-up call, then `--steps` timed calls, each ended with
`block_until_ready`; it prints the median and the spread (min..max) in tokens/s, and
the process's peak resident memory (ru_maxrss, which includes JAX and the compiler).
Run each workload in its own process for a clean memory figure (`--only train|eval`).
"""

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mos_jax import config as config_lib, evaluate, model, train  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, steps):
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/ptb.py")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--bptt", type=int, default=None)
    p.add_argument("--eval-batch", type=int, default=10)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eval-steps", type=int, default=10)
    p.add_argument("--vocab", type=int, default=10000)
    p.add_argument("--only", choices=["train", "eval"], default=None)
    p.add_argument("overrides", nargs="*", help="--config.KEY=VALUE")
    args, rest = p.parse_known_args()
    c = config_lib.load_config(args.config, config_lib.parse_overrides(rest))
    mc = train.model_config_from(c, args.vocab)
    batch = args.batch or c.data.batch_size
    bptt = args.bptt or c.data.bptt
    groups = train.column_groups(batch, c.data.small_batch_size)
    rng = np.random.default_rng(0)
    out = {"config": args.config, "vocab": args.vocab, "batch": batch, "bptt": bptt,
           "head": mc.head, "experts": mc.n_experts, "groups": groups,
           "device": jax.devices()[0].device_kind, "jax": jax.__version__}
    params = model.init_params(mc, jax.random.key(0))
    out["params"] = model.param_count(params)

    if args.only in (None, "train"):
        step = train.TrainStep(mc, alpha=c.optim.alpha, beta=c.optim.beta, bptt=bptt,
                               n_groups=groups, seed=0, clip=c.optim.clip,
                               wdecay=c.optim.wdecay)
        state = train.init_state(mc, params, batch, step.tx)
        x = jnp.asarray(rng.integers(0, args.vocab, size=(bptt, batch)), jnp.int32)
        y = jnp.asarray(rng.integers(0, args.vocab, size=(bptt, batch)), jnp.int32)
        t = time.perf_counter()
        compiled = step._jitted.lower(state, x, y, bptt, bptt, 20.0).compile()
        out["train_compile_s"] = round(time.perf_counter() - t, 2)
        holder = {"state": state}

        def run():
            holder["state"], m = compiled(holder["state"], x, y, bptt, bptt, 20.0)
            return m["loss"]
        run()
        times = timed(run, args.steps)
        rates = [bptt * batch / s for s in times]
        out["train_tokens_per_s"] = {"median": round(statistics.median(rates), 1),
                                     "min": round(min(rates), 1), "max": round(max(rates), 1)}
        out["train_peak_rss_mb"] = round(peak_rss_mb())

    if args.only in (None, "eval"):
        eb = args.eval_batch
        carry = model.init_carry(mc, eb)
        x = jnp.asarray(rng.integers(0, args.vocab, size=(bptt, eb)), jnp.int32)
        t = time.perf_counter()
        score = evaluate._score_window.lower(mc, params, carry, x, x, bptt).compile()
        out["eval_compile_s"] = round(time.perf_counter() - t, 2)
        holder = {"carry": carry}

        def run_eval():
            logp, holder["carry"] = score(params, holder["carry"], x, x, bptt)
            return logp
        run_eval()
        times = timed(run_eval, args.eval_steps)
        rates = [bptt * eb / s for s in times]
        out["eval_batch"] = eb
        out["eval_tokens_per_s"] = {"median": round(statistics.median(rates), 1),
                                    "min": round(min(rates), 1), "max": round(max(rates), 1)}
        out["peak_rss_mb"] = round(peak_rss_mb())
    print(json.dumps(out))


if __name__ == "__main__":
    main()
