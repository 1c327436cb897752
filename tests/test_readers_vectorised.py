"""The whole-table decode (`decode_table`: float columns as one array, single-valued
integer ids as one array with one modulo) against the column-by-column decode
(`_decode_columns`, the previous path, kept for other column types and for naming bad
input), and the label range check, on TSV and Parquet."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recframe import readers
from recframe.readers import (
    DataError,
    TabularDataset,
    _decode_columns,
    decode_table,
)
from recframe.schema import (
    DenseColumn,
    DynamicSpec,
    FeatureSchema,
    IdMapping,
    SparseColumn,
    TableSpec,
)


def _schema(weight: bool = True, labels: tuple[str, ...] = ("y",)) -> FeatureSchema:
    dense = [DenseColumn("d_log", transform="log1p"),
             DenseColumn("d_std", transform="standardize", mean=2.0, std=3.0, fill=-1.5),
             DenseColumn("d_int", fill=7.0),
             DenseColumn("d_f32")]
    sparse = [
        SparseColumn("i64", mapping=IdMapping("modulo")),        # negatives, nulls
        SparseColumn("hexed", mapping=IdMapping("hex")),         # 64-bit parsed hex ids
        SparseColumn("i32", table="i64"),                        # int32: cast
        SparseColumn("bag", table="i64"),                        # a list column
        SparseColumn("u64", mapping=IdMapping("modulo")),        # beyond int64
        SparseColumn("user", mapping=IdMapping("hash", salt=5)),  # strings
        SparseColumn("dyn", mapping=IdMapping("dynamic", dynamic=DynamicSpec())),
        SparseColumn("tags", table="i64", delimiter="|"),         # delimited strings
        SparseColumn("i8", table="hexed"),
    ]
    tables = [TableSpec("i64", 13, 4), TableSpec("hexed", 1_000_003, 4),
              TableSpec("u64", 97, 4), TableSpec("user", 31, 4), TableSpec("dyn", 50, 4)]
    return FeatureSchema(labels=list(labels), weight="w" if weight else None, dense=dense,
                         sparse=sparse, tables=tables)


def _table(n: int, seed: int, labels: tuple[str, ...] = ("y",)) -> pa.Table:
    rng = random.Random(seed)

    def maybe(v, p=0.2):
        return None if rng.random() < p else v

    cols = {name: pa.array([float(rng.random() < 0.3) for _ in range(n)]) for name in labels}
    cols.update({
        "w": pa.array([rng.uniform(0.5, 2) for _ in range(n)]),
        "d_log": pa.array([maybe(rng.uniform(-5, 1e4)) for _ in range(n)]),
        "d_std": pa.array([maybe(rng.gauss(2, 3)) for _ in range(n)]),
        "d_int": pa.array([maybe(rng.randint(-100, 100)) for _ in range(n)], pa.int32()),
        "d_f32": pa.array([rng.uniform(-1, 1) for _ in range(n)], pa.float32()),
        "i64": pa.array([maybe(rng.randint(-(1 << 62), 1 << 62)) for _ in range(n)]),
        "hexed": pa.array([maybe(rng.getrandbits(64) - (1 << 63)) for _ in range(n)]),
        "i32": pa.array([maybe(rng.randint(-1000, 1000)) for _ in range(n)], pa.int32()),
        "bag": pa.array([maybe([rng.randint(-9, 99) for _ in range(rng.randint(0, 3))])
                         for _ in range(n)], pa.list_(pa.int64())),
        "u64": pa.array([maybe(rng.getrandbits(64)) for _ in range(n)], pa.uint64()),
        "user": pa.array([maybe(rng.choice(["", "a", "bob", "ünï"])) for _ in range(n)]),
        "dyn": pa.array([maybe(rng.randint(-(1 << 40), 1 << 40)) for _ in range(n)]),
        "tags": pa.array([maybe("|".join(str(rng.randint(-5, 50))
                                         for _ in range(rng.randint(0, 3)))) for _ in range(n)]),
        "i8": pa.array([rng.randint(-128, 127) for _ in range(n)], pa.int8()),
    })
    return pa.table(cols)


def _same(a, b) -> None:
    for name in ("labels", "dense", "values", "lengths", "ends"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert np.array_equal(x, y), name
    assert (a.weights is None) == (b.weights is None)
    if a.weights is not None:
        assert np.array_equal(a.weights, b.weights)


def _no_fallback(monkeypatch) -> None:
    """Good data never takes the column-by-column path (it is only the reference)."""
    def refuse(*args, **kwargs):
        raise AssertionError("decode_table fell back to _decode_columns")

    monkeypatch.setattr(readers, "_decode_columns", refuse)


@pytest.mark.parametrize("labels", [("y",), ("y", "y2")])
@pytest.mark.parametrize("labelled", [True, False])
def test_whole_table_decode_equals_column_by_column(monkeypatch, labels, labelled) -> None:
    """Mixed columns with nulls, negative ids, ids beyond int64, lists, strings, dynamic
    ids, fills and transforms; also sliced tables (an Arrow offset, as a row group cut
    at a rank's span edge) and tables of several chunks."""
    schema = _schema(labels=labels)
    table = _table(300, seed=len(labels), labels=labels)
    ends = np.arange(1, 301, dtype=np.int64)
    cases = [(table, ends)] + [(table.slice(a, b - a), ends[a:b])
                               for a, b in [(3, 250), (17, 18), (64, 300)]]
    cases.append((pa.concat_tables([table.slice(0, 100), table.slice(100)]), ends))
    expected = [_decode_columns(t, schema, labelled, 0, e) for t, e in cases]
    _no_fallback(monkeypatch)
    for (t, e), want in zip(cases, expected):
        _same(decode_table(t, schema, labelled, 0, e), want)


def test_only_integer_ids_take_one_array_and_match(monkeypatch) -> None:
    """The all-integer case (Criteo's converted Parquet: every sparse column parsed):
    the whole KJT comes from one ``[features, rows]`` array."""
    schema = FeatureSchema(labels=["y"], dense=["x"], sparse=[
        SparseColumn("a", mapping=IdMapping("hex")), SparseColumn("b"),
        SparseColumn("c", mapping=IdMapping("modulo"))],
        tables=[TableSpec("a", 100_003, 4), TableSpec("b", 7, 4), TableSpec("c", 1 << 40, 4)])
    rng = np.random.default_rng(0)
    n = 500
    ids = rng.integers(-(1 << 63), (1 << 63) - 1, size=(3, n), dtype=np.int64)
    nulls = rng.random((3, n)) < 0.3
    table = pa.table({"y": pa.array(rng.integers(0, 2, n).astype(float)),
                      "x": pa.array(rng.random(n)),
                      **{k: pa.array(ids[i], mask=nulls[i]) for i, k in enumerate("abc")}})
    ends = np.arange(n, dtype=np.int64)
    slow = _decode_columns(table, schema, True, 0, ends)
    _no_fallback(monkeypatch)
    fast = decode_table(table, schema, True, 0, ends)
    _same(fast, slow)
    a = [int(v) % 100_003 for v, m in zip(ids[0], nulls[0]) if not m]  # unsigned 64 bits
    assert fast.values[:len(a)].tolist() == [(v & ((1 << 64) - 1)) % 100_003 for v in
                                              (int(x) for x, m in zip(ids[0], nulls[0])
                                               if not m)]
    b = [int(v) % 7 for v, m in zip(ids[1], nulls[1]) if not m]  # Python's modulo
    assert fast.values[len(a):len(a) + len(b)].tolist() == b


def test_nan_under_a_null_takes_the_fill(monkeypatch) -> None:
    """Arrow leaves the data under a null undefined: a NaN there is still a null."""
    data = np.array([1.0, np.nan, 3.0, np.inf], dtype=np.float64)
    validity = np.packbits(np.array([1, 0, 1, 0], dtype=np.uint8), bitorder="little")
    x = pa.Array.from_buffers(pa.float64(), 4, [pa.py_buffer(validity.tobytes()),
                                                pa.py_buffer(data.tobytes())], null_count=2)
    schema = FeatureSchema(labels=["y"], dense=[DenseColumn("x", fill=0.5)], sparse=["s"],
                           default_num_embeddings=10, default_embedding_dim=4)
    table = pa.table({"y": [0.0, 1.0, 1.0, 0.0], "x": x, "s": [1, 2, 3, 4]})
    assert decode_table(table.slice(0, 1), schema, True, 0, np.arange(1)).dense[0, 0] == 1.0
    chunk = decode_table(table, schema, True, 0, np.arange(4))
    assert chunk.dense[:, 0].tolist() == [1.0, 0.5, 3.0, 0.5]


LABEL_SCHEMA = FeatureSchema(labels=["y"], columns=["y", "x", "s"], dense=["x"],
                             sparse=["s"], default_num_embeddings=10,
                             default_embedding_dim=4)


@pytest.mark.parametrize("bad, shown", [("2", "2.0"), ("-1", "-1.0"), ("1.5", "1.5")])
def test_label_outside_0_1_names_file_line_and_column_tsv(tmp_path, bad, shown) -> None:
    lines = ["1\t0.5\t3", "0\t1\t4", "0.25\t\t5", f"{bad}\t2\t6", "1\t3\t7"]
    (tmp_path / "d.tsv").write_text("\n".join(lines) + "\n")
    ds = TabularDataset(str(tmp_path / "d.tsv"), LABEL_SCHEMA, format="tsv", batch_size=2)
    with pytest.raises(DataError, match=rf"d.tsv:4: column 'y': label {shown} is outside "
                                        r"\[0, 1\]"):
        list(ds)


def test_nan_label_is_refused_tsv(tmp_path) -> None:
    (tmp_path / "d.tsv").write_text("1\t0.5\t3\nnan\t1\t4\n")
    with pytest.raises(DataError, match=r"d.tsv:2: column 'y': nan is not a finite"):
        list(TabularDataset(str(tmp_path / "d.tsv"), LABEL_SCHEMA, format="tsv"))


@pytest.mark.parametrize("bad", [2.0, -1.0, float("nan")])
def test_label_outside_0_1_names_row_group_and_row_parquet(tmp_path, bad) -> None:
    y = [1.0, 0.0, 0.5, 1.0, bad, 0.0]
    pq.write_table(pa.table({"y": y, "x": [1.0] * 6, "s": list(range(6))}),
                   tmp_path / "p.parquet", row_group_size=3)
    what = "nan is not a finite number" if bad != bad else rf"label {bad} is outside \[0, 1\]"
    with pytest.raises(DataError, match=rf"p.parquet: row group 1, row 1 \(row 4 of the "
                                        rf"file\): column 'y': {what}"):
        list(TabularDataset(str(tmp_path), LABEL_SCHEMA, batch_size=2))


def test_labels_0_and_1_and_probabilities_pass(tmp_path) -> None:
    pq.write_table(pa.table({"y": [0, 1, 1, 0], "x": [1.0] * 4, "s": [1, 2, 3, 4]}),
                   tmp_path / "a.parquet")
    pq.write_table(pa.table({"y": [0.0, 1.0, 0.25, 1e-9], "x": [1.0] * 4, "s": [1, 2, 3, 4]}),
                   tmp_path / "b.parquet")
    got = [b.labels.tolist() for b in TabularDataset(str(tmp_path), LABEL_SCHEMA,
                                                      batch_size=4)]
    assert got == [[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.25, np.float32(1e-9).item()]]


@pytest.mark.parametrize("rows", [100_003, (1 << 31) - 1, 1 << 31])
def test_uint32_ids_map_in_32_bits_to_the_same_rows(monkeypatch, rows) -> None:
    """uint32 id columns (what convert writes for hex ids of up to 8 digits), with nulls
    and sliced (an Arrow offset): mapped in 32 bits to int32 rows, the same rows as the
    column-by-column path; a table of 2**31 rows or more keeps int64 rows."""
    schema = FeatureSchema(labels=["y"], dense=["x"], sparse=[
        SparseColumn("a", mapping=IdMapping("hex")), SparseColumn("b", table="a"),
        SparseColumn("c", mapping=IdMapping("modulo"))],
        tables=[TableSpec("a", rows, 4), TableSpec("c", 7, 4)])
    rng = np.random.default_rng(1)
    n = 400
    ids = rng.integers(0, 1 << 32, size=(3, n), dtype=np.uint64).astype(np.uint32)
    ids[:, :3] = [0, (1 << 32) - 1, (1 << 31)]  # the edges of 32 bits
    nulls = rng.random((3, n)) < 0.25
    table = pa.table({"y": pa.array(rng.integers(0, 2, n).astype(float)),
                      "x": pa.array(rng.random(n)),
                      **{k: pa.array(ids[i], pa.uint32(), mask=nulls[i])
                         for i, k in enumerate("abc")}})
    ends = np.arange(n, dtype=np.int64)
    cases = [(table, ends), (table.slice(5, 300), ends[5:305])]
    expected = [_decode_columns(t, schema, True, 0, e) for t, e in cases]
    _no_fallback(monkeypatch)
    for (t, e), want in zip(cases, expected):
        got = decode_table(t, schema, True, 0, e)
        assert got.values.dtype == (np.int32 if rows < 1 << 31 else np.int64)
        assert np.array_equal(got.values, want.values)
        assert np.array_equal(got.lengths, want.lengths)
    first = [int(v) % rows for v, m in zip(ids[0], nulls[0]) if not m]
    assert decode_table(table, schema, True, 0, ends).values[:len(first)].tolist() == first
