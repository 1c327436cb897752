"""Attack review of issue 13's reader changes (uint32 hex ids, the allocator,
``inline_threads``): paths probed (its two allocator findings are in
test_readers_allocator.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_readers import criteo_lines, same_batches

from recframe.readers import TabularDataset, _decode_columns, criteo_tsv, decode_table
from recframe.schema import DynamicSpec, FeatureSchema, IdMapping, SparseColumn, TableSpec

# --------------------------------------------------------------------------- paths probed


def test_narrow_integer_id_columns_of_a_users_parquet_read_as_int64_ones(tmp_path) -> None:
    """A user's Parquet with id columns narrower than int64 (read straight from their
    buffers now, no cast to int64): negative int8 modulo ids map by Python's modulo,
    uint16 and uint32 ids as they are, a uint32 dynamic column keeps its raw ids; every
    batch equals that of the same file with int64 columns."""
    schema = FeatureSchema(labels=["y"], dense=["x"], sparse=[
        SparseColumn("m8", mapping=IdMapping("modulo")),
        SparseColumn("m16", mapping=IdMapping("modulo"), table="m8"),
        SparseColumn("h32", mapping=IdMapping("hex")),
        SparseColumn("dyn", mapping=IdMapping("dynamic", dynamic=DynamicSpec()))],
        tables=[TableSpec("m8", 7, 4), TableSpec("h32", 1000, 4), TableSpec("dyn", 50, 4)])
    rng = np.random.default_rng(5)
    n = 300
    cols = {"m8": (rng.integers(-128, 128, n), pa.int8()),
            "m16": (rng.integers(0, 1 << 16, n), pa.uint16()),
            "h32": (rng.integers(0, 1 << 32, n), pa.uint32()),
            "dyn": (rng.integers(0, 1 << 32, n), pa.uint32())}
    for name, wide in (("narrow", False), ("wide", True)):
        pq.write_table(pa.table({
            "y": pa.array(rng.integers(0, 2, n).astype(float)) if name == "narrow"
            else pq.read_table(tmp_path / "narrow.parquet").column("y"),
            "x": pa.array(np.arange(n, dtype=float)),
            **{k: pa.array(v, pa.int64() if wide else t, mask=(np.arange(n) % 7 == 3))
               for k, (v, t) in cols.items()}}), tmp_path / f"{name}.parquet",
            row_group_size=64)
    read = [list(TabularDataset(str(tmp_path / f"{name}.parquet"), schema, batch_size=50,
                                num_workers=0)) for name in ("narrow", "wide")]
    same_batches(*read)
    kjt = read[0][0].sparse_features
    m8 = kjt["m8"].values().tolist()
    assert m8 == [int(v) % 7 for i, v in enumerate(cols["m8"][0][:50]) if i % 7 != 3]
    assert kjt["dyn"].values().tolist() == [
        int(v) for i, v in enumerate(cols["dyn"][0][:50]) if i % 7 != 3]


def test_a_crlf_split_across_threaded_parse_pieces(tmp_path, monkeypatch) -> None:
    """A CRLF file whose block is parsed in two pieces with the piece boundary between
    a line's CR and its LF (the LF starts the second piece): the same batches as a
    one-thread parse, and a resumed position gives the rest."""
    monkeypatch.setattr(pa, "cpu_count", lambda: 2)
    lines = criteo_lines(16000, seed=8)
    for pad in range(400):  # widen the first line until the boundary falls on a CR
        first = lines[0].split("\t")
        first[1] = "0" * pad + (first[1] or "0")
        data = ("\r\n".join(["\t".join(first), *lines[1:]]) + "\r\n").encode()
        piece = max(len(data) // 2, 1 << 20) + 1  # `_text_table`'s threaded piece
        if data[piece - 1:piece + 1] == b"\r\n":
            break
    else:  # pragma: no cover - the lines above have one
        pytest.fail("no padding puts a CR at the piece boundary")
    path = tmp_path / "crlf.tsv"
    path.write_bytes(data)

    def read(**kw):
        return criteo_tsv(str(path), batch_size=256, block_size=4 << 20, num_workers=0, **kw)

    one = list(read(inline_threads=False))
    same_batches(one, list(read()))
    ds = read()
    it = iter(ds)
    head = [next(it) for _ in range(20)]
    state = ds.state_dict()
    it.close()
    rest = read()
    rest.load_state_dict(state)
    same_batches(one, head + list(rest))


@pytest.mark.parametrize("rows", [(1 << 31) - 1, 1 << 31, (1 << 32) - 1, (1 << 32) + 5])
@pytest.mark.parametrize("width", [6, 8, 12])
def test_hex_text_ids_map_to_the_same_rows_at_the_32_bit_edges(rows, width) -> None:
    """Hex ids as text parsed together (`_hex_block`): int32 rows only for ids of up to 8
    digits into tables below 2**31 rows, each row ``int(id, 16) % rows`` (ids 0 and
    all-f among them), as the column-by-column path gives; a second table's column in
    the same block."""
    schema = FeatureSchema(labels=["y"], dense=["x"], sparse=[
        SparseColumn("a", mapping=IdMapping("hex")),
        SparseColumn("b", mapping=IdMapping("hex"), table="t")],
        tables=[TableSpec("a", rows, 4), TableSpec("t", 1000, 4)])
    rng = np.random.default_rng(width)
    n = 200
    ids = rng.integers(0, 1 << (4 * width), size=(2, n), dtype=np.uint64)
    ids[:, :2] = [[0], [(1 << (4 * width)) - 1]]
    nulls = rng.random((2, n)) < 0.2
    table = pa.table({"y": pa.array(np.zeros(n)), "x": pa.array(np.ones(n)), **{
        k: pa.array([None if m else f"{int(v):0{width}x}" for v, m in zip(ids[j], nulls[j])])
        for j, k in enumerate("ab")}})
    ends = np.arange(n, dtype=np.int64)
    got = decode_table(table, schema, True, 0, ends)
    want = _decode_columns(table, schema, True, 0, ends)
    # ids of up to 8 digits are mapped in 32 bits (longer ones in 64)
    assert got.values.dtype == (np.int32 if rows < 1 << 31 and width <= 8 else np.int64)
    assert np.array_equal(got.values, want.values)
    assert np.array_equal(got.lengths, want.lengths)
    assert got.values.tolist() == [int(v) % num for j, num in enumerate((rows, 1000))
                                   for v, m in zip(ids[j], nulls[j]) if not m]
