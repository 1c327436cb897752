"""Stopping means stopped: ``control.should_stop`` from a round's evaluation ends
`train_and_evaluate`, a stop is checkpointed (a restart trains nothing unless asked
to), a ``before_step`` stop comes before that update, a SIGTERM is not a stop, and a
round whose checkpoint predates its evaluation is evaluated after a resume."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ToyCTR, make_batches

from recframe import Hook, HookError, Trainer, TrainingArguments
from recframe.hooks import EarlyStoppingHook

_run_ids = itertools.count()


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_args(path, **values) -> TrainingArguments:
    values.setdefault("report_to", "none")
    values.setdefault("disable_tqdm", True)
    values.setdefault("log_steps", 1000)
    return TrainingArguments(output_dir=str(path), **values)


def indexed(n: int, batch_size: int = 8) -> list[dict]:
    batches = make_batches(n, batch_size)
    for i, b in enumerate(batches):
        b["idx"] = torch.full((batch_size,), i)
    return batches


class SeenCTR(ToyCTR):
    """Records the index of every batch it trains on."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__()
        self.seen: list[int] = []

    def forward(self, batch):
        if self.training:
            self.seen.append(int(batch["idx"][0]))
        return super().forward(batch)


class Recorder(Hook):
    def __init__(self) -> None:
        self.evaluated_at: list[int] = []
        self.events: list[str] = []
        self.updates = 0

    def after_step(self, trainer, metrics):
        self.updates += 1

    def after_train(self, trainer):
        self.events.append("after_train")

    def after_evaluate(self, trainer, metrics):
        self.evaluated_at.append(trainer.global_step)
        self.events.append(f"after_evaluate@{trainer.global_step}")

    def after_save(self, trainer, path):
        self.events.append(f"after_save@{trainer.global_step}")


def never_improves() -> EarlyStoppingHook:
    """Stops at the second evaluation, whatever the numbers (nothing beats min_delta)."""
    return EarlyStoppingHook(metric="loss", mode="min", patience=1, min_delta=1e9)


def build(path, hooks=(), **values) -> tuple[Trainer, SeenCTR]:
    model = SeenCTR()
    trainer = Trainer(model, make_args(path, **values), train_dataset=indexed(40),
                      eval_dataset=make_batches(2, 8, seed=9), hooks=list(hooks))
    return trainer, model


# --- train_and_evaluate honours a stop from a round's evaluation ----------------------------
def test_early_stopping_in_a_round_evaluation_ends_train_and_evaluate(tmp_path):
    rec = Recorder()
    trainer, model = build(tmp_path / "run", [never_improves(), rec])
    results = trainer.train_and_evaluate(epochs=5, train_steps=2)
    assert trainer.global_step == 4  # rounds 0 and 1; the second evaluation stopped it
    assert rec.evaluated_at == [2, 4]
    assert model.seen == [0, 1, 2, 3]
    assert results == trainer.state.last_eval
    assert trainer.state.stopped and trainer.state.stop_target == {"steps": 10}


def test_a_restarted_stopped_run_does_not_train_again(tmp_path, caplog):
    out = tmp_path / "run"
    first, _ = build(out, [never_improves()])
    last = first.train_and_evaluate(epochs=5, train_steps=2)

    rec = Recorder()
    trainer, model = build(out, [never_improves(), rec])
    results = trainer.train_and_evaluate(epochs=5, train_steps=2)
    assert trainer.global_step == 4
    assert model.seen == [] and rec.updates == 0
    assert rec.evaluated_at == []  # the stopped step's results come from the checkpoint
    assert results == last
    assert "stopped early by a hook at step 4" in caplog.text
    assert "resume_training" in caplog.text

    trainer.train()  # args.train_steps is None: 1 epoch (a different unit) stays stopped
    assert trainer.global_step == 4 and model.seen == []


def test_a_larger_target_or_resume_training_continues_a_stopped_run(tmp_path):
    out = tmp_path / "run"
    build(out, [never_improves()])[0].train_and_evaluate(epochs=5, train_steps=2)

    trainer, model = build(out, [never_improves()])
    trainer.train(train_steps=12)  # more than the stopped call's 10 updates: on purpose
    assert trainer.global_step == 12
    assert model.seen == list(range(4, 12))
    assert not trainer.state.stopped

    out2 = tmp_path / "run2"
    build(out2, [never_improves()])[0].train_and_evaluate(epochs=5, train_steps=2)
    rec = Recorder()
    trainer, model = build(out2, [never_improves(), rec], resume_training=True)
    trainer.train_and_evaluate(epochs=5, train_steps=2)
    # round 2 trains; its evaluation (patience already spent) stops the run again
    assert model.seen == [4, 5]
    assert rec.evaluated_at == [6]
    assert trainer.state.stopped


class StopAt(Hook):
    """Sets should_stop once, in ``event``, at ``step``."""

    def __init__(self, step: int, event: str = "after_step") -> None:
        self.step, self.event, self.fired = step, event, False

    def _maybe_stop(self, trainer, event):
        if event == self.event and trainer.global_step == self.step and not self.fired:
            self.fired = True
            trainer.control.should_stop = True

    def before_step(self, trainer):
        self._maybe_stop(trainer, "before_step")

    def after_step(self, trainer, metrics):
        self._maybe_stop(trainer, "after_step")


