"""Tests of recframe.readers: Criteo TSV, CSV with a header, Parquet, multi-valued and
hashed columns, per-rank shards, exact positions, re-split at another world size, and
every bad-input error."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recframe.data import CriteoTSVDataset
from recframe.readers import DataError, TabularDataset, criteo_tsv, is_data_file
from recframe.schema import FeatureSchema, hash_strings


def criteo_lines(n: int, seed: int = 0, labelled: bool = True) -> list[str]:
    """Criteo-format lines with empty and negative fields."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ints = [rng.choice(["", str(rng.randint(-3, 5000)), "0"]) for _ in range(13)]
        cats = [rng.choice(["", f"{rng.getrandbits(32):08x}", f"{rng.randint(0, 20):x}"])
                for _ in range(26)]
        fields = ([str(rng.randint(0, 1))] if labelled else []) + ints + cats
        out.append("\t".join(fields))
    return out


def write(path: Path, lines: list[str], eol: str = "\n", blank_every: int = 0) -> str:
    text = ""
    for i, line in enumerate(lines):
        text += line + eol
        if blank_every and i % blank_every == blank_every - 1:
            text += eol
    data = text.encode()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return str(path)


def rows_of(batches) -> list[tuple]:
    """Every sample as (label, dense..., per-feature id tuples) in order."""
    out = []
    for b in batches:
        kjt = b.sparse_features
        keys = kjt.keys()
        n = b.labels.shape[0]
        lengths = kjt.lengths().view(len(keys), n).tolist()
        per_key = kjt.values().split(kjt.length_per_key())
        for i in range(n):
            ids = []
            for k in range(len(keys)):
                start = sum(lengths[k][:i])
                ids.append(tuple(per_key[k][start:start + lengths[k][i]].tolist()))
            out.append((b.labels[i].tolist(), tuple(b.dense_features[i].tolist()), tuple(ids)))
    return out


def same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.dense_features, y.dense_features)
        assert torch.equal(x.labels, y.labels)
        assert x.sparse_features.keys() == y.sparse_features.keys()
        assert torch.equal(x.sparse_features.values(), y.sparse_features.values())
        assert torch.equal(x.sparse_features.lengths(), y.sparse_features.lengths())


# --------------------------------------------------------------------------- Criteo TSV


@pytest.mark.parametrize("workers,block", [(0, 1 << 20), (2, 2048)])
def test_criteo_tsv_matches_the_old_reader(tmp_path, workers, block) -> None:
    """Empty and negative fields, CRLF, blank lines, .gz, short hex ids, batches across
    files: the same batches as CriteoTSVDataset."""
    lines = criteo_lines(700)
    files = [write(tmp_path / "a.tsv", lines[:300], blank_every=50),
             write(tmp_path / "b.txt", lines[300:500], eol="\r\n"),
             write(tmp_path / "c.tsv.gz", lines[500:])]
    old = list(CriteoTSVDataset(files, batch_size=64, num_embeddings=97))
    new = list(criteo_tsv(files, batch_size=64, num_embeddings=97, num_workers=workers,
                          block_size=block))
    same_batches(old, new)
    assert new[-1].labels.shape[0] == 700 % 64


def test_unlabelled_criteo_test_file(tmp_path) -> None:
    lines = criteo_lines(50, labelled=False)
    path = write(tmp_path / "test.txt", lines)
    batches = list(criteo_tsv(path, batch_size=16, labelled=False, num_embeddings=50))
    assert sum(b.labels.shape[0] for b in batches) == 50
    assert all(not b.labels.any() for b in batches)
    first = lines[0].split("\t")
    ints = [max(int(x), 0) if x else 0 for x in first[:13]]
    assert torch.allclose(batches[0].dense_features[0], torch.log1p(torch.tensor(
        ints, dtype=torch.float64)).float())
    with pytest.raises(DataError, match="test.txt:1: expected 40 columns.*labelled=False"):
        list(criteo_tsv(path, batch_size=16))


# --------------------------------------------------------------------------- user schema

SCHEMA_YAML = """\
labels: [click]
weight: w
columns: [click, w, price, user, item, tags]
dense:
  - {name: price, transform: standardize, mean: 10.0, std: 2.0, fill: 10.0}
sparse:
  - {name: user, mapping: hash}
  - {name: item, table: items_t}
  - {name: tags, table: items_t, delimiter: "|", mapping: modulo}
tables:
  - {name: user, num_embeddings: 1000, embedding_dim: 4}
  - {name: items_t, num_embeddings: 50, embedding_dim: 4}
"""

