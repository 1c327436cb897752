"""Checkpoints under faults: a filesystem failing at every phase of a save, a full
disk, corrupt files, malicious pickles, and SIGKILL at random moments of saving.

The state of step n is deterministic (see tests/jobs/save_loop_job.py), so every
checkpoint that survives can be checked to hold exactly what step n wrote."""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import pickle
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem
from test_checkpoint_saver import entries

import recframe.checkpoint.storage as storage_module
from recframe.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    Storage,
    StorageError,
)
from recframe.checkpoint.incremental import section
from recframe.checkpoint.lock import LOCK_NAME

JOB = os.path.join(os.path.dirname(__file__), "jobs", "save_loop_job.py")
_spec = importlib.util.spec_from_file_location("save_loop_job", JOB)
job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(job)


@pytest.fixture(params=["full", "incremental"])
def small_job(request, monkeypatch):
    """The job's state, small: 200 x 64 tables in 2 KB chunks (25 per table); every
    test using it runs with full checkpoints and with incremental ones (a full one every
    3 saves, deltas of a quarter of the rows between)."""
    monkeypatch.setattr(job, "ROWS", 200)
    monkeypatch.setattr(job, "CHUNK_BYTES", 2048)
    monkeypatch.setattr(job, "INCREMENTAL", request.param == "incremental")


