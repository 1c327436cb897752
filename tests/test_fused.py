"""The fused back end (recframe.optim.fused): torchrec DistributedModelParallel with
fbgemm's fused optimizers on CPU (a gloo group of one process), its parity with the
sparse-gradient back end, LR schedulers, exact gradient accumulation through the
Trainer, state round trips and the no-grad path while lookups are deferred."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
from test_accumulation import RecISStyleTrainer
from torchrec.datasets.utils import Batch

from recframe import Trainer, TrainingArguments
from recframe.data import SyntheticCriteo, split_batch
from recframe.models import DLRM
from recframe.optim import dense_parameters, sparse_parameters
from recframe.optim.fused import (
    CPU_FUSED_OPTIMIZERS,
    FusedSparseOptimizer,
    concat_kjt_batches,
    shard_model,
)
from recframe.optim.sparse import (
    RowWiseAdagrad,
    SparseAdagrad,
    SparseSGD,
    warn_if_dense_optimizer_holds_tables,
)

FEATURES = ["cat_0", "cat_1", "cat_2"]
ROWS = 40
LR = {"rowwise_adagrad": 0.1, "adagrad": 0.1, "sgd": 0.5, "adam": 0.05}
REFERENCE = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": SparseAdagrad, "sgd": SparseSGD}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def _own_process_group():
    """shard_model starts a gloo group of one; the tests here share it, and it is
    taken down afterwards unless it existed before (other modules run without one)."""
    existed = dist.is_initialized()
    yield
    if not existed and dist.is_initialized():
        dist.destroy_process_group()


def _model(seed: int = 0) -> DLRM:
    torch.manual_seed(seed)
    return DLRM(num_embeddings=ROWS, embedding_dim=4, dense_arch=(8, 4), over_arch=(8, 1),
                sparse_features=FEATURES)


def _data(n: int = 3, batch_size: int = 32, seed: int = 1) -> list[Batch]:
    return list(SyntheticCriteo(num_batches=n, batch_size=batch_size, num_embeddings=ROWS,
                                num_sparse=len(FEATURES), ids_per_feature=(1, 3), seed=seed))


def _tables(dmp) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in dmp.state_dict().items():
        if "embedding_bags" in key:
            shards = value.local_shards()
            assert len(shards) == 1
            out[key.split(".")[-2]] = shards[0].tensor.detach().clone()
    return out


def _unsharded_tables(model) -> dict[str, torch.Tensor]:
    return {f"t_{f}": model.ebc.embedding_bags[f"t_{f}"].weight.detach().clone()
            for f in FEATURES}


def _params(dmp) -> dict[str, torch.Tensor]:
    out = {f"dense.{i}": p.detach().clone() for i, p in enumerate(dense_parameters(dmp))}
    out.update(_tables(dmp))
    return out


def _hand_loop(dmp, sparse, batches, dense_lr=0.1):
    dense = torch.optim.SGD(dense_parameters(dmp), lr=dense_lr)
    for b in batches:
        dense.zero_grad()
        sparse.zero_grad()
        dmp(b).backward()
        dense.step()
        sparse.step()


# --- sharding --------------------------------------------------------------------------
def test_shard_model_uses_fused_kernels_and_keeps_the_initial_tables():
    model = _model()
    initial = _unsharded_tables(model)
    dmp, sparse = shard_model(model, lr=0.1)
    plan = dmp.plan.plan["model.sparse_arch.embedding_bag_collection"]
    assert set(plan) == {f"t_{f}" for f in FEATURES}
    for table, ps in plan.items():
        assert ps.compute_kernel == "fused", table
        assert ps.sharding_type != "data_parallel", table
    tables = _tables(dmp)
    assert tables.keys() == initial.keys()
    for name in tables:
        assert torch.equal(tables[name], initial[name]), name
    assert isinstance(sparse, FusedSparseOptimizer)
    assert sparse.param_groups and sparse.param_groups[0]["lr"] == pytest.approx(0.1)
    assert len(sparse_parameters(dmp)) == len(FEATURES)
    assert len(dense_parameters(dmp)) == 8  # 2 + 2 layers, weight and bias each


def test_the_gloo_group_of_one_is_shared_by_later_calls():
    shard_model(_model())
    group = dist.group.WORLD
    assert dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    dmp, sparse = shard_model(_model(1))
    assert dist.group.WORLD is group
    before = _tables(dmp)
    _hand_loop(dmp, sparse, _data(1))
    assert any(not torch.equal(before[k], v) for k, v in _tables(dmp).items())


def test_a_world_of_one_skips_ddp_and_trains_like_it():
    """DDP in a world of one all-reduces each gradient with itself: shard_model leaves it
    out there (data_parallel=None); with data_parallel=True the training is the same."""
    from torch.nn.parallel import DistributedDataParallel

    plain, sparse = shard_model(_model())
    ddp, ddp_sparse = shard_model(_model(), data_parallel=True)
    assert not isinstance(plain._dmp_wrapped_module, DistributedDataParallel)
    assert isinstance(ddp._dmp_wrapped_module, DistributedDataParallel)
    assert list(plain.state_dict()) == list(ddp.state_dict())
    batches = _data(3, seed=8)
    _hand_loop(plain, sparse, batches)
    _hand_loop(ddp, ddp_sparse, batches)
    a, b = _params(plain), _params(ddp)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-7), key
    assert not torch.equal(a["t_cat_0"], _tables(shard_model(_model())[0])["t_cat_0"])


@pytest.mark.parametrize("name", CPU_FUSED_OPTIMIZERS)
def test_fused_optimizers_train_like_the_sparse_gradient_back_end(name):
    """The fused kernel and recframe's optimizer of the same name, from the same start
    on the same batches, give the same tables (and only touched rows move)."""
    base = _model()
    reference = copy.deepcopy(base)
    initial = _unsharded_tables(base)
    dmp, sparse = shard_model(base, optimizer=name, lr=LR[name],
                              **({} if name == "sgd" else {"eps": 1e-8}))
    batches = _data(3, seed=4)
    _hand_loop(dmp, sparse, batches)
    ref_opt = REFERENCE[name](sparse_parameters(reference), lr=LR[name],
                              **({} if name == "sgd" else {"eps": 1e-8}))
    _hand_loop(reference, ref_opt, batches)
    fused, ref = _tables(dmp), _unsharded_tables(reference)
    seen = {f: torch.cat([b.sparse_features[f].values() for b in batches]).unique()
            for f in FEATURES}
    for f in FEATURES:
        t = f"t_{f}"
        assert torch.allclose(fused[t], ref[t], atol=1e-5), (name, t)
        assert not torch.equal(fused[t], initial[t]), (name, t)
        untouched = torch.ones(ROWS, dtype=torch.bool)
        untouched[seen[f]] = False
        assert torch.equal(fused[t][untouched], initial[t][untouched]), (name, t)


def test_fused_adam_on_cpu_is_a_clear_error():
    model = _model()
    with pytest.raises(ValueError, match="no fused CPU kernel.*SparseAdam"):
        shard_model(model, optimizer="adam", device=torch.device("cpu"))
    # nothing was changed: the same model still shards with a CPU kernel
    dmp, _ = shard_model(model, optimizer="sgd", device=torch.device("cpu"))
    assert dmp is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fused Adam needs a GPU")
def test_fused_adam_on_gpu_accumulates_exactly(tmp_path):  # pragma: no cover - GPU only
    dev = torch.device("cuda")
    big = _data(3)
    results = []
    for k, batches in ((1, big), (4, [m for b in big for m in split_batch(b, 4)])):
        dmp, sparse = shard_model(_model(), optimizer="adam", lr=0.05, device=dev)
        results.append(_trainer_run(tmp_path / f"k{k}", Trainer, dmp, sparse, batches, k))
    for key in results[0]:
        assert torch.allclose(results[0][key].cpu(), results[1][key].cpu(), atol=1e-5), key


def test_shard_model_errors():
    with pytest.raises(ValueError, match="no torchrec EmbeddingBagCollection"):
        shard_model(torch.nn.Sequential(torch.nn.Linear(2, 1)))
    with pytest.raises(ValueError, match="unknown fused optimizer"):
        shard_model(_model(), optimizer="lamb")
    with pytest.raises(ValueError, match="lr"):
        shard_model(_model(), lr=-0.1)
    model = _model()
    shard_model(model)
    with pytest.raises(ValueError, match="no torchrec|already"):
        shard_model(model)


def test_fused_tables_in_a_dense_optimizer_are_an_error():
    dmp, _ = shard_model(_model())
    everything = torch.optim.Adam(dmp.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"inside backward.*t_cat_0\.weight"):
        warn_if_dense_optimizer_holds_tables(everything, dmp)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_dense_optimizer_holds_tables(torch.optim.Adam(dense_parameters(dmp)), dmp)


# --- learning rate ---------------------------------------------------------------------
def test_a_torch_scheduler_drives_the_fused_learning_rate():
    """With the dense part frozen (lr 0), the table gradient of a batch is the same in
    both runs, so SGD's update on it scales exactly with the scheduled lr."""
    deltas = []
    for gamma in (1.0, 0.1):
        dmp, sparse = shard_model(_model(), optimizer="sgd", lr=0.5)
        sched = torch.optim.lr_scheduler.StepLR(sparse, step_size=1, gamma=gamma)
        batch = _data(1)[0]
        _hand_loop(dmp, sparse, [batch], dense_lr=0.0)
        sched.step()
        before = _tables(dmp)
        _hand_loop(dmp, sparse, [batch], dense_lr=0.0)
        after = _tables(dmp)
        deltas.append(torch.cat([(after[k] - before[k]).flatten() for k in before]))
        assert sparse.param_groups[0]["lr"] == pytest.approx(0.5 * gamma)
    assert deltas[0].abs().max() > 1e-3
    assert torch.allclose(deltas[1], 0.1 * deltas[0], atol=1e-6, rtol=1e-4)


