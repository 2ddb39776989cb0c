"""Worker for tests/test_parallel.py: runs in a fresh process (XLA_FLAGS must be set
before JAX starts), does one task, prints one JSON line on stdout.

    python tests/parallel_worker.py TASK WORKDIR [ARGS...]

Tasks: `step [core]` (one train step, 1 vs N devices), `train` (short runs, every strategy),
`eval` (evaluation, gradient statistics and sampling), `plans` (one evaluation code path under a
one-device and a mesh plan), `multihost PROCESS_ID PORT STRATEGY` (one process of a
2-process run; the environment sets the device count).
"""

import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mos_jax import config as config_lib  # noqa: E402
from mos_jax import dynamic_eval, evaluate, generate, model, parallel, train  # noqa: E402

NO_DROPOUT = dict(dropout=0.0, dropouth=0.0, dropouti=0.0, dropoute=0.0, dropoutl=0.0,
                  wdrop=0.0)


def step_config(batch_size, bptt, small_batch_size):
    """A config whose train step is that of `kw` in `task_step`."""
    c = config_lib.default_config()
    c.optim.alpha, c.optim.beta, c.optim.clip, c.optim.wdecay = 2.0, 1.0, 1e6, 0.0
    c.data.batch_size, c.data.bptt, c.data.small_batch_size = batch_size, bptt, small_batch_size
    c.train.seed = 0
    return c


def tree_max_diff(a, b) -> float:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(la, lb))


def host(tree):
    return jax.tree_util.tree_map(lambda x: np.array(x), tree)


def fresh(tree):
    """Copies on the default device (the steps donate their state)."""
    return jax.tree_util.tree_map(lambda x: jnp.array(np.array(x)), tree)


# ------------------------------------------------------------------------------ step

