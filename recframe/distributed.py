"""Every collective call recframe makes goes through here.

With no process group initialised (one process) each function is a no-op or returns
its input, so single-process code never touches ``torch.distributed``.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Optional

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_default_group(timeout: float = 1800.0) -> None:
    """Make sure a process group exists: torchrun's (env://) when launched by it, else a
    gloo group of one process on a free loopback port. nccl when CUDA is available."""
    if is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    td = datetime.timedelta(seconds=timeout)
    if "MASTER_ADDR" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=td)
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=td
    )


def get_rank() -> int:
    if is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    if is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def barrier(timeout: Optional[float] = None) -> None:
    """Wait for every rank; with ``timeout`` (seconds) a missing rank raises instead
    of hanging (gloo's monitored barrier names the ranks that did not arrive)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return
    if timeout is not None and dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout))
    else:
        dist.barrier()


def collective_device() -> torch.device:
    """Where tensors of a collective live: the rank's GPU under nccl (which takes only
    CUDA tensors), else the CPU (gloo)."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length from every rank (rank order)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return tensor
    world = dist.get_world_size()
    device = collective_device()
    local = tensor.detach().reshape(-1).to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([local.numel()], dtype=torch.int64, device=device))
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = torch.zeros(longest, dtype=local.dtype, device=device)
    padded[: local.numel()] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)  # tensors, not pickled objects
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(tensor.device)


def all_reduce_sum(value: float) -> float:
    if not is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_min_int(value: int) -> int:
    if not is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def all_reduce_max_int(value: int) -> int:
    if not is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_max_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise max over ranks of ``tensor`` (same shape everywhere), on the
    tensor's own device (the collective runs where the backend needs it: a rank
    without a GPU tensor of its own still takes part under nccl)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return tensor
    moved = tensor.detach().to(collective_device()).clone()
    dist.all_reduce(moved, op=dist.ReduceOp.MAX)
    return moved.to(tensor.device)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (small JSON-like metadata), in rank order."""
    if not is_initialized() or dist.get_world_size() == 1:
        return [obj]
    objects: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def broadcast_ints(values: list[int], src: int = 0) -> list[int]:
    """Rank ``src``'s list of integers on every rank (tensors, no pickling)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return list(values)
    device = collective_device()
    count = torch.tensor([len(values)], dtype=torch.int64, device=device)
    dist.broadcast(count, src=src)
    data = torch.tensor(values if get_rank() == src else [0] * int(count.item()),
                        dtype=torch.int64, device=device)
    dist.broadcast(data, src=src)
    return [int(v) for v in data.tolist()]


def store() -> Any:
    """The default process group's key-value store (torchrun's TCPStore), or None."""
    if not is_initialized():
        return None
    return dist.distributed_c10d._get_default_store()


class RankTimeoutError(RuntimeError):
    """Some ranks did not report in time; ``missing`` lists them."""

    def __init__(self, message: str, missing: list[int]) -> None:
        super().__init__(message)
        self.missing = missing


def store_gather(key: str, value: bytes, timeout: float, what: str) -> list[bytes]:
    """Every rank publishes ``value`` under ``key``; rank 0 returns all values in rank
    order (other ranks return ``[value]``) once every rank did, or raises
    `RankTimeoutError` naming each rank that did not within ``timeout`` seconds (dead,
    hung or failed). Uses the store, not a collective, so a dead rank cannot hang the
    others past ``timeout``. ``key`` must be fresh (unique per call)."""
    kv = store()
    rank = get_rank()
    kv.set(f"{key}/{rank}", value)
    if rank != 0:
        return [value]
    keys = [f"{key}/{r}" for r in range(get_world_size())]
    try:
        _wait(kv, keys, timeout)
    except RuntimeError as e:
        missing = [r for r, k in enumerate(keys) if not _has(kv, k)]
        raise RankTimeoutError(
            f"{what}: rank(s) {missing} did not report within {timeout:g}s (dead, hung or "
            f"failed; {e})", missing,
        ) from e
    values = [kv.get(k) for k in keys]
    for k in keys:  # read once: keep the store small over a long run
        try:
            kv.delete_key(k)
        except (RuntimeError, NotImplementedError):
            pass  # a store without deletes (e.g. a FileStore): the keys just stay
    return values


def store_wait(key: str, timeout: float, what: str, rank_of: int) -> bytes:
    """The value of ``key`` once set, waiting at most ``timeout`` seconds; otherwise a
    `RankTimeoutError` naming ``rank_of``, the rank that should have set it."""
    kv = store()
    try:
        _wait(kv, [key], timeout)
        return kv.get(key)
    except RuntimeError as e:  # DistStoreError (timeout) or a lost store connection
        raise RankTimeoutError(
            f"{what}: no word from rank {rank_of} within {timeout:g}s (dead, hung or "
            f"failed; {e})", [rank_of],
        ) from e


def _wait(kv: Any, keys: list[str], timeout: float) -> None:
    kv.wait(keys, datetime.timedelta(seconds=timeout))


def _has(kv: Any, key: str) -> bool:
    try:
        return bool(kv.check([key]))
    except RuntimeError:
        return False


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
