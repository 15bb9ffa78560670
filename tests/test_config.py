import json
import re

import pytest

from noodle.config import PRESETS, ModelConfig, config_from_dict, resolve_model_config
from noodle.errors import NoodleError, UsageError
from noodle.model import NoodleModel, weight_shapes


@pytest.mark.parametrize(("preset", "approx"), [("somen", 29e6), ("soba", 0.6e9), ("udon", 27e9)])
def test_presets_have_the_documented_sizes(preset, approx):
    _, config = resolve_model_config(preset, 50277)
    assert config.vocab_size == 50304
    assert abs(config.parameter_count() - approx) / approx < 0.1


def test_parameter_count_matches_the_real_model():
    config = PRESETS["somen"]
    assert NoodleModel(config).parameter_count() == config.parameter_count() == 28_965_504


def test_weight_shapes_are_those_of_the_real_model():
    config = ModelConfig(
        n_layers=3, emb_dim=48, n_heads=3, head_dim=10, hidden_dim=80, ctx_len=16, vocab_size=200
    )
    state = {name: tuple(t.shape) for name, t in NoodleModel(config).state_dict().items()}
    assert list(weight_shapes(config)) == list(state.items())


def test_partial_config_takes_the_rest_from_somen(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"n_layers": 2, "emb_dim": 64}))
    name, config = resolve_model_config(str(path), 50277)
    assert name == "custom"
    assert (config.n_layers, config.emb_dim) == (2, 64)
    assert (config.n_heads, config.head_dim, config.ctx_len) == (4, 64, 256)
    assert config.vocab_size == 50304


def test_a_model_json_is_a_valid_config(tmp_path):
    metadata = {**ModelConfig(n_layers=3).to_dict(), "format_version": 1, "preset": "x"}
    config, explicit_vocab = config_from_dict(metadata, "model.json")
    assert config.n_layers == 3 and explicit_vocab


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"head_dim": 33}, "head_dim must be even"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"emb_dim": -4}, "emb_dim must be a positive integer"),
        ({"ctx_len": 1.5}, "ctx_len must be a positive integer"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"n_layer": 2}, "unknown key(s) n_layer"),
    ],
)
def test_wrong_configs_are_clear_errors(values, message):
    with pytest.raises(NoodleError, match=re.escape(message)):
        config_from_dict(values, "config.json")


def test_vocab_smaller_than_the_tokenizer_is_an_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"vocab_size": 1000}))
    with pytest.raises(NoodleError, match="smaller than the tokenizer"):
        resolve_model_config(str(path), 50277)


def test_unknown_preset_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown model preset 'ramen'"):
        resolve_model_config("ramen", 50277)


def test_malformed_json_is_an_error(tmp_path):
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(NoodleError, match="malformed JSON"):
        resolve_model_config(str(path), 50277)
