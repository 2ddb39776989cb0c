"""Throughput of dynamic evaluation's two passes, with compile time reported apart.

    python benchmarks/dynamic_eval.py --config configs/ptb.py [--windows 256]

Random weights and ids of the config's shapes. The statistics pass uses batch 100 and
windows of 5, the evaluation pass batch 1 and windows of 5 (docs/reference.md section 4). For
each pass: the compile time of its chunk program (ahead of time, on its own), one
warm-up run, then `--windows` windows timed; tokens/s = tokens scored / seconds.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mos_jax import config as config_lib, dynamic_eval as de, parallel, train  # noqa: E402
from mos_jax.batching import make_windows  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/ptb.py")
    p.add_argument("--vocab", type=int, default=10000)
    p.add_argument("--windows", type=int, default=2 * de.CHUNK,
                   help="timed windows per pass (a multiple of --chunk)")
    p.add_argument("--stats-batch", type=int, default=100)
    p.add_argument("--chunk", type=int, default=de.CHUNK,
                   help="windows per compiled scan call (smaller: a quicker benchmark)")
    args = p.parse_args()
    de.CHUNK = args.chunk
    c = config_lib.load_config(args.config)
    mc = train.model_config_from(c, args.vocab)
    params = train.model_lib.init_params(mc, jax.random.key(0))
    rng = np.random.default_rng(0)
    out = {"config": args.config, "device": jax.devices()[0].device_kind,
           "chunk": args.chunk, "timed_windows": args.windows}

    def stats_run(n_windows):
        ids = rng.integers(0, args.vocab, size=args.stats_batch * (n_windows * 5 + 1))
        t = time.perf_counter()
        s = de.gradient_statistics(mc, params, ids, batch_size=args.stats_batch,
                                   max_batches=n_windows)
        jax.block_until_ready(s.ms)
        return time.perf_counter() - t, s

    one = parallel.local_plan(1, "none")
    w = make_windows(rng.integers(0, args.vocab, size=args.stats_batch * 700),
                     args.stats_batch, 5, multiple=de.CHUNK)
    sq = jax.tree_util.tree_map(jax.numpy.zeros_like, params)
    carry = train.model_lib.init_carry(mc, args.stats_batch)
    t = time.perf_counter()
    de.statistics_chunk(one, mc).lower(params, sq, carry, w.inputs[:de.CHUNK],
                                       w.targets[:de.CHUNK], w.lengths[:de.CHUNK]).compile()
    out["stats_compile_s"] = round(time.perf_counter() - t, 2)
    _, stats = stats_run(de.CHUNK)  # warm-up (compiles through jit)
    timed, _ = stats_run(args.windows)
    out["stats_tokens_per_s"] = round(args.windows * 5 * args.stats_batch / timed, 1)

    def eval_run(n_windows):
        ids = rng.integers(0, args.vocab, size=n_windows * 5 + 1)
        t = time.perf_counter()
        r = de.dynamic_evaluate(mc, params, stats.ms, stats.decrate, ids)
        jax.block_until_ready(r.params)
        return time.perf_counter() - t

    w = make_windows(rng.integers(0, args.vocab, size=700), 1, 5, multiple=de.CHUNK)
    decay, step = de.update_coefficients(stats.ms, stats.decrate, 0.002, 0.02, 0.001)
    t = time.perf_counter()
    de.update_chunk(one, mc).lower(params, train.model_lib.init_carry(mc, 1), params, decay,
                                   step, w.inputs[:de.CHUNK], w.targets[:de.CHUNK],
                                   w.lengths[:de.CHUNK]).compile()
    out["eval_compile_s"] = round(time.perf_counter() - t, 2)
    eval_run(de.CHUNK)  # warm-up
    timed = eval_run(args.windows)
    out["eval_tokens_per_s"] = round(args.windows * 5 / timed, 1)
    out["eval_s_per_window"] = round(timed / args.windows, 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
