"""Row-wise lazy optimizers for embedding tables with sparse gradients.

For ``nn.EmbeddingBag``/``nn.Embedding(sparse=True)`` (or any 2-D table whose gradient is
a sparse COO tensor) each step touches only the rows present in the gradient: repeated
ids are merged first (``coalesce``: their gradients are summed), then each optimizer
updates those rows and their state. Dense gradients are accepted too; their non-zero
rows are updated the same way (a row whose gradient is exactly zero counts as
untouched).

Update rules, for a touched row ``i`` with merged gradient ``g`` and learning rate
``lr`` (``eps`` added after the square root, as torch does):

- `SparseSGD`:        ``w_i -= lr * g``
- `SparseAdagrad`:    ``s_i += g*g`` (element-wise); ``w_i -= lr * g / (sqrt(s_i) + eps)``
- `RowWiseAdagrad`:   ``s_i += mean(g*g)`` (one scalar per row, as fbgemm);
  ``w_i -= lr * g / (sqrt(s_i) + eps)``
- `SparseAdam`:       torch's SparseAdam: ``m_i = b1 m_i + (1-b1) g``,
  ``v_i = b2 v_i + (1-b2) g*g``, ``w_i -= lr * sqrt(1-b2^t)/(1-b1^t) * m_i / (sqrt(v_i)+eps)``
  with ``t`` the optimizer's step count (untouched rows keep stale moments: lazy Adam)
- `SparseAdamW`:      SparseAdam plus decoupled weight decay on the touched rows only:
  ``w_i *= 1 - lr * weight_decay`` before the Adam update.

Step counts (`SparseAdam`'s ``t``) are per table and advance on every ``step`` in which
the table has a gradient, as torch's SparseAdam counts them.

Gradient accumulation: sparse gradients of k micro-batches add up (autograd
concatenates their indices), the trainer's view calls `scale_accumulated_gradients`
with 1/k, which is folded into the next ``step`` (applied once to the merged rows,
without materialising a scaled copy of the uncoalesced gradient), and the coalesce
above merges repeated ids across micro-batches, so one update on k micro-batches
equals one update on their concatenation (the mean over micro-batches).

`warn_if_dense_optimizer_holds_tables` is the check that a *dense* optimizer was not
built over an embedding table by mistake.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn


def _rows_and_values(p: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if p.dim() != 2:
        raise ValueError(
            f"sparse optimizers update 2-D embedding tables, got a parameter of shape "
            f"{tuple(p.shape)}; give it to the dense optimizer"
        )
    if grad.is_sparse and grad.sparse_dim() != 1:
        grad = grad.to_dense()  # not a row-sparse (embedding) gradient
    if grad.is_sparse:
        grad = grad.coalesce()
        return grad._indices()[0], grad._values()
    rows = grad.ne(0).any(dim=1).nonzero().squeeze(1)
    return rows, grad.index_select(0, rows)


class RowSparseOptimizer(torch.optim.Optimizer):
    """Base of recframe's sparse optimizers: ``step`` hands each table's touched rows
    and merged gradients to `update_rows`. ``param_groups[i]["lr"]`` drives the learning
    rate, so torch LR schedulers work unchanged."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._grad_scale = 1.0
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        name = type(self).__name__
        lr = group.get("lr")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0:
            raise ValueError(f"{name}(lr={lr!r}): lr must be a number >= 0")
        if "eps" in group and not (isinstance(group["eps"], (int, float)) and group["eps"] > 0):
            raise ValueError(f"{name}(eps={group['eps']!r}): eps must be > 0")
        for p in group["params"]:
            if p.dim() != 2:
                raise ValueError(
                    f"{name} updates 2-D embedding tables, got a parameter of shape "
                    f"{tuple(p.shape)}; give it to the dense optimizer "
                    "(recframe.optim.dense_parameters(model))"
                )

    # --- accumulation -------------------------------------------------------------
    def scale_accumulated_gradients(self, factor: float) -> None:
        """Multiply the gradients by ``factor`` at the next `step` (the trainer's view
        passes 1/k at the end of a window of k micro-batches)."""
        self._grad_scale *= float(factor)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._grad_scale = 1.0
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale, self._grad_scale = self._grad_scale, 1.0
        observers = self.__dict__.get("row_observers", ())
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, values = _rows_and_values(p, p.grad)
                for observe in observers:  # e.g. a RowTracker (incremental checkpoints)
                    observe(p, rows)
                values = values.to(p.dtype)
                if scale != 1.0:
                    values = values * scale
                self.update_rows(p, rows, values, group, self.state[p])
        return loss

    def update_rows(
        self,
        p: torch.Tensor,
        rows: torch.Tensor,
        grad: torch.Tensor,
        group: dict[str, Any],
        state: dict[str, Any],
    ) -> None:
        """Update rows ``rows`` of ``p`` (unique, possibly none) with their merged
        gradients ``grad`` ``[len(rows), dim]``, and their ``state``."""
        raise NotImplementedError  # each optimizer below implements its rule


