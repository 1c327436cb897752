"""`Saver`: what one checkpoint holds and how it is laid out and committed.

Round trips of every kind of value a state tree holds, the load parts and their
configuration, chunked concurrent writes, and the ``ckpt_<n>`` / manifest commit
protocol, on a local path and on ``memory://`` (an object store: no rename)."""

from __future__ import annotations

import json
import math
import posixpath
import uuid
import zlib

import fsspec
import numpy as np
import pytest
import torch
from conftest import ToyCTR
from torch import nn

import recframe
from recframe.checkpoint import PARTS, CheckpointError, CheckpointManager, Saver
from recframe.checkpoint.saver import MANIFEST


# --- helpers -------------------------------------------------------------------------
@pytest.fixture(params=["local", "memory"])
def output_dir(request, tmp_path):
    """A fresh output_dir on a local path or on fsspec's in-memory object store."""
    if request.param == "local":
        yield str(tmp_path / "run")
        return
    url = f"memory://ckpt-test-{uuid.uuid4().hex}"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def fs_of(url: str):
    return fsspec.core.url_to_fs(url)


def entries(url: str) -> list[str]:
    """Names directly under ``url`` (empty when it does not exist), without the writer
    lock's files (``.recframe-writer.lock*``)."""
    fs, root = fs_of(url)
    if not fs.exists(root):
        return []
    names = (posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    return sorted(n for n in names if not n.startswith(".recframe-writer.lock"))


def files_in(url: str) -> dict[str, int]:
    """{name: size} of the files directly in ``url``."""
    fs, root = fs_of(url)
    return {
        posixpath.basename(info["name"]): info["size"]
        for info in fs.ls(root, detail=True)
        if info["type"] == "file"
    }


def read(url: str) -> bytes:
    fs, path = fs_of(url)
    return fs.cat_file(path)


def manifest_of(ckpt_url: str) -> dict:
    return json.loads(read(ckpt_url.rstrip("/") + "/" + MANIFEST))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (so NaN payloads and -0.0 compare exactly)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a, b, where="value"):
    """Deep, exact equality: types, dtypes, shapes, bytes."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(bits(a), bits(b)), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes(), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def trained(seed: int = 0, steps: int = 3):
    """A ToyCTR and its sparse Adagrad + dense Adam optimizers with non-trivial state."""
    torch.manual_seed(seed)
    model = ToyCTR(num_embeddings=32, dim=4)
    sparse = torch.optim.Adagrad(model.emb.parameters(), lr=0.1)
    dense = torch.optim.Adam(model.mlp.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = {
            "ids": torch.randint(0, 32, (8, 2), generator=g),
            "dense": torch.randn(8, 3, generator=g),
            "label": torch.randint(0, 2, (8,), generator=g).float(),
        }
        sparse.zero_grad()
        dense.zero_grad()
        model(batch).backward()
        sparse.step()
        dense.step()
    return model, sparse, dense


def fresh(seed: int = 99):
    torch.manual_seed(seed)
    model = ToyCTR(num_embeddings=32, dim=4)
    return (
        model,
        torch.optim.Adagrad(model.emb.parameters(), lr=0.5),
        torch.optim.Adam(model.mlp.parameters(), lr=0.5),
    )


class Counter:
    """A stateful object (state_dict / load_state_dict)."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


# --- round trips ---------------------------------------------------------------------
def test_model_and_optimizers_round_trip_bitwise(output_dir):
    model, sparse, dense = trained()
    saver = Saver(model, sparse, output_dir=output_dir)
    saver.register_for_checkpointing("dense_optimizer", dense)
    path = saver.save(1)

    model2, sparse2, dense2 = fresh()
    assert not torch.equal(model2.emb.weight, model.emb.weight)
    saver2 = Saver(model2, sparse2, output_dir=output_dir)
    saver2.register_for_checkpointing("dense_optimizer", dense2)
    manifest = saver2.load()
    assert manifest["step"] == 1 and path.endswith("ckpt_1")
    assert_same(model.state_dict(), model2.state_dict(), "model")
    # optimizer states are keyed by int parameter ids; param_groups hold tuples (betas)
    assert_same(sparse.state_dict(), sparse2.state_dict(), "sparse_opt")
    assert_same(dense.state_dict(), dense2.state_dict(), "dense_opt")
    assert isinstance(dense2.state_dict()["param_groups"][0]["betas"], tuple)


