"""The tensor work an update does beyond a hand-written loop, counted op by op (not
timed): the NaN/inf check of the usual update and the built-in hooks' loss bookkeeping
add no tensor ops but the loss's detach and one host read."""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from recframe import Hook, Trainer, TrainingArguments
from recframe.hooks.logger import FOLD_LOSSES, IntervalMeter


class CountOps(TorchDispatchMode):
    """Counts every aten op by name while active (``enabled``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.enabled = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.enabled:
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(32, 4, mode="sum")
        self.mlp = nn.Linear(4 + 3, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = torch.cat([self.emb(batch["ids"]), batch["dense"]], dim=1)
        logits = self.mlp(x).squeeze(1)
        return nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"])


def batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"ids": torch.randint(0, 32, (8, 2), generator=g),
             "dense": torch.randn(8, 3, generator=g),
             "labels": torch.randint(0, 2, (8,), generator=g).float()} for _ in range(n)]


def optimizers(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    return (torch.optim.Adam(model.mlp.parameters(), lr=1e-3),
            torch.optim.Adagrad(model.emb.parameters(), lr=0.05))


class Window(Hook):
    """Counts only from the 3rd update's before_step to the 7th one's after_step (no
    log line is due there: log_steps=100)."""

    priority = 10**9

    def __init__(self, counter: CountOps) -> None:
        self.counter = counter

    def before_step(self, trainer):
        self.counter.enabled = 3 <= trainer.global_step + 1 <= 7

    def after_step(self, trainer, metrics):
        self.counter.enabled = False


def test_an_update_adds_only_the_loss_detach_and_one_host_read_to_a_hand_loop(tmp_path):
    torch.manual_seed(0)
    base = Tiny()
    data = batches(10)

    hand_model = copy.deepcopy(base)
    dense, sparse = optimizers(hand_model)
    hand = CountOps()
    with hand:
        for i, batch in enumerate(data):
            hand.enabled = 2 <= i <= 6  # the same five updates
            dense.zero_grad()
            sparse.zero_grad()
            hand_model(batch).backward()
            dense.step()
            sparse.step()

    model = copy.deepcopy(base)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), log_steps=100, save_steps=None,
                             report_to="tensorboard")  # + the progress bar: default hooks
    rec = CountOps()
    trainer = Trainer(model, args, train_dataset=data,
                      dense_optimizers=(torch.optim.Adam(model.mlp.parameters(), lr=1e-3), None),
                      sparse_optimizer=torch.optim.Adagrad(model.emb.parameters(), lr=0.05),
                      hooks=[Window(rec)])
    with rec:
        rec.enabled = False
        trainer.train(train_steps=10)

    extra = rec.ops - hand.ops
    missing = hand.ops - rec.ops
    assert not missing, f"recframe skipped ops of the hand loop: {dict(missing)}"
    # per update: the loss detached for the window (the finiteness check reads the loss
    # itself); one read of it
    assert extra == Counter({"detach": 5, "_local_scalar_dense": 5}), dict(extra)


def test_a_long_interval_holds_a_bounded_number_of_loss_tensors():
    meter = IntervalMeter()
    values = [float(i % 7) / 3 for i in range(3 * FOLD_LOSSES + 5)]
    for v in values:
        meter.add({"loss": torch.tensor(v), "samples": 2})
    assert len(meter._losses) < FOLD_LOSSES
    assert abs(meter.mean_loss() - sum(values) / len(values)) < 1e-5
    assert meter.samples == 2 * len(values) and meter.steps == len(values)
    meter.reset()
    assert meter.mean_loss() is None
    # a user's losses of other shapes and dtypes (a mean over several values) fold too
    odd = [torch.tensor([1.0]), torch.tensor([2.0, 4.0]), torch.tensor(5.0, dtype=torch.bfloat16)]
    for i in range(FOLD_LOSSES + 1):
        meter.add({"loss": odd[i % 3]})
    expected = [1.0, 3.0, 5.0]
    assert abs(meter.mean_loss()
               - sum(expected[i % 3] for i in range(FOLD_LOSSES + 1)) / (FOLD_LOSSES + 1)) < 1e-4
