"""Chain restore of two (or more) recframe checkouts side by side: a 10-delta chain and a
full checkpoint of the same step, restored cold (files evicted from the page cache
first) and warm, interleaved round by round.

One worker process per checkout (``PYTHONPATH`` = the checkout; the model, training
and chain of `incremental_checkpoint.py`, each worker saving with its own code), rounds
rotated across workers so drift in the machine's load hits all alike. Each worker
checks every restore is bit-identical to the state saved. Prints, per version and
mode, medians (min-max) of chain and full restore seconds (wall and CPU) and the
chain/full ratio, and per-round ratios of each version against the first; writes them
to ``--json``.

    .venv/bin/python benchmarks/chain_restore_versions.py \\
        --versions before=/path/to/old/checkout,now=.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

os.environ.setdefault("OMP_NUM_THREADS", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_JSON = os.path.join(HERE, "results", "chain_restore_versions.json")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--versions", default=f"now={os.path.dirname(HERE)}",
                   help="name=checkout,... (the first is the reference of the ratios)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--rows", type=int, default=250_000)
    p.add_argument("--chain", type=int, default=10)
    p.add_argument("--phases", default="cold,warm")
    p.add_argument("--dir", default=None, help="where checkpoints are written (tmp)")
    p.add_argument("--json", default=DEFAULT_JSON)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(cfg: argparse.Namespace) -> int:
    """Build the model and chain with this checkout's code, then per stdin line ("cold"
    or "warm") restore the chain and the full checkpoint (alternating order) and
    answer one JSON line of [wall, cpu] seconds."""
    import logging
    import warnings

    sys.path.insert(0, HERE)
    import incremental_checkpoint as ic  # (inserts this checkout's root: put it back)
    from checkpoint_io import evict

    root = os.path.abspath(os.environ["PYTHONPATH"].split(os.pathsep)[0])
    sys.path[:] = [root] + [p for p in sys.path if os.path.abspath(p) != os.path.dirname(HERE)]
    import torch

    import recframe

    assert os.path.abspath(recframe.__file__).startswith(root), recframe.__file__
    from recframe.checkpoint import CheckpointManager, Saver

    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    icfg = ic.parse_args(["--rows", str(cfg.rows), "--chain", str(cfg.chain)])
    dmp, sparse, dense, batches = ic.build(icfg)
    loop = ic.Loop(dmp, sparse, dense, batches)
    loop.train(20)
    workdir = tempfile.mkdtemp(prefix="recframe-chain-versions-", dir=cfg.dir)
    try:
        inc_dir, full_dir = os.path.join(workdir, "inc"), os.path.join(workdir, "full")
        inc = CheckpointManager(Saver(dmp, sparse, output_dir=inc_dir, max_keep=10**6),
                                incremental=True, full_checkpoint_every=cfg.chain + 1)
        full = Saver(dmp, sparse, output_dir=full_dir, max_keep=10**6)
        inc.save(loop.step)
        for _ in range(cfg.chain):
            loop.train(icfg.restore_interval)
            path = inc.save(loop.step)
        inc.tracker.detach()
        full_path = full.save(loop.step)
        expected = ic.flat_state(dmp, sparse)
        print("ready", flush=True)
        for n, line in enumerate(sys.stdin):
            phase = line.strip()
            if phase not in ("cold", "warm"):
                break
            order = [("chain", inc.saver, path, inc_dir), ("full", full, full_path, full_dir)]
            out: dict[str, Any] = {}
            for name, saver, target, files in order[::-1] if n % 2 else order:
                loop.train(1)  # move the live state away from the checkpoint (untimed)
                loop.step -= 1
                if phase == "cold":
                    evict(files)
                else:
                    saver.load(ckpt_path=target)
                c0, t0 = time.process_time(), time.perf_counter()
                saver.load(ckpt_path=target)
                out[name] = [time.perf_counter() - t0, time.process_time() - c0]
                if not ic.same(ic.flat_state(dmp, sparse), expected):
                    raise SystemExit(f"{cfg.worker}: a {phase} {name} restore differs")
            print(json.dumps(out), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _cell(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"


def main(argv: Optional[list[str]] = None) -> int:
    cfg = parse_args(argv)
    if cfg.worker:
        return worker(cfg)
    versions = dict(item.split("=", 1) for item in cfg.versions.split(",") if item)
    phases = [p for p in cfg.phases.split(",") if p]
    procs = {}
    for name, root in versions.items():
        env = dict(os.environ, PYTHONPATH=os.path.abspath(root))
        args = [sys.executable, os.path.abspath(__file__), "--worker", name, "--rows",
                str(cfg.rows), "--chain", str(cfg.chain)] + (["--dir", cfg.dir] if cfg.dir else [])
        procs[name] = subprocess.Popen(args, env=env, cwd=os.path.abspath(root),
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rounds: dict[str, dict[str, list[dict[str, list[float]]]]] = {n: {} for n in versions}
    try:
        for name, proc in procs.items():
            if proc.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
                raise RuntimeError(f"the worker of {name} ({versions[name]}) failed")
        names = list(versions)
        for phase in phases:
            for r in range(cfg.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    proc = procs[name]
                    proc.stdin.write(phase + "\n")  # type: ignore[union-attr]
                    proc.stdin.flush()  # type: ignore[union-attr]
                    answer = proc.stdout.readline()  # type: ignore[union-attr]
                    if not answer:
                        raise RuntimeError(f"the worker of {name} failed")
                    rounds[name].setdefault(phase, []).append(json.loads(answer))
    finally:
        for proc in procs.values():
            with contextlib.suppress(OSError):
                proc.stdin.close()  # type: ignore[union-attr]
            proc.wait()
    summary: dict[str, Any] = {}
    ref = names[0]
    for phase in phases:
        for name in names:
            rr = rounds[name][phase]
            entry = {f"{k}_{m}": _cell([x[k][i] for x in rr]) for k in ("chain", "full")
                     for i, m in ((0, "s"), (1, "cpu_s"))}
            entry["chain/full"] = _cell([x["chain"][0] / x["full"][0] for x in rr])
            if name != ref:
                for k in ("chain", "full"):
                    for i, m in ((0, "wall"), (1, "cpu")):
                        entry[f"{k} {name}/{ref} {m}"] = _cell(
                            [y[k][i] / x[k][i] for x, y in zip(rounds[ref][phase], rr)])
            summary[f"{name} {phase}"] = entry
            print(f"{name} {phase}: " + ", ".join(f"{k} {v}" for k, v in entry.items()))
    os.makedirs(os.path.dirname(os.path.abspath(cfg.json)) or ".", exist_ok=True)
    with open(cfg.json, "w") as f:
        json.dump({"versions": versions, "rows": cfg.rows, "chain": cfg.chain,
                   "summary": summary, "rounds": rounds}, f, indent=1)
    print(f"wrote {cfg.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
