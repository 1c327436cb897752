"""The fast local restore path stays all or nothing: chunks are checked from a memory
map of their file, read once straight into the live tensors, and a file changed
between the check and the copy (or while the check is under way) is refused with
nothing live written."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import ToyCTR, make_batches
from torch import nn

from recframe.checkpoint import CheckpointCorruptError, Saver, restore
from recframe.checkpoint import format as fmt
from recframe.optim import dense_parameters, sparse_parameters
from recframe.optim.sparse import SPARSE_OPTIMIZERS


class Run:
    def __init__(self, out, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = ToyCTR(num_embeddings=64, dim=4)
        self.sparse = SPARSE_OPTIMIZERS["adagrad"](sparse_parameters(self.model), lr=0.1)
        self.dense = torch.optim.Adam(dense_parameters(self.model), lr=0.01)
        self.saver = Saver(self.model, self.sparse, output_dir=str(out), chunk_bytes=256,
                           concurrency=2)
        self.saver.register_for_checkpointing("dense_optimizer", self.dense)

    def train(self, steps: int) -> None:
        for batch in make_batches(steps, 8, seed=1):
            self.sparse.zero_grad()
            self.dense.zero_grad()
            self.model(batch).backward()
            self.sparse.step()
            self.dense.step()

    def snapshot(self) -> dict:
        return copy.deepcopy({"model": self.model.state_dict(),
                              "sparse": self.sparse.state_dict(),
                              "dense": self.dense.state_dict()})


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def saved(tmp_path) -> Run:
    run = Run(tmp_path / "run", seed=0)
    run.train(2)
    run.saver.save(1)
    return run


def _chunk_of(ckpt: str, prefix: str) -> dict:
    with open(os.path.join(ckpt, "manifest.json")) as f:
        manifest = json.load(f)
    key = next(k for k in manifest["tensors"] if k.startswith(prefix))
    return manifest["tensors"][key]["shards"][0]["chunks"][-1]


def _rewrite_in_place(path: str, offset: int) -> None:
    """Same size, other bytes, same inode (what an in-place writer does)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _replace(path: str, offset: int) -> None:
    """Same size, other bytes, a new inode under the same name."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[offset] ^= 0xFF
    with open(path + ".new", "wb") as f:
        f.write(data)
    os.replace(path + ".new", path)


@pytest.mark.parametrize("mapping", [True, False, None], ids=["mapped", "read", "default"])
@pytest.mark.parametrize("change", [_rewrite_in_place, _replace], ids=["in_place", "replaced"])
def test_a_file_changed_between_verify_and_apply_is_refused_and_nothing_changes(
    saved, tmp_path, monkeypatch, change, mapping
):
    """The changed chunk is a dense layer's, applied after the sparse table: re-reading
    and re-checking at apply (the old way) fails only after the table was overwritten."""
    monkeypatch.setattr(fmt, "VERIFY_BY_MAPPING", mapping)
    monkeypatch.setattr(fmt, "VERIFY_MAP_MIN_BYTES", 0)  # these tiny chunks too
    ckpt = os.path.join(saved.saver.output_dir, "ckpt_1")
    chunk = _chunk_of(ckpt, "dense.mlp.2.weight")
    verify = restore.Transaction.verify

    def verify_then_change(self, keep):
        verify(self, keep)
        change(os.path.join(ckpt, chunk["file"]), chunk["offset"])

    monkeypatch.setattr(restore.Transaction, "verify", verify_then_change)
    fresh = Run(tmp_path / "run", seed=7)
    before = fresh.snapshot()
    with pytest.raises(CheckpointCorruptError,
                       match=f"{chunk['file']} changed after its checksums were verified"):
        fresh.saver.load(ckpt_id=1)
    assert _same(fresh.snapshot(), before)


@pytest.mark.parametrize("mapping", [False, True, None], ids=["read", "mapped", "default"])
def test_each_live_chunk_is_checked_once_and_read_once(tmp_path, monkeypatch, mapping):
    """Locally, a chunk bound for a live tensor costs one CRC32 pass (over small slices
    read into a per-thread buffer, or over a memory map of the file) and one read
    straight into the tensor (the old path read and checked every chunk twice and
    copied it once more)."""
    monkeypatch.setattr(fmt, "VERIFY_BY_MAPPING", mapping)
    monkeypatch.setattr(fmt, "VERIFY_MAP_MIN_BYTES", 0)  # these tiny chunks too
    monkeypatch.setattr(fmt, "VERIFY_SLICE_BYTES", 256)  # several slices per chunk
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(300, 8), nn.Linear(8, 8))
    saver = Saver(model, output_dir=str(tmp_path / "run"), chunk_bytes=1024, concurrency=2)
    saver.save(1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    nbytes = sum(v.numel() * v.element_size() for v in expected.values())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    monkeypatch.setattr(fmt, "RACY_WINDOW_NS", 0)
    counted = {"read": 0, "crc": 0, "mapped": 0}
    read_into, crc32, mapped = fmt.read_into, fmt.crc32, fmt._mapped_crc32

    def count_read(f, offset, out, path):
        if path.endswith(".bin"):  # not the manifest
            counted["read"] += out.nbytes
        return read_into(f, offset, out, path)

    def count_crc(view, value=0):
        counted["crc"] += view.nbytes
        return crc32(view, value)

    def count_mapped(fd, offset, n):
        counted["mapped"] += n
        return mapped(fd, offset, n)

    monkeypatch.setattr(fmt, "read_into", count_read)
    monkeypatch.setattr(fmt, "crc32", count_crc)
    monkeypatch.setattr(fmt, "_mapped_crc32", count_mapped)
    saver.load(ckpt_id=1)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    if mapping is not False:  # files just written are cached: checked from the map
        assert counted == {"read": nbytes, "crc": nbytes, "mapped": nbytes}
    else:
        assert counted == {"read": 2 * nbytes, "crc": nbytes, "mapped": 0}


def test_a_region_that_is_not_one_block_goes_through_checked_scratch(tmp_path, monkeypatch):
    """A non-contiguous live tensor is filled through scratch (checked again there), and
    still refused when its file changed after verify."""
    monkeypatch.setattr(fmt, "RACY_WINDOW_NS", 0)

    def model() -> nn.Module:
        m = nn.Linear(4, 64)
        m.weight = nn.Parameter(torch.randn(4, 64).t())  # [64, 4], not contiguous
        return m

    torch.manual_seed(0)
    saved = model()
    Saver(saved, output_dir=str(tmp_path / "run"), chunk_bytes=256).save(1)
    torch.manual_seed(1)
    live = model()
    assert not live.weight.is_contiguous()
    Saver(live, output_dir=str(tmp_path / "run"), chunk_bytes=256).load(ckpt_id=1)
    assert torch.equal(live.weight, saved.weight) and torch.equal(live.bias, saved.bias)

    torch.manual_seed(2)
    other = model()
    before = copy.deepcopy(other.state_dict())
    ckpt = os.path.join(str(tmp_path / "run"), "ckpt_1")
    chunk = _chunk_of(ckpt, "dense.weight")
    verify = restore.Transaction.verify

    def verify_then_change(self, keep):
        verify(self, keep)
        _rewrite_in_place(os.path.join(ckpt, chunk["file"]), chunk["offset"])

    monkeypatch.setattr(restore.Transaction, "verify", verify_then_change)
    with pytest.raises(CheckpointCorruptError, match="changed after its checksums"):
        Saver(other, output_dir=str(tmp_path / "run"), chunk_bytes=256).load(ckpt_id=1)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())


class _Clock:
    """`format.time` whose ``sleep`` returns at once, after running ``on_sleep``."""

    def __init__(self, on_sleep) -> None:
        import time

        self._time, self.on_sleep, self.slept = time, on_sleep, []

    def time_ns(self) -> int:
        return self._time.time_ns()

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.on_sleep()


def test_a_file_changed_within_a_clock_tick_is_stat_ed_again_before_it_counts(
    saved, tmp_path, monkeypatch
):
    """Right after a change, a file's stamps may not move on the next write (same clock
    tick): verify waits the window out (here: 10 s, so the files just written are in
    it) and records the identity only once it held."""
    monkeypatch.setattr(fmt, "RACY_WINDOW_NS", 10 * 10**9)
    clock = _Clock(lambda: None)
    monkeypatch.setattr(fmt, "time", clock)
    fresh = Run(tmp_path / "run", seed=7)
    fresh.saver.load(ckpt_id=1)
    assert clock.slept and 0 < max(clock.slept) <= 10
    assert _same(fresh.snapshot()["model"], saved.snapshot()["model"])


def test_a_file_that_keeps_changing_while_verified_is_refused(saved, tmp_path, monkeypatch):
    ckpt = os.path.join(saved.saver.output_dir, "ckpt_1")
    name = _chunk_of(ckpt, "sparse.emb.weight")["file"]
    path = os.path.join(ckpt, name)
    stamps = iter(range(10**9, 2 * 10**9, 1000))

    def write() -> None:  # a writer at work on the file: its stamps move every time
        stamp = next(stamps)
        os.utime(path, ns=(stamp, stamp))

    monkeypatch.setattr(fmt, "RACY_WINDOW_NS", 10 * 10**9)
    clock = _Clock(write)
    monkeypatch.setattr(fmt, "time", clock)
    fresh = Run(tmp_path / "run", seed=7)
    before = fresh.snapshot()
    with pytest.raises(CheckpointCorruptError, match=f"{name} kept changing"):
        fresh.saver.load(ckpt_id=1)
    assert _same(fresh.snapshot(), before)


def test_a_file_changed_while_read_into_a_live_tensor_fails_loudly(saved, tmp_path,
                                                                    monkeypatch):
    """A writer racing the copy itself cannot be kept out without a second checksum
    pass; the file's identity is compared again after each read, so it is not silent."""
    monkeypatch.setattr(fmt, "RACY_WINDOW_NS", 0)
    ckpt = os.path.join(saved.saver.output_dir, "ckpt_1")
    read_into = fmt.read_into
    changed: list[str] = []
    applying: list[bool] = []
    apply = restore.Transaction.apply

    def apply_marked(self):
        applying.append(True)
        return apply(self)

    def read_then_change(f, offset, out, path):
        read_into(f, offset, out, path)
        if applying and not changed and path.endswith(".bin"):
            changed.append(path)
            _rewrite_in_place(os.path.join(ckpt, os.path.basename(path)), 0)

    fresh = Run(tmp_path / "run", seed=7)
    fresh.saver.concurrency = 1  # the first read of the copy is followed by the change
    monkeypatch.setattr(restore.Transaction, "apply", apply_marked)
    monkeypatch.setattr(fmt, "read_into", read_then_change)
    with pytest.raises(CheckpointCorruptError, match="while it was read into"):
        fresh.saver.load(ckpt_id=1, load_conf={"load": ["sparse", "dense"]})