def task_step(workdir, parts="all"):
    """One train step on the plan against one device; `parts="core"` (the accelerator
    check's plan_of_one) leaves out the adaptive head's step."""
    n = jax.device_count()
    out = {"devices": n}
    B, T = 2 * n, 9
    cfg = model.ModelConfig(vocab_size=30, emsize=6, nhid=8, nlayers=2, nhidlast=6,
                            n_experts=3, **NO_DROPOUT)
    params = host(model.init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 30, size=(T + 1, B)).astype(np.int32)
    inputs, targets = seq[:-1], seq[1:]
    carry0 = host(jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
        model.init_carry(cfg, B)))
    kw = dict(alpha=2.0, beta=1.0, bptt=T, seed=0,
              optimizer=train.optim.Optimizer("sgd", clip=1e6, wdecay=0.0))

    # One device: the plain jitted step. With lr 1, no clipping and no weight decay its
    # update is the gradient (tests/test_train.py checks the step against jax.grad).
    ref_step = train.TrainStep(cfg, n_groups=1, **kw)
    state = train.init_state(cfg, fresh(params), B, ref_step.tx).replace(carry=fresh(carry0))
    ref, ref_m = ref_step(state, inputs, targets, T, T, 1.0)
    ref, ref_m = host(ref), host(ref_m)
    grads = jax.tree_util.tree_map(lambda p, q: p - q, params, ref.params)
    grad_norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree_util.tree_leaves(grads))))
    out["single"] = {"grad_norm": grad_norm, "metric_grad_norm": float(ref_m["grad_norm"])}

    for strategy in ("mesh",):
        plan = parallel.make_plan(strategy, jax.devices())
        for small in (-1, 1):
            step = train.build_train_step(step_config(B, T, small), cfg, plan)
            state = train.init_state(cfg, fresh(params), B, step.tx).replace(
                carry=fresh(carry0))
            new, m = step(state, inputs, targets, T, T, 1.0)
            new, m = host(new), host(m)
            update = jax.tree_util.tree_map(lambda p, q: p - q, params, new.params)
            update_norm = float(np.sqrt(sum(np.sum(np.square(u))
                                            for u in jax.tree_util.tree_leaves(update))))
            out[f"{strategy}_{small}"] = {
                "groups": step.n_groups,
                "loss": abs(float(m["loss"]) - float(ref_m["loss"])),
                "nll": abs(float(m["nll"]) - float(ref_m["nll"])),
                "grad_norm_ratio": float(m["grad_norm"]) / grad_norm,
                "update_norm_ratio": update_norm / grad_norm,
                "grads": tree_max_diff(update, grads),
                "params": tree_max_diff(new.params, ref.params),
                "carry": tree_max_diff(new.carry, ref.carry),
                "carry_shape": list(jax.tree_util.tree_leaves(new.carry)[0].shape),
                "step": int(new.step),
            }

    # An adaptive head (its tails skip rows by lax.cond inside lax.map; adaptive_mos
    # has the adaptive head's tails and its own fused mixture loss): one step on the
    # mesh plan equals one device. Width 6: div_value 2 gives tail widths 3, 1.
    for head in (("adaptive_mos",) if parts == "all" else ()):
        cfg_h = cfg.replace(head=head, head_options=(("div_value", 2.0),))
        shapes = jax.eval_shape(model.init_params, cfg_h, jax.random.key(1))  # no compile
        params_h = jax.tree_util.tree_map(
            lambda a: rng.uniform(-0.3, 0.3, size=a.shape).astype(np.float32), shapes)
        ref_step = train.TrainStep(cfg_h, n_groups=1, **kw)
        state = train.init_state(cfg_h, fresh(params_h), B, ref_step.tx).replace(
            carry=fresh(carry0))
        ref_h, ref_hm = host(ref_step(state, inputs, targets, T, T, 1.0))
        step = train.build_train_step(step_config(B, T, -1), cfg_h,
                                      parallel.make_plan("mesh", jax.devices()))
        state = train.init_state(cfg_h, fresh(params_h), B, step.tx).replace(
            carry=fresh(carry0))
        new, m = host(step(state, inputs, targets, T, T, 1.0))
        out[f"head_{head}"] = {
            "loss": abs(float(m["loss"]) - float(ref_hm["loss"])),
            "ref_loss": float(ref_hm["loss"]),
            "params": tree_max_diff(new.params, ref_h.params),
            "moved": tree_max_diff(ref_h.params, params_h)}

    # Dropout on: every device gets the same columns; different masks give different
    # carries, and the same call twice gives the same result.
    cfg_d = cfg.replace(dropout=0.3, dropouti=0.3, dropouth=0.3, wdrop=0.3, dropoutl=0.3)
    block = seq[:, :2]
    same = np.tile(block, (1, n))
    dropout = {}
    for strategy in ("mesh",):
        plan = parallel.make_plan(strategy, jax.devices())
        step = train.build_train_step(step_config(B, T, -1), cfg_d, plan)
        runs = []
        for _ in range(2):
            state = train.init_state(cfg_d, fresh(params), B, step.tx)
            new, m = step(state, same[:-1], same[1:], T, T, 1.0)
            runs.append(host((new, m)))
        (a, ma), (b, mb) = runs
        h = np.asarray(a.carry[-1][0])  # [B, H]: device d holds rows 2d, 2d+1
        blocks = [h[2 * d:2 * d + 2] for d in range(n)]
        dropout[strategy] = {
            "repeat_diff": tree_max_diff(a, b),
            "min_block_diff": min((float(np.max(np.abs(blocks[i] - blocks[j])))
                                   for i in range(n) for j in range(i + 1, n)),
                                  default=float("inf")),  # one device: no pairs
            "loss": float(ma["loss"])}
    out["dropout"] = {
        "mesh_repeat": dropout["mesh"]["repeat_diff"],
        "mesh_min_block_diff": dropout["mesh"]["min_block_diff"],
        "mesh_loss": dropout["mesh"]["loss"],
    }
    return out


