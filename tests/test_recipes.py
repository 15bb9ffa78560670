"""Each preset's own training defaults (configs as data): batch size, peak learning rate,
schedule and optimizer where --batch-size, --lr, --schedule and --optimizer are not given,
and dropout by the corpus's tokens per parameter; somen's differ on a CUDA GPU, where they
were measured."""

from __future__ import annotations

import json
from dataclasses import replace

from noodle.cli import resolved_settings, training_option_types
from noodle.config import PRESETS
from noodle.train.pretrain import data_sized_config
from noodle.train.settings import (
    FINETUNE_DEFAULTS,
    PRESET_RUN_DEFAULTS,
    PRETRAIN_DEFAULTS,
    TrainSettings,
    run_defaults,
)
from tests.conftest import story_corpus

SOMEN_PARAMETERS = PRESETS["somen"].parameter_count()


def settings_for(model: str, device_type: str, **given: object) -> TrainSettings:
    """What `noodle train --model MODEL` trains with on a device of this type, given these
    options (snake_case) on the command line."""
    return resolved_settings(run_defaults(model, device_type), given)


def recipe(settings: TrainSettings) -> tuple[int, float, str]:
    return settings.batch_size, settings.lr, settings.schedule


def test_somen_on_a_cuda_gpu_trains_with_the_measured_recipe_and_elsewhere_as_before():
    assert PRESET_RUN_DEFAULTS.keys() == PRESETS.keys()
    # benchmarks/QUALITY.md's winner: batch 64, 3e-3, warm-up-stable-decay, Muon.
    assert recipe(settings_for("somen", "cuda")) == (64, 3e-3, "wsd")
    assert settings_for("somen", "cuda").optimizer == "muon"
    assert settings_for("somen", "cuda", optimizer="adamw").optimizer == "adamw"
    for preset, device in (("somen", "cpu"), ("somen", "mps"), ("soba", "cuda"), ("udon", "cuda")):
        assert settings_for(preset, device).optimizer == "adamw"
    # Sharded (--fsdp), where Muon cannot run, somen keeps AdamW and the rest of its recipe.
    sharded = resolved_settings(run_defaults("somen", "cuda", sharded=True), {})
    assert (*recipe(sharded), sharded.optimizer) == (64, 3e-3, "wsd", "adamw")
    assert settings_for("somen", "cuda").eval_batches == 7  # still 400 sequences' worth
    # Not measured on a CPU or MPS, nor for larger presets: the original's defaults.
    for device in ("cpu", "mps"):
        assert recipe(settings_for("somen", device)) == (8, 2e-4, "cosine")
    for preset in ("soba", "udon"):
        for device in ("cuda", "cpu"):
            assert recipe(settings_for(preset, device)) == (8, 2e-4, "cosine")
    for device in ("cuda", "cpu"):
        harusame = settings_for("harusame", device)
        assert (*recipe(harusame), harusame.max_steps) == (16, 2e-3, "cosine", 1000)
        # A CONFIG.json gets the general defaults.
        assert recipe(settings_for("model.json", device)) == (8, 2e-4, "cosine")


def test_the_options_given_win_and_the_learning_rate_rule_scales_with_the_batch():
    assert recipe(settings_for("somen", "cuda", batch_size=8)) == (8, 3e-3 * 8 / 64, "wsd")
    assert recipe(settings_for("somen", "cuda", lr=1e-3)) == (64, 1e-3, "wsd")
    assert recipe(settings_for("somen", "cuda", schedule="cosine")) == (64, 3e-3, "cosine")
    assert recipe(settings_for("somen", "cpu", batch_size=64)) == (64, 1.6e-3, "cosine")
    assert recipe(settings_for("somen", "cpu", schedule="wsd")) == (8, 2e-4, "wsd")
    given = {"batch_size": 4, "lr": 1e-3, "schedule": "wsd"}
    assert recipe(settings_for("harusame", "cpu", **given)) == (4, 1e-3, "wsd")
    assert recipe(settings_for("soba", "cuda", **given)) == (4, 1e-3, "wsd")


def test_somen_on_a_gpu_drops_dropout_from_half_a_token_per_parameter():
    somen = PRESETS["somen"]

    def dropout(preset: str, device: str, tokens: float) -> float:
        return data_sized_config(preset, PRESETS[preset], int(tokens), device).dropout

    half = SOMEN_PARAMETERS / 2
    assert dropout("somen", "cuda", half) == 0.0
    assert dropout("somen", "cuda", half - 1) == somen.dropout == 0.1
    assert dropout("somen", "cuda", 0.98 * SOMEN_PARAMETERS) == 0.0  # QUALITY.md's Gutenberg
    assert dropout("somen", "cuda", 0.03 * SOMEN_PARAMETERS) == 0.1  # and its TinyStories
    for tokens in (10**3, 10**9, 10**12):
        assert dropout("somen", "cpu", tokens) == dropout("somen", "mps", tokens) == 0.1
        for preset in ("soba", "udon"):
            assert dropout(preset, "cuda", tokens) == dropout(preset, "cpu", tokens) == 0.1
        assert dropout("harusame", "cpu", tokens) == 0.0


