"""Regression tests from an adversarial review of issue 12 (checkpoints as untrusted
input): each case is a hostile or damaged checkpoint that slipped past the fixes."""

from __future__ import annotations

import os

import pytest
from test_hostile_checkpoints import Run, _fresh, _manifest, _same, _seal

from recframe.checkpoint import CheckpointCorruptError


def _small_chunks(tmp_path) -> Run:
    run = Run(tmp_path / "run")
    run.saver.chunk_bytes = 56  # two rows of the [8, 7] dense weights a chunk
    run.train([1, 2])
    return run


_VICTIMS = ["dense.mlp.0.weight", "extra.dense_optimizer.state.0.exp_avg"]


def _overlap_chunks(m: dict, key: str) -> None:
    shard = m["tensors"][key]["shards"][0]
    first = shard["chunks"][0]
    shard["chunks"] = [dict(first) for _ in shard["chunks"]]  # row count right, rows 2.. unread


def _overlap_shards(m: dict, key: str) -> None:
    entry = m["tensors"][key]
    half = entry["shape"][0] // 2
    top = {"offsets": [0, 0], "sizes": [half, entry["shape"][1]],
           "chunks": [c for c in entry["shards"][0]["chunks"] if c["rows"][1] <= half]}
    entry["shards"] = [top, dict(top)]  # volume right, bottom half unread


@pytest.mark.parametrize("victim", _VICTIMS)
@pytest.mark.parametrize("edit", [_overlap_chunks, _overlap_shards])
def test_chunks_or_shards_covering_rows_twice_are_corrupt(tmp_path, victim, edit):
    """Overlapping chunks/shards with the right element count left rows unread: a
    live tensor kept the old model's rows, a fresh one (a dense optimizer's state)
    got uninitialized memory, which the next save wrote out."""
    run = _small_chunks(tmp_path)
    ckpt = run.ckpt(2)
    manifest = _manifest(ckpt)
    assert len(manifest["tensors"][victim]["shards"][0]["chunks"]) == 4
    edit(manifest, victim)
    _seal(ckpt, manifest)
    fresh = _fresh(tmp_path)
    before = fresh.snapshot()
    with pytest.raises(CheckpointCorruptError, match="overlap"):
        fresh.saver.load(ckpt_id=2)
    assert _same(fresh.snapshot(), before)
    assert fresh.manager.restore() == 1


def test_a_fresh_tensor_is_not_allocated_beyond_the_real_file(tmp_path):
    """A fresh-read tensor with a huge shape, backed by a declared (not real) file
    size: torch.empty of 1.9 TB raised RuntimeError, not CheckpointCorruptError, so
    `CheckpointManager.restore` crashed instead of falling back."""
    run = Run(tmp_path / "run")
    run.train([1, 2])
    ckpt = run.ckpt(2)
    manifest = _manifest(ckpt)
    rows = 1 << 36
    entry = manifest["tensors"]["extra.dense_optimizer.state.0.exp_avg"]
    chunk = dict(entry["shards"][0]["chunks"][0], offset=0, nbytes=rows * 28, rows=[0, rows])
    entry["shape"] = [rows, 7]
    entry["shards"] = [{"offsets": [0, 0], "sizes": [rows, 7], "chunks": [chunk]}]
    manifest["files"][chunk["file"]]["size"] = rows * 28
    _seal(ckpt, manifest)
    fresh = _fresh(tmp_path)
    before = fresh.snapshot()
    with pytest.raises(CheckpointCorruptError, match="truncated"):
        fresh.saver.load(ckpt_id=2)
    assert _same(fresh.snapshot(), before)
    assert fresh.manager.restore() == 1


def _extra_entry(manifest: dict, name: str) -> dict:
    return next(v for k, v in manifest["parts"]["extra"]["d"] if k == name)


def _drop_a_param_from_the_dense_optimizer(manifest: dict) -> None:
    groups = next(v for k, v in _extra_entry(manifest, "dense_optimizer")["d"]
                  if k == "param_groups")
    params = next(v for k, v in groups["l"][0]["d"] if k == "params")
    params["l"] = params["l"][:1]


def _break_the_hook_state(manifest: dict) -> None:
    _extra_entry(manifest, "hook")["d"] = [["not_calls", 5]]  # Hook.load_state_dict: KeyError


