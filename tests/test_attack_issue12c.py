"""Regression tests from an adversarial review of the chain restore's background delta
reads (issue 12's properties on the chain path: `incremental.plan_chain`, `_Staging`,
`restore.Transaction.check/on_close/close`). The first tests are the findings (each
failed before its fix); the others pin the properties the review found holding."""

from __future__ import annotations

import json
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pytest
import torch
from test_incremental import _assert_same, _batches, _build, _snapshot, _train_step

from recframe.checkpoint import CheckpointCorruptError, format, incremental, restore
from recframe.checkpoint import storage as storage_mod
from recframe.checkpoint.manifest import encode_manifest


def _chain(out, steps: int = 4, every: int = 10) -> dict[int, dict]:
    """ckpt_1 full, ckpt_2..ckpt_<steps> deltas; the state saved at each step."""
    model, sparse, dense, manager = _build(out, "adam", every=every)
    expected = {}
    for step, batch in enumerate(_batches(steps), start=1):
        _train_step(model, sparse, dense, batch)
        manager.step(step)
        expected[step] = _snapshot(model, sparse, dense)
    manager.close()
    return expected


def _fresh(out, every: int = 10):
    model, sparse, dense, manager = _build(out, "adam", seed=1, every=every)
    return model, sparse, dense, manager


def _read_manifest(out: str, ckpt: str) -> dict:
    fs, root = fsspec.core.url_to_fs(str(out))
    return json.loads(fs.cat_file(f"{root}/{ckpt}/manifest.json"))


def _write_manifest(out: str, ckpt: str, manifest: dict) -> None:
    """An edited manifest with a valid checksum (as a hostile author would write it)."""
    fs, root = fsspec.core.url_to_fs(str(out))
    fs.pipe_file(f"{root}/{ckpt}/manifest.json", encode_manifest(manifest))


def _values(manifest: dict) -> tuple[str, dict]:
    """(key, entry) of a delta's non-empty row values."""
    return next((key, entry) for key, entry in sorted(manifest["tensors"].items())
                if key.startswith("delta") and key.endswith(".values")
                and entry["shards"][0]["chunks"])


def _fds() -> set[tuple[str, str]]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with_target = None
        try:
            with_target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the listing's own descriptor
        out.add((fd, with_target))
    return out


def _no_reader_left(fds_before: set[tuple[str, str]], out) -> None:
    assert not [t for t in threading.enumerate() if t.name.startswith("ckpt-delta")]
    assert not [target for _, target in _fds() - fds_before if str(out) in target]


# --- findings ---------------------------------------------------------------------
@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_delta_chunk_at_a_huge_declared_offset_is_corrupt_not_an_allocation(
    tmp_path, where
):
    """The staging buffer was sized by every delta's declared extents before any of
    their files was opened: a later delta's manifest declaring a 1 PiB file with a chunk
    at its end made the first delta's read allocate 1 PiB (RuntimeError, not a corrupt
    checkpoint: no fallback). Now only files whose real size checked out share it."""
    out = tmp_path / "run" if where == "local" else f"memory://a12c-{uuid.uuid4().hex}"
    expected = _chain(out)
    manifest = _read_manifest(out, "ckpt_3")
    _, entry = _values(manifest)
    chunk = entry["shards"][0]["chunks"][0]
    manifest["files"][chunk["file"]]["size"] = (1 << 50) + chunk["nbytes"]
    chunk["offset"] = 1 << 50
    _write_manifest(out, "ckpt_3", manifest)

    model, sparse, dense, manager = _fresh(out)
    before = _snapshot(model, sparse, dense)
    with pytest.raises(CheckpointCorruptError, match="ckpt_3.*truncated"):
        manager.saver.load(ckpt_id=4)
    _assert_same(_snapshot(model, sparse, dense), before)
    assert manager.restore() == 2  # ckpt_3 and ckpt_4 need the bad delta
    _assert_same(_snapshot(model, sparse, dense), expected[2])


