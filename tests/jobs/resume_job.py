"""A deterministic training job for resume tests, run as a subprocess.

usage: resume_job.py OUTPUT_DIR RESULT_NPZ --steps N [--accum K] [--kill-at S]
       [--model toy|dlrm] [--opt adam|sgd|adagrad] [--save-steps M] [--async-save]
       [--incremental]

--incremental: recframe's row-wise sparse optimizers (whose rows the tracker sees) and
incremental checkpoints, a full one every 3 saves.

With --kill-at the process SIGKILLs itself right after optimizer update S (before
that step's checkpoint). Without it, the final parameters are written to RESULT_NPZ.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import ToyCTR, make_batches  # noqa: E402

from recframe import Hook, Trainer, TrainingArguments  # noqa: E402
from recframe.optim import dense_parameters, sparse_parameters  # noqa: E402


class NoisyToy(ToyCTR):
    """ToyCTR with dropout, so the RNG stream matters for an exact resume."""

    def __init__(self) -> None:
        super().__init__(sparse=True)
        self.drop = nn.Dropout(0.2)

    def forward(self, batch):
        batch = dict(batch, dense=self.drop(batch["dense"]))
        return super().forward(batch)


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
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--model", default="toy", choices=["toy", "dlrm"])
    p.add_argument("--opt", default="adam", choices=["adam", "sgd", "adagrad"])
    p.add_argument("--save-steps", type=int, default=2)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--incremental", action="store_true")
    ns = p.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if ns.model == "toy":
        model = NoisyToy()
        data = make_batches(7, 16, seed=5)  # a plain list: position by batch count
    else:
        from recframe.data import SyntheticCriteo
        from recframe.models import DLRM

        model = DLRM(num_embeddings=200, embedding_dim=8, dense_arch=(16, 8), over_arch=(16, 1))
        data = SyntheticCriteo(num_batches=9, batch_size=32, num_embeddings=200, seed=3)
    dense, sparse = dense_parameters(model), sparse_parameters(model)
    if ns.opt == "adam":
        d = torch.optim.Adam(dense, lr=0.01)
        s = torch.optim.SparseAdam(sparse, lr=0.02) if ns.model == "toy" else torch.optim.Adam(
            sparse, lr=0.02
        )
    elif ns.opt == "sgd":
        d = torch.optim.SGD(dense, lr=0.1, momentum=0.9)
        s = torch.optim.SGD(sparse, lr=0.3)
    else:
        d = torch.optim.Adagrad(dense, lr=0.05)
        s = torch.optim.Adagrad(sparse, lr=0.05)
    if ns.incremental:
        from recframe.optim.sparse import SparseAdagrad, SparseAdam, SparseSGD

        s = {"adam": SparseAdam, "sgd": SparseSGD, "adagrad": SparseAdagrad}[ns.opt](
            sparse, lr=0.02)
    sched = torch.optim.lr_scheduler.StepLR(d, step_size=3, gamma=0.7)
    args = TrainingArguments(
        output_dir=ns.output_dir, train_steps=ns.steps, gradient_accumulation_steps=ns.accum,
        save_steps=ns.save_steps, max_to_keep=3, report_to="none", disable_tqdm=True,
        log_steps=1000, async_save=ns.async_save, save_concurrency_per_rank=2,
        incremental_checkpoints=ns.incremental, full_checkpoint_every=3,
    )
    hooks = [KillAt(ns.kill_at)] if ns.kill_at else []
    trainer = Trainer(model=model, args=args, train_dataset=data, hooks=hooks,
                      dense_optimizers=(d, sched), sparse_optimizer=s)
    trainer.train()
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    for i, group in enumerate(d.state.values()):
        for k, v in group.items():
            if isinstance(v, torch.Tensor):
                arrays[f"dense_opt.{i}.{k}"] = v.numpy()
    arrays["global_step"] = np.array(trainer.global_step)
    arrays["lr"] = np.array(d.param_groups[0]["lr"])
    np.savez(ns.result, **arrays)


if __name__ == "__main__":
    main()