def test_the_help_shows_the_defaults_and_somen_s_on_a_gpu():
    def helps(options: dict) -> dict[str, str]:
        return {name: kind.__metadata__[0].help for name, (kind, _) in options.items()}

    train = helps(training_option_types(PRESET_RUN_DEFAULTS["somen"], "somen"))
    assert train["batch_size"].endswith("Default: 8 (64 for somen on a GPU).")
    assert train["lr"].endswith(
        "Default: 0.0002 × batch-size / 8 (0.003 × batch-size / 64 for somen on a GPU)."
    )
    assert train["schedule"].endswith("Default: cosine (wsd for somen on a GPU).")
    assert train["optimizer"].endswith("Default: adamw (muon for somen on a GPU).")
    finetune = helps(training_option_types(FINETUNE_DEFAULTS))
    assert finetune["batch_size"].endswith("Default: 4.")
    assert finetune["lr"].endswith("Default: 2e-05 × batch-size / 4.")
    assert finetune["schedule"].endswith("Default: cosine.")


def test_a_resumed_run_takes_the_options_it_was_started_with_not_these_defaults(
    tmp_path, cli_in_process, tiny_run, one_torch_thread
):
    """A run started with options other than the defaults (as somen's on a GPU differ from
    its defaults on the CPU) resumes without them; an option given again must agree."""
    out = tmp_path / "model"
    recipe = ("--batch-size", 4, "--lr", 1e-3, "--schedule", "wsd", "--optimizer", "muon")
    start = tiny_run.train_args(out, *recipe, "--max-steps", 2, "--eval-batches", 1)
    code, _, err = cli_in_process(*start)
    assert code == 0, err

    code, _, err = cli_in_process(*tiny_run.train_args(out, "--resume", "--max-steps", 4))
    assert code == 0, err
    training = json.loads((out / "model.json").read_text())["training"]
    assert training["steps"] == 4
    assert (training["batch_size"], training["lr"], training["schedule"]) == (4, 1e-3, "wsd")
    assert training["optimizer"] == "muon"

    again = tiny_run.train_args(out, "--resume", "--max-steps", 6, "--lr", 5e-4)
    code, _, err = cli_in_process(*again)
    assert code == 1 and "--lr was 0.001, now 0.0005" in err and "Traceback" not in err, err


def test_dropout_follows_the_tokens_per_parameter_of_the_corpus(monkeypatch):
    rule = ((0.0, 0.2), (1.0, 0.1), (20.0, 0.0))
    monkeypatch.setitem(
        PRESET_RUN_DEFAULTS, "somen", replace(PRETRAIN_DEFAULTS, dropout_by_data=rule)
    )
    somen = PRESETS["somen"]
    assert data_sized_config("somen", somen, SOMEN_PARAMETERS // 2, "cpu").dropout == 0.2
    assert data_sized_config("somen", somen, SOMEN_PARAMETERS, "cpu").dropout == 0.1
    assert data_sized_config("somen", somen, 20 * SOMEN_PARAMETERS - 1, "cpu").dropout == 0.1
    assert data_sized_config("somen", somen, 20 * SOMEN_PARAMETERS, "cpu").dropout == 0.0
    # A rule that starts above the corpus's ratio leaves the architecture's own.
    late = replace(PRETRAIN_DEFAULTS, dropout_by_data=((5.0, 0.0),))
    monkeypatch.setitem(PRESET_RUN_DEFAULTS, "somen", late)
    assert data_sized_config("somen", somen, SOMEN_PARAMETERS, "cpu").dropout == 0.1
    # A CONFIG.json (preset "custom") keeps the dropout it names, whatever the rules.
    custom = replace(somen, dropout=0.3)
    assert data_sized_config("custom", custom, 100 * SOMEN_PARAMETERS, "cpu").dropout == 0.3


def test_noodle_train_uses_the_data_sized_dropout_and_a_resumed_run_keeps_its_own(
    monkeypatch, tmp_path, cli_in_process, one_torch_thread
):
    """harusame keeps a dropout of 0 in its architecture; a rule for small corpora gives
    it 0.2, which model.json records. Resumed where the defaults give another dropout (as
    somen's do on another type of device; no option sets it), the run keeps its own."""
    harusame = PRESET_RUN_DEFAULTS["harusame"]
    rule = ((0.0, 0.2), (1000.0, 0.0))
    monkeypatch.setitem(PRESET_RUN_DEFAULTS, "harusame", replace(harusame, dropout_by_data=rule))
    corpus = tmp_path / "stories.txt"
    corpus.write_text(story_corpus(300))
    out = tmp_path / "model"
    args = ["train", corpus, out, "--model", "harusame", "--backend", "cpu", "--batch-size", 4]
    code, _, err = cli_in_process(*args, "--max-steps", 2, "--eval-batches", 1)
    assert code == 0, err
    metadata = json.loads((out / "model.json").read_text())
    assert (metadata["dropout"], metadata["training"]["schedule"]) == (0.2, "cosine")

    monkeypatch.setitem(PRESET_RUN_DEFAULTS, "harusame", harusame)
    code, _, err = cli_in_process(*args, "--max-steps", 3, "--eval-batches", 1, "--resume")
    assert code == 0, err
    metadata = json.loads((out / "model.json").read_text())
    assert (metadata["dropout"], metadata["training"]["steps"]) == (0.2, 3)
