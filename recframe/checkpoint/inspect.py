"""Scanning, describing and verifying checkpoints: what ``recframe ckpt`` prints.

Checkpoints are identified by their directory names (``ckpt_<step>``), never by the
``name``/``step`` a manifest claims; a manifest that fails validation makes its
checkpoint *corrupt* (listed with the reason), never an error for the whole listing.
`verify` checks exactly what a restore reads, through the same code: the manifest's
schema and checksum, the incremental chain (links in the same output dir, same
layout), file names (plain names inside the checkpoint, no symlink out), and every
chunk's size and CRC32, using `TensorReader` with throwaway targets (nothing is kept
but the problems found).
"""

from __future__ import annotations

import time
from typing import Any, Optional

import torch

from recframe.checkpoint.format import (
    CheckpointCorruptError,
    TensorReader,
    dtype_from_name,
    open_member,
    tree_tensor_keys,
)
from recframe.checkpoint.manifest import (
    CKPT_NAME_RE,
    CheckpointVersionError,
    _strict_metrics,
)
from recframe.checkpoint.storage import Storage, StorageError

STAGING_SUFFIX = ".staging"


class CheckpointNotFound(LookupError):
    """The checkpoint asked for does not exist or is not committed."""


def _step_of(name: str) -> Optional[int]:
    m = CKPT_NAME_RE.match(name)
    return int(m.group(1)) if m else None


