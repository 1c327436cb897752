"""The XLA device (torch-xla: TPUs, and the PJRT CPU client that CI tests on).

``TrainingArguments(device="xla")`` (or ``"auto"`` when torch_xla imports and
``PJRT_DEVICE`` is set) gives `XLADevice`. Training on it differs from the eager
devices in four places, each handled here so that the same `Trainer`, `Saver` and
`CheckpointManager` run unchanged:

* Tensors are lazy: ops build a graph that runs at ``mark_step`` (the trainer calls it
  after every update), compiled once per distinct graph. Shapes must therefore be
  static: batches' sparse features become fixed-shape `PaddedBags` on the host before
  they are sent (``bag_size``, or the longest bag rounded up to a power of two).
* torchrec's `EmbeddingBagCollection` runs fbgemm kernels that XLA cannot: `prepare_model`
  swaps each one for `EmbeddingBagTables` (the same ``nn.EmbeddingBag`` modules and
  parameters, so optimizers built beforehand and checkpoints still match), and turns
  sparse gradients off (XLA has no sparse tensors).
* recframe's row-wise sparse optimizers find the touched rows with ``nonzero()``, a
  data-dependent shape. `optimizer_step` runs them with static shapes instead
  (`dense_rows_step`): the same update rules over all rows, masked to the rows whose
  gradient is non-zero. Any other optimizer goes through ``xm.optimizer_step``
  (which all-reduces gradients across replicas first).
* Moving a model to an XLA device replaces its parameters (a CPU tensor cannot become
  an XLA one in place); `prepare_model` swaps the tensors *inside* the existing
  parameter objects, so optimizers built before the trainer still hold them (and state
  such an optimizer already made is moved beside them at its first step).

torch_xla is imported only when an `XLADevice` is built (or a helper that needs it
is called): this module imports, and its pure-torch helpers work, without it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Optional

import torch
from torch import nn

from recframe.device import Device, move_to_device

logger = logging.getLogger(__name__)

_SEED_MASK = (1 << 63) - 1


# --------------------------------------------------------------------------- the device


class XLADevice(Device):
    """torch-xla's device for this process (``torch_xla.device()``).

    Args:
        bag_size: ids per padded bag for sparse features (default: the longest bag of
            each batch rounded up to a power of two, so a handful of shapes at most).
        prefetch_to_device: batches `wrap_loader` keeps on the device ahead of the one
            being trained (torch-xla's ``ParallelLoader``).
    """

    name = "xla"

    def __init__(self, bag_size: Optional[int] = None, prefetch_to_device: int = 2) -> None:
        import torch_xla
        import torch_xla.core.xla_model as xm

        self._xm = xm
        self._torch_xla = torch_xla
        self._device = torch_xla.device()
        self.bag_size = bag_size
        self.prefetch_to_device = max(1, prefetch_to_device)
        self._placed: weakref.WeakSet[Any] = weakref.WeakSet()  # optimizers checked
        # XLA keeps its own RNG stream: seed it from torch's (set_seed(args.seed) runs
        # before the trainer resolves its device), so a run is reproducible end to end
        xm.set_rng_state(torch.initial_seed() & _SEED_MASK, self._device)

    @property
    def torch_device(self) -> torch.device:
        return self._device

    # ---------------------------------------------------------------- data
    def prepare_batch(self, data: Any) -> Any:
        """Host-side preparation before the transfer: sparse features -> `PaddedBags`."""
        return pad_sparse_features(data, self.bag_size)

    def move(self, data: Any, non_blocking: bool = False) -> Any:
        return move_to_device(self.prepare_batch(data), self._device, non_blocking)

    def wrap_loader(
        self, items: Iterable[tuple[Any, Any]], prefetch: int = 1
    ) -> Iterator[tuple[Any, Any]]:
        """``(host batch, position)`` pairs -> ``(device batch, position)``, the batches
        prepared and sent by torch-xla's ``ParallelLoader`` in background threads.

        The result has ``close()``: it stops the threads and returns only once they no
        longer touch the dataset (so a caller may then rewind it). An error raised while
        reading the data is raised here, in the consumer.
        """
        return _DeviceFeed(
            items, self._device, self.prepare_batch,
            loader_prefetch=max(1, prefetch), device_prefetch=self.prefetch_to_device,
        )

    # ---------------------------------------------------------------- model and steps
    def prepare_model(self, model: nn.Module) -> nn.Module:
        swapped = use_nn_embeddings(model)
        if swapped:
            logger.info(
                "XLA: torchrec EmbeddingBagCollection at %s replaced by EmbeddingBagTables "
                "(same tables and parameters; fbgemm kernels do not run on XLA)",
                ", ".join(name or "<model>" for name in swapped),
            )
        densified = dense_embedding_gradients(model)
        if densified:
            logger.info("XLA: sparse gradients turned off for %d embedding module(s)",
                        len(densified))
        move_parameters_in_place(model, self._device)
        return model

    def optimizer_step(self, optimizer: Any) -> None:
        from recframe.optim.sparse import RowSparseOptimizer

        if optimizer not in self._placed:
            move_optimizer_state(optimizer)
            self._placed.add(optimizer)
        if isinstance(optimizer, RowSparseOptimizer):
            self._xm.reduce_gradients(optimizer)  # a no-op with one replica
            dense_rows_step(optimizer)
        else:
            self._xm.optimizer_step(optimizer)

    def mark_step(self) -> None:
        sync = getattr(self._torch_xla, "sync", None)
        if callable(sync):
            sync()
        else:  # pragma: no cover - torch_xla < 2.6
            self._xm.mark_step()

    def synchronize(self) -> None:
        self._xm.wait_device_ops()

    # ---------------------------------------------------------------- RNG
    def rng_state(self) -> dict[str, Any]:
        state = super().rng_state()
        state["xla"] = int(self._xm.get_rng_state(self._device))
        return state

    def set_rng_state(self, state: dict[str, Any]) -> None:
        super().set_rng_state(state)
        if "xla" in state:
            self._xm.set_rng_state(int(state["xla"]), self._device)


# --------------------------------------------------------------------------- model


def use_nn_embeddings(model: nn.Module) -> list[str]:
    """Replace every (unsharded) torchrec `EmbeddingBagCollection` in ``model`` by an
    `EmbeddingBagTables` over the same modules; returns the replaced modules' names."""
    import sys

    if "torchrec" not in sys.modules:
        return []
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from recframe.models import EmbeddingBagTables

    targets = [
        (name, module) for name, module in model.named_modules()
        if type(module) is EmbeddingBagCollection
    ]
    for name, module in targets:
        tables = EmbeddingBagTables.from_ebc(module)
        if not name:
            raise ValueError(
                "XLADevice: the model itself is an EmbeddingBagCollection; wrap it or use "
                "recframe.models.EmbeddingBagTables"
            )
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, tables)
    for name, module in model.named_modules():
        if "Sharded" in type(module).__name__ and "torchrec" in type(module).__module__:
            raise ValueError(
                f"XLADevice: {name} is a sharded torchrec module ({type(module).__name__}); "
                "sharded (fbgemm) tables do not run on XLA: train the unsharded model"
            )
    return [name for name, _ in targets]


