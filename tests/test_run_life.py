"""A run's life through the command: no advice that loses weights, no non-finite
checkpoint, no work directory locked by a failed start, stops that continue."""

import hashlib
import json
import re
import shlex
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mos_jax import cli, config as config_lib, model, train
from mos_jax.checkpoint import CheckpointStore
from mos_jax.progress import read_metrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = str(CONFIGS / "tiny.py")
# One short epoch of the tiny config (the programs of the shared `tiny_run`).
QUICK = ["--config.data.synthetic.train_tokens=4000", "--config.train.test=false"]


def digest(directory: Path) -> dict:
    """Every file under `directory` and its SHA-256: to show nothing was lost or changed."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def run_cli(capfd, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, err


def params_of(workdir: Path, which: str = "latest"):
    """The parameters saved in `workdir` (latest checkpoint or best), with its step."""
    c = train.load_run_config(workdir)
    mc = train.model_config_from(c, c.data.synthetic.vocab_size)
    params = model.init_params(mc, jax.random.key(0))
    with CheckpointStore(workdir, read_only=True) as store:
        if which == "best":
            got, meta = store.restore_best(jax.eval_shape(lambda: params))
            return got, meta
        tx = train.optim.from_config(c.optim).transform(averaging=True)
        abstract = jax.eval_shape(lambda: train._state_tree(
            train.init_state(mc, params, c.data.batch_size, tx)))
        tree, meta = store.restore(abstract)
        return tree["params"], int(tree["step"])


# ------------------------------------------------------- 1. never advise deleting weights

def test_every_training_config_has_a_finetune_config_of_the_same_model():
    trainings = [p for p in sorted(CONFIGS.glob("*.py")) if not p.stem.endswith("_finetune")]
    assert {p.stem for p in trainings} >= {"ptb", "ptb_small", "tiny", "wt2", "bottleneck"}
    for path in trainings:
        ft_path = CONFIGS / f"{path.stem}_finetune.py"
        assert ft_path.is_file(), f"no finetune config for {path.name}"
        base, ft = config_lib.load_config_file(path), config_lib.load_config_file(ft_path)
        assert ft.model.to_dict() == base.model.to_dict(), path.name
        assert ft.data.to_dict() == base.data.to_dict(), path.name
        # The default source is where `mos-jax train --config X.py` puts its run.
        assert ft.finetune.init_from == f"runs/{path.stem}"


def test_finetune_of_another_model_names_both_sizes_and_the_matching_config(
        tiny_run, tmp_path, capfd):
    before = digest(tiny_run)
    code, _, err = run_cli(capfd, "finetune", "--config", CONFIGS / "ptb_small_finetune.py",
                           "--workdir", tmp_path / "ft",
                           "--config.finetune.init_from", tiny_run)
    assert code == 2
    assert "shapes of its weights differ" in err
    assert "emsize=16" in err and "emsize=64" in err  # the run's and the config's sizes
    assert "--config configs/tiny_finetune.py" in err  # the one that matches
    assert "Traceback" not in err and "delete" not in err
    assert not (tmp_path / "ft" / "config.json").exists()
    assert digest(tiny_run) == before


# Orbax's reader threads report "Event loop is closed" once per array after a failed
# restore; the command drops that noise, so none may reach pytest's unraisable hook.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_checkpoint_of_other_shapes_or_damaged_is_kept_and_named(tiny_run, tmp_path,
                                                                  capfd):
    source = tmp_path / "weights"  # best weights without the run's config.json
    shutil.copytree(tiny_run / "best", source / "best")
    before = digest(source)
    code, _, err = run_cli(capfd, "finetune", "--config", CONFIGS / "tiny_finetune.py",
                           "--workdir", tmp_path / "ft", "--config.finetune.init_from",
                           source, "--config.model.emsize=8", "--config.model.nhidlast=8")
    assert code == 2
    assert re.search(r"\['embedding'\]: stored \(50, 16\), this config needs \(50, 8\)", err)
    assert "keep it" in err and "delete" not in err
    assert "Traceback" not in err and "Event loop" not in err
    assert digest(source) == before
    # Damaged (best/ keeps one step): never "delete", and the files stay.
    for f in (source / "best").rglob("*"):
        if f.is_file() and "state" in f.parts and "d" in f.parts:
            f.write_bytes(b"\0garbage")
    damaged = digest(source)
    code, _, err = run_cli(capfd, "finetune", "--config", CONFIGS / "tiny_finetune.py",
                           "--workdir", tmp_path / "ft2", "--config.finetune.init_from",
                           source)
    assert code == 2 and "cannot be restored" in err
    assert "only step" in err and "do not delete it" in err
    assert "delete that" not in err and "Traceback" not in err
    assert digest(source) == damaged


# ------------------------------------------------------------ 2. no non-finite checkpoint

def test_a_diverging_run_saves_only_finite_checkpoints_and_names_the_last(tmp_path, capfd):
    # No clipping and a huge rate: the weights overflow within a few steps. Saves after
    # every step, between logging steps (every 50), so a save meets the NaN first.
    w = tmp_path / "run"
    code, _, err = run_cli(capfd, "train", "--config", TINY, "--workdir", w, *QUICK,
                           "--config.optim.lr=1e30", "--config.optim.clip=0",
                           "--config.train.checkpoint_every_s=0",
                           "--config.train.log_every_steps=50")
    assert code == 2
    found = re.search(r"non-finite by step (\d+) .*the last checkpoint in \S+ is step "
                      r"(\d+), with finite weights", err)
    assert found, err
    bad, last = int(found.group(1)), int(found.group(2))
    assert last == bad - 1 >= 1
    params, step = params_of(w)
    assert step == last
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))
    assert not list((w / "best").glob("[0-9]*"))  # no epoch ended: no best weights
    # Every step is checked: the state one step on is indeed non-finite (the check is
    # not merely cautious), computed here independently of the loop.
    c = train.load_run_config(w)
    mc = train.model_config_from(c, 50)
    plan = train.parallel.from_config(c)
    step_fn = train.build_train_step(c, mc, plan)
    rows = train.batchify(train.load_corpus_from(c).train, c.data.batch_size)
    windows = list(train.train_windows(len(rows), np.random.default_rng([c.train.seed, 1]),
                                       c.data.bptt, c.data.bptt + c.data.max_seq_len_delta,
                                       train.default_buckets(c.data.bptt, c.data.bptt
                                                             + c.data.max_seq_len_delta)))
    with CheckpointStore(w, read_only=True) as store:
        abstract = jax.eval_shape(lambda: train._state_tree(train.init_state(
            mc, model.init_params(mc, jax.random.key(0)), c.data.batch_size, step_fn.tx)))
        tree, _ = store.restore(abstract)
    state = train._state_from_tree(tree, step_fn.tx)
    win = windows[last]
    inputs, targets, length = train.padded_window(rows, win.start, win.length, win.padded)
    state, m = step_fn(state, inputs, targets, length, win.seq_len, 1e30)
    leaves = jax.tree_util.tree_leaves(state.params)
    assert not (np.isfinite(float(m["loss"]))
                and all(np.isfinite(np.asarray(x)).all() for x in leaves))


def test_finite_check_sees_one_bad_element():
    tree = {"a": jnp.ones((3, 4)), "b": (jnp.zeros(2), jnp.arange(3))}
    assert bool(train._all_finite(tree))
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        assert not bool(train._all_finite({**tree, "a": tree["a"].at[2, 1].set(bad)}))


# ---------------------------------------------------- 3. a failed start locks nothing

def test_a_failed_first_start_leaves_no_config_and_the_fix_runs(tmp_path, capfd):
    w = tmp_path / "run"
    for bad, says in (("--config.data.dir=" + str(tmp_path / "no_corpus"), "no_corpus"),
                      ("--config.model.head=nope", "nope")):
        code, _, err = run_cli(capfd, "train", "--config", TINY, "--workdir", w, *QUICK,
                               bad)
        assert code == 2 and says in err and "Traceback" not in err
        assert not (w / "config.json").exists()
        if says == "no_corpus":  # and how to name one
            assert "--config.data.dir DIR" in err and "mos-jax download" in err
    code, _, err = run_cli(capfd, "finetune", "--config", CONFIGS / "tiny_finetune.py",
                           "--workdir", tmp_path / "ft", "--config.finetune.init_from",
                           tmp_path / "nothing_here")
    assert code == 2 and "nothing_here" in err
    assert not (tmp_path / "ft" / "config.json").exists()
    # The corrected command starts (and so writes config.json).
    code, _, err = run_cli(capfd, "train", "--config", TINY, "--workdir", w, *QUICK,
                           "--config.train.stop_at_step=3")
    assert code == 0, err
    saved = json.loads((w / "config.json").read_text())
    assert saved["data"]["dir"] == "synthetic" and saved["model"]["head"] == "mos"


def test_a_resume_refuses_model_changes_and_reports_the_others(tmp_path, capfd):
    w = tmp_path / "run"
    assert run_cli(capfd, "train", "--config", TINY, "--workdir", w, *QUICK,
                   "--config.train.stop_at_step=4")[0] == 0
    before = digest(w)
    code, _, err = run_cli(capfd, "train", "--workdir", w, "--config.model.nhid=32")
    assert code == 2 and "was started with model.nhid=16, not 32" in err
    assert digest(w) == before  # refused before anything was written
    code, _, err = run_cli(capfd, "train", "--workdir", w, "--config.optim.lr=10",
                           "--config.train.log_every_steps=7",
                           "--config.train.stop_at_step=6")
    assert code == 0, err
    assert "optim.lr: 20.0 -> 10.0" in err and "train.log_every_steps: 10 -> 7" in err
    changes = [r for r in read_metrics(w) if "config_changes" in r]
    assert changes == [{"config_changes": {"optim.lr": [20.0, 10.0],
                                           "train.log_every_steps": [10, 7]}, "step": 4}]
    saved = json.loads((w / "config.json").read_text())
    assert saved["optim"]["lr"] == 10.0 and saved["train"]["stop_at_step"] == 0


# ------------------------------------------------------- 4. a stop that continues

def test_the_printed_continue_command_trains_to_the_end(tmp_path, capfd):
    w = tmp_path / "run"
    code, out, err = run_cli(capfd, "train", "--config", TINY, "--workdir", w, *QUICK,
                             "--config.train.max_epochs=1", "--config.train.stop_at_step=5")
    assert code == 0 and json.loads(out)["step"] == 5
    command = re.search(r"continue with `mos-jax ([^`]*)`", err).group(1)
    code, out, err = run_cli(capfd, *shlex.split(command))
    assert code == 0, err
    result = json.loads(out)
    assert result["finished"] and result["reason"] == "reached train.max_epochs=1"
    c = train.load_run_config(w)
    rows = train.batchify(train.load_corpus_from(c).train, 8)
    epoch_1 = list(train.train_windows(len(rows), np.random.default_rng([c.train.seed, 1]),
                                       20, 30))  # tiny.py: bptt 20, up to 30
    assert params_of(w)[1] == 5 + result["trained_steps"] == len(epoch_1)
    # A stop step the run has passed is refused, not one more step and a stop.
    code, _, err = run_cli(capfd, "train", "--config", TINY, "--workdir", tmp_path / "b",
                           *QUICK, "--config.train.stop_at_step=3")
    code, _, err = run_cli(capfd, "train", "--workdir", tmp_path / "b",
                           "--config.train.stop_at_step=2")
    assert code == 2 and "already at step 3" in err and "stop_at_step=0" in err
    assert params_of(tmp_path / "b")[1] == 3


def test_a_finetune_resumes_from_its_own_checkpoints_without_its_source(
        tiny_run, tmp_path, capfd):
    source = tmp_path / "source"
    shutil.copytree(tiny_run, source)
    ft = tmp_path / "ft"
    code, _, err = run_cli(capfd, "finetune", "--config", CONFIGS / "tiny_finetune.py",
                           "--workdir", ft, "--config.finetune.init_from", source, *QUICK,
                           "--config.finetune.max_epochs=1", "--config.train.stop_at_step=3")
    assert code == 0, err
    shutil.rmtree(source)  # the finetune's own checkpoints carry it on
    code, out, err = run_cli(capfd, "finetune", "--workdir", ft)
    assert code == 0, err
    assert json.loads(out)["finished"]


# ------------------------------------------------ 5. a finetune runs on its run's corpus

def text_corpus(path: Path, seed: int = 0) -> Path:
    """A small text corpus: 20 words, lines of 10 (train 3,000 words)."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(20)]
    path.mkdir(parents=True)
    for split, n in (("train", 300), ("valid", 40), ("test", 40)):
        lines = [" ".join(rng.choice(words, 10)) for _ in range(n)]
        (path / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return path


def test_a_finetune_takes_its_runs_corpus_unless_one_is_given(tmp_path, capfd):
    corpus = text_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    code, _, err = run_cli(capfd, "train", "--config", TINY, "--workdir", run,
                           "--config.data.dir", corpus, "--config.train.max_epochs=1",
                           "--config.train.test=false", "--config.train.steps_per_epoch=3")
    assert code == 0, err
    # tiny_finetune.py says data.dir "synthetic" (50 words); the run's corpus has 21.
    ft_config = CONFIGS / "tiny_finetune.py"
    code, out, err = run_cli(capfd, "finetune", "--config", ft_config, "--workdir",
                             tmp_path / "ft", "--config.finetune.init_from", run,
                             "--config.finetune.max_epochs=1", "--config.train.test=false",
                             "--config.train.stop_at_step=2")
    assert code == 0, err
    said = [line for line in err.splitlines() if "data of the run" in line]
    assert len(said) == 1 and f"data.dir {str(corpus)!r} (this config: 'synthetic')" \
        in said[0]
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["data"] == json.loads((run / "config.json").read_text())["data"]
    assert "V=21" in err  # 20 words and <eos>
    # Its starting weights' validation is recorded (mos_jax.plot reads it).
    (start,) = [r["finetune_start"] for r in read_metrics(tmp_path / "ft")
                if "finetune_start" in r]
    assert start["init_from"] == str(run.resolve()) and start["init_epoch"] == 1
    assert f"starting from {run} (epoch 1), valid ppl {start['valid_ppl']:.2f}" in err
    # The same command resumes it (its own config.json's data, not the file's).
    code, out, err = run_cli(capfd, "finetune", "--config", ft_config, "--workdir",
                             tmp_path / "ft", "--config.finetune.init_from", run,
                             "--config.finetune.max_epochs=1", "--config.train.test=false")
    assert code == 0, err
    assert json.loads(out)["finished"] and "resuming finetune from step 2" in err
    # A data key given is kept, the others still come from the run.
    code, out, err = run_cli(capfd, "finetune", "--config", ft_config, "--workdir",
                             tmp_path / "ft2", "--config.finetune.init_from", run,
                             "--config.finetune.max_epochs=1", "--config.train.test=false",
                             "--config.train.stop_at_step=1",
                             "--config.data.test_batch_size=4")  # (no test: no compile)
    assert code == 0, err
    saved = json.loads((tmp_path / "ft2" / "config.json").read_text())["data"]
    assert saved["test_batch_size"] == 4 and saved["dir"] == str(corpus)
    # A corpus given is the one used: here one that does not exist, so it is refused.
    code, _, err = run_cli(capfd, "finetune", "--config", ft_config, "--workdir",
                           tmp_path / "ft3", "--config.finetune.init_from", run,
                           "--config.data.dir", tmp_path / "elsewhere")
    assert code == 2 and "elsewhere does not exist" in err
    assert not (tmp_path / "ft3" / "config.json").exists()
    # The Python API does what the command does.
    config = config_lib.load_config(ft_config, [("finetune.init_from", str(run)),
                                                ("finetune.max_epochs", "1"),
                                                ("train.test", "false"),
                                                ("train.stop_at_step", "1")])
    lines = []
    result = train.finetune(config, tmp_path / "ft4", log=lines.append)
    assert result["step"] == 1 and config.data.dir == "synthetic"  # not changed in place
    assert sum("data of the run" in line for line in lines) == 1
    assert json.loads((tmp_path / "ft4" / "config.json").read_text())["data"]["dir"] \
        == str(corpus)
