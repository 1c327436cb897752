"""Train DLRM on Criteo-format TSV files through `recframe.readers` (background decoding),
checkpointing every step, for the exact-resume test of tests/test_readers_training.py.

usage: data_resume_job.py OUTPUT_DIR RESULT_NPZ DATA_GLOB --steps N [--kill-at S]

With --kill-at the process SIGKILLs itself right after optimizer update S (mid-file);
otherwise the final parameters are written to RESULT_NPZ.
"""

from __future__ import annotations

import argparse
import os
import signal

import numpy as np
import torch

from recframe import Hook, Trainer, TrainingArguments
from recframe.models import DLRM
from recframe.optim import dense_parameters, sparse_parameters
from recframe.readers import criteo_tsv
from recframe.schema import FeatureSchema


class KillAt(Hook):
    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, trainer, metrics):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("output_dir")
    p.add_argument("result")
    p.add_argument("data")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--kill-at", type=int, default=None)
    ns = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    schema = FeatureSchema.criteo(num_embeddings=60, embedding_dim=4)
    model = DLRM(schema=schema, dense_arch=(8, 4), over_arch=(8, 1))
    data = criteo_tsv(ns.data, batch_size=32, num_embeddings=60, num_workers=2,
                      block_size=1024)
    args = TrainingArguments(output_dir=ns.output_dir, train_steps=ns.steps, save_steps=1,
                             max_to_keep=2, report_to="none", disable_tqdm=True,
                             log_steps=1000, dataloader_prefetch=2)
    hooks = [KillAt(ns.kill_at)] if ns.kill_at else []
    trainer = Trainer(
        model=model, args=args, train_dataset=data, hooks=hooks,
        dense_optimizers=(torch.optim.Adam(dense_parameters(model), lr=0.01), None),
        sparse_optimizer=torch.optim.Adagrad(sparse_parameters(model), lr=0.05),
    )
    trainer.train()
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    arrays["position"] = np.array([data.state_dict()["part"], data.state_dict()["offset"],
                                   data.state_dict()["epoch"]])
    np.savez(ns.result, **arrays)


if __name__ == "__main__":
    main()
