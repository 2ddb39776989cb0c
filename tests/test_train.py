"""The train step, the epoch loop, NT-ASGD, finetuning and exact resume."""

import dataclasses
import json
import os
import shutil
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
                           optimizer=optim.Optimizer("sgd", clip=0.05, wdecay=0.1))
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
                               optimizer=optim.Optimizer("sgd", clip=100.0, wdecay=0.0))
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
    tx = optim.from_config(c.optim).transform(averaging=True)
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


def test_ctrl_c_in_validation_saves_and_resumes_exactly_and_in_the_test_finishes(
        reference_run, tmp_path, monkeypatch):
    """Ctrl-C while epoch 1 validates: the loop saves the epoch's training and stops
    with the usual message; the resume redoes the validation and ends bit-identical to
    the uninterrupted run. Ctrl-C during the final test is answered at once and the
    run still ends with the test's result."""
    ref_dir, ref_result = reference_run
    ref_epochs = [r for r in read_metrics(ref_dir) if "epoch" in r]
    workdir = tmp_path / "interrupted_validation"
    seen = []

    class CtrlCWhileEvaluating(train.Progress):
        target = "train epoch 1 validation"

        def count(self, done, total):
            super().count(done, total)
            seen.append((self.label, done, total))
            if self.label == self.target and [s[0] for s in seen].count(self.target) == 2:
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train, "Progress", CtrlCWhileEvaluating)
    with pytest.raises(KeyboardInterrupt,
                       match=r"during the validation of epoch 1; checkpoint saved at step "
                             rf"{ref_epochs[0]['step']} .*continue with `mos-jax train"):
        train.train_and_evaluate(tiny_config(), workdir, log=lambda m: None)
    # the validation stopped at the next window (2 of many), before anything was written
    assert [s[0] for s in seen] == ["train epoch 1 validation"] * 2
    assert seen[1][2] > 2 * tiny_config().data.bptt
    tree, meta = final_tree(workdir)
    assert int(tree["step"]) == ref_epochs[0]["step"]
    assert (meta["epoch"], meta["history"]) == (1, [])
    assert meta["batch_in_epoch"] == meta["epoch_steps"] == ref_epochs[0]["step"]
    assert read_metrics(workdir) == []

    seen.clear()
    CtrlCWhileEvaluating.target = "train test"
    notes = []
    result = train.train_and_evaluate(tiny_config(), workdir, log=notes.append)
    assert any(n.startswith("Ctrl-C: training is over and saved") for n in notes)
    test_calls = [s for s in seen if s[0] == "train test"]
    assert len(test_calls) > 2 and test_calls[-1][1] == test_calls[-1][2]  # all of it
    assert_bit_identical(final_tree(workdir)[0], final_tree(ref_dir)[0])
    assert result["test_ppl"] == ref_result["test_ppl"]
    assert result["valid_ppl"] == ref_result["valid_ppl"]
    epochs = [r for r in read_metrics(workdir) if "epoch" in r]
    assert [r["valid_loss"] for r in epochs] == [r["valid_loss"] for r in ref_epochs]


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
        records = [r for r in read_metrics(workdir) if "valid_loss" in r and not r.get("final")]
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
    records = [r for r in read_metrics(tmp_path / "ft") if "valid_loss" in r and not r.get("final")]
    losses = [r["valid_loss"] for r in records]
    assert all(r["averaging"] for r in records)
    stops = [e for e in range(len(losses)) if optim.should_switch(losses[:e], losses[e], 1)]
    assert stops, f"the stop rule never fired in 8 epochs: {losses}"
    assert len(records) == stops[0] + 1 < 8, losses  # stopped at the first trigger


def test_errors_nan_corrupt_checkpoint_and_mismatched_config(tmp_path):
    # a NaN learning rate is refused before any work (divergence: test_run_life.py)
    with pytest.raises(ConfigError, match=r"optim\.lr=nan is out of range"):
        train.train_and_evaluate(tiny_config(optim__lr=float("nan")), tmp_path / "nan",
                                 log=lambda m: None)
    assert not (tmp_path / "nan").exists()
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


# ------------------------------------------------ optimisers with state; the loop's parts

SHORT = dict(train__steps_per_epoch=12, train__max_epochs=2, train__test=False,
             train__eval_max_tokens=200)  # the programs of `reference_run`, for SGD


