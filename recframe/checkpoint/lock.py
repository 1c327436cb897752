"""One writer per output dir: a lease file naming its holder.

``<output_dir>/.recframe-writer.lock`` is a small JSON file: the holder's ``run_id``,
``host``, ``pid`` and a lease (``expires_unix``) that a background thread renews while
the run lives. A second job on the same output dir reads it and fails fast with an
error naming the holder, instead of racing the first job's saves or deleting its
in-flight staging directory. A holder is *gone* (its lock is taken over) when

- its lease expired (a crashed or SIGKILLed job stops renewing it), or
- it ran on this host and its pid no longer exists (a SIGKILLed job restarted on the
  same machine takes over at once, without waiting for the lease).

Local and NFS-like paths: the check-and-take runs under an ``flock`` of the output
dir (or of ``.recframe-writer.lock.guard`` where a directory cannot be flocked, as on
NFS), so two starters never both take a stale lock. Object stores (no flock, no
rename): the lock object is created with a conditional write (``If-None-Match``:
fsspec's ``pipe_file(mode="create")``) where the store supports it, else with a
check-then-write; taking over an expired lease is a plain overwrite followed by a
read-back (two jobs starting within the same second may both pass it there). Every
manifest also names the writer's ``run_id``, and the writer re-reads the lock right
before each commit, so a writer that lost its lease never commits over the new holder.

Under torchrun only rank 0 takes the lock (see `CheckpointManager`); every rank learns
the result, so a refused job stops on every rank.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, Optional

from recframe.checkpoint.storage import Storage

logger = logging.getLogger("recframe.checkpoint")

LOCK_NAME = ".recframe-writer.lock"
MAX_LOCK_BYTES = 64 << 10
"""A lock file larger than this (or not a regular file) is unreadable: a stale one."""
DEFAULT_LEASE_SECS = 60.0

_PROCESS_HOLDS: dict[str, int] = {}
"""run_id -> how many `WriterLock` objects of this process hold it: several managers
of one process on one output dir (a script that builds a second `Trainer`) share the
lock rather than take it from each other."""
_HOLDS_LOCK = threading.Lock()


def _pid_namespace() -> Optional[str]:
    """This process's pid namespace (``pid:[4026531836]``), None where unknown."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


class WriterLockError(RuntimeError):
    """Another live job holds the output dir (the message names it), or this job lost
    its lock."""


def new_run_id() -> str:
    return uuid.uuid4().hex


