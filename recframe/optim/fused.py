"""torchrec's fused fbgemm optimizers behind recframe's sparse-optimizer interface, with
exact gradient accumulation.

`shard_model` wraps a model's torchrec embedding collections in
``DistributedModelParallel`` with an optimizer fused into the backward pass (fbgemm
kernels: RowWiseAdagrad, Adagrad, Adam, SGD), on CPU with a gloo group of one process
or on GPU unchanged, and returns a `FusedSparseOptimizer`.

Fused kernels update the tables inside backward, so they cannot accumulate gradients
(torchrec issue #2332). With ``gradient_accumulation_steps=k > 1`` recframe defers the
tables' backward: each micro-batch looks up its embeddings without autograd and hands
the dense network a leaf tensor; at the window's end the k micro-batches' features are
concatenated, looked up once more with autograd, and back-propagated with the k pooled
gradients (concatenated, divided by k). fbgemm merges repeated ids inside that one
backward, so the update equals one fused update on the concatenated batch. The cost is
one extra embedding lookup per sample (measured in ``benchmarks/sparse_throughput.py``).
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from recframe import distributed

logger = logging.getLogger("recframe")

FUSED_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "adam", "sgd")


def _optimizer_class(name: str) -> type:
    import torchrec.optim as trec_optim

    table = {
        "rowwise_adagrad": trec_optim.RowWiseAdagrad,
        "adagrad": torch.optim.Adagrad,
        "adam": torch.optim.Adam,
        "sgd": torch.optim.SGD,
    }
    key = name.lower()
    if key not in table:
        raise ValueError(f"unknown fused optimizer {name!r}; choose from {list(FUSED_OPTIMIZERS)}")
    return table[key]


def _embedding_collections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

    found = []
    for name, module in model.named_modules():
        if isinstance(module, (EmbeddingBagCollection, EmbeddingCollection)):
            found.append((name, module))
    return found


def shard_model(
    model: nn.Module,
    optimizer: str = "rowwise_adagrad",
    lr: float = 0.01,
    device: Optional[torch.device] = None,
    plan: Any = None,
    sharders: Optional[list[Any]] = None,
    **hparams: Any,
) -> tuple[nn.Module, FusedSparseOptimizer]:
    """Shard ``model``'s torchrec embedding collections with a fused optimizer.

    Returns ``(dmp_model, sparse_optimizer)``. The tables keep the values they had
    (torchrec would otherwise re-initialise them). Without a process group, a gloo
    group of one process is started (CPU) so one process runs the same code as many.
    """
    from torchrec.distributed import DistributedModelParallel
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    collections = _embedding_collections(model)
    if not collections:
        raise ValueError(
            "shard_model: the model has no torchrec EmbeddingBagCollection/"
            "EmbeddingCollection to shard"
        )
    cls = _optimizer_class(optimizer)
    distributed.init_default_group()
    if device is None:
        device = (
            torch.device("cuda", distributed.get_local_rank())
            if torch.cuda.is_available() else torch.device("cpu")
        )
    initial = {
        f"{name}.{key}" if name else key: value.detach().clone()
        for name, module in collections
        for key, value in module.state_dict().items()
    }
    params = [p for _, module in collections for p in module.parameters()]
    apply_optimizer_in_backward(cls, params, {"lr": lr, **hparams})
    kwargs: dict[str, Any] = {"device": device}
    if plan is not None:
        kwargs["plan"] = plan
    if sharders is not None:
        kwargs["sharders"] = sharders
    dmp = DistributedModelParallel(model, **kwargs)
    _copy_initial_values(dmp, initial)
    return dmp, FusedSparseOptimizer(dmp)


def _copy_initial_values(dmp: nn.Module, initial: dict[str, torch.Tensor]) -> None:
    from recframe.checkpoint.format import is_sharded

    state = dmp.state_dict()
    for key, value in state.items():
        source = initial.get(key)
        if source is None:
            continue
        with torch.no_grad():
            if is_sharded(value):
                for shard in value.local_shards():
                    index = tuple(
                        slice(o, o + s)
                        for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)
                    )
                    shard.tensor.copy_(source[index])
            else:
                value.copy_(source)


@dataclass
class _Lookup:
    features: Any
    values: torch.Tensor


def concat_kjt_batches(kjts: list[Any]) -> Any:
    """Concatenate KeyedJaggedTensors along the batch (same keys, key-major layout)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    if len(kjts) == 1:
        return kjts[0]
    keys = kjts[0].keys()
    nkeys = len(keys)
    lengths = torch.cat([k.lengths().view(nkeys, -1) for k in kjts], dim=1).reshape(-1)
    per_key = [k.values().split(k.length_per_key()) for k in kjts]
    values = torch.cat([parts[f] for f in range(nkeys) for parts in per_key])
    weights = None
    if kjts[0].weights_or_none() is not None:
        wparts = [k.weights().split(k.length_per_key()) for k in kjts]
        weights = torch.cat([parts[f] for f in range(nkeys) for parts in wparts])
    return KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, weights=weights)


