"""Resume state: what it holds, how it is stored, and that a resumed run continues exactly
(learning-rate schedule, data order, dropout RNG, early stopping, evaluation schedule)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from noodle.errors import NoodleError
from noodle.train.loop import Trainer
from noodle.train.settings import TrainSettings
from noodle.train.writer import Writer
from tests.tiny_runs import assert_same_files, assert_same_tensors, read_metrics, saved_tensors

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# With these, the run evaluates every 5 steps and at each epoch end (18 batches), and
# stops early at step 65, after three evaluations without a 0.05 improvement.
SETTINGS = TrainSettings(
    max_steps=150,
    batch_size=8,
    lr=3e-3,
    eval_interval=5,
    eval_batches=4,
    patience=3,
    min_improvement=0.05,
    seed=3,
    log_interval=2,
)
EARLY_STOP_STEP = 65
CRASH_AT_STEP = 63  # mid-epoch, after the evaluation at step 60 and a log at step 62


class SimulatedCrash(Exception):
    """Stands for a kill or a power cut: the run stops with no chance to save anything."""


def crash_before_step(trainer: Trainer, step: int, saves_at: Callable[[int], bool]) -> None:
    """Run `trainer`, saving its resume state only after the steps `saves_at` accepts, and
    crash it as it is about to take step `step + 1`."""
    trainer.save_due = lambda: saves_at(trainer.state.step)
    get_batch = trainer.train_data.get

    def get_batch_or_crash(epoch: int, index: int):
        if trainer.state.step == step:
            raise SimulatedCrash
        return get_batch(epoch, index)

    trainer.train_data.get = get_batch_or_crash
    with pytest.raises(SimulatedCrash):
        trainer.run()


def test_run_resumed_after_a_crash_matches_the_uninterrupted_run(tiny_run, tmp_path):
    reference = tiny_run.trainer(tmp_path / "reference", SETTINGS)
    expected = reference.run()
    assert expected.stopped_early and expected.step == EARLY_STOP_STEP

    out = tmp_path / "crashed"
    # Save the resume state at the evaluations only, so the crash leaves metrics records
    # past the saved step.
    crashing = tiny_run.trainer(out, SETTINGS)
    crash_before_step(crashing, CRASH_AT_STEP, lambda step: step % SETTINGS.eval_interval == 0)
    assert max(m["step"] for m in read_metrics(out)) == CRASH_AT_STEP - 1

    # A write the crash cut short left its temporary file; resuming removes it.
    (out / ".resume.safetensors.k1ll3d.tmp").write_bytes(b"half a resume state")
    resumed = tiny_run.trainer(out, SETTINGS)
    resumed.resume()
    assert not list(out.glob(".*.tmp"))
    saved = resumed.state
    assert (saved.step, saved.epoch, saved.batch_index) == (60, 3, 6)
    assert saved.evals_without_improvement == 2 and not saved.stopped_early
    final = resumed.run()

    assert asdict(final) == asdict(expected)
    assert_same_tensors(reference.model.state_dict(), resumed.model.state_dict(), "weights")
    assert_same_files(tmp_path / "reference", out, ("resume.safetensors",))
    # metrics.jsonl: the records logged after the saved step before the crash were dropped,
    # so every step appears once and the evaluations are the uninterrupted run's.
    metrics = read_metrics(out)
    for kind in ("train", "eval"):
        steps = [m["step"] for m in metrics if m["kind"] == kind]
        assert steps == sorted(set(steps)), kind
    evals = [
        [(m["step"], m["val_loss"]) for m in read_metrics(run) if m["kind"] == "eval"]
        for run in (tmp_path / "reference", out)
    ]
    assert evals[0] == evals[1]


def test_resume_state_is_one_safetensors_file_of_tensors_and_json(tiny_run, tmp_path):
    out = tmp_path / "model"
    trainer = tiny_run.trainer(out, replace(SETTINGS, max_steps=10))
    trainer.run()

    # safetensors: an 8-byte header length, a JSON header, raw tensor data; no pickle.
    data = (out / "resume.safetensors").read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    state = json.loads(header["__metadata__"]["state"])
    assert state["train_state"] == asdict(trainer.state)
    assert {"step": 10, "epoch": 0, "batch_index": 10}.items() <= state["train_state"].items()
    assert state["identity"]["settings"]["lr"] == SETTINGS.lr
    assert state["identity"]["architecture"]["dropout"] == 0.1
    assert state["param_groups"]["adamw"][0]["weight_decay"] == SETTINGS.weight_decay
    assert state["schedule"] == {**state["schedule"], "kind": "cosine", "total_steps": 10}

    with safe_open(out / "resume.safetensors", framework="pt") as reader:
        names = set(reader.keys())
    model_names = {f"model.{name}" for name in trainer.model.state_dict()}
    optimizer_names = {
        f"optimizer.adamw.{index}.{moment}"
        for index in range(len(model_names))
        for moment in ("step", "exp_avg", "exp_avg_sq")
    }
    assert names == model_names | optimizer_names | {"rng.cpu"}
    assert sorted(p.name for p in out.iterdir()) == [
        "metrics.jsonl",
        "model.safetensors",
        "resume.safetensors",
    ]


def test_a_resume_state_of_format_2_is_still_resumed(tiny_run, tmp_path):
    """Format 3 added the schedule's requested_steps; a state written before it lacks it."""
    out = tmp_path / "model"
    settings = replace(SETTINGS, max_steps=10)
    tiny_run.trainer(out, settings).run()
    path = out / "resume.safetensors"
    with safe_open(path, framework="pt") as reader:
        state = json.loads(reader.metadata()["state"])
    tensors = saved_tensors(path)
    del state["schedule"]["requested_steps"]
    save_file(tensors, path, metadata={"state": json.dumps({**state, "format": 2})})

    resumed = tiny_run.trainer(out, replace(settings, max_steps=20))
    resumed.resume()
    assert resumed.run().step == 20


