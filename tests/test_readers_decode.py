"""Tests of the readers' fast decode paths: whole-column hex parsing and hashing, ids
taken straight from the Arrow buffers, batches cut across decoded blocks, and the
decoding threads' lower priority. Each checks the result against plain Python."""

from __future__ import annotations

import os
import random
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recframe.readers import DataError, TabularDataset, criteo_tsv
from recframe.schema import (
    FeatureSchema,
    IdMapping,
    SparseColumn,
    TableSpec,
    fnv1a64,
    hash_strings,
    parse_hex,
)

M64 = (1 << 64) - 1


def _fnv(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & M64
    return h


def _layout(words: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.array([len(w) for w in words], dtype=np.int64)
    starts = np.zeros(len(words), dtype=np.int64)
    starts[1:] = np.cumsum(lengths)[:-1]
    return np.frombuffer(b"".join(words) + b"!", dtype=np.uint8), starts, lengths


@pytest.mark.parametrize("width", [1, 3, 8, 15, 16])
def test_parse_hex_one_width_matches_int(width: int) -> None:
    """Strings of one width laid end to end (the whole-matrix path), a bad digit in
    each position among them."""
    rng = random.Random(width)
    words = [bytes(rng.choice(b"0123456789abcdefABCDEF") for _ in range(width))
             for _ in range(50)]
    for i in range(width):  # a bad character at every digit position
        words[3 * i] = words[3 * i][:i] + b"g:/G@`"[i % 6:i % 6 + 1] + words[3 * i][i + 1:]
    value, ok = parse_hex(*_layout(words))
    for w, v, good in zip(words, value.tolist(), ok.tolist()):
        try:
            expected = int(w, 16)
        except ValueError:
            expected = None
        assert good == (expected is not None), w
        if good:
            assert v == expected, w
    assert value.dtype == np.uint64


def test_parse_hex_and_fnv_on_strings_out_of_order() -> None:
    """Starts not laid end to end and mixed lengths take the per-digit path: the same."""
    words = [b"ff", b"0123456789abcdef", b"", b"7", b"DEADBEEF", b"1" * 17, b"ab"]
    data, starts, lengths = _layout(words)
    order = np.array([4, 0, 6, 2, 1, 5, 3])
    value, ok = parse_hex(data, starts[order], lengths[order])
    assert ok.tolist() == [True, True, True, False, True, False, True]
    assert [int(v) for v, g in zip(value, ok) if g] == [
        int(words[i], 16) for i in order if 0 < len(words[i]) <= 16]
    got = fnv1a64(data, starts[order], lengths[order])
    assert [int(x) for x in got] == [_fnv(words[i]) for i in order]
    assert fnv1a64(data, starts[:0], lengths[:0]).shape == (0,)


def _schema() -> FeatureSchema:
    sparse = [
        SparseColumn("small", mapping=IdMapping("modulo")),       # int32 with nulls
        SparseColumn("parsed", mapping=IdMapping("hex")),         # int64 (converted)
        SparseColumn("hexes", mapping=IdMapping("hex")),          # strings, one width
        SparseColumn("ragged", mapping=IdMapping("hex")),         # strings, mixed widths
        SparseColumn("big", mapping=IdMapping("modulo")),         # uint64
        SparseColumn("bag", table="small"),                        # a list column
        SparseColumn("user", mapping=IdMapping("hash", salt=3)),  # hashed strings
    ]
    tables = [TableSpec(n, rows, 4) for n, rows in
              [("small", 7), ("parsed", 11), ("hexes", 13), ("ragged", 17), ("big", 19),
               ("user", 23)]]
    return FeatureSchema(labels=["y"], dense=[], sparse=sparse, tables=tables)


def _columns(n: int, seed: int) -> dict[str, list]:
    rng = random.Random(seed)

    def maybe(v):
        return None if rng.random() < 0.2 else v

    return {
        "y": [float(rng.randint(0, 1)) for _ in range(n)],
        "small": [maybe(rng.randint(-50, 50)) for _ in range(n)],
        "parsed": [maybe(rng.getrandbits(64) - (1 << 63)) for _ in range(n)],
        "hexes": [rng.choice([None, "", f"{rng.getrandbits(32):08x}"]) for _ in range(n)],
        "ragged": [maybe(f"{rng.getrandbits(rng.randint(1, 64)):x}") for _ in range(n)],
        "big": [maybe(rng.getrandbits(64)) for _ in range(n)],
        "bag": [maybe([rng.randint(0, 99) for _ in range(rng.randint(0, 3))])
                for _ in range(n)],
        "user": [maybe(rng.choice(["a", "bob", "ünï", "x" * 40])) for _ in range(n)],
    }


def _expected(cols: dict[str, list]) -> list[tuple]:
    def one(v, f):
        return () if v is None or v == "" else (f(v),)

    rows = []
    for i in range(len(cols["y"])):
        ids = (
            one(cols["small"][i], lambda v: v % 7),
            one(cols["parsed"][i], lambda v: (v & M64) % 11),
            one(cols["hexes"][i], lambda v: int(v, 16) % 13),
            one(cols["ragged"][i], lambda v: int(v, 16) % 17),
            one(cols["big"][i], lambda v: v % 19),
            tuple(v % 7 for v in cols["bag"][i] or ()),
            one(cols["user"][i], lambda v: int(hash_strings([v], 3)[0]) % 23),
        )
        rows.append((cols["y"][i], ids))
    return rows


def _rows(batches) -> list[tuple]:
    out = []
    for b in batches:
        n = b.labels.shape[0]
        per_key = [(v.lengths().tolist(), v.values().tolist())
                   for v in b.sparse_features.to_dict().values()]
        for i in range(n):
            ids = []
            for lengths, values in per_key:
                start = sum(lengths[:i])
                ids.append(tuple(values[start:start + lengths[i]]))
            out.append((b.labels[i].item(), tuple(ids)))
    return out


@pytest.mark.parametrize("batch_size,workers", [(5, 0), (64, 2), (1000, 1)])
def test_every_id_path_across_row_groups(tmp_path, batch_size: int, workers: int) -> None:
    """Every sparse path (Arrow buffers, hex of one and of mixed widths, uint64, lists,
    hash) with nulls, in row groups of 7 rows so that batches straddle decoded blocks
    and files: each sample's ids equal plain Python's."""
    types = {"small": pa.int32(), "parsed": pa.int64(), "big": pa.uint64(),
             "bag": pa.list_(pa.int64())}
    parts = [_columns(n, seed) for seed, n in enumerate([40, 3, 29])]
    d = tmp_path / "pq"
    d.mkdir()
    for i, cols in enumerate(parts):
        table = pa.table({k: pa.array(v, types.get(k)) for k, v in cols.items()})
        pq.write_table(table, d / f"part-{i}.parquet", row_group_size=7)
    ds = TabularDataset(str(d), _schema(), batch_size=batch_size, num_workers=workers)
    expected = [r for cols in parts for r in _expected(cols)]
    assert _rows(list(ds)) == expected
    assert _rows(list(ds)) == expected  # a second epoch


def test_bad_digit_in_a_one_width_hex_column_names_line_and_column(tmp_path) -> None:
    lines = ["1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0000abcd"] * 26)] * 5
    fields = lines[3].split("\t")
    fields[14 + 6] = "0000zz00"  # as wide as the others
    lines[3] = "\t".join(fields)
    path = tmp_path / "day_0"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"day_0:4: column 'cat_6': id '0000zz00' is not "
                                        "a hexadecimal id"):
        list(criteo_tsv(str(path), batch_size=2))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice: Linux")
