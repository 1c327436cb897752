"""Gradient accumulation: k micro-batches of b samples train exactly like one batch of
k*b, for the default step and a RecIS-style override, dense and sparse parameters."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ToyCTR, make_batches, split_batches

from recframe import Trainer, TrainingArguments
from recframe.optim import dense_parameters, sparse_parameters


class RecISStyleTrainer(Trainer):
    """``_train_step`` exactly as RecIS's docs write it."""

    def _train_step(self, data, epoch, metrics):
        self.dense_optimizer.zero_grad()
        self.sparse_optimizer.zero_grad()
        loss = self.model(data)
        metrics.update(epoch=epoch)
        metrics.update(loss=loss)
        loss.backward()
        self.dense_optimizer.step()
        self.sparse_optimizer.step()
        self.dense_lr_scheduler.step()


def _optimizers(model, kind: str, sparse_grad: bool):
    dense = dense_parameters(model)
    sparse = sparse_parameters(model)
    if kind == "sgd":
        d = torch.optim.SGD(dense, lr=0.1, momentum=0.9)
        s = torch.optim.SGD(sparse, lr=0.5)
    else:
        d = torch.optim.Adam(dense, lr=0.01)
        s = torch.optim.SparseAdam(sparse, lr=0.05) if sparse_grad else torch.optim.Adam(
            sparse, lr=0.05
        )
    sched = torch.optim.lr_scheduler.StepLR(d, step_size=2, gamma=0.5)
    return d, sched, s


def _train(tmp_path, trainer_cls, base_model, batches, k, kind, sparse_grad, steps=None):
    model = copy.deepcopy(base_model)
    d, sched, s = _optimizers(model, kind, sparse_grad)
    args = TrainingArguments(
        output_dir=str(tmp_path / f"out{k}"),
        gradient_accumulation_steps=k,
        report_to="none",
        disable_tqdm=True,
        log_steps=1000,
        train_steps=steps,
    )
    trainer = trainer_cls(
        model=model, args=args, train_dataset=batches, dense_optimizers=(d, sched),
        sparse_optimizer=s,
    )
    trainer.train()
    return model, trainer