def dense_embedding_gradients(model: nn.Module) -> list[str]:
    """Set ``sparse=False`` on every ``nn.Embedding``/``nn.EmbeddingBag``; returns the
    names of the modules changed."""
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
            module.sparse = False
            changed.append(name)
    return changed


@contextlib.contextmanager
def _swap_params_on_conversion() -> Iterator[None]:
    future = torch.__future__
    old = future.get_swap_module_params_on_conversion()
    future.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        future.set_swap_module_params_on_conversion(old)


def move_parameters_in_place(model: nn.Module, device: torch.device) -> nn.Module:
    """``model.to(device)`` keeping every parameter *object* (its tensor is swapped), so
    optimizers built over the CPU model step the device parameters."""
    with _swap_params_on_conversion():
        return model.to(device)


def move_optimizer_state(optimizer: Any) -> None:
    """Put state that an optimizer built before the model moved (torch's Adagrad makes
    its sums in ``__init__``) beside its parameter. Scalars stay where torch keeps them
    (a CPU ``step``)."""
    state = getattr(optimizer, "state", None)
    if not isinstance(state, Mapping):
        return
    for p, entries in state.items():
        if not isinstance(p, torch.Tensor) or not isinstance(entries, dict):
            continue
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.device != p.device:
                entries[key] = value.to(p.device)


# --------------------------------------------------------------------------- data


