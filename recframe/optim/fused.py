"""torchrec's fused fbgemm optimizers behind recframe's sparse-optimizer interface, with
exact gradient accumulation.

`shard_model` wraps a model's torchrec embedding collections in
``DistributedModelParallel`` with an optimizer fused into the backward pass (fbgemm
kernels: RowWiseAdagrad, Adagrad, SGD on CPU and GPU; Adam on GPU only, fbgemm has no
CPU Adam kernel), on CPU with a gloo group of one process or on GPU unchanged, and
returns a `FusedSparseOptimizer`.

Without an explicit ``plan``, every table is constrained to a *fused* compute kernel and
a non-data-parallel sharding. (Left alone, torchrec's planner puts small tables, and on
CPU every table, in ``data_parallel`` with the ``dense`` kernel: full-table dense
gradients stepped by a plain torch optimizer inside backward, not fused at all, and
invisible to ``dmp.fused_optimizer``, so no LR scheduler reaches them.)

Fused kernels update the tables inside backward, so they cannot accumulate gradients
(torchrec issue #2332), and an update found bad after backward (a NaN loss) could not be
taken back. Under the `Trainer`, with ``gradient_accumulation_steps=k > 1`` or with
``nonfinite_loss="skip"`` (then at k=1 too), recframe defers the tables' backward: each
micro-batch but the window's last looks up its embeddings without autograd and hands the
dense network a leaf tensor; the last one looks up the concatenated features of all k
micro-batches with autograd and hands the dense network its own rows of that, also as a
leaf. At the window's end `FusedSparseOptimizer.step` back-propagates the k
micro-batches' pooled gradients (concatenated, each weighted as the trainer's window
says: n_i/N by default) through that one lookup. fbgemm merges repeated ids inside that
one backward, so the update equals one fused update on the concatenated batch; a window
the trainer skips is dropped before any table changes. The cost is one extra embedding
lookup per sample of the window's first k-1 micro-batches (measured in
``benchmarks/sparse_throughput.py``), and at k=1 a second, separate backward call. At
k=1 without ``skip`` nothing is deferred: the update happens inside ``loss.backward()``,
as torchrec does it.
"""

from __future__ import annotations

import logging
import os
import types
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from recframe import distributed

logger = logging.getLogger("recframe")

