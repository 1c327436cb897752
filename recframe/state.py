"""`TrainerState` (where the run is) and `TrainerControl` (what hooks ask for)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass
class TrainerState:
    """Progress of a run; saved in every checkpoint so resume continues exactly.

    ``global_step`` counts optimizer updates, never micro-batches.
    """

    global_step: int = 0
    epoch: int = 0
    micro_step: int = 0
    samples_seen: int = 0
    max_steps: Optional[int] = None
    epoch_batches: int = 0
    """Micro-batches consumed in the current epoch (dataset position fallback)."""
    skipped_updates: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)
    best_metric: Optional[float] = None
    evaluated_step: Optional[int] = None
    """``global_step`` of the last evaluation run as part of training (an interval or a
    ``train_and_evaluate`` round): a resumed run redoes a round's evaluation that its
    checkpoint does not hold, and never one that it does."""
    stopped: bool = False
    """A hook stopped training early (``control.should_stop``; a SIGTERM preemption does
    not count). Checkpointed, so a restarted run does not train again unless asked to."""
    stop_target: Optional[dict[str, int]] = None
    """The target of the call that stopped: ``{"steps": n}`` or ``{"epochs": n}``; a
    later call continues only with a larger target (or ``resume_training``)."""

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)


@dataclass
class TrainerControl:
    """Flags hooks set to steer the loop (as in HF's ``TrainerControl``).

    The trainer reads them after each event and clears the one-shot flags
    (``should_save``, ``should_evaluate``, ``should_log``) once acted upon.
    """

    should_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False

    def reset_step_flags(self) -> None:
        self.should_save = False
        self.should_evaluate = False
        self.should_log = False
