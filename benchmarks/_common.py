"""Helpers shared by recframe's benchmarks: interleaved timing, CPU-load checks,
summaries, a plain-text table and the JSON report.

Benchmarks on this machine kind share 2 cores with whatever else runs, and one busy
neighbour process slows training several-fold. So every comparison here is
*interleaved* (variant A, B, A, B... with the order rotated each round, so a slow
drift hits every variant alike), every round records how much CPU other processes
used while it ran, and results are medians of per-round numbers plus per-round ratios
(both sides of a ratio measured seconds apart).

Nothing here imports recframe or torchrec; torch is imported only where asked for.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, Optional, Union

BUSY_NEIGHBOUR_CORES = 0.15
"""Other processes using more than this many cores make a round suspect (the
threshold under which the measured baselines were taken)."""


# --- CPU load --------------------------------------------------------------------
def _system_busy_seconds() -> Optional[tuple[float, float]]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    # user nice system idle iowait irq softirq steal guest guest_nice
    user, nice, system, _idle, _iowait, irq, softirq = ticks[:7]
    steal = ticks[7] if len(ticks) > 7 else 0
    # guest time is already counted in user/nice
    return (user + nice + system + irq + softirq) / hz, steal / hz


@dataclass
class LoadSample:
    """A point in time: wall clock, this process's CPU time, the machine's busy time."""

    wall: float
    own_cpu: float
    system: Optional[tuple[float, float]]
    minor_faults: int = 0
    """This process's minor page faults so far (first touches of fresh memory)."""

    @classmethod
    def now(cls) -> LoadSample:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        return cls(time.perf_counter(), time.process_time(), _system_busy_seconds(), faults)


@dataclass
class Load:
    """CPU use between two `LoadSample`s, in cores (1.0 = one core busy all along)."""

    own_cores: float
    others_cores: Optional[float]
    """Cores used by every other process (None where /proc/stat is unavailable)."""
    steal_cores: Optional[float]
    """Cores the hypervisor took away (VM steal time)."""
    minor_faults: int = 0
    """Minor page faults this process took in between (fresh memory touched)."""

    @classmethod
    def between(cls, start: LoadSample, end: LoadSample) -> Load:
        wall = max(end.wall - start.wall, 1e-9)
        own = (end.own_cpu - start.own_cpu) / wall
        faults = end.minor_faults - start.minor_faults
        if start.system is None or end.system is None:
            return cls(own, None, None, faults)
        busy = (end.system[0] - start.system[0]) / wall
        steal = (end.system[1] - start.system[1]) / wall
        # /proc/stat ticks are coarse (10 ms): clamp the small negative noise
        return cls(own, max(busy - own, 0.0), max(steal, 0.0), faults)

    @property
    def busy_neighbour(self) -> bool:
        return self.others_cores is not None and self.others_cores > BUSY_NEIGHBOUR_CORES


def measure_idle_load(seconds: float = 1.0) -> Load:
    """CPU used by other processes while this one sleeps for ``seconds``."""
    start = LoadSample.now()
    time.sleep(seconds)
    return Load.between(start, LoadSample.now())


def wait_for_quiet(
    max_wait: float = 30.0, threshold: float = BUSY_NEIGHBOUR_CORES, probe: float = 1.0
) -> Load:
    """Wait (up to ``max_wait`` s) until other processes use at most ``threshold``
    cores over a ``probe``-second window; returns the last measurement."""
    deadline = time.perf_counter() + max_wait
    while True:
        load = measure_idle_load(probe)
        if load.others_cores is None or load.others_cores <= threshold:
            return load
        if time.perf_counter() >= deadline:
            return load
        print(
            f"  waiting for quiet: other processes use {load.others_cores:.2f} cores",
            file=sys.stderr,
            flush=True,
        )


# --- interleaved rounds ----------------------------------------------------------
@dataclass
class RoundResult:
    """One variant's timing in one round."""

    variant: str
    round: int
    position: int
    """Where the variant ran within its round (0 = first)."""
    seconds: float
    samples: int
    load: Load
    cpu_seconds: float = 0.0
    """CPU time this process used (all its threads): less sensitive than wall time to
    other processes taking the cores, though not immune (shared caches)."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_sec(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def samples_per_cpu_sec(self) -> float:
        return self.samples / self.cpu_seconds if self.cpu_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["samples_per_sec"] = self.samples_per_sec
        out["samples_per_cpu_sec"] = self.samples_per_cpu_sec
        out["busy_neighbour"] = self.load.busy_neighbour
        return out


@dataclass
class Timed:
    """What a body returns when it times its own work: ``seconds`` replaces the wall
    time of the whole call (kept as ``extra["call_seconds"]``), e.g. to leave out a
    per-call set-up or tear-down that a real run pays once, not once per round."""

    samples: int
    seconds: float
    cpu_seconds: Optional[float] = None
    """This process's CPU time over the same span (None: that of the whole call)."""
    extra: dict[str, Any] = field(default_factory=dict)


Variant = Callable[[int], Union[int, Timed]]
"""A timed body: called with the round number, runs the round's work and returns the
number of samples it processed (then the whole call is timed) or a `Timed`."""


