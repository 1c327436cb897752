"""The checkpoint format: state trees as JSON, tensors as raw bytes in chunked files.

Nothing here unpickles. A state tree (nested dicts/lists of numbers, strings and
tensors: what ``state_dict()`` returns) is encoded as tagged JSON with each tensor
replaced by a reference; tensors are written as raw little-endian bytes, split by rows
into chunks of at most ``chunk_bytes`` so ``concurrency`` writer threads stay balanced,
each chunk with its CRC32. A tensor may be a ``ShardedTensor`` (torchrec sharding):
each rank writes its local shards with their global offsets, and a reader fills any
target layout from the overlapping chunks (resharding).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import itertools
import math
import mmap
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from recframe.checkpoint.storage import Storage, StorageError, crc32, read_into

DEFAULT_CHUNK_BYTES = 64 << 20

VERIFY_BY_MAPPING: Optional[bool] = None
"""How a local chunk is checked before anything live is written. None (default): from
a read-only memory map of just that chunk when its file lies on a local disk or in
memory (ext4, xfs, btrfs, tmpfs...: `MAPPABLE_FILESYSTEMS`), holds the chunk (``fstat``)
and the chunk looks cached (`_cached`) and is at least `VERIFY_MAP_MIN_BYTES`, else by
reading. True: the same on any local filesystem; False: always read (in
`VERIFY_SLICE_BYTES` slices through a per-thread buffer, each slice checked while in the
CPU cache). Measured (docs/checkpoints.md): the mapped check is 20-40% faster on cached
pages (no copy); page faults on evicted pages cost more CPU than reads (so those are
read). The risk it takes: a file truncated by another process while its chunk is being
checked, or a failed page-in on a network filesystem (not mapped by default), raises
SIGBUS where a read returns an error."""

VERIFY_MAP_MIN_BYTES = 2 << 20
"""Chunks smaller than this are read, not mapped, whatever `VERIFY_BY_MAPPING` says:
a mapping's fixed cost (three probes, ``mmap``, ``munmap``: ~10 us) is more than
reading such a chunk costs (measured on cached files: 4 KiB read 1.5 us / mapped 11.5,
1 MiB 52 / 81, 4 MiB 456 / 129)."""

MAPPABLE_FILESYSTEMS = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "zfs", "bcachefs", "nilfs2",
    "reiserfs", "tmpfs", "ramfs", "overlay",
})
"""Filesystem types (``/proc/self/mountinfo``) whose files `VERIFY_BY_MAPPING` = None
maps: local disks and memory, where reading a cached page cannot fail."""

VERIFY_SLICE_BYTES = 512 << 10
"""Slice size of a local chunk checked by reading (not cached, or not mapped): each
slice is read into a per-thread buffer this size and checked while it is in the CPU
cache (256 KiB-1 MiB measured alike, 4 MiB slower on this machine's 1 MiB L2)."""

RACY_WINDOW_NS = 20_000_000
"""How long after a local file's last change (its ctime) its identity (inode, size,
mtime, ctime) is not yet a safe witness of its bytes: a filesystem stamps times at
clock-tick granularity (<= 10 ms at HZ >= 100), so a later write within the same tick
would leave the stamps as they were. `TensorReader.verify` waits this out for files
changed so recently (at most this long; 2 s on filesystems that stamp whole seconds)."""

# torchrec's state dicts hold ShardedTensors; reading their layout is not a use to warn
# about on every save
warnings.filterwarnings("ignore", message="Please use DTensor instead", category=FutureWarning)

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
        torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128,
        torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64,
    )
}


class CheckpointCorruptError(RuntimeError):
    """A checkpoint file failed its size or checksum check; the message names it."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise CheckpointCorruptError(f"unknown tensor dtype {name!r} in manifest") from None


# --- state trees -----------------------------------------------------------------
@dataclass
class _ShardMeta:
    shard_offsets: list[int]
    shard_sizes: list[int]


@dataclass
class _HostShard:
    metadata: _ShardMeta
    tensor: torch.Tensor


class HostShards:
    """A host copy of a ShardedTensor's local shards (what an async save writes)."""

    def __init__(self, value: Any) -> None:
        self._size = list(value.size())
        self.dtype = value.dtype
        self._shards = [
            _HostShard(
                _ShardMeta(list(s.metadata.shard_offsets), list(s.metadata.shard_sizes)),
                s.tensor.detach().to("cpu", copy=True),
            )
            for s in value.local_shards()
        ]

    def size(self) -> torch.Size:
        return torch.Size(self._size)

    def local_shards(self) -> list[_HostShard]:
        return self._shards


def is_sharded(value: Any) -> bool:
    if isinstance(value, HostShards):
        return True
    try:
        from torch.distributed._shard.sharded_tensor import ShardedTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, ShardedTensor)


def global_shape(value: Any) -> list[int]:
    """The whole shape of a tensor, ``ShardedTensor`` or `HostShards`. A
    ``ShardedTensor``'s ``size()``/``dim()`` go through its ``__torch_function__``
    (~30 us a call: pytree walks, a warning); its metadata holds the same size."""
    if isinstance(value, HostShards):
        return list(value.size())
    if is_sharded(value):
        return list(value.metadata().size)
    return list(value.shape)


