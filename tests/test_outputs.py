"""Output paths: one rule for every command's outputs, checked before any work, and
results that survive a write failing after the work (`mos_jax.outputs`)."""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest

from mos_jax import cli, outputs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = str(CONFIGS / "tiny.py")

# Bad paths: {file} is an existing file, {dir} an existing folder; /proc takes no new
# files (although os.access says it is writable, to root).
BAD_FILE_PATHS = {  # where a file is wanted: (path, words of the message)
    "a file as a folder": ("{file}/sub/x{ext}", "is a file, not a folder"),
    "an existing folder": ("{dir}", "is a folder, not a file"),
    "a folder without new files": ("/proc/mos-jax-test/x{ext}",
                                   "cannot create files in /proc"),
}
BAD_FOLDER_PATHS = {  # where a folder is wanted
    "a file as a folder": ("{file}/run", "is a file, not a folder"),
    "an existing file": ("{file}", "is a file, not a folder"),
    "a folder without new files": ("/proc/mos-jax-test", "cannot create files in /proc"),
}

# (command line with {path}, the flag, file suffix or None for a folder, what must not
# run: "module:attribute" of the work)
MODEL = ["--weights", "{dir}", "--data", "synthetic"]
COMMANDS = {
    "evaluate --dump": (["evaluate", *MODEL, "--dump", "{path}"], ".npy", "cli:_load_model"),
    "evaluate --out": (["evaluate", *MODEL, "--out", "{path}"], ".json", "cli:_load_model"),
    "dynamic-eval --dump": (["dynamic-eval", *MODEL, "--dump", "{path}"], ".npy",
                            "cli:_load_model"),
    "dynamic-eval --out": (["dynamic-eval", *MODEL, "--out", "{path}"], ".json",
                           "cli:_load_model"),
    "rank --plot": (["rank", *MODEL, "--plot", "{path}"], ".png", "cli:_load_model"),
    "rank --out": (["rank", *MODEL, "--out", "{path}"], ".json", "cli:_load_model"),
    "generate --out": (["generate", *MODEL, "--out", "{path}"], ".txt",
                       "cli:_load_model"),
    "plot --out": (["plot", "--workdir", "{dir}", "--out", "{path}"], ".png",
                   "plot:epoch_curves"),
    "bench --out": (["bench", "--config", TINY, "--out", "{path}"], ".json",
                    "bench:run_bench"),
    "train --workdir": (["train", "--config", TINY, "--workdir", "{path}"], None,
                        "train:load_corpus_from"),
    "finetune --workdir": (["finetune", "--config", TINY, "--workdir", "{path}",
                            "--config.finetune.init_from={dir}"], None,
                           "train:load_corpus_from"),
    "compare-heads --workdir": (["compare-heads", "--config", TINY, "--heads",
                                 "softmax,mos", "--workdir", "{path}"], None,
                                "compare:_run_worker"),
    "study --workdir": (["study", "--workdir", "{path}", "--widths", "8"], None,
                        "compare:compare_heads"),
    "demo --workdir": (["demo", "--workdir", "{path}"], None, "train:train_and_evaluate"),
    "import --out": (["import", "{file}", "--out", "{path}"], None,
                     "convert:read_weights"),
    "download --dest": (["download", "ptb", "--dest", "{path}"], None,
                        "download:download_corpus"),
}
CASES = [(command, bad) for command, (_, suffix, _) in COMMANDS.items()
         for bad in (BAD_FOLDER_PATHS if suffix is None else BAD_FILE_PATHS)]


@pytest.mark.parametrize("command,bad", CASES, ids=[f"{c}: {b}" for c, b in CASES])
def test_a_bad_output_path_is_refused_in_one_line_before_any_work(
        command, bad, tmp_path, capfd, monkeypatch):
    argv, suffix, work = COMMANDS[command]
    path, words = (BAD_FOLDER_PATHS if suffix is None else BAD_FILE_PATHS)[bad]
    afile, adir = tmp_path / "afile", tmp_path / "adir"
    afile.write_text("not a folder\n")
    adir.mkdir()
    names = {"{file}": str(afile), "{dir}": str(adir), "{ext}": suffix or ""}
    for key, value in names.items():
        path = path.replace(key, value)
    argv = [a.replace("{path}", path) for a in argv]
    for key, value in names.items():
        argv = [a.replace(key, value) for a in argv]

    def no_work(*args, **kwargs):
        raise AssertionError(f"{work} ran before the output path was checked")

    module, attribute = work.split(":")
    import importlib
    monkeypatch.setattr(importlib.import_module(f"mos_jax.{module}"), attribute, no_work)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert cli.main(argv) == 2
    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, \
        captured.err
    flag = command.split()[-1]
    assert captured.err.startswith(f"error: {flag} {path}") and words in captured.err
    assert "choose another path" in captured.err or "file name inside" in captured.err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written
    assert afile.read_text() == "not a folder\n"