def pad_sparse_features(data: Any, bag_size: Optional[int] = None) -> Any:
    """``data`` with every `KeyedJaggedTensor` in it (a `Batch`'s ``sparse_features``, a
    dict or list entry) replaced by fixed-shape `PaddedBags`. Host-side."""
    import sys

    if "torchrec" not in sys.modules:
        return data
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recframe.models import PaddedBags

    def walk(obj: Any) -> Any:
        if isinstance(obj, KeyedJaggedTensor):
            return PaddedBags.from_kjt(obj, bag_size)
        if isinstance(obj, torch.Tensor):
            return obj
        if isinstance(obj, Mapping):
            return type(obj)({k: walk(v) for k, v in obj.items()})
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*(walk(v) for v in obj))
        if isinstance(obj, (list, tuple)):
            return type(obj)(walk(v) for v in obj)
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            changes = {
                f.name: walk(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init
            }
            if any(changes[k] is not getattr(obj, k) for k in changes):
                return dataclasses.replace(obj, **changes)
        return obj

    return walk(data)


class _DeviceFeed:
    """`XLADevice.wrap_loader`'s iterator: host items in, device batches out, in order.

    A background thread (torch-xla's) pulls ``(batch, position)`` from ``items``; only the
    batch travels through the loader, the position waits in a FIFO and rejoins its batch
    here. Pulling holds a lock, so `close` returns only after the last pull finished.
    """

    def __init__(
        self, items: Iterable[tuple[Any, Any]], device: torch.device, prepare: Any,
        loader_prefetch: int, device_prefetch: int,
    ) -> None:
        import torch_xla.distributed.parallel_loader as pl

        self._items = iter(items)
        self._prepare = prepare
        self._positions: collections.deque[Any] = collections.deque()
        self._lock = threading.RLock()
        self._stopped = False
        self._error: Optional[BaseException] = None
        self._loader = pl.ParallelLoader(
            _HostBatches(self), [device],
            loader_prefetch_size=loader_prefetch, device_prefetch_size=device_prefetch,
        )
        self._device = device
        self._closed = False

    def _pull(self) -> tuple[bool, Any]:
        """(False, None) at the end or after `close`; runs in the loader thread."""
        with self._lock:
            if self._stopped:
                return False, None
            try:
                batch, position = next(self._items)
                batch = self._prepare(batch)
            except StopIteration:
                return False, None
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                self._error = e
                return False, None
            self._positions.append(position)
            return True, batch

    def __iter__(self) -> _DeviceFeed:
        return self

    def __next__(self) -> tuple[Any, Any]:
        if self._closed:
            raise StopIteration
        # ParallelLoader.next_item, not its per-device iterator: that one also cuts the
        # graph (sync) on every fetch, and the pipeline fetches ahead of the micro-batch
        # being trained, so where graphs are cut would depend on the look-ahead; the
        # trainer cuts them at its own points (mark_step)
        batch = self._loader.next_item(self._device)
        if batch is None:  # the end of the data, an error, or close()
            failed = self._loader._exception_queue
            error = self._error or (failed.get() if not failed.empty() else None)
            self.close()
            if error is not None:
                raise error
            raise StopIteration
        return batch, self._positions.popleft()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._lock:
            self._stopped = True
        self._loader.close()  # joins its threads

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class _HostBatches:
    """The iterable the ParallelLoader reads (it calls ``iter`` once, in its thread).
    It holds its feed weakly: a feed dropped without ``close()`` is collected (and
    closed) at once instead of living on in a reference cycle with the threads."""

    def __init__(self, feed: _DeviceFeed) -> None:
        self._feed = weakref.ref(feed)

    def __iter__(self) -> Iterator[Any]:
        while True:
            feed = self._feed()
            if feed is None:
                return
            more, batch = feed._pull()
            del feed
            if not more:
                return
            yield batch


# --------------------------------------------------------------------------- optimizers


def _exact_dense_types() -> tuple[type, ...]:
    from recframe.optim.sparse import RowWiseAdagrad, SparseAdagrad, SparseSGD

    return (SparseSGD, SparseAdagrad, RowWiseAdagrad)


@torch.no_grad()
def dense_rows_step(optimizer: Any) -> None:
    """One step of a recframe `RowSparseOptimizer` with static shapes (no ``nonzero``).

    Its own ``update_rows`` runs over *all* rows of each table with the dense
    gradient. For SGD and the Adagrads a zero gradient changes neither the row nor its
    state, so that is the lazy update itself. For the Adams (whose moments decay
    even at a zero gradient) the results are kept only for the rows with a non-zero
    gradient (``torch.where``), which is the lazy update too: the rows the eager path
    finds with ``nonzero()`` (step counts advance per table and step, as there).
    """
    exact = _exact_dense_types()
    # the 1/k of gradient accumulation, which the optimizer folds into its next step
    scale = float(getattr(optimizer, "_grad_scale", 1.0))
    if hasattr(optimizer, "_grad_scale"):
        optimizer._grad_scale = 1.0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.dim() != 2:
                raise ValueError(
                    f"sparse optimizers update 2-D embedding tables, got a parameter of "
                    f"shape {tuple(p.shape)}; give it to the dense optimizer"
                )
            grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
            grad = grad.to(p.dtype)
            if scale != 1.0:
                grad = grad * scale
            rows = torch.arange(p.shape[0], device=p.device)
            state = optimizer.state[p]
            if type(optimizer) in exact:
                optimizer.update_rows(p, rows, grad, group, state)
                continue
            touched = grad.ne(0).any(dim=1)
            new_p = p.clone()
            work = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
            optimizer.update_rows(new_p, rows, grad, group, work)
            p.copy_(torch.where(touched.unsqueeze(1), new_p, p))
            for key, value in work.items():
                old = state.get(key)
                if (
                    isinstance(value, torch.Tensor) and isinstance(old, torch.Tensor)
                    and value.dim() >= 1 and value.shape[0] == p.shape[0]
                ):
                    mask = touched.view(-1, *([1] * (value.dim() - 1)))
                    state[key] = torch.where(mask, value, old)
                else:  # new state (a zero gradient leaves it at its initial value) or scalars
                    state[key] = value


# --------------------------------------------------------------------------- metrics


def compile_count() -> int:
    """Graphs torch-xla has compiled in this process (its ``CompileTime`` metric)."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def execute_count() -> int:
    """Graphs torch-xla has executed in this process (its ``ExecuteTime`` metric)."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("ExecuteTime")
    return int(data[0]) if data else 0


def fallback_ops() -> list[str]:
    """aten ops that ran on the CPU because torch-xla has no lowering for them."""
    import torch_xla.debug.metrics as met

    return sorted(met.executed_fallback_ops())
