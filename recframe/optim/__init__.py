"""Optimizers as the trainer sees them.

- `recframe.optim.core`: accumulation-aware views and the sparse/dense parameter split;
- `recframe.optim.sparse`: row-wise lazy optimizers for sparse-gradient embedding tables
  (SparseAdam, SparseAdamW, Adagrad, RowWiseAdagrad, SGD);
- `recframe.optim.fused`: torchrec's fused fbgemm optimizers behind the same interface,
  with exact gradient accumulation.
"""

from typing import Any

from recframe.optim.core import (
    SPARSE_MODULE_TYPES,
    WEIGHTINGS,
    AccumulationWindow,
    OptimizerView,
    SchedulerView,
    _sparse_module_types,
    check_disjoint,
    current_lr,
    default_dense_optimizer,
    dense_parameters,
    filter_out_sparse_param,
    optimizer_parameters,
    rescale_accumulated,
    scale_gradients,
    sparse_parameters,
    split_sparse_dense_parameters,
)


def sparse_module_types() -> tuple[type, ...]:
    """The module types whose parameters are embedding tables (sparse): torch's
    ``Embedding``/``EmbeddingBag`` and torchrec's collections, sharded or not (torchrec
    is imported here: callers without torchrec modules may use `SPARSE_MODULE_TYPES`)."""
    return _sparse_module_types()


def has_optimizer_in_backward(param: Any) -> bool:
    """Whether torchrec fused an optimizer into ``param``'s backward (its update runs
    inside the embedding kernel: no ``.grad``, no separate optimizer step)."""
    return bool(getattr(param, "_in_backward_optimizers", None))


def unwrap_model(model: Any, depth: int = 8) -> Any:
    """The user's module inside torchrec's ``DistributedModelParallel`` and torch's
    ``DistributedDataParallel`` wrappers (any nesting)."""
    from torch import nn

    current = model
    for _ in range(depth):
        inner = getattr(current, "_dmp_wrapped_module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(current, "module", None)
        if not isinstance(inner, nn.Module) or inner is current:
            break
        current = inner
    return current

__all__ = [
    "SPARSE_MODULE_TYPES",
    "WEIGHTINGS",
    "AccumulationWindow",
    "OptimizerView",
    "SchedulerView",
    "check_disjoint",
    "current_lr",
    "default_dense_optimizer",
    "dense_parameters",
    "filter_out_sparse_param",
    "has_optimizer_in_backward",
    "optimizer_parameters",
    "rescale_accumulated",
    "scale_gradients",
    "sparse_module_types",
    "sparse_parameters",
    "split_sparse_dense_parameters",
    "unwrap_model",
]
