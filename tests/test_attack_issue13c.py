"""Attack review of the TSV one-piece read, the hex block parse and the caller's steal of
a started block (issue 13, third pass): findings, each pinned by a test that failed
before its fix."""

from __future__ import annotations

import threading
import time

import pytest
from test_readers import criteo_lines, rows_of, write
from torch.utils.data import DataLoader

from recframe import readers
from recframe.readers import criteo_tsv


def _stall_first_block(monkeypatch) -> threading.Event:
    """Decoding threads hang in their first block (until the returned event is set): a
    thread that started a block and then gets no core for as long as the test runs."""
    release = threading.Event()
    task = readers.TabularDataset._range_task

    def stalled(self, part_index, start, end, raw=False):
        if threading.current_thread().name.startswith("recframe-decode") and start == 0:
            release.wait(60)
        return task(self, part_index, start, end, raw)

    monkeypatch.setattr(readers.TabularDataset, "_range_task", stalled)
    return release


def _in_thread(fn, timeout: float = 15.0):
    """``fn()`` run in a helper thread; its result, or AssertionError if it hangs."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "hung waiting for a stalled decoding thread"
    return out[0]


def test_a_pass_ends_while_a_thread_that_started_a_block_stays_stalled(
    tmp_path, monkeypatch
) -> None:
    """The caller decoded the stalled thread's block itself, then waited for that thread
    at the end of the pass (``shutdown(wait=True)``), i.e. for as long as it got no core:
    now the pass ends, with the same batches, and the bytes are counted once at once
    (the thread's copy, finishing later, adds nothing)."""
    raw = write(tmp_path / "day_0", criteo_lines(300, seed=3))
    reference = criteo_tsv(raw, batch_size=32, num_workers=0, block_size=4096)
    want = rows_of(list(reference))
    release = _stall_first_block(monkeypatch)
    ds = criteo_tsv(raw, batch_size=32, num_workers=2, prefetch=3, block_size=4096)
    try:
        got = _in_thread(lambda: rows_of(list(ds)))
        assert got == want
        assert ds.bytes_read == reference.bytes_read
    finally:
        release.set()
    for t in threading.enumerate():
        if t.name.startswith("recframe-decode"):
            t.join(10)  # they end after their (dropped) block
    assert ds.bytes_read == reference.bytes_read


def test_closing_an_iterator_does_not_wait_for_a_stalled_thread(tmp_path, monkeypatch) -> None:
    """``break`` / ``close()`` of an iterator (an eval loop that stops early) returned only
    once every decoding thread finished its block; a starved one held it up."""
    raw = write(tmp_path / "day_0", criteo_lines(300, seed=4))
    release = _stall_first_block(monkeypatch)
    ds = criteo_tsv(raw, batch_size=32, num_workers=2, prefetch=3, block_size=4096)

    def first_then_close() -> int:
        it = iter(ds)
        n = next(it).labels.shape[0]
        it.close()
        return n

    try:
        assert _in_thread(first_then_close) == 32
        state = ds.state_dict()
    finally:
        release.set()
    again = criteo_tsv(raw, batch_size=32, num_workers=0, block_size=4096)
    again.load_state_dict(state)
    whole = rows_of(list(criteo_tsv(raw, batch_size=32, num_workers=0, block_size=4096)))
    assert rows_of(list(again)) == whole[32:]


def test_breaking_out_of_a_loop_ends_the_decoding_threads(tmp_path) -> None:
    """The dataset held its last iterator strongly: after a ``break`` (an eval loop that
    stops early) or dropping the iterator, its decoding threads and decoded blocks lived
    on until the next ``iter()`` or the dataset's own end."""
    raw = write(tmp_path / "day_0", criteo_lines(400, seed=5))
    ds = criteo_tsv(raw, batch_size=16, num_workers=2, prefetch=3, block_size=2048)
    before = set(threading.enumerate())
    for _ in ds:
        break
    started = [t for t in threading.enumerate()
               if t not in before and t.name.startswith("recframe-decode")]
    for t in started:
        t.join(10)
    assert not [t for t in started if t.is_alive()]
    it = iter(ds)
    next(it)
    del it
    alive = [t for t in threading.enumerate()
             if t not in before and t.name.startswith("recframe-decode")]
    for t in alive:
        t.join(10)
    assert not [t for t in alive if t.is_alive()]
    assert ds.state_dict()["offset"] > 0  # the position of the batch taken stays


def test_dataloader_worker_processes_are_refused_not_read_twice(tmp_path) -> None:
    """``DataLoader(ds, num_workers=2)`` yielded every sample twice (each worker process
    read the whole share): now refused, naming the fix."""
    raw = write(tmp_path / "day_0", criteo_lines(64, seed=6))
    ds = criteo_tsv(raw, batch_size=16, num_workers=0)
    one = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="fork")
    assert rows_of(list(one)) == rows_of(list(criteo_tsv(raw, batch_size=16)))  # kept
    loader = DataLoader(ds, batch_size=None, num_workers=2,
                        multiprocessing_context="fork")
    it = iter(loader)
    try:
        with pytest.raises(ValueError, match=r"2 DataLoader worker processes.*num_workers=0"):
            next(it)
    finally:
        it._shutdown_workers()  # now, not at some later test's GC