def test_a_long_chain_keeps_a_bounded_number_of_delta_files_open(tmp_path, monkeypatch):
    """Every data file of every delta was opened ahead at once and held until read: a
    chain of 30 deltas held 120 descriptors at concurrency 4, hundreds of deltas run out
    of them (and a failing open elsewhere in the process, e.g. the base's reader).
    Now at most `OPEN_AHEAD_FILES` are held; the others are still asked for ahead."""
    expected = _chain(tmp_path, steps=9, every=20)
    monkeypatch.setattr(incremental, "OPEN_AHEAD_FILES", 3, raising=False)
    deltas = [str(tmp_path / f"ckpt_{n}") for n in range(2, 9)]  # read only for rows
    held: list = []
    peak = [0]
    advised: list[str] = []
    names: dict[int, str] = {}
    real_open, real_fadvise = format.open_member, os.posix_fadvise

    def tracking_open(storage, directory, name, *a, **k):
        f, size = real_open(storage, directory, name, *a, **k)
        if directory in deltas:
            held.append(f)
            names[f.fileno()] = os.path.join(directory, name)
            peak[0] = max(peak[0], sum(not x.closed for x in held))
        return f, size

    def tracking_fadvise(fd, offset, length, advice):
        if advice == os.POSIX_FADV_WILLNEED and any(
                not f.closed and f.fileno() == fd for f in held):  # (fds are reused)
            advised.append(names[fd])
        return real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(format, "open_member", tracking_open)
    monkeypatch.setattr(os, "posix_fadvise", tracking_fadvise)
    model, sparse, dense, manager = _fresh(tmp_path, every=20)
    manager.saver.load(ckpt_id=9)
    _assert_same(_snapshot(model, sparse, dense), expected[9])
    files = [os.path.join(d, f) for d in deltas for f in os.listdir(d) if f.endswith(".bin")]
    assert len(files) > 8
    assert peak[0] <= 4, peak[0]  # 3 held ahead + the one being read
    assert sorted(advised) == sorted(files)  # each asked for ahead, once
    assert all(f.closed for f in held)


def test_delta_rows_of_another_dtype_are_refused_not_cast(tmp_path):
    """A delta whose row values claim another dtype of the same size (int32 for a
    float32 table; the bytes and their CRC32 unchanged) was cast into the table
    (float32 bits read as integers: values around 1e9), where a full restore refuses a
    dtype other than the live one."""
    expected = _chain(tmp_path)
    manifest = _read_manifest(tmp_path, "ckpt_2")
    _, entry = _values(manifest)
    assert entry["dtype"] == "float32"
    entry["dtype"] = "int32"
    _write_manifest(tmp_path, "ckpt_2", manifest)

    model, sparse, dense, manager = _fresh(tmp_path)
    before = _snapshot(model, sparse, dense)
    with pytest.raises(CheckpointCorruptError, match="ckpt_2.*dtype torch.int32"):
        manager.saver.load(ckpt_id=4)
    _assert_same(_snapshot(model, sparse, dense), before)
    assert manager.restore() == 1
    _assert_same(_snapshot(model, sparse, dense), expected[1])


# --- properties that held ---------------------------------------------------------
def _damage(tmp_path, how: str) -> None:
    manifest = _read_manifest(tmp_path, "ckpt_2")
    _, entry = _values(manifest)
    chunk = entry["shards"][0]["chunks"][0]
    path = tmp_path / "ckpt_2" / chunk["file"]
    if how == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif how == "directory":
        path.unlink()
        path.mkdir()
    elif how == "dev-zero":
        path.unlink()
        path.symlink_to("/dev/zero")
    elif how == "outside":
        outside = tmp_path.parent / f"outside-{uuid.uuid4().hex}"
        outside.write_bytes(path.read_bytes())
        path.unlink()
        path.symlink_to(outside)
    elif how == "truncated":
        os.truncate(path, chunk["offset"] + chunk["nbytes"] - 1)
    elif how == "grown-and-flipped":
        raw = bytearray(path.read_bytes()) + b"x" * 1000
        raw[chunk["offset"]] ^= 1
        path.write_bytes(bytes(raw))
    elif how == "swapped":
        other = tmp_path / "ckpt_3" / chunk["file"]
        a, b = path.read_bytes(), other.read_bytes()
        path.write_bytes(b)
        other.write_bytes(a)
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize("how", ["fifo", "directory", "dev-zero", "outside", "truncated",
                                 "grown-and-flipped", "swapped", "missing"])