# --- accumulation through the Trainer --------------------------------------------------
def _trainer_run(out, trainer_cls, dmp, sparse, batches, k, steps=None, save=None):
    dense = torch.optim.SGD(dense_parameters(dmp), lr=0.1, momentum=0.9)
    args = TrainingArguments(output_dir=str(out), gradient_accumulation_steps=k,
                             report_to="none", disable_tqdm=True, log_steps=1000,
                             save_steps=save)
    trainer = trainer_cls(model=dmp, args=args, train_dataset=batches,
                          dense_optimizers=(dense, None), sparse_optimizer=sparse)
    trainer.train(train_steps=steps)
    return _params(dmp)


@pytest.mark.parametrize("trainer_cls", [Trainer, RecISStyleTrainer], ids=["default", "recis"])
@pytest.mark.parametrize("name", CPU_FUSED_OPTIMIZERS)
def test_k_micro_batches_equal_one_big_batch(tmp_path, trainer_cls, name):
    big = _data(3)
    micro = [m for b in big for m in split_batch(b, 4)]
    initial = _params(shard_model(_model(), optimizer=name, lr=LR[name])[0])
    runs = []
    for k, batches in ((1, big), (4, micro)):
        dmp, sparse = shard_model(_model(), optimizer=name, lr=LR[name])
        runs.append(_trainer_run(tmp_path / f"k{k}", trainer_cls, dmp, sparse, batches, k))
        runs[-1]["iter"] = torch.tensor(sparse.state_dict()["iter"])
    ref, acc = runs
    for key in initial:
        assert torch.allclose(ref[key], acc[key], atol=1e-6), key
        assert not torch.equal(initial[key], acc[key]), key
    assert torch.equal(ref["iter"], acc["iter"])  # one kernel iteration per update