def test_decoding_threads_run_at_a_lower_priority(tmp_path) -> None:
    """The decoding threads (and only they) run ``worker_nice`` levels nicer, so the
    training threads keep their cores; 0 keeps the caller's priority."""
    line = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0000abcd"] * 26)
    path = tmp_path / "day_0"
    path.write_text((line + "\n") * 400)
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def decode_nices(nice: int) -> list[int]:
        ds = criteo_tsv(str(path), batch_size=8, num_workers=2, block_size=1024,
                        worker_nice=nice)
        before = set(threading.enumerate())  # other tests' readers may still run
        it = iter(ds)
        next(it)
        found = [os.getpriority(os.PRIO_PROCESS, t.native_id) for t in threading.enumerate()
                 if t not in before and t.native_id is not None]
        it.close()
        return found

    assert decode_nices(5) and set(decode_nices(5)) == {min(19, base + 5)}
    assert set(decode_nices(0)) == {base}
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    with pytest.raises(ValueError, match="worker_nice"):
        criteo_tsv(str(path), worker_nice=-1)


def test_decode_cpu_seconds_counts_the_tasks(tmp_path) -> None:
    line = "1\t" + "\t".join(["3"] * 13) + "\t" + "\t".join(["0000abcd"] * 26)
    path = tmp_path / "day_0"
    path.write_text((line + "\n") * 300)
    for workers in (0, 2):
        ds = criteo_tsv(str(path), batch_size=64, num_workers=workers, block_size=4096)
        assert ds.decode_cpu_seconds == 0.0
        assert sum(b.labels.shape[0] for b in ds) == 300
        first = ds.decode_cpu_seconds
        assert first > 0.0
        list(ds)
        assert ds.decode_cpu_seconds > first