CSV_ROWS = [
    # click, w, price, user, item, tags
    ("1", "0.5", "12", "alice", "7", "1|2|3"),
    ("0", "1", "", "bob", "-3", ""),
    ("1", "2", "8.5", "", "60", "4||5"),
    ("0", "1", "10", "alice", "", "9"),
    ("1", "1", "14", "carol", "2", "70|-1"),
]


def expected_rows() -> list[tuple]:
    out = []
    for click, _w, price, user, item, tags in CSV_ROWS:
        p = float(price) if price else 10.0
        ids = (
            (int(hash_strings([user])[0] % np.uint64(1000)),) if user else (),
            (int(item) % 50,) if item else (),
            tuple(int(t) % 50 for t in tags.split("|") if t),
        )
        out.append((float(click), (float(np.float32((p - 10.0) / 2.0)),), ids))
    return out


@pytest.fixture
def schema_file(tmp_path) -> str:
    path = tmp_path / "schema.yaml"
    path.write_text(SCHEMA_YAML)
    return str(path)


def test_csv_with_header_hash_multivalued_and_weights(tmp_path, schema_file) -> None:
    header = "extra,click,w,price,user,item,tags"  # another order and an unused column
    text = header + "\r\n" + "".join(
        f"x,{c},{w},{p},{u},{i},{t}\r\n" for c, w, p, u, i, t in CSV_ROWS)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "part0.csv").write_text(text, newline="")
    (tmp_path / "d" / "run.sh").write_text("echo not data\n")  # ignored by extension
    (tmp_path / "d" / "_SUCCESS").write_text("")
    ds = TabularDataset(str(tmp_path / "d"), schema_file, format="csv", header=True,
                        batch_size=2)
    batches = list(ds)
    assert rows_of(batches) == expected_rows()
    assert torch.equal(torch.cat([b.weights for b in batches]),
                       torch.tensor([0.5, 1, 2, 1, 1]))
    assert batches[0].sparse_features.keys() == ["user", "item", "tags"]


def csv_rows_table() -> pa.Table:
    """`CSV_ROWS` as an Arrow table, typed as a Parquet writer would (tags a list column,
    empty fields null)."""
    cols = list(zip(*CSV_ROWS))
    return pa.table({
        "click": pa.array([int(x) for x in cols[0]], pa.int8()),
        "w": pa.array([float(x) for x in cols[1]]),
        "price": pa.array([float(x) if x else None for x in cols[2]]),
        "user": pa.array([x or None for x in cols[3]]),
        "item": pa.array([int(x) if x else None for x in cols[4]], pa.int64()),
        "tags": pa.array([[int(t) for t in x.split("|") if t] for x in cols[5]],
                         pa.list_(pa.int64())),
    })


def test_parquet_directory_list_columns_and_row_groups(tmp_path, schema_file) -> None:
    """The same rows as Parquet parts (tags as a list column, several row groups), with a
    script beside them: the same samples."""
    table = csv_rows_table()
    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(table.slice(0, 3), d / "part-0.parquet", row_group_size=2)
    pq.write_table(table.slice(3), d / "part-1.parquet", row_group_size=1)
    (d / "make.py").write_text("print(1)\n")
    ds = TabularDataset(str(d), schema_file, batch_size=2, num_workers=2)
    assert len(ds) == 3
    assert rows_of(list(ds)) == expected_rows()


def test_data_file_extensions() -> None:
    assert is_data_file("day_0", "csv") and is_data_file("x/train.txt.gz", "csv")
    assert not is_data_file("run.py", "csv") and not is_data_file("_SUCCESS", "csv")
    assert not is_data_file(".part.csv.crc", "csv")
    assert is_data_file("a.parquet", "parquet") and not is_data_file("a.csv", "parquet")


# --------------------------------------------------------------------------- errors


def _bad_tsv(tmp_path, line: str, at: int = 3) -> str:
    lines = criteo_lines(6)
    lines[at - 1] = line
    return write(tmp_path / "bad.tsv", lines)


def test_error_non_numeric_dense(tmp_path) -> None:
    fields = criteo_lines(1)[0].split("\t")
    fields[4] = "abc"
    path = _bad_tsv(tmp_path, "\t".join(fields), at=5)
    with pytest.raises(DataError, match=r"bad.tsv:5: column 'int_3': 'abc' is not a number"):
        list(criteo_tsv(path, batch_size=4))


def test_error_wrong_column_count(tmp_path) -> None:
    path = _bad_tsv(tmp_path, "1\t2\t3", at=4)
    with pytest.raises(DataError, match=r"bad.tsv:4: expected 40 columns.*got 3"):
        list(criteo_tsv(path, batch_size=4))


