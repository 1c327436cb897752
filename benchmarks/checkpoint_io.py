"""Checkpoint I/O: recframe's `Saver` against torch.save, torch.distributed.checkpoint
(DCP) and the disk's own ceiling, all durable (fsync before a save counts as done).

State (``--scale 1``: ~1.6 GB): 12 embedding tables of 2^20 x 16 float32, their 12
Adagrad ``sum`` tensors of the same size, and a small MLP; ``--scale 0.1`` gives a
tenth of the rows for a quick run.

Per round, in an order rotated every round (so slow drift hits every variant alike),
each variant saves, restores with the files in the page cache ("warm": just written),
then restores again after its files were evicted from the page cache with
``posix_fadvise(DONTNEED)`` ("cold"; the fraction still resident is measured with
``mincore`` and reported), and its files are deleted before the next variant runs:

* ``recframe cN``: ``Saver(concurrency=N).save`` (chunked files + CRC32 + manifest,
  staging dir + rename) / ``Saver.load`` into the live model and optimizer;
* ``torch.save``: one file + fsync / ``torch.load(weights_only=True)`` then
  ``model.load_state_dict`` and ``optimizer.load_state_dict``;
* ``dcp cN``: ``dcp.save`` with ``FileSystemWriter(thread_count=N, sync_files=True)``
  in a gloo world of 1 / ``dcp.load`` in place;
* ``raw cN``: N threads each write their share of the tensors' bytes to a file and
  fsync it / read them back with ``readinto`` into the live tensors: what the disk can
  do, the ceiling for any format.

Also per round: ``CheckpointManager(async_save=True).save()`` (how long the training
loop is blocked, and the whole save) next to the synchronous save; and the peak extra
resident memory of every save (``/proc/self/statm`` sampled every 2 ms) as a fraction
of the state. Once per run: the components that bound async blocking (first touch of
fresh memory, a copy into reused buffers, ``fork()``, huge pages) and CRC32 speed.

    .venv/bin/python benchmarks/checkpoint_io.py                 # ~6 min on 2 cores
    .venv/bin/python benchmarks/checkpoint_io.py --scale 0.05 --repeats 1 --concurrency 1,4
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import ctypes
import ctypes.util
import gc
import io
import logging
import mmap
import os
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from typing import Any, Optional

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as common  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            "checkpoint_io.json")
GOALS = {
    "save_vs_torch_save": 1.5,
    "save_vs_dcp": 1.1,
    "save_vs_raw": 0.9,
    "restore_vs_torch_load": 1.5,
    "async_blocked_vs_sync_save": 0.1,  # at most
    "sync_save_peak_extra_memory": 0.10,  # at most, fraction of the state
}
RAW_SLICE = 64 << 20


# --- arguments -------------------------------------------------------------------
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0,
                   help="fraction of the 2^20 rows per table (1.0: ~1.6 GB of state)")
    p.add_argument("--tables", type=int, default=12)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--concurrency", default="1,2,4,8",
                   help="writer/reader threads of recframe, DCP and raw, comma-separated")
    p.add_argument("--default_concurrency", type=int, default=4,
                   help="recframe's concurrency for the async and headline comparisons")
    p.add_argument("--no_cold", action="store_true", help="skip the evicted-cache restores")
    p.add_argument("--no_dcp", action="store_true", help="skip torch.distributed.checkpoint")
    p.add_argument("--profile", action="store_true",
                   help="also cProfile one recframe save and load and print the top entries")
    p.add_argument("--dir", default=None,
                   help="where checkpoints are written (a temporary folder inside it; "
                   "default: the system temp dir; must be a real disk, not tmpfs)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--json", default=DEFAULT_JSON, help="where to write the JSON report")
    p.add_argument("--versions", default=None,
                   help="instead of the variants: restore / raw read of recframe checkouts "
                   "side by side, NAME=PATH,... (e.g. before=/work/wt-pre12,now=.), one "
                   "process per checkout importing its recframe, their rounds interleaved "
                   "(--repeats rounds warm, then as many cold; c = --default_concurrency)")
    p.add_argument("--version_worker", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    ns.concurrency = sorted({int(x) for x in str(ns.concurrency).split(",") if x.strip()})
    if not ns.concurrency or min(ns.concurrency) < 1 or ns.default_concurrency < 1:
        p.error("--concurrency and --default_concurrency need integers >= 1")
    # the async and headline comparisons need recframe (and the others) at this one
    ns.concurrency = sorted(set(ns.concurrency) | {ns.default_concurrency})
    if ns.scale <= 0 or ns.repeats < 1 or ns.tables < 1 or ns.dim < 1:
        p.error("--scale, --repeats, --tables and --dim must be positive")
    return ns


# --- the state -------------------------------------------------------------------
class BenchModel(nn.Module):
    def __init__(self, tables: int, rows: int, dim: int) -> None:
        super().__init__()
        self.tables = nn.ModuleList(
            nn.EmbeddingBag(rows, dim, mode="sum", sparse=True) for _ in range(tables)
        )
        self.mlp = nn.Sequential(nn.Linear(tables * dim + 13, 512), nn.ReLU(),
                                 nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 1))


def build_state(cfg: argparse.Namespace) -> tuple[BenchModel, torch.optim.Optimizer]:
    rows = max(1, int((1 << 20) * cfg.scale))
    torch.manual_seed(0)
    model = BenchModel(cfg.tables, rows, cfg.dim)
    with torch.no_grad():
        for table in model.tables:
            table.weight.normal_()
    opt = torch.optim.Adagrad(model.tables.parameters(), lr=0.05)  # state made eagerly
    with torch.no_grad():
        for state in opt.state.values():
            state["sum"].uniform_()
    return model, opt


def all_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = [t.detach() for t in model.state_dict().values()]
    for state in opt.state.values():
        out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for t in all_tensors(model, opt))


def fingerprint(model: nn.Module, opt: torch.optim.Optimizer) -> list[float]:
    """A cheap check that a restore brought the values back."""
    return [float(t.reshape(-1)[:4096].double().sum()) for t in all_tensors(model, opt)]


def byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# --- memory and page cache -------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """Samples this process's resident memory every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.base)


