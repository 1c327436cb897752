"""`LoggerHook`: one ``k=v`` log line per ``log_steps`` optimizer updates.

The line reads like RecIS's training log::

    step=120 epoch=0 loss=0.5123 samples/s=41234.5 lr=0.001 ctr=0.031

``epoch`` is the pass the logged update belongs to, as the progress bar shows it.

``loss`` is the mean over the updates since the previous line and ``samples/s`` is
measured over the same interval (evaluation time excluded). The per-step loss
arrives as a detached device tensor; it is only stacked and read back (one device
sync) when a line is written, never on every step.
"""

from __future__ import annotations

import abc
import logging
import math
import numbers
import time
from typing import TYPE_CHECKING, Any, Optional, Union

import torch

from recframe.hooks.base import Hook

if TYPE_CHECKING:
    from recframe.trainer import Trainer

logger = logging.getLogger("recframe")

RESERVED_STEP_KEYS = ("loss", "lr", "samples")
"""Keys of the ``after_step`` metrics the trainer itself fills in."""


def scalar_value(value: Any) -> Optional[Union[int, float]]:
    """A plain number for a scalar metric (one-element tensor or number), else None.

    Reading a tensor syncs its device, so callers only do it when they write a log.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        return value.detach().reshape(()).item()
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def format_value(value: Union[int, float], digits: int = 6) -> str:
    """Compact text of a number for a ``k=v`` line (ints as-is, floats to ``digits``)."""
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value.is_integer() and abs(value) < 1e15:  # counts reduced as floats read as ints
        return str(int(value))
    return f"{value:.{digits}g}"


FOLD_LOSSES = 256
"""An interval's loss tensors are summed into one (on their device, no sync) every this
many updates, so a long interval (a progress bar redrawn every 30 s) holds a bounded
list."""


class IntervalMeter:
    """Loss, samples and wall time accumulated since the last log.

    Losses are kept as detached tensors (numbers are accepted too) and summed only
    in `mean_loss`, so accumulating costs no device sync (every `FOLD_LOSSES` of them
    are summed into one tensor on their device). Time spent between `pause` and
    `resume` (evaluation) is left out of the interval.
    """

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []
        self._folded: Optional[torch.Tensor] = None
        self._folded_count = 0
        self._float_losses: list[float] = []
        self.samples = 0
        self.steps = 0
        self.start = time.perf_counter()
        self._paused_at: Optional[float] = None

    def reset(self) -> None:
        """Start a new interval now."""
        self._losses.clear()
        self._folded = None
        self._folded_count = 0
        self._float_losses.clear()
        self.samples = 0
        self.steps = 0
        self.start = time.perf_counter()
        self._paused_at = None

    def add(self, metrics: dict[str, Any]) -> None:
        """Record one optimizer update's ``loss`` and ``samples``."""
        loss = metrics.get("loss")
        if loss is not None:
            # a plain tensor (the trainer's) is told apart without a call
            if loss.__class__ is torch.Tensor or isinstance(loss, torch.Tensor):
                # the trainer's loss is detached already: no new tensor per update then
                losses = self._losses
                losses.append(loss.detach() if loss.requires_grad else loss)
                if len(losses) >= FOLD_LOSSES:
                    self._fold()
            else:
                self._float_losses.append(float(loss))
        samples = metrics.get("samples")
        if samples is not None:
            self.samples += samples if type(samples) is int else int(samples)
        self.steps += 1

    def pause(self) -> None:
        """Stop the clock (an evaluation starts)."""
        if self._paused_at is None:
            self._paused_at = time.perf_counter()

    def resume(self) -> None:
        """Restart the clock, shifting the interval start past the pause."""
        if self._paused_at is not None:
            self.start += time.perf_counter() - self._paused_at
            self._paused_at = None

    @staticmethod
    def _sum(losses: list[torch.Tensor]) -> torch.Tensor:
        """The sum of ``losses`` (a tensor's mean where it holds several values)."""
        try:
            stacked = torch.stack(losses)
        except RuntimeError:  # losses of different shapes
            stacked = None
        if stacked is not None and stacked.dim() == 1:  # the trainer's scalar losses
            return stacked.float().sum()
        stacked = torch.stack(
            [t.reshape(()) if t.numel() == 1 else t.float().mean() for t in losses]
        )
        return stacked.float().sum()

    def _fold(self) -> None:
        """Sum the losses held so far into one tensor (on their device: no sync)."""
        total = self._sum(self._losses)
        if self._folded is not None:
            total = total + self._folded.to(total.device)
        self._folded, self._folded_count = total, self._folded_count + len(self._losses)
        self._losses.clear()

    def mean_loss(self) -> Optional[float]:
        """Mean loss of the interval (one device sync), or None without losses."""
        count = self._folded_count + len(self._losses) + len(self._float_losses)
        if count == 0:
            return None
        total = math.fsum(self._float_losses)
        if self._losses:
            self._fold()
        if self._folded is not None:
            total += self._folded.item()
        return total / count

    def samples_per_sec(self) -> float:
        """Samples per second of wall time since the interval began (pauses excluded)."""
        now = self._paused_at if self._paused_at is not None else time.perf_counter()
        elapsed = now - self.start
        return self.samples / elapsed if elapsed > 0 else 0.0


def update_epoch(state: Any) -> int:
    """The epoch the last optimizer update belongs to (the pass the progress bar
    shows): the update that ends a pass already counts it in ``state.epoch``."""
    epoch = int(state.epoch)
    if epoch > 0 and int(getattr(state, "epoch_batches", 1)) == 0 and state.global_step > 0:
        return epoch - 1
    return epoch


