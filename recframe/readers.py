"""Columnar readers on pyarrow: Parquet and CSV/TSV files decoded under a `FeatureSchema`.

`TabularDataset` yields `torchrec.datasets.utils.Batch` objects (a `WeightedBatch` when
the schema has a weight column): dense ``[B, D]`` float32, labels ``[B]`` float32 and a
`KeyedJaggedTensor` keyed by the schema's sparse columns, decoded with pyarrow and numpy
over whole blocks (no per-row Python), in background threads.

Per-rank shards: the files are laid end to end (uncompressed CSV/TSV in bytes, Parquet
in rows) and rank ``r`` of ``N`` reads the span ``[r/N, (r+1)/N)`` of the total: CSV
lines are owned by the span holding their first byte (a reader starts after the first
newline before its span and stops after the line crossing its end), Parquet rows by
index (a row group straddling two spans is read by both, each keeping its rows).
Compressed files (``.gz``, ``.bz2``...) cannot be split: each goes whole to the rank
whose span holds its middle.

Positions: ``state_dict()`` right after a batch names the plan part and the offset
(byte offset of the next line, in the decompressed stream for a compressed file, or the
next row of a Parquet file) after that batch, so resume is exact even though decoding
runs ahead. `resplit` merges the positions of all ranks of a run and re-splits the data
they had left over another world size.

Errors name the file, the line (or the Parquet row group and row) and the column.
"""

from __future__ import annotations

import csv
import functools
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import IterableDataset

from recframe import allocator
from recframe.data import _check_int, _check_rank, _make_batch
from recframe.schema import (
    FeatureSchema,
    SparseColumn,
    _hex_pair_bytes,
    _parse_hex_uniform,
    fnv1a64,
    mix64,
    parse_hex,
)

logger = logging.getLogger(__name__)

PARQUET_EXTENSIONS = (".parquet", ".parq", ".pq")
TEXT_EXTENSIONS = (".csv", ".tsv", ".txt", ".data")
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
NOT_DATA_NAMES = frozenset({"readme", "license", "licence", "notice", "copying", "authors",
                            "changelog", "makefile", "dockerfile", "success", "manifest"})
"""Extensionless names that are never data (compared lower-case), beside Criteo's
``day_0``: a README or LICENSE next to the data is skipped like a ``.md`` or ``.py``."""
_INT64 = (-(1 << 63), (1 << 63) - 1)
_COMPRESSED_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, ValueError)
FORMATS = ("parquet", "csv", "tsv")
DECODE_ROWS = 16_384
"""Rows decoded at a time from a Parquet row group: the decode makes a few passes over
``[columns, rows]`` arrays, which stay in the CPU's cache at this size (a whole 65536-row
group decodes about 1.5x slower per row)."""
_F32_MAX = float(np.finfo(np.float32).max)
_ALIGN = 64  # bytes: a batch's float tensors' alignment (`TabularDataset._assemble`)
# s: the least wait for a block a thread started before the caller decodes it too (then
# until _PATIENCE_BLOCKS blocks' time after the thread started it; _FIRST_PATIENCE before
# any block's time is known)
_MIN_PATIENCE, _FIRST_PATIENCE = 0.002, 0.05
_PATIENCE_BLOCKS = 3.0  # the wait ends this many blocks' time after the thread started


class DataError(ValueError):
    """Bad input: the message names the file, the row and the column."""


# --------------------------------------------------------------------------- batches


@dataclass
class WeightedBatch:
    """A torchrec-style batch with per-sample ``weights`` (the schema's weight column)."""

    dense_features: torch.Tensor
    sparse_features: Any
    labels: torch.Tensor
    weights: torch.Tensor

    def to(self, device: Any, non_blocking: bool = False) -> WeightedBatch:
        return WeightedBatch(
            self.dense_features.to(device=device, non_blocking=non_blocking),
            self.sparse_features.to(device=device, non_blocking=non_blocking),
            self.labels.to(device=device, non_blocking=non_blocking),
            self.weights.to(device=device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> WeightedBatch:
        return WeightedBatch(self.dense_features.pin_memory(),
                             self.sparse_features.pin_memory(), self.labels.pin_memory(),
                             self.weights.pin_memory())

    def record_stream(self, stream: Any) -> None:
        for t in (self.dense_features, self.sparse_features, self.labels, self.weights):
            t.record_stream(stream)


# --------------------------------------------------------------------------- file lists


def _basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def is_data_file(name: str, fmt: str) -> bool:
    """Whether a file found in a directory is data of ``fmt``: hidden and ``_``-names
    (``_SUCCESS``) never are; Parquet needs a Parquet extension; CSV/TSV a text extension
    (optionally compressed) or no extension at all (Criteo's ``day_0``)."""
    base = _basename(name)
    if base.startswith((".", "_")):
        return False
    lower = base.lower()
    if fmt == "parquet":
        return lower.endswith(PARQUET_EXTENSIONS)
    for comp in COMPRESSIONS:
        if lower.endswith(comp):
            lower = lower[: -len(comp)]
            break
    if "." not in lower:
        return lower not in NOT_DATA_NAMES
    return lower.endswith(TEXT_EXTENSIONS)


def _nothing_found_hint(fs: Any, path: str, fmt: str, pattern: str) -> str:
    """Why a path named no data file, when the path says (error path only): it does not
    exist, is an empty directory, holds only subdirectories (Spark's partitioned output,
    which a directory path does not descend into), files of another format, or files
    whose names are not data files' (Parquet files without an extension)."""
    glob = any(c in path for c in "*?[")
    try:
        if glob:
            entries = list(fs.glob(path, detail=True).values())
        elif not fs.exists(path):
            return " (it does not exist)"
        else:
            entries = fs.ls(path, detail=True) if fs.isdir(path) else []
    except (OSError, ValueError):  # only a hint
        return ""
    files = [e["name"] for e in entries if e.get("type") != "directory"
             and not _basename(e["name"]).startswith((".", "_"))]  # _SUCCESS: never data
    dirs = [_basename(e["name"]) for e in entries if e.get("type") == "directory"]
    where = "it matches" if glob else "the directory holds"
    names = ("names: Parquet needs .parquet/.parq/.pq" if fmt == "parquet" else
             "names: CSV/TSV needs .csv/.tsv/.txt/.data, compressed or not, or none")
    unnamed = (f" ({where} {len(files)} file(s) that are not {fmt} data by their {names}, "
               f"e.g. {_basename(files[0])!r}; name such files one by one)" if files else "")
    other = next((f for f in ("parquet", "csv") if f != fmt and f != {"tsv": "csv"}.get(fmt)
                  and any(is_data_file(n, f) for n in files)), None)
    if other == "csv" and fmt == "parquet":  # no extension: Parquet by its magic bytes?
        example = next(n for n in files if is_data_file(n, "csv"))
        try:
            with fs.open(example, "rb") as f:
                if f.read(4) == b"PAR1":
                    return unnamed
        except (OSError, ValueError):  # only a hint
            pass
    if other:
        how = ("format='parquet' (--data parquet, data convert --format parquet)"
               if other == "parquet" else
               "format='csv' or 'tsv' (--data, data convert --format: csv or tsv)")
        return f" ({where} {other} files: read them with {how})"
    if glob:
        return unnamed
    if dirs and not files:
        ext = "*.parquet" if fmt == "parquet" else "*"
        return (f" (the directory holds only subdirectories {sorted(dirs)[:3]}, and a "
                f"directory path is not searched below its own files: pass a glob such as "
                f"{pattern.rstrip('/') + '/*/' + ext!r})")
    if not entries:
        return " (the directory is empty)"
    return unnamed


def list_files(paths: Union[str, Sequence[str]], fmt: str) -> list[str]:
    """Full fsspec URLs of the files named by ``paths`` (files, globs, directories);
    globs and directories keep only data files of ``fmt`` (see `is_data_file`)."""
    import fsspec

    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, (list, tuple)) or not paths:
        raise ValueError(f"paths must be a path, glob or non-empty list of them, got {paths!r}")
    urls: list[str] = []
    for pattern in paths:
        fs, path = fsspec.core.url_to_fs(str(pattern))
        if any(c in path for c in "*?["):
            found = sorted(n for n, i in fs.glob(path, detail=True).items()
                           if i.get("type") != "directory" and is_data_file(n, fmt))
        elif fs.isdir(path):
            found = sorted(i["name"] for i in fs.ls(path, detail=True)
                           if i.get("type") != "directory" and is_data_file(i["name"], fmt))
        elif fs.exists(path):
            found = [path]
        else:
            found = []
        if not found:
            raise FileNotFoundError(f"no {fmt} data file matches {pattern!r}"
                                    f"{_nothing_found_hint(fs, path, fmt, str(pattern))}")
        for name in found:
            url = fs.unstrip_protocol(name)
            if url not in urls:
                urls.append(url)
    return urls


def _compression(url: str) -> Optional[str]:
    from fsspec.utils import infer_compression

    return infer_compression(url)


# --------------------------------------------------------------------------- sharding


@dataclass(frozen=True)
class Part:
    """Rows of one file a rank reads: ``[start, end)`` in bytes (CSV: the lines that
    start there; a compressed file: decompressed offsets, ``end`` None = to its end) or
    in rows (Parquet)."""

    file: int
    start: int
    end: Optional[int]

    def to_list(self) -> list[Any]:
        return [self.file, self.start, self.end]


def split_spans(
    items: Sequence[tuple[Part, int, bool]], world_size: int, rank: int
) -> list[Part]:
    """Rank ``rank``'s share of ``items`` (part, weight, splittable) laid end to end:
    the span ``[rank/N, (rank+1)/N)`` of the total weight; a part that cannot be split
    goes whole to the rank whose span holds its middle."""
    total = sum(w for _, w, _ in items)
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    out: list[Part] = []
    c = 0
    for part, w, splittable in items:
        if not splittable:
            middle_rank = min(world_size - 1, ((2 * c + w) * world_size) // max(1, 2 * total))
            if middle_rank == rank:
                out.append(part)
        else:
            a, b = max(lo, c), min(hi, c + w)
            if a < b:
                out.append(Part(part.file, part.start + (a - c), part.start + (b - c)))
        c += w
    return out


# --------------------------------------------------------------------------- decoding


@dataclass
class _Chunk:
    """Decoded rows of one part: numpy arrays ready to be cut into batches. The sparse
    features are laid out as a KJT is: ``values`` holds every feature's ids, feature by
    feature (key-major), ``lengths`` is ``[features, rows]``, so a batch is one slice of
    ``lengths`` and one slice of ``values`` per feature."""

    part: int
    ends: np.ndarray  # position after each row
    labels: np.ndarray
    weights: Optional[np.ndarray]
    dense: np.ndarray
    values: np.ndarray  # int64, or int32 (tables < 2**31 rows: prepared, uint32, hex ids)
    lengths: np.ndarray  # int32 [features, rows]
    starts: np.ndarray = field(init=False)  # where each feature's ids start in values
    _cursor: tuple[int, np.ndarray] = field(init=False)  # (row, its offsets)

    def __post_init__(self) -> None:
        self.starts = np.zeros(self.lengths.shape[0], dtype=np.int64)
        np.cumsum(self.lengths.sum(axis=1, dtype=np.int64)[:-1], out=self.starts[1:])
        self._cursor = (0, self.starts)

    def __len__(self) -> int:
        return int(self.ends.shape[0])

    def spans(self, a: int, b: int) -> tuple[list[int], list[int]]:
        """Each feature's ``[start, end)`` in ``values`` for rows ``[a, b)``: sums of
        the lengths from the previous span's end (batches take rows in order)."""
        row, lo = self._cursor
        if row != a:
            lo = self.starts + self.lengths[:, :a].sum(axis=1, dtype=np.int64)
        hi = lo + self.lengths[:, a:b].sum(axis=1, dtype=np.int64)
        self._cursor = (b, hi)
        return lo.tolist(), hi.tolist()


def _corrupt_compressed(url: str, pos: int, error: BaseException) -> DataError:
    return DataError(f"{url}: the compressed file cannot be read after byte {pos} of its "
                     f"content ({type(error).__name__}: {error}); it is truncated (an "
                     "interrupted download or copy?) or not compressed as its name says: "
                     "fetch it again, or rename it")


class _RowError(Exception):
    def __init__(self, row: int, column: str, message: str) -> None:
        super().__init__(message)
        self.row, self.column, self.message = row, column, message


def _first_bad(values: Sequence[Any], convert: Callable[[Any], Any]) -> tuple[int, Any]:
    """(index, value) of the first value ``convert`` rejects (error path only)."""
    for i, v in enumerate(values):
        try:
            convert(v)
        except (TypeError, ValueError, OverflowError):
            return i, v
    return -1, None


def _int64(value: Any) -> int:
    """``int(value)``, refusing what does not fit int64 (error path only)."""
    out = int(value)
    if not _INT64[0] <= out <= _INT64[1]:
        raise OverflowError(value)
    return out


_UNLABELLED_FIX = ("reading it needs labelled=False (data convert --unlabelled); training "
                   "and evaluation need the labels: leave it out of the paths")


def _separator_hint(line: str, delimiter: str) -> str:
    """For a header that split into one name: the separator it holds instead, and how to
    read it ('' when it holds none of the usual ones; error path only)."""
    sep = next((d for d in (",", "\t", ";", "|") if d != delimiter and d in line), None)
    if sep is None:
        return ""
    how = {"\t": "format='tsv' (--data tsv, data convert --format tsv)",
           ",": "format='csv' (--data csv, data convert --format csv)"}.get(
               sep, f"delimiter={sep!r}")
    return f" (one column: are the file's columns separated by {sep!r}? pass {how})"


def _close_names_hint(missing: Sequence[str], names: Sequence[str]) -> str:
    """A hint for schema column names that look like a typo of one in the file, with the
    fix; '' when none does (error path only)."""
    import difflib

    guesses = {m: difflib.get_close_matches(m, [str(n) for n in names], n=1, cutoff=0.6)
               for m in missing}
    pairs = [f"{g[0]!r} for the schema's {m!r}" for m, g in guesses.items() if g]
    if not pairs:
        return ""
    return f" (a typo? the file has {', '.join(pairs)}: fix the names in the schema)"


_FLOAT_IDS_FIX = ("write the ids as integers: pandas stores an int column with missing "
                  "values as floats; df[col].astype('Int64') keeps integers, missing ones null")


def _not_int_fix(value: Any, other: str) -> str:
    """The fix for an id that is no integer: a float (pandas' ints with missing values),
    a list written as text, or a string id, which mapping ``other`` takes (error path)."""
    try:
        float(value)
        return _FLOAT_IDS_FIX
    except (TypeError, ValueError):
        pass
    if str(value).startswith("["):
        return ("a list written as text? join its items with a delimiter (1|2) and set the "
                "column's delimiter: '|' in the schema, or write a Parquet list column")
    return f"ids that are not integers need {other}"


def _id_problem(value: Any, needs: str, other: str) -> str:
    """Why ``value`` is no integer id, and the fix (error path only)."""
    try:
        int(value)
    except (TypeError, ValueError):
        return f"id {value!r} is not an integer ({needs}); {_not_int_fix(value, other)}"
    return (f"id {value!r} does not fit in 64 bits ({needs}); use mapping hash for ids "
            "this long")


def _float_column(arr: pa.Array, name: str, fill: Optional[float]) -> np.ndarray:
    if pa.types.is_dictionary(arr.type):  # a pandas category: its values, row by row
        arr = arr.dictionary_decode()
    if pa.types.is_string_view(arr.type):
        arr = pc.cast(arr, pa.large_string())
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        blank = pc.equal(pc.binary_length(arr), 0)
        if pc.any(blank).as_py():  # an empty value (as in CSV) takes the fill
            arr = pc.if_else(blank, pa.scalar(None, arr.type), arr)
        try:
            arr = pc.cast(arr, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            row, value = _first_bad(arr.to_pylist(), lambda v: None if v is None else float(v))
            raise _RowError(row, name, f"{value!r} is not a number") from None
    elif not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)
              or pa.types.is_boolean(arr.type) or pa.types.is_null(arr.type)
              or pa.types.is_decimal(arr.type) or pa.types.is_dictionary(arr.type)):
        raise _RowError(0, name, f"has type {arr.type}, expected numbers")
    if pa.types.is_null(arr.type):  # every value missing (Arrow cannot fill a null array)
        if fill is None and len(arr):
            raise _RowError(0, name, "is empty")
        return np.full(len(arr), math.nan if fill is None else fill, dtype=np.float64)
    if arr.null_count:
        if fill is None:
            row = int(np.flatnonzero(~np.asarray(arr.is_valid()))[0])
            raise _RowError(row, name, "is empty")
        # cast first: a bool column takes a float fill
        arr = pc.cast(arr, pa.float64(), safe=False).fill_null(fill)
    # safe=False: integers beyond 2**53 round to the nearest double (as the whole-table
    # path does), where Arrow's safe cast refuses them
    out = np.asarray(pc.cast(arr, pa.float64(), safe=False), dtype=np.float64)
    finite = np.isfinite(out)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        fix = ("leave the value empty (a null in Parquet) to take the column's fill; pyarrow "
               "writes NaN as null with pa.array(values, from_pandas=True)" if fill is not None
               else "a label or weight needs a finite value in every row")
        raise _RowError(row, name, f"{float(out[row])} is not a finite number ({fix})")
    return out


def _float32(x: np.ndarray, name: str, transform: str = "none",
             raw: Optional[np.ndarray] = None) -> np.ndarray:
    """``x`` (float64, finite; ``raw`` before its ``transform``) as the batch's float32;
    a value beyond its range (inf there) is a `_RowError`: it would train to NaN (and a
    prepared part keeping it could not be read)."""
    with np.errstate(over="ignore"):
        out = x.astype(np.float32)
    finite = np.isfinite(out)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        value = repr(float(x[row])) if raw is None else (
            f"{float(raw[row])!r} ({float(x[row])!r} after its {transform} transform)")
        raise _RowError(row, name, f"{value} is beyond float32's range (|x| <= 3.4e38, the "
                        "batches' type): rescale the column")
    return out


def _is_text(t: pa.DataType) -> bool:
    """A string or binary Arrow type with int32/int64 offsets (the CSV reader gives the
    ``hex`` id columns as binary: no UTF-8 check, `TabularDataset._column_types`)."""
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
            or pa.types.is_large_binary(t))


