"""`DynamicEmbeddingHook`: the step boundary of dynamic embedding tables.

RecIS's ``HashTableFilterHook(filter_interval)`` evicts stale ids from its hash tables;
this hook does the same for recframe's dynamic tables (`recframe.dynamic`) and also
commits their admissions. After every optimizer update (``after_step``, i.e. at the end
of a gradient-accumulation window, so every micro-batch of a window saw one mapping)
it calls `recframe.dynamic.end_step`: count the window's ids, evict every
``eviction_interval`` steps (the schema's setting per table), admit, reset the rows
that changed owner and their optimizer state, and mark them for incremental
checkpoints. It adds ``dynamic/<table>/rows_used`` to the step's metrics. Works with
both sparse back ends (recframe's row-wise optimizers; torchrec's fused sharded tables,
reset shard by shard) and on several ranks (the map is replicated).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from recframe.hooks.base import Hook

if TYPE_CHECKING:
    from recframe.trainer import Trainer


class DynamicEmbeddingHook(Hook):
    """Admission and eviction of dynamic tables after each update (add it to a
    `Trainer` whose model has dynamic tables; ``recframe train`` adds it)."""

    priority = -90  # right after the update, before hooks that read the metrics

    def __init__(self) -> None:
        self._targets: Any = None
        self._model: Any = None

    def before_train(self, trainer: Trainer) -> None:
        from recframe.dynamic import dynamic_targets

        self._model = trainer.unwrapped_model
        self._targets = dynamic_targets(self._model)  # resolved once, used every step

    def after_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        from recframe.dynamic import end_step

        model = trainer.unwrapped_model
        used = end_step(
            model,
            trainer.state.global_step,
            trainer.sparse_optimizer.optimizer,
            getattr(trainer.checkpoint_manager, "tracker", None),
            self._targets if model is self._model else None,
        )
        for table, n in used.items():
            metrics[f"dynamic/{table}/rows_used"] = n

    def after_restore(self, trainer: Trainer, step: int) -> None:
        from recframe.dynamic import remappers

        for remapper in remappers(trainer.unwrapped_model):
            for m in remapper.maps.values():
                m.discard_pending()
