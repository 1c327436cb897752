"""Optimizers as the trainer sees them: accumulation-aware views, and the split of a
model's parameters into sparse (embedding tables) and dense ones.

Gradient accumulation works by *views*. The trainer hands ``_train_step`` a view of
each optimizer and of the LR scheduler; a RecIS-style step (zero_grad, forward,
backward, step, scheduler step on every micro-batch) then trains correctly, because:

- ``zero_grad()`` acts only on the first micro-batch of a window;
- ``step()`` acts only on the last one: it first divides the summed gradients by the
  number of micro-batches in the window (so they are the mean, as one big batch
  gives), clips dense gradients to ``max_grad_norm``, then steps;
- the scheduler view steps once per update.

After the update the trainer zeroes the gradients itself, so a window never leaks
into the next even when an override forgets ``zero_grad``.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

SPARSE_MODULE_TYPES: tuple[type, ...] = (nn.Embedding, nn.EmbeddingBag)


# --- parameter split -------------------------------------------------------------
def _sparse_module_types() -> tuple[type, ...]:
    types: list[type] = list(SPARSE_MODULE_TYPES)
    try:  # torchrec's (unsharded and sharded) embedding collections
        from torchrec.modules.embedding_modules import (
            EmbeddingBagCollection,
            EmbeddingCollection,
        )

        types += [EmbeddingBagCollection, EmbeddingCollection]
        from torchrec.distributed.embedding import ShardedEmbeddingCollection
        from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

        types += [ShardedEmbeddingBagCollection, ShardedEmbeddingCollection]
    except ImportError:
        pass
    return tuple(types)


def split_sparse_dense_parameters(
    model: nn.Module,
) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """Split ``model``'s trainable parameters into (sparse, dense) by module type.

    Sparse: parameters owned by embedding modules (``nn.Embedding``,
    ``nn.EmbeddingBag``, torchrec embedding collections, sharded or not). Dense: the
    rest. A parameter shared by both kinds of module counts as sparse.
    """
    kinds = _sparse_module_types()
    sparse: dict[str, nn.Parameter] = {}
    sparse_ids: set[int] = set()
    for mod_name, module in model.named_modules():
        if isinstance(module, kinds):
            for p_name, p in module.named_parameters():
                if p.requires_grad and id(p) not in sparse_ids:
                    sparse_ids.add(id(p))
                    sparse[f"{mod_name}.{p_name}" if mod_name else p_name] = p
    dense = {
        name: p
        for name, p in model.named_parameters()
        if p.requires_grad and id(p) not in sparse_ids
    }
    return sparse, dense


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The model's trainable non-embedding parameters (what a dense optimizer takes)."""
    return list(split_sparse_dense_parameters(model)[1].values())


def sparse_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The model's trainable embedding-table parameters."""
    return list(split_sparse_dense_parameters(model)[0].values())


def filter_out_sparse_param(model: nn.Module) -> list[nn.Parameter]:
    """RecIS's name for `dense_parameters`."""
    return dense_parameters(model)


def optimizer_parameters(optimizer: Any) -> list[torch.Tensor]:
    """Every parameter an optimizer (or recframe sparse optimizer) updates."""
    params: list[torch.Tensor] = []
    for group in getattr(optimizer, "param_groups", []) or []:
        params.extend(p for p in group.get("params", []) if isinstance(p, torch.Tensor))
    return params


def check_disjoint(dense: Any, sparse: Any) -> None:
    """A parameter held by both optimizers would be stepped (and scaled) twice."""
    if dense is None or sparse is None:
        return
    ids = {id(p) for p in optimizer_parameters(dense)}
    both = [p for p in optimizer_parameters(sparse) if id(p) in ids]
    if both:
        shapes = ", ".join(str(tuple(p.shape)) for p in both[:3])
        raise ValueError(
            f"{len(both)} parameter(s) (shapes {shapes}) are in both the dense and the sparse "
            "optimizer; build the dense optimizer over recframe.optim.dense_parameters(model)"
        )


# --- accumulation ----------------------------------------------------------------
class AccumulationWindow:
    """Where the current micro-batch sits in its gradient-accumulation window.

    The trainer calls `begin` before each micro-batch; views read `is_first` and
    `is_boundary`. ``size`` is ``steps`` except for a last partial window at the end
    of the data, which holds fewer micro-batches: its update averages over those.
    """

    def __init__(self, steps: int, nonfinite_policy: str = "raise") -> None:
        self.steps = steps
        self.nonfinite_policy = nonfinite_policy
        self.index = 0
        self.size = steps
        self.step_number = 1
        self.losses: list[torch.Tensor] = []
        self.metrics: Optional[dict[str, Any]] = None
        self._skip: Optional[bool] = None

    def reset(self, step_number: int) -> None:
        """Start a new window for optimizer update number ``step_number``."""
        self.index = 0
        self.size = self.steps
        self.step_number = step_number
        self.losses = []
        self.metrics = None
        self._skip = None

    def begin(self, index: int, size: int, metrics: dict[str, Any]) -> None:
        self.index = index
        self.size = size
        self.metrics = metrics

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_boundary(self) -> bool:
        return self.index >= self.size - 1

    def _current_losses(self) -> list[torch.Tensor]:
        losses = list(self.losses)
        current = self.metrics.get("loss") if self.metrics else None
        if isinstance(current, torch.Tensor) and len(losses) <= self.index:
            losses.append(current.detach())
        return losses

    def should_skip(self) -> bool:
        """Decide once per window whether its update must be dropped (non-finite
        loss under ``nonfinite_loss='skip'``); raise under ``'raise'``."""
        if self._skip is None:
            losses = self._current_losses()
            finite = True
            if losses:
                stacked = torch.stack([x.float().reshape(()) for x in losses])
                finite = bool(torch.isfinite(stacked).all())
            if not finite:
                if self.nonfinite_policy == "raise":
                    bad = [i for i, x in enumerate(losses) if not math.isfinite(float(x))]
                    raise FloatingPointError(
                        f"non-finite loss at step {self.step_number} (micro-batch "
                        f"{bad[0] + 1} of {self.size}: {float(losses[bad[0]])}); set "
                        "TrainingArguments.nonfinite_loss='skip' to drop such updates"
                    )
                logger.warning(
                    "non-finite loss at step %d: update skipped (nonfinite_loss='skip')",
                    self.step_number,
                )
            self._skip = not finite
        return self._skip

    @property
    def decided(self) -> bool:
        return self._skip is not None


