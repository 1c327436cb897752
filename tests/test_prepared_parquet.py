"""Prepared Parquet (`recframe data convert --prepare`, `convert_to_parquet(prepare=True)`):
the batches equal those of the raw data (Criteo TSV, a user CSV schema, mixed Parquet
columns), the footer ties the parts to their schema, damaged or hostile parts fail with
an error naming file, row group, row and column, positions resume and re-split exactly,
and `recframe train` reads such a directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_data_cli import QUIET
from test_readers import (
    CSV_ROWS,
    SCHEMA_YAML,
    criteo_lines,
    csv_rows_table,
    expected_rows,
    rows_of,
    same_batches,
    write,
)
from test_readers_vectorised import _schema, _table

from recframe import cli
from recframe.readers import (
    NO_ID,
    PREPARED_KEY,
    PREPARED_VERSION,
    DataError,
    TabularDataset,
    convert_to_parquet,
    criteo_tsv,
    decode_prepared,
    decode_table,
    prepared_signature,
)
from recframe.schema import (
    DenseColumn,
    FeatureSchema,
    IdMapping,
    SparseColumn,
    TableSpec,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _same_weighted(a, b) -> None:
    """`same_batches` plus the batch type and the weights."""
    same_batches(a, b)
    for x, y in zip(a, b):
        assert type(x) is type(y)
        if hasattr(x, "weights"):
            assert torch.equal(x.weights, y.weights)


def _prepare(source: TabularDataset, out: Path, **kwargs) -> list[str]:
    return convert_to_parquet(source, str(out), progress=False, prepare=True, **kwargs)


# --------------------------------------------------------------------------- same batches


def test_criteo_tsv_prepared_from_the_command_line(tmp_path) -> None:
    """Empty and negative fields, CRLF, .gz: the prepared parts give the batches of the TSV
    reader and of raw-converted Parquet; the footer, float32 and int32 columns without
    nulls, and the original schema beside them."""
    lines = criteo_lines(400, seed=11)
    raw = tmp_path / "raw"
    raw.mkdir()
    write(raw / "day_0", lines[:150], eol="\r\n")
    write(raw / "day_1.gz", lines[150:])
    prepared, plain = tmp_path / "prepared", tmp_path / "plain"
    assert cli.main(["data", "convert", str(raw), "--criteo", "--prepare", "--output",
                     str(prepared), "--rows_per_file", "160", "--row_group_size", "50",
                     "--no_progress"]) == 0
    assert cli.main(["data", "convert", str(raw), "--criteo", "--output", str(plain),
                     "--no_progress"]) == 0
    parts = sorted(prepared.glob("*.parquet"))
    assert [pq.ParquetFile(p).metadata.num_rows for p in parts] == [160, 160, 80]
    assert FeatureSchema.from_file(str(prepared / "schema.yaml")) == FeatureSchema.criteo()
    arrow = pq.read_schema(parts[0])
    record = json.loads(arrow.metadata[PREPARED_KEY])
    assert record == {"version": PREPARED_VERSION,
                      "schema": json.loads(json.dumps(prepared_signature(
                          FeatureSchema.criteo())))}
    for f in arrow:
        assert not f.nullable, f.name
        assert f.type == (pa.int32() if f.name.startswith("cat_") else pa.float32()), f.name
    schema = FeatureSchema.criteo()
    tsv = list(criteo_tsv(str(raw), batch_size=64))
    got = list(TabularDataset(str(prepared), schema, batch_size=64, num_workers=2))
    same_batches(tsv, got)
    assert {b.sparse_features.values().dtype for b in got} == {torch.int64}  # widened
    same_batches(tsv, list(TabularDataset(str(plain), schema, batch_size=64)))
    # raw parts converted before (hex ids parsed to int64) prepared in turn
    assert cli.main(["data", "convert", str(plain), "--criteo", "--format", "parquet",
                     "--prepare", "--output", str(tmp_path / "again"), "--no_progress"]) == 0
    same_batches(tsv, list(TabularDataset(str(tmp_path / "again"), schema, batch_size=64)))
    # rows without an id are NO_ID in the file, no id in the batch
    cats = pq.read_table(parts[0], columns=["cat_0"]).column(0).to_numpy()
    first = [ln.split("\t")[14] for ln in lines[:160]]
    assert [c == NO_ID for c in cats] == [not v for v in first]


def test_user_csv_schema_prepared_from_csv_and_from_parquet(tmp_path) -> None:
    """Header, weight, standardize, hash and delimited tags: prepared from the CSV and
    from raw Parquet (tags a list column, row groups of 1 row): the same samples."""
    schema_path = tmp_path / "schema.yaml"
    schema_path.write_text(SCHEMA_YAML)
    text = "click,w,price,user,item,tags\n" + "".join(f"{','.join(r)}\n" for r in CSV_ROWS)
    (tmp_path / "a.csv").write_text(text)
    assert cli.main(["data", "convert", str(tmp_path / "a.csv"), "--schema", str(schema_path),
                     "--format", "csv", "--header", "--prepare", "--output",
                     str(tmp_path / "from_csv"), "--no_progress"]) == 0
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(csv_rows_table(), raw / "p.parquet", row_group_size=1)
    assert cli.main(["data", "convert", str(raw), "--schema", str(schema_path), "--format",
                     "parquet", "--prepare", "--output", str(tmp_path / "from_pq"),
                     "--no_progress"]) == 0
    csv = list(TabularDataset(str(tmp_path / "a.csv"), str(schema_path), format="csv",
                              header=True, batch_size=2))
    for out in ("from_csv", "from_pq"):
        got = list(TabularDataset(str(tmp_path / out), str(tmp_path / out / "schema.yaml"),
                                  batch_size=2))
        assert rows_of(got) == expected_rows()
        _same_weighted(csv, got)
        assert torch.equal(torch.cat([b.weights for b in got]),
                           torch.tensor([0.5, 1, 2, 1, 1]))
    assert pq.read_schema(tmp_path / "from_csv" / "part-00000.parquet").field(
        "tags").type == pa.large_list(pa.int32())


@pytest.mark.parametrize("labelled", [True, False])
def test_mixed_columns_prepared_from_parquet(tmp_path, labelled) -> None:
    """Nulls, negative and 64-bit ids, uint64, hashed strings, lists, delimited strings,
    dynamic raw ids, fills and transforms, over several files and row groups: prepared,
    the same batches (weights too) as the raw Parquet."""
    schema, table = _schema(), _table(300, seed=3)
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(table.slice(0, 170), raw / "a.parquet", row_group_size=60)
    pq.write_table(table.slice(170), raw / "b.parquet", row_group_size=33)
    source = TabularDataset(str(raw), schema, labelled=labelled, num_workers=0)
    parts = _prepare(source, tmp_path / "out", rows_per_file=120, row_group_size=50)
    assert len(parts) == 3
    arrow = pq.read_schema(parts[0])
    assert arrow.field("dyn").type == pa.int64() and arrow.field("dyn").nullable
    assert arrow.field("bag").type == pa.large_list(pa.int32())
    assert ("y" in arrow.names) == labelled
    _same_weighted(list(TabularDataset(str(raw), schema, labelled=labelled, batch_size=64)),
                   list(TabularDataset(str(tmp_path / "out"), schema, labelled=labelled,
                                       batch_size=64, num_workers=2)))


def test_decode_of_sliced_and_chunked_tables_and_a_mixed_directory(tmp_path) -> None:
    """Two labels; `decode_prepared` of a prepared table sliced (an Arrow offset, as at a
    rank's span edge) or in several chunks equals `decode_table` of the raw rows; a
    directory holding a prepared and a raw part reads both (a batch across them has
    int64 ids); preparing prepared parts again changes nothing."""
    labels = ("y", "y2")
    schema, table = _schema(labels=labels), _table(300, seed=2, labels=labels)
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(table, raw / "a.parquet", row_group_size=100)
    part = _prepare(TabularDataset(str(raw), schema, num_workers=0), tmp_path / "p")[0]
    prepared = pq.read_table(part.replace("file://", ""))
    cases = [(0, 300), (3, 250), (17, 18), (64, 300), (5, 5)]
    for a, b in cases:
        got = decode_prepared(prepared.slice(a, b - a), schema, True, 0, np.arange(a, b))
        want = decode_table(table.slice(a, b - a), schema, True, 0, np.arange(a, b))
        for name in ("labels", "dense", "lengths", "weights", "ends"):
            assert np.array_equal(getattr(got, name), getattr(want, name)), (name, a, b)
        assert np.array_equal(got.values.astype(np.int64), want.values), (a, b)
    chunked = pa.concat_tables([prepared.slice(0, 100), prepared.slice(100)])
    got = decode_prepared(chunked, schema, True, 0, np.arange(300))
    assert np.array_equal(got.values, decode_table(table, schema, True, 0,
                                                   np.arange(300)).values)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.parquet").write_bytes(Path(part.replace("file://", "")).read_bytes())
    pq.write_table(table, mixed / "b.parquet", row_group_size=77)
    batches = list(TabularDataset(str(mixed), schema, batch_size=64))
    assert all(b.sparse_features.values().dtype == torch.int64 for b in batches)
    _same_weighted(list(TabularDataset([str(raw / "a.parquet"), str(mixed / "b.parquet")],
                                       schema, batch_size=64)), batches)
    again = _prepare(TabularDataset(str(tmp_path / "p"), schema, num_workers=0),
                     tmp_path / "again")
    assert pq.read_schema(again[0].replace("file://", "")) == prepared.schema
    _same_weighted(list(TabularDataset(str(tmp_path / "p"), schema, batch_size=64)),
                   list(TabularDataset(str(tmp_path / "again"), schema, batch_size=64)))


def test_int64_rows_dynamic_minus_one_and_memory_output(tmp_path) -> None:
    """A table of more than 2**31 rows keeps int64 rows (2**31 exactly fits int32); a
    dynamic column's raw id -1 is an id (no id is a null); any fsspec output."""
    schema = FeatureSchema(
        labels=["y"], columns=["y", "x", "a", "b", "dy"], dense=["x"],
        sparse=["a", "b", SparseColumn("dy", mapping=IdMapping("dynamic"))],
        tables=[TableSpec("a", (1 << 31) + 1, 4), TableSpec("b", 1 << 31, 4),
                TableSpec("dy", 10, 4)])
    rows = [(5, 7, "-1"), (1 << 31, (1 << 31) - 1, ""), (-1, -1, "7"),
            ((1 << 40) + 3, 1 << 31, "-1")]
    path = tmp_path / "a.csv"
    path.write_text("".join(f"1,2,{a},{b},{d}\n" for a, b, d in rows))
    csv = TabularDataset(str(path), schema, format="csv", num_workers=0)
    parts = _prepare(csv, "memory://prepared-test/out")
    table = pq.read_table(parts[0].replace("memory://", ""),
                          filesystem=fsspec.filesystem("memory"))
    assert table.schema.field("a").type == pa.int64()
    assert table.schema.field("b").type == pa.int32()
    assert table.column("dy").to_pylist() == [-1, None, 7, -1]
    got = list(TabularDataset("memory://prepared-test/out", schema, batch_size=4))
    same_batches(list(TabularDataset(str(path), schema, format="csv", batch_size=4)), got)
    assert [r[2] for r in rows_of(got)] == [
        ((5,), (7,), (-1,)), ((1 << 31,), ((1 << 31) - 1,), ()),
        ((1 << 31,), ((1 << 31) - 1,), (7,)),
        ((((1 << 40) + 3) % ((1 << 31) + 1),), (0,), (-1,))]


# --------------------------------------------------------------------------- another schema


@pytest.fixture
def prepared_dir(tmp_path) -> Path:
    schema_path = tmp_path / "schema.yaml"
    schema_path.write_text(SCHEMA_YAML)
    text = "click,w,price,user,item,tags\n" + "".join(f"{','.join(r)}\n" for r in CSV_ROWS)
    (tmp_path / "a.csv").write_text(text)
    source = TabularDataset(str(tmp_path / "a.csv"), str(schema_path), format="csv",
                            header=True, num_workers=0)
    _prepare(source, tmp_path / "prepared")
    return tmp_path / "prepared"


def _edit(schema: FeatureSchema, what: str) -> FeatureSchema:
    s = FeatureSchema.from_dict(schema.to_dict())
    if what == "table size":
        s.tables[1] = dataclasses.replace(s.tables[1], num_embeddings=51)
    elif what == "transform":
        s.dense[0] = dataclasses.replace(s.dense[0], transform="log1p")
    elif what == "fill":
        s.dense[0] = dataclasses.replace(s.dense[0], fill=0.0)
    elif what == "mapping kind":
        s.sparse[1] = dataclasses.replace(s.sparse[1], mapping=IdMapping("hex"))
    elif what == "salt":
        s.sparse[0] = dataclasses.replace(s.sparse[0], mapping=IdMapping("hash", salt=3))
    elif what == "dropped column":
        del s.sparse[1]
        s.columns.remove("item")
    elif what == "renamed column":
        s.sparse[2] = dataclasses.replace(s.sparse[2], name="tag_list")
        s.columns[s.columns.index("tags")] = "tag_list"
    elif what == "embedding_dim":
        s.tables[0] = dataclasses.replace(s.tables[0], embedding_dim=8)
    return FeatureSchema.from_dict(s.to_dict())


@pytest.mark.parametrize("what,shown", [
    ("table size", "table 'items_t' has 50 rows there, 51 here"),
    ("transform", "dense column 'price'"),
    ("fill", "dense column 'price'"),
    ("mapping kind", "sparse column 'item'"),
    ("salt", "sparse column 'user'"),
    ("dropped column", "its sparse columns are ['user', 'item', 'tags'] there, ['user', "
                       "'tags'] here"),
    ("renamed column", "tag_list"),
])
def test_another_schema_is_refused(prepared_dir, what, shown) -> None:
    schema = _edit(FeatureSchema.from_file(str(prepared_dir / "schema.yaml")), what)
    with pytest.raises(DataError) as e:
        list(TabularDataset(str(prepared_dir), schema))
    assert "part-00000.parquet" in str(e.value) and shown in str(e.value)


def test_embedding_dim_does_not_matter(prepared_dir) -> None:
    schema = _edit(FeatureSchema.from_file(str(prepared_dir / "schema.yaml")), "embedding_dim")
    assert rows_of(list(TabularDataset(str(prepared_dir), schema, batch_size=2))) == (
        expected_rows())


def test_unlabelled_parts_need_labelled_false(tmp_path) -> None:
    lines = criteo_lines(30, seed=2, labelled=False)
    source = TabularDataset(write(tmp_path / "test.txt", lines), FeatureSchema.criteo(),
                            format="tsv", labelled=False, num_workers=0)
    _prepare(source, tmp_path / "out")
    with pytest.raises(DataError, match="missing column.*labelled=False"):
        TabularDataset(str(tmp_path / "out"), FeatureSchema.criteo())
    got = list(TabularDataset(str(tmp_path / "out"), FeatureSchema.criteo(), labelled=False,
                              batch_size=8))
    same_batches(list(criteo_tsv(str(tmp_path / "test.txt"), labelled=False, batch_size=8)),
                 got)


# --------------------------------------------------------------------------- hostile files

SMALL = FeatureSchema(labels=["y"], weight="w", dense=[DenseColumn("x")],
                      sparse=["a", SparseColumn("b", table="a")],
                      tables=[TableSpec("a", 10, 4)])


def _footer(schema: FeatureSchema = SMALL) -> dict[bytes, bytes]:
    return {PREPARED_KEY: json.dumps({"version": PREPARED_VERSION,
                                      "schema": prepared_signature(schema)}).encode()}


def _good() -> pa.Table:
    f32 = pa.float32()
    return pa.table({
        "y": pa.array([0, 1, 0, 1], f32), "w": pa.array([1, 2, 0.5, 1], f32),
        "x": pa.array([1, 2, 3, 4], f32), "a": pa.array([1, NO_ID, 9, 0], pa.int32()),
        "b": pa.array([[1, 2], [], [3], [9]], pa.large_list(pa.int32()))})


def _hand_made(tmp_path: Path, table: pa.Table, footer=None, name="h.parquet") -> str:
    path = tmp_path / name
    pq.write_table(table.replace_schema_metadata(_footer() if footer is None else footer),
                   path, row_group_size=2)
    return str(path)


def test_hand_made_good_file(tmp_path) -> None:
    got = list(TabularDataset(_hand_made(tmp_path, _good()), SMALL, batch_size=4))
    assert rows_of(got) == [
        (0.0, (1.0,), ((1,), (1, 2))), (1.0, (2.0,), ((), ())),
        (0.0, (3.0,), ((9,), (3,))), (1.0, (4.0,), ((0,), (9,)))]
    assert got[0].weights.tolist() == [1, 2, 0.5, 1]


def _with(column: str, array: pa.Array) -> pa.Table:
    t = _good()
    return t.set_column(t.schema.get_field_index(column), column, array)


@pytest.mark.parametrize("column,array,shown", [
    ("a", pa.array([1, 2, 3, 10], pa.int32()), r"row group 1, row 1 .*'a': id 10 is not a row"),
    ("a", pa.array([1, 2, -2, 3], pa.int64()), r"row group 1, row 0 .*'a': id -2 is not a row"),
    ("b", pa.array([[1], [2], [3], [1, 10]], pa.large_list(pa.int32())),
     r"row group 1, row 1 .*'b': id 10 is not a row"),
    ("b", pa.array([[1], [2], [NO_ID], [1]], pa.list_(pa.int32())),
     r"row group 1, row 0 .*'b': id -1 is not a row"),
    ("x", pa.array([1, 2, 3, 4], pa.float64()), r"row group 0, row 0 .*'x': type double"),
    ("x", pa.array([1, None, 3, 4], pa.float32()), r"row group 0, row 1 .*'x': a null"),
    ("x", pa.array([1, 2, 3, np.nan], pa.float32()), r"row group 1, row 1 .*'x'.* not finite"),
    ("x", pa.array([np.inf, 2, 3, 4], pa.float32()), r"row group 0, row 0 .*'x'.* not finite"),
    ("y", pa.array([0, 2, 0, 1], pa.float32()), r"row group 0, row 1 .*'y': label 2.0"),
    ("w", pa.array([1, 1, -0.5, 1], pa.float32()), r"row group 1, row 0 .*'w'.* negative"),
    ("a", pa.array(["1", "2", "3", "4"]), r"row group 0, row 0 .*'a': type string"),
    ("a", pa.array([1, 2, 3, 4], pa.uint32()), r"row group 0, row 0 .*'a': type uint32"),
    ("a", pa.array([1.0, 2, 3, 4], pa.float32()), r"row group 0, row 0 .*'a': type float"),
])
def test_damaged_values_are_named(tmp_path, column, array, shown) -> None:
    path = _hand_made(tmp_path, _with(column, array))
    with pytest.raises(DataError, match=r"h\.parquet: " + shown):
        list(TabularDataset(path, SMALL, batch_size=4, num_workers=2))


def test_a_null_id_in_a_list_names_its_row(tmp_path) -> None:
    path = _hand_made(tmp_path, _with("b", pa.array([[1], [2], [3], [4, None]],
                                                     pa.large_list(pa.int32()))))
    with pytest.raises(DataError, match=r"h\.parquet: row group 1, row 1 \(row 3 of the "
                                        r"file\): column 'b': a null id in its list"):
        list(TabularDataset(path, SMALL, batch_size=4))


def test_a_null_single_id_is_no_id(tmp_path) -> None:
    """Not what convert writes, but unambiguous: a null is no id (its slot's value, here
    99, is never read)."""
    validity = np.packbits(np.array([1, 0, 1, 1], dtype=np.uint8), bitorder="little")
    data = np.array([1, 99, 2, 3], dtype=np.int32)
    a = pa.Array.from_buffers(pa.int32(), 4, [pa.py_buffer(validity.tobytes()),
                                              pa.py_buffer(data.tobytes())], null_count=1)
    got = list(TabularDataset(_hand_made(tmp_path, _with("a", a)), SMALL, batch_size=4))
    assert [r[2][0] for r in rows_of(got)] == [(1,), (), (2,), (3,)]


@pytest.mark.parametrize("footer,shown", [
    (b"{not json", "footer is not valid JSON"),
    (b"\xff\xfe", "footer is not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "footer is not valid JSON"),
    (json.dumps({"version": 2, "schema": {}}).encode(), "another version"),
    (b"[1, 2]", "another version"),
    (json.dumps({"version": PREPARED_VERSION, "schema": [1]}).encode(), "not a mapping"),
    (json.dumps({"version": PREPARED_VERSION}).encode(), "not a mapping"),
    (json.dumps({"version": PREPARED_VERSION, "schema": {"tables": 5}}).encode(),
     "another schema"),
])
def test_damaged_footer_names_the_file(tmp_path, footer, shown) -> None:
    path = _hand_made(tmp_path, _good(), footer={PREPARED_KEY: footer})
    with pytest.raises(DataError, match=r"h\.parquet: .*" + shown):
        TabularDataset(path, SMALL)


def test_empty_file_and_one_row_groups(tmp_path) -> None:
    empty = _hand_made(tmp_path, _good().slice(0, 0), name="a.parquet")
    path = tmp_path / "b.parquet"
    pq.write_table(_good().replace_schema_metadata(_footer()), path, row_group_size=1)
    got = list(TabularDataset([empty, str(path)], SMALL, batch_size=3, num_workers=2))
    assert rows_of(got) == rows_of(list(TabularDataset(_hand_made(tmp_path, _good()), SMALL,
                                                       batch_size=3)))


# --------------------------------------------------------------------------- positions


@pytest.fixture
def criteo_parts(tmp_path) -> list[str]:
    lines = criteo_lines(330, seed=5)
    source = criteo_tsv(write(tmp_path / "a.tsv", lines), num_embeddings=100, num_workers=0)
    return _prepare(source, tmp_path / "out", rows_per_file=120, row_group_size=40)


def _reader(parts, **kwargs) -> TabularDataset:
    return TabularDataset(parts, FeatureSchema.criteo(100), **kwargs)


def test_resume_mid_epoch_is_exact(criteo_parts) -> None:
    from torch.utils.data import DataLoader

    reference = list(DataLoader(_reader(criteo_parts, batch_size=32), batch_size=None))
    same_batches(reference, list(_reader(criteo_parts, batch_size=32)))
    ds = _reader(criteo_parts, batch_size=32, num_workers=2)
    states = []
    for _ in ds:
        states.append(ds.state_dict())
    for k in (0, 3, 7):
        again = _reader(criteo_parts, batch_size=32, num_workers=2)
        again.load_state_dict(states[k])
        same_batches(list(again), reference[k + 1:])


@pytest.mark.parametrize("new", [1, 3])
def test_two_ranks_split_and_resplit(criteo_parts, new) -> None:
    everything = rows_of(list(_reader(criteo_parts, batch_size=25)))
    kwargs = dict(batch_size=25, world_size=2, drop_last=False)
    halves = [rows_of(list(_reader(criteo_parts, rank=r, **kwargs))) for r in range(2)]
    assert sorted(halves[0] + halves[1]) == sorted(everything)
    seen, states = [], []
    for r in range(2):
        ds = _reader(criteo_parts, rank=r, **kwargs)
        it = iter(ds)
        for _ in range(2 + r):
            seen += rows_of([next(it)])
        states.append(ds.state_dict())
    rest = []
    for r in range(new):
        ds = _reader(criteo_parts, rank=r, batch_size=25, world_size=new, drop_last=False)
        ds.resplit(states)
        rest += rows_of(list(ds))
    assert sorted(seen + rest) == sorted(everything)


# --------------------------------------------------------------------------- command line


def test_parquet_source_needs_prepare(tmp_path, capsys) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(_good(), raw / "a.parquet")
    assert cli.main(["data", "convert", str(raw), "--criteo", "--format", "parquet",
                     "--output", str(tmp_path / "out"), "--no_progress"]) == 1
    assert "add --prepare" in capsys.readouterr().err
    with pytest.raises(ValueError, match="prepare=True"):
        convert_to_parquet(TabularDataset(str(raw), SMALL), str(tmp_path / "out2"),
                           progress=False)
    assert not list(tmp_path.glob("out*/*.parquet"))


def test_train_on_prepared_parts(tmp_path, capsys) -> None:
    schema = FeatureSchema.criteo(50, embedding_dim=4)
    (tmp_path / "small.yaml").write_text(json.dumps(schema.to_dict()))
    write(tmp_path / "a.tsv", criteo_lines(200, seed=8))
    out = tmp_path / "out"
    assert cli.main(["data", "convert", str(tmp_path / "a.tsv"), "--schema",
                     str(tmp_path / "small.yaml"), "--prepare", "--output", str(out),
                     "--row_group_size", "64", "--no_progress"]) == 0
    args = ["train", "--data", "parquet", "--train_path", str(out), "--batch_size", "32",
            "--train_steps", "3", "--sparse_backend", "sparse_grad", "--data_workers", "1",
            "--eval_path", str(out)] + QUIET
    assert cli.main(args + ["--schema", str(out / "schema.yaml"),
                            "--output_dir", str(tmp_path / "run")]) == 0
    final = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("final eval")]
    assert final and json.loads(final[0].split(": ", 1)[1])["num_samples"] == 200
    other = FeatureSchema.criteo(60, embedding_dim=4)
    (tmp_path / "other.yaml").write_text(json.dumps(other.to_dict()))
    code = cli.main(args + ["--schema", str(tmp_path / "other.yaml"), "--output_dir",
                            str(tmp_path / "run2")])
    assert code != 0
    err = capsys.readouterr().err
    assert "part-00000.parquet" in err and "has 50 rows there, 60 here" in err


def test_dynamic_table_budget_and_settings_do_not_matter(tmp_path) -> None:
    """A dynamic table's raw ids do not depend on its row budget nor its admission and
    eviction: another budget reads the parts; another id kind or salt does not."""
    def schema(budget: int, **dynamic) -> FeatureSchema:
        return FeatureSchema(
            labels=["y"], columns=["y", "x", "a", "dy"], dense=["x"],
            sparse=["a", SparseColumn("dy", mapping=IdMapping("dynamic", dynamic=dynamic))],
            tables=[TableSpec("a", 10, 4), TableSpec("dy", budget, 4)])

    path = tmp_path / "a.csv"
    path.write_text("".join(f"{i % 2},{i},{i * 3},{i * 1000 - 5}\n" for i in range(20)))
    _prepare(TabularDataset(str(path), schema(50), format="csv", num_workers=0),
             tmp_path / "out")
    want = rows_of(list(TabularDataset(str(path), schema(50), format="csv", batch_size=8)))
    for other in (schema(500), schema(50, min_count=3, eviction="ttl", ttl=7)):
        assert rows_of(list(TabularDataset(str(tmp_path / "out"), other, batch_size=8))) == want
    with pytest.raises(DataError, match="sparse column 'dy'"):
        TabularDataset(str(tmp_path / "out"), schema(50, salt=1))


def test_bad_source_leaves_no_parts(tmp_path, capsys) -> None:
    """A bad line (TSV) or value (Parquet) fails the convert naming where it is, and
    leaves no part behind."""
    lines = criteo_lines(300, seed=4)
    lines[250] = "1\t2"
    write(tmp_path / "bad.tsv", lines)
    assert cli.main(["data", "convert", str(tmp_path / "bad.tsv"), "--criteo", "--prepare",
                     "--output", str(tmp_path / "out"), "--row_group_size", "20",
                     "--rows_per_file", "100", "--no_progress"]) == 1
    assert "bad.tsv:251: expected 40 columns" in capsys.readouterr().err
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(_good().set_column(0, "y", pa.array([0, 1, 3, 1], pa.int64())),
                   raw / "p.parquet", row_group_size=2)
    with pytest.raises(DataError, match=r"p\.parquet: row group 1, row 0 .*'y': label 3"):
        _prepare(TabularDataset(str(raw), SMALL, num_workers=0), tmp_path / "out2",
                 row_group_size=1)
    assert not list(tmp_path.glob("out*/**/*.parquet"))


def test_a_second_convert_into_the_same_directory_is_refused(tmp_path) -> None:
    """Another job's parts appear in the output while this convert runs: this one fails
    and leaves them as they are (it moved nothing over them)."""
    source = TabularDataset(_hand_made(tmp_path, _good()), SMALL, num_workers=0)
    out = tmp_path / "out"
    theirs = pq.read_table(source.files[0].replace("file://", "")).slice(0, 1)
    chunks = source.decoded_chunks

    def racing():
        pq.write_table(theirs, out / "part-00000.parquet")  # the other job finished first
        (out / "schema.yaml").write_text("theirs")
        yield from chunks()

    source.decoded_chunks = racing
    with pytest.raises(FileExistsError, match="another convert"):
        _prepare(source, out)
    assert pq.read_table(out / "part-00000.parquet").equals(theirs)
    assert (out / "schema.yaml").read_text() == "theirs"
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "schema.yaml"]


def test_several_ids_in_a_single_valued_column_are_refused() -> None:
    """`multi_valued` marks every column whose rows may hold several ids (a delimiter, a
    list column); a chunk breaking that is refused, never written as one id."""
    from recframe.readers import _Chunk, prepared_table

    chunk = _Chunk(0, np.arange(1, 3), np.zeros(2, np.float32), np.ones(2, np.float32),
                   np.zeros((2, 1), np.float32), np.array([1, 2, 3, 4, 5], np.int64),
                   np.array([[1, 1], [2, 1]], np.int32))
    with pytest.raises(ValueError, match="column 'b': several ids in a row"):
        prepared_table(chunk, SMALL, True, [False, False])
    table = prepared_table(chunk, SMALL, True, [False, True])
    assert table.column("a").to_pylist() == [1, 2]
    assert table.column("b").to_pylist() == [[3, 4], [5]]
