"""Attack review of prepared Parquet as merged (issue 13, fourth pass): the Trainer over
prepared parts, raw and prepared chunks in one batch, values prepare cannot keep, and
what the prepared signature accepts. The findings are each pinned by a test that failed
before its fix (alignment and exact resume, a column twice, values beyond float32); the
other tests cover paths the earlier tests left out."""

from __future__ import annotations

import re
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_prepared_parquet import SMALL, _footer, _good
from test_readers import criteo_lines, rows_of, same_batches, write
from test_readers_vectorised import _schema, _table

from recframe import Hook, Trainer, TrainingArguments
from recframe.models import DLRM
from recframe.optim import dense_parameters, sparse_parameters
from recframe.readers import DataError, TabularDataset, convert_to_parquet
from recframe.schema import DenseColumn, FeatureSchema, IdMapping, SparseColumn, TableSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _prepare(source: TabularDataset, out: Path, **kwargs) -> list[str]:
    return convert_to_parquet(source, str(out), progress=False, prepare=True, **kwargs)


SMALL_CRITEO = FeatureSchema.criteo(num_embeddings=60, embedding_dim=4)


@pytest.fixture
def criteo_dirs(tmp_path) -> dict[str, Path]:
    """250 Criteo rows as raw and as prepared Parquet (parts of 90 rows, row groups of
    40: batches of 16 start mid-chunk, at offsets of any alignment)."""
    tsv = write(tmp_path / "a.tsv", criteo_lines(250, seed=3))
    out = {}
    for name, prepare in (("raw", False), ("prepared", True)):
        source = TabularDataset(tsv, SMALL_CRITEO, format="tsv", num_workers=0)
        convert_to_parquet(source, str(tmp_path / name), progress=False, prepare=prepare,
                           rows_per_file=90, row_group_size=40)
        out[name] = tmp_path / name
    return out


# --------------------------------------------------------------------------- exact resume


def test_batch_float_tensors_are_64_byte_aligned(criteo_dirs) -> None:
    """Dense rows, labels and weights of every batch (whole chunk, mid-chunk slice,
    across chunks) sit at a 64-byte aligned address, as torch's own tensors do: torch's
    vectorised kernels round with their input's alignment, so a batch's bits must not
    depend on where its chunk started (before: a view into the chunk, at any offset)."""
    for name in ("raw", "prepared"):
        for batch_size in (16, 7, 40):
            for b in TabularDataset(str(criteo_dirs[name]), SMALL_CRITEO,
                                    batch_size=batch_size, num_workers=0):
                assert b.dense_features.data_ptr() % 64 == 0, (name, batch_size)
                assert b.labels.data_ptr() % 64 == 0, (name, batch_size)


class _CrashAt(Hook):
    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, trainer, metrics):
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


def _train(out: Path, data: Path, crash_at=None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = DLRM(schema=SMALL_CRITEO, dense_arch=(8, 4), over_arch=(8, 1))
    dataset = TabularDataset(str(data), SMALL_CRITEO, batch_size=16, num_workers=2)
    args = TrainingArguments(output_dir=str(out), train_steps=10, save_steps=1, max_to_keep=2,
                             gradient_accumulation_steps=2, report_to="none",
                             disable_tqdm=True, log_steps=1000)
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset,
        hooks=[_CrashAt(crash_at)] if crash_at else [],
        dense_optimizers=(torch.optim.Adam(dense_parameters(model), lr=0.01), None),
        sparse_optimizer=torch.optim.Adagrad(sparse_parameters(model), lr=0.05))
    if crash_at:
        with pytest.raises(Exception, match="crash at step"):
            trainer.train()
    else:
        trainer.train()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trainer_resumes_on_prepared_parts_bitwise(tmp_path, criteo_dirs) -> None:
    """Gradient accumulation over prepared parts, a crash mid-epoch (after update 4, from
    the checkpoint of update 3: the next batch starts at row 96, mid row group) and a
    new Trainer resuming: the parameters equal, bit for bit, an uninterrupted run's, and
    a run on the raw parts. Before, the resumed run's batches started their own chunks
    (aligned) where the uninterrupted run's were slices at row 6 of a chunk: Adam and
    Adagrad ended a few ulp apart."""
    reference = _train(tmp_path / "ref", criteo_dirs["prepared"])
    raw = _train(tmp_path / "raw_run", criteo_dirs["raw"])
    _train(tmp_path / "cut", criteo_dirs["prepared"], crash_at=4)
    resumed = _train(tmp_path / "cut", criteo_dirs["prepared"])
    for key, value in reference.items():
        assert torch.equal(value, raw[key]), key
        assert torch.equal(value, resumed[key]), key


