"""Issue 13 under attack: resuming at another world size through the Trainer, and the
readers, the schema and ``recframe data`` fed what users really have (headers, blank
fields, CRLF, stray files, broken files, hostile schemas)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_distributed import _env, _free_port
from test_readers import _to_parquet, criteo_lines, write

JOBS = Path(__file__).resolve().parent / "jobs"


# --------------------------------------------------------------------------- re-split


def _launch(world: int, out: Path, data: Path, fmt: str, tag: str, *extra: str) -> list[dict]:
    port = str(_free_port())
    procs = []
    for rank in range(world):
        dist = ({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                 "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": port} if world > 1 else {})
        env = _env(dist)
        if world == 1:
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key, None)
        procs.append(subprocess.Popen(
            [sys.executable, str(JOBS / "data_resplit_job.py"), str(out), str(data), fmt, tag,
             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        for rank, p in enumerate(procs):
            text, _ = p.communicate(timeout=240)
            assert p.returncode == 0, f"{tag} rank {rank}:\n{text[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads((out / f"{tag}-r{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("fmt,old,new", [("tsv", 2, 1), ("parquet", 1, 2)])
def test_trainer_resumes_at_another_world_size_by_resplitting(tmp_path, fmt, old, new) -> None:
    """A run checkpointed mid-epoch at ``old`` ranks resumes at ``new``: the Trainer
    re-splits the old ranks' positions, so every sample of the epoch is trained once
    across the change (none twice; at several ranks only each rank's last partial batch
    is dropped). Before: the positions were dropped and the epoch started over."""
    lines = criteo_lines(430, seed=21)
    data = tmp_path / "data"
    data.mkdir()
    if fmt == "tsv":
        write(data / "a.tsv", lines[:300])
        write(data / "b.tsv", lines[300:])
    else:
        _to_parquet(data / "a.parquet", lines[:300], 64)
        _to_parquet(data / "b.parquet", lines[300:], 50)
    (data / "README.md").write_text("not data\n")
    out = tmp_path / "run"
    out.mkdir()
    first = _launch(old, out, data, fmt, "first", "--steps", "4")
    assert {r["global_step"] for r in first} == {4} and {r["epoch"] for r in first} == {0}
    second = _launch(new, out, data, fmt, "second")
    assert {r["resumed"] for r in second} == {4}
    assert {r["epoch"] for r in second} == {1}  # the epoch was finished, not restarted
    assert len({r["global_step"] for r in second}) == 1

    from recframe.readers import TabularDataset
    from recframe.schema import FeatureSchema

    whole = next(iter(TabularDataset(str(data), FeatureSchema.criteo(40), format=fmt,
                                     batch_size=1000)))
    expected = Counter(tuple(r) for r in np.concatenate(
        [whole.labels[:, None].numpy(), whole.dense_features.numpy()], axis=1).tolist())
    got = Counter(tuple(np.float32(x).item() for x in row)
                  for r in first + second for row in r["samples"])
    assert not got - expected  # no sample twice, none from elsewhere
    missing = sum((expected - got).values())
    # one process keeps its last partial batch; several drop theirs (< 20 rows each)
    assert missing == 0 if new == 1 else missing < 20 * new


def test_remaining_batches_after_a_resplit(tmp_path) -> None:
    """The Trainer's agreed batch count under several ranks comes from the reader's own
    count after a re-split (len() - done counted the old ranks' batches: 1 -> 2 ranks
    dropped a third of the epoch)."""
    from recframe.readers import TabularDataset
    from recframe.schema import FeatureSchema

    files = [_to_parquet(tmp_path / "a.parquet", criteo_lines(300, seed=3), 64)]
    one = TabularDataset(files, FeatureSchema.criteo(40), batch_size=20, num_workers=0)
    it = iter(one)
    for _ in range(5):
        next(it)
    assert one.remaining_batches() == len(one) - 5 == 10
    for rank in range(2):
        ds = TabularDataset(files, FeatureSchema.criteo(40), batch_size=20, rank=rank,
                            world_size=2, num_workers=0)
        ds.resplit([one.state_dict()])
        assert ds.remaining_batches() == len(list(ds)) == 5  # 100 rows each, not 7 - 5
    assert TabularDataset(files, FeatureSchema.criteo(40), format="parquet",
                          batch_size=20).remaining_batches() == 15


# --------------------------------------------------------------------------- bad input


def _read(ds) -> int:
    return sum(int(b.labels.shape[0]) for b in ds)


def _tsv(path: Path, lines: list[str], **kwargs):
    from recframe.readers import criteo_tsv

    write(path, lines)
    return criteo_tsv(str(path), num_workers=0, batch_size=8, **kwargs)


def _with_field(line: str, index: int, value: str) -> str:
    fields = line.split("\t")
    fields[index] = value
    return "\t".join(fields)


def test_header_line_read_as_data_suggests_header(tmp_path) -> None:
    from recframe.readers import DataError

    names = ["label"] + [f"int_{i}" for i in range(13)] + [f"cat_{i}" for i in range(26)]
    ds = _tsv(tmp_path / "day_0", ["\t".join(names)] + criteo_lines(5))
    with pytest.raises(DataError, match=r"day_0:1: column 'label': 'label' is not a number "
                       r"\(a header line\? pass header=True"):
        _read(ds)
    assert _read(_tsv(tmp_path / "day_1", ["\t".join(names)] + criteo_lines(5),
                      header=True)) == 5


@pytest.mark.parametrize("damage", ["truncated", "not gzip"])
def test_broken_gz_names_the_file(tmp_path, damage) -> None:
    """Before: EOFError / BadGzipFile from deep inside gzip, no file named."""
    import gzip

    from recframe.readers import DataError, criteo_tsv

    data = gzip.compress(("\n".join(criteo_lines(400, seed=5)) + "\n").encode())
    path = tmp_path / "day_0.gz"
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"1\t2\t3\n")
    with pytest.raises(DataError, match=r"day_0.gz: the compressed file cannot be read.*"
                       "fetch it again"):
        _read(criteo_tsv(str(path), num_workers=0, block_size=1024))
    if damage == "not gzip":  # its first (header) line cannot be read either
        with pytest.raises(DataError, match="day_0.gz: the compressed file"):
            criteo_tsv(str(path), header=True)


def test_empty_file_with_header_says_so(tmp_path) -> None:
    from recframe.readers import DataError, criteo_tsv

    (tmp_path / "a.tsv").write_text("")
    with pytest.raises(DataError, match=r"a.tsv:1: no header line \(the file is empty"):
        criteo_tsv(str(tmp_path / "a.tsv"), header=True)
    assert _read(criteo_tsv(str(tmp_path / "a.tsv"))) == 0  # without a header: no rows


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_non_finite_dense_values_are_errors(tmp_path, value) -> None:
    """Before: NaN / inf went into the batch (and the loss)."""
    from recframe.readers import DataError

    lines = criteo_lines(6, seed=8)
    lines[3] = _with_field(lines[3], 5, value)
    with pytest.raises(DataError, match=r"day_0:4: column 'int_4': .*is not a finite number"):
        _read(_tsv(tmp_path / "day_0", lines))


def test_nan_in_parquet_dense_and_label(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recframe.readers import DataError, TabularDataset
    from recframe.schema import FeatureSchema

    schema = FeatureSchema(labels=["y"], dense=["x"], sparse=["s"], default_num_embeddings=9)
    for y, x, column in (([1.0, 0.0, 1.0], [1.0, float("nan"), 2.0], "x"),
                         ([1.0, float("nan"), 1.0], [1.0, 2.0, 3.0], "y")):
        path = tmp_path / f"{column}.parquet"
        pq.write_table(pa.table({"y": y, "x": x, "s": [1, 2, 3]}), path, row_group_size=2)
        with pytest.raises(DataError, match=rf"{column}.parquet: row group 0, row 1 .*"
                           rf"column '{column}': nan is not a finite number"):
            _read(TabularDataset(str(path), schema, num_workers=0))


def test_ids_beyond_int64_name_line_and_column(tmp_path) -> None:
    """Before: pyarrow's 'CSV conversion error to int64' without line or column name
    (single-valued), 'id None' on a wrong row (delimited)."""
    from recframe.readers import DataError, TabularDataset
    from recframe.schema import FeatureSchema

    schema = FeatureSchema(labels=["y"], columns=["y", "item", "tags"],
                           sparse=["item", {"name": "tags", "delimiter": "|"}],
                           default_num_embeddings=50)
    big = "99999999999999999999999"
    (tmp_path / "a.csv").write_text(f"1,3,1|2\n0,{big},1\n")
    with pytest.raises(DataError, match=rf"a.csv:2: column 'item': id '{big}' does not fit in "
                       "64 bits; use mapping hash"):
        _read(TabularDataset(str(tmp_path / "a.csv"), schema, format="csv", num_workers=0))
    (tmp_path / "b.csv").write_text(f"1,3,1|2\n0,4,\n1,5,7|{big}\n")
    with pytest.raises(DataError, match=rf"b.csv:3: column 'tags': id '{big}' does not fit"):
        _read(TabularDataset(str(tmp_path / "b.csv"), schema, format="csv", num_workers=0))
    # negative ids are fine: Python's modulo
    (tmp_path / "c.csv").write_text("1,-3,-1|-50\n")
    batch = next(iter(TabularDataset(str(tmp_path / "c.csv"), schema, format="csv")))
    assert batch.sparse_features.values().tolist() == [47, 49, 0]


def test_labelled_file_read_as_unlabelled_says_so(tmp_path) -> None:
    from recframe.readers import DataError

    with pytest.raises(DataError, match=r"day_0:1: expected 39 columns .*got 40 \(a labelled "
                       "file\\? leave out labelled=False"):
        _read(_tsv(tmp_path / "day_0", criteo_lines(3), labelled=False))


def test_directory_skips_readme_license_makefile(tmp_path) -> None:
    """Before: extensionless README / LICENSE / Makefile were read as data (like day_0)."""
    from recframe.readers import DataError, criteo_tsv

    write(tmp_path / "day_0", criteo_lines(7))
    for name in ("README", "LICENSE", "Makefile", "_SUCCESS", ".day_0.crc", "part-0.crc",
                 "run.sh", "convert.py", "schema.yaml"):
        (tmp_path / name).write_text("not data\n")
    ds = criteo_tsv(str(tmp_path), num_workers=0)
    assert [f.rsplit("/", 1)[-1] for f in ds.files] == ["day_0"]
    assert _read(ds) == 7
    (tmp_path / "notes.txt").write_text("hello\n")  # a text extension: read, and named
    with pytest.raises(DataError, match=r"notes.txt:1: expected 40 columns .*not a data "
                       "file\\?"):
        _read(criteo_tsv(str(tmp_path), num_workers=0))


def test_utf8_bom_before_the_header(tmp_path) -> None:
    from recframe.readers import TabularDataset
    from recframe.schema import FeatureSchema

    (tmp_path / "a.csv").write_bytes("\ufeffy,x,s\r\n1,2.5,7\r\n".encode())
    schema = FeatureSchema(labels=["y"], dense=["x"], sparse=["s"], default_num_embeddings=9)
    batch = next(iter(TabularDataset(str(tmp_path / "a.csv"), schema, format="csv",
                                     header=True)))
    assert batch.dense_features.tolist() == [[2.5]]


@pytest.mark.parametrize("content", ["garbage", "empty", "truncated"])
def test_unreadable_parquet_file_is_named(tmp_path, content) -> None:
    """Before: ArrowInvalid ('magic bytes not found') without the file's name."""
    from recframe.readers import DataError, TabularDataset
    from recframe.schema import FeatureSchema

    good = _to_parquet(tmp_path / "a.parquet", criteo_lines(20), 8)
    data = Path(good).read_bytes()
    bad = {"garbage": b"PAR1 not parquet", "empty": b"",
           "truncated": data[: len(data) // 2]}[content]
    (tmp_path / "b.parquet").write_bytes(bad)
    with pytest.raises(DataError, match=r"b.parquet: not a readable Parquet file .*move it "
                       "out of the data directory"):
        TabularDataset(str(tmp_path), FeatureSchema.criteo())


def test_parquet_column_of_the_wrong_type(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recframe.readers import DataError, TabularDataset
    from recframe.schema import FeatureSchema

    schema = FeatureSchema(labels=["y"], dense=["x"],
                           sparse=[{"name": "u", "mapping": "hash"}, "s"],
                           default_num_embeddings=9)
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"y": [1, 0], "x": [1.0, 2.0], "u": [{"a": 1}, {"a": 2}],
                             "s": [1, 2]}), path)
    with pytest.raises(DataError, match="a.parquet: row group 0, .*column 'u': has type "
                       "struct<a: int64>; mapping hash needs strings or integers"):
        _read(TabularDataset(str(path), schema, num_workers=0))
    pq.write_table(pa.table({"y": [1, 0], "x": ["1.5", "cheap"], "u": ["a", "b"],
                             "s": [1, 2]}), path)
    with pytest.raises(DataError, match="row group 0, row 1 .*column 'x': 'cheap' is not a "
                       "number"):
        _read(TabularDataset(str(path), schema, num_workers=0))


