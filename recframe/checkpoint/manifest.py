"""The manifest format: writing it (strict JSON, a checksum of itself) and checking
one read back against its schema before anything uses it.

A checkpoint directory is untrusted input (checkpoints are downloaded, shared, unpacked
from archives), so every manifest is validated in full when it is read: types, dtypes,
shapes, offsets, sizes, chunk extents, file names (plain names inside the checkpoint
directory), incremental chain links (checkpoints of the same output dir) and nesting
depth. Any violation is a `CheckpointCorruptError` naming the manifest and the entry,
never a ``TypeError``/``KeyError``/``RecursionError`` further on, so a restore falls
back to the previous checkpoint as for a corrupt data file.

On disk a manifest is strict JSON (no bare ``NaN``): a non-finite metric is written as
the string ``"nan"``, ``"inf"`` or ``"-inf"`` and read back as that float. Format
version 2 adds ``manifest_sha256``: the SHA-256 of the manifest's canonical JSON
(sorted keys, no spaces) without that field. Version 1 manifests (no checksum) still
load; a newer version is refused with a message naming both versions.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import json
import math
import re
import threading
from typing import Any, Optional

from recframe.checkpoint.format import _DTYPES, CheckpointCorruptError

FORMAT_NAME = "recframe.checkpoint"
FORMAT_VERSION = 2
"""The newest manifest format this recframe writes and reads (2: ``manifest_sha256``)."""
CHECKSUM_KEY = "manifest_sha256"
MAX_MANIFEST_BYTES = 1 << 30
"""A manifest larger than this is refused before it is read (a hostile one could
otherwise be ``/dev/zero``)."""
MAX_DEPTH = 256
"""Deepest JSON nesting a manifest may have (state trees of nested optimizer/hook
state stay far below; decoding deeper trees would exhaust Python's stack)."""
MAX_DIMS = 64
PER_RANK_PARTS = ("io_state", "delta")
CKPT_NAME_RE = re.compile(r"^ckpt_(0|[1-9][0-9]*)\Z")
"""A checkpoint directory's name: the canonical ``ckpt_<step>`` only (ASCII digits, no
leading zero, no trailing newline): another spelling of a step (``ckpt_04``, a non-ASCII
digit, a trailing newline) would be a second directory of the same step."""
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}\Z")
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class CheckpointVersionError(RuntimeError):
    """A checkpoint written in a newer format than this recframe reads."""


# --- writing ---------------------------------------------------------------------
def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != CHECKSUM_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _strict_metrics(metrics: Any) -> Any:
    if not isinstance(metrics, dict):
        return metrics
    out = {}
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            value = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        out[key] = value
    return out


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    """The bytes of ``manifest`` on disk: strict JSON (non-finite metrics as strings)
    with ``format_version`` and ``manifest_sha256`` set."""
    manifest = dict(manifest, format=FORMAT_NAME, format_version=FORMAT_VERSION)
    manifest.pop(CHECKSUM_KEY, None)
    if "metrics" in manifest:
        manifest["metrics"] = _strict_metrics(manifest["metrics"])
    try:
        digest = hashlib.sha256(_canonical(manifest)).hexdigest()
    except ValueError as e:  # a NaN outside the metrics: never written as bare NaN
        raise ValueError(f"a checkpoint manifest must be strict JSON: {e}") from e
    manifest[CHECKSUM_KEY] = digest
    return json.dumps(manifest, allow_nan=False).encode()


# --- reading ---------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"bare {name} is not JSON")


_VALID_CACHE_SIZE = 64
_valid: collections.OrderedDict[bytes, None] = collections.OrderedDict()
"""SHA-256 digests of manifest texts that passed `parse_manifest`'s checks, newest
last. The checks are a pure function of the text, so the same text read again (a
restore reads the newest manifest while choosing the checkpoint, then again to load
it; ``ckpt list`` then ``inspect``) is only parsed: ~1 ms less per read of a manifest
of a few hundred tensors. Keyed by content, not by file identity: a manifest changed
in place between the reads is checked in full again."""
_valid_lock = threading.Lock()


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """Parse and validate manifest bytes; ``where`` (the manifest's path) is named in
    every error. Returns the manifest with non-finite metrics as floats again (a new
    object on every call: callers may change it)."""
    digest = hashlib.sha256(raw).digest()
    with _valid_lock:
        known = digest in _valid
        if known:
            _valid.move_to_end(digest)
    if known:  # the very text passed every check below
        manifest = json.loads(raw, parse_constant=_reject_constant)
    else:
        manifest = _parse_checked(raw, where)
        with _valid_lock:
            _valid[digest] = None
            while len(_valid) > _VALID_CACHE_SIZE:
                _valid.popitem(last=False)
    metrics = manifest.get("metrics")
    if isinstance(metrics, dict):
        manifest["metrics"] = {
            k: _NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in metrics.items()
        }
    return manifest


