"""Checkpoints: `Saver` (one checkpoint: concurrent sharded writes, crash-proof commit,
no pickle) and `CheckpointManager` (ties together the save and keep policies of
`recframe.checkpoint.policies`, the writers of `recframe.checkpoint.async_writer`, the
writer lock of `recframe.checkpoint.lock`, restore and incremental checkpoints:
`recframe.checkpoint.incremental`)."""

from recframe.checkpoint.async_writer import AsyncWriter, SyncWriter
from recframe.checkpoint.format import CheckpointCorruptError
from recframe.checkpoint.lock import WriterLock, WriterLockError
from recframe.checkpoint.manager import CheckpointManager
from recframe.checkpoint.policies import (
    BestN,
    FullEvery,
    IntervalPolicy,
    KeepPolicy,
    LatestN,
    SaveContext,
    SaveDecision,
    SaveDecisionPolicy,
)
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
    "AsyncWriter",
    "BestN",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "FullEvery",
    "IntervalPolicy",
    "KeepPolicy",
    "LatestN",
    "SaveContext",
    "SaveDecision",
    "SaveDecisionPolicy",
    "Saver",
    "Storage",
    "StorageError",
    "SyncWriter",
    "WriterLock",
    "WriterLockError",
    "split_model_state",
]