def test_sparse_delimiter_equal_to_the_file_delimiter_is_refused(tmp_path) -> None:
    from recframe.readers import TabularDataset
    from recframe.schema import FeatureSchema

    (tmp_path / "a.csv").write_text("1,2,3\n")
    schema = FeatureSchema(labels=["y"], columns=["y", "tags"],
                           sparse=[{"name": "tags", "delimiter": ","}], default_num_embeddings=9)
    with pytest.raises(ValueError, match=r"\['tags'\] split ids at ',', the file's own column "
                       "delimiter"):
        TabularDataset(str(tmp_path / "a.csv"), schema, format="csv")


def test_more_ranks_than_rows_and_a_rank_without_data(tmp_path, caplog) -> None:
    """Every row is read by exactly one rank however many ranks; a rank left without
    data says why (a single .gz cannot be split)."""
    import logging

    from recframe.readers import criteo_tsv

    lines = criteo_lines(3, seed=9)
    path = write(tmp_path / "day_0", lines)
    counts = [_read(criteo_tsv(path, rank=r, world_size=8, drop_last=False, num_workers=0))
              for r in range(8)]
    assert sum(counts) == 3 and max(counts) == 1
    gz = write(tmp_path / "day_1.gz", lines)
    with caplog.at_level(logging.WARNING, logger="recframe.readers"):
        counts = [_read(criteo_tsv(gz, rank=r, world_size=2, drop_last=False))
                  for r in range(2)]
    assert sorted(counts) == [0, 3]
    assert "rank 0 of 2 has no data to read" in caplog.text


