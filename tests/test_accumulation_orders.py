"""Gradient accumulation on the paths torch users take (issue 11, items 4 and 5).

- Any order of ``zero_grad``/``backward``/``step`` within a micro-batch of a
  ``_train_step`` override (RecIS's, torch's tutorial order, ``set_to_none`` both ways,
  ``zero_grad`` between ``backward`` and ``step``) gives the update of one big batch.
- Unequal micro-batches (30 + 2 samples) weigh per sample by default: the update of
  their concatenation (one 32-sample batch), for dense and sparse parameters, SGD and
  Adam, on the sparse-gradient and the fused back end; ``accumulation_weighting=
  "micro_batches"`` keeps the 1/k weighting.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from conftest import ToyCTR, make_batches, split_batches
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recframe import Trainer, TrainingArguments
from recframe.data import SyntheticCriteo
from recframe.models import DLRM
from recframe.optim import dense_parameters, sparse_parameters
from recframe.optim.fused import shard_model
from recframe.optim.sparse import SparseAdam, SparseSGD


# --- _train_step overrides in every call order ------------------------------------------
def _order_trainer(order: str, set_to_none: bool) -> type[Trainer]:
    """A Trainer whose ``_train_step`` makes its optimizer calls in ``order``."""

    class OrderTrainer(Trainer):
        def _train_step(self, data, epoch, metrics):
            optimizers = (self.dense_optimizer, self.sparse_optimizer)
            loss = None
            for call in order.split(","):
                if call == "zero_grad":
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=set_to_none)
                elif call == "backward":
                    loss = self.model(data)
                    metrics.update(loss=loss)
                    loss.backward()
                elif call == "step":
                    for opt in optimizers:
                        opt.step()
                    self.dense_lr_scheduler.step()

    OrderTrainer.__name__ = f"OrderTrainer[{order}]"
    return OrderTrainer


ORDERS = {
    "recis": "zero_grad,backward,step",
    "torch": "backward,step,zero_grad",  # torch's tutorial order
    "zero-between": "backward,zero_grad,step",
}


def _run_toy(tmp_path, trainer_cls, base, batches, k, kind, **args):
    model = copy.deepcopy(base)
    dense, sparse = dense_parameters(model), sparse_parameters(model)
    if kind == "sgd":
        d, s = torch.optim.SGD(dense, lr=0.1, momentum=0.9), SparseSGD(sparse, lr=0.5)
    else:
        d, s = torch.optim.Adam(dense, lr=0.01), SparseAdam(sparse, lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(d, step_size=2, gamma=0.5)
    trainer = trainer_cls(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path / f"run{id(model)}"),
                               gradient_accumulation_steps=k, report_to="none",
                               disable_tqdm=True, log_steps=1000, **args),
        train_dataset=batches, dense_optimizers=(d, sched), sparse_optimizer=s,
    )
    trainer.train()
    return model, trainer


def _assert_same_params(ref, acc, atol=2e-6):
    for (name, a), (_, b) in zip(ref.named_parameters(), acc.named_parameters()):
        assert torch.allclose(a, b, atol=atol, rtol=1e-5), (name, (a - b).abs().max())


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zero_fill"])
@pytest.mark.parametrize("order", list(ORDERS), ids=list(ORDERS))
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_every_call_order_gives_the_big_batch_update(tmp_path, order, set_to_none, kind):
    torch.manual_seed(0)
    base = ToyCTR()
    big = make_batches(4, 32, seed=1)
    ref, ref_tr = _run_toy(tmp_path, Trainer, base, big, 1, kind)
    acc, acc_tr = _run_toy(tmp_path, _order_trainer(ORDERS[order], set_to_none), base,
                           split_batches(big, 4), 4, kind)
    assert acc_tr.global_step == 4 and acc_tr.state.skipped_updates == 0
    _assert_same_params(ref, acc)
    # the scheduler stepped once per update, after the optimizers
    assert acc_tr.dense_lr_scheduler.last_epoch == ref_tr.dense_lr_scheduler.last_epoch == 4
    for (name, p0), (_, p1) in zip(base.named_parameters(), acc.named_parameters()):
        assert not torch.equal(p0, p1), name


def test_set_to_none_false_leaves_zero_gradients_after_an_update(tmp_path):
    """The trainer's own zeroing after an update honours the ``set_to_none`` asked for."""
    torch.manual_seed(0)
    model, _ = _run_toy(tmp_path, _order_trainer(ORDERS["torch"], False), ToyCTR(sparse=False),
                        make_batches(2, 8), 2, "sgd")
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    model, _ = _run_toy(tmp_path, _order_trainer(ORDERS["torch"], True), ToyCTR(sparse=False),
                        make_batches(2, 8), 2, "sgd")
    assert all(p.grad is None for p in model.parameters())