class SparseSGD(RowSparseOptimizer):
    """Plain SGD on the touched rows."""

    def __init__(self, params: Iterable[Any], lr: float = 0.01) -> None:
        super().__init__(params, {"lr": lr})

    def update_rows(self, p, rows, grad, group, state) -> None:
        p.index_add_(0, rows, grad, alpha=-group["lr"])


class SparseAdagrad(RowSparseOptimizer):
    """Element-wise Adagrad on the touched rows."""

    def __init__(
        self, params: Iterable[Any], lr: float = 0.01, eps: float = 1e-10,
        initial_accumulator_value: float = 0.0,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "eps": eps, "initial_accumulator_value": initial_accumulator_value}
        )

    def update_rows(self, p, rows, grad, group, state) -> None:
        if "sum" not in state:
            state["sum"] = torch.full_like(p, group["initial_accumulator_value"])
        s = state["sum"].index_select(0, rows).addcmul_(grad, grad)
        state["sum"].index_copy_(0, rows, s)
        p.index_add_(0, rows, grad / s.sqrt_().add_(group["eps"]), alpha=-group["lr"])


class RowWiseAdagrad(RowSparseOptimizer):
    """Adagrad with one accumulator per row (the mean of the squared gradient), as
    fbgemm's rowwise Adagrad: 1/dim of Adagrad's state."""

    def __init__(self, params: Iterable[Any], lr: float = 0.01, eps: float = 1e-10) -> None:
        super().__init__(params, {"lr": lr, "eps": eps})

    def update_rows(self, p, rows, grad, group, state) -> None:
        if "sum" not in state:
            state["sum"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
        s = state["sum"].index_select(0, rows).add_(grad.float().pow(2).mean(dim=1))
        state["sum"].index_copy_(0, rows, s)
        scale = (s.sqrt_().add_(group["eps"])).reciprocal_().to(grad.dtype)
        p.index_add_(0, rows, grad * scale.unsqueeze(1), alpha=-group["lr"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for state in self.state.values():  # torch casts state to the table's dtype
            if "sum" in state:
                state["sum"] = state["sum"].float()


class SparseAdam(RowSparseOptimizer):
    """Lazy Adam (torch's SparseAdam rule) on the touched rows."""

    decoupled = False

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 0.0,
    ) -> None:
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"{type(self).__name__}(betas={betas!r}): each must be in [0, 1)")
        if weight_decay < 0:
            raise ValueError(f"{type(self).__name__}(weight_decay={weight_decay!r}) must be >= 0")
        if weight_decay and not self.decoupled:
            raise ValueError(
                "SparseAdam(weight_decay=...) is not supported (a coupled decay would touch "
                "every row); use SparseAdamW for decoupled decay on touched rows"
            )
        super().__init__(
            params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        )

    def update_rows(self, p, rows, grad, group, state) -> None:
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        b1, b2 = group["betas"]
        lr = group["lr"]
        if self.decoupled and group["weight_decay"]:
            p.index_copy_(0, rows, p.index_select(0, rows).mul_(1 - lr * group["weight_decay"]))
        # m += (1-b1)(g-m), v += (1-b2)(g*g-v): torch SparseAdam's arithmetic, as one
        # lerp each (few kernels: each costs a parallel region on the touched rows)
        m = state["exp_avg"].index_select(0, rows).lerp_(grad, 1 - b1)
        v = state["exp_avg_sq"].index_select(0, rows).lerp_(grad * grad, 1 - b2)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)
        step_size = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        p.index_add_(0, rows, m.div_(v.sqrt_().add_(group["eps"])), alpha=-step_size)


class SparseAdamW(SparseAdam):
    """SparseAdam with decoupled weight decay applied to the touched rows only."""

    decoupled = True

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


SPARSE_OPTIMIZERS: dict[str, type[RowSparseOptimizer]] = {
    "sgd": SparseSGD,
    "adagrad": SparseAdagrad,
    "rowwise_adagrad": RowWiseAdagrad,
    "adam": SparseAdam,
    "adamw": SparseAdamW,
}


def build_sparse_optimizer(
    model: nn.Module, name: str = "rowwise_adagrad", **hparams: Any
) -> RowSparseOptimizer:
    """A sparse optimizer by name over ``model``'s embedding tables."""
    from recframe.optim.core import sparse_parameters

    key = name.lower()
    if key not in SPARSE_OPTIMIZERS:
        raise ValueError(
            f"unknown sparse optimizer {name!r}; choose from {sorted(SPARSE_OPTIMIZERS)}"
        )
    params = sparse_parameters(model)
    if not params:
        raise ValueError("the model has no embedding tables for a sparse optimizer")
    return SPARSE_OPTIMIZERS[key](params, **hparams)