# ----------------------------------------------------------------------------- train

def tiny(**overrides):
    c = config_lib.load_config_file(ROOT / "configs" / "tiny.py")
    c.train.max_epochs = 2
    c.train.steps_per_epoch = 8
    c.data.max_seq_len_delta = 0  # few buckets and one evaluation shape: few compilations
    c.data.test_batch_size = c.data.eval_batch_size
    c.train.log_every_steps = 4
    c.train.checkpoint_every_s = 1e9
    for key, value in overrides.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


def no_dropout(c):
    for key, value in NO_DROPOUT.items():
        c.model[key] = value
    return c


def checksums(workdir, c):
    """Per-leaf sums of the final checkpoint (params, averaging, carry)."""
    from mos_jax.checkpoint import CheckpointStore
    from mos_jax import data
    plan = parallel.from_config(c)
    mc = train.model_config_from(c, len(data.load_vocab(workdir)))  # the run's vocabulary
    tx = train.optim.from_config(c.optim).transform(averaging=True)
    abstract = jax.eval_shape(lambda: train._state_tree(train.init_state(
        mc, model.init_params(mc, jax.random.key(0)), c.data.batch_size, tx)))
    abstract = plan.abstract(abstract)
    store = CheckpointStore(workdir, read_only=True)
    tree, meta = store.restore(abstract)
    store.close()
    sums = jax.jit(lambda t: [jnp.sum(x.astype(jnp.float32))
                              for x in jax.tree_util.tree_leaves(t)])(tree)
    return [float(s) for s in sums], meta["history"]


def run(c, workdir, **kw):
    logs = []
    result = train.train_and_evaluate(c, workdir, log=logs.append, **kw)
    return result, logs


def task_train(workdir):
    workdir = Path(workdir)
    out = {"devices": jax.device_count()}
    results = {}
    for strategy in ("none", "mesh"):
        c = no_dropout(tiny(parallel__strategy=strategy))
        result, logs = run(c, workdir / f"nodrop-{strategy}")
        results[strategy] = result
        out[f"logs_{strategy}"] = logs
    out["nodrop"] = results
    # A checkpoint of one device continues on all of them. (The reverse, a mesh's
    # checkpoint restored bit for bit on one device and on another mesh shape and
    # resumed there, is the `vocab` worker's.)
    c = no_dropout(tiny(parallel__strategy="none", train__stop_at_step=5))
    run(c, workdir / "switch")
    c = no_dropout(tiny(parallel__strategy="mesh"))
    out["switch"], _ = run(c, workdir / "switch")
    out["workdir"] = str(workdir / "nodrop-mesh")
    return out


# ------------------------------------------------------------------------------ eval

def task_eval(workdir):
    n = jax.device_count()
    out = {"devices": n}
    cfg = model.ModelConfig(vocab_size=40, emsize=6, nhid=8, nlayers=2, nhidlast=6,
                            n_experts=3)
    params = model.init_params(cfg, jax.random.key(3))
    ids = np.random.default_rng(1).integers(0, 40, size=3001).astype(np.int32)
    ref = evaluate.token_logprobs(cfg, params, ids, 2 * n, 7)
    stats_ref = dynamic_eval.gradient_statistics(cfg, params, ids, batch_size=2 * n,
                                                 bptt=5, max_batches=40)
    notes = []
    for strategy in ("mesh",):
        plan = parallel.make_plan(strategy, jax.devices())
        logp = evaluate.token_logprobs(cfg, params, ids, 2 * n, 7, plan=plan)
        stats = dynamic_eval.gradient_statistics(cfg, params, ids, batch_size=2 * n,
                                                 bptt=5, max_batches=40, plan=plan)
        rel = max(float(np.max(np.abs(a - b) / (np.abs(b) + 1e-12)))
                  for a, b in zip(jax.tree_util.tree_leaves(stats.ms),
                                  jax.tree_util.tree_leaves(stats_ref.ms)))
        out[strategy] = {"shape": list(logp.shape), "logp": float(np.max(np.abs(logp - ref))),
                         "stats_rel": rel, "windows": [stats.windows, stats_ref.windows]}
        # Batch 1 (and 3) cannot split: one device, with a note.
        one = evaluate.token_logprobs(cfg, params, ids, 1, 7, plan=plan, log=notes.append)
        out[strategy]["batch1"] = float(np.max(np.abs(
            one - evaluate.token_logprobs(cfg, params, ids, 1, 7))))
        out[strategy]["dyn_note"] = dynamic_eval.update_pass_note(plan, 1)
    out["notes"] = notes
    out["generate"] = generation_layouts()
    return out


