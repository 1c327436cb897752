"""`Saver`: writes and reads one checkpoint, with concurrent sharded writes and a
crash-proof commit.

A checkpoint is the directory ``<output_dir>/ckpt_<id>``; it is *committed* once its
``manifest.json`` exists. The manifest (every file's size and chunk checksums, the
tensors' layout, the step, world size and recframe version, and the state trees as
JSON) is written last, after every data file is durable:

- local filesystems: files go into ``ckpt_<id>.staging/``, are fsynced, the manifest is
  written there, then the directory is renamed to ``ckpt_<id>`` (atomic) and the parent
  fsynced;
- object stores (no rename): files go straight into ``ckpt_<id>/``; the manifest, one
  PUT, commits.

A crash at any instant leaves either a committed checkpoint or a leftover that listing
ignores and `Saver.clean_uncommitted` removes. Loading never unpickles: tensors are raw
bytes checked by CRC32, everything else JSON.

Parts (as in RecIS): ``sparse`` (embedding tables), ``dense`` (the rest of the model),
``sparse_opt`` (sparse optimizer state), ``extra`` (registered objects: dense optimizer,
LR scheduler, trainer state, hooks...), ``io_state`` (per-rank: dataset positions, RNG).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

from torch import nn

from recframe import distributed
from recframe.checkpoint.format import (
    DEFAULT_CHUNK_BYTES,
    CheckpointCorruptError,
    encode_tree,
    is_sharded,
    naming_errors,
    write_tensors,
)
from recframe.checkpoint.lock import WriterLock, WriterLockError, live_holder
from recframe.checkpoint.manifest import FORMAT_NAME, FORMAT_VERSION, encode_manifest
from recframe.checkpoint.storage import Storage, StorageError

logger = logging.getLogger("recframe.checkpoint")

PARTS = ("sparse", "dense", "sparse_opt", "extra", "io_state")
MANIFEST = "manifest.json"
STAGING_SUFFIX = ".staging"
ABANDONED_DIR = "abandoned"
"""Where a rollback moves the checkpoints of the abandoned timeline (`move_aside`)."""
PER_RANK_PARTS = ("io_state", "delta")
"""Parts each rank writes its own tree of (``delta``: an incremental checkpoint's rows)."""
_CKPT_RE = re.compile(r"^ckpt_(0|[1-9][0-9]*)\Z")  # as manifest.CKPT_NAME_RE
_STAGING_RE = re.compile(r"^ckpt_(0|[1-9][0-9]*)\.staging\Z")
# every name a save writes inside a checkpoint directory (format.write_tensors' data
# files, the manifest and its tmp): a leftover holding anything else is not recframe's
_OWN_FILE_RE = re.compile(r"^(manifest\.json(\.tmp)?|data-r[0-9]{5}-[0-9]{3,}\.bin)\Z")


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or loaded; the message names the path."""


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint found on storage."""

    step: int
    path: str
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        return f"ckpt_{self.step}"

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.manifest.get("metrics") or {})


def ckpt_name(ckpt_id: Any) -> str:
    """``ckpt_<n>`` for a step number; a string id is kept as given."""
    if isinstance(ckpt_id, int):
        return f"ckpt_{ckpt_id}"
    text = str(ckpt_id)
    return text if text.startswith("ckpt_") else f"ckpt_{text}"


def _normalize_file_url(url: Any) -> Any:
    """``file://localhost/abs/path`` is ``/abs/path`` (RFC 8089; fsspec would make it a
    relative ``localhost/abs/path``: a silent fresh start in another directory)."""
    if not isinstance(url, str) or not url.startswith("file://"):
        return url
    rest = url[len("file://"):]
    if rest.startswith("localhost/"):
        return rest[len("localhost"):]
    return url


def _sparse_prefixes(model: nn.Module) -> list[str]:
    from recframe.optim import SPARSE_MODULE_TYPES, sparse_module_types

    # a model holding torchrec modules has imported torchrec already: never pay its
    # import (seconds) on a save of a model without any
    kinds = sparse_module_types() if "torchrec" in sys.modules else SPARSE_MODULE_TYPES
    prefixes = []
    for name, module in model.named_modules():
        if isinstance(module, kinds) and not any(name.startswith(p) for p in prefixes):
            prefixes.append(name + "." if name else "")
    return prefixes