def default_sparse_optimizer(
    model: nn.Module, sparse_params: Iterable[torch.Tensor], dense_optimizer: Any = None
) -> Any:
    """The sparse optimizer a `Trainer` uses when none is given, or None.

    A model sharded by `recframe.optim.fused.shard_model` (or any torchrec
    ``DistributedModelParallel`` whose tables carry a fused optimizer) gets its fused
    optimizer behind recframe's interface: stepping its tables with another optimizer
    would be wrong, and its state would be missing from checkpoints. Otherwise the
    tables that neither a fused kernel nor ``dense_optimizer`` update get
    `RowWiseAdagrad` (lr 0.01, RecIS's and torchrec's usual choice).
    """
    fused = getattr(model, "fused_optimizer", None)
    if fused is not None and list(getattr(fused, "params", {}) or {}):
        from recframe.optim.fused import FusedSparseOptimizer

        return FusedSparseOptimizer(model)
    held = {id(p) for g in getattr(dense_optimizer, "param_groups", []) for p in g["params"]}
    orphans = [
        p for p in sparse_params
        if id(p) not in held and not getattr(p, "_in_backward_optimizers", None)
    ]
    return RowWiseAdagrad(orphans, lr=0.01) if orphans else None


# --- a dense optimizer must not hold embedding tables ----------------------------------
def _table_kind(module: nn.Module, p: torch.Tensor) -> str:
    """How a table parameter is updated: ``"fused"`` (inside backward, torchrec),
    ``"sparse"`` (sparse COO gradients) or ``"dense"`` (a dense full-table gradient)."""
    if getattr(p, "_in_backward_optimizers", None):
        return "fused"
    if getattr(module, "sparse", False):
        return "sparse"
    return "dense"


def warn_if_dense_optimizer_holds_tables(optimizer: Any, model: nn.Module) -> None:
    """Check that the *dense* optimizer ``optimizer`` holds none of ``model``'s embedding
    tables (``nn.Embedding``/``nn.EmbeddingBag``, torchrec collections, sharded or not).

    Raises ``ValueError`` for tables with sparse gradients (``sparse=True``: most torch
    optimizers reject them, and those that accept them would update every row their
    state touches) and for tables updated inside backward by torchrec's fused optimizer
    (``shard_model``: the dense optimizer never sees a gradient for them). Warns
    (``UserWarning``) for tables with dense gradients: that trains, but every update
    steps every row of the table (and, for Adam, decays full-table moments). The fix
    either way: build the dense optimizer over ``recframe.optim.dense_parameters(model)``
    and give the tables to a sparse optimizer.
    """
    from recframe.optim.core import _sparse_module_types, optimizer_parameters

    if optimizer is None:
        return
    held = {id(p) for p in optimizer_parameters(optimizer)}
    if not held:
        return
    kinds = _sparse_module_types()
    rank = {"dense": 0, "sparse": 1, "fused": 2}
    found: dict[int, tuple[str, str, torch.Tensor]] = {}
    for mod_name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        for p_name, p in module.named_parameters():
            if id(p) not in held:
                continue
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            kind = _table_kind(module, p)
            previous = found.get(id(p))
            if previous is None:
                found[id(p)] = (name, kind, p)
            elif rank[kind] > rank[previous[1]]:  # e.g. an EBC and its nn.EmbeddingBag
                found[id(p)] = (previous[0], kind, p)
    if not found:
        return
    opt_name = type(optimizer).__name__
    fix = (
        "build the dense optimizer over recframe.optim.dense_parameters(model) and give "
        "the tables to a sparse optimizer (recframe.optim.sparse.build_sparse_optimizer"
        "(model, 'rowwise_adagrad'), or shard_model's fused optimizer)"
    )

    def names(kind: str) -> Optional[str]:
        rows = [
            f"{name} ({'x'.join(str(d) for d in p.shape)})"
            for name, k, p in found.values() if k == kind
        ]
        return ", ".join(rows) if rows else None

    fused, sparse, dense = names("fused"), names("sparse"), names("dense")
    if fused or sparse:
        parts = []
        if sparse:
            parts.append(f"tables with sparse gradients: {sparse}")
        if fused:
            parts.append(
                f"tables updated inside backward by torchrec's fused optimizer: {fused}"
            )
        raise ValueError(
            f"the dense optimizer ({opt_name}) holds embedding tables it cannot update: "
            f"{'; '.join(parts)}. {fix[0].upper()}{fix[1:]}"
        )
    warnings.warn(
        f"the dense optimizer ({opt_name}) holds embedding tables with dense gradients: "
        f"{dense}. It steps every row of them on every update (full-table gradients"
        f"{' and moments' if 'adam' in opt_name.lower() else ''}); {fix}",
        UserWarning,
        stacklevel=2,
    )
