"""Incremental checkpoints: every way the tracked state can change outside training
(a restore or a load while an async save is in flight, a load of the fused optimizer,
a keyword call of a sharded collection) makes the next checkpoint right; deltas serve
warm starts and relative paths."""

from __future__ import annotations

import uuid

import pytest
import torch
from test_fused_checkpoint import _incremental_trainer
from test_incremental import _assert_same, _batches, _build, _snapshot, _train_step

from recframe.checkpoint.incremental import section
from recframe.data import SyntheticCriteo

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("where", ["local", "memory"])
def test_restore_while_async_save_in_flight_then_delta(tmp_path, where):
    out = tmp_path / "run" if where == "local" else f"memory://inv-{uuid.uuid4().hex}"
    model, sparse, dense, manager = _build(out, "adam", async_save=True, every=100)
    batches = _batches(8)
    for step in range(1, 5):
        _train_step(model, sparse, dense, batches[step - 1])
        manager.step(step)          # step 4's save is now in flight
    # restore an older checkpoint while ckpt_4 is still being written (no wait())
    assert manager.restore(global_step=2) == 2
    _train_step(model, sparse, dense, batches[5])
    manager.step(5)
    manager.wait()
    expected = _snapshot(model, sparse, dense)
    kinds = {c.step: section(c.manifest)["kind"] for c in manager.list()}
    m, s, d, mgr = _build(out, "adam", seed=1, every=100)
    assert mgr.restore(global_step=5) == 5
    chain = section(mgr.list()[-1].manifest)["chain"]
    _assert_same(_snapshot(m, s, d), expected, f"ckpt_5 ({kinds[5]}, chain {chain})")


def test_user_load_while_async_save_in_flight(tmp_path):
    out = f"memory://inv2-{uuid.uuid4().hex}"
    model, sparse, dense, manager = _build(out, "adam", async_save=True, every=100)
    batches = _batches(8)
    for step in range(1, 4):
        _train_step(model, sparse, dense, batches[step - 1])
        manager.step(step)   # ckpt_3 in flight
    # user code loads the model weights from an older checkpoint (e.g. rollback)
    manager.saver.load(ckpt_id=1)
    _train_step(model, sparse, dense, batches[4])
    manager.step(4)
    manager.wait()
    expected = _snapshot(model, sparse, dense)
    m, s, d, mgr = _build(out, "adam", seed=1, every=100)
    assert mgr.restore(global_step=4) == 4
    _assert_same(_snapshot(m, s, d), expected, "ckpt_4 " + str(section(mgr.list()[-1].manifest)))


def test_model_load_state_dict_while_async_save_in_flight(tmp_path):
    out = f"memory://inv3-{uuid.uuid4().hex}"
    model, sparse, dense, manager = _build(out, "adam", async_save=True, every=100)
    batches = _batches(8)
    old = {k: v.clone() for k, v in model.state_dict().items()}  # before any training
    for step in range(1, 4):
        _train_step(model, sparse, dense, batches[step - 1])
        manager.step(step)   # ckpt_3 in flight
    model.load_state_dict(old)   # e.g. a hook resetting the weights (load hooks fire)
    _train_step(model, sparse, dense, batches[4])
    manager.step(4)
    manager.wait()
    expected = _snapshot(model, sparse, dense)
    m, s, d, mgr = _build(out, "adam", seed=1, every=100)
    assert mgr.restore(global_step=4) == 4
    _assert_same(_snapshot(m, s, d), expected,
                 "ckpt_4 " + str(section(mgr.list()[-1].manifest)["kind"]))


def test_loading_the_fused_optimizer_invalidates_the_tracker(tmp_path):
    trainer, dmp = _incremental_trainer(tmp_path / "a", 1, 1)
    tracker = trainer.checkpoint_manager.tracker
    trainer.train()
    assert tracker.valid  # the save of step 1 committed
    opt = trainer.saver.sparse_optimizer
    opt.load_state_dict(opt.state_dict())  # user code / another tool loads optimizer state
    assert not tracker.valid, "a load of the fused optimizer is not seen"


def test_loading_the_sharded_model_invalidates_the_tracker(tmp_path):
    trainer, dmp = _incremental_trainer(tmp_path / "a", 1, 1)
    tracker = trainer.checkpoint_manager.tracker
    trainer.train()
    assert tracker.valid
    dmp.load_state_dict(dmp.state_dict())
    assert not tracker.valid, "a load_state_dict of the sharded model is not seen"


def _sharded_ebc(dmp):
    for _name, m in dmp.named_modules():
        if type(m).__name__ == "ShardedEmbeddingBagCollection":
            return m
    raise AssertionError("no sharded EBC")


def test_fused_tracker_marks_ids_of_a_keyword_call(tmp_path):
    trainer, dmp = _incremental_trainer(tmp_path / "a", 1, 1)
    tracker = trainer.checkpoint_manager.tracker
    batch = next(iter(SyntheticCriteo(num_batches=1, batch_size=16, num_embeddings=60,
                                      num_sparse=3, ids_per_feature=(1, 3), seed=9)))
    ebc = _sharded_ebc(dmp)
    dmp.train()
    ebc(features=batch.sparse_features)   # a user model calling it by keyword
    assert any(b.any() for b in tracker.bits.values()), \
        "rows looked up (and so updated by the fused backward) are not marked: deltas miss them"


def test_control_positional_call_marks(tmp_path):
    trainer, dmp = _incremental_trainer(tmp_path / "a", 1, 1)
    tracker = trainer.checkpoint_manager.tracker
    batch = next(iter(SyntheticCriteo(num_batches=1, batch_size=16, num_embeddings=60,
                                      num_sparse=3, ids_per_feature=(1, 3), seed=9)))
    ebc = _sharded_ebc(dmp)
    dmp.train()
    ebc(batch.sparse_features)
    assert any(b.any() for b in tracker.bits.values())


def test_model_bank_from_a_delta_of_another_run(tmp_path):
    model, sparse, dense, manager = _build(tmp_path / "a", "adam")
    for step, b in enumerate(_batches(3), start=1):
        _train_step(model, sparse, dense, b)
        manager.step(step)
    assert section(manager.list()[-1].manifest)["kind"] == "delta"
    want = {k: v.clone() for k, v in model.state_dict().items()}
    m, s, d, mgr = _build(tmp_path / "b", "adam", seed=5)
    mgr.load_model_bank([str(tmp_path / "a")])
    for k, v in m.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_relative_ckpt_path_of_a_delta(tmp_path, monkeypatch):
    model, sparse, dense, manager = _build(tmp_path / "a", "adam")
    for step, b in enumerate(_batches(3), start=1):
        _train_step(model, sparse, dense, b)
        manager.step(step)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.chdir(tmp_path)
    m, s, d, mgr = _build(tmp_path / "b", "adam", seed=5)
    mgr.saver.load(ckpt_path="a/ckpt_3")
    for k, v in m.state_dict().items():
        assert torch.equal(v, want[k]), k
