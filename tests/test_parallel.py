"""Placement plans: 4 fake CPU devices against one, both strategies, 2 processes, and
one evaluation code path under a one-device and a 2-device mesh plan.

JAX reads the device count when it starts, so the multi-device checks run in fresh
processes (`tests/parallel_worker.py`, with `XLA_FLAGS=--xla_force_host_platform_
device_count=N`) and report JSON; this file compares. Each worker runs once per module.
"""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import fake_mesh_plan
from mos_jax import config as config_lib, dynamic_eval, parallel, train
from mos_jax.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("parallel_worker.py")
TOL = 1e-5


def worker_env(devices: int) -> dict:
    """N host devices; XLA's backend optimisations off, since compiling the tiny
    models takes far longer than running them (every comparison is between runs with
    the same flags)."""
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                         "--xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    return env


def last_json(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"the worker printed no JSON:\n{stdout[-2000:]}"
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """The step, train and eval workers, started together: each is mostly single-threaded
    compilation, so on a 2-core machine they take little longer than the longest."""
    started = {}
    for task, devices in (("step", 4), ("train", 4), ("eval", 4), ("vocab", 8)):
        workdir = tmp_path_factory.mktemp(task)
        (workdir / "work").mkdir()
        with open(workdir / "out", "w") as out, open(workdir / "err", "w") as err:
            started[task] = (workdir, subprocess.Popen(
                [sys.executable, str(WORKER), task, str(workdir / "work")],
                env=worker_env(devices), stdout=out, stderr=err, cwd=ROOT))
    yield started
    for _, proc in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def worker_result(workers, task: str, timeout: float = 300) -> dict:
    workdir, proc = workers[task]
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.returncode != 0:
        pytest.fail(f"worker {task} failed ({proc.returncode}):\n"
                    f"{(workdir / 'err').read_text()[-4000:]}")
    return last_json((workdir / "out").read_text())


@pytest.fixture(scope="module")
def plans_report(tmp_path_factory):
    """The `plans` worker on 2 devices."""
    workdir = tmp_path_factory.mktemp("plans")
    proc = subprocess.run([sys.executable, str(WORKER), "plans", str(workdir)],
                          env=worker_env(2), capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"worker plans failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return last_json(proc.stdout)


@pytest.fixture(scope="module")
def step_report(workers):
    return worker_result(workers, "step")


@pytest.fixture(scope="module")
def train_report(workers):
    return worker_result(workers, "train")


# --------------------------------------------------------------- no devices needed

def test_batch_that_does_not_divide_names_the_nearest_sizes():
    with pytest.raises(ConfigError, match=r"data\.batch_size=10 does not split over 4 "
                       r"devices.*multiple of 4, the nearest being 8 or 12"):
        parallel.check_divisible(10, 4)
    with pytest.raises(ConfigError, match=r"nearest being 4 .*num_devices one of \[1, 3\]"):
        parallel.check_divisible(3, 4, local_devices=4)
    with pytest.raises(ConfigError, match="data.eval_batch_size=1 .* nearest being 4"):
        parallel.check_divisible(1, 4, key="data.eval_batch_size")
    assert parallel.check_divisible(12, 4) == 3


def test_small_batch_size_must_divide_each_devices_columns():
    assert train.column_groups(12, -1, 4) == 1
    assert train.column_groups(12, 6, 4) == 1  # 3 columns a device: no groups
    assert train.column_groups(24, 2, 4) == 3
    with pytest.raises(ConfigError, match=r"small_batch_size=4 must divide the 6 columns "
                       r"each device holds .*one of \[1, 2, 3, 6\]"):
        train.column_groups(24, 4, 4)


def test_defaults_keep_one_device_on_the_plain_path():
    c = config_lib.default_config()
    assert c.parallel.strategy == "mesh" and c.parallel.num_devices == 0
    assert c.parallel.coordinator_address == "" and c.parallel.process_id == -1
    import jax
    if jax.device_count() == 1:  # this pytest process: one CPU device
        plan = parallel.from_config(c)
        assert isinstance(plan, parallel.OneDevice) and plan.axis_name is None
        with pytest.raises(ConfigError, match=r"asked for 2 devices .* this process has 1"):
            parallel.local_plan(2)
    with pytest.raises(ConfigError, match="strategy must be one of"):
        parallel.local_plan(0, strategy="dp")
    assert dynamic_eval.update_pass_note(parallel.local_plan(), 1) is None
    with pytest.raises(ConfigError, match="coordinator"):
        parallel.initialize_distributed("", 2, 0)


def test_no_module_outside_parallel_branches_on_the_placement():
    """Callers ask the plan; they never test for a missing plan or a strategy."""
    banned = re.compile(r"\b(?:par|plan)\s+is\s+(?:not\s+)?None|strategy\s*[=!]=|"
                        r"[=!]=\s*[\"'](?:mesh|pmap|none)[\"']|"
                        r"isinstance\([^)]*(?:OneDevice|MeshPlan|PmapPlan)")
    found = []
    for path in sorted((ROOT / "mos_jax").glob("*.py")) + sorted(
            (ROOT / "benchmarks").glob("*.py")):
        if path.name == "parallel.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if banned.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "placement branches outside parallel.py:\n" + "\n".join(found)


def test_one_device_and_mesh_plans_give_the_same_evaluation(plans_report):
    r = plans_report
    assert r["devices"] == 2
    assert (r["one"]["type"], r["one"]["n"], r["one"]["axis"]) == ("OneDevice", 1, None)
    assert (r["mesh"]["type"], r["mesh"]["n"], r["mesh"]["axis"]) == ("MeshPlan", 2, "data")
    one, mesh = np.array(r["one"]["logp"]), np.array(r["mesh"]["logp"])
    assert one.shape == mesh.shape == (801 // 4 - 1, 4)
    assert np.all(np.isfinite(one)) and np.all(one < 0)
    np.testing.assert_allclose(mesh, one, atol=TOL, rtol=0)


# ------------------------------------------------------------------ one train step

@pytest.mark.parametrize("strategy, small", [("mesh", -1), ("mesh", 1)])
def test_one_step_on_4_devices_equals_one_device(step_report, strategy, small):
    assert step_report["devices"] == 4
    single = step_report["single"]
    assert single["metric_grad_norm"] == pytest.approx(single["grad_norm"], rel=TOL)
    r = step_report[f"{strategy}_{small}"]
    assert r["groups"] == (1 if small == -1 else 2)
    assert r["loss"] < TOL and r["nll"] < TOL
    assert r["grads"] < TOL  # lr 1, no clipping or decay: the update is the gradient
    assert r["params"] < TOL and r["carry"] < TOL
    assert r["carry_shape"] == [8, 8] and r["step"] == 1  # the global [B, H] layout


@pytest.mark.parametrize("head", ["adaptive_mos"])
def test_adaptive_heads_step_on_4_devices_equals_one_device(step_report, head):
    r = step_report[f"head_{head}"]
    assert np.isfinite(r["ref_loss"]) and r["ref_loss"] > 0
    assert r["moved"] > 1e-3  # the step changed the weights, so equal updates say something
    assert r["loss"] < TOL * max(1.0, r["ref_loss"]) and r["params"] < TOL


@pytest.mark.parametrize("strategy", ["mesh"])
def test_gradients_are_averaged_not_summed(step_report, strategy):
    # A sum over the 4 devices (grad of replicated parameters under shard_map with
    # varying-axis checks, then pmean) would give ratios of 4.
    r = step_report[f"{strategy}_-1"]
    assert r["grad_norm_ratio"] == pytest.approx(1.0, abs=TOL)
    assert r["update_norm_ratio"] == pytest.approx(1.0, abs=TOL)


def test_dropout_masks_differ_per_device_and_are_reproducible(step_report):
    d = step_report["dropout"]
    assert d["mesh_repeat"] == 0.0  # the same call twice: the same masks
    assert d["mesh_min_block_diff"] > 1e-3  # every device its own masks
    assert math.isfinite(d["mesh_loss"]) and d["mesh_loss"] > 0


# ------------------------------------------------------------------ short training

def test_training_gives_the_same_perplexity_on_4_devices(train_report):
    results = train_report["nodrop"]
    one = results["none"]
    for strategy in ("mesh",):
        r = results[strategy]
        assert r["valid_ppl"] == pytest.approx(one["valid_ppl"], rel=1e-4)
        assert r["test_ppl"] == pytest.approx(one["test_ppl"], rel=1e-4)
        assert r["best_epoch"] == one["best_epoch"]
        assert r["compilations"] == one["compilations"] <= 2  # buckets (16, 20)
        assert any("data parallel" in line for line in train_report[f"logs_{strategy}"])
    assert not any("data parallel" in line for line in train_report["logs_none"])


def test_checkpoints_move_between_device_counts(train_report):
    one = train_report["nodrop"]["none"]
    assert train_report["switch"]["valid_ppl"] == pytest.approx(one["valid_ppl"], rel=1e-4)


def test_a_4_device_run_loads_on_one_device(train_report):
    import jax
    from mos_jax import evaluate, train
    c, corpus, mc, params = train.load_best(train_report["workdir"])
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree_util.tree_leaves(params))
    ppl = evaluate.perplexity(mc, params, corpus.valid, c.data.eval_batch_size, c.data.bptt)
    assert ppl == pytest.approx(train_report["nodrop"]["mesh"]["valid_ppl"], rel=1e-4)


def test_evaluation_splits_columns_and_batch_1_stays_on_one_device(workers):
    r = worker_result(workers, "eval")
    for strategy in ("mesh",):
        assert r[strategy]["shape"] == [3001 // 8 - 1, 8]
        assert r[strategy]["logp"] < TOL and r[strategy]["batch1"] == 0.0
        assert r[strategy]["stats_rel"] < 1e-4
        assert r[strategy]["windows"][0] == r[strategy]["windows"][1] == 40
        assert "runs on one device" in r[strategy]["dyn_note"]
    assert set(r["notes"]) == {"evaluation with batch size 1 does not split over 4 "
                               "devices: it runs on one device"}


def test_sampling_gives_one_devices_words_on_every_layout(workers):
    """4 samples split over data 2 x model 2 (39 words padded to 40 rows) and over
    data 4: the words and log-probabilities of one device for the same seed, the
    vocabulary-sized parameters split over the model axis (20 of 40 rows a device)."""
    r = worker_result(workers, "eval")["generate"]
    assert r["distinct"] == 4  # independent samples, not one repeated
    for layout, rows in (("2x2", 20), ("4x1", 40)):
        assert r[layout]["words"], layout
        assert r[layout]["logp"] < 1e-5, layout
        assert r[layout]["rows"] == rows, layout


# ------------------------------------------------------------------ two processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(workdir: Path, strategy: str, timeout: float = 150) -> list[dict]:
    """Both processes of a 2-process run on 127.0.0.1 (2 CPU devices each); if one fails
    or time runs out, the other is killed at once (it would wait for its peer)."""
    port = free_port()
    logs = workdir.parent
    procs = []
    try:
        for i in range(2):
            with open(logs / f"p{i}.out", "w") as out, open(logs / f"p{i}.err", "w") as err:
                procs.append(subprocess.Popen(
                    [sys.executable, str(WORKER), "multihost", str(workdir), str(i),
                     str(port), strategy], env=worker_env(2), stdout=out, stderr=err,
                    cwd=ROOT, start_new_session=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in procs]
            if None not in codes or any(c for c in codes if c is not None):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
    failed = [f"process {i} ended with {p.returncode}:\n"
              f"{(logs / f'p{i}.err').read_text()[-3000:]}"
              for i, p in enumerate(procs) if p.returncode != 0]
    if failed:  # -9: killed, after the other failed or at the time limit
        pytest.fail(f"the 2-process run failed (limit {timeout:g} s):\n" + "\n".join(failed))
    return [last_json((logs / f"p{i}.out").read_text()) for i in range(2)]


@pytest.mark.parametrize("strategy", ["mesh-model2"])
def test_two_processes_train_checkpoint_restore_like_one(workers, tmp_path, strategy):
    """2 processes x 2 devices = the single-process run on 4 devices (dropout on: the
    same masks), the vocabulary split over each process's 2 devices (MoS, data 2 x
    model 2: the data axis crosses the processes, the model axis lies within each).
    The corpus is a text directory: both processes write its id cache at once (one
    cache directory, as hosts on one file system share theirs), leaving one entry,
    and both runs of each train on the memory-mapped ids. (A data-only variant, model 1, ran beside it
    until the suite's time was trimmed: the split run goes through every step of it.)"""
    reports = run_two_processes(tmp_path / "run", strategy)
    ref = worker_result(workers, "vocab")["ref_model2"]
    for i, r in enumerate(reports):
        assert (r["process"], r["processes"], r["devices"], r["local_devices"]) == (i, 2, 4, 2)
        # the corpus each load of both runs got (the first ones racing to write the
        # cache) was the mapped entry, never a fallback to reading it into memory
        assert r["mapped"] == [True, True], r["mapped"]
        assert len(r["cache"]) == 1 and r["cache"][0].endswith(".ids"), r["cache"]
        assert r["cache"] == reports[0]["cache"]
        assert r["first"]["stopped"].startswith("reached") and r["first"]["step"] == 6
        assert r["result"]["valid_ppl"] == pytest.approx(ref["result"]["valid_ppl"], rel=1e-5)
        assert r["result"]["test_ppl"] == pytest.approx(ref["result"]["test_ppl"], rel=1e-5)
        np.testing.assert_allclose(r["history"], ref["history"], rtol=1e-5)
        np.testing.assert_allclose(r["sums"], ref["sums"], rtol=1e-4, atol=1e-5)
    assert reports[0]["logs"] > 0 and reports[1]["logs"] == 0  # only process 0 logs
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("epoch") for r in records] == [1, 2, None]  # written once, by process 0
    assert math.isfinite(records[-1]["test_ppl"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["parallel"]
    assert saved == {"strategy": strategy.split("-")[0], "num_devices": 0,
                     "coordinator_address": "", "num_processes": 0,
                     "process_id": -1,  # launch settings not kept
                     "mesh": {"data": -1, "model": 2 if "model2" in strategy else 1},
                     "rules": {"batch": "data", "vocab": "model"}}


def test_placement_knows_no_model_and_places_the_callers_carry():
    code = ("import json, sys, mos_jax.parallel; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('mos_jax.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
    assert json.loads(out) == ["mos_jax.collectives", "mos_jax.errors", "mos_jax.parallel"]
    plan = parallel.local_plan()
    carry = ((np.ones((3, 2), np.float32), np.zeros((3, 2), np.float32)),)
    placed = plan.place_carry(carry)
    np.testing.assert_array_equal(np.asarray(placed[0][0]), carry[0][0])
    assert placed[0][1].shape == (3, 2)


# ------------------------------------------------- the vocabulary split over `model`

@pytest.fixture(scope="module")
def vocab_report(workers):
    return worker_result(workers, "vocab")


# data x model over 8 fake devices (1 x 1 is the one-device program, the reference)
MESHES = ("1x1", "2x4", "1x8", "8x1")


@pytest.mark.parametrize("head", ["softmax", "mos", "moc", "sigsoftmax", "moss",
                                  "adaptive", "adaptive_mos"])
def test_split_vocabulary_heads_equal_one_device(vocab_report, head):
    """Loss, gradients (averaged over data) and target log-probabilities on every mesh
    (1 x 1 is a `OneDevice` plan) equal the one-device program (dropout off, a non-zero
    decoder bias); with model > 1 no device holds more than its block of a
    vocabulary-sized gradient (V = 64)."""
    assert sorted(vocab_report[head]) == sorted(MESHES)
    for mesh in MESHES:
        r = vocab_report[head][mesh]
        assert r["loss"] < TOL and r["logprobs"] < TOL and r["grads"] < TOL, (mesh, r)
        data, model_size = map(int, mesh.split("x"))
        assert r["grad_rows"] == 64 // model_size, (mesh, r)


def test_a_padded_vocabulary_splits_where_the_model_size_does_not_divide_it(vocab_report):
    """V = 37 words over model 4 with model.vocab_multiple 4 (40 rows, blocks of 10):
    MoS's loss, target log-probabilities and gradients on data 2 x model 4 equal one
    device's unpadded model with the same first 37 rows; the padded rows get no
    gradient and no device holds more than its 10 rows."""
    r = vocab_report["padded"]
    assert r["rows"] == 40
    assert r["loss"] < TOL and r["logprobs"] < TOL and r["grads"] < TOL, r
    assert r["padded_grad"] == 0.0 and r["grad_rows"] == 10, r


def test_split_vocabulary_train_steps_equal_one_device(vocab_report):
    """Three MoS train steps with clipping active (the norm over split parameters) and
    weight decay: parameters and metrics as on one device; the state's
    vocabulary-sized arrays stay split by rows."""
    for mesh in ("2x4", "1x8"):
        r = vocab_report["train"][mesh]
        assert r["params"] < TOL and r["opt_state"] < TOL, (mesh, r)
        assert r["grad_norm"] == pytest.approx(1.0, rel=TOL)
        assert r["state_rows"] == 64 // int(mesh.split("x")[1]), (mesh, r)


def test_split_vocabulary_evaluation_and_statistics(vocab_report):
    r = vocab_report["eval"]
    assert r["logprobs"] < TOL and r["stats"] < 1e-4, r


def test_checkpoint_moves_between_mesh_shapes(vocab_report):
    """Written on data 2 x model 4 (vocabulary 96: blocks of 24 rows) after 8 of 16
    steps, restored bit-identically (every leaf: parameters, the NT-ASGD average, the
    step, the carry) on (2, 4), on (8, 1) and on one device, split only on (2, 4); the
    run resumed on (8, 1) and on one device ends where the uninterrupted (2, 4) run
    does (dropout off)."""
    restore = vocab_report["restore"]
    assert {k: (v["equal"], v["rows"]) for k, v in restore.items()} == {
        "2x4": (True, 24), "8x1": (True, 96), "one": (True, 96)}
    assert restore["one"]["devices"] == 1 and restore["8x1"]["devices"] == 8
    straight = vocab_report["resumed"]["2x4 uninterrupted"]
    assert straight["finished"] and straight["trained_steps"] == 16
    for name in ("8x1", "one"):
        resumed = vocab_report["resumed"][name]
        assert resumed["finished"] and resumed["trained_steps"] == 8, (name, resumed)
        for key in ("valid_ppl", "test_ppl"):
            assert resumed[key] == pytest.approx(straight[key], rel=TOL), (name, key)


def test_a_head_that_cannot_split_says_so_in_one_line():
    from mos_jax import model, train
    plan = parallel.Plan.__new__(parallel.MeshPlan)
    object.__setattr__(plan, "devices", tuple(range(4)))
    object.__setattr__(plan, "model_size", 2)
    object.__setattr__(plan, "rules", parallel.DEFAULT_RULES)
    with pytest.raises(parallel.ConfigError, match=r"the mixtape head cannot split.*"
                       r"mesh.model=1.*softmax, mos, moc"):
        train.check_placement(plan, model.ModelConfig(vocab_size=64, head="mixtape"))
    with pytest.raises(parallel.ConfigError, match=r"vocabulary of 63 does not split "
                       r"into 2 equal blocks"):
        train.check_placement(plan, model.ModelConfig(vocab_size=63, head="mos"))
    train.check_placement(plan, model.ModelConfig(vocab_size=64, head="moc"))  # fine


def test_the_configs_rule_values_are_the_plans():
    """The config accepts for each rule exactly the mesh axes the plan takes: every
    value it allows builds a plan's rules, and the data axis for the vocabulary (or the
    model axis for batch columns) is refused at the config, naming what is allowed."""
    for logical in ("batch", "vocab"):
        check = config_lib.schema()[f"parallel.rules.{logical}"].check
        for axis in check.allowed():
            assert dict(parallel._rules({logical: axis}))[logical] == axis
    c = config_lib.default_config()
    for logical, bad, allowed in (("vocab", "data", 'one of "", model'),
                                  ("batch", "model", "one of data")):
        c.parallel.rules[logical] = bad
        with pytest.raises(ConfigError, match=f"parallel.rules.{logical} must be {allowed}"):
            config_lib.validate(c)
        c.parallel.rules[logical] = parallel.DEFAULT_RULES[0 if logical == "batch" else 1][1]
    config_lib.validate(c)


def test_mesh_sizes_and_rules_are_checked():
    assert parallel.mesh_sizes(8, -1, 4) == (2, 4)
    assert parallel.mesh_sizes(8, 8, 1) == (8, 1)
    with pytest.raises(parallel.ConfigError, match="does not divide the 8 devices"):
        parallel.mesh_sizes(8, -1, 3)
    with pytest.raises(parallel.ConfigError, match="product is 8"):
        parallel.mesh_sizes(8, 2, 2)
    for launch in (lambda: parallel.make_plan("pmap", [object()] * 4),
                   lambda: parallel.local_plan(0, strategy="pmap")):
        with pytest.raises(parallel.ConfigError,
                           match=r"pmap was removed.*parallel\.strategy=mesh"):
            launch()


def test_leaves_place_by_their_logical_axes():
    """The rule by name: the embedding and decoder bias (and optimiser state mirroring
    them) split over model, the carry's rows over data, the rest replicated; a
    checkpoint's flat list of optimiser leaves splits where its shape is a split
    parameter's."""
    from jax.sharding import PartitionSpec as P
    plan = parallel.Plan.__new__(parallel.MeshPlan)
    object.__setattr__(plan, "devices", tuple(range(8)))
    object.__setattr__(plan, "model_size", 4)
    object.__setattr__(plan, "rules", parallel.DEFAULT_RULES)
    emb, bias, kernel = np.zeros((16, 3)), np.zeros(16), np.zeros((3, 16))
    params = {"embedding": emb, "head": {"decoder_bias": bias, "latent_kernel": kernel}}
    tree = {"params": params, "averaging": {"average": params},
            "opt_state": [emb, bias, kernel], "carry": ((np.zeros((8, 3)),) * 2,)}
    specs = plan.specs(tree)
    split, rows = P("model", None), P("model")
    for part in (specs["params"], specs["averaging"]["average"]):
        assert (part["embedding"], part["head"]["decoder_bias"],
                part["head"]["latent_kernel"]) == (split, rows, P())
    assert specs["opt_state"] == [split, rows, P()]
    assert specs["carry"] == ((P("data"), P("data")),)
    object.__setattr__(plan, "rules", (("batch", "data"), ("vocab", "")))  # turned off
    assert plan.specs(tree)["params"]["embedding"] == P()


@pytest.mark.parametrize("vocab, sizes", [(60, [1, 2, 4]), (63, [1]), (90, [1, 2])])
def test_an_indivisible_vocabulary_is_told_model_sizes_that_run(vocab, sizes):
    """The sizes the refusal suggests divide both the vocabulary and the devices
    (`mesh_sizes` refuses any other): V = 60 on 8 devices is 1, 2 or 4, not 3, 5, 6."""
    plan = fake_mesh_plan(8, 8 if vocab == 60 else 4)
    with pytest.raises(parallel.ConfigError) as e:
        plan.check_vocab(vocab)
    suggested = [int(k) for k in re.search(r"\(([\d, ]+)\)$", str(e.value)).group(1)
                 .split(",")]
    assert suggested == sizes, str(e.value)
    for k in suggested:  # each one a mesh that exists and splits the vocabulary
        assert parallel.mesh_sizes(8, -1, k)[1] == k and vocab % k == 0


class _Noted(Exception):
    pass


def _raise_note(message):
    raise _Noted(message)


def test_one_device_notes_count_the_data_groups_not_the_devices():
    """On a data 2 x model 4 mesh a batch of 3 does not split over the 2 data groups
    (a batch of 4 would): the notes say so, not "over 8 devices"."""
    from mos_jax import dynamic_eval, model
    plan = fake_mesh_plan(8, 4)
    plan.__dict__.update(process_index=0, process_count=1)  # without real devices
    cfg = model.ModelConfig(vocab_size=8, emsize=4, nhid=4, nlayers=1, nhidlast=4)
    with pytest.raises(_Noted) as e:
        dynamic_eval.gradient_statistics(cfg, None, np.arange(40) % 8, batch_size=3,
                                         plan=plan, log=_raise_note)
    assert "over 2 groups of 4 devices" in str(e.value), str(e.value)
    with pytest.raises(_Noted) as e:
        plan.for_batch(3, _raise_note)
    assert "over 2 groups of 4 devices" in str(e.value), str(e.value)
    assert plan.divides(4) and not plan.divides(3)


@pytest.mark.parametrize("rules", [{"vocab": "data"}, {"vocab": "data", "batch": "data"}])
def test_the_vocabulary_cannot_split_over_the_data_axis(rules):
    """The heads' collectives over the vocabulary's axis assume every shard holds the
    same batch columns; over `data` they hold different ones, and the log-probabilities
    came out wrong (by 0.03 on 4 devices, softmax, V = 16) without a word. Refused in
    one line, as the config refuses it; `vocab` -> model or "" stay allowed."""
    with pytest.raises(parallel.ConfigError, match=r"parallel\.rules\.vocab='data'.*"
                       r"model.*replicated"):
        parallel.make_plan("mesh", [object()] * 4, 1, rules)
    for ok in ({"vocab": "model"}, {"vocab": ""}):
        assert dict(parallel._rules(ok))["vocab"] == ok["vocab"]


def test_batch_refusals_on_a_model_axis_count_the_data_groups():
    """data.batch_size and small_batch_size refusals on data 2 x model 4 (8 devices)
    say the columns split over 2 groups of 4 devices, not "over 2 devices"."""
    from mos_jax import train
    plan = fake_mesh_plan(8, 4)
    plan.__dict__.update(process_index=0, process_count=1)
    with pytest.raises(parallel.ConfigError) as e:
        plan.per_device(3)
    assert "does not split over 2 groups of 4 devices" in str(e.value), str(e.value)
    assert "a multiple of 2" in str(e.value)
    assert plan.per_device(4) == 2
    with pytest.raises(parallel.ConfigError) as e:
        train.column_groups(8, 3, plan.n_data, over=plan.columns_over())
    assert "(data.batch_size=8 over 2 groups of 4 devices)" in str(e.value), str(e.value)
    with pytest.raises(parallel.ConfigError, match=r"over 4 devices"):
        train.column_groups(12, 2, 4)  # plain data parallelism: as before


def test_describe_says_whether_the_vocabulary_is_split():
    """The run's placement line on a model axis with `parallel.rules.vocab=""` says
    the vocabulary is replicated, not that it is split over model."""
    import types
    plan = fake_mesh_plan(8, 4)
    object.__setattr__(plan, "devices", tuple(types.SimpleNamespace(platform="cpu")
                                              for _ in range(8)))
    plan.__dict__.update(process_index=0, process_count=1)
    assert "(the vocabulary split over model)" in plan.describe()
    object.__setattr__(plan, "rules", (("batch", "data"), ("vocab", "")))
    assert plan.vocab_axis is None
    assert "split over model" not in plan.describe(), plan.describe()
    assert "replicated" in plan.describe(), plan.describe()


def test_a_flat_optimiser_leaf_shaped_like_the_carry_stays_replicated():
    """A checkpoint's flat optimiser leaf takes the split spec of a *parameter* of its
    shape; a carry of the same shape (rows over data) is no parameter: replicated."""
    from jax.sharding import PartitionSpec as P
    plan = fake_mesh_plan(8, 4)
    kernel, carry = np.zeros((4, 3)), np.zeros((4, 3))  # [emsize, 4H] like [B, H]
    tree = {"params": {"embedding": np.zeros((16, 3)), "ih_kernel": kernel},
            "opt_state": [np.zeros((16, 3)), kernel], "carry": ((carry, carry),)}
    specs = plan.specs(tree)
    assert specs["carry"] == ((P("data"), P("data")),)
    assert specs["opt_state"] == [P("model", None), P()]
