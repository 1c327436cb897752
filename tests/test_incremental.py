"""Incremental checkpoints: row tracking, delta save, chain restore bit-identical to a
full checkpoint of the same step, broken chains, retention of chains."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import ToyCTR, make_batches

from recframe.checkpoint import CheckpointCorruptError, CheckpointManager, Saver
from recframe.checkpoint.incremental import keep_closure, section
from recframe.checkpoint.manifest import encode_manifest
from recframe.checkpoint.policies import FullEvery
from recframe.optim import dense_parameters, sparse_parameters
from recframe.optim.sparse import SPARSE_OPTIMIZERS
from recframe.optim.tracking import RowTracker

ROWS = 400


def _build(out, opt="adam", seed=0, incremental=True, every=4, max_keep=50, **kw):
    torch.manual_seed(seed)
    model = ToyCTR(num_embeddings=ROWS, dim=8)
    hp = {"lr": 0.05}
    if opt == "adamw":
        hp["weight_decay"] = 0.1
    sparse = SPARSE_OPTIMIZERS[opt](sparse_parameters(model), **hp)
    dense = torch.optim.Adam(dense_parameters(model), lr=0.01)
    saver = Saver(model, sparse, output_dir=str(out), max_keep=max_keep, chunk_bytes=4096)
    saver.register_for_checkpointing("dense_optimizer", dense)
    manager = CheckpointManager(saver, save_interval=1, incremental=incremental,
                                full_checkpoint_every=every, **kw)
    return model, sparse, dense, manager


def _train_step(model, sparse, dense, batch):
    sparse.zero_grad()
    dense.zero_grad()
    model(batch).backward()
    sparse.step()
    dense.step()


def _batches(n, seed=0):
    # few ids per step: each step touches a small share of the 400 rows
    out = make_batches(n, 6, seed=seed, num_embeddings=40)
    for i, b in enumerate(out):
        b["ids"] = b["ids"] + 40 * (i % 10)
    return out


def _snapshot(model, sparse, dense):
    return copy.deepcopy({"model": model.state_dict(), "sparse": sparse.state_dict(),
                          "dense": dense.state_dict()})


def _assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}.{i}")
    else:
        assert a == b, where


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


@pytest.mark.parametrize("opt", sorted(SPARSE_OPTIMIZERS))
def test_every_checkpoint_of_a_chain_restores_bit_identical(tmp_path, opt):
    model, sparse, dense, manager = _build(tmp_path / "inc", opt)
    full_model, full_sparse, full_dense, full_manager = _build(
        tmp_path / "full", opt, incremental=False)
    expected = {}
    for step, batch in enumerate(_batches(9), start=1):
        _train_step(model, sparse, dense, batch)
        _train_step(full_model, full_sparse, full_dense, batch)
        manager.step(step)
        full_manager.step(step)
        expected[step] = _snapshot(model, sparse, dense)
    kinds = {c.step: section(c.manifest)["kind"] for c in manager.list()}
    # full every 4 saves: 1 full + 3 deltas
    assert kinds == {1: "full", 2: "delta", 3: "delta", 4: "delta", 5: "full", 6: "delta",
                     7: "delta", 8: "delta", 9: "full"}
    inc = {c.step: c for c in manager.list()}
    assert section(inc[8].manifest)["chain"] == ["ckpt_5", "ckpt_6", "ckpt_7", "ckpt_8"]
    assert _dir_bytes(inc[3].path) * 2 < _dir_bytes(inc[1].path)
    for step in expected:
        # a fresh run (other initial values) restores each step: the incremental chain and
        # the full checkpoint of that step give the same bits, equal to the live state
        m1, s1, d1, mgr1 = _build(tmp_path / "inc", opt, seed=1)
        assert mgr1.restore(global_step=step) == step
        m2, s2, d2, mgr2 = _build(tmp_path / "full", opt, seed=2, incremental=False)
        assert mgr2.restore(global_step=step) == step
        got_inc, got_full = _snapshot(m1, s1, d1), _snapshot(m2, s2, d2)
        _assert_same(got_inc, expected[step], f"step {step}")
        _assert_same(got_full, got_inc, f"step {step} full vs incremental")


def test_training_resumed_from_a_delta_continues_bit_identical(tmp_path):
    batches = _batches(8)
    model, sparse, dense, manager = _build(tmp_path / "a", "adagrad")
    for step, batch in enumerate(batches, start=1):
        _train_step(model, sparse, dense, batch)
        manager.step(step)
    m, s, d, mgr = _build(tmp_path / "a", "adagrad", seed=3)
    assert mgr.restore(global_step=3) == 3
    assert section(mgr.list()[2].manifest)["kind"] == "delta"
    for batch in batches[3:]:
        _train_step(m, s, d, batch)
    _assert_same(_snapshot(m, s, d), _snapshot(model, sparse, dense))


def test_delta_holds_only_changed_rows(tmp_path):
    model, sparse, dense, manager = _build(tmp_path, "rowwise_adagrad")
    batches = _batches(2)
    _train_step(model, sparse, dense, batches[0])
    manager.step(1)
    _train_step(model, sparse, dense, batches[1])
    manager.step(2)
    info = manager.list()[-1]
    sec = section(info.manifest)
    touched = torch.unique(batches[1]["ids"])
    assert sec["kind"] == "delta"
    assert sec["changed_rows"] == {"emb.weight": touched.numel()}
    assert set(sec["tables"]) == {"sparse.emb.weight", "sparse_opt.state.0.sum"}
    # the delta rows are exactly the batch's ids
    rows_keys = [k for k in info.manifest["tensors"] if k.startswith("delta/") and
                 k.endswith(".rows")]
    assert len(rows_keys) == 2
    # dense part and the tables' placeholders
    assert info.manifest["tensors"]["sparse.emb.weight"]["shape"] == [0]


def test_tracker_marks_exactly_the_updated_rows():
    torch.manual_seed(0)
    model = ToyCTR(num_embeddings=ROWS, dim=4)
    sparse = SPARSE_OPTIMIZERS["sgd"](sparse_parameters(model), lr=0.1)
    tracker = RowTracker(model, sparse)
    before = model.emb.weight.detach().clone()
    batch = _batches(1)[0]
    model(batch).backward()
    sparse.step()
    changed = (model.emb.weight.detach() != before).any(dim=1)
    taken = tracker.take()
    assert torch.equal(taken["emb.weight"], changed)
    assert not tracker.bits["emb.weight"].any()  # cleared by take
    tracker.give_back(taken)
    assert torch.equal(tracker.bits["emb.weight"], changed)
    tracker.detach()
    sparse.zero_grad()
    model(batch).backward()
    sparse.step()  # no longer observed
    assert torch.equal(tracker.bits["emb.weight"], changed)


def test_loading_a_table_from_outside_forces_a_full_save(tmp_path):
    model, sparse, dense, manager = _build(tmp_path, "sgd")
    batches = _batches(3)
    _train_step(model, sparse, dense, batches[0])
    manager.step(1)
    model.load_state_dict(copy.deepcopy(model.state_dict()))  # not seen row by row
    _train_step(model, sparse, dense, batches[1])
    manager.step(2)
    _train_step(model, sparse, dense, batches[2])
    manager.step(3)
    kinds = [section(c.manifest)["kind"] for c in manager.list()]
    assert kinds == ["full", "full", "delta"]


def test_first_save_after_restore_is_full(tmp_path):
    model, sparse, dense, manager = _build(tmp_path, "sgd")
    for step, batch in enumerate(_batches(3), start=1):
        _train_step(model, sparse, dense, batch)
        manager.step(step)
    m, s, d, mgr = _build(tmp_path, "sgd", seed=1)
    assert mgr.restore() == 3
    for step, batch in enumerate(_batches(2, seed=5), start=4):
        _train_step(m, s, d, batch)
        mgr.step(step)
    kinds = {c.step: section(c.manifest)["kind"] for c in mgr.list()}
    assert kinds == {1: "full", 2: "delta", 3: "delta", 4: "full", 5: "delta"}


def test_a_failed_save_gives_its_rows_to_the_next_delta(tmp_path, monkeypatch):
    model, sparse, dense, manager = _build(tmp_path, "adam")
    batches = _batches(4)
    expected = {}
    real_save = manager.saver.save

    def failing(*args, **kwargs):
        raise OSError("injected")

    for step, batch in enumerate(batches, start=1):
        _train_step(model, sparse, dense, batch)
        if step == 2:
            monkeypatch.setattr(manager.saver, "save", failing)
            with pytest.raises(OSError):
                manager.step(step)
            monkeypatch.setattr(manager.saver, "save", real_save)
        else:
            manager.step(step)
        expected[step] = _snapshot(model, sparse, dense)
    infos = {c.step: c for c in manager.list()}
    assert sorted(infos) == [1, 3, 4]
    assert section(infos[3].manifest)["chain"] == ["ckpt_1", "ckpt_3"]
    for step in (3, 4):
        m, s, d, mgr = _build(tmp_path, "adam", seed=1)
        mgr.restore(global_step=step)
        _assert_same(_snapshot(m, s, d), expected[step], f"step {step}")


def test_a_missing_link_is_named_and_restore_falls_back(tmp_path, caplog):
    model, sparse, dense, manager = _build(tmp_path, "sgd", every=3)
    expected = {}
    for step, batch in enumerate(_batches(5), start=1):
        _train_step(model, sparse, dense, batch)
        manager.step(step)
        expected[step] = _snapshot(model, sparse, dense)
    # chain 1 <- 2 <- 3 (full every 3: 1 full + 2 deltas), then 4 (full) <- 5
    os.remove(tmp_path / "ckpt_4" / "manifest.json")  # ckpt_5's base is gone
    m, s, d, mgr = _build(tmp_path, "sgd", seed=1, every=3)
    with pytest.raises(CheckpointCorruptError, match="ckpt_4.*missing or uncommitted"):
        mgr.saver.load(ckpt_id=5)
    m, s, d, mgr = _build(tmp_path, "sgd", seed=1, every=3)
    assert mgr.restore() == 3  # newest complete chain: 1, 2, 3
    assert "ckpt_5 is unreadable" in caplog.text and "ckpt_4" in caplog.text
    _assert_same(_snapshot(m, s, d), expected[3])


def test_a_corrupt_link_is_detected(tmp_path, caplog):
    model, sparse, dense, manager = _build(tmp_path, "sgd")
    expected = {}
    for step, batch in enumerate(_batches(3), start=1):
        _train_step(model, sparse, dense, batch)
        manager.step(step)
        expected[step] = _snapshot(model, sparse, dense)
    # flip a byte of ckpt_2's delta rows: ckpt_3 (which replays ckpt_2) is unreadable too
    data = sorted(f for f in os.listdir(tmp_path / "ckpt_2") if f.endswith(".bin"))
    for name in data:
        path = tmp_path / "ckpt_2" / name
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        path.write_bytes(bytes(raw))
    m, s, d, mgr = _build(tmp_path, "sgd", seed=1)
    assert mgr.restore() == 1
    assert "ckpt_3 is unreadable" in caplog.text and "ckpt_2 is unreadable" in caplog.text
    _assert_same(_snapshot(m, s, d), expected[1])


def test_a_link_overwritten_by_another_chain_is_detected(tmp_path):
    model, sparse, dense, manager = _build(tmp_path, "sgd")
    for step, batch in enumerate(_batches(3), start=1):
        _train_step(model, sparse, dense, batch)
        manager.step(step)
    mpath = tmp_path / "ckpt_2" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["incremental"]["chain"] = ["ckpt_0", "ckpt_2"]
    mpath.write_bytes(encode_manifest(manifest))  # as another run would have sealed it
    m, s, d, mgr = _build(tmp_path, "sgd", seed=1)
    with pytest.raises(CheckpointCorruptError, match="ckpt_2.*another chain"):
        mgr.saver.load(ckpt_id=3)


def test_retention_keeps_the_chains_of_kept_checkpoints(tmp_path):
    model, sparse, dense, manager = _build(tmp_path, "sgd", every=4, max_keep=2)
    for step, batch in enumerate(_batches(10), start=1):
        _train_step(model, sparse, dense, batch)
        manager.step(step)
        steps = [c.step for c in manager.list()]
        # the two newest and what their chains need (full at 1, 5, 9)
        def chain(s):
            return set(range(((s - 1) // 4) * 4 + 1, s + 1))

        want = chain(step) | (chain(step - 1) if step > 1 else set())
        assert set(steps) == want, (step, steps)
    for c in manager.list():
        m, s, d, mgr = _build(tmp_path, "sgd", seed=1, every=4, max_keep=2)
        assert mgr.restore(global_step=c.step) == c.step


def test_keep_closure_and_full_every():
    class C:
        def __init__(self, step, chain):
            self.step, self.name = step, f"ckpt_{step}"
            self.manifest = {"name": self.name, "incremental": {
                "kind": "full" if len(chain) == 1 else "delta", "chain": chain}}

    found = [C(1, ["ckpt_1"]), C(2, ["ckpt_1", "ckpt_2"]), C(3, ["ckpt_1", "ckpt_2", "ckpt_3"]),
             C(4, ["ckpt_4"]), C(5, ["ckpt_4", "ckpt_5"])]
    assert keep_closure(found, {5}) == {4, 5}
    assert keep_closure(found, {3}) == {1, 2, 3}
    assert keep_closure(found, {2, 4}) == {1, 2, 4}
    assert [FullEvery(3).needs_full(n) for n in range(4)] == [False, False, True, True]
    assert FullEvery(1).needs_full(0)
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="full_checkpoint_every"):
            FullEvery(bad)


def test_rows_of_a_shard_land_in_any_overlapping_target_region():
    from recframe.checkpoint.incremental import _copy_rows

    full = torch.arange(10 * 6, dtype=torch.float32).reshape(10, 6)
    # saved: the shard of rows 4..9, columns 0..5; rows 5 and 8 changed
    shard = {"offsets": [4, 0], "sizes": [6, 6]}
    rows = torch.tensor([5, 8])
    values = full[rows] + 100
    want = full.clone()
    want[rows] += 100
    # targets: row-wise halves, a column slice, and the whole table
    for off, size in (([0, 0], [5, 6]), ([5, 0], [5, 6]), ([0, 2], [10, 3]), ([0, 0], [10, 6])):
        region = full[off[0]: off[0] + size[0], off[1]: off[1] + size[1]].clone()
        _copy_rows(shard, rows, values, off, region, "here")
        assert torch.equal(region, want[off[0]: off[0] + size[0], off[1]: off[1] + size[1]])
    with pytest.raises(CheckpointCorruptError, match="outside their shard"):
        _copy_rows(shard, torch.tensor([2]), values[:1], [0, 0], full.clone(), "here")


def test_ckpt_list_and_inspect_show_kind_and_chain(tmp_path, capsys):
    from recframe.cli import main

    model, sparse, dense, manager = _build(tmp_path, "sgd")
    for step, batch in enumerate(_batches(3), start=1):
        _train_step(model, sparse, dense, batch)
        manager.step(step)
    assert main(["ckpt", "list", str(tmp_path)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert " full " in rows["ckpt_1"]
    assert "delta of ckpt_2 (base ckpt_1, 2 deltas)" in rows["ckpt_3"]
    assert main(["ckpt", "list", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [c["kind"] for c in listed] == ["full", "delta", "delta"]
    assert listed[2]["chain"] == ["ckpt_1", "ckpt_2", "ckpt_3"]
    assert main(["ckpt", "inspect", str(tmp_path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "chain       ckpt_1 -> ckpt_2 -> ckpt_3" in out
    assert "delta" in out and "rank 0" in out


def test_two_ranks_track_all_reduce_and_apply_their_own_shards(tmp_path):
    """2 gloo processes, torchrec table-wise sharding: each rank's deltas hold the rows
    the *other* rank's batches updated in its tables (bitmaps all-reduced at save), and
    each rank restores its own shards from the chain (tests/jobs/incremental_ranks_job)."""
    import socket
    import subprocess
    import sys

    job = os.path.join(os.path.dirname(__file__), "jobs", "incremental_ranks_job.py")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, job, str(tmp_path / "run")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            outs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (code, out, err) in enumerate(outs):
        assert code == 0 and f"OK {rank} full,delta,delta,delta,full,delta" in out, err[-3000:]

    # one process (another plan: resharding) restores the 2-rank chain of a full and 3
    # deltas ending at step 4 and the 2-rank full checkpoint of the same step: identical
    # model, fused optimizer and dense optimizer state
    import importlib.util

    spec = importlib.util.spec_from_file_location("incremental_ranks_job", job)
    ranks_job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ranks_job)
    states = []
    run = tmp_path / "run"
    for seed, path in ((11, run / "ckpt_4"), (12, run / "full" / "ckpt_4")):
        dmp, sparse, dense, manager = ranks_job.build(str(tmp_path / f"one{seed}"), seed)
        manifest = manager.saver.load(ckpt_path=str(path))
        states.append({**ranks_job.model_state(dmp), **ranks_job.optimizer_state(sparse, dense)})
        assert manifest["world_size"] == 2
    assert len(section(manager.saver.read_manifest(str(run / "ckpt_4")))["chain"]) == 4
    delta, full = states
    assert delta.keys() == full.keys() and any(k.startswith("sparse/") for k in delta)
    for key in delta:
        assert torch.equal(delta[key], full[key]), key


@pytest.mark.parametrize("where", ["local", "memory"])
def test_async_saves_are_deltas_and_restore_bit_identical(tmp_path, where):
    """async_save: a forked writer (local disk) or a host snapshot written by a thread
    (memory://); rows updated while a save is in flight go to the next delta."""
    import uuid

    out = tmp_path / "run" if where == "local" else f"memory://inc-{uuid.uuid4().hex}"
    model, sparse, dense, manager = _build(out, "adam", async_save=True)
    expected = {}
    for step, batch in enumerate(_batches(6), start=1):
        _train_step(model, sparse, dense, batch)
        manager.step(step)
        expected[step] = _snapshot(model, sparse, dense)
    manager.wait()
    kinds = [section(c.manifest)["kind"] for c in manager.list()]
    assert kinds == ["full", "delta", "delta", "delta", "full", "delta"]
    for step in (4, 6):
        m, s, d, mgr = _build(out, "adam", seed=1)
        assert mgr.restore(global_step=step) == step
        _assert_same(_snapshot(m, s, d), expected[step], f"step {step}")


def test_a_failed_background_save_gives_its_rows_back(tmp_path):
    import uuid

    from recframe.checkpoint import CheckpointError

    out = f"memory://inc-{uuid.uuid4().hex}"  # (memory://: the thread path, no fork)
    model, sparse, dense, manager = _build(out, "sgd", async_save=True)
    real_save = manager.saver.save
    calls = []

    def flaky(step, **kwargs):
        calls.append(step)
        if step == 2:
            raise OSError("injected")
        return real_save(step, **kwargs)

    manager.saver.save = flaky
    batches = _batches(3)
    _train_step(model, sparse, dense, batches[0])
    manager.step(1)
    _train_step(model, sparse, dense, batches[1])
    manager.step(2)  # fails in the background
    _train_step(model, sparse, dense, batches[2])
    with pytest.raises(CheckpointError, match="injected"):
        manager.step(3)  # surfaces the failure; its rows went back to the tracker
    assert manager.save(3)
    manager.wait()
    expected = _snapshot(model, sparse, dense)
    infos = {c.step: c for c in manager.list()}
    assert sorted(infos) == [1, 3]
    assert section(infos[3].manifest)["chain"] == ["ckpt_1", "ckpt_3"]
    m, s, d, mgr = _build(out, "sgd", seed=1)
    assert mgr.restore() == 3
    _assert_same(_snapshot(m, s, d), expected)


def test_a_delta_of_a_table_without_changed_rows(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.EmbeddingBag(50, 4, sparse=True),
                                 "b": torch.nn.EmbeddingBag(50, 4, sparse=True)})
    sparse = SPARSE_OPTIMIZERS["adagrad"](sparse_parameters(model), lr=0.1)
    saver = Saver(model, sparse, output_dir=str(tmp_path))
    manager = CheckpointManager(saver, save_interval=1, incremental=True)

    def step(table):
        sparse.zero_grad()
        model[table](torch.tensor([[1, 7]])).sum().backward()
        sparse.step()

    step("a")
    step("b")
    manager.step(1)
    step("a")  # b unchanged
    manager.step(2)
    expected = copy.deepcopy((model.state_dict(), sparse.state_dict()))
    assert section(manager.list()[-1].manifest)["changed_rows"] == {"a.weight": 2, "b.weight": 0}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert CheckpointManager(saver, incremental=True).restore() == 2
    _assert_same((model.state_dict(), sparse.state_dict()), expected)