def tree_of(workdir, optimizer_name):
    """The latest checkpoint's tree, restored into the shapes of `optimizer_name`'s state."""
    store = CheckpointStore(workdir, read_only=True)
    c = train.load_run_config(workdir)
    mc = train.model_config_from(c, 50)
    tx = optim.from_config(c.optim).transform(averaging=True)
    assert c.optim.name == optimizer_name
    abstract = jax.eval_shape(lambda: train._state_tree(train.init_state(
        mc, model.init_params(mc, jax.random.key(0)), c.data.batch_size, tx)))
    tree, meta = store.restore(abstract)
    store.close()
    return tree, meta


def test_adam_trains_checkpoints_and_resumes_bit_identically(tmp_path):
    adam = dict(SHORT, optim__name="adam", optim__lr=0.003, optim__wdecay=0.01)
    whole = train.train_and_evaluate(tiny_config(**adam), tmp_path / "whole",
                                     log=lambda m: None)
    assert whole["finished"] and whole["reason"] == "reached train.max_epochs=2"
    assert whole["trained_steps"] == 24
    for stop in (5, 17, 0):  # mid-epoch 1, mid-epoch 2, then to the end
        result = train.train_and_evaluate(tiny_config(**adam, train__stop_at_step=stop),
                                          tmp_path / "parts", log=lambda m: None)
        if stop:
            assert not result["finished"] and result["step"] == stop
            assert result["reason"] == f"reached train.stop_at_step={stop}"
    assert result["finished"] and result["trained_steps"] == 24 - 17
    ref, ref_meta = tree_of(tmp_path / "whole", "adam")
    got, meta = tree_of(tmp_path / "parts", "adam")
    assert int(ref["opt_state"][0]) == 24  # Adam's step count: the state is saved
    assert len(ref["opt_state"]) == 1 + 2 * len(jax.tree_util.tree_leaves(ref["params"]))
    assert_bit_identical(got, ref)  # params, opt_state, averaging, carry, step
    assert meta["history"] == ref_meta["history"] and meta["optimizer"] == "adam"


def _write_old_layout(source, dest):
    """`source`'s latest checkpoint and config as the previous layout wrote them: no
    optimiser state or name in the checkpoint, no optimiser keys in config.json."""
    store = CheckpointStore(source, read_only=True)
    c = train.load_run_config(source)
    mc = train.model_config_from(c, 50)
    abstract = jax.eval_shape(lambda: {
        "step": jnp.zeros((), jnp.int32), "params": model.init_params(mc, jax.random.key(0)),
        "averaging": {"active": jnp.zeros((), bool), "count": jnp.zeros((), jnp.int32),
                      "average": model.init_params(mc, jax.random.key(0))},
        "carry": model.init_carry(mc, c.data.batch_size)})
    tree, meta = store.restore(abstract)  # an SGD checkpoint holds exactly these
    store.close()
    del meta["optimizer"]
    shutil.copytree(source, dest)  # best/ and metrics as they are
    shutil.rmtree(Path(dest) / "checkpoints")
    old = CheckpointStore(dest)
    old.save(int(tree["step"]), tree, meta)
    old.close()
    saved = json.loads((Path(source) / "config.json").read_text())
    for key in ("name", "momentum", "nesterov", "b1", "b2", "eps"):
        del saved["optim"][key]
    (Path(dest) / "config.json").write_text(json.dumps(saved))


def test_a_work_directory_of_the_previous_layout_resumes_or_says_why(tmp_path):
    whole = train.train_and_evaluate(tiny_config(**SHORT), tmp_path / "whole",
                                     log=lambda m: None)
    train.train_and_evaluate(tiny_config(**SHORT, train__stop_at_step=15),
                             tmp_path / "new", log=lambda m: None)
    _write_old_layout(tmp_path / "new", tmp_path / "old")
    # Another optimiser cannot take over: the config says why ...
    with pytest.raises(ConfigError, match=r"started with optim.name='sgd', not 'adam'"):
        train.train_and_evaluate(tiny_config(**SHORT, optim__name="adam"),
                                 tmp_path / "old", log=lambda m: None)
    # ... and so do the checkpoints, without the config.
    config_json = (tmp_path / "old" / "config.json").read_text()
    (tmp_path / "old" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"hold the state of optimiser 'sgd'.*"
                                              r"not of 'adam'"):
        train.train_and_evaluate(tiny_config(**SHORT, optim__name="adam"),
                                 tmp_path / "old", log=lambda m: None)
    (tmp_path / "old" / "config.json").write_text(config_json)
    # SGD's state is empty: the old layout resumes, to the same numbers.
    result = train.train_and_evaluate(tiny_config(**SHORT), tmp_path / "old",
                                      log=lambda m: None)
    assert result["finished"] and result["trained_steps"] == 24 - 15
    assert_bit_identical(final_tree(tmp_path / "old")[0], final_tree(tmp_path / "whole")[0])
    assert result["valid_loss"] == whole["valid_loss"]