def generation_layouts():
    """`generate.sample` of 4 samples on data 2 x model 2 (39 words padded to 40 rows:
    blocks of 20) and on data 4 x model 1, against one device: the same words and
    log-probabilities for the same seed. A tiny model and a one-word prompt: each
    layout is one compiled program."""
    start = time.process_time()
    cfg = model.ModelConfig(vocab_size=39, vocab_multiple=4, emsize=6, nhid=8, nlayers=1,
                            nhidlast=6, n_experts=2, **NO_DROPOUT)
    params = model.init_params(cfg, jax.random.key(4))
    kw = dict(temperature=0.9, seed=11, num_samples=4, return_logprobs=True)
    ref_words, ref_logp = generate.sample(cfg, params, [5], 6, **kw)
    devices = sorted(jax.devices(), key=lambda d: d.id)
    out = {"distinct": len({tuple(w) for w in ref_words})}
    for data, model_size in ((2, 2), (4, 1)):
        plan = parallel.make_plan("mesh", devices[:data * model_size], model_size)
        placed = plan.place_params(params)
        words, logp = generate.sample(cfg, placed, [5], 6, plan=plan, **kw)
        out[f"{data}x{model_size}"] = {
            "words": bool(np.array_equal(words, ref_words)),
            "logp": float(np.max(np.abs(logp - ref_logp))),
            "rows": biggest_shard_rows(placed, cfg.padded_vocab_size)}
    out["cpu_seconds"] = round(time.process_time() - start, 2)
    return out


# ----------------------------------------------------------------------------- plans

def task_plans(workdir):
    """Evaluation log-probabilities and gradient statistics through the same functions
    under a one-device plan and a mesh plan over 2 devices."""
    devices = sorted(jax.devices(), key=lambda d: d.id)
    cfg = model.ModelConfig(vocab_size=40, emsize=6, nhid=8, nlayers=1, nhidlast=6,
                            n_experts=3)
    params = model.init_params(cfg, jax.random.key(5))
    ids = np.random.default_rng(2).integers(0, 40, size=801).astype(np.int32)
    out = {"devices": len(devices)}
    for name, plan in (("one", parallel.make_plan("none", devices[:1])),
                       ("mesh", parallel.make_plan("mesh", devices[:2]))):
        logp = evaluate.token_logprobs(cfg, params, ids, 4, 6, plan=plan)
        out[name] = {"type": type(plan).__name__, "n": plan.n_devices,
                     "axis": plan.axis_name, "logp": logp.tolist()}
    return out


# ----------------------------------------------------------------------------- vocab

# (data, model) over 8 devices. A 1 x 1 mesh is a one-device plan (`OneDevice`: the
# plain jitted program, the reference itself), so it is not run again here.
MESHES = ((1, 1), (2, 4), (1, 8), (8, 1))  # (data, model); 1 x 1 is a OneDevice plan
SPLIT_MESHES = ((2, 4),)
SHARDING_HEADS = ("softmax", "mos", "moc", "sigsoftmax", "moss", "adaptive", "adaptive_mos")


