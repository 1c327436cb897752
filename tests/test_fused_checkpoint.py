"""Checkpoints of a torchrec-sharded model with a fused optimizer: ShardedTensor tables
and fused optimizer state round-trip, and training resumed from them continues
bit-exactly (with and without gradient accumulation)."""

from __future__ import annotations

import pytest
import torch

from recframe import Trainer, TrainingArguments
from recframe.data import SyntheticCriteo
from recframe.models import DLRM
from recframe.optim import dense_parameters
from recframe.optim.fused import shard_model

FEATURES = ["cat_0", "cat_1", "cat_2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trainer(out, steps, accum, opt):
    torch.manual_seed(0)
    model = DLRM(num_embeddings=60, embedding_dim=4, dense_arch=(8, 4), over_arch=(8, 1),
                 sparse_features=FEATURES)
    dmp, sparse = shard_model(model, optimizer=opt, lr=0.05)
    dense = torch.optim.Adam(dense_parameters(dmp), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(dense, step_size=2, gamma=0.5)
    data = SyntheticCriteo(num_batches=7, batch_size=16, num_embeddings=60, num_sparse=3,
                           ids_per_feature=(1, 3), seed=2)
    args = TrainingArguments(output_dir=str(out), train_steps=steps,
                             gradient_accumulation_steps=accum, save_steps=2,
                             report_to="none", disable_tqdm=True)
    return Trainer(model=dmp, args=args, train_dataset=data, dense_optimizers=(dense, sched),
                   sparse_optimizer=sparse), dmp


def _flat(dmp, sparse):
    out = {}
    for key, value in dmp.state_dict().items():
        out[key] = (value.local_shards()[0].tensor if hasattr(value, "local_shards")
                    else value).clone()
    for key, value in sparse.state_dict()["state"].items():
        for name, t in value.items():
            out[f"opt.{key}.{name}"] = (t.local_shards()[0].tensor
                                        if hasattr(t, "local_shards") else t).clone()
    return out


@pytest.mark.parametrize(
    "opt,accum", [("rowwise_adagrad", 1), ("adagrad", 2), ("rowwise_adagrad", 3)]
)
def test_fused_resume_is_bitwise_identical(tmp_path, opt, accum):
    straight, dmp_a = _trainer(tmp_path / "a", 6, accum, opt)
    straight.train()
    first, _ = _trainer(tmp_path / "b", 3, accum, opt)
    first.train()
    resumed, dmp_b = _trainer(tmp_path / "b", 6, accum, opt)
    assert resumed.restore() == 3
    resumed.train()
    a = _flat(dmp_a, straight.sparse_optimizer.optimizer)
    b = _flat(dmp_b, resumed.sparse_optimizer.optimizer)
    assert a.keys() == b.keys()
    assert any(k.startswith("opt.") for k in a)  # optimizer state is compared too
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and the tables trained at all
    fresh, dmp_c = _trainer(tmp_path / "c", 1, accum, opt)
    c = _flat(dmp_c, fresh.sparse_optimizer.optimizer)
    table = next(k for k in a if "embedding_bags" in k and not k.startswith("opt."))
    assert not torch.equal(a[table], c[table])


def _incremental_trainer(out, steps, accum, every=4):
    trainer, dmp = _trainer(out, steps, accum, "rowwise_adagrad")
    trainer.args.save_steps = 1
    trainer.checkpoint_manager = None
    trainer.args.incremental_checkpoints = True
    trainer.args.full_checkpoint_every = every
    trainer.saver, trainer.checkpoint_manager = trainer._build_checkpointing()
    return trainer, dmp


@pytest.mark.parametrize("accum", [1, 2])
def test_fused_incremental_chain_restores_bit_identical(tmp_path, accum):
    from recframe.checkpoint.incremental import section

    trainer, dmp = _incremental_trainer(tmp_path / "a", 5, accum)
    expected = {}

    class Record:
        def after_step(self, t, metrics):
            expected[t.global_step] = _flat(dmp, t.sparse_optimizer.optimizer)

    from recframe import Hook

    trainer.add_hook(type("R", (Hook,), {"after_step": Record.after_step})())
    trainer.train()
    infos = trainer.checkpoint_manager.list()
    kinds = [section(c.manifest)["kind"] for c in infos]
    assert kinds == ["full", "delta", "delta", "delta", "full"]
    delta = section(infos[1].manifest)
    assert set(delta["changed_rows"]) == {
        f"model.sparse_arch.embedding_bag_collection.embedding_bags.t_{f}.weight"
        for f in FEATURES
    }
    assert 0 < sum(delta["changed_rows"].values()) < 3 * 60
    assert any(k.startswith("sparse_opt.") for k in delta["tables"])  # momentum1 rows too
    for step in (2, 4):
        fresh, dmp_b = _incremental_trainer(tmp_path / "a", 5, accum)
        with torch.no_grad():  # other values everywhere: all must come from the chain
            for p in dmp_b.parameters():
                p.add_(1.0)
        fresh.checkpoint_manager.restore(global_step=step)
        got = _flat(dmp_b, fresh.sparse_optimizer.optimizer)
        assert got.keys() == expected[step].keys()
        for key in got:
            assert torch.equal(got[key], expected[step][key]), (step, key)


def test_fused_tracker_marks_the_batch_ids(tmp_path):
    trainer, dmp = _incremental_trainer(tmp_path / "a", 1, 1)
    tracker = trainer.checkpoint_manager.tracker
    before = _flat(dmp, trainer.sparse_optimizer.optimizer)
    trainer.train()
    after = _flat(dmp, trainer.sparse_optimizer.optimizer)
    # the first save (full) took the bitmaps; train one more step by hand
    assert not any(bits.any() for bits in tracker.bits.values())
    for f in FEATURES:
        key = f"model.sparse_arch.embedding_bag_collection.embedding_bags.t_{f}.weight"
        changed = (after[key] != before[key]).any(dim=1)
        assert changed.any()
    batch = next(iter(SyntheticCriteo(num_batches=1, batch_size=16, num_embeddings=60,
                                      num_sparse=3, ids_per_feature=(1, 3), seed=9)))
    trainer.model.train()
    loss = trainer.model(batch)
    loss = loss[0] if isinstance(loss, tuple) else loss
    loss.backward()
    kjt = batch.sparse_features
    for f in FEATURES:
        key = f"model.sparse_arch.embedding_bag_collection.embedding_bags.t_{f}.weight"
        want = torch.zeros(60, dtype=torch.bool)
        want[kjt[f].values()] = True
        assert torch.equal(tracker.bits[key], want), f


def _delta_of_a_sharded_model(tmp_path):
    """A fused (ShardedTensor) model's chain ckpt_1 (full), ckpt_2 and ckpt_3 (deltas)."""
    trainer, dmp = _incremental_trainer(tmp_path / "a", 3, 1)
    trainer.train()
    return tmp_path / "a"


def test_a_chain_restore_of_sharded_tables_asks_their_dims_without_dispatch(
        tmp_path, monkeypatch):
    """`ShardedTensor.dim()` runs its ``__torch_function__`` (pytree walks and a warning
    per call); the chain planner and copier ask once per saved shard per pass, which made
    a 10-delta chain restore ~15% slower. They read the dims from the metadata instead."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from recframe.checkpoint import incremental

    out = _delta_of_a_sharded_model(tmp_path)
    inside = [False]
    calls = []
    real_tf = ShardedTensor.__dict__["__torch_function__"].__func__

    def counting(cls, func, types, args=(), kwargs=None):
        if inside[0]:
            calls.append(getattr(func, "__name__", str(func)))
        return real_tf(cls, func, types, args, kwargs)

    monkeypatch.setattr(ShardedTensor, "__torch_function__", classmethod(counting))
    for name in ("_plan_rows", "_copy_all"):
        real = getattr(incremental, name)

        def flagged(*a, _real=real, **k):
            inside[0] = True
            try:
                return _real(*a, **k)
            finally:
                inside[0] = False

        monkeypatch.setattr(incremental, name, flagged)
    fresh, dmp_b = _incremental_trainer(out, 3, 1)
    fresh.checkpoint_manager.restore(global_step=3)
    assert calls == []
    assert incremental._ndim(next(v for v in dmp_b.state_dict().values()
                                  if isinstance(v, ShardedTensor))) == 2


def test_a_delta_shard_with_other_dims_than_a_sharded_table_is_corrupt(tmp_path):
    import json

    from recframe.checkpoint import CheckpointCorruptError
    from recframe.checkpoint.manifest import encode_manifest

    out = _delta_of_a_sharded_model(tmp_path)
    mpath = out / "ckpt_3" / "manifest.json"
    manifest = json.loads(mpath.read_text())

    def add_dim(node):  # the encoded tree: ["offsets", {"l": [0, 0]}] pairs
        if isinstance(node, list):
            if len(node) == 2 and node[0] in ("offsets", "sizes") and isinstance(node[1], dict):
                node[1]["l"].append(0 if node[0] == "offsets" else 1)
            for child in node:
                add_dim(child)
        elif isinstance(node, dict):
            for child in node.values():
                add_dim(child)

    add_dim(manifest["parts"]["delta"])
    mpath.write_bytes(encode_manifest(manifest))  # sealed, as a buggy writer would
    fresh, _ = _incremental_trainer(out, 3, 1)
    with pytest.raises(CheckpointCorruptError, match="ckpt_3.*3 dims, the table has 2"):
        fresh.saver.load(ckpt_id=3)
