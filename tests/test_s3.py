"""Checkpoints on an S3-protocol object store: a real S3 server (moto's server mode) on
loopback, reached through s3fs exactly as a remote bucket would be (HTTP, multipart
uploads, ranged GETs), with the endpoint and fake credentials given the way a user
gives them: fsspec's configuration (``FSSPEC_S3_*``).

Covered: Saver round trip, listing that ignores an uncommitted ``ckpt_<n>/``,
retention deletes (and ``ckpt_1`` never takes ``ckpt_10`` with it), a Trainer run on
``s3://`` that resumes bit-exactly, the ``recframe ckpt`` commands with env config,
failed uploads that never publish a partial file, a missing bucket that is reported
rather than created, reads that fetch only the bytes asked for, stale listing caches,
and ``gs://`` URL handling (without network)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
import uuid

import fsspec
import pytest
import torch
from conftest import ToyCTR, make_batches

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from recframe import Trainer, TrainingArguments  # noqa: E402
from recframe.checkpoint import (  # noqa: E402
    CheckpointManager,
    Saver,
    Storage,
    StorageError,
)

BUCKET = "recframe-test"
KEY, SECRET, REGION = "testing-key", "testing-secret", "us-east-1"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on a free loopback port, fsspec configured to use it (as
    ``FSSPEC_S3_ENDPOINT_URL``/``_KEY``/``_SECRET`` would), and one bucket."""
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        # never a real account: no credentials or config of the machine are used
        "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    conf = {"endpoint_url": endpoint, "key": KEY, "secret": SECRET,
            "client_kwargs": {"region_name": REGION}}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        mp.setitem(fsspec.config.conf, "s3", conf)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = fsspec.filesystem("s3")
        fs.call_s3("create_bucket", Bucket=BUCKET)
        try:
            yield endpoint
        finally:
            _release_s3_writer_locks()  # while the server still answers (not at exit)
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


def _release_s3_writer_locks() -> None:
    """Release the writer locks that tests' managers left held on the test bucket: at
    interpreter exit the server is gone and each release would log a failed request."""
    import gc

    from recframe.checkpoint.lock import WriterLock

    for obj in gc.get_objects():
        if isinstance(obj, WriterLock) and obj.held and not obj.storage.is_local:
            obj.release()


@pytest.fixture
def s3(s3_endpoint):
    """(fs, a fresh ``s3://`` prefix of the test bucket)."""
    return fsspec.filesystem("s3"), f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


def _model(seed: int = 0) -> tuple[ToyCTR, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = ToyCTR(num_embeddings=64, dim=4)
    return model, torch.optim.Adagrad(model.emb.parameters(), lr=0.1)


def _train_once(model, opt) -> None:
    batch = make_batches(1, 16)[0]
    model(batch).backward()
    opt.step()


def _state(model, opt) -> dict:
    out = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"opt.{pid}.{k}"] = v.clone() if isinstance(v, torch.Tensor) else v
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


# --- Saver -----------------------------------------------------------------------
def test_saver_round_trip(s3):
    fs, root = s3
    model, opt = _model(0)
    _train_once(model, opt)
    saver = Saver(model, opt, output_dir=root, chunk_bytes=256, concurrency=3)
    saver.register_for_checkpointing("notes", {"lr": 0.1, "tag": "s3"})
    path = saver.save(7, metrics={"auc": 0.5})
    assert path == f"{root}/ckpt_7"
    names = sorted(os.path.basename(p) for p in fs.ls(path, detail=False, refresh=True))
    assert names == ["data-r00000-000.bin", "data-r00000-001.bin", "data-r00000-002.bin",
                     "manifest.json"]
    # object stores write in place: no staging directory, ever
    assert [os.path.basename(p) for p in fs.ls(root, detail=False, refresh=True)] == ["ckpt_7"]

    other, other_opt = _model(1)
    _train_once(other, other_opt)
    loader = Saver(other, other_opt, output_dir=root)
    (found,) = loader.list_checkpoints()
    assert (found.step, found.path, found.metrics) == (7, path, {"auc": 0.5})
    loader.register_for_checkpointing("notes", {})
    manifest = loader.load()
    assert manifest["step"] == 7
    _assert_same(_state(model, opt), _state(other, other_opt))
    assert loader.get_extra_data("notes") == {"lr": 0.1, "tag": "s3"}
    # a checkpoint path as listing or the log gives it loads as it is
    third, third_opt = _model(2)
    Saver(third, third_opt, output_dir=root).load(ckpt_path=found.path)
    _assert_same(_state(model, opt), _state(third, third_opt))


