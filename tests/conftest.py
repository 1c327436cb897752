"""Shared test helpers: a tiny CTR model with an embedding table and an MLP, and
dict batches that can be split into micro-batches."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)


class ToyCTR(nn.Module):
    """ids [B, 2] -> embedding bag; dense [B, 3]; label [B]; returns the BCE loss."""

    def __init__(self, num_embeddings: int = 64, dim: int = 4, sparse: bool = True) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(num_embeddings, dim, mode="sum", sparse=sparse)
        self.mlp = nn.Sequential(nn.Linear(dim + 3, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, batch: dict) -> torch.Tensor:
        pooled = self.emb(batch["ids"])
        logits = self.mlp(torch.cat([pooled, batch["dense"]], dim=1)).squeeze(1)
        from recframe.metrics import add_predictions

        add_predictions(logits, batch["label"])
        return nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])


def make_batches(n: int, batch_size: int, seed: int = 0, num_embeddings: int = 64) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, num_embeddings, (batch_size, 2), generator=g)
        dense = torch.randn(batch_size, 3, generator=g)
        label = ((dense[:, 0] + (ids[:, 0] % 2) * 1.5 - 0.7) > 0).float()
        out.append({"ids": ids, "dense": dense, "label": label})
    return out


def split_batches(batches: list[dict], parts: int) -> list[dict]:
    out = []
    for b in batches:
        chunks = {k: torch.chunk(v, parts) for k, v in b.items()}
        for i in range(parts):
            out.append({k: chunks[k][i] for k in b})
    return out


@pytest.fixture
def one_torch_thread():
    """torch on one intra-op thread for the test (``pytestmark =
    pytest.mark.usefixtures("one_torch_thread")``): tiny models only pay for threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="recframe")
    yield
