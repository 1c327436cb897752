"""Train DLRM (fused sharded tables) on Parquet or TSV files through `recframe.readers`
at the world size torchrun's variables give (none: one process), resuming from the
latest checkpoint in OUT/ckpt, for the re-split test of tests/test_attack_issue13.py.

usage: data_resplit_job.py OUT DATA FORMAT TAG [--steps N]

Without --steps the job trains to the end of the first epoch. Each rank writes
``TAG-r<rank>.json``: the samples it trained (label and dense values) in epoch 0, the
step and epoch it resumed at and reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_job import leave_group  # noqa: E402

from recframe import Trainer, TrainingArguments, distributed  # noqa: E402
from recframe.models import DLRM  # noqa: E402
from recframe.optim import dense_parameters  # noqa: E402
from recframe.optim.fused import shard_model  # noqa: E402
from recframe.readers import TabularDataset  # noqa: E402
from recframe.schema import FeatureSchema  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("data")
    p.add_argument("format", choices=["parquet", "tsv"])
    p.add_argument("tag")
    p.add_argument("--steps", type=int, default=None)
    ns = p.parse_args()
    torch.set_num_threads(1)
    distributed.init_default_group(timeout=120)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    torch.manual_seed(0)
    schema = FeatureSchema.criteo(num_embeddings=40, embedding_dim=4)
    model = DLRM(schema=schema, dense_arch=(8, 4), over_arch=(8, 1))
    dmp, sparse = shard_model(model, optimizer="rowwise_adagrad", lr=0.05)
    data = TabularDataset(ns.data, schema, format=ns.format, batch_size=20, rank=rank,
                          world_size=world, block_size=1024, num_workers=2)
    args = TrainingArguments(output_dir=os.path.join(ns.out, "ckpt"), report_to="none",
                             disable_tqdm=True, log_steps=1000, dist_sync_steps=2,
                             save_steps=None, train_steps=ns.steps, train_epoch=1,
                             dataloader_prefetch=3)
    trainer = Trainer(model=dmp, args=args, train_dataset=data,
                      dense_optimizers=(torch.optim.Adam(dense_parameters(dmp), lr=0.01), None),
                      sparse_optimizer=sparse)
    seen: list[list[float]] = []
    inner = trainer._run_micro_batch

    def recording(batch, *rest):  # every batch this rank trained, in epoch 0
        if trainer.state.epoch == 0:
            seen.extend(torch.cat([batch.labels[:, None], batch.dense_features],
                                  dim=1).tolist())
        return inner(batch, *rest)

    trainer._run_micro_batch = recording
    resumed = trainer.restore()
    trainer.train()
    result = {"rank": rank, "world": world, "samples": seen, "resumed": resumed,
              "global_step": trainer.global_step, "epoch": trainer.state.epoch}
    with open(os.path.join(ns.out, f"{ns.tag}-r{rank}.json"), "w") as f:
        json.dump(result, f)
    leave_group(ns.out, rank)


if __name__ == "__main__":
    main()