def test_a_checkpoint_from_before_the_schedule_count_was_state_resumes(tmp_path):
    """A run with a schedule checkpointed before the schedule's count was part of the
    optimiser state (one leaf fewer) restores with the count set to its step; one of
    the current layout restores as it was saved."""
    from types import SimpleNamespace
    o = optim.Optimizer("adamw", clip=0.0, warmup_steps=8)
    tx = o.transform(averaging=True)
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    state = train.TrainState(jnp.asarray(5, jnp.int32), params, tx.init(params),
                             ((jnp.zeros((2, 3)), jnp.ones((2, 3))),))
    tree = jax.tree_util.tree_map(np.asarray, train._state_tree(state))
    # Adam's count and moments, the learning rate's count
    assert len(tree["opt_state"]) == 1 + 2 * 2 + 1
    old = dict(tree, opt_state=tree["opt_state"][:-1])  # as written before
    for name, saved in (("old", old), ("new", dict(tree, opt_state=[
            *tree["opt_state"][:-1], np.asarray(5, np.int32)]))):
        with CheckpointStore(tmp_path / name) as store:
            store.save(5, saved, {"mode": "train"})
        logs = []
        run = SimpleNamespace(abstract=jax.eval_shape(lambda: tree), optimizer=o,
                              store=CheckpointStore(tmp_path / name), log=logs.append)
        got, meta = train._restore_latest(run)
        run.store.close()
        assert meta == {"mode": "train"} and len(logs) == (name == "old")
        assert_bit_identical(got, dict(tree, opt_state=[*tree["opt_state"][:-1], 5]))
        restored = train._state_from_tree(got, tx)
        # the last of 5 updates was in the warm-up, at 5 / 8 of the learning rate
        assert float(o.learning_rate(restored.opt_state, 2.0)) == pytest.approx(1.25)


def test_a_schedule_taken_off_on_resume_drops_its_count(tmp_path):
    """A resume may change the schedule keys (any optim key but the name): a run
    checkpointed with a schedule (its count the optimiser state's last leaf) resumes
    without one, the count dropped; SGD's state is then empty again."""
    from types import SimpleNamespace
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    for name in ("sgd", "adam"):
        scheduled = optim.Optimizer(name, clip=0.0, warmup_steps=8).transform(averaging=True)
        tree = jax.tree_util.tree_map(np.asarray, train._state_tree(train.TrainState(
            jnp.asarray(5, jnp.int32), params, scheduled.init(params), ())))
        with CheckpointStore(tmp_path / name) as store:
            store.save(5, tree, {"mode": "train"})
        o = optim.Optimizer(name, clip=0.0)  # no schedule now
        want = train._state_tree(train.TrainState(jnp.asarray(5, jnp.int32), params,
                                                  o.transform(averaging=True).init(params),
                                                  ()))
        assert len(tree["opt_state"]) == len(want.get("opt_state", [])) + 1
        run = SimpleNamespace(abstract=jax.eval_shape(lambda: want), optimizer=o,
                              store=CheckpointStore(tmp_path / name), log=lambda m: None)
        got, _ = train._restore_latest(run)
        run.store.close()
        assert_bit_identical(got, dict(tree, opt_state=tree["opt_state"][:-1])
                             if name == "adam" else
                             {k: v for k, v in tree.items() if k != "opt_state"})
        restored = train._state_from_tree(got, o.transform(averaging=True))
        assert float(o.learning_rate(restored.opt_state, 2.0)) == 2.0


