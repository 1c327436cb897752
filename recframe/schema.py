"""The user's feature schema: which columns are labels, dense and sparse features, which
embedding table each sparse feature looks up, and how a raw id becomes a table row.

A `FeatureSchema` is a dataclass loaded from YAML/JSON like `TrainingArguments`
(``FeatureSchema.from_file("schema.yaml")``); the readers decode columns with it and
the models (`recframe.models.DLRM` / `DeepFM`, ``schema=``) build their tables from it,
so data and model cannot disagree about names, table sizes or feature order.

Id mapping (`IdMapping`, one per sparse column), the same on every machine and release:

* ``modulo``: the value is an integer id; row = ``id mod num_embeddings`` (Python's
  modulo: a negative id maps to ``num_embeddings + id % num_embeddings``, never < 0).
* ``hex``: the value is a hexadecimal string of at most 16 digits (Criteo's ids); row =
  ``int(value, 16) mod num_embeddings``.
* ``dynamic``: a dynamic table (`recframe.dynamic`): the reader yields the raw id as
  int64 (``ids: int64``) or the 64-bit string hash below (``ids: hash``) and the model
  maps it to a row with an id->row map that admits and evicts ids under a row budget
  (the table's ``num_embeddings``); settings in `DynamicSpec`.
* ``hash``: the value is a raw string (an integer value is first written in decimal,
  so ``123`` and ``"123"`` map alike); row = ``mix64(fnv1a64(utf8 bytes) ^ salt) mod
  num_embeddings`` where ``fnv1a64`` is 64-bit FNV-1a (offset basis
  ``0xcbf29ce484222325``, prime ``0x100000001b3``) and ``mix64`` is splitmix64's
  finaliser (``x ^= x >> 30; x *= 0xbf58476d1ce4e5b9; x ^= x >> 27; x *=
  0x94d049bb133111eb; x ^= x >> 31``, all mod 2**64). `hash_strings` computes it with
  numpy over whole columns.

`IdMapping` and `FeatureSchema` serialise with ``to_dict`` / ``from_dict`` (plain JSON
types), so an exported model can record the feature order and id mapping it was
trained with.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

DENSE_TRANSFORMS = ("none", "log1p", "standardize")
ID_MAPPINGS = ("modulo", "hex", "hash", "dynamic")
DYNAMIC_IDS = ("int64", "hash")
EVICTION_POLICIES = ("lfu", "lru", "ttl")

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_U64 = np.uint64


def _fail(owner: str, message: str) -> ValueError:
    return ValueError(f"{owner}: {message}")


def _from_mapping(cls: type, values: Any, owner: str) -> Any:
    if not isinstance(values, Mapping):
        raise _fail(owner, f"expected a mapping of fields, got {values!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise _fail(owner, f"unknown field(s) {unknown}; valid fields: {sorted(names)}")
    return cls(**dict(values))


# --------------------------------------------------------------------------- hashing


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wraps mod 2**64)."""
    x = x.astype(_U64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> _U64(30)
        x *= _U64(0xBF58476D1CE4E5B9)
        x ^= x >> _U64(27)
        x *= _U64(0x94D049BB133111EB)
        x ^= x >> _U64(31)
    return x


def _byte_view(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(int64 starts, int64 lengths, the longest length)."""
    longest = int(lengths.max()) if lengths.size else 0
    return starts.astype(np.int64), lengths.astype(np.int64), longest


def fnv1a64(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """64-bit FNV-1a of the byte strings ``data[starts[i] : starts[i] + lengths[i]]``,
    vectorised over the strings: one numpy pass per byte position, over the strings
    that long (sorted longest first, so each pass works on a prefix, in place)."""
    starts, lengths, longest = _byte_view(starts, lengths)
    n = starts.shape[0]
    prime = _U64(FNV_PRIME)
    if n and int(lengths.min()) == longest:  # one length: no sorting
        order, idx, count = None, starts, np.full(longest, n)  # starts: a copy
    else:
        order = np.argsort(-lengths, kind="stable")
        idx = starts[order]
        # count[k]: how many strings have more than k bytes (a prefix of the order)
        count = np.searchsorted(-lengths[order], -np.arange(longest), side="left")
    h = np.full(n, FNV_OFFSET, dtype=_U64)
    with np.errstate(over="ignore"):
        for k in range(longest):
            m = int(count[k])
            head, at = h[:m], idx[:m]
            head ^= data[at]
            head *= prime
            at += 1
    if order is None:
        return h
    out = np.empty_like(h)
    out[order] = h
    return out


def hash_strings(strings: Sequence[str], salt: int = 0) -> np.ndarray:
    """``mix64(fnv1a64(utf8) ^ salt)`` of each string, as uint64 (the ``hash`` mapping
    before the modulo); for tests and for users checking a mapping by hand."""
    encoded = [s.encode("utf-8") for s in strings]
    lengths = np.array([len(b) for b in encoded], dtype=np.int64)
    starts = np.zeros(len(encoded), dtype=np.int64)
    if len(encoded) > 1:
        starts[1:] = np.cumsum(lengths)[:-1]
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return mix64(fnv1a64(data, starts, lengths) ^ _U64(salt & 0xFFFFFFFFFFFFFFFF))


_HEX_TABLE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate("0123456789abcdef"):
    _HEX_TABLE[ord(_c)] = _i
    _HEX_TABLE[ord(_c.upper())] = _i


def _nibbles_to_u32(x: np.ndarray) -> np.ndarray:
    """Each uint64 of 8 nibbles (one per byte, the first in the lowest byte) -> the 32-bit
    number they spell (SWAR: pairs, then pairs of pairs, in place on the whole array:
    ``x`` is overwritten and returned)."""
    for shift, mask in ((8, 0x000F000F000F000F), (16, 0x000000FF000000FF), (32, 0xFFFF)):
        high = x >> _U64(shift)  # the second of each pair
        high &= _U64(mask)
        x &= _U64(mask)
        x <<= _U64(shift // 2)
        x |= high
    return x


def _hex_pairs_table() -> np.ndarray:
    """``_HEX_PAIRS``: the byte two hex digits spell, indexed by the two characters read
    as one native uint16 (the first digit is the high nibble of the byte; the first
    character is the uint16's low byte on a little-endian CPU, its high byte on a
    big-endian one); 0x100 where either character is not a hex digit."""
    out = np.full(1 << 16, 0x100, dtype=np.uint16)
    digit = np.flatnonzero(_HEX_TABLE != 255)  # the 22 hex characters
    value = _HEX_TABLE[digit].astype(np.uint16)
    first, second = (0, 8) if sys.byteorder == "little" else (8, 0)
    out[(digit[:, None] << first) | (digit[None, :] << second)] = \
        (value[:, None] << 4) | value[None, :]
    return out


_HEX_PAIRS = _hex_pairs_table()


@functools.lru_cache(maxsize=1)
def _hex_pairs_arrow() -> Any:
    """``_HEX_PAIRS`` as an Arrow array, for Arrow's take (pyarrow is imported only
    here: a process that parses no hex text, e.g. training on synthetic data, never
    loads it)."""
    import pyarrow as pa

    return pa.array(_HEX_PAIRS)


def _hex_pair_bytes(text: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The bytes an even number of hex characters spell (``text``: uint8, contiguous),
    one table lookup per pair of digits, and None when every pair is hex (else a bool
    per byte: not two hex digits). The 128 KiB table is hit in about 3 KiB (the pairs
    of hex digits), so it stays in the L1 cache. Arrow's take reads the uint16 indices
    as they are, where numpy's would first copy them to int64 (2x the time)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if text.ctypes.data % 2:  # Arrow wants the uint16 indices aligned
        text = text.copy()
    pairs = np.asarray(pc.take(_hex_pairs_arrow(), pa.array(text.view(np.uint16))))
    bad = None if not pairs.size or int(pairs.max()) <= 0xFF else pairs > 0xFF
    return pairs.astype(np.uint8), bad


def _parse_hex_uniform(data: np.ndarray, start: int, count: int, width: int) -> tuple[
    np.ndarray, np.ndarray
]:
    """``parse_hex`` of ``count`` strings of ``width`` (1-16) digits laid end to end from
    ``data[start]`` (an Arrow string column's ids): whole-array ops, no per-digit pass.
    Even widths (Criteo's 8 digits) take one lookup per digit pair (`_hex_pair_bytes`)
    and read the bytes as big-endian words; odd widths one lookup per digit."""
    if width % 2 == 0:
        raw, bad = _hex_pair_bytes(data[start:start + count * width])
        half, padded = width // 2, 4 if width <= 8 else 8
        raw = raw.reshape(count, half)
        if half != padded:  # right-align: leading zero bytes
            wide = np.zeros((count, padded), dtype=np.uint8)
            wide[:, padded - half:] = raw
            raw = wide
        words = raw.view(">u4" if padded == 4 else ">u8").reshape(count).astype(_U64)
        ok = (np.ones(count, dtype=bool) if bad is None
              else ~bad.reshape(count, half).any(axis=1))
        return words, ok
    digits = np.take(_HEX_TABLE, data[start:start + count * width])
    if digits.size and int(digits.max()) == 255:
        ok = digits.reshape(count, width).max(axis=1) != 255
    else:
        ok = np.ones(count, dtype=bool)
    padded = 8 if width <= 8 else 16
    if width != padded:  # right-align: leading zero digits
        nibbles = np.zeros((count, padded), dtype=np.uint8)
        nibbles[:, padded - width:] = digits.reshape(count, width)
        digits = nibbles
    words = _nibbles_to_u32(digits.reshape(-1).view("<u8"))  # a fresh array: no copy
    if padded == 8:
        return words, ok
    words = words.reshape(count, 2)
    return (words[:, 0] << _U64(32)) | words[:, 1], ok


def parse_hex(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[
    np.ndarray, np.ndarray
]:
    """(uint64 values, bool ok) of hexadecimal byte strings; not ok: empty, longer
    than 16 digits, or a non-hex character. Strings of one width laid end to end (the
    usual case: Criteo's ids) take a whole-matrix path; others one pass per digit."""
    starts, lengths, longest = _byte_view(starts, lengths)
    n = starts.shape[0]
    if n and 0 < longest <= 16 and int(lengths.min()) == longest and (
            n == 1 or bool((np.diff(starts) == longest).all())):
        return _parse_hex_uniform(data, int(starts[0]), n, longest)
    ok = (lengths > 0) & (lengths <= 16)
    value = np.zeros(starts.shape, dtype=_U64)
    shortest = int(lengths.min()) if lengths.size else 0
    for k in range(min(longest, 17)):
        if k < shortest:  # every string has this digit: whole-array ops
            digits = _HEX_TABLE[data[starts + k]]
            ok &= digits != 255
            value = (value << _U64(4)) | (digits & 15).astype(_U64)
            continue
        active = np.flatnonzero(lengths > k)
        digits = _HEX_TABLE[data[starts[active] + k]]
        ok[active[digits == 255]] = False
        value[active] = (value[active] << _U64(4)) | (digits & 15).astype(_U64)
    return value, ok


# --------------------------------------------------------------------------- schema parts


def _int_at_least(owner: str, name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: {name} must be an integer >= {low}, got {value!r}")
    return value


@dataclass
class DynamicSpec:
    """A dynamic table's admission and eviction (`recframe.dynamic` has the semantics).

    The row budget is the table's ``num_embeddings``: rows ``[0, fallback_rows)`` are a
    small hashed fallback table for ids not (yet) admitted, the rest hold one admitted
    id each. Admission: an id gets its own row once it was seen ``min_count`` times
    (counted in a count-min sketch), or, with ``probability`` set, with that chance per
    occurrence (deterministic: a hash of id and step). Eviction every
    ``eviction_interval`` steps: ``lfu`` / ``lru`` free the least frequently / least
    recently seen rows until ``evict_fraction`` of the rows are free; ``ttl`` frees
    rows not seen for ``ttl`` steps.
    """

    ids: str = "int64"
    """``int64``: integer ids as they are; ``hash``: strings by the schema's stable hash."""
    salt: int = 0
    fallback_rows: int = 1
    min_count: int = 1
    probability: Optional[float] = None
    eviction: str = "lfu"
    eviction_interval: int = 100
    evict_fraction: float = 0.1
    ttl: Optional[int] = None
    sketch_width: Optional[int] = None
    """Counters per row of the admission sketch (default: 2 x the dynamic rows)."""

    def check(self, owner: str) -> None:
        """Validate the settings; errors start with ``owner`` (the feature)."""
        if self.ids not in DYNAMIC_IDS:
            raise ValueError(f"{owner}: dynamic ids must be one of {DYNAMIC_IDS}, "
                             f"got {self.ids!r}")
        _int_at_least(owner, "dynamic salt", self.salt, 0)
        _int_at_least(owner, "fallback_rows", self.fallback_rows, 1)
        _int_at_least(owner, "min_count", self.min_count, 1)
        if self.probability is not None:
            p = self.probability
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
                raise ValueError(f"{owner}: probability must be in (0, 1], got {p!r}")
            self.probability = float(p)
            if self.min_count != 1:
                raise ValueError(f"{owner}: give min_count or probability, not both")
        if self.eviction not in EVICTION_POLICIES:
            raise ValueError(f"{owner}: eviction must be one of {EVICTION_POLICIES}, "
                             f"got {self.eviction!r}")
        _int_at_least(owner, "eviction_interval", self.eviction_interval, 1)
        f = self.evict_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
            raise ValueError(f"{owner}: evict_fraction must be in (0, 1) (1 would evict every "
                             f"row at each eviction), got {f!r}")
        self.evict_fraction = float(f)
        if self.eviction == "ttl":
            if self.ttl is None:
                raise ValueError(f"{owner}: eviction ttl needs ttl (steps a row may go unseen)")
            _int_at_least(owner, "ttl (0 would evict every row at each eviction)",
                          self.ttl, 1)
        elif self.ttl is not None:
            raise ValueError(f"{owner}: ttl is for eviction ttl, not {self.eviction!r}")
        if self.sketch_width is not None:
            _int_at_least(owner, "sketch_width", self.sketch_width, 1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> DynamicSpec:
        return _from_mapping(cls, values, "DynamicSpec")


@dataclass
class IdMapping:
    """How a raw id becomes a row of its table (see the module docstring)."""

    kind: str = "modulo"
    salt: int = 0
    """``hash`` only: XORed into the string hash before the final mix (0: none)."""
    dynamic: Optional[DynamicSpec] = None
    """``dynamic`` only: admission and eviction (defaults when left out)."""

    def __post_init__(self) -> None:
        if self.kind not in ID_MAPPINGS:
            raise ValueError(f"IdMapping: kind must be one of {ID_MAPPINGS}, got {self.kind!r}")
        if (isinstance(self.salt, bool) or not isinstance(self.salt, int) or self.salt < 0
                or self.salt >= 1 << 64):
            raise ValueError(f"IdMapping: salt must be an integer in [0, 2**64), got "
                             f"{self.salt!r}")
        if isinstance(self.dynamic, Mapping):
            self.dynamic = DynamicSpec.from_dict(self.dynamic)
        if self.kind == "dynamic":
            if self.dynamic is None:
                self.dynamic = DynamicSpec()
            if not isinstance(self.dynamic, DynamicSpec):
                raise ValueError(f"IdMapping: dynamic must be a DynamicSpec, got "
                                 f"{self.dynamic!r}")
            self.dynamic.check("IdMapping")
        elif self.dynamic is not None:
            raise ValueError(f"IdMapping: dynamic settings need kind 'dynamic', not "
                             f"{self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "salt": self.salt}
        if self.dynamic is not None:
            out["dynamic"] = self.dynamic.to_dict()
        return out

    @classmethod
    def from_dict(cls, values: Any) -> IdMapping:
        if isinstance(values, str):  # the short YAML form: ``mapping: hash``
            return cls(kind=values)
        return _from_mapping(cls, values, "IdMapping")


@dataclass
class TableSpec:
    """One embedding table; several sparse columns may share it."""

    name: str
    num_embeddings: int
    embedding_dim: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TableSpec: name must be a non-empty string, got {self.name!r}")
        for key in ("num_embeddings", "embedding_dim"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 1 << 63:
                raise ValueError(f"table {self.name!r}: {key} must be an integer in [1, 2**63), "
                                 f"got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DenseColumn:
    """A dense feature: ``fill`` replaces a missing value, then ``transform`` applies:
    ``log1p`` is ``log(1 + max(x, 0))`` (negative counts count as 0), ``standardize``
    is ``(x - mean) / std``."""

    name: str
    transform: str = "none"
    mean: float = 0.0
    std: float = 1.0
    fill: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"DenseColumn: name must be a non-empty string, got {self.name!r}")
        if self.transform not in DENSE_TRANSFORMS:
            raise ValueError(f"dense column {self.name!r}: transform must be one of "
                             f"{DENSE_TRANSFORMS}, got {self.transform!r}")
        for key in ("mean", "std", "fill"):
            value = getattr(self, key)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value)):
                raise ValueError(f"dense column {self.name!r}: {key} must be a finite number, "
                                 f"got {value!r}")
            setattr(self, key, float(value))
        if self.transform == "standardize" and not self.std > 0:
            raise ValueError(f"dense column {self.name!r}: standardize needs std > 0, "
                             f"got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SparseColumn:
    """A sparse (categorical) feature: the column ``name`` is the feature (KJT key)
    looked up in ``table`` (default: a table named like the column). Multi-valued: a
    list column (Parquet), or a string split at ``delimiter`` (e.g. ``"|"``); empty
    items and a missing value give fewer ids (an empty bag pools to zeros)."""

    name: str
    table: Optional[str] = None
    mapping: IdMapping = field(default_factory=IdMapping)
    delimiter: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"SparseColumn: name must be a non-empty string, got {self.name!r}")
        if self.table is None:
            self.table = self.name
        if isinstance(self.mapping, (Mapping, str)):
            try:
                self.mapping = IdMapping.from_dict(self.mapping)
            except ValueError as e:
                raise ValueError(f"sparse column {self.name!r}: {e}") from None
        if not isinstance(self.mapping, IdMapping):
            raise ValueError(f"sparse column {self.name!r}: mapping must be an IdMapping, "
                             f"got {self.mapping!r}")
        if self.delimiter is not None and (not isinstance(self.delimiter, str)
                                           or not self.delimiter):
            raise ValueError(f"sparse column {self.name!r}: delimiter must be a non-empty "
                             f"string, got {self.delimiter!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "table": self.table, "mapping": self.mapping.to_dict(),
                "delimiter": self.delimiter}


def _items(owner: str, cls: type, values: Any) -> list[Any]:
    if values is None:
        return []
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise _fail(owner, f"expected a list, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, cls):
            out.append(v)
        elif isinstance(v, str) and cls is not TableSpec:
            out.append(cls(name=v))
        else:
            out.append(_from_mapping(cls, v, owner))
    return out


@dataclass
class FeatureSchema:
    """Labels, optional sample weight, dense and sparse columns, and tables.

    ``columns``: every column of a CSV/TSV file in order, for files without a header
    (with a header, the header names them). ``tables`` may be left out for sparse
    columns whose table is named like them only if ``default_num_embeddings`` is set.
    A ``labels`` list of one column gives ``labels`` of shape ``[B]``; several give
    ``[B, k]``.
    """

    labels: list[str] = field(default_factory=lambda: ["label"])
    dense: list[DenseColumn] = field(default_factory=list)
    sparse: list[SparseColumn] = field(default_factory=list)
    tables: list[TableSpec] = field(default_factory=list)
    weight: Optional[str] = None
    columns: Optional[list[str]] = None
    default_num_embeddings: Optional[int] = None
    default_embedding_dim: int = 16

    def __post_init__(self) -> None:
        owner = "FeatureSchema"
        if isinstance(self.labels, str):
            self.labels = [self.labels]
        if not isinstance(self.labels, list) or not all(
            isinstance(x, str) and x for x in self.labels
        ):
            raise _fail(owner, f"labels must be a list of column names, got {self.labels!r}")
        self.dense = _items(f"{owner}.dense", DenseColumn, self.dense)
        self.sparse = _items(f"{owner}.sparse", SparseColumn, self.sparse)
        self.tables = _items(f"{owner}.tables", TableSpec, self.tables)
        if not self.sparse:
            raise _fail(owner, "needs at least one sparse column (the models embed them)")
        if self.weight is not None and (not isinstance(self.weight, str) or not self.weight):
            raise _fail(owner, f"weight must be a column name, got {self.weight!r}")
        names = list(self.labels) + [d.name for d in self.dense] + [s.name for s in self.sparse]
        if self.weight:
            names.append(self.weight)
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise _fail(owner, f"column(s) {dup} are used more than once")
        by_name = {t.name: t for t in self.tables}
        if len(by_name) != len(self.tables):
            twice = sorted({t.name for t in self.tables
                            if sum(u.name == t.name for u in self.tables) > 1})
            raise _fail(owner, f"table(s) {twice} are listed more than once; list a table "
                        "once (one num_embeddings and embedding_dim): the columns sharing it "
                        "name it in their `table`")
        for col in self.sparse:
            if col.table not in by_name:
                n = self.default_num_embeddings
                if n is None:
                    raise _fail(owner, f"sparse column {col.name!r} uses table {col.table!r}, "
                                "which is not in tables; add it (name, num_embeddings, "
                                "embedding_dim) or set default_num_embeddings")
                spec = TableSpec(col.table, n, self.default_embedding_dim)
                self.tables.append(spec)
                by_name[col.table] = spec
        self._check_dynamic(by_name)
        used = {c.table for c in self.sparse}
        unused = [t.name for t in self.tables if t.name not in used]
        if unused:
            raise _fail(owner, f"table(s) {unused} are used by no sparse column")
        if self.columns is not None:
            if not isinstance(self.columns, list) or not all(
                isinstance(c, str) and c for c in self.columns
            ):
                raise _fail(owner, f"columns must be a list of names, got {self.columns!r}")
            features = self.dense_names + self.feature_names  # labels: absent in test files
            missing = [n for n in features if n not in self.columns]
            if missing:
                raise _fail(owner, f"columns does not list {missing}")

    def _check_dynamic(self, by_name: dict[str, TableSpec]) -> None:
        """A dynamic table: one spec for all its columns, a budget above the fallback."""
        specs: dict[str, tuple[str, DynamicSpec]] = {}
        for col in self.sparse:
            spec = col.mapping.dynamic
            first = specs.get(col.table)  # type: ignore[arg-type]
            if first is None and spec is not None:
                first = specs.setdefault(col.table, (col.name, spec))  # type: ignore[arg-type]
            if first is None:
                continue
            if spec != first[1]:
                raise _fail("FeatureSchema", f"sparse columns {first[0]!r} and {col.name!r} "
                            f"share table {col.table!r}: a dynamic table needs the same "
                            "dynamic mapping on every column that uses it")
            spec.check(f"sparse column {col.name!r}")
            budget = by_name[col.table].num_embeddings  # type: ignore[index]
            if budget <= spec.fallback_rows:
                raise _fail("FeatureSchema", f"sparse column {col.name!r}: table "
                            f"{col.table!r} has a row budget (num_embeddings) of {budget}, "
                            f"not above fallback_rows={spec.fallback_rows}; raise "
                            "num_embeddings or lower fallback_rows")

    def dynamic_tables(self) -> dict[str, DynamicSpec]:
        """Table name -> `DynamicSpec` of the schema's dynamic tables."""
        return {c.table: c.mapping.dynamic for c in self.sparse  # type: ignore[misc]
                if c.mapping.dynamic is not None}

    # --------------------------------------------------------------- derived
    @property
    def feature_names(self) -> list[str]:
        """The KJT keys, in schema order."""
        return [c.name for c in self.sparse]

    @property
    def dense_names(self) -> list[str]:
        return [c.name for c in self.dense]

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def num_embeddings_of(self, column: SparseColumn) -> int:
        return self.table(column.table).num_embeddings  # type: ignore[arg-type]

    @property
    def embedding_dim(self) -> int:
        """The tables' common width (DLRM and DeepFM need one); error if they differ."""
        dims = sorted({t.embedding_dim for t in self.tables})
        if len(dims) != 1:
            raise ValueError(f"FeatureSchema: the tables have widths {dims}; DLRM and DeepFM "
                             "need one embedding_dim for all tables")
        return dims[0]

    def input_columns(self, labelled: bool = True) -> list[str]:
        """Columns a reader needs."""
        out = list(self.labels) if labelled else []
        if self.weight and labelled:
            out.append(self.weight)
        return out + self.dense_names + self.feature_names

    # --------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": list(self.labels),
            "weight": self.weight,
            "dense": [d.to_dict() for d in self.dense],
            "sparse": [s.to_dict() for s in self.sparse],
            "tables": [t.to_dict() for t in self.tables],
            "columns": None if self.columns is None else list(self.columns),
            "default_num_embeddings": self.default_num_embeddings,
            "default_embedding_dim": self.default_embedding_dim,
        }

    @classmethod
    def from_dict(cls, values: Any) -> FeatureSchema:
        return _from_mapping(cls, values, "FeatureSchema")

    @classmethod
    def from_file(cls, path: str) -> FeatureSchema:
        """Load a YAML (.yaml/.yml) or JSON file from any fsspec path."""
        from recframe.arguments import load_config_file

        try:
            return cls.from_dict(load_config_file(path))
        except (TypeError, ValueError) as e:
            raise ValueError(f"schema file {path!r}: {e}") from None

    def save(self, path: str) -> None:
        """Write the schema as YAML (or JSON for a ``.json`` path) to any fsspec path."""
        import json

        import fsspec
        import yaml

        text = (json.dumps(self.to_dict(), indent=2) if str(path).endswith(".json")
                else yaml.safe_dump(self.to_dict(), sort_keys=False))
        with fsspec.open(path, "w") as f:
            f.write(text)

    # --------------------------------------------------------------- presets
    @classmethod
    def criteo(
        cls, num_embeddings: Any = 10_000, embedding_dim: int = 16, labelled: bool = True
    ) -> FeatureSchema:
        """Criteo's TSV layout (``label``, ``int_0..12``, ``cat_0..25``; the unlabelled
        test files lack ``label``): dense ``log1p`` (negative counts count as 0, empty as
        0), ids hexadecimal ``mod num_embeddings`` (an empty id is an empty bag): the
        same values as `recframe.data.CriteoTSVDataset`."""
        from recframe.data import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES

        sizes = (list(num_embeddings) if isinstance(num_embeddings, (list, tuple))
                 else [num_embeddings] * 26)
        if len(sizes) != 26:
            raise ValueError(f"FeatureSchema.criteo: {len(sizes)} table sizes for 26 features")
        return cls(
            labels=["label"],
            dense=[DenseColumn(n, transform="log1p") for n in DEFAULT_INT_NAMES],
            sparse=[SparseColumn(n, table=f"t_{n}", mapping=IdMapping("hex"))
                    for n in DEFAULT_CAT_NAMES],
            tables=[TableSpec(f"t_{n}", s, embedding_dim)
                    for n, s in zip(DEFAULT_CAT_NAMES, sizes)],
            columns=(["label"] if labelled else []) + DEFAULT_INT_NAMES + DEFAULT_CAT_NAMES,
        )
