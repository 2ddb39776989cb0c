"""The prepared accelerator check: numerics, benchmarks and a short real training run.

    PYTHONPATH=. bash benchmarks/accelerator_check.sh [--data DIR] [--out DIR]
        [--budget S] [--rehearse] [--cpu-reference] [--wheel-commands]

Run from the repository root (the shell wrapper installs carried wheels from `.whl/`
first). Every step is a child process with its own timeout, run in order of importance
inside one time budget (`--budget`, 470 s by default: a GPU call of 8 minutes), so a
hang costs one step, not the call:

1. `environment`: device, versions of Python, JAX, Flax, Optax, Orbax, NumPy; what is
   missing, and the exact `pip download` commands of the wheels to carry.
2. `numerics` (fatal): the test files that check compiled numerics, run on the device
   in float32 (`accel_float32.py` makes compute_dtype "auto" float32, and
   `JAX_DEFAULT_MATMUL_PRECISION=highest` keeps float32 matmuls out of TF32): the model
   against NumPy, the fused and streamed heads against whole logits, dynamic
   evaluation's scan against a step-by-step loop, plus bfloat16 against float32.
3. `plan_of_one` (fatal): `tests/parallel_worker.py step` on the device's devices: the
   train step under a placement plan (the mesh, with and without column groups)
   equals the plain jitted step to 1e-5 (loss, gradients, parameters, carry).
4. `numerics_default_precision` (informative): the model-against-NumPy tests with JAX's
   default matmul precision (TF32 on recent NVIDIA GPUs), to learn whether the
   tolerances hold without `highest`.
5. `auto_choices`: what "auto" resolves to on this backend for the PTB and WikiText-2
   shapes: compute dtype, the fused tile and rows per chunk for training, evaluation
   and dynamic evaluation, and the streamed chunk of full log-probability matrices.
6. `bench_ptb_*`: `mos-jax bench` on configs/ptb.py: float32 and bfloat16, each with
   vocab_chunk auto, 0 (whole logits) and a streaming size; train, eval, dynamic_eval.
   Auto's choices are among these, so the first GPU run confirms or corrects them.
7. `train_ptb`: `mos-jax train` on configs/ptb.py and the real corpus for a fixed
   number of steps (short epochs), tokens/s and the loss curve, compared with the same
   steps on CPU (`accelerator_check_cpu_reference.json`, written by `--cpu-reference`).
8. `bench_wt2_one_piece`: configs/wt2.py with the whole batch (15 x 70) in one piece
   (`data.small_batch_size=-1`, no accumulation groups): tokens/s and peak memory.
9. `fused_tiles`, `train_ptb_float32`: the fused loss at other row chunks than auto's,
   and the training run in float32 (to compare the loss curve with CPU's exactly).

They run in this order: 1, 2, 3, 5, the bfloat16/auto bench (what a GPU user gets),
7, the other bench variants, 8, 4, 9; a step the budget cannot fit is reported skipped.

Writes `accelerator_check.json`, `accelerator_check.md` (a short table) and
`accelerator_check.log` (every child's output) into `--out` (default: `$OUT` when set,
else runs/accelerator_check). Exit status: 0 when every step passed; 1 when a numeric
check failed, timed out or the environment lacks a required package; 3 when only
benchmark or training steps failed or were cut by the budget.

`--rehearse` runs every step on the CPU at tiny sizes (configs/tiny.py, its synthetic
corpus, small bench shapes) in under a minute on 2 cores; tests/test_accelerator_check.py
runs it. There the `mos-jax bench` and `mos-jax train` steps share one child process
(`COMMAND_SERVER`: each step's command, timeout and output as before, one JAX start).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "accelerator_check_cpu_reference.json"

# The pure-Python wheels the GPU image lacks, at the versions this project was developed
# and tested with. absl-py and PyYAML (ml_collections' requirements) are on the H200
# image already; they are listed so a machine without them knows what to bring.
WHEELS = {"ml_collections": ("ml_collections", "1.1.0"),
          "absl": ("absl-py", "2.5.1"), "yaml": ("PyYAML", "6.0.3")}
# module -> distribution, what the check needs and what it only reports
REQUIRED = {"jax": "jax", "jaxlib": "jaxlib", "flax": "flax", "optax": "optax",
            "orbax.checkpoint": "orbax-checkpoint", "numpy": "numpy",
            "ml_collections": "ml_collections", "absl": "absl-py", "yaml": "PyYAML",
            "pytest": "pytest"}
OPTIONAL = {"chex": "chex", "matplotlib": "matplotlib",
            "tensorflow_datasets": "tensorflow-datasets", "torch": "torch"}
PIP_DOWNLOAD = ("python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 "
                "--implementation cp --platform manylinux_2_28_x86_64 --platform "
                "manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl {name}=={version}")

# Numeric tests run on the device (node ids of tests that exist today; none needs tfds).
NUMERIC_TESTS = (
    "tests/test_model.py::test_token_logprobs_match_numpy_reference",
    "tests/test_model.py::test_regularized_loss_and_gradient_match_numpy_finite_differences",
    "tests/test_model.py::test_padding_to_a_bucket_changes_nothing",
    "tests/test_model.py::test_carry_is_threaded_between_windows",
    "tests/test_layers.py::test_weight_drop_lstm_matches_numpy_with_the_mask",
    "tests/test_layers.py::test_custom_lstm_gradient_matches_autodiff_with_padding",
    "tests/test_fused.py::test_mixture_nll_matches_numpy",
    "tests/test_fused.py::test_target_logprobs_carry_no_gradient",
    "tests/test_streaming.py::test_chunked_logsumexp_matches_numpy_forward_and_gradients",
    "tests/test_streaming.py::test_large_logits_do_not_overflow",
    "tests/test_streaming.py::test_streamed_and_fused_heads_equal_the_plain_head",
    "tests/test_heads_lab.py::test_streaming_equals_plain_forward_and_gradients",
    "tests/test_dynamic_eval.py::test_matches_the_plain_implementation",
    "tests/test_dynamic_eval.py::test_zero_lr_is_static_evaluation",
    "tests/test_mixed_precision.py::test_bfloat16_forward_is_close_and_log_space_is_float32",
)
# The rehearsal checks that every id above exists (so a renamed test is caught) but
# runs only these.
REHEARSAL_TESTS = (
    "tests/test_model.py::test_token_logprobs_match_numpy_reference[softmax]",
    "tests/test_fused.py::test_mixture_nll_matches_numpy[3-5]",
    "tests/test_streaming.py::test_chunked_logsumexp_matches_numpy_forward_and_gradients[7]",
)
DEFAULT_PRECISION_TESTS = ("tests/test_model.py::test_token_logprobs_match_numpy_reference",)
PLAN_TOL = 1e-5  # tests/test_parallel.py's TOL

FULL = {
    "budget": 470.0,
    "bench": ["--config", "configs/ptb.py", "--vocab", "10000", "--warmup", "2",
              "--repeats", "5"],
    "stream_chunk": 4096,  # streamed head (auto streams full log-probs in 1536s)
    "wt2": ["--config", "configs/wt2.py", "--vocab", "33278", "--warmup", "1",
            "--repeats", "3", "--config.data.small_batch_size=-1"],
    "train_config": "configs/ptb.py", "corpus": "ptb",
    "train": ["--config.train.steps_per_epoch=10", "--config.train.max_epochs=4",
              "--config.train.eval_max_tokens=2000"],
    "fused_tiles": ["--rows", "840", "--experts", "15", "--dim", "280", "--vocab", "10000",
                    "--chunks", "105,210,420,840", "--rounds", "3"],
    "timeouts": {"environment": 60, "numerics": 150, "plan_of_one": 90,
                 "numerics_default_precision": 60, "auto_choices": 60, "bench": 100,
                 "train": 180, "fused_tiles": 60},
}
TINY_MODEL = ["--config.model.nlayers=1", "--config.model.emsize=16",
              "--config.model.nhid=16", "--config.model.nhidlast=16",
              "--config.model.n_experts=3"]
REHEARSE = {
    "budget": 240.0,
    "bench": ["--config", "configs/tiny.py", "--vocab", "50", "--batch", "4", "--bptt",
              "8", "--eval-batch", "4", "--dyn-windows", "2", "--warmup", "0",
              "--repeats", "2", "--matmul-n", "256"],
    "alternatives_only": "eval",  # the other variants rehearse their flags on one workload
    "stream_chunk": 16,
    "wt2": ["--config", "configs/wt2.py", "--vocab", "60", "--bptt", "6", "--eval-batch",
            "3", "--dyn-windows", "2", "--warmup", "0", "--repeats", "1", "--matmul-n", "256",
            "--config.data.small_batch_size=-1", "--only", "train", *TINY_MODEL],
    "train_config": "configs/tiny.py", "corpus": None,  # the tiny config's synthetic one
    "train": ["--config.train.steps_per_epoch=2", "--config.train.max_epochs=2",
              "--config.train.eval_max_tokens=100", "--config.data.bptt=6",
              "--config.data.max_seq_len_delta=2",  # lengths up to 8: one bucket
              "--config.data.synthetic.train_tokens=2000"],
    "fused_tiles": ["--rows", "12", "--experts", "3", "--dim", "8", "--vocab", "40",
                    "--chunks", "4,12", "--rounds", "1"],
    "timeouts": {"environment": 60, "numerics": 120, "plan_of_one": 120,
                 "numerics_default_precision": 60, "auto_choices": 60, "bench": 60,
                 "train": 90, "fused_tiles": 60},
}
TRAIN_COMMON = ["--config.train.test=false", "--config.train.checkpoint_every_s=1e9",
                "--config.train.log_every_steps=5"]

ENV_PROBE = r"""
import importlib.metadata as md, importlib.util, json, platform, sys
versions, missing = {}, []
for module, dist in json.loads(sys.argv[1]).items():
    try:
        found = importlib.util.find_spec(module) is not None
    except Exception:  # a parent package that is missing or broken
        found = False
    if not found:
        missing.append(module)
    try:
        versions[module] = md.version(dist) if found else None
    except md.PackageNotFoundError:
        versions[module] = "unknown"
