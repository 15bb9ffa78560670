import json

import pytest
import torch
from safetensors import safe_open

from noodle.checkpoint import (
    ModelDir,
    atomic_write_bytes,
    load_model,
    model_metadata,
    write_safetensors,
)
from noodle.config import ModelConfig
from noodle.errors import NoodleError
from noodle.model import NoodleModel
from noodle.tokenizer import load_tokenizer

CONFIG = ModelConfig(n_layers=1, emb_dim=32, n_heads=2, head_dim=16, hidden_dim=64, ctx_len=16)


def save(tmp_path, config=CONFIG):
    torch.manual_seed(0)
    model = NoodleModel(config)
    out = ModelDir(tmp_path / "m")
    tokenizer = load_tokenizer()
    out.write_metadata(model_metadata(config, "custom", tokenizer, {"kind": "train"}))
    out.write_tokenizer(tokenizer)
    out.write_weights(model.state_dict())
    return model.eval(), out.path


def test_load_of_save_gives_identical_logits(tmp_path):
    model, path = save(tmp_path)
    idx = torch.randint(0, 50277, (2, 16))
    loaded = load_model(path)
    assert torch.equal(model(idx), loaded.model(idx))
    for spec in (path / "model.json", path / "model.safetensors"):
        assert torch.equal(model(idx), load_model(spec).model(idx))


def test_model_json_records_architecture_tokenizer_and_training(tmp_path):
    _, path = save(tmp_path)
    meta = json.loads((path / "model.json").read_text())
    assert meta["n_layers"] == 1 and meta["vocab_size"] == 50304 and meta["head_dim"] == 16
    assert meta["tokenizer"]["end_of_text_id"] == 0 and meta["tokenizer"]["padding_id"] == 1
    assert meta["training"]["kind"] == "train" and "date" in meta["training"]
    assert meta["parameters"] == NoodleModel(CONFIG).parameter_count()


def test_atomic_write_replaces_whole_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_written_safetensors_read_back_exactly(tmp_path):
    tensors = {
        "float32": torch.randn(3, 5),
        "bfloat16": torch.randn(7).bfloat16(),
        "scalar": torch.tensor(3.0),
        "rng": torch.get_rng_state(),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "int64": torch.arange(5),
    }
    path = tmp_path / "t.safetensors"
    with path.open("wb") as handle:
        write_safetensors(handle, tensors, {"state": '{"step": 3}'})
    with safe_open(path, framework="pt") as reader:
        assert reader.metadata() == {"state": '{"step": 3}'}
        names = reader.keys()
        loaded = {name: reader.get_tensor(name) for name in names}
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_missing_model_dir_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(NoodleError, match="no such directory"):
        load_model(tmp_path / "nope")
    _, path = save(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(NoodleError, match=r"model\.safetensors is missing"):
        load_model(path)


def test_weights_that_do_not_match_model_json_are_an_error(tmp_path):
    _, path = save(tmp_path)
    meta = json.loads((path / "model.json").read_text())
    meta["emb_dim"] = 48
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(NoodleError, match=r"weights do not match model\.json"):
        load_model(path)


def test_corrupt_weights_are_an_error(tmp_path):
    _, path = save(tmp_path)
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(NoodleError, match="unreadable weights"):
        load_model(path)


def test_output_dir_that_is_a_file_is_an_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(NoodleError, match="is a file"):
        ModelDir(target)
