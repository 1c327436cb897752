"""Incremental checkpoints: write only the embedding-table rows that changed.

A *delta* checkpoint is an ordinary checkpoint (same writer, same manifest-last
commit) in which every *tracked* table tensor (a table in part ``sparse``, and each of
its optimizer-state tensors in ``sparse_opt`` whose leading dimension is the table's
rows) is replaced by the rows a `recframe.optim.tracking.RowTracker` saw change since
the previous committed checkpoint: part ``delta`` holds, per rank and per local shard,
``rows`` (int64 global row ids) and ``values`` (those rows). Everything else (dense
part, untracked tensors, optimizer scalars, extra, io_state) is written in full. In
the state trees a tracked tensor is a zero-size placeholder; its real shape and dtype
are in the manifest's ``incremental`` section::

    "incremental": {"kind": "delta", "base": "ckpt_100", "parent": "ckpt_140",
                    "chain": ["ckpt_100", "ckpt_120", "ckpt_140", "ckpt_160"],
                    "deltas_since_full": 3,
                    "tables": {"sparse.emb.weight": {"shape": [...], "dtype": "float32"}},
                    "changed_rows": {"emb.weight": 5120},
                    "id": "9f0c...", "parent_id": "41be..."}

``id`` is random, drawn when the checkpoint is planned; a delta's ``parent_id`` is its
parent's ``id``, so a chain link replaced by another run's checkpoint of the same name
and layout is refused (checkpoints written before these fields: not checked).

A full checkpoint written in incremental mode has ``kind: full`` and ``chain: [self]``
(a checkpoint without the section is a full one too). Restoring a delta loads its base
(``chain[0]``), applies each delta's rows in order (``index_copy_`` into the live
tensors; under sharding each rank applies the rows of its own shards), then loads the
target's full parts: the result is bit-identical to a full checkpoint of that step.
Every link is checked first (committed, same chain, same table layout); a missing or
inconsistent link raises `CheckpointCorruptError` naming it, so `CheckpointManager`
falls back to the newest checkpoint whose chain is complete.

A delta is written only when the tracker can prove what changed (`plan_save`): else,
and every ``full_checkpoint_every`` saves, the checkpoint is full.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import threading
import uuid
from collections.abc import Iterable
from typing import Any, Optional

import torch

from recframe.checkpoint.format import (
    CheckpointCorruptError,
    TensorReader,
    decode_tree,
    dtype_from_name,
    dtype_name,
    encode_tree,
    global_shape,
    is_sharded,
    local_regions,
)

logger = logging.getLogger("recframe.checkpoint")

FULL = "full"
DELTA = "delta"
SMALL_DELTA_BYTES = 16 << 20
"""A delta's rows up to this size are read without a thread pool."""
PREFETCH_DELTAS = True
"""Ask the kernel to read a chain's small deltas' data files ahead (`_Staging`)."""
LOCAL_DELTA_READERS = 1
"""Threads reading a chain's deltas on a local disk: one, in chain order, while the
reader pool verifies the base (its files asked for ahead: a cold disk serves them side
by side anyway; a second reader measured no faster on 2 cores)."""
OPEN_AHEAD_FILES = 64
"""At most this many of a chain's delta data files are held open ahead (`_Staging`); a
longer chain's others are opened, asked for ahead and closed, and opened again at their
read: a chain of hundreds of deltas must not run the process out of file descriptors."""
PARALLEL_DELTA_READS = True
"""Read a chain's deltas side by side on object stores (latency-bound, ``concurrency``
threads); a local disk: `LOCAL_DELTA_READERS`."""


def section(manifest: dict[str, Any]) -> dict[str, Any]:
    """The ``incremental`` section of a manifest (a full checkpoint's when absent)."""
    found = manifest.get("incremental")
    if isinstance(found, dict):
        return found
    return {"kind": FULL, "chain": [manifest.get("name")]}


def is_delta(manifest: dict[str, Any]) -> bool:
    return section(manifest).get("kind") == DELTA