def rel_diff(a, b) -> float:
    """The largest per-leaf ||a - b|| / ||b||."""
    return max(float(np.linalg.norm(np.asarray(x, np.float64) - np.asarray(y, np.float64))
                     / max(np.linalg.norm(np.asarray(y, np.float64)), 1e-30))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def mesh_plan(data, model_size):
    devices = sorted(jax.devices(), key=lambda d: d.id)[:data * model_size]
    return parallel.make_plan("mesh", devices, model_size)


def biggest_shard_rows(tree, vocab):
    """Over every array of `tree` with a vocabulary-sized axis: the most rows of that
    axis any one device holds (the whole vocabulary when some device holds all)."""
    rows = 0
    for x in jax.tree_util.tree_leaves(tree):
        if not isinstance(x, jax.Array) or vocab not in x.shape:
            continue
        axis = x.shape.index(vocab)
        rows = max(rows, max(s.data.shape[axis] for s in x.addressable_shards))
    return rows


def task_vocab(workdir):
    """(8 devices.) Heads on a vocabulary split over the `model` axis against one device: loss,
    gradients and target log-probabilities (dropout off), a train step, evaluation
    and gradient statistics, and a checkpoint moved between mesh shapes."""
    workdir = Path(workdir)
    V, T, B = 64, 6, 8
    out = {"devices": jax.device_count()}
    import time
    clock = [time.perf_counter()]

    def lap(name):  # seconds per part, in the report (the suite's budget)
        now = time.perf_counter()
        out.setdefault("seconds", {})[name] = round(now - clock[0], 1)
        clock[0] = now
    rng = np.random.default_rng(0)
    seq = rng.integers(0, V, size=(T + 1, B)).astype(np.int32)
    inputs, targets = seq[:-1], seq[1:]
    # Every head in one program per mesh (and one for the one-device reference):
    # compiling tiny programs costs far more than running them, and one program of
    # seven heads compiles in half the time of seven programs.
    cfgs, head_params, head_carries = [], [], []
    for head in SHARDING_HEADS:
        options = (("div_value", 2.0),) if head.startswith("adaptive") else ()
        cfg = model.ModelConfig(vocab_size=V, emsize=6, nhid=8, nlayers=1, nhidlast=6,
                                n_experts=3, head=head, head_options=options, **NO_DROPOUT)
        params = host(model.init_params(cfg, jax.random.key(1)))
        # the decoder bias at zero would hide a wrong bias gradient: make it non-zero
        if "decoder_bias" in params["head"]:
            params["head"]["decoder_bias"] = rng.normal(size=V).astype(np.float32)
        cfgs.append(cfg)
        head_params.append(params)
        head_carries.append(host(model.init_carry(cfg, B)))

    def one_head(cfg, p, x, y, carry, axis=None):  # -> (loss, logprobs, grads)
        def loss_fn(p):
            lp = model.apply(cfg, p, x, carry, y).target_logprobs
            return -jnp.mean(lp), lp
        (loss, lp), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
        if axis is not None:
            loss, g = jax.lax.pmean((loss, g), axis)
        return loss, lp, g

    def every_head(ps, x, y, carries, axis=None):  # -> (losses, logprobs, grads)
        return tuple(zip(*(one_head(cfg, p, x, y, c, axis)
                           for cfg, p, c in zip(cfgs, ps, carries))))

    ref = host(jax.jit(every_head)(fresh(tuple(head_params)), inputs, targets,
                                   fresh(tuple(head_carries))))
    for head in SHARDING_HEADS:
        out[head] = {}
    for data, model_size in MESHES:
        plan = mesh_plan(data, model_size)
        fn = plan.map(lambda *a, plan=plan: every_head(*a, axis=plan.axis_name),
                      in_axes=(None, 1, 1, 0), out_axes=(None, 1, parallel.Like(0)))
        got = fn(tuple(plan.place_params(fresh(p)) for p in head_params), inputs, targets,
                 tuple(plan.place_carry(fresh(c)) for c in head_carries))
        lps, grads = host(got[1]), host(got[2])
        for i, head in enumerate(SHARDING_HEADS):
            out[head][f"{data}x{model_size}"] = {
                "loss": abs(float(got[0][i]) - float(ref[0][i])) / abs(float(ref[0][i])),
                "logprobs": rel_diff(lps[i], ref[1][i]),
                "grads": rel_diff(grads[i], ref[2][i]),
                "grad_rows": biggest_shard_rows(got[2][i], V)}
    lap("heads")

    # A vocabulary the model size does not divide, padded (model.vocab_multiple): MoS
    # with V = 37 words in 40 rows over data 2 x model 4 (blocks of 10, the last with 3
    # padded rows) against one device's unpadded model with the same first 37 rows,
    # streamed over chunks of 4 rows (on the last block: 7 words, then a chunk of none).
    # (No other parameter has an axis of 40.)
    words = 37
    pad_cfg = model.ModelConfig(vocab_size=words, emsize=6, nhid=8, nlayers=1, nhidlast=6,
                                n_experts=3, head="mos", vocab_multiple=4, vocab_chunk=4,
                                **NO_DROPOUT)
    rows_pad = pad_cfg.padded_vocab_size
    params = host(model.init_params(pad_cfg, jax.random.key(3)))
    params["head"]["decoder_bias"] = (  # its own draws: the later parts' as before
        np.random.default_rng(3).normal(size=rows_pad).astype(np.float32))

    def cut(tree):  # the vocabulary-sized leaves' first `words` rows
        return {**tree, "embedding": tree["embedding"][:words],
                "head": {**tree["head"], "decoder_bias": tree["head"]["decoder_bias"][:words]}}

    y_pad = np.minimum(targets, words - 1)  # words only (the last one among them)
    x_pad = np.minimum(inputs, words - 1)
    carry = host(model.init_carry(pad_cfg, B))
    ref = host(jax.jit(functools.partial(one_head, pad_cfg.replace(vocab_multiple=1)))(
        fresh(cut(params)), x_pad, y_pad, fresh(carry)))
    plan = mesh_plan(2, 4)
    fn = plan.map(lambda *a: one_head(pad_cfg, *a, axis=plan.axis_name),
                  in_axes=(None, 1, 1, 0), out_axes=(None, 1, parallel.Like(0)))
    got = fn(plan.place_params(fresh(params)), x_pad, y_pad, plan.place_carry(fresh(carry)))
    grads = host(got[2])
    out["padded"] = {
        "rows": rows_pad, "loss": abs(float(got[0]) - float(ref[0])) / abs(float(ref[0])),
        "logprobs": rel_diff(host(got[1]), ref[1]), "grads": rel_diff(cut(grads), ref[2]),
        "padded_grad": max(float(np.abs(grads["embedding"][words:]).max()),
                           float(np.abs(grads["head"]["decoder_bias"][words:]).max())),
        "grad_rows": biggest_shard_rows(got[2], rows_pad)}
    lap("padded vocabulary")

    # Train steps (clipping on) on every mesh against one device; the state's
    # vocabulary-sized arrays split by rows.
    cfg = model.ModelConfig(vocab_size=V, emsize=6, nhid=8, nlayers=1, nhidlast=6,
                            n_experts=3, head="mos", **NO_DROPOUT)
    params = host(model.init_params(cfg, jax.random.key(2)))
    c = step_config(B, T, -1)
    c.optim.clip, c.optim.wdecay = 0.05, 1e-4

    def steps(plan):
        step = train.build_train_step(c, cfg, plan)
        state = plan.place_state(train.init_state(cfg, fresh(params), B, step.tx))
        cols = plan.host_slice(B)
        for _ in range(3):
            state, m = step(state, inputs[:, cols], targets[:, cols], T, T, 1.0)
        return state, m

    ref_state, ref_m = steps(parallel.make_plan("none", jax.devices()[:1]))
    ref_state, ref_m = host(ref_state), host(ref_m)
    out["train"] = {}
    for data, model_size in SPLIT_MESHES + ((1, 8),):
        state, m = steps(mesh_plan(data, model_size))
        out["train"][f"{data}x{model_size}"] = {
            "params": rel_diff(host(state.params), ref_state.params),
            "opt_state": rel_diff(host(state.opt_state), ref_state.opt_state),
            "grad_norm": float(m["grad_norm"]) / float(ref_m["grad_norm"]),
            "state_rows": biggest_shard_rows(state, V)}

    lap("train")
    # Evaluation and gradient statistics through the same functions.
    ids = rng.integers(0, V, size=1201).astype(np.int32)
    eval_params = fresh(params)
    ref_lp = evaluate.token_logprobs(cfg, eval_params, ids, B, 7)
    ref_ms = dynamic_eval.gradient_statistics(cfg, eval_params, ids, batch_size=B, bptt=5,
                                              max_batches=16).ms
    plan = mesh_plan(2, 4)
    lp = evaluate.token_logprobs(cfg, eval_params, ids, B, 7, plan=plan)
    ms = dynamic_eval.gradient_statistics(cfg, eval_params, ids, batch_size=B, bptt=5,
                                          max_batches=16, plan=plan).ms
    out["eval"] = {"logprobs": rel_diff(lp, ref_lp), "stats": rel_diff(host(ms), host(ref_ms))}
    lap("eval")

    # A run on (2, 4) checkpoints; it restores exactly on (8, 1) and on one device, and
    # training resumes there.
    def cfg_for(model_size, strategy="mesh", **kw):
        t = no_dropout(tiny(parallel__strategy=strategy, model__head="mos", **kw))
        t.parallel.mesh.model = model_size
        t.data.synthetic.vocab_size = 96  # blocks of 24 rows on 4 shards; no other
        return t  # parameter has an axis of 96

    work = workdir / "moved"
    run(cfg_for(4, train__stop_at_step=8), work)
    lap("checkpointed run")
    from mos_jax.checkpoint import CheckpointStore
    restored = {}
    for name, t in (("2x4", cfg_for(4)), ("8x1", cfg_for(1)), ("one", cfg_for(1, "none"))):
        plan = parallel.from_config(t)
        mc = train.model_config_from(t, t.data.synthetic.vocab_size)
        tx = train.optim.from_config(t.optim).transform(averaging=True)
        abstract = jax.eval_shape(lambda: train._state_tree(train.init_state(
            mc, model.init_params(mc, jax.random.key(0)), t.data.batch_size, tx)))
        store = CheckpointStore(work, read_only=True)
        tree, _ = store.restore(plan.abstract(abstract))
        store.close()
        restored[name] = (tree, plan.n_devices, biggest_shard_rows(tree, mc.vocab_size))
    base = host(restored["2x4"][0])
    out["restore"] = {name: {"equal": all(np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(host(tree)), jax.tree_util.tree_leaves(base))),
        "devices": n, "rows": rows} for name, (tree, n, rows) in restored.items()}
    # The reference of the 2-process test with the vocabulary split over 2 devices
    # (each process one model group): 4 devices, dropout on, stopped and resumed.
    # (Uninterrupted: resume is exact, which the 2-process run checks by stopping.)
    ref = workdir / "ref-model2"
    os.environ["MOS_JAX_CACHE"] = str(workdir / "id-cache")  # not the user's
    t = two_process_config(tiny(parallel__num_devices=4), text_corpus(workdir / "corpus"))
    result, _ = run(t, ref)
    sums, history = checksums(ref, t)
    out["ref_model2"] = {"result": result, "sums": sums, "history": history}
    lap("restores and 2-process reference")
    # each resumes from the same checkpoint, in a copy of the work directory; the
    # uninterrupted run on (2, 4) is where they should end
    out["resumed"] = {"2x4 uninterrupted": run(cfg_for(4), workdir / "straight")[0]}
    for name, t in (("8x1", cfg_for(1)), ("one", cfg_for(1, "none"))):
        copy = workdir / f"resumed-{name}"
        shutil.copytree(work, copy)
        out["resumed"][name] = run(t, copy)[0]
    lap("resumed runs")
    return out


