"""The optimizer step for any optimizer (clipping, the non-finite guard), the learning-rate
schedule and its re-planning on resume, and float16 loss scaling."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from noodle.config import ModelConfig
from noodle.model import NoodleModel
from noodle.train.muon import BatchedMuon
from noodle.train.optim import (
    LossScale,
    OptimizerStep,
    Schedule,
    adamw,
    build_optimizers,
    decay_groups,
    hidden_matrices,
    skips_on_device,
)
from noodle.train.settings import TrainSettings
from tests.conftest import TINY_CONFIG

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = ModelConfig(**TINY_CONFIG, vocab_size=256)
SETTINGS = TrainSettings(lr=1e-2, weight_decay=0.1)


def tiny_model(seed: int = 0) -> NoodleModel:
    torch.manual_seed(seed)
    return NoodleModel(CONFIG)


def fused_adamw(model: nn.Module) -> dict[str, torch.optim.Optimizer]:
    return build_optimizers(model, SETTINGS)


def plain_adamw(model: nn.Module) -> dict[str, torch.optim.Optimizer]:
    groups = decay_groups(list(model.parameters()), SETTINGS)
    optimizer = adamw(groups, fused=False)
    for group in optimizer.param_groups:
        group["peak_lr"] = group["lr"] = SETTINGS.lr
    return {"adamw": optimizer}


def muon(model: nn.Module) -> dict[str, torch.optim.Optimizer]:
    return build_optimizers(model, replace(SETTINGS, optimizer="muon"))


OPTIMIZERS = {"fused-adamw": fused_adamw, "plain-adamw": plain_adamw, "muon": muon}


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    data = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.ctx_len + 1), generator=generator)
    return data[:, :-1], data[:, 1:]


def train(model: nn.Module, step: OptimizerStep, seeds: range) -> None:
    for seed in seeds:
        loss = model(*batch(seed))
        step.scale_loss(loss).backward()
        step(loss.detach())


def optimizer_state(optimizers: dict[str, torch.optim.Optimizer]) -> dict:
    return {
        (name, index, key): value.clone()
        for name, optimizer in optimizers.items()
        for index, values in optimizer.state_dict()["state"].items()
        for key, value in values.items()
    }


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_model()
    optimizers = muon(model)
    names = {id(p): name for name, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in optimizers["muon"].param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in optimizers["adamw"].param_groups for p in g["params"]}
    block_matrices = {
        name for name, p in model.named_parameters() if name.startswith("blocks.") and p.dim() == 2
    }
    assert in_muon == block_matrices and {id(p) for p in hidden_matrices(model)} == {
        id(model.get_parameter(name)) for name in block_matrices
    }
    assert in_adamw == set(names.values()) - block_matrices
    assert {"tok_emb.weight", "head.weight", "head.bias", "ln_f.weight"} <= in_adamw
    decayed = {names[id(p)] for p in optimizers["adamw"].param_groups[0]["params"]}
    assert decayed == {"tok_emb.weight", "head.weight"}
    assert optimizers["adamw"].param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_a_nonfinite_step_changes_no_weight_and_no_optimizer_state(kind):
    model = tiny_model()
    optimizers = OPTIMIZERS[kind](model)
    step = OptimizerStep(list(model.parameters()), optimizers, grad_clip=1.0)
    train(model, step, range(2))  # the optimizers have state now
    weights = copy.deepcopy(model.state_dict())
    state = optimizer_state(optimizers)

    model.head.register_forward_hook(lambda module, inputs, logits: logits * torch.nan)
    loss = model(*batch(5))
    step.scale_loss(loss).backward()
    outcome = step(loss.detach())

    assert bool(outcome.skipped) and bool(outcome.diverging)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    after = optimizer_state(optimizers)
    assert after.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after[key], value), key
    assert all(p.grad is None for p in model.parameters())


GRAD_CLIP = 0.05  # far below the tiny model's gradient norm: every step is clipped


def clipped_reference_gradients(seed: int) -> dict[str, torch.Tensor]:
    reference = tiny_model()
    reference(*batch(seed)).backward()
    norm = nn.utils.clip_grad_norm_(reference.parameters(), GRAD_CLIP)
    assert norm > 4 * GRAD_CLIP
    return {name: p.grad for name, p in reference.named_parameters()}


def test_optimizers_without_a_fused_kernel_are_handed_clipped_gradients():
    model = tiny_model()
    optimizers = plain_adamw(model)
    names = {id(p): name for name, p in model.named_parameters()}
    seen: dict[str, torch.Tensor] = {}

    def record(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        for group in optimizer.param_groups:
            seen.update({names[id(p)]: p.grad.clone() for p in group["params"]})

    unfused = {name: o for name, o in optimizers.items() if not skips_on_device(o)}
    for optimizer in unfused.values():
        optimizer.register_step_pre_hook(record)
    train(model, OptimizerStep(list(model.parameters()), optimizers, GRAD_CLIP), range(1))

    expected = clipped_reference_gradients(0)
    handed = {names[id(p)] for o in unfused.values() for g in o.param_groups for p in g["params"]}
    assert seen.keys() == handed and len(handed) >= 4
    for name in handed:
        torch.testing.assert_close(seen[name], expected[name], rtol=1e-5, atol=1e-9)


def test_fused_adamw_clips_inside_its_kernel():
    """Fused AdamW divides by grad_scale itself: its weights after a few clipped steps are
    those of AdamW on gradients clipped beforehand (and not those of unclipped steps)."""
    ours, reference, unclipped = tiny_model(), tiny_model(), tiny_model()
    train(ours, OptimizerStep(list(ours.parameters()), fused_adamw(ours), GRAD_CLIP), range(3))
    plain = plain_adamw(reference)["adamw"]
    for seed in range(3):
        reference(*batch(seed)).backward()
        nn.utils.clip_grad_norm_(reference.parameters(), GRAD_CLIP)
        plain.step()
        plain.zero_grad()
    no_clip = OptimizerStep(list(unclipped.parameters()), fused_adamw(unclipped), 1e9)
    train(unclipped, no_clip, range(3))

    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, reference.state_dict()[name], rtol=1e-4, atol=1e-5)
    differences = [
        (tensor - unclipped.state_dict()[name]).abs().max()
        for name, tensor in ours.state_dict().items()
    ]
    assert max(differences) > 1e-3


MUON_SHAPES = [(8, 4), (4, 8), (8, 4), (6, 6), (6, 6), (3, 5)]


def muon_pair(options: dict) -> tuple[list[nn.Parameter], BatchedMuon, torch.optim.Muon]:
    """Matrices of the shapes above (tall and wide ones sharing a stack) and two copies of
    them, one under BatchedMuon, one under PyTorch's Muon."""
    generator = torch.Generator().manual_seed(0)
    ours = [nn.Parameter(torch.randn(shape, generator=generator)) for shape in MUON_SHAPES]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    return ours + theirs, BatchedMuon(ours, **options), torch.optim.Muon(theirs, **options)


