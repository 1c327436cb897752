"""The learning-rate schedules of ``TrainingArguments.lr_scheduler_type`` (the names
Hugging Face's Trainer uses), as torch ``LambdaLR`` schedulers of the default dense
optimizer.

Every schedule warms up linearly from 0 to the optimizer's learning rate over
``warmup_steps`` updates (or ``warmup_ratio`` of the run), then: ``constant`` and
``constant_with_warmup`` stay there, ``linear`` decays linearly and ``cosine`` along a
half cosine, both to 0 at the run's last update. The factor is a pure function of the
update count, so a resumed run continues the same curve (the scheduler's state is in
the checkpoint).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def warmup_updates(total: Optional[int], warmup_steps: int, warmup_ratio: float) -> int:
    """Warm-up length: ``warmup_steps`` when set, else ``warmup_ratio`` of ``total``."""
    if warmup_steps:
        return int(warmup_steps)
    if warmup_ratio:
        if total is None:
            raise ValueError(
                "TrainingArguments.warmup_ratio needs the run's length: set train_steps, or "
                "train on data with a len(), or use warmup_steps"
            )
        return int(math.ceil(total * warmup_ratio))
    return 0


def lr_factor(name: str, step: int, warmup: int, total: Optional[int]) -> float:
    """The factor of the learning rate at update ``step`` (0-based)."""
    if step < warmup:  # the first update already moves: (step + 1) / (warmup + 1)
        return float(step + 1) / float(warmup + 1)
    if name in ("constant", "constant_with_warmup"):
        return 1.0
    if total is None:
        raise ValueError(
            f"lr_scheduler_type={name!r} decays to 0 at the last update and needs the "
            "run's length: set train_steps, or train on data with a len()"
        )
    progress = (step - warmup) / float(max(1, total - warmup))
    progress = min(max(progress, 0.0), 1.0)
    if name == "linear":
        return 1.0 - progress
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler_type {name!r}; choose from {list(SCHEDULES)}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str,
    total: Optional[int],
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
) -> Optional[LambdaLR]:
    """The ``LambdaLR`` of schedule ``name`` over ``total`` updates, or None when the
    rate never changes (``constant`` without warm-up)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr_scheduler_type {name!r}; choose from {list(SCHEDULES)}")
    warmup = warmup_updates(total, warmup_steps, warmup_ratio)
    if name in ("constant", "constant_with_warmup") and warmup == 0:
        return None
    if name not in ("constant", "constant_with_warmup"):
        lr_factor(name, warmup, warmup, total)  # fails now, naming the fix, without a length
    return LambdaLR(optimizer, lambda step: lr_factor(name, step, warmup, total))


__all__ = ["SCHEDULES", "build_scheduler", "lr_factor", "warmup_updates"]
