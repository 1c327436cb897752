"""A chain restore's small deltas: read once into staging (each data file opened and read
once, its pages asked for ahead), checked there while the base is verified, applied only
once everything checked out; a failure leaves the model, the optimizers and no reader
thread or open file behind."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from test_incremental import _assert_same, _batches, _build, _snapshot, _train_step

from recframe.checkpoint import CheckpointCorruptError, format, incremental, restore
from recframe.checkpoint.storage import Storage


def _chain(tmp_path, steps=4):
    model, sparse, dense, manager = _build(tmp_path, "adam", every=10)
    expected = {}
    for step, batch in enumerate(_batches(steps), start=1):
        _train_step(model, sparse, dense, batch)
        manager.step(step)
        expected[step] = _snapshot(model, sparse, dense)
    return expected


def _data_files(ckpt):
    return sorted(str(ckpt / f) for f in os.listdir(ckpt) if f.endswith(".bin"))


def test_a_corrupt_delta_chunk_leaves_everything_as_it_was_and_falls_back(tmp_path, caplog):
    expected = _chain(tmp_path)
    # flip a byte inside the values of ckpt_2's delta rows (only the staged read sees it)
    manifest = json.loads((tmp_path / "ckpt_2" / "manifest.json").read_text())
    chunk = next(c for key, entry in sorted(manifest["tensors"].items())
                 if key.startswith("delta") and key.endswith(".values")
                 for shard in entry["shards"] for c in shard["chunks"] if c["nbytes"])
    path = tmp_path / "ckpt_2" / chunk["file"]
    raw = bytearray(path.read_bytes())
    raw[chunk["offset"] + chunk["nbytes"] // 2] ^= 0x40
    path.write_bytes(bytes(raw))

    m, s, d, mgr = _build(tmp_path, "adam", seed=1, every=10)
    before = _snapshot(m, s, d)
    with pytest.raises(CheckpointCorruptError, match="ckpt_2.*checksum mismatch"):
        mgr.saver.load(ckpt_id=4)
    _assert_same(_snapshot(m, s, d), before, "after a refused chain")
    assert not [t for t in threading.enumerate() if t.name.startswith("ckpt-delta")]
    assert mgr.restore() == 1  # ckpt_2, 3 and 4 need the corrupt delta
    _assert_same(_snapshot(m, s, d), expected[1])


def test_each_delta_data_file_is_opened_advised_and_read_once(tmp_path, monkeypatch):
    expected = _chain(tmp_path)
    opened: list[str] = []
    reads: list[str] = []
    advised: list[tuple[str, int]] = []
    real_open, real_read = format.open_member, incremental._read_small
    names: dict[int, str] = {}

    def counting_open(storage, directory, name, *a, **k):
        f, size = real_open(storage, directory, name, *a, **k)
        opened.append(os.path.join(directory, name))
        names[f.fileno()] = opened[-1]
        return f, size

    def counting_read(f, offset, out, path):
        reads.append(path)
        return real_read_into(f, offset, out, path)

    real_fadvise = os.posix_fadvise

    def counting_fadvise(fd, offset, length, advice):
        if advice == os.POSIX_FADV_WILLNEED:
            advised.append((names.get(fd, "?"), length))
        return real_fadvise(fd, offset, length, advice)

    from recframe.checkpoint import storage as storage_mod

    real_read_into = storage_mod.read_into
    monkeypatch.setattr(format, "open_member", counting_open)
    monkeypatch.setattr(storage_mod, "read_into", counting_read)
    monkeypatch.setattr(os, "posix_fadvise", counting_fadvise)
    assert real_read is incremental._read_small
    m, s, d, mgr = _build(tmp_path, "adam", seed=1, every=10)
    mgr.saver.load(ckpt_id=4)
    _assert_same(_snapshot(m, s, d), expected[4])
    for ckpt in ("ckpt_2", "ckpt_3"):  # the deltas before the target: rows only
        files = _data_files(tmp_path / ckpt)
        assert files
        for name in files:
            assert opened.count(name) == 1, (name, opened)
            assert reads.count(name) == 1, (name, reads)
            assert [n for n, _ in advised].count(name) == 1, (name, advised)
            assert all(0 < length <= os.path.getsize(name)
                       for n, length in advised if n == name)


def test_a_restore_failing_after_planning_the_chain_leaves_no_reader_behind(
    tmp_path, monkeypatch
):
    _chain(tmp_path)
    files = []
    real_open = format.open_member

    def tracking_open(*a, **k):
        f, size = real_open(*a, **k)
        files.append(f)
        return f, size

    real_plan = restore.plan_parts

    def failing_plan(saver, txn, storage, directory, *a, **k):
        if directory.endswith("ckpt_4"):  # the target's own parts, after plan_chain
            raise CheckpointCorruptError(f"{directory}: refused for the test")
        return real_plan(saver, txn, storage, directory, *a, **k)

    monkeypatch.setattr(format, "open_member", tracking_open)
    monkeypatch.setattr(restore, "plan_parts", failing_plan)
    m, s, d, mgr = _build(tmp_path, "adam", seed=1, every=10)
    before = _snapshot(m, s, d)
    with pytest.raises(CheckpointCorruptError, match="refused for the test"):
        mgr.saver.load(ckpt_id=4)
    _assert_same(_snapshot(m, s, d), before)
    assert not [t for t in threading.enumerate() if t.name.startswith("ckpt-delta")]
    assert files and all(f.closed for f in files)


@pytest.mark.parametrize("staged", [True, False])
def test_small_delta_tensors_at_any_offset_read_bit_identical(tmp_path, staged):
    # an int8 tensor of odd size puts the ones after it at odd offsets: those are copied
    # out of the bytes read, aligned one-chunk ones are views of them, many-chunk ones
    # are copied chunk by chunk; each chunk checked against its CRC32
    tensors = {"a": torch.arange(101, dtype=torch.int8),
               "b": torch.arange(10, dtype=torch.int64) * 7,
               "c": torch.randn(5, 4),
               "d": torch.empty(0, 4),
               "e": torch.randn(40, 4)}
    storage = Storage(str(tmp_path))
    directory = str(tmp_path / "ckpt_1")
    os.makedirs(directory)
    meta = format.write_tensors(storage, directory, tensors, "data", 1,
                                chunk_bytes=128).tensors
    assert meta["b"]["shards"][0]["chunks"][0]["offset"] % 8
    assert len(meta["e"]["shards"][0]["chunks"]) > 1
    entries, ends = incremental._small_extents(storage, directory, meta, list(tensors))
    staging = None
    if staged:
        staging = incremental._Staging(storage)
        staging.reserve(directory, ends)
    got = incremental._read_small(storage, directory, entries, ends, staging)
    for key, value in tensors.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    if staging is not None:
        staging.close()


def test_a_chain_restore_frees_its_delta_rows_when_it_returns(tmp_path, monkeypatch):
    # the part loaders' closures and the transaction refer to each other: unless the
    # transaction drops its steps, the rows read live until the garbage collector runs
    import gc
    import weakref

    expected = _chain(tmp_path)
    read: list[weakref.ref] = []
    real_read = incremental._read_small

    def tracking_read(*a, **k):
        out = real_read(*a, **k)
        read.extend(weakref.ref(t) for t in out.values())
        return out

    monkeypatch.setattr(incremental, "_read_small", tracking_read)
    m, s, d, mgr = _build(tmp_path, "adam", seed=1, every=10)
    gc.collect()
    gc.disable()
    try:
        mgr.saver.load(ckpt_id=4)
        assert read and not [r for r in read if r() is not None]
    finally:
        gc.enable()
    _assert_same(_snapshot(m, s, d), expected[4])
