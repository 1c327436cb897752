"""recframe's sparse-gradient optimizers (recframe.optim.sparse): each against a
reference, repeated ids, dense-gradient input, LR schedulers, state round trips, exact
gradient accumulation through the Trainer, argument errors, and the check that a dense
optimizer holds no embedding table."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from conftest import ToyCTR, make_batches, split_batches
from test_accumulation import RecISStyleTrainer
from torch import nn

from recframe import Trainer, TrainingArguments
from recframe.optim import dense_parameters, sparse_parameters
from recframe.optim.sparse import (
    SPARSE_OPTIMIZERS,
    RowWiseAdagrad,
    SparseAdagrad,
    SparseAdam,
    SparseAdamW,
    SparseSGD,
    build_sparse_optimizer,
    warn_if_dense_optimizer_holds_tables,
)

ROWS, DIM = 24, 4
HPARAMS = {  # lrs large enough that every step moves the tables visibly
    "sgd": {"lr": 0.5},
    "adagrad": {"lr": 0.3},
    "rowwise_adagrad": {"lr": 0.3},
    "adam": {"lr": 0.05},
    "adamw": {"lr": 0.05, "weight_decay": 0.1},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _table(sparse: bool = True, seed: int = 0) -> nn.EmbeddingBag:
    torch.manual_seed(seed)
    return nn.EmbeddingBag(ROWS, DIM, mode="sum", sparse=sparse)


def _id_batches(n: int = 5, seed: int = 1, high: int = ROWS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # bags of 3 ids from the first `high` rows: repeats within and across bags
    return [torch.randint(0, high, (6, 3), generator=g) for _ in range(n)]


def _targets(seed: int = 2) -> torch.Tensor:
    return torch.randn(6, DIM, generator=torch.Generator().manual_seed(seed))


def _loss(table: nn.EmbeddingBag, ids: torch.Tensor) -> torch.Tensor:
    return (table(ids) - _targets()).pow(2).sum()


def _train(table: nn.EmbeddingBag, opt, batches) -> None:
    for ids in batches:
        opt.zero_grad()
        _loss(table, ids).backward()
        opt.step()


def _assert_close_and_trained(ours, ref, before, atol=1e-6):
    assert torch.allclose(ours, ref, atol=atol, rtol=1e-5), (ours - ref).abs().max()
    assert not torch.equal(ours, before)  # training moved the table at all


# --- each optimizer against a reference --------------------------------------------------
def test_sparse_adam_matches_torch_sparse_adam():
    a, b = _table(), _table()
    before = a.weight.detach().clone()
    ours = SparseAdam(a.parameters(), lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    ref = torch.optim.SparseAdam(list(b.parameters()), lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    batches = _id_batches(6, high=12)  # rows 12.. never touched
    _train(a, ours, batches)
    _train(b, ref, batches)
    _assert_close_and_trained(a.weight, b.weight, before)
    assert torch.equal(a.weight[12:], before[12:])  # lazy: untouched rows stay put
    assert ours.state[a.weight]["step"] == ref.state[b.weight]["step"] == 6
    assert torch.allclose(ours.state[a.weight]["exp_avg_sq"], ref.state[b.weight]["exp_avg_sq"],
                          atol=1e-7)


def test_sparse_adam_counts_a_step_on_an_empty_gradient_as_torch_does():
    a, b = _table(), _table()
    ours, ref = SparseAdam(a.parameters(), lr=0.05), torch.optim.SparseAdam([b.weight], lr=0.05)
    empty = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, DIM),
                                    (ROWS, DIM), check_invariants=True)
    for table, opt in ((a, ours), (b, ref)):
        _train(table, opt, _id_batches(1))
        table.weight.grad = empty.clone()
        opt.step()
        _train(table, opt, _id_batches(1, seed=5))
    assert ours.state[a.weight]["step"] == ref.state[b.weight]["step"] == 3
    assert torch.allclose(a.weight, b.weight, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("initial", [0.0, 0.1])
def test_sparse_adagrad_matches_torch_adagrad_on_sparse_gradients(initial):
    a, b = _table(), _table()
    before = a.weight.detach().clone()
    ours = SparseAdagrad(a.parameters(), lr=0.3, eps=1e-8, initial_accumulator_value=initial)
    ref = torch.optim.Adagrad(b.parameters(), lr=0.3, eps=1e-8,
                              initial_accumulator_value=initial)
    batches = _id_batches(6, high=12)
    _train(a, ours, batches)
    _train(b, ref, batches)
    _assert_close_and_trained(a.weight, b.weight, before)
    assert torch.equal(a.weight[12:], before[12:])


def test_sparse_sgd_matches_torch_sgd():
    a, b = _table(), _table()
    before = a.weight.detach().clone()
    _train(a, SparseSGD(a.parameters(), lr=0.5), _id_batches(6))
    _train(b, torch.optim.SGD(b.parameters(), lr=0.5), _id_batches(6))
    _assert_close_and_trained(a.weight, b.weight, before)


def test_rowwise_adagrad_matches_the_formula():
    """s_i += mean_j(g_ij^2); w_i -= lr * g_i / (sqrt(s_i) + eps), rows touched only."""
    a = _table()
    w = a.weight.detach().clone().double()
    before = w.clone()
    s = torch.zeros(ROWS, dtype=torch.float64)
    lr, eps = 0.3, 1e-6
    opt = RowWiseAdagrad(a.parameters(), lr=lr, eps=eps)
    for ids in _id_batches(6, high=12):
        opt.zero_grad()
        _loss(a, ids).backward()
        g = a.weight.grad.coalesce().to_dense().double()
        for i in range(ROWS):
            if ids.eq(i).any():
                s[i] += g[i].pow(2).mean()
                w[i] -= lr * g[i] / (math.sqrt(s[i]) + eps)
        opt.step()
    assert torch.allclose(a.weight.double(), w, atol=1e-5)
    assert not torch.allclose(w, before)
    assert torch.equal(a.weight[12:].double(), before[12:])
    assert opt.state[a.weight]["sum"].shape == (ROWS,)  # one accumulator per row
    assert torch.allclose(opt.state[a.weight]["sum"].double(), s, atol=1e-6)


def test_sparse_adamw_equals_torch_adamw_when_every_row_is_touched():
    a, b = _table(), _table(sparse=False)
    before = a.weight.detach().clone()
    ours = SparseAdamW(a.parameters(), lr=0.05, weight_decay=0.2)
    ref = torch.optim.AdamW(b.parameters(), lr=0.05, weight_decay=0.2)
    all_rows = [torch.randperm(ROWS, generator=torch.Generator().manual_seed(s)).view(6, 4)
                for s in range(4)]
    _train(a, ours, all_rows)
    _train(b, ref, all_rows)
    _assert_close_and_trained(a.weight, b.weight, before)


def test_sparse_adamw_decays_touched_rows_only():
    a, plain = _table(), _table()
    before = a.weight.detach().clone()
    decayed = SparseAdamW(a.parameters(), lr=0.05, weight_decay=0.5)
    undecayed = SparseAdam(plain.parameters(), lr=0.05)
    batches = _id_batches(4, high=10)
    _train(a, decayed, batches)
    _train(plain, undecayed, batches)
    assert torch.equal(a.weight[10:], before[10:])  # untouched rows: bit-identical
    touched = torch.unique(torch.cat([b.flatten() for b in batches]))
    assert not torch.allclose(a.weight[touched], plain.weight[touched], atol=1e-4)
    # one step by hand: w *= 1 - lr*wd, then the Adam update of SparseAdam
    t1, t2 = _table(), _table()
    o1 = SparseAdamW(t1.parameters(), lr=0.05, weight_decay=0.5)
    o2 = SparseAdam(t2.parameters(), lr=0.05)
    _train(t1, o1, batches[:1])
    with torch.no_grad():
        rows = torch.unique(batches[0])
        t2.weight[rows] *= 1 - 0.05 * 0.5
    _train(t2, o2, batches[:1])
    assert torch.allclose(t1.weight, t2.weight, atol=1e-7)


# --- gradients: repeated ids, dense input, accumulation scale -----------------------------
@pytest.mark.parametrize("name", sorted(SPARSE_OPTIMIZERS))
def test_repeated_ids_are_merged_before_the_update(name):
    """An uncoalesced gradient with repeated rows updates like its merged sum."""
    idx = torch.tensor([[3, 5, 3, 3, 7]])
    vals = torch.randn(5, DIM, generator=torch.Generator().manual_seed(0))
    dup = torch.sparse_coo_tensor(idx, vals, (ROWS, DIM))
    merged = dup.coalesce()
    assert merged._nnz() == 3
    results = []
    for grad in (dup, merged, None):
        t = _table()
        opt = SPARSE_OPTIMIZERS[name](t.parameters(), **HPARAMS[name])
        if grad is None:  # each occurrence as its own step: what merging must not do
            for k in range(5):
                t.weight.grad = torch.sparse_coo_tensor(idx[:, k:k + 1], vals[k:k + 1],
                                                        (ROWS, DIM))
                opt.step()
        else:
            for _ in range(2):
                t.weight.grad = grad.clone()
                opt.step()
        results.append(t.weight.detach().clone())
    assert torch.allclose(results[0], results[1], atol=1e-6)
    assert not torch.allclose(results[0], results[2], atol=1e-4)
    assert not torch.equal(results[0], _table().weight)


@pytest.mark.parametrize("name", sorted(SPARSE_OPTIMIZERS))
def test_dense_gradients_update_like_sparse_ones(name):
    s, d = _table(sparse=True), _table(sparse=False)
    before = s.weight.detach().clone()
    _train(s, SPARSE_OPTIMIZERS[name](s.parameters(), **HPARAMS[name]), _id_batches(5, high=12))
    _train(d, SPARSE_OPTIMIZERS[name](d.parameters(), **HPARAMS[name]), _id_batches(5, high=12))
    assert d.weight.grad is not None and not d.weight.grad.is_sparse
    _assert_close_and_trained(d.weight, s.weight, before)
    assert torch.equal(d.weight[12:], before[12:])


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-grad", "dense-grad"])
def test_scale_accumulated_gradients_is_folded_into_the_next_step(sparse):
    a, b = _table(sparse), _table(sparse)
    oa, ob = SparseAdagrad(a.parameters(), lr=0.3), SparseAdagrad(b.parameters(), lr=0.3)
    ids = _id_batches(1)[0]
    _loss(a, ids).backward()
    (_loss(b, ids) * 0.25).backward()
    oa.scale_accumulated_gradients(0.5)
    oa.scale_accumulated_gradients(0.5)
    oa.step()
    ob.step()
    assert torch.allclose(a.weight, b.weight, atol=1e-6)
    # consumed by the step, and reset by zero_grad
    oa.scale_accumulated_gradients(0.0)
    oa.zero_grad()
    _loss(a, ids).backward()
    snapshot = a.weight.detach().clone()
    oa.step()
    assert not torch.equal(a.weight, snapshot)


# --- learning rate and state ----------------------------------------------------------
def test_a_torch_lr_scheduler_drives_the_learning_rate():
    t = _table()
    opt = SparseSGD(t.parameters(), lr=0.4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ids = _id_batches(1)[0]
    moves = []
    for _ in range(3):
        opt.zero_grad()
        _loss(t, ids).backward()
        grad = t.weight.grad.coalesce().to_dense()
        before = t.weight.detach().clone()
        opt.step()
        moves.append(float((before - t.weight.detach()).norm() / grad.norm()))
        sched.step()
    assert moves == pytest.approx([0.4, 0.2, 0.1], rel=1e-4)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def _save_load(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("name", sorted(SPARSE_OPTIMIZERS))
def test_state_dict_round_trip_then_training_continues_identically(name):
    batches = _id_batches(8)
    straight = _table()
    opt = SPARSE_OPTIMIZERS[name](straight.parameters(), **HPARAMS[name])
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7)
    saved = None
    for i, ids in enumerate(batches):
        if i == 4:
            saved = _save_load({"table": straight.state_dict(), "opt": opt.state_dict(),
                                "sched": sched.state_dict()})
        _train(straight, opt, [ids])
        sched.step()
    resumed = _table(seed=99)  # different initial values: everything comes from the state
    opt2 = SPARSE_OPTIMIZERS[name](resumed.parameters(), **HPARAMS[name])
    sched2 = torch.optim.lr_scheduler.ExponentialLR(opt2, gamma=0.7)
    resumed.load_state_dict(saved["table"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(HPARAMS[name]["lr"] * 0.7**4)
    for ids in batches[4:]:
        _train(resumed, opt2, [ids])
        sched2.step()
    assert torch.equal(resumed.weight, straight.weight)
    assert not torch.equal(resumed.weight, _table().weight)
    if name in ("adam", "adamw"):
        assert opt2.state[resumed.weight]["step"] == 8
    if name == "rowwise_adagrad":
        assert opt2.state[resumed.weight]["sum"].dtype == torch.float32


# --- exact accumulation through the Trainer ------------------------------------------
def _trainer_run(tmp_path, trainer_cls, base, batches, k, name, tag, steps=None, save=None):
    model = copy.deepcopy(base)
    dense = torch.optim.SGD(dense_parameters(model), lr=0.1, momentum=0.9)
    sparse = build_sparse_optimizer(model, name, **HPARAMS[name])
    args = TrainingArguments(
        output_dir=str(tmp_path / tag), gradient_accumulation_steps=k, report_to="none",
        disable_tqdm=True, log_steps=1000, save_steps=save,
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=batches,
                          dense_optimizers=(dense, None), sparse_optimizer=sparse)
    trainer.train(train_steps=steps)
    return model, trainer


@pytest.mark.parametrize("trainer_cls", [Trainer, RecISStyleTrainer], ids=["default", "recis"])
@pytest.mark.parametrize("name", sorted(SPARSE_OPTIMIZERS))
def test_k_micro_batches_equal_one_big_batch(tmp_path, trainer_cls, name):
    torch.manual_seed(0)
    base = ToyCTR(num_embeddings=32, sparse=True)
    big = make_batches(4, 32, seed=1, num_embeddings=32)
    ref, ref_tr = _trainer_run(tmp_path, trainer_cls, base, big, 1, name, "k1")
    acc, acc_tr = _trainer_run(tmp_path, trainer_cls, base, split_batches(big, 4), 4, name, "k4")
    assert ref_tr.global_step == acc_tr.global_step == 4
    assert acc_tr.state.micro_step == 16
    for (key, p_ref), (_, p_acc) in zip(ref.named_parameters(), acc.named_parameters()):
        assert torch.allclose(p_ref, p_acc, atol=2e-6, rtol=1e-5), key
    for (key, p0), (_, p1) in zip(base.named_parameters(), acc.named_parameters()):
        assert not torch.equal(p0, p1), key
    if name in ("adam", "adamw"):  # one optimizer step per window, not per micro-batch
        assert acc_tr.sparse_optimizer.optimizer.state[acc.emb.weight]["step"] == 4


def test_accumulation_with_dense_gradient_tables(tmp_path):
    torch.manual_seed(0)
    base = ToyCTR(num_embeddings=32, sparse=False)
    big = make_batches(3, 32, seed=2, num_embeddings=32)
    ref, _ = _trainer_run(tmp_path, Trainer, base, big, 1, "adam", "k1")
    acc, _ = _trainer_run(tmp_path, Trainer, base, split_batches(big, 4), 4, "adam", "k4")
    assert torch.allclose(ref.emb.weight, acc.emb.weight, atol=2e-6)
    assert not torch.equal(base.emb.weight, acc.emb.weight)


def test_last_partial_window_averages_over_its_micro_batches(tmp_path):
    torch.manual_seed(0)
    base = ToyCTR(num_embeddings=32)
    micro = make_batches(5, 16, seed=2, num_embeddings=32)
    acc, tr = _trainer_run(tmp_path, Trainer, base, micro, 2, "rowwise_adagrad", "k2")
    assert tr.global_step == 3
    merged = [{k: torch.cat([micro[i][k], micro[i + 1][k]]) for k in micro[0]} for i in (0, 2)]
    ref, _ = _trainer_run(tmp_path, Trainer, base, merged + [micro[4]], 1, "rowwise_adagrad",
                          "k1")
    for (key, a), (_, b) in zip(ref.named_parameters(), acc.named_parameters()):
        assert torch.allclose(a, b, atol=2e-6), key


@pytest.mark.parametrize("name", ["adam", "rowwise_adagrad"])
def test_trainer_checkpoint_resume_continues_identically(tmp_path, name):
    torch.manual_seed(0)
    base = ToyCTR(num_embeddings=32)
    data = make_batches(6, 16, seed=3, num_embeddings=32)
    straight, _ = _trainer_run(tmp_path, Trainer, base, data, 2, name, "straight", steps=3)
    _trainer_run(tmp_path, Trainer, base, data, 2, name, "resumed", steps=2, save=1)
    # a different model and a fresh optimizer: only the checkpoint can make them equal
    other = ToyCTR(num_embeddings=32)
    resumed, tr = _trainer_run(tmp_path, Trainer, other, data, 2, name, "resumed", steps=3)
    assert tr.global_step == 3
    for (key, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), key
    state = tr.sparse_optimizer.optimizer.state[resumed.emb.weight]
    assert state.get("step", 3) == 3


# --- errors ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: SparseSGD(p, lr=-1.0), "lr"),
        (lambda p: SparseAdam(p, lr="0.1"), "lr"),
        (lambda p: SparseAdagrad(p, eps=0.0), "eps"),
        (lambda p: RowWiseAdagrad(p, eps=-1e-8), "eps"),
        (lambda p: SparseAdam(p, betas=(1.0, 0.9)), "betas"),
        (lambda p: SparseAdam(p, weight_decay=0.1), "SparseAdamW"),
        (lambda p: SparseAdamW(p, weight_decay=-0.1), "weight_decay"),
        (lambda p: SparseSGD([{"params": p, "lr": float("nan")}]), "lr"),
    ],
    ids=["neg-lr", "str-lr", "zero-eps", "neg-eps", "beta1", "adam-wd", "adamw-neg-wd",
         "nan-group-lr"],
)
def test_bad_arguments_are_value_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make(list(_table().parameters()))


def test_non_table_parameters_are_refused():
    with pytest.raises(ValueError, match="2-D embedding tables"):
        SparseAdam([nn.Parameter(torch.zeros(5))])
    with pytest.raises(ValueError, match="dense_parameters"):
        RowWiseAdagrad(nn.Linear(3, 2).parameters())


def test_build_sparse_optimizer_by_name():
    model = ToyCTR()
    opt = build_sparse_optimizer(model, "AdamW", lr=0.01)
    assert isinstance(opt, SparseAdamW)
    assert [p for g in opt.param_groups for p in g["params"]] == sparse_parameters(model)
    with pytest.raises(ValueError, match="unknown sparse optimizer"):
        build_sparse_optimizer(model, "lamb")
    with pytest.raises(ValueError, match="no embedding tables"):
        build_sparse_optimizer(nn.Sequential(nn.Linear(2, 1)), "sgd")


# --- a dense optimizer holding tables --------------------------------------------------
def test_dense_optimizer_holding_a_sparse_gradient_table_is_an_error():
    model = ToyCTR(sparse=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"emb\.weight \(64x4\).*dense_parameters"):
        warn_if_dense_optimizer_holds_tables(opt, model)


def test_dense_optimizer_holding_a_dense_gradient_table_warns():
    model = ToyCTR(sparse=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match=r"emb\.weight \(64x4\).*dense_parameters"):
        warn_if_dense_optimizer_holds_tables(opt, model)


def test_dense_optimizer_holding_torchrec_tables_warns_with_their_names():
    from recframe.models import DLRM

    model = DLRM(num_embeddings=20, embedding_dim=4, dense_arch=(4,), over_arch=(4, 1),
                 sparse_features=["cat_0", "cat_1"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match=r"embedding_bags\.t_cat_0\.weight \(20x4\)") as rec:
        warn_if_dense_optimizer_holds_tables(opt, model)
    assert "t_cat_1" in str(rec[0].message)


def test_a_proper_split_passes_the_check_silently():
    model = ToyCTR(sparse=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_dense_optimizer_holds_tables(torch.optim.AdamW(dense_parameters(model)), model)
        warn_if_dense_optimizer_holds_tables(None, model)


def test_rowwise_adagrad_state_stays_float32_after_loading_into_a_float64_table():
    t = _table().double()
    opt = RowWiseAdagrad(t.parameters(), lr=0.1)
    opt.zero_grad()
    t(_id_batches(1)[0]).sum().backward()
    opt.step()
    opt2 = RowWiseAdagrad(t.parameters(), lr=0.1)
    opt2.load_state_dict(_save_load(opt.state_dict()))
    assert opt2.state[t.weight]["sum"].dtype == torch.float32
    assert torch.equal(opt2.state[t.weight]["sum"], opt.state[t.weight]["sum"])
