"""Dynamic tables under the Trainer: exact gradient accumulation (an id admitted
mid-window), evaluation, row/optimizer-state resets, bit-identical resume, incremental
checkpoints carrying the map and the rows that changed owner, and ``recframe train``."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recframe import Trainer, TrainingArguments, cli
from recframe.dynamic import reset_rows
from recframe.hooks import DynamicEmbeddingHook
from recframe.models import DLRM
from recframe.optim import dense_parameters, sparse_parameters
from recframe.optim.sparse import SparseAdagrad, SparseAdam
from recframe.schema import FeatureSchema

QUIET = dict(disable_tqdm=True, report_to="none", log_steps=1000)


def _schema(budget: int = 24, **spec) -> FeatureSchema:
    spec = {"fallback_rows": 4, "eviction": "lru", "eviction_interval": 2,
            "evict_fraction": 0.25, **spec}
    return FeatureSchema.from_dict({
        "labels": ["y"], "dense": ["x0", "x1"],
        "sparse": [{"name": "user", "mapping": {"kind": "dynamic", "dynamic": spec}},
                   {"name": "item"}],
        "tables": [{"name": "user", "num_embeddings": budget, "embedding_dim": 4},
                   {"name": "item", "num_embeddings": 16, "embedding_dim": 4}],
    })


def _batch(users: torch.Tensor, items: torch.Tensor, dense: torch.Tensor,
           labels: torch.Tensor) -> Batch:
    n = users.numel()
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["user", "item"], torch.cat([users, items]), torch.ones(2 * n, dtype=torch.int32))
    return Batch(dense_features=dense, sparse_features=kjt, labels=labels)


def _batches(n: int, size: int = 8, seed: int = 0, spread: int = 60) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):  # a drifting id range: old ids fade, new ones appear
        users = torch.randint(0, spread, (size,), generator=g) + 10**12 + 5 * i
        items = torch.randint(0, 16, (size,), generator=g)
        dense = torch.randn(size, 2, generator=g)
        labels = (dense[:, 0] + (users % 3 == 0).float() > 0.5).float()
        out.append(_batch(users, items, dense, labels))
    return out


def _model(schema: FeatureSchema, seed: int = 0) -> DLRM:
    torch.manual_seed(seed)
    model = DLRM(schema=schema, dense_arch=(8, 4), over_arch=(8, 1))
    for m in model.modules():
        if isinstance(m, nn.EmbeddingBag):
            m.sparse = True
    return model


def _trainer(model, out, data, k=1, steps=4, opt=SparseAdam, eval_data=None, **args):
    sparse = opt(sparse_parameters(model), lr=0.05)
    dense = torch.optim.Adam(dense_parameters(model), lr=0.01)
    return Trainer(
        model, TrainingArguments(output_dir=str(out), train_steps=steps,
                                 gradient_accumulation_steps=k, **QUIET, **args),
        train_dataset=data, eval_dataset=eval_data, hooks=[DynamicEmbeddingHook()],
        dense_optimizers=(dense, None), sparse_optimizer=sparse)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("backend", ["sparse_grad", "fused"])
def test_accumulation_one_mapping_per_window(tmp_path, backend) -> None:
    """An id first seen in a window's first micro-batch keeps its fallback row in the
    second (admitted at the boundary), so k=2 on (b1, b2) is one update on b1 + b2
    (both sparse back ends: recframe's SparseAdagrad, torchrec's fused one)."""
    schema = _schema(min_count=1)
    b1, b2 = _batches(2, seed=3)
    shared = b1.sparse_features.values()[0]  # user id of b1's first sample, also in b2
    v2 = b2.sparse_features.values().clone()
    v2[0] = shared
    b2 = _batch(v2[:8], v2[8:], b2.dense_features, b2.labels)
    both = _batch(torch.cat([b1.sparse_features.values()[:8], v2[:8]]),
                  torch.cat([b1.sparse_features.values()[8:], v2[8:]]),
                  torch.cat([b1.dense_features, b2.dense_features]),
                  torch.cat([b1.labels, b2.labels]))
    split, whole = _model(schema), _model(schema)
    if backend == "fused":
        from recframe.optim.fused import shard_model

        def run(model, out, data, k):
            dmp, sparse = shard_model(model, optimizer="rowwise_adagrad", lr=0.05)
            Trainer(dmp, TrainingArguments(output_dir=str(out), train_steps=1,
                                           gradient_accumulation_steps=k, **QUIET),
                    train_dataset=data, hooks=[DynamicEmbeddingHook()],
                    dense_optimizers=(torch.optim.Adam(dense_parameters(dmp), lr=0.01), None),
                    sparse_optimizer=sparse).train()
            return {k: (v.local_shards()[0].tensor if hasattr(v, "local_shards") else v)
                    for k, v in dmp.state_dict().items()}

        a = run(split, tmp_path / "a", [b1, b2], 2)
        b = run(whole, tmp_path / "b", [both], 1)
    else:
        _trainer(split, tmp_path / "a", [b1, b2], k=2, steps=1, opt=SparseAdagrad).train()
        _trainer(whole, tmp_path / "b", [both], k=1, steps=1, opt=SparseAdagrad).train()
        a, b = split.state_dict(), whole.state_dict()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key
    m = split.dynamic.maps["user"]
    assert m.rows_used > 0 and bool(m.find(shared.view(1))[0])


def test_eval_does_not_admit_and_metrics_report_rows(tmp_path) -> None:
    model = _model(_schema())
    unseen = _batches(2, seed=9, spread=10**6)
    trainer = _trainer(model, tmp_path, _batches(4), steps=4, eval_data=unseen)
    trainer.train()
    before = _state(model.dynamic)
    results = trainer.evaluate()
    assert 0.0 <= results["auc"] <= 1.0
    _assert_equal(before, _state(model.dynamic))
    assert model.dynamic.maps["user"].rows_used <= 20


def test_reset_rows_clears_optimizer_state() -> None:
    w = nn.Parameter(torch.arange(12.0).view(6, 2))
    opt = SparseAdagrad([w], lr=0.1, initial_accumulator_value=0.5)
    w.grad = torch.ones(6, 2).to_sparse()
    opt.step()
    reset_rows(w, opt, admitted=torch.tensor([3]), fallback=torch.tensor([0]),
               evicted=torch.tensor([4]))
    assert torch.equal(w[3], w[0]) and torch.equal(w[4], torch.zeros(2))
    s = opt.state[w]["sum"]
    assert torch.equal(s[3], torch.full((2,), 0.5)) and torch.equal(s[4], torch.full((2,), 0.5))
    assert torch.equal(s[1], torch.full((2,), 1.5))
    adam_w = nn.Parameter(torch.ones(4, 2))
    adam = SparseAdam([adam_w], lr=0.1)
    adam_w.grad = torch.ones(4, 2).to_sparse()
    adam.step()
    reset_rows(adam_w, adam, torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    for key in ("exp_avg", "exp_avg_sq"):
        assert adam.state[adam_w][key][1:3].eq(0).all() and adam.state[adam_w][key][0].ne(0).all()


def test_resume_is_bit_identical(tmp_path) -> None:
    data = _batches(8)
    straight = _model(_schema())
    t = _trainer(straight, tmp_path / "a", data, steps=8)
    t.train()
    assert straight.dynamic.maps["user"].totals[1] > 0  # eviction ran
    first = _model(_schema())
    _trainer(first, tmp_path / "b", data, steps=4, save_steps=2).train()
    resumed = _model(_schema(), seed=1)  # other initial values: all come from the checkpoint
    t2 = _trainer(resumed, tmp_path / "b", data, steps=8)
    t2.train()
    assert t2.state.global_step == 8
    _assert_equal(_state(straight), _state(resumed))
    sa, sb = t.sparse_optimizer.optimizer.state_dict(), t2.sparse_optimizer.optimizer.state_dict()
    for key, value in sa["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(sb["state"][key][name]))


def test_resume_from_a_step_with_deferred_counters_is_bit_identical(tmp_path) -> None:
    """A checkpoint at a step whose counter updates were queued (table full, no
    eviction due): the saved map must hold them (``state_dict`` flushes)."""
    schema = _schema(budget=8, eviction_interval=4, min_count=2)
    data = [_batches(1, size=16, spread=6)[0] for _ in range(8)]  # hits and misses
    straight = _model(schema)
    _trainer(straight, tmp_path / "a", data, steps=8).train()
    first = _model(schema)
    _trainer(first, tmp_path / "b", data, steps=3, save_steps=3).train()
    m = first.dynamic.maps["user"]
    assert m.rows_used == m.capacity
    loaded = _model(schema, seed=2)
    assert _trainer(loaded, tmp_path / "b", data, steps=3).restore() == 3
    m.flush()  # the live map with its queued counter updates applied
    _assert_equal(_state(first.dynamic), _state(loaded.dynamic))  # the checkpoint has them
    resumed = _model(schema, seed=1)
    _trainer(resumed, tmp_path / "b", data, steps=8).train()
    _assert_equal(_state(straight), _state(resumed))


def test_incremental_delta_carries_the_map_and_changed_rows(tmp_path) -> None:
    data = _batches(6)
    model = _model(_schema())
    trainer = _trainer(model, tmp_path, data, steps=6, save_steps=1,
                       incremental_checkpoints=True, full_checkpoint_every=100)
    trainer.train()
    manifest = json.loads((tmp_path / "ckpt_6" / "manifest.json").read_text())
    assert manifest["incremental"]["kind"] == "delta"
    assert model.dynamic.maps["user"].totals.tolist()[1] > 0
    restored = _model(_schema(), seed=5)
    _trainer(restored, tmp_path, data, steps=6, save_steps=1, incremental_checkpoints=True,
             full_checkpoint_every=100).restore()
    _assert_equal(_state(model), _state(restored))


@pytest.mark.parametrize("backend", ["fused", "sparse_grad"])
def test_recframe_train_with_a_dynamic_table(tmp_path, capsys, backend) -> None:
    g = torch.Generator().manual_seed(0)
    n = 256
    users = (torch.randint(0, 500, (n,), generator=g) * 7919 + 10**13).tolist()
    pq.write_table(pa.table({
        "y": torch.randint(0, 2, (n,), generator=g).tolist(),
        "x0": torch.randn(n, generator=g).tolist(),
        "user": users, "item": torch.randint(0, 50, (n,), generator=g).tolist(),
    }), tmp_path / "part-0.parquet")
    schema = _schema(64)
    schema.dense = schema.dense[:1]
    schema.save(str(tmp_path / "schema.yaml"))
    code = cli.main(["train", "--data", "parquet", "--schema", str(tmp_path / "schema.yaml"),
                     "--train_path", str(tmp_path), "--eval_path", str(tmp_path),
                     "--batch_size", "32", "--train_steps", "6", "--output_dir",
                     str(tmp_path / "run"), "--data_workers", "0", "--disable_tqdm", "true",
                     "--report_to", "none", "--log_steps", "1000",
                     "--sparse_backend", backend])
    assert code == 0
    out = capsys.readouterr().out
    assert "final eval" in out
    assert cli.main(["ckpt", "inspect", str(tmp_path / "run"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    table = info["dynamic_tables"]["user"]
    assert table["budget"] == 64 and table["fallback_rows"] == 4
    assert 0 < table["rows_used"] <= 60 and table["admitted"] >= table["rows_used"]
    assert cli.main(["ckpt", "inspect", str(tmp_path / "run")]) == 0
    assert f"user: {table['rows_used']}/60 rows used" in capsys.readouterr().out


@pytest.mark.parametrize("k", [1, 3])
def test_admitted_rows_train(tmp_path, k) -> None:
    model = _model(_schema(budget=200, eviction_interval=50))
    data = _batches(6 * k, spread=20)
    _trainer(model, tmp_path, data, k=k, steps=6).train()
    m = model.dynamic.maps["user"]
    assert m.rows_used > 0 and int(m.step) == 6


def test_fused_sharded_back_end_resets_rows_and_resumes(tmp_path) -> None:
    """torchrec's fused back end (shard_model, one gloo process): admitted rows start
    from their fallback row, evicted rows are zero, their fused optimizer state is
    reset, and a resume is bit-identical."""
    from recframe.optim.fused import shard_model

    def build(out, steps, seed=0, **kw):
        model = _model(_schema(eviction="ttl", ttl=2, eviction_interval=1), seed)
        for m in model.modules():
            if isinstance(m, nn.EmbeddingBag):
                m.sparse = False
        dmp, sparse = shard_model(model, optimizer="rowwise_adagrad", lr=0.05)
        trainer = Trainer(
            dmp, TrainingArguments(output_dir=str(out), train_steps=steps, **QUIET, **kw),
            train_dataset=_batches(8), hooks=[DynamicEmbeddingHook()],
            dense_optimizers=(torch.optim.Adam(dense_parameters(dmp), lr=0.01), None),
            sparse_optimizer=sparse)
        return model, dmp, sparse, trainer

    model, dmp, sparse, trainer = build(tmp_path / "a", 8)
    m = model.dynamic.maps["user"]
    evicted: set[int] = set()
    evict = m._evict

    def spy(step):
        slots = evict(step)
        evicted.update(slots.tolist())
        return slots

    m._evict = spy
    trainer.train()
    assert m.totals[1] > 0 and m.rows_used > 0
    key = next(k for k in dmp.state_dict() if k.endswith("embedding_bags.user.weight"))
    weight = dmp.state_dict()[key].local_shards()[0].tensor
    free = sorted(evicted & set((~m.used).nonzero().squeeze(1).tolist()))
    free = torch.tensor(free, dtype=torch.int64) + m.fallback
    assert free.numel() and weight[free].eq(0).all()  # evicted, not admitted again
    momentum = sparse.state_dict()["state"][key]["user.momentum1"].local_shards()[0].tensor
    assert momentum[free].eq(0).all()

    _, _, _, first = build(tmp_path / "b", 4, save_steps=2)
    first.train()
    resumed_model, resumed, _, second = build(tmp_path / "b", 8, seed=1)
    second.train()
    a, b = dmp.state_dict(), resumed.state_dict()
    for k in a:
        x, y = a[k], b[k]
        if hasattr(x, "local_shards"):
            x, y = x.local_shards()[0].tensor, y.local_shards()[0].tensor
        assert torch.equal(x, y), k


def test_fused_incremental_delta_carries_the_rows_that_changed_owner(tmp_path) -> None:
    from recframe.optim.fused import shard_model

    def build(seed):
        model = _model(_schema(eviction="ttl", ttl=2, eviction_interval=1), seed)
        dmp, sparse = shard_model(model, optimizer="rowwise_adagrad", lr=0.05)
        trainer = Trainer(
            dmp, TrainingArguments(output_dir=str(tmp_path), train_steps=6, save_steps=1,
                                   incremental_checkpoints=True, full_checkpoint_every=100,
                                   **QUIET),
            train_dataset=_batches(6), hooks=[DynamicEmbeddingHook()],
            dense_optimizers=(torch.optim.Adam(dense_parameters(dmp), lr=0.01), None),
            sparse_optimizer=sparse)
        return model, dmp, sparse, trainer

    model, dmp, sparse, trainer = build(0)
    trainer.train()
    assert json.loads((tmp_path / "ckpt_6" / "manifest.json").read_text())[
        "incremental"]["kind"] == "delta"
    assert model.dynamic.maps["user"].totals[1] > 0
    _, dmp2, sparse2, trainer2 = build(3)
    trainer2.restore()

    def local(state):
        return {k: (v.local_shards()[0].tensor if hasattr(v, "local_shards") else v)
                for k, v in state.items() if isinstance(v, torch.Tensor)
                or hasattr(v, "local_shards")}

    _assert_equal(local(dmp.state_dict()), local(dmp2.state_dict()))
    key = next(k for k in sparse.state_dict()["state"] if k.endswith("user.weight"))
    _assert_equal(local(sparse.state_dict()["state"][key]),
                  local(sparse2.state_dict()["state"][key]))
