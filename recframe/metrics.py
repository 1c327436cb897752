"""Metrics registry callable from model code, and the evaluation metrics.

``add_metric(name, value)`` (RecIS's global metrics) records a value that the trainer
adds to the current step's metrics. ``add_predictions(logits, labels, groups=None)``
lets a model hand its predictions to an active evaluation, which turns them into log
loss, normalized entropy, calibration, AUC and (with a group id such as the user per
sample) grouped AUC; outside an evaluation it costs one attribute check.

Grouped AUC needs a group id per sample. A model can pass ``groups`` itself; a model
that does not (the built-in DLRM and DeepFM) gets them from a feature of its input with
`group_predictions_by` (``recframe train --gauc_feature user_id``).
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
    store = getattr(_local, "metrics", None)  # not _store(): a call less per update
    if not store:
        return {}
    values = dict(store)
    store.clear()
    return values


class PredictionCollector:
    """Gathers (logits, labels[, groups]) during an evaluation and computes the metrics.

    ``compute()`` gives ``logloss``, ``ne`` (normalized entropy), ``calibration``
    (predicted CTR / observed CTR), ``auc`` and, when every ``add_predictions`` call
    passed ``groups``, ``gauc`` (grouped AUC) and ``gauc_groups``.
    """

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.groups: list[torch.Tensor] = []
        self._ungrouped = 0  # calls without groups: GAUC is then not computed
        self.pending_groups: Optional[torch.Tensor] = None  # from `group_predictions_by`

    def update(
        self, logits: torch.Tensor, labels: torch.Tensor, groups: Optional[torch.Tensor] = None
    ) -> None:
        logits = logits.detach().reshape(-1).float().cpu()
        labels = labels.detach().reshape(-1).float().cpu()
        if logits.numel() != labels.numel():
            raise ValueError(
                f"add_predictions: {logits.numel()} logits but {labels.numel()} labels; "
                "pass one logit per label"
            )
        if groups is None and self.pending_groups is not None:
            groups, self.pending_groups = self.pending_groups, None
        if groups is None:
            self._ungrouped += 1
        else:
            groups = torch.as_tensor(groups).detach().reshape(-1).cpu()
            if groups.numel() != labels.numel() or groups.is_floating_point():
                raise ValueError(
                    f"add_predictions(groups=...): need one integer group id (e.g. the user "
                    f"id) per sample; got {groups.numel()} {groups.dtype} values for "
                    f"{labels.numel()} labels"
                )
            self.groups.append(groups.long())
        self.logits.append(logits)
        self.labels.append(labels)

    def __len__(self) -> int:
        return sum(t.numel() for t in self.labels)

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All logits and labels, from every rank when running distributed."""
        from recframe import distributed

        logits = torch.cat(self.logits) if self.logits else torch.empty(0)
        labels = torch.cat(self.labels) if self.labels else torch.empty(0)
        return distributed.all_gather_cat(logits), distributed.all_gather_cat(labels)

    def gathered_groups(self) -> Optional[torch.Tensor]:
        """All group ids (every rank), or None when some rank had a call without them."""
        from recframe import distributed

        if distributed.all_reduce_sum(float(self._ungrouped)) > 0:
            return None
        local = torch.cat(self.groups) if self.groups else torch.empty(0, dtype=torch.long)
        return distributed.all_gather_cat(local)

    def compute(self) -> dict[str, float]:
        """The metrics over all samples of all ranks (see the class docstring)."""
        logits, labels = self.gathered()
        groups = self.gathered_groups()
        if labels.numel() == 0:
            return {}
        return binary_metrics(logits, labels, groups)


def binary_metrics(
    logits: torch.Tensor, labels: torch.Tensor, groups: Optional[torch.Tensor] = None
) -> dict[str, float]:
    """CTR metrics of ``logits`` against 0/1 ``labels`` (1-D tensors of one length).

    * ``logloss``: mean binary cross-entropy (natural log).
    * ``ne``: normalized entropy, the cross-entropy divided by that of always predicting
      the observed CTR (torchrec's ``compute_ne``; < 1 beats the base rate).
    * ``calibration``: sum of predicted probabilities / number of positives
      (torchrec's ``compute_calibration``; 1 is calibrated, 0 when there is no positive).
    * ``auc``: exact ROC AUC (torchmetrics ``binary_auroc``), when both classes occur.
    * ``gauc`` with ``groups`` (a group id, e.g. the user, per sample): see `grouped_auc`.
    """
    from torchmetrics.functional.classification import binary_auroc
    from torchrec.metrics.calibration import compute_calibration, get_calibration_states
    from torchrec.metrics.ne import compute_ne, get_ne_states

    logits, labels = logits.double(), labels.double()
    probs = torch.sigmoid(logits)
    results = {
        "logloss": float(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)),
        "num_samples": float(labels.numel()),
    }
    weights = torch.ones_like(labels)
    ne = get_ne_states(labels, probs, weights, eta=1e-12)
    results["ne"] = float(compute_ne(
        ne["cross_entropy_sum"], ne["weighted_num_samples"], ne["pos_labels"],
        ne["neg_labels"], eta=1e-12,
    ))
    cal = get_calibration_states(labels, probs, weights)
    results["calibration"] = float(
        compute_calibration(cal["calibration_num"], cal["calibration_denom"])
    )
    if 0 < labels.sum() < labels.numel():
        results["auc"] = float(binary_auroc(probs, labels.long(), thresholds=None))
    if groups is not None:
        gauc, counted = grouped_auc(logits, labels, groups)
        if counted:
            results["gauc"] = gauc
        results["gauc_groups"] = float(counted)
    return results


