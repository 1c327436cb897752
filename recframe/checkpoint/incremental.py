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
                    "changed_rows": {"emb.weight": 5120}}

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

import logging
import posixpath
from collections.abc import Iterable
from typing import Any, Optional

import torch

from recframe.checkpoint.format import (
    CheckpointCorruptError,
    TensorReader,
    decode_tree,
    dtype_name,
    encode_tree,
    is_sharded,
    tree_tensor_keys,
)

logger = logging.getLogger("recframe.checkpoint")

FULL = "full"
DELTA = "delta"
SMALL_DELTA_BYTES = 16 << 20
"""A delta's rows up to this size are read without a thread pool."""
PARALLEL_DELTA_READS = True
"""Read a chain's deltas side by side on object stores (latency-bound); a local disk
reads them one after the other (measured faster on 2 cores: the page cache is not)."""


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
                       "deltas_since_full": 0, "tables": layout}
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
    return out, {"kind": DELTA, "base": chain[0], "parent": chain[-2], "chain": chain,
                 "deltas_since_full": int(base.get("deltas_since_full", 0)) + 1,
                 "tables": layout, "changed_rows": changed}


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
    `CheckpointCorruptError` naming the first missing or inconsistent link."""
    from recframe.checkpoint.saver import read_manifest

    own = section(manifest)
    chain = own.get("chain")
    name = manifest.get("name")
    where = storage.display(directory)
    if not isinstance(chain, list) or len(chain) < 2 or chain[-1] != name:
        raise CheckpointCorruptError(f"{where}: malformed incremental chain {chain!r}")
    parent_dir = posixpath.dirname(directory.rstrip("/"))
    links: list[tuple[str, dict[str, Any]]] = []
    for i, link in enumerate(chain[:-1]):
        path = storage.join(parent_dir, str(link))
        try:
            found = read_manifest(storage, path, quiet=True)
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
        if (theirs.get("kind") != expected_kind or chain_steps(found) != chain[: i + 1]
                or (layout is not None and layout != own.get("tables"))):
            raise CheckpointCorruptError(
                f"{where} needs {storage.display(path)} (link {i + 1} of {len(chain)} of its "
                f"chain), but that checkpoint belongs to another chain ({theirs.get('kind')}, "
                f"chain {chain_steps(found)}); it was overwritten by another run"
            )
        links.append((path, found))
    links.append((directory, manifest))
    return links


# --- restoring --------------------------------------------------------------------
def load_delta(
    saver: Any, storage: Any, directory: str, manifest: dict[str, Any], conf: dict[str, Any]
) -> dict[str, Any]:
    """Load a delta checkpoint: its base, each delta's rows, then its full parts (what
    `Saver.load_by_config` does for a delta). Returns the manifest."""
    from recframe.checkpoint.saver import PARTS, _parse_conf

    load, exclude, strict = _parse_conf(conf)
    wanted = [p for p in PARTS if p in load and p not in exclude]
    live: dict[str, Any] = {}
    links = resolve_chain(storage, directory, manifest)
    tables = set(section(manifest).get("tables") or {})
    table_parts = [p for p in ("sparse", "sparse_opt") if p in wanted]
    if table_parts:
        base_path, _ = links[0]
        logger.info("restoring %s: base %s and %d delta(s)", storage.display(directory),
                    storage.display(base_path), len(links) - 1)
        _load_chain(saver, storage, links, table_parts, strict)
        live = _live_tensors(saver, table_parts)
    reader = TensorReader(storage, directory, manifest["tensors"], saver.concurrency)
    trees = manifest.get("parts", {})
    for part in wanted:
        if part not in trees:
            if strict and part not in ("sparse_opt", "io_state"):
                raise CheckpointCorruptError(f"{storage.display(directory)} has no part {part!r}")
            continue
        if part == "sparse":
            saver._load_model_part(reader, trees[part], part, strict, directory,
                                   skip=frozenset(tables))
        elif part == "dense":
            saver._load_model_part(reader, trees[part], part, strict, directory)
        elif part == "sparse_opt":
            if saver.sparse_optimizer is not None:
                saver.sparse_optimizer.load_state_dict(
                    _decode_opt(saver, reader, trees[part], tables, live)
                )
        elif part == "extra":
            saver._load_extra(reader, trees[part], strict)
        elif part == "io_state":
            saver._load_io(reader, trees[part], manifest.get("world_size", 1))
    return manifest


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


def _regions(target: Any) -> list[tuple[list[int], torch.Tensor]]:
    if is_sharded(target):
        return [(list(s.metadata.shard_offsets), s.tensor) for s in target.local_shards()]
    return [([0] * target.dim(), target)]


def _plan_rows(
    saver: Any, storage: Any, path: str, manifest: dict[str, Any], parts: list[str],
    layout: dict[str, Any],
) -> tuple[str, list[tuple[dict[str, Any], str]], Any]:
    """(where, [(saved shard entry, tensor key)], a function reading the rows and values
    this rank needs) of one delta. ``layout``: live tensors whose local shards tell which
    saved shards overlap this rank's (a key not there yet: every shard is read)."""
    where = storage.display(path)
    jobs: list[tuple[dict[str, Any], str]] = []
    for rank_tree in (manifest.get("parts", {}).get("delta") or {}).values():
        tables = decode_tree(rank_tree, lambda key: key).get("tables", {})
        for key, shards in tables.items():
            if not key.startswith(tuple(p + "." for p in parts)):
                continue
            target = layout.get(key)
            for shard in shards:
                if target is None or any(_overlap(shard, off, local)
                                         for off, local in _regions(target)):
                    jobs.append((shard, key))
    needed = {k: None for shard, _ in jobs for k in (shard["rows"], shard["values"])}
    nbytes = sum(c.get("nbytes", 0) for key in needed
                 for sh in manifest["tensors"].get(key, {}).get("shards", [])
                 for c in sh.get("chunks", []))
    if nbytes <= SMALL_DELTA_BYTES:  # each data file in one read, no thread pool
        return where, jobs, lambda: _read_small(storage, path, manifest["tensors"], needed)
    reader = TensorReader(storage, path, manifest["tensors"], saver.concurrency)
    return where, jobs, lambda: reader.read_many(needed)


