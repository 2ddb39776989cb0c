"""The train step, the epoch loop, NT-ASGD, finetuning and exact resume."""

import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax import batching, config as config_lib, model, optim, train
from mos_jax.checkpoint import CheckpointStore
from mos_jax.errors import CheckpointError, ConfigError
from mos_jax.progress import read_metrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NO_DROPOUT = dict(dropout=0.0, dropouth=0.0, dropouti=0.0, dropoute=0.0, dropoutl=0.0,
                  wdrop=0.0)


def tiny_config(**overrides):
    c = config_lib.load_config_file(CONFIGS / "tiny.py")
    c.train.max_epochs = 2
    c.train.log_every_steps = 5
    for key, value in overrides.items():
        section, name = key.split("__")
        c[section][name] = value
    c.lock()
    return c


def small_model():
    cfg = model.ModelConfig(vocab_size=30, emsize=6, nhid=8, nhidlast=6, nlayers=2,
                            n_experts=3, **NO_DROPOUT)
    return cfg, model.init_params(cfg, jax.random.key(0))


def batch(seq_len, batch_size, seed=0):
    seq = np.random.default_rng(seed).integers(0, 30, size=(seq_len + 1, batch_size))
    return jnp.asarray(seq[:-1]), jnp.asarray(seq[1:])


def test_step_applies_clipped_sgd_with_decay_and_scaled_lr():
    cfg, params = small_model()
    step = train.TrainStep(cfg, alpha=2.0, beta=1.0, bptt=70, n_groups=1, seed=0,
                           clip=0.05, wdecay=0.1)
    inputs, targets = batch(9, 4)
    state = train.init_state(cfg, jax.tree_util.tree_map(jnp.copy, params), 4, step.tx)  # donated
    expected_grads = jax.jit(jax.grad(lambda p: model.regularized_loss(
        cfg, p, inputs, targets, model.init_carry(cfg, 4), 2.0, 1.0)[0]))(params)
    flat = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(expected_grads)])
    norm = np.linalg.norm(flat)
    assert norm > 0.05  # so the clip is active
    new_state, metrics = step(state, inputs, targets, 9, 35, 4.0)
    lr_t = 4.0 * 35 / 70  # lr scaled by seq_len / bptt
    want = jax.tree_util.tree_map(
        lambda p, g: np.asarray(p) - lr_t * (np.asarray(g) * 0.05 / norm + 0.1 * np.asarray(p)),
        params, expected_grads)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                           new_state.params, want)
    assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5)
    assert int(new_state.step) == 1


def test_gradient_accumulation_equals_the_full_batch():
    cfg, params = small_model()
    inputs, targets = batch(11, 6, seed=1)
    results = []
    for groups in (1, 3):
        step = train.TrainStep(cfg, alpha=2.0, beta=1.0, bptt=11, n_groups=groups, seed=0,
                               clip=100.0, wdecay=0.0)
        state = train.init_state(cfg, jax.tree_util.tree_map(jnp.copy, params), 6, step.tx)
        new_state, metrics = step(state, inputs, targets, 11, 11, 1.0)
        results.append((new_state, metrics))
    (full, m_full), (acc, m_acc) = results
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                           full.params, acc.params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                           full.carry, acc.carry)
    assert float(m_acc["loss"]) == pytest.approx(float(m_full["loss"]), abs=1e-6)


def test_small_batch_size_must_divide():
    with pytest.raises(ConfigError, match=r"must divide data\.batch_size=15: use one of \[1, 3, 5, 15\]"):
        train.column_groups(15, 4)
    assert train.column_groups(15, 5) == 3 and train.column_groups(15, -1) == 1