def test_blocks_slow_to_read_are_waited_for_not_read_twice(tmp_path, monkeypatch) -> None:
    """The caller's patience was the blocks' mean CPU time: a block read from slow storage
    (S3: mostly waiting, little CPU) was read a second time by the caller after a few ms
    of its thread's wait, doubling the reads. Time spent waiting for I/O counts now (time
    waiting for a core does not), so each block is read once (the first block, before any
    block's time is known, aside)."""
    raw = write(tmp_path / "day_0", criteo_lines(200, seed=7))
    want = rows_of(list(criteo_tsv(raw, batch_size=32, num_workers=0, block_size=4096)))
    task = readers.TabularDataset._range_task
    reads: list[int] = []

    def remote(self, part_index, start, end, raw=False):
        reads.append(start)
        time.sleep(0.05)  # a round trip to the storage: no CPU
        return task(self, part_index, start, end, raw)

    monkeypatch.setattr(readers.TabularDataset, "_range_task", remote)
    ds = criteo_tsv(raw, batch_size=32, num_workers=2, prefetch=3, block_size=4096)
    assert rows_of(list(ds)) == want
    twice = sorted({s for s in reads if reads.count(s) > 1})
    assert twice in ([], [0]), (twice, len(set(reads)))


def test_hex_pair_table_follows_the_cpu_byte_order(monkeypatch):
    """The digit-pair table is indexed by two characters read as one native uint16: on a
    big-endian CPU the first character is the high byte (the table was little-endian
    only)."""
    import sys

    import numpy as np

    from recframe import schema

    for order in ("little", "big"):
        monkeypatch.setattr(sys, "byteorder", order)
        table = schema._hex_pairs_table()
        for text, value in [(b"a7", 0xA7), (b"0F", 0x0F), (b"f0", 0xF0), (b"99", 0x99)]:
            assert table[int.from_bytes(text, order)] == value, (order, text)
        assert table[int.from_bytes(b"g1", order)] == 0x100
    monkeypatch.undo()
    native = schema._hex_pairs_table()
    pairs = np.frombuffer(b"deadBEEF", dtype=np.uint16)
    assert bytes(native[pairs].astype(np.uint8)) == bytes.fromhex("deadbeef")


def test_training_on_synthetic_data_does_not_load_pyarrow():
    """The trainer, models and CLI import no pyarrow until a reader or a hex parse needs
    it (schema.py imported it at module level: every training process, torchrun ranks
    included, loaded Arrow and its thread pools)."""
    import subprocess
    import sys

    code = ("import sys, recframe.cli, recframe.models, recframe.trainer, recframe.schema; "
            "print('pyarrow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