def test_schema_with_a_table_listed_twice_names_it(tmp_path) -> None:
    from recframe.schema import FeatureSchema

    (tmp_path / "s.yaml").write_text(
        "labels: [y]\nsparse: [{name: a, table: t}, {name: b, table: t}]\n"
        "tables: [{name: t, num_embeddings: 10, embedding_dim: 4},"
        " {name: t, num_embeddings: 10, embedding_dim: 8}]\n")
    with pytest.raises(ValueError, match=r"s.yaml.*table\(s\) \['t'\] are listed more than "
                       "once"):
        FeatureSchema.from_file(str(tmp_path / "s.yaml"))


def test_failed_convert_leaves_no_parts(tmp_path) -> None:
    """A convert that fails after writing parts (bad line 300) left part-00000..2 in
    the output, looking like a complete dataset; now nothing is left, and a rerun
    works."""
    from recframe import cli
    from recframe.readers import DataError, convert_to_parquet, criteo_tsv

    lines = criteo_lines(320, seed=10)
    lines[299] = _with_field(lines[299], 2, "oops")
    write(tmp_path / "day_0", lines)
    out = tmp_path / "pq"
    source = criteo_tsv(str(tmp_path / "day_0"), num_workers=0, block_size=1024)
    with pytest.raises(DataError, match="day_0:300: column 'int_1'"):
        convert_to_parquet(source, str(out), rows_per_file=64, row_group_size=16,
                           progress=False)
    assert sorted(p.name for p in out.iterdir()) == []
    write(tmp_path / "day_0", criteo_lines(320, seed=10))
    assert cli.main(["data", "convert", str(tmp_path / "day_0"), "--criteo", "--output",
                     str(out), "--rows_per_file", "64", "--no_progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        *(f"part-0000{i}.parquet" for i in range(5)), "schema.yaml"]
    assert cli.main(["data", "convert", str(tmp_path / "day_0"), "--criteo", "--output",
                     str(out), "--no_progress"]) == 1  # refuses to mix with earlier parts
    (tmp_path / "afile").write_text("x")
    assert cli.main(["data", "convert", str(tmp_path / "day_0"), "--criteo", "--output",
                     str(tmp_path / "afile"), "--no_progress"]) == 1


def test_train_parquet_without_schema_points_at_it(tmp_path, capsys) -> None:
    from recframe import cli

    _to_parquet(tmp_path / "a.parquet", criteo_lines(20), 8)
    rc = cli.main(["train", "--data", "parquet", "--train_path", str(tmp_path)])
    assert rc == 2
    assert "needs --schema schema.yaml" in capsys.readouterr().err
    (tmp_path / "schema.yaml").write_text("labels: [label]\n")
    cli.main(["train", "--data", "parquet", "--train_path", str(tmp_path)])
    assert f"pass --schema {tmp_path}/schema.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["no plan", "plan not a list", "file out of range",
                                    "offset negative", "a rank missing"])
