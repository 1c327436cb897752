"""`RunConfigHook`: the run's full configuration, saved beside its checkpoints.

``<output_dir>/run_config.json`` (strict JSON) says how the run was built, so a resume,
an export or a person reading the bucket later knows: every `TrainingArguments` field,
the model class and its parameter count, the optimizers and scheduler, the world size
and the versions of recframe, torch and torchrec, plus ``extra`` (e.g. the CLI's
``model:``/``data:`` sections). Written once per `Trainer`, at the first ``before_train``
(after the restore), on the main process, through the checkpoints' `Storage`, so an
``s3://`` output dir uses the same credentials. A restart whose configuration differs
keeps the previous file as ``run_config.step_<N>.json`` (N: the step it resumed at).
"""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING, Any, Optional

from recframe.checkpoint.storage import Storage
from recframe.hooks.base import Hook

if TYPE_CHECKING:
    from recframe.trainer import Trainer

logger = logging.getLogger("recframe")

RUN_CONFIG_FILE = "run_config.json"


def _strict(value: Any) -> Any:
    """``value`` as strict JSON: containers recursively, non-finite floats as null, other
    objects by ``str``."""
    if isinstance(value, dict):
        return {str(k): _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _qualname(obj: Any) -> Optional[str]:
    if obj is None:
        return None
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _attr(obj: Any, *names: str) -> Any:
    for name in names:
        obj = getattr(obj, name, None)
    return obj


def _num_parameters(model: Any) -> Optional[int]:
    """Parameter count (global sizes of sharded tables), None when a wrapper hides it."""
    try:
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:  # noqa: BLE001 - a record, not a check: leave the count out
        return None


def run_config(trainer: Trainer, extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The configuration record of ``trainer``'s run (a strict-JSON-able dict)."""
    import torch

    import recframe
    from recframe import distributed

    try:
        import torchrec

        torchrec_version = getattr(torchrec, "__version__", None)
    except ImportError:  # pragma: no cover - torchrec is a dependency
        torchrec_version = None
    model = getattr(trainer, "unwrapped_model", None)  # a stand-in trainer may lack parts
    record: dict[str, Any] = {
        "format": 1,
        "args": trainer.args.to_dict(),
        "model": None if model is None else {
            "class": _qualname(model),
            "parameters": _num_parameters(model),
        },
        "dense_optimizer": _qualname(_attr(trainer, "dense_optimizer", "optimizer")),
        "sparse_optimizer": _qualname(_attr(trainer, "sparse_optimizer", "optimizer")),
        "lr_scheduler": _qualname(_attr(trainer, "dense_lr_scheduler", "scheduler")),
        "world_size": distributed.get_world_size(),
        "started_at_step": int(trainer.state.global_step),
        "versions": {
            "recframe": getattr(recframe, "__version__", None),
            "torch": torch.__version__,
            "torchrec": torchrec_version,
        },
    }
    if extra:
        record["extra"] = dict(extra)
    return _strict(record)


def load_run_config(output_dir: str) -> Optional[dict[str, Any]]:
    """The ``run_config.json`` of a run's output dir, or None when it has none."""
    storage = Storage(output_dir)
    try:
        data = storage.read_bytes(storage.path(RUN_CONFIG_FILE))
    except FileNotFoundError:
        return None
    return json.loads(data)


class RunConfigHook(Hook):
    """Saves `run_config` to ``<output_dir>/run_config.json`` once, at the first train.

    Args:
        extra: more JSON-able configuration to record under ``"extra"``.
    """

    priority = 0

    def __init__(self, extra: Optional[dict[str, Any]] = None) -> None:
        self.extra: dict[str, Any] = dict(extra or {})
        self.saved_path: Optional[str] = None
        """Where the record was written (None until then, and off the main process)."""

    def before_train(self, trainer: Trainer) -> None:
        if self.saved_path is not None or not trainer.is_main_process:
            return
        record = run_config(trainer, self.extra)
        storage = Storage(trainer.args.output_dir)
        path = storage.path(RUN_CONFIG_FILE)
        try:
            previous = json.loads(storage.read_bytes(path))
        except FileNotFoundError:
            previous = None
        except ValueError:  # unreadable: keep it aside rather than lose it
            previous = {"unreadable": True}
        if previous is not None and _differs(previous, record):
            step = record["started_at_step"]
            keep = storage.path(f"run_config.step_{step}.json")
            storage.write_bytes_atomic(keep, storage.read_bytes(path))
            logger.info("the run configuration changed: the previous one is kept in %s",
                        storage.display(keep))
        storage.makedirs(storage.root)
        text = json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n"
        storage.write_bytes_atomic(path, text.encode())
        self.saved_path = path


_CONTINUATION_ARGS = ("train_steps", "train_epoch", "resume_training",
                      "resume_from_checkpoint", "overwrite_output_dir")
"""Arguments a continued run changes (a larger target, how to resume), not its build."""


def _differs(previous: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether two records describe differently built runs: the start step, the versions
    and the continuation arguments may differ between a run and its resume."""

    def build(r: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in r.items() if k not in ("started_at_step", "versions")}
        if isinstance(out.get("args"), dict):
            out["args"] = {k: v for k, v in out["args"].items()
                           if k not in _CONTINUATION_ARGS}
        return out

    return build(previous) != build(record)


__all__ = ["RUN_CONFIG_FILE", "RunConfigHook", "load_run_config", "run_config"]