@pytest.mark.parametrize("edit", [
    _drop_a_param_from_the_dense_optimizer,
    _break_the_hook_state,
])
def test_a_load_state_dict_failing_on_a_checksummed_manifest_changes_nothing(
    tmp_path, edit
):
    """A manifest with a valid self-checksum whose optimizer/hook state a
    ``load_state_dict`` rejects: that call ran in the apply phase, after the model's
    tensors were overwritten (mlp/embedding of the checkpoint, optimizers not)."""
    run = Run(tmp_path / "run")
    run.train([1, 2])
    ckpt = run.ckpt(2)
    manifest = _manifest(ckpt)
    edit(manifest)
    _seal(ckpt, manifest)
    fresh = _fresh(tmp_path)
    fresh.hook.calls = 99
    before = fresh.snapshot()
    with pytest.raises((ValueError, KeyError, CheckpointCorruptError)):
        fresh.saver.load(ckpt_id=2)
    assert _same(fresh.snapshot(), before)


def test_listing_does_not_walk_a_leftover_symlinked_out_of_the_output_dir(tmp_path, capsys):
    """``ckpt_7 -> /etc`` (no manifest there): `recframe ckpt list` walked and stat'ed
    every file below the link's target (a link to ``/`` walks the whole machine)."""
    from recframe.checkpoint import inspect
    from recframe.checkpoint.storage import Storage

    run = Run(tmp_path / "run")
    run.train([1])
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    for name in ("a", "b", "sub/c"):
        (outside / name).write_bytes(b"x" * 1000)
    os.symlink(outside, tmp_path / "run" / "ckpt_7")
    found = inspect.scan(Storage(str(tmp_path / "run")))
    (entry,) = [e for e in found["uncommitted"] if e["name"] == "ckpt_7"]
    assert entry["bytes"] < 1000 and entry["files"] <= 1


def test_a_lock_file_that_is_a_fifo_does_not_hang_the_start(tmp_path):
    """An output dir unpacked from an archive with ``.recframe-writer.lock`` a FIFO
    (or a link to /dev/zero): reading the lock blocked forever (or read until
    MemoryError). An unreadable lock is a stale one: taken over."""
    from test_hostile_checkpoints import _bounded

    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / ".recframe-writer.lock")

    def start_and_save() -> list:
        run = Run(out)
        run.train([1])
        return sorted(os.listdir(out))

    assert "ckpt_1" in _bounded(start_and_save, seconds=20)
    assert not os.path.islink(out / ".recframe-writer.lock")


def test_a_live_holder_in_another_pid_namespace_is_not_taken_over(tmp_path):
    """Two containers sharing the host's network share its hostname but not pids: the
    first job's pid does not exist (or is this job's own pid) in the second one's
    namespace, so the second took the live lock over at once."""
    import json
    import socket
    import time

    from recframe.checkpoint.lock import WriterLockError

    out = tmp_path / "run"
    out.mkdir()
    for pid in (os.getpid(), 2 ** 22 + 7):
        (out / ".recframe-writer.lock").write_text(json.dumps({
            "run_id": "other-container", "host": socket.gethostname(), "pid": pid,
            "pid_namespace": "pid:[1]", "expires_unix": time.time() + 600,
            "lease_seconds": 600,
        }))
        with pytest.raises(WriterLockError, match="other-container"):
            Run(out).train([1])


@pytest.mark.parametrize("alias", ["ckpt_0004", "ckpt_\u0664", "ckpt_4\n"])
def test_other_spellings_of_a_step_are_not_checkpoints(tmp_path, alias):
    """``\\d`` matches non-ASCII digits and ``$`` a trailing newline: a copy of ckpt_1
    named ``ckpt_0004`` (or with an Arabic-Indic 4, or ``ckpt_4\\n``) was listed and
    restored as step 4, a second directory of that step beside the real one."""
    import shutil

    from recframe.checkpoint.manifest import CheckpointCorruptError as Corrupt
    from recframe.checkpoint.manifest import parse_manifest

    run = Run(tmp_path / "run")
    run.train([1, 2])
    shutil.copytree(run.ckpt(1), tmp_path / "run" / alias)
    assert [c.step for c in run.saver.list_checkpoints()] == [1, 2]
    assert _fresh(tmp_path).manager.restore() == 2
    manifest = _manifest(run.ckpt(2))
    manifest["incremental"] = {"kind": "delta", "chain": ["ckpt_1", alias]}
    from recframe.checkpoint.manifest import encode_manifest

    with pytest.raises(Corrupt, match="not a checkpoint of this output dir"):
        parse_manifest(encode_manifest(manifest), "m")
