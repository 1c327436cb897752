"""Checkpoints: `Saver` (one checkpoint: concurrent sharded writes, crash-proof commit,
no pickle) and `CheckpointManager` (interval, retention, restore, async, SIGTERM,
incremental checkpoints: `recframe.checkpoint.incremental`)."""

from recframe.checkpoint.format import CheckpointCorruptError
from recframe.checkpoint.manager import CheckpointManager
from recframe.checkpoint.policies import BestN, FullEvery, IntervalPolicy, LatestN
from recframe.checkpoint.saver import (
    PARTS,
    CheckpointError,
    CheckpointInfo,
    Saver,
    split_model_state,
)
from recframe.checkpoint.storage import Storage, StorageError

__all__ = [
    "PARTS",
    "BestN",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "FullEvery",
    "IntervalPolicy",
    "LatestN",
    "Saver",
    "Storage",
    "StorageError",
    "split_model_state",
]