# --- which tensors are tracked --------------------------------------------------------
def tracked_tensors(state: dict[str, Any], tracker: Any) -> dict[str, tuple[str, Any]]:
    """``{tensor key: (table key, tensor)}`` for the tracked table tensors of ``state``
    (the keys are those `encode_tree` gives them in the checkpoint)."""
    found: dict[str, tuple[str, Any]] = {}
    sparse = state.get("sparse") or {}
    for table in tracker.bits:
        if table in sparse:
            found[f"sparse.{table}"] = (table, sparse[table])
    opt_state = (state.get("sparse_opt") or {}).get("state")
    if isinstance(opt_state, dict):
        for okey, entries in opt_state.items():
            table = tracker.optimizer_keys.get(okey)
            if table is None or not isinstance(entries, dict):
                continue
            rows = tracker.bits[table].shape[0]
            for name, value in entries.items():
                size = _size(value)
                if size is not None and len(size) >= 1 and size[0] == rows:
                    found[f"sparse_opt.state.{okey}.{name}"] = (table, value)
    # the keys must be exactly the ones encode_tree assigns (no collision suffixes)
    for part in ("sparse", "sparse_opt"):
        if part in state:
            encoded: dict[str, Any] = {}
            encode_tree(state[part], part, encoded)
            for key, (_, value) in list(found.items()):
                if key.startswith(part + ".") and encoded.get(key) is not value:
                    del found[key]
    return found


def _size(value: Any) -> Optional[list[int]]:
    if is_sharded(value):
        return list(value.size())
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    return None


