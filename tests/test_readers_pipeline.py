"""The readers' decode pipeline: a block no decoding thread has started yet is decoded by
the iterating thread instead of waited for, and the wait is counted."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq
from test_readers import criteo_lines, rows_of, write

from recframe import readers
from recframe.readers import TabularDataset, criteo_tsv
from recframe.schema import FeatureSchema


def test_blocks_no_thread_started_are_decoded_by_the_caller(tmp_path, monkeypatch) -> None:
    """Decoding threads that get no core (here: held in their start-up) do not hold up
    the caller: it decodes the blocks itself, in order, and the batches are the same."""
    raw = write(tmp_path / "day_0", criteo_lines(300, seed=9))
    reference = rows_of(list(criteo_tsv(raw, batch_size=32, num_workers=0)))
    release = threading.Event()
    monkeypatch.setattr(readers, "_lower_priority", lambda _: release.wait(30))

    class Pool(readers.ThreadPoolExecutor):
        def shutdown(self, *args, **kwargs):
            release.set()  # the threads may start now: every block was taken
            super().shutdown(*args, **kwargs)

    monkeypatch.setattr(readers, "ThreadPoolExecutor", Pool)
    decoded_by: list[str] = []
    chunk = readers.TabularDataset._text_chunk

    def spy(self, *args):
        decoded_by.append(threading.current_thread().name)
        return chunk(self, *args)

    monkeypatch.setattr(readers.TabularDataset, "_text_chunk", spy)
    ds = criteo_tsv(raw, batch_size=32, num_workers=2, prefetch=3, block_size=4096)
    try:
        got = rows_of(list(ds))
    finally:
        release.set()
    assert got == reference
    assert len(decoded_by) > 3 and set(decoded_by) == {threading.current_thread().name}
    assert ds.input_wait_seconds > 0


def test_input_wait_is_counted_and_positions_stay_exact(tmp_path) -> None:
    table = pa.table({"y": [float(i % 2) for i in range(500)], "x": [1.0] * 500,
                      "s": list(range(500))})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=64)
    schema = FeatureSchema(labels=["y"], dense=["x"], sparse=["s"],
                           default_num_embeddings=1000, default_embedding_dim=4)
    ds = TabularDataset(str(tmp_path), schema, batch_size=50, num_workers=2, prefetch=2)
    it = iter(ds)
    first = [next(it) for _ in range(3)]
    state = ds.state_dict()
    it.close()
    rest = TabularDataset(str(tmp_path), schema, batch_size=50, num_workers=1)
    rest.load_state_dict(state)
    ids = [b.sparse_features.values().tolist() for b in first + list(rest)]
    assert sum(ids, []) == list(range(500))
    assert ds.input_wait_seconds >= 0.0 and rest.input_wait_seconds >= 0.0
