"""Save-decision and preservation policies: small objects, as in Orbax.

A save policy answers "save at this step?"; a preservation policy picks the committed
checkpoints to keep. `CheckpointManager` combines them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Optional, Protocol

from recframe.checkpoint.saver import CheckpointInfo


class SavePolicy(Protocol):
    def should_save(self, step: int, last_saved_step: int, last_saved_time: float) -> bool: ...


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

    def should_save(self, step: int, last_saved_step: int, last_saved_time: float) -> bool:
        if step <= last_saved_step:
            return False
        if self.steps and step % self.steps == 0:
            return True
        return bool(self.seconds and time.monotonic() - last_saved_time >= self.seconds)


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