def test_last_partial_window_averages_over_its_micro_batches(tmp_path):
    big = _data(2)
    tail = _data(1, batch_size=16, seed=7)[0]
    micro = [*split_batch(big[0], 2), *split_batch(big[1], 2), tail]  # windows 2, 2, 1
    ref = _trainer_run(tmp_path / "k1", Trainer, *shard_model(_model()), [*big, tail], 1)
    acc = _trainer_run(tmp_path / "k2", Trainer, *shard_model(_model()), micro, 2)
    for key in ref:
        assert torch.allclose(ref[key], acc[key], atol=1e-6), key


def test_the_window_is_looked_up_on_its_last_micro_batch(tmp_path):
    """k-1 look-ahead lookups and one lookup of the whole window (with autograd) on the
    last micro-batch: no extra lookup at step."""
    seen = []

    class Probe(Trainer):
        def _train_step(self, data, epoch, metrics):
            loss = self.model(data)
            metrics.update(loss=loss)
            loss.backward()
            last = self.sparse_optimizer.optimizer._records[0][-1]
            seen.append((self.window.is_boundary, last.window_output is not None))
            self.dense_optimizer.step()
            self.sparse_optimizer.step()

    micro = [m for b in _data(2, batch_size=36) for m in split_batch(b, 3)]
    _trainer_run(tmp_path, Probe, *shard_model(_model()), micro, 3)
    assert seen == [(False, False), (False, False), (True, True)] * 2


