"""Serving: throughput and latency of the eager model vs the exported artifacts (fp32
and int8 tables), the artifacts' sizes, and freshness (a newer checkpoint applied to an
artifact vs a full re-export).

Model: `recframe.models.DLRM` with the incremental-checkpoint benchmark's tables
(``--tables`` tables of ``--rows`` x ``--dim``), trained ``2 x --interval`` updates on
`SyntheticCriteo` (power-law ids) with incremental checkpoints: ``ckpt_<interval>`` full,
``ckpt_<2 interval>`` a delta.

1. **Export**: fp32 and int8 artifacts of the delta checkpoint (`recframe.export`);
   bytes of each. Goal: int8 <= 0.35x fp32.
2. **Serving**: for batch sizes ``--batches`` (1, 64, 1024), interleaved rounds (order
   rotated each round) of ``--calls`` calls each of the eager model
   (``model.predict(batch)`` on already mapped ids: the model only), the eager model
   behind the artifact's preprocessing (``eager+pre``: `ServingModule` on raw values,
   the same work as the artifact), the fp32 artifact and the int8 artifact
   (``torch.export.load(...).module()(dense, values, lengths)``); predictions/s,
   p50/p99 wall latency and the p50 of the call's CPU time (this thread's: on a shared
   machine the wall time also holds other jobs' turns on the core). Goals: fp32
   artifact >= 1.0x eager; int8 >= 0.9x fp32 at batch 1024; ``cpu_*`` ratios repeat
   them from the CPU-time medians.
3. **Freshness**: interleaved rounds of (a) `recframe.export.apply_checkpoint` of the
   delta onto the artifact of the full checkpoint and (b) a full `export` of the delta,
   both fp32; wall seconds (and this process's CPU seconds) from the committed delta to
   the updated artifact file. ``--only freshness`` runs just this part (and the
   training and exports it needs), ``--only serving`` just part 2.

    flock /tmp/recframe-bench.lock .venv/bin/python benchmarks/serving.py
    .venv/bin/python benchmarks/serving.py --quick      # smoke, small tables
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
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common as common  # noqa: E402
import torch  # noqa: E402

DEFAULT_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                            "serving.json")
GOALS = {"fp32_vs_eager": 1.0, "int8_vs_fp32_at_1024": 0.9, "int8_size_ratio": 0.35}


def _args(argv: Any = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", type=int, default=8)
    p.add_argument("--rows", type=int, default=250_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--interval", type=int, default=20, help="updates between checkpoints")
    p.add_argument("--train-batch", type=int, default=1024)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 1024])
    p.add_argument("--calls", type=int, default=200, help="calls per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fresh-rounds", type=int, default=3)
    p.add_argument("--dir", default=None, help="where checkpoints and artifacts go")
    p.add_argument("--json", default=DEFAULT_JSON)
    p.add_argument("--quick", action="store_true", help="small tables, few calls (smoke)")
    p.add_argument("--only", choices=["serving", "freshness"], default=None,
                   help="run only the serving-speed part or only the freshness part")
    ns = p.parse_args(argv)
    if ns.quick:
        ns.rows, ns.interval, ns.calls, ns.rounds, ns.fresh_rounds = 20_000, 4, 20, 1, 1
        ns.train_batch = 256
    return ns


def _train(ns: argparse.Namespace, root: str) -> tuple[Any, dict[str, Any]]:
    from recframe import Trainer, TrainingArguments
    from recframe.data import SyntheticCriteo
    from recframe.models import DLRM

    torch.manual_seed(0)
    kwargs = {"dense_arch": [64, ns.dim], "over_arch": [64, 1]}
    model = DLRM(num_embeddings=ns.rows, embedding_dim=ns.dim, num_dense=13,
                 sparse_features=[f"cat_{i}" for i in range(ns.tables)], **kwargs)
    data = SyntheticCriteo(num_batches=2 * ns.interval, batch_size=ns.train_batch,
                           num_embeddings=ns.rows, num_sparse=ns.tables, alpha=ns.alpha)
    args = TrainingArguments(output_dir=os.path.join(root, "run"), train_steps=2 * ns.interval,
                             save_steps=ns.interval, max_to_keep=5,
                             incremental_checkpoints=True, report_to="none",
                             disable_tqdm=True, log_steps=10_000)
    Trainer(model=model, args=args, train_dataset=data).train()
    return model.eval(), kwargs


def _latencies(fn: Any, inputs: list[Any], calls: int) -> tuple[list[float], list[float]]:
    """Wall and this thread's CPU seconds per call (the CPU time leaves out the time
    other jobs on a shared machine take the core away)."""
    wall, cpu = [], []
    with torch.no_grad():
        for i in range(calls):
            x = inputs[i % len(inputs)]
            c, t = time.thread_time(), time.perf_counter()
            fn(x)
            wall.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)
    return wall, cpu


def _variant(fn: Any, inputs: list[Any], batch: int, calls: int) -> Any:
    def body(r: int) -> common.Timed:
        lat, cpu = _latencies(fn, inputs, calls)
        return common.Timed(calls * batch, sum(lat), extra={"lat": lat, "cpu": cpu})

    return body


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main(argv: Any = None) -> int:
    ns = _args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from recframe import export as ex

    root = tempfile.mkdtemp(prefix="serving-", dir=ns.dir)
    try:
        idle = common.measure_idle_load()
        model, kwargs = _train(ns, root)
        delta_ckpt = os.path.join(root, "run", f"ckpt_{2 * ns.interval}")
        opts = {"model": "dlrm", "model_kwargs": kwargs, "num_embeddings": ns.rows,
                "embedding_dim": ns.dim}
        schema = ex.synthetic_schema(ns.rows, ns.dim, num_sparse=ns.tables)
        opts["schema"] = schema
        art = {q: ex.export(delta_ckpt, os.path.join(root, f"{q}.pt2"), quantize=q, **opts)
               for q in ("fp32", "int8")}
        sizes = {q: a.bytes for q, a in art.items()}
        print(f"export: fp32 {sizes['fp32'] / 2**20:.1f} MiB in {art['fp32'].seconds:.1f} s, "
              f"int8 {sizes['int8'] / 2**20:.1f} MiB in {art['int8'].seconds:.1f} s "
              f"({sizes['int8'] / sizes['fp32']:.3f}x)", flush=True)
        serving: dict[str, Any] = {}
        if ns.only != "freshness":
            serving = _serving(ns, ex, model, schema, art)
        fresh_out = _freshness(ns, ex, root, opts) if ns.only != "serving" else {}
        ratios: dict[str, Any] = {"int8_size_ratio": sizes["int8"] / sizes["fp32"]}
        if serving:
            bss = ns.batches
            for key in ("fp32_vs_eager", "fp32_vs_eager_pre", "cpu_fp32_vs_eager",
                        "cpu_fp32_vs_eager_pre"):
                ratios[key] = {bs: serving[str(bs)][key] for bs in bss}
            ratios["int8_vs_fp32_at_1024"] = serving.get("1024", {}).get("int8_vs_fp32")
            ratios["cpu_int8_vs_fp32_at_1024"] = serving.get("1024", {}).get("cpu_int8_vs_fp32")
            print("fp32 artifact vs eager model.predict on mapped ids (the goal's 'eager'), "
                  "throughput per batch size: "
                  + ", ".join(f"{bs}: {ratios['fp32_vs_eager'][bs]:.2f}x" for bs in bss))
            print("fp32 artifact vs eager preprocessing + model.predict on raw ids (the same "
                  "work as the artifact): "
                  + ", ".join(f"{bs}: {ratios['fp32_vs_eager_pre'][bs]:.2f}x" for bs in bss))
        if fresh_out:
            ratios["apply_vs_full_export_speedup"] = (fresh_out["full_export_seconds"]
                                                      / fresh_out["apply_delta_seconds"])
            ratios["cpu_apply_vs_full_export_speedup"] = (
                fresh_out["full_export_cpu_seconds"] / fresh_out["apply_delta_cpu_seconds"])
        print("ratios: " + ", ".join(f"{k}={v}" for k, v in ratios.items()))
        payload = {
            "benchmark": "serving", "timestamp": common.timestamp(),
            "config": vars(ns), "machine": common.machine_info(),
            "versions": common.package_versions(["torch", "torchrec", "fbgemm-gpu-cpu"]),
            "idle_load_others_cores": idle.others_cores,
            "sizes_bytes": sizes, "export_seconds": {q: a.seconds for q, a in art.items()},
            "serving": serving, "freshness": fresh_out, "ratios": ratios, "goals": GOALS,
        }
        print(f"wrote {common.write_json(ns.json, payload)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _serving(ns: argparse.Namespace, ex: Any, model: Any, schema: Any,
             art: dict[str, Any]) -> dict[str, Any]:
    """Part 2: interleaved calls of the four variants per batch size."""
    from recframe.data import SyntheticCriteo

    programs = {q: ex.load_artifact(a.path)[0].module() for q, a in art.items()}
    # the eager model behind the artifact's own preprocessing (raw values in: the
    # dense fill/transforms and id mapping): the same work as the artifact, eagerly
    eager_raw = ex.ServingModule(model, schema).eval()

    # one thread per serving call (as a serving process runs one per request): on a
    # shared machine two OpenMP threads wait on each other's turns at every op
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    serving: dict[str, Any] = {}
    rows = []
    for bs in ns.batches:
        batches = list(SyntheticCriteo(num_batches=8, batch_size=bs, num_embeddings=ns.rows,
                                       num_sparse=ns.tables, alpha=ns.alpha, seed=9))
        inputs = [ex.serving_inputs(b, schema.feature_names) for b in batches]
        variants = {
            "eager": _variant(model.predict, batches, bs, ns.calls),
            "eager+pre": _variant(lambda i: eager_raw(*i), inputs, bs, ns.calls),
            "fp32": _variant(lambda i: programs["fp32"](*i), inputs, bs, ns.calls),
            "int8": _variant(lambda i: programs["int8"](*i), inputs, bs, ns.calls),
        }
        for v in variants.values():  # warm-up, untimed
            v(-1)
        results = common.run_interleaved(variants, ns.rounds)
        entry: dict[str, Any] = {}
        for name in variants:
            mine = common.per_variant(results, name)
            lat = [x for r in mine for x in r.extra["lat"]]
            cpu = [x for r in mine for x in r.extra["cpu"]]
            entry[name] = {
                "predictions_per_sec": statistics.median(r.samples_per_sec for r in mine),
                "p50_ms": 1e3 * _pct(lat, 0.5), "p99_ms": 1e3 * _pct(lat, 0.99),
                "cpu_p50_ms": 1e3 * _pct(cpu, 0.5),
            }
            rows.append([bs, name, f"{entry[name]['predictions_per_sec']:,.0f}",
                         f"{entry[name]['p50_ms']:.3f}", f"{entry[name]['p99_ms']:.3f}",
                         f"{entry[name]['cpu_p50_ms']:.3f}"])
        entry["fp32_vs_eager"] = statistics.median(
            common.round_ratios(results, "fp32", "eager"))
        entry["fp32_vs_eager_pre"] = statistics.median(
            common.round_ratios(results, "fp32", "eager+pre"))
        entry["int8_vs_fp32"] = statistics.median(
            common.round_ratios(results, "int8", "fp32"))
        # the same ratios from the per-call CPU-time medians (robust to a busy machine)
        cpu50 = {n: entry[n]["cpu_p50_ms"] for n in variants}
        entry["cpu_fp32_vs_eager"] = cpu50["eager"] / cpu50["fp32"]
        entry["cpu_fp32_vs_eager_pre"] = cpu50["eager+pre"] / cpu50["fp32"]
        entry["cpu_int8_vs_fp32"] = cpu50["fp32"] / cpu50["int8"]
        entry["others_cores"] = max(r.load.others_cores or 0.0 for r in results)
        serving[str(bs)] = entry
    torch.set_num_threads(threads)
    print(common.format_table(["batch", "variant", "pred/s", "p50 ms", "p99 ms", "cpu p50 ms"],
                              rows))
    return serving


def _freshness(ns: argparse.Namespace, ex: Any, root: str, opts: dict[str, Any]) -> dict:
    """Part 3: seconds from the committed delta to an updated artifact file, applying
    the delta onto the full checkpoint's artifact vs a full re-export of the delta."""
    run = os.path.join(root, "run")
    full_ckpt = os.path.join(run, f"ckpt_{ns.interval}")
    delta_ckpt = os.path.join(run, f"ckpt_{2 * ns.interval}")
    base = os.path.join(root, "base.pt2")
    ex.export(full_ckpt, base, quantize="fp32", **opts)

    def apply(r: int) -> common.Timed:
        live = os.path.join(root, "live.pt2")
        shutil.copy(base, live)
        cpu = time.process_time()
        info = ex.apply_checkpoint(live, delta_ckpt)
        return common.Timed(1, info.seconds, extra={"changed_rows": info.changed_rows,
                                                    "cpu": time.process_time() - cpu})

    def full(r: int) -> common.Timed:
        cpu = time.process_time()
        info = ex.export(delta_ckpt, os.path.join(root, "re.pt2"), quantize="fp32", **opts)
        return common.Timed(1, info.seconds, extra={"cpu": time.process_time() - cpu})

    fresh = common.run_interleaved({"apply_delta": apply, "full_export": full},
                                   ns.fresh_rounds)
    apply_s = statistics.median(r.seconds for r in common.per_variant(fresh, "apply_delta"))
    full_s = statistics.median(r.seconds for r in common.per_variant(fresh, "full_export"))
    changed = common.per_variant(fresh, "apply_delta")[0].extra["changed_rows"]
    share = sum(changed.values()) / (ns.tables * ns.rows)
    cpu = {k: statistics.median(r.extra["cpu"] for r in common.per_variant(fresh, k))
           for k in ("apply_delta", "full_export")}
    print(f"freshness: apply delta {apply_s:.2f} s vs full re-export {full_s:.2f} s wall "
          f"({full_s / apply_s:.2f}x), CPU {cpu['apply_delta']:.2f} s vs "
          f"{cpu['full_export']:.2f} s ({cpu['full_export'] / cpu['apply_delta']:.2f}x); "
          f"{share:.1%} of the rows changed")
    return {"apply_delta_seconds": apply_s, "full_export_seconds": full_s,
            "apply_delta_cpu_seconds": cpu["apply_delta"],
            "full_export_cpu_seconds": cpu["full_export"], "changed_row_share": share}


if __name__ == "__main__":
    sys.exit(main())
