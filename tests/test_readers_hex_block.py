"""The TSV text path's fast parts (issue 13, speed): single-valued hex id columns parsed
together (`_hex_block`, one lookup per digit pair), hex columns read as binary, the
newline scan. Each must give what plain Python (and the column-by-column path) gives on
mixed data: empty, short and upper-case ids, nulls holding bytes, invalid hex, bytes
that are not UTF-8, CRLF, a header, blank lines."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pyarrow as pa
import pytest

from recframe import readers
from recframe.data import CriteoTSVDataset
from recframe.readers import (
    DataError,
    _decode_columns,
    _newlines,
    _read_lines,
    criteo_tsv,
    decode_table,
)
from recframe.schema import FeatureSchema, IdMapping, SparseColumn, TableSpec

TYPES = [pa.string(), pa.binary(), pa.large_string(), pa.large_binary()]


def _hex_schema(nums: list[int]) -> FeatureSchema:
    return FeatureSchema(
        labels=["y"], dense=["x"],
        sparse=[SparseColumn(f"c{j}", mapping=IdMapping("hex")) for j in range(len(nums))],
        tables=[TableSpec(f"c{j}", num, 4) for j, num in enumerate(nums)])


def _hex_table(columns: list[list], kinds: list[pa.DataType]) -> pa.Table:
    n = len(columns[0])
    return pa.table({"y": pa.array([float(i % 2) for i in range(n)]),
                     "x": pa.array([float(i) for i in range(n)]),
                     **{f"c{j}": pa.array(col, kind)
                        for j, (col, kind) in enumerate(zip(columns, kinds))}})


def _python(columns: list[list], nums: list[int]) -> tuple[list[int], list[list[int]]]:
    values = [int(t, 16) % num for col, num in zip(columns, nums) for t in col if t]
    return values, [[1 if t else 0 for t in col] for col in columns]


def _spy(monkeypatch) -> list:
    """Records what `_hex_block` returned (None: it left the columns to the others)."""
    seen: list = []
    real = readers._hex_block

    def spy(*args):
        out = real(*args)
        seen.append(out)
        return out

    monkeypatch.setattr(readers, "_hex_block", spy)
    return seen


def _ids(rng: random.Random, width: int, n: int, empty: float = 0.2) -> list:
    out: list = []
    for _ in range(n):
        r = rng.random()
        if r < empty / 2:
            out.append(None)
        elif r < empty:
            out.append("")
        else:
            text = "".join(rng.choice("0123456789abcdefABCDEF") for _ in range(width))
            out.append(text)
    return out


@pytest.mark.parametrize("width", [2, 4, 6, 8, 10, 12, 14, 16])
@pytest.mark.parametrize("kind", TYPES, ids=str)
def test_one_width_columns_are_parsed_together_and_match_python(monkeypatch, width,
                                                                 kind) -> None:
    """Every even width, every text type, nulls and empty ids, upper case, tables of
    several sizes (one of 1, one beyond 2**32, one with a 2**63 - 1 rows)."""
    rng = random.Random(width)
    nums = [1_000_003, 1, (1 << 32) + 5, 7, (1 << 63) - 1]
    columns = [_ids(rng, width, 300) for _ in nums]
    table = _hex_table(columns, [kind] * len(nums))
    schema = _hex_schema(nums)
    ends = np.arange(1, 301, dtype=np.int64)
    seen = _spy(monkeypatch)
    for a, b in [(0, 300), (3, 250), (17, 18)]:  # sliced: an Arrow offset
        chunk = decode_table(table.slice(a, b - a), schema, True, 0, ends[a:b])
        values, lengths = _python([c[a:b] for c in columns], nums)
        assert chunk.values.dtype == np.int64 and chunk.values.tolist() == values
        assert chunk.lengths.tolist() == lengths
        ref = _decode_columns(table.slice(a, b - a), schema, True, 0, ends[a:b])
        assert np.array_equal(ref.values, chunk.values)
        assert np.array_equal(ref.lengths, chunk.lengths)
    assert seen and all(s is not None for s in seen)  # the block path did it


def test_mixed_widths_null_bytes_and_other_types_leave_the_block(monkeypatch) -> None:
    """Columns the block cannot take (mixed widths, an odd width, a null slot spanning
    bytes) still decode to Python's values through the column-by-column parse."""
    rng = random.Random(3)
    ragged = [rng.choice(["", None, "a", "0Bc", "1234abcd", "ffFF"]) for _ in range(200)]
    odd = _ids(rng, 7, 200)
    columns = [ragged, odd, _ids(rng, 8, 200)]
    nums = [1009, 1009, 1009]
    seen = _spy(monkeypatch)
    table = _hex_table(columns, [pa.binary(), pa.string(), pa.binary()])
    chunk = decode_table(table, _hex_schema(nums), True, 0, np.arange(200))
    values, lengths = _python(columns, nums)
    assert chunk.values.tolist() == values and chunk.lengths.tolist() == lengths
    assert seen == [None]
    # slot 1 is null but its offsets span 8 bytes: those bytes are not an id
    data = b"0000abcd" + b"deadbeef" + b"12345678"
    offsets = np.array([0, 8, 16, 24], dtype=np.int32)
    validity = np.packbits([1, 0, 1], bitorder="little")
    arr = pa.Array.from_buffers(pa.binary(), 3, [pa.py_buffer(validity.tobytes()),
                                                 pa.py_buffer(offsets.tobytes()),
                                                 pa.py_buffer(data)])
    table = pa.table({"y": [0.0, 1.0, 0.0], "x": [1.0, 2.0, 3.0], "c0": arr})
    chunk = decode_table(table, _hex_schema([1009]), True, 0, np.arange(3))
    assert chunk.values.tolist() == [0xABCD % 1009, 0x12345678 % 1009]
    assert chunk.lengths.tolist() == [[1, 0, 1]]


