"""Which rows of each embedding table changed since the last committed checkpoint.

`RowTracker` keeps one bitmap per table (``bool[rows]``, global row ids, on the
table's device) and sets the bits of the rows an update may touch:

- sparse-gradient tables (`recframe.optim.sparse.RowSparseOptimizer`): the rows of the
  coalesced gradient, at ``step`` (exactly the rows the lazy update writes, weight decay
  of SparseAdamW included: it decays touched rows only);
- torchrec fused tables (`recframe.optim.fused.shard_model`): the ids of each table's
  features in the collection's input ``KeyedJaggedTensor``, at forward. fbgemm's fused
  kernels (SGD, Adagrad, RowWiseAdagrad, Adam; their weight decay included) update only
  the rows present in the batch, so these ids are a superset of the updated rows (an id
  whose gradient is zero, or a lookup whose update is dropped, marks a row that did not
  change: harmless, it is written again).

Marking is one ``index_fill_`` per table and batch on the ids' device, with no host
synchronisation. Under torchrec sharding each rank sees only its own batch's ids;
`take` all-reduces the bitmaps (MAX) so every rank knows every changed row and writes
those of its own shards.

The tracker knows what changed only since a point it has seen. It is *invalid* (the
next checkpoint must be full) until a checkpoint commits, and again after anything it
cannot follow: a ``load_state_dict`` of a tracked table or of the sparse optimizer
(restore, warm start, user code), or a save that failed after its rows were merged
back into a tracker that was invalidated meanwhile.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

logger = logging.getLogger("recframe.checkpoint")


class RowTracker:
    """Per-table bitmaps of the rows updated since the last committed checkpoint.

    Args:
        model: the model whose ``state_dict()`` keys name the tables (the model the
            `Saver` holds).
        sparse_optimizer: the optimizer of the tables: a recframe ``RowSparseOptimizer``
            or a ``FusedSparseOptimizer``; tables it does not update are not tracked
            (a delta checkpoint writes them in full).
    """

    def __init__(self, model: nn.Module, sparse_optimizer: Any = None) -> None:
        self.model = model
        self.sparse_optimizer = sparse_optimizer
        self.bits: dict[str, torch.Tensor] = {}
        """Model state key of a table -> ``bool[rows]`` of its changed rows."""
        self.optimizer_keys: dict[Any, str] = {}
        """Key of the sparse optimizer's ``state_dict()["state"]`` -> table state key."""
        self.valid = False
        """Whether the bitmaps cover every change since `base` (else: save a full one)."""
        self.base: Optional[dict[str, Any]] = None
        """The ``incremental`` section of the last committed checkpoint's manifest."""
        self.generation = 0
        """Counts invalidations and resets (see `committed`)."""
        self._handles: list[Any] = []
        self._param_keys: dict[int, str] = {}
        self._attach()

    # --- attaching ----------------------------------------------------------------
    def _attach(self) -> None:
        from recframe.optim.sparse import RowSparseOptimizer

        opt = self.sparse_optimizer
        if isinstance(opt, RowSparseOptimizer):
            self._attach_sparse(opt)
        elif type(opt).__name__ == "FusedSparseOptimizer":
            self._attach_fused(opt)
        for module in self._table_modules():
            self._handles.append(module.register_load_state_dict_pre_hook(self._on_load))
        if isinstance(opt, torch.optim.Optimizer) and hasattr(
            opt, "_optimizer_load_state_dict_pre_hooks"
        ):  # FusedSparseOptimizer runs these hooks in its own load_state_dict
            self._handles.append(opt.register_load_state_dict_pre_hook(self._on_load))

    def _attach_sparse(self, opt: Any) -> None:
        names = {id(p): name for name, p in self.model.named_parameters()}
        index = 0
        for group in opt.param_groups:
            for p in group["params"]:
                name = names.get(id(p))
                if name is not None:
                    self._param_keys[id(p)] = name
                    self.bits[name] = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
                    self.optimizer_keys[index] = name
                index += 1
        observers = opt.__dict__.setdefault("row_observers", [])
        observers.append(self._on_rows)
        self._handles.append(_Remove(observers, self._on_rows))

    def _attach_fused(self, opt: Any) -> None:
        from recframe.checkpoint.format import is_sharded

        state = self.model.state_dict()
        for name, module in self.model.named_modules():
            configs = _sharded_configs(module)
            if configs is None:
                continue
            attr = "embedding_bags" if hasattr(module, "_embedding_bag_configs") else "embeddings"
            feature_tables: dict[str, str] = {}
            for config in configs:
                key = _state_key(state, name, f"{attr}.{config.name}.weight")
                if key is None:
                    logger.warning(
                        "row tracking: table %s of %s not found in the model's state dict; "
                        "delta checkpoints write it in full", config.name, name,
                    )
                    continue
                value = state[key]
                device = (value.local_shards()[0].tensor.device
                          if is_sharded(value) and value.local_shards() else torch.device("cpu"))
                self.bits[key] = torch.zeros(int(config.num_embeddings), dtype=torch.bool,
                                             device=device)
                self.optimizer_keys[key] = key
                for feature in config.feature_names:
                    feature_tables[feature] = key
            hook = module.register_forward_pre_hook(
                self._features_hook(feature_tables), with_kwargs=True
            )
            self._handles.append(hook)

    def _table_modules(self) -> list[nn.Module]:
        import sys

        from recframe.optim import SPARSE_MODULE_TYPES, sparse_module_types

        # a model without torchrec modules never pays torchrec's import (seconds)
        kinds = sparse_module_types() if "torchrec" in sys.modules else SPARSE_MODULE_TYPES
        return [m for m in self.model.modules() if isinstance(m, kinds)]

    def detach(self) -> None:
        """Remove the hooks; marks nothing from now on."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # --- marking ------------------------------------------------------------------
    def _on_rows(self, p: torch.Tensor, rows: torch.Tensor) -> None:
        key = self._param_keys.get(id(p))
        if key is not None:
            bits = self.bits[key]
            bits.index_fill_(0, rows.to(bits.device), True)

    def _features_hook(self, feature_tables: dict[str, str]) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            features = args[0] if args else kwargs.get("features")
            if features is None or not torch.is_grad_enabled() or not module.training:
                return
            keys = features.keys()
            parts = features.values().split(features.length_per_key())
            for feature, ids in zip(keys, parts):
                table = feature_tables.get(feature)
                if table is not None and ids.numel():
                    bits = self.bits[table]
                    bits.index_fill_(0, ids.to(bits.device, torch.long), True)

        return hook

    def mark(self, key: str, rows: torch.Tensor) -> None:
        """Mark rows of table ``key`` as changed (for updates made outside the hooks)."""
        bits = self.bits[key]
        bits.index_fill_(0, rows.to(bits.device, torch.long), True)

    def _on_load(self, *args: Any, **kwargs: Any) -> None:
        self.invalidate("a tracked table or the sparse optimizer was loaded")

    def invalidate(self, why: str = "") -> None:
        """The next checkpoint must be full (the bitmaps cannot say what changed)."""
        if self.valid and why:
            logger.info("row tracking: %s; the next checkpoint is a full one", why)
        self.valid = False
        self.generation += 1

    # --- checkpoint protocol ------------------------------------------------------
    def take(self) -> dict[str, torch.Tensor]:
        """The changed-row bitmaps (all-reduced over ranks), swapped for empty ones: rows
        updated from now on belong to the next checkpoint. `give_back` them if the save
        fails."""
        taken = {}
        for key, bits in self.bits.items():
            taken[key] = bits
            self.bits[key] = torch.zeros_like(bits)
        _all_reduce_max(taken)
        return taken

    def give_back(self, taken: dict[str, torch.Tensor]) -> None:
        """Merge bitmaps from `take` back (their save failed: those rows still differ
        from the last committed checkpoint)."""
        for key, bits in taken.items():
            if key in self.bits:
                self.bits[key] |= bits.to(self.bits[key].device)

    def committed(self, section: dict[str, Any], generation: Optional[int] = None) -> None:
        """A checkpoint with ``incremental`` manifest section ``section`` committed: the
        bitmaps now count from it, unless the tracker was invalidated or reset since
        its bitmaps were taken (``generation``: `generation` at `take` time; a load
        or restore while an async save was in flight changed rows no bitmap holds)."""
        self.base = section
        self.valid = generation is None or generation == self.generation

    def reset(self) -> None:
        """Clear the bitmaps and forget the base (after a restore)."""
        for bits in self.bits.values():
            bits.zero_()
        self.base = None
        self.valid = False
        self.generation += 1


class _Remove:
    def __init__(self, observers: list[Any], fn: Any) -> None:
        self.observers, self.fn = observers, fn

    def remove(self) -> None:
        if self.fn in self.observers:
            self.observers.remove(self.fn)


def _sharded_configs(module: nn.Module) -> Optional[list[Any]]:
    """The table configs of a torchrec *sharded* embedding collection, else None."""
    name = type(module).__name__
    if name == "ShardedEmbeddingBagCollection":
        return list(module._embedding_bag_configs)
    if name == "ShardedEmbeddingCollection":
        return list(module._embedding_configs)
    return None


def _state_key(state: dict[str, Any], module_name: str, relative: str) -> Optional[str]:
    """The model ``state_dict`` key of a submodule's entry ``relative``: wrappers (DMP's
    ``_dmp_wrapped_module``, DDP's ``module``) are left out of the keys, so the key is
    the one ending in ``relative`` whose prefix best matches the module's path."""
    candidates = [k for k in state if k == relative or k.endswith("." + relative)]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    path = [p for p in module_name.split(".") if p]

    def common_tail(key: str) -> int:
        parts = key[: -len(relative)].rstrip(".").split(".")
        n = 0
        while n < min(len(parts), len(path)) and parts[-1 - n] == path[-1 - n]:
            n += 1
        return n

    best = max(candidates, key=common_tail)
    return best if sum(common_tail(k) == common_tail(best) for k in candidates) == 1 else None


def _all_reduce_max(taken: dict[str, torch.Tensor]) -> None:
    from recframe import distributed

    for key, bits in taken.items():
        taken[key] = distributed.all_reduce_max_tensor(bits.to(torch.uint8)).bool()
