"""The fused, chunked training loss against the plain one: the same values and gradients."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from noodle.config import ModelConfig
from noodle.loss import (
    FUSED_CHUNK,
    IGNORE,
    FusedOutputCrossEntropy,
    cross_entropy,
    output_cross_entropy,
)
from noodle.model import NoodleModel
from noodle.train.settings import TrainSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 300
CONFIG = ModelConfig(
    n_layers=2,
    emb_dim=32,
    n_heads=2,
    head_dim=8,
    hidden_dim=64,
    ctx_len=16,
    vocab_size=VOCAB,
    dropout=0.0,
)


def batch_with_ignored_targets(batch: int = 5, length: int = 7) -> torch.Tensor:
    """Targets as fine-tuning makes them: a prompt not learned (IGNORE), a right padding of
    IGNORE, and one row with nothing to predict at all."""
    targets = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
    targets[0, :3] = IGNORE  # prompt
    targets[1, 5:] = IGNORE  # padding
    targets[-1] = IGNORE  # nothing predicted in this row
    return targets


def assert_close_at_scale(got: torch.Tensor, expected: torch.Tensor, relative: float) -> None:
    """Each element within `relative` x the largest of `expected`: float32 sums taken in
    another order differ by rounding relative to the sum's size, not each element's."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert (got - expected).abs().max() <= relative * expected.abs().max()


def loss_and_grads(
    chunk: int, hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, scale: float = 3.0
) -> list[torch.Tensor]:
    """The loss and the gradients of `scale` x loss for hidden, weight and bias."""
    leaf = hidden.detach().requires_grad_()
    head.zero_grad(set_to_none=True)
    loss = output_cross_entropy(leaf, head, targets, chunk)
    (scale * loss).backward()
    return [loss.detach().float(), leaf.grad, head.weight.grad, head.bias.grad]


def output_layer() -> nn.Linear:
    torch.manual_seed(0)
    head = nn.Linear(16, VOCAB)
    nn.init.normal_(head.bias, std=0.5)  # a bias gradient of its own to check
    return head


@pytest.mark.parametrize("chunk", [1, 4, 35, 64])
def test_fused_loss_equals_the_plain_one_in_float32_with_ignored_targets(chunk):
    """Chunks of one position, chunks that do not divide the 35 positions, one chunk
    holding all of them and one larger than the batch: loss and gradients agree to float32
    rounding, IGNORE positions and padding included."""
    head, targets = output_layer(), batch_with_ignored_targets()
    hidden = torch.randn(5, 7, 16)
    plain = loss_and_grads(0, hidden, head, targets)
    fused = loss_and_grads(chunk, hidden, head, targets)
    for expected, got in zip(plain, fused, strict=True):
        assert_close_at_scale(got, expected, 1e-5)
    # The padded positions learn nothing.
    assert torch.count_nonzero(fused[1][-1]) == 0 and torch.count_nonzero(fused[1][1, 5:]) == 0


def test_fused_loss_under_bfloat16_autocast_stays_within_its_rounding():
    """Both forms multiply in bfloat16 and reduce in float32; they round the logit gradient
    at different scales, so gradients agree to bfloat16's precision (2^-8 relative)."""
    head, targets = output_layer(), batch_with_ignored_targets()
    hidden = torch.randn(5, 7, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = loss_and_grads(0, hidden, head, targets)
        fused = loss_and_grads(4, hidden, head, targets)
    exact = loss_and_grads(0, hidden, head, targets)
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-3, atol=0)
    for expected, got, reference in zip(plain[1:], fused[1:], exact[1:], strict=True):
        assert got.dtype == torch.float32  # float32 gradients for float32 parameters
        scale = reference.abs().max()
        assert (got - expected).abs().max() <= 0.02 * scale
        # ...and no further from float32's gradient than the plain form is.
        assert (got - reference).abs().max() <= 1.5 * (
            expected - reference
        ).abs().max() + 1e-3 * scale