# --- unequal micro-batches ---------------------------------------------------------------
def _split_dict(batches, first):
    """Each batch -> (its first ``first`` samples, the rest)."""
    out = []
    for b in batches:
        out.append({k: v[:first] for k, v in b.items()})
        out.append({k: v[first:] for k, v in b.items()})
    return out


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("sparse_grad", [True, False], ids=["sparse-grad", "dense-grad"])
def test_unequal_micro_batches_weigh_per_sample(tmp_path, kind, sparse_grad):
    torch.manual_seed(0)
    base = ToyCTR(sparse=sparse_grad)
    big = make_batches(3, 32, seed=2)
    ref, _ = _run_toy(tmp_path, Trainer, base, big, 1, kind)
    acc, tr = _run_toy(tmp_path, Trainer, base, _split_dict(big, 30), 2, kind)
    assert tr.global_step == 3 and tr.state.samples_seen == 96
    _assert_same_params(ref, acc)
    # 2 samples against 30 weighing half the update (the 1/k rule) is far from it
    per_mb, _ = _run_toy(tmp_path, Trainer, base, _split_dict(big, 30), 2, kind,
                         accumulation_weighting="micro_batches")
    assert (per_mb.mlp[0].weight - ref.mlp[0].weight).abs().max() > 1e-3


