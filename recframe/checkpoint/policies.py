"""Every "when to save" and "what to keep" rule of checkpoints, as small objects (as in
Orbax's ``save_decision_policy.py`` / ``preservation_policy.py``).

*When to save*: `SaveDecisionPolicy.decide` gets a `SaveContext` (step, seconds since
the last save, whether this rank saw a preemption signal, world size, force) and
returns a `SaveDecision`. It combines the step interval and the wall-time interval
(`IntervalPolicy`) with preemption, and with several ranks it makes them agree: the
step interval is the same on every rank, wall time and SIGTERM are not, so those two
count only every ``agree_every`` steps, where the ranks take the max over ranks (one
rank's SIGTERM or timer saves, and stops, all). One rank is the same path with a
reduction over one value.

*What to keep*: `KeepPolicy.deletable` picks the committed checkpoints retention
deletes: a preservation policy (`LatestN`, `BestN`, `AnyOf`) selects, the protected
steps (the checkpoint just written, the one restored from until a newer one
commits) are added, and a kept incremental checkpoint keeps its chain (base and
earlier deltas). `Saver` only writes and deletes what it is told.

`FullEvery` decides which incremental save is a full one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, Protocol

from recframe import distributed
from recframe.checkpoint.saver import CheckpointInfo

# --- when to save ---------------------------------------------------------------------
NEVER = 2**62
"""A step no run reaches: `SaveDecisionPolicy.next_decision_step` when no rule can fire."""


@dataclass(frozen=True)
class SaveContext:
    """What a save decision sees at one optimizer update."""

    step: int
    last_saved_step: int
    seconds_since_save: float
    preemption: bool = False
    """This rank saw a preemption signal (SIGTERM) not yet acted upon."""
    world_size: int = 1
    force: bool = False
    """The caller asks for a save (end of training, ``control.should_save``)."""


@dataclass(frozen=True)
class SaveDecision:
    save: bool
    preempt: bool = False
    """Every rank agreed that a preemption signal arrived: save now, then stop."""


class SavePolicy(Protocol):
    def should_save(self, ctx: SaveContext) -> bool: ...


class IntervalPolicy:
    """Save every ``steps`` optimizer updates and/or every ``seconds`` of wall time."""

    def __init__(self, steps: Optional[int] = None, seconds: Optional[float] = None) -> None:
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or steps < 0):
            raise ValueError(f"save interval steps={steps!r} must be an integer >= 0 or None")
        if seconds is not None and not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError(f"save interval seconds={seconds!r} must be > 0 or None")
        self.steps = steps or None
        self.seconds = seconds

    def step_due(self, ctx: SaveContext) -> bool:
        """The step rule (the same on every rank)."""
        return bool(self.steps and ctx.step % self.steps == 0 and ctx.step > ctx.last_saved_step)

    def time_due(self, ctx: SaveContext) -> bool:
        """The wall-time rule (rank-local: ranks must agree on it)."""
        return bool(self.seconds and ctx.seconds_since_save >= self.seconds
                    and ctx.step > ctx.last_saved_step)

    def should_save(self, ctx: SaveContext) -> bool:
        return self.step_due(ctx) or self.time_due(ctx)


class SaveDecisionPolicy:
    """The one "save at this step?" decision (see the module docstring).

    Args:
        interval: the step / wall-time rules.
        agree_every: with several ranks, the steps at which rank-local signals (wall
            time, preemption) are agreed on by one all-reduce.
        on_preemption: whether a preemption signal asks for a save.
        reduce_max: the max-over-ranks reduction (`recframe.distributed`).
    """

    NOTHING, TIMER, PREEMPTION = 0, 1, 2

    def __init__(
        self, interval: IntervalPolicy, agree_every: int = 16, on_preemption: bool = False,
        reduce_max: Callable[[int], int] = distributed.all_reduce_max_int,
    ) -> None:
        self.interval = interval
        self.agree_every = max(1, int(agree_every))
        self.on_preemption = on_preemption
        self.reduce_max = reduce_max

    def next_decision_step(self, step: int, world_size: int) -> int:
        """The first step after ``step`` at which `decide` can answer anything but "no
        save" when nothing forces a save and this rank saw no preemption signal: the
        next multiple of the step interval, every step under a wall-time interval (one
        rank), the next agreement step where ranks look at rank-local signals. Steps
        before it need no `decide` (the caller's per-update check is then O(1))."""
        steps, local = self.interval.steps, bool(self.interval.seconds)
        if world_size > 1:
            local = local or self.on_preemption
            if local and self.agree_every == 1:
                return step + 1
        elif local:
            return step + 1  # the wall-time rule may fire at any step
        candidates = [(step // n + 1) * n for n in (steps, self.agree_every if local else None)
                      if n]
        return min(candidates) if candidates else NEVER

    def decide(self, ctx: SaveContext) -> SaveDecision:
        signal = self.PREEMPTION if ctx.preemption else (
            self.TIMER if self.interval.time_due(ctx) else self.NOTHING)
        if ctx.world_size > 1:
            # rank-local signals count only where every rank looks at them (the same step)
            local_rules = bool(self.interval.seconds) or self.on_preemption
            if local_rules and ctx.step % self.agree_every == 0:
                signal = self.reduce_max(signal)
            else:
                signal = self.NOTHING
        preempt = signal >= self.PREEMPTION
        if ctx.force or preempt:
            return SaveDecision(ctx.step != ctx.last_saved_step, preempt)
        due = self.interval.step_due(ctx) or (
            signal == self.TIMER and ctx.step > ctx.last_saved_step)
        return SaveDecision(due, False)


class FullEvery:
    """Incremental checkpoints: every ``n``-th save is a full checkpoint, the ``n - 1``
    between are deltas (``n=1``: always full). Bounds a restore's chain to ``n - 1``
    deltas and the storage a chain pins."""

    def __init__(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"full_checkpoint_every={n!r} must be an integer >= 1")
        self.n = n

    def needs_full(self, deltas_since_full: int) -> bool:
        """Whether the next save must be full, given the deltas since the last full one."""
        return deltas_since_full + 1 >= self.n


# --- what to keep ---------------------------------------------------------------------
class PreservationPolicy(Protocol):
    def select(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]: ...


class LatestN:
    """Keep the ``n`` newest checkpoints."""

    def __init__(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_keep={n!r} must be an integer >= 1")
        self.n = n

    def select(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        return {c.step for c in sorted(checkpoints, key=lambda c: c.step)[-self.n:]}


class BestN:
    """Keep the ``n`` checkpoints with the best eval ``metric`` (recorded at save time)."""

    def __init__(self, metric: str, mode: str = "max", n: int = 1) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"keep-best mode={mode!r} must be 'min' or 'max'")
        self.metric, self.mode, self.n = metric, mode, n

    def select(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        scored = [
            c for c in checkpoints
            if isinstance(c.metrics.get(self.metric), (int, float))
            and math.isfinite(c.metrics[self.metric])
        ]
        scored.sort(key=lambda c: c.metrics[self.metric], reverse=self.mode == "max")
        return {c.step for c in scored[: self.n]}


class AnyOf:
    """Keep what any of the policies keeps."""

    def __init__(self, *policies: PreservationPolicy) -> None:
        self.policies = policies

    def select(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        kept: set[int] = set()
        for policy in self.policies:
            kept |= policy.select(checkpoints)
        return kept


class KeepPolicy:
    """Every "what to keep" rule: ``preservation`` (max_keep, keep-best), the
    checkpoint restored from (kept until a newer one commits), protected steps (the one
    just written) and incremental chains (a kept delta keeps its base and earlier
    deltas)."""

    def __init__(self, preservation: PreservationPolicy) -> None:
        self.preservation = preservation
        self.restored_step: Optional[int] = None

    def restored(self, step: int) -> None:
        """The run resumed from ``step``: keep it until a newer checkpoint commits."""
        self.restored_step = step

    def committed(self, step: int) -> None:
        if self.restored_step is not None and step > self.restored_step:
            self.restored_step = None  # a newer one is committed: no longer protected

    def kept(self, found: Sequence[CheckpointInfo], protect: Optional[set[int]] = None
             ) -> set[int]:
        from recframe.checkpoint.incremental import keep_closure

        keep = self.preservation.select(found) | set(protect or ())
        if self.restored_step is not None:
            keep.add(self.restored_step)
        return keep_closure(found, keep)

    def deletable(self, found: Sequence[CheckpointInfo], protect: Optional[set[int]] = None
                  ) -> list[CheckpointInfo]:
        """The checkpoints of ``found`` (this run's own, see `Saver.owned`) to delete."""
        keep = self.kept(found, protect)
        return [c for c in found if c.step not in keep]
