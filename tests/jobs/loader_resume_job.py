"""Data loaders and a recording model for the DataLoader resume tests, and a training
job over them run as a subprocess (the SIGKILL case).

usage: loader_resume_job.py OUTPUT_DIR RESULT_NPZ LOG [--loader dataloader|stateful|
       iterable] [--workers N] [--persistent] [--no-shuffle] [--kill-at S]

Trains 2 epochs of 6 steps (24 samples, batches of 4) with dropout, checkpointing every
4 steps; each step appends "step idx idx idx idx" to LOG. With --kill-at the process
SIGKILLs itself right after update S (before that step's checkpoint); else the final
parameters go to RESULT_NPZ.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import ToyCTR  # noqa: E402

from recframe import Hook, Trainer, TrainingArguments  # noqa: E402

SAMPLES, BATCH = 24, 4


def _sample(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + i)
    ids = torch.randint(0, 64, (2,), generator=g)
    dense = torch.randn(3, generator=g)
    label = ((dense[0] + (ids[0] % 2) * 1.5 - 0.7) > 0).float()
    return {"idx": torch.tensor(i), "ids": ids, "dense": dense, "label": label}


class IndexedSamples(Dataset):
    """Map-style: sample ``i`` carries its index ``idx``."""

    def __init__(self, n: int = SAMPLES) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return _sample(int(i))


class StatefulSamples(IterableDataset):
    """Iterable with ``state_dict``/``load_state_dict``: samples in an order shuffled
    per epoch by its own seeded generator; the position is (epoch, next sample)."""

    def __init__(self, n: int = SAMPLES, seed: int = 3) -> None:
        self.n, self.seed, self.epoch, self.next = n, seed, 0, 0

    def __len__(self) -> int:
        return self.n

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        if self.next >= self.n:
            self.epoch, self.next = self.epoch + 1, 0
        order = self._order()
        while self.next < self.n:
            i = order[self.next]
            self.next += 1
            yield _sample(i)
        self.epoch, self.next = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "next": self.next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.next = int(state["epoch"]), int(state["next"])


class Recorder(ToyCTR):
    """ToyCTR with dropout (so the model's RNG stream matters) that records the sample
    indices of every batch it trains."""

    def __init__(self) -> None:
        super().__init__(sparse=True)
        self.drop = nn.Dropout(0.3)
        self.seen: list[list[int]] = []

    def forward(self, batch):
        if self.training:
            self.seen.append(batch["idx"].tolist())
        return super().forward(dict(batch, dense=self.drop(batch["dense"])))


def make_loader(kind: str, workers: int = 0, persistent: bool = False,
                shuffle: bool = True) -> Any:
    if kind == "dataloader":
        return DataLoader(IndexedSamples(), batch_size=BATCH, shuffle=shuffle,
                          num_workers=workers, persistent_workers=persistent)
    if kind == "stateful":
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(IndexedSamples(), batch_size=BATCH, shuffle=shuffle,
                                  num_workers=workers, persistent_workers=persistent)
    if kind == "iterable":
        return DataLoader(StatefulSamples(), batch_size=BATCH, num_workers=0)
    raise ValueError(kind)


def parameters(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


class LogSteps(Hook):
    def __init__(self, path: str, kill_at: int | None) -> None:
        self.path, self.kill_at = path, kill_at

    def after_step(self, trainer, metrics):
        with open(self.path, "a") as f:
            f.write(" ".join(map(str, [trainer.global_step, *trainer.model.seen[-1]])) + "\n")
        if trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("output_dir")
    p.add_argument("result")
    p.add_argument("log")
    p.add_argument("--loader", default="dataloader")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--persistent", action="store_true")
    p.add_argument("--no-shuffle", action="store_true")
    p.add_argument("--kill-at", type=int, default=None)
    ns = p.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Recorder()
    loader = make_loader(ns.loader, ns.workers, ns.persistent, not ns.no_shuffle)
    args = TrainingArguments(
        output_dir=ns.output_dir, train_epoch=2, save_steps=4, report_to="none",
        disable_tqdm=True, log_steps=1000,
    )
    trainer = Trainer(model, args, train_dataset=loader, hooks=[LogSteps(ns.log, ns.kill_at)])
    trainer.train()
    np.savez(ns.result, global_step=np.array(trainer.global_step), **parameters(model))


if __name__ == "__main__":
    main()
