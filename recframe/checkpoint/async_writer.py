"""Writers around `Saver.save`, in the spirit of Lightning's ``AsyncCheckpointIO``:
`CheckpointManager` hands a planned state to a writer and does not care how it is
written.

- `SyncWriter`: ``Saver.save`` in the caller's thread.
- `AsyncWriter`: at most one save in flight, its error raised at the next `wait`. Two
  snapshot strategies, chosen per save:

  - *copy-on-write fork* (one process, local filesystem, all state on the host): the
    writer ``fork()``s; the child writes and commits from its copy-on-write view of
    memory and ``_exit``s; a waiter thread collects its status. The loop is blocked
    only for the fork. Afterwards the state's big tensors are backed by huge pages
    again (`recframe.checkpoint.hugepages`) so the next fork is cheap;
  - *host snapshot + thread* otherwise: the state is copied to host memory
    (`snapshot_state`), then written by a background thread.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any, Optional

import torch

from recframe import distributed
from recframe.checkpoint.format import encode_tree, is_sharded, snapshot_state
from recframe.checkpoint.hugepages import collapse, huge_page_ranges
from recframe.checkpoint.saver import CheckpointError, Saver

OnCommit = Callable[[int], None]


class SyncWriter:
    """``Saver.save`` now, in this thread."""

    asynchronous = False

    def __init__(self, saver: Saver) -> None:
        self.saver = saver

    def submit(
        self, step: int, state: Optional[dict[str, Any]], metrics: dict[str, float],
        extra: Optional[dict[str, Any]], on_commit: OnCommit, live: Any = None,
    ) -> None:
        """Write and commit ``ckpt_<step>`` (``state`` None: the saver collects it);
        ``on_commit(step)`` runs once it is committed."""
        self.saver.save(step, metrics=metrics, prune=False, state=state,
                        manifest_extra=extra)
        on_commit(step)

    @property
    def pending(self) -> bool:
        return False

    def wait(self) -> Optional[BaseException]:
        return None


class AsyncWriter(SyncWriter):
    """One background save at a time (see the module docstring).

    Attributes:
        fork: async saves of host state in one process fork a copy-on-write writer.
        huge_pages: after a forked save, back the state with huge pages so the next
            fork (the time the loop is blocked) copies 512x fewer page-table entries.
    """

    asynchronous = True

    def __init__(self, saver: Saver, fork: bool = True, huge_pages: bool = True) -> None:
        super().__init__(saver)
        self.fork = fork
        self.huge_pages = huge_pages
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def submit(
        self, step: int, state: Optional[dict[str, Any]], metrics: dict[str, float],
        extra: Optional[dict[str, Any]], on_commit: OnCommit, live: Any = None,
    ) -> None:
        """Start writing ``state`` (a planned state; ``live``: the full live state its
        tensors come from, for huge pages) and return; the caller must `wait` first."""
        if self._thread is not None:
            raise RuntimeError("AsyncWriter.submit with a save in flight: wait() first")
        if state is None:
            state = self.saver.collect_state()
        self.saver.prepare_distributed()  # its collective runs here, not in the thread
        if self.can_fork(state):
            # the tables' own memory (a delta's state holds only copied rows)
            ranges = huge_page_ranges(host_tensors(live if live is not None else state)) \
                if self.huge_pages else []
            child = self._fork(step, state, metrics, extra)
            target, args = self._forked_save, (step, child, ranges, on_commit)
        else:
            target, args = self._background_save, (
                step, snapshot_state(state), metrics, extra, on_commit)
        self._thread = threading.Thread(
            target=target, args=args, name="recframe-async-save", daemon=False,
        )
        self._thread.start()

    @property
    def pending(self) -> bool:
        return self._thread is not None

    def wait(self) -> Optional[BaseException]:
        """Block until the save in flight finishes; return its error (None: committed)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        error, self._error = self._error, None
        return error

    def can_fork(self, state: dict[str, Any]) -> bool:
        """A copy-on-write snapshot (fork) needs one process (no collectives in the
        child), a local filesystem (no client threads to inherit) and host tensors."""
        if not self.fork or not hasattr(os, "fork"):
            return False
        if distributed.get_world_size() != 1 or not self.saver.storage.is_local:
            return False
        try:
            tensors = host_tensors(state, all_tensors=True)
        except TypeError:
            return False
        return all(getattr(v, "device", torch.device("cpu")).type == "cpu" for v in tensors)

    def _background_save(
        self, step: int, state: dict[str, Any], metrics: dict, extra: Optional[dict],
        on_commit: OnCommit,
    ) -> None:
        try:
            self.saver.save(step, metrics=metrics, state=state, prune=False,
                            manifest_extra=extra)
            on_commit(step)
        except BaseException as e:  # noqa: BLE001 - surfaced at the next wait()
            self._error = e

    def _fork(
        self, step: int, state: dict[str, Any], metrics: dict, extra: Optional[dict] = None
    ) -> tuple[int, int]:
        """Fork a child that writes and commits the checkpoint from its copy-on-write
        view of memory; the loop is blocked only for the fork itself."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: plain file I/O only, then _exit
            code, message = 0, b""
            try:
                os.close(read_fd)
                _die_with_parent()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                torch.set_num_threads(1)  # no OpenMP pool in a forked child
                self.saver.save(step, metrics=metrics, state=state, prune=False,
                                manifest_extra=extra)
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                code, message = 1, f"{type(e).__name__}: {e}".encode()[:4000]
            finally:
                try:
                    os.write(write_fd, message)
                finally:
                    os._exit(code)
        os.close(write_fd)
        return pid, read_fd

    def _forked_save(
        self, step: int, child: tuple[int, int], ranges: list[tuple[int, int]],
        on_commit: OnCommit,
    ) -> None:
        pid, read_fd = child  # the child holds its own (copy-on-write) view of the state
        try:
            with os.fdopen(read_fd, "rb") as pipe:
                message = pipe.read().decode(errors="replace")
            _, status = os.waitpid(pid, 0)
            # the writer is gone: pages the loop wrote meanwhile were split to 4 KiB;
            # huge pages again make the next fork ~5x cheaper (see hugepages.py)
            collapse(ranges)
            if os.waitstatus_to_exitcode(status) != 0:
                raise CheckpointError(
                    message or f"the checkpoint writer process died ({status})"
                )
            on_commit(step)
        except BaseException as e:  # noqa: BLE001 - surfaced at the next wait()
            self._error = e


def host_tensors(state: dict[str, Any], all_tensors: bool = False) -> list[Any]:
    """The tensors of a state tree, a sharded tensor's local shards in its place
    (``all_tensors``: also an empty sharded tensor, as itself)."""
    tensors: dict[str, Any] = {}
    encode_tree(state, "state", tensors)
    out = []
    for value in tensors.values():
        if is_sharded(value):
            shards = [s.tensor for s in value.local_shards()]
            out.extend(shards if shards or not all_tensors else [value])
        else:
            out.append(value)
    return out


def _die_with_parent() -> None:
    """Linux: the forked writer is killed when the training process dies, so a killed
    run never leaves a writer racing the rerun (its staging dir is cleaned up then)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