def _parse_checked(raw: bytes, where: str) -> dict[str, Any]:
    """`parse_manifest` of a text not yet seen: every check of the schema."""
    def corrupt(why: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"{where} is not a valid manifest: {why}")

    if _raw_depth(raw) > MAX_DEPTH:
        raise corrupt(f"nested deeper than {MAX_DEPTH} levels")
    try:
        manifest = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise corrupt(str(e)[:200]) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise corrupt("not a recframe manifest")
    version = manifest.get("format_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise corrupt(f"format_version {version!r} is not a version number")
    if version > FORMAT_VERSION:
        raise CheckpointVersionError(
            f"{where} is format version {version}; this recframe reads format versions up "
            f"to {FORMAT_VERSION}: upgrade recframe to load it"
        )
    if version >= 2:
        claimed = manifest.get(CHECKSUM_KEY)
        if not isinstance(claimed, str):
            raise corrupt(f"missing {CHECKSUM_KEY!r}")
        if hashlib.sha256(_canonical(manifest)).hexdigest() != claimed:
            raise corrupt("its checksum does not match its content (edited or damaged)")
    try:
        _Validator(manifest).run()
    except _Invalid as e:
        raise corrupt(str(e)) from None
    return manifest


def _raw_depth(raw: bytes) -> int:
    """Deepest ``[``/``{`` nesting of JSON text, outside strings, found before parsing
    it (the parser itself recurses): escapes and strings are cut out, then the running
    count of the brackets left is summed up (all in C)."""
    import numpy as np

    text = _STRINGS_RE.sub(b"", _ESCAPES_RE.sub(b"", raw))
    brackets = np.frombuffer(text.translate(None, _NOT_BRACKETS), dtype=np.uint8)
    if not brackets.size:
        return 0
    steps = np.where((brackets == 0x5B) | (brackets == 0x7B), 1, -1)
    return int(np.cumsum(steps).max())


_ESCAPES_RE = re.compile(rb"\\.", re.S)
_STRINGS_RE = re.compile(rb'"[^"]*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


class _Invalid(ValueError):
    pass


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def check_file_name(name: Any, what: str) -> str:
    """A file name a manifest gives must be a plain name (no directory part, no
    ``..``, not absolute, no leading dot): files live inside their checkpoint."""
    if not isinstance(name, str) or not _FILE_NAME_RE.match(name) or name in (".", ".."):
        raise _Invalid(f"{what}: file name {str(name)[:80]!r} is not a plain file name inside "
                       "the checkpoint directory")
    return name


def check_link_name(name: Any, what: str) -> str:
    """An incremental chain link must name a checkpoint of the same output dir."""
    if not isinstance(name, str) or not CKPT_NAME_RE.match(name):
        raise _Invalid(f"{what}: {str(name)[:80]!r} is not a checkpoint of this output dir "
                       "(ckpt_<step>)")
    return name


class _Validator:
    def __init__(self, manifest: dict[str, Any]) -> None:
        self.m = manifest

    def run(self) -> None:
        m = self.m
        for key in ("files", "tensors", "parts"):
            if not isinstance(m.get(key), dict):
                raise _Invalid(f"missing {key!r} (or not an object)")
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise _Invalid(f"'name' is {type(name).__name__}, not a string")
        step = m.get("step")
        if step is not None and not (_is_int(step) and step >= 0):
            raise _Invalid(f"'step' {step!r} is not a step number")
        world = m.get("world_size", 1)
        if not (_is_int(world) and world >= 1):
            raise _Invalid(f"'world_size' {world!r} is not a number of ranks >= 1")
        created = m.get("created_unix")
        if created is not None and not _is_number(created):
            raise _Invalid(f"'created_unix' {created!r} is not a time")
        for key in ("recframe_version", "run_id"):
            if m.get(key) is not None and not isinstance(m[key], str):
                raise _Invalid(f"{key!r} is {type(m[key]).__name__}, not a string")
        metrics = m.get("metrics")
        if metrics is not None:
            if not isinstance(metrics, dict):
                raise _Invalid("'metrics' is not an object")
            for key, value in metrics.items():
                if value is not None and not isinstance(value, (bool, str)) \
                        and not _is_number(value):
                    raise _Invalid(f"metric {key!r} is {value!r}, not a number")
        self.files(m["files"])
        self.tensors(m["tensors"], m["files"])
        self.parts(m["parts"], m["tensors"])
        if m.get("incremental") is not None:
            self.incremental(m["incremental"])

    def files(self, files: dict[str, Any]) -> None:
        for fname, entry in files.items():
            check_file_name(fname, "files")
            if not isinstance(entry, dict):
                raise _Invalid(f"files[{fname!r}] is not an object")
            size = entry.get("size")
            if not (_is_int(size) and size >= 0):
                raise _Invalid(f"files[{fname!r}].size {size!r} is not a byte count")
            crcs = entry.get("crc32", [])
            if not isinstance(crcs, list) or not all(_is_crc(c) for c in crcs):
                raise _Invalid(f"files[{fname!r}].crc32 is not a list of CRC32 values")
            rank = entry.get("rank", 0)
            if not (_is_int(rank) and rank >= 0):
                raise _Invalid(f"files[{fname!r}].rank {rank!r} is not a rank")

    def tensors(self, tensors: dict[str, Any], files: dict[str, Any]) -> None:
        for key, entry in tensors.items():
            where = f"tensor {key!r}"
            if not isinstance(entry, dict):
                raise _Invalid(f"{where} is not an object")
            dtype = entry.get("dtype")
            if not isinstance(dtype, str) or dtype not in _DTYPES:
                raise _Invalid(f"{where}: unknown dtype {str(dtype)[:40]!r}")
            element = _DTYPES[dtype].itemsize
            shape = _dims(entry.get("shape"), f"{where}.shape")
            shards = entry.get("shards")
            if not isinstance(shards, list):
                raise _Invalid(f"{where}.shards is not a list")
            volume = 0
            for i, shard in enumerate(shards):
                volume += self.shard(shard, f"{where} shard {i}", shape, element, files)
            _disjoint([s for s in shards if math.prod(s["sizes"])], where)
            if shards and volume != math.prod(shape):
                raise _Invalid(f"{where}: its shards hold {volume} elements, its shape "
                               f"{shape} has {math.prod(shape)}")
            if not shards and math.prod(shape):
                raise _Invalid(f"{where} of shape {shape} has no shards")

    def shard(
        self, shard: Any, where: str, shape: list[int], element: int, files: dict[str, Any]
    ) -> int:
        if not isinstance(shard, dict):
            raise _Invalid(f"{where} is not an object")
        offsets = _dims(shard.get("offsets"), f"{where}.offsets")
        sizes = _dims(shard.get("sizes"), f"{where}.sizes")
        if len(offsets) != len(shape) or len(sizes) != len(shape):
            raise _Invalid(f"{where}: offsets/sizes do not have the {len(shape)} dims of "
                           "the tensor")
        for o, s, n in zip(offsets, sizes, shape):
            if o + s > n:
                raise _Invalid(f"{where}: offsets {offsets} + sizes {sizes} exceed the "
                               f"shape {shape}")
        chunks = shard.get("chunks")
        if not isinstance(chunks, list):
            raise _Invalid(f"{where}.chunks is not a list")
        rows = sizes[0] if sizes else 1
        row_bytes = math.prod(sizes[1:]) * element if sizes else element
        volume = math.prod(sizes)
        covered = 0
        spans: list[list[int]] = []
        for j, chunk in enumerate(chunks):
            at = f"{where} chunk {j}"
            if not isinstance(chunk, dict):
                raise _Invalid(f"{at} is not an object")
            fname = check_file_name(chunk.get("file"), at)
            if fname not in files:
                raise _Invalid(f"{at}: file {fname!r} is not in the manifest's file list")
            offset, nbytes, crc = chunk.get("offset"), chunk.get("nbytes"), chunk.get("crc32")
            if not (_is_int(offset) and offset >= 0):
                raise _Invalid(f"{at}: offset {offset!r} is not a byte offset")
            if not (_is_int(nbytes) and nbytes >= 0):
                raise _Invalid(f"{at}: nbytes {nbytes!r} is not a byte count")
            if not _is_crc(crc):
                raise _Invalid(f"{at}: missing or invalid crc32 {crc!r}")
            span = chunk.get("rows")
            if not (isinstance(span, list) and len(span) == 2 and all(map(_is_int, span))
                    and 0 <= span[0] < span[1] <= rows):
                raise _Invalid(f"{at}: rows {str(span)[:40]} are not a row range of the "
                               f"shard's {rows} rows")
            if nbytes != (span[1] - span[0]) * row_bytes:
                raise _Invalid(f"{at}: nbytes {nbytes} is not the {span[1] - span[0]} rows' "
                               f"{(span[1] - span[0]) * row_bytes} bytes")
            if offset + nbytes > files[fname]["size"]:
                raise _Invalid(f"{at}: bytes {offset}..{offset + nbytes} lie past the end of "
                               f"{fname!r} ({files[fname]['size']} bytes)")
            covered += span[1] - span[0]
            spans.append(span)
        if volume and covered != rows:
            raise _Invalid(f"{where}: its chunks cover {covered} of its {rows} rows")
        # each row exactly once: overlapping chunks would leave other rows unread (old
        # values in a live tensor, uninitialized memory in a fresh one)
        end = 0
        for start, stop in sorted(spans):
            if start != end:
                raise _Invalid(f"{where}: its chunks overlap or leave a gap at row "
                               f"{min(start, end)}")
            end = stop
        return volume

    def parts(self, parts: dict[str, Any], tensors: dict[str, Any]) -> None:
        for part, tree in parts.items():
            if part in PER_RANK_PARTS:
                if not isinstance(tree, dict):
                    raise _Invalid(f"part {part!r} is not an object of per-rank trees")
                for rank, sub in tree.items():
                    if not rank.isdigit():
                        raise _Invalid(f"part {part!r}: {rank!r} is not a rank")
                    _check_tree(sub, f"part {part!r} rank {rank}", tensors)
            else:
                _check_tree(tree, f"part {part!r}", tensors)

    def incremental(self, inc: Any) -> None:
        if not isinstance(inc, dict):
            raise _Invalid("'incremental' is not an object")
        kind = inc.get("kind")
        if kind not in ("full", "delta"):
            raise _Invalid(f"incremental kind {str(kind)[:40]!r} is neither full nor delta")
        chain = inc.get("chain")
        if not isinstance(chain, list) or not chain:
            raise _Invalid("incremental chain is not a list of checkpoints")
        for link in chain:
            check_link_name(link, "incremental chain")
        if kind == "delta" and len(chain) < 2:
            raise _Invalid("a delta's incremental chain needs its base")
        for key in ("base", "parent"):
            if inc.get(key) is not None:
                check_link_name(inc[key], f"incremental {key}")
        since = inc.get("deltas_since_full", 0)
        if not (_is_int(since) and since >= 0):
            raise _Invalid(f"incremental deltas_since_full {since!r} is not a count")
        tables = inc.get("tables")
        if tables is not None:
            if not isinstance(tables, dict):
                raise _Invalid("incremental tables is not an object")
            for key, entry in tables.items():
                if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
                    raise _Invalid(f"incremental table {key!r} has no valid dtype")
                if entry.get("shape") is not None:
                    _dims(entry["shape"], f"incremental table {key!r} shape")
        changed = inc.get("changed_rows")
        if changed is not None and not (
            isinstance(changed, dict) and all(_is_int(v) and v >= 0 for v in changed.values())
        ):
            raise _Invalid("incremental changed_rows is not an object of row counts")


def _disjoint(shards: list[dict[str, Any]], where: str) -> None:
    """Non-empty shard boxes must not overlap (with their volumes summing to the
    tensor's, they then cover it exactly once). A sweep along dim 0: row-wise layouts
    compare each shard with one other, column-wise ones with the shards beside it."""
    boxes = sorted((s["offsets"], s["sizes"]) for s in shards)
    active: list[tuple[list[int], list[int]]] = []
    for off, size in boxes:
        if not off:  # a 0-dim tensor: one shard at most
            if active:
                raise _Invalid(f"{where}: more than one shard of a 0-dim tensor")
            active.append((off, size))
            continue
        active = [(o, s) for o, s in active if o[0] + s[0] > off[0]]
        for o, s in active:
            if all(a < b + n and b < a + m for a, m, b, n in zip(off, size, o, s)):
                raise _Invalid(f"{where}: shards at offsets {o} and {off} overlap")
        active.append((off, size))


def _is_crc(value: Any) -> bool:
    return _is_int(value) and 0 <= value < 1 << 32


def _dims(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or len(value) > MAX_DIMS \
            or not all(_is_int(n) and n >= 0 for n in value):
        raise _Invalid(f"{where} {str(value)[:60]} is not a list of non-negative integers")
    return value


_SCALARS = (type(None), bool, int, float, str)


def _check_tree(tree: Any, where: str, tensors: dict[str, Any]) -> None:
    """An encoded state tree (see `recframe.checkpoint.format.encode_tree`): every node
    well-formed, every tensor reference in ``tensors``, dict keys hashable."""
    stack: list[tuple[Any, bool]] = [(tree, False)]
    while stack:
        node, is_key = stack.pop()
        if isinstance(node, _SCALARS):
            if isinstance(node, float) and not math.isfinite(node):
                raise _Invalid(f"{where}: a bare non-finite number")
            continue
        if isinstance(node, list):
            if is_key:
                raise _Invalid(f"{where}: a list used as a dict key")
            stack.extend((v, False) for v in node)
            continue
        if not isinstance(node, dict) or len(node) not in (1, 2):
            raise _Invalid(f"{where}: malformed state tree node {str(node)[:60]!r}")
        if "t" in node:
            key = node["t"]
            if not isinstance(key, str) or key not in tensors:
                raise _Invalid(f"{where}: tensor {str(key)[:80]!r} is not in the manifest")
            if len(node) == 2 and not isinstance(node.get("np"), bool):
                raise _Invalid(f"{where}: malformed tensor reference {str(node)[:60]!r}")
            if is_key:
                raise _Invalid(f"{where}: a tensor used as a dict key")
            continue
        if len(node) != 1:
            raise _Invalid(f"{where}: malformed state tree node {str(node)[:60]!r}")
        ((tag, value),) = node.items()
        if tag in ("l", "tu", "d") and not isinstance(value, list):
            raise _Invalid(f"{where}: {tag!r} node holds {type(value).__name__}, not a list")
        if tag == "d":
            if is_key:
                raise _Invalid(f"{where}: a dict used as a dict key")
            for pair in value:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise _Invalid(f"{where}: a dict entry is not a [key, value] pair")
                stack.append((pair[0], True))
                stack.append((pair[1], False))
        elif tag == "l":
            if is_key:
                raise _Invalid(f"{where}: a list used as a dict key")
            stack.extend((v, False) for v in value)
        elif tag == "tu":
            stack.extend((v, is_key) for v in value)
        elif tag == "f":
            try:
                float(value)
            except (TypeError, ValueError):
                raise _Invalid(f"{where}: {str(value)[:40]!r} is not a number") from None
        elif tag == "dt":
            if not isinstance(value, str) or value not in _DTYPES:
                raise _Invalid(f"{where}: unknown dtype {str(value)[:40]!r}")
        elif tag == "b":
            try:
                base64.b64decode(value, validate=True)
            except (TypeError, ValueError, binascii.Error):
                raise _Invalid(f"{where}: invalid base64 bytes") from None
        else:
            raise _Invalid(f"{where}: unknown state tree tag {str(tag)[:20]!r}")


def ckpt_dir_name(path: str) -> Optional[str]:
    """The ``ckpt_<n>`` name of a checkpoint directory path (None for another name)."""
    name = path.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]
    return name if CKPT_NAME_RE.match(name) else None
