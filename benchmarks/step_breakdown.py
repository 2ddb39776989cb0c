"""Where a training step's time goes: whole step, MoS head alone, encoder alone.

    python benchmarks/step_breakdown.py [--config configs/ptb.py] [--batch 12] [--bptt 70]

Dropout off, random ids, the config's shapes (vocabulary 10,000). Each line is the mean
of 3 calls after one warm-up call, in seconds:
  full fwd / full fwd+bwd     the regularised loss of the whole model, and its gradient
  head fwd / head fwd+bwd     the MoS head on random hidden states (grads of its params,
                              the hidden states and the tied embedding)
  encoder fwd+bwd             embedding + LSTM stack (gradient of sum(raw_output))
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mos_jax import config as config_lib, heads, model, train  # noqa: E402


def bench(name, f, *args, n=3):
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(n):
        jax.block_until_ready(f(*args))
    print(f"{name:24s} {(time.perf_counter() - t) / n:.3f} s", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/ptb.py")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--bptt", type=int, default=70)
    args = p.parse_args()
    c = config_lib.load_config(args.config)
    no_dropout = dict(dropout=0.0, dropouth=0.0, dropouti=0.0, dropoute=0.0,
                      dropoutl=0.0, wdrop=0.0)
    cfg = train.model_config_from(c, 10000).replace(**no_dropout)
    params = model.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jax.numpy.asarray(rng.integers(0, 10000, (args.bptt, args.batch)), jax.numpy.int32)
    carry = model.init_carry(cfg, args.batch)

    def loss(p):
        return model.regularized_loss(cfg, p, x, x, carry, 2.0, 1.0)[0]
    bench("full fwd", jax.jit(loss), params)
    bench("full fwd+bwd", jax.jit(jax.grad(loss)), params)

    head = heads.get_head(cfg.head)(n_experts=cfg.n_experts)
    hidden = jax.numpy.asarray(
        rng.uniform(-1, 1, (args.bptt, args.batch, cfg.nhidlast)), jax.numpy.float32)

    def head_loss(hp, hidden, emb):
        return -head.apply(hp, hidden, emb, x).target_logprobs.mean()
    hp = {"params": params["head"]}
    bench("head fwd", jax.jit(head_loss), hp, hidden, params["embedding"])
    bench("head fwd+bwd", jax.jit(jax.grad(head_loss, argnums=(0, 1, 2))), hp, hidden,
          params["embedding"])

    def encoder_loss(p):
        out = model.LanguageModel(cfg).apply({"params": p}, x, carry, None)
        return out.raw_output.sum()
    bench("encoder fwd+bwd", jax.jit(jax.grad(encoder_loss)), params)


if __name__ == "__main__":
    main()
