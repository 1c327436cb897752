"""Attack review of the loop's per-update inlining (issue 11, commits 13929f9, e30e006,
9fb787c): the paths those commits shortened, checked against values worked out here
(a hand-written update, an uninterrupted run, counted calls), not against old code."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import ToyCTR, make_batches
from torch.utils.data import DataLoader

from recframe import Hook, Trainer, TrainingArguments
from recframe.device import CPUDevice

# the hand-written references step every parameter with one SGD (tables included)
pytestmark = pytest.mark.filterwarnings("ignore:the dense optimizer")


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), save_steps=None, report_to="none", disable_tqdm=True,
                log_steps=1000)
    base.update(kw)
    return TrainingArguments(**base)


def _unequal(n: int) -> list[dict]:
    """``n`` batches of 3, 4, 5, 6, 3, ... samples."""
    return [{k: v[: 3 + i % 4] for k, v in b.items()} for i, b in enumerate(make_batches(n, 8))]


class TorchOrder(Trainer):
    """backward; step; zero_grad (torch's tutorial order)."""

    set_to_none = True

    def _train_step(self, data, epoch, metrics):
        loss = self.model(data)
        metrics.update(loss=loss)
        loss.backward()
        self.dense_optimizer.step()
        self.sparse_optimizer.step()
        self.dense_lr_scheduler.step()
        self.dense_optimizer.zero_grad(set_to_none=self.set_to_none)
        self.sparse_optimizer.zero_grad(set_to_none=self.set_to_none)


class RecISOrder(TorchOrder):
    """zero_grad; backward; step (RecIS's order)."""

    def _train_step(self, data, epoch, metrics):
        self.dense_optimizer.zero_grad(set_to_none=self.set_to_none)
        self.sparse_optimizer.zero_grad(set_to_none=self.set_to_none)
        loss = self.model(data)
        metrics.update(loss=loss)
        loss.backward()
        self.dense_optimizer.step()
        self.sparse_optimizer.step()
        self.dense_lr_scheduler.step()


def _dense_run(tmp_path, cls, k: int, set_to_none: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = ToyCTR(sparse=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    trainer = cls(model, _args(tmp_path / f"{cls.__name__}{k}{set_to_none}",
                               gradient_accumulation_steps=k),
                  train_dataset=_unequal(8), dense_optimizers=(opt, None))
    trainer.set_to_none = set_to_none
    trainer.train(train_steps=8 // k)
    assert trainer.state.global_step == 8 // k
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("k", [1, 4])
def test_every_call_order_gives_the_hand_written_per_sample_update(tmp_path, k):
    """The inlined view step (factor 1.0 for a one-micro-batch window, the window's
    factor otherwise) and the inlined zero_grad after the update: any order, either
    set_to_none, equals a hand-written SGD over the concatenated window."""
    results = [_dense_run(tmp_path, cls, k, stn)
               for cls in (Trainer, TorchOrder, RecISOrder) for stn in (True, False)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    # by hand: one SGD step per window on the window's samples concatenated
    torch.manual_seed(0)
    model = ToyCTR(sparse=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batches = _unequal(8)
    for w in range(0, 8, k):
        window = batches[w:w + k]
        joined = {key: torch.cat([b[key] for b in window]) for key in window[0]}
        opt.zero_grad()
        model(joined).backward()
        opt.step()
    for a, b in zip(results[0], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_a_device_that_cuts_graphs_gets_mark_step_per_micro_batch(tmp_path, k):
    """Eager devices' mark_step is no longer called; one that overrides it (XLA) still
    gets it after every micro-batch before the last and after every update: k per
    update, a device set after construction included."""

    class Cutting(CPUDevice):
        calls = 0

        def mark_step(self) -> None:
            Cutting.calls += 1

    torch.manual_seed(0)
    trainer = Trainer(ToyCTR(), _args(tmp_path, gradient_accumulation_steps=k),
                      train_dataset=make_batches(12, 4))
    trainer.device = Cutting()
    trainer.train(train_steps=12 // k)
    assert Cutting.calls == 12


def test_hooks_added_mid_run_and_control_flags_from_before_and_after_step(tmp_path):
    """The before_step early-out reads the registry's listeners table each update: a
    hook added from inside a hook fires from the next update on; should_stop in
    before_step stops before that update; should_log / should_save set in after_step
    off the grid log and save that step."""
    events: list[tuple[str, int]] = []

    class Late(Hook):
        def before_step(self, trainer):
            events.append(("late", trainer.state.global_step))

    class Stopper(Hook):
        def before_step(self, trainer):
            events.append(("stopper", trainer.state.global_step))
            if trainer.state.global_step == 5:
                trainer.control.should_stop = True

    class Adder(Hook):
        def after_step(self, trainer, metrics):
            if trainer.state.global_step == 2:
                trainer.add_hook(Late())
            if trainer.state.global_step == 3:
                trainer.add_hooks([Stopper()])
            if trainer.state.global_step == 1:
                trainer.control.should_log = True
                trainer.control.should_save = True

    torch.manual_seed(0)
    trainer = Trainer(ToyCTR(), _args(tmp_path, report_to="jsonl", log_steps=100),
                      train_dataset=make_batches(10, 8), hooks=[Adder()])
    trainer.train(train_steps=10)
    assert events == [("late", 2), ("late", 3), ("stopper", 3), ("late", 4), ("stopper", 4),
                      ("late", 5), ("stopper", 5)]
    assert trainer.state.global_step == 5
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 5]
    assert {"ckpt_1", "ckpt_5"} <= set(os.listdir(tmp_path))


@pytest.mark.parametrize("log_steps,k", [(1, 1), (3, 1), (3, 4)])
def test_jsonl_rows_hold_the_interval_mean_loss_and_the_optimizer_lr(tmp_path, log_steps, k):
    """The inlined log_due and lr pick-up: rows on the grid and at the last step, each
    with the mean of its interval's update losses and the lr the scheduler set."""
    losses: list[float] = []

    class Losses(Hook):
        def after_step(self, trainer, metrics):
            losses.append(float(metrics["loss"]))

    torch.manual_seed(0)
    model = ToyCTR(sparse=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    steps = 20 // k
    trainer = Trainer(model, _args(tmp_path, report_to="jsonl", log_steps=log_steps,
                                   gradient_accumulation_steps=k),
                      train_dataset=_unequal(20), hooks=[Losses()],
                      dense_optimizers=(opt, sched))
    trainer.train(train_steps=steps)
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if json.loads(line).get("kind") == "train"]
    grid = [s for s in range(1, steps + 1) if s % log_steps == 0 or s == steps]
    assert [r["step"] for r in rows] == grid
    start = 0
    for row in rows:
        step = row["step"]
        assert row["loss"] == pytest.approx(sum(losses[start:step]) / (step - start), rel=1e-5)
        assert row["lr"] == pytest.approx(0.2 / (1 + step))
        start = step


@pytest.mark.parametrize("k", [1, 4])
def test_a_skipped_window_equals_training_without_it(tmp_path, k):
    """The inlined skip in the view's step: under nonfinite_loss='skip' a window with a
    NaN loss changes nothing, so the run equals one whose data lacks that window."""
    batches = _unequal(16)
    bad = 5 // k * k  # the first micro-batch of the window holding batch 5
    poisoned = [dict(b) for b in batches]
    poisoned[5] = {**batches[5], "dense": batches[5]["dense"].clone()}
    poisoned[5]["dense"][0, 0] = float("nan")

    def run(name, data, steps):
        torch.manual_seed(0)
        model = ToyCTR()
        trainer = Trainer(model, _args(tmp_path / name, nonfinite_loss="skip",
                                       gradient_accumulation_steps=k), train_dataset=data)
        trainer.train(train_steps=steps)
        return trainer, [p.detach().clone() for p in model.parameters()]

    skipping, got = run("skip", poisoned, 16 // k)
    assert skipping.state.skipped_updates == 1
    _, expected = run("without", batches[:bad] + batches[bad + k:], 16 // k - 1)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("source", ["generator", "loader", "loader_workers"])
def test_train_2_then_4_equals_train_4(tmp_path, source):
    """The CPU stream hands the host generator straight on (no pass-through): two
    train() calls over a generator or a DataLoader (2 workers too) train batches 0..3
    once each, as one call does."""

    def data():
        if source == "generator":
            return (b for b in make_batches(8, 8))
        return DataLoader(make_batches(8, 8), batch_size=None,
                          num_workers=2 if source == "loader_workers" else 0)

    def run(name, calls):
        torch.manual_seed(0)
        model = ToyCTR()
        seen: list[torch.Tensor] = []

        class Seen(Hook):
            def after_step(self, trainer, metrics):
                seen.append(metrics["loss"])

        trainer = Trainer(model, _args(tmp_path / name), train_dataset=data(), hooks=[Seen()])
        for steps in calls:
            trainer.train(train_steps=steps)
        return [p.detach().clone() for p in model.parameters()], seen

    split, split_losses = run("split", (2, 4))
    whole, whole_losses = run("whole", (4,))
    assert len(split_losses) == 4
    assert torch.equal(torch.stack(split_losses), torch.stack(whole_losses))
    for a, b in zip(split, whole):
        assert torch.equal(a, b)