def _offsets(arr: pa.Array) -> np.ndarray:
    """The ``len(arr) + 1`` offsets of a string or binary array (`_is_text`) into its
    data buffer, as stored (int32, or int64 for the large types): a view, no copy."""
    large = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    dtype = np.dtype(np.int64 if large else np.int32)
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr) + 1,
                         offset=arr.offset * dtype.itemsize)


def _string_bytes(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data bytes, starts, lengths) of a null-free string (or binary) array."""
    if not _is_text(arr.type):
        arr = pc.cast(arr, pa.large_string())
    offsets = _offsets(arr)
    bufs = arr.buffers()
    data = (np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None
            else np.zeros(0, dtype=np.uint8))
    return data, offsets[:-1].astype(np.int64), np.diff(offsets).astype(np.int64)


def _ids(column: SparseColumn, num: int, flat: pa.Array, parents: np.ndarray) -> np.ndarray:
    """Table rows of the (null-free) raw ids ``flat``; ``parents``: each id's row."""
    kind = column.mapping.kind
    dynamic = column.mapping.dynamic
    is_str = pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type)
    if kind == "hex":
        is_str = _is_text(flat.type)
        if pa.types.is_integer(flat.type):  # already parsed (recframe data convert)
            return _map_int_ids(column, num, _int_array(flat))
        if not is_str:
            raise _RowError(0, column.name, f"has type {flat.type}; mapping hex needs strings "
                            "(or integers: the parsed ids)")
        return _hex_rows(column, num, *_string_bytes(flat), lambda i: int(parents[i]))
    if kind == "modulo" or (dynamic is not None and dynamic.ids == "int64"):
        # modulo ids map to rows; dynamic ids int64 stay raw (the model maps them)
        what, other = (("mapping modulo", "mapping hash") if kind == "modulo"
                       else ("dynamic ids int64", "dynamic ids hash"))
        if is_str:
            try:
                flat = pc.cast(flat, pa.int64())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                i, v = _first_bad(flat.to_pylist(), _int64)
                raise _RowError(int(parents[i]), column.name,
                                _id_problem(v, what, other)) from None
        elif not pa.types.is_integer(flat.type):
            fix = (_FLOAT_IDS_FIX if pa.types.is_floating(flat.type)
                   else f"use {other} for strings")
            raise _RowError(0, column.name, f"has type {flat.type}; {what} "
                            f"need{'s' if kind == 'modulo' else ''} integer ids ({fix})")
        return _map_int_ids(column, num, _int_array(flat))
    salt = dynamic.salt if dynamic is not None else column.mapping.salt
    if not is_str:  # hash: integers hash by their decimal text
        if not (pa.types.is_integer(flat.type) or pa.types.is_floating(flat.type)
                or pa.types.is_boolean(flat.type)):
            raise _RowError(0, column.name, f"has type {flat.type}; mapping hash needs "
                            "strings or integers")
        flat = pc.cast(flat, pa.string())
    h = mix64(fnv1a64(*_string_bytes(flat)) ^ np.uint64(salt))
    if dynamic is not None:  # the 64-bit hash is the id (as int64)
        return h.view(np.int64)
    return _mod(h, num)


def _hex_rows(column: SparseColumn, num: int, data: np.ndarray, starts: np.ndarray,
              lengths: np.ndarray, row_of: Callable[[int], int]) -> np.ndarray:
    """Table rows of the hexadecimal ids ``data[starts[i]:][:lengths[i]]``; ``row_of(i)``:
    the row of id ``i`` (error path)."""
    value, ok = parse_hex(data, starts, lengths)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        raw = data[starts[i]:starts[i] + lengths[i]].tobytes()
        text = raw.decode("utf-8", "replace")
        hint = ""
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:  # what the CSV reader's UTF-8 check used to report
            hint = (": invalid UTF8 data (re-encode the file as UTF-8, e.g. iconv -f "
                    "latin1 -t utf-8)")
        raise _RowError(row_of(i), column.name,
                        f"id {text!r} is not a hexadecimal id of 1-16 digits{hint}")
    return _mod(value, num)


