"""One rank of a 2-process (gloo, CPU) job: a NaN loss on rank 0 only.

usage: RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p skip_ranks_job.py OUT

Each rank trains a DLRM whose tables are sharded row-wise by torchrec (fused
RowWiseAdagrad: the tables' backward is a collective) with no DDP over the dense part,
so nothing but the trainer's own agreement tells rank 1 that rank 0's loss of update 2
is NaN. Under ``nonfinite_loss="skip"`` both ranks skip that update (a rank that
replayed the tables' backward alone would hang) and print ``OK skip <rank>
skipped=<n> ...``; then, under ``"raise"``, both raise, and print ``RAISED <rank>
<message>``.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
warnings.filterwarnings("ignore")

from dist_job import leave_group  # noqa: E402

from recframe import Trainer, TrainingArguments  # noqa: E402
from recframe.data import SyntheticCriteo  # noqa: E402
from recframe.models import DLRM  # noqa: E402
from recframe.optim import dense_parameters  # noqa: E402
from recframe.optim.fused import shard_model  # noqa: E402


class RankZeroNaN(DLRM):
    """Training forward number 2 on rank 0 returns a NaN loss."""

    calls = 0

    def forward(self, batch):
        loss = super().forward(batch)
        if self.training:
            self.calls += 1
            if self.calls == 2 and int(os.environ["RANK"]) == 0:
                loss = loss * float("nan")
        return loss


def run(policy: str, out: str) -> None:
    rank = int(os.environ["RANK"])
    torch.manual_seed(0)
    model = RankZeroNaN(num_embeddings=64, embedding_dim=4, dense_arch=(8, 4),
                        over_arch=(8, 1), sparse_features=["cat_0", "cat_1"])
    dmp, sparse = shard_model(model, optimizer="rowwise_adagrad", lr=0.1,
                              sharding="row_wise", data_parallel=False)
    data = list(SyntheticCriteo(num_batches=4, batch_size=8, num_embeddings=64, num_sparse=2,
                                seed=10 + rank))
    trainer = Trainer(
        dmp,
        TrainingArguments(output_dir=out, nonfinite_loss=policy,
                          report_to="none", disable_tqdm=True, save_steps=None,
                          save_on_sigterm=False),
        train_dataset=data,
        dense_optimizers=(torch.optim.SGD(dense_parameters(dmp), lr=0.1), None),
        sparse_optimizer=sparse,
    )
    try:
        trainer.train()
    except FloatingPointError as e:
        print(f"RAISED {rank} {e}", flush=True)
        return
    tables = [v for k, v in dmp.state_dict().items() if "embedding_bags" in k]
    finite = all(torch.isfinite(s.tensor).all() for t in tables for s in t.local_shards())
    print(f"OK {policy} {rank} skipped={trainer.state.skipped_updates} "
          f"steps={trainer.global_step} finite={finite}", flush=True)


def main() -> None:
    for policy in ("skip", "raise"):
        run(policy, os.path.join(sys.argv[1], policy))
    leave_group(sys.argv[1], int(os.environ["RANK"]))  # rank 0 (the store's host) last


if __name__ == "__main__":
    main()