def test_a_batch_with_nothing_to_predict_is_nan_in_both_forms():
    """As F.cross_entropy gives it: the step's non-finite guard then skips the update."""
    head, hidden = output_layer(), torch.randn(2, 3, 16)
    targets = torch.full((2, 3), IGNORE)
    assert math.isnan(loss_and_grads(0, hidden, head, targets)[0])
    assert math.isnan(loss_and_grads(4, hidden, head, targets)[0])


def test_the_fused_form_runs_only_where_it_should():
    """Recording gradients in float32 or bfloat16: fused. Without gradients (evaluation)
    nothing is fused; float16 keeps the plain form, whose loss scale multiplies the logit
    gradient before it is rounded."""
    head, targets = output_layer(), batch_with_ignored_targets()
    hidden = torch.randn(5, 7, 16, requires_grad=True)
    fused = FusedOutputCrossEntropy.__name__ + "Backward"
    assert output_cross_entropy(hidden, head, targets, 4).grad_fn.name() == fused
    assert output_cross_entropy(hidden, head, targets, 0).grad_fn.name() != fused
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert output_cross_entropy(hidden, head, targets, 4).grad_fn.name() == fused
    with torch.autocast("cpu", dtype=torch.float16):
        assert output_cross_entropy(hidden, head, targets, 4).grad_fn.name() != fused
    with torch.no_grad():
        assert torch.equal(
            output_cross_entropy(hidden, head, targets, 4), cross_entropy(head(hidden), targets)
        )


def model_loss_and_grads(model: nn.Module, idx, targets, chunk: int) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = model(idx, targets, loss_chunk=chunk)
    loss.backward()
    return [loss.detach()] + [p.grad for p in model.parameters()]


def test_the_model_trains_on_the_same_loss_and_gradients_fused_and_compiled():
    """Through the whole model, eagerly and traced by the compiler as one graph (no graph
    break: a break would split the CUDA graph of the training step)."""
    torch.manual_seed(0)
    model = NoodleModel(CONFIG)
    idx = torch.randint(0, VOCAB, (4, 16))
    targets = batch_with_ignored_targets(4, 16)
    plain = model_loss_and_grads(model, idx, targets, 0)
    fused = model_loss_and_grads(model, idx, targets, 10)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    traced = model_loss_and_grads(compiled, idx, targets, 10)
    for expected, got, got_traced in zip(plain, fused, traced, strict=True):
        assert_close_at_scale(got, expected, 1e-5)
        assert_close_at_scale(got_traced, expected, 1e-5)


def test_the_trainer_fuses_the_loss_when_compiling_unless_told(tmp_path, tiny_run):
    settings = replace(TrainSettings(), batch_size=2, max_steps=3)
    assert tiny_run.trainer(tmp_path / "a", settings).loss_chunk == 0
    compiled = replace(settings, compile=True)
    assert tiny_run.trainer(tmp_path / "b", compiled).loss_chunk == FUSED_CHUNK
    chosen = replace(compiled, loss_chunk=0)
    assert tiny_run.trainer(tmp_path / "c", chosen).loss_chunk == 0


def test_training_steps_fused_and_plain_give_the_same_losses_and_weights(tmp_path, tiny_run):
    """The real step (clipping, fused AdamW) three times. The losses agree to float32
    rounding; the weights' changes to 1% of the largest change: AdamW's division by the
    root of the second moment magnifies rounding in the smallest gradients."""
    settings = replace(TrainSettings(), batch_size=2, max_steps=3, lr=1e-2)
    initial, trained, losses = [], [], []
    for name, chunk in (("plain", 0), ("fused", 7)):
        trainer = tiny_run.trainer(tmp_path / name, replace(settings, loss_chunk=chunk))
        initial.append([p.detach().clone() for p in trainer.model.parameters()])
        steps = [trainer.train_step(trainer.train_data.get(0, i), lr_factor=1.0) for i in range(3)]
        losses.append(torch.stack([loss for loss, _, _ in steps]))
        trained.append([p.detach().clone() for p in trainer.model.parameters()])
    assert_close_at_scale(losses[1], losses[0], 1e-5)
    for start, plain, fused in zip(initial[0], *trained, strict=True):
        assert_close_at_scale(fused - start, plain - start, 1e-2)
