"""Optimizers as the trainer sees them.

- `recframe.optim.core`: accumulation-aware views and the sparse/dense parameter split;
- `recframe.optim.sparse`: row-wise lazy optimizers for sparse-gradient embedding tables
  (SparseAdam, SparseAdamW, Adagrad, RowWiseAdagrad, SGD);
- `recframe.optim.fused`: torchrec's fused fbgemm optimizers behind the same interface,
  with exact gradient accumulation.
"""

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

__all__ = [
    "SPARSE_MODULE_TYPES",
    "WEIGHTINGS",
    "AccumulationWindow",
    "OptimizerView",
    "SchedulerView",
    "_sparse_module_types",
    "check_disjoint",
    "current_lr",
    "default_dense_optimizer",
    "dense_parameters",
    "filter_out_sparse_param",
    "optimizer_parameters",
    "rescale_accumulated",
    "scale_gradients",
    "sparse_parameters",
    "split_sparse_dense_parameters",
]