# --------------------------------------------------------------------------- hostile parts


@pytest.mark.parametrize("prepared", [True, False])
def test_a_column_twice_in_a_part_is_named(tmp_path, prepared) -> None:
    """A part holding a needed column twice (a hand-made or concatenated file): a
    `DataError` naming file and column when the reader opens it (before: pyarrow's
    KeyError 'Field "a" exists 2 times' at the first batch, no file named); a
    duplicated column the schema does not read is no matter."""
    table = _good().replace_schema_metadata(_footer() if prepared else None)
    plain = tmp_path / "plain.parquet"
    pq.write_table(table, plain)
    extra = pa.array([5, 5, 5, 5], pa.int32())
    for name, shown in (("a", True), ("unused", False)):
        dup = pa.Table.from_arrays(table.columns + [extra, extra] if not shown
                                   else table.columns + [extra],
                                   names=table.column_names + ([name] if shown
                                                               else [name, name]))
        dup = dup.replace_schema_metadata(table.schema.metadata)
        path = tmp_path / f"{name}.parquet"
        pq.write_table(dup, path)
        if shown:
            with pytest.raises(DataError, match=r"a\.parquet: column\(s\) \['a'\] appear "
                                                r"more than once"):
                TabularDataset(str(path), SMALL)
        else:
            assert rows_of(list(TabularDataset(str(path), SMALL, batch_size=4))) == rows_of(
                list(TabularDataset(str(plain), SMALL, batch_size=4)))


# --------------------------------------------------------------------------- the signature


def _csv_schema(**changes) -> FeatureSchema:
    spec = dict(labels=["y", "y2"], weight="w",
                dense=[DenseColumn("p", transform="log1p"), DenseColumn("q", fill=3.0)],
                sparse=["a", SparseColumn("b", table="a"),
                        SparseColumn("c", mapping=IdMapping("hash"))],
                tables=[TableSpec("a", 20, 4), TableSpec("c", 30, 4)],
                columns=["y", "y2", "w", "p", "q", "a", "b", "c"])
    spec.update(changes)
    return FeatureSchema(**spec)