def _layout(tracked: dict[str, tuple[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        key: {"table": table, "shape": _size(value), "dtype": dtype_name(value.dtype)}
        for key, (table, value) in sorted(tracked.items())
    }


# --- saving -----------------------------------------------------------------------
def plan_save(
    state: dict[str, Any],
    tracker: Any,
    name: str,
    taken: dict[str, torch.Tensor],
    full_policy: Any,
    force_full: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state to write, manifest ``incremental`` section) of checkpoint ``name``.

    A delta when the tracker is valid (it saw every change since its base, the last
    committed checkpoint), the tracked tensors have the base's layout, the chain is
    short enough for ``full_policy`` (`recframe.checkpoint.policies.FullEvery`) and
    ``force_full`` is false; else a full checkpoint. ``taken``: the tracker's bitmaps
    (`RowTracker.take`)."""
    tracked = tracked_tensors(state, tracker)
    layout = _layout(tracked)
    base = tracker.base
    why = None
    if force_full:
        why = "requested"
    elif not tracker.valid or base is None:
        why = "no committed checkpoint the row tracker counts from"
    elif base.get("tables") != layout:
        why = "the tracked tables or optimizer state changed layout"
    elif full_policy.needs_full(int(base.get("deltas_since_full", 0))):
        why = f"full_checkpoint_every={full_policy.n}"
    if why is not None:
        logger.info("checkpoint %s is a full one (%s)", name, why)
        return state, {"kind": FULL, "base": name, "parent": None, "chain": [name],
                       "deltas_since_full": 0, "tables": layout, "id": uuid.uuid4().hex}
    delta: dict[str, Any] = {}
    placeholders: dict[str, torch.Tensor] = {}
    changed: dict[str, int] = {}
    rows_of: dict[str, torch.Tensor] = {}
    for key, (table, value) in tracked.items():
        if table not in rows_of:
            rows_of[table] = taken[table].nonzero().squeeze(1).cpu()
            changed[table] = int(rows_of[table].numel())
        delta[key] = _shard_rows(value, rows_of[table])
        placeholders[key] = torch.empty(0, dtype=value.dtype)
    out = dict(state)
    out["sparse"] = {
        k: placeholders.get(f"sparse.{k}", v) for k, v in state.get("sparse", {}).items()
    }
    if "sparse_opt" in state:
        out["sparse_opt"] = _replace_opt(state["sparse_opt"], placeholders)
    out["delta"] = {"tables": delta}
    chain = list(base["chain"]) + [name]
    section_out = {"kind": DELTA, "base": chain[0], "parent": chain[-2], "chain": chain,
                   "deltas_since_full": int(base.get("deltas_since_full", 0)) + 1,
                   "tables": layout, "changed_rows": changed, "id": uuid.uuid4().hex}
    if base.get("id") is not None:
        section_out["parent_id"] = base["id"]
    return out, section_out


def _shard_rows(value: Any, rows: torch.Tensor) -> list[dict[str, Any]]:
    """Per local shard: its offsets/sizes, the changed global rows inside it and their
    values (fresh tensors: training may go on while they are written)."""
    if is_sharded(value):
        shards = [(list(s.metadata.shard_offsets), list(s.metadata.shard_sizes), s.tensor)
                  for s in value.local_shards()]
    else:
        shards = [([0] * value.dim(), list(value.shape), value)]
    out = []
    for offsets, sizes, local in shards:
        lo, hi = offsets[0], offsets[0] + sizes[0]
        mine = rows[(rows >= lo) & (rows < hi)]
        values = local.detach().index_select(0, (mine - lo).to(local.device)).cpu()
        out.append({"offsets": offsets, "sizes": sizes, "rows": mine.clone(),
                    "values": values})
    return out


def _replace_opt(opt_state: dict[str, Any], placeholders: dict[str, torch.Tensor]) -> Any:
    """A copy of a sparse optimizer state dict with tracked tensors replaced (the live
    per-parameter dicts are never modified)."""
    out = dict(opt_state)
    state = opt_state.get("state")
    if isinstance(state, dict):
        new_state = {}
        for okey, entries in state.items():
            if isinstance(entries, dict):
                entries = {
                    n: placeholders.get(f"sparse_opt.state.{okey}.{n}", v)
                    for n, v in entries.items()
                }
            new_state[okey] = entries
        out["state"] = new_state
    return out


# --- chains -----------------------------------------------------------------------
def chain_steps(manifest: dict[str, Any]) -> list[str]:
    """Names of the checkpoints a checkpoint needs, itself last."""
    chain = section(manifest).get("chain")
    return [str(c) for c in chain] if isinstance(chain, list) and chain else [manifest["name"]]


def keep_closure(found: Iterable[Any], keep: set[int]) -> set[int]:
    """``keep`` plus every checkpoint the chain of a kept checkpoint needs (its base and
    the deltas before it)."""
    by_name = {c.name: c for c in found}
    kept = set(keep)
    for c in list(by_name.values()):
        if c.step in keep:
            for link in chain_steps(c.manifest):
                if link in by_name:
                    kept.add(by_name[link].step)
    return kept


def resolve_chain(
    storage: Any, directory: str, manifest: dict[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """``[(path, manifest)]`` of a delta's chain, base first, itself last; raises
    `CheckpointCorruptError` naming the first missing or inconsistent link. Every link
    is a checkpoint of the same output dir (``ckpt_<n>`` next to this one), and the
    chain ends with this checkpoint's own directory name (never a name it claims)."""
    from recframe.checkpoint.manifest import CKPT_NAME_RE, ckpt_dir_name
    from recframe.checkpoint.saver import read_manifest

    own = section(manifest)
    chain = own.get("chain")
    name = ckpt_dir_name(directory)
    where = storage.display(directory)
    if not isinstance(chain, list) or len(chain) < 2 or chain[-1] != name:
        raise CheckpointCorruptError(
            f"{where}: malformed incremental chain {str(chain)[:200]} (it must end with "
            f"this checkpoint, {name})"
        )
    parent_dir = posixpath.dirname(directory.rstrip("/"))
    if storage.is_local:
        parent_dir = os.path.dirname(os.path.abspath(directory).rstrip(os.sep))
    links: list[tuple[str, dict[str, Any]]] = []
    for i, link in enumerate(chain[:-1]):
        if not isinstance(link, str) or not CKPT_NAME_RE.match(link):
            raise CheckpointCorruptError(
                f"{where}: incremental chain link {str(link)[:80]!r} is not a checkpoint of "
                "the same output dir (ckpt_<step>); refused"
            )
        path = storage.join(parent_dir, link)
        try:
            found = read_manifest(storage, path)
        except CheckpointCorruptError as e:
            raise CheckpointCorruptError(
                f"{where} needs {storage.display(path)} (link {i + 1} of {len(chain)} of its "
                f"chain), which is corrupt: {e}"
            ) from e
        except OSError as e:
            raise CheckpointCorruptError(
                f"{where} needs {storage.display(path)} (link {i + 1} of {len(chain)} of its "
                f"chain), which cannot be read: {e}"
            ) from e
        if found is None:
            raise CheckpointCorruptError(
                f"{where} needs {storage.display(path)} (link {i + 1} of {len(chain)} of its "
                "chain), which is missing or uncommitted; restore an older checkpoint whose "
                "chain is complete"
            )
        theirs = section(found)
        expected_kind = FULL if i == 0 else DELTA
        layout = theirs.get("tables")
        their_chain = theirs.get("chain") if isinstance(theirs.get("chain"), list) else [link]
        if (theirs.get("kind") != expected_kind or their_chain != chain[: i + 1]
                or (layout is not None and layout != own.get("tables"))):
            raise CheckpointCorruptError(
                f"{where} needs {storage.display(path)} (link {i + 1} of {len(chain)} of its "
                f"chain), but that checkpoint belongs to another chain ({theirs.get('kind')}, "
                f"chain {their_chain}); it was overwritten by another run"
            )
        links.append((path, found))
    links.append((directory, manifest))
    for i in range(1, len(links)):
        parent_id = section(links[i][1]).get("parent_id")
        if parent_id is not None and parent_id != section(links[i - 1][1]).get("id"):
            raise CheckpointCorruptError(
                f"{where} needs {storage.display(links[i][0])} and "
                f"{storage.display(links[i - 1][0])}, which are not of one chain (the parent "
                "id one records is not the other's id): one of them was replaced by another "
                "run's checkpoint"
            )
    return links


# --- restoring --------------------------------------------------------------------
def plan_chain(
    saver: Any, txn: Any, storage: Any, directory: str, manifest: dict[str, Any],
    parts: list[str], strict: bool,
) -> frozenset[str]:
    """Plan restoring a delta's tables into the restore transaction ``txn``
    (`recframe.checkpoint.restore`): its base's table parts (through the same part
    loaders as any restore), then each delta's rows in chain order. Every delta's rows
    are read and checked (CRC32, bounds, shapes) before anything live changes, each
    small delta's data files in one read each (`_read_small`: checked on the bytes
    read). The deltas are read while the base is planned and verified (one thread
    reading them in order; on an object store ``saver.concurrency`` deltas side by side)
    and awaited by the transaction's `check` at the end of its verify: a cold restore
    reads them while the base's chunks are read and checked. Returns the tracked
    tensor keys (their values come from the chain, not from the delta's own parts)."""
    from concurrent.futures import CancelledError, ThreadPoolExecutor

    from recframe.checkpoint.restore import plan_parts

    links = resolve_chain(storage, directory, manifest)
    tables = section(manifest).get("tables") or {}
    tracked = frozenset(tables)
    table_parts = [p for p in ("sparse", "sparse_opt") if p in parts
                   and (p == "sparse" or saver.sparse_optimizer is not None)]
    if not table_parts:
        return tracked
    base_path, base_manifest = links[0]
    logger.info("restoring %s: base %s and %d delta(s)", storage.display(directory),
                storage.display(base_path), len(links) - 1)
    layout = _live_tensors(saver, table_parts)  # the local shards' layout (loading keeps it)
    staging = _Staging(storage)
    plans = [_plan_rows(saver, storage, path, m, table_parts, layout, staging)
             for path, m in links[1:]]
    if PARALLEL_DELTA_READS and not getattr(storage, "is_local", True):
        workers = min(len(plans), saver.concurrency)
    else:
        workers = min(len(plans), LOCAL_DELTA_READERS)
    parallel = workers > 1
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="ckpt-delta")
    stop = threading.Event()

    def read_in_order() -> list[dict[str, Any]]:
        datas = []
        for _, _, read in plans:
            if stop.is_set():  # the restore ended (failed, interrupted): read no more
                raise CancelledError()
            datas.append(read())
        return datas

    def end_reads() -> None:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)

    # when the restore ends, applied or not: reads not started are dropped, the others
    # awaited, the threads joined, files opened ahead and not read closed
    txn.on_close(staging.close)
    txn.on_close(end_reads)
    if parallel:
        futures = [pool.submit(read) for _, _, read in plans]
    else:
        futures = [pool.submit(read_in_order)]
    plan_parts(saver, txn, storage, base_path, base_manifest, table_parts, strict)
    datas: list[dict[str, Any]] = []

    def check() -> None:
        # after the transaction verified every checkpoint's chunks (the base's: the
        # bulk of a cold restore, read meanwhile): every delta's rows, nothing written
        datas.extend([f.result() for f in futures] if parallel else futures[0].result())
        # a table's optimizer state the optimizer does not hold yet (created lazily) is
        # the base's, which the base's load installs
        stand_ins = dict(layout)
        for _, jobs, _ in plans:
            for _, key in jobs:
                entry = base_manifest["tensors"].get(key)
                if key not in stand_ins and entry is not None:
                    stand_ins[key] = torch.empty(entry["shape"], device="meta",
                                                 dtype=dtype_from_name(entry["dtype"]))
        _copy_all(plans, datas, stand_ins, dry_run=True)

    txn.check(check)

    def apply() -> None:
        live = _live_tensors(saver, table_parts)  # (a torch optimizer's load may replace them)
        # many small copies: one thread (on a shared machine a parallel region waits for
        # a descheduled worker at every op: measured 50x slower with a busy neighbour)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _copy_all(plans, datas, live)
        finally:
            torch.set_num_threads(threads)

    txn.call(apply)
    return tracked