class WriterLock:
    """The writer lease of one output dir (see the module docstring).

    Args:
        storage: the output dir's storage.
        lease_seconds: how long the lease lasts without renewal; renewed every third
            of it by a daemon thread (`start_renewing`).
        run_id: this run's id (default: a fresh random one).
    """

    def __init__(
        self, storage: Storage, lease_seconds: float = DEFAULT_LEASE_SECS,
        run_id: Optional[str] = None,
    ) -> None:
        if not lease_seconds > 0:
            raise ValueError(f"writer lease_seconds={lease_seconds!r} must be > 0")
        self.storage = storage
        self.lease_seconds = float(lease_seconds)
        self.run_id = run_id or new_run_id()
        self.path = storage.path(LOCK_NAME)
        self.held = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.lost: Optional[str] = None
        """Why the lease was lost (another job took it over), or None."""
        self._at_exit = False
        self._owner_pid = os.getpid()

    # --- the record -----------------------------------------------------------------
    def _record(self) -> bytes:
        now = time.time()
        return json.dumps({
            "run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
            "pid_namespace": _pid_namespace(),
            "renewed_unix": now, "expires_unix": now + self.lease_seconds,
            "lease_seconds": self.lease_seconds,
        }).encode()

    def read(self) -> Optional[dict[str, Any]]:
        """The current holder's record (None: no lock; an unreadable one is ``{}``)."""
        from recframe.checkpoint.format import CheckpointCorruptError, read_member

        try:  # bounded, regular files only: the lock may be a link to /dev/zero, a FIFO
            raw = read_member(self.storage, self.storage.root, LOCK_NAME, MAX_LOCK_BYTES)
        except FileNotFoundError:
            return None
        except CheckpointCorruptError:
            return {}
        try:
            record = json.loads(raw)
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    @staticmethod
    def describe(record: dict[str, Any]) -> str:
        left = record.get("expires_unix")
        lease = (f"lease valid {float(left) - time.time():.0f}s more"
                 if isinstance(left, (int, float)) else "no lease")
        return (f"run {record.get('run_id', '?')} (host {record.get('host', '?')}, "
                f"pid {record.get('pid', '?')}, {lease})")

    @staticmethod
    def is_gone(record: dict[str, Any]) -> bool:
        """Whether the holder of ``record`` is provably gone: its lease expired, or it
        ran on this host and its pid is dead (or is this very process: an earlier
        writer of it, or a previous container incarnation with the same pid)."""
        expires = record.get("expires_unix")
        if not isinstance(expires, (int, float)) or time.time() > expires:
            return True
        pid = record.get("pid")
        # a pid means something only in the holder's pid namespace: containers sharing
        # the host's network (and so its hostname) each have their own
        if record.get("host") == socket.gethostname() and isinstance(pid, int) \
                and record.get("pid_namespace") == _pid_namespace():
            if pid == os.getpid():
                return True
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:  # alive, another user's
                return False
        return False

    # --- acquire / renew / release ------------------------------------------------------
    def acquire(self) -> None:
        """Take the lock, or raise `WriterLockError` naming the live holder."""
        with self._guard():
            record = self.read()
            if record is not None and self._shares(record):
                self.run_id = str(record["run_id"])  # this process's own run: share it
                self._write(create=False)
                self._hold()
                return
            if record is not None and record.get("run_id") != self.run_id:
                if not self.is_gone(record):
                    raise WriterLockError(
                        f"{self.storage.display(self.storage.root)} is in use by another "
                        f"job: {self.describe(record)}. One job writes an output dir; use "
                        f"another output_dir, or stop that job (a crashed job's lease "
                        f"expires after {record.get('lease_seconds', '?')}s, or at once "
                        "when it ran on this host)"
                    )
                logger.warning("taking over the writer lock of %s from %s (gone)",
                               self.storage.display(self.storage.root), self.describe(record))
            self._write(create=record is None)
            self._hold()

    def _shares(self, record: dict[str, Any]) -> bool:
        with _HOLDS_LOCK:
            return (record.get("pid") == os.getpid() and record.get("host") ==
                    socket.gethostname() and _PROCESS_HOLDS.get(record.get("run_id"), 0) > 0)

    def _hold(self) -> None:
        if not self.held:
            with _HOLDS_LOCK:
                _PROCESS_HOLDS[self.run_id] = _PROCESS_HOLDS.get(self.run_id, 0) + 1
            if not self._at_exit:  # a clean exit frees the dir at once (not after a lease)
                atexit.register(self.release)
                self._at_exit = True
        self.held, self.lost, self._owner_pid = True, None, os.getpid()

    def _write(self, create: bool) -> None:
        data = self._record()
        if self.storage.is_local:
            self.storage.makedirs(self.storage.root)
            self.storage.write_bytes_atomic(self.path, data)
            return
        if create:
            try:  # a conditional PUT (If-None-Match) where the store has one
                self.storage.fs.pipe_file(self.storage.strip(self.path), data, mode="create")
            except FileExistsError:
                record = self.read() or {}
                raise WriterLockError(
                    f"{self.storage.display(self.storage.root)} was just taken by another "
                    f"job: {self.describe(record)}"
                ) from None
            except (NotImplementedError, TypeError, ValueError):
                self.storage.write_bytes_atomic(self.path, data)
        else:
            self.storage.write_bytes_atomic(self.path, data)
        back = self.read() or {}
        if back.get("run_id") != self.run_id:  # a racing job overwrote it after us
            raise WriterLockError(
                f"{self.storage.display(self.storage.root)} was just taken by another job: "
                f"{self.describe(back)}"
            )

    def verify(self) -> None:
        """Raise `WriterLockError` unless this run still holds the lock (called right
        before every commit: a writer that lost its lease never commits)."""
        if not self.held:
            return
        record = self.read()
        if record is None or record.get("run_id") != self.run_id:
            holder = self.describe(record) if record else "nobody (the lock file is gone)"
            self.lost = f"the writer lock of {self.storage.display(self.storage.root)} " \
                        f"is now held by {holder}"
            raise WriterLockError(f"{self.lost}; this job no longer writes there")

    def renew(self) -> None:
        """Extend the lease (it must still be ours)."""
        with self._guard():
            self.verify()
            self.storage.write_bytes_atomic(self.path, self._record())

    def start_renewing(self) -> None:
        """Renew the lease every third of it in a daemon thread until `release`."""
        if self._thread is not None:
            return
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(self.lease_seconds / 3):
                try:
                    self.renew()
                except WriterLockError as e:
                    logger.error("%s", e)
                    return
                except Exception as e:  # noqa: BLE001 - a storage hiccup: retry next time
                    logger.warning("could not renew the writer lease %s: %s", self.path, e)

        self._thread = threading.Thread(target=loop, name="recframe-writer-lease",
                                        daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and remove the lock if it is still ours."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        if not self.held or os.getpid() != self._owner_pid:
            return  # (a forked child never releases its parent's lock)
        self.held = False
        with _HOLDS_LOCK:
            left = _PROCESS_HOLDS.get(self.run_id, 1) - 1
            if left > 0:
                _PROCESS_HOLDS[self.run_id] = left
            else:
                _PROCESS_HOLDS.pop(self.run_id, None)
        if left > 0:
            return  # another writer of this process still holds it
        try:
            with self._guard():
                record = self.read()
                if record is not None and record.get("run_id") == self.run_id:
                    self.storage.remove_tree(self.path)
        except Exception as e:  # noqa: BLE001 - the lease expires on its own
            logger.warning("could not release the writer lock %s: %s", self.path, e)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Serialise check-and-take between processes on local/NFS paths: an ``flock``
        of the output dir itself (nothing extra in it), or, where a directory cannot be
        flocked (NFS emulates flock with POSIX locks, which need a file), of
        ``.recframe-writer.lock.guard``."""
        if not self.storage.is_local:
            yield
            return
        import fcntl

        self.storage.makedirs(self.storage.root)
        fd = os.open(self.storage.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            os.close(fd)
            fd = os.open(self.path + ".guard", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            os.close(fd)  # closing drops the flock


def live_holder(storage: Storage, run_id: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The record of a live writer of ``storage`` other than ``run_id`` (None: none)."""
    record = WriterLock(storage, run_id=run_id or "-").read()
    if record is None or record.get("run_id") == run_id or WriterLock.is_gone(record):
        return None
    return record