def log_due(trainer: Trainer, log_steps: int) -> bool:
    """Whether the update just finished should be logged.

    Every ``log_steps`` updates, at ``state.max_steps``, or when a hook that ran
    earlier set ``trainer.control.should_log``.
    """
    state = trainer.state
    step = state.global_step
    if step % log_steps == 0:
        return True
    if state.max_steps is not None and step >= state.max_steps:
        return True
    return bool(getattr(trainer.control, "should_log", False))


class IntervalReportHook(Hook, abc.ABC):
    """Base of the hooks that report training every ``log_steps`` updates (the log line,
    TensorBoard, metrics.jsonl): it gathers each update's loss, samples, lr and the
    user's step metrics in one place, on the main process only, and pauses its clock
    during evaluations; a subclass writes a report in `_write_train` / `_write_eval`.
    ``log_steps``: None follows ``TrainingArguments.log_steps``."""

    def __init__(self, log_steps: Optional[int] = None) -> None:
        if log_steps is not None and (
            isinstance(log_steps, bool) or not isinstance(log_steps, int) or log_steps < 1
        ):
            raise ValueError(
                f"{type(self).__name__}: log_steps must be an integer >= 1, got {log_steps!r}"
            )
        self.log_steps = log_steps
        self._meter = IntervalMeter()
        self._user: dict[str, Any] = {}
        self._lr: Any = None
        self._main: Optional[bool] = None  # the rank's role, read once per train() call
        self._every: Optional[int] = None  # the interval, read once per train() call

    def _interval(self, trainer: Trainer) -> int:
        return self.log_steps if self.log_steps is not None else int(trainer.args.log_steps)

    def _report_train(self, trainer: Trainer) -> None:
        self._write_train(trainer)
        self._meter.reset()
        self._user.clear()

    @abc.abstractmethod
    def _write_train(self, trainer: Trainer) -> None:
        """Write one training report from ``_meter``, ``_lr`` and ``_user``."""

    @abc.abstractmethod
    def _write_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Write one evaluation report (main process only)."""

    def before_train(self, trainer: Trainer) -> None:
        self._meter.reset()
        self._user.clear()
        self._main = bool(trainer.is_main_process)
        self._every = self._interval(trainer)

    def after_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if not (self._main if self._main is not None else trainer.is_main_process):
            return
        self._meter.add(metrics)
        lr = None
        for key, value in metrics.items():
            if key not in RESERVED_STEP_KEYS:
                self._user[key] = value
            elif key == "lr":
                lr = value
        self._lr = lr
        every = self._every if self._every is not None else self._interval(trainer)
        # log_due, inline (no call per update)
        state = trainer.state
        step, last = state.global_step, state.max_steps
        if (step % every and (last is None or step < last)
                and not getattr(trainer.control, "should_log", False)):
            return
        self._report_train(trainer)

    def after_train(self, trainer: Trainer) -> None:
        # a run that ended off the log grid (epochs, early stop) still reports its tail
        if trainer.is_main_process and self._meter.steps > 0:
            self._report_train(trainer)

    def before_evaluate(self, trainer: Trainer) -> None:
        self._meter.pause()

    def after_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._meter.resume()
        if trainer.is_main_process:
            self._write_eval(trainer, metrics)


class LoggerHook(IntervalReportHook):
    """Logs training progress on the main process to the ``recframe`` logger.

    Args:
        log_steps: updates between lines; ``None`` uses ``trainer.args.log_steps``.
        loss_digits: decimals of the loss.

    Runs late (priority 100) so metrics that other hooks add to the step's metrics
    dict appear in the same line. User metrics are logged at their latest value;
    only scalars (numbers, one-element tensors) are logged. ``last_logged`` holds
    the values of the last training line, ``last_eval_logged`` of the last
    evaluation line.
    """

    priority = 100

    def __init__(self, log_steps: Optional[int] = None, loss_digits: int = 4) -> None:
        super().__init__(log_steps)
        self.loss_digits = loss_digits
        self.last_logged: dict[str, Any] = {}
        self.last_eval_logged: dict[str, Any] = {}

    def _write_train(self, trainer: Trainer) -> None:
        state = trainer.state
        values: dict[str, Any] = {"step": int(state.global_step), "epoch": update_epoch(state)}
        loss = self._meter.mean_loss()
        if loss is not None:
            values["loss"] = loss
        values["samples/s"] = self._meter.samples_per_sec()
        lr = scalar_value(self._lr) if self._lr is not None else None
        if lr is not None:
            values["lr"] = float(lr)
        for key, value in self._user.items():
            number = scalar_value(value)
            if number is not None:
                values[key] = number
        parts = []
        for key, value in values.items():
            if key == "loss":
                text = f"{value:.{self.loss_digits}f}" if math.isfinite(value) else str(value)
            elif key == "samples/s":
                text = f"{value:.1f}"
            else:
                text = format_value(value)
            parts.append(f"{key}={text}")
        logger.info(" ".join(parts))
        self.last_logged = values

    def _write_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        state = trainer.state
        values: dict[str, Any] = {"step": int(state.global_step), "epoch": update_epoch(state)}
        for key, value in metrics.items():
            number = scalar_value(value)
            if number is not None:
                values[key] = number
        line = " ".join(f"{k}={format_value(v)}" for k, v in values.items())
        logger.info("eval %s", line)
        self.last_eval_logged = values


__all__ = [
    "IntervalMeter", "IntervalReportHook", "LoggerHook", "format_value", "log_due",
    "scalar_value", "update_epoch",
]