def set_gradients(params: list[nn.Parameter], seed: int, scale: float = 1.0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * scale


@pytest.mark.parametrize(
    "options",
    [
        {"lr": 0.02, "adjust_lr_fn": "match_rms_adamw"},
        {"lr": 0.05, "nesterov": False, "weight_decay": 0.0},
        {"lr": 0.02, "adjust_lr_fn": "original", "momentum": 0.9},
    ],
)
def test_batched_muon_steps_as_pytorchs_muon_and_takes_over_its_state(options):
    """Its steps are PyTorch Muon's on the gradients divided by grad_scale (the clipping),
    a step flagged by found_inf changes nothing, and it resumes from PyTorch Muon's state."""
    params, ours, theirs = muon_pair(options)
    count = len(MUON_SHAPES)
    for seed in range(3):
        # A scale that changes from step to step changes the momentum's mix: dividing by
        # it (the clipping) shows in the weights and the buffers.
        scale = 4.0**seed
        set_gradients(params[:count], seed, scale=scale)
        set_gradients(params[count:], seed)
        ours.grad_scale, ours.found_inf = torch.tensor(scale), torch.tensor(0.0)
        ours.step()
        theirs.step()
        # A non-finite step between the others: flagged, it leaves no trace.
        before = copy.deepcopy((params[:count], ours.state_dict()))
        set_gradients(params[:count], 9, scale=torch.nan)
        ours.found_inf = torch.tensor(1.0)
        ours.step()
        for kept, now in zip(before[0], params[:count], strict=True):
            assert torch.equal(kept, now)
        for index, state in before[1]["state"].items():
            assert torch.equal(
                state["momentum_buffer"], ours.state[params[index]]["momentum_buffer"]
            )
    for mine, reference in zip(params[:count], params[count:], strict=True):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            ours.state[mine]["momentum_buffer"], theirs.state[reference]["momentum_buffer"]
        )

    resumed = BatchedMuon([nn.Parameter(p.detach().clone()) for p in params[count:]], **options)
    resumed.load_state_dict(copy.deepcopy(theirs.state_dict()))  # as if read from disk
    set_gradients(resumed.param_groups[0]["params"], 3)
    set_gradients(params[count:], 3)
    resumed.step()
    theirs.step()
    for mine, reference in zip(resumed.param_groups[0]["params"], params[count:], strict=True):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-5)