def test_a_filesystem_that_cannot_map_files_is_read_instead(saved, tmp_path, monkeypatch):
    """mmap fails with ENODEV on some filesystems: the chunk is read and checked."""
    monkeypatch.setattr(fmt, "RACY_WINDOW_NS", 0)
    monkeypatch.setattr(fmt, "VERIFY_MAP_MIN_BYTES", 0)  # these tiny chunks too
    monkeypatch.setattr(fmt, "VERIFY_BY_MAPPING", True)

    def no_mapping(fd, offset, nbytes):
        raise OSError(19, "No such device")

    monkeypatch.setattr(fmt, "_mapped_crc32", no_mapping)
    fresh = Run(tmp_path / "run", seed=7)
    fresh.saver.load(ckpt_id=1)
    assert _same(fresh.snapshot(), saved.snapshot())
    ckpt = os.path.join(saved.saver.output_dir, "ckpt_1")
    chunk = _chunk_of(ckpt, "sparse.emb.weight")
    _rewrite_in_place(os.path.join(ckpt, chunk["file"]), chunk["offset"])
    other = Run(tmp_path / "run", seed=9)
    before = other.snapshot()
    with pytest.raises(CheckpointCorruptError, match="checksum mismatch"):
        other.saver.load(ckpt_id=1)
    assert _same(other.snapshot(), before)