def test_state_is_taken_at_save_time_not_at_construction(output_dir):
    model, sparse, _ = trained()
    counter = Counter(1)
    plain = {"seen": [1]}
    saver = Saver(model, sparse, output_dir=output_dir)
    saver.register_for_checkpointing("counter", counter)
    saver.register_for_checkpointing("plain", plain)
    # mutate everything after registration
    with torch.no_grad():
        model.emb.weight.fill_(3.0)
        model.mlp[0].bias.fill_(-2.0)
    for state in sparse.state.values():
        state["sum"].fill_(7.0)
    counter.value = 42
    plain["seen"].append(2)
    saver.save(5)

    model2, sparse2, _ = fresh()
    counter2 = Counter(0)
    saver2 = Saver(model2, sparse2, output_dir=output_dir)
    saver2.register_for_checkpointing("counter", counter2)
    saver2.register_for_checkpointing("plain", {"seen": []})
    saver2.load(ckpt_id=5)
    assert torch.all(model2.emb.weight == 3.0)
    assert torch.all(model2.mlp[0].bias == -2.0)
    assert all(torch.all(s["sum"] == 7.0) for s in sparse2.state.values())
    assert counter2.value == 42
    assert saver2.get_extra_data("plain") == {"seen": [1, 2]}
    assert saver2.get_extra_data("counter") == {"value": 42}


def _values():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    return {
        "bf16": torch.randn(5, 3, generator=torch.Generator().manual_seed(1)).bfloat16(),
        "f16": torch.tensor([1.5, -0.0, 65504.0], dtype=torch.float16),
        "f64": torch.tensor([math.pi, -1e-300], dtype=torch.float64),
        "int64": torch.tensor([[-(2**62), 2**62 - 1]], dtype=torch.int64),
        "int32": torch.tensor([-5, 7], dtype=torch.int32),
        "int8": torch.tensor([-128, 127], dtype=torch.int8),
        "uint8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "scalar": torch.tensor(2.5),
        "int_scalar": torch.tensor(7, dtype=torch.int64),
        "bool_scalar": torch.tensor(True),
        "empty": torch.empty(0),
        "empty_rows": torch.empty(0, 3, dtype=torch.int32),
        "empty_cols": torch.empty(4, 0, dtype=torch.bfloat16),
        "transposed": base.t(),
        "strided": base[:, ::2],
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
        "nan_inf_tensor": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]),
        "nan": float("nan"),
        "inf": float("inf"),
        "neg_inf": -float("inf"),
        "float": 0.1,
        "big_int": 2**70,
        "neg": -3,
        "flag": False,
        "none": None,
        "text": "ünïcode ✓",
        "bytes": b"\x00\xffpayload\n",
        "empty_bytes": b"",
        "nested_tuple": (1, (2.0, ("x", (None, b"y"))), [3, (4,)]),
        "empty_tuple": (),
        "int_keys": {0: {"step": torch.tensor(3.0)}, 1: "b", -7: [1, 2]},
        "tuple_key": {(1, 2): "pair", "s": 1},
        "np_f32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "np_i64": np.array([-1, 2**40], dtype=np.int64),
        "np_bool": np.array([True, False]),
        "np_strided": np.arange(20, dtype=np.float64).reshape(4, 5)[:, ::2],
        "np_scalar_array": np.array(5.0),
        "np_read_only": np.frombuffer(b"\x01\x02\x03\x04", dtype=np.uint8),
        "dtype": torch.float16,
        "size": torch.Size([2, 3]),
        "list_of_tensors": [torch.ones(2), torch.zeros(2, dtype=torch.int16)],
    }