FUSED_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "adam", "sgd")
CPU_FUSED_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")
"""fbgemm 1.8's CPU kernels: EXACT_ROWWISE_ADAGRAD, EXACT_ADAGRAD, EXACT_SGD (no Adam)."""


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
    data_parallel: Optional[bool] = None,
    sharding: Any = None,
    **hparams: Any,
) -> tuple[nn.Module, FusedSparseOptimizer]:
    """Shard ``model``'s torchrec embedding collections with a fused optimizer.

    Returns ``(dmp_model, sparse_optimizer)``. ``model`` is sharded in place (keep a
    ``copy.deepcopy`` if you need the original). The tables keep the values they had
    (torchrec would otherwise re-initialise them). Without a process group, a gloo
    group of one process is started (CPU) so one process runs the same code as many;
    later calls in the same process reuse it.

    ``hparams`` go to the fused kernel (``eps``, ``weight_decay``, ``betas``...). Without
    ``plan``, every table gets a fused kernel and a model-parallel sharding (see the
    module docstring); pass a torchrec ``ShardingPlan`` to choose yourself.

    ``data_parallel``: wrap the dense part in DistributedDataParallel (torchrec's
    default). ``None`` does so only with more than one process: in a world of one, DDP
    would all-reduce every backward's dense gradients with itself, which costs time and
    changes nothing. The state dict has the same keys either way.

    ``sharding`` (without ``plan``) constrains torchrec's planner: ``None`` lets it choose
    per table among the shardings allowed here (one process: any model-parallel one;
    several: table_wise, row_wise, table_row_wise), a name (``"table_wise"``,
    ``"row_wise"``, ``"table_row_wise"``, ``"column_wise"``) imposes one on every table,
    ``"mixed"`` alternates table_wise and row_wise over the tables, and a dict maps table
    names to lists of allowed sharding types.
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
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0:
        raise ValueError(f"shard_model(lr={lr!r}): lr must be a number >= 0")
    if device is None:
        device = (
            torch.device("cuda", distributed.get_local_rank())
            if torch.cuda.is_available() else torch.device("cpu")
        )
    device = torch.device(device)
    if device.type == "cpu" and optimizer.lower() not in CPU_FUSED_OPTIMIZERS:
        raise ValueError(
            f"shard_model(optimizer={optimizer!r}): fbgemm has no fused CPU kernel for "
            f"{optimizer!r} (CPU: {', '.join(CPU_FUSED_OPTIMIZERS)}). Run on a GPU, or on "
            "CPU use the sparse-gradient back end: nn.EmbeddingBag(sparse=True) tables with "
            "recframe.optim.sparse.SparseAdam"
        )
    params = [p for _, module in collections for p in module.parameters()]
    if any(getattr(p, "_in_backward_optimizers", None) for p in params):
        raise ValueError(
            "shard_model: the model's tables already have an optimizer in backward (was it "
            "sharded before?); shard a fresh copy of the model"
        )
    distributed.init_default_group()
    initial = {
        f"{name}.{key}" if name else key: value.detach().clone()
        for name, module in collections
        for key, value in module.state_dict().items()
    }
    apply_optimizer_in_backward(cls, params, {"lr": lr, **hparams})
    import torch.distributed as dist

    if sharders is None and device.type == "cpu" and (
        dist.get_world_size() > 1 or sharding is not None
    ):
        sharders = cpu_sharders()
    if plan is None:
        plan = _fused_plan(model, collections, device, sharders, sharding)
    if data_parallel is None:
        data_parallel = dist.get_world_size() > 1
    kwargs: dict[str, Any] = {
        "device": device, "plan": plan, "init_data_parallel": bool(data_parallel),
    }
    if sharders is not None:
        kwargs["sharders"] = sharders
    if data_parallel:
        # not DDP's static_graph (torchrec's default): its first-iteration bookkeeping
        # asserts when that iteration runs under no_sync (gradient accumulation)
        kwargs["data_parallel_wrapper"] = _quiet_data_parallel_wrapper()
    dmp = DistributedModelParallel(model, **kwargs)
    _copy_initial_values(dmp, initial)
    return dmp, FusedSparseOptimizer(dmp)


def _quiet_data_parallel_wrapper() -> Any:
    """torchrec's `DefaultDataParallelWrapper` (static_graph off) without DDP's
    ``broadcast_buffers`` FutureWarning: torchrec itself passes the deprecated flag,
    and its replacement would also sync the buffers at init, which torchrec avoids."""
    from torchrec.distributed.model_parallel import DefaultDataParallelWrapper

    class _Wrapper(DefaultDataParallelWrapper):
        def wrap(self, dmp: Any, env: Any, device: torch.device) -> None:
            with warnings.catch_warnings():
                warnings.filterwarnings(
                    "ignore", message="`broadcast_buffers` is deprecated",
                    category=FutureWarning,
                )
                super().wrap(dmp, env, device)

    return _Wrapper(static_graph=False)


def _table_names(module: nn.Module) -> list[str]:
    configs = (
        module.embedding_bag_configs() if hasattr(module, "embedding_bag_configs")
        else module.embedding_configs()
    )
    return [config.name for config in configs]


def _fused_plan(
    model: nn.Module,
    collections: list[tuple[str, nn.Module]],
    device: torch.device,
    sharders: Optional[list[Any]],
    sharding: Any = None,
) -> Any:
    """A plan by torchrec's planner that gives every table a fused kernel and a
    model-parallel sharding (`shard_model`'s ``sharding`` picks which)."""
    import torch.distributed as dist
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
    from torchrec.distributed.planner.storage_reservations import (
        FixedPercentageStorageReservation,
    )
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
    from torchrec.distributed.sharding_plan import get_default_sharders

    kernels = [EmbeddingComputeKernel.FUSED.value]
    if device.type == "cuda":
        kernels += [
            EmbeddingComputeKernel.FUSED_UVM_CACHING.value,
            EmbeddingComputeKernel.FUSED_UVM.value,
        ]
    world_size = dist.get_world_size()
    tables = [table for _, module in collections for table in _table_names(module)]
    allowed = _allowed_shardings(tables, sharding, world_size)
    constraints = {
        table: ParameterConstraints(sharding_types=allowed[table], compute_kernels=kernels)
        for table in tables
    }
    # torchrun sets LOCAL_WORLD_SIZE; one process without it is a node of one (torchrec's
    # own guess, 8 processes per node, warns and falls back to the world size)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or world_size
    if world_size % local:
        local = world_size
    # the pod (high-bandwidth domain) of row-wise shardings' sub-groups: one node
    os.environ.setdefault("TORCHREC_RESOLVED_POD_SIZE", "1")
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=world_size, local_world_size=local),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    # the tables are materialised here, so torchrec's heuristic dense-size reservation
    # (deprecated) has nothing to estimate: keep a fixed share of each device's memory
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(percentage=0.15),
    )
    return planner.collective_plan(
        model, sharders if sharders is not None else get_default_sharders(),
        dist.GroupMember.WORLD,
    )


