"""recframe: a training framework for recommendation models.

Separate dense and sparse optimizers, exact gradient accumulation, a hook registry,
and crash-proof sharded checkpoints on any fsspec path.
"""

from recframe.console import install_filters

install_filters()  # before torchrec/fbgemm are imported: see recframe/console.py

from recframe.arguments import TrainingArguments  # noqa: E402
from recframe.hooks import Event, Hook, HookError  # noqa: E402
from recframe.metrics import add_metric, add_predictions, get_global_metrics  # noqa: E402
from recframe.state import TrainerControl, TrainerState  # noqa: E402
from recframe.trainer import Trainer  # noqa: E402

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