def test_a_restore_opens_each_data_file_once_and_checks_the_manifest_once(tmp_path,
                                                                          monkeypatch):
    """A restore used to open (and resolve, and check the place of) a data file once per
    chunk and phase, and to parse and validate the manifest twice (choosing the newest
    checkpoint, then loading it): each file is now opened once for both phases, and the
    manifest's checks run once for its text."""
    from recframe.checkpoint import manifest as mf

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(300, 8), nn.Linear(8, 8))
    saver = Saver(model, output_dir=str(tmp_path / "run"), chunk_bytes=512, concurrency=2)
    saver.save(1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ckpt = os.path.join(saver.output_dir, "ckpt_1")
    with open(os.path.join(ckpt, "manifest.json")) as f:
        manifest = json.load(f)
    chunks = sum(len(sh["chunks"]) for e in manifest["tensors"].values() for sh in e["shards"])
    assert chunks > 2 * len(manifest["files"])  # several chunks per file
    monkeypatch.setattr(fmt, "RACY_WINDOW_NS", 0)
    mf._valid.clear()
    opened: list[str] = []
    checked: list[str] = []
    open_member, parse_checked = fmt.open_member, mf._parse_checked

    def count_open(storage, directory, name, *a, **k):
        opened.append(name)
        return open_member(storage, directory, name, *a, **k)

    def count_checks(raw, where):
        checked.append(where)
        return parse_checked(raw, where)

    monkeypatch.setattr(fmt, "open_member", count_open)
    monkeypatch.setattr(mf, "_parse_checked", count_checks)
    Saver(model, output_dir=str(tmp_path / "run"), chunk_bytes=512, concurrency=2).load()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    data = sorted(n for n in opened if n.endswith(".bin"))
    assert data == sorted(manifest["files"])
    assert len(checked) == 1


def test_a_manifest_changed_after_it_was_checked_is_checked_again(tmp_path):
    """The validation cache is keyed by the manifest's text: an edit made after a
    successful load (here: a chunk's extent, with the manifest's checksum fixed up) is
    not let through by the earlier check."""
    from recframe.checkpoint import manifest as mf

    model = nn.Linear(4, 4)
    saver = Saver(model, output_dir=str(tmp_path / "run"))
    saver.save(1)
    saver.load()
    path = os.path.join(saver.output_dir, "ckpt_1", "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    entry = manifest["tensors"]["dense.weight"]["shards"][0]["chunks"][0]
    entry["offset"] = -8
    manifest[mf.CHECKSUM_KEY] = mf.hashlib.sha256(mf._canonical(manifest)).hexdigest()
    with open(path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(CheckpointCorruptError, match="not a valid manifest"):
        Saver(model, output_dir=str(tmp_path / "run")).load(ckpt_id=1)


@pytest.mark.parametrize("how", ["slices", "not_cached"])
def test_a_chunk_checked_by_reading_slices_finds_a_flipped_byte(saved, tmp_path,
                                                                 monkeypatch, how):
    """The slice-by-slice check carries the CRC32 across slices (a chunk spanning many
    slices restores intact) and finds a byte flipped in a middle slice; with mapping on,
    a chunk not in the page cache (``_cached``) takes the same path."""
    monkeypatch.setattr(fmt, "RACY_WINDOW_NS", 0)
    monkeypatch.setattr(fmt, "VERIFY_SLICE_BYTES", 64)
    if how == "not_cached":
        monkeypatch.setattr(fmt, "VERIFY_BY_MAPPING", True)
        monkeypatch.setattr(fmt, "_cached", lambda fd, offset, nbytes: False)
    fresh = Run(tmp_path / "run", seed=7)
    fresh.saver.load(ckpt_id=1)
    assert _same(fresh.snapshot(), saved.snapshot())
    ckpt = os.path.join(saved.saver.output_dir, "ckpt_1")
    chunk = _chunk_of(ckpt, "sparse.emb.weight")
    assert chunk["nbytes"] > 3 * 64
    _rewrite_in_place(os.path.join(ckpt, chunk["file"]), chunk["offset"] + 2 * 64 + 5)
    other = Run(tmp_path / "run", seed=9)
    before = other.snapshot()
    with pytest.raises(CheckpointCorruptError, match="checksum mismatch"):
        other.saver.load(ckpt_id=1)
    assert _same(other.snapshot(), before)


def test_cached_tells_cached_from_evicted_pages(tmp_path):
    """`format._cached` (``preadv2(RWF_NOWAIT)`` probes) on a real file: cached after a
    read, not after the pages were written back and dropped (where the kernel drops
    them on request and the filesystem answers RWF_NOWAIT)."""
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(1 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 1 << 20, 0)
        if not fmt._cached(fd, 0, 1 << 20):
            pytest.skip("this filesystem cannot tell (no RWF_NOWAIT)")
        assert fmt._cached(fd, 4096, 8192)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert not fmt._cached(fd, 0, 1 << 20)
    finally:
        os.close(fd)


@pytest.mark.parametrize("mapping", [None, True], ids=["default", "mapped"])
def test_a_truncated_file_is_refused_before_it_is_mapped(saved, tmp_path, monkeypatch,
                                                          mapping):
    """A data file shorter than its chunks need is a named corrupt checkpoint (fstat
    before any mapping: touching a mapped page past the end of a file is SIGBUS), and
    nothing live changes."""
    monkeypatch.setattr(fmt, "RACY_WINDOW_NS", 0)
    monkeypatch.setattr(fmt, "VERIFY_BY_MAPPING", mapping)
    monkeypatch.setattr(fmt, "VERIFY_MAP_MIN_BYTES", 0)  # these tiny chunks too
    ckpt = os.path.join(saved.saver.output_dir, "ckpt_1")
    chunk = _chunk_of(ckpt, "sparse.emb.weight")
    os.truncate(os.path.join(ckpt, chunk["file"]), chunk["offset"] + chunk["nbytes"] // 2)
    mapped: list[int] = []
    monkeypatch.setattr(fmt, "_mapped_crc32",
                        lambda fd, offset, n: mapped.append(n) or 0)  # never reached
    fresh = Run(tmp_path / "run", seed=7)
    before = fresh.snapshot()
    with pytest.raises(CheckpointCorruptError, match=f"{chunk['file']} is truncated"):
        fresh.saver.load(ckpt_id=1)
    assert _same(fresh.snapshot(), before)
    assert mapped == []


@pytest.mark.parametrize("when", ["after_identity", "before_mapping"])
def test_a_file_truncated_during_the_mapped_check_is_refused_not_sigbus(
    saved, tmp_path, monkeypatch, when
):
    """A file truncated between the recorded identity and the check of its chunks (the
    file's identity no longer matches), or right before a chunk is mapped (``mmap``
    refuses a range past the end of the file: the chunk is read, and the short read
    reported): a `CheckpointCorruptError`, never a SIGBUS, and nothing live changes."""
    monkeypatch.setattr(fmt, "RACY_WINDOW_NS", 0)
    monkeypatch.setattr(fmt, "VERIFY_BY_MAPPING", True)
    monkeypatch.setattr(fmt, "VERIFY_MAP_MIN_BYTES", 0)  # these tiny chunks too
    ckpt = os.path.join(saved.saver.output_dir, "ckpt_1")
    chunk = _chunk_of(ckpt, "sparse.emb.weight")
    path = os.path.join(ckpt, chunk["file"])
    size = chunk["offset"] + chunk["nbytes"] // 2
    if when == "after_identity":
        settle = fmt.TensorReader._settle

        def settle_then_truncate(self, ends):
            settle(self, ends)
            os.truncate(path, size)

        monkeypatch.setattr(fmt.TensorReader, "_settle", settle_then_truncate)
        expected = f"{chunk['file']} changed after its checksums were verified"
    else:
        mapped_crc32 = fmt._mapped_crc32

        def truncate_then_probe(fd, offset, nbytes):
            os.truncate(path, size)
            return True  # as if cached: the chunk is mapped

        def refused(fd, offset, nbytes):
            try:
                return mapped_crc32(fd, offset, nbytes)
            except ValueError as e:
                mapping_refused.append(str(e))
                raise

        mapping_refused: list[str] = []
        monkeypatch.setattr(fmt, "_cached", truncate_then_probe)
        monkeypatch.setattr(fmt, "_mapped_crc32", refused)
        # no identity recorded: the path `recframe ckpt inspect --verify` takes
        monkeypatch.setattr(fmt.TensorReader, "_settle", lambda self, ends: None)
        expected = f"{chunk['file']} is truncated"
    fresh = Run(tmp_path / "run", seed=7)
    before = fresh.snapshot()
    with pytest.raises(CheckpointCorruptError, match=expected):
        fresh.saver.load(ckpt_id=1)
    assert _same(fresh.snapshot(), before)
    if when == "before_mapping":
        assert mapping_refused  # mmap itself refused the range past the end


def test_an_object_store_never_maps(tmp_path, monkeypatch):
    """On an object store (``memory://``) chunks are read and checked, never mapped,
    whatever `VERIFY_BY_MAPPING` says; the restore is intact, and a flipped byte is
    refused with nothing live changed."""
    import uuid

    import fsspec

    monkeypatch.setattr(fmt, "VERIFY_BY_MAPPING", True)
    url = f"memory://restore-speed-{uuid.uuid4().hex}"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(300, 8), nn.Linear(8, 8))
    saver = Saver(model, output_dir=url, chunk_bytes=1024, concurrency=2)
    saver.save(1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    probed: list[int] = []
    monkeypatch.setattr(fmt, "_cached", lambda fd, offset, n: probed.append(n) or True)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    fs, root = fsspec.core.url_to_fs(url)
    try:
        Saver(model, output_dir=url, chunk_bytes=1024, concurrency=2).load()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
        assert probed == []
        with fs.open(f"{root}/ckpt_1/manifest.json") as f:
            manifest = json.load(f)
        key = next(k for k in manifest["tensors"] if k.endswith("0.weight"))
        entry = manifest["tensors"][key]["shards"][0]["chunks"][0]
        path = f"{root}/ckpt_1/{entry['file']}"
        data = bytearray(fs.cat_file(path))
        data[entry["offset"]] ^= 0xFF
        fs.pipe_file(path, bytes(data))
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        with pytest.raises(CheckpointCorruptError, match="checksum mismatch"):
            Saver(model, output_dir=url, chunk_bytes=1024, concurrency=2).load(ckpt_id=1)
        assert all(not p.any() for p in model.parameters())
        assert probed == []
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


def test_reader_threads_are_kept_between_restores_and_a_forked_child_gets_its_own(
    saved, tmp_path, monkeypatch
):
    """A restore used to start a fresh pool of reader threads (~1 ms a thread on a busy
    machine): the second restore now starts none. A forked child (the async writer
    forks) does not inherit the parent's threads, so it gets a pool of its own."""
    import threading

    monkeypatch.setattr(fmt, "RACY_WINDOW_NS", 0)
    fresh = Run(tmp_path / "run", seed=7)
    fresh.saver.load(ckpt_id=1)
    started: list[str] = []
    start = threading.Thread.start

    def count_start(self):
        started.append(self.name)
        return start(self)

    monkeypatch.setattr(threading.Thread, "start", count_start)
    fresh.saver.load(ckpt_id=1)
    assert _same(fresh.snapshot(), saved.snapshot())
    assert started == []
    monkeypatch.undo()
    parent = fmt.reader_pool(2)
    pid = os.fork()
    if pid == 0:  # the child: its own pool, which runs tasks
        import signal

        signal.alarm(20)
        ok = False
        try:
            pool = fmt.reader_pool(2)
            ok = pool is not parent and pool.submit(lambda: 42).result(timeout=10) == 42
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert fmt.reader_pool(2) is parent


def test_the_parts_of_one_checkpoint_are_verified_and_copied_in_one_hand_off(
    saved, tmp_path, monkeypatch
):
    """The model's and the optimizers' tensors of one checkpoint are verified in one
    call to the threads and copied in one (each part used to be its own, each waiting
    for its slowest chunk), the optimizers' ``load_state_dict`` still after the copies."""
    monkeypatch.setattr(fmt, "RACY_WINDOW_NS", 0)
    calls: list[tuple[str, int]] = []
    verify, apply = fmt.TensorReader.verify, fmt.TensorReader.apply

    def count_verify(self, jobs, keep):
        calls.append(("verify", len(jobs)))
        return verify(self, jobs, keep)

    def count_apply(self, jobs):
        calls.append(("apply", len(jobs)))
        return apply(self, jobs)

    monkeypatch.setattr(fmt.TensorReader, "verify", count_verify)
    monkeypatch.setattr(fmt.TensorReader, "apply", count_apply)
    fresh = Run(tmp_path / "run", seed=7)
    fresh.saver.load(ckpt_id=1)
    assert _same(fresh.snapshot(), saved.snapshot())
    assert [c[0] for c in calls] == ["verify", "apply"]
    assert calls[0][1] == calls[1][1] > 2


def test_run_threads_hands_each_thread_one_task_and_reports_the_first_failure():
    """`format._run_threads` runs every index once on the caller's thread plus the
    pool's (one task per thread, not a future per item), returns results in order, and
    after a failure starts no new item, waits for the running ones and raises the
    failure of the lowest index that ran."""
    import threading
    import time

    pool = fmt.reader_pool(3)
    seen: list[int] = []
    threads: set[int] = set()

    def work(i: int) -> int:
        seen.append(i)
        threads.add(threading.get_ident())
        time.sleep(0.001)
        return i * i

    submitted: list[int] = []
    submit = pool.submit

    def count_submit(fn, *a, **k):
        submitted.append(1)
        return submit(fn, *a, **k)

    pool.submit = count_submit  # type: ignore[method-assign]
    try:
        assert fmt._run_threads(work, 40, 3, pool) == [i * i for i in range(40)]
    finally:
        del pool.submit
    assert sorted(seen) == list(range(40))
    assert len(submitted) == 2 and threading.get_ident() in threads
    running: list[int] = []
    done: list[int] = []

    def fail(i: int) -> None:
        running.append(i)
        if i in (5, 7):
            raise ValueError(f"item {i}")
        time.sleep(0.002)
        done.append(i)

    with pytest.raises(ValueError, match="item [57]"):
        fmt._run_threads(fail, 200, 3, pool)
    assert len(running) < 200  # stopped handing out items
    assert sorted(done) == sorted(i for i in running if i not in (5, 7))  # none left running


def test_a_small_chunk_is_read_not_mapped(tmp_path, monkeypatch):
    """Chunks under `VERIFY_MAP_MIN_BYTES` are checked by reading (a mapping's fixed
    cost is more than such a read), big ones from the mapping; both restore intact."""
    monkeypatch.setattr(fmt, "RACY_WINDOW_NS", 0)
    monkeypatch.setattr(fmt, "VERIFY_BY_MAPPING", True)
    monkeypatch.setattr(fmt, "VERIFY_MAP_MIN_BYTES", 4096)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(1024, 8), nn.Linear(8, 8))  # 32 KiB and tiny
    saver = Saver(model, output_dir=str(tmp_path / "run"), chunk_bytes=8192)
    saver.save(1)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    mapped: list[int] = []
    mapped_crc32 = fmt._mapped_crc32
    monkeypatch.setattr(fmt, "_mapped_crc32",
                        lambda fd, offset, n: mapped.append(n) or mapped_crc32(fd, offset, n))
    saver.load(ckpt_id=1)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert mapped == [8192] * 4  # the table's chunks; the Linear's (<= 256 bytes) read