def _live_tensors(saver: Any, parts: Iterable[str]) -> dict[str, Any]:
    from recframe.checkpoint.saver import split_model_state

    live: dict[str, Any] = {}
    for part in parts:
        if part == "sparse":
            encode_tree(split_model_state(saver.model)[0], "sparse", live)
        elif part == "sparse_opt" and saver.sparse_optimizer is not None:
            try:
                encode_tree(saver.sparse_optimizer.state_dict(), "sparse_opt", live)
            except TypeError:
                pass
    return live


def _ndim(target: Any) -> int:
    """Dims of a live (or stand-in) tensor, without a ``ShardedTensor``'s dispatch (a
    chain restore asks once per saved shard per pass): `format.global_shape`."""
    return len(global_shape(target))


def _plan_rows(
    saver: Any, storage: Any, path: str, manifest: dict[str, Any], parts: list[str],
    layout: dict[str, Any], staging: Optional[_Staging] = None,
) -> tuple[str, list[tuple[dict[str, Any], str]], Any]:
    """(where, [(saved shard entry, tensor key)], a function reading the rows and values
    this rank needs) of one delta. ``layout``: live tensors whose local shards tell which
    saved shards overlap this rank's (a key not there yet: every shard is read).
    ``staging``: where a small delta's bytes are read (its size reserved now)."""
    where = storage.display(path)
    jobs: list[tuple[dict[str, Any], str]] = []
    for rank_tree in (manifest.get("parts", {}).get("delta") or {}).values():
        tables = _delta_tables(decode_tree(rank_tree, _Key), where)
        for key, shards in tables.items():
            if not key.startswith(tuple(p + "." for p in parts)):
                continue
            target = layout.get(key)
            for shard in shards:
                if target is not None and len(shard["offsets"]) != _ndim(target):
                    raise CheckpointCorruptError(
                        f"{where}: delta rows of {key!r} have {len(shard['offsets'])} dims, "
                        f"the table has {_ndim(target)}"
                    )
                if target is None or any(_overlap(shard, off, local)
                                         for off, local in local_regions(target)):
                    jobs.append((shard, key))
    needed = {str(k): None for shard, _ in jobs for k in (shard["rows"], shard["values"])}
    nbytes = sum(c["nbytes"] for key in needed for sh in manifest["tensors"][key]["shards"]
                 for c in sh["chunks"])
    if nbytes <= SMALL_DELTA_BYTES:  # each data file in one read, no thread pool
        entries, ends = _small_extents(storage, path, manifest["tensors"], needed)
        if staging is not None:
            staging.reserve(path, ends)
        return where, jobs, lambda: _read_small(storage, path, entries, ends, staging)
    reader = TensorReader(storage, path, manifest["tensors"], saver.concurrency)
    return where, jobs, lambda: reader.read_many(needed)