def cpu_sharders() -> list[Any]:
    """torchrec's default sharders, with row_wise and table_row_wise allowed for
    EmbeddingBagCollection tables on CPU too (torchrec offers them on CUDA only, yet
    its CPU kernels and gloo collectives run them: bucketised lookups, all-to-all)."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.sharding_plan import get_default_sharders

    class _CPURowWiseSharder(EmbeddingBagCollectionSharder):
        def sharding_types(self, compute_device_type: str) -> list[str]:
            types = list(super().sharding_types(compute_device_type))
            if compute_device_type == "cpu":
                types += [t for t in ("row_wise", "table_row_wise") if t not in types]
            return types

    return [
        _CPURowWiseSharder() if type(s) is EmbeddingBagCollectionSharder else s
        for s in get_default_sharders()
    ]


SHARDINGS = ("table_wise", "row_wise", "table_row_wise", "column_wise")
"""The model-parallel sharding types `shard_model(sharding=...)` accepts."""


def _allowed_shardings(tables: list[str], sharding: Any, world_size: int) -> dict[str, list[str]]:
    """Per table, the sharding types the planner may choose from."""
    if sharding is None:
        if world_size == 1:
            # one process: every model-parallel type (one shard each: the same layout)
            default = ["table_wise", "row_wise", "column_wise", "table_row_wise"]
        else:
            # no column_wise: a row-wise optimizer's state of column shards (one value
            # per row per shard) cannot be resharded to another world size
            default = ["table_wise", "row_wise", "table_row_wise"]
        return {t: list(default) for t in tables}
    if sharding == "mixed":
        return {t: ["table_wise" if i % 2 == 0 else "row_wise"] for i, t in enumerate(tables)}
    if isinstance(sharding, str):
        if sharding not in SHARDINGS:
            raise ValueError(
                f"shard_model(sharding={sharding!r}): choose from {list(SHARDINGS)}, "
                "'mixed' or a dict {table: [sharding types]}"
            )
        return {t: [sharding] for t in tables}
    if isinstance(sharding, dict):
        unknown = sorted(set(sharding) - set(tables))
        if unknown:
            raise ValueError(
                f"shard_model(sharding=...): unknown table(s) {unknown}; the tables are {tables}"
            )
        out = _allowed_shardings(tables, None, world_size)
        for table, types in sharding.items():
            types = [types] if isinstance(types, str) else list(types)
            bad = [t for t in types if t not in SHARDINGS]
            if bad or not types:
                raise ValueError(
                    f"shard_model(sharding={{{table!r}: {types!r}}}): sharding types must be "
                    f"a non-empty list from {list(SHARDINGS)}"
                )
            out[table] = types
        return out
    raise ValueError(
        f"shard_model(sharding={sharding!r}): expected None, a sharding name, 'mixed' or a "
        "dict {table: [sharding types]}"
    )


def _copy_initial_values(dmp: nn.Module, initial: dict[str, torch.Tensor]) -> None:
    from recframe.checkpoint.format import is_sharded

    state = dmp.state_dict()
    missing = [key for key in initial if key not in state]
    if missing:
        raise RuntimeError(
            f"shard_model: cannot find the sharded tables {missing[:3]} in the "
            "DistributedModelParallel state dict to restore their initial values"
        )
    for key, source in initial.items():
        value = state[key]
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
    """The leaf handed to the dense network (its ``.grad`` collects the micro-batch's
    gradient)."""
    window_output: Optional[torch.Tensor] = None
    """On the window's last micro-batch: the lookup of the whole window with autograd,
    whose backward is the window's one fused update."""
    scale: float = 1.0
    """This micro-batch's gradient is multiplied by it at the replay (its weight)."""


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
    ``param_groups`` with ``lr`` for torch LR schedulers) and exact accumulation.

    ``param_groups[i]["lr"]`` reaches the kernels at ``zero_grad`` and ``step`` (as in
    torchrec): a scheduler stepped after ``step`` takes effect from the next update on.
    ``state_dict`` holds the kernels' state (moments), the param groups (``lr``) and each
    kernel's iteration count (``iter``: Adam's bias correction), live tensors as torch
    optimizers return them (``copy.deepcopy`` it to keep a snapshot).
    """

    def __init__(self, dmp: nn.Module) -> None:
        # no super().__init__: the param groups are torchrec's own
        fused = getattr(dmp, "fused_optimizer", None)
        if fused is None or not list(fused.params):
            raise ValueError(
                "FusedSparseOptimizer: the model has no fused embedding tables (shard it with "
                "recframe.optim.fused.shard_model, whose plan gives every table a fused kernel)"
            )
        self.dmp = dmp
        self.fused = fused
        self.fused.save_param_groups(True)  # so lr is saved and restored with the state
        self.defaults = {}
        self._optimizer_step_pre_hooks: dict[int, Any] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Any] = OrderedDict()
        # torch's load hooks (register_load_state_dict_pre_hook), run by load_state_dict:
        # the row tracker of incremental checkpoints learns of every load this way
        self._optimizer_load_state_dict_pre_hooks: dict[int, Any] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Any] = OrderedDict()
        self._window: Any = None
        self._records: dict[int, list[_Lookup]] = {}
        self._grad_scale = 1.0
        self._patched: list[tuple[nn.Module, Any]] = []
        self._patched_kernels: list[list[nn.Module]] = []
        # per patched collection: its kernels' iteration counts before the window's
        # first lookup, put back when the window is dropped (a skipped update)
        self._iters_at_start: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._kernels = _kernels_of(dmp)

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
        """Called by the trainer's view: defer the tables' backward to the window's end
        (see the module docstring) when k > 1 or a bad window must be skippable."""
        self._window = window
        skip = getattr(window, "nonfinite_policy", None) == "skip"
        if not self._patched and (window.steps > 1 or skip):
            self._patch_collections(window)

    @property
    def updates_in_backward(self) -> bool:
        """Whether the update happens inside each ``loss.backward()`` (nothing deferred,
        nothing accumulated): then ``zero_grad`` is safe at any time, and it is where
        a changed ``lr`` reaches the kernels before the update."""
        return not self._patched

    def _patch_collections(self, window: Any) -> None:
        from torchrec.distributed.embedding import ShardedEmbeddingCollection
        from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

        found = [
            module for module in self.dmp.modules()
            if isinstance(module, (ShardedEmbeddingBagCollection, ShardedEmbeddingCollection))
        ]
        unpatched = [m for m in found if isinstance(m, ShardedEmbeddingCollection)]
        if unpatched and window.steps > 1:
            raise NotImplementedError(
                "gradient accumulation with fused optimizers supports "
                "EmbeddingBagCollection tables; use gradient_accumulation_steps=1 "
                "or the sparse-gradient back end for EmbeddingCollection"
            )
        if unpatched and getattr(window, "nonfinite_policy", None) == "skip":
            logger.warning(
                "EmbeddingCollection tables are updated inside backward by their fused "
                "optimizer: an update skipped for a NaN/inf (nonfinite_loss='skip') cannot "
                "undo theirs; use the sparse-gradient back end to make skips exact"
            )
        for module in found:
            if isinstance(module, ShardedEmbeddingCollection):
                continue
            index = len(self._patched)
            original = module.forward
            kernels = _kernels_of(module)
            forward = self._deferred_forward(index, original, kernels)
            module.forward = types.MethodType(forward, module)
            self._patched.append((module, original))
            self._patched_kernels.append(kernels)

    def _deferred_forward(self, index: int, original: Any, kernels: list[nn.Module]) -> Any:
        from torchrec.sparse.jagged_tensor import KeyedTensor

        optimizer = self

        def lookup(features: Any) -> Any:
            out = original(features)
            return out.wait() if hasattr(out, "wait") else out

        def forward(module: nn.Module, features: Any) -> Any:
            if not torch.is_grad_enabled() or not module.training:
                return original(features)
            records = optimizer._records.setdefault(index, [])
            if not records:  # the window's first lookup: keep the kernels' counts
                optimizer._iters_at_start[index] = [
                    (k.iter.clone(), k.iter_cpu.clone()) for k in kernels
                ]
            window = optimizer._window
            if window is not None and window.is_boundary:
                # the window's last micro-batch: look the whole window up with autograd
                # now (the update's lookup) and give the dense network this micro-batch's
                # rows, which saves this micro-batch a lookup of its own
                out = lookup(concat_kjt_batches([r.features for r in records] + [features]))
                whole = out.values()
                size = features.stride()
                values = whole[whole.shape[0] - size:].detach().requires_grad_()
                records.append(_Lookup(features, values, window_output=whole))
            else:
                # fbgemm counts every lookup as an iteration (Adam's bias correction):
                # this look-ahead lookup must not count, only the window's lookup does
                iters = [(k.iter.clone(), k.iter_cpu.clone()) for k in kernels]
                with torch.no_grad():
                    out = lookup(features)
                    for k, (it, it_cpu) in zip(kernels, iters):
                        k.iter.copy_(it)
                        k.iter_cpu = it_cpu
                values = out.values().detach().requires_grad_()
                records.append(_Lookup(features, values))
            return KeyedTensor(
                keys=out.keys(), length_per_key=out.length_per_key(), values=values,
                key_dim=out.key_dim(),
            )

        forward.original = original  # type: ignore[attr-defined]
        return forward

    def scale_accumulated_gradients(self, factor: float) -> None:
        """Scale the window's table gradients by ``factor`` when `step` back-propagates
        them (the trainer's view passes the window's weight at its end, 1/k for k equal
        micro-batches; a loop that divides each micro-batch's loss by k itself does not
        call this)."""
        self._grad_scale *= float(factor)

    def rescale_accumulated_gradients(self, factor: float) -> None:
        """Scale the gradients of the micro-batches looked up so far (not of later ones)
        by ``factor``: the trainer's per-sample weighting of unequal micro-batches."""
        for mine in self._records.values():
            for record in mine:
                record.scale *= float(factor)

    def accumulated_gradients(self) -> list[torch.Tensor]:
        """The pooled-embedding gradients of the window's micro-batches, which `step`
        back-propagates into the tables (the trainer checks them for NaN/inf)."""
        return [
            r.values.grad for mine in self._records.values() for r in mine
            if r.values.grad is not None
        ]

    def step(self, closure: Any = None) -> None:
        self.fused.step()  # pushes the current lr to the kernels (the update itself is
        # fused into backward: the micro-batch's, or the window's below)
        if self._patched:
            with torch.enable_grad():
                self._replay()

    def _replay(self) -> None:
        """Back-propagate the window's micro-batch gradients (times the factor from
        `scale_accumulated_gradients`: their mean) through one lookup of the whole
        window, per collection: the fused kernels apply one update for the window. That
        lookup was made on the window's last micro-batch, or is made here (when no
        micro-batch was marked as the window's last)."""
        records, self._records = self._records, {}
        self._iters_at_start = {}
        if not records:
            return
        counts = {len(mine) for mine in records.values()}
        if len(counts) != 1:
            raise RuntimeError(
                "deferred embedding lookups do not match the embedding collections; each "
                "collection must be called once per micro-batch"
            )
        scale, self._grad_scale = self._grad_scale, 1.0
        for index, (_module, original) in enumerate(self._patched):
            mine = records.get(index)
            if not mine:  # a collection this window did not use: nothing to update
                continue
            whole = mine[-1].window_output
            if whole is None or whole.shape[0] != sum(r.values.shape[0] for r in mine):
                out = original(concat_kjt_batches([r.features for r in mine]))
                whole = (out.wait() if hasattr(out, "wait") else out).values()
            grads = [
                (r.values.grad if r.scale == 1.0 else r.values.grad * r.scale)
                if r.values.grad is not None else torch.zeros_like(r.values)
                for r in mine
            ]
            grad = grads[0] if len(grads) == 1 else torch.cat(grads)
            if scale != 1.0:
                grad = grad * scale
            torch.autograd.backward(whole, grad)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._records:
            # a dropped (skipped) window: its lookups go, and the kernels count the
            # iteration of its lookup no more (Adam's bias correction, ``iter`` state)
            for index, counts in self._iters_at_start.items():
                for kernel, (it, it_cpu) in zip(self._patched_kernels[index], counts):
                    kernel.iter.copy_(it)
                    kernel.iter_cpu = it_cpu
        self._records = {}
        self._iters_at_start = {}
        self._grad_scale = 1.0
        self.fused.zero_grad(set_to_none=set_to_none)  # also pushes the current lr

    # --- state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = self.fused.state_dict()
        state["iter"] = [int(k.iter.max()) for k in self._kernels]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for pre_hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            state_dict = pre_hook(self, state_dict) or state_dict
        iters = state_dict.get("iter")
        if iters is not None and len(iters) != len(self._kernels):
            # another sharding plan (world size) groups the tables into other kernels;
            # every kernel counts every training lookup, so one count holds for all
            iters = [max((int(i) for i in iters), default=0)] * len(self._kernels)
        state_dict = {k: v for k, v in state_dict.items() if k != "iter"}
        if "state" in state_dict:
            state_dict["state"] = self._into_live_shards(state_dict["state"])
        with_groups = "param_groups" in state_dict  # a state saved without lr: keep ours
        self.fused.save_param_groups(with_groups)
        try:
            self.fused.load_state_dict(state_dict)
        finally:
            self.fused.save_param_groups(True)
        if iters is not None:
            for kernel, value in zip(self._kernels, iters):
                kernel.iter.fill_(int(value))
                kernel.iter_cpu = torch.full_like(kernel.iter_cpu, int(value))
        self.fused.zero_grad()  # the loaded lr reaches the kernels now
        for post_hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            post_hook(self)

    def _into_live_shards(self, state: dict[str, Any]) -> dict[str, Any]:
        """Accept whole (unsharded) tensors where the live state is sharded, as a
        checkpoint that materialises tensors gives them: copy each one's slices into
        the live local shards (torchrec's own loader takes only ShardedTensors)."""
        from recframe.checkpoint.format import is_sharded

        live = self.fused.state_dict()["state"]
        out: dict[str, Any] = {}
        for param_key, entries in state.items():
            current = live.get(param_key)
            if current is None or not isinstance(entries, dict):
                out[param_key] = entries
                continue
            converted = {}
            for name, value in entries.items():
                target = current.get(name)
                if (is_sharded(target) and isinstance(value, torch.Tensor)
                        and not is_sharded(value)):
                    if tuple(value.shape) != tuple(target.size()):
                        raise ValueError(
                            f"load_state_dict: {param_key} {name} has shape "
                            f"{tuple(value.shape)}, the live state {tuple(target.size())}"
                        )
                    with torch.no_grad():
                        for shard in target.local_shards():
                            index = tuple(
                                slice(o, o + n) for o, n in
                                zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)
                            )
                            shard.tensor.copy_(value[index])
                    value = target
                converted[name] = value
            out[param_key] = converted
        return out


def _is_tbe(module: nn.Module) -> bool:
    """An fbgemm table-batched embedding kernel (it counts iterations)."""
    return (
        isinstance(getattr(module, "iter", None), torch.Tensor)
        and isinstance(getattr(module, "iter_cpu", None), torch.Tensor)
        and hasattr(module, "set_learning_rate")
    )


def _kernels_of(root: nn.Module) -> list[nn.Module]:
    """The fbgemm kernels of ``root``'s sharded collections, in a fixed order (torchrec
    keeps a collection's lookups in a plain list, out of ``modules()``)."""
    found: list[nn.Module] = []
    seen: set[int] = set()
    for module in root.modules():
        for lookup in [module, *getattr(module, "_lookups", [])]:
            for m in lookup.modules():
                for candidate in (m, getattr(m, "_emb_module", None)):
                    if (candidate is not None and id(candidate) not in seen
                            and _is_tbe(candidate)):
                        seen.add(id(candidate))
                        found.append(candidate)
    return found