def test_unequal_micro_batches_in_any_call_order_and_odd_sizes(tmp_path):
    """Sizes 5, 20, 2, 5 (rescaled at each change) in torch's order == one batch of 32."""
    torch.manual_seed(0)
    base = ToyCTR()
    big = make_batches(2, 32, seed=3)
    micro = []
    for b in big:
        for lo, hi in ((0, 5), (5, 25), (25, 27), (27, 32)):
            micro.append({k: v[lo:hi] for k, v in b.items()})
    ref, _ = _run_toy(tmp_path, Trainer, base, big, 1, "adam")
    acc, _ = _run_toy(tmp_path, _order_trainer(ORDERS["torch"], True), base, micro, 4, "adam")
    _assert_same_params(ref, acc)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_micro_batches_weighting_is_the_mean_over_micro_batches(tmp_path, kind):
    """``accumulation_weighting="micro_batches"``: each micro-batch's mean loss weighs 1/k,
    as a hand-written loop that backpropagates (loss_1 + ... + loss_k) / k."""
    torch.manual_seed(0)
    base = ToyCTR()
    micro = _split_dict(make_batches(3, 32, seed=4), 30)
    acc, _ = _run_toy(tmp_path, Trainer, base, micro, 2, kind,
                      accumulation_weighting="micro_batches")
    hand = copy.deepcopy(base)
    dense, sparse = dense_parameters(hand), sparse_parameters(hand)
    if kind == "sgd":
        d, s = torch.optim.SGD(dense, lr=0.1, momentum=0.9), SparseSGD(sparse, lr=0.5)
    else:
        d, s = torch.optim.Adam(dense, lr=0.01), SparseAdam(sparse, lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(d, step_size=2, gamma=0.5)
    for i in range(0, len(micro), 2):
        d.zero_grad()
        s.zero_grad()
        for m in micro[i:i + 2]:
            (hand(m) / 2).backward()
        d.step()
        s.step()
        sched.step()
    _assert_same_params(hand, acc)


# --- the fused back end ----------------------------------------------------------------
FEATURES = ["cat_0", "cat_1", "cat_2"]
ROWS = 40


@pytest.fixture(scope="module")
def _process_group():
    existed = dist.is_initialized()
    yield
    if not existed and dist.is_initialized():
        dist.destroy_process_group()


def _dlrm() -> DLRM:
    torch.manual_seed(0)
    return DLRM(num_embeddings=ROWS, embedding_dim=4, dense_arch=(8, 4), over_arch=(8, 1),
                sparse_features=FEATURES)


def _criteo(n: int, batch_size: int = 32, seed: int = 1) -> list[Batch]:
    return list(SyntheticCriteo(num_batches=n, batch_size=batch_size, num_embeddings=ROWS,
                                num_sparse=len(FEATURES), ids_per_feature=(1, 3), seed=seed))


def _slice(batch: Batch, lo: int, hi: int) -> Batch:
    """Samples ``lo:hi`` of a torchrec `Batch`."""
    kjt = batch.sparse_features
    jts = kjt.to_dict()
    parts = {}
    for key in kjt.keys():
        jt = jts[key]
        offsets = jt.offsets()
        parts[key] = (jt.values()[offsets[lo]:offsets[hi]], jt.lengths()[lo:hi])
    keys = kjt.keys()
    sliced = KeyedJaggedTensor(keys=keys, values=torch.cat([parts[k][0] for k in keys]),
                               lengths=torch.cat([parts[k][1] for k in keys]))
    return Batch(dense_features=batch.dense_features[lo:hi], sparse_features=sliced,
                 labels=batch.labels[lo:hi])


def _fused_params(dmp) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in dmp.state_dict().items():
        if hasattr(value, "local_shards"):
            value = value.local_shards()[0].tensor
        out[key] = value.detach().clone()
    return out


def _fused_run(tmp_path, name, trainer_cls, batches, k, **args):
    dmp, sparse = shard_model(_dlrm(), optimizer=name, lr=0.1 if name != "sgd" else 0.5)
    dense = torch.optim.Adam(dense_parameters(dmp), lr=0.01) if name != "sgd" else (
        torch.optim.SGD(dense_parameters(dmp), lr=0.1, momentum=0.9))
    trainer = trainer_cls(
        model=dmp,
        args=TrainingArguments(output_dir=str(tmp_path / f"f{id(dmp)}"),
                               gradient_accumulation_steps=k, report_to="none",
                               disable_tqdm=True, log_steps=1000, save_steps=None, **args),
        train_dataset=batches, dense_optimizers=(dense, None), sparse_optimizer=sparse,
    )
    trainer.train()
    return _fused_params(dmp), sparse.state_dict()["iter"]


@pytest.mark.parametrize("name", [
    "sgd", "rowwise_adagrad",
    pytest.param("adam", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="fused Adam needs a GPU")),
])
def test_fused_unequal_micro_batches_weigh_per_sample(tmp_path, _process_group, name):
    big = _criteo(3)
    micro = [part for b in big for part in (_slice(b, 0, 30), _slice(b, 30, 32))]
    ref, ref_iter = _fused_run(tmp_path, name, Trainer, big, 1)
    acc, acc_iter = _fused_run(tmp_path, name, Trainer, micro, 2)
    assert ref_iter == acc_iter
    initial = _fused_params(shard_model(_dlrm(), optimizer=name)[0])
    for key in ref:
        tol = 1e-5 if name == "adam" else 1e-6  # as test_fused's GPU Adam test
        diff = (ref[key] - acc[key]).abs().max()
        assert torch.allclose(ref[key], acc[key], atol=tol), (key, diff)
        if "embedding_bags" in key:
            assert not torch.equal(initial[key], acc[key]), key
    per_mb, _ = _fused_run(tmp_path, name, Trainer, micro, 2,
                           accumulation_weighting="micro_batches")
    table = next(key for key in ref if "embedding_bags" in key)
    assert (per_mb[table] - ref[table]).abs().max() > 1e-3


