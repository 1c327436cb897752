"""`TensorBoardHook`: training and evaluation scalars as TensorBoard event files.

Written on the main process only, through fsspec (`EventFile`), so an ``s3://`` (or any
fsspec) output dir works with the same credentials and configuration as the checkpoints;
TensorBoard's own S3 client does not read them. Scalars, all at ``state.global_step``:

* ``train/loss`` (mean over the interval), ``train/lr``, ``train/samples_per_sec``
* ``train/<name>`` for every scalar user metric (latest value)
* ``eval/<name>`` for every evaluation metric (``eval/auc``, ``eval/ne``, ...)

One event file per run: a later ``train`` call or a resumed run appends to the log
dir's recframe event file rather than starting a new one. Each open records the run's
configuration: every `TrainingArguments` field as hparams (TensorBoard's HPARAMS tab)
and the full `run_config` as text (TEXT tab, tag ``run_config``). The file is flushed
after each batch of scalars, after training and after each evaluation, and closed at
``end``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any, Optional

from recframe.checkpoint.storage import Storage
from recframe.hooks.jsonl import AppendingFile
from recframe.hooks.logger import IntervalReportHook, scalar_value

if TYPE_CHECKING:
    from recframe.trainer import Trainer

logger = logging.getLogger("recframe")

EVENT_FILE_PREFIX = "events.out.tfevents."
EVENT_FILE_SUFFIX = ".recframe"
HPARAM_METRICS = ("eval/loss", "eval/auc", "eval/gauc", "eval/ne", "eval/logloss",
                  "eval/calibration")
"""Scalar tags the HPARAMS tab shows next to each run's hyperparameters."""


class EventFile:
    """The recframe event file of ``log_dir``: created once, appended to afterwards.

    Args:
        log_dir: a local directory or fsspec URL.
        purge_step: when appending, events at steps >= this one that are already in the
            file are dropped by TensorBoard (a resumed run rewrites the steps that the
            interrupted run logged after its last checkpoint).
    """

    def __init__(self, log_dir: str, purge_step: Optional[int] = None) -> None:
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.record_writer import RecordWriter

        storage = Storage(log_dir)
        existing = sorted(
            name for name in storage.listdir(storage.root)
            if name.startswith(EVENT_FILE_PREFIX) and name.endswith(EVENT_FILE_SUFFIX)
        )
        name = existing[-1] if existing else (
            f"{EVENT_FILE_PREFIX}{int(time.time()):010d}{EVENT_FILE_SUFFIX}"
        )
        self.path = storage.path(name)
        self._file = AppendingFile(self.path)
        self._records = RecordWriter(self._file)
        if not existing:
            self._write(Event(wall_time=time.time(), step=0, file_version="brain.Event:2"))
        elif purge_step is not None:
            self._write(Event(wall_time=time.time(), step=purge_step,
                              session_log=SessionLog(status=SessionLog.START)))

    def _write(self, event: Any) -> None:
        self._records.write(event.SerializeToString())

    def add_summary(self, summary: Any, step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event

        self._write(Event(wall_time=time.time(), step=int(step), summary=summary))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from torch.utils.tensorboard.summary import scalar

        self.add_summary(scalar(tag, float(value)), step)

    def add_run_config(self, config: dict[str, Any], step: int) -> None:
        """The configuration as hparams (its ``args``) and as JSON text."""
        from torch.utils.tensorboard.summary import hparams, text

        hparam_dict = {
            key: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for key, value in config.get("args", {}).items()
        }
        experiment, start, _ = hparams(hparam_dict, dict.fromkeys(HPARAM_METRICS, 0.0))
        self.add_summary(experiment, step)
        self.add_summary(start, step)
        body = json.dumps(config, indent=2, sort_keys=True)
        self.add_summary(text("run_config", "    " + body.replace("\n", "\n    ")), step)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardHook(IntervalReportHook):
    """Writes scalars to TensorBoard event files under ``log_dir``.

    Args:
        log_dir: event directory; ``None`` uses ``trainer.args.resolved_logging_dir``.
        log_steps: updates between training scalars; ``None`` uses
            ``trainer.args.log_steps``.

    When training resumes from a checkpoint, events of later steps left by the
    interrupted run are purged so the curves do not double back.
    """

    priority = 100

    def __init__(self, log_dir: Optional[str] = None, log_steps: Optional[int] = None) -> None:
        if log_dir is not None and (not isinstance(log_dir, str) or not log_dir.strip()):
            raise ValueError(
                f"TensorBoardHook: log_dir must be a non-empty string, got {log_dir!r}"
            )
        super().__init__(log_steps)
        self.log_dir = log_dir
        self.writer: Optional[EventFile] = None
        self.resolved_log_dir: Optional[str] = None
        """Directory of the open (or last opened) writer."""

    # --- writer lifecycle ----------------------------------------------------------
    def _open(self, trainer: Trainer) -> None:
        if self.writer is not None or not trainer.is_main_process:
            return
        from recframe.hooks.run_config import run_config

        log_dir = self.log_dir or trainer.args.resolved_logging_dir
        step = int(trainer.state.global_step)
        # purge_step drops events at steps > step written by a run that died after its
        # last checkpoint (or before its first); step itself was logged before that
        # checkpoint.
        self.writer = EventFile(log_dir, purge_step=step + 1)
        self.writer.add_run_config(run_config(trainer), step)
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
        super().before_train(trainer)

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
        self._flush()

    def after_train(self, trainer: Trainer) -> None:
        super().after_train(trainer)
        self._flush()

    def before_evaluate(self, trainer: Trainer) -> None:
        self._open(trainer)
        super().before_evaluate(trainer)

    def _write_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
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


__all__ = ["EventFile", "TensorBoardHook"]