def test_an_integer_column_beside_hex_text_keeps_key_order() -> None:
    """Parsed ids (int64, as `data convert` writes them) between hex text columns: the
    KJT's values stay key-major."""
    schema = FeatureSchema(labels=["y"], dense=["x"], sparse=[
        SparseColumn("c0", mapping=IdMapping("hex")), SparseColumn("m"),
        SparseColumn("c1", mapping=IdMapping("hex"))],
        tables=[TableSpec("c0", 101, 4), TableSpec("m", 13, 4), TableSpec("c1", 103, 4)])
    rng = random.Random(5)
    c0, c1 = _ids(rng, 8, 50), _ids(rng, 8, 50)
    m = [rng.randint(-50, 50) for _ in range(50)]
    table = pa.table({"y": [0.0] * 50, "x": [1.0] * 50, "c0": pa.array(c0, pa.binary()),
                      "m": pa.array(m), "c1": pa.array(c1, pa.binary())})
    chunk = decode_table(table, schema, True, 0, np.arange(50))
    want = ([int(t, 16) % 101 for t in c0 if t] + [v % 13 for v in m]
            + [int(t, 16) % 103 for t in c1 if t])
    assert chunk.values.tolist() == want


def test_newlines_match_flatnonzero() -> None:
    rng = np.random.default_rng(0)
    for n in [0, 1, 7, 8, 9, 63, 64, 65, 1000]:
        for p in [0.0, 0.05, 0.5, 1.0]:
            buf = np.where(rng.random(n) < p, 10, rng.integers(0, 256, n)).astype(np.uint8)
            assert _newlines(buf).tolist() == np.flatnonzero(buf == 10).tolist()
    buf = np.frombuffer(b"\n\nab\ncd\n\n", np.uint8)[1:]  # not 8-byte aligned
    assert _newlines(buf).tolist() == [0, 3, 6, 7]


def _criteo_line(rng: random.Random, i: int) -> str:
    ints = [rng.choice(["", "0", "-1", "-7", "3", "12345"]) for _ in range(13)]
    cats = [rng.choice(["", "0000abcd", "DEADBEEF", "1a2B3c4D", f"{rng.getrandbits(32):08x}"])
            for _ in range(26)]
    if i % 7 == 0:  # Criteo's own ids are 8 digits; other files may differ
        cats[i % 26] = rng.choice(["ab", "0", "FFFFFFFFFFFFFFFF", "123"])
    return "\t".join([str(i % 2)] + ints + cats)


def _expected(lines: list[str], num: int) -> tuple[list, list, list]:
    labels, dense, ids = [], [], []
    for line in lines:
        f = line.split("\t")
        labels.append(float(f[0]))
        dense.append([math.log1p(max(float(x or 0), 0.0)) for x in f[1:14]])
        ids.append([int(t, 16) % num if t else None for t in f[14:]])
    return labels, dense, ids


def _rows(batches) -> tuple[list, list, list]:
    labels, dense, ids = [], [], []
    for b in batches:
        labels += b.labels.tolist()
        dense += b.dense_features.tolist()
        kjt = b.sparse_features
        per = [j.to_dense() for j in kjt.to_dict().values()]
        for r in range(len(b.labels)):
            ids.append([int(p[r][0]) if len(p[r]) else None for p in per])
    return labels, dense, ids


@pytest.mark.parametrize("crlf", [False, True])
@pytest.mark.parametrize("header", [False, True])
def test_tsv_with_mixed_ids_matches_python(tmp_path, crlf, header) -> None:
    """A TSV file with empty, short, long and upper-case ids, negative and empty counts,
    CRLF line ends, a header and blank lines, read in small blocks by 2 threads: the
    values of plain Python (and of `CriteoTSVDataset` where it reads the file)."""
    rng = random.Random(int(crlf) * 2 + int(header))
    lines = [_criteo_line(rng, i) for i in range(300)]
    end = "\r\n" if crlf else "\n"
    text = end.join(lines[:100]) + end + end + end.join(lines[100:]) + end
    names = ["label"] + [f"int_{i}" for i in range(13)] + [f"cat_{i}" for i in range(26)]
    path = tmp_path / "day_0"
    path.write_bytes((("\t".join(names) + end) if header else "").encode() + text.encode())
    ds = criteo_tsv(str(path), num_embeddings=1009, header=header, batch_size=64,
                    block_size=4096, num_workers=2)
    labels, dense, ids = _rows(ds)
    want = _expected(lines, 1009)
    assert labels == want[0] and ids == want[2]
    assert np.allclose(dense, want[1], rtol=1e-6)
    if not header and not crlf:
        old = _rows(CriteoTSVDataset([str(path)], batch_size=64, num_embeddings=1009))
        assert old[0] == labels and old[2] == ids
        assert np.array_equal(np.array(old[1], np.float32), np.array(dense, np.float32))


