"""Each preset's own training defaults (configs as data): batch size and peak learning rate
where --batch-size and --lr are not given, and dropout by the corpus's tokens per
parameter."""

from __future__ import annotations

import json
from dataclasses import replace

from noodle.cli import training_option_types, training_settings
from noodle.config import PRESETS
from noodle.train.pretrain import data_sized_config
from noodle.train.settings import PRESET_RUN_DEFAULTS, PRETRAIN_DEFAULTS
from tests.conftest import story_corpus

SOMEN_PARAMETERS = PRESETS["somen"].parameter_count()


def test_every_preset_has_its_defaults_and_today_somen_soba_udon_keep_the_original_ones():
    assert PRESET_RUN_DEFAULTS.keys() == PRESETS.keys()
    for preset in ("somen", "soba", "udon"):
        defaults = PRESET_RUN_DEFAULTS[preset]
        values = {name: default for name, (_, default) in training_option_types(defaults).items()}
        settings = training_settings(defaults, values)
        assert (settings.batch_size, settings.lr) == (8, 1e-4 * 8 / 4)
        for tokens in (10**3, 10**9, 10**12):
            assert data_sized_config(preset, PRESETS[preset], tokens).dropout == 0.1
    assert data_sized_config("harusame", PRESETS["harusame"], 10**9).dropout == 0.0


def test_dropout_follows_the_tokens_per_parameter_of_the_corpus(monkeypatch):
    rule = ((0.0, 0.2), (1.0, 0.1), (20.0, 0.0))
    monkeypatch.setitem(
        PRESET_RUN_DEFAULTS, "somen", replace(PRETRAIN_DEFAULTS, dropout_by_data=rule)
    )
    somen = PRESETS["somen"]
    assert data_sized_config("somen", somen, SOMEN_PARAMETERS // 2).dropout == 0.2
    assert data_sized_config("somen", somen, SOMEN_PARAMETERS).dropout == 0.1
    assert data_sized_config("somen", somen, 20 * SOMEN_PARAMETERS - 1).dropout == 0.1
    assert data_sized_config("somen", somen, 20 * SOMEN_PARAMETERS).dropout == 0.0
    # A rule that starts above the corpus's ratio leaves the architecture's own.
    late = replace(PRETRAIN_DEFAULTS, dropout_by_data=((5.0, 0.0),))
    monkeypatch.setitem(PRESET_RUN_DEFAULTS, "somen", late)
    assert data_sized_config("somen", somen, SOMEN_PARAMETERS).dropout == 0.1
    # A CONFIG.json (preset "custom") keeps the dropout it names, whatever the rules.
    custom = replace(somen, dropout=0.3)
    assert data_sized_config("custom", custom, 100 * SOMEN_PARAMETERS).dropout == 0.3


def test_noodle_train_uses_the_data_sized_dropout_and_resumes_with_it(
    monkeypatch, tmp_path, cli_in_process, one_torch_thread
):
    """harusame keeps a dropout of 0 in its architecture; a rule for small corpora gives
    it 0.2, which model.json records and the resumed run (checked once the corpus is
    read) accepts."""
    rule = ((0.0, 0.2), (1000.0, 0.0))
    monkeypatch.setitem(
        PRESET_RUN_DEFAULTS,
        "harusame",
        replace(PRESET_RUN_DEFAULTS["harusame"], dropout_by_data=rule),
    )
    corpus = tmp_path / "stories.txt"
    corpus.write_text(story_corpus(300))
    out = tmp_path / "model"
    args = ["train", corpus, out, "--model", "harusame", "--backend", "cpu", "--batch-size", 4]
    code, _, err = cli_in_process(*args, "--max-steps", 2, "--eval-batches", 1)
    assert code == 0, err
    assert json.loads((out / "model.json").read_text())["dropout"] == 0.2

    code, _, err = cli_in_process(*args, "--max-steps", 3, "--eval-batches", 1, "--resume")
    assert code == 0, err
    metadata = json.loads((out / "model.json").read_text())
    assert (metadata["dropout"], metadata["training"]["steps"]) == (0.2, 3)