def test_a_hostile_delta_file_is_refused_with_nothing_changed_or_left_open(tmp_path, how):
    expected = _chain(tmp_path)
    _damage(tmp_path, how)
    model, sparse, dense, manager = _fresh(tmp_path)
    before = _snapshot(model, sparse, dense)
    fds = _fds()
    with pytest.raises((CheckpointCorruptError, storage_mod.StorageError), match="ckpt_2"):
        manager.saver.load(ckpt_id=4)  # (a FIFO: refused, never opened: no hang)
    _assert_same(_snapshot(model, sparse, dense), before)
    _no_reader_left(fds, tmp_path)
    assert manager.restore() == 1
    _assert_same(_snapshot(model, sparse, dense), expected[1])


def test_an_interrupt_in_the_background_read_changes_nothing_and_leaves_nothing(
    tmp_path, monkeypatch
):
    expected = _chain(tmp_path)
    real = storage_mod.read_into

    def interrupted(f, offset, out, path):
        if "ckpt_3" in path:
            raise KeyboardInterrupt
        return real(f, offset, out, path)

    monkeypatch.setattr(storage_mod, "read_into", interrupted)
    model, sparse, dense, manager = _fresh(tmp_path)
    before = _snapshot(model, sparse, dense)
    fds = _fds()
    with pytest.raises(KeyboardInterrupt):
        manager.saver.load(ckpt_id=4)
    _assert_same(_snapshot(model, sparse, dense), before)
    _no_reader_left(fds, tmp_path)
    monkeypatch.setattr(storage_mod, "read_into", real)
    manager.saver.load(ckpt_id=4)
    _assert_same(_snapshot(model, sparse, dense), expected[4])


def test_restores_in_a_row_from_a_thread_pool_are_bit_identical_and_share_no_memory(
    tmp_path, monkeypatch
):
    expected = _chain(tmp_path, steps=5)
    staged: list[int] = []
    real_read = incremental._read_small

    def tracking_read(*a, **k):
        got = real_read(*a, **k)
        staged.extend(t.untyped_storage().data_ptr() for t in got.values() if t.numel())
        return got

    monkeypatch.setattr(incremental, "_read_small", tracking_read)
    model, sparse, dense, manager = _fresh(tmp_path)
    fds = _fds()
    with ThreadPoolExecutor(2) as pool:
        pool.submit(manager.saver.load, ckpt_id=5).result()
    _assert_same(_snapshot(model, sparse, dense), expected[5])
    live = [p.untyped_storage().data_ptr() for p in model.parameters()]
    live += [t.untyped_storage().data_ptr() for state in sparse.state.values()
             for t in state.values() if isinstance(t, torch.Tensor)]
    assert staged and not set(staged) & set(live)
    with torch.no_grad():  # the live state is its own memory: changing it changes no
        for p in model.parameters():  # staged bytes a later restore could see
            p.add_(1.0)
    for step in (5, 3, 5, 5):
        manager.saver.load(ckpt_id=step)
        _assert_same(_snapshot(model, sparse, dense), expected[step], f"ckpt_{step}")
    _no_reader_left(fds, tmp_path)


@pytest.mark.parametrize("where", ["local", "memory"])
@pytest.mark.parametrize("steps", [2, 31])
def test_a_chain_of_one_or_thirty_deltas_restores_bit_identical(tmp_path, where, steps):
    # 30 local deltas: 120 data files, more than `OPEN_AHEAD_FILES` (the rest advised,
    # closed, opened again at their read); memory://: no fadvise, deltas side by side
    out = tmp_path / "run" if where == "local" else f"memory://a12c-{uuid.uuid4().hex}"
    expected = _chain(out, steps=steps, every=steps + 1)
    model, sparse, dense, manager = _fresh(out, every=steps + 1)
    manager.saver.load(ckpt_id=steps)
    _assert_same(_snapshot(model, sparse, dense), expected[steps])
    assert not [t for t in threading.enumerate() if t.name.startswith("ckpt-delta")]