def test_compilations_are_bounded_over_a_whole_epoch(tmp_path):
    # bptt 70 with lengths up to 110, as PTB: ~140 random windows, few programs.
    c = tiny_config(data__bptt=70, data__max_seq_len_delta=40, data__batch_size=2,
                    train__max_epochs=1, train__seed=4242, train__test=False,
                    train__eval_max_tokens=400)
    result = train.train_and_evaluate(c, tmp_path / "run", log=lambda m: None)
    rows = batching.batchify(train.load_corpus_from(c).train, 2)
    windows = list(batching.train_windows(len(rows), np.random.default_rng([4242, 1]), 70, 110))
    used = {w.padded for w in windows}
    assert len(windows) > 100
    assert result["compilations"] == len(used) <= len(batching.default_buckets(70, 110)) <= 8


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 2-epoch tiny run: its final state and result."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = train.train_and_evaluate(tiny_config(), workdir, log=lambda m: None)
    return workdir, result


def final_tree(workdir):
    store = CheckpointStore(workdir, read_only=True)
    c = train.load_run_config(workdir)
    mc = train.model_config_from(c, 50)
    tx = optim.sgd_transform(c.optim.clip, c.optim.wdecay)
    abstract = jax.eval_shape(lambda: train._state_tree(train.init_state(
        mc, model.init_params(mc, jax.random.key(0)), c.data.batch_size, tx)))
    tree, meta = store.restore(abstract)
    store.close()
    return tree, meta


def assert_bit_identical(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_resume_after_stops_is_bit_identical(reference_run, tmp_path):
    ref_dir, ref_result = reference_run
    workdir = tmp_path / "resumed"
    # Stop mid-epoch 1, then mid-epoch 2, then run to the end: three invocations.
    for stop in (37, 160, 0):
        result = train.train_and_evaluate(tiny_config(train__stop_at_step=stop), workdir,
                                          log=lambda m: None)
        if stop:
            assert result["stopped"].startswith("reached") and result["step"] == stop
        if stop == 37:  # the epoch's train loss counts every step, not only logged ones
            _, meta = final_tree(workdir)
            assert meta["epoch_steps"] == 37 and meta["batch_in_epoch"] == 37
    ref_tree, ref_meta = final_tree(ref_dir)
    tree, meta = final_tree(workdir)
    assert_bit_identical(tree, ref_tree)
    assert meta["history"] == ref_meta["history"]
    assert result["test_ppl"] == ref_result["test_ppl"]
    assert result["valid_ppl"] == ref_result["valid_ppl"]


def test_ctrl_c_saves_and_resumes_exactly(reference_run, tmp_path, monkeypatch):
    ref_dir, ref_result = reference_run
    workdir = tmp_path / "interrupted"

    class CtrlCAtStep50(train.Progress):
        def update(self, done, *args, **kwargs):
            super().update(done, *args, **kwargs)
            if self.label.endswith("epoch 1") and done == 50:
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train, "Progress", CtrlCAtStep50)
    with pytest.raises(KeyboardInterrupt, match="checkpoint saved at step 50"):
        train.train_and_evaluate(tiny_config(), workdir, log=lambda m: None)
    assert CheckpointStore(workdir).latest_step() == 50
    monkeypatch.undo()
    result = train.train_and_evaluate(tiny_config(), workdir, log=lambda m: None)
    assert_bit_identical(final_tree(workdir)[0], final_tree(ref_dir)[0])
    assert result["test_ppl"] == ref_result["test_ppl"]
    # A finished run reports its result again instead of training more.
    again = train.train_and_evaluate(tiny_config(), workdir, log=lambda m: None)
    assert again["test_ppl"] == result["test_ppl"]