class _Key(str):
    """A tensor key standing in for its tensor while a tree is decoded."""

    def numpy(self) -> _Key:
        return self


def _delta_tables(tree: Any, where: str) -> dict[str, list[dict[str, Any]]]:
    """The ``tables`` of one rank's delta tree, checked: per tensor key, shards with
    ``offsets``/``sizes`` (lists of ints) and ``rows``/``values`` (tensor keys)."""
    def bad(why: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"{where}: malformed delta part: {why}")

    tables = tree.get("tables", {}) if isinstance(tree, dict) else None
    if not isinstance(tables, dict):
        raise bad("no dict of tables")
    for key, shards in tables.items():
        if not isinstance(key, str) or not isinstance(shards, list):
            raise bad(f"table {str(key)[:80]!r} is not a list of shards")
        for shard in shards:
            if not isinstance(shard, dict):
                raise bad(f"a shard of {key!r} is not a dict")
            for field in ("offsets", "sizes"):
                dims = shard.get(field)
                if not isinstance(dims, list) or not dims or not all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in dims
                ):
                    raise bad(f"a shard of {key!r} has no valid {field}")
            if len(shard["offsets"]) != len(shard["sizes"]):
                raise bad(f"a shard of {key!r} has offsets and sizes of different lengths")
            if not isinstance(shard.get("rows"), _Key) or not isinstance(shard.get("values"),
                                                                        _Key):
                raise bad(f"a shard of {key!r} has no rows/values tensors")
    return tables


