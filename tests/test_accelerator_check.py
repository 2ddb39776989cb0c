"""The prepared accelerator check (benchmarks/accelerator_check.sh): its CPU rehearsal
runs every step at tiny sizes and writes the JSON and table the GPU run will write."""

import importlib.util
import json
import math
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerator_check.sh"
STEPS = ["environment", "numerics", "plan_of_one", "auto_choices",
         "bench_ptb_bfloat16_chunk_auto", "train_ptb", "bench_ptb_bfloat16_chunk_0",
         "bench_ptb_bfloat16_chunk_16", "bench_wt2_one_piece", "bench_ptb_float32_chunk_auto",
         "bench_ptb_float32_chunk_0", "bench_ptb_float32_chunk_16",
         "numerics_default_precision", "fused_tiles", "train_ptb_float32"]


def load_helper():
    spec = importlib.util.spec_from_file_location(
        "accelerator_check", ROOT / "benchmarks" / "accelerator_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("accel")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OUT=str(out))
    env.pop("JAX_PLATFORMS", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--rehearse"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc, out


def test_rehearsal_runs_every_step_and_passes(rehearsal):
    proc, out = rehearsal
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "accelerator_check.json").read_text())
    assert report["mode"] == "rehearse" and report["exit_code"] == 0
    assert report["numeric_checks_passed"] and report["failed_steps"] == []
    assert list(report["steps"]) == STEPS
    for name, step in report["steps"].items():
        assert step["status"] == "ok", (name, step)
        assert positive(step["seconds"]) or step["seconds"] == 0.0
    assert report["backend"] == "cpu" and report["versions"]["jax"]
    assert report["elapsed_s"] <= report["budget_s"]


def test_rehearsal_numeric_checks_report_real_results(rehearsal):
    _, out = rehearsal
    steps = json.loads((out / "accelerator_check.json").read_text())["steps"]
    helper = load_helper()
    num = steps["numerics"]
    assert num["passed"] == len(helper.REHEARSAL_TESTS) and num["failures"] == 0
    assert num["matmul_precision"] == "highest"
    plan = steps["plan_of_one"]
    assert plan["devices"] == 1 and set(plan["strategies"]) == {"mesh_-1", "mesh_1"}
    for r in plan["strategies"].values():
        assert 0 <= r["max_abs_diff"] < 1e-5 and abs(r["grad_norm_ratio"] - 1) < 1e-5
    # auto on the CPU: float32; tiny shapes (V 50, E 4, D 16, B 4 x T 8 = 32 rows): the
    # CPU tile rule gives 2 x D = 32 logit rows, raised to its lower bound 64, so
    # 64 // 4 components = 16 rows per fused chunk, which divides the 32 rows.
    auto = steps["auto_choices"]
    assert auto["backend"] == "cpu"
    tiny = auto["tiny"]
    assert tiny["compute_dtype"] == "float32"
    assert tiny["train_fused_tile_rows"] == 64  # the CPU rule's lower bound
    assert tiny["train_fused_rows_per_chunk"] == 16  # 64 tile rows // 4 components
    assert tiny["eval_fused_rows_per_chunk"] == 16  # eval batch 4 x 8 rows, too
    assert tiny["dynamic_eval_fused_rows_per_chunk"] == 5  # windows of 5 x 1: one chunk
    assert tiny["full_logprobs_stream_chunk"] == 0  # 4 x 8 x 4 x 50 logits < 64 MiB


