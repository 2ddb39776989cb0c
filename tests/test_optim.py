"""Clipped SGD with weight decay, the other optimisers against NumPy, NT-ASGD averaging
and its switch rule, by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mos_jax import config as config_lib
from mos_jax import optim
from mos_jax.errors import ConfigError


def test_update_rule_by_hand():
    p = {"w": jnp.asarray([1.0, -2.0]), "b": jnp.asarray([0.5])}
    g = {"w": jnp.asarray([3.0, 0.0]), "b": jnp.asarray([4.0])}  # global norm 5
    tx = optim.Optimizer("sgd", clip=0.25, wdecay=0.1).transform()
    updates, _ = tx.update(g, tx.init(p), p, learning_rate=2.0)
    new = optax.apply_updates(p, updates)
    # p - lr * (g * 0.25 / 5 + 0.1 * p): decay is added after clipping.
    np.testing.assert_allclose(new["w"], [1 - 2 * (0.15 + 0.1), -2 - 2 * (0 - 0.2)], rtol=1e-6)
    np.testing.assert_allclose(new["b"], [0.5 - 2 * (0.2 + 0.05)], rtol=1e-6)
    small = {"w": jnp.asarray([0.1, 0.0]), "b": jnp.asarray([0.0])}  # under the clip
    updates, _ = tx.update(small, tx.init(p), p, learning_rate=1.0)
    np.testing.assert_allclose(optax.apply_updates(p, updates)["w"],
                               [1 - 0.1 - 0.1, -2 + 0.2], rtol=1e-6)


def test_should_switch_by_hand():
    assert not optim.should_switch([5, 4, 3, 2, 1], 9.0, nonmono=5)  # only 5 logged
    assert not optim.should_switch([5, 4, 3, 2, 1, 1.5], 4.5, nonmono=5)  # 4.5 < min([5])
    assert optim.should_switch([5, 4, 3, 2, 1, 1.5], 5.5, nonmono=5)
    assert optim.should_switch([3, 1, 2, 2, 2, 2, 2], 2.5, nonmono=5)  # > min([3, 1])
    assert not optim.should_switch([3, 1, 2], 0.5, nonmono=1)
    assert optim.should_switch([3, 1, 2], 1.5, nonmono=1)  # > min([3, 1])


def test_averaging_is_the_mean_of_iterates_since_the_switch():
    """`nt_asgd` around SGD at lr 1 with the gradient `p - target`: each update moves
    the parameters to `target`, so the iterates are the targets, and the average after
    the switch is their NumPy mean."""
    iterates = [np.array([1.0, 2.0]), np.array([3.0, -1.0]), np.array([0.0, 5.0]),
                np.array([2.0, 2.0])]
    tx = optim.nt_asgd(optim.Optimizer("sgd", clip=0.0).transform())
    p = {"x": jnp.zeros(2)}
    state = tx.init(p)

    def step(p, state, it):
        updates, state = tx.update({"x": p["x"] - jnp.asarray(it)}, state, p,
                                   learning_rate=1.0)
        return optax.apply_updates(p, updates), state

    p, state = step(p, state, iterates[0])
    np.testing.assert_array_equal(p["x"], iterates[0])
    assert int(state.averaging.count) == 0  # inactive: nothing averaged
    assert optim.eval_params(state, {"x": 7}) == {"x": 7}
    state = optim.switch_on(state)
    assert optim.eval_params(state, {"x": 7}) == {"x": 7}  # on, but nothing averaged yet
    for it in iterates[1:]:
        p, state = step(p, state, it)
    assert int(state.averaging.count) == 3
    np.testing.assert_allclose(state.averaging.average["x"], np.mean(iterates[1:], axis=0),
                               rtol=1e-6)
    assert optim.eval_params(state, {"x": 7}) is state.averaging.average
    # laid out for a checkpoint and back: the same state (SGD's own part is empty)
    tree = optim.state_tree(state)
    assert set(tree) == {"averaging"}
    back = optim.state_from_tree(tx, p, tree)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------ the optimiser transformation (optim.name)

def _tree(rng):
    return {"w": rng.normal(size=(3, 2)).astype(np.float32),
            "b": rng.normal(size=(4,)).astype(np.float32)}


def _numpy_clip(g, clip):
    norm = np.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in g.values()))
    scale = min(1.0, clip / norm)
    return {k: v * scale for k, v in g.items()}, norm


def _run_steps(optimizer, params, grads, lrs):
    """Apply `optimizer` step by step; the parameters after each step, as NumPy."""
    tx = optimizer.transform()
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)
    out = []
    for g, lr in zip(grads, lrs):
        updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, p,
                                   learning_rate=jnp.asarray(lr, jnp.float32))
        p = optax.apply_updates(p, updates)
        out.append({k: np.asarray(v) for k, v in p.items()})
    return out, state


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_and_adamw_steps_equal_numpy(name):
    rng = np.random.default_rng(0)
    params, grads = _tree(rng), [_tree(rng), _tree(rng), _tree(rng)]
    grads[0] = {k: 10 * v for k, v in grads[0].items()}  # over the clip on step 1
    lrs = [0.01, 0.003, 0.02]  # the learning rate changes per step (traced)
    clip, wd, b1, b2, eps = 0.5, 0.1, 0.8, 0.95, 1e-6
    opt = optim.Optimizer(name, clip=clip, wdecay=wd, b1=b1, b2=b2, eps=eps)
    got, _ = _run_steps(opt, params, grads, lrs)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g, norm = _numpy_clip({k: x.astype(np.float64) for k, x in g.items()}, clip)
        if t == 1:
            assert norm > clip  # the clip is active
        for k in p:
            gk = g[k] + wd * p[k] if name == "adam" else g[k]  # L2 before Adam
            m[k] = b1 * m[k] + (1 - b1) * gk
            v2[k] = b2 * v2[k] + (1 - b2) * gk ** 2
            step = (m[k] / (1 - b1 ** t)) / (np.sqrt(v2[k] / (1 - b2 ** t)) + eps)
            if name == "adamw":  # decoupled: decay after Adam, scaled by lr
                step = step + wd * p[k]
            p[k] = p[k] - lr * step
        for k in p:
            np.testing.assert_allclose(got[t - 1][k], p[k], rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_step_equals_numpy(nesterov):
    rng = np.random.default_rng(1)
    params, grads = _tree(rng), [_tree(rng) for _ in range(3)]
    grads[1] = {k: 10 * v for k, v in grads[1].items()}
    lrs = [0.5, 0.2, 0.1]
    clip, wd, mu = 1.0, 0.05, 0.7
    got, _ = _run_steps(optim.Optimizer("momentum", clip=clip, wdecay=wd, momentum=mu,
                                        nesterov=nesterov), params, grads, lrs)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    for t, (g, lr) in enumerate(zip(grads, lrs)):
        g, _ = _numpy_clip({k: x.astype(np.float64) for k, x in g.items()}, clip)
        for k in p:
            d = g[k] + wd * p[k]
            buf[k] = mu * buf[k] + d  # torch's SGD momentum (dampening 0)
            p[k] = p[k] - lr * (d + mu * buf[k] if nesterov else buf[k])
        for k in p:
            np.testing.assert_allclose(got[t][k], p[k], rtol=2e-5, atol=1e-6)


def test_sgd_is_the_papers_rule_with_an_empty_state():
    rng = np.random.default_rng(2)
    params, grads = _tree(rng), [{k: 10 * v for k, v in _tree(rng).items()}]
    got, state = _run_steps(optim.Optimizer("sgd", clip=0.25, wdecay=0.1), params, grads,
                            [2.0])
    g, norm = _numpy_clip({k: x.astype(np.float64) for k, x in grads[0].items()}, 0.25)
    assert norm > 0.25
    for k in params:
        want = params[k] - 2.0 * (g[k] + 0.1 * params[k])
        np.testing.assert_allclose(got[0][k], want, rtol=1e-5, atol=1e-6)
    assert jax.tree_util.tree_leaves(state) == []  # nothing to checkpoint


def test_stateful_optimisers_have_state_and_configs_map_to_them():
    c = config_lib.default_config()
    assert optim.from_config(c.optim) == optim.Optimizer(
        "sgd", clip=0.25, wdecay=1.2e-6, momentum=0.9, nesterov=False, b1=0.9,
        b2=0.999, eps=1e-8)
    c.optim.name, c.optim.b1 = "adam", 0.5
    adam = optim.from_config(c.optim)
    assert (adam.name, adam.b1) == ("adam", 0.5)
    p = {"w": jnp.zeros((2, 3))}
    shapes = [x.shape for x in jax.tree_util.tree_leaves(adam.transform().init(p))]
    assert sorted(shapes) == [(), (2, 3), (2, 3)]  # count, first and second moments


def test_unknown_optimiser_and_bad_hyperparameters_are_config_errors():
    with pytest.raises(ConfigError, match=r"optim.name='lion': use one of adam, adamw, "
                                          r"momentum, sgd"):
        optim.Optimizer("lion")
    with pytest.raises(ConfigError, match=r"optim.b2 must be in \[0, 1\), got 1.0"):
        optim.Optimizer("adam", b2=1.0)
    with pytest.raises(ConfigError, match="optim.eps must be positive"):
        optim.Optimizer("adam", eps=0.0)


def test_an_optimiser_registered_in_one_place_is_usable_by_name():
    @optim.register("sign_sgd_test")
    def _sign(o):
        return [optax.GradientTransformation(
            lambda p: optax.EmptyState(),
            lambda u, s, p=None: (jax.tree_util.tree_map(jnp.sign, u), s))]
    try:
        got, _ = _run_steps(optim.Optimizer("sign_sgd_test", clip=0.0), {"w": np.ones(3, np.float32)},
                            [{"w": np.asarray([2.0, -3.0, 0.0], np.float32)}], [0.5])
        np.testing.assert_array_equal(got[0]["w"], [0.5, 1.5, 1.0])
    finally:
        del optim.OPTIMIZERS["sign_sgd_test"]


def test_an_optimiser_registered_with_its_own_schedule_counts_it_in_its_state():
    """`register(name, schedule=...)`: the optimiser's own multiplier, here halving
    every 2 updates, by hand; the schedule keys are not asked."""
    optim.register("halving_test", schedule=lambda o: lambda count: 0.5 ** (count // 2))(
        lambda o: [])
    try:
        o = optim.Optimizer("halving_test", clip=0.0)
        assert not o.has_schedule and o.schedule is not None
        tx, p = o.transform(averaging=True), {"w": jnp.zeros(2)}
        state = tx.init(p)
        for s in range(5):
            updates, state = tx.update({"w": jnp.asarray([1.0, -2.0])}, state, p,
                                       learning_rate=3.0)
            want = 3.0 * 0.5 ** (s // 2)
            np.testing.assert_allclose(updates["w"], [-want, 2 * want], rtol=1e-6)
            assert float(o.learning_rate(state, 3.0)) == pytest.approx(want)
    finally:
        del optim.OPTIMIZERS["halving_test"], optim.SCHEDULES["halving_test"]


def test_schedule_warmup_then_cosine_by_hand():
    o = optim.Optimizer("adamw", warmup_steps=4, decay_steps=10, min_lr_ratio=0.1)
    assert o.has_schedule and not optim.Optimizer("adamw").has_schedule
    got = {s: float(jax.jit(o.lr_multiplier)(s)) for s in (0, 1, 3, 4, 9, 14, 30)}
    # warm-up (s + 1) / 4; then 0.1 + 0.9 * (1 + cos(pi * (s - 4) / 10)) / 2
    want = {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 9: 0.55, 14: 0.1, 30: 0.1}
    for s in want:
        assert got[s] == pytest.approx(want[s], abs=1e-6), s
    assert float(optim.Optimizer("sgd").lr_multiplier(7)) == 1.0
    with pytest.raises(ConfigError, match="min_lr_ratio"):
        optim.Optimizer("sgd", min_lr_ratio=1.5)
    with pytest.raises(ConfigError, match="warmup_steps"):
        optim.Optimizer("sgd", warmup_steps=-1)


def test_the_schedule_counts_in_the_state_and_the_applied_lr_is_read_from_it():
    """The schedule's count is the optimiser state's (one leaf more than without a
    schedule); each update's step is `lr * multiplier(count)`, and
    `Optimizer.learning_rate(state, lr)` gives that value for the last update, by hand:
    warm-up (s + 1) / 2, then a cosine to 0.2 over 4 updates."""
    import math
    o = optim.Optimizer("sgd", clip=0.0, warmup_steps=2, decay_steps=4, min_lr_ratio=0.2)
    p = {"w": jnp.zeros(3)}
    assert jax.tree_util.tree_leaves(optim.Optimizer("sgd").transform().init(p)) == []
    for tx in (o.transform(), o.transform(averaging=True)):
        state = tx.init(p)
        for s in range(8):
            factor = min(1.0, (s + 1) / 2)
            factor *= 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * min(max((s - 2) / 4, 0), 1)))
            lr = 0.5 + s  # a different lr given to every update
            updates, state = tx.update({"w": jnp.ones(3)}, state, p, learning_rate=lr)
            np.testing.assert_allclose(updates["w"], -lr * factor * np.ones(3), rtol=1e-6)
            assert float(o.learning_rate(state, lr)) == pytest.approx(lr * factor, rel=1e-6)
        counts = [int(x) for x in jax.tree_util.tree_leaves(state) if x.dtype == jnp.int32]
        assert 8 in counts
    assert float(optim.Optimizer("sgd").learning_rate(optim.Optimizer("sgd").transform(
        averaging=True).init(p), 0.25)) == 0.25


def test_train_step_scales_its_lr_by_the_schedule():
    from mos_jax import model, train
    cfg = model.ModelConfig(vocab_size=9, emsize=4, nhid=4, nhidlast=4, nlayers=1,
                            head="softmax", dropout=0.0, dropouth=0.0, dropouti=0.0,
                            dropoute=0.0, dropoutl=0.0, wdrop=0.0)
    params = model.init_params(cfg, jax.random.key(0))
    seq = jnp.asarray(np.random.default_rng(0).integers(0, 9, size=(6, 2)))
    grads = jax.jit(jax.grad(lambda p: model.regularized_loss(
        cfg, p, seq[:-1], seq[1:], model.init_carry(cfg, 2), 0.0, 0.0)[0]))(params)
    o = optim.Optimizer("sgd", clip=0.0, warmup_steps=4)
    step = train.TrainStep(cfg, alpha=0.0, beta=0.0, bptt=5, n_groups=1, seed=0,
                           optimizer=o)
    state = train.init_state(cfg, jax.tree_util.tree_map(jnp.copy, params), 2, step.tx)
    state, _ = step(state, seq[:-1], seq[1:], 5, 5, 2.0)  # step 0: lr 2 * 1/4
    for p, g, new in zip(*(jax.tree_util.tree_leaves(t) for t in
                           (params, grads, state.params))):
        np.testing.assert_allclose(new, np.asarray(p) - 0.5 * np.asarray(g), atol=1e-6)


def test_the_progress_line_shows_the_scheduled_lr(tmp_path, monkeypatch):
    """Each logged step's lr is the base lr (scaled by the window length, as in the step)
    times the schedule at that step, by hand: warm-up (s + 1) / 4, then a cosine to 0.1
    over 10 steps."""
    import math
    from pathlib import Path

    from mos_jax import config as config_lib
    from mos_jax import train
    tiny = Path(__file__).resolve().parents[1] / "configs" / "tiny.py"
    config = config_lib.load_config(tiny, [
        ("data.bptt", "8"), ("data.max_seq_len_delta", "0"), ("optim.name", "adamw"),
        ("optim.lr", "0.01"), ("optim.asgd", "False"), ("optim.warmup_steps", "4"),
        ("optim.decay_steps", "10"), ("optim.min_lr_ratio", "0.1"),
        ("train.max_epochs", "1"), ("train.steps_per_epoch", "16"),
        ("train.log_every_steps", "1"), ("train.test", "False")])
    seen = []
    log_step = train._Loop._log_step

    def spy(self, progress, done, window, loss):
        shown = []
        update = progress.update
        progress.update = lambda *a, **k: (shown.append(k.get("lr")), update(*a, **k))
        try:
            log_step(self, progress, done, window, loss)
        finally:
            del progress.update
        seen.append((self.host_step - 1, window.seq_len, shown[0]))

    monkeypatch.setattr(train._Loop, "_log_step", spy)
    train.train_and_evaluate(config, tmp_path / "run", log=lambda _: None)
    assert [s for s, _, _ in seen] == list(range(16))
    for s, seq_len, lr in seen:
        factor = min(1.0, (s + 1) / 4)
        done = min(max((s - 4) / 10, 0.0), 1.0)
        factor *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))
        assert lr == pytest.approx(0.01 * seq_len / 8 * factor, rel=1e-5), s
    from mos_jax.progress import read_metrics
    epoch, = [m for m in read_metrics(tmp_path / "run") if m.get("epoch") == 1]
    assert epoch["lr"] == 0.01  # the base rate
    assert epoch["last_lr"] == pytest.approx(seen[-1][2], rel=1e-6)  # step 15's, applied
