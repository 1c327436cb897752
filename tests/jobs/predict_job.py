"""Trainer.predict on 2 ranks with sharded tables and uneven data (rank 0: 3 batches,
rank 1: 2): rank 0 must gather every sample. Each rank dumps its own local predictions
(``local<rank>.npz``); rank 0 also dumps the gathered ones (``gathered.npz``) and the
streamed file (``preds.tsv``). usage: predict_job.py OUT_DIR"""

from __future__ import annotations

import sys

import numpy as np
import torch


def main(out: str) -> None:
    from recframe import Trainer, TrainingArguments, distributed
    from recframe.data import SyntheticCriteo
    from recframe.models import DLRM
    from recframe.optim.fused import shard_model

    torch.manual_seed(0)
    features = ["cat_0", "cat_1", "cat_2"]
    model = DLRM(num_embeddings=40, embedding_dim=4, dense_arch=(8, 4), over_arch=(8, 1),
                 sparse_features=features)
    dmp, sparse = shard_model(model, optimizer="rowwise_adagrad", lr=0.05, sharding="mixed")
    rank = distributed.get_rank()
    data = list(SyntheticCriteo(num_batches=3 - rank, batch_size=8, num_embeddings=40,
                                num_sparse=3, ids_per_feature=(1, 3), seed=10 + rank))
    args = TrainingArguments(output_dir=f"{out}/ckpt", report_to="none", disable_tqdm=True)
    trainer = Trainer(model=dmp, args=args, sparse_optimizer=sparse)
    with torch.no_grad():  # sharded lookups are collectives: the same count on each rank
        local = [model.predict(b).numpy() for b in data] + [np.zeros(0, np.float32)]
        if rank == 1:
            model.predict(data[-1])
    np.savez(f"{out}/local{rank}.npz", *local)
    result = trainer.predict(data)
    streamed = trainer.predict(data, output=f"{out}/preds.tsv")
    if rank == 0:
        np.savez(f"{out}/gathered.npz", predictions=result.predictions.numpy(),
                 labels=result.labels.numpy(), n=np.array(streamed.num_samples))
    from dist_job import leave_group

    leave_group(out, rank)  # rank 0 (the store's host) leaves last


if __name__ == "__main__":
    main(sys.argv[1])
