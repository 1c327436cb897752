"""The readers' decode pipeline: a block no decoding thread has started yet is decoded by
the iterating thread instead of waited for, and the wait is counted."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_readers import criteo_lines, rows_of, write

from recframe import readers
from recframe.readers import DataError, TabularDataset, criteo_tsv
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


def test_row_groups_decode_in_pieces_with_exact_rows_and_errors(tmp_path, monkeypatch) -> None:
    """A row group is decoded `DECODE_ROWS` rows at a time: the same batches and
    positions, and a bad value still names its row group and row (also when reading
    starts mid-group, as after a resume)."""
    schema = FeatureSchema(labels=["y"], dense=["x"], sparse=["s"],
                           default_num_embeddings=1000, default_embedding_dim=4)
    n = 60
    pq.write_table(pa.table({"y": [float(i % 2) for i in range(n)],
                             "x": [float(i) for i in range(n)], "s": list(range(n))}),
                   tmp_path / "p.parquet", row_group_size=25)
    whole = [b.sparse_features.values().tolist()
             for b in TabularDataset(str(tmp_path), schema, batch_size=7)]
    monkeypatch.setattr(readers, "DECODE_ROWS", 4)
    ds = TabularDataset(str(tmp_path), schema, batch_size=7, num_workers=1)
    assert [b.sparse_features.values().tolist() for b in ds] == whole
    it = iter(ds)
    next(it), next(it)
    state = ds.state_dict()
    it.close()
    assert state["offset"] == 14
    bad = pa.table({"y": [0.0] * n, "x": [1.0] * 43 + [float("inf")] + [1.0] * 16,
                    "s": list(range(n))})
    pq.write_table(bad, tmp_path / "p.parquet", row_group_size=25)
    msg = r"row group 1, row 18 \(row 43 of the file\): column 'x': inf is not a finite"
    with pytest.raises(DataError, match=msg):
        list(TabularDataset(str(tmp_path), schema, batch_size=7))
    again = TabularDataset(str(tmp_path), schema, batch_size=7)
    again.load_state_dict({**state, "offset": 31})  # starts mid-group 1
    with pytest.raises(DataError, match=msg):
        list(again)