class Rerun:
    """What a CUDA graph does, on the CPU: recording runs nothing, each replay runs the
    recorded update again from the tensors it was recorded with (unlike a graph, it would
    see a group's changed settings: see BatchedMuon's doc)."""

    def __init__(self, record) -> None:
        self.record = record

    def replay(self) -> None:
        self.record()


class RecordedOnTheCpu(BatchedMuon):
    recorder = Rerun

    @staticmethod
    def records_on(device: torch.device) -> bool:
        return True


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "unguarded"])
def test_the_recorded_muon_update_steps_as_the_one_issued_op_by_op(guarded):
    """From its second step BatchedMuon replays its update, recorded from tensors of its
    own: with each step's learning rate, divisor and skip flag copied in, it steps as the
    update issued op by op, a skipped step included; loading a state records it again."""
    options = {"lr": 0.02, "adjust_lr_fn": "match_rms_adamw"}
    params, op_by_op, _ = muon_pair(options)
    count = len(MUON_SHAPES)
    recorded_params = [nn.Parameter(p.detach().clone()) for p in params[:count]]
    recorded = RecordedOnTheCpu(recorded_params, **options)
    steps = [(0.02, 1.0, 0.0), (0.01, 2.0, 0.0), (0.005, 8.0, 1.0), (0.001, 3.0, 0.0)]
    steps += [(0.002, 1.0, 0.0)]
    for seed, (lr, scale, skipped) in enumerate(steps):
        if seed == 3:  # as a resumed run: new momentum buffers
            recorded.load_state_dict(copy.deepcopy(recorded.state_dict()))
        skipped = skipped if guarded else 0.0
        for optimizer, ps in ((op_by_op, params[:count]), (recorded, recorded_params)):
            set_gradients(ps, seed, scale=torch.nan if skipped else scale)
            optimizer.param_groups[0]["lr"] = lr
            if guarded:
                optimizer.grad_scale = torch.tensor(scale)
                optimizer.found_inf = torch.tensor(skipped)
        op_by_op.step()
        recorded.step()
        assert (recorded.recorded is not None) == (seed in (1, 2, 4))
        for mine, reference in zip(recorded_params, params[:count], strict=True):
            torch.testing.assert_close(mine, reference, rtol=0, atol=1e-6)
            torch.testing.assert_close(
                recorded.state[mine]["momentum_buffer"],
                op_by_op.state[reference]["momentum_buffer"],
                rtol=0,
                atol=1e-6,
            )
    assert op_by_op.recorded is None  # a CPU records nothing
    assert len(recorded.recorded.grads) == 3  # (8, 4) with (4, 8), 6 x 6, 3 x 5


def test_float16_loss_scaling_keeps_the_gradients_that_underflow_without_it():
    """At initialisation the output layer's gradient entries are about 1 / (tokens x
    vocabulary): for 1,024 tokens and 50,304 ids, under half float16's smallest subnormal
    (so they round to zero). A narrow model (the 50,304-way softmax is the cost, not the
    width) starts with near-uniform logits: no entry but the targets' is much larger."""
    narrow = {"n_layers": 1, "emb_dim": 16, "n_heads": 1, "head_dim": 16, "hidden_dim": 32}
    config = replace(CONFIG, **narrow, vocab_size=50304)
    data = torch.randint(0, 50304, (16, config.ctx_len + 1), generator=torch.Generator())
    inputs, targets = data[:, :-1], data[:, 1:]
    torch.manual_seed(0)
    model = NoodleModel(config)

    def head_gradient(dtype: torch.dtype, loss_scale: LossScale | None) -> torch.Tensor:
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(inputs, targets)
        step = OptimizerStep(list(model.parameters()), {}, 1.0, loss_scale)
        step.scale_loss(loss).backward()
        scale = 1.0 if loss_scale is None else float(loss_scale.scale)
        return model.head.weight.grad / scale

    exact = head_gradient(torch.float32, None)
    unscaled = head_gradient(torch.float16, None)
    scaled = head_gradient(torch.float16, LossScale(torch.device("cpu")))

    assert (exact != 0).float().mean() > 0.99
    assert (unscaled == 0).float().mean() > 0.9  # what float16 alone does
    assert (scaled == 0).float().mean() < 0.01
    assert torch.nn.functional.cosine_similarity(scaled.flatten(), exact.flatten(), 0) > 0.999


