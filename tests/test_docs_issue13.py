"""Issue 13 from a new user's side: their own Parquet / CSV files and a schema.yaml written
by hand from docs/data.md, trained with ``recframe train`` as the docs say, and the
mistakes such a user makes, each answered by an error that names the file or field and
the fix."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recframe import cli
from recframe.readers import DataError, TabularDataset, list_files

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# a schema.yaml as a user writes it from docs/data.md: their own column names
SCHEMA_YAML = """\
labels: [clicked]
dense:
  - {name: price, transform: standardize, mean: 10.0, std: 2.0, fill: 10.0}
sparse:
  - {name: user_id, mapping: hash}
  - {name: item_id}
  - {name: tag_list, table: tags}
tables:
  - {name: user_id, num_embeddings: 100, embedding_dim: 4}
  - {name: item_id, num_embeddings: 500, embedding_dim: 4}
  - {name: tags, num_embeddings: 50, embedding_dim: 4}
"""
# the same for CSV, whose multi-valued column is delimited text
CSV_SCHEMA_YAML = SCHEMA_YAML.replace("table: tags}", "table: tags, delimiter: '|'}")


def _user_table(n: int, seed: int) -> pa.Table:
    """What pandas' ``df.to_parquet`` writes: a bool label, a string and an int id, a list
    column, a float column with nulls, and the frame's index as ``__index_level_0__``
    (with the ``pandas`` metadata that names it)."""
    r = np.random.default_rng(seed)
    missing = r.random(n) < 0.2
    table = pa.table({
        "clicked": pa.array(r.random(n) < 0.3),
        "user_id": pa.array([f"u{x}" for x in r.integers(0, 40, n)]),
        "item_id": pa.array(r.integers(0, 10**9, n), pa.int64()),
        "tag_list": pa.array([[int(t) for t in r.integers(0, 50, r.integers(0, 4))]
                              for _ in range(n)]),
        "price": pa.array(r.normal(10, 2, n), mask=missing),
        "__index_level_0__": pa.array(np.arange(1000, 1000 + n)),
    })
    meta = {"index_columns": ["__index_level_0__"], "column_indexes": [], "columns": [],
            "pandas_version": "2.2.0", "creator": {"library": "pyarrow"}}
    return table.replace_schema_metadata({b"pandas": json.dumps(meta).encode()})


def _train(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["train", "--batch_size", "32", "--log_steps", "2", "--data_workers", "0",
                     "--disable_tqdm", "true", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _final_eval(out: str) -> dict:
    [line] = [x for x in out.splitlines() if x.startswith("final eval: ")]
    return json.loads(line[len("final eval: "):])


def test_own_parquet_train_resume_then_prepare_and_train_again(tmp_path, capsys, caplog):
    """The path docs/data.md walks a user through: their pandas-written Parquet under a
    hand-written schema.yaml, trained; the same command on the same output_dir resumes;
    `data convert --prepare` and training on the prepared parts evaluates alike."""
    for name, n, seed in (("train", 200, 0), ("eval", 64, 1)):
        (tmp_path / name).mkdir()
        pq.write_table(_user_table(n, seed), tmp_path / name / "part-0.parquet")
    (tmp_path / "schema.yaml").write_text(SCHEMA_YAML)
    data = ["--data", "parquet", "--schema", str(tmp_path / "schema.yaml")]
    raw = [*data, "--train_path", str(tmp_path / "train"), "--eval_path", str(tmp_path / "eval")]
    code, out, err = _train(capsys, *raw, "--train_steps", "4",
                            "--output_dir", str(tmp_path / "out"))
    assert code == 0, err
    first = _final_eval(out)
    assert first["num_samples"] == 64
    code, out, err = _train(capsys, *raw, "--train_steps", "6",
                            "--output_dir", str(tmp_path / "out"))
    assert code == 0, err
    assert "resumed from" in caplog.text and "global_step=4" in caplog.text
    assert "WARNING" not in caplog.text
    assert (tmp_path / "out" / "ckpt_6").is_dir()

    for name in ("train", "eval"):
        assert cli.main(["data", "convert", str(tmp_path / name), "--format", "parquet",
                         "--schema", str(tmp_path / "schema.yaml"), "--prepare",
                         "--no_progress", "--output", str(tmp_path / f"{name}_prep")]) == 0
    prepared = ["--data", "parquet", "--schema", str(tmp_path / "train_prep" / "schema.yaml"),
                "--train_path", str(tmp_path / "train_prep"),
                "--eval_path", str(tmp_path / "eval_prep")]
    code, out, err = _train(capsys, *prepared, "--train_steps", "4",
                            "--output_dir", str(tmp_path / "out_prep"))
    assert code == 0, err
    assert _final_eval(out) == pytest.approx(first, rel=1e-4)


def _schema_file(tmp_path, text: str = SCHEMA_YAML) -> str:
    path = tmp_path / "schema.yaml"
    path.write_text(text)
    return str(path)


def test_string_ids_under_the_default_mapping_name_mapping_hash(tmp_path) -> None:
    """`sparse: [user_id]` (the docs' shorthand) maps ids by modulo; a user's string ids
    then fail naming the mapping that takes them, in Parquet and in CSV."""
    schema = _schema_file(tmp_path, SCHEMA_YAML.replace("{name: user_id, mapping: hash}",
                                                        "{name: user_id}"))
    pq.write_table(_user_table(8, 0), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a.parquet: row group 0, row 0 .*column 'user_id': "
                                        r"id 'u\d+' is not an integer \(mapping modulo\); ids "
                                        r"that are not integers need mapping hash"):
        list(TabularDataset(str(tmp_path / "a.parquet"), schema, num_workers=0))
    (tmp_path / "a.csv").write_text("clicked,user_id,item_id,tag_list,price\n"
                                    "1,7,3,,2.5\n0,u9,4,,\n")
    schema = _schema_file(tmp_path, CSV_SCHEMA_YAML.replace(
        "{name: user_id, mapping: hash}", "{name: user_id}"))
    with pytest.raises(DataError, match=r"a.csv:3: column 'user_id': 'u9' is not an integer "
                                        r"id \(ids that are not integers need mapping hash\)"):
        list(TabularDataset(str(tmp_path / "a.csv"), schema, format="csv", header=True,
                            num_workers=0))


def test_a_typo_in_a_schema_column_name_names_the_files_column(tmp_path) -> None:
    """`price` typed as `prize` in schema.yaml: the error names the file's column."""
    schema = _schema_file(tmp_path, SCHEMA_YAML.replace("name: price,", "name: prize,"))
    pq.write_table(_user_table(8, 0), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a.parquet: missing column\(s\) \['prize'\]; the file "
                                        r"has .* \(a typo\? the file has 'price' for the "
                                        r"schema's 'prize': fix the names in the schema\)$"):
        TabularDataset(str(tmp_path / "a.parquet"), schema)
    (tmp_path / "a.csv").write_text("clicked,user_id,item_id,tag_list,price\n1,u,3,,2.5\n")
    with pytest.raises(DataError, match=r"a.csv:1: header has no column\(s\) \['prize'\]; .*"
                                        r"the file has 'price' for the schema's 'prize'"):
        TabularDataset(str(tmp_path / "a.csv"), schema, format="csv", header=True)


def test_eval_data_without_the_label_says_to_leave_it_out(tmp_path, capsys) -> None:
    """Unlabelled files passed as `--eval_path`: `recframe train` has no labelled=False
    (evaluation needs labels), so the error says to leave the files out, and names
    labelled=False / --unlabelled for reading them otherwise; CSV with a header too."""
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    table = _user_table(16, 0)
    pq.write_table(table, tmp_path / "train" / "a.parquet")
    pq.write_table(table.drop_columns(["clicked"]), tmp_path / "test" / "a.parquet")
    code = cli.main(["train", "--data", "parquet", "--schema", _schema_file(tmp_path),
                     "--train_path", str(tmp_path / "train"),
                     "--eval_path", str(tmp_path / "test"), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert "test/a.parquet: missing column(s) ['clicked']" in err
    assert "training and evaluation need the labels: leave it out of the paths" in err
    assert "labelled=False (data convert --unlabelled)" in err
    (tmp_path / "b.csv").write_text("user_id,item_id,tag_list,price\nu,3,,2.5\n")
    with pytest.raises(DataError, match=r"b.csv:1: header has no column\(s\) \['clicked'\]; .*"
                                        r"an unlabelled file\? reading it needs labelled=False"):
        TabularDataset(str(tmp_path / "b.csv"), _schema_file(tmp_path), format="csv",
                       header=True)


def test_csv_without_header_or_columns_names_the_command_line_flag(tmp_path) -> None:
    (tmp_path / "a.csv").write_text("clicked,user_id,item_id,tag_list,price\n1,u,3,,2.5\n")
    with pytest.raises(ValueError, match=r"need schema.columns .* or pass header=True "
                                         r"\(--header on the command line\)"):
        TabularDataset(str(tmp_path / "a.csv"), _schema_file(tmp_path), format="csv")


def test_a_path_with_no_data_file_says_why(tmp_path) -> None:
    """Spark's partitioned output (a directory of `date=...` directories), the other
    format's files, an empty directory, a path that does not exist, Parquet files
    without an extension: each says so."""
    for day in ("date=2026-01-01", "date=2026-01-02"):
        (tmp_path / "hive" / day).mkdir(parents=True)
        pq.write_table(_user_table(4, 0), tmp_path / "hive" / day / "part-0.parquet")
    (tmp_path / "hive" / "_SUCCESS").write_text("")  # Spark's marker: not data
    hive = str(tmp_path / "hive")
    with pytest.raises(FileNotFoundError, match=r"only subdirectories \['date=2026-01-01', "
                                                r"'date=2026-01-02'\].* pass a glob such as "
                                                r"'.*hive/\*/\*\.parquet'"):
        list_files(hive, "parquet")
    assert len(list_files(hive + "/*/*.parquet", "parquet")) == 2  # the glob it suggests
    with pytest.raises(FileNotFoundError, match=r"holds parquet files: read them with "
                                                r"format='parquet' \(--data parquet, data "
                                                r"convert --format parquet\)\)$"):
        list_files(hive + "/date=2026-01-01", "csv")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.csv").write_text("x\n")
    with pytest.raises(FileNotFoundError, match=r"holds csv files: read them with "
                                                r"format='csv' or 'tsv' \(--data, data "
                                                r"convert --format: csv or tsv\)\)$"):
        list_files(str(tmp_path / "c"), "parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"'.*empty' \(the directory is empty\)$"):
        list_files(str(tmp_path / "empty"), "parquet")
    with pytest.raises(FileNotFoundError, match=r"'.*nope' \(it does not exist\)$"):
        list_files(str(tmp_path / "nope"), "parquet")
    with pytest.raises(FileNotFoundError, match=r"\*\.parquet' \(it matches parquet files: "
                                                r"read them with format='parquet'"):
        list_files(hive + "/*/*.parquet", "csv")
    # Parquet parts without an extension (Hive / Trino write such names): by their bytes
    (tmp_path / "noext").mkdir()
    pq.write_table(_user_table(4, 0), tmp_path / "noext" / "20260101_00001")
    for path, where in [("noext", "the directory holds"), ("noext/*", "it matches")]:
        with pytest.raises(FileNotFoundError, match=rf"\({where} 1 file\(s\) that are not "
                                                    r"parquet data by their names: Parquet "
                                                    r"needs .parquet/.parq/.pq, e.g. "
                                                    r"'20260101_00001'; name such files one"):
            list_files(str(tmp_path / path), "parquet")
    assert len(list_files(str(tmp_path / "noext" / "20260101_00001"), "parquet")) == 1


def test_nan_in_parquet_says_write_a_null_and_a_nan_label_says_no_fill(tmp_path) -> None:
    """numpy's NaN written by pyarrow stays NaN (not null): the fix for a dense column is
    a null; a label has no fill, so its error does not offer one."""
    price = np.array([1.0, np.nan, 3.0])
    pq.write_table(pa.table({"clicked": [1, 0, 1], "user_id": ["a", "b", "c"],
                             "item_id": [1, 2, 3], "tag_list": [[1], [], [2]],
                             "price": price}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"row 1 of the file\): column 'price': nan is not a "
                                        r"finite number \(leave the value empty \(a null in "
                                        r"Parquet\) .*from_pandas=True\)"):
        list(TabularDataset(str(tmp_path / "a.parquet"), _schema_file(tmp_path),
                            num_workers=0))
    pq.write_table(pa.table({"clicked": [1.0, np.nan, 0.0], "user_id": ["a", "b", "c"],
                             "item_id": [1, 2, 3], "tag_list": [[1], [], [2]],
                             "price": [1.0, 2.0, 3.0]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"column 'clicked': nan is not a finite number \(a "
                                        r"label or weight needs a finite value in every row\)"):
        list(TabularDataset(str(tmp_path / "a.parquet"), _schema_file(tmp_path),
                            num_workers=0))


def test_what_pandas_writes_names_the_pandas_fix(tmp_path) -> None:
    """pandas turns an int id column with missing values into floats, writes a bool
    column to CSV as True/False and a list as its repr: each error says what to write."""
    float_fix = (r"write the ids as integers: pandas stores an int column with missing values "
                 r"as floats; df\[col\].astype\('Int64'\)")
    table = _user_table(4, 0).set_column(2, "item_id", pa.array([1.0, None, 3.0, 4.0]))
    pq.write_table(table, tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"column 'item_id': has type double; mapping modulo "
                                        rf"needs integer ids \({float_fix}"):
        list(TabularDataset(str(tmp_path / "a.parquet"), _schema_file(tmp_path),
                            num_workers=0))
    schema = _schema_file(tmp_path, CSV_SCHEMA_YAML)
    head = "clicked,user_id,item_id,tag_list,price\n"
    for body, match in [
        ("1,u,3,,2.5\n0,u,4.0,,\n", rf"a.csv:3: column 'item_id': '4.0' is not an integer id "
                                   rf"\({float_fix}"),
        ("True,u,3,,2.5\n", r"a.csv:2: column 'clicked': 'True' is not a number \(write "
                           r"booleans as numbers, 1/0: .*df\[col\].astype\(int\)\)"),
        ('1,u,3,"[1, 2]",2.5\n', r"a.csv:2: column 'tag_list': id '\[1, 2\]' is not an integer "
                                r"\(mapping modulo\); a list written as text\? join its items"),
    ]:
        (tmp_path / "a.csv").write_text(head + body)
        with pytest.raises(DataError, match=match):
            list(TabularDataset(str(tmp_path / "a.csv"), schema, format="csv", header=True,
                                num_workers=0))


@pytest.mark.parametrize("sep, fix", [(";", r"pass delimiter=';'"),
                                      ("\t", r"pass format='tsv' \(--data tsv, data convert "
                                            r"--format tsv\)\)$")])
def test_a_header_read_as_one_column_names_the_files_delimiter(tmp_path, sep, fix) -> None:
    (tmp_path / "a.csv").write_text(sep.join(["clicked", "user_id", "item_id", "tag_list",
                                              "price"]) + "\n")
    with pytest.raises(DataError, match=r"a.csv:1: header has no column\(s\) .*\(one column: "
                                        rf"are the file's columns separated by .*\? {fix}"):
        TabularDataset(str(tmp_path / "a.csv"), _schema_file(tmp_path), format="csv",
                       header=True)


def test_size_flags_that_file_data_ignores_warn_once_each(tmp_path, caplog) -> None:
    """README's `--num_embeddings 1000` kept beside `--data parquet --schema ...` does
    nothing (the schema's tables size the model), nor do the synthetic data's batch
    counts: each says so; Criteo's preset schema takes the table sizes."""
    common = ["train", "--train_path", str(tmp_path / "none"), "--output_dir",
              str(tmp_path / "o"), "--num_train_batches", "3", "--num_eval_batches", "0"]
    assert cli.main([*common, "--data", "parquet", "--schema", _schema_file(tmp_path),
                     "--num_embeddings", "1000", "--embedding_dim", "8"]) == 2
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [
        "--num_train_batches 3 does nothing with --data parquet: the training files set the "
        "batches of an epoch (--train_steps sets the updates)",
        "--num_eval_batches 0 does nothing with --data parquet: --eval_path names the "
        "evaluation files (--eval_steps limits the batches an evaluation reads)",
        f"--num_embeddings 1000 does nothing with --data parquet: the tables of --schema "
        f"{tmp_path / 'schema.yaml'} size the model: set num_embeddings / embedding_dim there",
        f"--embedding_dim 8 does nothing with --data parquet: the tables of --schema "
        f"{tmp_path / 'schema.yaml'} size the model: set num_embeddings / embedding_dim there",
    ]
    caplog.clear()
    assert cli.main([*common[:-4], "--data", "parquet", "--schema", _schema_file(tmp_path),
                     "--header"]) == 2
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "--header does nothing with --data parquet: Parquet files name their columns "
        "(--header is for CSV/TSV files whose first line names them)"]
    caplog.clear()
    assert cli.main([*common, "--data", "criteo", "--num_embeddings", "1000"]) == 2
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert [w.split(" does")[0] for w in warned] == ["--num_train_batches 3",
                                                     "--num_eval_batches 0"]


def test_the_next_days_files_in_a_runs_directory_say_how_to_go_on(tmp_path, capsys) -> None:
    """A run's train directory gets another part (the next day's logs) and the same
    command runs again: the checkpoint's position is over the old files, so the resume
    is refused, saying which file came and how to train on it (a warm start), which
    then runs."""
    (tmp_path / "train").mkdir()
    pq.write_table(_user_table(64, 0), tmp_path / "train" / "day-0.parquet")
    common = ["--data", "parquet", "--schema", _schema_file(tmp_path), "--train_path",
              str(tmp_path / "train"), "--train_steps", "2"]
    code, _, err = _train(capsys, *common, "--output_dir", str(tmp_path / "day0"))
    assert code == 0, err
    pq.write_table(_user_table(64, 1), tmp_path / "train" / "day-1.parquet")
    code, _, err = _train(capsys, *common, "--output_dir", str(tmp_path / "day0"))
    assert code == 2
    assert ("the position was taken over 1 file(s), this dataset reads 2: 1 added "
            "['day-1.parquet']") in err
    assert "--model_bank '[\"OLD_OUTPUT_DIR\"]'" in err
    code, _, err = _train(capsys, *common, "--output_dir", str(tmp_path / "day1"),
                          "--model_bank", json.dumps([str(tmp_path / "day0")]))
    assert code == 0, err
    assert (tmp_path / "day1" / "ckpt_2").is_dir()


def test_own_csv_with_a_header_and_a_delimited_column_trains_as_its_prepared_parts(
        tmp_path, capsys) -> None:
    """A CSV with a header (columns in the user's order, one extra) and a `|`-delimited
    multi-valued column, trained and evaluated as written and after `data convert
    --prepare`: the same evaluation."""
    r = np.random.default_rng(5)
    lines = ["price,tag_list,note,item_id,user_id,clicked"]
    for i in range(160):
        tags = "|".join(str(t) for t in r.integers(0, 50, r.integers(0, 4)))
        price = "" if i % 6 == 0 else f"{r.normal(10, 2):.3f}"
        lines.append(f"{price},{tags},x,{r.integers(0, 10**9)},u{r.integers(0, 30)},"
                     f"{int(r.random() < 0.3)}")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "day-0.csv").write_text("\n".join(lines) + "\n")
    schema = _schema_file(tmp_path, CSV_SCHEMA_YAML)
    raw = ["--data", "csv", "--header", "--schema", schema, "--train_path",
           str(tmp_path / "logs"), "--eval_path", str(tmp_path / "logs"), "--train_steps", "3"]
    code, out, err = _train(capsys, *raw, "--output_dir", str(tmp_path / "o1"))
    assert code == 0, err
    first = _final_eval(out)
    assert first["num_samples"] == 160
    assert cli.main(["data", "convert", str(tmp_path / "logs"), "--format", "csv", "--header",
                     "--schema", schema, "--prepare", "--no_progress", "--output",
                     str(tmp_path / "prep")]) == 0
    prep = ["--data", "parquet", "--schema", str(tmp_path / "prep" / "schema.yaml"),
            "--train_path", str(tmp_path / "prep"), "--eval_path", str(tmp_path / "prep"),
            "--train_steps", "3"]
    code, out, err = _train(capsys, *prep, "--output_dir", str(tmp_path / "o2"))
    assert code == 0, err
    assert _final_eval(out) == pytest.approx(first, rel=1e-4)


def test_several_label_columns_for_a_built_in_model_fail_before_reading(tmp_path,
                                                                       capsys) -> None:
    """The docs' schema allows `labels: [click, buy]` ([B, k] labels), which DLRM and
    DeepFM cannot train: said at once, naming the schema and the way out, not after the
    data is opened and the first step runs."""
    schema = _schema_file(tmp_path, SCHEMA_YAML.replace("labels: [clicked]",
                                                        "labels: [clicked, bought]"))
    code = cli.main(["train", "--data", "parquet", "--schema", schema, "--model", "deepfm",
                     "--train_path", str(tmp_path / "none"), "--output_dir", str(tmp_path / "o")])
    assert code == 2
    assert capsys.readouterr().err == (
        f"recframe: error: --model deepfm predicts one label per sample, but --schema {schema} "
        "names 2: ['clicked', 'bought']; keep one in labels, or train your own model "
        "(--model PKG.MODULE:FN)\n")


def test_a_column_name_that_is_no_identifier_says_which_table_to_set(tmp_path) -> None:
    """Hive / Spark column names such as `user.id` read fine, but the table each column
    names by default cannot name a module of the built-in models: the error gives a name
    that can, and where to put it (the user never wrote a table name)."""
    from recframe.models import DLRM
    from recframe.schema import FeatureSchema

    text = ("labels: [clicked]\ndense: [price]\nsparse:\n  - {name: user.id, mapping: hash}\n"
            "  - item_id\ndefault_num_embeddings: 100\ndefault_embedding_dim: 4\n")
    schema = FeatureSchema.from_file(_schema_file(tmp_path, text))
    with pytest.raises(ValueError, match=r"table name 'user.id' cannot name a module .*: set "
                                         r"table: user_id on sparse column\(s\) \['user.id'\] "
                                         r"\(a column's table defaults to its name\)"):
        DLRM(schema=schema, dense_arch=(8, 4))
    fixed = FeatureSchema.from_file(_schema_file(tmp_path, text.replace(
        "mapping: hash}", "mapping: hash, table: user_id}")))
    DLRM(schema=fixed, dense_arch=(8, 4))


@pytest.mark.parametrize("joined", [False, True])
def test_an_unquoted_glob_says_to_quote_it(tmp_path, monkeypatch, capsys, joined) -> None:
    """`--train_path data/*.parquet` unquoted: the shell passes one value per file and
    argparse calls the rest unrecognized; the error says what happened and the fix."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for i in range(3):
        pq.write_table(_user_table(4, i), tmp_path / "data" / f"part-{i}.parquet")
    files = [f"data/part-{i}.parquet" for i in range(3)]
    value = [f"--train_path={files[0]}"] if joined else ["--train_path", files[0]]
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--data", "parquet", *value, *files[1:], "--train_steps", "2"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "recframe: error: unrecognized arguments: data/part-1.parquet data/part-2.parquet "
        "(the shell expanded a glob after --train_path into 3 files; quote it, --train_path "
        "'data/*.parquet', or pass the directory)")


def test_a_missing_weight_column_alone_is_no_unlabelled_file(tmp_path) -> None:
    """The unlabelled-file hint is for files without the labels; a file that has the label
    but lacks the weight column (`weight: weigth`, a typo) gets the typo hint instead."""
    schema = _schema_file(tmp_path, "weight: weigth\n" + SCHEMA_YAML)
    table = _user_table(4, 0).append_column("weight", pa.array([1.0] * 4))
    pq.write_table(table, tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) \['weigth'\]; the file has .*"
                                        r"\(a typo\? the file has 'weight' for the schema's "
                                        r"'weigth'"):
        TabularDataset(str(tmp_path / "a.parquet"), schema)
    pq.write_table(table.drop_columns(["clicked", "weight"]), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"missing column\(s\) \['clicked', 'weigth'\]; .*\(an "
                                        r"unlabelled file\?"):
        TabularDataset(str(tmp_path / "a.parquet"), schema)


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path) -> None:
    """`price` twice in a header (a join's output, say): which one is the feature? It was
    silently the first; Parquet refuses such a file, and so does CSV now. A duplicate the
    schema does not read is ignored."""
    schema = _schema_file(tmp_path, CSV_SCHEMA_YAML)
    (tmp_path / "a.csv").write_text("clicked,user_id,item_id,tag_list,price,price\n"
                                    "1,u,3,1|2,1.5,9.0\n")
    with pytest.raises(DataError, match=r"a.csv:1: header names column\(s\) \['price'\] more "
                                        r"than once; rename the copies"):
        TabularDataset(str(tmp_path / "a.csv"), schema, format="csv", header=True)
    (tmp_path / "a.csv").write_text("clicked,user_id,item_id,tag_list,price,x,x\n"
                                    "1,u,3,1|2,1.5,a,b\n")
    [batch] = list(TabularDataset(str(tmp_path / "a.csv"), schema, format="csv", header=True,
                                  num_workers=0))
    assert batch.dense_features[:, 0].tolist() == [-4.25]


def test_what_r_writes_a_quoted_header_reads_and_na_names_the_fix(tmp_path) -> None:
    """R's write.csv (and Excel, csv.QUOTE_ALL) quote every name and string: the header's
    names are unquoted as the rows' values are (they were compared with their quotes);
    R's NA for a missing value gets the fix (write it empty)."""
    schema = _schema_file(tmp_path, CSV_SCHEMA_YAML)
    text = ('"clicked","user_id","item_id","tag_list","price"\n'
            '1,"u1",3,"1|2",12.0\n0,"u2",4,"",{}\n')
    (tmp_path / "a.csv").write_text(text.format(""))
    [batch] = list(TabularDataset(str(tmp_path / "a.csv"), schema, format="csv", header=True,
                                  num_workers=0))
    assert batch.dense_features[:, 0].tolist() == [1.0, 0.0]  # (12 - 10) / 2; fill 10
    assert batch.sparse_features["tag_list"].lengths().tolist() == [2, 0]
    (tmp_path / "a.csv").write_text(text.format("NA"))
    with pytest.raises(DataError, match=r"a.csv:3: column 'price': 'NA' is not a number \(a "
                                        r"missing value\? write it empty, e.g. R's "
                                        r"write.csv\(..., na = \"\"\)"):
        list(TabularDataset(str(tmp_path / "a.csv"), schema, format="csv", header=True,
                            num_workers=0))


def test_a_bad_value_after_a_quoted_delimiter_is_named_as_itself(tmp_path) -> None:
    """A quoted value holding the delimiter ("Smith, J") is one field: a bad value later
    on the line is named, not a wrong column count."""
    schema = _schema_file(tmp_path, CSV_SCHEMA_YAML)
    (tmp_path / "a.csv").write_text('clicked,user_id,item_id,tag_list,price\n'
                                    '1,"Smith, J",3,1|2,12.0\n0,"Doe, A",4,,cheap\n')
    with pytest.raises(DataError, match=r"a.csv:3: column 'price': 'cheap' is not a number"):
        list(TabularDataset(str(tmp_path / "a.csv"), schema, format="csv", header=True,
                            num_workers=0))
