"""A checkpoint directory is untrusted input: nothing outside it is read, reads are
bounded, a failed restore changes nothing, and every manifest violation is a
`CheckpointCorruptError` that restore skips for the previous checkpoint."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import threading

import pytest
import torch
from conftest import ToyCTR, make_batches

from recframe.checkpoint import CheckpointCorruptError, CheckpointManager, Saver, StorageError
from recframe.checkpoint.manifest import FORMAT_VERSION, CheckpointVersionError, encode_manifest
from recframe.optim import dense_parameters, sparse_parameters
from recframe.optim.sparse import SPARSE_OPTIMIZERS


class Hook:
    """A registered object with state (as the trainer's hooks are)."""

    def __init__(self) -> None:
        self.calls = 0

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


class Run:
    def __init__(self, out, seed: int = 0, incremental: bool = False, rows: int = 64,
                 dense_opt: str = "adam") -> None:
        torch.manual_seed(seed)
        self.model = ToyCTR(num_embeddings=rows, dim=4)
        self.sparse = SPARSE_OPTIMIZERS["adagrad"](sparse_parameters(self.model), lr=0.1)
        opt = torch.optim.Adam if dense_opt == "adam" else torch.optim.Adagrad
        self.dense = opt(dense_parameters(self.model), lr=0.01)
        self.hook = Hook()
        self.saver = Saver(self.model, self.sparse, output_dir=str(out), max_keep=10,
                           chunk_bytes=256, concurrency=2)
        self.saver.register_for_checkpointing("dense_optimizer", self.dense)
        self.saver.register_for_checkpointing("hook", self.hook)
        self.manager = CheckpointManager(self.saver, save_interval=1, incremental=incremental,
                                         full_checkpoint_every=10)
        self.out = str(out)

    def train(self, steps, start: int = 1) -> None:
        for step, batch in enumerate(make_batches(len(steps), 8, seed=start), start=start):
            self.sparse.zero_grad()
            self.dense.zero_grad()
            self.model(batch).backward()
            self.sparse.step()
            self.dense.step()
            self.hook.calls += 1
            self.manager.step(step)

    def snapshot(self) -> dict:
        return copy.deepcopy({"model": self.model.state_dict(),
                              "sparse": self.sparse.state_dict(),
                              "dense": self.dense.state_dict(), "hook": self.hook.calls})

    def ckpt(self, step: int) -> str:
        return os.path.join(self.out, f"ckpt_{step}")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _manifest(ckpt: str) -> dict:
    with open(os.path.join(ckpt, "manifest.json")) as f:
        return json.load(f)


def _seal(ckpt: str, manifest: dict) -> None:
    """Write an edited manifest with a valid checksum (as a hostile author would)."""
    with open(os.path.join(ckpt, "manifest.json"), "wb") as f:
        f.write(encode_manifest(manifest))


def _rename_file(ckpt: str, old: str, new: str) -> None:
    manifest = _manifest(ckpt)
    manifest["files"][new] = manifest["files"].pop(old)
    for entry in manifest["tensors"].values():
        for shard in entry["shards"]:
            for chunk in shard["chunks"]:
                if chunk["file"] == old:
                    chunk["file"] = new
    _seal(ckpt, manifest)


def _first_data_file(ckpt: str) -> str:
    return sorted(n for n in os.listdir(ckpt) if n.endswith(".bin"))[0]


def _fresh(tmp_path, **kw) -> Run:
    """A second process's view: a new model (other weights) on the same output dir."""
    return Run(tmp_path / "run", seed=7, **kw)


@pytest.fixture
def run(tmp_path) -> Run:
    r = Run(tmp_path / "run")
    r.train([1, 2])
    return r


def _bounded(fn, seconds: float = 30):
    """Run ``fn``; fail (rather than hang the suite) when it does not return."""
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            result["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the load did not finish: an unbounded read"
    if "error" in result:
        raise result["error"]
    return result.get("value")


# --- 1. nothing outside the checkpoint is read -----------------------------------------
@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_a_manifest_naming_a_file_outside_is_refused(run, tmp_path, where):
    ckpt = run.ckpt(2)
    name = _first_data_file(ckpt)
    outside = tmp_path / "outside.bin"  # the same bytes: only the name is hostile
    shutil.copy(os.path.join(ckpt, name), outside)
    _rename_file(ckpt, name, "../../outside.bin" if where == "parent" else str(outside))
    fresh = _fresh(tmp_path)
    before = fresh.snapshot()
    with pytest.raises(CheckpointCorruptError, match="ckpt_2.*outside.bin"):
        fresh.saver.load(ckpt_id=2)
    assert _same(fresh.snapshot(), before)
    with pytest.raises(CheckpointCorruptError):
        fresh.saver.load(ckpt_path=ckpt)
    assert fresh.manager.restore() == 1  # falls back as for a bad shard


def test_a_data_file_symlinked_out_of_the_output_dir_is_refused(run, tmp_path):
    ckpt = run.ckpt(2)
    name = _first_data_file(ckpt)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(os.path.join(ckpt, name), elsewhere / name)
    os.symlink(elsewhere / name, os.path.join(ckpt, name))
    fresh = _fresh(tmp_path)
    before = fresh.snapshot()
    with pytest.raises(CheckpointCorruptError, match=f"ckpt_2.*{name}.*outside"):
        fresh.saver.load(ckpt_id=2)
    assert _same(fresh.snapshot(), before)
    # a link that stays inside the output dir (files shared between checkpoints) is fine
    shared = os.path.join(run.out, "shared")
    os.makedirs(shared)
    shutil.move(elsewhere / name, os.path.join(shared, name))
    os.remove(os.path.join(ckpt, name))
    os.symlink(os.path.join(shared, name), os.path.join(ckpt, name))
    fresh.saver.load(ckpt_id=2)
    assert _same(fresh.model.state_dict(), run.model.state_dict())


def test_a_symlink_to_dev_zero_or_a_fifo_is_refused_without_hanging(run, tmp_path):
    ckpt = run.ckpt(2)
    name = _first_data_file(ckpt)
    os.remove(os.path.join(ckpt, name))
    os.symlink("/dev/zero", os.path.join(ckpt, name))
    fresh = _fresh(tmp_path)
    with pytest.raises(CheckpointCorruptError, match=name):
        _bounded(lambda: fresh.saver.load(ckpt_id=2))
    os.remove(os.path.join(ckpt, name))
    os.mkfifo(os.path.join(ckpt, name))  # opening it for reading would block forever
    with pytest.raises(CheckpointCorruptError, match="not a regular file"):
        _bounded(lambda: fresh.saver.load(ckpt_id=2))


def test_a_checkpoint_id_cannot_walk_out_of_the_output_dir(run, tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint name"):
        run.saver.load(ckpt_id="../elsewhere")


# --- incremental chains ------------------------------------------------------------
@pytest.fixture
def chain(tmp_path) -> Run:
    r = Run(tmp_path / "run", incremental=True)
    r.train([1, 2, 3])
    assert _manifest(r.ckpt(3))["incremental"]["kind"] == "delta"
    return r


@pytest.mark.parametrize("link", ["../other/ckpt_1", "/abs/ckpt_1", "ckpt_1/../../x"])
def test_a_chain_link_outside_the_output_dir_is_refused(chain, tmp_path, link):
    manifest = _manifest(chain.ckpt(3))
    manifest["incremental"]["chain"][0] = link
    manifest["incremental"]["base"] = link
    _seal(chain.ckpt(3), manifest)
    fresh = _fresh(tmp_path, incremental=True)
    before = fresh.snapshot()
    with pytest.raises(CheckpointCorruptError, match="not a checkpoint of this output dir"):
        fresh.saver.load(ckpt_id=3)
    assert _same(fresh.snapshot(), before)
    assert fresh.manager.restore() == 2


def test_a_delta_read_is_bounded_by_the_declared_size(chain, tmp_path):
    """A small delta's data file is read up to the bytes its chunks need, never whole:
    a huge (sparse) file grown past them is not read to its end (today: MemoryError)."""
    ckpt = chain.ckpt(3)
    name = _first_data_file(ckpt)
    with open(os.path.join(ckpt, name), "r+b") as f:
        f.truncate(1 << 40)  # 1 TiB, no disk used
    fresh = _fresh(tmp_path, incremental=True)
    _bounded(lambda: fresh.saver.load(ckpt_id=3))  # the bytes it names are intact
    assert _same(fresh.snapshot(), chain.snapshot())


def test_a_delta_with_a_bad_chunk_restores_nothing(chain, tmp_path):
    ckpt = chain.ckpt(3)
    manifest = _manifest(ckpt)
    key = next(k for k in manifest["tensors"] if k.startswith("delta/") and k.endswith("values"))
    chunk = manifest["tensors"][key]["shards"][0]["chunks"][-1]
    path = os.path.join(ckpt, chunk["file"])
    with open(path, "r+b") as f:
        f.seek(chunk["offset"])
        byte = f.read(1)
        f.seek(chunk["offset"])
        f.write(bytes([byte[0] ^ 0xFF]))
    fresh = _fresh(tmp_path, incremental=True)
    before = fresh.snapshot()
    with pytest.raises(CheckpointCorruptError, match="checksum mismatch"):
        fresh.saver.load(ckpt_id=3)
    assert _same(fresh.snapshot(), before)  # the base's tables were not loaded either


# --- all or nothing --------------------------------------------------------------------
@pytest.mark.parametrize("victim", ["dense.mlp.2.bias", "extra.dense_optimizer.state"])
def test_a_crc_failure_leaves_model_optimizers_and_hooks_as_they_were(run, tmp_path, victim):
    """The corrupt chunk belongs to a part loaded after others (today the sparse table
    and the dense layers are already overwritten when it fails)."""
    ckpt = run.ckpt(2)
    manifest = _manifest(ckpt)
    key = next(k for k in manifest["tensors"] if k.startswith(victim))
    chunk = manifest["tensors"][key]["shards"][0]["chunks"][-1]
    with open(os.path.join(ckpt, chunk["file"]), "r+b") as f:
        f.seek(chunk["offset"] + chunk["nbytes"] - 1)
        byte = f.read(1)
        f.seek(chunk["offset"] + chunk["nbytes"] - 1)
        f.write(bytes([byte[0] ^ 0x01]))
    fresh = _fresh(tmp_path)
    fresh.hook.calls = 99
    before = fresh.snapshot()
    with pytest.raises(CheckpointCorruptError, match=f"checksum mismatch.*{key}"):
        fresh.saver.load(ckpt_id=2)
    assert _same(fresh.snapshot(), before)
    assert fresh.manager.restore() == 1
    assert fresh.hook.calls == 1


def test_a_good_restore_still_loads_everything(run, tmp_path):
    fresh = _fresh(tmp_path)
    fresh.saver.load(ckpt_id=2)
    assert _same(fresh.snapshot(), run.snapshot())


# --- 2. a bad manifest is a corrupt checkpoint -----------------------------------------
def _chunk0(m: dict) -> dict:
    return m["tensors"]["sparse.emb.weight"]["shards"][0]["chunks"][0]


def _deep(m: dict) -> None:
    node: dict = {"l": []}
    m["parts"]["extra"] = node
    for _ in range(100_000):
        node["l"].append({"l": []})
        node = node["l"][0]


MUTATIONS = {
    "negative shape": lambda m: m["tensors"]["sparse.emb.weight"].update(shape=[-64, 4]),
    "negative offset": lambda m: _chunk0(m).update(offset=-8),
    "offset past the file": lambda m: _chunk0(m).update(offset=1 << 40),
    "wrong type": lambda m: _chunk0(m).update(nbytes="256"),
    "missing crc": lambda m: _chunk0(m).pop("crc32"),
    "int where a list belongs": lambda m: m["tensors"]["sparse.emb.weight"].update(shape=64),
    "rows out of range": lambda m: _chunk0(m).update(rows=[0, 10_000]),
    "unknown dtype": lambda m: m["tensors"]["sparse.emb.weight"].update(dtype="object"),
    "unknown file": lambda m: _chunk0(m).update(file="data-other.bin"),
    "tensor not in the manifest": lambda m: m["parts"].update(dense={"t": "nope"}),
    "parts not a dict": lambda m: m.update(parts=[1, 2]),
    "malformed tree": lambda m: m["parts"].update(extra={"d": 5}),
    "list as a dict key": lambda m: m["parts"].update(extra={"d": [[[1], 2]]}),
    "world size zero": lambda m: m.update(world_size=0),
    "100k-deep JSON": _deep,
    "shards do not tile the shape": lambda m: m["tensors"]["sparse.emb.weight"].update(
        shape=[1 << 40, 4]),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_every_manifest_violation_is_corrupt_and_restore_falls_back(run, tmp_path, mutation,
                                                                    caplog):
    manifest = _manifest(run.ckpt(2))
    MUTATIONS[mutation](manifest)
    if mutation == "100k-deep JSON":  # json.dumps itself would recurse: write it by hand
        raw = json.dumps(dict(manifest, parts={}))[:-1] + ', "parts": {"extra": ' + \
            '{"l": [' * 100_000 + "]}" * 100_000 + "}}"
        with open(os.path.join(run.ckpt(2), "manifest.json"), "w") as f:
            f.write(raw)
    else:
        _seal(run.ckpt(2), manifest)
    fresh = _fresh(tmp_path)  # CheckpointManager.__init__ reads every manifest
    before = fresh.snapshot()
    with pytest.raises(CheckpointCorruptError, match="ckpt_2"):
        fresh.saver.load(ckpt_path=run.ckpt(2))
    assert _same(fresh.snapshot(), before)
    with caplog.at_level(logging.WARNING, logger="recframe.checkpoint"):
        assert fresh.manager.restore() == 1
    assert [c.step for c in fresh.manager.list()] == [1]


def test_an_edited_manifest_fails_its_own_checksum(run, tmp_path):
    manifest = _manifest(run.ckpt(2))
    manifest["metrics"] = {"auc": 0.99}  # not resealed
    with open(os.path.join(run.ckpt(2), "manifest.json"), "w") as f:
        json.dump(manifest, f)
    fresh = _fresh(tmp_path)
    with pytest.raises(CheckpointCorruptError, match="checksum"):
        fresh.saver.load(ckpt_id=2)
    assert fresh.manager.restore() == 1


def test_a_newer_format_version_is_refused_naming_both(run, tmp_path):
    manifest = _manifest(run.ckpt(2))
    manifest["format_version"] = FORMAT_VERSION + 7
    raw = encode_manifest(manifest).replace(
        f'"format_version": {FORMAT_VERSION}'.encode(),
        f'"format_version": {FORMAT_VERSION + 7}'.encode())
    with open(os.path.join(run.ckpt(2), "manifest.json"), "wb") as f:
        f.write(raw)
    with pytest.raises(CheckpointVersionError,
                       match=f"version {FORMAT_VERSION + 7}.*up to {FORMAT_VERSION}"):
        run.saver.load(ckpt_id=2)


def test_a_version_1_manifest_without_checksum_still_loads(run, tmp_path):
    manifest = _manifest(run.ckpt(2))
    manifest.pop("manifest_sha256")
    manifest["format_version"] = 1
    with open(os.path.join(run.ckpt(2), "manifest.json"), "w") as f:
        json.dump(manifest, f)
    fresh = _fresh(tmp_path)
    fresh.saver.load(ckpt_id=2)
    assert _same(fresh.snapshot(), run.snapshot())


def test_nan_metrics_are_written_as_strict_json(tmp_path):
    r = Run(tmp_path / "run")
    r.manager.metrics_provider = lambda: {"auc": float("nan"), "loss": float("inf"), "n": 3}
    r.train([1])
    raw = open(os.path.join(r.ckpt(1), "manifest.json")).read()

    def refuse(name):
        raise AssertionError(f"bare {name} in the manifest")

    on_disk = json.loads(raw, parse_constant=refuse)
    assert on_disk["metrics"] == {"auc": "nan", "loss": "inf", "n": 3}
    metrics = r.manager.list()[0].metrics
    assert metrics["loss"] == float("inf") and metrics["auc"] != metrics["auc"]


def test_optimizer_state_shapes_are_checked_like_model_shapes(tmp_path):
    """A table resized since the save: its optimizer state does not load (today it
    loads and the next step fails with IndexError)."""
    Run(tmp_path / "run", dense_opt="adagrad").train([1])
    bigger = Run(tmp_path / "run", rows=80, dense_opt="adagrad")
    before = bigger.snapshot()
    with pytest.raises(ValueError, match="sparse_opt.*shape"):
        bigger.saver.load(ckpt_id=1, load_conf={"exclude": ["sparse"]})
    assert _same(bigger.snapshot(), before)


def test_lazy_optimizer_state_shapes_are_checked_against_the_parameters(tmp_path):
    """Adam's state appears at its first step: a fresh Adam has none to compare with,
    so the saved moments are checked against the parameters."""
    small = Run(tmp_path / "run")
    small.train([1])
    torch.manual_seed(0)
    model = ToyCTR(num_embeddings=64, dim=4)
    model.mlp[0] = torch.nn.Linear(7, 16)  # a wider layer than the checkpoint's
    model.mlp[2] = torch.nn.Linear(16, 1)
    dense = torch.optim.Adam(dense_parameters(model), lr=0.01)
    saver = Saver(model, None, output_dir=small.out)
    saver.register_for_checkpointing("dense_optimizer", dense)
    saver.register_for_checkpointing("hook", Hook())
    with pytest.raises(ValueError, match="dense_optimizer.*shape"):
        saver.load(ckpt_id=1, load_conf={"load": ["extra"]})
    assert dense.state_dict()["state"] == {}


@pytest.mark.parametrize("kind", ["dangling", "loop"])
def test_a_dangling_or_looping_symlink_is_refused_and_restore_falls_back(run, tmp_path, kind):
    """An unreadable entry (I/O error, named) leaves everything as it was; restore goes
    back to the previous checkpoint, as for a corrupt one."""
    ckpt = run.ckpt(2)
    name = _first_data_file(ckpt)
    target = os.path.join(ckpt, name)
    os.remove(target)
    if kind == "dangling":
        os.symlink(os.path.join(ckpt, "gone.bin"), target)
    else:
        os.symlink(target, target)  # a link to itself: ELOOP
    fresh = _fresh(tmp_path)
    before = fresh.snapshot()
    with pytest.raises((CheckpointCorruptError, StorageError), match=name):
        fresh.saver.load(ckpt_id=2)
    assert _same(fresh.snapshot(), before)
    assert fresh.manager.restore() == 1  # falls back as for a bad shard