@pytest.mark.parametrize("order", ["torch", "zero-between"])
def test_fused_accumulation_in_torch_order(tmp_path, _process_group, order):
    big = _criteo(2)
    micro = [_slice(b, lo, lo + 8) for b in big for lo in range(0, 32, 8)]
    ref, _ = _fused_run(tmp_path, "rowwise_adagrad", Trainer, big, 1)
    acc, _ = _fused_run(tmp_path, "rowwise_adagrad", _order_trainer(ORDERS[order], True),
                        micro, 4)
    for key in ref:
        assert torch.allclose(ref[key], acc[key], atol=1e-6), key


def test_step_updates_at_once_on_the_last_micro_batch_only(tmp_path):
    """``step()`` changes the parameters when it returns on a window's last micro-batch
    (so a scheduler of the user's own stepped right after it acts from the next update,
    as in torch), and not on the others."""
    changed = []

    class Probe(Trainer):
        def _train_step(self, data, epoch, metrics):
            loss = self.model(data)
            metrics.update(loss=loss)
            loss.backward()
            before = self.model.mlp[0].weight.detach().clone()
            self.dense_optimizer.step()
            self.sparse_optimizer.step()
            changed.append(not torch.equal(before, self.model.mlp[0].weight))

    torch.manual_seed(0)
    _run_toy(tmp_path, Probe, ToyCTR(), make_batches(6, 8), 3, "sgd")
    assert changed == [False, False, True] * 2


def test_a_step_called_on_an_early_micro_batch_only_runs_at_the_window_end(tmp_path):
    class StepFirstOnly(Trainer):
        def _train_step(self, data, epoch, metrics):
            loss = self.model(data)
            metrics.update(loss=loss)
            loss.backward()
            if self.window.is_first:
                self.dense_optimizer.step()
                self.sparse_optimizer.step()
                self.dense_lr_scheduler.step()

    torch.manual_seed(0)
    base = ToyCTR()
    big = make_batches(3, 32, seed=5)
    ref, ref_tr = _run_toy(tmp_path, Trainer, base, big, 1, "adam")
    acc, acc_tr = _run_toy(tmp_path, StepFirstOnly, base, split_batches(big, 4), 4, "adam")
    _assert_same_params(ref, acc)
    assert acc_tr.dense_lr_scheduler.last_epoch == ref_tr.dense_lr_scheduler.last_epoch == 3


def test_the_logged_loss_weighs_micro_batches_as_the_update(tmp_path):
    from recframe import Hook

    seen = []

    class Losses(Hook):
        def after_step(self, trainer, metrics):
            seen.append(float(metrics["loss"]))

    torch.manual_seed(0)
    base = ToyCTR()
    big = make_batches(2, 32, seed=6)
    micro = _split_dict(big, 30)
    with torch.no_grad():  # the big batches' mean loss, before training
        expected = [float(base(b)) for b in big]
    model = copy.deepcopy(base)
    trainer = Trainer(model, TrainingArguments(output_dir=str(tmp_path / "l"),
                                               gradient_accumulation_steps=2, report_to="none",
                                               disable_tqdm=True, log_steps=1000),
                      train_dataset=micro[:2], hooks=[Losses()],
                      dense_optimizers=(torch.optim.SGD(dense_parameters(model), lr=0.0), None),
                      sparse_optimizer=SparseSGD(sparse_parameters(model), lr=0.0))
    trainer.train()
    assert seen == pytest.approx(expected[:1], rel=1e-6)