class _NeverBoundary:
    """A window that never marks a last micro-batch: the window's lookup is made at
    ``step``."""

    steps = 4
    is_boundary = False


@pytest.mark.parametrize("window", [None, _NeverBoundary()], ids=["own-loop", "replay-at-step"])
def test_a_hand_written_accumulation_loop_updates_like_one_big_batch(window):
    """Outside the Trainer: each micro-batch's loss divided by k, one step per window."""
    from recframe.optim.core import AccumulationWindow

    big = _data(2)
    ref, ref_sparse = shard_model(_model())
    _hand_loop(ref, ref_sparse, big)
    dmp, sparse = shard_model(_model())
    own = AccumulationWindow(4)
    sparse.bind_accumulation_window(window or own)
    dense = torch.optim.SGD(dense_parameters(dmp), lr=0.1)
    for b in big:
        dense.zero_grad()
        sparse.zero_grad()
        for i, m in enumerate(split_batch(b, 4)):
            own.begin(i, 4, {})
            (dmp(m) / 4).backward()
        dense.step()
        sparse.step()
    a, b = _params(ref), _params(dmp)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert not torch.equal(a["t_cat_0"], _tables(shard_model(_model())[0])["t_cat_0"])


def test_concat_kjt_batches_is_the_inverse_of_split_batch():
    big = _data(1)[0]
    parts = split_batch(big, 4)
    joined = concat_kjt_batches([p.sparse_features for p in parts])
    assert joined.keys() == big.sparse_features.keys()
    assert torch.equal(joined.values(), big.sparse_features.values())
    assert torch.equal(joined.lengths(), big.sparse_features.lengths().to(joined.lengths().dtype))


# --- state -------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["sharded", "whole", "no-lr"])
def test_state_dict_round_trip_continues_identically(form):
    """``whole``: the optimizer state as plain (unsharded) tensors, as a checkpoint that
    materialises tensors gives them back; ``no-lr``: a state without param groups (the
    optimizer keeps its own lr, set here to the saved one)."""
    batches = _data(4, seed=5)
    dmp, sparse = shard_model(_model(), lr=0.1)
    dense = torch.optim.SGD(dense_parameters(dmp), lr=0.1, momentum=0.9)

    def step(model, dense_opt, sparse_opt, batch):
        dense_opt.zero_grad()
        sparse_opt.zero_grad()
        model(batch).backward()
        dense_opt.step()
        sparse_opt.step()

    for b in batches[:2]:
        step(dmp, dense, sparse, b)
    sparse.param_groups[0]["lr"] = 0.05  # a scheduled lr must come back too
    saved = copy.deepcopy({"model": dmp.state_dict(), "dense": dense.state_dict(),
                           "sparse": sparse.state_dict()})
    assert saved["sparse"]["param_groups"][0]["lr"] == pytest.approx(0.05)
    assert saved["sparse"]["iter"] == [2]
    if form == "no-lr":
        del saved["sparse"]["param_groups"]
    if form == "whole":
        saved["sparse"]["state"] = {
            key: {name: t.local_shards()[0].tensor.clone() for name, t in value.items()}
            for key, value in saved["sparse"]["state"].items()
        }
    for b in batches[2:]:
        step(dmp, dense, sparse, b)

    dmp2, sparse2 = shard_model(_model(seed=3), lr=0.1)  # other start: all from the state
    dense2 = torch.optim.SGD(dense_parameters(dmp2), lr=0.1, momentum=0.9)
    step(dmp2, dense2, sparse2, batches[0])  # and a used optimizer, not a fresh one
    dmp2.load_state_dict(saved["model"])
    dense2.load_state_dict(saved["dense"])
    if form == "no-lr":
        sparse2.param_groups[0]["lr"] = 0.05
    sparse2.load_state_dict(saved["sparse"])
    assert "param_groups" in sparse2.state_dict()
    assert sparse2.param_groups[0]["lr"] == pytest.approx(0.05)
    assert sparse2.state_dict()["iter"] == [2]
    for b in batches[2:]:
        step(dmp2, dense2, sparse2, b)
    a, b = _params(dmp), _params(dmp2)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    states = [sparse.state_dict()["state"], sparse2.state_dict()["state"]]
    for key, value in states[0].items():
        for name, tensor in value.items():
            assert torch.equal(tensor.local_shards()[0].tensor,
                               states[1][key][name].local_shards()[0].tensor), name