def files_under(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return [os.path.join(d, n) for d, _, names in os.walk(path) for n in names]


def evict(path: str) -> None:
    """Drop the (clean, fsynced) pages of every file under ``path`` from the cache."""
    for name in files_under(path):
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def resident_fraction(path: str) -> Optional[float]:
    """Fraction of the pages of the files under ``path`` that are in the page cache."""
    total = resident = 0
    try:
        for name in files_under(path):
            size = os.path.getsize(name)
            if size == 0:
                continue
            pages = (size + _PAGE - 1) // _PAGE
            with open(name, "rb") as f:
                mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
                try:
                    anchor = ctypes.c_char.from_buffer(mm)
                    vec = (ctypes.c_ubyte * pages)()
                    rc = _libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)),
                                       ctypes.c_size_t(size), vec)
                    del anchor
                    if rc != 0:
                        return None
                    resident += sum(b & 1 for b in vec)
                    total += pages
                finally:
                    mm.close()
    except (OSError, ValueError, AttributeError):
        return None
    return resident / total if total else None


# --- the variants ----------------------------------------------------------------
class Variant:
    """One method at one concurrency: save(path), restore(path), on the live state."""

    def __init__(self, name: str, family: str, concurrency: Optional[int],
                 save: Callable[[str], None], restore: Callable[[str], None]) -> None:
        self.name, self.family, self.concurrency = name, family, concurrency
        self.save, self.restore = save, restore


def recframe_variant(model, opt, c: int, step_ids) -> Variant:
    from recframe.checkpoint import Saver

    def save(path: str) -> None:
        Saver(model, opt, output_dir=path, concurrency=c).save(next(step_ids), prune=False)

    def restore(path: str) -> None:
        saver = Saver(model, opt, output_dir=path, concurrency=c)
        saver.load()

    return Variant(f"recframe c{c}", "recframe", c, save, restore)


def torch_variant(model, opt) -> Variant:
    def save(path: str) -> None:
        os.makedirs(path, exist_ok=True)
        target = os.path.join(path, "state.pt")
        with open(target, "wb") as f:
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(path)

    def restore(path: str) -> None:
        sd = torch.load(os.path.join(path, "state.pt"), weights_only=True)
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])

    return Variant("torch.save", "torch", 1, save, restore)


def dcp_variant(model, opt, c: int) -> Variant:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    def save(path: str) -> None:
        state = {"model": model.state_dict(), "optim": opt.state_dict()}
        dcp.save(state, storage_writer=FileSystemWriter(path, thread_count=c, sync_files=True))
        _fsync_dir(path)

    def restore(path: str) -> None:
        state = {"model": model.state_dict(), "optim": opt.state_dict()}
        dcp.load(state, storage_reader=FileSystemReader(path))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])

    return Variant(f"dcp c{c}", "dcp", c, save, restore)


def _balanced(tensors: list[torch.Tensor], n: int) -> list[list[torch.Tensor]]:
    groups: list[list[torch.Tensor]] = [[] for _ in range(n)]
    loads = [0] * n
    for t in sorted(tensors, key=lambda t: -t.numel() * t.element_size()):
        i = loads.index(min(loads))
        groups[i].append(t)
        loads[i] += t.numel() * t.element_size()
    return groups


