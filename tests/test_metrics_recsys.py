"""Recsys evaluation metrics: normalized entropy, calibration and grouped AUC, checked
against hand computations, through `add_predictions` and `Trainer.evaluate`."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_batches
from torch import nn

from recframe import Trainer, TrainingArguments
from recframe.metrics import (
    PredictionCollector,
    add_predictions,
    binary_metrics,
    collect_predictions,
    grouped_auc,
)


def _logit(p: list[float]) -> torch.Tensor:
    t = torch.tensor(p, dtype=torch.float64)
    return torch.log(t / (1 - t))


PROBS = [0.9, 0.2, 0.4, 0.6, 0.7, 0.3, 0.1, 0.5, 0.5]
LABELS = [1.0, 0, 0, 1, 0, 0, 0, 1, 0]
GROUPS = [7, 7, 7, 3, 3, 3, 5, 9, 9]
# by hand: group 7 -> its positive (0.9) beats both negatives: AUC 1; group 3 -> 0.6
# beats 0.3, not 0.7: AUC 1/2; group 5 has no positive: not counted; group 9 -> a tie:
# AUC 1/2. Weighted by group size: (3*1 + 3*0.5 + 2*0.5) / 8.
GAUC = (3 * 1.0 + 3 * 0.5 + 2 * 0.5) / 8


def test_binary_metrics_match_hand_computation():
    results = binary_metrics(_logit(PROBS), torch.tensor(LABELS), torch.tensor(GROUPS))
    n, positives = len(LABELS), sum(LABELS)
    ce = -sum(math.log(p) if y else math.log(1 - p) for p, y in zip(PROBS, LABELS)) / n
    ctr = positives / n
    base = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
    assert results["logloss"] == pytest.approx(ce, rel=1e-9)
    assert results["ne"] == pytest.approx(ce / base, rel=1e-9)
    assert results["calibration"] == pytest.approx(sum(PROBS) / positives, rel=1e-9)
    assert results["gauc"] == pytest.approx(GAUC, rel=1e-12)
    assert results["gauc_groups"] == 3
    # plain AUC by counting pairs (ties 1/2)
    pairs = [(p, q) for p, y in zip(PROBS, LABELS) if y for q, z in zip(PROBS, LABELS) if not z]
    auc = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs) / len(pairs)
    assert results["auc"] == pytest.approx(auc, rel=1e-6)  # torchmetrics: float32
    assert results["num_samples"] == n


def test_grouped_auc_ignores_sample_order_and_group_id_values():
    perm = torch.randperm(len(LABELS), generator=torch.Generator().manual_seed(3))
    scores, labels = _logit(PROBS)[perm], torch.tensor(LABELS)[perm]
    groups = (torch.tensor(GROUPS) * 1_000_003 - 5)[perm]  # sparse, negative, large ids
    gauc, counted = grouped_auc(scores, labels, groups)
    assert gauc == pytest.approx(GAUC, rel=1e-12) and counted == 3


def test_grouped_auc_with_no_mixed_group():
    gauc, counted = grouped_auc(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 0.0]),
                                torch.tensor([1, 2]))
    assert counted == 0 and math.isnan(gauc)
    results = binary_metrics(torch.tensor([0.1, 0.2]), torch.tensor([1.0, 0.0]),
                             torch.tensor([1, 2]))
    assert "gauc" not in results and results["gauc_groups"] == 0


def test_collector_gauc_only_when_every_call_has_groups():
    with collect_predictions() as collector:
        add_predictions(_logit(PROBS[:4]), torch.tensor(LABELS[:4]), torch.tensor(GROUPS[:4]))
        add_predictions(_logit(PROBS[4:]), torch.tensor(LABELS[4:]), torch.tensor(GROUPS[4:]))
    assert collector.compute()["gauc"] == pytest.approx(GAUC)
    with collect_predictions() as collector:
        add_predictions(_logit(PROBS[:4]), torch.tensor(LABELS[:4]), torch.tensor(GROUPS[:4]))
        add_predictions(_logit(PROBS[4:]), torch.tensor(LABELS[4:]))
    results = collector.compute()
    assert "gauc" not in results and "gauc_groups" not in results and "ne" in results


def test_bad_groups_are_named():
    collector = PredictionCollector()
    with pytest.raises(ValueError, match="one integer group id"):
        collector.update(torch.zeros(3), torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="one integer group id"):
        collector.update(torch.zeros(3), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="3 logits but 2 labels"):
        collector.update(torch.zeros(3), torch.zeros(2))


class UserCTR(nn.Module):
    """A model whose batches carry a user id, handed to the evaluation as the group."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(64, 4, mode="sum", sparse=True)
        self.mlp = nn.Linear(7, 1)

    def forward(self, batch: dict) -> torch.Tensor:
        logits = self.mlp(torch.cat([self.emb(batch["ids"]), batch["dense"]], 1)).squeeze(1)
        add_predictions(logits, batch["label"], groups=batch["user_id"])
        return nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])


def test_evaluate_reports_ne_calibration_and_gauc(tmp_path, caplog):
    batches = make_batches(4, 16, seed=1)
    for i, b in enumerate(batches):
        b["user_id"] = (torch.arange(16) + i) % 5  # users spread over the batches
    model = UserCTR()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", disable_tqdm=True)
    trainer = Trainer(model, args, eval_dataset=batches)
    results = trainer.evaluate()
    with torch.no_grad():
        logits = torch.cat([model.mlp(torch.cat([model.emb(b["ids"]), b["dense"]], 1))
                            .squeeze(1) for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    users = torch.cat([b["user_id"] for b in batches])
    expected = binary_metrics(logits, labels, users)
    for key in ("ne", "calibration", "auc", "gauc", "gauc_groups", "logloss"):
        assert results[key] == pytest.approx(expected[key], rel=1e-6), key
    # the per-user AUCs, weighted by the user's sample count, by a plain loop
    total = weight = 0.0
    for user in users.unique():
        mask = users == user
        s, y = logits[mask].tolist(), labels[mask].tolist()
        pos = [a for a, t in zip(s, y) if t]
        neg = [a for a, t in zip(s, y) if not t]
        if pos and neg:
            wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
            total += len(s) * wins / (len(pos) * len(neg))
            weight += len(s)
    assert results["gauc"] == pytest.approx(total / weight, rel=1e-6)
    assert trainer.state.last_eval["ne"] == results["ne"]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("eval "))
    for key in ("ne=", "calibration=", "gauc=", "gauc_groups=5", "auc="):
        assert key in line, (key, line)
