"""Two gloo ranks train one epoch of DLRM (fused sharded tables) on unequal Criteo TSV
files through `recframe.readers`, each reading only its share, for
tests/test_readers_training.py.

usage: data_dist_job.py OUT_DIR DATA_GLOB

Each rank writes result-r<rank>.json: the samples it trained (label and first ids), its
bytes read, and the global step reached.
"""

from __future__ import annotations

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
from recframe.readers import criteo_tsv  # noqa: E402
from recframe.schema import FeatureSchema  # noqa: E402


def main() -> None:
    out, data_glob = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    distributed.init_default_group(timeout=120)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    torch.manual_seed(0)
    schema = FeatureSchema.criteo(num_embeddings=40, embedding_dim=4)
    model = DLRM(schema=schema, dense_arch=(8, 4), over_arch=(8, 1))
    dmp, sparse = shard_model(model, optimizer="rowwise_adagrad", lr=0.05)
    data = criteo_tsv(data_glob, batch_size=25, num_embeddings=40, rank=rank,
                      world_size=world, block_size=2048)
    seen: list[list[float]] = []
    inner = data._assemble

    def recording(pieces):  # every batch this rank decoded, in order
        batch = inner(pieces)
        seen.extend([[float(x) for x in row] for row in torch.cat(
            [batch.labels[:, None], batch.dense_features], dim=1).tolist()])
        return batch

    data._assemble = recording
    args = TrainingArguments(output_dir=os.path.join(out, "ckpt"), report_to="none",
                             disable_tqdm=True, log_steps=1000, dist_sync_steps=2,
                             save_steps=None)
    trainer = Trainer(model=dmp, args=args, train_dataset=data,
                      dense_optimizers=(torch.optim.Adam(dense_parameters(dmp), lr=0.01), None),
                      sparse_optimizer=sparse)
    trainer.train()
    result = {"rank": rank, "samples": seen, "bytes_read": data.bytes_read,
              "global_step": trainer.global_step, "files": data.files}
    with open(os.path.join(out, f"result-r{rank}.json"), "w") as f:
        json.dump(result, f)
    leave_group(out, rank)


if __name__ == "__main__":
    main()
