"""Hooks: the event API of the training loop and the built-in hooks.

``Hook`` subclasses override the events they need; ``HookRegistry`` calls them in
priority order (lower first). Built-ins: `LoggerHook` (log lines),
`TensorBoardHook` (event files), `JsonlLoggerHook` (a metrics.jsonl file),
`RunConfigHook` (run_config.json), `ProgressBarHook` (tqdm), `EarlyStoppingHook`,
`DynamicEmbeddingHook` (admission/eviction of dynamic tables) and `ProfilerHook`
(torch.profiler traces).
"""

from recframe.hooks.base import Event, Hook, HookError, HookRegistry
from recframe.hooks.dynamic import DynamicEmbeddingHook
from recframe.hooks.early_stopping import EarlyStoppingHook
from recframe.hooks.jsonl import JsonlLoggerHook
from recframe.hooks.logger import LoggerHook
from recframe.hooks.profiler import ProfilerHook
from recframe.hooks.progress import ProgressBarHook
from recframe.hooks.run_config import RunConfigHook
from recframe.hooks.tensorboard import TensorBoardHook

__all__ = [
    "DynamicEmbeddingHook",
    "EarlyStoppingHook",
    "Event",
    "Hook",
    "HookError",
    "HookRegistry",
    "JsonlLoggerHook",
    "LoggerHook",
    "ProfilerHook",
    "ProgressBarHook",
    "RunConfigHook",
    "TensorBoardHook",
]