def test_trainer_checkpoint_resume_continues_identically(tmp_path):
    data = _data(4, seed=6)
    straight = _trainer_run(tmp_path / "a", Trainer, *shard_model(_model()), data, 2, steps=2)
    _trainer_run(tmp_path / "b", Trainer, *shard_model(_model()), data, 2, steps=1, save=1)
    resumed = _trainer_run(tmp_path / "b", Trainer, *shard_model(_model(seed=3)), data, 2,
                           steps=2)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_a_sharded_model_without_a_sparse_optimizer_trains_with_its_fused_one(tmp_path):
    data = _data(4, seed=7)
    given = _trainer_run(tmp_path / "a", Trainer, *shard_model(_model()), data, 2)
    dmp, _ = shard_model(_model())
    default = _trainer_run(tmp_path / "b", Trainer, dmp, None, data, 2)
    for key in given:
        assert torch.equal(given[key], default[key]), key
    # the fused kernels' state (not a second optimizer's) is what the checkpoint holds
    trainer = Trainer(model=dmp, args=TrainingArguments(output_dir=str(tmp_path / "c"),
                                                        report_to="none", disable_tqdm=True))
    assert isinstance(trainer.sparse_optimizer.optimizer, FusedSparseOptimizer)
    assert trainer.saver.sparse_optimizer is trainer.sparse_optimizer.optimizer


# --- no-grad path while deferring --------------------------------------------------------
def test_evaluation_and_no_grad_lookups_bypass_the_deferral(tmp_path):
    dmp, sparse = shard_model(_model())
    dense = torch.optim.SGD(dense_parameters(dmp), lr=0.1)
    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=2,
                             report_to="none", disable_tqdm=True)
    trainer = Trainer(model=dmp, args=args, train_dataset=_data(4), eval_dataset=_data(2, seed=9),
                      dense_optimizers=(dense, None), sparse_optimizer=sparse)
    assert sparse._patched  # k > 1: the collections' lookups are deferred
    trainer.train()
    before = _params(dmp)
    results = trainer.evaluate()
    assert results["num_samples"] == 64 and 0 < results["loss"] < 10
    with torch.no_grad():
        dmp(_data(1, seed=11)[0])
    dmp.eval()
    loss = dmp(_data(1, seed=12)[0])  # eval mode with autograd on: a normal lookup
    assert loss.requires_grad  # (its backward would update the tables: fused kernels)
    dmp.train()
    assert not sparse._records  # nothing was queued for a replay
    after = _params(dmp)
    for key in ("t_cat_0", "t_cat_1", "t_cat_2"):
        assert torch.equal(before[key], after[key]), key  # no update by evaluation


def test_fused_accumulation_over_an_embedding_collection_is_a_clear_error():
    """Unpooled (sequence) tables: exact fused accumulation is not implemented; the
    error says what to use instead rather than training wrongly."""
    from torchrec.modules.embedding_configs import EmbeddingConfig
    from torchrec.modules.embedding_modules import EmbeddingCollection

    from recframe.optim import AccumulationWindow

    class Sequence(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ec = EmbeddingCollection(tables=[EmbeddingConfig(
                name="t", embedding_dim=4, num_embeddings=20, feature_names=["f"])])

        def forward(self, kjt):
            return self.ec(kjt)["f"].values().sum()

    _, sparse = shard_model(Sequence())
    sparse.bind_accumulation_window(AccumulationWindow(1, "raise"))  # k=1: fine
    with pytest.raises(NotImplementedError, match="gradient_accumulation_steps=1"):
        sparse.bind_accumulation_window(AccumulationWindow(2, "raise"))