def _read_small(
    storage: Any, directory: str, meta: dict[str, Any], keys: Iterable[str]
) -> dict[str, torch.Tensor]:
    """The (plain, unsharded) tensors ``keys`` of a small delta, reading each data file
    whole once; every chunk is checked against its size and CRC32 as `TensorReader`
    does."""
    import numpy as np

    from recframe.checkpoint.format import dtype_from_name
    from recframe.checkpoint.storage import StorageError, crc32

    files: dict[str, memoryview] = {}
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        entry = meta.get(key)
        if entry is None or len(entry.get("shards", [])) != 1:
            raise CheckpointCorruptError(
                f"{storage.display(directory)}: delta tensor {key!r} is missing or sharded"
            )
        shape = [int(n) for n in entry["shape"]]
        tensor = torch.empty(shape, dtype=dtype_from_name(entry["dtype"]))
        out[key] = tensor
        if tensor.numel() == 0:  # a table none of whose rows changed
            continue
        rows = tensor.reshape(shape[0], -1) if shape else tensor.reshape(1, 1)
        for chunk in entry["shards"][0]["chunks"]:
            name = chunk["file"]
            path = storage.join(directory, name)
            display = storage.display(path)
            if name not in files:
                try:
                    files[name] = memoryview(storage.read_bytes(path))
                except FileNotFoundError:
                    raise StorageError(f"reading {display} failed: not found") from None
            offset, nbytes = int(chunk["offset"]), int(chunk["nbytes"])
            data = files[name][offset: offset + nbytes]
            r0, r1 = chunk["rows"]
            dest = rows[r0:r1]
            if len(data) != nbytes or dest.numel() * dest.element_size() != nbytes:
                raise CheckpointCorruptError(
                    f"{display}: chunk of {key!r} (rows {r0}..{r1}) should hold {nbytes} "
                    f"bytes, the file or the manifest's shapes disagree: the file is truncated "
                    "or corrupt"
                )
            if crc32(data) != chunk["crc32"]:
                raise CheckpointCorruptError(
                    f"{display}: checksum mismatch in tensor {key!r} (rows {r0}..{r1}); the "
                    "file is corrupt"
                )
            dest.reshape(-1).view(torch.uint8).numpy()[:] = np.frombuffer(data, np.uint8)
    return out


