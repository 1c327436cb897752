"""`recframe data convert` (Criteo TSV and a user schema to Parquet) and `recframe train
--data parquet --schema ...` from the command line."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from test_readers import SCHEMA_YAML, criteo_lines, rows_of, same_batches, write

from recframe import cli
from recframe.readers import TabularDataset, criteo_tsv
from recframe.schema import FeatureSchema

QUIET = ["--disable_tqdm", "true", "--report_to", "none", "--log_steps", "1000"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_convert_criteo_then_train_on_parquet(tmp_path, capsys) -> None:
    lines = criteo_lines(500, seed=21)
    raw = tmp_path / "raw"
    raw.mkdir()
    write(raw / "day_0", lines[:300], eol="\r\n")
    write(raw / "day_1.gz", lines[300:])
    (raw / "fetch.sh").write_text("echo\n")
    out = tmp_path / "pq"
    assert cli.main(["data", "convert", str(raw), "--criteo", "--output", str(out),
                     "--rows_per_file", "200", "--row_group_size", "64", "--no_progress"]) == 0
    parts = sorted(out.glob("*.parquet"))
    assert [pq.ParquetFile(p).metadata.num_rows for p in parts] == [200, 200, 100]
    assert pq.ParquetFile(parts[0]).metadata.num_row_groups == 4
    assert str(pq.read_schema(parts[0]).field("cat_0").type) == "uint32"  # hex ids parsed: 8 digits
    schema = FeatureSchema.from_file(str(out / "schema.yaml"))
    assert schema == FeatureSchema.criteo()
    # the Parquet parts decode to the same batches as the TSV files
    same_batches(list(criteo_tsv(str(raw), batch_size=64)),
                 list(TabularDataset(str(out), schema, batch_size=64)))
    # a second convert into the same directory is refused (nothing is overwritten)
    assert cli.main(["data", "convert", str(raw), "--criteo", "--output", str(out),
                     "--no_progress"]) == 1
    assert "already holds Parquet" in capsys.readouterr().err

    # train from the Parquet directory with the schema, from the command line
    small = tmp_path / "schema.yaml"
    small.write_text(
        (out / "schema.yaml").read_text().replace("num_embeddings: 10000", "num_embeddings: 50")
        .replace("embedding_dim: 16", "embedding_dim: 4"))
    code = cli.main(["train", "--data", "parquet", "--schema", str(small), "--train_path",
                     str(out), "--eval_path", str(parts[-1]), "--batch_size", "64",
                     "--train_steps", "5", "--output_dir", str(tmp_path / "run"),
                     "--sparse_backend", "sparse_grad", "--data_workers", "1"] + QUIET)
    assert code == 0
    final = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("final eval")]
    assert final and json.loads(final[0].split(": ", 1)[1])["num_samples"] == 100


def test_convert_a_user_schema_with_header_and_train_csv(tmp_path, capsys) -> None:
    schema_path = tmp_path / "schema.yaml"
    schema_path.write_text(SCHEMA_YAML)
    rows = ["click,w,price,user,item,tags"] + [
        f"{i % 2},1,{i},u{i % 7},{i % 11},{i % 3}|{i % 5}" for i in range(120)]
    (tmp_path / "a.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "pq"
    assert cli.main(["data", "convert", str(tmp_path / "a.csv"), "--schema", str(schema_path),
                     "--format", "csv", "--header", "--output", str(out), "--no_progress"]) == 0
    csv = TabularDataset(str(tmp_path / "a.csv"), str(schema_path), format="csv", header=True,
                         batch_size=32)
    par = TabularDataset(str(out), str(out / "schema.yaml"), batch_size=32)
    assert rows_of(list(csv)) == rows_of(list(par))
    code = cli.main(["train", "--data", "csv", "--header", "--schema", str(schema_path),
                     "--train_path", str(tmp_path / "a.csv"), "--model", "deepfm",
                     "--batch_size", "32", "--train_steps", "3", "--output_dir",
                     str(tmp_path / "run"), "--sparse_backend", "sparse_grad"] + QUIET)
    assert code == 0


def test_convert_names_the_bad_line(tmp_path, capsys) -> None:
    lines = criteo_lines(20, seed=2)
    lines[12] = "1\t2"
    write(tmp_path / "bad.tsv", lines)
    code = cli.main(["data", "convert", str(tmp_path / "bad.tsv"), "--criteo", "--output",
                     str(tmp_path / "out"), "--no_progress"])
    assert code == 1
    assert "bad.tsv:13: expected 40 columns" in capsys.readouterr().err


def test_train_file_data_needs_a_schema(tmp_path, capsys) -> None:
    code = cli.main(["train", "--data", "parquet", "--train_path", str(tmp_path),
                     "--output_dir", str(tmp_path / "o")] + QUIET)
    assert code == 2  # a usage error, one line
    assert "--schema" in capsys.readouterr().err