def test_a_finished_run_is_reported_as_finished_without_training(tmp_path):
    c = tiny_config(**dict(SHORT, train__max_epochs=1))
    first = train.train_and_evaluate(c, tmp_path / "run", log=lambda m: None)
    logs = []
    again = train.train_and_evaluate(c, tmp_path / "run", log=logs.append)
    assert first["finished"] and first["trained_steps"] == 12
    assert again["finished"] and again["trained_steps"] == 0
    assert again["reason"] == first["reason"] == "reached train.max_epochs=1"
    assert again["valid_loss"] == first["valid_loss"]
    assert any("has finished" in m for m in logs)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def policy_config(**train):
    c = config_lib.default_config().train
    c.update({**dict(stop_at_step=0, time_budget_s=0.0, checkpoint_every_s=600.0), **train})
    return c


def test_stop_policy_decisions():
    clock = FakeClock()
    P = train.StopPolicy
    with P(policy_config(checkpoint_every_s=10.0, time_budget_s=30.0), clock=clock) as p:
        assert p.after_step(1, checked=False, last=False) is None
        clock.now += 11
        assert p.after_step(2, checked=False, last=True) is None  # the epoch's end saves
        assert p.after_step(3, checked=False, last=False) == P.SAVE
        p.saved()
        clock.now += 5
        assert p.after_step(4, checked=False, last=False) is None  # 5 s since the save
        clock.now += 15  # 31 s since the start: over the budget
        assert p.after_step(5, checked=False, last=True) is None and p.reason
        assert p.after_step(6, checked=False, last=False) == P.STOP
        assert p.reason == "used the time budget of 30 s"
    p = P(policy_config(stop_at_step=7), clock=clock)
    assert p.after_step(6, False, False) is None and p.reason is None
    assert p.after_step(7, False, False) == P.STOP
    assert p.reason == "reached train.stop_at_step=7"


def test_stop_policy_catches_ctrl_c_and_asks_the_plan_to_agree():
    class Plan:  # two processes: the other one saw Ctrl-C; process 0's clocks count
        calls = []

        def agree(self, check, requested, *elapsed):
            self.calls.append((check, requested))
            return (check, *(e + 1000.0 for e in elapsed)) if check else (False, 0.0, 0.0)

    clock = FakeClock()
    p = train.StopPolicy(policy_config(time_budget_s=500.0), Plan(), clock=clock)
    with p:
        assert p.after_step(1, checked=False, last=False) is None
        assert p.after_step(2, checked=True, last=False) == p.INTERRUPT
    assert Plan.calls == [(False, False), (True, False)]
    with p:
        os.kill(os.getpid(), signal.SIGINT)  # caught while the policy is open
        assert p._interrupt.requested
    assert signal.getsignal(signal.SIGINT) is not p._interrupt._handle


def test_early_stopping_rule_by_hand():
    ln = np.log
    # perplexities 100 -> 90 (10% better) -> 89.5 (0.56% better)
    history = [ln(100.0), ln(90.0), ln(89.5)]
    assert not optim.stopped_improving(history[:2], 0.01)
    assert optim.stopped_improving(history, 0.01)
    assert not optim.stopped_improving(history, 0.005)  # 0.56% > 0.5%
    assert not optim.stopped_improving(history, 0.0)  # off
    # patience 2: best of the last two (89.5) against the best before them (100):
    # 11.7% over two epochs, more than 2 x 5%; less than 2 x 6%
    assert not optim.stopped_improving(history, 0.05, patience=2)
    assert optim.stopped_improving(history, 0.06, patience=2)
    # a worse epoch is no improvement at all
    assert optim.stopped_improving([ln(100.0), ln(101.0)], 0.001)
    assert not optim.stopped_improving([ln(100.0)], 0.5)  # one epoch: nothing to compare


def test_early_stopping_ends_training_and_a_rerun_says_finished(tmp_path):
    short = dict(SHORT, train__max_epochs=4, train__min_improvement=0.02)
    logs = []
    result = train.train_and_evaluate(tiny_config(**short), tmp_path / "run",
                                      log=logs.append)
    ppl = [m["valid_ppl"] for m in read_metrics(tmp_path / "run")
           if m.get("mode") == "train" and not m.get("final")]
    # the rule, recomputed from the logged perplexities: the first epoch whose best
    # perplexity is less than 2% below the best before it
    expected = next((e for e in range(2, 5)
                     if min(ppl[:e - 1]) / min(ppl[:e]) < 1.02), 4)
    assert len(ppl) == expected < 4 and result["finished"]
    assert result["trained_steps"] == 12 * expected
    assert "improved by less than 2.00%" in result["reason"]
    again = train.train_and_evaluate(tiny_config(**short), tmp_path / "run",
                                     log=logs.append)
    assert again["trained_steps"] == 0 and "min_improvement" in logs[-1]
    on = train.train_and_evaluate(tiny_config(**dict(short, train__min_improvement=0.0)),
                                  tmp_path / "run", log=logs.append)
    assert on["trained_steps"] == 12 * (4 - expected)


