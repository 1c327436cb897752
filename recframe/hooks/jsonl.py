"""`JsonlLoggerHook`: training and evaluation metrics as JSON lines beside the checkpoints.

One strict-JSON object per line in ``<output_dir>/metrics.jsonl``::

    {"kind": "train", "step": 100, "epoch": 0, "loss": 0.51, "lr": 0.001, "samples_per_sec": ...}
    {"kind": "eval", "step": 100, "epoch": 0, "auc": 0.71, "ne": 0.93, ...}

``epoch`` is the pass the update belongs to, as in the log line and the progress bar.
Easy to read back with ``pandas.read_json(path, lines=True)``. The file is written
through fsspec (`AppendingFile`), so an ``s3://`` output dir uses the same credentials
and configuration as its checkpoints. A run resumed from a checkpoint first drops the
lines that the interrupted run wrote after that checkpoint, so each step appears once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import time
from typing import TYPE_CHECKING, Any, Optional

from recframe.checkpoint.storage import Storage, StorageError
from recframe.hooks.logger import IntervalReportHook, scalar_value, update_epoch

if TYPE_CHECKING:
    from recframe.trainer import Trainer

logger = logging.getLogger("recframe")


class AppendingFile:
    """A file that only grows, on a local disk or any fsspec store (s3://, gs://, memory://).

    ``write`` buffers; ``flush`` appends the buffer to the file (an object store rewrites
    the object: s3fs' append mode), so what was flushed is on storage even if the
    process dies. Failures raise `StorageError` naming the file.
    """

    def __init__(self, path: str) -> None:
        path = os.fspath(path)
        if "://" in path:
            parent, self.name = posixpath.split(path.rstrip("/"))
        else:
            parent, self.name = os.path.split(os.path.abspath(path))
        self.storage = Storage(parent)
        self.path = self.storage.path(self.name)
        self._buffer: list[bytes] = []
        self.closed = False
        self._dir_made = False

    def write(self, data: bytes) -> None:
        self._buffer.append(bytes(data))

    def flush(self) -> None:
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        try:
            if not self._dir_made:
                self.storage.makedirs(self.storage.root)
                self._dir_made = True
            if self.storage.is_local:
                with open(self.path, "ab") as f:
                    f.write(data)
            else:
                with self.storage.fs.open(self.storage.strip(self.path), "ab") as f:
                    f.write(data)
        except StorageError:
            raise
        except Exception as e:  # a remote client raises more than OSError
            raise StorageError(
                f"appending to {self.storage.display(self.path)} failed: {type(e).__name__}: {e}"
            ) from e
        self._buffer.clear()

    def close(self) -> None:
        self.flush()
        self.closed = True

    def read(self) -> Optional[bytes]:
        """The file's flushed contents, or None when it does not exist yet."""
        try:
            return self.storage.read_bytes(self.path)
        except FileNotFoundError:
            return None

    def replace(self, data: bytes) -> None:
        """Replace the whole file at once (drops anything buffered)."""
        self._buffer.clear()
        self.storage.makedirs(self.storage.root)
        self._dir_made = True
        self.storage.write_bytes_atomic(self.path, data)


def json_safe(value: Any) -> Any:
    """A strict-JSON value: scalars (tensors too) as numbers, NaN/inf as null."""
    number = scalar_value(value)
    if number is not None:
        if isinstance(number, float) and not math.isfinite(number):
            return None
        return number
    if value is None or isinstance(value, str):
        return value
    return str(value)


class JsonlLoggerHook(IntervalReportHook):
    """Appends one JSON line per ``log_steps`` updates and per evaluation (main process).

    Args:
        path: the file; ``None`` uses ``<trainer.args.output_dir>/metrics.jsonl``.
        log_steps: updates between training lines; ``None`` uses ``trainer.args.log_steps``.
    """

    priority = 100

    def __init__(self, path: Optional[str] = None, log_steps: Optional[int] = None) -> None:
        if path is not None and (not isinstance(path, (str, os.PathLike)) or not str(path)):
            raise ValueError(f"JsonlLoggerHook: path must be a non-empty path, got {path!r}")
        super().__init__(log_steps)
        self.path = None if path is None else os.fspath(path)
        self.file: Optional[AppendingFile] = None

    def _open(self, trainer: Trainer) -> None:
        if self.file is not None or not trainer.is_main_process:
            return
        path = self.path or trainer.args.output_dir.rstrip("/") + "/metrics.jsonl"
        self.file = AppendingFile(path)
        step = int(trainer.state.global_step)
        old = self.file.read()
        if old:
            # a run that died after its last checkpoint (or before its first) left lines
            # past it, perhaps a torn last one: drop them
            lines = old.splitlines(keepends=True)
            kept = [line for line in lines if line.endswith(b"\n") and _step_of(line) <= step]
            if len(kept) < len(lines):
                self.file.replace(b"".join(kept))

    def _append(self, record: dict[str, Any]) -> None:
        assert self.file is not None
        line = json.dumps({k: json_safe(v) for k, v in record.items()}, allow_nan=False)
        self.file.write(line.encode() + b"\n")
        self.file.flush()

    def before_train(self, trainer: Trainer) -> None:
        self._open(trainer)
        super().before_train(trainer)

    def _write_train(self, trainer: Trainer) -> None:
        self._open(trainer)
        record: dict[str, Any] = {"kind": "train", "step": int(trainer.state.global_step),
                                  "epoch": update_epoch(trainer.state)}
        loss = self._meter.mean_loss()
        if loss is not None:
            record["loss"] = loss
        if self._lr is not None:
            record["lr"] = self._lr
        record["samples_per_sec"] = self._meter.samples_per_sec()
        for key, value in self._user.items():
            if scalar_value(value) is not None:
                record[key] = value
        record["time"] = time.time()
        self._append(record)

    def _write_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._open(trainer)
        record: dict[str, Any] = {"kind": "eval", "step": int(trainer.state.global_step),
                                  "epoch": update_epoch(trainer.state)}
        record.update({k: v for k, v in metrics.items() if scalar_value(v) is not None})
        record["time"] = time.time()
        self._append(record)

    def end(self, trainer: Trainer) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _step_of(line: bytes) -> float:
    """The ``step`` of a metrics line; a line that is not one (torn, foreign) is kept."""
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return -math.inf
    return step if isinstance(step, (int, float)) else -math.inf


__all__ = ["AppendingFile", "JsonlLoggerHook", "json_safe"]