@pytest.mark.parametrize("changes,shown", [
    (dict(dense=[DenseColumn("q", fill=3.0), DenseColumn("p", transform="log1p")]),
     "its dense columns are ['p', 'q'] there, ['q', 'p'] here"),
    (dict(labels=["y2", "y"]), "labels is ['y', 'y2'] there"),
    (dict(sparse=[SparseColumn("b", table="a"), "a", SparseColumn("c", mapping="hash")]),
     "its sparse columns are ['a', 'b', 'c'] there, ['b', 'a', 'c'] here"),
    (dict(sparse=["a", SparseColumn("b", table="a"),
                  SparseColumn("c", table="cc", mapping="hash")],
          tables=[TableSpec("a", 20, 4), TableSpec("cc", 30, 4)]), "sparse column 'c'"),
    (dict(sparse=["a", "b", SparseColumn("c", mapping="hash")],
          tables=[TableSpec("a", 20, 4), TableSpec("b", 20, 4), TableSpec("c", 30, 4)]),
     "sparse column 'b'"),
    (dict(weight=None), "weight is 'w' there, None here"),
    (dict(columns=["c", "b", "a", "q", "p", "w", "y2", "y"]), None),
    (dict(tables=[TableSpec("a", 20, 4)], default_num_embeddings=30,
          default_embedding_dim=4), None),
])
def test_reordered_or_renamed_schemas_are_refused_or_read_alike(tmp_path, changes,
                                                                 shown) -> None:
    """Dense, label or sparse columns reordered (same names), a table renamed or split
    at the same size, the weight dropped: refused, naming the difference (a reorder
    read by name would be right, but the footer does not promise it). The CSV column
    order and a table given by ``default_num_embeddings`` do not change what was
    written: read alike."""
    path = tmp_path / "a.csv"
    path.write_text("".join(f"{i % 2},{i // 2 % 2},1,{i},{'' if i % 3 == 0 else 2 * i},"
                            f"{7 * i},{11 * i},u{i}\n" for i in range(30)))
    schema = _csv_schema()
    _prepare(TabularDataset(str(path), schema, format="csv", num_workers=0), tmp_path / "p")
    other = _csv_schema(**changes)
    if shown is None:
        assert rows_of(list(TabularDataset(str(tmp_path / "p"), other, batch_size=8))) == (
            rows_of(list(TabularDataset(str(path), schema, format="csv", batch_size=8))))
    else:
        with pytest.raises(DataError, match="part-00000.parquet: prepared .*under another "
                                            "schema: " + re.escape(shown)):
            TabularDataset(str(tmp_path / "p"), other)


# --------------------------------------------------------------------------- convert