out = {"python": platform.python_version(), "versions": versions, "missing": missing}
try:
    import jax
    d = jax.devices()[0]
    out.update(backend=jax.default_backend(), device=d.device_kind,
               platform=d.platform, device_count=jax.device_count())
    try:
        stats = d.memory_stats() or {}
        out["device_memory_gb"] = round(stats.get("bytes_limit", 0) / 2**30, 1)
    except Exception:
        pass
except Exception as e:
    out["jax_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""

AUTO_PROBE = r"""
import json, sys
import jax
from mos_jax import model, streaming
out = {"backend": jax.default_backend()}
for name, v, e, d, b, t, eb in json.loads(sys.argv[1]):
    mc = model.ModelConfig(vocab_size=v, n_experts=e, emsize=d, nhidlast=d)
    rows = b * t
    out[name] = {
        "compute_dtype": str(mc.dtype),
        "train_fused_rows_per_chunk": streaming.fused_rows("auto", rows, e, v, d),
        "train_fused_tile_rows": streaming.fused_tile_rows(d, v),
        "train_rows": rows,
        "eval_fused_rows_per_chunk": streaming.fused_rows("auto", eb * t, e, v, d),
        "dynamic_eval_fused_rows_per_chunk": streaming.fused_rows("auto", 5, e, v, d),
        "full_logprobs_stream_chunk": streaming.resolve_chunk("auto", eb * t * e, v),
    }
print(json.dumps(out))
"""
AUTO_SHAPES = {"full": [["ptb", 10000, 15, 280, 12, 70, 10], ["wt2", 33278, 15, 300, 15, 70, 10]],
               "rehearse": [["tiny", 50, 4, 16, 4, 8, 4]]}

# The rehearsal's `mos-jax bench` and `mos-jax train` steps run in one long-lived child
# (a JAX start each costs more than the tiny step): it reads one JSON argv a line, runs
# the command and prints a marker with its exit status. A step that times out kills it;
# the next step starts a fresh one.
COMMAND_SERVER = r"""
import json, sys, traceback
from mos_jax import cli
for line in sys.stdin:
    try:
        code = cli.main(json.loads(line))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    print("\n%s %d" % (sys.argv[1], code or 0), flush=True)
"""
SERVER_MARK = "@@mos-jax-command-done"

WORKER_RUNNER = r"""
import runpy, sys
sys.path.insert(0, "benchmarks")
import accel_float32  # noqa: F401  compute_dtype auto -> float32
sys.argv = ["tests/parallel_worker.py", "step", sys.argv[1], "core"]
runpy.run_path("tests/parallel_worker.py", run_name="__main__")
"""


def missing_tests(node_ids) -> list[str]:
    """The node ids whose file or test function no longer exists (no pytest needed)."""
    lost = []
    for node in node_ids:
        path, name = node.split("::")[:2]
        name = name.split("[")[0]
        f = ROOT / path
        if not f.is_file() or f"def {name}(" not in f.read_text():
            lost.append(node)
    return lost


class Check:
    def __init__(self, args):
        self.args = args
        self.mode = "rehearse" if args.rehearse else "full"
        self.s = REHEARSE if args.rehearse else FULL
        self.budget = args.budget or self.s["budget"]
        self.t0 = time.monotonic()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "accelerator_check.log"
        self.log_path.write_text("")
        self.tmp = Path(tempfile.mkdtemp(prefix="mos_jax_accel_"))
        self.steps: dict[str, dict] = {}
        self.server = None  # the rehearsal's command child and its output queue
        self.env = dict(os.environ)
        path = [str(ROOT)] + [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.env.update(PYTHONPATH=os.pathsep.join(path), PYTHONUNBUFFERED="1",
                        MOS_JAX_CACHE=str(self.tmp / "cache"))
        if args.rehearse or args.cpu_reference:
            self.env["JAX_PLATFORMS"] = "cpu"
        if args.rehearse:  # tiny programs: compiling them costs more than running them
            self.env["XLA_FLAGS"] = (self.env.get("XLA_FLAGS", "") +
                                     " --xla_backend_optimization_level=0").strip()

    # ------------------------------------------------------------------ plumbing
    def remaining(self) -> float:
        return self.budget - (time.monotonic() - self.t0)

    def note(self, text: str) -> None:
        print(text, flush=True)
        with open(self.log_path, "a") as f:
            f.write(text + "\n")

    def run(self, name: str, cmd: list[str], timeout: float, env: dict | None = None
            ) -> tuple[int | None, str, float]:
        """Run `cmd` from the repository root; (returncode or None on timeout, output,
        seconds). Output goes to the log too."""
        t = time.monotonic()
        with open(self.log_path, "a") as f:
            f.write(f"\n===== {name}: {' '.join(cmd)} (timeout {timeout:.0f} s)\n")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            code = None
        seconds = time.monotonic() - t
        with open(self.log_path, "a") as f:
            f.write(output or "")
            f.write(f"===== {name}: exit {code}, {seconds:.1f} s\n")
        return code, output or "", seconds

    def run_cli(self, name: str, argv: list[str], timeout: float
                ) -> tuple[int | None, str, float]:
        """`mos-jax ARGV` as `run` gives it; in the rehearsal, in the shared command
        child (`COMMAND_SERVER`), started on first use."""
        cmd = [sys.executable, "-m", "mos_jax.cli", *argv]
        if not self.args.rehearse:
            return self.run(name, cmd, timeout)
        t = time.monotonic()
        with open(self.log_path, "a") as f:
            f.write(f"\n===== {name}: {' '.join(cmd)} (shared child, timeout "
                    f"{timeout:.0f} s)\n")
        if self.server is None or self.server[0].poll() is not None:
            proc = subprocess.Popen(
                [sys.executable, "-c", COMMAND_SERVER, SERVER_MARK], cwd=ROOT, env=self.env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, start_new_session=True)
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [
                lines.put(None)], daemon=True).start()
            self.server = (proc, lines)
        proc, lines = self.server
        code, output = None, []
        try:
            proc.stdin.write(json.dumps(argv) + "\n")
            proc.stdin.flush()
        except OSError:
            code = 1
        while code is None:
            try:
                line = lines.get(timeout=max(0.0, timeout - (time.monotonic() - t)))
            except queue.Empty:  # timed out: kill the child, the next step starts another
                break
            if line is None:  # the child died
                code = 1
            elif line.startswith(SERVER_MARK + " "):
                code = int(line.split()[1])
            else:
                output.append(line)
        if code is None or proc.poll() is not None:
            self.stop_server()
        seconds = time.monotonic() - t
        text = "".join(output)
        with open(self.log_path, "a") as f:
            f.write(text)
            f.write(f"===== {name}: exit {code}, {seconds:.1f} s\n")
        return code, text, seconds

    def stop_server(self) -> None:
        if self.server is not None:
            proc, _ = self.server
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            self.server = None

    def step(self, name: str, fn, timeout: float, fatal: bool = False) -> None:
        left = self.remaining()
        if left < 10:
            self.steps[name] = {"status": "skipped", "fatal": fatal,
                                "reason": f"time budget of {self.budget:.0f} s used up"}
            self.note(f"[{name}] skipped: the time budget is used up")
            return
        timeout = min(timeout, left)
        t = time.monotonic()
        self.note(f"[{name}] ... (timeout {timeout:.0f} s)")
        try:
            result = fn(timeout)
        except Exception as e:  # a step's own parsing error: record it, go on
            result = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        result.setdefault("status", "ok")
        result["fatal"] = fatal
        result["seconds"] = round(time.monotonic() - t, 1)
        self.steps[name] = result
        brief = result.get("reason") or result.get("summary") or ""
        self.note(f"[{name}] {result['status']} in {result['seconds']} s {brief}".rstrip())

    @staticmethod
    def last_json(output: str):
        for line in reversed(output.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        raise ValueError("the command printed no JSON line")

    @staticmethod
    def failed(code, output: str, what: str) -> dict:
        tail = " | ".join(output.strip().splitlines()[-3:])[-600:]
        reason = "timed out" if code is None else f"exit {code}"
        return {"status": "timeout" if code is None else "failed",
                "reason": f"{what} {reason}: {tail}"}

    # --------------------------------------------------------------------- steps
    def environment(self, timeout):
        code, output, _ = self.run("environment", [
            sys.executable, "-c", ENV_PROBE, json.dumps({**REQUIRED, **OPTIONAL})], timeout)
        if code != 0:
            return self.failed(code, output, "the environment probe")
        r = self.last_json(output)
        missing = [m for m in r["missing"] if m in REQUIRED]
        r["missing_required"] = missing
        r["missing_optional"] = [m for m in r["missing"] if m in OPTIONAL]
        r["wheels_to_carry"] = [PIP_DOWNLOAD.format(name=WHEELS[m][0], version=WHEELS[m][1])
                                for m in missing if m in WHEELS]
        r["summary"] = (f"{r.get('device')} ({r.get('backend')}), jax "
                        f"{r['versions'].get('jax')}, flax {r['versions'].get('flax')}, "
                        f"optax {r['versions'].get('optax')}; missing: "
                        f"{', '.join(r['missing']) or 'nothing'}")
        if "jax_error" in r:
            r["status"], r["reason"] = "failed", "JAX did not start: " + r["jax_error"]
        elif missing:
            r["status"] = "failed"
            r["reason"] = (f"missing {', '.join(missing)}: carry wheels (see "
                           f"wheels_to_carry) in .whl/; " + "; ".join(r["wheels_to_carry"]))
        return r

    def _pytest(self, name, tests, timeout, env):
        xml = self.tmp / f"{name}.xml"
        # `-o addopts=`: not setup.cfg's two xdist workers (each a JAX start, and two
        # processes on one accelerator); a few tests run in this process
        cmd = [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
               "-p", "accel_float32", f"--junitxml={xml}", *tests]
        code, output, _ = self.run(name, cmd, timeout, env)
        if code is None or not xml.is_file():
            return self.failed(code, output, "pytest")
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        bad = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
               if c.find("failure") is not None or c.find("error") is not None]
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        r = {**counts, "passed": passed, "failed_tests": bad,
             "summary": f"{passed} passed, {len(bad)} failed, {counts['skipped']} skipped"}
        if code != 0 or bad or passed == 0:
            r.update(status="failed", reason=r["summary"] + (": " + ", ".join(bad) if bad
                                                              else f" (pytest exit {code})"))
        return r

    def _test_env(self, precision: str | None):
        env = dict(self.env)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env["PYTHONPATH"]])
        env.pop("JAX_DEFAULT_MATMUL_PRECISION", None)
        if precision:
            env["JAX_DEFAULT_MATMUL_PRECISION"] = precision
        return env

    def numerics(self, timeout):
        lost = missing_tests(NUMERIC_TESTS + DEFAULT_PRECISION_TESTS)
        if lost:  # a renamed or moved test: update NUMERIC_TESTS
            return {"status": "failed", "reason": "no such test(s): " + ", ".join(lost)}
        tests = REHEARSAL_TESTS if self.args.rehearse else NUMERIC_TESTS
        r = self._pytest("numerics", tests, timeout, self._test_env("highest"))
        r["matmul_precision"], r["auto_dtype"] = "highest", "float32"
        return r

    def numerics_default_precision(self, timeout):
        tests = (REHEARSAL_TESTS[:1] if self.args.rehearse else DEFAULT_PRECISION_TESTS)
        r = self._pytest("numerics_default_precision", tests, timeout, self._test_env(None))
        r["matmul_precision"] = "default"
        return r

    def plan_of_one(self, timeout):
        work = self.tmp / "plan_of_one"
        work.mkdir()
        code, output, _ = self.run("plan_of_one", [sys.executable, "-c", WORKER_RUNNER,
                                                   str(work)], timeout,
                                   self._test_env("highest"))
        if code != 0:
            return self.failed(code, output, "tests/parallel_worker.py step")
        rep = self.last_json(output)
        diffs, bad = {}, []
        for key in ("mesh_-1", "mesh_1"):
            r = rep[key]
            d = max(r[k] for k in ("loss", "nll", "grads", "params", "carry"))
            ratio = abs(r["grad_norm_ratio"] - 1.0)
            diffs[key] = {"max_abs_diff": d, "grad_norm_ratio": r["grad_norm_ratio"]}
            if not d < PLAN_TOL or not ratio < PLAN_TOL:
                bad.append(key)
        out = {"devices": rep["devices"], "tolerance": PLAN_TOL, "strategies": diffs,
               "dropout_repeat_diff": rep["dropout"]["mesh_repeat"],
               "summary": f"{rep['devices']} device(s): max difference "
                          f"{max(v['max_abs_diff'] for v in diffs.values()):.2e}"}
        if bad or out["dropout_repeat_diff"] != 0.0:
            out.update(status="failed", reason=f"the plan differs from the plain step: "
                       f"{bad or 'dropout not reproducible'}")
        return out

    def auto_choices(self, timeout):
        code, output, _ = self.run("auto_choices", [
            sys.executable, "-c", AUTO_PROBE, json.dumps(AUTO_SHAPES[self.mode])], timeout)
        if code != 0:
            return self.failed(code, output, "the auto probe")
        r = self.last_json(output)
        first = r[AUTO_SHAPES[self.mode][0][0]]
        r["summary"] = (f"{first['compute_dtype']}, fused rows "
                        f"{first['train_fused_rows_per_chunk']} (train), "
                        f"{first['eval_fused_rows_per_chunk']} (eval), stream chunk "
                        f"{first['full_logprobs_stream_chunk']} (full log-probs)")
        return r

    def bench(self, name, extra, timeout):
        out_json = self.tmp / f"{name}.json"
        cmd = [sys.executable, "-m", "mos_jax.cli", "bench", *extra, "--out", str(out_json)]
        code, output, _ = self.run_cli(name, cmd[3:], timeout)
        if code != 0 or not out_json.is_file():
            return self.failed(code, output, "mos-jax bench")
        b = json.loads(out_json.read_text())
        r = {"command": "mos-jax " + " ".join(cmd[3:-2]), "device": b["device"],
             "compute_dtype": b["compute_dtype"], "vocab_chunk": b["vocab_chunk"],
             "params": b["params"], "matmul_peak_gflops": b["matmul_peak_gflops"],
             "workloads": {}}
        for w in ("train", "eval", "dynamic_eval"):
            if w in b:
                x = b[w]
                r["workloads"][w] = {"tokens_per_s": x["tokens_per_s"]["median"],
                                     "tokens_per_s_min": x["tokens_per_s"]["min"],
                                     "tokens_per_s_max": x["tokens_per_s"]["max"],
                                     "compile_s": x["compile_s"],
                                     "peak_memory_mb": x["peak_memory_mb"],
                                     "memory_kind": x["memory_kind"], "mfu": x["mfu"],
                                     "batch": x["batch"], "bptt": x["bptt"]}
        r["summary"] = ", ".join(f"{w} {v['tokens_per_s']:,.0f} tok/s"
                                 for w, v in r["workloads"].items())
        return r

    def _train_cmd(self, workdir, extra=()):
        cmd = [sys.executable, "-m", "mos_jax.cli", "train", "--config",
               self.s["train_config"], "--workdir", str(workdir), *TRAIN_COMMON,
               *self.s["train"], *extra]
        if self.s["corpus"]:
            cmd.append(f"--config.data.dir={Path(self.args.data).resolve() / self.s['corpus']}")
        return cmd

    def train(self, name, timeout, extra=(), env=None):
        corpus = self.s["corpus"]
        if corpus and not (Path(self.args.data) / corpus / "train.txt").is_file():
            return {"status": "failed",
                    "reason": f"no {corpus} corpus in {self.args.data}: copy it into the "
                              f"repository (e.g. .data/{corpus}), carry it, pass --data .data"}
        workdir = self.tmp / name
        cmd = self._train_cmd(workdir, extra)
        if env is None:
            code, output, seconds = self.run_cli(name, cmd[3:], timeout)
        else:
            code, output, seconds = self.run(name, cmd, timeout, env)
        if code != 0:
            return self.failed(code, output, "mos-jax train")
        records = [json.loads(line) for line in
                   (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        epochs = [{k: e[k] for k in ("epoch", "step", "train_loss", "valid_loss",
                                     "tokens_per_s", "train_tokens", "train_s")}
                  for e in records if "epoch" in e and not e.get("final")]
        if not epochs:
            return {"status": "failed", "reason": "no epoch record in metrics.jsonl"}
        later = epochs[1:] or epochs
        steady = sum(e["train_tokens"] for e in later) / sum(e["train_s"] for e in later)
        result = json.loads(output.strip().splitlines()[-1]) if output.strip() else {}
        shown = [a for a in cmd[3:] if a != "--workdir" and a != str(workdir)]
        shown = [f"--config.data.dir=DATA/{corpus}" if a.startswith("--config.data.dir=")
                 else a for a in shown]  # no machine's path in the record
        r = {"command": "mos-jax " + " ".join(shown),
             "epochs": epochs, "steps": epochs[-1]["step"],
             "tokens_per_s_steady": round(steady, 1),
             "tokens_per_s_first_epoch": round(epochs[0]["tokens_per_s"], 1),
             "compilations": result.get("compilations"), "wall_s": round(seconds, 1),
             "final_train_loss": epochs[-1]["train_loss"],
             "summary": f"{epochs[-1]['step']} steps, {steady:,.0f} tok/s after epoch 1, "
                        f"train loss {epochs[0]['train_loss']:.3f} -> "
                        f"{epochs[-1]['train_loss']:.3f}"}
        return r

    def compare_with_cpu(self, r):
        """The loss curve against the stored CPU run of the same steps."""
        if r.get("status", "ok") != "ok":
            return
        if not REFERENCE.is_file():
            r["cpu_reference"] = "missing: run benchmarks/accelerator_check.sh --cpu-reference"
            return
        ref = json.loads(REFERENCE.read_text()).get(self.mode)
        if not ref or [e["step"] for e in ref["epochs"]] != [e["step"] for e in r["epochs"]]:
            r["cpu_reference"] = "not comparable: other steps (regenerate with --cpu-reference)"
            return
        rows = []
        for a, b in zip(r["epochs"], ref["epochs"]):
            rows.append({"epoch": a["epoch"], "train_loss": a["train_loss"],
                         "cpu_train_loss": b["train_loss"],
                         "rel_diff": abs(a["train_loss"] - b["train_loss"]) / abs(b["train_loss"]),
                         "valid_loss": a["valid_loss"], "cpu_valid_loss": b["valid_loss"]})
        r["cpu_reference"] = {"device": ref["device"], "jax": ref["jax"],
                              "tokens_per_s_steady": ref["tokens_per_s_steady"],
                              "speedup": round(r["tokens_per_s_steady"]
                                               / ref["tokens_per_s_steady"], 2),
                              "max_rel_loss_diff": max(x["rel_diff"] for x in rows),
                              "curve": rows}
        r["summary"] += (f"; {r['cpu_reference']['speedup']}x the CPU reference, loss "
                         f"within {r['cpu_reference']['max_rel_loss_diff']:.2%}")

    def fused_tiles(self, timeout):
        cmd = [sys.executable, "benchmarks/fused_chunks.py", *self.s["fused_tiles"]]
        code, output, _ = self.run("fused_tiles", cmd, timeout)
        if code != 0:
            return self.failed(code, output, "benchmarks/fused_chunks.py")
        lines = [x for x in output.splitlines() if x.strip()]
        return {"command": "python " + " ".join(cmd[1:]), "output": lines[-12:],
                "summary": f"{len(lines)} lines"}

    # ---------------------------------------------------------------------- main
    def bench_variants(self):
        chunk = str(self.s["stream_chunk"])
        only = self.s.get("alternatives_only")
        for dtype in ("bfloat16", "float32"):
            for vc in ("auto", "0", chunk):
                first = dtype == "bfloat16" and vc == "auto"
                yield f"bench_ptb_{dtype}_chunk_{vc}", [
                    *self.s["bench"], "--dtype", dtype, "--vocab-chunk", vc,
                    *(["--only", only] if only and not first else [])]

    def run_all(self) -> int:
        to = self.s["timeouts"]
        self.step("environment", self.environment, to["environment"], fatal=True)
        if self.steps["environment"]["status"] != "ok":
            return self.finish()
        self.step("numerics", self.numerics, to["numerics"], fatal=True)
        self.step("plan_of_one", self.plan_of_one, to["plan_of_one"], fatal=True)
        self.step("auto_choices", self.auto_choices, to["auto_choices"])
        bench = {name: (lambda t, n=name, e=extra: self.bench(n, e, t))
                 for name, extra in self.bench_variants()}
        bench["bench_wt2_one_piece"] = lambda t: self.bench("bench_wt2_one_piece",
                                                            self.s["wt2"], t)

        def train(name, extra=()):
            def run(t):
                r = self.train(name, t, extra)
                self.compare_with_cpu(r)
                return r
            return run
        # In order of importance, so a short budget still measures what users get:
        # auto's own choice (bfloat16 on a GPU), the training run, the alternatives.
        order = ["bench_ptb_bfloat16_chunk_auto", "train_ptb", "bench_ptb_bfloat16_chunk_0",
                 f"bench_ptb_bfloat16_chunk_{self.s['stream_chunk']}", "bench_wt2_one_piece",
                 "bench_ptb_float32_chunk_auto", "bench_ptb_float32_chunk_0",
                 f"bench_ptb_float32_chunk_{self.s['stream_chunk']}"]
        for name in order:
            if name == "train_ptb":
                self.step(name, train(name), to["train"])
            else:
                self.step(name, bench[name], to["bench"])
        self.step("numerics_default_precision", self.numerics_default_precision,
                  to["numerics_default_precision"])
        self.step("fused_tiles", self.fused_tiles, to["fused_tiles"])
        self.step("train_ptb_float32",
                  train("train_ptb_float32", ["--config.model.compute_dtype=float32"]),
                  to["train"])
        return self.finish()

    def finish(self) -> int:
        fatal_bad = [n for n, r in self.steps.items() if r["fatal"] and r["status"] != "ok"]
        other_bad = [n for n, r in self.steps.items() if not r["fatal"] and r["status"] != "ok"]
        code = 1 if fatal_bad else (3 if other_bad else 0)
        env = self.steps.get("environment", {})
        report = {"mode": self.mode, "budget_s": self.budget,
                  "elapsed_s": round(time.monotonic() - self.t0, 1),
                  "device": env.get("device"), "backend": env.get("backend"),
                  "versions": env.get("versions"), "exit_code": code,
                  "numeric_checks_passed": not fatal_bad, "failed_steps": fatal_bad + other_bad,
                  "steps": self.steps}
        (self.out / "accelerator_check.json").write_text(json.dumps(report, indent=2) + "\n")
        table = format_table(report)
        (self.out / "accelerator_check.md").write_text(table + "\n")
        self.note("\n" + table)
        self.note(f"wrote {self.out}/accelerator_check.json, .md and .log; exit {code}")
        self.stop_server()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return code


def format_table(report: dict) -> str:
    v = report.get("versions") or {}
    lines = [f"# Accelerator check ({report['mode']})", "",
             f"Device: {report.get('device')} ({report.get('backend')}); jax {v.get('jax')}, "
             f"flax {v.get('flax')}, optax {v.get('optax')}; {report['elapsed_s']} s of a "
             f"{report['budget_s']:.0f} s budget; exit {report['exit_code']}.", "",
             "| step | status | s | result |", "| --- | --- | ---: | --- |"]
    for name, r in report["steps"].items():
        text = (r.get("reason") or r.get("summary") or "").replace("|", "/")
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {text[:160]} |")
    benches = {n: r for n, r in report["steps"].items()
               if r["status"] == "ok" and "workloads" in r}
    if benches:
        lines += ["", "| bench | dtype | vocab_chunk | train tok/s | eval tok/s | "
                  "dyn-eval tok/s | train peak MB | train MFU |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for n, r in benches.items():
            w = r["workloads"]
            lines.append(
                f"| {n} | {r['compute_dtype']} | {r['vocab_chunk']} | "
                + " | ".join(f"{w[k]['tokens_per_s']:,.0f}" if k in w else "-"
                             for k in ("train", "eval", "dynamic_eval"))
                + f" | {w.get('train', {}).get('peak_memory_mb', '-')} | "
                + (f"{w['train']['mfu']:.1%}" if "train" in w else "-") + " |")
    return "\n".join(lines)


def wheel_commands() -> str:
    name, version = WHEELS["ml_collections"]
    lines = ["# in the repository root here (.whl/ is ignored); pure-Python wheels:",
             PIP_DOWNLOAD.format(name=name, version=version),
             "# ml_collections' requirements, on the H200 image already; only where the "
             "check reports them missing:"]
    lines += ["# " + PIP_DOWNLOAD.format(name=n, version=v)
              for m, (n, v) in WHEELS.items() if m != "ml_collections"]
    return "\n".join(lines)


def cpu_reference(args) -> int:
    """Run the training step on the CPU and store its figures as the reference."""
    check = Check(args)
    check.budget = 7200.0  # the CPU takes its time; nothing else runs
    name = "train_ptb"
    check.step(name, lambda t: check.train(name, t), 3600 if not args.rehearse else 300)
    r = check.steps[name]
    check.stop_server()
    shutil.rmtree(check.tmp, ignore_errors=True)
    if r["status"] != "ok":
        print(json.dumps(r, indent=2))
        return 1
    import platform
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.__version__)"],
                           capture_output=True, text=True, env=check.env)
    data = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {}
    data[check.mode] = {"device": f"CPU ({platform.processor() or platform.machine()}, "
                                  f"{os.cpu_count()} cores visible)",
                        "jax": probe.stdout.strip(), "command": r["command"],
                        "epochs": r["epochs"], "tokens_per_s_steady": r["tokens_per_s_steady"],
                        "compilations": r["compilations"]}
    REFERENCE.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {REFERENCE.relative_to(ROOT)} ({check.mode})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"),
                   help="directory holding ptb/ (default ../shared/data beside the "
                   "repository; on a device machine the carried .data)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" /
                                                                  "accelerator_check"),
                   help="output directory (default $OUT, else runs/accelerator_check)")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds for all steps (default 470; rehearsal 240)")
    p.add_argument("--rehearse", action="store_true",
                   help="every step on the CPU at tiny sizes (a minute or two)")
    p.add_argument("--cpu-reference", action="store_true",
                   help="train the same steps on the CPU and store the figures in "
                   "benchmarks/accelerator_check_cpu_reference.json")
    p.add_argument("--wheel-commands", action="store_true",
                   help="print the pip commands that fetch the wheels to carry")
    args = p.parse_args(argv)
    if args.wheel_commands:
        print(wheel_commands())
        return 0
    if args.cpu_reference:
        return cpu_reference(args)
    return Check(args).run_all()


if __name__ == "__main__":
    sys.exit(main())