def run_interleaved(
    variants: Mapping[str, Variant],
    rounds: int,
    collect_garbage: bool = True,
    on_round: Optional[Callable[[list[RoundResult]], None]] = None,
    before_round: Optional[Callable[[int], None]] = None,
    quiet_wait: float = 0.0,
) -> list[RoundResult]:
    """Run every variant once per round, rotating the order each round
    (A B C, B C A, C A B, ...) so each runs first equally often.

    ``gc.collect()`` runs (untimed) before each body when ``collect_garbage``, so one
    variant does not pay for garbage another left behind. ``before_round(r)`` runs
    untimed before each round (e.g. `wait_for_quiet`); ``on_round`` gets each
    finished round's results (e.g. to print them). ``quiet_wait > 0``: before each round,
    wait up to that many seconds for other processes to go quiet.
    """
    names = list(variants)
    results: list[RoundResult] = []
    for r in range(rounds):
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        if quiet_wait > 0:
            wait_for_quiet(max_wait=quiet_wait, probe=0.5)
        if before_round is not None:
            before_round(r)
        this_round: list[RoundResult] = []
        for position, name in enumerate(order):
            if collect_garbage:
                gc.collect()
            start = LoadSample.now()
            out = variants[name](r)
            end = LoadSample.now()
            call_seconds = end.wall - start.wall
            cpu = end.own_cpu - start.own_cpu
            if isinstance(out, Timed):
                samples, seconds = out.samples, out.seconds
                if out.cpu_seconds is not None:
                    cpu = out.cpu_seconds
                extra = {"call_seconds": call_seconds, **out.extra}
            else:
                samples, seconds, extra = out, call_seconds, {}
            this_round.append(
                RoundResult(
                    variant=name,
                    round=r,
                    position=position,
                    seconds=seconds,
                    samples=int(samples),
                    load=Load.between(start, end),
                    cpu_seconds=cpu,
                    extra=extra,
                )
            )
        results.extend(this_round)
        if on_round is not None:
            on_round(this_round)
    return results


def round_load(this_round: Sequence[RoundResult]) -> str:
    """``others=X cores`` for a printed round line, flagged when a neighbour was busy."""
    others = max((x.load.others_cores or 0.0) for x in this_round)
    flag = "  BUSY NEIGHBOUR" if any(x.load.busy_neighbour for x in this_round) else ""
    return f"others={others:.2f} cores{flag}"


def per_variant(results: Sequence[RoundResult], variant: str) -> list[RoundResult]:
    return sorted((x for x in results if x.variant == variant), key=lambda x: x.round)


def round_ratios(
    results: Sequence[RoundResult], numerator: str, denominator: str, cpu: bool = False
) -> list[float]:
    """samples/s (``cpu``: samples per CPU-second) of ``numerator`` over
    ``denominator``, round by round."""

    def rate(x: RoundResult) -> float:
        return x.samples_per_cpu_sec if cpu else x.samples_per_sec

    num = {x.round: rate(x) for x in results if x.variant == numerator}
    den = {x.round: rate(x) for x in results if x.variant == denominator}
    return [num[r] / den[r] for r in sorted(num) if r in den and den[r] > 0]


# --- statistics ------------------------------------------------------------------
def summarize(values: Sequence[float]) -> dict[str, Optional[float]]:
    """median, mean, min, max, stdev and the interquartile range of ``values``."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return {"n": 0, "median": None, "mean": None, "min": None, "max": None,
                "stdev": None, "q1": None, "q3": None}
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]
    return {
        "n": len(vals),
        "median": statistics.median(vals),
        "mean": statistics.fmean(vals),
        "min": vals[0],
        "max": vals[-1],
        "stdev": statistics.stdev(vals) if len(vals) >= 2 else 0.0,
        "q1": q1,
        "q3": q3,
    }


# --- environment -----------------------------------------------------------------
def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _mem_total_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    try:
        affinity: Optional[int] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        loadavg: Optional[list[float]] = list(os.getloadavg())
    except OSError:
        loadavg = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "mem_total_gib": _mem_total_gib(),
        "loadavg_at_start": loadavg,
        # allocator and threading settings change CPU training speed noticeably
        "env": {k: v for k, v in sorted(os.environ.items())
                if k.startswith(("MALLOC_", "OMP_", "MKL_", "KMP_")) or k == "LD_PRELOAD"},
    }


def package_versions(names: Sequence[str]) -> dict[str, Optional[str]]:
    """Installed distribution versions (None when not installed)."""
    out: dict[str, Optional[str]] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def torch_info() -> dict[str, Any]:
    """torch's version, threads and build flags that change CPU speed."""
    import torch

    return {
        "version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "openmp": torch.backends.openmp.is_available(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


# --- output ----------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned table (floats with 3 significant decimals where sensible)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            if abs(v) >= 1000:
                return f"{v:,.0f}"
            if abs(v) >= 10:
                return f"{v:.1f}"
            return f"{v:.3f}"
        return "-" if v is None else str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in text]
    return "\n".join(lines)


def write_json(path: str, payload: Mapping[str, Any]) -> str:
    """Write ``payload`` as indented JSON, atomically (tmp file + rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, float):
        return float(obj)
    return str(obj)


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


__all__ = [
    "BUSY_NEIGHBOUR_CORES",
    "Load",
    "LoadSample",
    "RoundResult",
    "Timed",
    "Variant",
    "format_table",
    "machine_info",
    "measure_idle_load",
    "package_versions",
    "per_variant",
    "round_ratios",
    "run_interleaved",
    "summarize",
    "timestamp",
    "torch_info",
    "wait_for_quiet",
    "write_json",
]