def test_ctrl_c_mid_prepare_leaves_nothing_and_a_rerun_succeeds(tmp_path, monkeypatch) -> None:
    """A KeyboardInterrupt while preparing (parts already closed in the staging
    directory): no part, no schema.yaml, no staging directory left; the same command
    run again into the same directory writes the whole dataset."""
    from recframe import readers

    tsv = write(tmp_path / "a.tsv", criteo_lines(300, seed=6))
    real, calls = readers.prepared_table, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            staged = list((tmp_path / "out").glob("_convert-*/part-*.parquet"))
            assert len(staged) >= 2  # parts closed (and one open) when Ctrl-C comes
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    def source() -> TabularDataset:
        return TabularDataset(tsv, SMALL_CRITEO, format="tsv", num_workers=0,
                              block_size=4096)

    monkeypatch.setattr(readers, "prepared_table", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _prepare(source(), tmp_path / "out", rows_per_file=30, row_group_size=7)
    assert len(calls) == 4 and list((tmp_path / "out").iterdir()) == []
    monkeypatch.setattr(readers, "prepared_table", real)
    parts = _prepare(source(), tmp_path / "out", rows_per_file=70, row_group_size=7)
    assert [pq.ParquetFile(p.replace("file://", "")).metadata.num_rows for p in parts] == [
        70, 70, 70, 70, 20]
    assert rows_of(list(TabularDataset(str(tmp_path / "out"), SMALL_CRITEO, batch_size=64))) == (
        rows_of(list(TabularDataset(tsv, SMALL_CRITEO, format="tsv", batch_size=64))))


# --------------------------------------------------------------------------- mixed parts


def _same_weighted(a, b) -> None:
    same_batches(a, b)
    for x, y in zip(a, b):
        assert type(x) is type(y) and torch.equal(x.weights, y.weights)
        assert y.sparse_features.values().dtype == torch.int64


def test_raw_and_prepared_parts_alternating_in_one_directory(tmp_path) -> None:
    """Weights, lists, delimited strings, hashed and dynamic ids; parts alternately
    prepared (int32 rows) and raw (int64 after mapping): batches that straddle them equal
    the all-raw batches at any batch size, through a glob on ``memory://``, resumed at
    any position, and split over two ranks within one batch of each other."""
    schema, table = _schema(), _table(260, seed=9)
    raw, mixed = tmp_path / "raw", tmp_path / "mixed"
    raw.mkdir()
    mixed.mkdir()
    memory = fsspec.filesystem("memory")
    for i, (a, b) in enumerate([(0, 70), (70, 140), (140, 201), (201, 260)]):
        pq.write_table(table.slice(a, b - a), raw / f"p{i}.parquet", row_group_size=23)
        path = raw / f"p{i}.parquet"
        if i % 2 == 0:
            part = _prepare(TabularDataset(str(path), schema, num_workers=0),
                            tmp_path / f"prep{i}", row_group_size=17)[0]
            path = Path(part.replace("file://", ""))
        (mixed / f"p{i}.parquet").write_bytes(path.read_bytes())
        memory.pipe(f"/attack13d/p{i}.parquet", path.read_bytes())
    for batch_size in (7, 129):
        want = list(TabularDataset(str(raw), schema, batch_size=batch_size))
        _same_weighted(want, list(TabularDataset(str(mixed), schema, batch_size=batch_size,
                                                 num_workers=2)))
    want = list(TabularDataset(str(raw), schema, batch_size=37))
    _same_weighted(want, list(TabularDataset("memory://attack13d/p*.parquet", schema,
                                             batch_size=37)))
    ds = TabularDataset(str(mixed), schema, batch_size=37)
    states = []
    for _ in ds:
        states.append(ds.state_dict())
    for k in range(len(states) - 1):
        again = TabularDataset(str(mixed), schema, batch_size=37)
        again.load_state_dict(states[k])
        _same_weighted(list(again), want[k + 1:])
    ranks = [list(TabularDataset(str(mixed), schema, batch_size=16, rank=r, world_size=2,
                                 drop_last=False)) for r in range(2)]
    assert abs(len(ranks[0]) - len(ranks[1])) <= 1
    assert sorted(rows_of(ranks[0] + ranks[1])) == sorted(rows_of(want))


# --------------------------------------------------------------------------- float32 range


@pytest.mark.parametrize("column,value,after", [
    ("x", "1e39", ""),
    ("s", "1e30", " (1e+39 after its standardize transform)"),
    ("w", "3.5e38", ""),
])
def test_values_beyond_float32_are_named_and_prepare_writes_no_part(tmp_path, column, value,
                                                                     after) -> None:
    """A finite value that float32 (the batches' type) cannot hold, itself or after its
    transform: the reader names line and column, and ``convert --prepare`` fails there,
    leaving no part. Before, the batch held inf (a NaN loss later) and the prepare
    succeeded, writing parts their reader then refused as damaged."""
    schema = FeatureSchema(labels=["y"], weight="w", columns=["y", "w", "x", "s", "a"],
                           dense=["x", DenseColumn("s", transform="standardize", std=1e-9)],
                           sparse=["a"], tables=[TableSpec("a", 10, 4)])
    rows = [dict(y="1", w="1", x="2", s="0", a="3") for _ in range(5)]
    rows[3][column] = value
    path = tmp_path / "a.csv"
    path.write_text("".join(",".join(r[c] for c in schema.columns) + "\n" for r in rows))
    shown = re.escape(f"a.csv:4: column '{column}': {float(value)!r}{after} is beyond float32's "
                      "range")
    with pytest.raises(DataError, match=shown):
        list(TabularDataset(str(path), schema, format="csv", batch_size=8))
    with pytest.raises(DataError, match=shown):
        _prepare(TabularDataset(str(path), schema, format="csv", num_workers=0),
                 tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    # Parquet float64 columns: the same, in the whole-table path and the general one
    table = pa.table({c: pa.array([float(r[c]) for r in rows]) if c != "a"
                      else pa.array([3] * 5) for c in schema.columns})
    pq.write_table(table, tmp_path / "a.parquet")
    with pytest.raises(DataError, match=rf"a\.parquet: row group 0, row 3 .*'{column}'"):
        list(TabularDataset(str(tmp_path / "a.parquet"), schema, batch_size=8))
