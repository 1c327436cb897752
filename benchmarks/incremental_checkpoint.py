"""Incremental checkpoints: bytes and save time of delta vs full checkpoints, restore of
a chain of deltas vs a full restore, and the row tracker's cost on training throughput.

Model: `recframe.models.DLRM` sharded with `shard_model` (torchrec DMP, fbgemm fused
RowWiseAdagrad on CPU; ``--tables`` tables of ``--rows`` x ``--dim`` float32 and one
momentum float per row), Adam over the dense part, trained on `SyntheticCriteo`
batches (power-law ids, ``--alpha``; a pool of ``--pool`` pre-generated batches, cycled).

1. **Tracking overhead**: interleaved rounds (order rotated every round) of
   ``--overhead-steps`` updates with a `RowTracker` attached vs without; the ratio of
   samples/s per round (and per CPU second), median over rounds; and the marking
   alone (the tracker's hooks called on every batch of the pool) against the time of
   an update, which the noise of a shared machine disturbs less.
2. **Save** at each interval N of ``--intervals``: per round, train N updates, then
   save a delta (`CheckpointManager(incremental=True)`) and a full checkpoint
   (`CheckpointManager` without it) of the same state, in alternating order; bytes on
   disk and wall time of each save (durable: fsync, manifest-last commit), and the
   share of rows the delta holds. Goal, at an interval touching < 10% of the rows:
   >= 6x fewer bytes and >= 4x faster saves.
3. **Restore**: a full checkpoint, then ``--chain`` deltas ``--restore-interval``
   updates apart; interleaved rounds restore the last delta (base + every delta) and a
   full checkpoint of the same step, *cold* (every file of both evicted from the page
   cache first, ``posix_fadvise(DONTNEED)``: a restart after a failure reads from disk)
   and *warm* (files in the page cache: a memory copy, where per-delta overheads show),
   and check every restore gives bit-identical tables and optimizer state. Goal:
   chain / full <= 1.5x (cold; warm reported next to it).

Checkpoints go to a temporary directory under ``--dir`` (local disk), removed at the
end. Every round records the CPU other processes used (2 shared cores here).

    flock /tmp/recframe-bench.lock .venv/bin/python benchmarks/incremental_checkpoint.py
    .venv/bin/python benchmarks/incremental_checkpoint.py --quick      # smoke, ~30 s
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Optional

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common as common  # noqa: E402
import torch  # noqa: E402

DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            "incremental_checkpoint.json")
GOALS = {"bytes_ratio": 6.0, "save_speedup": 4.0, "chain_restore_ratio": 1.5,
         "tracking_overhead": 0.02}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--rows", type=int, default=250_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--pool", type=int, default=400, help="distinct pre-generated batches")
    p.add_argument("--intervals", default="10,50,200",
                   help="updates between checkpoints, comma-separated")
    p.add_argument("--rounds", type=int, default=3, help="save rounds per interval")
    p.add_argument("--chain", type=int, default=10, help="deltas in the restored chain")
    p.add_argument("--restore-interval", type=int, default=10)
    p.add_argument("--restore-rounds", type=int, default=3)
    p.add_argument("--overhead-steps", type=int, default=200)
    p.add_argument("--overhead-rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dir", default=None, help="where checkpoints are written (tmp)")
    p.add_argument("--json", default=DEFAULT_JSON)
    p.add_argument("--quick", action="store_true", help="a small smoke run")
    cfg = p.parse_args(argv)
    cfg.intervals = [int(x) for x in cfg.intervals.split(",") if x]
    if cfg.quick:
        cfg.rows, cfg.pool, cfg.intervals, cfg.rounds = 20_000, 60, [5, 20], 2
        cfg.chain, cfg.restore_interval, cfg.restore_rounds = 3, 5, 2
        cfg.overhead_steps, cfg.overhead_rounds = 10, 2
    return cfg


# --- model and training ------------------------------------------------------------
def build(cfg: argparse.Namespace) -> tuple[Any, Any, Any, list[Any]]:
    from recframe.data import SyntheticCriteo
    from recframe.models import DLRM
    from recframe.optim import dense_parameters
    from recframe.optim.fused import shard_model

    features = [f"cat_{i}" for i in range(cfg.tables)]
    torch.manual_seed(0)
    model = DLRM(num_embeddings=cfg.rows, embedding_dim=cfg.dim, dense_arch=(64, cfg.dim),
                 over_arch=(64, 1), sparse_features=features)
    dmp, sparse = shard_model(model, optimizer="rowwise_adagrad", lr=0.05)
    dense = torch.optim.Adam(dense_parameters(dmp), lr=1e-3)
    data = SyntheticCriteo(num_batches=cfg.pool, batch_size=cfg.batch_size,
                           num_embeddings=cfg.rows, num_sparse=cfg.tables, alpha=cfg.alpha,
                           ids_per_feature=1, seed=1)
    return dmp, sparse, dense, list(data)


class Loop:
    """Trains the model one update per batch, cycling the pool."""

    def __init__(self, dmp: Any, sparse: Any, dense: Any, batches: list[Any]) -> None:
        self.dmp, self.sparse, self.dense, self.batches = dmp, sparse, dense, batches
        self.step = 0

    def train(self, updates: int) -> int:
        self.dmp.train()
        for _ in range(updates):
            batch = self.batches[self.step % len(self.batches)]
            self.dense.zero_grad()
            self.sparse.zero_grad()
            self.dmp(batch).backward()
            self.dense.step()
            self.sparse.step()
            self.step += 1
        return updates * self.batches[0].labels.shape[0]


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def flat_state(dmp: Any, sparse: Any) -> dict[str, torch.Tensor]:
    """Copies of every table, optimizer state tensor and dense parameter."""
    from recframe.checkpoint.format import is_sharded

    def local(v: Any) -> torch.Tensor:
        return (v.local_shards()[0].tensor if is_sharded(v) else v).detach().clone()

    out = {k: local(v) for k, v in dmp.state_dict().items()}
    for key, entries in sparse.state_dict()["state"].items():
        for name, value in entries.items():
            out[f"opt.{key}.{name}"] = local(value)
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- 1. tracking overhead ----------------------------------------------------------
def tracking_overhead(cfg: argparse.Namespace, loop: Loop) -> dict[str, Any]:
    from recframe.optim.tracking import RowTracker

    def tracked(r: int) -> common.Timed:
        tracker = RowTracker(loop.dmp, loop.sparse)
        t0, c0 = time.perf_counter(), time.process_time()
        samples = loop.train(cfg.overhead_steps)
        t1, c1 = time.perf_counter(), time.process_time()
        marked = sum(int(b.sum()) for b in tracker.bits.values())
        tracker.detach()
        return common.Timed(samples, t1 - t0, c1 - c0, {"marked_rows": marked})

    def untracked(r: int) -> common.Timed:
        t0, c0 = time.perf_counter(), time.process_time()
        samples = loop.train(cfg.overhead_steps)
        return common.Timed(samples, time.perf_counter() - t0, time.process_time() - c0)

    loop.train(5)  # warm-up
    results = common.run_interleaved({"tracked": tracked, "untracked": untracked},
                                     cfg.overhead_rounds, on_round=_show)
    ratios = common.round_ratios(results, "tracked", "untracked")
    cpu = common.round_ratios(results, "tracked", "untracked", cpu=True)
    assert all(x.extra.get("marked_rows", 1) > 0 for x in results if x.variant == "tracked")
    # the marking alone: the tracker's forward pre-hooks called on every batch of the
    # pool, timed against the untracked rounds' time per update (less noisy than the
    # difference of two throughputs)
    tracker = RowTracker(loop.dmp, loop.sparse)
    hooked = [(m, h) for m in loop.dmp.modules() for h in m._forward_pre_hooks.values()
              if getattr(h, "__qualname__", "").startswith("RowTracker")]
    assert hooked, "no tracker hook found"
    loop.dmp.train()
    per_pass = []
    with torch.enable_grad():
        for _ in range(5):
            t0 = time.perf_counter()
            for batch in loop.batches:
                for module, hook in hooked:
                    hook(module, (batch.sparse_features,), {})
            per_pass.append((time.perf_counter() - t0) / len(loop.batches))
    tracker.detach()
    hook_s = statistics.median(per_pass)
    step_s = statistics.median(x.seconds / cfg.overhead_steps
                               for x in common.per_variant(results, "untracked"))
    return {"throughput_ratio": common.summarize(ratios),
            "throughput_ratio_by_cpu": common.summarize(cpu),
            "overhead": 1 - statistics.median(ratios),
            "overhead_by_cpu": 1 - statistics.median(cpu),
            "marking_s_per_update": hook_s, "update_s": step_s,
            "marking_fraction": hook_s / step_s,
            "rounds": [x.to_dict() for x in results]}


def _show(this_round: list[common.RoundResult]) -> None:
    print("  round " + ", ".join(
        f"{x.variant} {x.samples_per_sec:,.0f}/s (others {x.load.others_cores or 0:.2f} cores)"
        for x in this_round), flush=True)


# --- 2. save: delta vs full --------------------------------------------------------
def saves(cfg: argparse.Namespace, loop: Loop, workdir: str) -> list[dict[str, Any]]:
    from recframe.checkpoint import CheckpointManager, Saver
    from recframe.checkpoint.incremental import section

    out = []
    total_rows = cfg.tables * cfg.rows
    for interval in cfg.intervals:
        inc_dir = os.path.join(workdir, f"inc-{interval}")
        full_dir = os.path.join(workdir, f"full-{interval}")
        inc = CheckpointManager(Saver(loop.dmp, loop.sparse, output_dir=inc_dir, max_keep=10**6),
                                incremental=True, full_checkpoint_every=10**6)
        full = CheckpointManager(Saver(loop.dmp, loop.sparse, output_dir=full_dir,
                                       max_keep=10**6))
        inc.save(loop.step)  # the base
        records = []
        for r in range(cfg.rounds):
            loop.train(interval)
            step = loop.step
            load0 = common.LoadSample.now()
            timings = {}
            for name in (("delta", "full") if r % 2 == 0 else ("full", "delta")):
                manager = inc if name == "delta" else full
                t0 = time.perf_counter()
                path = manager.save(step)
                timings[name] = (time.perf_counter() - t0, dir_bytes(path), path)
            load = common.Load.between(load0, common.LoadSample.now())
            manifest = inc.saver.read_manifest(timings["delta"][2])
            sec = section(manifest)
            assert sec["kind"] == "delta", sec["kind"]
            changed = sum(sec["changed_rows"].values())
            records.append({
                "step": step, "touched_fraction": changed / total_rows,
                "delta_bytes": timings["delta"][1], "full_bytes": timings["full"][1],
                "delta_s": timings["delta"][0], "full_s": timings["full"][0],
                "others_cores": load.others_cores,
            })
            shutil.rmtree(timings["full"][2])  # keep the disk small (untimed)
            print(f"  interval {interval}: touched {changed / total_rows:.2%}, delta "
                  f"{timings['delta'][1] / 1e6:.1f} MB in {timings['delta'][0]:.3f} s, full "
                  f"{timings['full'][1] / 1e6:.1f} MB in {timings['full'][0]:.3f} s",
                  flush=True)
        inc.tracker.detach()
        shutil.rmtree(inc_dir, ignore_errors=True)
        shutil.rmtree(full_dir, ignore_errors=True)
        out.append({
            "interval": interval,
            "touched_fraction": statistics.median(x["touched_fraction"] for x in records),
            "delta_bytes": statistics.median(x["delta_bytes"] for x in records),
            "full_bytes": statistics.median(x["full_bytes"] for x in records),
            "delta_s": common.summarize([x["delta_s"] for x in records]),
            "full_s": common.summarize([x["full_s"] for x in records]),
            "bytes_ratio": common.summarize([x["full_bytes"] / x["delta_bytes"]
                                             for x in records]),
            "save_speedup": common.summarize([x["full_s"] / x["delta_s"] for x in records]),
            "rounds": records,
        })
    return out


# --- 3. restore: a chain of deltas vs a full checkpoint ------------------------------
def restores(cfg: argparse.Namespace, loop: Loop, workdir: str) -> dict[str, Any]:
    from recframe.checkpoint import CheckpointManager, Saver
    from recframe.checkpoint.incremental import section

    inc_dir, full_dir = os.path.join(workdir, "chain-inc"), os.path.join(workdir, "chain-full")
    inc = CheckpointManager(Saver(loop.dmp, loop.sparse, output_dir=inc_dir, max_keep=10**6),
                            incremental=True, full_checkpoint_every=cfg.chain + 1)
    full = Saver(loop.dmp, loop.sparse, output_dir=full_dir, max_keep=10**6)
    inc.save(loop.step)
    for _ in range(cfg.chain):
        loop.train(cfg.restore_interval)
        path = inc.save(loop.step)
    inc.tracker.detach()
    chain = section(inc.saver.read_manifest(path))["chain"]
    assert len(chain) == cfg.chain + 1, chain
    full_path = full.save(loop.step)
    expected = flat_state(loop.dmp, loop.sparse)
    identical = []

    from checkpoint_io import evict, resident_fraction

    resident: dict[str, list[Optional[float]]] = {"chain_cold": [], "full_cold": []}

    def run(saver: Any, target: str, cold: bool, name: str) -> Any:
        def body(r: int) -> common.Timed:
            loop.train(1)  # move the live state away from the checkpoint (untimed)
            loop.step -= 1
            files = os.path.dirname(target)  # the output_dir: the whole chain, or one
            if cold:
                evict(files)
                resident[name].append(resident_fraction(files))
            else:  # warm: every file of this variant in the page cache (read untimed)
                for d, _, names in os.walk(files):
                    for n in names:
                        with open(os.path.join(d, n), "rb") as f:
                            while f.read(16 << 20):
                                pass
            t0, c0 = time.perf_counter(), time.process_time()
            saver.load(ckpt_path=target)
            t1, c1 = time.perf_counter(), time.process_time()
            identical.append(same(flat_state(loop.dmp, loop.sparse), expected))
            return common.Timed(1, t1 - t0, c1 - c0)

        return body

    variants = {}
    for mode in ("cold", "warm"):
        variants[f"chain_{mode}"] = run(inc.saver, path, mode == "cold", f"chain_{mode}")
        variants[f"full_{mode}"] = run(full, full_path, mode == "cold", f"full_{mode}")
    results = common.run_interleaved(
        variants, cfg.restore_rounds,
        on_round=lambda rr: print("  restore " + ", ".join(
            f"{x.variant} {x.seconds:.3f} s" for x in rr), flush=True))
    out: dict[str, Any] = {"deltas": cfg.chain, "restore_interval": cfg.restore_interval,
                           "chain_bytes": sum(dir_bytes(inc.saver.storage.path(c))
                                              for c in chain),
                           "full_bytes": dir_bytes(full_path)}
    for mode in ("cold", "warm"):
        chain_r = common.per_variant(results, f"chain_{mode}")
        full_r = common.per_variant(results, f"full_{mode}")
        out[mode] = {
            "chain_s": common.summarize([x.seconds for x in chain_r]),
            "full_s": common.summarize([x.seconds for x in full_r]),
            "chain_vs_full": common.summarize([c.seconds / f.seconds
                                               for c, f in zip(chain_r, full_r)]),
        }
    out["resident_fraction_after_evict"] = resident
    out["bit_identical"] = all(identical) and len(identical) == 4 * cfg.restore_rounds
    out["rounds"] = [x.to_dict() for x in results]
    shutil.rmtree(inc_dir, ignore_errors=True)
    shutil.rmtree(full_dir, ignore_errors=True)
    return out


def _cell(s: dict[str, Any]) -> str:
    return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"


def main(argv: Optional[list[str]] = None) -> int:
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    idle = common.measure_idle_load(1.0)
    t0 = time.perf_counter()
    dmp, sparse, dense, batches = build(cfg)
    loop = Loop(dmp, sparse, dense, batches)
    print(f"DLRM: {cfg.tables} tables of {cfg.rows:,} x {cfg.dim} "
          f"({cfg.tables * cfg.rows * cfg.dim * 4 / 1e6:.0f} MB), built in "
          f"{time.perf_counter() - t0:.1f} s; others used {idle.others_cores or 0:.2f} cores "
          "at the start", flush=True)
    workdir = tempfile.mkdtemp(prefix="recframe-incremental-", dir=cfg.dir)
    try:
        print("tracking overhead (interleaved rounds)", flush=True)
        overhead = tracking_overhead(cfg, loop)
        print("saves: delta vs full", flush=True)
        save = saves(cfg, loop, workdir)
        print(f"restore: {cfg.chain}-delta chain vs full", flush=True)
        restore = restores(cfg, loop, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    rows = [[s["interval"], f"{s['touched_fraction']:.2%}", f"{s['delta_bytes'] / 1e6:.1f}",
             f"{s['full_bytes'] / 1e6:.1f}", _cell(s["bytes_ratio"]), _cell(s["delta_s"]),
             _cell(s["full_s"]), _cell(s["save_speedup"])] for s in save]
    print(common.format_table(
        ["interval", "rows touched", "delta MB", "full MB", "bytes full/delta",
         "delta save s", "full save s", "save speedup"], rows))
    for mode in ("cold", "warm"):
        r = restore[mode]
        print(f"{'' if mode == 'warm' else chr(10)}restore ({mode}) of a {cfg.chain}-delta "
              f"chain vs full: {_cell(r['chain_vs_full'])} (chain {_cell(r['chain_s'])} s, "
              f"full {_cell(r['full_s'])} s)")
    print(f"every restore bit-identical to the state saved: {restore['bit_identical']}")
    print(f"tracking overhead, interleaved rounds: {overhead['overhead']:.2%} by wall time, "
          f"{overhead['overhead_by_cpu']:.2%} by CPU time (throughput ratio "
          f"{_cell(overhead['throughput_ratio'])}, q1-q3 "
          f"{overhead['throughput_ratio']['q1']:.3f}-{overhead['throughput_ratio']['q3']:.3f})")
    print(f"tracking overhead, marking alone: {overhead['marking_s_per_update'] * 1e6:.0f} us "
          f"per update of {overhead['update_s'] * 1e3:.2f} ms = "
          f"{overhead['marking_fraction']:.2%}")
    under = [s for s in save if s["touched_fraction"] < 0.10]
    best = max(under, key=lambda s: s["interval"]) if under else None
    goals = [
        ["bytes full/delta (largest interval touching < 10%)",
         best and best["bytes_ratio"]["median"], f">= {GOALS['bytes_ratio']}"],
        ["save speedup (same interval)", best and best["save_speedup"]["median"],
         f">= {GOALS['save_speedup']}"],
        [f"{cfg.chain}-delta chain restore / full restore (cold)",
         restore["cold"]["chain_vs_full"]["median"], f"<= {GOALS['chain_restore_ratio']}"],
        ["tracking overhead (marking time / update time)", overhead["marking_fraction"],
         f"<= {GOALS['tracking_overhead']}"],
        ["tracking overhead (interleaved throughput, median)", overhead["overhead"],
         f"<= {GOALS['tracking_overhead']}"],
    ]
    met = [
        best is not None and best["bytes_ratio"]["median"] >= GOALS["bytes_ratio"],
        best is not None and best["save_speedup"]["median"] >= GOALS["save_speedup"],
        restore["cold"]["chain_vs_full"]["median"] <= GOALS["chain_restore_ratio"],
        overhead["marking_fraction"] <= GOALS["tracking_overhead"],
        overhead["overhead"] <= GOALS["tracking_overhead"],
    ]
    for g, ok in zip(goals, met):
        g.append("met" if ok else "NOT met")
    print("\ngoals")
    print(common.format_table(["goal", "measured", "target", ""], goals))
    end_load = common.measure_idle_load(1.0)
    payload = {
        "benchmark": "incremental_checkpoint",
        "timestamp": common.timestamp(),
        "config": {k: v for k, v in vars(cfg).items() if k != "json"},
        "machine": common.machine_info(),
        "torch": common.torch_info(),
        "packages": common.package_versions(["torch", "torchrec", "fbgemm-gpu-cpu", "fsspec"]),
        "load_others_cores": {"start": idle.others_cores, "end": end_load.others_cores},
        "tracking": overhead,
        "saves": save,
        "restore": restore,
        "goals": [dict(zip(["goal", "measured", "target", "result"], g)) for g in goals],
        "notes": ["saves are durable (fsync, manifest-last commit); cold restores read after "
                  "posix_fadvise(DONTNEED) on every file of both checkpoints, warm ones from "
                  "the page cache",
                  "the fused path marks the ids of each table's features at forward"],
    }
    print(f"\nwrote {common.write_json(cfg.json, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