def local_regions(value: Any) -> list[tuple[list[int], torch.Tensor]]:
    """(offsets in the whole tensor, local tensor) of each piece this process holds."""
    if is_sharded(value):
        return [(list(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
    return [([0] * value.dim(), value)]


def snapshot_state(obj: Any) -> Any:
    """A copy of a state tree whose tensors live in fresh host memory, so training can
    go on while it is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if is_sharded(obj):
        return HostShards(obj)
    if isinstance(obj, dict):
        return {k: snapshot_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [snapshot_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(snapshot_state(v) for v in obj)
    import copy

    return copy.deepcopy(obj)


def encode_tree(obj: Any, prefix: str, tensors: dict[str, Any]) -> Any:
    """Encode ``obj`` as tagged JSON; tensors are added to ``tensors`` under unique keys
    starting with ``prefix`` and replaced by ``{"t": key}``."""
    return _encode(obj, prefix, tensors)


def _tensor_key(path: str, tensors: dict[str, Any]) -> str:
    key = path
    n = 1
    while key in tensors:
        key = f"{path}#{n}"
        n += 1
    return key


def _encode(obj: Any, path: str, tensors: dict[str, Any]) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"f": repr(obj)}
    if isinstance(obj, torch.Tensor) or is_sharded(obj):
        key = _tensor_key(path, tensors)
        tensors[key] = obj
        return {"t": key}
    if isinstance(obj, np.ndarray):
        key = _tensor_key(path, tensors)
        # not np.ascontiguousarray: it turns a 0-d array into a 1-d one
        array = obj if obj.flags.c_contiguous and obj.flags.writeable else obj.copy(order="C")
        try:
            tensors[key] = torch.from_numpy(array)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"cannot checkpoint a numpy array of dtype {obj.dtype} at {path!r}: {e}"
            ) from None
        return {"t": key, "np": True}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), path, tensors)
    if isinstance(obj, torch.dtype):
        return {"dt": dtype_name(obj)}
    if isinstance(obj, torch.Size):
        return {"tu": list(obj)}
    if isinstance(obj, dict):
        return {
            "d": [
                [_encode(k, f"{path}.<key>", tensors), _encode(v, f"{path}.{k}", tensors)]
                for k, v in obj.items()
            ]
        }
    if isinstance(obj, list):
        return {"l": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, tuple):
        return {"tu": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, bytes):
        return {"b": base64.b64encode(obj).decode("ascii")}
    raise TypeError(
        f"cannot checkpoint a value of type {type(obj).__name__} at {path!r}: checkpoints hold "
        "tensors, numbers, strings, bytes, None and dicts/lists/tuples of them"
    )


def decode_tree(obj: Any, tensor: Callable[[str], Any]) -> Any:
    """Inverse of `encode_tree`; ``tensor(key)`` returns the tensor stored under key."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):  # never produced by encode; tolerate hand-written JSON
        return [decode_tree(v, tensor) for v in obj]
    if not isinstance(obj, dict) or len(obj) not in (1, 2):
        raise CheckpointCorruptError(f"malformed state tree node {str(obj)[:80]!r}")
    if "t" in obj:
        value = tensor(obj["t"])
        return value.numpy() if obj.get("np") else value
    ((tag, value),) = obj.items()
    if tag == "d":
        return {decode_tree(k, tensor): decode_tree(v, tensor) for k, v in value}
    if tag == "l":
        return [decode_tree(v, tensor) for v in value]
    if tag == "tu":
        return tuple(decode_tree(v, tensor) for v in value)
    if tag == "f":
        return float(value)
    if tag == "dt":
        return dtype_from_name(value)
    if tag == "b":
        return base64.b64decode(value)
    raise CheckpointCorruptError(f"unknown state tree tag {tag!r}")


def tree_tensor_keys(obj: Any) -> list[str]:
    """Tensor keys referenced by an encoded tree."""
    keys: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "t" in node:
                keys.append(node["t"])
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(obj)
    return keys


# --- writing ---------------------------------------------------------------------
@dataclass
class _Chunk:
    key: str
    shard: int
    rows: tuple[int, int]
    data: torch.Tensor  # contiguous CPU tensor holding exactly this chunk's bytes
    nbytes: int
    file: str = ""
    offset: int = 0
    crc: int = 0


@dataclass
class WriteResult:
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(f["size"] for f in self.files.values())


def _shards_of(value: Any) -> tuple[list[int], list[tuple[list[int], list[int], torch.Tensor]]]:
    """(global shape, [(offsets, sizes, local tensor)]) of a tensor or ShardedTensor."""
    if is_sharded(value):
        shards = [
            (list(s.metadata.shard_offsets), list(s.metadata.shard_sizes), s.tensor)
            for s in value.local_shards()
        ]
        return list(value.size()), shards
    return list(value.shape), [([0] * value.dim(), list(value.shape), value)]


def _as_bytes_source(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    return t


def plan_chunks(
    tensors: dict[str, Any], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> tuple[dict[str, dict[str, Any]], list[_Chunk]]:
    """Split tensors into row chunks of at most ``chunk_bytes`` (one row at least)."""
    meta: dict[str, dict[str, Any]] = {}
    chunks: list[_Chunk] = []
    for key, value in tensors.items():
        shape, shards = _shards_of(value)
        entries = []
        dtype = None
        for index, (offsets, sizes, local) in enumerate(shards):
            local = _as_bytes_source(local)
            dtype = local.dtype
            entries.append({"offsets": offsets, "sizes": sizes, "chunks": []})
            rows = local.shape[0] if local.dim() > 0 else 1
            if local.numel() == 0:
                continue
            row_bytes = local.numel() * local.element_size() // rows
            per_chunk = max(1, chunk_bytes // max(1, row_bytes))
            flat = local.reshape(rows, -1) if local.dim() > 0 else local.reshape(1, 1)
            for start in range(0, rows, per_chunk):
                stop = min(rows, start + per_chunk)
                part = flat[start:stop]
                chunks.append(
                    _Chunk(key, index, (start, stop), part, part.numel() * part.element_size())
                )
        if dtype is None:
            dtype = value.dtype
        meta[key] = {"dtype": dtype_name(dtype), "shape": shape, "shards": entries}
    return meta, chunks


def _byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_tensors(
    storage: Storage,
    directory: str,
    tensors: dict[str, Any],
    file_prefix: str,
    concurrency: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    durable: bool = True,
) -> WriteResult:
    """Write ``tensors`` into at most ``concurrency`` files ``<prefix>-<i>.bin`` in
    ``directory``, one writer thread per file, chunks balanced by size."""
    meta, chunks = plan_chunks(tensors, chunk_bytes)
    n_files = max(1, min(concurrency, len(chunks)))
    loads = [0] * n_files
    assignment: list[list[_Chunk]] = [[] for _ in range(n_files)]
    for chunk in sorted(chunks, key=lambda c: -c.nbytes):  # greedy: biggest first
        i = loads.index(min(loads))
        assignment[i].append(chunk)
        loads[i] += chunk.nbytes
    names = [f"{file_prefix}-{i:03d}.bin" for i in range(n_files)]

    def write_file(i: int) -> int:
        path = storage.join(directory, names[i])
        offset = 0

        def views():
            nonlocal offset
            for chunk in assignment[i]:
                view = _byte_view(chunk.data)
                chunk.file, chunk.offset, chunk.crc = names[i], offset, crc32(view)
                offset += chunk.nbytes
                yield view

        with naming_errors(storage, "writing", path):
            return storage.write_chunks(path, views(), durable=durable)

    if chunks or not tensors:
        sizes = _run_threads(write_file, n_files, concurrency) if chunks else []
    else:
        sizes = []
    result = WriteResult(tensors=meta)
    for i, size in enumerate(sizes):
        result.files[names[i]] = {
            "size": size,
            "crc32": [c.crc for c in assignment[i]],
        }
    for chunk in chunks:
        meta[chunk.key]["shards"][chunk.shard]["chunks"].append(
            {
                "file": chunk.file,
                "offset": chunk.offset,
                "nbytes": chunk.nbytes,
                "rows": list(chunk.rows),
                "crc32": chunk.crc,
            }
        )
    for entry in meta.values():
        for shard in entry["shards"]:
            shard["chunks"].sort(key=lambda c: c["rows"][0])
    return result


@contextlib.contextmanager
def naming_errors(storage: Storage, what: str, path: str) -> Iterator[None]:
    """Raise an ``OSError`` that does not say where it happened (ENOSPC from a write,
    an error of a filesystem client) as a `StorageError` naming ``path``."""
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(f"{what} {storage.display(path)} failed: {e}") from e


def _run_threads(
    fn: Callable[[int], Any], n: int, concurrency: int, pool: Optional[Executor] = None
) -> list[Any]:
    """``[fn(i) for i in range(n)]`` on ``concurrency`` threads: the caller's and
    ``concurrency - 1`` of ``pool`` (a fresh one when None), each taking the next
    index until none is left (one hand-off per thread, not per item: a future per
    item cost ~30 us of the GIL each, and the caller no longer sleeps while the pool's
    threads wake). After a failure no new item starts; all are done when it returns,
    which raises the failure of the lowest index that ran."""
    if n <= 1 or concurrency == 1:
        return [fn(i) for i in range(n)]
    helpers = min(n, concurrency) - 1
    if pool is None:
        with ThreadPoolExecutor(max_workers=helpers, thread_name_prefix="ckpt") as ex:
            return _run_threads(fn, n, concurrency, ex)
    results: list[Any] = [None] * n
    errors: dict[int, BaseException] = {}
    indices = itertools.count()  # next() is atomic: each index is taken once

    stop: list[bool] = []  # the caller left take() (done, or interrupted between items)

    def take() -> None:
        for i in indices:
            if i >= n or errors or stop:
                return
            try:
                results[i] = fn(i)
            except BaseException as e:  # re-raised below, lowest index first
                errors[i] = e

    futures = [pool.submit(take) for _ in range(helpers)]
    try:
        take()
    finally:
        stop.append(True)
        # a helper not started yet has nothing left to take: cancelled, not waited for
        # (a call made from a pool thread, with every other thread of the pool in such a
        # call, would wait for a queued task no thread is free to run: a deadlock;
        # wait() waits on a cancelled one until a thread dequeues it)
        _wait_through_interrupts([f for f in futures if not f.cancel()])
    for f in futures:
        if not f.cancelled():
            f.result()  # a failure outside fn (none expected)
    if errors:
        raise errors[min(errors)]
    return results


def _wait_through_interrupts(futures: list[Any]) -> None:
    """``wait(futures)``, even when a KeyboardInterrupt (or another signal handler's
    exception) arrives meanwhile: that is raised once they are done, so no item (a copy
    into a live tensor, a read of a file about to be closed) outlives the call."""
    interrupted: Optional[BaseException] = None
    while True:
        try:
            wait(futures)
            break
        except BaseException as e:  # re-raised once the helpers are done
            interrupted = interrupted or e
    if interrupted is not None:
        raise interrupted


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_pools_pid = os.getpid()


def _pools_after_fork() -> None:
    """In a forked child: no pool (the parent's threads do not exist there) and a fresh
    lock (a parent thread inside `reader_pool` at the fork would leave the inherited
    one held forever: the child's first restore would hang)."""
    global _pools_lock, _pools_pid, _mounts_watch, _mounts_file, _fs_lock
    _pools_lock = threading.Lock()
    _fs_lock = threading.Lock()
    _pools.clear()
    _pools_pid = os.getpid()
    # the inherited watch shares its file with the parent: a poll here would take the
    # parent's notice of a mount change
    _mounts_watch = None
    if _mounts_file is not None:
        with contextlib.suppress(OSError):
            _mounts_file.close()
        _mounts_file = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pools_after_fork)


def reader_pool(workers: int) -> Executor:
    """A process-wide pool of ``workers`` reader threads, kept from restore to restore:
    starting a thread costs ~1 ms on a busy machine, and the 4 a fresh pool started
    per restore were ~15% of a warm 160 MB one. Shared by concurrent restores, even ones
    started from its own threads: `_run_threads` never waits for a task of it that has
    not started (no deadlock); a forked child makes its own (the parent's threads do not
    exist there)."""
    global _pools_pid
    with _pools_lock:
        if _pools_pid != os.getpid():
            _pools.clear()
            _pools_pid = os.getpid()
        pool = _pools.get(workers)
        if pool is None:
            pool = _pools[workers] = ThreadPoolExecutor(max_workers=workers,
                                                        thread_name_prefix="ckpt-read")
        return pool


# --- reading ---------------------------------------------------------------------
def _check_member_name(storage: Storage, directory: str, name: Any) -> str:
    where = storage.display(directory)
    if not isinstance(name, str) or "/" in name or "\\" in name or "\0" in name \
            or name in ("", ".", ".."):
        raise CheckpointCorruptError(
            f"{where}: entry {str(name)[:80]!r} is not a plain file name inside the checkpoint"
        )
    return where


def open_member(
    storage: Storage, directory: str, name: str, need: int = 0, sized: bool = True
) -> tuple[Any, int]:
    """Open the file ``name`` of the checkpoint ``directory`` for reading: (binary
    file, its real size). Refused (`CheckpointCorruptError` naming the checkpoint and
    the entry): a name that is not a plain file name, a local symlink resolving outside
    the output dir (the checkpoint's parent; a symlinked-in checkpoint directory may
    hold its own files), anything but a regular file (``/dev/zero``, a FIFO), and a
    file shorter than ``need`` bytes (what the manifest says is in it). On an object
    store without ``sized`` the size is not asked for (-1: one request less per
    chunk; a short object gives a short read, which is caught)."""
    where = _check_member_name(storage, directory, name)
    path = storage.join(directory, name)
    if not storage.is_local:  # no links, no special files: a short read is caught
        f = storage.open_read(path)
        if not sized:
            return f, -1
        try:
            with naming_errors(storage, "reading the size of", path):
                size = storage.size(path)
        except FileNotFoundError:
            f.close()
            raise StorageError(f"reading {storage.display(path)} failed: not found") from None
        except BaseException:
            f.close()
            raise
    else:
        import os
        import stat

        real = os.path.realpath(path)
        roots = {os.path.realpath(directory), os.path.realpath(os.path.dirname(
            os.path.abspath(directory).rstrip(os.sep)))}
        if not any(real.startswith(root.rstrip(os.sep) + os.sep) for root in roots):
            raise CheckpointCorruptError(
                f"{where}: entry {name!r} resolves to {real}, outside the checkpoint's "
                "output dir; refused"
            )
        try:
            st = os.stat(real)
        except OSError as e:
            raise StorageError(f"opening {storage.display(path)} failed: {e}") from e
        if not stat.S_ISREG(st.st_mode):  # before opening: a FIFO's open would block
            raise CheckpointCorruptError(f"{where}: entry {name!r} is not a regular file")
        # opened without blocking and checked again: a file swapped for a FIFO since the
        # stat must not hang the restore in open()
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise StorageError(f"opening {storage.display(path)} failed: {e}") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CheckpointCorruptError(f"{where}: entry {name!r} is not a regular file")
            os.set_blocking(fd, True)
            f = open(fd, "rb", buffering=0)
        except BaseException:
            os.close(fd)
            raise
        size = st.st_size
    if size < need:
        f.close()
        raise CheckpointCorruptError(
            f"{storage.display(path)} is truncated: {size} bytes, the manifest places "
            f"{need} bytes in it"
        )
    return f, size


def read_member(storage: Storage, directory: str, name: str, limit: int) -> bytes:
    """The whole small file ``name`` of a checkpoint (checked as `open_member` does),
    refused when larger than ``limit`` bytes; ``FileNotFoundError`` when absent."""
    path = storage.join(directory, name)
    if not storage.is_local:  # one object: its size, then one GET
        _check_member_name(storage, directory, name)
        size = storage.size(path)  # FileNotFoundError when absent
        if size > limit:
            raise CheckpointCorruptError(
                f"{storage.display(path)} is {size} bytes, more than the {limit} a "
                f"{name} may have"
            )
        return storage.read_bytes(path)
    try:
        f, size = open_member(storage, directory, name)
    except StorageError as e:
        if isinstance(e.__cause__, FileNotFoundError) or "not found" in str(e):
            raise FileNotFoundError(storage.display(path)) from e
        raise
    with f:
        if size > limit:
            raise CheckpointCorruptError(
                f"{storage.display(path)} is {size} bytes, more than the {limit} a "
                f"{name} may have"
            )
        buf = bytearray(size)
        try:
            read_into(f, 0, memoryview(buf), storage.display(path))
        except StorageError as e:
            raise CheckpointCorruptError(str(e)) from e
        return bytes(buf)


@dataclass
class _Job:
    """One chunk's overlap with one target region: what to read and where it goes."""

    key: str
    chunk: dict[str, Any]
    box_size: list[int]
    dest: torch.Tensor  # the target's view the overlap fills
    c_slices: tuple[slice, ...]  # the overlap inside the chunk's box
    whole: bool  # the overlap is the whole chunk and dest a contiguous CPU view of it
    staged: Optional[torch.Tensor] = None


class TensorReader:
    """Reads tensors of one checkpoint directory, checking every chunk's CRC32.

    Fresh tensors (``read_many`` with None targets) are read straight into their new
    memory. Live tensors (a model's, an optimizer's) are written only with checked
    bytes, and only once every chunk they need checked out: `plan` checks shapes and
    dtypes, `verify` checks each chunk's CRC32 (``keep``: reading and keeping the
    bytes, one read in all; locally: from a memory map of the file, no copy, after
    recording each file's identity), `apply` confirms every local file is the one
    verified, then reads each chunk straight into its live tensor (through a scratch
    buffer, checked again, where the tensor's region is not one contiguous block).
    Within a `session` (`read_many`, `check`, a transaction's verify and apply) each
    local file is opened once and shared by the threads.
    """

    def __init__(
        self, storage: Storage, directory: str, tensors: dict[str, Any], concurrency: int = 4
    ) -> None:
        self.storage = storage
        self.directory = directory
        self.meta = tensors
        self.concurrency = max(1, concurrency)
        self._scratch = threading.local()
        self._verified: dict[str, tuple[int, ...]] = {}  # local file: identity at verify
        self._files: Optional[dict[str, tuple[Any, int]]] = None  # `session`'s open files
        self._files_lock = threading.Lock()
        self._maps: Optional[dict[str, int]] = None  # `_mapping`'s files: bytes held
        self.pool: Optional[Executor] = None
        """Worker threads to use; None: `reader_pool` (``concurrency`` threads)."""

    def _scratch_for(self, job: _Job) -> torch.Tensor:
        """This thread's scratch buffer viewed as ``job``'s chunk box: reused from chunk
        to chunk (fresh memory would cost a page fault per 4 KiB of every chunk)."""
        nbytes = job.chunk["nbytes"]
        buf = getattr(self._scratch, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = self._scratch.buf = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf[:nbytes].view(job.dest.dtype).reshape(job.box_size)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Within it, each local file is opened (and its name and place checked) once
        and shared by the reader's threads (positional reads), instead of once per
        chunk and phase; all are closed when the outermost session ends. `verify` and
        `apply` of a transaction run in one session, so they read the very file (the
        open inode) whose identity was recorded."""
        if self._files is not None:
            yield
            return
        self._files = {}
        try:
            yield
        finally:
            files, self._files = self._files, None
            for f, _size in files.values():
                f.close()

    @contextlib.contextmanager
    def _member(self, name: str, need: int, sized: bool = True) -> Iterator[Any]:
        """The open file ``name``, which must hold ``need`` bytes (`open_member`'s
        checks): the session's shared one for a local file (read it only with
        positional reads: `read_into`, ``mmap``), else one of its own, closed on exit."""
        files = self._files
        if files is None or not self.storage.is_local:
            f, _size = open_member(self.storage, self.directory, name, need, sized=sized)
            with f:
                yield f
            return
        with self._files_lock:
            entry = files.get(name)
            if entry is None:
                entry = files[name] = open_member(self.storage, self.directory, name, need)
        f, size = entry
        if size < need:
            raise CheckpointCorruptError(
                f"{self._display(name)} is truncated: {size} bytes, the manifest places "
                f"{need} bytes in it"
            )
        yield f

    def _threads(self, fn: Callable[[int], Any], n: int) -> list[Any]:
        if n <= 1 or self.concurrency == 1:  # no pool needed
            return [fn(i) for i in range(n)]
        return _run_threads(fn, n, self.concurrency,
                            self.pool or reader_pool(self.concurrency))

    def __contains__(self, key: str) -> bool:
        return key in self.meta

    def shape(self, key: str) -> list[int]:
        return list(self._entry(key)["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return dtype_from_name(self._entry(key)["dtype"])

    def read(self, key: str, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The whole tensor ``key`` (into ``out`` when given: same shape and dtype)."""
        return self.read_many({key: out})[key]

    def read_many(self, targets: dict[str, Any]) -> dict[str, Any]:
        """Fill each target (a tensor, a ShardedTensor, or None to allocate) from the
        checkpoint. New tensors are read in place; given targets only after all their
        chunks verified (`plan`, `verify`, `apply`)."""
        with self.session():
            return self._read_many(targets)

    def _read_many(self, targets: dict[str, Any]) -> dict[str, Any]:
        results: dict[str, Any] = {}
        fresh: dict[str, Any] = {}
        live: dict[str, Any] = {}
        self._check_extents([key for key, out in targets.items() if out is None])
        for key, out in targets.items():
            if out is None:
                entry = self._entry(key)
                out = fresh[key] = torch.empty(
                    list(entry["shape"]), dtype=dtype_from_name(entry["dtype"])
                )
            else:
                live[key] = out
            results[key] = out
        if fresh:
            jobs = self.plan(fresh)
            self._threads(lambda i: self._fetch(jobs[i]), len(jobs))
        if live:
            jobs = self.plan(live)
            self.verify(jobs, keep=not self.storage.is_local)
            self.apply(jobs)
        return results

    def _check_extents(self, keys: list[str]) -> None:
        """Every file the chunks of ``keys`` lie in holds the bytes the manifest places
        there, checked before fresh memory of the manifest's shapes is allocated (a
        hostile shape backed by a declared, not a real, file size)."""
        need: dict[str, int] = {}
        for key in keys:
            for shard in self._entry(key)["shards"]:
                for chunk in shard["chunks"]:
                    end = chunk["offset"] + chunk["nbytes"]
                    need[chunk["file"]] = max(need.get(chunk["file"], 0), end)
        for name, end in need.items():
            with self._member(name, end):
                pass

    def _entry(self, key: str) -> dict[str, Any]:
        try:
            return self.meta[key]
        except KeyError:
            raise KeyError(f"tensor {key!r} is not in the checkpoint") from None

    def plan(self, targets: dict[str, Any]) -> list[_Job]:
        """The chunk jobs filling ``targets``; raises ``ValueError`` naming the tensor
        when a target's shape or dtype is not the checkpoint's (before reading)."""
        jobs: list[_Job] = []
        for key, out in targets.items():
            entry = self._entry(key)
            dtype = dtype_from_name(entry["dtype"])
            shape = list(entry["shape"])
            target_shape = global_shape(out)
            if target_shape != shape:
                raise ValueError(
                    f"checkpoint tensor {key!r} has shape {shape}, the target has "
                    f"{target_shape}; the model does not match the checkpoint"
                )
            regions = local_regions(out)
            for offsets, local in regions:
                if local.dtype != dtype:
                    raise ValueError(
                        f"checkpoint tensor {key!r} is {dtype}, the target is {local.dtype}"
                    )
                for shard in entry["shards"]:
                    for chunk in shard["chunks"]:
                        job = self._job(chunk, shard["offsets"], shard["sizes"], local, key,
                                        offsets)
                        if job is not None:
                            jobs.append(job)
        return jobs

    def verify(self, jobs: list[_Job], keep: bool) -> None:
        """Check every job's chunk: its size and CRC32; nothing live is written.
        ``keep``: read the bytes and hold them for `apply` (one read; memory: the
        chunks). Else, on a local filesystem: record each file's identity (waiting out
        a change in its current clock tick, see `RACY_WINDOW_NS`) for `apply` to
        compare, then check each chunk from a read-only memory map of its file where
        its pages are cached, else by reading it in small slices (`VERIFY_BY_MAPPING`);
        on other stores each chunk is read into scratch, to be read and checked again by
        `apply`."""
        if keep:
            def stage(i: int) -> None:
                job = jobs[i]
                job.staged = torch.empty(job.box_size, dtype=job.dest.dtype)
                self._read_checked(job, job.staged)

            self._threads(stage, len(jobs))
            return
        if not self.storage.is_local:
            self._threads(lambda i: self._check_chunk(jobs[i]), len(jobs))
            return
        ends = _ends(jobs)
        self._settle(ends)
        with self._mapping(ends):
            self._threads(lambda i: self._check_chunk(jobs[i]), len(jobs))

    def check(self, jobs: list[_Job]) -> list[str]:
        """Like `verify` without keeping anything, and going on past a bad chunk: the
        problems of every chunk (empty: all intact)."""
        def one(i: int) -> Optional[str]:
            try:
                self._check_chunk(jobs[i])
            except (CheckpointCorruptError, StorageError) as e:
                return str(e)
            return None

        with self.session(), self._mapping(_ends(jobs) if self.storage.is_local else {}):
            return [p for p in self._threads(one, len(jobs)) if p]

    @contextlib.contextmanager
    def _mapping(self, ends: dict[str, int]) -> Iterator[None]:
        """Within it, `_check_chunk` checks the cached chunks of the local files of
        ``ends`` (name -> the bytes its chunks need) that may be mapped
        (`VERIFY_BY_MAPPING`, `_may_map`) from a read-only mapping of each chunk."""
        if not ends or VERIFY_BY_MAPPING is False or self._maps is not None:
            yield
            return
        self._maps = {name: end for name, end in ends.items() if self._may_map(name, end)}
        try:
            yield
        finally:
            self._maps = None

    def _may_map(self, name: str, end: int) -> bool:
        """Whether the chunks in the first ``end`` bytes of the local file ``name`` may
        be checked from a mapping: it holds them (``fstat``: a mapping past the end of
        a file raises SIGBUS where touched) and, with `VERIFY_BY_MAPPING` None, lies on
        a filesystem of `MAPPABLE_FILESYSTEMS`."""
        try:
            with self._member(name, end) as f:
                st = os.fstat(f.fileno())
        except (CheckpointCorruptError, OSError):  # StorageError: an OSError
            return False  # the chunk check reports it
        return end > 0 and st.st_size >= end and (VERIFY_BY_MAPPING is True
                                                  or _mappable(st.st_dev))

    def confirm(self, jobs: list[_Job]) -> None:
        """Before `apply` writes anything: every local file `verify` checked for
        ``jobs`` is still the one it checked (same inode, size, mtime and ctime), else
        a `CheckpointCorruptError` naming it. A transaction confirms all its readers'
        jobs before it applies any, so a file changed since it was verified is refused
        with nothing live written."""
        for name in sorted({j.chunk["file"] for j in jobs if j.staged is None}):
            known = self._verified.get(name)
            if known is not None:
                with self._member(name, 0) as f:
                    self._same_file(name, f, known)
                if self._files is not None:  # the name must still lead to that file
                    try:
                        st = os.stat(self.storage.join(self.directory, name))
                    except OSError as e:
                        raise StorageError(f"reading {self._display(name)} failed: {e}") from e
                    if _identity(st) != known:
                        raise self._changed(name)

    def apply(self, jobs: list[_Job]) -> None:
        """Fill the targets with the verified chunks (`confirm` first): a kept chunk is
        copied; a chunk of a local file verified without keeping is read straight into
        its target when that is one contiguous block holding the whole chunk (else
        through scratch and checked again), the file's identity compared before and
        after; a chunk of another store is read into scratch and checked again."""
        self.confirm(jobs)

        def place(i: int) -> None:
            job = jobs[i]
            buf, job.staged = job.staged, None
            if buf is None:
                known = self._verified.get(job.chunk["file"])
                if known is not None and job.whole:
                    self._read_verified(job, known)
                    return
                buf = self._scratch_for(job)
                self._read_checked(job, buf, known)
            job.dest.copy_(buf[job.c_slices] if job.c_slices else buf)

        with torch.no_grad():
            self._threads(place, len(jobs))

    def _job(
        self,
        chunk: dict[str, Any],
        shard_offsets: list[int],
        shard_sizes: list[int],
        target: torch.Tensor,
        key: str,
        target_offsets: list[int],
    ) -> Optional[_Job]:
        ndim = len(shard_sizes)
        t_off = target_offsets
        r0, r1 = chunk["rows"]
        if ndim == 0:
            box_off, box_size = [], []
        else:
            box_off = [shard_offsets[0] + r0] + list(shard_offsets[1:])
            box_size = [r1 - r0] + list(shard_sizes[1:])
        lo = [max(a, b) for a, b in zip(box_off, t_off)]
        hi = [
            min(a + s, b + ts)
            for a, s, b, ts in zip(box_off, box_size, t_off, list(target.shape))
        ]
        if any(h <= low for low, h in zip(lo, hi)):
            return None  # no overlap with this target region
        covers_chunk = lo == box_off and hi == [a + s for a, s in zip(box_off, box_size)]
        t_slices = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, t_off))
        full_width = ndim == 0 or all(
            lo[d] == t_off[d] and hi[d] == t_off[d] + target.shape[d] for d in range(1, ndim)
        )
        dest = target[t_slices] if ndim else target
        whole = bool(covers_chunk and full_width and dest.is_contiguous()
                     and dest.device.type == "cpu")
        c_slices = tuple(slice(low - o, h - o) for low, h, o in zip(lo, hi, box_off))
        return _Job(key, chunk, box_size, dest, c_slices, whole)

    def _fetch(self, job: _Job) -> None:
        """Read a job of a fresh target: straight into it when it covers the chunk."""
        if job.whole:
            self._read_checked(job, job.dest)
            return
        buf = torch.empty(job.box_size, dtype=job.dest.dtype)
        self._read_checked(job, buf)
        job.dest.copy_(buf[job.c_slices] if job.c_slices else buf)

    # --- the checks --------------------------------------------------------------
    def _display(self, name: str) -> str:
        return self.storage.display(self.storage.join(self.directory, name))

    def _box_nbytes(self, job: _Job) -> int:
        """The chunk's byte count, which the manifest's shapes must agree with."""
        nbytes = math.prod(job.box_size) * job.dest.element_size()
        if nbytes != job.chunk["nbytes"]:
            raise CheckpointCorruptError(
                f"{self._display(job.chunk['file'])}: chunk of {job.key!r} should hold "
                f"{job.chunk['nbytes']} bytes, the manifest's shapes give {nbytes}"
            )
        return nbytes

    def _mismatch(self, job: _Job) -> CheckpointCorruptError:
        r0, r1 = job.chunk["rows"]
        return CheckpointCorruptError(
            f"{self._display(job.chunk['file'])}: checksum mismatch in tensor {job.key!r} "
            f"(rows {r0}..{r1}); the file is corrupt"
        )

    def _open(self, job: _Job) -> Any:
        chunk = job.chunk
        return self._member(chunk["file"], chunk["offset"] + chunk["nbytes"], sized=False)

    def _changed(self, name: str, when: str = "") -> CheckpointCorruptError:
        return CheckpointCorruptError(
            f"{self._display(name)} changed after its checksums were verified"
            f"{when}; refused (is another process writing to this checkpoint?)"
        )

    def _same_file(self, name: str, f: Any, known: tuple[int, ...], when: str = "") -> None:
        if _identity(os.fstat(f.fileno())) != known:
            raise self._changed(name, when)

    def _settle(self, ends: dict[str, int]) -> None:
        """Record the identity of each local file (``ends``: name -> the bytes it must
        hold) for `confirm`. A file changed within `RACY_WINDOW_NS` is stat-ed again
        once that window has passed (its identity must not have moved meanwhile), so a
        later write cannot hide in the clock tick of the recorded stamps. A file
        recorded by an earlier `verify` of this reader must not have changed since."""
        pending: dict[str, os.stat_result] = {}
        for name in sorted(ends):
            st = self._stat(name, ends[name])
            known = self._verified.get(name)
            if known is None:
                pending[name] = st
            elif _identity(st) != known:
                raise CheckpointCorruptError(
                    f"{self._display(name)} changed while the checkpoint was being "
                    "verified; refused (is another process writing to this checkpoint?)"
                )
        for _ in range(5):
            now = time.time_ns()
            racy = {n: st for n, st in pending.items() if now - st.st_ctime_ns < _window(st)}
            for name, st in pending.items():
                if name not in racy:
                    self._verified[name] = _identity(st)
            if not racy:
                return
            time.sleep(max(min(_window(st), st.st_ctime_ns + _window(st) - now)
                           for st in racy.values()) / 1e9)
            pending = {}
            for name, st in racy.items():
                again = self._stat(name, ends[name])
                if _identity(again) == _identity(st):
                    self._verified[name] = _identity(st)
                else:
                    pending[name] = again
            if not pending:
                return
        raise CheckpointCorruptError(
            f"{self._display(min(pending))} kept changing while the checkpoint was being "
            "verified; restore it once the process writing to it is done"
        )

    def _stat(self, name: str, need: int) -> os.stat_result:
        with self._member(name, need) as f:
            return os.fstat(f.fileno())

    def _check_chunk(self, job: _Job) -> None:
        """Check one chunk's size and CRC32 without keeping its bytes (the file's
        identity compared with the one `verify` recorded, if it did). Locally: from a
        mapping of the chunk where `_mapping` allows it and the chunk looks cached
        (`_cached`), else read in slices through this thread's small buffer; on other
        stores: read into this thread's scratch buffer (one request per chunk)."""
        known = self._verified.get(job.chunk["file"])
        if not self.storage.is_local:
            self._read_checked(job, self._scratch_for(job), known)
            return
        nbytes = self._box_nbytes(job)
        offset = job.chunk["offset"]
        maps = self._maps
        end = maps.get(job.chunk["file"], 0) if maps else 0
        with self._open(job) as f:
            if known is not None:
                self._same_file(job.chunk["file"], f, known)
            crc: Optional[int] = None
            if (max(1, VERIFY_MAP_MIN_BYTES) <= nbytes and offset + nbytes <= end
                    and _cached(f.fileno(), offset, nbytes)):
                try:
                    crc = _mapped_crc32(f.fileno(), offset, nbytes)
                except (OSError, ValueError):  # a filesystem that cannot map files: read
                    crc = None
            if crc is None:
                crc = self._read_crc32(f, job, offset, nbytes)
        if crc != job.chunk["crc32"]:
            raise self._mismatch(job)

    def _read_crc32(self, f: Any, job: _Job, offset: int, nbytes: int) -> int:
        """CRC32 of ``nbytes`` at ``offset`` of the local file ``f``, read in
        `VERIFY_SLICE_BYTES` slices into this thread's buffer (each checked while in
        the CPU cache; memory: one slice per thread)."""
        buf = getattr(self._scratch, "slice", None)
        if buf is None or len(buf) != VERIFY_SLICE_BYTES:
            buf = self._scratch.slice = bytearray(max(1, VERIFY_SLICE_BYTES))
        view = memoryview(buf)
        display = self._display(job.chunk["file"])
        crc = 0
        done = 0
        while done < nbytes:
            part = view[:min(len(buf), nbytes - done)]
            try:
                read_into(f, offset + done, part, display)
            except StorageError as e:
                raise CheckpointCorruptError(str(e)) from e
            crc = crc32(part, crc)
            done += part.nbytes
        return crc

    def _read_verified(self, job: _Job, known: tuple[int, ...]) -> None:
        """Read a verified chunk straight into its live target (one contiguous block):
        the file must be the one verified, before the read and after it."""
        view = _byte_view(job.dest)
        if view.nbytes != self._box_nbytes(job):  # pragma: no cover - plan made it so
            raise CheckpointCorruptError(f"{self._display(job.chunk['file'])}: bad chunk")
        name = job.chunk["file"]
        with self._open(job) as f:
            self._same_file(name, f, known)
            try:
                read_into(f, job.chunk["offset"], view, self._display(name))
            except StorageError as e:
                raise CheckpointCorruptError(
                    f"{e}; the file changed after its checksums were verified, and tensor "
                    f"{job.key!r} may hold part of it"
                ) from e
            self._same_file(name, f, known, when=f" (while it was read into {job.key!r}, "
                                                 "which may hold part of it)")
        with contextlib.suppress(AttributeError):
            # what copy_ would do: autograd sees the tensor was modified in place
            torch.autograd.graph.increment_version(job.dest)

    def _read_checked(
        self, job: _Job, buf: torch.Tensor, known: Optional[tuple[int, ...]] = None
    ) -> None:
        """Fill ``buf`` (the chunk's box) from the file; check its size and CRC32 (and
        the file's identity against ``known``, the one recorded at verify)."""
        chunk = job.chunk
        display = self._display(chunk["file"])
        view = _byte_view(buf)
        if view.nbytes != self._box_nbytes(job):
            raise CheckpointCorruptError(
                f"{display}: chunk of {job.key!r} should hold {chunk['nbytes']} bytes, the "
                f"buffer holds {view.nbytes}"
            )
        with self._open(job) as f:
            if known is not None:
                self._same_file(chunk["file"], f, known)
            try:
                read_into(f, chunk["offset"], view, display)
            except StorageError as e:
                raise CheckpointCorruptError(str(e)) from e
        if crc32(view) != chunk["crc32"]:
            raise self._mismatch(job)


_probe = threading.local()


def _cached(fd: int, offset: int, nbytes: int) -> bool:
    """Whether bytes [offset, offset + nbytes) of the file ``fd`` look cached: its first,
    middle and last byte are (``preadv2(RWF_NOWAIT)``, ~1 us each, where a ``mincore``
    of every page cost ~70 ns per page: 0.7 ms per 40 MB file). Evicted files (a
    restore after a reboot, on another host) are read instead of faulted in; False
    where the kernel or filesystem cannot tell (EOPNOTSUPP), except on a filesystem in
    memory (tmpfs, ramfs: their files are never read from a disk; tmpfs refuses
    RWF_NOWAIT, so its files were never mapped)."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None:  # pragma: no cover - not Linux
        return False
    buf = getattr(_probe, "buf", None)
    if buf is None:
        buf = _probe.buf = memoryview(bytearray(1))
    for at in (offset, offset + nbytes // 2, offset + nbytes - 1):
        try:
            if os.preadv(fd, [buf], at, flag) != 1:
                return False
        except OSError as e:  # EAGAIN: not cached; EOPNOTSUPP: cannot tell
            if e.errno != errno.EOPNOTSUPP:
                return False
            st = os.fstat(fd)
            return _fs_type(st.st_dev) in _MEMORY_FILESYSTEMS and offset + nbytes <= st.st_size
    return True


_MEMORY_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def _mapped_crc32(fd: int, offset: int, nbytes: int) -> int:
    """CRC32 of ``nbytes`` bytes at ``offset`` of the open file ``fd``, read through a
    read-only shared mapping of just that range, made by the checking thread (no copy;
    unmapped on return; one mapping of the whole file shared by the threads measured
    50% slower: its faults and unmap contend). The caller checked the file holds those
    bytes. Measured on cached files: ``MAP_POPULATE`` and ``MADV_POPULATE_READ`` slower
    than plain faults, ``MADV_SEQUENTIAL`` the same (docs/checkpoints.md)."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, offset + nbytes - start, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ,
                   offset=start) as mapped:
        with memoryview(mapped) as view, view[offset - start:] as part:
            return crc32(part)


_fs_types: dict[int, str] = {}
_mounts_watch: Optional[Any] = None  # select.poll on /proc/self/mountinfo, or None
_mounts_file: Optional[Any] = None
_fs_lock = threading.Lock()


def _mounts_changed() -> bool:
    """Whether the mount table may have changed since the last call: the kernel flags
    an open ``/proc/self/mountinfo`` (``POLLPRI``) on each change, one syscall. Device
    numbers of unmounted filesystems are reused (tmpfs and NFS take theirs from one
    pool), so `_fs_types` must not outlive the mount it was read from."""
    global _mounts_watch, _mounts_file
    if _mounts_watch is None:
        import select

        try:
            _mounts_file = open("/proc/self/mountinfo", "rb")  # noqa: SIM115 - kept open
            watch = select.poll()
            watch.register(_mounts_file, select.POLLPRI)
        except (OSError, AttributeError):
            return True
        _mounts_watch = watch
        return True
    try:
        return bool(_mounts_watch.poll(0))
    except (OSError, RuntimeError):  # pragma: no cover
        return True


def _fs_type(dev: int) -> str:
    """The filesystem type of device ``dev`` (``st_dev``) from ``/proc/self/mountinfo``
    ("" where it cannot be told), cached until the mount table changes."""
    with _fs_lock:  # one poll at a time (a second concurrent one raises RuntimeError)
        if _mounts_changed():
            _fs_types.clear()
        kind = _fs_types.get(dev)
    if kind is None:
        kind = ""
        want = f"{os.major(dev)}:{os.minor(dev)}"
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) > 2 and fields[2] == want and " - " in line:
                        kind = line.split(" - ", 1)[1].split()[0]
                        break
        except OSError:
            pass
        _fs_types[dev] = kind
    return kind


def _mappable(dev: int) -> bool:
    """Whether the filesystem of device ``dev`` (``st_dev``) is in
    `MAPPABLE_FILESYSTEMS` (``/proc/self/mountinfo``; False where it cannot be told)."""
    return _fs_type(dev) in MAPPABLE_FILESYSTEMS


def _ends(jobs: list[_Job]) -> dict[str, int]:
    """Each file of ``jobs``' chunks -> the bytes they need in it."""
    ends: dict[str, int] = {}
    for job in jobs:
        name, end = job.chunk["file"], job.chunk["offset"] + job.chunk["nbytes"]
        ends[name] = max(ends.get(name, 0), end)
    return ends


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What changes when a file's bytes do: its inode, size, mtime and ctime."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _window(st: os.stat_result) -> int:
    """`RACY_WINDOW_NS`, or 2 s for a file stamped in whole seconds (FAT, HFS+...)."""
    if st.st_ctime_ns % 1_000_000_000 == 0 and st.st_mtime_ns % 1_000_000_000 == 0:
        return max(RACY_WINDOW_NS, 2_000_000_000)
    return RACY_WINDOW_NS
