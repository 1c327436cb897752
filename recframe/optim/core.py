"""Optimizers as the trainer sees them: accumulation-aware views, and the split of a
model's parameters into sparse (embedding tables) and dense ones.

Gradient accumulation works by *views*. The trainer hands ``_train_step`` a view of
each optimizer and of the LR scheduler, and an `AccumulationWindow` ties them to the
micro-batches of one update. Any order of ``zero_grad``/``backward``/``step`` within a
micro-batch, with ``step`` after that micro-batch's ``backward`` as torch requires
(RecIS's zero_grad-backward-step, torch's backward-step-zero_grad, ``set_to_none``
either way), then trains like one big batch, because:

- ``zero_grad()`` never drops a window's gradients: it only records ``set_to_none``;
  the trainer zeroes the gradients itself after each update;
- ``step()`` acts on the window's last micro-batch only, once: check the loss (and,
  under ``nonfinite_loss='skip'``, every optimizer's gradients) for NaN/inf, weigh the
  micro-batches, clip dense gradients to ``max_grad_norm``, step. Called on an earlier
  micro-batch only, it is remembered and runs when the window ends;
- the scheduler view steps once per update;
- micro-batches are weighed per sample by default: micro-batch i of n_i samples weighs
  n_i/N (N: the window's samples), so unequal micro-batches give the update of their
  concatenation; ``weighting='micro_batches'`` weighs each 1/m (m micro-batches).
  Backward sums gradients with weight 1, so the window keeps the sum relative to the
  current micro-batch: before micro-batch i, when n_i differs from the micro-batch
  before, the gradients so far are multiplied by n_(i-1)/n_i; the update multiplies by
  n_last/N. Equal micro-batches cost no extra pass. Both rules assume a loss that is
  the *mean* over a micro-batch's samples (see docs/api.md).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

from recframe import distributed

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
WEIGHTINGS = ("samples", "micro_batches")
"""How a window weighs its micro-batches: per sample (n_i/N) or per micro-batch (1/m)."""


class AccumulationWindow:
    """Where the current micro-batch sits in its gradient-accumulation window, and the
    window's update.

    The trainer calls `reset` before a window, `begin` before each micro-batch (with its
    number of samples) and `update` after the last one; views read `is_first` and
    `is_boundary`. ``size`` is ``steps`` except for a last partial window at the end of
    the data, which holds fewer micro-batches. Views built with this window attach
    themselves to it (`OptimizerView`, `SchedulerView`).
    """

    def __init__(
        self, steps: int, nonfinite_policy: str = "raise", weighting: str = "samples"
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"AccumulationWindow(weighting={weighting!r}): choose from "
                             f"{list(WEIGHTINGS)}")
        self.steps = steps
        self.nonfinite_policy = nonfinite_policy
        self.weighting = weighting
        self.index = 0
        self.size = steps
        self.step_number = 1
        self.losses: list[torch.Tensor] = []
        self.metrics: Optional[dict[str, Any]] = None
        self.samples: list[int] = []
        """Samples of each micro-batch begun in this window (when the trainer knows)."""
        self.optimizers: list[OptimizerView] = []
        self.schedulers: list[SchedulerView] = []
        self._reference = 0
        self._skip: Optional[bool] = None
        self._factor: Optional[float] = None
        self._warned: set[str] = set()
        self.single_process = False
        """Set (by the trainer, once per ``train`` call) when no other rank takes part:
        the skip decision then needs no agreement call."""

    def reset(self, step_number: int) -> None:
        """Start a new window for optimizer update number ``step_number``."""
        self.index = 0
        self.size = self.steps
        self.step_number = step_number
        self.losses = []
        self.metrics = None
        self.samples = []
        self._reference = 0
        self._skip = None
        self._factor = None
        # the views' new_window(), inline: no call per view per update
        for view in self.optimizers:
            view.requested = view.done = False
            view.last_grad_norm = None
        for scheduler in self.schedulers:
            scheduler.requested = None
            scheduler.done = False

    def begin(
        self, index: int, size: int, metrics: dict[str, Any], samples: Optional[int] = None
    ) -> None:
        """Micro-batch ``index`` of a window of ``size`` starts; it holds ``samples``
        samples (``None``: unknown, the window then weighs per micro-batch)."""
        self.index = index
        self.size = size
        self.metrics = metrics
        self._factor = None
        if samples is None:
            return
        self.samples.append(int(samples))
        if self.weighting != "samples" or samples <= 0:
            return
        previous, self._reference = self._reference, int(samples)
        if previous > 0 and previous != samples:
            # keep the sum so far relative to this micro-batch's weight (module docstring)
            for view in self.optimizers:
                view.rescale_accumulated(previous / samples)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_boundary(self) -> bool:
        return self.index >= self.size - 1

    def update_factor(self) -> float:
        """What the summed gradients are multiplied by at the update: n_last/N per
        sample (after the rescales of `begin`), 1/m per micro-batch (worked out once
        per window: every optimizer's update uses it)."""
        if self._factor is not None:
            return self._factor
        total = sum(self.samples)
        if (self.weighting == "samples" and self._reference > 0 and total > 0
                and len(self.samples) == self.size):
            self._factor = self._reference / total
        else:
            self._factor = 1.0 / self.size
        return self._factor

    def mean_loss(self) -> Optional[torch.Tensor]:
        """The window's loss, as its update weighs it: per sample (n_i/N) by default,
        the mean of the micro-batches' losses per micro-batch; ``None`` when none was
        recorded."""
        losses = self.losses
        if len(losses) <= 1:
            return losses[0] if losses else None
        stacked = torch.stack(losses)
        samples = self.samples
        if (self.weighting == "samples" and len(samples) == len(losses)
                and len(set(samples)) > 1 and sum(samples) > 0):
            weights = torch.tensor(samples, dtype=stacked.dtype).to(stacked.device)
            return (stacked * weights).sum() / sum(samples)
        return stacked.mean()

    def _current_losses(self) -> list[torch.Tensor]:
        losses = list(self.losses)
        current = self.metrics.get("loss") if self.metrics else None
        if isinstance(current, torch.Tensor) and len(losses) <= self.index:
            losses.append(current.detach())
        return losses

    def should_skip(self) -> bool:
        """Decide once per window whether its update must be dropped: a NaN/inf loss,
        or (under ``nonfinite_loss='skip'``) a NaN/inf gradient of any optimizer. Raises
        ``FloatingPointError`` on a non-finite loss under ``'raise'``."""
        if self._skip is not None:
            return self._skip
        if self.losses:
            losses = self._current_losses()
        else:  # the usual window (k=1): only this micro-batch's loss; no copy, no detach
            current = self.metrics.get("loss") if self.metrics else None
            losses = [current] if isinstance(current, torch.Tensor) else []
        grads: list[torch.Tensor] = []
        if self.nonfinite_policy == "skip":  # every optimizer's: none steps if one is bad
            for view in self.optimizers:
                grads.extend(view.gradients())
        if grads or len(losses) > 1:
            flags: list[torch.Tensor] = []
            if losses:
                flags.append(torch.isfinite(torch.stack([x.float().reshape(()) for x in losses]))
                             .all())
            if grads:
                norms = torch._foreach_norm(grads, math.inf)  # max |g|: NaN and inf survive it
                device = flags[0].device if flags else norms[0].device
                flags.append(torch.isfinite(torch.stack([n.float().to(device) for n in norms]))
                             .all())
            ok = torch.stack(flags).tolist()  # one host sync
            loss_ok = ok[0] if losses else True
            grads_ok = ok[-1] if grads else True
        else:
            # the usual update (one loss, no gradient check): the same one host sync,
            # without the five small ops that stacking flags takes
            loss_ok = not losses or math.isfinite(losses[0].item())
            grads_ok = True
        # several processes decide together (2: a bad loss, 1: bad gradients): a rank
        # that stepped while another skipped would diverge, or hang in the sharded
        # tables' backward (a collective)
        code = 2 if not loss_ok else (0 if grads_ok else 1)
        agreed = code if self.single_process else distributed.all_reduce_max_int(code)
        where = "" if agreed == code else " on another rank"
        if agreed == 2:
            if self.nonfinite_policy == "raise":
                if loss_ok:
                    raise FloatingPointError(
                        f"non-finite loss at step {self.step_number} on another rank; "
                        "set TrainingArguments.nonfinite_loss='skip' to drop such updates"
                    )
                bad = [i for i, x in enumerate(losses) if not math.isfinite(float(x))]
                raise FloatingPointError(
                    f"non-finite loss at step {self.step_number} (micro-batch "
                    f"{bad[0] + 1} of {self.size}: {float(losses[bad[0]])}); set "
                    "TrainingArguments.nonfinite_loss='skip' to drop such updates"
                )
            logger.warning(
                "non-finite loss at step %d%s: update skipped (nonfinite_loss='skip')",
                self.step_number, where,
            )
        elif agreed == 1:
            names = [v.name for v in self.optimizers if not _finite(v)]
            logger.warning(
                "non-finite gradient (finite loss) at step %d%s: update skipped "
                "(nonfinite_loss='skip')",
                self.step_number,
                f" in the {' and '.join(names)} optimizer's parameters" if names else where,
            )
        self._skip = agreed > 0
        return self._skip

    @property
    def decided(self) -> bool:
        return self._skip is not None

    def step(self, view: OptimizerView) -> Any:
        """The update of ``view``'s optimizer for this window, unless it is skipped."""
        view.done = True
        skip = self._skip if self._skip is not None else self.should_skip()
        if skip:
            return None
        return view.apply(self._factor if self._factor is not None else self.update_factor())

    def update(self) -> bool:
        """End the window (the trainer, after its last micro-batch): run the steps
        requested on earlier micro-batches only, then the scheduler's; zero every
        optimizer's gradients. Returns whether the update was skipped."""
        skipped = self._skip if self._skip is not None else self.should_skip()
        for view in self.optimizers:
            if view.optimizer is None:
                continue
            if view.requested and not view.done:
                self.step(view)
            elif not view.requested and not skipped and view.name not in self._warned:
                self._warned.add(view.name)
                logger.warning(
                    "_train_step never called %s_optimizer.step(); its gradients were "
                    "dropped at step %d", view.name, self.step_number,
                )
        for scheduler in self.schedulers:
            if scheduler.requested is not None and not scheduler.done:  # else apply() no-ops
                scheduler.apply()
        for view in self.optimizers:  # view.real_zero_grad(), inline
            if view.optimizer is not None:
                view.optimizer.zero_grad(set_to_none=view.set_to_none)
        return skipped


    def drop(self) -> None:
        """Drop a window that failed before its update (the trainer, when ``_train_step``
        raised): every optimizer's gradients (and the fused back end's deferred lookups)
        go, so none leaks into the next window."""
        for view in self.optimizers:
            view.real_zero_grad()


def _finite(view: OptimizerView) -> bool:
    grads = view.gradients()
    return not grads or all(bool(torch.isfinite(n)) for n in torch._foreach_norm(grads, math.inf))


def _multiply_gradients(optimizer: Any, factor: float) -> None:
    """Multiply the ``.grad`` of every parameter of ``optimizer`` by ``factor`` now."""
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


def scale_gradients(optimizer: Any, factor: float) -> None:
    """Multiply every gradient the optimizer holds by ``factor`` (dense and sparse), at
    the end of a window.

    An optimizer that accumulates in its own way (a recframe sparse optimizer)
    provides ``scale_accumulated_gradients(factor)`` and is asked to do it instead.
    """
    custom = getattr(optimizer, "scale_accumulated_gradients", None)
    if callable(custom):
        custom(factor)
        return
    _multiply_gradients(optimizer, factor)


def rescale_accumulated(optimizer: Any, factor: float) -> None:
    """Multiply the gradients accumulated *so far* by ``factor``, mid-window (gradients
    of later micro-batches are not affected). An optimizer whose gradients are not in
    ``.grad`` (the fused back end's deferred lookups) provides
    ``rescale_accumulated_gradients(factor)``."""
    custom = getattr(optimizer, "rescale_accumulated_gradients", None)
    if callable(custom):
        custom(factor)
        return
    _multiply_gradients(optimizer, factor)


class OptimizerView:
    """What ``_train_step`` sees as ``self.dense_optimizer`` / ``self.sparse_optimizer``:
    ``zero_grad`` never drops the window's gradients, ``step`` updates once per window
    (see the module docstring).

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
        self.requested = False
        self.done = False
        self.set_to_none = True
        self.last_grad_norm: Optional[torch.Tensor] = None
        window.optimizers.append(self)
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

    @property
    def stepped(self) -> bool:
        """Whether ``step()`` was called in this window."""
        return self.requested

    def zero_grad(self, set_to_none: bool = True) -> None:
        """A no-op on the window's gradients (the trainer zeroes them after each update,
        with the ``set_to_none`` last asked for here). An optimizer that updates inside
        backward and accumulates nothing (the fused back end at k=1) is passed the call
        on a window's first micro-batch: it is where its ``lr`` reaches its kernels."""
        self.set_to_none = set_to_none
        if (self.optimizer is not None and self.window.index == 0  # the window's first
                and getattr(self.optimizer, "updates_in_backward", False)):
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any = None) -> Any:
        """The window's update, on its last micro-batch (once); on an earlier one, a
        request that runs when the window ends."""
        if self.optimizer is None:
            return None
        self.requested = True
        window = self.window
        if window.index >= window.size - 1 and not self.done:  # the window's boundary
            # window.step(self), inline: a call less per optimizer per update
            self.done = True
            skip = window._skip
            if skip is None:
                skip = window.should_skip()
            if skip:
                return None
            factor = window._factor
            if factor is None:  # a one-micro-batch window weighs it by 1, however sized
                factor = 1.0 if window.size == 1 else window.update_factor()
            return self.apply(factor)
        return None

    def gradients(self) -> list[torch.Tensor]:
        """The gradients the next update would apply (sparse ones as their values)."""
        if self.optimizer is None:
            return []
        custom = getattr(self.optimizer, "accumulated_gradients", None)
        if callable(custom):
            return list(custom())
        out = []
        for p in optimizer_parameters(self.optimizer):
            g = p.grad
            if g is not None:
                out.append(g._values() if g.is_sparse else g)
        return out

    def rescale_accumulated(self, factor: float) -> None:
        if self.optimizer is not None:
            rescale_accumulated(self.optimizer, factor)

    def apply(self, factor: float) -> Any:
        """The update: gradients times ``factor``, dense ones clipped, then step."""
        if factor != 1.0:
            scale_gradients(self.optimizer, factor)
        if self.max_grad_norm is not None:
            params = [p for p in optimizer_parameters(self.optimizer) if p.grad is not None]
            self.last_grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return self.step_fn(self.optimizer)

    def real_zero_grad(self) -> None:
        """Zero gradients now, regardless of the window (the trainer, after an update)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=self.set_to_none)

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
    """``self.dense_lr_scheduler`` inside ``_train_step``: steps once per update (on the
    window's last micro-batch; called on an earlier one only, when the window ends).

    A metric-driven scheduler (`steps_on_metric`: ``ReduceLROnPlateau``) is stepped by
    the trainer once per evaluation instead; ``step()`` here is then a no-op."""

    def __init__(self, scheduler: Any, window: AccumulationWindow) -> None:
        self.scheduler = scheduler
        self.window = window
        self.requested: Optional[tuple[tuple[Any, ...], dict[str, Any]]] = None
        self.done = False
        window.schedulers.append(self)
        self.on_metric = steps_on_metric(scheduler)

    def __getattr__(self, item: str) -> Any:
        scheduler = self.__dict__.get("scheduler")
        if scheduler is None:
            raise AttributeError(item)
        return getattr(scheduler, item)

    def __bool__(self) -> bool:
        return self.scheduler is not None

    @property
    def stepped(self) -> bool:
        return self.done

    def step(self, *args: Any, **kwargs: Any) -> None:
        if self.scheduler is None or self.on_metric or self.done:
            return
        self.requested = (args, kwargs)
        if self.window.is_boundary:
            self.apply()

    def apply(self) -> None:
        """Step the scheduler if ``step()`` was called in this window and it has not
        stepped yet."""
        if self.scheduler is not None and self.requested is not None and not self.done:
            args, kwargs = self.requested
            self.done = True
            self.scheduler.step(*args, **kwargs)

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


def default_dense_optimizer(
    params: Iterable[nn.Parameter], lr: float = 1e-3, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """AdamW(lr, weight_decay), what the trainer builds when no dense optimizer is given
    (``TrainingArguments.learning_rate`` / ``weight_decay``; HF's defaults: no decay)."""
    return torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
