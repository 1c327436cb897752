"""``inline_threads``: with ``num_workers=0`` each block is parsed on pyarrow's thread
pool (CSV parse in pieces, Parquet columns in parallel); with decoding threads every
block stays on one thread. The batches are the same either way (a row longer than
a piece too), and bad input is named as before (its block parsed again on one thread)."""

from __future__ import annotations

import threading

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from test_readers import criteo_lines, same_batches, write

from recframe.readers import DataError, TabularDataset, convert_to_parquet, criteo_tsv
from recframe.schema import FeatureSchema, IdMapping, SparseColumn, TableSpec


@pytest.fixture
def calls(monkeypatch):
    """Records ``use_threads`` of every CSV parse and row-group read (and parses with 2
    threads' pieces whatever this machine's core count)."""
    seen: list[tuple[str, bool, str]] = []
    read_csv, read_row_group = pacsv.read_csv, pq.ParquetFile.read_row_group

    def csv(source, read_options=None, **kw):
        seen.append(("csv", read_options.use_threads, threading.current_thread().name))
        return read_csv(source, read_options=read_options, **kw)

    def row_group(self, i, *a, use_threads=False, **kw):
        seen.append(("parquet", use_threads, threading.current_thread().name))
        return read_row_group(self, i, *a, use_threads=use_threads, **kw)

    monkeypatch.setattr(pacsv, "read_csv", csv)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", row_group)
    monkeypatch.setattr(pa, "cpu_count", lambda: 2)
    return seen


def test_inline_blocks_use_threads_and_give_the_same_batches(tmp_path, calls) -> None:
    raw = write(tmp_path / "day_0", criteo_lines(3000, seed=11))
    convert_to_parquet(criteo_tsv(raw), str(tmp_path / "pq"), row_group_size=500,
                       progress=False)
    for make in (lambda **kw: criteo_tsv(raw, batch_size=64, block_size=1 << 20, **kw),
                 lambda **kw: TabularDataset(str(tmp_path / "pq"), FeatureSchema.criteo(),
                                             batch_size=64, **kw)):
        calls.clear()
        one = list(make(num_workers=0, inline_threads=False))
        assert calls and not any(t for _, t, _ in calls)
        calls.clear()
        threaded = list(make(num_workers=0))
        assert calls and all(t for _, t, _ in calls)
        same_batches(one, threaded)


def test_a_row_longer_than_a_piece_parses_the_same(tmp_path, calls) -> None:
    """Pieces are >= 1 MiB; a 1.5 MiB row spans two of them (pyarrow carries it over):
    the batches are those of a one-thread parse."""
    schema = FeatureSchema(labels=["y"], dense=["x"],
                           sparse=[SparseColumn("tags", delimiter="|")],
                           tables=[TableSpec("tags", 1000, 4)])
    big = "|".join(str(i % 997) for i in range(300_000))  # ~1.5 MB
    lines = ["y,x,tags", f"1,0.5,{big}"] + [f"{i % 2},{i},{i}|{i + 1}" for i in range(3000)]
    path = write(tmp_path / "a.csv", lines)
    one = list(TabularDataset(path, schema, format="csv", header=True, batch_size=100,
                              num_workers=0, inline_threads=False))
    calls.clear()
    threaded = list(TabularDataset(path, schema, format="csv", header=True, batch_size=100,
                                   num_workers=0))
    assert [t for _, t, _ in calls] == [True]
    same_batches(one, threaded)


def test_bad_input_is_named_from_a_threaded_parse(tmp_path, calls) -> None:
    """A 2.4 MB block parsed in 2 pieces; the bad line lies in the second."""
    lines = criteo_lines(12_000, seed=12)
    fields = lines[9000].split("\t")
    fields[3] = "x7"
    lines[9000] = "\t".join(fields)
    raw = write(tmp_path / "day_0", lines)
    with pytest.raises(DataError, match=r"day_0:9001: column 'int_2': 'x7' is not a number"):
        list(criteo_tsv(raw, batch_size=64, num_workers=0))
    assert [t for _, t, _ in calls] == [True, False]


def test_pyarrows_own_error_names_the_line_from_a_threaded_parse(tmp_path, calls) -> None:
    """Bytes that are not UTF-8 in a string column: only pyarrow's parse finds them, and
    names a row of what it parsed: the block parsed again in one piece names its line."""
    schema = FeatureSchema(labels=["y"], dense=["x"],
                           sparse=[SparseColumn("user", mapping=IdMapping("hash"))],
                           tables=[TableSpec("user", 1000, 4)])
    rows = [b"y,x,user"] + [b"%d,%d.25,user_%08d" % (i % 2, i, i) for i in range(100_000)]
    rows[80_001] = b"1,2.5,caf\xe9"  # latin-1, line 80002
    (tmp_path / "a.csv").write_bytes(b"\n".join(rows) + b"\n")
    with pytest.raises(DataError, match=r"a.csv:80002: column 'user': .*UTF8"):
        list(TabularDataset(str(tmp_path / "a.csv"), schema, format="csv", header=True,
                            batch_size=1000, num_workers=0))
    assert [t for _, t, _ in calls] == [True, False]


def test_with_decoding_threads_every_block_parses_on_one_thread(tmp_path, calls) -> None:
    """With decoding threads, pyarrow's pool beside them would oversubscribe the cores
    (a TSV pass: 1.33M rows/s against 1.57M on one thread each): every block is parsed
    on one thread, the ones the caller decodes itself too."""
    raw = write(tmp_path / "day_0", criteo_lines(2000, seed=13))
    data = criteo_tsv(raw, batch_size=64, block_size=4096, num_workers=2)
    assert sum(len(b.labels) for b in data) == 2000
    assert len(calls) == data._tasks_done > 2
    assert not any(threads for _, threads, _ in calls)
