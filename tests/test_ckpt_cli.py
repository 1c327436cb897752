"""``recframe ckpt list`` and ``recframe ckpt inspect [--verify]``: committed checkpoints
and leftovers, one checkpoint's parts/tensors/files, CRC32 verification that names the
corrupt file, ``--json``, and paths given as fsspec URLs (memory://)."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import fsspec
import pytest
import torch
from conftest import ToyCTR

from recframe import cli
from recframe.checkpoint import Saver
from recframe.checkpoint.manifest import encode_manifest


def _saver(out: str, **kw) -> Saver:
    torch.manual_seed(0)
    model = ToyCTR(num_embeddings=64, dim=4)
    opt = torch.optim.Adagrad(model.emb.parameters(), lr=0.1)
    # small chunks: several chunks per table and several data files
    kw.setdefault("chunk_bytes", 256)
    kw.setdefault("concurrency", 3)
    kw.setdefault("max_keep", 10)
    saver = Saver(model, opt, output_dir=out, **kw)
    saver.register_for_checkpointing("notes", {"lr": 0.1, "name": "toy"})
    return saver


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture
def run_dir(tmp_path):
    """An output_dir with ckpt_1 (metrics), ckpt_5, a staging leftover and a ckpt_9
    directory that was never committed."""
    out = str(tmp_path / "run")
    saver = _saver(out)
    saver.save(1, metrics={"auc": 0.75, "loss": 0.5})
    saver.save(5)
    os.makedirs(os.path.join(out, "ckpt_7.staging"))
    with open(os.path.join(out, "ckpt_7.staging", "data-r00000-000.bin"), "wb") as f:
        f.write(b"\0" * 100)
    os.makedirs(os.path.join(out, "ckpt_9"))
    with open(os.path.join(out, "ckpt_9", "data-r00000-000.bin"), "wb") as f:
        f.write(b"\0" * 10)
    os.makedirs(os.path.join(out, "logs"))  # not a checkpoint: never listed
    return out


# --- list ------------------------------------------------------------------------
def test_list_json_committed_and_leftovers(run_dir, capsys):
    before = time.time()
    rc, out, _ = _run(capsys, "ckpt", "list", run_dir, "--json")
    assert rc == 0
    report = json.loads(out)
    assert report["path"] == run_dir
    assert [c["step"] for c in report["checkpoints"]] == [1, 5]
    first = report["checkpoints"][0]
    assert first["name"] == "ckpt_1"
    assert first["committed"] is True
    assert first["metrics"] == {"auc": 0.75, "loss": 0.5}
    assert first["world_size"] == 1
    assert first["created_unix"] <= before
    on_disk = os.listdir(os.path.join(run_dir, "ckpt_1"))
    assert first["files"] == len(on_disk)
    data = sum(os.path.getsize(os.path.join(run_dir, "ckpt_1", n))
               for n in on_disk if n.endswith(".bin"))
    assert first["bytes"] == data
    assert report["checkpoints"][1]["metrics"] == {}
    left = {c["name"]: c for c in report["uncommitted"]}
    assert set(left) == {"ckpt_7.staging", "ckpt_9"}
    assert all(c["committed"] is False for c in left.values())
    assert left["ckpt_7.staging"]["bytes"] == 100 and left["ckpt_7.staging"]["files"] == 1
    assert left["ckpt_9"]["step"] == 9 and "manifest" in left["ckpt_9"]["reason"]


def test_list_text_marks_uncommitted(run_dir, capsys):
    rc, out, _ = _run(capsys, "ckpt", "list", run_dir)
    assert rc == 0
    lines = out.splitlines()
    assert "2 committed checkpoint(s), 2 uncommitted leftover(s)" in lines[0]
    row = {line.split()[0]: line for line in lines[2:]}
    assert "committed" in row["ckpt_1"] and "auc=0.75" in row["ckpt_1"]
    assert "UNCOMMITTED" in row["ckpt_9"] and "UNCOMMITTED" in row["ckpt_7.staging"]
    assert "UNCOMMITTED" not in row["ckpt_5"]
    assert "logs" not in row


def test_list_corrupt_manifest_is_listed_corrupt_not_a_crash(run_dir, capsys):
    with open(os.path.join(run_dir, "ckpt_5", "manifest.json"), "w") as f:
        f.write("{ truncated")
    rc, out, _ = _run(capsys, "ckpt", "list", run_dir, "--json")
    assert rc == 0
    report = json.loads(out)
    assert [c["step"] for c in report["checkpoints"]] == [1]
    assert not [c for c in report["uncommitted"] if c["name"] == "ckpt_5"]
    bad = [c for c in report["corrupt"] if c["name"] == "ckpt_5"]
    assert bad and "corrupt manifest" in bad[0]["reason"] and bad[0]["state"] == "corrupt"
    rc, out, _ = _run(capsys, "ckpt", "list", run_dir)
    assert rc == 0 and "1 corrupt" in out
    assert "CORRUPT" in {line.split()[0]: line for line in out.splitlines()[2:]}["ckpt_5"]


def test_list_of_one_checkpoint_dir_and_missing_path(run_dir, tmp_path, capsys):
    rc, out, _ = _run(capsys, "ckpt", "list", os.path.join(run_dir, "ckpt_5"), "--json")
    assert rc == 0
    assert [c["step"] for c in json.loads(out)["checkpoints"]] == [5]
    missing = str(tmp_path / "nope")
    rc, out, err = _run(capsys, "ckpt", "list", missing)
    assert rc == 1
    assert missing in err and "does not exist" in err


def test_list_empty_output_dir(tmp_path, capsys):
    rc, out, _ = _run(capsys, "ckpt", "list", str(tmp_path), "--json")
    assert rc == 0
    assert json.loads(out) == {"path": str(tmp_path), "checkpoints": [], "uncommitted": [],
                               "corrupt": []}


# --- inspect ---------------------------------------------------------------------
def test_inspect_latest_json_lists_parts_tensors_files(run_dir, capsys):
    rc, out, _ = _run(capsys, "ckpt", "inspect", run_dir, "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["step"] == 5 and info["path"] == os.path.join(run_dir, "ckpt_5")
    assert "verify" not in info
    tensors = {t["key"]: t for t in info["tensors"]}
    emb = tensors["sparse.emb.weight"]
    assert emb["dtype"] == "float32" and emb["shape"] == [64, 4]
    assert emb["bytes"] == 64 * 4 * 4
    assert emb["chunks"] == 4  # 1 KiB in 256-byte chunks
    assert tensors["dense.mlp.0.weight"]["shape"] == [8, 7]
    parts = {p["part"]: p for p in info["parts"]}
    assert set(parts) == {"sparse", "dense", "sparse_opt", "extra", "io_state"}
    assert parts["sparse"]["tensors"] == 1 and parts["sparse"]["bytes"] == 1024
    assert parts["dense"]["tensors"] == 4
    assert parts["dense"]["bytes"] == 4 * (8 * 7 + 8 + 8 + 1)
    assert "notes" in parts["extra"]["entries"]
    assert parts["io_state"]["entries"] == ["rank 0"]
    files = {f["name"]: f for f in info["data_files"]}
    assert set(files) == {n for n in os.listdir(os.path.join(run_dir, "ckpt_5"))
                          if n.endswith(".bin")}
    assert len(files) == 3
    for name, entry in files.items():
        assert entry["bytes"] == os.path.getsize(os.path.join(run_dir, "ckpt_5", name))
    assert sum(t["bytes"] for t in info["tensors"]) == sum(f["bytes"] for f in files.values())


def test_inspect_step_and_checkpoint_dir(run_dir, capsys):
    rc, out, _ = _run(capsys, "ckpt", "inspect", run_dir, "--step", "1", "--json")
    assert rc == 0 and json.loads(out)["metrics"] == {"auc": 0.75, "loss": 0.5}
    rc, out, _ = _run(capsys, "ckpt", "inspect", os.path.join(run_dir, "ckpt_1"), "--json")
    assert rc == 0 and json.loads(out)["step"] == 1
    rc, _, err = _run(capsys, "ckpt", "inspect", run_dir, "--step", "9")
    assert rc == 1 and "ckpt_9" in err and "not committed" in err
    rc, _, err = _run(capsys, "ckpt", "inspect", run_dir, "--step", "4")
    assert rc == 1 and "no checkpoint ckpt_4" in err


def test_inspect_text(run_dir, capsys):
    rc, out, _ = _run(capsys, "ckpt", "inspect", run_dir, "--verify")
    assert rc == 0
    assert f"checkpoint  {os.path.join(run_dir, 'ckpt_5')}" in out
    assert "sparse.emb.weight" in out and "64x4" in out and "float32" in out
    assert "data-r00000-000.bin" in out
    assert "verify      OK" in out


def test_inspect_of_a_dir_without_checkpoints_fails(tmp_path, capsys):
    rc, _, err = _run(capsys, "ckpt", "inspect", str(tmp_path))
    assert rc == 1 and "committed" in err
    rc, _, err = _run(capsys, "ckpt", "inspect", str(tmp_path / "missing"))
    assert rc == 1 and "does not exist" in err


# --- verify ----------------------------------------------------------------------
def _flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def _chunk_of(ckpt: str, key: str) -> dict:
    with open(os.path.join(ckpt, "manifest.json")) as f:
        manifest = json.load(f)
    return manifest["tensors"][key]["shards"][0]["chunks"][1]


def test_verify_names_the_corrupt_file_and_tensor(run_dir, capsys):
    ckpt = os.path.join(run_dir, "ckpt_5")
    chunk = _chunk_of(ckpt, "sparse.emb.weight")
    bad = os.path.join(ckpt, chunk["file"])
    _flip_byte(bad, chunk["offset"] + 5)
    rc, out, err = _run(capsys, "ckpt", "inspect", run_dir, "--verify")
    assert rc == 1
    assert bad in err and "checksum mismatch" in err and "sparse.emb.weight" in err
    assert "FAILED" in out
    others = [n for n in os.listdir(ckpt) if n.endswith(".bin") and n != chunk["file"]]
    assert others and not any(n in err for n in others)  # only the corrupt file is named
    # without --verify nothing is read: the manifest alone is fine
    rc, _, _ = _run(capsys, "ckpt", "inspect", run_dir)
    assert rc == 0
    # ckpt_1 is intact
    rc, _, _ = _run(capsys, "ckpt", "inspect", run_dir, "--step", "1", "--verify")
    assert rc == 0


def test_verify_json_reports_truncated_and_missing_files(run_dir, capsys):
    ckpt = os.path.join(run_dir, "ckpt_5")
    names = sorted(n for n in os.listdir(ckpt) if n.endswith(".bin"))
    truncated, missing = os.path.join(ckpt, names[0]), os.path.join(ckpt, names[1])
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) - 3)
    os.remove(missing)
    rc, out, err = _run(capsys, "ckpt", "inspect", ckpt, "--verify", "--json")
    assert rc == 1
    verify = json.loads(out)["verify"]
    assert verify["ok"] is False
    text = "\n".join(verify["problems"])
    assert f"{truncated}: size" in text and "truncated" in text
    assert f"{missing}: missing" in text
    assert truncated in err and missing in err


def test_verify_catches_a_manifest_that_lies_about_a_checksum(run_dir, capsys):
    ckpt = os.path.join(run_dir, "ckpt_1")
    mpath = os.path.join(ckpt, "manifest.json")
    with open(mpath) as f:
        manifest = json.load(f)
    chunk = manifest["tensors"]["dense.mlp.0.weight"]["shards"][0]["chunks"][0]
    chunk["crc32"] ^= 1
    with open(mpath, "wb") as f:  # sealed again: its own checksum holds, the chunk's lies
        f.write(encode_manifest(manifest))
    rc, _, err = _run(capsys, "ckpt", "inspect", ckpt, "--verify")
    assert rc == 1 and chunk["file"] in err and "dense.mlp.0.weight" in err


# --- fsspec URLs -------------------------------------------------------------------
def test_list_and_verify_on_memory_url(capsys):
    root = f"memory://ckpt-cli-{uuid.uuid4().hex}/run"
    try:
        saver = _saver(root)
        saver.save(2, metrics={"auc": 0.6})
        saver.save(3)
        fs = fsspec.filesystem("memory")
        fs.pipe_file(root + "/ckpt_4/data-r00000-000.bin", b"x" * 7)
        rc, out, _ = _run(capsys, "ckpt", "list", root, "--json")
        assert rc == 0
        report = json.loads(out)
        assert [c["step"] for c in report["checkpoints"]] == [2, 3]
        assert report["checkpoints"][1]["path"] == root + "/ckpt_3"
        assert [(c["name"], c["bytes"]) for c in report["uncommitted"]] == [("ckpt_4", 7)]
        rc, out, _ = _run(capsys, "ckpt", "inspect", root, "--verify", "--json")
        assert rc == 0 and json.loads(out)["verify"]["ok"] is True
        info = json.loads(out)
        name = info["data_files"][0]["name"]
        path = f"{root}/ckpt_3/{name}"
        data = bytearray(fs.cat_file(path))
        data[-1] ^= 0xFF
        fs.pipe_file(path, bytes(data))
        rc, _, err = _run(capsys, "ckpt", "inspect", root, "--verify")
        assert rc == 1 and path in err
    finally:
        fsspec.filesystem("memory").rm(root.split("/run")[0], recursive=True)


def test_ckpt_without_subcommand_prints_help(capsys):
    rc, out, _ = _run(capsys, "ckpt")
    assert rc == 2 and "list" in out and "inspect" in out


def test_chunk_checksums_are_zlib_crc32(run_dir):
    """The checksums in a manifest are zlib's CRC32 whichever implementation wrote
    them (ISA-L when installed), so any reader can verify any checkpoint."""
    import zlib

    from recframe.checkpoint.storage import crc32

    ckpt = os.path.join(run_dir, "ckpt_5")
    with open(os.path.join(ckpt, "manifest.json")) as f:
        manifest = json.load(f)
    checked = 0
    for entry in manifest["tensors"].values():
        for shard in entry["shards"]:
            for chunk in shard["chunks"]:
                with open(os.path.join(ckpt, chunk["file"]), "rb") as f:
                    f.seek(chunk["offset"])
                    data = f.read(chunk["nbytes"])
                assert zlib.crc32(data) == chunk["crc32"]
                checked += 1
    assert checked >= 10
    blob = memoryview(os.urandom(1 << 20))
    assert crc32(blob) == zlib.crc32(blob)
    assert crc32(blob[1000:], 12345) == zlib.crc32(blob[1000:], 12345)
    assert crc32(blob[:0], 7) == 7


# --- hostile checkpoints: the CLI trusts names, not claims --------------------------
def _reseal(ckpt: str, edit) -> None:
    path = os.path.join(ckpt, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "wb") as f:
        f.write(encode_manifest(manifest))


def test_list_and_inspect_name_checkpoints_by_their_directories(run_dir, capsys):
    import shutil

    shutil.copytree(os.path.join(run_dir, "ckpt_5"), os.path.join(run_dir, "ckpt_8"))
    rc, out, _ = _run(capsys, "ckpt", "list", run_dir, "--json")
    assert rc == 0
    assert [(c["name"], c["step"]) for c in json.loads(out)["checkpoints"]] == [
        ("ckpt_1", 1), ("ckpt_5", 5), ("ckpt_8", 8)]  # ckpt_8's manifest says ckpt_5
    rc, out, _ = _run(capsys, "ckpt", "inspect", run_dir, "--json")
    info = json.loads(out)
    assert info["name"] == "ckpt_8" and info["step"] == 8
    assert info["path"] == os.path.join(run_dir, "ckpt_8")


def test_one_bad_manifest_is_listed_corrupt_and_the_rest_listed(run_dir, capsys):
    _reseal(os.path.join(run_dir, "ckpt_5"),
            lambda m: next(iter(m["files"].values())).update(size="a lot"))
    rc, out, _ = _run(capsys, "ckpt", "list", run_dir, "--json")
    assert rc == 0
    report = json.loads(out)
    assert [c["name"] for c in report["checkpoints"]] == ["ckpt_1"]
    assert [c["name"] for c in report["corrupt"]] == ["ckpt_5"]
    assert "size" in report["corrupt"][0]["reason"]
    rc, _, err = _run(capsys, "ckpt", "inspect", run_dir, "--step", "5")
    assert rc == 1 and "ckpt_5" in err and "size" in err and "Traceback" not in err


def test_verify_never_looks_outside_the_checkpoint(run_dir, capsys, monkeypatch):
    from recframe.checkpoint.storage import Storage

    ckpt = os.path.join(run_dir, "ckpt_5")
    touched: list[str] = []
    for method in ("size", "open_read", "read_bytes", "exists"):
        original = getattr(Storage, method)

        def spy(self, path, *a, _original=original, **kw):
            # (a lease-renewal thread of another test's writer lock is not the CLI)
            if threading.current_thread().name != "recframe-writer-lease":
                touched.append(path)
            return _original(self, path, *a, **kw)

        monkeypatch.setattr(Storage, method, spy)

    def to_passwd(m):
        name = sorted(m["files"])[0]
        m["files"]["/etc/passwd"] = m["files"].pop(name)
        for entry in m["tensors"].values():
            for shard in entry["shards"]:
                for chunk in shard["chunks"]:
                    if chunk["file"] == name:
                        chunk["file"] = "/etc/passwd"

    _reseal(ckpt, to_passwd)
    rc, _, err = _run(capsys, "ckpt", "inspect", ckpt, "--verify")
    assert rc == 1 and "/etc/passwd" in err and "not a plain file name" in err
    assert not [p for p in touched if not p.startswith(run_dir)]


def test_verify_refuses_a_data_file_symlinked_out(run_dir, tmp_path, capsys):
    ckpt = os.path.join(run_dir, "ckpt_5")
    name = sorted(n for n in os.listdir(ckpt) if n.endswith(".bin"))[0]
    os.replace(os.path.join(ckpt, name), tmp_path / name)
    os.symlink(tmp_path / name, os.path.join(ckpt, name))
    rc, _, err = _run(capsys, "ckpt", "inspect", ckpt, "--verify")
    assert rc == 1 and name in err and "outside" in err


def test_verify_of_a_delta_checks_its_chain_as_restore_does(tmp_path, capsys):
    from recframe.checkpoint import CheckpointManager

    out = str(tmp_path / "inc")
    saver = _saver(out)
    manager = CheckpointManager(saver, save_interval=1, incremental=True)
    for step in (1, 2, 3):
        with torch.no_grad():
            saver.model.emb.weight[step] += 1.0
        manager.step(step)
    with open(os.path.join(out, "ckpt_3", "manifest.json")) as f:
        assert json.load(f)["incremental"]["chain"] == ["ckpt_1", "ckpt_2", "ckpt_3"]
    rc, _, _ = _run(capsys, "ckpt", "inspect", out, "--verify")
    assert rc == 0
    chunk = _chunk_of(os.path.join(out, "ckpt_1"), "sparse.emb.weight")
    bad = os.path.join(out, "ckpt_1", chunk["file"])
    _flip_byte(bad, chunk["offset"])  # the base's table: restoring ckpt_3 reads it
    rc, _, err = _run(capsys, "ckpt", "inspect", out, "--verify")
    assert rc == 1 and bad in err and "sparse.emb.weight" in err
    os.remove(os.path.join(out, "ckpt_2", "manifest.json"))  # a missing link
    rc, _, err = _run(capsys, "ckpt", "inspect", out, "--step", "3", "--verify")
    assert rc == 1 and "ckpt_2" in err and "missing" in err


def test_a_closed_stdout_exits_quietly(run_dir):
    import subprocess
    import sys

    code = ("import sys; from recframe import cli; "
            f"sys.exit(cli.main(['ckpt', 'inspect', {run_dir!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # as `| head` does (before the child writes: it is importing)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err
