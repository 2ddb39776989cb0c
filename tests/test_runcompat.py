"""Work-directory compatibility (mos_jax.runcompat): what config.json keeps, which
changes a resume refuses or reports, a finetune's source and data section."""

import json
from pathlib import Path

import pytest

from mos_jax import config as config_lib, runcompat, train
from mos_jax.errors import CheckpointError, ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny(**overrides):
    c = config_lib.load_config_file(CONFIGS / "tiny.py")
    for key, value in overrides.items():
        section, name = key.split("__")
        c[section][name] = value
    return c


def started(workdir: Path, config, checkpoint: bool = True) -> Path:
    """A work directory as a run of `config` leaves it: config.json, and a step
    directory when `checkpoint`."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(runcompat.saved_config(config)))
    if checkpoint:
        (workdir / "checkpoints" / "12").mkdir(parents=True)
    return workdir


def test_config_json_keeps_launch_keys_at_their_defaults():
    saved = runcompat.saved_config(tiny(train__stop_at_step=40))
    assert saved["train"]["stop_at_step"] == 0
    assert saved["optim"]["lr"] == 20.0 and saved["model"]["n_experts"] == 4


def test_a_resume_refuses_a_model_or_layout_change_and_reports_the_others(tmp_path):
    work = started(tmp_path / "run", tiny())
    notes = []
    assert runcompat.config_changes(tiny(train__stop_at_step=9), work, notes.append) == {}
    assert runcompat.config_changes(tiny(optim__lr=10.0), work, notes.append) == {
        "optim.lr": (20.0, 10.0)}
    with pytest.raises(ConfigError, match="started with model.nhid=16, not 32"):
        runcompat.config_changes(tiny(model__nhid=32), work, notes.append)
    with pytest.raises(ConfigError, match="started with data.bptt=20, not 30"):
        runcompat.config_changes(tiny(data__bptt=30), work, notes.append)
    with pytest.raises(ConfigError, match="optim.name='sgd', not 'adam'"):
        runcompat.config_changes(tiny(optim__name="adam"), work, notes.append)
    assert notes == []


def test_a_start_that_saved_nothing_binds_nothing(tmp_path):
    work = started(tmp_path / "run", tiny(), checkpoint=False)
    notes = []
    assert not runcompat.has_work(work)
    assert runcompat.config_changes(tiny(model__nhid=32), work, notes.append) == {}
    assert len(notes) == 1 and "saved no checkpoint" in notes[0]


def test_a_finetune_takes_its_runs_data_unless_given(tmp_path):
    source = started(tmp_path / "run", tiny(data__bptt=30))
    wanted = tiny(finetune__init_from=str(source))
    notes = []
    got = runcompat.finetune_data(wanted, tmp_path / "ft", (), notes.append)
    assert got.data.bptt == 30 and "data.bptt 30 (this config: 20)" in notes[0]
    kept = runcompat.finetune_data(wanted, tmp_path / "ft", ("bptt",), notes.append)
    assert kept is wanted and len(notes) == 1


def test_a_finetune_source_must_have_best_weights_of_the_same_model(tmp_path):
    with pytest.raises(ConfigError, match="set --config.finetune.init_from"):
        runcompat.check_finetune_source(tiny())
    source = started(tmp_path / "run", tiny())
    with pytest.raises(CheckpointError, match="has no best weights"):
        runcompat.check_finetune_source(tiny(finetune__init_from=str(source)))
    (source / "best").mkdir()
    runcompat.check_finetune_source(tiny(finetune__init_from=str(source)))
    with pytest.raises(ConfigError, match="model.emsize 16 vs 32") as refused:
        runcompat.check_finetune_source(tiny(finetune__init_from=str(source),
                                             model__emsize=32, model__nhidlast=32))
    assert "--config configs/tiny_finetune.py" in str(refused.value)
    # model.vocab_multiple changes the embedding's rows of the run's own vocabulary
    # (50 words: 52 rows at 4, 56 at 8, 50 unpadded), so it is a model change too
    from mos_jax import data
    data.save_vocab(source, [f"w{i}" for i in range(50)])
    with pytest.raises(ConfigError, match="model.vocab_multiple 1 vs 4"):
        runcompat.check_finetune_source(tiny(finetune__init_from=str(source),
                                             model__vocab_multiple=4))
    runcompat.check_finetune_source(tiny(finetune__init_from=str(source),
                                         model__vocab_multiple=5))  # 50 rows either way


def test_the_old_names_in_train_are_runcompats():
    assert train._config_changes is runcompat.config_changes
    assert train._finetune_data is runcompat.finetune_data
    assert train._saved_config is runcompat.saved_config
    assert train._check_vocabulary is runcompat.check_vocabulary
    assert train.tokenizer_of is runcompat.tokenizer_of
    assert train.matching_configs is runcompat.matching_configs
