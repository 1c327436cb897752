"""`TensorBoardHook`: training and evaluation scalars as TensorBoard event files.

Written with ``torch.utils.tensorboard.SummaryWriter`` on the main process only.
Scalars, all at ``state.global_step``:

* ``train/loss`` (mean over the interval), ``train/lr``, ``train/samples_per_sec``
* ``train/<name>`` for every scalar user metric (latest value)
* ``eval/<name>`` for every evaluation metric

The writer opens lazily (first ``before_train``/``before_evaluate``), flushes after
training and after each evaluation, and closes at ``end``; a later ``train`` call
opens a new event file in the same directory.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

from recframe.hooks.base import Hook
from recframe.hooks.logger import RESERVED_STEP_KEYS, IntervalMeter, log_due, scalar_value

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from recframe.trainer import Trainer

logger = logging.getLogger("recframe")


class TensorBoardHook(Hook):
    """Writes scalars to TensorBoard event files under ``log_dir``.

    Args:
        log_dir: event directory; ``None`` uses ``trainer.args.resolved_logging_dir``.
        log_steps: updates between training scalars; ``None`` uses
            ``trainer.args.log_steps``.

    When training resumes from a checkpoint (``global_step > 0`` at the first
    open), events of later steps left by the interrupted run are purged so the
    curves do not double back.
    """

    priority = 100

    def __init__(self, log_dir: Optional[str] = None, log_steps: Optional[int] = None) -> None:
        if log_dir is not None and (not isinstance(log_dir, str) or not log_dir.strip()):
            raise ValueError(
                f"TensorBoardHook: log_dir must be a non-empty string, got {log_dir!r}"
            )
        if log_steps is not None and (
            isinstance(log_steps, bool) or not isinstance(log_steps, int) or log_steps < 1
        ):
            raise ValueError(
                f"TensorBoardHook: log_steps must be an integer >= 1, got {log_steps!r}"
            )
        self.log_dir = log_dir
        self.log_steps = log_steps
        self.writer: Optional[SummaryWriter] = None
        self.resolved_log_dir: Optional[str] = None
        """Directory of the open (or last opened) writer."""
        self._meter = IntervalMeter()
        self._user: dict[str, Any] = {}
        self._lr: Any = None

    # --- writer lifecycle ----------------------------------------------------------
    def _open(self, trainer: Trainer) -> None:
        if self.writer is not None or not trainer.is_main_process:
            return
        from torch.utils.tensorboard import SummaryWriter

        log_dir = self.log_dir or trainer.args.resolved_logging_dir
        step = int(trainer.state.global_step)
        # purge_step drops events at steps >= it written by a run that died after
        # its last checkpoint; step itself was logged before that checkpoint.
        purge_step = step + 1 if step > 0 else None
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)
        self.resolved_log_dir = log_dir

    def _flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # --- events --------------------------------------------------------------------
    def before_train(self, trainer: Trainer) -> None:
        self._open(trainer)
        self._meter.reset()
        self._user.clear()

    def after_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if not trainer.is_main_process:
            return
        self._meter.add(metrics)
        for key, value in metrics.items():
            if key not in RESERVED_STEP_KEYS:
                self._user[key] = value
        self._lr = metrics.get("lr")
        interval = self.log_steps if self.log_steps is not None else int(trainer.args.log_steps)
        if log_due(trainer, interval):
            self._write_train(trainer)

    def _write_train(self, trainer: Trainer) -> None:
        self._open(trainer)
        assert self.writer is not None
        step = int(trainer.state.global_step)
        loss = self._meter.mean_loss()
        if loss is not None:
            self.writer.add_scalar("train/loss", loss, step)
        lr = scalar_value(self._lr) if self._lr is not None else None
        if lr is not None:
            self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/samples_per_sec", self._meter.samples_per_sec(), step)
        for key, value in self._user.items():
            number = scalar_value(value)
            if number is not None:
                self.writer.add_scalar(f"train/{key}", number, step)
        self._meter.reset()
        self._user.clear()

    def after_train(self, trainer: Trainer) -> None:
        if trainer.is_main_process and self._meter.steps > 0:
            self._write_train(trainer)
        self._flush()

    def before_evaluate(self, trainer: Trainer) -> None:
        self._open(trainer)
        self._meter.pause()

    def after_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._meter.resume()
        if not trainer.is_main_process:
            return
        self._open(trainer)
        assert self.writer is not None
        step = int(trainer.state.global_step)
        for key, value in metrics.items():
            number = scalar_value(value)
            if number is not None:
                self.writer.add_scalar(f"eval/{key}", number, step)
        self._flush()

    def end(self, trainer: Trainer) -> None:
        self._flush()
        self._close()


__all__ = ["TensorBoardHook"]