def grouped_auc(
    scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor
) -> tuple[float, int]:
    """Grouped AUC: each group's ROC AUC, averaged with the group's sample count as weight
    (GAUC of the DIN paper, Zhou et al. 2018), over the groups that hold both classes.

    Returns ``(gauc, number of groups counted)``; ``(nan, 0)`` when no group has both.
    Ties score 1/2 (rank-sum AUC with average ranks). Vectorised in O(n log n) over all
    groups at once; torchrec's ``compute_gauc_3d`` pads every group to the longest one
    (memory groups x longest group), which an eval set with heavy users cannot afford.
    """
    scores, labels = scores.reshape(-1).double(), labels.reshape(-1).double()
    _, gid = torch.unique(groups.reshape(-1), return_inverse=True)
    order = torch.argsort(scores, stable=True)
    order = order[torch.argsort(gid[order], stable=True)]  # by group, then by score
    g, s, y = gid[order], scores[order], labels[order]
    n = g.numel()
    counts = torch.bincount(g).double()
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, dtype=torch.float64) - starts[g] + 1  # 1-based, within group
    new_run = torch.ones(n, dtype=torch.bool)
    new_run[1:] = (g[1:] != g[:-1]) | (s[1:] != s[:-1])
    run = torch.cumsum(new_run.long(), 0) - 1  # ties share a run: their mean rank
    run_sum = torch.zeros(int(run[-1]) + 1, dtype=torch.float64).index_add_(0, run, rank)
    run_len = torch.bincount(run).double()
    avg_rank = (run_sum / run_len)[run]
    groups_n = counts.numel()
    pos = torch.zeros(groups_n, dtype=torch.float64).index_add_(0, g, y)
    pos_rank = torch.zeros(groups_n, dtype=torch.float64).index_add_(0, g, avg_rank * y)
    neg = counts - pos
    valid = (pos > 0) & (neg > 0)
    if not bool(valid.any()):
        return float("nan"), 0
    auc = (pos_rank[valid] - pos[valid] * (pos[valid] + 1) / 2) / (pos[valid] * neg[valid])
    weight = counts[valid]
    return float((auc * weight).sum() / weight.sum()), int(valid.sum())


def add_predictions(
    logits: torch.Tensor, labels: torch.Tensor, groups: Optional[torch.Tensor] = None
) -> None:
    """Hand predictions to the active evaluation (no-op when none is running).

    ``groups``: an integer group id per sample (e.g. ``batch["user_id"]``) for the grouped
    AUC (``gauc``); give it in every call of the evaluation, or in none.
    """
    collector: Optional[PredictionCollector] = getattr(_local, "collector", None)
    if collector is not None:
        collector.update(logits, labels, groups)


def groups_of(batch: Any, feature: str) -> torch.Tensor:
    """One group id per sample from ``feature`` of ``batch``: the first id of a torchrec
    ``Batch``'s (or a ``KeyedJaggedTensor``'s) sparse feature, -1 for a sample without
    one; or a dict batch's ``batch[feature]`` (one value, or its first column, per sample)."""
    kjt = getattr(batch, "sparse_features", batch)
    if hasattr(kjt, "keys") and hasattr(kjt, "to_dict") and not isinstance(kjt, dict):
        if feature not in kjt.keys():
            raise ValueError(f"gauc group feature {feature!r} is not a sparse feature of the "
                             f"batch; its features: {list(kjt.keys())}")
        jagged = kjt[feature]
        lengths = jagged.lengths().long()
        offsets = torch.cumsum(lengths, 0) - lengths
        values = jagged.values().long()
        first = values[offsets.clamp(max=max(values.numel() - 1, 0))] if values.numel() else (
            torch.zeros_like(lengths))
        return torch.where(lengths > 0, first, torch.full_like(first, -1))
    if isinstance(batch, dict):
        if feature not in batch:
            raise ValueError(f"gauc group feature {feature!r} is not a key of the batch; its "
                             f"keys: {list(batch)}")
        value = torch.as_tensor(batch[feature])
        return value[:, 0] if value.dim() == 2 else value.reshape(-1)
    raise ValueError(f"gauc group feature {feature!r}: cannot read features from a "
                     f"{type(batch).__name__} batch; pass add_predictions(..., groups=...)")


def group_predictions_by(model: torch.nn.Module, feature: str) -> Any:
    """Compute grouped AUC (``gauc``) for ``model``'s evaluations, grouping samples by
    ``feature`` of its input (e.g. the user id column): the groups of each batch go with
    the model's next ``add_predictions`` call. Returns the hook handle (``.remove()``)."""
    if not isinstance(feature, str) or not feature:
        raise ValueError(f"group_predictions_by: feature must be a feature name, got {feature!r}")

    def remember_groups(module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        collector: Optional[PredictionCollector] = getattr(_local, "collector", None)
        if collector is not None and inputs:
            collector.pending_groups = groups_of(inputs[0], feature)

    return model.register_forward_pre_hook(remember_groups)


@contextmanager
def collect_predictions() -> Iterator[PredictionCollector]:
    """Collect `add_predictions` calls made inside the block."""
    previous = getattr(_local, "collector", None)
    collector = _local.collector = PredictionCollector()
    try:
        yield collector
    finally:
        _local.collector = previous