def test_missing_folders_are_created_for_every_output(tiny_run, tmp_path, capfd):
    dump, out = tmp_path / "a" / "b" / "logp.npy", tmp_path / "c" / "r.json"
    assert cli.main(["evaluate", "--workdir", str(tiny_run), "--split", "valid",
                     "--batch-size", "4", "--bptt", "20", "--dump", str(dump),
                     "--out", str(out)]) == 0
    result = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert np.load(dump).size == result["tokens"] and result["dump"] == str(dump)
    assert json.loads(out.read_text())["nll"] == result["nll"]


def test_the_rule_itself(tmp_path):
    (tmp_path / "f").write_text("x")
    outputs.check_file("--out", tmp_path / "f")  # an existing file is overwritten
    outputs.check_file("--out", tmp_path / "new" / "deeper" / "x.json")
    outputs.check_folder("--workdir", tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # the probe is gone
    with pytest.raises(outputs.OutputError,
                       match=r"ending in one of \.pdf, \.png \(e\.g\. x\.png\)"):
        outputs.check_file("--plot", tmp_path / "x.txt", {".png", ".pdf"})
    created = outputs.make_folder("--workdir", tmp_path / "m" / "n")
    assert created == [tmp_path / "m", tmp_path / "m" / "n"] and created[-1].is_dir()


# --------------------------------------------------- a write that fails after the work

@pytest.fixture
def fallbacks(tmp_path, monkeypatch):
    """The temporary folder the fallback files go to, for this test alone."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _block_after(monkeypatch, module, name, obstacle: Path):
    """Make `module.name` (the command's work) turn `obstacle`, a folder the output
    path needs, into a file once it is done: the write then fails for real."""
    real = getattr(module, name)

    def work(*args, **kwargs):
        result = real(*args, **kwargs)
        obstacle.write_text("in the way\n")
        return result

    monkeypatch.setattr(module, name, work)


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    return lines[0]


def test_evaluate_delivers_its_result_when_the_dump_cannot_be_written(
        tiny_run, tmp_path, fallbacks, capfd, monkeypatch):
    from mos_jax import evaluate
    common = ["evaluate", "--workdir", str(tiny_run), "--split", "valid",
              "--batch-size", "4", "--bptt", "20"]
    assert cli.main(common + ["--dump", str(tmp_path / "want.npy")]) == 0
    capfd.readouterr()
    want = np.load(tmp_path / "want.npy")

    dump, out = tmp_path / "gone" / "logp.npy", tmp_path / "r.json"
    _block_after(monkeypatch, evaluate, "token_logprobs", tmp_path / "gone")
    assert cli.main(common + ["--dump", str(dump), "--out", str(out)]) == 2
    captured = capfd.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])  # still printed
    fallback = Path(result["dump"])
    assert fallback.parent == fallbacks and fallback.name.endswith("-logp.npy")
    np.testing.assert_array_equal(np.load(fallback), want)
    assert json.loads(out.read_text()) == result  # the other output is written
    line = _error_line(captured.err)
    assert line.startswith(f"error: could not write --dump {dump}: ")
    assert line.endswith(f"; the result is above (and in {fallback})")
    assert not dump.exists()


def test_rank_delivers_its_result_when_the_plot_cannot_be_written(
        tiny_run, tmp_path, fallbacks, capfd, monkeypatch):
    from mos_jax import rank
    plot, out = tmp_path / "gone" / "spectrum.png", tmp_path / "r.json"
    _block_after(monkeypatch, rank, "analyse", tmp_path / "gone")
    assert cli.main(["rank", "--workdir", str(tiny_run), "--contexts", "60",
                     "--plot", str(plot), "--out", str(out)]) == 2
    captured = capfd.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["rank"] >= 1 and result["contexts"] == 60
    fallback = Path(result["plot"])
    assert fallback.parent == fallbacks
    assert fallback.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(out.read_text())["rank"] == result["rank"]  # --out still written
    line = _error_line(captured.err)
    assert line.startswith(f"error: could not write --plot {plot}: ")
    assert line.endswith(f"(and in {fallback})")


def test_generate_and_plot_and_bench_deliver_too(tiny_run, tmp_path, fallbacks, capfd,
                                                 monkeypatch):
    from mos_jax import bench, generate
    from mos_jax import plot as plot_lib
    # generate: the text on stdout, and in the fallback
    _block_after(monkeypatch, generate, "sample", tmp_path / "g")
    assert cli.main(["generate", "--workdir", str(tiny_run), "--words", "12",
                     "--out", str(tmp_path / "g" / "text.txt")]) == 2
    captured = capfd.readouterr()
    line = _error_line(captured.err)
    fallback = Path(line.rsplit("(and in ", 1)[1].rstrip(")"))
    assert fallback.read_text() == captured.out and captured.out.strip()
    # plot: the figure in the fallback, said so
    _block_after(monkeypatch, plot_lib, "epoch_curves", tmp_path / "p")
    assert cli.main(["plot", "--workdir", str(tiny_run),
                     "--out", str(tmp_path / "p" / "curves.png")]) == 2
    line = _error_line(capfd.readouterr().err)
    assert line.startswith(f"error: could not write --out {tmp_path / 'p' / 'curves.png'}")
    fallback = Path(line.rsplit("it is in ", 1)[1].split(" instead")[0])
    assert fallback.read_bytes()[:4] == b"\x89PNG"
    # bench (its work replaced by a stand-in): the JSON on stdout, and in the fallback
    stand_in = {"workloads": {}, "device": "cpu"}
    monkeypatch.setattr(bench, "run_bench", lambda *a, **k: dict(stand_in))
    monkeypatch.setattr(bench, "format_table", lambda result: "table")
    _block_after(monkeypatch, bench, "run_bench", tmp_path / "b")
    assert cli.main(["bench", "--config", TINY, "--out",
                     str(tmp_path / "b" / "bench.json")]) == 2
    captured = capfd.readouterr()
    printed = json.loads(captured.out.strip().splitlines()[-1])
    fallback = Path(_error_line(captured.err).rsplit("(and in ", 1)[1].rstrip(")"))
    assert json.loads(fallback.read_text()) == printed
    assert printed["device"] == "cpu"


def test_dynamic_eval_goes_on_when_its_statistics_cache_cannot_be_written(
        tiny_run, tmp_path, capfd):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "dynamic_eval").write_text("a file where the cache folder would go\n")
    assert cli.main(["dynamic-eval", "--workdir", str(run), "--split", "valid",
                     "--bptt", "20", "--batch-size", "4", "--stats-batch-size", "4",
                     "--max-batches", "2"]) == 0
    captured = capfd.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["tokens"] > 0
    assert "could not cache the gradient statistics" in captured.err
    assert "error:" not in captured.err


def test_compare_heads_delivers_its_table_when_a_summary_file_cannot_be_written(
        tmp_path, fallbacks):
    from mos_jax import compare
    from mos_jax import config as config_lib
    config = config_lib.load_config(TINY, [("data.bptt", "8"),
                                           ("data.max_seq_len_delta", "0")])
    workdir = tmp_path / "compare"
    (workdir / "compare.md").mkdir(parents=True)  # a folder where the table goes
    lines = []
    with pytest.raises(outputs.OutputError) as error:
        compare.compare_heads(config, "softmax", workdir, log=lines.append, steps=4,
                              evals=1, isolate=False)
    message = str(error.value)
    assert message.startswith(f"could not write {workdir / 'compare.md'}: ")
    fallback = Path(message.rsplit("(and in ", 1)[1].rstrip(")"))
    table = fallback.read_text().splitlines()
    assert table and table == lines[-len(table):]  # logged, and in the fallback
    saved = json.loads((workdir / "compare.json").read_text())  # the rest is written
    assert saved["markdown"] == str(fallback) and (workdir / "learning_curves.png").is_file()