def test_listing_ignores_an_uncommitted_checkpoint(s3):
    fs, root = s3
    model, opt = _model(0)
    saver = Saver(model, opt, output_dir=root, max_keep=5)
    saver.save(1)
    # a save that died before its manifest PUT: data files, no manifest
    fs.pipe_file(f"{root}/ckpt_2/data-r00000-000.bin", b"\0" * 100)
    fs.pipe_file(f"{root}/ckpt_2/data-r00000-001.bin", b"\0" * 100)
    assert [c.step for c in saver.list_checkpoints()] == [1]
    assert saver.latest_checkpoint().step == 1
    assert saver.uncommitted() == [f"{root}/ckpt_2"]
    # a new manager cleans the leftover and restores the committed one
    fresh, fresh_opt = _model(3)
    manager = CheckpointManager(Saver(fresh, fresh_opt, output_dir=root))
    assert not fs.exists(f"{root}/ckpt_2")
    assert fs.exists(f"{root}/ckpt_1/manifest.json")
    assert manager.restore() == 1
    _assert_same(_state(model, opt), _state(fresh, fresh_opt))


def test_retention_deletes_on_s3_without_touching_prefix_siblings(s3):
    fs, root = s3
    model, opt = _model(0)
    manager = CheckpointManager(Saver(model, opt, output_dir=root, chunk_bytes=512), max_keep=2)
    for step in (1, 5, 10, 15):
        _train_once(model, opt)
        manager.save(step)
    assert [c.step for c in manager.list()] == [10, 15]
    names = (os.path.basename(p) for p in fs.ls(root, detail=False, refresh=True))
    assert sorted(n for n in names if n != ".recframe-writer.lock") == ["ckpt_10", "ckpt_15"]
    assert fs.find(f"{root}/ckpt_1/") == [] and fs.find(f"{root}/ckpt_5/") == []
    # ckpt_10 survived the delete of ckpt_1 whole: it reads back intact
    latest = _state(model, opt)
    fresh, fresh_opt = _model(4)
    restored = CheckpointManager(Saver(fresh, fresh_opt, output_dir=root), max_keep=2)
    assert restored.restore(10) == 10
    assert restored.restore() == 15
    _assert_same(latest, _state(fresh, fresh_opt))


def test_keep_best_on_s3(s3):
    fs, root = s3
    model, opt = _model(0)
    manager = CheckpointManager(Saver(model, opt, output_dir=root), max_keep=1,
                                keep_best_metric="auc", keep_best_mode="max")
    scores = {1: 0.7, 2: 0.9, 3: 0.6, 4: 0.65}
    for step, auc in scores.items():
        manager.metrics_provider = lambda auc=auc: {"auc": auc}
        manager.save(step)
    assert [c.step for c in manager.list()] == [2, 4]
    assert fs.find(f"{root}/ckpt_1/") == [] and fs.find(f"{root}/ckpt_3/") == []


# --- Trainer ---------------------------------------------------------------------
def _trainer(output_dir: str, steps: int) -> Trainer:
    torch.manual_seed(0)
    model = ToyCTR(num_embeddings=64, dim=4)
    args = TrainingArguments(output_dir=output_dir, train_steps=steps, save_steps=2,
                             max_to_keep=2, report_to="none", disable_tqdm=True,
                             log_steps=1000, seed=3)
    return Trainer(model, args, train_dataset=make_batches(10, 16, seed=5))


def _trained(trainer: Trainer) -> dict:
    model = trainer.unwrapped_model
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_trainer_runs_and_resumes_on_s3(s3, tmp_path, caplog):
    fs, root = s3
    out = f"{root}/trainer"
    straight = _trainer(str(tmp_path / "local"), 7)
    straight.train()

    first = _trainer(out, 4)
    first.train()
    assert first.global_step == 4
    assert [os.path.basename(p) for p in fs.ls(out, detail=False, refresh=True)] == [
        "ckpt_2", "ckpt_4", "run_config.json"]

    caplog.clear()
    second = _trainer(out, 7)
    assert second.restore() == 4
    assert second.global_step == 4
    second.train()
    assert second.global_step == 7
    assert any("resumed from" in r.getMessage() for r in caplog.records)
    assert [os.path.basename(p) for p in fs.ls(out, detail=False, refresh=True)] == [
        "ckpt_6", "ckpt_7", "run_config.json"]
    # 4 steps, a new process-like Trainer from s3://, 3 more == 7 straight steps
    _assert_same(_trained(straight), _trained(second))