def test_error_bad_id(tmp_path) -> None:
    fields = criteo_lines(1)[0].split("\t")
    fields[20] = "xyz!"
    path = _bad_tsv(tmp_path, "\t".join(fields), at=2)
    with pytest.raises(DataError, match=r"bad.tsv:2: column 'cat_6': id 'xyz!' is not a hex"):
        list(criteo_tsv(path, batch_size=4, num_workers=0))


def test_error_line_number_in_a_later_block_and_rank(tmp_path) -> None:
    lines = criteo_lines(300)
    fields = lines[250].split("\t")
    fields[30] = "zz"
    lines[250] = "\t".join(fields)
    path = write(tmp_path / "big.tsv", lines)
    with pytest.raises(DataError, match=r"big.tsv:251: column 'cat_16'"):
        list(criteo_tsv(path, batch_size=16, block_size=4096, rank=1, world_size=2,
                        drop_last=False))


def test_error_integer_id_and_missing_columns(tmp_path, schema_file) -> None:
    (tmp_path / "a.csv").write_text("click,w,price,user,item,tags\n1,1,2,u,seven,1\n")
    with pytest.raises(DataError, match=r"a.csv:2: column 'item': 'seven' is not an integer"):
        list(TabularDataset(str(tmp_path / "a.csv"), schema_file, format="csv", header=True))
    (tmp_path / "b.csv").write_text("click,w,price,user,tags\n1,1,2,u,1\n")
    with pytest.raises(DataError, match=r"b.csv:1: header has no column\(s\) \['item'\]"):
        TabularDataset(str(tmp_path / "b.csv"), schema_file, format="csv", header=True)
    pq.write_table(pa.table({"click": [1], "w": [1.0], "price": [2.0], "user": ["u"]}),
                   tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c.parquet: missing column\(s\) \['item', 'tags'\]"):
        TabularDataset(str(tmp_path / "c.parquet"), schema_file)


def test_error_parquet_names_row_group_row_and_column(tmp_path, schema_file) -> None:
    table = pa.table({"click": [1, 0, 1, 1], "w": [1.0] * 4,
                      "price": ["1", "2", "3", "cheap"], "user": ["a"] * 4,
                      "item": [1, 2, 3, 4], "tags": ["1", "2", "3", "4"]})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=3)
    with pytest.raises(DataError, match=r"p.parquet: row group 1, row 0 \(row 3 of the file\): "
                                        r"column 'price': 'cheap' is not a number"):
        list(TabularDataset(str(tmp_path / "p.parquet"), schema_file))
    empty_label = table.set_column(0, "click", pa.array([1, None, 1, 1]))
    pq.write_table(empty_label, tmp_path / "q.parquet")
    with pytest.raises(DataError, match=r"row 1 of the file\): column 'click': is empty"):
        list(TabularDataset(str(tmp_path / "q.parquet"), schema_file))


# --------------------------------------------------------------------------- shards


@pytest.mark.parametrize("fmt", ["tsv", "parquet"])
def test_two_ranks_split_unequal_files_exactly(tmp_path, fmt) -> None:
    """Unequal files: each rank reads about half the bytes, every row once, and the
    ranks' batch counts differ by at most one."""
    lines = criteo_lines(1000, seed=3)
    sizes = [700, 40, 260]
    files, start = [], 0
    for i, n in enumerate(sizes):
        part = lines[start:start + n]
        start += n
        if fmt == "tsv":
            files.append(write(tmp_path / f"f{i}.tsv", part))
        else:
            ds = criteo_tsv(write(tmp_path / f"f{i}.tsv", part), batch_size=10_000)
            files.append(_to_parquet(tmp_path / f"f{i}.parquet", part, row_group_size=64))
            del ds
    kwargs = dict(batch_size=50, num_embeddings=1000, block_size=4096, drop_last=False)
    if fmt == "parquet":
        whole = list(_pq(files, **kwargs))
        per_rank = [list(_pq(files, rank=r, world_size=2, **kwargs)) for r in range(2)]
        readers = [_pq(files, rank=r, world_size=2, **kwargs) for r in range(2)]
    else:
        whole = list(criteo_tsv(files, **kwargs))
        per_rank = [list(criteo_tsv(files, rank=r, world_size=2, **kwargs)) for r in range(2)]
        readers = [criteo_tsv(files, rank=r, world_size=2, **kwargs) for r in range(2)]
    assert sorted(rows_of(per_rank[0]) + rows_of(per_rank[1])) == sorted(rows_of(whole))
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1
    total = sum(Path(f).stat().st_size for f in files)
    for r in readers:
        list(r)
        if fmt == "tsv":
            assert r.bytes_read <= 0.55 * total
        else:  # its half of the row groups, plus the one it shares at its span's edge
            groups = [b for sizes in r._rg_bytes for b in sizes]
            assert r.bytes_read <= 0.5 * sum(groups) + max(groups)