def _mod(ids: np.ndarray, num: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``ids mod num`` as signed rows of the ids' width (int64; int32 for uint32 ids):
    unsigned ids as unsigned, signed ids by Python's modulo (``-3 mod 50 = 47``); into
    ``out`` (``ids`` itself may be it) when given. As ``x - (x // m) * m``: numpy divides
    by a scalar with a precomputed reciprocal (libdivide), 3-5x faster than
    ``np.remainder``."""
    m = ids.dtype.type(num)
    q = np.floor_divide(ids, m)
    np.multiply(q, m, out=q)
    np.subtract(ids, q, out=q if out is None else out)
    r = q if out is None else out
    return r.view(np.dtype(f"i{r.dtype.itemsize}"))


def _int_array(arr: pa.Array) -> np.ndarray:
    """A null-free integer Arrow array as int64 (uint64 kept: ids beyond int64)."""
    ids = np.asarray(arr)
    return ids if ids.dtype == np.uint64 else ids.astype(np.int64, copy=False)


def _map_int_ids(column: SparseColumn, num: int, ids: np.ndarray) -> np.ndarray:
    """Table rows (or the dynamic table's raw ids) of int64 or uint64 ids."""
    kind = column.mapping.kind
    if kind == "hex" or (kind == "modulo" and ids.dtype == np.uint64):
        # hex: the parsed ids' 64 bits; uint64 ids beyond int64 stay positive
        return _mod(ids.view(np.uint64), num)
    if kind == "modulo":
        return _mod(ids, num)
    return ids.view(np.int64)  # dynamic, ids int64: the id's 64 bits


def _single_fast(column: SparseColumn, num: int, arr: pa.Array) -> Optional[
    tuple[np.ndarray, np.ndarray]
]:
    """`_sparse` of a single-valued column of integer ids (any integer mapping) or of hex
    strings, straight from the Arrow buffers: no filtered copy of the column, hex ids
    parsed whole-column; None where it does not apply (the general path handles it)."""
    mapping = column.mapping
    integer_ids = mapping.kind in ("modulo", "hex") or (
        mapping.dynamic is not None and mapping.dynamic.ids == "int64")
    if not integer_ids or column.delimiter is not None:
        return None
    if pa.types.is_integer(arr.type):
        if arr.type not in (pa.int64(), pa.uint64()):
            arr = pc.cast(arr, pa.int64())
        dtype = np.uint64 if arr.type == pa.uint64() else np.int64
        ids = np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr),
                            offset=arr.offset * 8)
        if arr.null_count:
            valid = np.asarray(arr.is_valid())
            return _map_int_ids(column, num, ids[valid]), valid.astype(np.int32)
        return _map_int_ids(column, num, ids), np.ones(len(arr), dtype=np.int32)
    if mapping.kind != "hex" or not _is_text(arr.type):
        return None
    fast = _hex_column(arr, num)
    if fast is not None:
        return fast
    data, starts, lengths = _string_bytes(arr)
    valid = lengths > 0
    if arr.null_count:
        valid &= np.asarray(arr.is_valid())
    # the ids lie end to end (empty slots take no bytes): parse_hex's one-width path
    rows = _hex_rows(column, num, data, starts[valid], lengths[valid],
                     lambda i: int(np.flatnonzero(valid)[i]))
    return rows, valid.astype(np.int32)


def _hex_column(arr: pa.Array, num: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(rows, lengths) of a single-valued hex string column whose ids all have one width
    (Criteo's case), parsed straight from the Arrow buffers with few passes: the width
    check is ``sum of lengths == width * ids`` (each length <= width). None where that
    does not hold or an id is bad (`_single_fast`'s general path, which names it)."""
    n = len(arr)
    bufs = arr.buffers()
    if n == 0 or bufs[2] is None:
        return None
    offsets = _offsets(arr)
    lengths = np.diff(offsets)
    width = int(lengths.max())
    valid = np.greater(lengths, 0).view(np.uint8)  # an empty field: no id
    if arr.null_count:
        bits = np.empty(n, dtype=np.uint8)
        _valid_bits(arr, bits)
        valid &= bits
    count = int(np.count_nonzero(valid))
    first, last = int(offsets[0]), int(offsets[-1])
    if not 0 < width <= 16 or last - first != width * count:  # mixed widths, null bytes
        return None
    value, ok = _parse_hex_uniform(np.frombuffer(bufs[2], dtype=np.uint8), first, count,
                                   width)
    if not ok.all():
        return None
    return _mod(value, num), valid.astype(np.int32)


def _sparse(column: SparseColumn, num: int, arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(rows, lengths [n] int32) of one sparse column."""
    fast = _single_fast(column, num, arr)
    if fast is not None:
        return fast
    n = len(arr)
    if pa.types.is_dictionary(arr.type):  # e.g. a pandas category written to Parquet
        arr = arr.dictionary_decode()
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        flat, parents = pc.list_flatten(arr), np.asarray(pc.list_parent_indices(arr))
        if pa.types.is_dictionary(flat.type):
            flat = flat.dictionary_decode()
    elif column.delimiter is not None and not pa.types.is_null(arr.type):
        if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
            raise _RowError(0, column.name, f"has type {arr.type}; a delimited column "
                            "needs strings")
        lists = pc.split_pattern(arr, column.delimiter)
        flat, parents = pc.list_flatten(lists), np.asarray(pc.list_parent_indices(lists))
    else:
        flat, parents = arr, None  # single-valued: each id's row is its index
    single = parents is None
    if pa.types.is_null(flat.type):  # no id at all (a column or list of nulls only)
        return np.zeros(0, dtype=np.int64), np.zeros(n, dtype=np.int32)
    if pa.types.is_string_view(flat.type) or pa.types.is_binary_view(flat.type) or (
            column.mapping.kind != "hex" and (pa.types.is_binary(flat.type)
                                              or pa.types.is_large_binary(flat.type))):
        flat = pc.cast(flat, pa.large_string())  # hex ids are parsed from the bytes
    is_str = _is_text(flat.type)
    if is_str:
        valid = np.asarray(pc.fill_null(pc.binary_length(flat), 0)) > 0
    elif flat.null_count:
        valid = np.asarray(flat.is_valid())
    else:
        valid = None  # no missing id
    if valid is not None and not valid.all():
        flat = flat.filter(pa.array(valid))
        parents = np.flatnonzero(valid) if parents is None else parents[valid]
    elif parents is None:
        parents = np.arange(n, dtype=np.int64)
    rows = _ids(column, num, flat, parents)
    if single:  # one id or none per row
        lengths = np.ones(n, np.int32) if valid is None else valid.astype(np.int32)
        return rows, lengths
    return rows, np.bincount(parents, minlength=n).astype(np.int32)


def _column(table: pa.Table, name: str) -> pa.Array:
    """A table's column as one Arrow array (no copy when it is one chunk)."""
    column = table.column(name)
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def _decode_columns(
    table: pa.Table, schema: FeatureSchema, labelled: bool, part: int, ends: np.ndarray
) -> _Chunk:
    """`decode_table` column by column: the general path (any column type), and the one
    that finds and names bad input for the whole-table path (raises `_RowError`)."""
    col = functools.partial(_column, table)

    n = table.num_rows
    if labelled:
        labels = np.stack([_float_column(col(c), c, None) for c in schema.labels], axis=1)
        _check_labels(labels, schema.labels)
        labels = labels[:, 0] if labels.shape[1] == 1 else labels
        weights = (_float32(_float_column(col(schema.weight), schema.weight, None),
                            schema.weight) if schema.weight else None)
        if weights is not None and (weights < 0).any():
            row = int(np.flatnonzero(weights < 0)[0])
            raise _RowError(row, str(schema.weight), f"weight {float(weights[row])} is "
                            "negative (the loss is sum(w*bce)/sum(w): weights are >= 0)")
    else:
        labels, weights = np.zeros(n), None
    dense = np.empty((n, len(schema.dense)), dtype=np.float32)
    for j, d in enumerate(schema.dense):
        raw = x = _float_column(col(d.name), d.name, d.fill)
        if d.transform == "log1p":
            x = np.maximum(x, 0.0)  # a new array (x may be Arrow's, read-only)
            np.log1p(x, out=x)
        elif d.transform == "standardize":
            x = (x - d.mean) / d.std
        dense[:, j] = _float32(x, d.name, d.transform, None if x is raw else raw)
    table_rows = {t.name: t.num_embeddings for t in schema.tables}
    values: list[np.ndarray] = []
    lengths = np.empty((len(schema.sparse), n), dtype=np.int32)
    for k, s in enumerate(schema.sparse):
        v, lengths[k] = _sparse(s, table_rows[s.table], col(s.name))  # type: ignore[index]
        values.append(v)
    flat = np.concatenate(values) if values else np.zeros(0, dtype=np.int64)
    return _Chunk(part, ends, labels.astype(np.float32), weights, dense, flat, lengths)


def _check_labels(labels: np.ndarray, names: Sequence[str]) -> None:
    """Labels are BCE targets: every one in [0, 1] (NaN is refused before)."""
    ok = (labels >= 0.0) & (labels <= 1.0)
    if not ok.all():
        row, j = (int(i[0]) for i in np.nonzero(~ok))
        raise _RowError(row, names[j], f"label {float(labels[row, j])} is outside [0, 1] "
                        "(the loss is binary cross-entropy: labels are 0/1 or a "
                        "probability)")


_I32, _I64, _U32, _U64 = pa.int32(), pa.int64(), pa.uint32(), pa.uint64()
_NUMERIC = {pa.float64(): np.float64, pa.float32(): np.float32, pa.int64(): np.int64,
            pa.int32(): np.int32, pa.int16(): np.int16, pa.int8(): np.int8,
            pa.uint8(): np.uint8, pa.uint16(): np.uint16, pa.uint32(): np.uint32}


def _valid_bits(arr: pa.Array, out: np.ndarray) -> None:
    """Write ``arr``'s validity (1 = a value, 0 = null) into the uint8 row ``out``."""
    n, off = len(arr), arr.offset
    bitmap = arr.buffers()[0]
    if bitmap is None:
        out[:] = 1
        return
    bits = np.frombuffer(bitmap, dtype=np.uint8)[off // 8: (off + n + 7) // 8 + 1]
    out[:] = np.unpackbits(bits, bitorder="little")[off % 8: off % 8 + n]


@dataclass
class _Plan:
    """What the whole-table decode does for a schema, worked out once: the float
    columns (labels, weight, dense) in one ``[columns, rows]`` array with their fills
    and transforms, and which sparse columns map integer ids with one vectorised op."""

    floats: list[str]  # labels, weight, dense: rows of the float array
    fills: np.ndarray  # NaN where a null is an error (labels, weight)
    n_labels: int
    weighted: bool
    log1p: np.ndarray  # float-array rows taking log1p
    standardize: np.ndarray  # float-array rows standardised
    mean: np.ndarray
    std: np.ndarray
    int_ids: list[int]  # sparse columns that may map integer ids here (single-valued)
    nums: np.ndarray  # their tables' rows (uint64)
    signed: np.ndarray  # bool: modulo of a signed id (else unsigned: hex, uint64 ids)
    raw: np.ndarray  # bool: dynamic int64 ids, kept as they are
    wide: np.ndarray  # float-array rows that may not fit float32 (not log1p: weight, dense)

    @classmethod
    def build(cls, schema: FeatureSchema, labelled: bool) -> _Plan:
        labels = list(schema.labels) if labelled else []
        weight = [schema.weight] if labelled and schema.weight else []
        floats = labels + weight + [d.name for d in schema.dense]
        fills = np.array([math.nan] * len(labels + weight)
                         + [math.nan if d.fill is None else d.fill for d in schema.dense],
                         dtype=np.float64)
        base = len(labels + weight)
        logs = [base + j for j, d in enumerate(schema.dense) if d.transform == "log1p"]
        stds = [(base + j, d) for j, d in enumerate(schema.dense)
                if d.transform == "standardize"]
        table_rows = {t.name: t.num_embeddings for t in schema.tables}
        int_ids = [k for k, s in enumerate(schema.sparse) if s.delimiter is None and (
            s.mapping.kind in ("modulo", "hex")
            or (s.mapping.dynamic is not None and s.mapping.dynamic.ids == "int64"))]
        cols = [schema.sparse[k] for k in int_ids]
        # log1p of a finite float64 is at most ~710: only the other rows can overflow
        wide = [base - 1] * bool(weight) + [base + j for j, d in enumerate(schema.dense)
                                            if d.transform != "log1p"]
        return cls(
            floats, fills, len(labels), bool(weight), np.array(logs, dtype=np.int64),
            np.array([i for i, _ in stds], dtype=np.int64),
            np.array([float(d.mean) for _, d in stds], dtype=np.float64)[:, None],
            np.array([float(d.std) for _, d in stds], dtype=np.float64)[:, None],
            int_ids, np.array([table_rows[c.table] for c in cols], dtype=np.uint64)[:, None],
            np.array([c.mapping.kind == "modulo" for c in cols], dtype=bool),
            np.array([c.mapping.kind not in ("modulo", "hex") for c in cols], dtype=bool),
            np.array(wide, dtype=np.int64))


def decode_table(
    table: pa.Table, schema: FeatureSchema, labelled: bool, part: int, ends: np.ndarray
) -> _Chunk:
    """Decode an Arrow table under ``schema`` (raises `_RowError` on bad input).

    Whole-table where the columns allow: the float columns (labels, weight, dense) as
    one ``[columns, rows]`` array (one null fill, one finiteness check, the transforms
    over all their columns at once) and the single-valued integer id columns as one
    ``[features, rows]`` array (one null mask, one compaction into the KJT's key-major
    values, a scalar-divisor modulo per feature); other columns (strings, lists, ...)
    column by column. Any bad value sends the table to `_decode_columns`, which names
    it. Both give the same arrays (tested)."""
    plan = _Plan.build(schema, labelled)  # ~50 us: nothing to cache for
    n = table.num_rows
    if n == 0:
        return _decode_columns(table, schema, labelled, part, ends)

    col = functools.partial(_column, table)

    # ---- float columns: labels, weight, dense
    x = np.empty((len(plan.floats), n), dtype=np.float64)
    bits = np.empty(n, dtype=np.uint8)
    for j, name in enumerate(plan.floats):
        arr = col(name)
        dtype = _NUMERIC.get(arr.type)
        buffers = arr.buffers()
        if dtype is None or buffers[1] is None or (arr.null_count and np.isnan(
                plan.fills[j])):  # strings, decimals..., an empty label: general path
            return _decode_columns(table, schema, labelled, part, ends)
        x[j] = np.frombuffer(buffers[1], dtype=dtype, count=n,
                             offset=arr.offset * np.dtype(dtype).itemsize)
        if arr.null_count:
            # zero the nulls arithmetically (a masked copy costs several times more);
            # a NaN or inf under a null stays NaN and goes to the general path
            _valid_bits(arr, bits)
            with np.errstate(invalid="ignore"):  # inf * 0 under a null: NaN, checked below
                np.multiply(x[j], bits, out=x[j])
            if plan.fills[j] != 0.0:
                x[j] += (1 - bits) * plan.fills[j]
    if not np.isfinite(x).all():  # NaN, inf: named by the general path
        return _decode_columns(table, schema, labelled, part, ends)
    labels = x[:plan.n_labels]
    if plan.n_labels and not ((labels >= 0.0) & (labels <= 1.0)).all():
        return _decode_columns(table, schema, labelled, part, ends)
    if plan.weighted and (x[plan.n_labels] < 0.0).any():  # named by the general path
        return _decode_columns(table, schema, labelled, part, ends)
    if len(plan.log1p):
        logs = x[plan.log1p]
        np.maximum(logs, 0.0, out=logs)
        x[plan.log1p] = np.log1p(logs, out=logs)
    if len(plan.standardize):
        x[plan.standardize] = (x[plan.standardize] - plan.mean) / plan.std
    if len(plan.wide) and (np.abs(x[plan.wide]) > _F32_MAX).any():
        return _decode_columns(table, schema, labelled, part, ends)  # names it
    first = plan.n_labels + plan.weighted
    dense = np.ascontiguousarray(x[first:].T, dtype=np.float32)
    weights = x[plan.n_labels].astype(np.float32) if plan.weighted else None
    if not labelled:
        labels32 = np.zeros(n, dtype=np.float32)
    elif plan.n_labels == 1:
        labels32 = labels[0].astype(np.float32)
    else:
        labels32 = np.ascontiguousarray(labels.T, dtype=np.float32)

    # ---- sparse columns: integer ids together, the others one by one
    lengths = np.empty((len(schema.sparse), n), dtype=np.int32)
    picked: list[int] = []  # indices into plan.int_ids of the integer-typed columns
    arrays: list[pa.Array] = []
    hex_keys: list[int] = []  # single-valued hex ids as text: parsed together
    hex_arrays: list[pa.Array] = []
    for j, k in enumerate(plan.int_ids):
        arr = col(schema.sparse[k].name)
        if not pa.types.is_integer(arr.type):
            if schema.sparse[k].mapping.kind == "hex" and _is_text(arr.type):
                hex_keys.append(k)
                hex_arrays.append(arr)
            continue  # other strings (ids to parse): column by column
        if arr.type != _U64 and arr.type not in _NUMERIC:
            arr = pc.cast(arr, _I64)
        if arr.buffers()[1] is not None:
            picked.append(j)
            arrays.append(arr)
    table_rows = {t.name: t.num_embeddings for t in schema.tables}
    pieces: dict[int, np.ndarray] = {}
    if arrays:
        sel = np.array(picked, dtype=np.int64)
        raw = plan.raw[sel]
        # uint32 ids (converted hex ids: Criteo's 8 digits) into tables below 2**31 rows:
        # loaded, mapped and kept in 32 bits (half the bytes of every pass over them)
        narrow = (not raw.any() and all(a.type == _U32 for a in arrays)
                  and int(plan.nums[sel].max()) < 1 << 31)
        ids = np.empty((len(arrays), n), dtype=np.uint32 if narrow else np.int64)
        ids_valid: Optional[np.ndarray] = None
        for j, arr in enumerate(arrays):
            dtype = np.int64 if arr.type == _U64 else _NUMERIC[arr.type]  # uint64: its bits
            ids[j] = np.frombuffer(arr.buffers()[1], dtype=dtype, count=n,
                                   offset=arr.offset * np.dtype(dtype).itemsize)
            if arr.null_count:
                if ids_valid is None:
                    ids_valid = np.ones(ids.shape, dtype=np.uint8)
                _valid_bits(arr, ids_valid[j])
        # uint64 columns: ids beyond int64 stay positive (as `_map_int_ids`)
        unsigned = ~plan.signed[sel] | np.array([a.type == _U64 for a in arrays])
        _map_id_rows(ids, plan.nums[sel], unsigned & ~raw, ~unsigned & ~raw)
        if narrow:
            ids = ids.view(np.int32)  # table rows < 2**31
        keys = [plan.int_ids[j] for j in picked]
        if ids_valid is None:
            lengths[keys] = 1
            flat = ids.reshape(-1)
        else:
            lengths[keys] = ids_valid
            # row-major (feature by feature); compress over the flat views: about half
            # the time of a 2-D boolean index
            flat = np.compress(ids_valid.reshape(-1).view(bool), ids.reshape(-1))
        if len(keys) == len(schema.sparse):
            return _Chunk(part, ends, labels32, weights, dense, flat, lengths)
        counts = (np.full(len(keys), n, dtype=np.int64) if ids_valid is None
                  else ids_valid.sum(axis=1, dtype=np.int64))
        for k, v in zip(keys, np.split(flat, np.cumsum(counts)[:-1])):
            pieces[k] = v
    if hex_arrays:
        nums = [table_rows[schema.sparse[k].table] for k in hex_keys]
        parsed = _hex_block(hex_arrays, nums)
        if parsed is not None:
            lengths[hex_keys] = parsed[2]
            if not pieces and len(hex_keys) == len(schema.sparse):  # Criteo: all of them
                return _Chunk(part, ends, labels32, weights, dense, parsed[0], lengths)
            for k, v in zip(hex_keys, parsed[1]):
                pieces[k] = v
    values: list[np.ndarray] = []
    try:
        for k, s in enumerate(schema.sparse):
            if k not in pieces:
                pieces[k], lengths[k] = _sparse(s, table_rows[s.table], col(s.name))
            values.append(pieces[k])
    except _RowError:  # named as the general path names it (its first bad column)
        return _decode_columns(table, schema, labelled, part, ends)
    flat = np.concatenate(values) if values else np.zeros(0, dtype=np.int64)
    return _Chunk(part, ends, labels32, weights, dense, flat, lengths)


def _hex_block(arrays: list[pa.Array], nums: list[int]) -> Optional[
    tuple[np.ndarray, list[np.ndarray], np.ndarray]
]:
    """Single-valued hex id columns (text) parsed together when every id of every column
    has one even width, as Criteo's 8 digits: the columns' id bytes lie end to end in one
    array (key-major: the KJT's values order), parsed with one lookup per digit pair
    (`_hex_pair_bytes`) and mapped ``mod`` their tables, in uint32 up to 8 digits.
    Returns (all values, each column's view of them, their lengths ``[columns, rows]``
    int32: 0 or 1 id per row); None where an id is empty but
    holds bytes (a null slot), has another width, or is not hex (`_single_fast` parses,
    or names it)."""
    k, n = len(arrays), len(arrays[0])
    large = any(pa.types.is_large_string(a.type) or pa.types.is_large_binary(a.type)
                for a in arrays)
    sizes = np.empty((k, n), dtype=np.int64 if large else np.int32)  # each id's bytes
    texts = []  # each column's id bytes
    for j, arr in enumerate(arrays):
        bufs = arr.buffers()
        if bufs[2] is None:
            return None
        offsets = _offsets(arr)
        np.subtract(offsets[1:], offsets[:-1], out=sizes[j])
        texts.append(np.frombuffer(bufs[2], dtype=np.uint8)[offsets[0]:offsets[-1]])
    width = int(sizes.max())
    if width == 0 or width % 2 or width > 16:
        return None
    if width == 8 and not large:
        lengths = np.right_shift(sizes, 3, out=sizes)  # 0 or 1 id (< 16 bytes)
    else:
        lengths = np.equal(sizes, width).astype(np.int32)
    bits = np.empty(n, dtype=np.uint8)
    for j, arr in enumerate(arrays):
        if arr.null_count:  # a null slot is no id, whatever bytes it spans
            _valid_bits(arr, bits)
            lengths[j] &= bits
    counts = lengths.sum(axis=1, dtype=np.int64)
    # every id counted has `width` bytes and every other slot none: the bytes add up
    if [t.shape[0] for t in texts] != (counts * width).tolist():
        return None
    text = np.concatenate(texts)
    raw, bad = _hex_pair_bytes(text)
    if bad is not None:
        return None
    total, half = int(counts.sum()), width // 2
    padded = 4 if width <= 8 else 8
    raw = raw.reshape(total, half)
    if half != padded:  # right-align: leading zero bytes
        pad = np.zeros((total, padded), dtype=np.uint8)
        pad[:, padded - half:] = raw
        raw = pad
    ids = raw.view(">u4" if padded == 4 else ">u8").reshape(total)
    ids = ids.astype(np.uint32 if padded == 4 else np.uint64)
    # rows of tables below 2**31 rows fit int32: half the bytes to keep and cut
    out = np.empty(total, dtype=np.int32 if padded == 4 and max(nums) < 1 << 31
                   else np.int64)
    bounds = np.concatenate(([0], np.cumsum(counts))).tolist()
    if len(set(nums)) == 1:
        spans = [(0, total, nums[0])]
    else:
        spans = [(bounds[j], bounds[j + 1], nums[j]) for j in range(k)]
    for a, b, num in spans:
        if padded == 8:
            out[a:b] = _mod(ids[a:b], num)
        elif num < 1 << 32:  # the ids are < 2**32: the same modulo in uint32
            x = ids[a:b]
            m = np.uint32(num)
            q = np.floor_divide(x, m)
            np.multiply(q, m, out=q)
            np.subtract(x, q, out=out[a:b], casting="unsafe")
        else:
            out[a:b] = ids[a:b]
    return out, [out[bounds[j]:bounds[j + 1]] for j in range(k)], lengths


def _map_id_rows(ids: np.ndarray, nums: np.ndarray, unsigned: np.ndarray,
                 signed: np.ndarray) -> None:
    """Map ``[features, rows]`` int64 ids to table rows in place: ``unsigned`` features
    (hex ids' 64 bits, uint64 ids) modulo their table as unsigned 64-bit, ``signed``
    ones by Python's modulo (``-3 mod 50 = 47``); the others (dynamic) stay raw: a
    scalar modulus per feature (`_mod`: numpy's fast division by a scalar). uint32 ids
    (never dynamic) are mapped in 32 bits: ids >= 0, where both modulos agree."""
    for j in range(ids.shape[0]):
        if ids.dtype == np.uint32:
            _mod(ids[j], int(nums[j, 0]), out=ids[j])
        elif unsigned[j]:
            _mod(ids[j].view(np.uint64), int(nums[j, 0]), out=ids[j].view(np.uint64))
        elif signed[j]:
            _mod(ids[j], int(nums[j, 0]), out=ids[j])


# --------------------------------------------------------------------------- prepared files
PREPARED_KEY = b"recframe.prepared"
"""Parquet footer key of a prepared file (`convert_to_parquet` with ``prepare=True``): its
value, JSON, records the schema the file's values were computed under."""
PREPARED_VERSION = 1


def prepared_signature(schema: FeatureSchema) -> dict[str, Any]:
    """What a prepared file's values depend on: the columns, their transforms and fills,
    the id mappings and the tables' sizes (not ``embedding_dim``, nor a dynamic table's
    row budget, admission and eviction: its ids are written raw, whatever they are)."""
    def mapping(c: SparseColumn) -> dict[str, Any]:
        m = c.mapping
        out: dict[str, Any] = {"kind": m.kind, "salt": m.salt}
        if m.dynamic is not None:
            out.update(ids=m.dynamic.ids, salt=m.dynamic.salt)
        return out

    return {
        "labels": list(schema.labels), "weight": schema.weight,
        "dense": [d.to_dict() for d in schema.dense],
        "sparse": [{"name": c.name, "table": c.table, "mapping": mapping(c),
                    "delimiter": c.delimiter} for c in schema.sparse],
        "tables": {t.name: t.num_embeddings for t in schema.tables
                   if t.name not in schema.dynamic_tables()},
    }


def _signature_difference(written: Any, wanted: dict[str, Any]) -> Optional[str]:
    """The first difference between a prepared file's recorded signature and ours."""
    if not isinstance(written, Mapping):
        return "its record is not a mapping"
    for key, value in wanted.items():
        theirs = written.get(key)
        if theirs == value:
            continue
        if key == "tables" and isinstance(theirs, Mapping):
            for name, rows in value.items():
                if theirs.get(name) != rows:
                    return (f"table {name!r} has {theirs.get(name)!r} rows there, {rows} "
                            "here")
        if key in ("dense", "sparse") and isinstance(theirs, list):
            names = [c.get("name") if isinstance(c, Mapping) else c for c in theirs]
            if names != [c["name"] for c in value]:  # a column added, dropped or renamed
                return (f"its {key} columns are {names} there, {[c['name'] for c in value]} "
                        "here")
            for a, b in zip(theirs, value):
                if a != b:
                    return f"{key} column {b['name']!r} is {a!r} there, {b!r} here"
        return f"{key} is {theirs!r} there, {value!r} here"
    return None


def check_prepared(url: str, metadata: Optional[Mapping[bytes, bytes]],
                   schema: FeatureSchema) -> bool:
    """Whether the Parquet file ``url`` (its footer's key-value ``metadata``) is prepared;
    a prepared file written under another schema is a `DataError`: its values would be
    transformed or mapped twice, or for other tables."""
    import json

    if not metadata or PREPARED_KEY not in metadata:
        return False
    try:
        record = json.loads(metadata[PREPARED_KEY])
        version = record.get("version") if isinstance(record, Mapping) else None
    except (ValueError, RecursionError) as e:  # RecursionError: hostile nesting
        raise DataError(f"{url}: its {PREPARED_KEY.decode()} footer is not valid JSON ({e}): "
                        "convert the source data again") from None
    if version != PREPARED_VERSION:
        raise DataError(f"{url}: prepared by a recframe of another version (format "
                        f"{version!r}, this one reads {PREPARED_VERSION}): convert the "
                        "source data again")
    difference = _signature_difference(record.get("schema"), prepared_signature(schema))
    if difference is not None:
        raise DataError(
            f"{url}: prepared (data convert --prepare: transforms and id mappings applied) "
            f"under another schema: {difference}. Read it with the schema.yaml written "
            "beside it, or convert the source data again under this schema")
    return True


def _id_type(schema: FeatureSchema, column: SparseColumn) -> pa.DataType:
    """A prepared id column's type: int32 for table rows that fit it, else int64
    (dynamic tables' raw ids)."""
    if column.mapping.kind == "dynamic" or schema.num_embeddings_of(column) > 1 << 31:
        return pa.int64()
    return pa.int32()


NO_ID = -1
"""A prepared single-valued id column's value for a row without an id (not a Parquet
null: nulls cost the reader a validity bitmap per column; ids are rows, never
negative). A dynamic table's raw ids may be any int64: there a null marks it."""


def prepared_table(chunk: _Chunk, schema: FeatureSchema, labelled: bool,
                   multi: Sequence[bool]) -> pa.Table:
    """A decoded chunk as a prepared table: float32 labels, weight and dense columns
    (filled and transformed, no nulls), each sparse column its table rows (`NO_ID` for
    none; raw ids, null for none, for a dynamic table): ``multi`` ones as lists."""
    n = len(chunk)
    fields: list[pa.Field] = []
    arrays: list[pa.Array] = []

    def add(name: str, values: np.ndarray) -> None:
        fields.append(pa.field(name, pa.float32(), nullable=False))
        arrays.append(pa.array(np.ascontiguousarray(values, dtype=np.float32)))

    if labelled:
        labels = chunk.labels.reshape(n, -1)
        for j, name in enumerate(schema.labels):
            add(name, labels[:, j])
        if schema.weight:
            add(schema.weight, chunk.weights)
    for j, name in enumerate(schema.dense_names):
        add(name, chunk.dense[:, j])
    for k, column in enumerate(schema.sparse):
        lengths = chunk.lengths[k]
        start = int(chunk.starts[k])
        ids = chunk.values[start:start + int(lengths.sum(dtype=np.int64))]
        kind = _id_type(schema, column)
        ids = ids.astype(kind.to_pandas_dtype(), copy=False)
        if multi[k]:
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            fields.append(pa.field(column.name, pa.large_list(kind)))
            arrays.append(pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(ids)))
            continue
        if lengths.max(initial=0) > 1:
            raise ValueError(f"column {column.name!r}: several ids in a row of a "
                             "single-valued column")
        dynamic = column.mapping.kind == "dynamic"
        full = np.full(n, 0 if dynamic else NO_ID, dtype=ids.dtype)
        full[lengths == 1] = ids
        fields.append(pa.field(column.name, kind, nullable=dynamic))
        arrays.append(pa.array(full, mask=(lengths == 0) if dynamic else None))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _prepared_error(row: int, name: str, what: str) -> _RowError:
    return _RowError(row, name, f"{what}: not what data convert --prepare writes (the file "
                     "is damaged, or was prepared for other tables); convert the source "
                     "data again")


def _row_of(lengths: np.ndarray, at: int) -> int:
    """The row holding a list column's ``at``-th id (error path)."""
    return int(np.searchsorted(np.cumsum(lengths, dtype=np.int64), at, side="right"))


def decode_prepared(table: pa.Table, schema: FeatureSchema, labelled: bool, part: int,
                    ends: np.ndarray) -> _Chunk:
    """Decode a prepared table (see `prepared_table`): its values are already the batch's,
    so this only gathers them, checking what a damaged or hostile file could break: no
    null or non-finite float, labels in [0, 1], a weight >= 0, every id a row of its
    table (raises `_RowError` naming the first bad value). Ids stay int32 where the file
    has them (`_assemble` widens a batch's ids to int64 as it copies them)."""
    n = table.num_rows

    col = functools.partial(_column, table)

    label_names = list(schema.labels) if labelled else []
    weight = [schema.weight] if labelled and schema.weight else []
    floats = label_names + weight + schema.dense_names
    x = np.empty((len(floats), n), dtype=np.float32)
    for j, name in enumerate(floats):
        arr = col(name)
        if arr.type != pa.float32() or arr.null_count or arr.buffers()[1] is None:
            row = int(np.argmax(~np.asarray(arr.is_valid()))) if arr.null_count else 0
            raise _prepared_error(row, name, "a null" if arr.null_count
                                  else f"type {arr.type} (float32 expected)")
        x[j] = np.frombuffer(arr.buffers()[1], dtype=np.float32, count=n,
                             offset=arr.offset * 4)
    finite = np.isfinite(x)
    if not finite.all():
        j, row = (int(i[0]) for i in np.nonzero(~finite))
        raise _RowError(row, floats[j], f"value {float(x[j, row])} is not finite")
    nl = len(label_names)
    if nl:
        _check_labels(x[:nl].T, label_names)
    if weight and (x[nl] < 0).any():
        row = int(np.argmax(x[nl] < 0))
        raise _RowError(row, weight[0], f"weight {float(x[nl, row])} is negative")
    dense = np.ascontiguousarray(x[nl + len(weight):].T)
    if not labelled:
        labels = np.zeros(n, dtype=np.float32)
    else:
        labels = x[0].copy() if nl == 1 else np.ascontiguousarray(x[:nl].T)
    weights = x[nl].copy() if weight else None

    table_rows = {t.name: t.num_embeddings for t in schema.tables}
    lengths = np.empty((len(schema.sparse), n), dtype=np.int32)
    values: list[np.ndarray] = []
    for k, column in enumerate(schema.sparse):
        arr = col(column.name)
        dynamic = column.mapping.kind == "dynamic"
        listed = pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)
        flat = pc.list_flatten(arr) if listed else arr
        if flat.type not in (_I32, _I64):
            raise _prepared_error(0, column.name, f"type {arr.type} (int32 or int64 ids, "
                                  "or lists of them, expected)")
        if listed:
            lengths[k] = np.asarray(pc.fill_null(pc.list_value_length(arr), 0))
            if flat.null_count:
                at = int(np.argmax(~np.asarray(flat.is_valid())))
                raise _prepared_error(_row_of(lengths[k], at), column.name,
                                      "a null id in its list")
        dtype = np.int32 if flat.type == _I32 else np.int64
        data = flat.buffers()[1]
        ids = (np.zeros(0, dtype=dtype) if data is None or not len(flat) else np.frombuffer(
            data, dtype=dtype, count=len(flat), offset=flat.offset * np.dtype(dtype).itemsize))
        if listed:
            keep = None
        elif dynamic or flat.null_count:  # null: no id (NO_ID is a raw id there)
            keep = np.ones(n, dtype=np.uint8)
            _valid_bits(flat, keep)
            keep = keep.view(bool)
            if not dynamic:  # a null's slot may hold any value
                ids = np.where(keep, ids, NO_ID).astype(dtype)
                keep &= ids >= 0
        else:
            keep = ids >= 0
        if not dynamic and len(ids):
            num = table_rows[column.table]
            low = -1 if keep is not None else 0
            if ids.min() < low or ids.max() >= num:
                at = int(np.argmax((ids < low) | (ids >= num)))
                raise _prepared_error(_row_of(lengths[k], at) if listed else at, column.name,
                                      f"id {int(ids[at])} is not a row of its table (0 to "
                                      f"{num - 1})")
        if keep is not None:
            lengths[k] = keep
            ids = ids[keep]
        values.append(ids)
    flat_ids = np.concatenate(values) if values else np.zeros(0, dtype=np.int64)
    return _Chunk(part, ends, labels, weights, dense, flat_ids, lengths)


def _nonempty(done: Union[None, _Chunk, list[_Chunk]]) -> list[_Chunk]:
    """A task's decoded chunks (a task gives one chunk, a list of them, or None)."""
    if done is None:
        return []
    return [c for c in (done if isinstance(done, list) else [done]) if len(c)]


def _read_lines(h: Any, size: int) -> Union[bytes, bytearray]:
    """``size`` bytes of the stream ``h`` and the rest of the line they end in. Read into
    a bytearray so that the line is appended in place (``bytes + line`` copies the whole
    block into fresh memory); plain ``read`` where the stream has no ``readinto``."""
    readinto = getattr(h, "readinto", None)
    if readinto is None:
        block = h.read(size)
        return block + h.readline() if block and not block.endswith(b"\n") else block
    out = bytearray(size)
    got = 0
    while got < size:  # readinto may return less than asked before the end
        view = memoryview(out)[got:]
        n = readinto(view)
        view.release()
        if not n:
            break
        got += n
    del out[got:]
    if got and out[-1] != 10:
        out += h.readline()
    return out


def _newlines(buf: np.ndarray) -> np.ndarray:
    """Offsets of the newline bytes in ``buf`` (uint8), in order: the byte mask is read
    as 64-bit words to find the few words holding one (a line is ~250 bytes in Criteo),
    then those words byte by byte: `np.flatnonzero` over the whole byte mask costs
    about 3x more."""
    n = buf.shape[0]
    mask = np.empty((n + 7) // 8 * 8, dtype=bool)
    mask[n:] = False  # the last word's padding
    np.equal(buf, 10, out=mask[:n])
    words = np.flatnonzero(mask.view(np.uint64) != 0)  # bool: numpy's fast nonzero
    found = np.flatnonzero(mask.reshape(-1, 8)[words])
    return words[found >> 3] * 8 + (found & 7)


def _queued_seconds() -> Optional[float]:
    """The calling thread's time so far runnable but not running (waiting for a core),
    from Linux's ``schedstat``; None where unknown."""
    try:  # ~5 us (twice per block of milliseconds)
        fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        try:
            return int(os.read(fd, 128).split()[1]) / 1e9
        finally:
            os.close(fd)
    except (OSError, ValueError, IndexError):
        return None


def _lower_priority(nice: Union[int, str]) -> None:
    """Run the calling (decoding) thread below the iterating one: ``"idle"`` under
    ``SCHED_IDLE`` (it runs only on a core nothing else wants), falling back to nice 19
    where that is refused (a container's seccomp policy, a kernel without it); an int
    raises the thread's nice value by that much. Linux only: the nice value and the
    policy are per thread there; elsewhere they would apply to the whole process, so
    nothing is done."""
    if not sys.platform.startswith("linux"):
        return
    if nice == "idle":
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        except (OSError, AttributeError):
            nice = 19
    if isinstance(nice, int) and nice > 0:
        try:
            os.nice(nice)
        except OSError:  # pragma: no cover - raising the nice value needs no privilege
            pass


def _check_nice(value: Any) -> Union[int, str]:
    """``worker_nice``: an int >= 0 or ``"idle"``."""
    if value == "idle":
        return "idle"
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"worker_nice must be an integer >= 0 (nice levels below the "
                         f"iterating thread) or 'idle' (SCHED_IDLE), got {value!r}")
    return value


# --------------------------------------------------------------------------- the dataset


def _files_changed(state: Mapping[str, Any], names: list[str]) -> str:
    """A position over other files than a dataset's: what changed (the next day's files
    added to a run's directory, say), and the fix (error path only)."""
    old = [str(n) for n in state["files"]]
    added = [n for n in names if n not in old]
    gone = [n for n in old if n not in names]
    what = ", ".join(f"{len(x)} {how} {x[:3]}{'...' if len(x) > 3 else ''}"
                     for x, how in ((added, "added"), (gone, "gone")) if x)
    return (f"load_state_dict: the position was taken over {len(old)} file(s), this dataset "
            f"reads {len(names)}: {what or 'the same files in another order'}. A position "
            "holds only over its own files: resume over those; to train the checkpoint's "
            "model on other files, start a new output_dir warm-started from this one "
            "(model_bank, --model_bank '[\"OLD_OUTPUT_DIR\"]': its weights, a fresh "
            "optimizer and data position)")


class TabularDataset(IterableDataset):
    """Batches of ``batch_size`` rows from Parquet or CSV/TSV files under ``schema``.

    Args:
        paths: files, globs or directories on any fsspec filesystem (directories and
            globs keep only data files of ``format``, see `is_data_file`).
        schema: the `FeatureSchema` (or a path to its YAML/JSON file).
        format: ``parquet``, ``csv`` (comma) or ``tsv`` (tab); ``delimiter`` overrides.
        header: CSV/TSV files start with a header line naming the columns; without
            one, ``schema.columns`` names them in order.
        labelled: False for files without the label (and weight) columns, such as
            Criteo's test files: labels are then zeros.
        rank, world_size: this rank's share (see the module docstring).
        num_workers: background decoding threads (0: decode inline).
        worker_nice: the decoding threads' priority below the iterating thread (Linux):
            ``"idle"`` (default) runs them under ``SCHED_IDLE``, only on cores nothing
            else wants (nice 19 where the kernel or a container refuses it); an int
            raises their nice value by that much (0: the same priority). Decoding then
            takes the cycles training leaves idle instead of preempting torch's
            intra-op threads, which wait on each other: one of them losing its core
            stalls the whole step. A block the threads have not finished in time is
            decoded by the iterating thread (see `_chunks`), so input is never starved.
        prefetch: decoded blocks kept ready at most (bounds memory together with
            ``block_size``, the bytes of CSV per block).
        drop_last: drop the epoch's final partial batch; default: only with several
            ranks (torchrec's sharded lookups need the same batch size on every rank).
        keep_freed_memory: when iteration starts, have glibc's malloc keep freed memory
            for the next block (`recframe.allocator.keep_freed_memory`, process-wide, as
            the `Trainer` does by default): a decoded block's arrays would otherwise be
            mapped fresh and fault their pages in again. False leaves the allocator as
            it is (so does a `Trainer` with ``keep_freed_memory=False`` built first).
        inline_threads: with ``num_workers=0``, each block is parsed on pyarrow's thread
            pool (its CSV parse, or its Parquet column decoding): the caller is waiting
            for it, so the cores it would use are idle. False: one thread. (With
            decoding threads every block is parsed on one thread: pyarrow's threads
            beside them oversubscribe the cores.)

    Counters (all passes so far): ``bytes_read``, the data bytes read,
    ``decode_cpu_seconds``, the CPU time the read-and-decode tasks took (to weigh
    input against a training step), and ``input_wait_seconds``, the wall time the
    iterating thread spent waiting for a decoded block or decoding one itself (what
    input held up the step).
    """

    def __init__(
        self,
        paths: Union[str, Sequence[str]],
        schema: Union[FeatureSchema, str],
        *,
        format: str = "parquet",
        batch_size: int = 512,
        header: bool = False,
        delimiter: Optional[str] = None,
        labelled: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        worker_nice: Union[int, str] = "idle",
        prefetch: int = 4,
        block_size: int = 4 << 20,
        drop_last: Optional[bool] = None,
        keep_freed_memory: bool = True,
        inline_threads: bool = True,
    ) -> None:
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        self.schema = schema if isinstance(schema, FeatureSchema) else FeatureSchema.from_file(
            schema)
        self.format = format
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.header = bool(header)
        self.delimiter = delimiter or ("\t" if format == "tsv" else ",")
        self.labelled = bool(labelled)
        self.rank, self.world_size = _check_rank(rank, world_size)
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self.worker_nice = _check_nice(worker_nice)
        self.prefetch = _check_int("prefetch", prefetch, 1)
        self.block_size = _check_int("block_size", block_size, 1024)
        self.drop_last = self.world_size > 1 if drop_last is None else bool(drop_last)
        self.keep_freed_memory = bool(keep_freed_memory)
        self.inline_threads = bool(inline_threads)
        self.feature_names = self.schema.feature_names
        self.dense_names = self.schema.dense_names
        if format != "parquet":
            clash = [c.name for c in self.schema.sparse if c.delimiter == self.delimiter]
            if clash:
                raise ValueError(f"sparse column(s) {clash} split ids at {self.delimiter!r}, "
                                 f"the file's own column delimiter: give them another "
                                 "delimiter (e.g. '|')")
        self.files = list_files(paths, "parquet" if format == "parquet" else "csv")
        self._names = [_basename(u) for u in self.files]
        self._needed = self.schema.input_columns(self.labelled)
        self.bytes_read = 0  # bytes of data read (compressed Parquet column chunks)
        self.decode_cpu_seconds = 0.0  # CPU time of the read-and-decode tasks
        self.input_wait_seconds = 0.0  # the iterating thread's time waiting for them
        # per block: CPU and I/O time (not waits for a core), for the caller's wait
        self._task_seconds, self._tasks_done = 0.0, 0
        self._lock = threading.Lock()
        self._local = threading.local()
        if format == "parquet":
            self._init_parquet()
        else:
            self._init_text()
        self._plan = self.default_plan()
        self._part, self._offset, self._epoch = 0, self._plan[0].start if self._plan else 0, 0
        # the live iterator, weakly: one dropped by the caller (a `break`, GC) ends its
        # threads and frees its decoded blocks at once, not at the next iter()
        self._active: Optional[weakref.ReferenceType[Iterator[Any]]] = None
        self._rest = False  # the plan is the rest of an epoch (see resplit)
        if not self._plan and self.world_size > 1:
            logger.warning(
                "rank %d of %d has no data to read in %d file(s): there are fewer rows (or "
                "compressed files, which cannot be split) than ranks; with several ranks "
                "they all stop at the smallest share: convert to Parquet or use fewer ranks",
                self.rank, self.world_size, len(self.files))

    # ---------------------------------------------------------------- planning
    def _items(self) -> list[tuple[Part, int, bool]]:
        if self.format == "parquet":
            return [(Part(f, 0, n), n, True) for f, n in enumerate(self._rows)]
        return [(Part(f, 0, None if self._compressed[f] else size), size,
                 not self._compressed[f]) for f, size in enumerate(self._sizes)]

    def default_plan(self) -> list[Part]:
        """This rank's parts of a whole epoch."""
        return split_spans(self._items(), self.world_size, self.rank)

    def _init_parquet(self) -> None:
        import pyarrow.parquet as pq

        self._rows, self._rg_starts, self._rg_bytes = [], [], []
        self._prepared: list[bool] = []
        for url in self.files:
            source = self._open(url)
            try:
                pf = pq.ParquetFile(source)
                meta, listed = pf.metadata, pf.schema_arrow.names
                names = set(listed)
                twice = ([c for c in self._needed if listed.count(c) > 1]
                         if len(names) < len(listed) else [])
                footer = pf.schema_arrow.metadata
                pf.close()
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{url}: not a readable Parquet file ({e}); it may be "
                                "truncated (an interrupted write) or another format: "
                                "rewrite it, or move it out of the data directory") from None
            finally:
                if not isinstance(source, str):
                    source.close()
            missing = [c for c in self._needed if c not in names]
            if missing:
                raise DataError(f"{url}: missing column(s) {missing}; the file has "
                                f"{sorted(names)}{self._missing_hint(missing, listed)}")
            if twice:  # which of them would be the column? (pyarrow: a KeyError)
                raise DataError(f"{url}: column(s) {twice} appear more than once in the file; "
                                "rewrite it with each column once")
            self._prepared.append(check_prepared(url, footer, self.schema))
            counts = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            sizes = []
            for i in range(meta.num_row_groups):
                rg = meta.row_group(i)
                sizes.append(sum(rg.column(j).total_compressed_size for j in range(rg.num_columns)
                                 if rg.column(j).path_in_schema.split(".")[0] in self._needed))
            self._rows.append(sum(counts))
            self._rg_starts.append(np.concatenate(([0], np.cumsum(counts))).astype(np.int64))
            self._rg_bytes.append(sizes)

    def _missing_hint(self, missing: list[str], names: Sequence[str]) -> str:
        """Why a file lacks columns of the schema: no labels (an unlabelled file), or a
        typo in the schema's names (error path only)."""
        labels = set(self.schema.labels)
        if self.labelled and labels & set(missing) and set(missing) <= labels | {
                self.schema.weight}:
            return f" (an unlabelled file? {_UNLABELLED_FIX})"
        return _close_names_hint(missing, names)

    def _init_text(self) -> None:
        import fsspec

        self._sizes, self._compressed, self._columns = [], [], []
        expected = self.schema.columns
        if not self.header and expected is None:
            raise ValueError("CSV/TSV files without a header need schema.columns (every "
                             "column's name, in file order); or pass header=True (--header "
                             "on the command line) for files whose first line names them")
        if expected is not None and not self.labelled:
            drop = set(self.schema.labels) | {self.schema.weight}
            expected = [c for c in expected if c not in drop]
        for url in self.files:
            fs, path = fsspec.core.url_to_fs(url)
            self._sizes.append(int(fs.size(path)))
            self._compressed.append(_compression(url) is not None)
            if self.header:
                with fsspec.open(url, "rb", compression="infer") as f:
                    try:
                        first = f.readline().decode("utf-8-sig", "replace").rstrip("\r\n")
                    except _COMPRESSED_ERRORS as e:
                        raise _corrupt_compressed(url, 0, e) from None
                if not first:
                    raise DataError(f"{url}:1: no header line (the file is empty, or starts "
                                    "with a blank line); header=True reads column names from "
                                    "each file's first line")
                # quote-aware, as the rows are parsed: R's write.csv, Excel and csv's
                # QUOTE_ALL write "name"
                names = next(csv.reader([first], delimiter=self.delimiter))
                missing = [c for c in self._needed if c not in names]
                if missing:
                    hint = (_separator_hint(first, self.delimiter) if len(names) == 1
                            else "") or self._missing_hint(missing, names)
                    raise DataError(f"{url}:1: header has no column(s) {missing}; it names "
                                    f"{names}{hint}")
                twice = [c for c in self._needed if names.count(c) > 1]
                if twice:  # which one is the column? (as Parquet refuses)
                    raise DataError(f"{url}:1: header names column(s) {twice} more than once; "
                                    "rename the copies so that each name is one column")
                self._columns.append(names)
            else:
                self._columns.append(list(expected))  # type: ignore[arg-type]

    def _count_read(self, nbytes: int) -> None:
        """Add to ``bytes_read`` once per block: a block decoded twice (a thread's copy
        and the caller's, see `_chunks`) shares a token, and whichever copy reads first
        counts (the other may finish later, or never)."""
        token = getattr(self._local, "token", None)
        with self._lock:
            if token is not None:
                if token[0]:
                    return
                token[0] = True
            self.bytes_read += nbytes

    def _open(self, url: str) -> Any:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        if type(fs).__name__ == "LocalFileSystem":
            return path
        return fs.open(path, "rb")

    # ---------------------------------------------------------------- tasks
    def _tasks(self, part_index: int, offset: int, raw: bool = False) -> Iterator[
        Callable[[], Any]
    ]:
        """Thunks decoding the rest of part ``part_index`` from ``offset``, in order
        (``raw``: CSV/TSV blocks as checked Arrow tables instead)."""
        part = self._plan[part_index]
        if self.format == "parquet":
            starts = self._rg_starts[part.file]
            end = part.end if part.end is not None else int(starts[-1])
            first = int(np.searchsorted(starts, offset, side="right")) - 1
            for g in range(max(first, 0), len(starts) - 1):
                lo, hi = max(offset, int(starts[g])), min(end, int(starts[g + 1]))
                if lo >= hi:
                    if int(starts[g]) >= end:
                        break
                    continue
                yield lambda g=g, lo=lo, hi=hi: self._parquet_task(part_index, g, lo, hi)
        elif self._compressed[part.file]:
            yield from self._stream_tasks(part_index, offset, raw)
        else:
            end = part.end if part.end is not None else self._sizes[part.file]
            for s in range(offset, end, self.block_size):
                e = min(end, s + self.block_size)
                yield lambda s=s, e=e: self._range_task(part_index, s, e, raw)

    def _parquet_task(self, part_index: int, group: int, lo: int,
                      hi: int) -> list[_Chunk]:
        """Rows ``[lo, hi)`` of a row group, decoded in pieces of `DECODE_ROWS` rows."""
        import pyarrow.parquet as pq

        f = self._plan[part_index].file
        url = self.files[f]
        cache = getattr(self._local, "pq", None)
        if cache is None or cache[0] != url:
            cache = (url, pq.ParquetFile(self._open(url)))
            self._local.pq = cache
        g0 = int(self._rg_starts[f][group])
        # one thread per row group: these workers already run several at a time
        try:
            table = cache[1].read_row_group(group, columns=self._needed,
                                            use_threads=self._arrow_threads())
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{url}: row group {group} cannot be read ({e}); the file is "
                            "corrupt: rewrite it") from None
        table = table.slice(lo - g0, hi - lo)
        self._count_read(self._rg_bytes[f][group])
        ends = np.arange(lo + 1, hi + 1, dtype=np.int64)
        chunks = []
        decode = decode_prepared if self._prepared[f] else decode_table
        for a in range(0, hi - lo, DECODE_ROWS):
            piece = table.slice(a, DECODE_ROWS)
            try:
                chunks.append(decode(piece, self.schema, self.labelled, part_index,
                                     ends[a:a + piece.num_rows]))
            except _RowError as e:
                row = lo + a + e.row
                raise DataError(f"{url}: row group {group}, row {row - g0} (row {row} of the "
                                f"file): column {e.column!r}: {e.message}") from None
        return chunks

    def _range_task(self, part_index: int, start: int, end: int, raw: bool = False) -> Any:
        """Lines starting in ``[start, end)`` of an uncompressed file."""
        import fsspec

        f = self._plan[part_index].file
        url = self.files[f]
        with fsspec.open(url, "rb") as h:
            pos = start
            if start > 0:
                h.seek(start - 1)
                pos = start - 1 + len(h.readline())  # the line crossing start is not ours
            if pos >= end:
                return None
            # the line crossing `end` is ours: find its end first and read the block in
            # one piece (`block += line` would copy the block once more, into fresh
            # pages: about a fifth of the whole pass's CPU)
            h.seek(end - 1)
            stop = end - 1 + len(h.readline())
            h.seek(pos)
            block = h.read(stop - pos)
        return (self._text_raw if raw else self._text_chunk)(part_index, pos, block)

    def _stream_tasks(self, part_index: int, offset: int, raw: bool = False) -> Iterator[
        Callable[[], Any]
    ]:
        """Blocks of a compressed file read in order here, decoded by the thunks."""
        import fsspec

        url = self.files[self._plan[part_index].file]
        with fsspec.open(url, "rb", compression="infer") as h:
            pos = offset
            try:
                if offset:
                    h.seek(offset)
            except _COMPRESSED_ERRORS as e:
                raise _corrupt_compressed(url, 0, e) from None
            while True:
                try:
                    block = _read_lines(h, self.block_size)
                except _COMPRESSED_ERRORS as e:
                    raise _corrupt_compressed(url, pos, e) from None
                if not block:
                    return
                run = self._text_raw if raw else self._text_chunk
                yield lambda pos=pos, block=block, run=run: run(part_index, pos, block)
                pos += len(block)

    def _text_chunk(self, part_index: int, base: int, block: bytes) -> Optional[_Chunk]:
        parsed = self._text_table(part_index, base, block)
        return None if parsed is None else self._decode_text(part_index, *parsed)

    def _decode_text(self, part_index: int, table: pa.Table, row_ends: np.ndarray,
                     row_starts: np.ndarray) -> _Chunk:
        try:
            return decode_table(table, self.schema, self.labelled, part_index, row_ends)
        except _RowError as e:
            f = self._plan[part_index].file
            raise DataError(f"{self.files[f]}:{self._line_number(f, int(row_starts[e.row]))}: "
                            f"column {e.column!r}: {e.message}") from None

    def _text_table(self, part_index: int, base: int, block: bytes) -> Optional[
        tuple[pa.Table, np.ndarray, np.ndarray]
    ]:
        """The block's rows as an Arrow table with the needed columns (typed for the
        schema), each row's end and start offsets; None for a block of blank lines."""
        import pyarrow.csv as pacsv

        f = self._plan[part_index].file
        url = self.files[f]
        self._count_read(len(block))
        if base == 0 and self.header:  # the header line
            cut = block.find(b"\n") + 1 or len(block)
            block, base = block[cut:], cut
        buf = np.frombuffer(block, dtype=np.uint8)
        nl = _newlines(buf)
        ends = np.append(nl + 1, len(block)) if len(block) and buf[-1] != 10 else nl + 1
        starts = np.concatenate(([0], ends[:-1]))
        content = ends - starts - (buf[ends - 1] == 10)
        cr = (content > 0) & (buf[np.maximum(starts + content - 1, 0)] == 13)
        content = content - cr
        rows = content > 0  # blank lines are skipped (as pyarrow does)
        if not rows.any():
            return None
        names = self._columns[f]
        types = self._column_types()

        def parse(threads: bool) -> pa.Table:
            # in threads, the block is parsed in pieces of at least 1 MiB (pyarrow
            # carries a row across pieces)
            size = max(len(block) // pa.cpu_count(), 1 << 20) if threads else max(
                len(block), 1 << 20)
            return pacsv.read_csv(
                pa.BufferReader(pa.py_buffer(block)),  # no copy
                read_options=pacsv.ReadOptions(column_names=names, use_threads=threads,
                                               block_size=size + 1),
                parse_options=pacsv.ParseOptions(delimiter=self.delimiter,
                                                 ignore_empty_lines=True),
                convert_options=pacsv.ConvertOptions(
                    column_types=types, include_columns=self._needed, null_values=[""],
                    # an empty hex id (binary) is an empty bag, null or not: no nulls
                    # is cheaper to parse and to decode (Criteo: no string column)
                    strings_can_be_null=pa.string() in types.values(),
                    quoted_strings_can_be_null=True),
            )

        try:
            threads = self._arrow_threads()
            try:
                table = parse(threads)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                if not threads:
                    raise
                table = parse(False)  # bad input: its error names the block's row
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            self._locate_text_error(f, base, block, starts, ends, rows, names, types, e)
            raise  # pragma: no cover - _locate_text_error always raises
        row_ends = (base + ends[rows]).astype(np.int64)
        if table.num_rows != len(row_ends):
            raise DataError(f"{url}: {table.num_rows} rows parsed from {len(row_ends)} lines "
                            f"near byte {base}: quoted values holding newlines are not "
                            "supported")
        return table, row_ends, (base + starts[rows]).astype(np.int64)

    def _arrow_threads(self) -> bool:
        """Parse this block with pyarrow's thread pool: with ``num_workers=0`` the
        iterating thread decodes every block itself (``inline_threads``) while the
        caller waits, so its cores are idle."""
        return self.inline_threads and self.num_workers == 0 and pa.cpu_count() > 1

    def _text_raw(self, part_index: int, base: int, block: bytes) -> Optional[pa.Table]:
        """The block's raw table, checked by decoding it (errors name line and column)."""
        parsed = self._text_table(part_index, base, block)
        if parsed is None:
            return None
        self._decode_text(part_index, *parsed)
        return parsed[0]

    def raw_tables(self) -> Iterator[pa.Table]:
        """This rank's rows of a whole epoch as Arrow tables of the schema's columns, raw
        (before transforms and id mapping; typed as the reader parses them), each block
        checked by decoding it: what ``recframe data convert`` writes to Parquet."""
        if self.format == "parquet":
            raise ValueError("raw_tables reads CSV/TSV files")
        self._plan = self.default_plan()
        types = self._column_types()
        text = [name for name in self._needed if types.get(name) == pa.binary()]
        for i, part in enumerate(self._plan):
            for task in self._tasks(i, part.start, raw=True):
                table = task()
                if table is not None and table.num_rows:
                    for name in text:  # hex ids as text (checked: ASCII), empty as null
                        j = table.schema.get_field_index(name)
                        ids = table.column(j).cast(pa.string())
                        ids = pc.if_else(pc.equal(pc.binary_length(ids), 0),
                                         pa.scalar(None, pa.string()), ids)
                        table = table.set_column(j, name, ids)
                    yield table

    def decoded_chunks(self) -> Iterator[_Chunk]:
        """This rank's rows of a whole epoch, decoded (transforms and id mappings
        applied), in order, on this thread: what ``recframe data convert --prepare``
        writes."""
        self._plan = self.default_plan()
        for i, part in enumerate(self._plan):
            for task in self._tasks(i, part.start):
                yield from _nonempty(task())

    def multi_valued(self) -> list[bool]:
        """Per sparse column: whether its rows may hold several ids (a delimiter, or a
        list column in any Parquet file)."""
        multi = [c.delimiter is not None for c in self.schema.sparse]
        if self.format == "parquet":
            import pyarrow.parquet as pq

            for url in self.files:
                source = self._open(url)
                try:
                    arrow = pq.ParquetFile(source).schema_arrow
                finally:
                    if not isinstance(source, str):
                        source.close()
                for k, c in enumerate(self.schema.sparse):
                    t = arrow.field(c.name).type
                    multi[k] |= pa.types.is_list(t) or pa.types.is_large_list(t)
        return multi

    def _column_types(self) -> dict[str, Any]:
        types: dict[str, Any] = {}
        for c in self._needed:
            types[c] = pa.float64()
        for s in self.schema.sparse:
            integer = s.delimiter is None and (s.mapping.kind == "modulo" or (
                s.mapping.dynamic is not None and s.mapping.dynamic.ids == "int64"))
            hex_ids = s.delimiter is None and s.mapping.kind == "hex"
            # hex ids as binary: no UTF-8 check (their parse refuses any other byte)
            types[s.name] = pa.int64() if integer else pa.binary() if hex_ids else pa.string()
        return types

    def _line_number(self, f: int, offset: int) -> int:
        """1-based line number of the line at byte ``offset`` (error path only)."""
        import fsspec

        count, done = 0, 0
        with fsspec.open(self.files[f], "rb", compression="infer") as h:
            while done < offset:
                try:
                    piece = h.read(min(1 << 20, offset - done))
                except _COMPRESSED_ERRORS as e:
                    raise _corrupt_compressed(self.files[f], done, e) from None
                if not piece:
                    break
                count += piece.count(b"\n")
                done += len(piece)
        return count + 1

    def _locate_text_error(self, f: int, base: int, block: bytes, starts: np.ndarray,
                           ends: np.ndarray, rows: np.ndarray, names: list[str],
                           types: dict[str, Any], error: Exception) -> None:
        """Find the line and column pyarrow rejected (error path: Python per line)."""
        url = self.files[f]
        for i in np.flatnonzero(rows):
            line = block[starts[i]:ends[i]].decode("utf-8", "replace").rstrip("\r\n")
            try:  # quote-aware, as pyarrow parses: "Smith, J" is one field
                fields = next(csv.reader([line], delimiter=self.delimiter, strict=True), [""])
            except csv.Error:  # an unbalanced quote: named below, from pyarrow's message
                fields = line.split(self.delimiter)

            def where(i: int = i) -> str:  # only for the line named: each counts lines
                return f"{url}:{self._line_number(f, base + int(starts[i]))}"

            if len(fields) != len(names):
                labels = len(self.schema.labels) + (1 if self.schema.weight else 0)
                hint = ""
                if self.labelled and len(fields) == len(names) - len(self.schema.labels):
                    hint = f" (an unlabelled file, such as Criteo's test.txt? {_UNLABELLED_FIX})"
                elif not self.labelled and len(fields) == len(names) + labels:
                    hint = " (a labelled file? leave out labelled=False / --unlabelled)"
                elif base + int(starts[i]) == 0:
                    hint = (f" (not a data file? list the data files, e.g. with a glob, or "
                            f"check the delimiter {self.delimiter!r})")
                raise DataError(f"{where()}: expected {len(names)} columns {names[:4]}..., got "
                                f"{len(fields)}{hint}")
            for name, value in zip(names, fields):
                kind = types.get(name)
                if value == "" or kind is None or kind in (pa.string(), pa.binary()):
                    continue
                try:
                    float(value) if kind == pa.float64() else _int64(value)
                except ValueError:
                    what = "a number" if kind == pa.float64() else "an integer id"
                    header = base + int(starts[i]) == 0 and not self.header
                    hint = (" (a header line? pass header=True, --header on the command "
                            "line)" if header and value.isidentifier() else "")
                    if not hint and value.upper() in ("NA", "N/A", "NULL", "NONE"):
                        hint = (" (a missing value? write it empty, e.g. R's write.csv(..., "
                                "na = \"\"): an empty dense value takes its fill, an empty "
                                "id is no id)")
                    elif not hint and kind != pa.float64():  # an int64 id column
                        col = next(c for c in self.schema.sparse if c.name == name)
                        other = ("mapping hash" if col.mapping.kind == "modulo"
                                 else "dynamic ids hash")
                        hint = f" ({_not_int_fix(value, other)})"
                    elif not hint and value.lower() in ("true", "false"):
                        hint = (" (write booleans as numbers, 1/0: pandas writes a bool "
                                "column as True/False; df[col].astype(int))")
                    raise DataError(f"{where()}: column {name!r}: {value!r} is not {what}{hint}"
                                    ) from None
                except OverflowError:
                    raise DataError(f"{where()}: column {name!r}: id {value!r} does not fit in "
                                    "64 bits; use mapping hash for ids this long") from None
        # what Python's parse accepts and pyarrow's does not ('+3', bytes that are not
        # UTF-8, an unbalanced quote): pyarrow names the block's row and the column
        found = re.search(r"(?:CSV column #(\d+): )?Row #(\d+): (.*)", str(error), re.S)
        lines = np.flatnonzero(rows)
        if found and 0 < int(found[2]) <= len(lines):
            line = lines[int(found[2]) - 1]
            at = f"{url}:{self._line_number(f, base + int(starts[line]))}"
            what = found[3].splitlines()[0]
            if found[1] is not None and int(found[1]) < len(names):
                at += f": column {names[int(found[1])]!r}"
            if "UTF8" in what:
                what += " (re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8)"
            elif b'"' in block[starts[line]:ends[line]]:
                what += " (an unbalanced double quote? a quoted value must end on its line)"
            raise DataError(f"{at}: {what}")
        raise DataError(f"{url} near byte {base}: {error}")

    # ---------------------------------------------------------------- chunks in order
    def _chunks(self) -> Iterator[_Chunk]:
        """Decoded chunks from the current position, ``prefetch`` ahead in threads."""
        def tasks() -> Iterator[Callable[[], Optional[_Chunk]]]:
            for i in range(self._part, len(self._plan)):
                offset = self._offset if i == self._part else self._plan[i].start
                yield from self._tasks(i, offset)

        def timed(task: Callable[[], Any], token: Optional[list[Any]] = None) -> Any:
            start = time.thread_time()
            if token is not None and token[1] is None:
                token[1] = time.perf_counter()  # when the (first) copy started
            # for the caller's patience: a block's time not counting its waits for a core
            # (CPU and I/O: a block read from slow storage is mostly waiting on it)
            wall = time.perf_counter()
            queued = _queued_seconds() if self.num_workers else None
            self._local.token = token  # `_count_read`: the block's bytes count once
            try:
                return task()
            finally:
                self._local.token = None
                spent = busy = time.thread_time() - start
                after = _queued_seconds() if queued is not None else None
                if after is not None:
                    busy = max(spent, time.perf_counter() - wall - (after - queued))
                with self._lock:
                    self.decode_cpu_seconds += spent
                    self._task_seconds += busy
                    self._tasks_done += 1

        source = tasks()
        if self.num_workers == 0:
            for task in source:
                start = time.perf_counter()
                done = timed(task)
                self.input_wait_seconds += time.perf_counter() - start
                yield from _nonempty(done)
            return
        pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="recframe-decode",
                                  initializer=_lower_priority, initargs=(self.worker_nice,))
        pending: deque[tuple[Future, Callable[[], Optional[_Chunk]], list[Any]]] = deque()

        def next_chunk() -> Any:
            """The oldest block: ready, or decoded here if no thread has started it (the
            threads run at a lower priority and may not have had a core yet: the
            caller would wait for them at its own cost), or waited for until about a
            block's time (CPU and I/O, its waits for a core aside) after the thread
            started it and then decoded here too (a thread that started it may get no
            core while other processes keep every core busy; its copy is dropped, and
            the bytes are counted once)."""
            fut, task, token = pending.popleft()
            if fut.done():
                return fut.result()
            start = time.perf_counter()
            try:
                if fut.cancel():
                    return timed(task)
                if self._tasks_done:  # until a usual block's time after it started
                    began = token[1] if token[1] is not None else start
                    patience = max(_MIN_PATIENCE, began - start + _PATIENCE_BLOCKS
                                   * self._task_seconds / self._tasks_done)
                else:
                    patience = _FIRST_PATIENCE
                try:
                    return fut.result(timeout=patience)
                except FutureTimeout:
                    return timed(task, token)  # the thread's copy may never finish
            finally:
                self.input_wait_seconds += time.perf_counter() - start

        try:
            for task in source:
                token: list[Any] = [False, None]  # [bytes counted, start time]
                pending.append((pool.submit(timed, task, token), task, token))
                while len(pending) >= self.prefetch:
                    yield from _nonempty(next_chunk())
            while pending:
                yield from _nonempty(next_chunk())
        finally:
            for fut, _, _ in pending:
                fut.cancel()
            # not waited for: a starved (or stalled) thread would hold up the end of the
            # pass, a `break` or the iterator's close for as long as it gets no core; the
            # threads end after their current block, whose result is dropped
            pool.shutdown(wait=False, cancel_futures=True)
            close = getattr(source, "close", None)
            if close:
                close()

    # ---------------------------------------------------------------- batches
    def _assemble(self, pieces: list[tuple[_Chunk, int, int]]) -> Any:
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        def cat(arrays: list[np.ndarray]) -> torch.Tensor:
            """The float rows as one tensor at a 64-byte aligned address (torch's own
            allocations'): torch's vectorised CPU kernels round differently with their
            input's alignment, and a batch's rows start wherever its chunk had them (a
            resumed run's chunks start at its position), so an unaligned batch would
            train to other bits than the same rows in an uninterrupted run."""
            if len(arrays) == 1:
                t = torch.from_numpy(arrays[0])
                return t if t.data_ptr() % _ALIGN == 0 else t.clone()
            t = torch.empty((sum(len(x) for x in arrays), *arrays[0].shape[1:]),
                            dtype=torch.from_numpy(arrays[0][:0]).dtype)
            np.concatenate(arrays, out=t.numpy())
            return t

        dense_t = cat([c.dense[a:b] for c, a, b in pieces])
        labels_t = cat([c.labels[a:b] for c, a, b in pieces])
        c, a, b = pieces[0]
        if len(pieces) == 1 and a == 0 and b == len(c):  # a whole chunk: no copies
            values, lengths = c.values.astype(np.int64, copy=False), c.lengths.reshape(-1)
        else:  # per feature (key-major): its slice of each piece, as int64 (one copy)
            spans = [(c.values, *c.spans(a, b)) for c, a, b in pieces]
            parts = [v[lo[k]:hi[k]] for k in range(len(self.feature_names))
                     for v, lo, hi in spans]
            values = (np.concatenate(parts, dtype=np.int64) if parts
                      else np.zeros(0, dtype=np.int64))
            lengths = np.concatenate([c.lengths[:, a:b] for c, a, b in pieces],
                                     axis=1).reshape(-1)
        size = len(labels_t)
        # built directly: lengths and values agree by construction (make_kjt's check
        # sums the lengths with torch, which costs more than the whole decode)
        kjt = KeyedJaggedTensor(keys=self.feature_names, values=torch.from_numpy(values),
                                lengths=torch.from_numpy(lengths), stride=size)
        if self.schema.weight and self.labelled:
            weights = cat([c.weights[a:b] for c, a, b in pieces])
            return WeightedBatch(dense_t, kjt, labels_t, weights)
        return _make_batch(dense_t, kjt, labels_t)

    def _pass(self) -> Iterator[Any]:
        pieces: list[tuple[_Chunk, int, int]] = []
        have = 0
        for chunk in self._chunks():
            a = 0
            while a < len(chunk):
                b = min(len(chunk), a + self.batch_size - have)
                pieces.append((chunk, a, b))
                have += b - a
                a = b
                if have == self.batch_size:
                    batch = self._assemble(pieces)
                    self._part, self._offset = chunk.part, int(chunk.ends[b - 1])
                    pieces, have = [], 0
                    yield batch
        if pieces and not self.drop_last:
            batch = self._assemble(pieces)
            self._part, self._offset = len(self._plan), 0
            yield batch

    def _next_epoch(self) -> None:
        self._rest = False
        self._plan = self.default_plan()
        self._part, self._offset = 0, (self._plan[0].start if self._plan else 0)
        self._epoch += 1

    def _at_start(self) -> bool:
        """At the start of an epoch: not mid-epoch, nor the rest of one (`resplit`)."""
        if self._rest:
            return False
        return self._part == 0 and (not self._plan or self._offset == self._plan[0].start)

    def __iter__(self) -> Iterator[Any]:
        """Batches from the current position to the end of the epoch (a position at the
        epoch's end starts the next one), as `recframe.data.CriteoTSVDataset`."""
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ValueError(
                f"TabularDataset iterated in {info.num_workers} DataLoader worker processes "
                f"would yield every sample {info.num_workers} times (each worker reads the "
                "whole share, and the position lives in the workers): iterate it directly "
                "or through DataLoader(batch_size=None, num_workers=0); it decodes in its "
                "own num_workers threads")
        if self.keep_freed_memory:
            allocator.keep_freed_memory()
        self._stop_active()
        gen = self._iterate()
        self._active = weakref.ref(gen)
        return gen

    def _iterate(self) -> Iterator[Any]:
        if self._part >= len(self._plan):
            self._next_epoch()
        mid_epoch = not self._at_start()
        yielded = False
        for batch in self._pass():
            yielded = True
            yield batch
        self._next_epoch()
        if mid_epoch and not yielded:
            yield from self._pass()
            self._next_epoch()

    def _stop_active(self) -> None:
        ref, self._active = self._active, None
        gen = ref() if ref is not None else None
        if gen is not None:
            gen.close()  # stops its decoding threads before the position moves

    # ---------------------------------------------------------------- position
    def state_dict(self) -> dict[str, Any]:
        """Position after the batches yielded so far: ``part`` and ``offset`` in
        ``plan`` (this rank's parts, ``[file, start, end]``)."""
        return {
            "format": self.format,
            "files": list(self._names),
            "world_size": self.world_size,
            "rank": self.rank,
            "epoch": self._epoch,
            "plan": [p.to_list() for p in self._plan],
            "part": self._part,
            "offset": self._offset,
            "rest": self._rest,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state`` (this rank's own, same world size; see `resplit` for
        another world size)."""
        self._check_state(state)
        missing = [k for k in ("plan", "part", "offset") if k not in state]
        if missing:
            raise ValueError(
                f"load_state_dict: the state lacks {missing} (keys: {sorted(state)}): it is "
                "not a TabularDataset position (e.g. one saved by CriteoTSVDataset, the "
                "reader `recframe train --data criteo` used before); start the data afresh")
        if state.get("world_size") != self.world_size:
            raise ValueError(
                f"load_state_dict: state has world_size={state.get('world_size')!r} but this "
                f"dataset has {self.world_size}; merge every rank's state with "
                "TabularDataset.resplit to resume at another world size")
        plan = [Part(int(f), int(s), None if e is None else int(e)) for f, s, e in state["plan"]]
        if any(p.file >= len(self.files) for p in plan):
            raise ValueError("load_state_dict: the plan names a file this dataset lacks")
        part = _check_int("part", state.get("part"), 0)
        if part > len(plan):
            raise ValueError(f"load_state_dict: part={part} but the plan has {len(plan)} parts")
        self._stop_active()
        self._plan, self._part = plan, part
        self._offset = _check_int("offset", state.get("offset"), 0)
        self._epoch = _check_int("epoch", state.get("epoch", 0), 0)
        self._rest = state.get("rest") is True

    def _check_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise ValueError(f"load_state_dict: expected a mapping, got {type(state).__name__}")
        names = self._names
        if state.get("files") is not None and list(state["files"]) != names:
            raise ValueError(_files_changed(state, names))
        if state.get("format", self.format) != self.format:
            raise ValueError(f"load_state_dict: state is of format {state.get('format')!r}")

    def resplit(self, states: Sequence[Mapping[str, Any]]) -> None:
        """Resume from the states of *all* ranks of a run at any world size: the data
        they had left this epoch is laid end to end (rank order) and re-split over this
        dataset's world size; the next epoch is split as usual. Exact: every row left is
        read by exactly one rank."""
        if not states or not all(isinstance(s, Mapping) for s in states):
            raise ValueError("resplit: needs every rank's state (a mapping each)")
        try:
            old = int(states[0].get("world_size", len(states)))
            ranks = sorted(int(s.get("rank", -1)) for s in states)
            epochs = {int(s.get("epoch", 0)) for s in states}
            plans = {int(s["rank"]): [Part(int(f), int(a), None if e is None else int(e))
                                      for f, a, e in s["plan"]] for s in states}
            for s in states:
                _check_int("part", s["part"], 0)
                _check_int("offset", s["offset"], 0)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"resplit: a state is not a TabularDataset position ({e!r}); "
                             "start the data afresh") from None
        if len(states) != old or ranks != list(range(old)):
            raise ValueError(f"resplit: needs the states of all {old} ranks, one each")
        if any(p.file >= len(self.files) for plan in plans.values() for p in plan):
            raise ValueError("resplit: a plan names a file this dataset lacks")
        items: list[tuple[Part, int, bool]] = []
        for s in sorted(states, key=lambda s: int(s["rank"])):
            self._check_state(s)
            plan = plans[int(s["rank"])]
            for i in range(int(s["part"]), len(plan)):
                p = plan[i]
                start = int(s["offset"]) if i == int(s["part"]) else p.start
                if self.format == "parquet" or p.end is not None:
                    end = p.end if p.end is not None else self._rows[p.file]
                    if end > start:
                        items.append((Part(p.file, start, end), end - start, True))
                else:  # a compressed file's rest: cannot be split
                    items.append((Part(p.file, start, None), self._sizes[p.file], False))
        self._stop_active()
        self._plan = split_spans(items, self.world_size, self.rank)
        self._part, self._offset = 0, (self._plan[0].start if self._plan else 0)
        self._epoch = max(epochs)
        # the rest of an epoch: a share without a whole batch goes on with the next one
        # (as a position mid-epoch does), so the ranks never agree on an empty pass
        self._rest = bool(items)
        if not items:
            self._part = len(self._plan)

    def remaining_batches(self) -> Optional[int]:
        """Batches left in this epoch from the current position (Parquet: exact from the
        footers, also after a `resplit`; CSV/TSV: None, unknown before reading)."""
        if self.format != "parquet":
            return None
        if self._part >= len(self._plan):
            return len(self)
        rows = sum((p.end if p.end is not None else self._rows[p.file])
                   - (self._offset if i == self._part else p.start)
                   for i, p in enumerate(self._plan) if i >= self._part)
        left = rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size)
        # as __iter__: a mid-epoch position with no whole batch left reads the next epoch
        return len(self) if left == 0 and not self._at_start() else left

    def __len__(self) -> int:
        """Batches this rank yields per epoch (Parquet only: exact from the footers)."""
        if self.format != "parquet":
            raise TypeError("a CSV/TSV TabularDataset does not know its length before reading")
        rows = sum((p.end if p.end is not None else self._rows[p.file]) - p.start
                   for p in self.default_plan())
        return rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size)


def criteo_tsv(
    paths: Union[str, Sequence[str]],
    *,
    num_embeddings: Any = 10_000,
    embedding_dim: int = 16,
    labelled: bool = True,
    **kwargs: Any,
) -> TabularDataset:
    """Criteo TSV files (``label``, 13 ints, 26 hex ids; ``labelled=False`` for the
    39-field test files) under `FeatureSchema.criteo`: the same batches as
    `recframe.data.CriteoTSVDataset` with one rank, read faster."""
    schema = FeatureSchema.criteo(num_embeddings, embedding_dim)
    return TabularDataset(paths, schema, format="tsv", labelled=labelled, **kwargs)


def _parse_hex_columns(table: pa.Table, schema: FeatureSchema) -> pa.Table:
    """Single-valued ``hex`` id columns parsed: the reader takes an integer ``hex`` column
    as already parsed, and skips the text parse. uint32 where every id of the block has
    at most 8 digits' worth (Criteo's: half the bytes to store and to read), else int64
    (the ids' 64 bits); `convert_to_parquet` reconciles the blocks of a part."""
    for col in schema.sparse:
        if col.mapping.kind != "hex" or col.delimiter is not None:
            continue
        arr = table.column(col.name).combine_chunks()
        if not _is_text(arr.type):
            continue
        valid = np.asarray(pc.fill_null(pc.binary_length(arr), 0)) > 0
        value = np.zeros(len(arr), dtype=np.uint64)
        if valid.any():
            parsed, _ = parse_hex(*_string_bytes(arr.filter(pa.array(valid))))
            value[valid] = parsed
        if int(value.max(initial=0)) < 1 << 32:
            ids = pa.array(value.astype(np.uint32), _U32, mask=~valid)
        else:
            ids = pa.array(value.view(np.int64), _I64, mask=~valid)
        table = table.set_column(table.schema.get_field_index(col.name), col.name, ids)
    return table


def _reconcile(table: pa.Table, part: pa.Schema) -> Optional[pa.Table]:
    """``table`` in the schema of the part being written (its uint32 hex ids widened to
    the part's int64: the same ids), or None where the part's uint32 columns cannot hold
    the table's ids (a hex id beyond 8 digits): the table starts a new part."""
    if table.schema.equals(part):
        return table
    for f in table.schema:
        if f.type == _I64 and part.field(f.name).type == _U32:
            return None
    return table.cast(part)


PARQUET_COMPRESSIONS = ("lz4", "zstd", "snappy", "none")
"""Codecs `convert_to_parquet` writes (``recframe data convert --compression``); the
readers read any codec pyarrow reads."""


def parquet_dictionary_columns(schema: FeatureSchema, arrow_schema: pa.Schema) -> list[str]:
    """Columns `convert_to_parquet` writes with dictionary pages: all but the integer id
    columns. Ids are mostly distinct (Criteo's: 4 billion values), so a dictionary page
    only grows the file and costs a lookup per value when read; labels, counts and
    string ids repeat and shrink with one."""
    ids = {c.name for c in schema.sparse}
    return [f.name for f in arrow_schema
            if not (f.name in ids and pa.types.is_integer(f.type))]


def convert_to_parquet(
    source: TabularDataset,
    output_dir: str,
    *,
    rows_per_file: int = 1_000_000,
    row_group_size: int = 65_536,
    compression: str = "lz4",
    progress: bool = True,
    prepare: bool = False,
) -> list[str]:
    """Write the CSV/TSV rows of ``source`` (one rank: all of them) to Parquet parts
    ``part-00000.parquet ...`` under ``output_dir`` (any fsspec path), raw (the schema's
    transforms and id mappings apply when the Parquet files are read; ``hex`` ids are
    stored parsed, as uint32 up to 8 digits (else int64: a part starts over with int64
    where a longer id comes), so reading skips the text parse), with the schema
    as ``schema.yaml`` beside them (not a data file: readers skip it). Every block is
    decoded on the way, so bad input fails here, naming its line. Parts are written to
    a staging directory ``_convert-*`` (readers skip it) and moved into place at the end,
    ``schema.yaml`` last, so a failed or interrupted convert leaves no parts that look
    like a complete dataset. Returns the parts.

    ``compression`` (one of `PARQUET_COMPRESSIONS`) trades bytes for the reader's CPU:
    ``lz4`` (the default) costs about 0.6x the read CPU of ``zstd`` for about 1.4x its
    bytes (Criteo-like data; docs/data.md has the measurements). Integer id columns are
    written without dictionary pages (`parquet_dictionary_columns`), whatever the codec.
    Row groups hold ``row_group_size`` rows (the last of a part fewer).

    ``prepare``: write what training reads instead of the raw columns: labels, weight
    and dense columns filled and transformed (float32, no nulls), each id its table's
    row (int32; lists for multi-valued columns; a dynamic table's raw ids as int64).
    Reading such a file skips the transforms and id mappings (about half the read CPU
    of raw lz4 parts, docs/data.md), but ties it to the schema: its footer
    records the schema (`PREPARED_KEY`), and reading it under a schema whose columns,
    transforms, mappings or table sizes differ is a `DataError`. ``source`` may then be
    Parquet too (raw parts from elsewhere)."""
    import json

    import fsspec
    import pyarrow.parquet as pq
    from tqdm import tqdm

    _check_int("rows_per_file", rows_per_file, 1)
    _check_int("row_group_size", row_group_size, 1)
    if source.keep_freed_memory:
        allocator.keep_freed_memory()
    if source.format == "parquet" and not prepare:
        raise ValueError("convert reads CSV/TSV; Parquet input is already columnar: read "
                         "it as it is, or convert it with prepare=True (--prepare)")
    if compression not in PARQUET_COMPRESSIONS:
        raise ValueError(f"compression must be one of {PARQUET_COMPRESSIONS}, got "
                         f"{compression!r}")
    fs, root = fsspec.core.url_to_fs(output_dir)
    root = root.rstrip("/")
    if fs.isfile(root):
        raise FileExistsError(f"{output_dir} is a file: the output must be a directory (new "
                              "or without Parquet files)")
    fs.makedirs(root, exist_ok=True)
    listing = fs.ls(root, detail=False)
    existing = [n for n in listing if is_data_file(n, "parquet")]
    if existing:
        raise FileExistsError(f"{output_dir} already holds Parquet files ({_basename(existing[0])}"
                              "...); convert into an empty directory")
    stale = [_basename(n) for n in listing if _basename(n).startswith("_convert-")]
    if stale:
        logger.warning("%s holds %s, left by an interrupted convert (readers skip it): "
                       "delete it", output_dir, stale)
    # parts are written to a staging directory (skipped by readers: its name starts with
    # "_") and moved into place at the end, schema.yaml last: an interrupted or failed
    # convert never leaves parts that look like a complete dataset
    staging = f"{root}/_convert-{uuid.uuid4().hex[:12]}"
    fs.makedirs(staging, exist_ok=True)
    staged: list[str] = []
    writer: Optional[pq.ParquetWriter] = None
    handle: Any = None
    in_file = 0
    total = (sum(sum(b) for b in source._rg_bytes) if source.format == "parquet"
             else sum(source._sizes))
    bar = tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
               desc="convert")
    seen = 0

    def close() -> None:
        nonlocal writer, handle
        if writer is not None:
            writer.close()
            handle.close()
        writer = handle = None

    written: list[str] = []
    pending: list[pa.Table] = []  # rows not yet written: a row group is written whole
    have = 0

    def write(tables: list[pa.Table]) -> None:
        """One row group (or a part's last, shorter one) to the current part."""
        nonlocal writer, handle, in_file
        # blocks of a row group may differ in a hex column's type: uint32 or int64
        table = (pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1
                 else tables[0])
        if writer is not None:
            fitted = _reconcile(table, writer.schema)
            if fitted is None:  # ids wider than this part's: the rest go to a new one
                close()
                in_file = 0
            else:
                table = fitted
        if writer is None:
            staged.append(f"part-{len(staged):05d}.parquet")
            handle = fs.open(f"{staging}/{staged[-1]}", "wb")
            writer = pq.ParquetWriter(
                handle, table.schema, compression=compression,
                use_dictionary=False if prepare else parquet_dictionary_columns(
                    source.schema, table.schema))
        writer.write_table(table, row_group_size=row_group_size)
        in_file += table.num_rows
        if in_file >= rows_per_file:
            close()
            in_file = 0

    def tables() -> Iterator[pa.Table]:
        if not prepare:
            for table in source.raw_tables():
                yield _parse_hex_columns(table, source.schema)
            return
        multi = source.multi_valued()
        footer = {PREPARED_KEY: json.dumps({"version": PREPARED_VERSION,
                                            "schema": prepared_signature(source.schema)})}
        for chunk in source.decoded_chunks():
            table = prepared_table(chunk, source.schema, source.labelled, multi)
            yield table.replace_schema_metadata(footer)

    try:
        for table in tables():
            a = 0
            while a < table.num_rows:
                # the rows up to the end of this row group, or of this part
                room = min(row_group_size - have, rows_per_file - in_file - have)
                b = min(table.num_rows, a + room)
                pending.append(table.slice(a, b - a))
                have += b - a
                a = b
                if have == row_group_size or in_file + have == rows_per_file:
                    write(pending)
                    pending, have = [], 0
            bar.update(source.bytes_read - seen)
            seen = source.bytes_read
        if pending:
            write(pending)
        close()
        if not staged:
            raise ValueError(f"convert: no rows in {source.files}")
        # another convert into this directory may have finished meanwhile: moving these
        # parts over its would mix two datasets
        fs.invalidate_cache(root)
        if [n for n in fs.ls(root, detail=False) if is_data_file(n, "parquet")]:
            raise FileExistsError(f"{output_dir} received Parquet files from another convert "
                                  "while this one ran; nothing of this one was moved there: "
                                  "convert into an empty directory")
        for name in staged:
            fs.mv(f"{staging}/{name}", f"{root}/{name}")
            written.append(fs.unstrip_protocol(f"{root}/{name}"))
        source.schema.save(fs.unstrip_protocol(f"{root}/schema.yaml"))
    finally:
        close()
        bar.close()
        try:
            if fs.exists(staging):
                fs.rm(staging, recursive=True)
        except OSError:
            logger.warning("could not remove the staging directory %s", staging)
    return written