def _parallel(fn: Callable[[int], None], n: int) -> None:
    if n == 1:
        fn(0)
        return
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fn(i)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def raw_variant(model, opt, c: int) -> Variant:
    groups = _balanced(all_tensors(model, opt), c)

    def save(path: str) -> None:
        os.makedirs(path, exist_ok=True)

        def write(i: int) -> None:
            with open(os.path.join(path, f"raw-{i}.bin"), "wb", buffering=0) as f:
                for t in groups[i]:
                    view = byte_view(t)
                    for start in range(0, view.nbytes, RAW_SLICE):
                        part = view[start:start + RAW_SLICE]
                        done = 0
                        while done < part.nbytes:
                            done += f.write(part[done:])
                os.fsync(f.fileno())

        _parallel(write, c)
        _fsync_dir(path)

    def restore(path: str) -> None:
        def read(i: int) -> None:
            with open(os.path.join(path, f"raw-{i}.bin"), "rb", buffering=0) as f:
                for t in groups[i]:
                    view = byte_view(t)
                    got = 0
                    while got < view.nbytes:
                        n = f.readinto(view[got:got + RAW_SLICE])
                        if not n:
                            raise OSError(f"raw-{i}.bin is short")
                        got += n

        _parallel(read, c)

    return Variant(f"raw c{c}", "raw", c, save, restore)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- rounds ----------------------------------------------------------------------
def timed(fn: Callable[[], Any], memory: bool = False) -> dict[str, Any]:
    gc.collect()
    sampler = PeakRSS() if memory else contextlib.nullcontext()
    start = common.LoadSample.now()
    with sampler:
        fn()
    end = common.LoadSample.now()
    load = common.Load.between(start, end)
    out = {"seconds": end.wall - start.wall, "cpu_seconds": end.own_cpu - start.own_cpu,
           "own_cores": load.own_cores,
           "others_cores": load.others_cores, "busy_neighbour": load.busy_neighbour,
           "minor_faults": load.minor_faults}
    if memory:
        out["peak_extra_bytes"] = sampler.extra  # type: ignore[union-attr]
    return out


def run_rounds(cfg, variants: list[Variant], model, opt, nbytes: int, workdir: str,
               check: list[float]) -> list[dict[str, Any]]:
    from recframe.checkpoint import CheckpointManager, Saver

    records: list[dict[str, Any]] = []
    async_dir = os.path.join(workdir, "async")
    async_ids = iter(range(10**6, 10**7))
    for r in range(cfg.repeats):
        quiet = common.wait_for_quiet(max_wait=20)
        shift = r % len(variants)
        order = variants[shift:] + variants[:shift]
        print(f"round {r + 1}/{cfg.repeats} (other processes: "
              f"{_fmt(quiet.others_cores)} cores)", flush=True)
        for position, v in enumerate(order):
            path = os.path.join(workdir, v.name.replace(" ", "_").replace(".", "_"))
            shutil.rmtree(path, ignore_errors=True)
            rec: dict[str, Any] = {"round": r, "position": position, "variant": v.name,
                                   "family": v.family, "concurrency": v.concurrency}
            rec["save"] = timed(lambda v=v, path=path: v.save(path), memory=True)
            rec["files"] = len(files_under(path))
            rec["resident_before_warm"] = resident_fraction(path)
            rec["restore_warm"] = timed(lambda v=v, path=path: v.restore(path), memory=True)
            _check(model, opt, check, v.name)
            if not cfg.no_cold:
                evict(path)
                rec["resident_before_cold"] = resident_fraction(path)
                rec["restore_cold"] = timed(lambda v=v, path=path: v.restore(path))
                _check(model, opt, check, v.name)
            shutil.rmtree(path, ignore_errors=True)
            records.append(rec)
            print(f"  {v.name:13s} save {nbytes / rec['save']['seconds'] / 1e9:5.2f} GB/s"
                  f"  restore warm {nbytes / rec['restore_warm']['seconds'] / 1e9:5.2f}"
                  + (f"  cold {nbytes / rec['restore_cold']['seconds'] / 1e9:5.2f}"
                     if "restore_cold" in rec else "")
                  + f"  peak extra {rec['save']['peak_extra_bytes'] / nbytes:5.1%}", flush=True)
        # async: blocked time vs the whole save; the sync save of this round beside it
        shutil.rmtree(async_dir, ignore_errors=True)
        saver = Saver(model, opt, output_dir=async_dir, concurrency=cfg.default_concurrency)
        manager = CheckpointManager(saver, async_save=True, max_keep=1)
        gc.collect()
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            manager.save(next(async_ids))
            t1 = time.perf_counter()
            manager.wait()
            t2 = time.perf_counter()
        manager.close()
        shutil.rmtree(async_dir, ignore_errors=True)
        records.append({"round": r, "variant": "async", "family": "async",
                        "concurrency": cfg.default_concurrency, "blocked_seconds": t1 - t0,
                        "total_seconds": t2 - t0, "peak_extra_bytes": mem.extra})
        print(f"  async         blocked {t1 - t0:5.2f} s, total {t2 - t0:5.2f} s, "
              f"peak extra {mem.extra / nbytes:5.1%}", flush=True)
    return records


def _check(model, opt, expected: list[float], name: str) -> None:
    got = fingerprint(model, opt)
    if got != expected:
        raise RuntimeError(f"{name}: the restored state differs from the saved one")


def _fmt(x: Optional[float]) -> str:
    return "?" if x is None else f"{x:.2f}"