class _Staging:
    """Where a chain's small deltas are read: each local data file opened ahead (its
    pages asked for ahead, ``POSIX_FADV_WILLNEED``, at the first read: a cold chain's
    files come from the disk side by side, not one request at a time; its real size
    checked against what the manifest places in it) and read into one buffer allocated
    then, sized by the files that checked out (the tensors read are views of it: no
    copy). A file not opened ahead (an object store's, a bad one) is read into its own
    memory after its own open checked its size: a manifest's claims alone never size
    an allocation."""

    ALIGN = 64

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.files: dict[tuple[str, str], int] = {}  # (directory, name): bytes to read
        self._opened: Optional[dict[tuple[str, str], Any]] = None
        self._room: dict[tuple[str, str], int] = {}  # sizes checked: a share of the buffer
        self._total = 0
        self._used = 0
        self._buf: Optional[torch.Tensor] = None
        self._lock = threading.Lock()

    def reserve(self, directory: str, ends: dict[str, int]) -> None:
        """Room for the first ``ends[name]`` bytes of each data file of a delta."""
        for name, nbytes in ends.items():
            self.files[(directory, name)] = nbytes

    def take(self, directory: str, name: str, nbytes: int) -> torch.Tensor:
        """``nbytes`` bytes (uint8) for the data file ``name`` of ``directory``, opened
        and checked to hold them: a share of the buffer not handed out before if the
        file was opened ahead, else new memory."""
        with self._lock:
            room = self._room.pop((directory, name), None)
            if room is None or nbytes > room:
                return torch.empty(nbytes, dtype=torch.uint8)
            if self._buf is None:
                self._buf = torch.empty(self._total, dtype=torch.uint8)
            start = self._used
            self._used += -(-nbytes // self.ALIGN) * self.ALIGN
            return self._buf[start:start + nbytes]

    def open(self, directory: str, name: str, end: int) -> Any:
        """The data file ``name`` of ``directory`` (`format.open_member`'s checks), open
        for reading: the one opened ahead for a local file, else a new one."""
        from recframe.checkpoint.format import open_member

        if self.storage.is_local:
            with self._lock:
                if self._opened is None:
                    self._opened = {}
                    self._open_all()
                f = self._opened.pop((directory, name), None)
            if f is not None:
                return f
        return open_member(self.storage, directory, name, end)[0]

    def _open_all(self) -> None:
        from recframe.checkpoint.format import open_member

        advise = getattr(os, "posix_fadvise", None) if PREFETCH_DELTAS else None
        assert self._opened is not None
        for key, end in self.files.items():
            try:
                f, _ = open_member(self.storage, key[0], key[1], end)  # real size >= end
            except (CheckpointCorruptError, OSError):
                continue  # its read reports it
            keep = len(self._opened) < OPEN_AHEAD_FILES
            if keep:
                self._opened[key] = f
            try:
                if advise is not None:
                    with contextlib.suppress(OSError):
                        advise(f.fileno(), 0, end, os.POSIX_FADV_WILLNEED)
            finally:
                if not keep:
                    f.close()
            self._room[key] = end
        self._total = sum(-(-end // self.ALIGN) * self.ALIGN for end in self._room.values())

    def close(self) -> None:
        """Close the files opened ahead and not read (a restore that failed first)."""
        with self._lock:
            opened, self._opened = self._opened or {}, {}
        for f in opened.values():
            f.close()


def _small_extents(
    storage: Any, directory: str, meta: dict[str, Any], keys: Iterable[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """({key: manifest entry}, {data file: bytes to read}) of the (plain, unsharded)
    tensors ``keys`` of a small delta (`_read_small`)."""
    entries: dict[str, dict[str, Any]] = {}
    ends: dict[str, int] = {}
    for key in keys:
        entry = meta.get(key)
        if entry is None or len(entry["shards"]) != 1:
            raise CheckpointCorruptError(
                f"{storage.display(directory)}: delta tensor {key!r} is missing or sharded"
            )
        entries[key] = entry
        for chunk in entry["shards"][0]["chunks"]:
            ends[chunk["file"]] = max(ends.get(chunk["file"], 0),
                                      chunk["offset"] + chunk["nbytes"])
    return entries, ends


def _read_small(
    storage: Any, directory: str, entries: dict[str, dict[str, Any]], ends: dict[str, int],
    staging: Optional[_Staging] = None,
) -> dict[str, torch.Tensor]:
    """The tensors ``entries`` of a small delta (`_small_extents`), reading each data
    file once, up to the last byte these tensors need (never more than the manifest
    says the file holds, nor more than it really holds), into ``staging`` (else new
    memory); every chunk is checked against its size and CRC32 as `TensorReader`
    does, on the bytes read: a tensor of one chunk is a view of them (no copy), others
    are copied out chunk by chunk."""
    from recframe.checkpoint.format import open_member
    from recframe.checkpoint.storage import StorageError, crc32, read_into

    files: dict[str, torch.Tensor] = {}
    for name, end in ends.items():
        display = storage.display(storage.join(directory, name))
        f = staging.open(directory, name, end) if staging is not None else open_member(
            storage, directory, name, end)[0]
        with f:
            # its open checked that the file really holds end bytes
            buf = staging.take(directory, name, end) if staging is not None else torch.empty(
                end, dtype=torch.uint8)
            try:
                read_into(f, 0, memoryview(buf.numpy()), display)
            except StorageError as e:
                raise CheckpointCorruptError(str(e)) from e
        files[name] = buf
    out: dict[str, torch.Tensor] = {}
    for key, entry in entries.items():
        shape = list(entry["shape"])
        dtype = dtype_from_name(entry["dtype"])
        chunks = entry["shards"][0]["chunks"]
        size = torch.Size(shape).numel() * dtype.itemsize
        if size == 0:  # a table none of whose rows changed
            out[key] = torch.empty(shape, dtype=dtype)
            continue
        whole = (len(chunks) == 1 and len(shape) >= 1 and chunks[0]["rows"] == [0, shape[0]]
                 and chunks[0]["nbytes"] == size and chunks[0]["offset"] % dtype.itemsize == 0)
        tensor = None if whole else torch.empty(shape, dtype=dtype)
        rows = None if whole else (tensor.reshape(shape[0], -1) if shape
                                   else tensor.reshape(1, 1))
        for chunk in chunks:
            display = storage.display(storage.join(directory, chunk["file"]))
            offset, nbytes = chunk["offset"], chunk["nbytes"]
            data = files[chunk["file"]][offset: offset + nbytes]
            r0, r1 = chunk["rows"]
            dest = None if rows is None else rows[r0:r1]
            dest_bytes = size if dest is None else dest.numel() * dest.element_size()
            if data.numel() != nbytes or dest_bytes != nbytes:
                raise CheckpointCorruptError(
                    f"{display}: chunk of {key!r} (rows {r0}..{r1}) should hold {nbytes} "
                    f"bytes, the file or the manifest's shapes disagree: the file is truncated "
                    "or corrupt"
                )
            if crc32(memoryview(data.numpy())) != chunk["crc32"]:
                raise CheckpointCorruptError(
                    f"{display}: checksum mismatch in tensor {key!r} (rows {r0}..{r1}); the "
                    "file is corrupt"
                )
            if dest is None:
                tensor = data.view(dtype).reshape(shape)
            else:
                dest.reshape(-1).view(torch.uint8).copy_(data)
        out[key] = tensor
    return out


def _copy_all(
    plans: list[Any], datas: list[dict[str, Any]], live: dict[str, Any], dry_run: bool = False
) -> None:
    """Apply every delta's rows to the live tensors in chain order (``dry_run``: check
    that they would apply, writing nothing)."""
    with torch.no_grad():
        for (where, jobs, _), data in zip(plans, datas):
            for shard, key in jobs:
                target = live.get(key)
                if target is None:
                    raise CheckpointCorruptError(
                        f"{where}: delta rows of {key!r}, which this model/optimizer does "
                        "not have"
                    )
                rows, values = data[shard["rows"]], data[shard["values"]]
                if rows.dim() != 1 or rows.dtype != torch.int64 or values.dim() < 1 \
                        or values.shape[0] != rows.shape[0]:
                    raise CheckpointCorruptError(f"{where}: malformed delta rows of {key!r}")
                if len(shard["offsets"]) != _ndim(target):
                    raise CheckpointCorruptError(
                        f"{where}: delta rows of {key!r} do not have the table's dims"
                    )
                for off, local in local_regions(target):
                    if _overlap(shard, off, local):
                        _copy_rows(shard, rows, values, off, local, where, dry_run)


def _overlap(shard: dict[str, Any], off: list[int], local: torch.Tensor) -> bool:
    o, s = shard["offsets"], shard["sizes"]
    return all(max(o[d], off[d]) < min(o[d] + s[d], off[d] + local.shape[d])
               for d in range(local.dim()))


def _copy_rows(
    shard: dict[str, Any], rows: torch.Tensor, values: torch.Tensor, off: list[int],
    local: torch.Tensor, where: str, dry_run: bool = False,
) -> None:
    o, s = shard["offsets"], shard["sizes"]
    if rows.numel():
        lo, hi = (int(x) for x in torch.aminmax(rows))
        if lo < o[0] or hi >= o[0] + s[0]:
            raise CheckpointCorruptError(
                f"{where}: delta rows {lo}..{hi} lie outside their shard's rows "
                f"{o[0]}..{o[0] + s[0] - 1}"
            )
    if off[0] <= o[0] and o[0] + s[0] <= off[0] + local.shape[0]:
        # the saved shard's rows lie inside this region (same row sharding): no masks
        idx, vals = (rows - off[0] if off[0] else rows), values
    else:
        sel = (rows >= off[0]) & (rows < off[0] + local.shape[0])
        idx, vals = rows[sel] - off[0], values[sel]
    idx = idx.to(local.device)
    dest = local
    if local.dim() >= 2 and (o[1] != off[1] or s[1] != local.shape[1]):
        lo = max(o[1], off[1])
        hi = min(o[1] + shard["sizes"][1], off[1] + local.shape[1])
        vals = vals[:, lo - o[1]: hi - o[1]]
        dest = local[:, lo - off[1]: hi - off[1]]
    if vals.shape[1:] != dest.shape[1:] or vals.dim() != dest.dim():
        raise CheckpointCorruptError(
            f"{where}: delta rows of shape {tuple(vals.shape)} do not fit {tuple(dest.shape)}"
        )
    if dry_run and vals.dtype != dest.dtype:
        # a full restore refuses another dtype too; checked against the tensors (or the
        # base's stand-ins) live before the restore: a torch optimizer's load may cast
        # the state it installs, and apply must not fail half-way
        raise CheckpointCorruptError(
            f"{where}: delta rows of dtype {vals.dtype} do not fit the table's {dest.dtype}"
        )
    if not dry_run:
        dest.index_copy_(0, idx, vals.to(dest.device, dest.dtype))