def test_resplit_refuses_a_hostile_state(tmp_path, damage) -> None:
    """A checkpoint's positions are data: a damaged one is refused with a ValueError
    that says so (before: KeyError / TypeError / IndexError from inside resplit)."""
    from recframe.readers import criteo_tsv

    path = write(tmp_path / "day_0", criteo_lines(40))
    states = []
    for rank in range(2):
        ds = criteo_tsv(path, batch_size=5, rank=rank, world_size=2, num_workers=0)
        next(iter(ds))
        states.append(ds.state_dict())
    bad = dict(states[1])
    if damage == "no plan":
        del bad["plan"]
    elif damage == "plan not a list":
        bad["plan"] = 7
    elif damage == "file out of range":
        bad["plan"] = [[5, 0, 10]]
    elif damage == "offset negative":
        bad["offset"] = -1
    new = criteo_tsv(path, batch_size=5, num_workers=0)
    given = [states[0]] if damage == "a rank missing" else [states[0], bad]
    with pytest.raises(ValueError, match="resplit: "):
        new.resplit(given)
    new.resplit(states)  # the good states still work
    assert _read(new) == 30


def test_dictionary_encoded_and_decimal_parquet_columns(tmp_path) -> None:
    """pandas categories / Spark dictionary pages read back as dictionary arrays: a hex
    id column of them was refused ('has type dictionary<...>'); decimals are numbers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recframe.readers import TabularDataset
    from recframe.schema import FeatureSchema

    schema = FeatureSchema(labels=["y"], dense=["x"], sparse=[
        {"name": "u", "mapping": "hash"}, {"name": "t", "mapping": "hex"}, "tags"],
        default_num_embeddings=1000)
    plain = {"y": [1, 0], "x": [1.25, 2.0], "u": ["a", "b"], "t": ["a", "ff"],
             "tags": [["1", "2"], []]}
    encoded = {"y": [1, 0], "x": pa.array([125, 200], pa.decimal128(5, 0)),
               "u": pa.array(["a", "b"]).dictionary_encode(),
               "t": pa.array(["a", "ff"]).dictionary_encode(),
               "tags": pa.array([["1", "2"], []],
                                pa.list_(pa.dictionary(pa.int32(), pa.string())))}
    batches = []
    for name, cols in (("plain", plain), ("encoded", encoded)):
        pq.write_table(pa.table(cols), tmp_path / f"{name}.parquet")
        batches.append(next(iter(TabularDataset(str(tmp_path / f"{name}.parquet"), schema,
                                                num_workers=0))))
    assert batches[1].dense_features.tolist() == [[125.0], [200.0]]
    a, b = (x.sparse_features for x in batches)
    assert a.values().tolist() == b.values().tolist()
    assert a.lengths().tolist() == b.lengths().tolist() == [1, 1, 1, 1, 2, 0]


def test_convert_leftover_of_a_killed_run_is_skipped_and_reported(tmp_path, caplog) -> None:
    """A SIGKILLed convert leaves only its staging directory _convert-*: readers do not
    see its parts, and the next convert says it can be deleted."""
    import logging

    from recframe.readers import TabularDataset, convert_to_parquet, criteo_tsv
    from recframe.schema import FeatureSchema

    out = tmp_path / "pq"
    (out / "_convert-0123").mkdir(parents=True)
    _to_parquet(out / "_convert-0123" / "part-00000.parquet", criteo_lines(10), 8)
    write(tmp_path / "day_0", criteo_lines(30, seed=4))
    with caplog.at_level(logging.WARNING, logger="recframe.readers"):
        convert_to_parquet(criteo_tsv(str(tmp_path / "day_0")), str(out), progress=False)
    assert "_convert-0123" in caplog.text and "interrupted convert" in caplog.text
    assert _read(TabularDataset(str(out), FeatureSchema.criteo())) == 30


@pytest.mark.parametrize("bad,expected", [
    (b"0,2,caf\xe9,3", r"a.csv:6: column 'u': .*invalid UTF8 data \(re-encode the file as UTF-8"),
    (b"0,2,b,+3", r"a.csv:6: column 's': .*invalid value '\+3'"),
    (b'0,2,"b,3', r"a.csv:6: .*an unbalanced double quote\?"),
])
def test_values_pyarrow_rejects_name_line_and_column(tmp_path, bad, expected) -> None:
    """What Python's own parse accepts but pyarrow's does not (latin-1 bytes, '+3', an
    unbalanced quote) was reported 'near byte 0' with pyarrow's text, no line."""
    from recframe.readers import DataError, TabularDataset
    from recframe.schema import FeatureSchema

    schema = FeatureSchema(labels=["y"], dense=["x"], sparse=[
        {"name": "u", "mapping": "hash"}, "s"], default_num_embeddings=100)
    text = b"y,x,u,s\r\n1,2,a,3\r\n\r\n1,2,a,3\r\n0,1,c,4\r\n" + bad + b"\r\n1,1,d,5\r\n"
    (tmp_path / "a.csv").write_bytes(text)
    with pytest.raises(DataError, match=expected):
        _read(TabularDataset(str(tmp_path / "a.csv"), schema, format="csv", header=True,
                             num_workers=0))


