"""Built-in hooks driven through `HookRegistry.fire` by a fake trainer."""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import types

import pytest
import torch

from recframe.arguments import TrainingArguments
from recframe.hooks import (
    EarlyStoppingHook,
    Event,
    Hook,
    HookError,
    HookRegistry,
    LoggerHook,
    ProfilerHook,
    ProgressBarHook,
    TensorBoardHook,
)
from recframe.hooks import logger as logger_module
from recframe.state import TrainerControl, TrainerState


def make_trainer(tmp_path, max_steps=None, main=True, **arg_values):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), **arg_values)
    return types.SimpleNamespace(
        args=args,
        state=TrainerState(max_steps=max_steps),
        control=TrainerControl(),
        is_main_process=main,
    )


def run_steps(registry, trainer, losses, samples=32, lr=0.01, extra=None):
    """One before_step/after_step pair per loss, as the trainer does per update."""
    for loss in losses:
        registry.fire(Event.BEFORE_STEP, trainer)
        trainer.state.global_step += 1
        trainer.state.samples_seen += samples
        metrics = {"loss": torch.tensor(float(loss)), "lr": lr, "samples": samples}
        metrics.update(extra or {})
        registry.fire(Event.AFTER_STEP, trainer, metrics)


class FakeClock:
    """Stands in for the ``time`` module of recframe.hooks.logger."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(logger_module, "time", fake)
    return fake


def train_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "recframe"]


# --- LoggerHook ---------------------------------------------------------------------
def test_logger_line_format_interval_mean_and_last_step(tmp_path, caplog, clock):
    trainer = make_trainer(tmp_path, max_steps=7)
    hook = LoggerHook(log_steps=3)
    registry = HookRegistry([hook])
    caplog.set_level(logging.INFO, logger="recframe")
    registry.fire(Event.BEFORE_TRAIN, trainer)
    for loss in range(1, 8):
        clock.now += 0.5  # each update takes 0.5 s: 32 samples -> 64 samples/s
        run_steps(registry, trainer, [loss], extra={"ctr": torch.tensor(0.25), "n_pos": 3})

    lines = train_lines(caplog)
    assert lines == [
        "step=3 epoch=0 loss=2.0000 samples/s=64.0 lr=0.01 ctr=0.25 n_pos=3",
        "step=6 epoch=0 loss=5.0000 samples/s=64.0 lr=0.01 ctr=0.25 n_pos=3",
        "step=7 epoch=0 loss=7.0000 samples/s=64.0 lr=0.01 ctr=0.25 n_pos=3",
    ]
    assert hook.last_logged == {
        "step": 7,
        "epoch": 0,
        "loss": 7.0,
        "samples/s": 64.0,
        "lr": 0.01,
        "ctr": 0.25,
        "n_pos": 3,
    }
    # the tail was logged at max_steps, so after_train adds no line
    registry.fire(Event.AFTER_TRAIN, trainer)
    assert len(train_lines(caplog)) == 3


def test_logger_excludes_eval_time_logs_eval_and_tail(tmp_path, caplog, clock):
    trainer = make_trainer(tmp_path, log_steps=2)  # log_steps from the arguments
    hook = LoggerHook()
    registry = HookRegistry([hook])
    caplog.set_level(logging.INFO, logger="recframe")
    registry.fire(Event.BEFORE_TRAIN, trainer)
    clock.now += 1.0
    run_steps(registry, trainer, [0.5], samples=100)
    registry.fire(Event.BEFORE_EVALUATE, trainer)
    clock.now += 500.0  # evaluation time must not count against throughput
    registry.fire(Event.AFTER_EVALUATE, trainer, {"auc": 0.75, "logloss": 0.4512345})
    clock.now += 1.0
    run_steps(registry, trainer, [1.5], samples=100)
    clock.now += 2.0
    run_steps(registry, trainer, [3.0], samples=60)  # off the grid: logged by after_train
    registry.fire(Event.AFTER_TRAIN, trainer)

    assert train_lines(caplog) == [
        "eval step=1 epoch=0 auc=0.75 logloss=0.451234",
        "step=2 epoch=0 loss=1.0000 samples/s=100.0 lr=0.01",
        "step=3 epoch=0 loss=3.0000 samples/s=30.0 lr=0.01",
    ]
    assert hook.last_eval_logged == {"step": 1, "epoch": 0, "auc": 0.75, "logloss": 0.4512345}


def test_logger_silent_off_main_process_and_honours_should_log(tmp_path, caplog, clock):
    caplog.set_level(logging.INFO, logger="recframe")
    worker = make_trainer(tmp_path, main=False)
    registry = HookRegistry([LoggerHook(log_steps=1)])
    registry.fire(Event.BEFORE_TRAIN, worker)
    run_steps(registry, worker, [1.0, 2.0])
    registry.fire(Event.AFTER_EVALUATE, worker, {"auc": 0.5})
    registry.fire(Event.AFTER_TRAIN, worker)
    assert train_lines(caplog) == []

    class AskForLog(Hook):
        def after_step(self, trainer, metrics):
            trainer.control.should_log = trainer.state.global_step == 2

    trainer = make_trainer(tmp_path)
    hook = LoggerHook(log_steps=100)
    registry = HookRegistry([hook, AskForLog()])
    registry.fire(Event.BEFORE_TRAIN, trainer)
    run_steps(registry, trainer, [1.0, 2.0, 4.0])
    assert [m.split(" ")[0] for m in train_lines(caplog)] == ["step=2"]
    assert hook.last_logged["loss"] == 1.5


def test_logger_rejects_bad_log_steps():
    with pytest.raises(ValueError, match="log_steps"):
        LoggerHook(log_steps=0)


# --- TensorBoardHook ----------------------------------------------------------------
def read_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {
        tag: [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]
        for tag in acc.Tags()["scalars"]
    }


def test_tensorboard_writes_train_and_eval_scalars(tmp_path):
    trainer = make_trainer(tmp_path, logging_dir=str(tmp_path / "tb"))
    hook = TensorBoardHook(log_steps=2)
    registry = HookRegistry([hook])
    registry.fire(Event.BEFORE_TRAIN, trainer)
    assert hook.resolved_log_dir == str(tmp_path / "tb")
    run_steps(registry, trainer, [1.0, 2.0], lr=0.1, extra={"ctr": torch.tensor(0.5)})
    registry.fire(Event.BEFORE_EVALUATE, trainer)
    registry.fire(Event.AFTER_EVALUATE, trainer, {"auc": 0.7, "logloss": 0.5})
    run_steps(registry, trainer, [3.0, 5.0], lr=0.05, extra={"ctr": 0.25})
    registry.fire(Event.AFTER_TRAIN, trainer)
    # flushed at after_train: readable before the writer is closed
    assert read_scalars(tmp_path / "tb")["train/loss"] == [(2, 1.5), (4, 4.0)]
    registry.fire(Event.END, trainer)
    assert hook.writer is None

    scalars = read_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(2, 1.5), (4, 4.0)]
    assert scalars["train/lr"] == [(2, 0.1), (4, 0.05)]
    assert scalars["train/ctr"] == [(2, 0.5), (4, 0.25)]
    assert [step for step, _ in scalars["train/samples_per_sec"]] == [2, 4]
    assert all(value > 0 for _, value in scalars["train/samples_per_sec"])
    assert scalars["eval/auc"] == [(2, 0.7)]
    assert scalars["eval/logloss"] == [(2, 0.5)]


def test_tensorboard_default_dir_reopen_and_resume_purge(tmp_path):
    trainer = make_trainer(tmp_path, log_steps=1)
    hook = TensorBoardHook()
    registry = HookRegistry([hook])
    registry.fire(Event.BEFORE_TRAIN, trainer)
    run_steps(registry, trainer, [1.0, 2.0, 3.0])
    registry.fire(Event.AFTER_TRAIN, trainer)
    registry.fire(Event.END, trainer)
    log_dir = tmp_path / "out" / "logs"
    assert glob.glob(str(log_dir / "events.out.tfevents.*"))

    # a second train call in the same process appends to the same event file
    registry.rearm_end()
    registry.fire(Event.BEFORE_TRAIN, trainer)
    assert hook.writer is not None
    run_steps(registry, trainer, [4.0])
    registry.fire(Event.END, trainer)
    assert read_scalars(log_dir)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert len(glob.glob(str(log_dir / "events.out.tfevents.*"))) == 1

    # a crash-resumed run from a step-2 checkpoint replaces the later steps
    resumed = make_trainer(tmp_path, log_steps=1)
    resumed.state.global_step = 2
    registry = HookRegistry([TensorBoardHook()])
    registry.fire(Event.BEFORE_TRAIN, resumed)
    run_steps(registry, resumed, [30.0])
    registry.fire(Event.END, resumed)
    assert read_scalars(log_dir)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert len(glob.glob(str(log_dir / "events.out.tfevents.*"))) == 1


def test_tensorboard_writes_nothing_off_main_process(tmp_path):
    worker = make_trainer(tmp_path, main=False, logging_dir=str(tmp_path / "tb"), log_steps=1)
    hook = TensorBoardHook()
    registry = HookRegistry([hook])
    registry.fire(Event.BEFORE_TRAIN, worker)
    run_steps(registry, worker, [1.0])
    registry.fire(Event.BEFORE_EVALUATE, worker)
    registry.fire(Event.AFTER_EVALUATE, worker, {"auc": 0.5})
    registry.fire(Event.END, worker)
    assert hook.writer is None
    assert not (tmp_path / "tb").exists()


# --- ProgressBarHook ----------------------------------------------------------------
def test_progress_bar_without_tty(tmp_path):
    stream = io.StringIO()  # not a tty
    trainer = make_trainer(tmp_path, max_steps=25)
    hook = ProgressBarHook(postfix_steps=10, file=stream)
    calls = []
    real_mean = hook._meter.mean_loss
    hook._meter.mean_loss = lambda: calls.append(1) or real_mean()
    registry = HookRegistry([hook])
    registry.fire(Event.BEFORE_TRAIN, trainer)
    registry.fire(Event.BEFORE_EPOCH, trainer)
    assert hook.bar.total == 25
    run_steps(registry, trainer, [1.0] * 20 + [2.0] * 5)
    assert hook.bar.n == 25
    assert len(calls) == 0  # no redraw due (a non-tty redraws every 30 s): no loss read
    registry.fire(Event.AFTER_TRAIN, trainer)
    assert hook.bar is None
    assert len(calls) == 1  # the final postfix, when closing
    out = stream.getvalue()
    assert "25/25" in out
    assert "loss=1.2000" in out
    registry.fire(Event.END, trainer)  # closing twice is harmless


def test_progress_bar_reads_the_loss_only_when_it_redraws(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=25)
    hook = ProgressBarHook(postfix_steps=10, file=io.StringIO())
    calls = []
    real_mean = hook._meter.mean_loss
    hook._meter.mean_loss = lambda: calls.append(1) or real_mean()
    registry = HookRegistry([hook])
    registry.fire(Event.BEFORE_TRAIN, trainer)
    hook.bar.mininterval = 0  # a redraw is due at every update (a fast terminal)
    run_steps(registry, trainer, [1.0] * 20 + [2.0] * 5)
    assert len(calls) == 2  # every postfix_steps updates, not every update


def test_progress_bar_unknown_total_resume_and_disabled(tmp_path, capsys):
    trainer = make_trainer(tmp_path)
    trainer.state.global_step = 7
    hook = ProgressBarHook()
    registry = HookRegistry([hook])
    registry.fire(Event.BEFORE_TRAIN, trainer)  # sys.stderr is captured: not a tty
    assert hook.bar.total is None and hook.bar.n == 7
    run_steps(registry, trainer, [1.0] * 3)
    assert hook.bar.n == 10
    registry.fire(Event.END, trainer)
    assert hook.bar is None
    assert "10" in capsys.readouterr().err

    quiet = make_trainer(tmp_path, disable_tqdm=True)
    registry = HookRegistry([ProgressBarHook()])
    registry.fire(Event.BEFORE_TRAIN, quiet)
    run_steps(registry, quiet, [1.0])
    registry.fire(Event.END, quiet)
    assert capsys.readouterr().err == ""


# --- EarlyStoppingHook --------------------------------------------------------------
def evaluate(registry, trainer, **metrics):
    trainer.state.global_step += 10
    registry.fire(Event.BEFORE_EVALUATE, trainer)
    registry.fire(Event.AFTER_EVALUATE, trainer, metrics)


def test_early_stopping_after_patience_max_mode(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="recframe")
    trainer = make_trainer(tmp_path)
    hook = EarlyStoppingHook(metric="auc", mode="max", patience=2, min_delta=0.01)
    registry = HookRegistry([hook])
    evaluate(registry, trainer, auc=0.70, logloss=0.5)
    evaluate(registry, trainer, auc=0.75, logloss=0.5)
    assert (hook.best, hook.best_step, hook.bad_evals) == (0.75, 20, 0)
    evaluate(registry, trainer, auc=0.755, logloss=0.5)  # within min_delta: no improvement
    assert not trainer.control.should_stop and hook.bad_evals == 1
    evaluate(registry, trainer, auc=float("nan"), logloss=0.5)
    assert trainer.control.should_stop
    assert hook.best == 0.75
    assert any("early stopping at step 40: auc=nan" in m for m in train_lines(caplog))


def test_early_stopping_min_mode_resets_on_improvement(tmp_path):
    trainer = make_trainer(tmp_path)
    hook = EarlyStoppingHook(metric="logloss", mode="min", patience=2)
    registry = HookRegistry([hook])
    for value in (0.5, 0.6, 0.4, 0.45):
        evaluate(registry, trainer, logloss=value)
    assert not trainer.control.should_stop
    assert (hook.best, hook.bad_evals) == (0.4, 1)
    evaluate(registry, trainer, logloss=0.4)
    assert trainer.control.should_stop


def test_early_stopping_state_dict_round_trip(tmp_path):
    trainer = make_trainer(tmp_path)
    hook = EarlyStoppingHook(patience=2)
    registry = HookRegistry([hook])
    evaluate(registry, trainer, auc=0.8)
    evaluate(registry, trainer, auc=0.7)
    saved = json.loads(json.dumps(registry.state_dict()))  # checkpoints store it as JSON
    assert saved == {"EarlyStoppingHook": {"best": 0.8, "best_step": 10, "bad_evals": 1}}

    fresh = EarlyStoppingHook(patience=2)
    restored = HookRegistry([fresh])
    restored.load_state_dict(saved)
    assert (fresh.best, fresh.best_step, fresh.bad_evals) == (0.8, 10, 1)
    evaluate(restored, trainer, auc=0.79)
    assert trainer.control.should_stop


def test_early_stopping_missing_metric_names_it(tmp_path):
    trainer = make_trainer(tmp_path)
    hook = EarlyStoppingHook(metric="gauc")
    with pytest.raises(ValueError, match=r"'gauc'.*\['auc', 'logloss'\]"):
        hook.after_evaluate(trainer, {"logloss": 0.5, "auc": 0.7})
    with pytest.raises(HookError, match="EarlyStoppingHook.*after_evaluate.*gauc") as info:
        HookRegistry([hook]).fire(Event.AFTER_EVALUATE, trainer, {"auc": 0.7})
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"metric": ""}, "metric"),
        ({"mode": "up"}, "mode"),
        ({"patience": 0}, "patience"),
        ({"patience": 1.5}, "patience"),
        ({"min_delta": -0.1}, "min_delta"),
        ({"min_delta": float("inf")}, "min_delta"),
    ],
)
def test_early_stopping_validates_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EarlyStoppingHook(**kwargs)


# --- ProfilerHook -------------------------------------------------------------------
def profiled_steps(registry, trainer, n):
    a = torch.randn(64, 64)
    for _ in range(n):
        registry.fire(Event.BEFORE_STEP, trainer)
        (a @ a).relu_().sum()
        trainer.state.global_step += 1
        registry.fire(
            Event.AFTER_STEP, trainer, {"loss": torch.tensor(1.0), "lr": 0.1, "samples": 8}
        )


def test_profiler_writes_tensorboard_trace(tmp_path):
    trainer = make_trainer(tmp_path)
    hook = ProfilerHook(wait=1, warmup=1, active=2)
    registry = HookRegistry([hook])
    registry.fire(Event.BEFORE_TRAIN, trainer)
    profiled_steps(registry, trainer, 6)
    registry.fire(Event.AFTER_TRAIN, trainer)
    registry.fire(Event.END, trainer)
    assert hook.profiler is None
    out = tmp_path / "out" / "logs" / "profile"
    assert hook.resolved_output_dir == str(out)
    traces = glob.glob(str(out / "*.pt.trace.json"))
    assert len(traces) == 1
    with open(traces[0]) as f:
        events = json.load(f)["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert steps == {"ProfilerStep#2", "ProfilerStep#3"}
    assert any(re.search("matmul|mm", e.get("name", "")) for e in events)


def test_profiler_stop_mid_active_phase_still_writes(tmp_path):
    trainer = make_trainer(tmp_path)
    out = tmp_path / "prof"
    hook = ProfilerHook(output_dir=str(out), wait=0, warmup=1, active=50)
    registry = HookRegistry([hook])
    registry.fire(Event.BEFORE_TRAIN, trainer)
    profiled_steps(registry, trainer, 3)
    registry.fire(Event.END, trainer)  # training stopped early
    assert len(glob.glob(os.path.join(out, "*.pt.trace.json"))) == 1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"wait": -1}, "wait"),
        ({"active": 0}, "active"),
        ({"repeat": -1}, "repeat"),
        ({"output_dir": ""}, "output_dir"),
    ],
)
def test_profiler_validates_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ProfilerHook(**kwargs)


# --- HookRegistry -------------------------------------------------------------------
class Recorder(Hook):
    def __init__(self, label, log, priority=0, fail_in=None):
        self.label = label
        self.log = log
        self.priority = priority
        self.fail_in = fail_in

    def _record(self, event):
        self.log.append((self.label, event))
        if event == self.fail_in:
            raise RuntimeError(f"{self.label} broke")

    def after_step(self, trainer, metrics):
        self._record("after_step")

    def end(self, trainer):
        self._record("end")


def test_registry_priority_order_and_end_once(tmp_path):
    log = []
    registry = HookRegistry(
        [
            Recorder("late", log, 5),
            Recorder("a", log, 0),
            Recorder("first", log, -1),
            Recorder("b", log, 0),
        ]
    )
    trainer = make_trainer(tmp_path)
    registry.fire(Event.AFTER_STEP, trainer, {})
    assert [label for label, _ in log] == ["first", "a", "b", "late"]

    log.clear()
    registry.fire(Event.END, trainer)
    registry.fire("end", trainer)  # event names are accepted too
    assert log == [("first", "end"), ("a", "end"), ("b", "end"), ("late", "end")]
    registry.rearm_end()
    registry.fire(Event.END, trainer)
    assert len(log) == 8

    builtins = HookRegistry(
        [LoggerHook(), TensorBoardHook(), ProgressBarHook(), EarlyStoppingHook(), ProfilerHook()]
    )
    names = [h.name for h in builtins]
    assert names[0] == "ProfilerHook"
    assert names.index("EarlyStoppingHook") < names.index("LoggerHook")


def test_registry_error_names_hook_and_end_reaches_every_hook(tmp_path):
    log = []
    trainer = make_trainer(tmp_path)
    registry = HookRegistry(
        [Recorder("bad", log, 0, fail_in="after_step"), Recorder("next", log, 1)]
    )
    with pytest.raises(HookError, match=r"hook 'Recorder' raised in after_step.*bad broke"):
        registry.fire(Event.AFTER_STEP, trainer, {})
    assert log == [("bad", "after_step")]  # the failure stops the event

    log.clear()
    registry = HookRegistry([Recorder("bad", log, 0, fail_in="end"), Recorder("next", log, 1)])
    with pytest.raises(HookError, match="raised in end") as info:
        registry.fire(Event.END, trainer)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert log == [("bad", "end"), ("next", "end")]  # clean-up still reached "next"


def test_metrics_added_by_earlier_hooks_reach_logger_and_tensorboard(tmp_path, caplog, clock):
    class AddsMetric(Hook):
        def after_step(self, trainer, metrics):
            metrics["grad_norm"] = torch.tensor(2.5)

    caplog.set_level(logging.INFO, logger="recframe")
    trainer = make_trainer(tmp_path, log_steps=1)
    registry = HookRegistry([LoggerHook(), TensorBoardHook(), AddsMetric()])
    registry.fire(Event.BEFORE_TRAIN, trainer)
    run_steps(registry, trainer, [1.0])
    registry.fire(Event.END, trainer)
    assert train_lines(caplog)[0].endswith("lr=0.01 grad_norm=2.5")
    assert read_scalars(tmp_path / "out" / "logs")["train/grad_norm"] == [(1, 2.5)]
