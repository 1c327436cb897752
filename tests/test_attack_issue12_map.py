"""Attacks on the mapped verify and the shared reader pool of a restore (issue 12,
item 1): the pool must not deadlock or hang a forked child; hostile files on the
mapped path are refused with nothing live written."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from recframe.checkpoint import format as fmt


def test_run_threads_called_from_pool_threads_of_concurrent_calls_does_not_deadlock():
    """Two calls at once whose items each make a call of their own on the same pool
    (a restore inside a reader thread): every pool thread waited for a helper task
    queued behind it, so none ran again (a deadlock). A helper not started when the
    caller has taken every item is cancelled now, not waited for."""
    pool = fmt.ThreadPoolExecutor(max_workers=2, thread_name_prefix="t-attack")

    def inner(i: int) -> int:
        time.sleep(0.005)
        return i

    def outer(i: int) -> int:
        time.sleep(0.03)
        return sum(fmt._run_threads(inner, 4, 2, pool))

    results: list[list[int]] = []
    threads = [threading.Thread(target=lambda: results.append(fmt._run_threads(outer, 2, 2,
                                                                                 pool)),
                                daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert results == [[6, 6], [6, 6]]
    pool.shutdown()



def test_restores_run_from_every_reader_thread_at_once_finish(tmp_path, monkeypatch):
    """The path a user hits: restores submitted to the reader pool (or started from a
    callback running in it) while every one of its threads is busy with such a restore
    used to deadlock (each waited for helper tasks queued behind the others)."""
    from concurrent.futures import wait

    from test_restore_speed_paths import Run, _same

    monkeypatch.setattr(fmt, "RACY_WINDOW_NS", 0)
    saved = Run(tmp_path / "run", seed=0)
    saved.train(2)
    saved.saver.save(1)
    pool = fmt.ThreadPoolExecutor(max_workers=2, thread_name_prefix="t-attack")
    monkeypatch.setitem(fmt._pools, 2, pool)  # the Savers' concurrency=2 pool
    assert fmt.reader_pool(2) is pool

    def restore(seed: int) -> bool:
        fresh = Run(tmp_path / "run", seed=seed)
        fresh.saver.load(ckpt_id=1)
        return _same(fresh.snapshot(), saved.snapshot())

    futures = [pool.submit(restore, seed) for seed in (5, 6)]
    done, stuck = wait(futures, timeout=30)
    assert not stuck, "deadlock"
    assert [f.result() for f in futures] == [True, True]
    pool.shutdown()

def test_a_child_forked_while_the_pool_lock_is_held_can_still_restore():
    """A thread of the parent inside `reader_pool` at the fork left the child a lock
    held forever: the child's first restore hung."""
    fmt._pools_lock.acquire()
    try:
        pid = os.fork()
        if pid == 0:
            signal.alarm(10)
            code = 1
            try:
                if fmt.reader_pool(2).submit(lambda: 42).result(timeout=5) == 42:
                    code = 0
            finally:
                os._exit(code)
    finally:
        fmt._pools_lock.release()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_an_interrupt_while_the_caller_waits_does_not_leave_items_running():
    """A KeyboardInterrupt reaching the caller while it waits for the helpers' last
    items (a Ctrl-C during a restore) left `_run_threads` with a helper still running
    its item: a copy into a live tensor, or a read of a file the session then closed,
    after the restore had raised. The interrupt is raised once the helpers are done."""
    pool = fmt.ThreadPoolExecutor(max_workers=1, thread_name_prefix="t-attack")
    running: list[int] = []
    started = threading.Event()

    def fn(i: int) -> int:
        if threading.current_thread() is threading.main_thread():
            started.wait(10)  # the helper holds an item before the caller runs out
            return i
        running.append(i)
        if not started.is_set():
            signal.setitimer(signal.ITIMER_REAL, 0.1)  # while the caller waits for us
            started.set()
        time.sleep(0.5)
        running.remove(i)
        return i

    def interrupt(*_args) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    still_running = None
    try:
        try:
            fmt._run_threads(fn, 6, 2, pool)
        except KeyboardInterrupt:
            still_running = list(running)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        pool.shutdown(wait=True)
    assert still_running == []


def _tmpfs_dir() -> str:
    root = "/dev/shm"
    if not os.path.isdir(root) or not fmt._mappable(os.stat(root).st_dev) or \
            fmt._fs_type(os.stat(root).st_dev) != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    import tempfile

    return tempfile.mkdtemp(prefix="recframe-attack12-", dir=root)


