"""Attack review of the whole-table decode paths (issue 13, second pass): findings, each
pinned by a test that failed before its fix."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recframe.readers import (
    DataError,
    TabularDataset,
    _decode_columns,
    _RowError,
    decode_table,
)
from recframe.schema import FeatureSchema


def _schema(fill: float | None = 2.5) -> FeatureSchema:
    return FeatureSchema.from_dict({
        "labels": ["y"],
        "dense": [{"name": "p", "fill": fill, "transform": "standardize", "mean": 0.5,
                   "std": 2.0}, {"name": "q"}],
        "sparse": [{"name": "u"}],
        "tables": [{"name": "u", "num_embeddings": 10, "embedding_dim": 4}],
    })


def test_parquet_dense_column_of_nulls_only_takes_its_fill(tmp_path) -> None:
    """A dense column with no value at all is stored with Arrow's null type (pandas writes
    an all-None column so); it took an uncaught ArrowInvalid ('Invalid null value', no
    file named) before: now every row takes the column's fill, as an empty value does."""
    pq.write_table(pa.table({"y": pa.array([0, 1, 1]), "p": pa.nulls(3),
                             "q": pa.array([1.0, 2.0, 3.0]), "u": pa.array([1, -3, 12])}),
                   tmp_path / "a.parquet")
    [batch] = list(TabularDataset(str(tmp_path), _schema(), format="parquet", batch_size=8,
                                  num_workers=0))
    assert batch.dense_features[:, 0].tolist() == [1.0, 1.0, 1.0]  # (2.5 - 0.5) / 2
    assert batch.dense_features[:, 1].tolist() == [1.0, 2.0, 3.0]
    assert batch.sparse_features.values().tolist() == [1, 7, 2]