@pytest.mark.parametrize("text,expected", [
    ("dense: [{name: x, fill: .nan}]", r"dense column 'x': fill must be a finite number"),
    ("dense: [{name: x, transform: standardize, std: .inf}]", "std must be a finite number"),
    ("tables: [{name: s, num_embeddings: 100000000000000000000}]",
     r"table 's': num_embeddings must be an integer in \[1, 2\*\*63\)"),
    ("sparse: [{name: s, mapping: {kind: hash, salt: 100000000000000000000}}]",
     r"salt must be an integer in \[0, 2\*\*64\)"),
])
def test_schema_numbers_out_of_range(tmp_path, text, expected) -> None:
    """Before: a NaN fill passed the schema (every empty value became NaN); a table or
    salt beyond 64 bits raised OverflowError from numpy while reading."""
    from recframe.schema import FeatureSchema

    base = {"dense": "dense: [x]", "sparse": "sparse: [s]", "tables": "tables: []"}
    base[text.split(":")[0]] = text
    (tmp_path / "s.yaml").write_text("labels: [y]\ndefault_num_embeddings: 10\n"
                                     + "\n".join(base.values()) + "\n")
    with pytest.raises(ValueError, match=expected):
        FeatureSchema.from_file(str(tmp_path / "s.yaml"))


def test_remaining_batches_when_a_resplit_leaves_less_than_a_batch(tmp_path) -> None:
    """1 -> 2 ranks with 20 rows left and batches of 20 (drop_last): each new rank has
    10 rows, no whole batch, and its iterator goes on with the next epoch; the count
    the Trainer agrees on said 0, which stopped training altogether."""
    from recframe.readers import TabularDataset
    from recframe.schema import FeatureSchema

    files = [_to_parquet(tmp_path / "a.parquet", criteo_lines(300, seed=3), 64)]
    one = TabularDataset(files, FeatureSchema.criteo(40), batch_size=20, num_workers=0)
    it = iter(one)
    for _ in range(14):  # 20 rows left: 10 per new rank
        next(it)
    for rank in range(2):
        ds = TabularDataset(files, FeatureSchema.criteo(40), batch_size=20, rank=rank,
                            world_size=2, num_workers=0)
        ds.resplit([one.state_dict()])
        assert ds.remaining_batches() == len(list(ds)) == len(ds) == 7