@pytest.mark.parametrize("name", list(_values()))
def test_value_round_trips_exactly(output_dir, name):
    value = _values()[name]
    model, _, _ = fresh()
    saver = Saver(model, output_dir=output_dir)
    saver.register_for_checkpointing("v", value)
    saver.save(1)

    saver2 = Saver(fresh()[0], output_dir=output_dir)
    saver2.register_for_checkpointing("v", None)
    saver2.load()
    got = saver2.get_extra_data("v")
    if isinstance(value, torch.Size):
        assert tuple(got) == tuple(value)
        return
    if isinstance(value, torch.Tensor):
        assert got.is_contiguous()
    assert_same(value, got, name)


def test_all_values_in_one_tree_round_trip(output_dir):
    values = {k: v for k, v in _values().items() if not isinstance(v, torch.Size)}
    saver = Saver(fresh()[0], output_dir=output_dir)
    saver.register_for_checkpointing("all", values)
    saver.save(1)
    saver2 = Saver(fresh()[0], output_dir=output_dir)
    saver2.register_for_checkpointing("all", None)
    saver2.load()
    assert_same(values, saver2.get_extra_data("all"), "all")


def test_an_unsupported_value_is_a_clear_error(output_dir):
    saver = Saver(fresh()[0], output_dir=output_dir)
    saver.register_for_checkpointing("bad", {"fn": object()})
    with pytest.raises(TypeError, match="cannot checkpoint a value of type object"):
        saver.save(1)
    assert Saver(fresh()[0], output_dir=output_dir).list_checkpoints() == []
    assert entries(output_dir) == []  # the failed save removed what it had started