def test_the_loss_scale_halves_on_overflow_and_grows_after_a_run_of_good_steps(monkeypatch):
    monkeypatch.setattr(LossScale, "GROWTH_INTERVAL", 3)
    scale = LossScale(torch.device("cpu"))
    seen = []
    for overflow in (True, False, False, False, False, True):
        scale.update(torch.tensor(overflow))
        seen.append(float(scale.scale))
    start = LossScale.INITIAL
    assert seen == [start / 2, start / 2, start / 2, start, start, start / 2]


# -- the schedule -------------------------------------------------------------------------


def test_cosine_warms_up_linearly_then_decays_to_a_tenth_at_the_last_step():
    schedule = Schedule("cosine", warmup_steps=10, total_steps=110)
    assert [schedule.factor(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert schedule.factor(10) == 1.0
    assert schedule.factor(60) == pytest.approx(0.55)
    assert schedule.factor(110) == pytest.approx(0.1)
    assert schedule.factor(500) == pytest.approx(0.1)


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fifth():
    schedule = Schedule("wsd", warmup_steps=10, total_steps=110, decay_fraction=0.2)
    assert schedule.decay_start() == 88
    assert schedule.factor(50) == schedule.factor(87) == 1.0
    assert schedule.factor(99) == pytest.approx(0.1 + 0.9 * (1 - 11 / 22))
    assert schedule.factor(110) == pytest.approx(0.1)


def test_the_plan_keeps_a_tenth_of_a_short_run_for_the_warm_up():
    settings = TrainSettings(warmup_steps=100)
    assert Schedule.plan(settings, 50).warmup_steps == 5
    assert Schedule.plan(settings, 5000).warmup_steps == 100


@pytest.mark.parametrize("kind", ["cosine", "wsd"])
def test_a_longer_run_keeps_its_rate_and_decays_the_rest_to_the_minimum(kind):
    old = Schedule(kind, warmup_steps=10, total_steps=100)
    new = old.replan(95, 200)
    assert new.factor(95) == pytest.approx(old.factor(95))  # no jump
    assert new.factor(200) == pytest.approx(0.1)
    factors = [new.factor(s) for s in range(95, 201)]
    assert factors == sorted(factors, reverse=True)


def test_an_extended_finished_run_goes_on_at_its_minimum_rate():
    finished = Schedule("cosine", warmup_steps=10, total_steps=100)
    extended = finished.replan(100, 150)
    assert [extended.factor(s) for s in (100, 125, 150)] == pytest.approx([0.1] * 3)


def test_a_run_replanned_in_its_warm_up_or_flat_stretch_takes_the_new_plan():
    cosine = Schedule("cosine", warmup_steps=10, total_steps=100)
    assert cosine.replan(5, 300) == Schedule("cosine", warmup_steps=10, total_steps=300)
    wsd = Schedule("wsd", warmup_steps=10, total_steps=100)
    assert wsd.replan(50, 300) == Schedule("wsd", warmup_steps=10, total_steps=300)
    # Shortened past the new decay's start: it decays from the peak over what is left.
    shortened = wsd.replan(70, 80)
    assert shortened.factor(70) == 1.0 and shortened.factor(80) == pytest.approx(0.1)


def test_a_plateau_begins_the_wsd_decay_early_and_a_resume_keeps_the_shorter_plan():
    wsd = Schedule("wsd", warmup_steps=10, total_steps=110, decay_fraction=0.2)
    assert wsd.decays_early(50) and not wsd.decays_early(88)
    assert not wsd.decays_early(5)  # in the warm-up a plateau stops the run, as before
    assert not Schedule("cosine", warmup_steps=10, total_steps=110).decays_early(50)
    early = wsd.decay_now(50)
    assert early.total_steps == 72 and early.decay_start() == 50  # the planned 22-step decay
    assert early.factor(50) == 1.0 and early.factor(72) == pytest.approx(0.1)
    factors = [early.factor(s) for s in range(50, 73)]
    assert factors == sorted(factors, reverse=True)
    assert not early.decays_early(60)
    # Resumed with the length it was planned for, it keeps its shorter plan; asked for
    # another length, it re-plans the rest of its decay to that one.
    assert early.replan(60, 110) == early == early.replan(60, 72)
    longer = early.replan(60, 200)
    assert longer.factor(60) == pytest.approx(early.factor(60))
    assert longer.factor(200) == pytest.approx(0.1) and longer.requested_steps is None


def test_a_schedule_round_trips_through_json_data():
    schedule = Schedule("wsd", 10, 100).decay_now(50).replan(55, 120)
    assert Schedule.from_dict(schedule.to_dict()) == schedule
    assert all(isinstance(v, (int, float, str, type(None))) for v in schedule.to_dict().values())
    assert not math.isnan(schedule.factor(100))
