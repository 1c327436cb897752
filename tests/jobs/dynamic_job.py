"""A 2-rank job for tests/test_dynamic_ranks.py: a DLRM with a dynamic table, sharded
row-wise by torchrec (fused RowWiseAdagrad), trained on different data per rank with
the `DynamicEmbeddingHook` and checkpointed. Each rank dumps (numpy .npz, no pickle)
its replicated map and its local shards of the dynamic table and of its fused
optimizer state.

With ``incremental``: a checkpoint every step, incremental (one full, then deltas);
after training, every rank restores the delta chain into a fresh model and dumps
that too (``restored-r<rank>.npz``), for the test to compare bit for bit.

usage: dynamic_job.py OUT_DIR CKPT_DIR [incremental] (RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the env)
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import torch
from torch import nn

STEPS = 6
BATCH = 8


def schema() -> Any:
    from recframe.schema import FeatureSchema

    return FeatureSchema.from_dict({
        "labels": ["y"], "dense": ["x0", "x1"],
        "sparse": [{"name": "user", "mapping": {"kind": "dynamic", "dynamic": {
            "fallback_rows": 4, "eviction": "lru", "eviction_interval": 2,
            "evict_fraction": 0.25}}}, {"name": "item"}],
        "tables": [{"name": "user", "num_embeddings": 24, "embedding_dim": 4},
                   {"name": "item", "num_embeddings": 16, "embedding_dim": 4}],
    })


def batches(rank: int, n: int = STEPS) -> list[Any]:
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for i in range(n):  # each rank its own id range: the map must hold both
        users = torch.randint(0, 12, (BATCH,), generator=g) + 10**12 + 1000 * rank + 3 * i
        items = torch.randint(0, 16, (BATCH,), generator=g)
        dense = torch.randn(BATCH, 2, generator=g)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            ["user", "item"], torch.cat([users, items]), torch.ones(2 * BATCH, dtype=torch.int32))
        out.append(Batch(dense_features=dense, sparse_features=kjt,
                         labels=(dense[:, 0] > 0).float()))
    return out


def build(ckpt: str, steps: int, rank: int, incremental: bool = False, seed: int = 0
          ) -> tuple[Any, Any, Any]:
    from recframe import Trainer, TrainingArguments
    from recframe.hooks import DynamicEmbeddingHook
    from recframe.models import DLRM
    from recframe.optim import dense_parameters
    from recframe.optim.fused import shard_model

    torch.manual_seed(seed)
    model = DLRM(schema=schema(), dense_arch=(8, 4), over_arch=(8, 1))
    dmp, sparse = shard_model(model, optimizer="rowwise_adagrad", lr=0.05, sharding="row_wise")
    saving = (dict(save_steps=1, incremental_checkpoints=True, full_checkpoint_every=100)
              if incremental else dict(save_steps=2))
    trainer = Trainer(
        dmp, TrainingArguments(output_dir=ckpt, train_steps=steps, report_to="none",
                               disable_tqdm=True, log_steps=1000, **saving),
        train_dataset=batches(rank), hooks=[DynamicEmbeddingHook()],
        dense_optimizers=(torch.optim.Adam(dense_parameters(dmp), lr=0.01), None),
        sparse_optimizer=sparse)
    return model, dmp, trainer


def dump(model: nn.Module, dmp: nn.Module, sparse: Any = None) -> dict[str, np.ndarray]:
    """The map's tensors, the user table's local shards as ``weight|row_offset`` and,
    given the fused optimizer ``sparse``, its row-wise state's as ``momentum|row_offset``."""
    out = {f"map.{k}": v.numpy() for k, v in model.dynamic.maps["user"].state_dict().items()}
    state = dmp.state_dict()
    key = next(k for k in state if k.endswith("embedding_bags.user.weight"))
    values = {"weight": state[key]}
    if sparse is not None:
        values["momentum"] = sparse.state_dict()["state"][key]["user.momentum1"]
    for name, value in values.items():
        for shard in getattr(value, "local_shards", lambda: [])():
            offset = int(shard.metadata.shard_offsets[0])
            out[f"{name}|{offset}"] = shard.tensor.detach().clone().numpy()
        if not hasattr(value, "local_shards"):
            out[f"{name}|0"] = value.detach().clone().numpy()
    return out


def main() -> None:
    from recframe import distributed

    out, ckpt = sys.argv[1], sys.argv[2]
    incremental = sys.argv[3:] == ["incremental"]
    distributed.init_default_group()
    rank = distributed.get_rank()
    model, dmp, trainer = build(ckpt, STEPS, rank, incremental)
    trainer.train()
    np.savez(f"{out}/r{rank}.npz", **dump(model, dmp, trainer.sparse_optimizer.optimizer))
    if incremental:  # every rank restores the chain (full + deltas) into a fresh model
        model2, dmp2, trainer2 = build(ckpt, STEPS, rank, incremental, seed=1)
        if trainer2.restore() != STEPS:
            raise SystemExit(f"rank {rank}: restore did not reach step {STEPS}")
        np.savez(f"{out}/restored-r{rank}.npz",
                 **dump(model2, dmp2, trainer2.sparse_optimizer.optimizer))
    with open(f"{out}/result-r{rank}.json", "w") as f:
        json.dump({"step": trainer.state.global_step,
                   "ids": sorted(set(torch.cat([b.sparse_features.values()[:BATCH]
                                                for b in batches(rank)]).tolist()))}, f)
    from dist_job import leave_group

    leave_group(out, rank)  # rank 0 (the store's host) leaves last


if __name__ == "__main__":
    main()