def test_bad_id_in_a_block_of_one_width_names_line_and_column(tmp_path) -> None:
    rng = random.Random(9)
    lines = [_criteo_line(rng, i * 7 + 1) for i in range(40)]
    fields = lines[33].split("\t")
    fields[14 + 4] = "00g0abcd"
    lines[33] = "\t".join(fields)
    path = tmp_path / "day_0"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"day_0:34: column 'cat_4': id '00g0abcd' is not a "
                                        "hexadecimal id of 1-16 digits$"):
        list(criteo_tsv(str(path), batch_size=8))


def test_an_id_that_is_not_utf8_names_line_and_column(tmp_path) -> None:
    """Hex ids are read as bytes (no UTF-8 check in the CSV parse): a latin-1 byte in
    one is a bad id whose message still says to re-encode the file."""
    rng = random.Random(10)
    lines = [_criteo_line(rng, i * 7 + 1).encode() for i in range(20)]
    fields = lines[12].split(b"\t")
    fields[14 + 25] = b"caf\xe9"
    lines[12] = b"\t".join(fields)
    path = tmp_path / "day_0"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"day_0:13: column 'cat_25': id 'caf\ufffd' is not a "
                                        r"hexadecimal id of 1-16 digits: invalid UTF8 data "
                                        r"\(re-encode the file as UTF-8"):
        list(criteo_tsv(str(path), batch_size=8))


def test_raw_tables_keep_hex_ids_as_strings_with_nulls(tmp_path) -> None:
    """`raw_tables` (what ``data convert`` writes) gives hex ids as text, an empty id as
    null, whatever type the parse reads them as."""
    rng = random.Random(11)
    lines = [_criteo_line(rng, i) for i in range(50)]
    path = tmp_path / "day_0"
    path.write_text("\n".join(lines) + "\n")
    table = pa.concat_tables(list(criteo_tsv(str(path)).raw_tables()))
    for j in range(26):
        column = table.column(f"cat_{j}")
        want = [line.split("\t")[14 + j] or None for line in lines]
        assert column.type == pa.string() and column.to_pylist() == want
    assert table.column("int_0").type == pa.float64()


class _Trickle(io.RawIOBase):
    """A stream whose ``readinto`` returns at most 7 bytes a call (legal for a raw
    stream), with ``readline``: `_read_lines` must keep reading to the block size."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(7, len(b), len(self._data) - self._pos)
        b[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n

    def readline(self, size: int = -1) -> bytes:
        end = self._data.find(b"\n", self._pos)
        end = len(self._data) if end < 0 else end + 1
        out, self._pos = self._data[self._pos:end], end
        return out


class _NoReadinto:
    def __init__(self, data: bytes) -> None:
        self._h = io.BytesIO(data)
        self.read, self.readline = self._h.read, self._h.readline


@pytest.mark.parametrize("stream", [io.BytesIO, _Trickle, _NoReadinto])
def test_read_lines_gives_whole_lines_of_about_the_block_size(stream) -> None:
    """What a compressed file's blocks are cut with: ``size`` bytes and the rest of the
    line they end in, whatever the stream's ``readinto`` returns (or without one)."""
    data = b"".join(b"%d\t%s\n" % (i, b"x" * (i % 13)) for i in range(200)) + b"last"
    for size in (1, 5, 64, 100, 1000, 10_000):
        h, blocks = stream(data), []
        while True:
            block = _read_lines(h, size)
            if not block:
                break
            blocks.append(bytes(block))
        assert b"".join(blocks) == data
        # each block but the last: `size` bytes, then up to the end of the line
        assert all(b.endswith(b"\n") and len(b) >= size for b in blocks[:-1])
        assert all(b.rfind(b"\n", 0, len(b) - 1) < size - 1 for b in blocks[:-1])


@pytest.mark.parametrize("compress", [False, True])
def test_blocks_cut_at_every_offset_read_every_line_once(tmp_path, compress) -> None:
    """Block edges at many offsets (inside a line, on its newline, right after it), in a
    plain file (byte ranges) and a gzip file (a stream): every line once, in order."""
    import gzip

    rng = random.Random(12)
    lines = [_criteo_line(rng, i) for i in range(120)]
    raw = ("\n".join(lines) + "\n").encode()
    path = tmp_path / ("day_0.gz" if compress else "day_0")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    want = _expected(lines, 1009)
    for block_size in (1024, 1025, 1031, 1500, 4096):
        ds = criteo_tsv(str(path), num_embeddings=1009, batch_size=32,
                        block_size=block_size, num_workers=0)
        labels, dense, ids = _rows(ds)
        assert labels == want[0] and ids == want[2], block_size
