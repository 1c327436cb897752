"""`EarlyStoppingHook`: stop training when an eval metric stops improving."""

from __future__ import annotations

import logging
import math
import numbers
from typing import TYPE_CHECKING, Any, Optional

from recframe.hooks.base import Hook

if TYPE_CHECKING:
    from recframe.trainer import Trainer

logger = logging.getLogger("recframe")

MODES = ("min", "max")


class EarlyStoppingHook(Hook):
    """Sets ``trainer.control.should_stop`` after ``patience`` evaluations without
    an improvement of ``metric`` by more than ``min_delta``.

    Args:
        metric: key of the evaluation metrics to watch (``auc``, ``logloss``, ...).
        mode: ``max`` when larger is better, ``min`` when smaller is better.
        patience: evaluations without improvement tolerated before stopping.
        min_delta: the least change that counts as an improvement.

    A NaN value never counts as an improvement. The best value, its step and the
    count of evaluations without improvement are checkpointed through
    ``state_dict`` so a resumed run keeps its patience.
    """

    priority = 50

    def __init__(
        self, metric: str = "auc", mode: str = "max", patience: int = 3, min_delta: float = 0.0
    ) -> None:
        if not isinstance(metric, str) or not metric:
            raise ValueError(
                f"EarlyStoppingHook: metric must be a non-empty string, got {metric!r}"
            )
        if mode not in MODES:
            raise ValueError(f"EarlyStoppingHook: mode must be 'min' or 'max', got {mode!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(
                f"EarlyStoppingHook: patience must be an integer >= 1, got {patience!r}"
            )
        if (
            isinstance(min_delta, bool)
            or not isinstance(min_delta, numbers.Real)
            or not math.isfinite(min_delta)
            or min_delta < 0
        ):
            raise ValueError(
                f"EarlyStoppingHook: min_delta must be a finite number >= 0, got {min_delta!r}"
            )
        self.metric = metric
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.bad_evals = 0

    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def after_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.metric not in metrics:
            raise ValueError(
                f"EarlyStoppingHook: metric {self.metric!r} is not among the evaluation "
                f"metrics {sorted(metrics)}; pass one of them as metric="
            )
        value = float(metrics[self.metric])
        step = int(trainer.state.global_step)
        if self._improved(value):
            self.best = value
            self.best_step = step
            self.bad_evals = 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            trainer.control.should_stop = True
            if trainer.is_main_process:
                logger.info(
                    "early stopping at step %d: %s=%s did not improve on best %s (step %s) "
                    "by more than %g (mode=%s) for %d evaluation(s)",
                    step,
                    self.metric,
                    f"{value:.6g}",
                    "none" if self.best is None else f"{self.best:.6g}",
                    self.best_step,
                    self.min_delta,
                    self.mode,
                    self.bad_evals,
                )

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best = state.get("best")
        self.best = None if best is None else float(best)
        best_step = state.get("best_step")
        self.best_step = None if best_step is None else int(best_step)
        self.bad_evals = int(state.get("bad_evals", 0))


__all__ = ["EarlyStoppingHook"]