def test_rehearsal_figures_are_positive_and_cover_the_auto_choices(rehearsal):
    _, out = rehearsal
    steps = json.loads((out / "accelerator_check.json").read_text())["steps"]
    benches = {n: s for n, s in steps.items() if n.startswith("bench_")}
    seen = {(s["compute_dtype"], s["vocab_chunk"]) for s in benches.values()}
    for dtype in ("float32", "bfloat16"):
        assert {(dtype, "auto"), (dtype, 0), (dtype, 16)} <= seen
    assert set(benches["bench_ptb_bfloat16_chunk_auto"]["workloads"]) == {
        "train", "eval", "dynamic_eval"}
    for name, s in benches.items():
        assert s["workloads"], name
        for w in s["workloads"].values():
            assert positive(w["tokens_per_s"]) and positive(w["peak_memory_mb"]), name
            assert w["tokens_per_s_min"] <= w["tokens_per_s"] <= w["tokens_per_s_max"]
            assert w["compile_s"] >= 0 and w["mfu"] >= 0
    wt2 = benches["bench_wt2_one_piece"]["workloads"]["train"]
    assert wt2["batch"] == 15  # the WikiText-2 batch in one piece
    for name in ("train_ptb", "train_ptb_float32"):
        t = steps[name]
        assert t["steps"] == 4 and len(t["epochs"]) == 2
        assert positive(t["tokens_per_s_steady"]) and positive(t["tokens_per_s_first_epoch"])
        assert all(positive(e["train_loss"]) and positive(e["valid_loss"])
                   for e in t["epochs"])
        ref = t["cpu_reference"]  # the stored rehearsal reference: the same CPU steps
        assert isinstance(ref, dict), ref
        assert [c["epoch"] for c in ref["curve"]] == [1, 2]
        assert ref["max_rel_loss_diff"] < 1e-3 and positive(ref["speedup"])
    table = (out / "accelerator_check.md").read_text()
    assert all(f"| {name} | ok |" in table for name in STEPS)
    assert "bench_ptb_float32_chunk_16 | float32 | 16 |" in table
    assert "===== train_ptb:" in (out / "accelerator_check.log").read_text()


def test_exit_status_and_missing_tests(tmp_path):
    helper = load_helper()
    assert helper.missing_tests(helper.NUMERIC_TESTS + helper.REHEARSAL_TESTS) == []
    assert helper.missing_tests(["tests/test_model.py::test_no_such_test",
                                 "tests/no_such_file.py::test_x"]) == [
        "tests/test_model.py::test_no_such_test", "tests/no_such_file.py::test_x"]
    args = helper.argparse.Namespace(rehearse=True, cpu_reference=False, budget=0.0,
                                     out=str(tmp_path), data=str(tmp_path))
    for steps, code in (({"numerics": ("failed", True), "bench_x": ("ok", False)}, 1),
                        ({"numerics": ("ok", True), "bench_x": ("timeout", False)}, 3),
                        ({"numerics": ("ok", True), "bench_x": ("ok", False)}, 0)):
        check = helper.Check(args)
        check.steps = {n: {"status": s, "fatal": f, "seconds": 1.0}
                       for n, (s, f) in steps.items()}
        assert check.finish() == code
        report = json.loads((tmp_path / "accelerator_check.json").read_text())
        assert report["exit_code"] == code
        assert report["numeric_checks_passed"] == (code != 1)
        bad = [n for n, (s, _) in steps.items() if s != "ok"]
        assert report["failed_steps"] == bad
    assert "| bench_x | ok |" in (tmp_path / "accelerator_check.md").read_text()


def test_rehearsal_commands_share_one_child_and_a_timeout_kills_it(tmp_path):
    helper = load_helper()
    args = helper.argparse.Namespace(rehearse=True, cpu_reference=False, budget=0.0,
                                     out=str(tmp_path), data=str(tmp_path))
    check = helper.Check(args)
    try:
        code, output, _ = check.run_cli("bad", ["no-such-command"], 60)
        assert code == 2 and "invalid choice" in output  # argparse's exit, reported
        child = check.server[0]
        code, output, _ = check.run_cli("version", ["--version"], 60)
        from mos_jax import __version__
        assert code == 0 and f"mos-jax {__version__}" in output
        assert check.server[0] is child and child.poll() is None  # the same process
        code, _, _ = check.run_cli("late", ["--version"], 0)  # no time to answer
        assert code is None and check.server is None and child.poll() is not None
        code, output, _ = check.run_cli("again", ["--version"], 60)  # a fresh child
        assert code == 0 and check.server[0] is not child
        log = (tmp_path / "accelerator_check.log").read_text()
        assert "===== late: exit None" in log and "===== again: exit 0" in log
    finally:
        check.stop_server()