class FusedSparseOptimizer(torch.optim.Optimizer):
    """The sparse optimizer of a `shard_model` model: torchrec's fused optimizer with
    recframe's interface (``step``, ``zero_grad``, ``state_dict``, ``load_state_dict``,
    ``param_groups`` with ``lr`` for torch LR schedulers) and exact accumulation."""

    def __init__(self, dmp: nn.Module) -> None:
        # no super().__init__: the param groups are torchrec's own
        self.dmp = dmp
        self.fused = dmp.fused_optimizer
        self._window: Any = None
        self._records: list[_Lookup] = []
        self._patched: list[tuple[nn.Module, Any]] = []
        self.defaults = {}

    # the torch.optim.Optimizer surface that schedulers and users touch
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.fused.param_groups

    @param_groups.setter
    def param_groups(self, value: Any) -> None:  # pragma: no cover - torch internals
        pass

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.fused.state

    def __repr__(self) -> str:
        return f"FusedSparseOptimizer({self.fused!r})"

    def __getstate__(self) -> dict[str, Any]:  # pragma: no cover
        raise TypeError("FusedSparseOptimizer is not picklable; use state_dict()")

    # --- accumulation -------------------------------------------------------------
    def bind_accumulation_window(self, window: Any) -> None:
        """Called by the trainer's view: with k > 1 micro-batches, defer the tables'
        backward to the window's end (see the module docstring)."""
        self._window = window
        if window.steps > 1 and not self._patched:
            self._patch_collections()

    def _patch_collections(self) -> None:
        from torchrec.distributed.embedding import ShardedEmbeddingCollection
        from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

        for module in self.dmp.modules():
            if isinstance(module, (ShardedEmbeddingBagCollection, ShardedEmbeddingCollection)):
                if isinstance(module, ShardedEmbeddingCollection):
                    raise NotImplementedError(
                        "gradient accumulation with fused optimizers supports "
                        "EmbeddingBagCollection tables; use gradient_accumulation_steps=1 "
                        "or the sparse-gradient back end for EmbeddingCollection"
                    )
                original = module.forward
                module.forward = types.MethodType(self._deferred_forward(original), module)
                self._patched.append((module, original))

    def _deferred_forward(self, original: Any) -> Any:
        from torchrec.sparse.jagged_tensor import KeyedTensor

        optimizer = self

        def forward(module: nn.Module, features: Any) -> Any:
            if not torch.is_grad_enabled() or not module.training:
                return original(features)
            with torch.no_grad():
                out = original(features)
                out = out.wait() if hasattr(out, "wait") else out
            values = out.values().detach().requires_grad_()
            optimizer._records.append(_Lookup(features, values))
            return KeyedTensor(
                keys=out.keys(), length_per_key=out.length_per_key(), values=values,
                key_dim=out.key_dim(),
            )

        forward.original = original  # type: ignore[attr-defined]
        return forward

    def scale_accumulated_gradients(self, factor: float) -> None:
        """The mean over micro-batches is applied when the deferred lookups are
        replayed (`step`); nothing is held in ``.grad`` to scale."""

    def step(self, closure: Any = None) -> None:
        if self._patched:
            self._replay()
        self.fused.step()

    def _replay(self) -> None:
        """Replay each collection's deferred lookups of the window in one lookup with
        autograd, and back-propagate the micro-batches' gradients (their mean): the
        fused kernels apply one update for the whole window."""
        records, self._records = self._records, []
        if not records:
            return
        n_coll = len(self._patched)
        if len(records) % n_coll:
            raise RuntimeError(
                "deferred embedding lookups do not match the embedding collections; each "
                "collection must be called once per micro-batch"
            )
        micro = len(records) // n_coll
        for c, (_module, original) in enumerate(self._patched):
            mine = records[c::n_coll]
            out = original(concat_kjt_batches([r.features for r in mine]))
            out = out.wait() if hasattr(out, "wait") else out
            grad = torch.cat(
                [r.values.grad if r.values.grad is not None else torch.zeros_like(r.values)
                 for r in mine]
            )
            if micro > 1:
                grad = grad / micro
            torch.autograd.backward(out.values(), grad)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._records = []  # a dropped (skipped) window's lookups go with it
        self.fused.zero_grad(set_to_none=set_to_none)  # also pushes the current lr

    # --- state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.fused.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.fused.load_state_dict(state_dict)