def test_a_checkpoint_on_tmpfs_is_checked_from_a_mapping_and_still_refused_when_bad(
    tmp_path, monkeypatch
):
    """tmpfs refuses ``RWF_NOWAIT`` (EOPNOTSUPP), so `_cached` said "not cached" and a
    checkpoint in /dev/shm was never checked from a mapping, though tmpfs is listed
    mappable (its files are in memory). Mapped now; a flipped byte is still refused
    with nothing live written."""
    import shutil

    from test_restore_speed_paths import Run, _chunk_of, _rewrite_in_place, _same

    from recframe.checkpoint import CheckpointCorruptError

    root = _tmpfs_dir()
    try:
        monkeypatch.setattr(fmt, "RACY_WINDOW_NS", 0)
        monkeypatch.setattr(fmt, "VERIFY_MAP_MIN_BYTES", 0)  # these tiny chunks too
        saved = Run(os.path.join(root, "run"), seed=0)
        saved.train(2)
        saved.saver.save(1)
        mapped: list[int] = []
        mapped_crc32 = fmt._mapped_crc32
        monkeypatch.setattr(fmt, "_mapped_crc32",
                            lambda fd, o, n: mapped.append(n) or mapped_crc32(fd, o, n))
        fresh = Run(os.path.join(root, "run"), seed=7)
        fresh.saver.load(ckpt_id=1)
        assert _same(fresh.snapshot(), saved.snapshot())
        assert mapped
        ckpt = os.path.join(root, "run", "ckpt_1")
        chunk = _chunk_of(ckpt, "sparse.emb.weight")
        _rewrite_in_place(os.path.join(ckpt, chunk["file"]), chunk["offset"] + 1)
        other = Run(os.path.join(root, "run"), seed=8)
        before = other.snapshot()
        with pytest.raises(CheckpointCorruptError, match="checksum mismatch"):
            other.saver.load(ckpt_id=1)
        assert _same(other.snapshot(), before)
    finally:
        shutil.rmtree(root, ignore_errors=True)



def test_a_copy_refused_after_the_registered_objects_loaded_undoes_them(tmp_path,
                                                                        monkeypatch):
    """Registered objects (here the dense optimizer) are loaded before the tensor copies
    so a state they reject changes nothing; but when a copy was then refused (its file
    rewritten after the transaction's `confirm`, caught by the reader's own) their undo
    had been dropped: the dense optimizer kept the checkpoint's state while the model
    kept its own. Now every object loaded first is undone when a later step fails."""
    from test_restore_speed_paths import Run, _chunk_of, _rewrite_in_place, _same

    from recframe.checkpoint import CheckpointCorruptError

    monkeypatch.setattr(fmt, "RACY_WINDOW_NS", 0)
    saved = Run(tmp_path / "run", seed=0)
    saved.train(2)
    saved.saver.save(1)
    ckpt = os.path.join(saved.saver.output_dir, "ckpt_1")
    chunk = _chunk_of(ckpt, "sparse.emb.weight")
    apply = fmt.TensorReader.apply
    rewritten: list[bool] = []

    def rewrite_then_apply(self, jobs):
        if not rewritten:  # another process writes to the checkpoint right now
            rewritten.append(True)
            _rewrite_in_place(os.path.join(ckpt, chunk["file"]), chunk["offset"])
        return apply(self, jobs)

    monkeypatch.setattr(fmt.TensorReader, "apply", rewrite_then_apply)
    fresh = Run(tmp_path / "run", seed=7)
    fresh.train(1)  # a dense optimizer with state of its own
    before = fresh.snapshot()
    with pytest.raises(CheckpointCorruptError, match="changed after its checksums"):
        fresh.saver.load(ckpt_id=1)
    assert rewritten
    assert _same(fresh.snapshot(), before)


_STALE_MOUNT_CHILD = """
import os, subprocess, sys, tempfile
from recframe.checkpoint import format as fmt
proc = os.stat("/proc").st_dev
assert not fmt._mappable(proc)  # read from the mount table, and cached
fmt._fs_types[proc] = "tmpfs"  # as if that device number had been a tmpfs before
d = tempfile.mkdtemp()
subprocess.run(["mount", "-t", "tmpfs", "none", d], check=True)
subprocess.run(["umount", d], check=True)
sys.exit(0 if not fmt._mappable(proc) else 3)
"""


def test_the_filesystem_type_cache_does_not_outlive_a_mount_change():
    """`_mappable` cached each device's filesystem type for the life of the process,
    but device numbers are reused (tmpfs and NFS take theirs from one pool): a tmpfs
    unmounted and an NFS share mounted on its number would be mapped (SIGBUS where a
    page-in fails). The cache is dropped when the mount table changes. Runs in a mount
    namespace of its own (``unshare -m``); skipped where mounting is not allowed."""
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    probe = subprocess.run(["unshare", "-m", "mount", "-t", "tmpfs", "none", "/mnt"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("mounting is not allowed here")
    done = subprocess.run(["unshare", "-m", sys.executable, "-c", _STALE_MOUNT_CHILD],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