def test_compressed_files_go_whole_to_ranks(tmp_path) -> None:
    lines = criteo_lines(300, seed=9)
    files = [write(tmp_path / f"p{i}.tsv.gz", lines[i * 100:(i + 1) * 100]) for i in range(3)]
    shares = [criteo_tsv(files, batch_size=32, rank=r, world_size=2, drop_last=False)
              for r in range(2)]
    got = [rows_of(list(ds)) for ds in shares]
    assert sorted(got[0] + got[1]) == sorted(rows_of(list(criteo_tsv(files, batch_size=32))))
    assert {len(g) for g in got} == {100, 200}  # whole files: one rank has two of three
    assert all(p.end is None for ds in shares for p in ds.default_plan())


def _to_parquet(path: Path, lines: list[str], row_group_size: int) -> str:
    cols = list(zip(*[line.split("\t") for line in lines]))
    names = FeatureSchema.criteo().columns
    data = {}
    for name, values in zip(names, cols):
        if name.startswith("cat_"):
            data[name] = pa.array([v or None for v in values], pa.string())
        else:
            data[name] = pa.array([int(v) if v else None for v in values], pa.int64())
    pq.write_table(pa.table(data), path, row_group_size=row_group_size)
    return str(path)


def _pq(files, num_embeddings=1000, **kwargs) -> TabularDataset:
    return TabularDataset(files, FeatureSchema.criteo(num_embeddings), **kwargs)


def test_parquet_equals_tsv(tmp_path) -> None:
    lines = criteo_lines(300, seed=4)
    tsv = criteo_tsv(write(tmp_path / "a.tsv", lines), batch_size=64, num_embeddings=77)
    par = _pq(_to_parquet(tmp_path / "a.parquet", lines, 100), batch_size=64, num_embeddings=77)
    same_batches(list(tsv), list(par))


# --------------------------------------------------------------------------- positions


@pytest.mark.parametrize("fmt", ["tsv", "gz", "parquet"])
def test_resume_at_every_batch_is_exact(tmp_path, fmt) -> None:
    lines = criteo_lines(230, seed=5)
    if fmt == "parquet":
        files = [_to_parquet(tmp_path / "a.parquet", lines[:150], 40),
                 _to_parquet(tmp_path / "b.parquet", lines[150:], 40)]

        def make():
            return _pq(files, batch_size=32, num_workers=2)
    else:
        ext = ".tsv.gz" if fmt == "gz" else ".tsv"
        files = [write(tmp_path / f"a{ext}", lines[:150]),
                 write(tmp_path / f"b{ext}", lines[150:], eol="\r\n")]

        def make():
            return criteo_tsv(files, batch_size=32, num_workers=2, block_size=1024)
    reference = list(make())
    ds = make()
    states = []
    for _ in ds:
        states.append(ds.state_dict())
    for k, state in enumerate(states[:-1]):
        again = make()
        again.load_state_dict(state)
        same_batches(list(again), reference[k + 1:])
    # an epoch's end starts the next epoch; a second pass is the same data
    again = make()
    again.load_state_dict(states[-1])
    same_batches(list(again), reference)
    assert again.state_dict()["epoch"] == 2


def test_look_ahead_then_rewind_is_exact(tmp_path) -> None:
    """The Trainer reads ahead and puts the position back: the live iterator's decoding
    threads stop and the next pass starts at the restored position."""
    lines = criteo_lines(200, seed=6)
    path = write(tmp_path / "a.tsv", lines)
    ds = criteo_tsv(path, batch_size=20, num_workers=2, block_size=1024)
    reference = list(criteo_tsv(path, batch_size=20))
    it = iter(ds)
    next(it)
    kept = ds.state_dict()
    next(it), next(it)
    ds.load_state_dict(kept)
    same_batches(list(ds), reference[1:])


