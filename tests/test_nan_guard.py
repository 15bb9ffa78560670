"""Non-finite losses: the step's update is skipped and counted; several in a row stop the
run with a clear error, keeping the best weights."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch

from noodle.cli import main
from noodle.errors import NoodleError
from noodle.train.loop import Trainer
from noodle.train.settings import TrainSettings
from tests.tiny_runs import read_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = TrainSettings(
    max_steps=30, batch_size=8, lr=3e-3, eval_interval=5, eval_batches=4, patience=100
)


def poison_logits(trainer: Trainer, poisoned: Callable[[int], bool]) -> None:
    """Make the model's logits NaN whenever `poisoned(step)` holds. No real input makes a
    fresh float32 model's loss NaN, so this stands for the overflow of a diverging run."""

    def hook(module: torch.nn.Module, inputs: tuple, logits: torch.Tensor):
        return logits * torch.nan if poisoned(trainer.state.step) else logits

    trainer.model.head.register_forward_hook(hook)


def test_nonfinite_steps_are_skipped_counted_and_training_goes_on(tiny_run, tmp_path):
    trainer = tiny_run.trainer(tmp_path / "model", SETTINGS)
    poisoned_steps = {3, 7, 8, 20, 21, 22, 23}  # at most 4 in a row: below the limit of 5
    poison_logits(trainer, lambda step: trainer.model.training and step in poisoned_steps)
    state = trainer.run()

    assert state.step == 30 and state.nonfinite_steps == len(poisoned_steps)
    train_records = [m for m in read_metrics(tmp_path / "model") if m["kind"] == "train"]
    assert train_records[-1]["nonfinite_steps"] == len(poisoned_steps)
    # The fused AdamW took (and counted) an update only for the finite steps.
    for values in trainer.optimizers["adamw"].state.values():
        assert int(values["step"]) == 30 - len(poisoned_steps)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert state.best_loss < 3.0


def test_divergence_stops_the_run_and_keeps_the_best_weights(tiny_run, tmp_path):
    out = tmp_path / "model"
    trainer = tiny_run.trainer(out, SETTINGS)
    best_saves: list[bytes] = []
    trainer.on_best = lambda state: best_saves.append((out / "model.safetensors").read_bytes())
    # From step 12 on everything the model computes is NaN, evaluations included.
    poison_logits(trainer, lambda step: step >= 12)

    with pytest.raises(NoodleError) as error:
        trainer.run()

    message = str(error.value)
    assert message.startswith("training diverged: the loss was not finite for 5 steps in a row")
    assert "the best weights (step 10, validation loss" in message and str(out) in message
    assert "\n" not in message
    assert len(best_saves) == 2  # at steps 5 and 10; the NaN evaluation at 15 saved nothing
    assert (out / "model.safetensors").read_bytes() == best_saves[-1]
    evals = [m for m in read_metrics(out) if m["kind"] == "eval"]
    assert [(m["step"], m["val_loss"] is None) for m in evals] == [
        (5, False),
        (10, False),
        (15, True),
    ]


def test_a_diverging_lr_on_the_command_line_is_a_one_line_error(tiny_run, tmp_path, capsys):
    out = tmp_path / "model"
    args = tiny_run.train_args(out, "--max-steps", 40, "--lr", 1e30, "--eval-interval", 5)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    stderr = capsys.readouterr().err

    assert exit_info.value.code == 1
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert error_lines == [stderr.splitlines()[-1]]
    assert error_lines[0].startswith("error: training diverged")
    assert "Traceback" not in stderr
    meta = json.loads((out / "model.json").read_text())
    assert meta["training"]["status"] == "failed"
    assert read_metrics(out)[-1]["nonfinite_steps"] >= 5