# --- components (once per run) ---------------------------------------------------
def components(cfg, model, opt, nbytes: int) -> dict[str, Any]:
    """What bounds an async save's blocking time and a save's CPU work."""
    from recframe.checkpoint import Saver
    from recframe.checkpoint.format import snapshot_state

    out: dict[str, Any] = {}
    tensors = all_tensors(model, opt)
    state = Saver(model, opt, output_dir=tempfile.gettempdir()).collect_state()
    gc.collect()
    t0 = time.perf_counter()
    snap = snapshot_state(state)
    out["snapshot_fresh_memory_s"] = time.perf_counter() - t0  # today's async path
    bufs = [t.clone() for t in tensors]  # reused buffers, already touched
    del snap
    gc.collect()
    t0 = time.perf_counter()
    for dst, src in zip(bufs, tensors):
        dst.copy_(src)
    out["copy_into_reused_buffers_s"] = time.perf_counter() - t0
    del bufs
    gc.collect()
    # fork(): the parent is blocked only while the page tables are copied
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child: nothing to do
        os._exit(0)
    out["fork_s"] = time.perf_counter() - t0
    os.waitpid(pid, 0)
    # first touch of fresh memory, with and without transparent huge pages (torch reads
    # THP_MEM_ALLOC_ENABLE when it starts: measured in subprocesses)
    code = (f"import time, torch; n = {nbytes} // 4; x = torch.ones(n); "
            "t = time.perf_counter(); y = x.clone(); print(time.perf_counter() - t)")
    for label, extra in (("clone_fresh_subprocess_s", {}),
                         ("clone_fresh_thp_subprocess_s", {"THP_MEM_ALLOC_ENABLE": "1"})):
        env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), **extra)
        try:
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                  text=True, env=env, timeout=300)
            out[label] = float(proc.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, ValueError, IndexError):
            out[label] = None
    # CRC32 over the whole state: 1 thread, and threads (zlib releases the GIL)
    views = [byte_view(t) for t in tensors]
    t0 = time.perf_counter()
    for v in views:
        for s in range(0, v.nbytes, RAW_SLICE):
            zlib.crc32(v[s:s + RAW_SLICE])
    out["zlib_crc32_1thread_gbps"] = nbytes / (time.perf_counter() - t0) / 1e9
    groups = _balanced(tensors, cfg.default_concurrency)
    t0 = time.perf_counter()
    _parallel(lambda i: [zlib.crc32(byte_view(t)) for t in groups[i]], len(groups))
    out[f"zlib_crc32_{cfg.default_concurrency}threads_gbps"] = (
        nbytes / (time.perf_counter() - t0) / 1e9)
    return out


