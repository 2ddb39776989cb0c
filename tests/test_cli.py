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
    corpus = data.load_corpus("synthetic")
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
    for command in ("download", "import-torch", "evaluate"):
        assert command in out.stdout
    out = subprocess.run([sys.executable, "-m", "mos_jax.cli", "download", "nope",
                          "--dest", "x"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_train_continue_and_evaluate(tmp_path, capsys):
    w = str(tmp_path / "run")
    assert cli.main(["train", "--config", str(CONFIGS / "tiny.py"), "--workdir", w,
                     "--config.train.max_epochs", "1", "--config.train.test=false"]) == 0
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
    assert cli.main(["evaluate", "--workdir", w, "--weights", w]) == 2
    assert "exactly one" in capsys.readouterr().err