def test_registration_errors(output_dir):
    saver = Saver(fresh()[0], output_dir=output_dir)
    saver.register_for_checkpointing("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        saver.register_for_checkpointing("a", 2)
    with pytest.raises(ValueError, match="non-empty string"):
        saver.register_for_checkpointing("", 2)
    with pytest.raises(TypeError, match="state_dict"):
        saver.register_io_state("data", [1, 2, 3])
    for bad in ({"max_keep": 0}, {"concurrency": 0}, {"concurrency": True}):
        with pytest.raises(ValueError):
            Saver(fresh()[0], output_dir=output_dir, **bad)


# --- parts and load configuration ------------------------------------------------------
def _full_saver(output_dir, model, sparse, dense, counter, data):
    saver = Saver(model, sparse, output_dir=output_dir)
    saver.register_for_checkpointing("dense_optimizer", dense)
    saver.register_for_checkpointing("counter", counter)
    saver.register_io_state("data", data)
    return saver


def _saved_run(output_dir):
    model, sparse, dense = trained()
    _full_saver(output_dir, model, sparse, dense, Counter(11), Counter(22)).save(3)
    return model, sparse, dense


def _loaded(output_dir, conf):
    model, sparse, dense = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    counter, data = Counter(0), Counter(0)
    saver = _full_saver(output_dir, model, sparse, dense, counter, data)
    saver.load_by_config(saver.storage.path("ckpt_3"), conf)
    return model, sparse, dense, counter, data, before


def _loaded_parts(saved, loaded) -> set[str]:
    """Which parts ended up with the saved values."""
    smodel, ssparse, sdense = saved
    model, sparse, dense, counter, data, _ = loaded
    parts = set()
    if torch.equal(model.emb.weight, smodel.emb.weight):
        parts.add("sparse")
    if torch.equal(model.mlp[0].weight, smodel.mlp[0].weight):
        parts.add("dense")
    saved_opt, opt = ssparse.state_dict()["state"], sparse.state_dict()["state"]
    if torch.equal(opt[0]["sum"], saved_opt[0]["sum"]):  # Adagrad has state from the start
        assert_same(saved_opt, opt)
        parts.add("sparse_opt")
    if counter.value == 11:
        assert dense.state  # the dense optimizer is an extra too
        parts.add("extra")
    if data.value == 22:
        parts.add("io_state")
    return parts


@pytest.mark.parametrize(
    "conf,expected",
    [
        ({}, set(PARTS)),
        ({"load": ["*"]}, set(PARTS)),
        ({"load": ["dense"]}, {"dense"}),
        ({"load": "sparse"}, {"sparse"}),
        ({"load": ["sparse", "sparse_opt"]}, {"sparse", "sparse_opt"}),
        ({"exclude": ["sparse_opt", "io_state"]}, {"sparse", "dense", "extra"}),
        ({"load": ["*"], "exclude": ["extra"]}, set(PARTS) - {"extra"}),
        ({"load": ["io_state", "extra"], "strict": False}, {"io_state", "extra"}),
        ({"exclude": "*"}, set()),
    ],
)
def test_load_by_config_loads_exactly_the_chosen_parts(tmp_path, conf, expected):
    out = str(tmp_path / "run")
    saved = _saved_run(out)
    loaded = _loaded(out, conf)
    assert _loaded_parts(saved, loaded) == expected
    model, before = loaded[0], loaded[5]
    for key, value in model.state_dict().items():  # parts not loaded are untouched
        part = "sparse" if key.startswith("emb.") else "dense"
        if part not in expected:
            assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(
    "conf,match",
    [
        ({"load": ["dense", "optimizer"]}, "unknown checkpoint part"),
        ({"exclude": ["Sparse"]}, "unknown checkpoint part"),
        ({"load": ["dense"], "excludes": ["sparse"]}, "unknown load config key"),
        ({"strict": "yes"}, "strict"),
        (["dense"], "must be a dict"),
    ],
)
def test_a_bad_load_config_is_an_error(tmp_path, conf, match):
    out = str(tmp_path / "run")
    _saved_run(out)
    model, sparse, dense = fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saver = Saver(model, sparse, output_dir=out)
    with pytest.raises(ValueError, match=match):
        saver.load_by_config(saver.storage.path("ckpt_3"), conf)
    with pytest.raises(ValueError, match=match):
        saver.load(load_conf=conf)
    assert_same(before, model.state_dict())  # nothing was loaded


class Wider(nn.Module):
    """ToyCTR plus a parameter the checkpoint does not have."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        inner = ToyCTR(num_embeddings=32, dim=4)
        self.emb, self.mlp = inner.emb, inner.mlp
        self.extra_bias = nn.Parameter(torch.full((2,), 9.0))


def test_strict_refuses_a_model_mismatch_and_non_strict_loads_what_matches(tmp_path):
    out = str(tmp_path / "run")
    saved_model = _saved_run(out)[0]
    model = Wider()
    saver = Saver(model, output_dir=out)
    with pytest.raises(CheckpointError, match="extra_bias"):
        saver.load()
    saver.load(load_conf={"load": ["sparse", "dense"], "strict": False})
    assert torch.equal(model.emb.weight, saved_model.emb.weight)
    assert torch.equal(model.mlp[2].weight, saved_model.mlp[2].weight)
    assert torch.equal(model.extra_bias, torch.full((2,), 9.0))


def test_a_shape_mismatch_names_the_tensor(tmp_path):
    out = str(tmp_path / "run")
    _saved_run(out)
    model = ToyCTR(num_embeddings=33, dim=4)
    with pytest.raises(ValueError, match="emb.weight"):
        Saver(model, output_dir=out).load(load_conf={"load": ["sparse"]})


def test_io_state_is_restored_per_rank(output_dir):
    model = fresh()[0]
    saver = Saver(model, output_dir=output_dir)
    data = Counter(17)
    saver.register_io_state("data", data)
    saver.save(2)
    data2 = Counter(0)
    saver2 = Saver(fresh()[0], output_dir=output_dir)
    saver2.register_io_state("data", data2)
    saver2.load()
    assert data2.value == 17
    assert "0" in manifest_of(saver.storage.path("ckpt_2"))["parts"]["io_state"]


def test_loading_without_a_checkpoint_is_an_error(output_dir):
    saver = Saver(fresh()[0], output_dir=output_dir)
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        saver.load()
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        saver.load(ckpt_id=4)


# --- chunked concurrent writes ---------------------------------------------------------
@pytest.mark.parametrize("concurrency", [1, 2, 4, 8])
def test_a_big_table_in_many_chunks_restores_bit_exactly(output_dir, concurrency):
    torch.manual_seed(concurrency)
    model = nn.EmbeddingBag(3000, 16, mode="sum", sparse=True)
    with torch.no_grad():
        model.weight[7] = float("nan")
        model.weight[8] = -0.0
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    model(torch.randint(0, 3000, (64, 3))).sum().backward()
    opt.step()
    saver = Saver(model, opt, output_dir=output_dir, concurrency=concurrency, chunk_bytes=4096)
    path = saver.save(1)

    manifest = manifest_of(path)
    chunks = manifest["tensors"]["sparse.weight"]["shards"][0]["chunks"]
    assert len(chunks) == 3000 * 16 * 4 // 4096 + 1  # 64 rows (4096 bytes) per chunk
    assert all(c["nbytes"] <= 4096 for c in chunks)
    data_files = [f for f in files_in(path) if f.endswith(".bin")]
    assert len(data_files) == concurrency  # one file per writer thread, no more
    assert set(data_files) == set(manifest["files"])

    torch.manual_seed(1234)
    model2 = nn.EmbeddingBag(3000, 16, mode="sum", sparse=True)
    opt2 = torch.optim.Adagrad(model2.parameters(), lr=0.1)
    Saver(model2, opt2, output_dir=output_dir, concurrency=concurrency).load()
    assert torch.equal(bits(model2.weight), bits(model.weight))
    assert torch.equal(bits(opt2.state[model2.weight]["sum"]), bits(opt.state[model.weight]["sum"]))


def test_few_chunks_never_make_more_files_than_chunks(tmp_path):
    model = nn.Linear(2, 1)
    path = Saver(model, output_dir=str(tmp_path), concurrency=8).save(1)
    data_files = [f for f in files_in(path) if f.endswith(".bin")]
    assert 1 <= len(data_files) <= 2  # two tensors: at most two files


# --- layout and commit -----------------------------------------------------------------
def test_layout_and_manifest(output_dir):
    model, sparse, _ = trained()
    saver = Saver(model, sparse, output_dir=output_dir, concurrency=2, chunk_bytes=64)
    path = saver.save(12, metrics={"auc": 0.75})
    assert entries(output_dir) == ["ckpt_12"]  # no staging leftover
    manifest = manifest_of(path)
    assert manifest["step"] == 12
    assert manifest["world_size"] == 1
    assert manifest["recframe_version"] == recframe.__version__
    assert manifest["metrics"] == {"auc": 0.75}
    on_disk = files_in(path)
    assert set(on_disk) == set(manifest["files"]) | {MANIFEST}
    for name, entry in manifest["files"].items():
        assert entry["size"] == on_disk[name] > 0
        assert entry["crc32"]
    # every chunk's checksum matches the bytes where the manifest says they are
    checked = 0
    for key, tensor in manifest["tensors"].items():
        for shard in tensor["shards"]:
            for chunk in shard["chunks"]:
                data = read(path.rstrip("/") + "/" + chunk["file"])
                piece = data[chunk["offset"] : chunk["offset"] + chunk["nbytes"]]
                assert len(piece) == chunk["nbytes"], key
                assert zlib.crc32(piece) == chunk["crc32"], key
                assert chunk["crc32"] in manifest["files"][chunk["file"]]["crc32"]
                checked += 1
    assert checked > len(manifest["tensors"])  # chunk_bytes=64 split the tables


def _make_leftovers(saver: Saver) -> list[str]:
    """Leftovers of interrupted saves, as a crash leaves them on this storage."""
    fs = saver.storage.fs
    strip = saver.storage.strip if hasattr(saver.storage, "strip") else (lambda p: p)
    made = []
    if saver.storage.atomic_rename:
        staging = saver.storage.path("ckpt_9.staging")
        fs.makedirs(strip(staging), exist_ok=True)
        fs.pipe_file(strip(saver.storage.join(staging, "data-r00000-000.bin")), b"partial")
        fs.pipe_file(strip(saver.storage.join(staging, MANIFEST + ".tmp")), b"{")
        made.append("ckpt_9.staging")
    no_manifest = saver.storage.path("ckpt_8")
    fs.makedirs(strip(no_manifest), exist_ok=True)
    fs.pipe_file(strip(saver.storage.join(no_manifest, "data-r00000-000.bin")), b"partial")
    made.append("ckpt_8")
    return made


def test_only_committed_checkpoints_are_listed_and_restored(output_dir):
    model, sparse, _ = trained()
    saver = Saver(model, sparse, output_dir=output_dir, max_keep=5)
    saver.save(2)
    saver.save(4)
    leftovers = _make_leftovers(saver)
    assert set(leftovers) < set(entries(output_dir))
    assert [c.step for c in saver.list_checkpoints()] == [2, 4]
    assert saver.latest_checkpoint().step == 4
    assert sorted(posixpath.basename(p) for p in saver.uncommitted()) == sorted(leftovers)

    model2, sparse2, _ = fresh()
    assert Saver(model2, sparse2, output_dir=output_dir).load()["step"] == 4
    assert torch.equal(model2.emb.weight, model.emb.weight)

    saver.clean_uncommitted()
    assert entries(output_dir) == ["ckpt_2", "ckpt_4"]
    assert saver.uncommitted() == []


def test_a_new_manager_removes_leftovers(output_dir):
    saver = Saver(fresh()[0], output_dir=output_dir, max_keep=5)
    saver.save(1)
    _make_leftovers(saver)
    CheckpointManager(Saver(fresh()[0], output_dir=output_dir, max_keep=5))
    assert entries(output_dir) == ["ckpt_1"]


def test_an_id_is_never_saved_twice(output_dir):
    model = fresh()[0]
    saver = Saver(model, output_dir=output_dir, max_keep=5)
    path = saver.save(3)
    manifest = read(path + "/" + MANIFEST)
    with torch.no_grad():
        model.emb.weight.fill_(1.0)
    with pytest.raises(CheckpointError, match=r"ckpt_3.*never saved twice"):
        saver.save(3)
    with pytest.raises(CheckpointError, match="never saved twice"):
        Saver(model, output_dir=output_dir).save("ckpt_3")
    assert read(path + "/" + MANIFEST) == manifest
    model2 = fresh(5)[0]
    Saver(model2, output_dir=output_dir).load()
    assert not torch.all(model2.emb.weight == 1.0)


def test_a_save_replaces_an_uncommitted_leftover_of_the_same_id(output_dir):
    model, sparse, _ = trained()
    saver = Saver(model, sparse, output_dir=output_dir, max_keep=5)
    saver.save(1)
    _make_leftovers(saver)
    for step in (8, 9):  # ckpt_8 without manifest; ckpt_9.staging (locally)
        saver.save(step)
        path = saver.storage.path(f"ckpt_{step}")
        assert set(files_in(path)) == set(manifest_of(path)["files"]) | {MANIFEST}
    assert entries(output_dir) == ["ckpt_1", "ckpt_8", "ckpt_9"]
    model2, sparse2, _ = fresh()
    Saver(model2, sparse2, output_dir=output_dir).load(ckpt_id=8)
    assert torch.equal(model2.emb.weight, model.emb.weight)


def test_saver_prune_keeps_the_newest_max_keep(output_dir):
    saver = Saver(fresh()[0], output_dir=output_dir, max_keep=2)
    for step in (1, 2, 3, 4):
        saver.save(step)
    assert [c.step for c in saver.list_checkpoints()] == [3, 4]
    assert entries(output_dir) == ["ckpt_3", "ckpt_4"]
