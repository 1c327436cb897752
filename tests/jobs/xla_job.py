"""A DLRM training job on the XLA device for the resume test, run as a subprocess
(PJRT_DEVICE=CPU in CI, unchanged on a TPU).

usage: xla_job.py OUTPUT_DIR RESULT_NPZ --steps N [--accum K] [--kill-at S]
       [--sparse-opt rowwise_adagrad|adam] [--save-steps M]

The model is recframe's DLRM built on the CPU with its default (torchrec) tables plus
dropout on the dense input, so the XLA device must swap the tables itself and the XLA
RNG stream matters for an exact resume. With --kill-at the process SIGKILLs itself
right after optimizer update S (before that step's checkpoint). Without it, the final
parameters, optimizer states, per-step losses and torch-xla compile counts are written
to RESULT_NPZ.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal

import numpy as np
import torch
from torch import nn

from recframe import Hook, Trainer, TrainingArguments
from recframe.data import SyntheticCriteo
from recframe.models import DLRM
from recframe.optim import dense_parameters, sparse_parameters
from recframe.optim.sparse import build_sparse_optimizer


class NoisyDLRM(DLRM):
    """DLRM with dropout on the dense features (drawn from the XLA RNG stream)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.drop = nn.Dropout(0.1)

    def logits(self, batch):
        return super().logits(
            type(batch)(self.drop(batch.dense_features), batch.sparse_features, batch.labels)
        )


class Record(Hook):
    """Loss and torch-xla's compile count after every update; SIGKILL at ``kill_at``."""

    def __init__(self, kill_at: int | None) -> None:
        self.kill_at = kill_at
        self.losses: list[float] = []
        self.compiles: list[int] = []

    def after_step(self, trainer, metrics):
        from recframe.xla import compile_count

        self.losses.append(float(metrics["loss"]))
        self.compiles.append(compile_count())
        if trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("output_dir")
    p.add_argument("result")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--sparse-opt", default="rowwise_adagrad", choices=["rowwise_adagrad", "adam"])
    p.add_argument("--save-steps", type=int, default=3)
    ns = p.parse_args()
    logging.basicConfig(level=logging.INFO, force=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = NoisyDLRM(num_embeddings=200, embedding_dim=8, dense_arch=(16, 8), over_arch=(16, 1))
    data = SyntheticCriteo(
        num_batches=8 * ns.accum, batch_size=64, num_embeddings=200, ids_per_feature=(1, 4),
        seed=3,
    )
    dense = torch.optim.Adam(dense_parameters(model), lr=0.01)
    lr = 0.1 if ns.sparse_opt == "rowwise_adagrad" else 0.05
    sparse = build_sparse_optimizer(model, ns.sparse_opt, lr=lr)
    assert sparse_parameters(model)
    record = Record(ns.kill_at)
    args = TrainingArguments(
        output_dir=ns.output_dir, device="xla", train_steps=ns.steps,
        gradient_accumulation_steps=ns.accum, save_steps=ns.save_steps, max_to_keep=2,
        report_to="none", disable_tqdm=True, log_steps=1000,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, hooks=[record],
                      dense_optimizers=(dense, None), sparse_optimizer=sparse)
    assert trainer.device.name == "xla", trainer.device
    trainer.train()
    arrays = {f"model.{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    for prefix, opt in (("dense_opt", dense), ("sparse_opt", sparse)):
        for i, state in enumerate(opt.state.values()):
            for k, v in state.items():
                value = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.array(v)
                arrays[f"{prefix}.{i}.{k}"] = value
    arrays["global_step"] = np.array(trainer.global_step)
    arrays["losses"] = np.array(record.losses)
    arrays["compiles"] = np.array(record.compiles)
    arrays["table_device"] = np.array(str(model.ebc.embedding_bags["t_cat_0"].weight.device))
    arrays["tables"] = np.array(type(model.ebc).__name__)
    np.savez(ns.result, **arrays)


if __name__ == "__main__":
    main()
