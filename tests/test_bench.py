"""`mos-jax bench`: FLOP counts by hand, and the command's JSON on the tiny config."""

import json
from pathlib import Path

import jax
import pytest

from mos_jax import bench, cli, model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_model_flops_per_token_of_the_ptb_config_by_hand():
    mc = model.ModelConfig(vocab_size=10000)  # emsize 280, nhid 960, nhidlast 620, E 15
    f = bench.model_flops_per_token(mc)
    # LSTM layer l: 4 gates x H_l x (I_l + H_l) multiply-adds, 2 FLOPs each.
    lstm = 2 * 4 * (960 * (280 + 960) + 960 * (960 + 960) + 620 * (960 + 620))
    # prior 620x15, latent 620x(15*280), then 15 decoder products 280x10000.
    head = 2 * (620 * 15 + 620 * 15 * 280 + 15 * 280 * 10000)
    assert f == {"lstm": lstm, "head": head, "forward": lstm + head}
    assert f["lstm"] / 1e6 == pytest.approx(32.2, abs=0.1)  # docs/reference.md section 6
    soft = bench.model_flops_per_token(mc.replace(head="softmax", nhidlast=280))
    assert soft["head"] == 2 * 280 * 10000
    # Mixtape, K=4: latent 620x(4*280); gates 620x(3*280) + 620x3 and 3x280 per gated
    # word (2,500 of them, plus the shared row); 4 contexts x 2,500 gated words; one
    # mixed context for the other 7,500 words.
    tape = bench.model_flops_per_token(mc.replace(head="mixtape", n_experts=4))
    assert tape["head"] == 2 * (620 * 4 * 280 + 620 * 3 * 280 + 620 * 3 + 3 * 280 * 2501
                                + 4 * 280 * 2500 + 280 * 7500)


def test_bench_command_writes_json(tmp_path, capsys):
    jax.clear_caches()  # programs compiled by earlier tests would time as 0 s compiles
    out = tmp_path / "bench.json"
    # V = 47, a size no other test compiles: the test run's compilation cache (and so a
    # compile time of 0) cannot hold these programs
    rc = cli.main(["bench", "--config", str(CONFIGS / "tiny.py"), "--vocab", "47",
                   "--only", "eval,dynamic_eval", "--repeats", "2", "--dyn-windows", "4",
                   "--out", str(out)])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == printed
    assert "train" not in printed and printed["vocab"] == 47
    # tiny, by hand: one LSTM layer 16 -> 16; 4 experts of d = 16 over V = 47
    lstm = 2 * 4 * 16 * (16 + 16)
    head = 2 * (16 * 4 + 16 * 4 * 16 + 4 * 16 * 47)
    assert printed["model_flops_per_token"] == {"lstm": lstm, "head": head,
                                                "forward": lstm + head}
    for name in ("eval", "dynamic_eval"):
        r = printed[name]
        t = r["tokens_per_s"]
        assert r["compile_s"] > 0 and t["runs"] == 2 and 0 < t["min"] <= t["median"] <= t["max"]
        per_token = (lstm + head) * (3 if name != "eval" else 1)  # backward: 2x forward
        assert r["model_gflops_per_s"] == pytest.approx(t["median"] * per_token / 1e9,
                                                        rel=1e-2, abs=0.01)
        assert r["peak_memory_mb"] > 0
    assert printed["matmul_peak_gflops"] > 0


def test_bench_rejects_an_unknown_workload(capsys):
    rc = cli.main(["bench", "--config", str(CONFIGS / "tiny.py"), "--only", "trian"])
    assert rc == 2 and "unknown workload" in capsys.readouterr().err


def test_bench_checks_its_output_path_first(tmp_path, capsys):
    (tmp_path / "afile").write_text("a file\n")
    out = tmp_path / "afile" / "bench.json"
    rc = cli.main(["bench", "--config", str(CONFIGS / "tiny.py"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --out") and "is a file, not a folder" in err
    assert (tmp_path / "afile").read_text() == "a file\n"


def test_bench_takes_the_vocabulary_of_the_configs_corpus(tmp_path, capsys):
    quick = ["--only", "eval", "--repeats", "1", "--warmup", "0", "--eval-batch", "2",
             "--bptt", "5", "--matmul-n", "64"]
    rc = cli.main(["bench", "--config", str(CONFIGS / "tiny.py"), *quick])
    out, err = capsys.readouterr()
    assert rc == 0, err
    printed = json.loads(out.strip().splitlines()[-1])
    # tiny.py: data.synthetic.vocab_size = 50; the head's decoder is 4 x 16 x V.
    assert printed["vocab"] == 50 and "V = 50, from data.synthetic.vocab_size" in err
    assert printed["model_flops_per_token"]["head"] == 2 * (16 * 4 + 16 * 4 * 16
                                                            + 4 * 16 * 50)
    # A corpus directory: its own vocabulary (7 words and <eos>).
    corpus = tmp_path / "c"
    corpus.mkdir()
    for split in ("train", "valid", "test"):
        (corpus / f"{split}.txt").write_text("a b c d\ne f g a\n")
    rc = cli.main(["bench", "--config", str(CONFIGS / "tiny.py"), *quick,
                   "--config.data.dir", str(corpus)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out.strip().splitlines()[-1])["vocab"] == 8
    # A corpus directory that is not there: the two ways out, before any work.
    rc = cli.main(["bench", "--config", str(CONFIGS / "ptb_small.py"),
                   "--config.data.dir", str(tmp_path / "no_ptb")])
    err = capsys.readouterr().err
    assert rc == 2 and "no_ptb does not exist" in err
    assert "--config.data.dir DIR" in err and "--vocab N" in err and "bench:" not in err


def test_peak_memory_is_the_local_devices_else_the_processes_peak_rss(monkeypatch):
    status = Path("/proc/self/status")
    if status.is_file():  # Linux: the kernel's own count of the peak RSS, in kB
        hwm = next(int(line.split()[1]) for line in status.read_text().splitlines()
                   if line.startswith("VmHWM:"))
        assert bench.peak_rss_bytes() == pytest.approx(hwm * 1024, rel=0.05)

    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    monkeypatch.setattr(jax, "devices", lambda: [Device({"peak_bytes_in_use": 1})])
    local = Device({"peak_bytes_in_use": 3 << 20})
    monkeypatch.setattr(jax, "local_devices", lambda: [local])
    assert bench.peak_memory() == {"peak_memory_mb": 3,
                                   "memory_kind": "device peak_bytes_in_use"}
    monkeypatch.setattr(jax, "local_devices", lambda: [Device(None)])  # CPU: no stats
    assert bench.peak_device_bytes() is None
    rss_mb = round(bench.peak_rss_bytes() / 2 ** 20)
    assert bench.peak_memory() == {"peak_memory_mb": rss_mb,
                                   "memory_kind": "process peak RSS"}