def test_a_delta_with_zero_rows_restores(tmp_path):
    model, sparse, dense, manager = _build(tmp_path, "adam", every=10)
    first, second = _batches(2)
    expected = {}
    _train_step(model, sparse, dense, first)
    manager.step(1)
    expected[1] = _snapshot(model, sparse, dense)
    manager.step(2)  # nothing trained since ckpt_1: every table's delta has no rows
    expected[2] = _snapshot(model, sparse, dense)
    _train_step(model, sparse, dense, second)
    manager.step(3)
    expected[3] = _snapshot(model, sparse, dense)
    manager.close()
    manifest = _read_manifest(tmp_path, "ckpt_2")
    shapes = [e["shape"] for k, e in manifest["tensors"].items() if k.startswith("delta")]
    assert shapes and all(shape[0] == 0 for shape in shapes)
    fresh, fsparse, fdense, fmanager = _fresh(tmp_path)
    for step in (3, 2):
        fmanager.saver.load(ckpt_id=step)
        _assert_same(_snapshot(fresh, fsparse, fdense), expected[step], f"ckpt_{step}")


def test_a_failed_restore_stops_reading_the_chain(tmp_path, monkeypatch):
    """The deltas were read in the background by one job reading them all: a restore
    failing early (a corrupt base, Ctrl-C) still waited, at its close, for every
    delta of the chain to be read and checked before the fallback could start."""
    _chain(tmp_path, steps=6)
    failed = threading.Event()
    reads: list[str] = []
    real_read = incremental._read_small
    real_plan = restore.plan_parts

    def slow_read(storage, directory, *a, **k):
        reads.append(directory)
        assert failed.wait(10)  # the first delta is still being read when the base fails
        return real_read(storage, directory, *a, **k)

    def failing_plan(saver, txn, storage, directory, *a, **k):
        if directory.endswith("ckpt_1"):
            failed.set()
            raise CheckpointCorruptError(f"{directory}: refused for the test")
        return real_plan(saver, txn, storage, directory, *a, **k)

    monkeypatch.setattr(incremental, "_read_small", slow_read)
    monkeypatch.setattr(restore, "plan_parts", failing_plan)
    model, sparse, dense, manager = _fresh(tmp_path)
    fds = _fds()
    with pytest.raises(CheckpointCorruptError, match="refused for the test"):
        manager.saver.load(ckpt_id=6)
    _no_reader_left(fds, tmp_path)
    assert reads == [str(tmp_path / "ckpt_2")]


