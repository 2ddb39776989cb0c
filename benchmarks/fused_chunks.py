"""The fused mixture loss (`mos_jax.fused`) at several row chunks, one shape.

    python benchmarks/fused_chunks.py [--rows 840] [--experts 15] [--dim 280]
        [--vocab 10000] [--chunks 35,37] [--rounds 5] [--forward-only]

Random latents, priors, embedding and targets; for each chunk size (rows of `--experts`
logit rows each), the jitted pass that training uses (loss and every gradient, in one
scan over the row chunks) or, with `--forward-only`, the one evaluation uses. The chunks
are timed in interleaved rounds after a warm-up, so a drift in the machine's speed hits
them alike; prints the median seconds per call, the padded rows (the last chunk is
padded to full size) and the matmul FLOP/s achieved. The chunk `auto` would pick
(`streaming.fused_rows`) is marked.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mos_jax import fused, streaming  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=840, help="tokens (T * B)")
    p.add_argument("--experts", type=int, default=15)
    p.add_argument("--dim", type=int, default=280)
    p.add_argument("--vocab", type=int, default=10000)
    p.add_argument("--chunks", default="35,37", help="comma-separated rows per chunk")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--forward-only", action="store_true")
    args = p.parse_args()
    n, e, d, v = args.rows, args.experts, args.dim, args.vocab
    rng = np.random.default_rng(0)
    latent = jnp.asarray(rng.uniform(-1, 1, (n, e, d)), jnp.float32)
    log_prior = jax.nn.log_softmax(jnp.asarray(rng.normal(size=(n, e)), jnp.float32))
    emb = jnp.asarray(rng.uniform(-0.1, 0.1, (v, d)), jnp.float32)
    bias = jnp.zeros((v,), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    weights = jnp.full((n,), 1.0 / n, jnp.float32)
    chunks = [int(c) for c in args.chunks.split(",")]
    grads = not args.forward_only

    def make(chunk):
        def f(latent, log_prior, emb, bias):
            loss, _, g = fused._chunk_pass(latent, log_prior, emb, bias, targets, weights,
                                           chunk, jnp.float32, with_grads=grads)
            return (loss, g[:4]) if grads else loss
        return jax.jit(f)

    fns = {c: make(c) for c in chunks}
    for f in fns.values():
        jax.block_until_ready(f(latent, log_prior, emb, bias))
    times = {c: [] for c in chunks}
    for _ in range(args.rounds):
        for c, f in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(f(latent, log_prior, emb, bias))
            times[c].append(time.perf_counter() - t)
    auto = streaming.fused_rows("auto", n, e, v, d)
    flops = (3 if grads else 1) * 2 * n * e * d * v
    print(f"{jax.devices()[0].platform}: N {n}, E {e}, D {d}, V {v}, "
          f"{'forward and gradients' if grads else 'forward only'}, "
          f"median of {args.rounds} rounds")
    print(f"{'chunk':>6} {'padded rows':>12} {'seconds':>9} {'GFLOP/s':>8}")
    for c in chunks:
        s = statistics.median(times[c])
        padded = -(-n // c) * c
        mark = "  <- auto" if c == auto else ""
        print(f"{c:>6} {padded:>12} {s:>9.4f} {flops / s / 1e9:>8.1f}{mark}")


if __name__ == "__main__":
    main()
