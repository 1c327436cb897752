"""`convert_to_parquet` / `recframe data convert --compression`: the codec choice, no
dictionary pages for integer id columns, whole row groups from small input blocks; and
the readers read Parquet files written with any codec."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_readers import criteo_lines, rows_of, same_batches, write

from recframe import cli
from recframe.readers import (
    PARQUET_COMPRESSIONS,
    TabularDataset,
    convert_to_parquet,
    criteo_tsv,
)
from recframe.schema import FeatureSchema


def _codecs(path) -> set[str]:
    meta = pq.ParquetFile(path).metadata
    return {meta.row_group(g).column(c).compression for g in range(meta.num_row_groups)
            for c in range(meta.num_columns)}


@pytest.mark.parametrize("codec", PARQUET_COMPRESSIONS)
def test_cli_compression_choice_writes_that_codec_and_reads_back(tmp_path, codec) -> None:
    raw = write(tmp_path / "day_0", criteo_lines(150, seed=4))
    out = tmp_path / "pq"
    assert cli.main(["data", "convert", raw, "--criteo", "--output", str(out),
                     "--compression", codec, "--no_progress"]) == 0
    part = out / "part-00000.parquet"
    assert _codecs(part) == {"UNCOMPRESSED" if codec == "none" else
                             codec.upper()}
    same_batches(list(criteo_tsv(raw, batch_size=32)),
                 list(TabularDataset(str(out), FeatureSchema.criteo(), batch_size=32)))


def test_default_codec_is_lz4_and_a_bad_one_is_refused(tmp_path, capsys) -> None:
    raw = write(tmp_path / "day_0", criteo_lines(20, seed=5))
    convert_to_parquet(criteo_tsv(raw), str(tmp_path / "a"), progress=False)
    assert _codecs(tmp_path / "a" / "part-00000.parquet") == {"LZ4"}
    with pytest.raises(ValueError, match=r"compression must be one of \('lz4', 'zstd'"):
        convert_to_parquet(criteo_tsv(raw), str(tmp_path / "b"), compression="lzma")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["data", "convert", raw, "--criteo", "--output", str(tmp_path / "c"),
                  "--compression", "lzma"])
    assert exit_.value.code == 2 and "invalid choice: 'lzma'" in capsys.readouterr().err


def test_id_columns_have_no_dictionary_pages_the_others_do(tmp_path) -> None:
    """Ids are mostly distinct: a dictionary page only costs; labels and counts repeat."""
    raw = write(tmp_path / "day_0", criteo_lines(300, seed=6))
    convert_to_parquet(criteo_tsv(raw), str(tmp_path / "pq"), progress=False)
    meta = pq.ParquetFile(tmp_path / "pq" / "part-00000.parquet").metadata
    rg = meta.row_group(0)
    dictionary = {rg.column(c).path_in_schema: rg.column(c).has_dictionary_page
                  for c in range(meta.num_columns)}
    assert dictionary["label"] and dictionary["int_0"]
    assert not any(v for k, v in dictionary.items() if k.startswith("cat_"))


def test_small_input_blocks_make_whole_row_groups(tmp_path) -> None:
    """Row groups hold ``row_group_size`` rows even when the input comes in smaller
    blocks (a 1 KiB block holds a few Criteo lines); parts end at ``rows_per_file``."""
    raw = write(tmp_path / "day_0", criteo_lines(500, seed=7))
    source = criteo_tsv(raw, block_size=1024, num_workers=0)
    parts = convert_to_parquet(source, str(tmp_path / "pq"), rows_per_file=200,
                               row_group_size=64, progress=False)
    sizes = []
    for p in parts:
        meta = pq.ParquetFile(p.removeprefix("file://")).metadata
        sizes.append([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    assert sizes == [[64, 64, 64, 8], [64, 64, 64, 8], [64, 36]]
    same_batches(list(criteo_tsv(raw, batch_size=50)),
                 list(TabularDataset(str(tmp_path / "pq"), FeatureSchema.criteo(),
                                     batch_size=50)))


@pytest.mark.parametrize("codec", ["zstd", "lz4", "snappy", "none", "gzip", "brotli"])
@pytest.mark.parametrize("dictionary", [True, False])
def test_readers_read_any_codec(tmp_path, codec, dictionary) -> None:
    raw = write(tmp_path / "day_0", criteo_lines(100, seed=8))
    reference = list(criteo_tsv(raw, batch_size=16))
    table = pa.concat_tables(criteo_tsv(raw).raw_tables())
    pq.write_table(table, tmp_path / "x.parquet", compression=codec,
                   use_dictionary=dictionary, row_group_size=30)
    got = list(TabularDataset(str(tmp_path / "x.parquet"), FeatureSchema.criteo(),
                              batch_size=16))
    assert rows_of(got) == rows_of(reference)


@pytest.mark.parametrize("long_at", [0, 130, 299])
def test_hex_ids_are_uint32_until_a_longer_one_starts_an_int64_part(tmp_path,
                                                                    long_at) -> None:
    """Hex ids of up to 8 digits are stored as uint32 (half the bytes of int64); a
    12-digit id (first line, mid-file in a row group of many input blocks, last line)
    needs 64 bits: the part it falls in starts over as int64 (later uint32 blocks are
    widened into it). Every row reads back as from the TSV."""
    lines = criteo_lines(300, seed=9)
    fields = lines[long_at].split("\t")
    fields[17] = "abcdef012345"  # cat_3
    lines[long_at] = "\t".join(fields)
    raw = write(tmp_path / "day_0", lines)
    parts = convert_to_parquet(criteo_tsv(raw, block_size=1024, num_workers=0),
                               str(tmp_path / "pq"), rows_per_file=1000,
                               row_group_size=64, progress=False)
    types = [pq.read_schema(p.removeprefix("file://")).field("cat_3").type for p in parts]
    assert types[-1] == pa.int64() and (types[0] == pa.uint32()) == (long_at > 0)
    assert all(pq.read_schema(p.removeprefix("file://")).field("cat_4").type == pa.uint32()
               for p in parts)
    same_batches(list(criteo_tsv(raw, batch_size=50)),
                 list(TabularDataset(str(tmp_path / "pq"), FeatureSchema.criteo(),
                                     batch_size=50)))