def _read(storage: Storage, path: str) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(manifest, None), (None, None) when uncommitted, (None, why) when corrupt."""
    from recframe.checkpoint.saver import read_manifest

    try:
        return read_manifest(storage, path), None
    except (CheckpointCorruptError, CheckpointVersionError, StorageError) as e:
        return None, str(e)


def summary(storage: Storage, path: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """One committed checkpoint in a line: name and step from its directory name."""
    from recframe.checkpoint.incremental import section

    name = path.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]
    files = manifest["files"]
    created = manifest.get("created_unix")
    incremental = section(manifest)
    chain = incremental.get("chain")
    return {
        "kind": incremental.get("kind"),
        "chain": list(chain) if isinstance(chain, list) else None,
        "changed_rows": incremental.get("changed_rows"),
        "name": name,
        "step": _step_of(name),
        "path": storage.display(path),
        "committed": True,
        "state": "committed",
        "bytes": sum(f["size"] for f in files.values()),
        "files": len(files) + 1,  # the data files and the manifest
        "world_size": manifest.get("world_size"),
        "created_unix": created,
        "created": _iso_time(created),
        "metrics": _strict_metrics(dict(manifest.get("metrics") or {})),
        "recframe_version": manifest.get("recframe_version"),
        "run_id": manifest.get("run_id"),
    }


def _iso_time(unix: Any) -> Optional[str]:
    if not isinstance(unix, (int, float)):
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(unix))


def scan(storage: Storage) -> dict[str, list[dict[str, Any]]]:
    """``{"checkpoints", "uncommitted", "corrupt"}`` under the storage root, each
    oldest first: committed checkpoints, leftovers of interrupted saves, and
    checkpoints whose manifest is invalid (with the reason)."""
    committed: list[dict[str, Any]] = []
    leftovers: list[dict[str, Any]] = []
    corrupt: list[dict[str, Any]] = []
    for name in storage.listdir(storage.root):
        base = name[: -len(STAGING_SUFFIX)] if name.endswith(STAGING_SUFFIX) else name
        step = _step_of(base)
        if step is None:
            continue
        path = storage.path(name)
        if name != base:
            manifest, reason = None, "staging directory of an interrupted save"
        else:
            manifest, reason = _read(storage, path)
            if manifest is not None:
                committed.append(summary(storage, path, manifest))
                continue
        try:
            sizes = storage.file_sizes(path)
        except StorageError:
            sizes = {}
        entry = {
            "name": name, "step": step, "path": storage.display(path), "committed": False,
            "bytes": sum(sizes.values()), "files": len(sizes),
        }
        if reason is None:
            leftovers.append(dict(entry, state="uncommitted",
                                  reason="no manifest.json: never committed"))
        elif name != base:
            leftovers.append(dict(entry, state="uncommitted", reason=reason))
        else:
            corrupt.append(dict(entry, state="corrupt", reason=f"corrupt manifest: {reason}"))
    def order(c: dict[str, Any]) -> tuple[int, str]:
        return c["step"], c["name"]

    return {"checkpoints": sorted(committed, key=order),
            "uncommitted": sorted(leftovers, key=order), "corrupt": sorted(corrupt, key=order)}


def own_checkpoint(storage: Storage) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """The root itself as one checkpoint directory: (manifest, corrupt reason)."""
    return _read(storage, storage.root)


def find(storage: Storage, step: Optional[int]) -> tuple[str, dict[str, Any]]:
    """(directory, manifest) of ``ckpt_<step>`` under the root, or of the latest
    committed checkpoint; `CheckpointNotFound` / `CheckpointCorruptError` otherwise."""
    where = storage.display(storage.root)
    if not storage.exists(storage.root):
        raise CheckpointNotFound(f"{where} does not exist")
    if step is not None:
        path = storage.path(f"ckpt_{step}")
        manifest, reason = _read(storage, path)
        if manifest is not None:
            return path, manifest
        if reason is not None:
            raise CheckpointCorruptError(reason)
        if storage.exists(path) or storage.exists(path + STAGING_SUFFIX):
            raise CheckpointNotFound(f"ckpt_{step} under {where} is not committed")
        raise CheckpointNotFound(f"no checkpoint ckpt_{step} under {where}")
    found = scan(storage)["checkpoints"]
    if not found:
        raise CheckpointNotFound(
            f"{where} is neither a checkpoint nor an output_dir holding a committed one"
        )
    path = storage.path(found[-1]["name"])
    manifest, reason = _read(storage, path)
    if manifest is None:
        raise CheckpointCorruptError(reason or f"{storage.display(path)} vanished")
    return path, manifest


def describe(storage: Storage, path: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """`summary` plus each part (tensors, bytes, entries), tensor and data file."""
    info = summary(storage, path, manifest)
    tensors = []
    stored: dict[str, int] = {}
    for key, entry in manifest["tensors"].items():
        chunks = [c for shard in entry["shards"] for c in shard["chunks"]]
        stored[key] = sum(c["nbytes"] for c in chunks)
        tensors.append({
            "key": key,
            "dtype": entry["dtype"],
            "shape": list(entry["shape"]),
            "bytes": stored[key],
            "shards": len(entry["shards"]),
            "chunks": len(chunks),
            "files": sorted({c["file"] for c in chunks}),
        })
    parts = []
    for part, tree in manifest["parts"].items():
        if part in ("io_state", "delta") and isinstance(tree, dict):
            keys = [k for rank_tree in tree.values() for k in tree_tensor_keys(rank_tree)]
            ranks = sorted(tree, key=lambda r: (not r.isdigit(), int(r) if r.isdigit() else 0, r))
            entries = [f"rank {r}" for r in ranks]
        else:
            keys = tree_tensor_keys(tree)
            entries = _tree_names(tree)
        parts.append({
            "part": part,
            "tensors": len(keys),
            "bytes": sum(stored.get(k, 0) for k in keys),
            "entries": entries,
        })
    files = [
        {"name": name, "rank": entry.get("rank"), "bytes": entry["size"],
         "chunks": len(entry.get("crc32") or [])}
        for name, entry in sorted(manifest["files"].items())
    ]
    info.update(format_version=manifest.get("format_version", 1), parts=parts,
                tensors=tensors, data_files=files)
    if any(".maps." in k for k in manifest["tensors"]):  # dynamic tables: rows used
        from recframe.dynamic import dynamic_summary

        info["dynamic_tables"] = dynamic_summary(
            TensorReader(storage, path, manifest["tensors"]))
    return info


def _tree_names(tree: Any) -> list[str]:
    """Top-level names of an encoded state tree (a dict's keys)."""
    import json

    if isinstance(tree, dict) and "d" in tree:
        return [str(key) if not isinstance(key, dict) else json.dumps(key)
                for key, _value in tree["d"]]
    return []


# --- verify ----------------------------------------------------------------------
def restore_reads(
    storage: Storage, path: str, manifest: dict[str, Any]
) -> list[tuple[str, dict[str, Any], list[str]]]:
    """``[(directory, manifest, tensor keys)]``: what restoring this checkpoint reads,
    a delta's chain included (its base's table parts, each delta's rows, its own
    parts); a broken chain raises `CheckpointCorruptError` as restore does."""
    from recframe.checkpoint import incremental

    own = sorted({k for tree in _trees(manifest) for k in tree_tensor_keys(tree)})
    if not incremental.is_delta(manifest):
        return [(path, manifest, own)]
    links = incremental.resolve_chain(storage, path, manifest)
    base_path, base = links[0]
    reads = [(base_path, base, sorted({
        k for part in ("sparse", "sparse_opt") if part in base["parts"]
        for k in tree_tensor_keys(base["parts"][part])
    }))]
    for link_path, link in links[1:-1]:
        delta = link["parts"].get("delta") or {}
        reads.append((link_path, link, sorted({
            k for tree in delta.values() for k in tree_tensor_keys(tree)
        })))
    reads.append((path, manifest, own))
    return reads


def _trees(manifest: dict[str, Any]) -> list[Any]:
    from recframe.checkpoint.saver import PER_RANK_PARTS

    trees = []
    for part, tree in manifest["parts"].items():
        trees.extend(tree.values() if part in PER_RANK_PARTS else [tree])
    return trees


def verify(storage: Storage, path: str, manifest: dict[str, Any], threads: int = 4) -> list[str]:
    """Every problem a restore of this checkpoint would meet (empty: it reads back
    intact): chain links, file names and sizes, each chunk's size and CRC32."""
    try:
        reads = restore_reads(storage, path, manifest)
    except CheckpointCorruptError as e:
        return [str(e)]
    problems: list[str] = []
    for directory, m, keys in reads:
        problems.extend(_verify_one(storage, directory, m, keys, threads))
    return problems


def _verify_one(
    storage: Storage, directory: str, manifest: dict[str, Any], keys: list[str], threads: int
) -> list[str]:
    files = manifest["files"]
    used = {c["file"] for k in keys for sh in manifest["tensors"][k]["shards"]
            for c in sh["chunks"]}
    problems: list[str] = []
    skip: set[str] = set()
    for name in sorted(used | set(files)):
        shown = storage.display(storage.join(directory, name))
        try:
            f, size = open_member(storage, directory, name)
            f.close()
        except CheckpointCorruptError as e:
            problems.append(str(e))
            skip.add(name)
            continue
        except (FileNotFoundError, StorageError) as e:
            missing = isinstance(e, FileNotFoundError) or "not found" in str(e) or \
                isinstance(e.__cause__, FileNotFoundError)
            problems.append(f"{shown}: missing" if missing else f"{shown}: {e}")
            skip.add(name)
            continue
        if size != files[name]["size"]:
            problems.append(f"{shown}: size {size} bytes, the manifest says "
                            f"{files[name]['size']}")
        listed = sorted(c["crc32"] for k, entry in manifest["tensors"].items()
                        for sh in entry["shards"] for c in sh["chunks"] if c["file"] == name)
        if files[name].get("crc32") is not None and sorted(files[name]["crc32"]) != listed:
            problems.append(f"{shown}: the manifest's file and tensor checksums disagree")
    reader = TensorReader(storage, directory, manifest["tensors"], threads)
    targets = {
        k: torch.empty(manifest["tensors"][k]["shape"], device="meta",
                       dtype=dtype_from_name(manifest["tensors"][k]["dtype"]))
        for k in keys
    }
    jobs = [j for j in reader.plan(targets) if j.chunk["file"] not in skip]
    problems.extend(reader.check(jobs))
    return problems
