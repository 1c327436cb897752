"""Input throughput: today's Criteo TSV reader, the pyarrow TSV reader, the Parquet reader,
and the fused DLRM trainer's step rate, at one batch size, side by side.

The data: ``--rows`` Criteo-format lines (label, 13 counts with empty and negative
fields, 26 hex ids with empty ones) in ``--files`` TSV files, converted once (untimed)
to Parquet with ``recframe data convert``'s `convert_to_parquet`. Variants, interleaved
round by round (the order rotates) with the CPU other processes used recorded:

* ``old_tsv``: `recframe.data.CriteoTSVDataset`, one pass (rows/s);
* ``new_tsv``: `recframe.readers.criteo_tsv` (``--workers`` decoding threads), one pass;
* ``parquet``: `recframe.readers.TabularDataset` over the Parquet parts (lz4, what
  ``data convert`` writes by default), one pass; ``parquet_zstd``: the same rows
  written with ``--compression zstd`` (smaller files, more CPU to read);
  ``prepared``: the same rows written with ``data convert --prepare`` (lz4; transforms
  and id mappings applied at convert time: the reader only gathers and checks them);
* ``train_memory``: the `Trainer` on the fused path (`shard_model`, DLRM built from the
  Criteo schema) over batches decoded beforehand and held in memory: the step rate
  with no input cost (what training on pre-generated synthetic data runs at);
  ``train_memory_aa``: a second `Trainer` over the same batches: the A/A noise floor
  of every training ratio;
* ``train_synthetic``: the `Trainer` over `recframe.data.SyntheticCriteo` (what
  ``recframe train`` trains on without data files), with uniform ids (``alpha=0``,
  like this data's hashed ids) in tables of the same size: synthetic-data training as
  it runs, its batches generated each step (the issue's comparison);
* ``train_parquet`` / ``train_tsv`` / ``train_prepared``: a `Trainer` reading the
  Parquet / TSV / prepared Parquet files through the readers (real-data training).
  ``train_prepared_sync``: the prepared parts with no decoding threads
  (``num_workers=0``: the training thread decodes each block when it needs it).
  Every training variant trains one shared model and optimizer pair: two copies of
  one model, same data, trained 1.02-1.04x apart here (where their tables sit in
  memory), which would be charged to the input.

The first reader to iterate has glibc's malloc keep freed memory for the whole process
(`recframe.allocator.keep_freed_memory`, which the readers and the `Trainer` both set),
so every variant, the old reader and in-memory training included, runs under the same
allocator.

Goals: new_tsv >= 10x old_tsv, parquet >= 20x old_tsv, both >= 2x train_memory, and
real-data training (train_parquet, train_tsv, train_prepared) >= 0.95 of synthetic-data
training (train_synthetic) and, the stricter bar, of training on batches decoded
beforehand (train_memory: no input cost at all).
Each ratio is given in wall time (the goal) and in CPU time (samples per CPU-second of
this process: steadier on a loaded machine). For the training variants,
``decode share`` is the readers' read-and-decode CPU time
(`TabularDataset.decode_cpu_seconds`) over the process's CPU time in the round: what
input costs a step; ``cores used`` the process's CPU time over the wall time (what
training leaves idle on the machine's cores is where ``SCHED_IDLE`` decoding runs for
free); and ``input wait`` the share of the round's wall time the training
loop waited for decoded input (`TabularDataset.input_wait_seconds`). Also reported: the
bytes each of 2 ranks reads (goal <= 0.55 of the dataset), from readers built for rank
0 and 1 of 2.

Rounds: training rates drift by up to 20% between rounds on one machine (the same
variant, minutes apart), so every ratio is taken per round (variants run next to each
other) and the median over rounds is reported. Within a round the training variants run
in two halves of ``--train_steps / 2`` updates, the second half in the reverse order of
the first (A B C, C B A: every variant's two halves straddle the round's midpoint, so a
drift that is linear over the round cancels out of each ratio), then the reader passes
(their order rotating round by round). Each half restarts the readers' pipeline (the
first block of a ``train()`` call is decoded by the caller, about 0.5% of a 50-update
half), which training on real data pays once per ``train()``. The default: 8 rounds of
100 updates.

    .venv/bin/python benchmarks/input_throughput.py            # ~ 3 minutes
    .venv/bin/python benchmarks/input_throughput.py --quick    # smoke run, ~30 s
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common as common  # noqa: E402

GOALS = {"new_tsv/old_tsv": 10.0, "parquet/old_tsv": 20.0, "new_tsv/train_memory": 2.0,
         "parquet/train_memory": 2.0, "train_parquet/train_memory": 0.95,
         "train_tsv/train_memory": 0.95, "train_prepared/train_memory": 0.95,
         "train_parquet/train_synthetic": 0.95, "train_tsv/train_synthetic": 0.95,
         "train_prepared/train_synthetic": 0.95}
INFO = ("parquet_zstd/old_tsv", "prepared/old_tsv", "prepared/parquet",
        "train_memory_aa/train_memory", "train_prepared_sync/train_memory",
        "train_prepared/train_parquet")  # no goal
DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            "input_throughput.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, default=400_000, help="Criteo lines in the data set")
    p.add_argument("--files", type=int, default=4, help="TSV files (unequal sizes)")
    p.add_argument("--batch_size", type=int, default=2048)
    p.add_argument("--num_embeddings", type=int, default=100_000, help="rows per table")
    p.add_argument("--embedding_dim", type=int, default=16)
    p.add_argument("--workers", type=int, default=2, help="decoding threads of the readers")
    p.add_argument("--train_steps", type=int, default=100, help="updates per training round")
    p.add_argument("--rounds", type=int, default=8,
                   help="interleaved rounds (ratios are per-round pairs: their median)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 20k rows, 1 round, 8 updates, small tables")
    p.add_argument("--json", default=DEFAULT_JSON, help="where to write the JSON report")
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.rows, cfg.rounds, cfg.train_steps, cfg.num_embeddings = 20_000, 1, 8, 10_000
    return cfg


def write_data(cfg: argparse.Namespace, root: str) -> tuple[list[str], str]:
    """Criteo TSV files of unequal sizes, and their Parquet conversion (the default
    codec, lz4; also zstd under ``parquet_zstd`` and prepared, ``--prepare``, under
    ``parquet_prepared`` beside it)."""
    from recframe.readers import convert_to_parquet, criteo_tsv

    rng = random.Random(0)
    weights = [i + 1 for i in range(cfg.files)]
    counts = [cfg.rows * w // sum(weights) for w in weights]
    counts[-1] += cfg.rows - sum(counts)
    tsv_dir = os.path.join(root, "tsv")
    os.makedirs(tsv_dir)
    files = []
    for i, n in enumerate(counts):
        path = os.path.join(tsv_dir, f"day_{i}")
        with open(path, "w") as f:
            for _ in range(n):
                ints = [("" if rng.random() < 0.2 else str(int(rng.expovariate(0.01)) - 2))
                        for _ in range(13)]
                cats = [("" if rng.random() < 0.1 else f"{rng.getrandbits(32):08x}")
                        for _ in range(26)]
                f.write("\t".join([str(int(rng.random() < 0.25))] + ints + cats) + "\n")
        files.append(path)
    pq_dir = os.path.join(root, "parquet")
    # row groups of ~1/32 of the data (1024 to 65536 rows): a rank's span edge shares one
    group = min(65_536, max(1024, cfg.rows // 32))
    for codec, out, prepare in [("lz4", pq_dir, False), ("zstd", pq_dir + "_zstd", False),
                                ("lz4", pq_dir + "_prepared", True)]:
        convert_to_parquet(criteo_tsv(files, num_embeddings=cfg.num_embeddings,
                                      num_workers=0), out, compression=codec,
                           rows_per_file=cfg.rows // 4 + 1, row_group_size=group,
                           progress=False, prepare=prepare)
    return files, pq_dir


def one_pass(dataset: Any) -> int:
    return sum(b.labels.shape[0] for b in dataset)


class TrainLoop:
    """A fused-path `Trainer` (checkpoints off) over ``data``, run ``steps`` updates at a
    time. Every loop trains the same ``model`` (a `shared_model` triple): two copies of
    one model train at different speeds (where their tables sit in memory: an A/A pair
    of copies measured 1.02-1.04 apart here), which is not an input cost."""

    def __init__(self, cfg: argparse.Namespace, data: Any, out_dir: str,
                 model: tuple[Any, Any, Any]) -> None:
        from recframe import Trainer, TrainingArguments

        dmp, sparse, dense = model
        args = TrainingArguments(output_dir=out_dir, report_to="none", disable_tqdm=True,
                                 log_steps=10**9, save_steps=None, save_on_sigterm=False,
                                 dataloader_prefetch=2)
        self.trainer = Trainer(model=dmp, args=args, train_dataset=data,
                               dense_optimizers=(dense, None), sparse_optimizer=sparse)
        self.trainer.checkpoint_manager.step = lambda *a, **k: None  # no checkpoints
        self.steps = cfg.train_steps

    def run(self, steps: int) -> common.Timed:
        t = self.trainer
        before = t.state.samples_seen
        decode = getattr(t.train_dataset, "decode_cpu_seconds", None)
        wait = getattr(t.train_dataset, "input_wait_seconds", None)
        wall, cpu = time.perf_counter(), time.process_time()
        t.train(train_steps=t.global_step + steps)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        extra = {} if decode is None else {
            "decode_cpu_seconds": t.train_dataset.decode_cpu_seconds - decode}
        if wait is not None:
            extra["input_wait_seconds"] = t.train_dataset.input_wait_seconds - wait
        return common.Timed(t.state.samples_seen - before, wall, cpu, extra)


def shared_model(cfg: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The DLRM built from the Criteo schema on the fused path (`shard_model`), its
    sparse optimizer and a dense Adam: what every `TrainLoop` trains."""
    from recframe.models import DLRM
    from recframe.optim import dense_parameters
    from recframe.optim.fused import shard_model
    from recframe.schema import FeatureSchema

    torch.manual_seed(0)
    schema = FeatureSchema.criteo(cfg.num_embeddings, cfg.embedding_dim)
    dmp, sparse = shard_model(DLRM(schema=schema), optimizer="rowwise_adagrad", lr=0.05)
    return dmp, sparse, torch.optim.Adam(dense_parameters(dmp))