def test_a_run_resumed_with_more_steps_keeps_its_rate_and_decays_the_rest(tiny_run, tmp_path):
    settings = replace(SETTINGS, max_steps=60, patience=1000, eval_interval=30, log_interval=1)
    out = tmp_path / "model"
    crashing = tiny_run.trainer(out, settings)
    crash_before_step(crashing, 31, lambda step: step == 30)
    planned = crashing.schedule

    resumed = tiny_run.trainer(out, replace(settings, max_steps=90))
    resumed.resume()
    resumed.run()

    rates = {m["step"]: m["lr"] for m in read_metrics(out) if m["kind"] == "train"}
    # The rate logged at step s is the one step s - 1 was taken with.
    assert rates[31] == pytest.approx(planned.factor(30) * settings.lr)  # no jump
    after = [rates[s] for s in sorted(rates) if s > 30]
    assert after == sorted(after, reverse=True)
    assert rates[90] == pytest.approx(0.1 * settings.lr, rel=1e-2)  # (taken at step 89)
    # Not the cosine of a run planned for 90 steps from the start:
    fresh = replace(planned, total_steps=90)
    assert abs(rates[31] - fresh.factor(30) * settings.lr) > 0.01 * settings.lr
    with safe_open(out / "resume.safetensors", framework="pt") as reader:
        state = json.loads(reader.metadata()["state"])
    assert state["schedule"]["total_steps"] == 90 and state["schedule"]["decay_from_step"] == 30


def test_a_wsd_run_that_plateaus_at_its_peak_decays_from_there_and_resumes_so(tiny_run, tmp_path):
    """With a min_improvement no evaluation meets, the first evaluation sets the reference
    and three more (at steps 18, the first epoch's end, 20 and 30) make the plateau at step
    30: a cosine run stops there; a WSD run, still at its peak rate, begins its 20-step decay
    there and ends at step 50, also after a crash in the decay and a resume with the run's
    original length."""
    plateau = replace(
        SETTINGS, max_steps=100, eval_interval=10, patience=3, min_improvement=10.0, log_interval=1
    )
    cosine = tiny_run.trainer(tmp_path / "cosine", plateau).run()
    assert cosine.stopped_early and cosine.step == 30

    wsd_settings = replace(plateau, schedule="wsd")
    wsd = tiny_run.trainer(tmp_path / "wsd", wsd_settings)
    finished = wsd.run()
    assert finished.step == 50 and wsd.schedule.total_steps == 50
    rates = {m["step"]: m["lr"] for m in read_metrics(tmp_path / "wsd") if m["kind"] == "train"}
    # The rate logged at step s is the one step s - 1 was taken with.
    assert rates[11] == rates[31] == pytest.approx(wsd_settings.lr)
    decay = [rates[s] for s in range(31, 51)]
    assert decay == sorted(decay, reverse=True) and len(set(decay)) == 20
    assert rates[50] == pytest.approx(wsd.schedule.factor(49) * wsd_settings.lr)
    assert wsd.schedule.factor(50) == pytest.approx(0.1)

    out = tmp_path / "crashed"
    crash_before_step(tiny_run.trainer(out, wsd_settings), 43, lambda step: step % 10 == 0)
    resumed = tiny_run.trainer(out, wsd_settings)
    resumed.resume()
    assert resumed.state.step == 40 and resumed.schedule == wsd.schedule
    assert asdict(resumed.run()) == asdict(finished)
    assert_same_tensors(wsd.model.state_dict(), resumed.model.state_dict(), "weights")


def test_saving_in_the_background_ends_with_the_same_files(tiny_run, tmp_path):
    """On GPUs the saves are written off the training thread from host copies; the files
    must be those the inline writer (the CPU's) leaves."""
    settings = replace(SETTINGS, max_steps=30, save_interval_s=0)
    inline = tiny_run.trainer(tmp_path / "inline", settings)
    inline.run()
    background = tiny_run.trainer(tmp_path / "background", settings)
    background.writer = Writer(background=True)
    background.run()

    assert background.writer.thread is None  # stopped once the run was over
    assert_same_files(
        tmp_path / "inline", tmp_path / "background", ("model.safetensors", "resume.safetensors")
    )


def test_a_failed_background_save_stops_the_run_with_its_error(tiny_run, tmp_path):
    trainer = tiny_run.trainer(tmp_path / "model", replace(SETTINGS, max_steps=30))
    trainer.writer = Writer(background=True)

    def full_disk(tensors: dict, best: object) -> None:
        raise NoodleError(f"cannot write {tmp_path}/model/model.safetensors: No space left")

    trainer.out.write_weights = full_disk
    with pytest.raises(NoodleError, match="No space left"):
        trainer.run()
    assert trainer.state.step < 30  # it stopped at the next save, not at the end
