"""Data-parallel throughput scaling: one global batch over 1, 2, 4 devices.

    python benchmarks/parallel_scaling.py [--config configs/ptb_small.py] [--batch 12]
        [--bptt 35] [--devices 1 2 4] [--strategies mesh] [--steps 10]
        [--fake-cpu | --no-fake-cpu]

Each device count runs in its own process. On a CPU, `--fake-cpu` (the default when
no accelerator is found) makes XLA show that many host devices
(`--xla_force_host_platform_device_count`); they share the same cores, so this checks
that the parallel programs run and what they cost, not a speed-up. On a GPU/TPU
machine, `--no-fake-cpu` uses the first N real devices.

For every device count and strategy (at 1 device the one-device plan, `none`: the
plain jitted step): the train step (`train.build_train_step`) on the same global batch
`[bptt, batch]` (random ids, the config's model with vocabulary `--vocab`), compiled
ahead and warmed up, then `--steps` timed calls; and evaluation of `--eval-batch`
columns through `evaluate.token_logprobs` with the same plan. Prints one JSON line per
measurement and a table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mos_jax import config as config_lib, evaluate, model, parallel, train

    c = config_lib.load_config(args.config, config_lib.parse_overrides(args.overrides))
    mc = train.model_config_from(c, args.vocab)
    n = args.child
    devices = tuple(sorted(jax.local_devices(), key=lambda d: d.id)[:n])
    assert len(devices) == n, f"asked for {n} devices, found {len(jax.local_devices())}"
    rng = np.random.default_rng(0)
    x = rng.integers(0, args.vocab, size=(args.bptt, args.batch)).astype(np.int32)
    y = rng.integers(0, args.vocab, size=(args.bptt, args.batch)).astype(np.int32)
    params = model.init_params(mc, jax.random.key(0))
    c.data.small_batch_size = -1
    strategies = ["none"] if n == 1 else list(args.strategies)
    eval_ids = rng.integers(0, args.vocab, size=args.eval_batch * (args.bptt * 4 + 1))
    for strategy in strategies:
        plan = parallel.make_plan(strategy, devices)
        step = train.build_train_step(c, mc, plan, batch_size=args.batch, bptt=args.bptt,
                                      seed=0)
        state = train.init_state(mc, jax.tree_util.tree_map(jnp.copy, params), args.batch,
                                 step.tx)
        t0 = time.perf_counter()
        state, m = step(state, x, y, args.bptt, args.bptt, 1.0)
        jax.block_until_ready(m)
        first_s = time.perf_counter() - t0  # compile + one step
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            state, m = step(state, x, y, args.bptt, args.bptt, 1.0)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        rates = [args.bptt * args.batch / s for s in times]
        # Evaluation: 4 windows of bptt over eval-batch columns (one warm-up pass).
        evaluate.token_logprobs(mc, params, eval_ids, args.eval_batch, args.bptt, plan=plan)
        t0 = time.perf_counter()
        logp = evaluate.token_logprobs(mc, params, eval_ids, args.eval_batch, args.bptt,
                                       plan=plan)
        eval_rate = logp.size / (time.perf_counter() - t0)
        print(json.dumps({
            "devices": n, "strategy": strategy, "platform": devices[0].platform,
            "device_kind": devices[0].device_kind, "batch": args.batch, "bptt": args.bptt,
            "per_device": args.batch // n, "first_step_s": round(first_s, 2),
            "train_tokens_per_s": {"median": round(statistics.median(rates), 1),
                                   "min": round(min(rates), 1), "max": round(max(rates), 1)},
            "eval_batch": args.eval_batch, "eval_tokens_per_s": round(eval_rate, 1),
            "loss": float(m["loss"]), "jax": jax.__version__}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "ptb_small.py"))
    p.add_argument("--vocab", type=int, default=10000)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--bptt", type=int, default=35)
    p.add_argument("--eval-batch", type=int, default=12)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--strategies", nargs="+", default=["mesh"], choices=["mesh"])
    p.add_argument("--fake-cpu", action=argparse.BooleanOptionalAction, default=None,
                   help="show N host devices to XLA (default: when no GPU/TPU is set)")
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    args.overrides = rest
    if args.child:
        child(args)
        return
    fake = args.fake_cpu
    if fake is None:
        fake = os.environ.get("JAX_PLATFORMS", "cpu") == "cpu" and not os.environ.get(
            "CUDA_VISIBLE_DEVICES")
    rows = []
    for n in args.devices:
        env = dict(os.environ)
        if fake:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                                f" --xla_force_host_platform_device_count={n}").strip()
            env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, __file__, "--child", str(n), "--config", args.config,
               "--vocab", str(args.vocab), "--batch", str(args.batch), "--bptt",
               str(args.bptt), "--eval-batch", str(args.eval_batch), "--steps",
               str(args.steps), "--strategies", *args.strategies, *args.overrides]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{n} devices failed:\n{proc.stderr[-3000:]}")
        for line in proc.stdout.splitlines():
            if line.startswith("{"):
                print(line, flush=True)
                rows.append(json.loads(line))
    base = next((r for r in rows if r["devices"] == 1), rows[0])
    print(f"\n{'devices':>7} {'strategy':>8} {'per dev':>7} {'train tok/s':>12} "
          f"{'vs 1 dev':>8} {'eval tok/s':>10} {'first step s':>12}")
    for r in rows:
        rate = r["train_tokens_per_s"]["median"]
        print(f"{r['devices']:>7} {r['strategy']:>8} {r['per_device']:>7} {rate:>12,.0f} "
              f"{rate / base['train_tokens_per_s']['median']:>8.2f} "
              f"{r['eval_tokens_per_s']:>10,.0f} {r['first_step_s']:>12.2f}")


if __name__ == "__main__":
    main()