# ------------------------------------------------------------------------- multihost

def text_corpus(folder: Path) -> Path:
    """A small text corpus in `folder`: 63 made-up words and `<eos>` (a vocabulary of
    64, every word in training), the same bytes on every call. Each file is written
    whole and renamed into place, so processes writing it at once leave the same files."""
    rng = np.random.default_rng(5)
    words = [f"w{i}" for i in range(63)]
    folder.mkdir(parents=True, exist_ok=True)
    for split, n_lines in (("train", 300), ("valid", 100), ("test", 100)):
        lines = [" ".join(rng.choice(words, size=rng.integers(3, 15))) for _ in range(n_lines)]
        if split == "train":
            lines.insert(0, " ".join(words))
        tmp = folder / f".{split}.{os.getpid()}.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, folder / f"{split}.txt")
    return folder


def two_process_config(c, corpus: Path):
    """The 2-process test's run with the vocabulary split over `model` = 2 (MoS, a
    vocabulary of 64): a text corpus, read through the memory-mapped id cache (each
    process reading its own columns' windows)."""
    c.parallel.strategy = "mesh"
    c.parallel.mesh.model = 2
    c.data.dir = str(corpus)
    return c


def task_multihost(workdir, process_id, port, strategy):
    split = strategy == "mesh-model2"
    strategy = "mesh" if split else strategy
    launch = dict(parallel__strategy=strategy,
                  parallel__coordinator_address=f"127.0.0.1:{port}",
                  parallel__num_processes=2, parallel__process_id=int(process_id))
    # both processes write the corpus and, at once, its id cache (shared, as hosts on
    # one file system share theirs); each maps the ids and reads its own columns
    shared = Path(workdir).parent
    os.environ["MOS_JAX_CACHE"] = str(shared / "id-cache")
    corpus = text_corpus(shared / "corpus")
    from mos_jax import sources
    reader, mapped = sources.SOURCES[sources.DIRECTORY], []

    def load(*a, **kw):  # every corpus the runs read: memory-mapped?
        got = reader.load(*a, **kw)
        mapped.append(isinstance(got.train, np.memmap))
        return got
    sources.SOURCES[sources.DIRECTORY] = dataclasses.replace(reader, load=load)
    prepare = (lambda c: two_process_config(c, corpus)) if split else (lambda c: c)
    c = prepare(tiny(**launch, train__stop_at_step=6))
    first, logs1 = run(c, workdir)  # joins the run, trains 6 steps, checkpoints
    c = prepare(tiny(**launch))
    result, logs2 = run(c, workdir)  # restores, trains to the end
    sums, history = checksums(workdir, c)
    cache = shared / "id-cache"
    return {"mapped": mapped, "cache": sorted(p.name for p in cache.iterdir())
            if cache.is_dir() else [],
            "process": jax.process_index(), "processes": jax.process_count(),
            "devices": jax.device_count(), "local_devices": jax.local_device_count(),
            "first": first, "result": result, "sums": sums, "history": history,
            "logs": len(logs1) + len(logs2)}


def main():
    task, workdir, *args = sys.argv[1:]
    out = {"step": task_step, "train": task_train, "eval": task_eval, "plans": task_plans,
           "multihost": task_multihost, "vocab": task_vocab}[task](workdir, *args)
    print(json.dumps(out, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x)),
          flush=True)


if __name__ == "__main__":
    main()