def retained(steps: list[int]) -> list[int]:
    """What retention keeps of the consecutive saves ``steps`` (from 1): the MAX_KEEP
    newest, and in incremental mode the chains they need (a full one at saves 1, 1 +
    FULL_EVERY, ...)."""
    kept = set(steps[-job.MAX_KEEP:])
    if job.INCREMENTAL:
        for s in list(kept):
            kept |= set(range(((s - 1) // job.FULL_EVERY) * job.FULL_EVERY + 1, s + 1))
    return sorted(kept)


class Run:
    """One process's view of a run: a fresh job state, its Saver and a manager."""

    def __init__(self, url: str, manager: bool = True) -> None:
        self.model, self.opt, self.progress, self.position, self.saver = job.build(url)
        if manager:  # (a manager removes leftovers of interrupted saves at once)
            self.manager = job.manager_for(self.saver)

    def step(self, n: int, **kwargs):
        job.set_state(self.model, self.opt, self.progress, self.position, n,
                      self.manager.tracker)
        return self.manager.step(n, **kwargs)

    def problems(self, n: int) -> list[str]:
        return job.problems(self.model, self.opt, self.progress, self.position, n)

    def steps(self) -> list[int]:
        return [c.step for c in self.saver.list_checkpoints()]


def assert_intact(url: str, steps: list[int]) -> None:
    """Exactly ``steps`` are committed, and each restores to what its step wrote."""
    run = Run(url)
    assert run.steps() == steps
    if job.INCREMENTAL:  # the saves really were deltas between full ones
        kinds = {c.step: section(c.manifest)["kind"] for c in run.saver.list_checkpoints()}
        assert kinds == {s: "full" if (s - 1) % job.FULL_EVERY == 0 else "delta"
                         for s in steps}
    for step in steps:
        assert run.manager.restore(global_step=step) == step
        assert run.problems(step) == [], step
    assert Run(url).manager.restore() == steps[-1]


# --- a fault-injecting object store ----------------------------------------------------
class FaultyFile(MemoryFile):
    """A file being uploaded: appears on close (like an object store), not before."""

    def __init__(self, fs, path):
        super().__init__(fs, path)
        self.discarded = False
        self.committed = False

    def write(self, data):
        self.fs.hit("write", self.path)
        return super().write(data)

    def discard(self):
        self.discarded = True

    def close(self):
        if self.discarded or self.committed:
            return
        self.fs.hit("commit", self.path)
        self.committed = True
        self.commit()


class FaultyFS(MemoryFileSystem):
    """memory:// under its own protocol and store, failing the ``fail``-th call of
    one kind of operation: makedirs, open (for write), write, commit (a file's
    upload completes), pipe (a small file PUT: the manifest), rm."""

    protocol = ("faulty",)
    store: dict = {}
    pseudo_dirs = [""]
    lock = threading.Lock()
    counts: dict = {}
    fail: tuple | None = None  # (kind, occurrence)
    failed: tuple | None = None  # (kind, path) of the call that raised

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str):
            path = path.removeprefix("faulty://")
        return super()._strip_protocol(path)

    @classmethod
    def reset(cls):
        cls.store.clear()
        cls.pseudo_dirs[:] = [""]
        cls.counts, cls.fail, cls.failed = {}, None, None

    def hit(self, kind: str, path: str) -> None:
        cls = type(self)
        with cls.lock:
            n = cls.counts.get(kind, 0)
            cls.counts[kind] = n + 1
            if cls.fail == (kind, n):
                cls.failed = (kind, path)
                raise OSError(errno.EIO, f"injected {kind} fault")

    def _open(self, path, mode="rb", **kwargs):
        if mode in ("wb", "xb") and kwargs.get("data") is None:
            path = self._strip_protocol(path)
            self.hit("open", path)
            return FaultyFile(self, path)
        return super()._open(path, mode, **kwargs)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        self.hit("pipe", self._strip_protocol(path))
        return super().pipe_file(path, value, mode=mode, **kwargs)

    def makedirs(self, path, exist_ok=False):
        self.hit("makedirs", self._strip_protocol(path))
        return super().makedirs(path, exist_ok=exist_ok)

    def rm(self, path, recursive=False, maxdepth=None):
        self.hit("rm", self._strip_protocol(path))
        return super().rm(path, recursive=recursive, maxdepth=maxdepth)


@pytest.fixture
def faulty(small_job):
    fsspec.register_implementation("faulty", FaultyFS, clobber=True)
    FaultyFS.reset()
    yield "faulty://run"
    FaultyFS.reset()


def _three_committed(url: str) -> Run:
    run = Run(url)
    for n in (1, 2, 3):
        run.step(n)
    assert run.steps() == [1, 2, 3]
    FaultyFS.counts = {}
    return run


@pytest.mark.parametrize("small_job", ["full"], indirect=True)
def test_faulty_fs_sees_every_phase_of_a_save(faulty):
    run = _three_committed(faulty)
    run.step(4)  # writes ckpt_4, then retention deletes ckpt_1 (max_keep=3)
    counts = dict(FaultyFS.counts)
    assert counts["open"] == counts["commit"] == job.CONCURRENCY
    assert counts["write"] >= 50  # every chunk is a write
    assert counts["pipe"] == 1  # the manifest
    assert counts["makedirs"] >= 1
    assert counts["rm"] == 2  # ckpt_1's manifest, then its files
    assert run.steps() == [2, 3, 4]


def _occurrences(url: str, kind: str) -> list[int]:
    FaultyFS.reset()
    _three_committed(url).step(4)
    n = FaultyFS.counts.get(kind, 0)
    assert n, f"a save does no {kind}"
    picks = sorted({0, 1, n // 2, n - 1})  # first, second, middle, last
    return [i for i in picks if i < n]


@pytest.mark.parametrize("kind", ["makedirs", "open", "write", "commit", "pipe"])
def test_a_failed_write_at_any_phase_keeps_earlier_checkpoints(faulty, kind):
    for occurrence in _occurrences(faulty, kind):
        FaultyFS.reset()
        run = _three_committed(faulty)
        FaultyFS.fail = (kind, occurrence)
        with pytest.raises((CheckpointError, StorageError)) as info:
            run.step(4)
        FaultyFS.fail = None
        failed_kind, failed_path = FaultyFS.failed
        assert failed_kind == kind
        assert failed_path.lstrip("/") in str(info.value), (kind, occurrence)
        assert "ckpt_4" in failed_path or kind == "makedirs"
        assert_intact(faulty, [1, 2, 3])
        assert "ckpt_4" not in entries(faulty)  # the failed save cleaned up after itself
        # the same manager retries that step once the store works again
        assert run.step(4, force=True)
        assert_intact(faulty, retained([1, 2, 3, 4]))


@pytest.mark.parametrize("small_job", ["full"], indirect=True)
@pytest.mark.parametrize("occurrence", [0, 1])
def test_a_failed_delete_is_logged_and_keeps_the_rest(faulty, caplog, occurrence):
    run = _three_committed(faulty)
    FaultyFS.fail = ("rm", occurrence)  # 0: ckpt_1's manifest, 1: ckpt_1's files
    with caplog.at_level(logging.WARNING, logger="recframe.checkpoint"):
        assert run.step(4)  # not raised
    failed_kind, failed_path = FaultyFS.failed
    assert "ckpt_1" in failed_path
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("could not delete" in w and "ckpt_1" in w for w in warnings), warnings
    # manifest not deleted: ckpt_1 is still a checkpoint; files not deleted: ckpt_1 is
    # an uncommitted leftover, gone at the next start
    assert_intact(faulty, [1, 2, 3, 4] if occurrence == 0 else [2, 3, 4])
    assert "ckpt_1" not in entries(faulty) or occurrence == 0


class Killed(BaseException):
    """A SIGKILL at this instant: nothing after it runs."""


@pytest.mark.parametrize("small_job", ["incremental"], indirect=True)
@pytest.mark.parametrize("how", ["fail", "kill"])
@pytest.mark.parametrize("occurrence", range(6))
def test_cleanup_of_old_chains_cut_anywhere_leaves_every_checkpoint_restorable(
        faulty, monkeypatch, how, occurrence):
    """Saves 1..6 (full at 1 and 4): at 6 retention deletes ckpt_3, 2, 1 (newest first,
    manifest then files: 6 removals). A removal that fails, or a kill at any of them,
    leaves every committed checkpoint restorable (a delta never outlives its chain)."""
    run = Run(faulty)
    for n in range(1, 6):
        run.step(n)
    assert run.steps() == [1, 2, 3, 4, 5]
    real = Storage.remove_tree
    calls = []

    def remove_tree(self, path):
        calls.append(path)
        if len(calls) - 1 == occurrence:
            if how == "kill":
                raise Killed()
            raise OSError(errno.EIO, "injected rm fault")
        return real(self, path)

    with monkeypatch.context() as patch:
        patch.setattr(Storage, "remove_tree", remove_tree)
        if how == "kill":
            with pytest.raises(Killed):
                run.step(6)
        else:
            assert run.step(6)
    assert len(calls) > occurrence
    steps = Run(faulty, manager=False).steps()
    assert {4, 5, 6} <= set(steps)
    for step in steps:
        check = Run(faulty, manager=False)
        check.saver.load(ckpt_id=step)
        assert check.problems(step) == [], (step, steps)
    assert Run(faulty).manager.restore() == 6


# --- a full local disk -----------------------------------------------------------------
def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FailNth:
    """Replaces ``owner.name`` so that its ``n``-th call raises ENOSPC (no path in the
    error, like a real write on a full disk); records the path it was given."""

    def __init__(self, monkeypatch, owner, name, n, path_of):
        self.real = getattr(owner, name)
        self.calls = 0
        self.path = None
        self.lock = threading.Lock()
        fail_nth = self

        def fake(*args, **kwargs):
            if str(path_of(*args)).endswith(LOCK_NAME):
                # the writer lock's lease renewal (a background thread) is not a phase
                # of the save: counting it made the injected failure land on it at times
                return fail_nth.real(*args, **kwargs)
            with fail_nth.lock:
                index = fail_nth.calls
                fail_nth.calls += 1
            if index == n:
                fail_nth.path = path_of(*args)
                _enospc()
            return fail_nth.real(*args, **kwargs)

        monkeypatch.setattr(owner, name, fake)


LOCAL_PHASES = [
    # (Storage attribute, which call fails, the path the error must name)
    ("write_chunks", 0, lambda self, path, *a: path),
    ("write_chunks", 3, lambda self, path, *a: path),
    ("write_bytes_atomic", 0, lambda self, path, *a: path),
    ("rename", 0, lambda self, src, dst: src),
]


@pytest.mark.parametrize("name,n,path_of", LOCAL_PHASES,
                         ids=[f"{p[0]}-{p[1]}" for p in LOCAL_PHASES])
def test_disk_full_at_each_phase_keeps_earlier_checkpoints(tmp_path, small_job, monkeypatch,
                                                           name, n, path_of):
    out = str(tmp_path / "run")
    run = Run(out)
    for step in (1, 2, 3):
        run.step(step)
    with monkeypatch.context() as patch:
        fault = FailNth(patch, Storage, name, n, path_of)
        with pytest.raises(StorageError) as info:
            run.step(4)
    assert fault.path and fault.path in str(info.value)
    assert "No space left on device" in str(info.value)
    assert entries(out) == ["ckpt_1", "ckpt_2", "ckpt_3"]  # no staging leftover either
    assert_intact(out, [1, 2, 3])
    assert run.step(4, force=True)
    assert_intact(out, retained([1, 2, 3, 4]))


@pytest.mark.parametrize("n", [0, 7, 40])
def test_disk_full_in_the_middle_of_a_file(tmp_path, small_job, monkeypatch, n):
    """The n-th chunk write stores half its bytes, then the disk is full."""
    out = str(tmp_path / "run")
    run = Run(out)
    for step in (1, 2, 3):
        run.step(step)
    real = storage_module._write_all
    calls = []

    def half_then_full(f, chunk):
        calls.append(f.name)
        if len(calls) - 1 == n:
            real(f, chunk.cast("B")[: chunk.nbytes // 2])
            _enospc()
        return real(f, chunk)

    with monkeypatch.context() as patch:
        patch.setattr(storage_module, "_write_all", half_then_full)
        with pytest.raises(StorageError) as info:
            run.step(4)
    assert calls[n] in str(info.value)
    assert entries(out) == ["ckpt_1", "ckpt_2", "ckpt_3"]
    assert_intact(out, [1, 2, 3])


# --- corrupt files ---------------------------------------------------------------------
@pytest.fixture(params=["local", "memory"])
def run_url(request, tmp_path, small_job):
    if request.param == "local":
        yield str(tmp_path / "run")
        return
    url = f"memory://faults-{uuid.uuid4().hex}"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _data_files(run: Run, step: int) -> list[str]:
    info = [c for c in run.saver.list_checkpoints() if c.step == step][0]
    return [run.saver.storage.join(info.path, name) for name in sorted(info.manifest["files"])]


def _rewrite(url_path: str, change) -> None:
    fs, path = fsspec.core.url_to_fs(url_path)
    data = fs.cat_file(path)
    fs.pipe_file(path, change(data))


def _flip(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :]


CORRUPTIONS = {
    "bit_flip": _flip,
    "truncated": lambda data: data[: len(data) // 2],
    "emptied": lambda data: b"",
    "last_byte_flipped": lambda data: data[:-1] + bytes([data[-1] ^ 1]),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
@pytest.mark.parametrize("file_index", [0, 3])
def test_a_corrupt_data_file_is_caught_and_restore_falls_back(run_url, caplog, corruption,
                                                              file_index):
    run = Run(run_url)
    for step in (1, 2, 3):
        run.step(step)
    victim = _data_files(run, 3)[file_index]
    _rewrite(victim, CORRUPTIONS[corruption])
    name = victim.rsplit("/", 1)[-1]

    fresh = Run(run_url)
    with pytest.raises(CheckpointCorruptError) as info:
        fresh.saver.load(ckpt_id=3)
    assert f"ckpt_3/{name}" in str(info.value)
    with pytest.raises(CheckpointCorruptError):
        fresh.manager.restore(global_step=3)

    fresh = Run(run_url)
    with caplog.at_level(logging.WARNING, logger="recframe.checkpoint"):
        assert fresh.manager.restore() == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ckpt_3" in w and name in w and "falling back" in w for w in warnings), warnings
    assert fresh.problems(2) == []  # all of step 2, though ckpt_3 was read in part first
    # training goes on from there; ckpt_3 (corrupt) is never restored again once a
    # newer checkpoint exists
    fresh.step(4, force=True)
    assert Run(run_url).manager.restore() == 4


def test_a_missing_data_file_falls_back(run_url, caplog):
    run = Run(run_url)
    for step in (1, 2):
        run.step(step)
    victim = _data_files(run, 2)[1]
    fs, path = fsspec.core.url_to_fs(victim)
    fs.rm(path)
    fresh = Run(run_url)
    with pytest.raises(StorageError, match="ckpt_2"):
        fresh.saver.load(ckpt_id=2)
    with caplog.at_level(logging.WARNING, logger="recframe.checkpoint"):
        assert Run(run_url).manager.restore() == 1


def test_a_corrupt_manifest_is_not_a_checkpoint(run_url, caplog):
    run = Run(run_url)
    for step in (1, 2):
        run.step(step)
    manifest = run.saver.storage.join(run.saver.storage.path("ckpt_2"), "manifest.json")
    _rewrite(manifest, lambda data: data[: len(data) // 2])
    fresh = Run(run_url)
    with caplog.at_level(logging.WARNING, logger="recframe.checkpoint"):
        assert fresh.steps() == [1]
        assert fresh.manager.restore() == 1
    assert any("manifest" in r.getMessage() for r in caplog.records)
    assert fresh.problems(1) == []
    with pytest.raises(CheckpointCorruptError, match="not a valid manifest"):
        fresh.saver.load(ckpt_path=run.saver.storage.path("ckpt_2"))


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(run_url):
    run = Run(run_url)
    for step in (1, 2):
        run.step(step)
        for victim in _data_files(run, step):
            _rewrite(victim, _flip)
    with pytest.raises(CheckpointError, match="could be read back"):
        Run(run_url).manager.restore()


# --- malicious pickles -----------------------------------------------------------------
class Payload:
    """Unpickling this creates the directory ``marker`` (arbitrary code execution)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _pickle_bytes(marker: str) -> bytes:
    return pickle.dumps({"weight": Payload(marker)})


def _torch_bytes(marker: str, where) -> bytes:
    path = str(where / f"payload-{uuid.uuid4().hex}.pt")
    torch.save({"state_dict": {"emb.weight": torch.ones(2)}, "x": Payload(marker)}, path)
    with open(path, "rb") as f:
        return f.read()


def test_the_payloads_are_live(tmp_path):
    """The payloads do run code when unpickled: the tests below would see it."""
    marker = str(tmp_path / "pwned-pickle")
    pickle.loads(_pickle_bytes(marker))
    assert os.path.isdir(marker)
    marker2 = str(tmp_path / "pwned-torch")
    path = tmp_path / "p.pt"
    path.write_bytes(_torch_bytes(marker2, tmp_path))
    torch.load(path, weights_only=False)
    assert os.path.isdir(marker2)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail loudly if anything tries to unpickle while loading."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("a checkpoint load tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("payload", ["pickle", "torch.save"])
@pytest.mark.parametrize("place", ["data_file", "manifest"])
def test_a_malicious_pickle_in_a_checkpoint_never_runs(tmp_path, small_job, caplog, payload,
                                                       place, no_unpickling):
    out = str(tmp_path / "run")
    marker = str(tmp_path / "pwned")
    run = Run(out)
    for step in (1, 2):
        run.step(step)
    data = (_pickle_bytes(marker) if payload == "pickle"
            else _torch_bytes(marker, tmp_path))
    ckpt = os.path.join(out, "ckpt_2")
    victim = _data_files(run, 2)[0] if place == "data_file" else os.path.join(ckpt,
                                                                              "manifest.json")
    with open(victim, "wb") as f:
        f.write(data)

    fresh = Run(out)
    if place == "data_file":
        with pytest.raises(CheckpointCorruptError, match=os.path.basename(victim)):
            fresh.saver.load(ckpt_id=2)
    else:
        with pytest.raises(CheckpointCorruptError, match="not a valid manifest"):
            fresh.saver.load(ckpt_path=ckpt)
        assert fresh.steps() == [1]
    with caplog.at_level(logging.WARNING, logger="recframe.checkpoint"):
        assert Run(out).manager.restore() == 1
    assert not os.path.exists(marker)


@pytest.mark.parametrize("name", ["model.pt", "pytorch_model.bin", "optimizer.pkl"])
def test_a_dropped_pickle_file_is_never_loaded(tmp_path, small_job, name, no_unpickling):
    out = str(tmp_path / "run")
    marker = str(tmp_path / "pwned")
    run = Run(out)
    run.step(1)
    dropped = os.path.join(out, "ckpt_1", name)
    with open(dropped, "wb") as f:
        f.write(_torch_bytes(marker, tmp_path) if name.endswith(".pt")
                else _pickle_bytes(marker))
    fresh = Run(out)
    assert fresh.manager.restore() == 1  # only files the manifest lists are read
    assert fresh.problems(1) == []
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        fresh.saver.load(ckpt_path=dropped)  # pointing at the file itself
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        fresh.manager.load_model_bank([dropped])
    assert not os.path.exists(marker)


# --- SIGKILL at random moments of saving ----------------------------------------------
class Job:
    """The save-loop supervisor as a subprocess, its stdout read by a thread."""

    def __init__(self, out: str, log_path: str) -> None:
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, JOB, out], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, text=True, bufsize=1,
            env=dict(os.environ, OMP_NUM_THREADS="1",
                     RECFRAME_TEST_INCREMENTAL="1" if job.INCREMENTAL else "0"),
        )
        self.worker = None  # the pid of a worker not yet reported dead
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line.split()))
        self.lines.put((time.monotonic(), ["eof"]))

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def next(self, timeout: float = 120) -> tuple[float, list[str]]:
        when, words = self.lines.get(timeout=timeout)
        assert words[0] not in ("eof", "bad"), (words, self.stderr())
        return when, words

    def stderr(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()[-3000:]

    def close(self) -> None:
        if self.worker is not None:  # a failed trial: its worker is still running
            try:
                os.kill(self.worker, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.send("stop")
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait()
        finally:
            self.log.close()


@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_random_sigkill_during_saves_never_breaks_restore(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(job, "INCREMENTAL", mode == "incremental")
    trials = 24
    out = str(tmp_path / "run")
    rng = random.Random(20240611)
    job_proc = Job(out, str(tmp_path / "job.log"))
    latest = 0  # the newest committed checkpoint, as last verified
    periods: list[float] = []  # seconds between two commits
    startups: list[float] = []  # seconds from fork to the first commit
    leftovers_seen = 0
    early_kills = 0
    try:
        for trial in range(trials):
            job_proc.send("go")
            forked_at, words = job_proc.next()
            assert words[0] == "forked", words
            pid = job_proc.worker = int(words[1])
            printed = latest  # highest "committed N" this worker reported
            ready = False
            if trial > 0 and rng.random() < 0.25:
                # start-up: removing leftovers, restoring, the first save
                early_kills += 1
                time.sleep(rng.uniform(0, sorted(startups)[len(startups) // 2]))
            else:
                last = None
                for _ in range(3 if not periods else 1):
                    when, words = job_proc.next()
                    if words[0] == "ready":
                        assert int(words[2]) == latest  # it restored the latest checkpoint
                        ready = True
                        when, words = job_proc.next()
                    assert words[0] == "committed", words
                    printed = int(words[1])
                    if last is None:
                        startups.append(when - forked_at)
                    else:
                        periods.append(when - last)
                    last = when
                period = sorted(periods)[len(periods) // 2]
                time.sleep(rng.uniform(0, 2 * period))  # anywhere in the save cycle
            os.kill(pid, signal.SIGKILL)
            while True:
                _, words = job_proc.next()
                if words[0] == "ready":
                    assert int(words[2]) == latest
                    ready = True
                elif words[0] == "committed":
                    printed = int(words[1])
                else:
                    assert words[0] == "dead" and int(words[1]) == pid, words
                    job_proc.worker = None
                    status = int(words[2])
                    assert os.WIFSIGNALED(status), (status, job_proc.stderr())
                    assert os.WTERMSIG(status) == signal.SIGKILL
                    break
            assert ready or printed == latest

            # the worker is dead: check what it left, as the next process would see it
            check = Run(out, manager=False)
            if check.saver.uncommitted():
                leftovers_seen += 1
            steps = [c.step for c in check.saver.list_checkpoints()]
            assert steps, "no committed checkpoint"
            # the newest commit is the last one reported, or one that committed just
            # before the kill could be reported
            assert printed <= steps[-1] <= printed + 1, (printed, steps)
            assert steps[-1] >= latest
            # (+1: killed between commit and retention; incremental: + the chain's base
            # and deltas that the oldest kept delta needs)
            assert len(steps) <= job.MAX_KEEP + 1 + (job.FULL_EVERY - 1 if job.INCREMENTAL
                                                     else 0)
            for step in steps:  # every committed checkpoint holds exactly its step
                check.saver.load(ckpt_id=step)
                assert check.problems(step) == [], (trial, step)
            fresh = Run(out)
            assert fresh.saver.uncommitted() == []  # the manager removed the leftovers
            assert fresh.manager.restore() == steps[-1]
            assert fresh.problems(steps[-1]) == []
            fresh.manager.close()  # release the output dir's writer lock for the next worker
            latest = steps[-1]
    finally:
        job_proc.close()
    assert latest >= trials - early_kills  # every other trial committed at least once
    assert leftovers_seen >= 3  # some kills did land in the middle of a save