@pytest.mark.parametrize("width", [2, 4, 6, 8, 10, 12, 14, 16])
def test_parse_hex_every_byte_at_every_position(width: int) -> None:
    """Both uniform-width paths, the 8/16-digit one (SWAR on 64-bit words, no table) and
    the digit-pair table (other even widths): each of the 256 byte values at each digit
    position is accepted exactly when it is a hex digit, and parses as
    ``int(text, 16)``."""
    base = b"0123456789aBcDeF"[:width]
    words = [base[:i] + bytes([c]) + base[i + 1:] for i in range(width) for c in range(256)]
    value, ok = parse_hex(*_layout(words))
    digits = set(b"0123456789abcdefABCDEF")
    for w, v, good in zip(words, value.tolist(), ok.tolist()):
        assert good == all(c in digits for c in w), w
        if good:
            assert v == int(w, 16), w


def test_hex_column_fast_path_matches_python_with_bytes_under_nulls() -> None:
    """`_sparse` of a hex string column straight from its Arrow buffers: empty ids and
    nulls give empty bags; a null slot that still holds bytes (legal Arrow), mixed
    widths and 16 upper-case digits all give ``int(id, 16) mod rows``."""
    from recframe.readers import _sparse

    def check(arr: pa.Array, texts: list) -> None:
        rows, lengths = _sparse(SparseColumn("c", mapping=IdMapping("hex")), 1009, arr)
        keep = [t for t in texts if t]
        assert lengths.tolist() == [1 if t else 0 for t in texts]
        assert rows.tolist() == [int(t, 16) % 1009 for t in keep]

    texts = ["0000abcd", "", None, "FFFFffff", "12345678", ""]
    check(pa.array(texts, pa.string()), texts)
    check(pa.array(texts, pa.large_string()), texts)
    check(pa.array(texts, pa.string()).slice(1), texts[1:])
    wide = ["FEDCBA9876543210", None, "", "0123456789ABCDEF"]
    check(pa.array(wide, pa.string()), wide)
    ragged = ["abc", "", "0000abcd", None, "1"]
    check(pa.array(ragged, pa.string()), ragged)
    # slot 1 is null but its offsets span 8 bytes: those bytes are not an id
    data = b"0000abcd" + b"deadbeef" + b"12345678"
    offsets = np.array([0, 8, 16, 24], dtype=np.int32)
    validity = np.packbits([1, 0, 1], bitorder="little")
    arr = pa.Array.from_buffers(pa.string(), 3, [pa.py_buffer(validity.tobytes()),
                                                 pa.py_buffer(offsets.tobytes()),
                                                 pa.py_buffer(data)], null_count=1)
    check(arr, ["0000abcd", None, "12345678"])