def test_null_typed_label_or_unfilled_column_is_named_empty(tmp_path) -> None:
    """A null-typed column that has no fill (a label) is 'empty', named with its file."""
    table = pa.table({"y": pa.nulls(2), "p": pa.array([1.0, 2.0]), "q": pa.array([1, 2]),
                      "u": pa.array([1, 2])})
    with pytest.raises(_RowError, match="is empty"):
        decode_table(table, _schema(), True, 0, np.arange(1, 3))
    pq.write_table(table, tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet: row group 0, row 0 .*column 'y': is empty"):
        list(TabularDataset(str(tmp_path), _schema(), format="parquet", batch_size=8,
                            num_workers=0))


@pytest.mark.parametrize("mapping", ["modulo", "hex", "hash"])
@pytest.mark.parametrize("multi", ["", "list", "delimited"])
def test_id_column_of_nulls_only_gives_empty_bags(tmp_path, mapping: str, multi: str) -> None:
    """A file (or row group) where a sparse feature is missing on every row stores the
    column as Arrow's null type (or a list of nulls): each row has no id, as a missing
    id elsewhere; it was 'has type null; mapping ... needs ...' before."""
    column: dict = {"name": "v", "table": "u", "mapping": mapping}
    if multi == "delimited":
        column["delimiter"] = "|"
    schema = FeatureSchema.from_dict({
        "labels": ["y"], "sparse": [{"name": "u"}, column],
        "tables": [{"name": "u", "num_embeddings": 10, "embedding_dim": 4}]})
    v = pa.array([[], None, [None]]) if multi == "list" else pa.nulls(3)
    pq.write_table(pa.table({"y": pa.array([0, 1, 0]), "u": pa.array([1, 2, 13]), "v": v}),
                   tmp_path / "a.parquet")
    [batch] = list(TabularDataset(str(tmp_path), schema, format="parquet", batch_size=8,
                                  num_workers=0))
    kjt = batch.sparse_features
    assert kjt["u"].values().tolist() == [1, 2, 3]
    assert kjt["v"].lengths().tolist() == [0, 0, 0]
    assert kjt["v"].values().numel() == 0


def test_parquet_dense_bool_with_nulls_and_blank_strings_take_the_fill(tmp_path) -> None:
    """Parquet dense columns as other tools write them: a nullable bool column (an
    uncaught ArrowInvalid 'Could not convert 2.5 ... to boolean' before) and a string
    column holding '' for a missing value (an error before; '' is missing in CSV too)."""
    pq.write_table(pa.table({
        "y": pa.array(["1", "0", "1"]), "p": pa.array([True, None, False]),
        "q": pa.array(["1.5", "", None], pa.large_string()), "u": pa.array([1, 2, 3])}),
        tmp_path / "a.parquet")
    schema = FeatureSchema.from_dict({
        "labels": ["y"],
        "dense": [{"name": "p", "fill": 2.5}, {"name": "q", "fill": -1.0}],
        "sparse": [{"name": "u"}],
        "tables": [{"name": "u", "num_embeddings": 10, "embedding_dim": 4}]})
    [batch] = list(TabularDataset(str(tmp_path), schema, format="parquet", batch_size=8,
                                  num_workers=0))
    assert batch.dense_features.tolist() == [[1.0, 1.5], [2.5, -1.0], [0.0, -1.0]]
    assert batch.labels.tolist() == [1.0, 0.0, 1.0]
    pq.write_table(pa.table({"y": pa.array(["1", ""]), "p": pa.array([True, False]),
                             "q": pa.array(["1", "2"]), "u": pa.array([1, 2])}),
                   tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"row 1 of the file\): column 'y': is empty"):
        list(TabularDataset(str(tmp_path), schema, format="parquet", batch_size=8,
                            num_workers=0))


def test_integer_dense_values_beyond_2_53_decode_on_both_paths() -> None:
    """An int64/uint64 dense column with values beyond 2**53 (a nanosecond timestamp, a
    byte count) rounds to the nearest double. The whole-table path did so, but the
    column-by-column path (uint64 columns always; int64 ones whenever another value sent
    the block there) raised Arrow's uncaught 'Integer value ... not in range': the same
    file decoded or failed depending on the rest of its block."""
    schema = _schema()
    big = 1_700_000_000_123_456_789
    for p, want in ((pa.array([big, None], pa.int64()), [float(big), 2.5]),
                    (pa.array([2**64 - 1, 5], pa.uint64()), [float(2**64 - 1), 5.0])):
        table = pa.table({"y": pa.array([0, 1]), "p": p, "q": pa.array([big, 1], pa.int64()),
                          "u": pa.array([1, 2])})
        for decode in (decode_table, _decode_columns):
            chunk = decode(table, schema, True, 0, np.arange(1, 3))
            expect = ((np.array(want) - 0.5) / 2.0).astype(np.float32)
            np.testing.assert_array_equal(chunk.dense[:, 0], expect)
            assert chunk.dense[:, 1].tolist() == [np.float32(float(big)), 1.0]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_negative_sample_weight_is_a_named_error(tmp_path, fmt: str) -> None:
    """A negative weight turned the loss sum(w*bce)/sum(w) into nonsense (a batch whose
    weights sum below zero gives a loss of about -1e38 through the clamp), yet decoded
    silently; now it is refused as labels outside [0, 1] are: file, row and column."""
    schema = FeatureSchema.from_dict({
        "labels": ["y"], "weight": "w", "columns": ["y", "w", "u"], "sparse": ["u"],
        "default_num_embeddings": 10, "default_embedding_dim": 4})
    if fmt == "csv":
        (tmp_path / "a.csv").write_text("1,0.5,3\n0,0,4\n1,-2,5\n")
        where = r"a\.csv:3: column 'w'"
    else:
        pq.write_table(pa.table({"y": [1, 0, 1], "w": [0.5, -0.0, -2.0], "u": [3, 4, 5]}),
                       tmp_path / "a.parquet")
        where = r"a\.parquet: row group 0, row 2 \(row 2 of the file\): column 'w'"
    with pytest.raises(DataError, match=where + r": weight -2.0 is negative"):
        list(TabularDataset(str(tmp_path), schema, format=fmt, batch_size=8, num_workers=0))


def test_categorical_dense_column_with_a_bad_value_is_named(tmp_path) -> None:
    """A dense column written as a pandas category of strings (Arrow dictionary<string>)
    with a value that is no number raised Arrow's bare 'Failed to parse string' (no
    file, row or column); now it is named as in a plain string column."""
    schema = _schema()
    p = pa.array(["1.5", None, "cheap", "2"]).dictionary_encode()
    pq.write_table(pa.table({"y": [0, 1, 0, 1], "p": p, "q": [1.0, 2.0, 3.0, 4.0],
                             "u": [1, 2, 3, 4]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"row 2 of the file\): column 'p': 'cheap' is not a "
                                        r"number"):
        list(TabularDataset(str(tmp_path), schema, format="parquet", batch_size=8,
                            num_workers=0))
    good = pa.array(["1.5", None, "2.5", "2"]).dictionary_encode()
    chunk = decode_table(pa.table({"y": [0, 1, 0, 1], "p": good, "q": [1.0, 2.0, 3.0, 4.0],
                                   "u": [1, 2, 3, 4]}), schema, True, 0, np.arange(1, 5))
    assert chunk.dense[:, 0].tolist() == [0.5, 1.0, 1.0, 0.75]


def test_parquet_without_its_label_column_hints_at_labelled_false(tmp_path) -> None:
    """Parquet parts converted from unlabelled test files (no label column) read with the
    labelled default: the error now says what to pass, as the TSV reader's does; a
    missing feature column gets no such hint."""
    pq.write_table(pa.table({"p": [1.0], "q": [2.0], "u": [3]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) \['y'\].*needs labelled=False"):
        TabularDataset(str(tmp_path), _schema(), format="parquet")
    [batch] = list(TabularDataset(str(tmp_path), _schema(), format="parquet", labelled=False,
                                  num_workers=0))
    assert batch.labels.tolist() == [0.0]
    pq.write_table(pa.table({"y": [1], "q": [2.0], "u": [3]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) \['p'\]; the file has "
                                        r"\['q', 'u', 'y'\]$"):
        TabularDataset(str(tmp_path), _schema(), format="parquet")
