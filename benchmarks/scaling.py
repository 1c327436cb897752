"""Scale-out on this machine: training throughput and per-rank checkpoint save time at 1
and 2 processes (gloo on loopback, each rank a separate process as under torchrun).

Each round launches, for each world size in an order rotated every round, ``world``
worker processes (this script with ``--worker``), which:

* shard a DLRM with `recframe.optim.fused.shard_model` (torchrec's planner; by default
  tables alternately table-wise and row-wise, ``--sharding``; the planner time is
  recorded), dense part under DDP, and train it with the `Trainer` on `SyntheticCriteo`
  (each rank its own part of the data, ``--batch_size`` samples per rank per step:
  weak scaling), timing ``--steps`` updates after ``--warmup`` ones (between barriers,
  on rank 0): samples/s over all ranks;
* save ``--saves`` checkpoints with ``Saver.save``: per rank, the time of its own
  writes (``write``: its shard files, fsynced) and of the whole save (``save``: writes,
  then the commit through the store: rank 0 waits for every rank, writes the manifest,
  renames). The tables have ``--rows_per_rank`` x world rows, so every rank holds the
  same state at each world size: the per-rank save time should stay flat.

Be honest about the hardware: this kind of machine has 2 cores shared with other work.
Two ranks with one thread each use both cores; one rank with one thread uses one. So
"2 processes" cannot show more than 2x, the gloo collectives on loopback cost CPU
that a GPU cluster moves to NVLink/InfiniBand, and a busy neighbour skews everything
(the CPU used by other processes is measured around each launch and reported).

    .venv/bin/python benchmarks/scaling.py                # ~3 min on 2 cores
    .venv/bin/python benchmarks/scaling.py --quick        # ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as common  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="1,2", help="process counts to compare")
    p.add_argument("--rounds", type=int, default=3, help="launches per world size")
    p.add_argument("--steps", type=int, default=30, help="timed updates per launch")
    p.add_argument("--warmup", type=int, default=5, help="untimed updates first")
    p.add_argument("--batch_size", type=int, default=512, help="samples per rank per step")
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--embedding_dim", type=int, default=32)
    p.add_argument("--rows_per_rank", type=int, default=200_000,
                   help="rows per table per rank (tables grow with the world size)")
    p.add_argument("--saves", type=int, default=3, help="checkpoints saved per launch")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--sharding", default="mixed",
                   choices=["mixed", "table_wise", "row_wise", "auto"],
                   help="shard_model(sharding=...); auto: the planner's choice")
    p.add_argument("--quick", action="store_true", help="a short run (smaller everything)")
    p.add_argument("--json", default=None, help="where to write the JSON report")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.quick:
        for name, value in (("rounds", 1), ("steps", 10), ("warmup", 2),
                            ("rows_per_rank", 50_000), ("saves", 2)):
            if p.get_default(name) == getattr(ns, name):
                setattr(ns, name, value)
    if ns.json is None:
        ns.json = os.path.join(RESULTS, "scaling_quick.json" if ns.quick else "scaling.json")
    for name in ("rounds", "steps", "batch_size", "tables", "embedding_dim",
                 "rows_per_rank", "saves", "threads"):
        if getattr(ns, name) < 1:
            p.error(f"--{name} must be >= 1")
    ns.worlds = [int(w) for w in str(ns.worlds).split(",") if w.strip()]
    if not ns.worlds or min(ns.worlds) < 1:
        p.error("--worlds must list process counts >= 1, e.g. 1,2")
    return ns


# --- a worker: one rank ----------------------------------------------------------------
def worker(cfg: argparse.Namespace) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    for noisy in ("torchrec", "recframe", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(cfg.threads)
    from recframe import Trainer, TrainingArguments, distributed
    from recframe.data import SyntheticCriteo
    from recframe.models import DLRM
    from recframe.optim import dense_parameters
    from recframe.optim.fused import shard_model

    distributed.init_default_group(timeout=600)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    rows = cfg.rows_per_rank * world
    features = [f"cat_{i}" for i in range(cfg.tables)]
    torch.manual_seed(0)
    model = DLRM(num_embeddings=rows, embedding_dim=cfg.embedding_dim,
                 dense_arch=(128, cfg.embedding_dim), over_arch=(128, 1),
                 sparse_features=features)
    distributed.barrier()
    t0 = time.perf_counter()
    sharding = None if cfg.sharding == "auto" else cfg.sharding
    dmp, sparse = shard_model(model, optimizer="rowwise_adagrad", lr=0.05, sharding=sharding)
    shard_seconds = time.perf_counter() - t0
    dense = torch.optim.Adam(dense_parameters(dmp), lr=1e-3)
    steps = cfg.warmup + cfg.steps
    data = SyntheticCriteo(num_batches=steps * world, batch_size=cfg.batch_size,
                           num_embeddings=rows, num_sparse=cfg.tables, seed=1,
                           rank=rank, world_size=world)
    out_dir = os.path.join(cfg.worker, "ckpt")
    args = TrainingArguments(output_dir=out_dir, save_steps=0, report_to="none",
                             disable_tqdm=True, log_steps=10**6, max_to_keep=1,
                             save_on_sigterm=False)
    trainer = Trainer(model=dmp, args=args, train_dataset=data,
                      dense_optimizers=(dense, None), sparse_optimizer=sparse)
    trainer.checkpoint_manager.step = lambda *a, **k: None  # no saves while timing
    trainer.train(cfg.warmup)
    distributed.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train(steps)
    distributed.barrier()
    train_seconds, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    saves = []
    for i in range(cfg.saves):
        distributed.barrier()
        trainer.saver.save(10_000 + i, prune=True)
        saves.append({"write": trainer.saver.last_write_seconds,
                      "save": trainer.saver.last_save_seconds})
    files = [f for f in os.listdir(out_dir) if f.startswith("ckpt_")]
    with open(os.path.join(out_dir, sorted(files)[-1], "manifest.json")) as f:
        manifest = json.load(f)
    mine = sum(f["size"] for f in manifest["files"].values() if f["rank"] == rank)
    result = {
        "rank": rank, "world_size": world, "shard_model_seconds": shard_seconds,
        "train_seconds": train_seconds, "train_cpu_seconds": train_cpu,
        "samples": cfg.steps * cfg.batch_size * world, "saves": saves,
        "rank_bytes": mine, "checkpoint_files": len(manifest["files"]) + 1,
        "plan": sorted({s.sharding_type for p in dmp.plan.plan.values() for s in p.values()}),
    }
    with open(os.path.join(cfg.worker, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    import torch.distributed as dist

    distributed.barrier()
    dist.destroy_process_group()


# --- the driver ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: argparse.Namespace, world: int, base: str) -> dict[str, Any]:
    """Run ``world`` worker processes; returns their results and the CPU load."""
    directory = tempfile.mkdtemp(prefix=f"w{world}-", dir=base)
    port = str(_free_port())
    argv = [sys.executable, os.path.abspath(__file__), "--worker", directory]
    for name in ("steps", "warmup", "batch_size", "tables", "embedding_dim",
                 "rows_per_rank", "saves", "threads", "sharding"):
        argv += [f"--{name}", str(getattr(cfg, name))]
    start, before = common.LoadSample.now(), os.times()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS=str(cfg.threads),
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    end = common.LoadSample.now()
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        if p.returncode != 0:
            raise RuntimeError(f"world {world} rank {rank} failed ({p.returncode}):\n"
                               f"{text[-3000:]}")
    ranks = []
    for r in range(world):
        with open(os.path.join(directory, f"rank{r}.json")) as f:
            ranks.append(json.load(f))
    # CPU used by other processes while the workers ran: the machine's minus theirs
    after = os.times()
    wall = end.wall - start.wall
    workers = (after.children_user + after.children_system
               - before.children_user - before.children_system)
    others = ((end.system[0] - start.system[0] - workers) / wall
              if end.system and start.system else None)
    return {"world_size": world, "ranks": ranks, "launch_seconds": wall,
            "workers_cores": workers / wall, "others_cores": others}


def summarize_world(runs: list[dict[str, Any]]) -> dict[str, Any]:
    world = runs[0]["world_size"]
    throughput = [r["ranks"][0]["samples"] / max(x["train_seconds"] for x in r["ranks"])
                  for r in runs]
    writes = [s["write"] for r in runs for x in r["ranks"] for s in x["saves"]]
    saves = [s["save"] for r in runs for x in r["ranks"] for s in x["saves"]]
    return {
        "world_size": world,
        "samples_per_sec": common.summarize(throughput),
        "samples_per_sec_per_rank": common.summarize([t / world for t in throughput]),
        "rank_write_seconds": common.summarize(writes),
        "rank_save_seconds": common.summarize(saves),
        "rank_checkpoint_mb": runs[0]["ranks"][0]["rank_bytes"] / 1e6,
        "checkpoint_files": runs[0]["ranks"][0]["checkpoint_files"],
        "shard_model_seconds": common.summarize(
            [x["shard_model_seconds"] for r in runs for x in r["ranks"]]),
        "sharding_types": runs[0]["ranks"][0]["plan"],
        "workers_cores": [r["workers_cores"] for r in runs],
        "others_cores": [r["others_cores"] for r in runs],
    }


def main(argv: Optional[list[str]] = None) -> int:
    cfg = parse_args(argv)
    if cfg.worker:
        worker(cfg)
        return 0
    started = time.perf_counter()
    start_load = common.wait_for_quiet(max_wait=20.0)
    print(f"other processes at start: {start_load.others_cores} cores; "
          f"{os.cpu_count()} logical CPUs; {cfg.threads} thread(s) per rank", flush=True)
    runs: dict[int, list[dict[str, Any]]] = {w: [] for w in cfg.worlds}
    with tempfile.TemporaryDirectory(prefix="recframe-scaling-") as base:
        for rnd in range(cfg.rounds):
            order = cfg.worlds[rnd % len(cfg.worlds):] + cfg.worlds[:rnd % len(cfg.worlds)]
            for world in order:
                run = launch(cfg, world, base)
                runs[world].append(run)
                r0 = run["ranks"][0]
                rate = r0["samples"] / max(x["train_seconds"] for x in run["ranks"])
                save = statistics.median(s["save"] for s in r0["saves"])
                print(f"round {rnd} world {world}: {rate:.0f} samples/s, save {save:.3f}s "
                      f"(workers {run['workers_cores']:.2f} cores, others "
                      f"{run['others_cores']:.2f})", flush=True)
    summary = [summarize_world(runs[w]) for w in cfg.worlds]
    rows = [[s["world_size"], f"{s['samples_per_sec']['median']:.0f}",
             f"{s['samples_per_sec_per_rank']['median']:.0f}",
             f"{s['rank_checkpoint_mb']:.1f}", f"{s['rank_write_seconds']['median']:.3f}",
             f"{s['rank_save_seconds']['median']:.3f}", s["checkpoint_files"],
             f"{s['shard_model_seconds']['median']:.2f}"] for s in summary]
    print(common.format_table(
        ["procs", "samples/s", "per rank", "MB/rank", "write s", "save s", "files",
         "shard_model s"], rows))
    payload = {
        "benchmark": "scaling",
        "timestamp": common.timestamp(),
        "wall_seconds": time.perf_counter() - started,
        "machine": common.machine_info(),
        "packages": common.package_versions(["torch", "torchrec", "fbgemm-gpu-cpu"]),
        "config": {k: v for k, v in vars(cfg).items() if k != "worker"},
        "load_at_start": start_load,
        "note": "weak scaling: fixed batch and table rows per rank; 2 shared cores, "
                f"{cfg.threads} torch thread(s) per rank, gloo on loopback",
        "summary": summary,
        "runs": runs,
    }
    path = common.write_json(cfg.json, payload)
    print(f"wrote {path} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