# --- the command line with env configuration --------------------------------------
def test_ckpt_cli_subprocess_with_fsspec_env_config(s3):
    fs, root = s3
    endpoint = fsspec.config.conf["s3"]["endpoint_url"]
    model, opt = _model(0)
    saver = Saver(model, opt, output_dir=root, max_keep=3)
    saver.save(3, metrics={"auc": 0.8})
    fs.pipe_file(f"{root}/ckpt_4/data-r00000-000.bin", b"\0" * 10)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    env.update(
        FSSPEC_S3_ENDPOINT_URL=endpoint, FSSPEC_S3_KEY=KEY, FSSPEC_S3_SECRET=SECRET,
        FSSPEC_S3_CLIENT_KWARGS=json.dumps({"region_name": REGION}),
        AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    cmd = [sys.executable, "-m", "recframe", "--log_level", "WARNING", "ckpt"]
    proc = subprocess.run(cmd + ["list", root, "--json"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert [(c["step"], c["path"], c["metrics"]) for c in report["checkpoints"]] == [
        (3, f"{root}/ckpt_3", {"auc": 0.8})]
    assert [c["name"] for c in report["uncommitted"]] == ["ckpt_4"]

    proc = subprocess.run(cmd + ["inspect", root, "--verify", "--json"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["verify"]["ok"] is True
    # corrupt one object: verify fails and names it by its s3:// URL
    name = sorted(n for n in fs.ls(f"{root}/ckpt_3", detail=False) if n.endswith(".bin"))[0]
    data = bytearray(fs.cat_file(name))
    data[0] ^= 0xFF
    fs.pipe_file(name, bytes(data))
    proc = subprocess.run(cmd + ["inspect", root, "--verify"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert f"s3://{name}" in proc.stderr and "checksum mismatch" in proc.stderr


# --- storage behaviour on S3 -----------------------------------------------------
def test_a_failed_upload_publishes_nothing(s3):
    fs, root = s3
    storage = Storage(root, default_block_size=5 * 2**20)  # multipart from 5 MiB
    path = storage.path("data.bin")
    part = memoryview(bytes(3 * 2**20))

    def chunks():
        for _ in range(4):  # 12 MiB: two parts uploaded before the failure
            yield part
        raise RuntimeError("the producer failed")

    with pytest.raises(RuntimeError, match="producer failed"):
        storage.write_chunks(path, chunks())
    assert not fs.exists(path)
    assert storage.listdir(root) == []
    # and a complete one is published whole
    assert storage.write_chunks(path, [part, part]) == 6 * 2**20
    assert fs.size(path) == 6 * 2**20


def test_a_missing_bucket_is_reported_not_created(s3_endpoint):
    fs = fsspec.filesystem("s3")
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    model, opt = _model(0)
    saver = Saver(model, opt, output_dir=f"s3://{bucket}/run")
    assert saver.list_checkpoints() == []
    with pytest.raises(StorageError, match=f"s3://{bucket}/run/ckpt_1"):
        saver.save(1)
    assert not fs.exists(bucket)


def test_loading_fetches_only_the_bytes_of_each_chunk(s3, monkeypatch):
    """Every chunk is one ranged GET of exactly its bytes (no read-ahead past it)."""
    import s3fs

    fs, root = s3
    model, opt = _model(0)
    saver = Saver(model, opt, output_dir=root, chunk_bytes=256, concurrency=2)
    path = saver.save(1)
    with fs.open(f"{path}/manifest.json") as f:
        manifest = json.load(f)
    data_bytes = sum(f["size"] for f in manifest["files"].values())
    chunks = sum(len(f["crc32"]) for f in manifest["files"].values())
    fetched = []
    original = s3fs.core.S3File._fetch_range

    def counting(self, start, end):
        data = original(self, start, end)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", counting)
    other, other_opt = _model(1)
    Saver(other, other_opt, output_dir=root).load()
    assert sum(fetched) == data_bytes
    assert len(fetched) == chunks
    _assert_same(_state(model, opt), _state(other, other_opt))


def test_exists_and_listing_see_other_writers(s3):
    """A long-lived process (its own s3fs instance and listing cache) sees a
    manifest another process committed after it listed the directory."""
    fs, root = s3
    reader = Storage(root, skip_instance_cache=True)
    writer = Storage(root, skip_instance_cache=True)
    assert reader.fs is not writer.fs
    writer.write_bytes_atomic(writer.path("ckpt_2", "data.bin"), b"x")
    assert reader.listdir(reader.path("ckpt_2")) == ["data.bin"]  # cached by s3fs now
    assert not reader.exists(reader.path("ckpt_2", "manifest.json"))
    writer.write_bytes_atomic(writer.path("ckpt_2", "manifest.json"), b"{}")
    assert reader.exists(reader.path("ckpt_2", "manifest.json"))
    assert reader.listdir(reader.path("ckpt_2")) == ["data.bin", "manifest.json"]
    assert reader.file_sizes(reader.path("ckpt_2")) == {"data.bin": 1, "manifest.json": 2}
    writer.remove_tree(writer.path("ckpt_2"))
    assert not reader.exists(reader.path("ckpt_2", "manifest.json"))
    assert reader.listdir(root) == []


def test_s3_paths_are_urls_that_round_trip(s3):
    fs, root = s3
    storage = Storage(root + "/")
    assert storage.root == root and storage.protocol == "s3"
    assert storage.path("ckpt_3", "manifest.json") == f"{root}/ckpt_3/manifest.json"
    assert Storage(storage.path("ckpt_3")).root == f"{root}/ckpt_3"
    assert storage.display(f"{BUCKET}/x/y") == f"s3://{BUCKET}/x/y"
    assert storage.strip(storage.path("a")) == f"{root[len('s3://'):]}/a"
    assert not storage.atomic_rename
    assert Storage(f"s3a://{BUCKET}/run").root == f"s3://{BUCKET}/run"


# --- gs:// (no network) ----------------------------------------------------------
def _fake_gcs_class():
    """A stand-in with gcsfs' URL conventions (protocols ("gs", "gcs"), paths
    ``bucket/key`` with no leading slash) over fsspec's in-memory store."""
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCSFileSystem(MemoryFileSystem):
        protocol = ("gs", "gcs")
        root_marker = ""
        store: dict = {}
        pseudo_dirs = [""]

        @classmethod
        def _strip_protocol(cls, path):
            for proto in cls.protocol:
                if path.startswith(proto + "://"):
                    path = path[len(proto) + 3 :]
            return path.lstrip("/").rstrip("/")

    return FakeGCSFileSystem


def test_gs_urls_need_no_special_handling(monkeypatch):
    fake = _fake_gcs_class()
    registry = importlib.import_module("fsspec.registry")._registry
    monkeypatch.setitem(registry, "gs", fake)
    monkeypatch.setitem(registry, "gcs", fake)
    storage = Storage("gs://bucket/run/")
    assert (storage.protocol, storage.root) == ("gs", "gs://bucket/run")
    assert storage.path("ckpt_1") == "gs://bucket/run/ckpt_1"
    assert storage.display("bucket/run/ckpt_1") == "gs://bucket/run/ckpt_1"
    assert Storage("gcs://bucket/run").root == "gs://bucket/run"
    assert not storage.atomic_rename

    model, opt = _model(0)
    _train_once(model, opt)
    saver = Saver(model, opt, output_dir="gs://bucket/run", chunk_bytes=256)
    assert saver.save(3) == "gs://bucket/run/ckpt_3"
    assert not any(".staging" in k for k in fake.store)
    other, other_opt = _model(1)
    manager = CheckpointManager(Saver(other, other_opt, output_dir="gs://bucket/run"))
    assert manager.restore() == 3
    _assert_same(_state(model, opt), _state(other, other_opt))


def test_real_gcsfs_url_handling_without_network():
    gcsfs = pytest.importorskip("gcsfs")
    storage = Storage("gs://bucket/run", token="anon")
    assert isinstance(storage.fs, gcsfs.GCSFileSystem)
    assert storage.root == "gs://bucket/run"
    assert storage.path("ckpt_2", "manifest.json") == "gs://bucket/run/ckpt_2/manifest.json"
    assert storage.strip(storage.path("ckpt_2")) == "bucket/run/ckpt_2"