def test_a_stop_at_a_step_saved_on_the_interval_is_in_that_checkpoint(tmp_path):
    # save_steps=1: the update's own checkpoint is written after its after_step hooks, and
    # the final save of train() is then a no-op: the stop must be in the interval one
    out = tmp_path / "run"
    trainer, model = build(out, [StopAt(3)], save_steps=1)
    trainer.train(train_steps=8)
    assert trainer.global_step == 3

    again, model = build(out, save_steps=1)  # no stopping hook this time
    again.train(train_steps=8)
    assert again.global_step == 3 and model.seen == []


def test_should_stop_in_before_step_stops_before_that_update(tmp_path):
    rec = Recorder()
    trainer, model = build(tmp_path / "run", [StopAt(2, "before_step"), rec])
    trainer.train(train_steps=6)
    assert trainer.global_step == 2
    assert model.seen == [0, 1] and rec.updates == 2

    trainer.train(train_steps=7)  # the next batch was not lost: training continues at 2
    assert model.seen == [0, 1, 2, 3, 4, 5, 6]


def test_sigterm_is_a_preemption_not_a_stop(tmp_path):
    class Preempt(Hook):
        def after_step(self, trainer, metrics):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler is installed

    out = tmp_path / "run"
    rec = Recorder()
    trainer, _ = build(out, [Preempt(), rec], save_on_sigterm=True)
    trainer.train_and_evaluate(epochs=3, train_steps=4)
    assert trainer.global_step == 2  # saved at this step, then stopped
    assert rec.evaluated_at == []  # no evaluation in the grace period
    assert not trainer.state.stopped

    rec = Recorder()
    trainer, model = build(out, [rec])
    trainer.train_and_evaluate(epochs=3, train_steps=4)
    assert trainer.global_step == 12
    assert model.seen == list(range(2, 12))
    assert rec.evaluated_at == [4, 8, 12]


# --- a crash between a round's checkpoint and its evaluation --------------------------------
class CrashAfterSave(Hook):
    def __init__(self, step: int) -> None:
        self.step = step

    def after_save(self, trainer, path):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash after the checkpoint")


def test_a_round_checkpointed_before_its_evaluation_is_evaluated_after_resume(tmp_path):
    # save_steps == train_steps: the interval save of the round's last update comes
    # before the round's evaluation; the process dies right after it
    out = tmp_path / "run"
    rec = Recorder()
    trainer, _ = build(out, [CrashAfterSave(2), rec], save_steps=2)
    with pytest.raises(HookError, match="simulated crash"):
        trainer.train_and_evaluate(epochs=3, train_steps=2)
    assert rec.evaluated_at == []

    rec = Recorder()
    trainer, model = build(out, [rec], save_steps=2)
    trainer.train_and_evaluate(epochs=3, train_steps=2)
    assert rec.evaluated_at == [2, 4, 6]  # round 0's evaluation is not lost
    assert model.seen == [2, 3, 4, 5]


def test_a_round_evaluation_runs_before_its_final_checkpoint_and_is_not_repeated(tmp_path):
    out = tmp_path / "run"
    rec = Recorder()
    trainer, _ = build(out, [rec, CrashAfterSave(2)])  # save_steps 1000: final saves only
    with pytest.raises(HookError, match="simulated crash"):
        trainer.train_and_evaluate(epochs=3, train_steps=2)
    assert rec.events == ["after_train", "after_evaluate@2", "after_save@2"]

    rec = Recorder()
    trainer, model = build(out, [rec])
    trainer.train_and_evaluate(epochs=3, train_steps=2)
    assert rec.evaluated_at == [4, 6]  # step 2's evaluation is in its checkpoint
    assert model.seen == [2, 3, 4, 5]


def test_an_interval_evaluation_at_a_round_end_is_not_run_twice(tmp_path):
    rec = Recorder()
    trainer, _ = build(tmp_path / "run", [rec], eval_interval_steps=2)
    trainer.train_and_evaluate(epochs=2, train_steps=2)
    assert rec.evaluated_at == [2, 4]


CRASHING_RUN = """
import os, sys
sys.path.insert(0, {tests!r})
import test_stopping as t
from recframe import Hook

class Die(Hook):
    def after_save(self, trainer, path):
        if trainer.global_step == 2:
            os._exit(17)  # the process dies right after the round's (interval) checkpoint

trainer, _ = t.build({out!r}, [Die()], save_steps=2)
trainer.train_and_evaluate(epochs=3, train_steps=2)
"""


def test_a_process_killed_after_a_rounds_checkpoint_evaluates_that_round_on_resume(tmp_path):
    out = str(tmp_path / "run")
    code = CRASHING_RUN.format(tests=os.path.dirname(os.path.abspath(__file__)), out=out)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 17, done.stderr[-2000:]

    rec = Recorder()
    trainer, model = build(out, [rec], save_steps=2)
    trainer.train_and_evaluate(epochs=3, train_steps=2)
    assert rec.evaluated_at == [2, 4, 6]
    assert model.seen == [2, 3, 4, 5]