def _load_chain(
    saver: Any, storage: Any, links: list[tuple[str, dict[str, Any]]], parts: list[str],
    strict: bool,
) -> None:
    """Load the base's table parts and apply every delta's rows in chain order. The
    deltas are read while the base loads (one thread reading them in order; on an
    object store ``saver.concurrency`` deltas side by side): a cold restore overlaps
    their first-byte latencies with the base's transfer."""
    from concurrent.futures import ThreadPoolExecutor

    layout = _live_tensors(saver, parts)  # the local shards' layout (loading keeps it)
    plans = [_plan_rows(saver, storage, path, m, parts, layout) for path, m in links[1:]]
    parallel = PARALLEL_DELTA_READS and not getattr(storage, "is_local", True)
    workers = min(len(plans), saver.concurrency) if parallel else 1
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="ckpt-delta") as pool:
        if parallel:
            futures = [pool.submit(read) for _, _, read in plans]
        else:
            futures = [pool.submit(lambda: [read() for _, _, read in plans])]
        saver.load_by_config(links[0][0], {"load": parts, "strict": strict})
        if parallel:
            datas = [f.result() for f in futures]
        else:
            datas = futures[0].result()
    live = _live_tensors(saver, parts)  # (a torch optimizer's load may replace tensors)
    # many small copies: one thread (on a shared machine a parallel region waits for a
    # descheduled worker at every op: measured 50x slower with a busy neighbour)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _copy_all(plans, datas, live)
    finally:
        torch.set_num_threads(threads)


def _copy_all(plans: list[Any], datas: list[dict[str, Any]], live: dict[str, Any]) -> None:
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
                if rows.dim() != 1 or values.shape[0] != rows.shape[0]:
                    raise CheckpointCorruptError(f"{where}: malformed delta rows of a table")
                for off, local in _regions(target):
                    if _overlap(shard, off, local):
                        _copy_rows(shard, rows, values, off, local, where)


def _overlap(shard: dict[str, Any], off: list[int], local: torch.Tensor) -> bool:
    o, s = shard["offsets"], shard["sizes"]
    return all(max(o[d], off[d]) < min(o[d] + s[d], off[d] + local.shape[d])
               for d in range(local.dim()))


def _copy_rows(
    shard: dict[str, Any], rows: torch.Tensor, values: torch.Tensor, off: list[int],
    local: torch.Tensor, where: str,
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
    if vals.shape[1:] != dest.shape[1:]:
        raise CheckpointCorruptError(
            f"{where}: delta rows of shape {tuple(vals.shape)} do not fit {tuple(dest.shape)}"
        )
    dest.index_copy_(0, idx, vals.to(dest.device, dest.dtype))


def _decode_opt(
    saver: Any, reader: TensorReader, tree: Any, tables: set[str], live: dict[str, Any]
) -> Any:
    """The sparse optimizer state of a delta: tracked tensors are the live ones (their
    rows were just applied), the others are read (in place where they match)."""
    if not live:
        live = _live_tensors(saver, ["sparse_opt"])
    values: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    for key in tree_tensor_keys(tree):
        if key in tables:
            if key not in live:
                raise CheckpointCorruptError(
                    f"optimizer state {key!r} of the checkpoint is not in the live optimizer"
                )
            values[key] = live[key]
            continue
        cand = live.get(key)
        target = None
        if cand is not None and key in reader:
            if _size(cand) == reader.shape(key) and cand.dtype == reader.dtype(key):
                target = cand
        targets[key] = target
    values.update(reader.read_many(targets))
    return decode_tree(tree, lambda key: values[key])