def _timed(name: str, r: int, position: int, body: Callable[[], Any]) -> common.RoundResult:
    """Run ``body`` once (after an untimed ``gc.collect()``), as `common.run_interleaved`
    does for each of its variants."""
    gc.collect()
    start = common.LoadSample.now()
    out = body()
    end = common.LoadSample.now()
    load = common.Load.between(start, end)
    if isinstance(out, common.Timed):
        return common.RoundResult(name, r, position, out.seconds, out.samples, load,
                                  out.cpu_seconds or end.own_cpu - start.own_cpu,
                                  {"call_seconds": end.wall - start.wall, **out.extra})
    return common.RoundResult(name, r, position, end.wall - start.wall, int(out), load,
                              end.own_cpu - start.own_cpu)


def _joined(a: common.RoundResult, b: common.RoundResult) -> common.RoundResult:
    """One variant's two halves of a round as one result (times and counts summed, the
    load averaged over the time)."""
    wall = a.seconds + b.seconds

    def mean(x: Optional[float], y: Optional[float]) -> Optional[float]:
        return None if x is None or y is None else (x * a.seconds + y * b.seconds) / wall

    load = common.Load(mean(a.load.own_cores, b.load.own_cores),  # type: ignore[arg-type]
                       mean(a.load.others_cores, b.load.others_cores),
                       mean(a.load.steal_cores, b.load.steal_cores),
                       a.load.minor_faults + b.load.minor_faults)
    extra = {k: a.extra[k] + b.extra[k] for k in a.extra if k in b.extra}
    return common.RoundResult(a.variant, a.round, a.position, wall, a.samples + b.samples,
                              load, a.cpu_seconds + b.cpu_seconds, extra)


