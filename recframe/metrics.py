"""Metrics registry callable from model code, and the evaluation metrics.

``add_metric(name, value)`` (RecIS's global metrics) records a value that the trainer
adds to the current step's metrics. ``add_predictions(logits, labels)`` lets a model
hand its predictions to an active evaluation, which turns them into AUC and log loss;
outside an evaluation it costs one attribute check.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch

_local = threading.local()


def _store() -> dict[str, Any]:
    store = getattr(_local, "metrics", None)
    if store is None:
        store = _local.metrics = {}
    return store


def add_metric(name: str, value: Any) -> None:
    """Record ``value`` under ``name`` for the current step (later calls overwrite)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"add_metric: name must be a non-empty string, got {name!r}")
    _store()[name] = value.detach() if isinstance(value, torch.Tensor) else value


def get_global_metrics() -> dict[str, Any]:
    """The metrics recorded since the last `pop_global_metrics` (RecIS's name)."""
    return dict(_store())


def pop_global_metrics() -> dict[str, Any]:
    """Return and clear the recorded metrics (the trainer calls this once per step)."""
    store = _store()
    if not store:
        return {}
    values = dict(store)
    store.clear()
    return values


class PredictionCollector:
    """Gathers (logits, labels) during an evaluation; computes AUC and log loss."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.logits.append(logits.detach().reshape(-1).float().cpu())
        self.labels.append(labels.detach().reshape(-1).float().cpu())

    def __len__(self) -> int:
        return sum(t.numel() for t in self.labels)

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All logits and labels, from every rank when running distributed."""
        from recframe import distributed

        logits = torch.cat(self.logits) if self.logits else torch.empty(0)
        labels = torch.cat(self.labels) if self.labels else torch.empty(0)
        return distributed.all_gather_cat(logits), distributed.all_gather_cat(labels)

    def compute(self) -> dict[str, float]:
        """AUC (torchmetrics BinaryAUROC, exact) and log loss over all samples."""
        logits, labels = self.gathered()
        if labels.numel() == 0:
            return {}
        from torchmetrics.functional.classification import binary_auroc

        probs = torch.sigmoid(logits.double())
        results = {
            "logloss": float(
                torch.nn.functional.binary_cross_entropy_with_logits(
                    logits.double(), labels.double()
                )
            ),
            "num_samples": float(labels.numel()),
        }
        if 0 < labels.sum() < labels.numel():
            results["auc"] = float(binary_auroc(probs, labels.long(), thresholds=None))
        return results


def add_predictions(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Hand predictions to the active evaluation (no-op when none is running)."""
    collector: Optional[PredictionCollector] = getattr(_local, "collector", None)
    if collector is not None:
        collector.update(logits, labels)


@contextmanager
def collect_predictions() -> Iterator[PredictionCollector]:
    """Collect `add_predictions` calls made inside the block."""
    previous = getattr(_local, "collector", None)
    collector = _local.collector = PredictionCollector()
    try:
        yield collector
    finally:
        _local.collector = previous
