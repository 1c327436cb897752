"""One writer per output dir: a second job fails fast naming the holder; a holder that
died (SIGKILL) or whose lease expired is taken over; a job never deletes another live
job's in-flight staging directory; a writer that lost its lock never commits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from test_checkpoint_manager import make_model, set_weights, steps_of

from recframe.checkpoint import CheckpointManager, Saver
from recframe.checkpoint.lock import LOCK_NAME, WriterLock, WriterLockError
from recframe.checkpoint.storage import Storage

HOLDER = """
import sys, time
from recframe.checkpoint.lock import WriterLock
from recframe.checkpoint.storage import Storage
lock = WriterLock(Storage(sys.argv[1]), lease_seconds=float(sys.argv[2]))
lock.acquire()
lock.start_renewing()
print("held", flush=True)
time.sleep(120)
"""


def _start_holder(out: str, lease: float = 60.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, out, str(lease)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "held", "the holder process could not take the lock"
    return proc


def _write_record(out: str, **fields) -> None:
    record = {"run_id": "other-run", "host": "elsewhere", "pid": 4242,
              "expires_unix": time.time() + 600, "lease_seconds": 600}
    record.update(fields)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, LOCK_NAME), "w") as f:
        json.dump(record, f)


def test_a_live_holder_is_refused_and_a_sigkilled_one_taken_over(tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    os.makedirs(os.path.join(out, "ckpt_7.staging"))  # the holder's save in flight
    holder = _start_holder(out)
    try:
        with pytest.raises(WriterLockError) as info:
            CheckpointManager(Saver(make_model(), output_dir=out), save_interval=1)
        message = str(info.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message
        assert os.path.isdir(os.path.join(out, "ckpt_7.staging"))  # not cleaned up
        # a bare Saver neither cleans the holder's staging dir nor saves there
        bare = Saver(make_model(), output_dir=out)
        bare.clean_uncommitted()
        assert os.path.isdir(os.path.join(out, "ckpt_7.staging"))
        with pytest.raises(WriterLockError, match=f"pid {holder.pid}"):
            bare.save(1)
        assert not os.path.exists(os.path.join(out, "ckpt_1"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died without releasing: the restart on this host takes over at once
    manager = CheckpointManager(Saver(make_model(), output_dir=out), save_interval=1)
    assert not os.path.exists(os.path.join(out, "ckpt_7.staging"))  # provably abandoned
    record = WriterLock(Storage(out)).read()
    assert record["pid"] == os.getpid() and record["run_id"] == manager.lock.run_id
    manager.step(1)
    assert steps_of(manager) == [1]
    manager.close()
    assert not os.path.exists(os.path.join(out, LOCK_NAME))  # released


def test_another_hosts_lease_blocks_until_it_expires(tmp_path):
    out = str(tmp_path)
    _write_record(out)
    with pytest.raises(WriterLockError, match="run other-run .*host elsewhere, pid 4242"):
        CheckpointManager(Saver(make_model(), output_dir=out))
    _write_record(out, expires_unix=time.time() - 1)  # crashed: no renewal since
    manager = CheckpointManager(Saver(make_model(), output_dir=out))
    assert WriterLock(Storage(out)).read()["run_id"] == manager.lock.run_id
    manager.close()


def test_the_lease_is_renewed_while_the_run_lives(tmp_path):
    manager = CheckpointManager(Saver(make_model(), output_dir=str(tmp_path)),
                                lease_secs=0.3)
    first = manager.lock.read()["expires_unix"]
    deadline = time.monotonic() + 10
    while manager.lock.read()["expires_unix"] == first and time.monotonic() < deadline:
        time.sleep(0.05)
    assert manager.lock.read()["expires_unix"] > first
    assert manager.lock.read()["run_id"] == manager.lock.run_id
    manager.close()


def test_a_writer_that_lost_its_lock_never_commits(tmp_path):
    out = str(tmp_path)
    model = make_model()
    manager = CheckpointManager(Saver(model, output_dir=out), save_interval=1)
    manager.step(1)
    manifest = manager.saver.read_manifest(manager.saver.storage.path("ckpt_1"))
    assert manifest["run_id"] == manager.lock.run_id  # every manifest names its writer
    # another job took the dir over (this one was paused past its lease)
    _write_record(out, run_id="usurper")
    set_weights(model, 2.0)
    with pytest.raises(WriterLockError, match="usurper"):
        manager.step(2)
    assert steps_of(manager) == [1]
    assert not os.path.exists(os.path.join(out, "ckpt_2"))
    assert WriterLock(Storage(out)).read()["run_id"] == "usurper"  # left to its holder
    manager.close()


def test_two_managers_of_one_process_share_the_lock(tmp_path):
    out = str(tmp_path)
    first = CheckpointManager(Saver(make_model(), output_dir=out), save_interval=1)
    second = CheckpointManager(Saver(make_model(), output_dir=out), save_interval=1)
    assert second.lock.run_id == first.lock.run_id
    first.step(1)
    second.step(2)
    first.close()
    assert os.path.exists(os.path.join(out, LOCK_NAME))  # the second still holds it
    second.close()
    assert not os.path.exists(os.path.join(out, LOCK_NAME))


def test_object_store_lock_is_a_conditional_write(tmp_path):
    out = f"memory://writer-lock-{os.getpid()}-{time.monotonic_ns()}/run"
    storage = Storage(out)
    other = WriterLock(storage, run_id="other-run")
    other.acquire()  # a live holder elsewhere (its record names this pid: fake a host)
    record = other.read()
    record["host"] = "elsewhere"
    storage.write_bytes_atomic(other.path, json.dumps(record).encode())
    with pytest.raises(WriterLockError, match="host elsewhere"):
        CheckpointManager(Saver(make_model(), output_dir=out))
    # the conditional create refuses to overwrite an existing lock object
    with pytest.raises(FileExistsError):
        storage.fs.pipe_file(storage.strip(other.path), b"{}", mode="create")
    record["expires_unix"] = time.time() - 1
    storage.write_bytes_atomic(other.path, json.dumps(record).encode())
    manager = CheckpointManager(Saver(make_model(), output_dir=out), save_interval=1)
    manager.step(1)
    assert steps_of(manager) == [1]
    manager.close()
    assert not storage.exists(other.path)


def test_a_job_that_exits_without_close_frees_the_dir(tmp_path):
    out = str(tmp_path)
    code = ("import sys; from recframe.checkpoint.lock import WriterLock; "
            "from recframe.checkpoint.storage import Storage; "
            "WriterLock(Storage(sys.argv[1])).acquire()")
    subprocess.run([sys.executable, "-c", code, out], check=True)
    assert not os.path.exists(os.path.join(out, LOCK_NAME))  # released at exit
