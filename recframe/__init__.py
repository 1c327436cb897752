"""recframe: a training framework for recommendation models.

Separate dense and sparse optimizers, exact gradient accumulation, a hook registry,
and crash-proof sharded checkpoints on any fsspec path.
"""

from recframe.arguments import TrainingArguments
from recframe.hooks import Event, Hook, HookError
from recframe.metrics import add_metric, add_predictions, get_global_metrics
from recframe.state import TrainerControl, TrainerState
from recframe.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "Event",
    "Hook",
    "HookError",
    "Trainer",
    "TrainerControl",
    "TrainerState",
    "TrainingArguments",
    "__version__",
    "add_metric",
    "add_predictions",
    "get_global_metrics",
]
