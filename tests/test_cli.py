"""The `mos-jax` command: evaluation end to end, clear errors, the console script."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import numpy_reference as ref
from mos_jax import cli, convert, data
from mos_jax.progress import read_metrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def synthetic_model(tmp_path_factory):
    """Random reference-layout weights for the built-in synthetic corpus, imported."""
    corpus = data.synthetic_corpus()
    state = ref.random_state(np.random.default_rng(0), vocab=corpus.vocab_size, emsize=4,
                             nhid=6, nhidlast=5, nlayers=3, n_experts=2, head="mos",
                             scale=0.3)
    out = tmp_path_factory.mktemp("model")
    np.savez(out / "w.npz", **state)
    convert.save_weights(out, *convert.load_reference_npz(out / "w.npz"))
    return corpus, state, out


def test_evaluate_matches_the_numpy_reference(synthetic_model, tmp_path, capsys):
    corpus, state, weights = synthetic_model
    dump = tmp_path / "logp.npy"
    rc = cli.main(["evaluate", "--weights", str(weights), "--data", "synthetic",
                   "--split", "valid", "--batch-size", "4", "--bptt", "35",
                   "--dump", str(dump)])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = ref.token_logprobs(state, corpus.valid, 4, 35, "mos")
    assert result["tokens"] == want.size
    assert result["ppl"] == pytest.approx(float(np.exp(-want.mean())), rel=1e-5)
    np.testing.assert_allclose(np.load(dump), want, atol=1e-5)


def test_evaluate_refuses_a_corpus_with_another_vocabulary(synthetic_model, tmp_path,
                                                           capsys):
    d = tmp_path / "corpus"
    d.mkdir()
    for split in data.SPLITS:
        (d / f"{split}.txt").write_text("w0 w1 w2\n")
    rc = cli.main(["evaluate", "--weights", str(synthetic_model[2]), "--data", str(d)])
    assert rc == 2
    assert "500-word vocabulary" in capsys.readouterr().err


def test_user_errors_exit_2_without_traceback(tmp_path, capsys):
    assert cli.main(["evaluate", "--weights", str(tmp_path), "--data", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "model.json" in err and "Traceback" not in err
    assert cli.main(["import-torch", str(tmp_path / "x.pt"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and ("x.pt" in err or "PyTorch" in err)


def test_console_script_is_installed():
    exe = shutil.which("mos-jax")
    if exe is None:
        pytest.skip("the package is not installed (pip install -e '.[test]')")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in ("download", "import", "import-torch", "evaluate"):
        assert command in out.stdout
    from mos_jax import __version__
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"mos-jax {__version__}"
    out = subprocess.run([sys.executable, "-m", "mos_jax.cli", "download", "nope",
                          "--dest", "x"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_train_continue_and_evaluate(tmp_path, capsys):
    w = str(tmp_path / "run")
    # 4,000 training tokens, as the shared tiny run: the same compiled programs, and
    # a fifth of the steps (the sizes are not what this test is about)
    assert cli.main(["train", "--config", str(CONFIGS / "tiny.py"), "--workdir", w,
                     "--config.train.max_epochs", "1", "--config.train.test=false",
                     "--config.data.synthetic.train_tokens=4000"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["best_epoch"] == 1
    # Continue the finished run for one more epoch, from its own config.
    assert cli.main(["train", "--workdir", w, "--config.train.max_epochs=2"]) == 0
    records = [r for r in read_metrics(w) if "valid_ppl" in r and not r.get("final")]
    assert [r["epoch"] for r in records] == [1, 2]
    assert {"config_changes": {"train.max_epochs": [1, 2]}, "step": records[0]["step"]} in [
        r for r in read_metrics(w) if "config_changes" in r]
    best = min(r["valid_ppl"] for r in records)
    # evaluate --workdir scores the best weights: same ppl as the training loop saw.
    assert cli.main(["evaluate", "--workdir", w, "--split", "valid", "--batch-size", "8",
                     "--bptt", "20"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ppl"] == pytest.approx(best, rel=1e-9)
    # --data synthetic is the run's own chain (its data.synthetic keys), as the config
    # path reads it: the same perplexity.
    assert cli.main(["evaluate", "--workdir", w, "--data", "synthetic", "--split", "valid",
                     "--batch-size", "8", "--bptt", "20"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["ppl"] == pytest.approx(best, rel=1e-9)
    assert cli.main(["evaluate", "--workdir", w, "--weights", w]) == 2
    assert "exactly one" in capsys.readouterr().err


def test_version(capsys):
    from mos_jax import __version__
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"mos-jax {__version__}"


# Bad arguments and unwritable outputs: one line, exit status 2, refused before any work
# (the model is never loaded) and nothing written. Each case: (argv, words of the message).
BAD_ARGUMENTS = {
    "evaluate --bptt 0": (["evaluate", "--bptt", "0"], "--bptt must be at least 1, got 0"),
    "evaluate --batch-size 0": (["evaluate", "--batch-size", "0"],
                                "--batch-size must be at least 1, got 0"),
    "evaluate --dump under a file": (["evaluate", "--dump", "{tmp}/afile/x.npy"],
                                     "afile is a file, not a folder"),
    "evaluate --dump x.txt": (["evaluate", "--dump", "{tmp}/x.txt"], "ending in one of .npy"),
    "dynamic-eval --bptt 0": (["dynamic-eval", "--bptt", "0"],
                              "--bptt must be at least 1, got 0"),
    "dynamic-eval --batch-size 0": (["dynamic-eval", "--batch-size", "0"],
                                    "--batch-size must be at least 1, got 0"),
    "dynamic-eval --stats-batch-size 0": (["dynamic-eval", "--stats-batch-size", "0"],
                                          "--stats-batch-size must be at least 1"),
    "dynamic-eval --lamb 0": (["dynamic-eval", "--lamb", "0"],
                              "--lamb must be a positive number, got 0.0"),
    "dynamic-eval --epsilon nan": (["dynamic-eval", "--epsilon", "nan"],
                                   "--epsilon must be a positive number, got nan"),
    "dynamic-eval --out under a file": (["dynamic-eval", "--out", "{tmp}/afile/r.json"],
                                        "afile is a file, not a folder"),
    "rank --plot x.txt": (["rank", "--plot", "{tmp}/x.txt"], "cannot write a .txt file"),
    "rank --bptt 0": (["rank", "--bptt", "0"], "--bptt must be at least 1, got 0"),
    "generate --out a folder": (["generate", "--out", "{tmp}"], "is a folder, not a file"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_are_refused_before_any_work(case, synthetic_model, tmp_path,
                                                   capsys, monkeypatch):
    argv, words = BAD_ARGUMENTS[case]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]

    def no_work(args):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load_model", no_work)
    (tmp_path / "afile").write_text("a file, not a folder\n")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert cli.main(argv + ["--weights", str(synthetic_model[2]),
                            "--data", "synthetic"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert words in captured.err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_lamb_0_fails_alike_with_or_without_cached_statistics(synthetic_model, tmp_path,
                                                              capsys, monkeypatch):
    from mos_jax import dynamic_eval

    def interrupt(*args, **kwargs):  # the statistics are cached: the rest is not needed
        raise KeyboardInterrupt

    monkeypatch.setattr(dynamic_eval, "dynamic_evaluate", interrupt)
    weights = tmp_path / "weights"
    shutil.copytree(synthetic_model[2], weights)
    common = ["dynamic-eval", "--weights", str(weights), "--data", "synthetic",
              "--split", "valid", "--bptt", "50", "--batch-size", "8",
              "--stats-batch-size", "8", "--max-batches", "1"]
    assert cli.main(common + ["--lamb", "0"]) == 2
    without = capsys.readouterr().err
    assert not (weights / "dynamic_eval").exists()
    assert cli.main(common) == 130  # caches the statistics, then is interrupted
    capsys.readouterr()
    cached = list((weights / "dynamic_eval").glob("stats-*.npz"))
    assert len(cached) == 1
    assert cli.main(common + ["--lamb", "0"]) == 2
    assert capsys.readouterr().err == without
    assert "--lamb must be a positive number" in without


def test_plot_refuses_a_non_image_name_before_reading_the_runs(tmp_path, capsys):
    # The runs do not even exist: the output name is checked first.
    out = tmp_path / "curves.txt"
    assert cli.main(["plot", "--workdir", str(tmp_path / "nope"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and ".png" in err and "Traceback" not in err
    assert not out.exists()


def test_import_takes_npz_and_pt_says_no_such_file_first(synthetic_model, tmp_path,
                                                         capsys, monkeypatch):
    corpus, state, weights = synthetic_model
    # A string metadata entry (a JSON config) beside the weights is ignored.
    npz = tmp_path / "ref.npz"
    np.savez(npz, **state, config=np.asarray(json.dumps({"emsize": 4})))
    assert cli.main(["import", str(npz), "--out", str(tmp_path / "a")]) == 0
    assert "into" in capsys.readouterr().out
    config, params = convert.load_weights(tmp_path / "a")
    for key, value in convert.to_reference_state(config, params).items():
        np.testing.assert_array_equal(value, state[key].astype(np.float32), err_msg=key)
    # The old name still works.
    assert cli.main(["import-torch", str(npz), "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    # A missing .pt: the path is named, whether PyTorch is installed or not.
    monkeypatch.setitem(sys.modules, "torch", None)  # as if PyTorch were not installed
    assert cli.main(["import", str(tmp_path / "x.pt"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no such file:") and "x.pt" in err
    assert "PyTorch" not in err and not (tmp_path / "c").exists()
    # An existing .pt without PyTorch asks for it.
    (tmp_path / "y.pt").write_bytes(b"not read")
    assert cli.main(["import", str(tmp_path / "y.pt"), "--out", str(tmp_path / "c")]) == 2
    assert "needs PyTorch" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["evaluate", "dynamic-eval"])
def test_model_shards_refusals_name_the_flag(tiny_run, capsys, command):
    """--model-shards that cannot split (3 on this process's devices, 0) is refused
    in one line that names the flag the user gave, not a config key the command does
    not take (parallel.mesh.model)."""
    for shards in ("3", "0"):
        assert cli.main([command, "--workdir", str(tiny_run), "--split", "valid",
                         "--model-shards", shards]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "Traceback" not in err, err
        assert "--model-shards" in err and "parallel.mesh" not in err, err


def test_rank_takes_the_placement_flags(tiny_run, capsys):
    """rank --model-shards: refused in one line naming the flag where it cannot split;
    --model-shards 1 (one group of one device) gives the rank of the plain command."""
    for shards in ("3", "0"):
        assert cli.main(["rank", "--workdir", str(tiny_run), "--contexts", "20",
                         "--model-shards", shards]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "--model-shards" in err, err
        assert "parallel.mesh" not in err and "Traceback" not in err, err
    results = []
    for extra in ([], ["--model-shards", "1", "--num-devices", "1"]):
        assert cli.main(["rank", "--workdir", str(tiny_run), "--contexts", "20",
                         "--plot", str(tiny_run.parent / "r.png"), *extra]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["rank"] == results[1]["rank"] and results[0]["contexts"] == 20
