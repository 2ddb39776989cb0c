"""Cost of output heads alone: forward + backward of the training NLL per token.

    python benchmarks/head_cost.py [--config configs/ptb_small.py] [--experts 4]
        [--heads mos,mixtape] [--vocab-chunk 0] [--rounds 5]

Random hidden states `[T, B, nhidlast]` (the config's batch and bptt), a random tied
embedding and random targets; for each head, the jitted gradient of the mean target
NLL with respect to the head's parameters, the hidden states and the embedding (what a
training step needs from the head), dropout off. Heads are timed in interleaved rounds
(one call each per round, after a warm-up), so a drift in the machine's speed hits them
alike; the median over rounds is printed, in ms per call and head tokens/s.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mos_jax import config as config_lib, heads, train  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/ptb_small.py")
    p.add_argument("--vocab", type=int, default=10000)
    p.add_argument("--experts", type=int, default=None, help="components (all heads)")
    p.add_argument("--heads", default="mos,mixtape")
    p.add_argument("--vocab-chunk", default="0", help="0, N, fused or auto (all heads)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    c = config_lib.load_config(args.config)
    mc = train.model_config_from(c, args.vocab)
    t, b, e = c.data.bptt, c.data.batch_size, args.experts or mc.n_experts
    chunk = args.vocab_chunk if args.vocab_chunk in ("auto", "fused") else int(args.vocab_chunk)
    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (t, b, mc.nhidlast))
    embedding = jax.random.uniform(keys[1], (args.vocab, mc.emsize), minval=-0.1, maxval=0.1)
    targets = jax.random.randint(keys[2], (t, b), 0, args.vocab)
    weights = jnp.full((t, b), 1.0 / (t * b))
    fns = {}
    for name in args.heads.split(","):
        module = heads.get_head(name)(n_experts=e, dropoutl=0.0, vocab_chunk=chunk)
        params = module.init(jax.random.key(1), hidden, embedding, targets)["params"]

        def loss(params, hidden, embedding, module=module):  # the model's way: fused or not
            return module.apply({"params": params}, hidden, embedding, targets,
                                target_weights=weights,
                                method=type(module).output_with_nll).nll
        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        fns[name] = (f, params)
        jax.block_until_ready(f(params, hidden, embedding))  # compile + warm-up
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, (f, params) in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(f(params, hidden, embedding))
            times[name].append(time.perf_counter() - start)
    out = {"config": args.config, "experts": e, "vocab": args.vocab, "tokens": t * b,
           "vocab_chunk": chunk, "device": jax.devices()[0].device_kind}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {"ms": round(1000 * med, 1), "min_ms": round(1000 * min(ts), 1),
                     "max_ms": round(1000 * max(ts), 1),
                     "tokens_per_s": round(t * b / med, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