def verify_bound(cfg, model, opt, nbytes: int, workdir: str) -> dict[str, Any]:
    """What verify-before-apply costs by itself (issue 12: bytes are checksum-verified
    before they reach a live tensor): interleaved rounds of the raw read into the live
    tensors (the ceiling), recframe's verify pass alone (every chunk's CRC32 as a
    restore's first phase checks it: `inspect.verify`) and a whole recframe restore,
    c = ``--default_concurrency``; the verify pass and the restore both by default
    (cached chunks checked from a memory map) and with `format.VERIFY_BY_MAPPING` =
    False ("_read": read in slices). Warm: files in the page cache; cold (unless
    ``--no_cold``, fewer rounds): each step after evicting them. A restore that verifies
    every byte before copying it needs at least raw + verify, so raw / (raw + verify)
    bounds its ratio to the raw read ("bound")."""
    from recframe.checkpoint import Saver, inspect
    from recframe.checkpoint import format as ckpt_format
    from recframe.checkpoint.storage import Storage

    c = cfg.default_concurrency
    base = os.path.join(workdir, "bound")
    shutil.rmtree(base, ignore_errors=True)
    rf, raw = recframe_variant(model, opt, c, iter([1])), raw_variant(model, opt, c)
    rf.save(os.path.join(base, "rf"))
    raw.save(os.path.join(base, "raw"))
    saver = Saver(model, opt, output_dir=os.path.join(base, "rf"))
    ckpt = saver.latest_checkpoint()
    storage = Storage(ckpt.path)
    default = ckpt_format.VERIFY_BY_MAPPING

    def mapping(value: Any, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            ckpt_format.VERIFY_BY_MAPPING = value
            try:
                fn()
            finally:
                ckpt_format.VERIFY_BY_MAPPING = default
        return run

    def verify() -> None:
        problems = inspect.verify(storage, storage.root, ckpt.manifest, c)
        if problems:
            raise RuntimeError(f"verify pass: {problems[:3]}")

    def restore() -> None:
        rf.restore(os.path.join(base, "rf"))

    steps = {"raw": lambda: raw.restore(os.path.join(base, "raw")), "verify": verify,
             "restore": restore, "verify_read": mapping(False, verify),
             "restore_read": mapping(False, restore)}
    out: dict[str, Any] = {"concurrency": c}
    phases = [("warm", steps, max(5, cfg.repeats))]
    if not cfg.no_cold:
        phases.append(("cold", {k: steps[k] for k in ("raw", "verify", "restore")},
                       max(3, cfg.repeats // 2)))
    for phase, chosen, rounds in phases:
        wall: dict[str, list[float]] = {k: [] for k in chosen}
        cpu: dict[str, list[float]] = {k: [] for k in chosen}
        for r in range(rounds):
            names = list(chosen)[r % len(chosen):] + list(chosen)[:r % len(chosen)]
            for name in names:
                if phase == "cold":
                    evict(base)
                c0, t0 = time.process_time(), time.perf_counter()
                chosen[name]()
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
        med = {k: sorted(v)[len(v) // 2] for k, v in wall.items()}
        med_cpu = {k: sorted(v)[len(v) // 2] for k, v in cpu.items()}
        out.update({f"{k}_{phase}_ms": med[k] * 1e3 for k in chosen})
        out.update({f"{k}_{phase}_cpu_ms": med_cpu[k] * 1e3 for k in chosen})
        out.update({f"{k}_{phase}_gbps": nbytes / med[k] / 1e9 for k in chosen})
        out[f"bound_{phase}"] = med["raw"] / (med["raw"] + med["verify"])
        out[f"bound_{phase}_cpu"] = med_cpu["raw"] / (med_cpu["raw"] + med_cpu["verify"])
        for k in chosen:
            if k.startswith("restore"):
                per_round = sorted(a / b for a, b in zip(wall["raw"], wall[k]))
                per_round_cpu = sorted(a / b for a, b in zip(cpu["raw"], cpu[k]))
                out[f"{k}_{phase}_vs_raw"] = per_round[len(per_round) // 2]
                out[f"{k}_{phase}_vs_raw_cpu"] = per_round_cpu[len(per_round_cpu) // 2]
    shutil.rmtree(base, ignore_errors=True)
    return out


def profile(cfg, model, opt, workdir: str) -> str:
    from recframe.checkpoint import Saver

    path = os.path.join(workdir, "profile")
    shutil.rmtree(path, ignore_errors=True)
    buf = io.StringIO()
    for label, fn in (
        ("save", lambda: Saver(model, opt, output_dir=path,
                               concurrency=cfg.default_concurrency).save(1, prune=False)),
        ("load", lambda: Saver(model, opt, output_dir=path,
                               concurrency=cfg.default_concurrency).load()),
    ):
        prof = cProfile.Profile()
        prof.enable()
        fn()
        prof.disable()
        buf.write(f"\n--- cProfile: recframe {label} c{cfg.default_concurrency} "
                  "(main thread; writer threads' time shows as waits) ---\n")
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(18)
    shutil.rmtree(path, ignore_errors=True)
    return buf.getvalue()


# --- summary ---------------------------------------------------------------------
def summarize(cfg, records: list[dict[str, Any]], nbytes: int) -> dict[str, Any]:
    rows = [r for r in records if r["variant"] != "async"]
    names = list(dict.fromkeys(r["variant"] for r in rows))
    per: dict[str, Any] = {}
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        entry: dict[str, Any] = {"family": mine[0]["family"],
                                 "concurrency": mine[0]["concurrency"],
                                 "files": mine[0]["files"]}
        for phase in ("save", "restore_warm", "restore_cold"):
            if phase in mine[0]:
                entry[phase + "_gbps"] = common.summarize(
                    [nbytes / r[phase]["seconds"] / 1e9 for r in mine])
        entry["save_peak_extra_fraction"] = common.summarize(
            [r["save"]["peak_extra_bytes"] / nbytes for r in mine])
        entry["restore_peak_extra_fraction"] = common.summarize(
            [r["restore_warm"]["peak_extra_bytes"] / nbytes for r in mine])
        entry["resident_before_warm"] = common.summarize(
            [r["resident_before_warm"] for r in mine if r["resident_before_warm"] is not None])
        if not cfg.no_cold:
            entry["resident_before_cold"] = common.summarize(
                [r["resident_before_cold"] for r in mine
                 if r.get("resident_before_cold") is not None])
        entry["busy_neighbour_rounds"] = sum(
            1 for r in mine if r["save"]["busy_neighbour"]
            or r["restore_warm"]["busy_neighbour"])
        per[name] = entry

    def ratio(num: str, den: str, phase: str, what: str = "seconds"
              ) -> Optional[dict[str, Any]]:
        by_round: dict[int, dict[str, float]] = {}
        for r in rows:
            if r["variant"] in (num, den) and phase in r and r[phase].get(what):
                by_round.setdefault(r["round"], {})[r["variant"]] = r[phase][what]
        vals = [d[den] / d[num] for d in by_round.values() if num in d and den in d]
        return common.summarize(vals) if vals else None

    ratios: dict[str, Any] = {}
    for c in cfg.concurrency:
        rf = f"recframe c{c}"
        ratios[f"save c{c} vs torch.save"] = ratio(rf, "torch.save", "save")
        if not cfg.no_dcp:
            ratios[f"save c{c} vs dcp c{c}"] = ratio(rf, f"dcp c{c}", "save")
        ratios[f"save c{c} vs raw c{c}"] = ratio(rf, f"raw c{c}", "save")
        for phase in ("restore_warm", "restore_cold"):
            if phase == "restore_cold" and cfg.no_cold:
                continue
            ratios[f"{phase} c{c} vs torch.load"] = ratio(rf, "torch.save", phase)
            if not cfg.no_dcp:
                ratios[f"{phase} c{c} vs dcp c{c}"] = ratio(rf, f"dcp c{c}", phase)
            ratios[f"{phase} c{c} vs raw c{c}"] = ratio(rf, f"raw c{c}", phase)
            # CPU seconds: steadier than wall time while other processes load the cores
            ratios[f"{phase} c{c} vs raw c{c} (cpu)"] = ratio(rf, f"raw c{c}", phase,
                                                                "cpu_seconds")

    sync_name = f"recframe c{cfg.default_concurrency}"
    sync = {r["round"]: r["save"]["seconds"] for r in rows if r["variant"] == sync_name}
    asyncs = [r for r in records if r["variant"] == "async"]
    async_summary = {
        "blocked_s": common.summarize([r["blocked_seconds"] for r in asyncs]),
        "total_s": common.summarize([r["total_seconds"] for r in asyncs]),
        "blocked_vs_sync_save": common.summarize(
            [r["blocked_seconds"] / sync[r["round"]] for r in asyncs if r["round"] in sync]),
        "peak_extra_fraction": common.summarize(
            [r["peak_extra_bytes"] / nbytes for r in asyncs]),
    }
    return {"per_variant": per, "ratios": ratios, "async": async_summary}


def goal_rows(cfg, summary: dict[str, Any]) -> list[list[Any]]:
    c = cfg.default_concurrency
    ratios = summary["ratios"]
    per = summary["per_variant"]
    best = max((k for k in per if per[k]["family"] == "recframe"),
               key=lambda k: per[k]["save_gbps"]["median"])
    bc = per[best]["concurrency"]

    def med(key: str) -> Optional[float]:
        entry = ratios.get(key)
        return entry["median"] if entry else None

    rows = [
        [f"durable save c{c} / torch.save", med(f"save c{c} vs torch.save"), ">= 1.5"],
        [f"durable save best (c{bc}) / torch.save", med(f"save c{bc} vs torch.save"), ">= 1.5"],
        [f"durable save c{c} / dcp c{c}", med(f"save c{c} vs dcp c{c}"), ">= 1.1"],
        [f"durable save c{bc} / dcp c{bc}", med(f"save c{bc} vs dcp c{bc}"), ">= 1.1"],
        [f"durable save c{c} / raw c{c}", med(f"save c{c} vs raw c{c}"), ">= 0.9"],
        [f"durable save c{bc} / raw c{bc}", med(f"save c{bc} vs raw c{bc}"), ">= 0.9"],
        [f"restore warm c{c} / torch.load", med(f"restore_warm c{c} vs torch.load"), ">= 1.5"],
    ]
    if not cfg.no_cold:
        rows.append([f"restore cold c{c} / torch.load",
                     med(f"restore_cold c{c} vs torch.load"), ">= 1.5"])
    rows += [
        [f"async blocked / sync save c{c}",
         summary["async"]["blocked_vs_sync_save"]["median"], "<= 0.1"],
        [f"peak extra memory, sync save c{c}",
         per[f"recframe c{c}"]["save_peak_extra_fraction"]["median"], "<= 0.10"],
    ]
    for row in rows:
        value, target = row[1], row[2]
        if value is None:
            row.append("n/a")
            continue
        bound = float(target.split()[1])
        ok = value >= bound if target.startswith(">=") else value <= bound
        row.append("PASS" if ok else "MISS")
    return rows


def _cell(entry: Optional[dict[str, Any]]) -> str:
    if not entry or entry.get("median") is None:
        return "-"
    if entry["n"] == 1:
        return f"{entry['median']:.2f}"
    return f"{entry['median']:.2f} ({entry['min']:.2f}-{entry['max']:.2f})"


# --- main ------------------------------------------------------------------------
# --- versions side by side ----------------------------------------------------------
def version_worker(cfg: argparse.Namespace) -> int:
    """One checkout's side of `compare_versions`: saves once (recframe and raw), then
    per line on stdin ("warm" or "cold") times a raw read and a recframe restore, in
    alternating order, and answers one JSON line of (wall, cpu) seconds."""
    import json

    torch.set_num_threads(cfg.threads)
    model, opt = build_state(cfg)
    c = cfg.default_concurrency
    workdir = tempfile.mkdtemp(prefix="recframe-ckpt-versions-", dir=cfg.dir)
    try:
        rf, raw = recframe_variant(model, opt, c, iter([1])), raw_variant(model, opt, c)
        steps = {"raw": (raw, os.path.join(workdir, "raw")),
                 "restore": (rf, os.path.join(workdir, "rf"))}
        for v, path in steps.values():
            v.save(path)
        print("ready", flush=True)
        for n, line in enumerate(sys.stdin):
            phase = line.strip()
            if phase not in ("warm", "cold"):
                break
            out: dict[str, Any] = {}
            for name in (["raw", "restore"] if n % 2 == 0 else ["restore", "raw"]):
                v, path = steps[name]
                if phase == "cold":
                    evict(path)
                else:  # warm: the files in the page cache, whatever ran before
                    v.restore(path)
                c0, t0 = time.process_time(), time.perf_counter()
                v.restore(path)
                out[name] = [time.perf_counter() - t0, time.process_time() - c0]
            print(json.dumps(out), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def compare_versions(cfg: argparse.Namespace) -> int:
    """Restore / raw read of several recframe checkouts on this machine at once: one
    worker process per checkout (``PYTHONPATH`` = the checkout, this script's state and
    variants), each timing its own raw read and restore; the checkouts' rounds are
    interleaved (rotated each round), so drift in the machine's load hits all alike.
    Prints medians (min-max) of the per-round ratios and writes them to ``--json``."""
    import json

    versions = dict(item.split("=", 1) for item in cfg.versions.split(",") if item)
    argv = [sys.executable, os.path.abspath(__file__), "--scale", str(cfg.scale),
            "--tables", str(cfg.tables), "--dim", str(cfg.dim), "--threads",
            str(cfg.threads), "--default_concurrency", str(cfg.default_concurrency)]
    argv += ["--dir", cfg.dir] if cfg.dir else []
    procs = {}
    for name, root in versions.items():
        env = dict(os.environ, PYTHONPATH=os.path.abspath(root))
        procs[name] = subprocess.Popen(argv + ["--version_worker", name], env=env,
                                       cwd=os.path.abspath(root), stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {n: {} for n in versions}
    try:
        for name, proc in procs.items():
            if proc.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                raise RuntimeError(f"the worker of {name} ({versions[name]}) failed")
        names = list(versions)
        for phase in ("warm",) if cfg.no_cold else ("warm", "cold"):
            for r in range(cfg.repeats):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    proc = procs[name]
                    proc.stdin.write(phase + "\n")  # type: ignore[union-attr]
                    proc.stdin.flush()  # type: ignore[union-attr]
                    answer = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
                    results[name].setdefault(phase, []).append(answer)
    finally:
        for proc in procs.values():
            with contextlib.suppress(OSError):
                proc.stdin.close()  # type: ignore[union-attr]
            proc.wait()
    rows, summary = [], {}
    for name, phases in results.items():
        for phase, rounds_ in phases.items():
            wall = common.summarize([r["raw"][0] / r["restore"][0] for r in rounds_])
            cpu = common.summarize([r["raw"][1] / r["restore"][1] for r in rounds_])
            summary[f"{name} {phase}"] = {"wall": wall, "cpu": cpu, "rounds": rounds_}
            rows.append([name, phase, _cell(wall), _cell(cpu)])
    print(f"restore / raw read, c{cfg.default_concurrency}, medians (min-max) of per-round "
          "ratios (>1: recframe faster):")
    print(common.format_table(["version", "", "wall", "cpu seconds"], rows))
    os.makedirs(os.path.dirname(os.path.abspath(cfg.json)) or ".", exist_ok=True)
    with open(cfg.json, "w") as f:
        json.dump({"versions": versions, "scale": cfg.scale, "results": summary}, f, indent=1)
    print(f"wrote {cfg.json}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    cfg = parse_args(argv)
    if cfg.version_worker:
        return version_worker(cfg)
    if cfg.versions:
        return compare_versions(cfg)
    torch.set_num_threads(cfg.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    import torch.distributed as dist

    if not cfg.no_dcp and not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1)
    workdir = tempfile.mkdtemp(prefix="recframe-ckpt-io-", dir=cfg.dir)
    try:
        t0 = time.perf_counter()
        model, opt = build_state(cfg)
        nbytes = state_bytes(model, opt)
        n_tensors = len(all_tensors(model, opt))
        print(f"state: {nbytes / 1e9:.3f} GB ({nbytes / 2**30:.3f} GiB) in {n_tensors} "
              f"tensors, built in {time.perf_counter() - t0:.1f} s; files in {workdir}",
              flush=True)
        check = fingerprint(model, opt)
        step_ids = iter(range(1, 10**6))
        variants: list[Variant] = [torch_variant(model, opt)]
        for c in cfg.concurrency:
            variants.append(recframe_variant(model, opt, c, step_ids))
            if not cfg.no_dcp:
                variants.append(dcp_variant(model, opt, c))
            variants.append(raw_variant(model, opt, c))
        records = run_rounds(cfg, variants, model, opt, nbytes, workdir, check)
        comp = components(cfg, model, opt, nbytes)
        bound = verify_bound(cfg, model, opt, nbytes, workdir)
        prof = profile(cfg, model, opt, workdir) if cfg.profile else None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if dist.is_initialized():
            dist.destroy_process_group()

    summary = summarize(cfg, records, nbytes)
    per = summary["per_variant"]
    headers = ["method", "files", "save GB/s", "restore warm GB/s"]
    headers += [] if cfg.no_cold else ["restore cold GB/s"]
    headers += ["save peak extra mem", "page cache before warm / cold"]
    table = []
    for name, e in per.items():
        row = [name, e["files"], _cell(e["save_gbps"]), _cell(e["restore_warm_gbps"])]
        if not cfg.no_cold:
            row.append(_cell(e.get("restore_cold_gbps")))
        res_w = e["resident_before_warm"]["median"]
        res_c = e.get("resident_before_cold", {}).get("median")
        row += [f"{e['save_peak_extra_fraction']['median']:.1%}",
                f"{_pct(res_w)} / {_pct(res_c)}"]
        table.append(row)
    print()
    print(f"state {nbytes / 1e9:.2f} GB, {cfg.repeats} interleaved rounds, medians "
          "(min-max); GB/s = 1e9 bytes/s; saves are durable (fsync)")
    print(common.format_table(headers, table))
    a = summary["async"]
    print(f"\nasync save (recframe c{cfg.default_concurrency}): blocked "
          f"{_cell(a['blocked_s'])} s, whole save {_cell(a['total_s'])} s, blocked/sync "
          f"{_cell(a['blocked_vs_sync_save'])}, peak extra memory "
          f"{a['peak_extra_fraction']['median']:.0%} of the state")
    print("\nratios recframe / other (per-round, median (min-max); >1: recframe faster)")
    print(common.format_table(["comparison", "ratio"],
                              [[k, _cell(v)] for k, v in summary["ratios"].items() if v]))
    c = cfg.default_concurrency
    print(f"\nrestore / raw read (issue 12: no regression; before it, warm 0.94x and cold "
          f"0.58x in wall time; >1: recframe faster), c{c}:")
    print(common.format_table(["", "wall", "cpu seconds"], [
        [phase, _cell(summary["ratios"].get(f"restore_{phase} c{c} vs raw c{c}")),
         _cell(summary["ratios"].get(f"restore_{phase} c{c} vs raw c{c} (cpu)"))]
        for phase in (("warm",) if cfg.no_cold else ("warm", "cold"))
    ]))
    print(f"verify-before-apply (c{c}, medians of interleaved rounds; restore / raw: "
          "medians of per-round ratios, >1: recframe faster):")
    rows = []
    for phase in (("warm",) if cfg.no_cold else ("warm", "cold")):
        for k in ("raw", "verify", "verify_read", "restore", "restore_read"):
            if f"{k}_{phase}_ms" not in bound:
                continue
            ratio = bound.get(f"{k}_{phase}_vs_raw")
            rows.append([phase, k, f"{bound[f'{k}_{phase}_ms']:.1f}",
                         f"{bound[f'{k}_{phase}_gbps']:.1f}",
                         f"{bound[f'{k}_{phase}_cpu_ms']:.1f}",
                         "" if ratio is None else
                         f"{ratio:.2f} (cpu {bound[f'{k}_{phase}_vs_raw_cpu']:.2f})"])
        rows.append([phase, "bound raw / (raw + verify)", "", "",
                     "", f"{bound[f'bound_{phase}']:.2f} (cpu {bound[f'bound_{phase}_cpu']:.2f})"])
    print(common.format_table(["", "pass", "ms", "GB/s", "cpu ms", "restore / raw"], rows))
    goals = goal_rows(cfg, summary)
    print("\ngoals")
    print(common.format_table(["goal", "measured", "target", ""], goals))
    print("\ncomponents (once): " + ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in comp.items()))
    if prof:
        print(prof)
    payload = {
        "benchmark": "checkpoint_io",
        "timestamp": common.timestamp(),
        "config": {k: v for k, v in vars(cfg).items() if k != "json"},
        "state_bytes": nbytes,
        "machine": common.machine_info(),
        "torch": common.torch_info(),
        "packages": common.package_versions(["torch", "fsspec", "numpy", "recframe"]),
        "summary": summary,
        "goals": [dict(zip(["goal", "measured", "target", "result"], g)) for g in goals],
        "components": comp,
        "verify_bound": bound,
        "records": records,
        "notes": [
            "warm restores read files just written (page cache); cold restores read after "
            "posix_fadvise(DONTNEED) on every file; resident fractions come from mincore",
            "torch.save restore = torch.load(weights_only=True) + model/optimizer "
            "load_state_dict; dcp and recframe restore in place",
        ],
    }
    print(f"\nwrote {common.write_json(cfg.json, payload)}")
    return 0


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.0%}"


if __name__ == "__main__":
    sys.exit(main())