@pytest.mark.parametrize("fmt", ["tsv", "parquet"])
@pytest.mark.parametrize("old,new", [(2, 1), (2, 3), (1, 2)])
def test_resplit_at_another_world_size(tmp_path, fmt, old, new) -> None:
    """Positions of every rank of a run re-split over another world size: the rows left
    are read exactly once."""
    lines = criteo_lines(400, seed=7)
    if fmt == "parquet":
        files = [_to_parquet(tmp_path / "a.parquet", lines[:250], 64),
                 _to_parquet(tmp_path / "b.parquet", lines[250:], 64)]

        def make(rank, world):
            return _pq(files, batch_size=30, rank=rank, world_size=world, drop_last=False)
    else:
        files = [write(tmp_path / "a.tsv", lines[:250]), write(tmp_path / "b.tsv", lines[250:])]

        def make(rank, world):
            return criteo_tsv(files, batch_size=30, rank=rank, world_size=world,
                              block_size=2048, drop_last=False)
    seen, states = [], []
    for r in range(old):
        ds = make(r, old)
        it = iter(ds)
        for _ in range(3 + r):
            seen += rows_of([next(it)])
        states.append(ds.state_dict())
    rest = []
    for r in range(new):
        ds = make(r, new)
        ds.resplit(states)
        rest += rows_of(list(ds))
    everything = rows_of(list(make(0, 1)))
    assert sorted(seen + rest) == sorted(everything)
    with pytest.raises(ValueError, match="resplit"):
        make(0, 1).load_state_dict(states[0]) if old != 1 else make(0, 2).load_state_dict(
            states[0])


def test_drop_last_by_default_with_several_ranks(tmp_path) -> None:
    path = write(tmp_path / "a.tsv", criteo_lines(50))
    sizes = [b.labels.shape[0] for b in criteo_tsv(path, batch_size=10, rank=1, world_size=2)]
    assert sizes and all(s == 10 for s in sizes)
    assert criteo_tsv(path, batch_size=10).drop_last is False


def test_plain_dataloader_and_string_view_ids(tmp_path) -> None:
    """Through torch's DataLoader (batch_size=None, as for any batch-level dataset), and
    ids stored as string_view / binary columns hash like strings."""
    from torch.utils.data import DataLoader

    schema = FeatureSchema(labels=["y"], dense=["x"], sparse=[
        {"name": "u", "mapping": "hash"}, {"name": "v", "mapping": "hash"}],
        default_num_embeddings=1000)
    pq.write_table(pa.table({"y": [0, 1, 1], "x": [1.0, 2.0, 3.0],
                             "u": pa.array(["a", "b", "a"], pa.string_view()),
                             "v": pa.array([b"a", b"b", b"a"], pa.binary())}),
                   tmp_path / "s.parquet")
    ds = TabularDataset(str(tmp_path / "s.parquet"), schema, batch_size=2)
    batches = list(DataLoader(ds, batch_size=None))
    assert [b.labels.tolist() for b in batches] == [[0.0, 1.0], [1.0]]
    expected = [int(h) % 1000 for h in hash_strings(["a", "b"])]
    kjt = batches[0].sparse_features.to_dict()
    assert kjt["u"].values().tolist() == kjt["v"].values().tolist() == expected


def test_decoding_runs_ahead_by_at_most_prefetch_blocks(tmp_path) -> None:
    """Bounded memory: with a consumer that stops after one batch, the threads decode
    no more than ``prefetch`` blocks beyond the ones it consumed."""
    import threading
    import time

    path = write(tmp_path / "a.tsv", criteo_lines(400, seed=8))
    ds = criteo_tsv(path, batch_size=8, num_workers=2, prefetch=3, block_size=1024)
    calls = []
    lock = threading.Lock()
    inner = ds._range_task

    def counting(*args, **kwargs):
        with lock:
            calls.append(args[1])
        return inner(*args, **kwargs)

    ds._range_task = counting
    it = iter(ds)
    next(it)
    time.sleep(0.3)  # give the threads every chance to run further ahead
    assert len(calls) <= 1 + 3
    it.close()
    assert len(list(criteo_tsv(path, batch_size=8))) == 50


def test_state_from_other_files_is_refused(tmp_path) -> None:
    a = write(tmp_path / "a.tsv", criteo_lines(10))
    b = write(tmp_path / "b.tsv", criteo_lines(10))
    ds = criteo_tsv(a, batch_size=4)
    next(iter(ds))
    with pytest.raises(ValueError, match="files"):
        criteo_tsv(b, batch_size=4).load_state_dict(ds.state_dict())
    old = CriteoTSVDataset(a, batch_size=4)
    next(iter(old))
    with pytest.raises(ValueError, match="not a TabularDataset position"):
        criteo_tsv(a, batch_size=4).load_state_dict(old.state_dict())