def test_an_early_stop_at_the_stop_step_finishes_the_run(tmp_path):
    # The early stop is decided at the end of epoch 2, the step train.stop_at_step
    # also names: the run is finished (not "stopped, continue with"), and a rerun
    # trains no further epoch.
    short = dict(SHORT, train__max_epochs=4, train__min_improvement=0.5)
    result = train.train_and_evaluate(tiny_config(**short, train__stop_at_step=24),
                                      tmp_path / "run", log=lambda m: None)
    assert result["finished"] and "min_improvement" in result["reason"]
    assert result["trained_steps"] == 24
    again = train.train_and_evaluate(tiny_config(**short), tmp_path / "run",
                                     log=lambda m: None)
    assert again["finished"] and again["trained_steps"] == 0


def test_a_run_builds_its_plan_and_optimiser_once_and_reads_no_config_below_set_up(
        tmp_path, monkeypatch):
    """The run object (issue 22): the placement plan and the optimiser are built once
    per run, in its set-up, and nothing after the set-up reads the config: once
    `_setup` has returned, the config it was given is emptied, so any later read of a
    key fails. A run stopped at a step, its resume to the end (validations, NT-ASGD,
    the test) and a finetune from it each still finish, with the numbers of the same
    runs untouched (the uninterrupted run's)."""
    from ml_collections import ConfigDict

    from mos_jax import parallel
    calls = []

    def count(module, name):
        real = getattr(module, name)

        def counted(*args, **kwargs):
            calls.append(f"{module.__name__}.{name}")
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    count(parallel, "from_config")
    count(optim, "from_config")
    real_setup, runs = train._setup, []

    def setup(config, *args, **kwargs):
        run = real_setup(config, *args, **kwargs)
        runs.append(run)
        config.unlock()
        for section in list(config.keys()):
            del config[section]
        return run
    monkeypatch.setattr(train, "_setup", setup)

    def once(what, call):
        calls.clear()
        result = call()
        assert sorted(calls) == ["mos_jax.optim.from_config",
                                 "mos_jax.parallel.from_config"], what
        run = runs[-1]
        held = [getattr(run, f.name) for f in dataclasses.fields(run)]
        assert not any(isinstance(value, ConfigDict) for value in held), what
        assert all(isinstance(getattr(run.settings, f.name), (bool, int, float, str))
                   for f in dataclasses.fields(run.settings)), what
        return result

    work, ft = tmp_path / "run", tmp_path / "ft"
    quiet = dict(log=lambda m: None)
    stopped = once("a stop", lambda: train.train_and_evaluate(
        tiny_config(train__stop_at_step=5, train__steps_per_epoch=8, optim__nonmono=1),
        work, **quiet))
    assert stopped["finished"] is False and stopped["step"] == 5
    result = once("its resume", lambda: train.train_and_evaluate(
        tiny_config(train__steps_per_epoch=8, optim__nonmono=1), work, **quiet))
    assert result["finished"] and result["trained_steps"] == 11 and "test_ppl" in result
    whole = train.train_and_evaluate(
        tiny_config(train__steps_per_epoch=8, optim__nonmono=1), tmp_path / "whole",
        **quiet)
    assert (result["valid_loss"], result["test_loss"]) == (whole["valid_loss"],
                                                           whole["test_loss"])
    assert_bit_identical(final_tree(work)[0], final_tree(tmp_path / "whole")[0])
    tuned = once("a finetune", lambda: train.finetune(
        tiny_config(finetune__init_from=str(work), finetune__max_epochs=1,
                    train__steps_per_epoch=4, train__test=False), ft, **quiet))
    assert tuned["finished"] and tuned["trained_steps"] == 4
    assert runs[-1].settings.lr_key == "finetune.lr" and runs[-1].max_epochs == 1