def run_rounds(loops: dict[str, TrainLoop], passes: dict[str, Callable[[], int]],
               rounds: int, steps: int,
               on_round: Callable[[list[common.RoundResult]], None]) -> list[common.RoundResult]:
    """Each round: the training variants in two halves of ``steps / 2`` updates, the
    second in the reverse order of the first (the order rotating round by round), then
    the reader passes (rotating too). See the module docstring."""
    results: list[common.RoundResult] = []
    first = max(1, steps // 2)
    halves = [first, steps - first] if steps > first else [first]
    for r in range(rounds):
        names = list(loops)
        order = names[r % len(names):] + names[:r % len(names)]
        done: dict[str, common.RoundResult] = {}
        for h, n in enumerate(halves):
            for position, name in enumerate(order if h == 0 else order[::-1]):
                part = _timed(name, r, position, functools.partial(loops[name].run, n))
                done[name] = part if name not in done else _joined(done[name], part)
        names = list(passes)
        this_round = [done[name] for name in order]
        for position, name in enumerate(names[r % len(names):] + names[:r % len(names)]):
            this_round.append(_timed(name, r, len(order) + position, passes[name]))
        results.extend(this_round)
        on_round(this_round)
    return results


def bytes_per_rank(cfg: argparse.Namespace, files: list[str], pq_dir: str) -> dict[str, Any]:
    from recframe.readers import TabularDataset, criteo_tsv
    from recframe.schema import FeatureSchema

    out: dict[str, Any] = {}
    tsv_total = sum(os.path.getsize(f) for f in files)
    shares = []
    for rank in range(2):
        ds = criteo_tsv(files, batch_size=cfg.batch_size, rank=rank, world_size=2,
                        num_workers=cfg.workers)
        one_pass(ds)
        shares.append(ds.bytes_read / tsv_total)
    out["tsv"] = shares
    shares = []
    for rank in range(2):
        ds = TabularDataset(pq_dir, FeatureSchema.criteo(cfg.num_embeddings), rank=rank,
                            world_size=2, batch_size=cfg.batch_size, num_workers=cfg.workers)
        total = sum(sum(g) for g in ds._rg_bytes)
        one_pass(ds)
        shares.append(ds.bytes_read / total)
    out["parquet"] = shares
    return out


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    torch.set_num_threads(cfg.threads)
    from recframe.data import CriteoTSVDataset, SyntheticCriteo
    from recframe.distributed import init_default_group
    from recframe.readers import TabularDataset, criteo_tsv
    from recframe.schema import FeatureSchema

    started = time.perf_counter()
    root = tempfile.mkdtemp(prefix="recframe-input-")
    try:
        files, pq_dir = write_data(cfg, root)
        print(f"data: {cfg.rows} rows, {sum(os.path.getsize(f) for f in files) / 1e6:.1f} MB "
              f"TSV in {len(files)} files", flush=True)
        n, b, w = cfg.num_embeddings, cfg.batch_size, cfg.workers
        schema = FeatureSchema.criteo(n, cfg.embedding_dim)
        prepared = pq_dir + "_prepared"
        memory = list(TabularDataset(pq_dir, schema, batch_size=b, drop_last=True))
        # the first reader set glibc's malloc to keep freed memory, process-wide: every
        # variant below, the old reader and in-memory training too, runs under it
        from recframe.allocator import keep_freed_memory

        tuned = keep_freed_memory()
        print(f"glibc malloc keeps freed memory: {tuned}", flush=True)
        init_default_group()  # a gloo group of one (what shard_model uses)
        model = shared_model(cfg)
        loops = {
            "train_memory": TrainLoop(cfg, memory, os.path.join(root, "m"), model),
            "train_memory_aa": TrainLoop(cfg, memory, os.path.join(root, "m2"), model),
            "train_parquet": TrainLoop(cfg, TabularDataset(
                pq_dir, schema, batch_size=b, num_workers=w, drop_last=True),
                os.path.join(root, "p"), model),
            "train_tsv": TrainLoop(cfg, criteo_tsv(files, num_embeddings=n, batch_size=b,
                                                   num_workers=w, drop_last=True),
                                   os.path.join(root, "t"), model),
            "train_synthetic": TrainLoop(cfg, SyntheticCriteo(
                num_batches=None, batch_size=b, num_embeddings=n, alpha=0.0),
                os.path.join(root, "s"), model),
            "train_prepared": TrainLoop(cfg, TabularDataset(
                prepared, schema, batch_size=b, num_workers=w, drop_last=True),
                os.path.join(root, "pp"), model),
            "train_prepared_sync": TrainLoop(cfg, TabularDataset(
                prepared, schema, batch_size=b, num_workers=0, drop_last=True),
                os.path.join(root, "ps"), model),
        }
        passes = {
            "old_tsv": lambda: one_pass(CriteoTSVDataset(files, batch_size=b,
                                                         num_embeddings=n)),
            "new_tsv": lambda: one_pass(criteo_tsv(files, batch_size=b, num_embeddings=n,
                                                   num_workers=w)),
            "parquet": lambda: one_pass(TabularDataset(pq_dir, schema, batch_size=b,
                                                       num_workers=w)),
            "parquet_zstd": lambda: one_pass(TabularDataset(pq_dir + "_zstd", schema,
                                                            batch_size=b, num_workers=w)),
            "prepared": lambda: one_pass(TabularDataset(prepared, schema, batch_size=b,
                                                        num_workers=w)),
        }
        variants = [*loops, *passes]
        for loop in loops.values():  # warm-up (first steps build fbgemm kernels)
            loop.trainer.train(train_steps=loop.trainer.global_step + 2)

        def show(this_round: list[common.RoundResult]) -> None:
            cells = "  ".join(f"{x.variant}={x.samples_per_sec:,.0f}/s" for x in this_round)
            print(f"round {this_round[0].round}: {cells}  {common.round_load(this_round)}",
                  flush=True)

        results = run_rounds(loops, passes, cfg.rounds, cfg.train_steps, show)
        shares = bytes_per_rank(cfg, files, pq_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rates = {name: common.summarize([x.samples_per_sec for x in common.per_variant(
        results, name)]) for name in variants}
    cpu_rates = {name: common.summarize([x.samples_per_cpu_sec for x in common.per_variant(
        results, name)]) for name in variants}
    ratios = {}
    for key, goal in [*GOALS.items(), *((k, None) for k in INFO)]:
        num, den = key.split("/")
        per_round = common.round_ratios(results, num, den)
        median = common.summarize(per_round)["median"]
        cpu = common.summarize(common.round_ratios(results, num, den, cpu=True))["median"]
        ratios[key] = {"median": median, "per_round": per_round, "cpu_median": cpu,
                       "goal": goal, "meets_goal": None if median is None or goal is None
                       else median >= goal}
    decode_share = {name: common.summarize([
        x.extra["decode_cpu_seconds"] / x.cpu_seconds for x in common.per_variant(
            results, name) if "decode_cpu_seconds" in x.extra and x.cpu_seconds > 0]
    )["median"] for name in loops if name != "train_memory"}
    wait_share = {name: common.summarize([
        x.extra["input_wait_seconds"] / x.seconds for x in common.per_variant(
            results, name) if "input_wait_seconds" in x.extra and x.seconds > 0]
    )["median"] for name in loops if name != "train_memory"}
    cores = {name: common.summarize([x.load.own_cores for x in common.per_variant(
        results, name)])["median"] for name in variants}
    print(common.format_table(
        ["variant", "samples/s (median)", "samples/CPU-s", "cores used", "decode share",
         "input wait"],
        [[k, f"{v['median']:,.0f}", f"{cpu_rates[k]['median']:,.0f}", f"{cores[k]:.2f}",
          "" if decode_share.get(k) is None else f"{decode_share[k]:.3f}",
          "" if wait_share.get(k) is None else f"{wait_share[k]:.3f}"]
         for k, v in rates.items()]))
    print(common.format_table(
        ["ratio", "median", "CPU-time", "goal", "met"],
        [[k, f"{v['median']:.2f}", f"{v['cpu_median']:.2f}", v["goal"] or "-",
          v["meets_goal"]] for k, v in ratios.items()]))
    print(f"bytes read per rank of 2 (share of the data set): TSV "
          f"{[round(s, 3) for s in shares['tsv']]}, Parquet "
          f"{[round(s, 3) for s in shares['parquet']]} (goal <= 0.55)")
    payload = {
        "benchmark": "input_throughput",
        "timestamp": common.timestamp(),
        "wall_seconds": time.perf_counter() - started,
        "machine": common.machine_info(),
        "torch": common.torch_info(),
        "packages": common.package_versions(["torch", "torchrec", "pyarrow", "numpy"]),
        "config": vars(cfg),
        "rates": rates,
        "cpu_rates": cpu_rates,
        "cores_used": cores,
        "decode_share": decode_share,
        "input_wait_share": wait_share,
        "ratios": ratios,
        "bytes_per_rank_of_2": shares,
        "keeps_freed_memory": tuned,
        "rounds": [x.to_dict() for x in results],
    }
    path = common.write_json(cfg.json, payload)
    print(f"wrote {path} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