def scale_gradients(optimizer: Any, factor: float) -> None:
    """Multiply every gradient the optimizer holds by ``factor`` (dense and sparse).

    An optimizer that accumulates in its own way (a recframe sparse optimizer)
    provides ``scale_accumulated_gradients(factor)`` and is asked to do it instead.
    """
    custom = getattr(optimizer, "scale_accumulated_gradients", None)
    if callable(custom):
        custom(factor)
        return
    dense_grads = []
    for p in optimizer_parameters(optimizer):
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            p.grad = g * factor
        else:
            dense_grads.append(g)
    if dense_grads:
        torch._foreach_mul_(dense_grads, factor)


class OptimizerView:
    """What ``_train_step`` sees as ``self.dense_optimizer`` / ``self.sparse_optimizer``:
    calls take effect only at accumulation boundaries (see the module docstring).

    Attribute access falls through to the wrapped optimizer (``param_groups``,
    ``state_dict``...); ``optimizer`` is the real one (``None`` when not given: then
    every call is a no-op).
    """

    def __init__(
        self,
        optimizer: Any,
        window: AccumulationWindow,
        step_fn: Any = None,
        max_grad_norm: Optional[float] = None,
        name: str = "dense",
    ) -> None:
        self.optimizer = optimizer
        self.window = window
        self.step_fn = step_fn or (lambda opt: opt.step())
        self.max_grad_norm = max_grad_norm
        self.name = name
        self.stepped = False
        self.last_grad_norm: Optional[torch.Tensor] = None
        bind = getattr(optimizer, "bind_accumulation_window", None)
        if callable(bind):
            bind(window)

    def __getattr__(self, item: str) -> Any:
        # only called for attributes not found on the view itself
        optimizer = self.__dict__.get("optimizer")
        if optimizer is None:
            raise AttributeError(item)
        return getattr(optimizer, item)

    def __bool__(self) -> bool:
        return self.optimizer is not None

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.optimizer is not None and self.window.is_first:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> Any:
        if self.optimizer is None or not self.window.is_boundary or self.stepped:
            return None
        self.stepped = True
        if self.window.should_skip():
            return None
        if self.window.size > 1:
            scale_gradients(self.optimizer, 1.0 / self.window.size)
        if self.max_grad_norm is not None:
            params = [p for p in optimizer_parameters(self.optimizer) if p.grad is not None]
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return self.step_fn(self.optimizer)

    def new_window(self) -> None:
        self.stepped = False
        self.last_grad_norm = None

    def real_zero_grad(self) -> None:
        """Zero gradients now, regardless of the window (the trainer, after an update)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict() if self.optimizer is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state)


def steps_on_metric(scheduler: Any) -> bool:
    """Whether ``scheduler.step`` takes a metric: ``ReduceLROnPlateau``, or any scheduler
    whose ``step`` has a required positional parameter."""
    if scheduler is None:
        return False
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return True
    step = getattr(scheduler, "step", None)
    if not callable(step):
        return False
    try:
        params = inspect.signature(step).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind in positional and p.default is inspect.Parameter.empty for p in params)


class SchedulerView:
    """``self.dense_lr_scheduler`` inside ``_train_step``: steps once per update.

    A metric-driven scheduler (`steps_on_metric`: ``ReduceLROnPlateau``) is stepped by
    the trainer once per evaluation instead; ``step()`` here is then a no-op."""

    def __init__(self, scheduler: Any, window: AccumulationWindow) -> None:
        self.scheduler = scheduler
        self.window = window
        self.stepped = False
        self.on_metric = steps_on_metric(scheduler)

    def __getattr__(self, item: str) -> Any:
        scheduler = self.__dict__.get("scheduler")
        if scheduler is None:
            raise AttributeError(item)
        return getattr(scheduler, item)

    def __bool__(self) -> bool:
        return self.scheduler is not None

    def step(self, *args: Any, **kwargs: Any) -> None:
        if self.scheduler is None or self.on_metric or not self.window.is_boundary or self.stepped:
            return
        self.stepped = True
        self.scheduler.step(*args, **kwargs)

    def new_window(self) -> None:
        self.stepped = False

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr() if self.scheduler is not None else []

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)


def current_lr(optimizer: Any) -> Optional[float]:
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        return None
    lr = groups[0].get("lr")
    return float(lr) if lr is not None else None


def default_dense_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW(lr=1e-3), what the trainer builds when no dense optimizer is given."""
    return torch.optim.AdamW(list(params), lr=1e-3)
