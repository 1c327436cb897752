"""The decoding threads' priority (``worker_nice``): ``"idle"`` (the default) runs them
under SCHED_IDLE, falling back to nice 19 where that is refused; a block a starved thread
started is decoded by the caller too, with the same batches and bytes counted once."""

from __future__ import annotations

import os
import sys
import threading
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_readers import criteo_lines, rows_of, write

from recframe import readers
from recframe.readers import TabularDataset, criteo_tsv
from recframe.schema import FeatureSchema

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread: Linux")


def _decode_threads(ds) -> tuple[Any, list[int]]:
    """Native ids of the decoding threads ``ds`` starts for its first batch (its
    iterator stays open: the caller closes it)."""
    before = set(threading.enumerate())  # other tests' readers may still run
    it = iter(ds)
    next(it)
    found = [t.native_id for t in threading.enumerate()
             if t not in before and t.native_id is not None]
    return it, found


def _sched_idle_allowed() -> bool:
    """Whether this kernel/container lets a thread take SCHED_IDLE (tried in a thread of
    its own, which then ends)."""
    ok: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            ok.append(True)
        except (OSError, AttributeError):
            ok.append(False)

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return ok[0]


@linux
def test_idle_threads_run_under_sched_idle_by_default(tmp_path) -> None:
    if not _sched_idle_allowed():
        pytest.skip("SCHED_IDLE refused here (the fallback is tested below)")
    raw = write(tmp_path / "day_0", criteo_lines(400, seed=1))
    ds = criteo_tsv(raw, batch_size=8, num_workers=2, block_size=1024)
    assert ds.worker_nice == "idle"
    base = os.sched_getscheduler(0)
    it, tids = _decode_threads(ds)
    try:
        assert tids and {os.sched_getscheduler(t) for t in tids} == {os.SCHED_IDLE}
    finally:
        it.close()
    assert os.sched_getscheduler(0) == base  # the caller keeps its policy


@linux
def test_idle_falls_back_to_nice_19_where_refused(tmp_path, monkeypatch) -> None:
    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(readers.os, "sched_setscheduler", refuse)
    raw = write(tmp_path / "day_0", criteo_lines(400, seed=2))
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    it, tids = _decode_threads(criteo_tsv(raw, batch_size=8, num_workers=2, block_size=1024,
                                          worker_nice="idle"))
    try:
        assert tids and {os.getpriority(os.PRIO_PROCESS, t) for t in tids} == {19}
        assert {os.sched_getscheduler(t) for t in tids} == {os.SCHED_OTHER}
    finally:
        it.close()
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base


@pytest.mark.parametrize("bad", [-1, "low", 1.5, True, None])
def test_worker_nice_rejects_other_values(tmp_path, bad) -> None:
    raw = write(tmp_path / "day_0", criteo_lines(10))
    with pytest.raises(ValueError, match=r"worker_nice must be an integer >= 0 .* or 'idle'"):
        criteo_tsv(raw, worker_nice=bad)


def _parquet(tmp_path) -> tuple[str, FeatureSchema]:
    n = 600
    table = pa.table({"y": [float(i % 2) for i in range(n)], "x": [float(i) for i in range(n)],
                      "s": list(range(n))})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=50)
    schema = FeatureSchema(labels=["y"], dense=["x"], sparse=["s"],
                           default_num_embeddings=1000, default_embedding_dim=4)
    return str(tmp_path), schema


def test_a_started_block_a_starved_thread_holds_is_decoded_by_the_caller(
    tmp_path, monkeypatch
) -> None:
    """Decoding threads that start blocks and then get no core (held here until the
    pass ends) do not hold up the caller past about one block's decode time: it decodes
    those blocks too; the batches are the same, and the bytes are counted once."""
    path, schema = _parquet(tmp_path)
    reference = TabularDataset(path, schema, batch_size=32, num_workers=0)
    want = [b.sparse_features.values().tolist() for b in reference]
    release = threading.Event()
    task = readers.TabularDataset._parquet_task
    decoded_by: list[str] = []

    def stalled(self, *args):
        if threading.current_thread().name.startswith("recframe-decode"):
            release.wait(30)  # started, then starved
        decoded_by.append(threading.current_thread().name)
        return task(self, *args)

    class Pool(readers.ThreadPoolExecutor):
        def shutdown(self, *args, **kwargs):
            release.set()  # the pass is over: the threads finish their copies
            super().shutdown(*args, **kwargs)

    monkeypatch.setattr(readers.TabularDataset, "_parquet_task", stalled)
    monkeypatch.setattr(readers, "ThreadPoolExecutor", Pool)
    ds = TabularDataset(path, schema, batch_size=32, num_workers=2, prefetch=3)
    try:
        got = [b.sparse_features.values().tolist() for b in ds]
    finally:
        release.set()
    for t in threading.enumerate():  # the pass does not wait for them: they end now
        if t.name.startswith("recframe-decode"):
            t.join(10)
    assert got == want
    me = threading.current_thread().name
    assert decoded_by.count(me) == 12  # every row group, in order, by the caller
    assert any(name != me for name in decoded_by)  # the threads had started some
    assert ds.bytes_read == reference.bytes_read  # not twice for the blocks done twice
    assert ds.input_wait_seconds > 0


def test_a_slow_started_block_is_waited_for_not_decoded_twice(tmp_path, monkeypatch) -> None:
    """A thread that is decoding (not starved) gets about one block's decode time: a
    block finishing within it is taken from the thread, not decoded again."""
    path, schema = _parquet(tmp_path)
    want = rows_of(list(TabularDataset(path, schema, batch_size=32, num_workers=0)))
    monkeypatch.setattr(readers, "_MIN_PATIENCE", 5.0)
    monkeypatch.setattr(readers, "_FIRST_PATIENCE", 5.0)
    task = readers.TabularDataset._parquet_task
    calls: list[tuple] = []

    def counted(self, *args):
        calls.append(args)
        return task(self, *args)

    monkeypatch.setattr(readers.TabularDataset, "_parquet_task", counted)
    ds = TabularDataset(path, schema, batch_size=32, num_workers=2, prefetch=3)
    assert rows_of(list(ds)) == want
    assert len(calls) == len(set(calls)) == 12