def split_model_state(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """(sparse, dense) entries of ``model.state_dict()`` (live tensors, no copies)."""
    state = model.state_dict()
    prefixes = _sparse_prefixes(model)
    sparse: dict[str, Any] = {}
    dense: dict[str, Any] = {}
    for key, value in state.items():
        if is_sharded(value) or any(key.startswith(p) for p in prefixes):
            sparse[key] = value
        else:
            dense[key] = value
    return sparse, dense


class Saver:
    """Saves and loads checkpoints of a model, its sparse optimizer and registered state.

    Args:
        model: the model (its state is split into the sparse and dense parts).
        sparse_optimizer: optimizer of the embedding tables (part ``sparse_opt``).
        output_dir: checkpoint root, a local path or fsspec URL.
        max_keep: committed checkpoints kept by `prune` (oldest deleted first).
        concurrency: writer (and reader) threads per rank.
        chunk_bytes: tables are split into chunks of at most this size.
        commit_timeout: with several ranks, seconds rank 0 waits for every rank to finish
            writing before it commits (and the others wait for the commit); a rank that
            failed, died or hung means no commit and a `CheckpointError` naming it.
    """

    def __init__(
        self,
        model: nn.Module,
        sparse_optimizer: Any = None,
        output_dir: str = "output_dir",
        max_keep: int = 1,
        concurrency: int = 4,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        storage_options: Optional[dict[str, Any]] = None,
        commit_timeout: float = 600.0,
    ) -> None:
        if isinstance(max_keep, bool) or not isinstance(max_keep, int) or max_keep < 1:
            raise ValueError(f"Saver(max_keep={max_keep!r}) is invalid: must be an integer >= 1")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(
                f"Saver(concurrency={concurrency!r}) is invalid: must be an integer >= 1"
            )
        self.model = model
        self.sparse_optimizer = sparse_optimizer
        output_dir = _normalize_file_url(output_dir)
        self.output_dir = output_dir
        self.max_keep = max_keep
        self.concurrency = concurrency
        self.chunk_bytes = chunk_bytes
        self.storage_options = dict(storage_options or {})
        self.storage = Storage(output_dir, **self.storage_options)
        self._extra: dict[str, Any] = {}
        self._io: dict[str, Any] = {}
        self._extra_data: dict[str, Any] = {}
        if isinstance(commit_timeout, bool) or not isinstance(commit_timeout, (int, float)) \
                or not commit_timeout > 0:
            raise ValueError(
                f"Saver(commit_timeout={commit_timeout!r}) is invalid: must be seconds > 0"
            )
        self.commit_timeout = float(commit_timeout)
        self.last_save_seconds: Optional[float] = None
        """Wall time of this rank's last `save` (write, commit and the wait for others)."""
        self.last_write_seconds: Optional[float] = None
        """Wall time of this rank's own writes in the last `save` (its shard files)."""
        self._save_seq = 0
        self._token: Optional[str] = None
        self.row_tracker: Any = None
        """A `recframe.optim.tracking.RowTracker` (incremental checkpoints): any load
        invalidates it."""
        self.writer_lock: Optional[WriterLock] = None
        """The output dir's writer lock this saver's run holds (`CheckpointManager`
        takes it); without one, a save refuses a dir another live job holds."""

    # --- registration -------------------------------------------------------------
    def register_for_checkpointing(self, name: str, obj: Any) -> None:
        """Save ``obj`` in the ``extra`` part: its ``state_dict()`` when it has one
        (restored through ``load_state_dict``), else the value itself (read back with
        `get_extra_data`)."""
        self._check_name(name, self._extra, "register_for_checkpointing")
        self._extra[name] = obj

    def register_io_state(self, name: str, obj: Any) -> None:
        """Save a per-rank object's position (a dataset, an RNG...) in ``io_state``."""
        self._check_name(name, self._io, "register_io_state")
        if not (callable(getattr(obj, "state_dict", None))
                and callable(getattr(obj, "load_state_dict", None))):
            raise TypeError(
                f"register_io_state({name!r}, ...): the object needs state_dict() and "
                "load_state_dict()"
            )
        self._io[name] = obj

    @staticmethod
    def _check_name(name: str, table: dict[str, Any], what: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what}: name must be a non-empty string, got {name!r}")
        if name in table:
            raise ValueError(f"{what}: {name!r} is already registered")

    def get_extra_data(self, name: str) -> Any:
        """A plain value registered with `register_for_checkpointing`, as last loaded."""
        return self._extra_data[name]

    # --- snapshot -----------------------------------------------------------------
    def collect_state(self) -> dict[str, dict[str, Any]]:
        """Every part's state as of now (live tensors: callers that keep training while
        writing must copy them first)."""
        sparse, dense = split_model_state(self.model)
        parts: dict[str, dict[str, Any]] = {"sparse": sparse, "dense": dense}
        if self.sparse_optimizer is not None:
            parts["sparse_opt"] = self.sparse_optimizer.state_dict()
        extra = {}
        for name, obj in self._extra.items():
            sd = getattr(obj, "state_dict", None)
            extra[name] = sd() if callable(sd) else obj
        parts["extra"] = extra
        parts["io_state"] = {name: obj.state_dict() for name, obj in self._io.items()}
        return parts

    # --- listing ------------------------------------------------------------------
    def list_checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints under ``output_dir``, oldest first. A directory
        without a readable manifest is not a checkpoint."""
        found = []
        for name in self.storage.listdir(self.storage.root):
            m = _CKPT_RE.match(name)
            if not m:
                continue
            path = self.storage.path(name)
            manifest = self.read_manifest(path, quiet=True)
            if manifest is not None:
                found.append(CheckpointInfo(int(m.group(1)), path, manifest))
        return sorted(found, key=lambda c: c.step)

    def latest_checkpoint(self) -> Optional[CheckpointInfo]:
        found = self.list_checkpoints()
        return found[-1] if found else None

    def read_manifest(self, path: str, quiet: bool = False) -> Optional[dict[str, Any]]:
        """The manifest of the checkpoint directory ``path`` (None if uncommitted)."""
        return read_manifest(self.storage, path, quiet)

    def uncommitted(self) -> list[str]:
        """Leftovers of interrupted saves (staging dirs, ``ckpt_*`` without manifest)."""
        leftovers = []
        for name in self.storage.listdir(self.storage.root):
            path = self.storage.path(name)
            if self.is_foreign(path):
                continue  # a symlink (another run's checkpoint): never ours to clean
            if _STAGING_RE.match(name) or (_CKPT_RE.match(name) and not self.storage.exists(
                self.storage.join(path, MANIFEST)
            )):
                foreign = self.foreign_files(path)
                if foreign:
                    logger.warning(
                        "leaving %s alone: it is named like a checkpoint but holds files a "
                        "save never writes (%s); move it out of the output dir",
                        self.storage.display(path), ", ".join(foreign[:3]))
                    continue
                leftovers.append(path)
        return leftovers

    def foreign_files(self, path: str) -> list[str]:
        """Entries of the checkpoint-named directory ``path`` that no save writes (a
        user's own ``ckpt_7`` folder): such a directory is never deleted as a leftover."""
        if self.storage.is_local and os.path.isfile(path):
            return [os.path.basename(path)]
        return [n for n in self.storage.listdir(path) if not _OWN_FILE_RE.match(n)]

    def clean_uncommitted(self) -> None:
        """Delete leftovers of interrupted saves (rank 0); failures are only logged.

        Only what is provably abandoned: while another live job holds the output dir's
        writer lock its staging directories are in flight, and nothing is deleted."""
        if not distributed.is_main_process():
            return
        holder = self._foreign_writer()
        if holder is not None:
            logger.warning("not cleaning the leftovers in %s: %s writes there",
                           self.storage.display(self.storage.root), WriterLock.describe(holder))
            return
        for path in self.uncommitted():
            try:
                self.storage.remove_tree(path)
                logger.info("removed the leftover of an interrupted save: %s", path)
            except OSError as e:
                logger.warning("could not remove %s: %s", path, e)

    # --- save ---------------------------------------------------------------------
    def save(
        self,
        ckpt_id: Any,
        shard_id: Optional[int] = None,
        shard_num: Optional[int] = None,
        metrics: Optional[dict[str, float]] = None,
        state: Optional[dict[str, dict[str, Any]]] = None,
        prune: bool = True,
        manifest_extra: Optional[dict[str, Any]] = None,
    ) -> str:
        """Write checkpoint ``ckpt_<ckpt_id>`` and commit it; returns its path.

        Every rank writes its own shard files (``shard_id`` of ``shard_num``; default:
        this process's rank and world size) with ``concurrency`` threads; rank 0 commits
        once all ranks are done. An id is never saved twice. ``manifest_extra``: more
        top-level manifest entries (``incremental``: see `recframe.checkpoint.incremental`).
        """
        rank = distributed.get_rank() if shard_id is None else shard_id
        world = distributed.get_world_size() if shard_num is None else shard_num
        name = ckpt_name(ckpt_id)
        final = self.storage.path(name)
        if self.read_manifest(final, quiet=True) is not None:
            raise CheckpointError(
                f"checkpoint {self.storage.display(final)} is already committed; a checkpoint "
                "id is never saved twice"
            )
        staging = final + STAGING_SUFFIX if self.storage.atomic_rename else final
        group = world > 1 and distributed.is_initialized() and distributed.get_world_size() > 1
        if group:
            self._save_seq += 1
            key = f"recframe/ckpt/{self._run_token()}/{self._save_seq}/{name}"
        t0 = time.perf_counter()
        def prepare() -> None:
            self._check_writer()
            # leftovers of a crash (a staging dir, or a ckpt_<id> whose manifest is gone:
            # a delete cut short) would mix with the new files or block the rename
            for leftover in dict.fromkeys((staging, final)):
                if self.storage.exists(leftover):
                    foreign = self.foreign_files(leftover)
                    if foreign:
                        raise CheckpointError(
                            f"cannot save {name}: {self.storage.display(leftover)} exists and "
                            f"holds files a save never writes ({', '.join(foreign[:3])}); "
                            "move it out of the output dir"
                        )
                    self.storage.remove_tree(leftover)
            self.storage.makedirs(self.storage.root)
            self.storage.makedirs(staging)

        self._rank0_then_others(
            prepare, f"{key}/staged" if group else None, name, rank,
            "to create the staging directory",
            f"checkpoint {name}: rank 0 could not prepare {self.storage.display(staging)}",
        )
        try:
            try:
                if state is None:
                    state = self.collect_state()
                trees, result = self._write_rank(state, staging, rank)
            except BaseException as e:
                if group:  # tell the others at once rather than let them wait the timeout
                    if rank == 0:
                        distributed.store().set(
                            f"{key}/commit", f"rank 0 failed to write: {e!r}".encode()
                        )
                    else:
                        distributed.store().set(
                            f"{key}/written/{rank}", json.dumps({"error": repr(e)}).encode()
                        )
                raise
            self.last_write_seconds = time.perf_counter() - t0
            local = {"rank": rank, "trees": trees, "tensors": result.tensors,
                     "files": result.files}
            if group:
                gathered = self._gather_for_commit(key, local, name)
            else:
                gathered = distributed.all_gather_objects(local)

            def commit() -> None:
                self._check_writer()  # a writer that lost its lock never commits
                manifest = self._manifest(name, gathered, world, metrics)
                manifest.update(manifest_extra or {})
                mpath = self.storage.join(staging, MANIFEST)
                with naming_errors(self.storage, "writing", mpath):
                    self.storage.write_bytes_atomic(mpath, encode_manifest(manifest))
                if staging != final:
                    with naming_errors(self.storage, "renaming", staging):
                        self.storage.rename(staging, final)

            # the others wait up to twice the timeout: rank 0 first waits for every rank
            self._rank0_then_others(
                commit, f"{key}/commit" if group else None, name, rank, "to commit",
                f"checkpoint {name} was not committed", factor=2,
            )
        except BaseException:
            if world == 1:  # alone: nobody else is writing there
                self._discard(staging, final)
            raise
        if not group:
            distributed.barrier()
        self.last_save_seconds = time.perf_counter() - t0
        logger.log(
            logging.INFO if rank == 0 else logging.DEBUG,
            "saved %s (%.1f MB in %.2fs)",
            self.storage.display(final),
            result.nbytes / 1e6,
            self.last_save_seconds,
        )
        if prune:
            self.prune()
        return final

    # --- the commit protocol of several ranks -----------------------------------------
    def prepare_distributed(self) -> None:
        """Agree on the run token of the commit protocol (a collective: call it from
        the main thread before saving from a background thread)."""
        if distributed.is_initialized() and distributed.get_world_size() > 1:
            self._run_token()

    def _run_token(self) -> str:
        """A token every rank shares, fresh per run, so store keys never collide with
        a previous run's or another `Saver`'s on the same store. Drawn from the OS on
        rank 0, never from torch's seeded generator (a resumed run must draw the same
        random numbers as an uninterrupted one)."""
        if self._token is None:
            import os

            (value,) = distributed.broadcast_ints([int.from_bytes(os.urandom(7), "little")])
            self._token = f"{value:x}"
        return self._token

    def _gather_for_commit(
        self, key: str, local: dict[str, Any], name: str
    ) -> list[dict[str, Any]]:
        """Rank 0: every rank's file and tensor metadata (JSON through the store), once
        all ranks finished writing; a rank that failed or did not report within
        ``commit_timeout`` means no commit. Other ranks: ``[local]``."""
        data = json.dumps(local, allow_nan=True).encode()
        try:
            raw = distributed.store_gather(
                f"{key}/written", data, self.commit_timeout, f"checkpoint {name}"
            )
        except distributed.RankTimeoutError as e:
            message = (f"rank(s) {e.missing} did not finish writing their shards within "
                       f"commit_timeout={self.commit_timeout:g}s")
            distributed.store().set(f"{key}/commit", message.encode())
            raise CheckpointError(
                f"checkpoint {name} was not committed: {message} ({e}); the previous "
                "checkpoint stays the latest"
            ) from e
        if distributed.get_rank() != 0:
            return [local]
        gathered = [json.loads(r) for r in raw]
        failed = {r: g["error"] for r, g in enumerate(gathered) if "error" in g}
        if failed:
            message = "; ".join(f"rank {r} failed to write: {err}" for r, err in failed.items())
            distributed.store().set(f"{key}/commit", message.encode())
            raise CheckpointError(f"checkpoint {name} was not committed: {message}")
        return gathered

    def _rank0_then_others(
        self, action: Any, key: Optional[str], name: str, rank: int, what: str,
        failure: str, factor: float = 1,
    ) -> None:
        """Rank 0 runs ``action``; with a process group (``key`` set) it posts "ok" or its
        error at ``key`` in the store, and the other ranks wait for that word (up to
        ``factor`` x ``commit_timeout``) and raise ``failure`` with rank 0's error."""
        if rank == 0:
            try:
                action()
            except BaseException as e:
                if key:
                    distributed.store().set(key, f"rank 0: {e}".encode())
                raise
            if key:
                distributed.store().set(key, b"ok")
        elif key:
            answer = self._wait_rank0(key, name, what, factor)
            if answer != b"ok":
                raise CheckpointError(f"{failure}: {answer.decode(errors='replace')}")

    def _wait_rank0(self, key: str, name: str, what: str, factor: float = 1) -> bytes:
        try:
            return distributed.store_wait(
                key, self.commit_timeout * factor, f"checkpoint {name}", rank_of=0
            )
        except distributed.RankTimeoutError as e:
            raise CheckpointError(
                f"checkpoint {name} was not committed: rank 0 did not signal {what} within "
                f"{self.commit_timeout * factor:g}s ({e})"
            ) from e

    def _discard(self, staging: str, final: str) -> None:
        """Best effort: remove what a failed save left (never a committed checkpoint;
        a leftover is otherwise removed by `clean_uncommitted` or the next save)."""
        try:
            if staging == final and self.read_manifest(final, quiet=True) is not None:
                return
            self.storage.remove_tree(staging)
        except Exception as e:  # noqa: BLE001 - the save's own error matters
            logger.warning(
                "could not remove the leftover of a failed save %s: %s",
                self.storage.display(staging), e,
            )

    def _write_rank(
        self, state: dict[str, dict[str, Any]], directory: str, rank: int
    ) -> tuple[dict[str, Any], Any]:
        tensors: dict[str, Any] = {}
        trees: dict[str, Any] = {}
        for part, value in state.items():
            if part in ("dense", "extra") and rank != 0:
                continue  # replicated: rank 0 writes them
            prefix = f"{part}/r{rank}" if part in PER_RANK_PARTS else part
            trees[part] = encode_tree(value, prefix, tensors)
        if rank != 0:  # a replicated (non-sharded) tensor of a sharded part: rank 0's copy
            tensors = {k: v for k, v in tensors.items()
                       if is_sharded(v) or k.startswith(tuple(f"{p}/" for p in PER_RANK_PARTS))}
        result = write_tensors(
            self.storage, directory, tensors, f"data-r{rank:05d}", self.concurrency,
            self.chunk_bytes,
        )
        return trees, result

    def _manifest(
        self,
        name: str,
        gathered: list[dict[str, Any]],
        world: int,
        metrics: Optional[dict[str, float]],
    ) -> dict[str, Any]:
        from recframe import __version__

        tensors: dict[str, Any] = {}
        files: dict[str, Any] = {}
        parts: dict[str, Any] = {}
        for local in sorted(gathered, key=lambda g: g["rank"]):
            for key, entry in local["tensors"].items():
                if key in tensors:  # another rank's shards of the same sharded tensor
                    tensors[key]["shards"].extend(entry["shards"])
                else:
                    tensors[key] = entry
            for fname, entry in local["files"].items():
                files[fname] = dict(entry, rank=local["rank"])
            for part, tree in local["trees"].items():
                if part in PER_RANK_PARTS:
                    parts.setdefault(part, {})[str(local["rank"])] = tree
                elif part not in parts:
                    parts[part] = tree
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "recframe_version": __version__,
            "name": name,
            "step": int(name.split("_", 1)[1]) if name.split("_", 1)[1].isdigit() else None,
            "world_size": world,
            "created_unix": time.time(),
            "metrics": dict(metrics or {}),
            **({"run_id": self.writer_lock.run_id} if self.writer_lock is not None else {}),
            "files": files,
            "tensors": tensors,
            "parts": parts,
        }

    # --- retention ----------------------------------------------------------------
    def prune(self, keep: Optional[set[int]] = None) -> list[str]:
        """Delete this run's committed checkpoints beyond ``max_keep`` (oldest first),
        never one in ``keep``; the rules are `policies.KeepPolicy`'s. A failed delete is
        logged, not raised. Returns the deleted paths."""
        from recframe.checkpoint.policies import KeepPolicy, LatestN

        if not distributed.is_main_process():
            return []
        found = self.owned(self.list_checkpoints())
        return self.delete(KeepPolicy(LatestN(self.max_keep)).deletable(found, keep))

    def is_foreign(self, path: str) -> bool:
        """Whether ``path`` (an entry of the output dir) is not this output dir's own:
        a symlink, or something that resolves outside it (another run's checkpoint
        linked in). Retention and cleanup never delete or move such an entry."""
        if not self.storage.is_local:
            return False  # object stores have no links
        import os

        if os.path.islink(path):
            return True
        root = os.path.realpath(self.storage.root)
        real = os.path.realpath(path)
        return os.path.dirname(real) != root

    def owned(self, checkpoints: list[CheckpointInfo]) -> list[CheckpointInfo]:
        """The checkpoints of ``checkpoints`` that are this output dir's own."""
        return [c for c in checkpoints if not self.is_foreign(c.path)]

    def delete(self, checkpoints: list[CheckpointInfo]) -> list[str]:
        """Delete checkpoints, newest first (a delta goes before the checkpoints its chain
        needs, so a kill at any instant leaves no committed delta without its chain): the
        manifest first (uncommits), then the files. A foreign entry (`is_foreign`: a
        symlink to another run's checkpoint) is never deleted, nor followed."""
        from recframe.checkpoint.incremental import chain_steps

        deleted = []
        needed: set[str] = set()  # the chains of checkpoints that are still committed
        for ckpt in sorted(checkpoints, key=lambda c: c.step, reverse=True):
            if self.is_foreign(ckpt.path):
                logger.warning("not deleting %s: it is not this output dir's own (a "
                               "symlink to another run's checkpoint?)", ckpt.path)
                continue
            if ckpt.name in needed:
                logger.warning("not deleting checkpoint %s: a checkpoint that could not be "
                               "deleted still needs it", ckpt.path)
                continue
            try:
                self.storage.remove_tree(self.storage.join(ckpt.path, MANIFEST))
            except OSError as e:
                logger.warning("could not delete checkpoint %s: %s", ckpt.path, e)
                needed.update(chain_steps(ckpt.manifest))
                continue
            try:
                self.storage.remove_tree(ckpt.path)
                deleted.append(ckpt.path)
                logger.info("deleted old checkpoint %s", self.storage.display(ckpt.path))
            except OSError as e:  # uncommitted now: a leftover, removed at the next start
                logger.warning("could not delete checkpoint %s: %s", ckpt.path, e)
        return deleted

    def move_aside(self, checkpoints: list[CheckpointInfo], label: str) -> list[str]:
        """Move committed checkpoints out of the run into
        ``<output_dir>/abandoned/<label>/`` (a rollback: they belong to a timeline the
        run left), newest first; never deleted, never listed or restored again unless a
        user moves them back. Local: one atomic rename each; object stores: a copy,
        then the original's manifest (uncommits), then its files. Returns the new paths."""
        moved = []
        area = self.storage.path(ABANDONED_DIR, label)
        self.storage.makedirs(area)
        for ckpt in sorted(checkpoints, key=lambda c: c.step, reverse=True):
            if self.is_foreign(ckpt.path):
                continue
            target = self.storage.join(area, ckpt.name)
            with naming_errors(self.storage, "moving aside", ckpt.path):
                if self.storage.atomic_rename:
                    self.storage.rename(ckpt.path, target)
                else:
                    self.storage.fs.copy(self.storage.strip(ckpt.path),
                                         self.storage.strip(target), recursive=True)
                    self.storage.remove_tree(self.storage.join(ckpt.path, MANIFEST))
                    self.storage.remove_tree(ckpt.path)
            logger.warning("moved %s aside to %s (a newer checkpoint of the timeline this "
                           "run rolled back from)", self.storage.display(ckpt.path),
                           self.storage.display(target))
            moved.append(target)
        return moved

    def _foreign_writer(self) -> Optional[dict[str, Any]]:
        """The lock record of another live job writing this output dir, or None."""
        lock = self.writer_lock
        if lock is not None and lock.held:
            return None
        return live_holder(self.storage, lock.run_id if lock is not None else None)

    def _check_writer(self) -> None:
        """Before writing or committing: this run holds the output dir's writer lock,
        or no other live job does."""
        lock = self.writer_lock
        if lock is not None and lock.held:
            lock.verify()
            return
        holder = self._foreign_writer()
        if holder is not None:
            raise WriterLockError(
                f"not saving into {self.storage.display(self.storage.root)}: another job "
                f"writes there: {WriterLock.describe(holder)}"
            )

    # --- load ---------------------------------------------------------------------
    def resolve(self, ckpt_path: Optional[str] = None, ckpt_id: Any = None) -> str:
        if ckpt_path:
            return ckpt_path
        if ckpt_id is not None:
            name = ckpt_name(ckpt_id)
            if "/" in name or "\\" in name or name.startswith("ckpt_..") or "\0" in name:
                raise ValueError(f"checkpoint id {ckpt_id!r} is not a checkpoint name of "
                                 f"{self.storage.display(self.storage.root)}")
            return self.storage.path(name)
        latest = self.latest_checkpoint()
        if latest is None:
            raise CheckpointError(
                f"no committed checkpoint under {self.storage.display(self.storage.root)}"
            )
        return latest.path

    def load(
        self,
        ckpt_path: Optional[str] = None,
        ckpt_id: Any = None,
        load_conf: Optional[dict[str, Any]] = None,
    ) -> dict[str, Any]:
        """Load a checkpoint (``ckpt_path``, or ``ckpt_<ckpt_id>`` under output_dir, or
        the latest) into the model, optimizers and registered objects. Returns the
        manifest."""
        path = self.resolve(ckpt_path, ckpt_id)
        return self.load_by_config(path, load_conf or {})

    def load_by_config(self, path: str, conf: dict[str, Any]) -> dict[str, Any]:
        """Load the parts ``conf["load"]`` (default all) minus ``conf["exclude"]``;
        ``conf["strict"]`` (default True) makes missing or unexpected entries an error.

        All or nothing (`recframe.checkpoint.restore`): every byte is checked before it
        reaches a live tensor, and a corrupt checkpoint leaves the model, optimizers and
        registered objects as they were."""
        from recframe.checkpoint import restore

        load, exclude, strict = _parse_conf(conf)
        storage = (
            self.storage if _same_root(self.storage, path)
            else Storage(path, **self.storage_options)
        )
        directory = path if storage is self.storage else storage.root
        manifest = read_manifest(storage, directory)
        if manifest is None:
            raise CheckpointError(
                f"{storage.display(directory)} is not a committed checkpoint (no {MANIFEST})"
            )
        if self.row_tracker is not None:
            self.row_tracker.invalidate("a checkpoint was loaded")
        wanted = [p for p in PARTS if p in load and p not in exclude]
        return restore.restore(self, storage, directory, manifest, wanted, strict)


def read_manifest(storage: Storage, path: str, quiet: bool = False) -> Optional[dict[str, Any]]:
    """Parse and validate ``<path>/manifest.json`` (`recframe.checkpoint.manifest`);
    None when absent. A manifest that exists but is not valid makes the checkpoint
    corrupt: a `CheckpointCorruptError`, or a warning and None when ``quiet``. A
    manifest of a newer format version is always an error (`CheckpointVersionError`):
    skipping it would silently restore an older checkpoint."""
    from recframe.checkpoint.format import read_member
    from recframe.checkpoint.manifest import MAX_MANIFEST_BYTES, parse_manifest

    mpath = storage.join(path, MANIFEST)
    try:
        try:
            raw = read_member(storage, path, MANIFEST, MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            return None
        except CheckpointCorruptError:
            raise
        except OSError as e:
            if isinstance(e, NotADirectoryError) or isinstance(e.__cause__, NotADirectoryError):
                return None  # ``path`` is a file: not a checkpoint directory
            # a storage error (network, permissions) is not "uncommitted": silently
            # skipping the newest checkpoint would restore an older one, so it is raised
            # even when quiet
            raise
        return parse_manifest(raw, storage.display(mpath))
    except CheckpointCorruptError as e:
        if quiet:
            logger.warning("ignoring %s: %s", storage.display(path), e)
            return None
        raise


def _parse_conf(conf: Any) -> tuple[set[str], set[str], bool]:
    if not isinstance(conf, dict):
        raise ValueError(f"load config must be a dict with load/exclude/strict, got {conf!r}")
    unknown_keys = set(conf) - {"load", "exclude", "strict", "path"}
    if unknown_keys:
        raise ValueError(
            f"unknown load config key(s) {sorted(unknown_keys)}; use load, exclude, strict"
        )
    load = conf.get("load", ["*"])
    exclude = conf.get("exclude", [])
    strict = conf.get("strict", True)
    if isinstance(load, str):
        load = [load]
    if isinstance(exclude, str):
        exclude = [exclude]
    if not isinstance(strict, bool):
        raise ValueError(f"load config 'strict' must be true or false, got {strict!r}")
    for key, names in (("load", load), ("exclude", exclude)):
        bad = [n for n in names if n != "*" and n not in PARTS]
        if bad:
            raise ValueError(
                f"unknown checkpoint part(s) {bad} in {key!r}; parts are {list(PARTS)} or '*'"
            )
    load_set = set(PARTS) if "*" in load else set(load)
    exclude_set = set(PARTS) if "*" in exclude else set(exclude)
    return load_set, exclude_set, strict


def _same_root(storage: Storage, path: str) -> bool:
    try:
        other = Storage(path)
    except Exception:  # noqa: BLE001
        return False
    return type(other.fs) is type(storage.fs) and (
        other.root == storage.root or other.root.startswith(storage.root.rstrip("/") + "/")
    )


__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "PARTS",
    "Saver",
    "StorageError",
    "ckpt_name",
    "split_model_state",
]