@pytest.mark.parametrize("trainer_cls", [Trainer, RecISStyleTrainer], ids=["default", "recis"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("sparse_grad", [True, False], ids=["sparse-grad", "dense-grad"])
def test_k_micro_batches_equal_one_big_batch(tmp_path, trainer_cls, kind, sparse_grad):
    torch.manual_seed(0)
    base = ToyCTR(sparse=sparse_grad)
    big = make_batches(6, 32, seed=1)
    k = 4
    ref, ref_tr = _train(tmp_path, trainer_cls, base, big, 1, kind, sparse_grad)
    acc, acc_tr = _train(tmp_path, trainer_cls, base, split_batches(big, k), k, kind, sparse_grad)
    assert ref_tr.global_step == acc_tr.global_step == 6
    assert acc_tr.state.micro_step == 24
    # the scheduler stepped once per update, not per micro-batch
    assert acc_tr.dense_lr_scheduler.last_epoch == ref_tr.dense_lr_scheduler.last_epoch == 6
    for (name, p_ref), (_, p_acc) in zip(ref.named_parameters(), acc.named_parameters()):
        assert torch.allclose(p_ref, p_acc, atol=2e-6, rtol=1e-5), name
    # and training changed the parameters at all (a test that can fail)
    for (name, p0), (_, p1) in zip(base.named_parameters(), acc.named_parameters()):
        assert not torch.equal(p0, p1), name


def test_accumulation_without_averaging_would_differ(tmp_path):
    """Guard that the comparison above is sensitive: summed (not averaged) gradients
    give different parameters."""
    torch.manual_seed(0)
    base = ToyCTR()
    big = make_batches(3, 32, seed=1)
    ref, _ = _train(tmp_path, Trainer, base, big, 1, "sgd", True)

    class SummingTrainer(Trainer):
        def _train_step(self, data, epoch, metrics):
            loss = self.model(data)
            metrics.update(loss=loss)
            (loss * self.window.size).backward()  # undo the averaging: a sum
            self.dense_optimizer.step()
            self.sparse_optimizer.step()

    summed, _ = _train(tmp_path, SummingTrainer, base, split_batches(big, 4), 4, "sgd", True)
    assert not torch.allclose(ref.mlp[0].weight, summed.mlp[0].weight, atol=1e-4)


def test_last_partial_window_averages_over_its_micro_batches(tmp_path):
    torch.manual_seed(0)
    base = ToyCTR()
    micro = make_batches(5, 16, seed=2)
    # k=2 over 5 micro-batches: windows (0,1), (2,3), (4) -> 3 updates
    acc, tr = _train(tmp_path, Trainer, base, micro, 2, "sgd", True)
    assert tr.global_step == 3
    merged = [
        {k: torch.cat([micro[0][k], micro[1][k]]) for k in micro[0]},
        {k: torch.cat([micro[2][k], micro[3][k]]) for k in micro[0]},
        micro[4],
    ]
    ref, _ = _train(tmp_path, Trainer, base, merged, 1, "sgd", True)
    for (name, a), (_, b) in zip(ref.named_parameters(), acc.named_parameters()):
        assert torch.allclose(a, b, atol=2e-6), name


def test_train_steps_counts_updates_and_cycles_epochs(tmp_path):
    torch.manual_seed(0)
    model = ToyCTR()
    batches = make_batches(5, 8)
    args = TrainingArguments(
        output_dir=str(tmp_path), gradient_accumulation_steps=2, train_steps=7,
        report_to="none", disable_tqdm=True,
    )
    tr = Trainer(model=model, args=args, train_dataset=batches)
    tr.train()
    # exactly 7 updates (RecIS runs train_steps - 1), over 3 windows per 5-batch epoch
    assert tr.global_step == 7
    assert tr.state.epoch == 2
    assert tr.state.micro_step == 12  # 5 + 5 + 2
    assert tr.state.epoch_batches == 2


def test_epochs_when_no_train_steps(tmp_path):
    model = ToyCTR()
    args = TrainingArguments(
        output_dir=str(tmp_path), train_epoch=3, report_to="none", disable_tqdm=True
    )
    tr = Trainer(model=model, args=args, train_dataset=make_batches(4, 8))
    tr.train()
    assert tr.global_step == 12
    assert tr.state.epoch == 3


def test_scheduler_steps_once_per_update_even_if_called_per_micro_batch(tmp_path):
    model = ToyCTR()
    d = torch.optim.SGD(dense_parameters(model), lr=1.0)
    calls = []
    sched = torch.optim.lr_scheduler.LambdaLR(d, lambda e: calls.append(e) or 1.0)
    args = TrainingArguments(
        output_dir=str(tmp_path), gradient_accumulation_steps=3, report_to="none",
        disable_tqdm=True,
    )
    tr = RecISStyleTrainer(model=model, args=args, train_dataset=make_batches(9, 4),
                           dense_optimizers=(d, sched))
    tr.train()
    assert tr.global_step == 3
    assert calls == [0, 1, 2, 3]  # construction + one per update


def test_override_that_forgets_zero_grad_still_accumulates_per_window(tmp_path):
    class NoZeroGrad(Trainer):
        def _train_step(self, data, epoch, metrics):
            loss = self.model(data)
            metrics.update(loss=loss)
            loss.backward()
            self.dense_optimizer.step()
            self.sparse_optimizer.step()
            self.dense_lr_scheduler.step()

    torch.manual_seed(0)
    base = ToyCTR()
    big = make_batches(4, 32, seed=3)
    ref, _ = _train(tmp_path, Trainer, base, big, 1, "sgd", True)
    acc, _ = _train(tmp_path, NoZeroGrad, base, split_batches(big, 2), 2, "sgd", True)
    for (name, a), (_, b) in zip(ref.named_parameters(), acc.named_parameters()):
        assert torch.allclose(a, b, atol=2e-6), name


def test_max_grad_norm_clips_dense_gradients_after_averaging(tmp_path):
    torch.manual_seed(0)
    base = ToyCTR()
    big = make_batches(2, 32, seed=4)

    def run(k, batches, clip):
        model = copy.deepcopy(base)
        d = torch.optim.SGD(dense_parameters(model), lr=0.5)
        s = torch.optim.SGD(sparse_parameters(model), lr=0.5)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"c{k}{clip}"), gradient_accumulation_steps=k,
            max_grad_norm=clip, report_to="none", disable_tqdm=True,
        )
        tr = Trainer(model=model, args=args, train_dataset=batches,
                     dense_optimizers=(d, None), sparse_optimizer=s)
        tr.train()
        return model, tr

    ref, tr1 = run(1, big, 0.01)
    acc, tr4 = run(4, split_batches(big, 4), 0.01)
    unclipped, _ = run(1, big, None)
    assert tr1.dense_optimizer.last_grad_norm is not None
    assert float(tr1.dense_optimizer.last_grad_norm) > 0.01  # clipping was active
    for (name, a), (_, b) in zip(ref.named_parameters(), acc.named_parameters()):
        assert torch.allclose(a, b, atol=2e-6), name
    assert not torch.allclose(ref.mlp[0].weight, unclipped.mlp[0].weight, atol=1e-5)
