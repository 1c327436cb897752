"""Dynamic embedding table against modulo hashing, same model, same memory.

A synthetic click stream with unbounded, drifting ids: user ids live in a window of
``--window`` ids that slides by ``--shift`` ids per period (new ids appear, old ones
fade), popularity within the window is power-law (Zipf, exponent ``--zipf``: each
window holds exactly one id of each popularity rank), and each id has its own click
bias (a hash of the id), so a model must remember ids to predict well. The distinct
ids of the stream are >= 20x the row budget.

Variants, both a `recframe.models.DLRM` trained by the `Trainer` with recframe's
RowWiseAdagrad on the tables and Adam on the dense part, with a ``--budget``-row user
table (the same table memory):

* ``a``: modulo hashing: row = id mod budget (colliding ids share rows forever);
* ``b``: a dynamic table (`recframe.dynamic`): ``--fallback`` hashed fallback rows, ids
  admitted after ``--min_count`` sightings, ``--eviction`` (LRU by default) every
  ``--interval`` steps, freeing ``--evict_fraction`` of the rows.

Throughput is the batch size over the median update time (``before_step`` to
``after_step``, the dynamic hook's admission and eviction included), in wall time and
in this process's CPU time (one torch thread): on a machine shared with other
processes the wall-time ratio swings with their load, the CPU-time ratio much less.
The median hides the periodic eviction and admission steps, so the ratio of total CPU
time over all updates is reported too. Each seed runs each variant ``--repeats`` times,
interleaved (a b b a), and pools their update times.

Reported: eval AUC on fresh samples of the latest period (after training on every
period in order) for each variant and seed, the gap b - a (mean and spread over
seeds), throughput ratios b/a (goal >= 0.85), the rows the dynamic table uses against
its budget, and the map's bytes per row.

    .venv/bin/python benchmarks/dynamic_embedding.py            # 3 seeds, ~1-2 min
    .venv/bin/python benchmarks/dynamic_embedding.py --quick    # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torchrec.datasets.utils import Batch  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from recframe import Trainer, TrainingArguments  # noqa: E402
from recframe.hooks import DynamicEmbeddingHook, Hook  # noqa: E402
from recframe.models import DLRM  # noqa: E402
from recframe.optim import dense_parameters, sparse_parameters  # noqa: E402
from recframe.optim.sparse import RowWiseAdagrad  # noqa: E402
from recframe.schema import FeatureSchema, mix64  # noqa: E402

ITEMS = 64


def stream(args: argparse.Namespace, seed: int, periods: range, batches: int
           ) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], set]:
    """``batches`` batches per period of (user ids, items, dense [B, 2], labels)."""
    rng = np.random.default_rng(seed)
    m, a = args.window, 7919  # gcd(7919, window) == 1: ranks are a permutation
    a_inv = pow(a, -1, m)
    out, seen = [], set()
    for p in periods:
        start = p * args.shift
        for _ in range(batches):
            rank = (rng.zipf(args.zipf, args.batch_size) - 1) % m
            users = start + (rank * a_inv - start) % m  # the id of that rank in the window
            users = users.astype(np.int64) + 10**12
            seen.update(users.tolist())
            bias = (mix64(users.view(np.uint64)) % 1000) / 250.0 - 2.0  # per id, [-2, 2)
            items = rng.integers(0, ITEMS, args.batch_size)
            dense = rng.standard_normal((args.batch_size, 2)).astype(np.float32)
            logit = 1.5 * bias + 0.5 * dense[:, 0] + (items % 4 == 0) * 0.5
            labels = (rng.random(args.batch_size) < 1 / (1 + np.exp(-logit))).astype(np.float32)
            out.append((users, items, dense, labels))
    return out, seen


def to_batches(raw, modulo: int | None) -> list[Batch]:
    out = []
    for users, items, dense, labels in raw:
        u = torch.from_numpy(users if modulo is None else users % modulo)
        n = u.numel()
        kjt = KeyedJaggedTensor.from_lengths_sync(
            ["user", "item"], torch.cat([u, torch.from_numpy(items)]),
            torch.ones(2 * n, dtype=torch.int32))
        out.append(Batch(dense_features=torch.from_numpy(dense), sparse_features=kjt,
                         labels=torch.from_numpy(labels)))
    return out


def schema(args: argparse.Namespace, dynamic: bool) -> FeatureSchema:
    user = {"name": "user"}
    if dynamic:
        user["mapping"] = {"kind": "dynamic", "dynamic": {
            "fallback_rows": args.fallback, "min_count": args.min_count,
            "eviction": args.eviction, "eviction_interval": args.interval,
            "evict_fraction": args.evict_fraction}}
    return FeatureSchema.from_dict({
        "labels": ["y"], "dense": ["x0", "x1"], "sparse": [user, {"name": "item"}],
        "tables": [{"name": "user", "num_embeddings": args.budget, "embedding_dim": 8},
                   {"name": "item", "num_embeddings": ITEMS, "embedding_dim": 8}]})


class StepTimer(Hook):
    """Wall time of each update, ``before_step`` to ``after_step`` (after the dynamic
    hook, priority -90, so its admission and eviction are included)."""

    priority = 0

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []
        self._t0 = self._c0 = 0.0

    def before_step(self, trainer) -> None:
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def after_step(self, trainer, metrics) -> None:
        self.times.append(time.perf_counter() - self._t0)
        self.cpu.append(time.process_time() - self._c0)


def run(args: argparse.Namespace, dynamic: bool, seed: int, train, evald
        ) -> tuple[dict, StepTimer]:
    torch.manual_seed(seed)
    model = DLRM(schema=schema(args, dynamic), dense_arch=(16, 8), over_arch=(16, 1))
    for m in model.modules():
        if isinstance(m, nn.EmbeddingBag):
            m.sparse = True
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model, TrainingArguments(output_dir=out, train_steps=len(train), disable_tqdm=True,
                                     report_to="none", log_steps=10**9, seed=seed),
            train_dataset=train, eval_dataset=evald,
            hooks=[timer] + ([DynamicEmbeddingHook()] if dynamic else []),
            dense_optimizers=(torch.optim.Adam(dense_parameters(model), lr=3e-3), None),
            sparse_optimizer=RowWiseAdagrad(sparse_parameters(model), lr=args.lr))
        trainer.train()
        results = trainer.evaluate()
    row = {"auc": results["auc"]}
    if dynamic:
        m = model.dynamic.maps["user"]
        row.update(rows_used=m.rows_used + m.fallback, budget=m.num_embeddings,
                   admitted=int(m.totals[0]), evicted=int(m.totals[1]),
                   map_bytes_per_row=m.map_bytes_per_row())
    return row, timer


def throughput(args: argparse.Namespace, timers: list[StepTimer]) -> dict:
    """Samples per second of the updates of ``timers`` (runs of one variant, pooled):
    over the median update time (robust to bursts of load from other processes), in
    wall and CPU time, and over the total CPU time (the periodic eviction and
    admission steps included)."""
    wall = [t for timer in timers for t in timer.times]
    cpu = [t for timer in timers for t in timer.cpu]
    return {"samples_per_s": args.batch_size / statistics.median(wall),
            "samples_per_cpu_s": args.batch_size / statistics.median(cpu),
            "samples_per_cpu_s_total": args.batch_size * len(cpu) / sum(cpu)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of each variant per seed, interleaved (a b b a); the "
                   "update times of the repeats are pooled")
    p.add_argument("--budget", type=int, default=2000)
    p.add_argument("--fallback", type=int, default=64)
    p.add_argument("--min_count", type=int, default=2)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--eviction", default="lru", choices=["lfu", "lru"])
    p.add_argument("--evict_fraction", type=float, default=0.1)
    p.add_argument("--window", type=int, default=50000)
    p.add_argument("--shift", type=int, default=5000)
    p.add_argument("--zipf", type=float, default=1.15)
    p.add_argument("--periods", type=int, default=10)
    p.add_argument("--batches", type=int, default=20, help="batches per period")
    p.add_argument("--batch_size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.quick:
        args.seeds, args.periods, args.batches, args.repeats = 1, 3, 5, 1
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    torch.set_num_threads(1)
    rows = []
    for seed in range(args.seeds):
        raw, seen = stream(args, seed, range(args.periods), args.batches)
        held, _ = stream(args, 1000 + seed, range(args.periods - 1, args.periods), 8)
        res: dict = {}
        timers: dict = {"a": [], "b": []}
        order = "ab" if seed % 2 == 0 else "ba"
        # a b b a (or b a a b): load that drifts during a seed hits both variants alike
        for name in (order + order[::-1]) * (args.repeats // 2) + order * (args.repeats % 2):
            dynamic = name == "b"
            modulo = None if dynamic else args.budget
            row, timer = run(args, dynamic, seed, to_batches(raw, modulo),
                             to_batches(held, modulo))
            if name in res and row != res[name]:
                raise RuntimeError(f"variant {name}, seed {seed}: a repeat gave {row}, the "
                                   f"first run {res[name]} (training is deterministic)")
            res[name] = row
            timers[name].append(timer)
        for name in res:
            res[name].update(throughput(args, timers[name]))
        rows.append({"seed": seed, "distinct_ids": len(seen),
                     "distinct_over_budget": len(seen) / args.budget, **{
                         f"{k}_{n}": v for n, r in res.items() for k, v in r.items()}})
        r = rows[-1]
        print(f"seed {seed}: distinct ids {r['distinct_ids']} ({r['distinct_over_budget']:.0f}x "
              f"budget)  AUC a {r['auc_a']:.4f}  b {r['auc_b']:.4f}  gap "
              f"{r['auc_b'] - r['auc_a']:+.4f}  samples/s a {r['samples_per_s_a']:.0f}  b "
              f"{r['samples_per_s_b']:.0f}  ratio "
              f"{r['samples_per_s_b'] / r['samples_per_s_a']:.2f} (CPU time "
              f"{r['samples_per_cpu_s_b'] / r['samples_per_cpu_s_a']:.2f}, total "
              f"{r['samples_per_cpu_s_total_b'] / r['samples_per_cpu_s_total_a']:.2f})  rows "
              f"{r['rows_used_b']}/{r['budget_b']}  admitted {r['admitted_b']} evicted "
              f"{r['evicted_b']}", flush=True)
    gaps = [r["auc_b"] - r["auc_a"] for r in rows]
    ratios = [r["samples_per_s_b"] / r["samples_per_s_a"] for r in rows]
    cpu_ratios = [r["samples_per_cpu_s_b"] / r["samples_per_cpu_s_a"] for r in rows]
    total_ratios = [r["samples_per_cpu_s_total_b"] / r["samples_per_cpu_s_total_a"]
                    for r in rows]
    summary = {
        "auc_gap_mean": statistics.mean(gaps),
        "auc_gap_stdev": statistics.stdev(gaps) if len(gaps) > 1 else 0.0,
        "auc_gap_min": min(gaps),
        "throughput_ratio_median": statistics.median(ratios),
        "cpu_throughput_ratio_median": statistics.median(cpu_ratios),
        "cpu_total_throughput_ratio_median": statistics.median(total_ratios),
        "throughput_goal": 0.85,
        "map_bytes_per_row": rows[0]["map_bytes_per_row_b"],
        "table_bytes_per_row": 8 * 4,
        "args": vars(args), "rows": rows,
    }
    print(f"AUC gap b-a: mean {summary['auc_gap_mean']:+.4f} stdev "
          f"{summary['auc_gap_stdev']:.4f} (min {summary['auc_gap_min']:+.4f}) over "
          f"{len(rows)} seed(s); throughput b/a median {summary['throughput_ratio_median']:.2f} "
          f"wall, {summary['cpu_throughput_ratio_median']:.2f} CPU time (goal >= 0.85), "
          f"{summary['cpu_total_throughput_ratio_median']:.2f} total CPU time; map "
          f"{summary['map_bytes_per_row']:.1f} B/row beside the table's "
          f"{summary['table_bytes_per_row']} B/row")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