def test_nt_asgd_switches_by_the_rule_and_evaluates_the_average(tmp_path):
    # A large lr makes validation loss bounce, so the non-monotone trigger fires. One
    # epoch at a time (a resume each), so that the best weights are checked whichever
    # epoch is best: saved when best (the average once averaging), kept until beaten.
    def config(epochs):
        return tiny_config(optim__lr=80.0, optim__nonmono=1, train__max_epochs=epochs,
                           train__test=False)

    workdir = tmp_path / "asgd"
    saved, averaged_best = {}, 0
    for epochs in range(1, 7):
        result = train.train_and_evaluate(config(epochs), workdir, log=lambda m: None)
        records = [r for r in read_metrics(workdir) if not r.get("final")]
        assert len(records) == epochs
        tree, _ = final_tree(workdir)
        best, _ = CheckpointStore(workdir).restore_best(
            jax.eval_shape(lambda: tree["params"]))
        if result["best_epoch"] == epochs:  # this epoch's evaluated weights were saved
            averaging = records[-1]["averaging"]
            assert_bit_identical(best, tree["averaging"]["average"] if averaging
                                 else tree["params"])
            saved[epochs] = best
            averaged_best += averaging
        else:  # an earlier best is kept as it was
            assert_bit_identical(best, saved[result["best_epoch"]])
    assert averaged_best >= 1, "no averaged epoch was the best: nothing checked the average"
    losses = [r["valid_loss"] for r in records]
    switched = None
    for e, r in enumerate(records):
        # Averaged weights are evaluated from the epoch after the switch on.
        assert r["averaging"] == (switched is not None), (e, losses)
        if switched is None and optim.should_switch(losses[:e], losses[e], 1):
            switched = e
    assert switched is not None, f"the trigger never fired: {losses}"
    tree, meta = final_tree(workdir)
    assert meta["switched_at_epoch"] == switched + 1
    assert bool(tree["averaging"]["active"])


def test_finetune_keeps_start_weights_when_nothing_improves(reference_run, tmp_path):
    ref_dir, ref_result = reference_run
    c = tiny_config(finetune__init_from=str(ref_dir), finetune__lr=0.0,
                    finetune__max_epochs=2, train__test=False)
    logs = []
    result = train.finetune(c, tmp_path / "ft0", log=logs.append)
    assert result["best_epoch"] == 0
    assert result["valid_ppl"] == pytest.approx(ref_result["valid_ppl"], rel=1e-9)
    assert any("no epoch improved" in m for m in logs)


def test_finetune_stops_by_the_non_monotone_rule(reference_run, tmp_path):
    ref_dir, _ = reference_run
    c = tiny_config(finetune__init_from=str(ref_dir), finetune__lr=60.0,
                    finetune__max_epochs=8, optim__nonmono=1, train__test=False)
    train.finetune(c, tmp_path / "ft", log=lambda m: None)
    records = [r for r in read_metrics(tmp_path / "ft") if not r.get("final")]
    losses = [r["valid_loss"] for r in records]
    assert all(r["averaging"] for r in records)
    stops = [e for e in range(len(losses)) if optim.should_switch(losses[:e], losses[e], 1)]
    assert stops, f"the stop rule never fired in 8 epochs: {losses}"
    assert len(records) == stops[0] + 1 < 8, losses  # stopped at the first trigger


def test_errors_nan_corrupt_checkpoint_and_mismatched_config(tmp_path):
    with pytest.raises(train.TrainingError, match="optim.lr"):
        train.train_and_evaluate(tiny_config(optim__lr=float("nan")), tmp_path / "nan",
                                 log=lambda m: None)
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config(train__stop_at_step=20), workdir,
                             log=lambda m: None)
    with pytest.raises(ConfigError, match="was started with model.emsize=16"):
        train.train_and_evaluate(tiny_config(model__emsize=8, model__nhidlast=8), workdir,
                                 log=lambda m: None)
    for f in (workdir / "checkpoints").rglob("*"):
        if f.is_file() and "state" in f.parts:
            f.write_bytes(b"\0garbage")
    with pytest.raises(CheckpointError, match="cannot be restored"):
        train.train_and_evaluate(tiny_config(), workdir, log=lambda m: None)
    with pytest.raises(ConfigError, match="init_from"):
        train.finetune(tiny_config(), tmp_path / "ft", log=lambda m: None)