def test_every_closer_runs_when_one_raises(tmp_path, monkeypatch):
    """`Transaction.close` stopped at the first closer raising (a second Ctrl-C while
    the reader thread was joined): the delta files opened ahead stayed open."""
    _chain(tmp_path)
    opened = []
    real_open = format.open_member

    def tracking_open(*a, **k):
        f, size = real_open(*a, **k)
        opened.append(f)
        return f, size

    real_check = restore.Transaction.check

    def interrupted_check(self, fn):
        def interrupted():
            raise KeyboardInterrupt  # before any delta file was read

        self.on_close(interrupted)  # runs first at close: the last queued
        real_check(self, fn)

    def failing_verify(self, keep):
        raise CheckpointCorruptError("refused for the test")

    monkeypatch.setattr(format, "open_member", tracking_open)
    monkeypatch.setattr(restore.Transaction, "check", interrupted_check)
    monkeypatch.setattr(restore.Transaction, "verify", failing_verify)
    model, sparse, dense, manager = _fresh(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        manager.saver.load(ckpt_id=4)
    assert not [t for t in threading.enumerate() if t.name.startswith("ckpt-delta")]
    assert opened and all(f.closed for f in opened)


@pytest.mark.parametrize("staged", [True, False])
def test_half_precision_and_int8_rows_at_odd_offsets_read_bit_identical(tmp_path, staged):
    # int8 tensors of odd sizes put the bf16/fp16 ones after them at odd offsets (copied
    # out of the bytes read), even ones are views of the staging buffer
    from recframe.checkpoint.storage import Storage

    tensors = {"a": torch.arange(41, dtype=torch.int8),  # written biggest first
               "b": torch.randn(6, 3).to(torch.bfloat16),
               "x": torch.arange(33, dtype=torch.int8),
               "c": torch.arange(3, dtype=torch.int8),
               "d": torch.randn(5, 2).to(torch.float16),
               "e": torch.randn(4, 4).to(torch.bfloat16),
               "f": torch.tensor([True, False, True])}
    storage = Storage(str(tmp_path))
    directory = str(tmp_path / "ckpt_1")
    os.makedirs(directory)
    meta = format.write_tensors(storage, directory, tensors, "data", 1).tensors
    offsets = {k: meta[k]["shards"][0]["chunks"][0]["offset"] for k in tensors}
    assert offsets["b"] % 2 and not offsets["e"] % 2 and not offsets["d"] % 2, offsets
    entries, ends = incremental._small_extents(storage, directory, meta, list(tensors))
    staging = incremental._Staging(storage) if staged else None
    if staging is not None:
        staging.reserve(directory, ends)
    got = incremental._read_small(storage, directory, entries, ends, staging)
    if staging is not None:
        staging.close()
    for key, value in tensors.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
        assert got[key].data_ptr() % value.element_size() == 0, key


def test_a_delta_file_swapped_for_a_fifo_after_its_check_does_not_hang(tmp_path, monkeypatch):
    """`open_member` checked a file's type with stat, then opened the path: a file
    replaced by a FIFO in between (simulated: stat still sees the regular file) blocked
    the background reader in open() forever, and the restore waiting for it."""
    _chain(tmp_path)
    manifest = _read_manifest(tmp_path, "ckpt_2")
    _, entry = _values(manifest)
    path = str(tmp_path / "ckpt_2" / entry["shards"][0]["chunks"][0]["file"])
    regular = os.stat(path)
    os.unlink(path)
    os.mkfifo(path)
    real_stat = os.stat

    def stale_stat(p, *a, **k):  # what stat saw before the swap
        return regular if os.fspath(p) == path else real_stat(p, *a, **k)

    monkeypatch.setattr(os, "stat", stale_stat)
    model, sparse, dense, manager = _fresh(tmp_path)
    before = _snapshot(model, sparse, dense)
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            manager.saver.load(ckpt_id=4)
        except BaseException as e:
            outcome.append(e)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(5)
    hung = loader.is_alive()
    if hung:  # unblock the reader stuck in open(): a writer appears and leaves
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        loader.join(20)
    assert not hung, "the restore blocked opening a FIFO"
    assert outcome and isinstance(outcome[0], CheckpointCorruptError), outcome
    assert "not a regular file" in str(outcome[0])
    _assert_same(_snapshot(model, sparse, dense), before)


def test_a_chain_link_replaced_by_another_runs_checkpoint_is_refused(tmp_path):
    """A delta recorded only its links' names: another run's ckpt_2 copied over ours
    (same name, chain and layout) was applied between our base and our ckpt_3, giving
    a state neither run had. Now each delta names its parent's random id."""
    import shutil

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    expected = _chain(ours)
    model, sparse, dense, manager = _build(theirs, "adam", seed=7, every=10)
    for step, batch in enumerate(_batches(3, seed=3), start=1):
        _train_step(model, sparse, dense, batch)
        manager.step(step)
    manager.close()
    shutil.rmtree(ours / "ckpt_2")
    shutil.copytree(theirs / "ckpt_2", ours / "ckpt_2")  # same name, chain and layout
    model, sparse, dense, manager = _fresh(ours)
    with pytest.raises(CheckpointCorruptError, match="ckpt_2 and .*ckpt_1, which are not "
                       "of one chain.*replaced by another run"):
        manager.saver.load(ckpt_id=3)
    assert manager.restore() == 1
    _assert_same(_snapshot(model, sparse, dense), expected[1])
