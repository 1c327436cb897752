"""Restoring a checkpoint, all or nothing, through one table of part loaders.

`PART_LOADERS` maps each checkpoint part to its loader; full and delta restores
(`recframe.checkpoint.incremental`) use the same table. A restore runs in three
phases, so that a corrupt or hostile checkpoint leaves the model, the optimizers and
every registered object exactly as they were:

1. *plan*: every part's tree is decoded and checked (model and optimizer-state shapes
   against the live ones), tensors that become new objects (a dense optimizer's state,
   an LR scheduler's, io_state) are read into fresh memory with their CRC32 checked,
   and the copies into live tensors and the ``load_state_dict`` calls are queued;
2. *verify*: every chunk a queued copy needs is checked against its CRC32, nothing
   live is written. With ``keep`` (`STAGE_IN_MEMORY`, default on object stores) the
   bytes are read and kept for phase 3: one download of each chunk, extra host memory
   of the live tensors' size. Without (default on local disks) each file's identity
   (inode, size, mtime, ctime) is recorded and each chunk's CRC32 computed from a
   read-only memory map of the chunk where its pages are cached (no copy), else by
   reading it in small slices, each checked while in the CPU cache (memory: one
   slice per thread; `format.VERIFY_BY_MAPPING`, `format.VERIFY_SLICE_BYTES`); a
   file changed in the last clock tick is stat-ed again once the tick has passed
   (`RACY_WINDOW_NS`). The chunks of every part read from one checkpoint go to the
   threads (`format.reader_pool`, kept between restores) in one hand-off.
   On an object store without ``keep`` each chunk is read into a scratch buffer,
   then read and checked again at apply;
3. *apply*: first every file verified without keeping is confirmed to be the one
   verified (same identity), so a checkpoint changed between the phases is refused
   before anything live is written; then each chunk is read straight into its live
   tensor where the tensor's region is one contiguous CPU block holding the whole
   chunk (the usual case: one read of each chunk in all, plus the CRC pass), else
   into a scratch buffer (``concurrency`` x one chunk, 64 MiB by default), checked
   again and copied; the file's identity is compared again around each read, so a
   writer racing the copy itself is reported, not silent. Then the queued calls run
   in order.

Phases 2 and 3 run in one `TensorReader.session` per reader: each local file is opened
once and read by every thread with positional reads, so the copy reads the very file
(the open inode) whose identity and checksums were verified. What the two passes cost
against a plain read is measured in ``docs/checkpoints.md`` ("What verify-before-apply
costs").

The guarantee assumes the filesystem moves a file's ctime (or inode) when its bytes
change, as POSIX filesystems do; recframe's own writers never touch a committed
checkpoint (one writer per output dir, data files written once, in a staging dir).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from recframe.checkpoint.format import (
    CheckpointCorruptError,
    TensorReader,
    decode_tree,
    encode_tree,
    is_sharded,
    reader_pool,
    tree_tensor_keys,
)

STAGE_IN_MEMORY: Optional[bool] = None
"""Keep the verified bytes of live tensors in memory between verify and apply (True),
or read each chunk again at apply (False); None: keep on object stores (a second
download costs more than the memory), read again on local filesystems (from the page
cache, straight into the live tensors: no extra memory beyond a mapping of one chunk
per reader thread)."""


class Transaction:
    """The queued copies into live tensors and calls of one restore (phases 2, 3)."""

    def __init__(self) -> None:
        self._steps: list[tuple[Optional[TensorReader], Any]] = []
        self._first: list[Callable[[], Callable[[], None]]] = []
        self._checks: list[Callable[[], None]] = []
        self._closers: list[Callable[[], None]] = []

    def copy(self, reader: TensorReader, targets: dict[str, Any]) -> None:
        """Queue filling the live ``targets`` from ``reader`` (shapes checked now)."""
        if targets:
            self._steps.append((reader, reader.plan(targets)))

    def call(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` (a ``load_state_dict``...) after the copies queued so far."""
        self._steps.append((None, fn))

    def call_first(self, fn: Callable[[], Callable[[], None]]) -> None:
        """Queue ``fn`` before every copy: it loads objects that need no live tensor
        (a registered object's or hook's state, which user code may reject) and returns
        how to undo that. One raising undoes the ones run before it, and nothing live
        has been written yet; a later step failing (a copy refused, a call) undoes them
        all."""
        self._first.append(fn)

    def check(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` at the end of `verify`, once every queued copy's chunks checked out
        and before anything is applied: it checks what was read outside the readers (a
        delta chain's rows, read in the background while the readers verify) and raises
        `CheckpointCorruptError` to refuse the restore with nothing live written."""
        self._checks.append(fn)

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the restore ends, applied or not (`close`): it ends background
        work started while planning."""
        self._closers.append(fn)

    def close(self) -> None:
        """Run the `on_close` functions (each once, the last queued first; every one
        even if one raises, the first exception raised after), then drop every queued
        step: the part loaders' closures hold their context, which holds this
        transaction (a cycle), so what they read (a chain's delta rows) would otherwise
        live until the garbage collector runs, and the next restore fault in fresh pages
        for its own (measured ~8200 faults, 12 ms of a warm 10-delta restore's CPU)."""
        first: Optional[BaseException] = None
        while self._closers:
            try:
                self._closers.pop()()
            except BaseException as e:  # (a second Ctrl-C): the others still run
                first = first or e
        self._steps.clear()
        self._first.clear()
        self._checks.clear()
        if first is not None:
            raise first

    def verify(self, keep: bool) -> None:
        """Check every queued copy's chunks, each reader's in one `TensorReader.verify`
        (one hand-off to the threads, not one per part), then run the `check`
        functions."""
        by_reader: dict[int, tuple[TensorReader, list[Any]]] = {}
        for reader, jobs in self._steps:
            if reader is not None:
                by_reader.setdefault(id(reader), (reader, []))[1].extend(jobs)
        for reader, jobs in by_reader.values():
            reader.verify(jobs, keep)
        for fn in self._checks:
            fn()

    def run(self, keep: bool) -> None:
        """`verify`, then `apply`, on one pool of worker threads shared by every step
        (`format.reader_pool`: not a pool per step and phase, nor per restore)."""
        readers = list({id(r): r for r, _ in self._steps if r is not None}.values())
        workers = max([r.concurrency for r in readers], default=1)
        pool = reader_pool(workers)
        with contextlib.ExitStack() as sessions:
            for reader in readers:  # each file opened once, for both phases
                sessions.enter_context(reader.session())
                reader.pool = pool
            try:
                self.verify(keep)
                self.apply()
            finally:
                for reader in readers:
                    reader.pool = None

    def apply(self) -> None:
        """Confirm every reader's files are the ones verified, then copy and call in
        order: a file changed since `verify` is refused before anything live changes."""
        for reader, step in self._steps:
            if reader is not None:
                reader.confirm(step)
        undo: list[Callable[[], None]] = []
        try:
            for fn in self._first:
                undo.append(fn())
            for reader, step in self._merged():
                if reader is not None:
                    reader.apply(step)
                else:
                    step()
        except BaseException:
            # a copy refused (its file changed after `confirm`) or a call failing undoes
            # the objects loaded first too (their undo was dropped once all had loaded)
            for back in reversed(undo):
                back()
            raise

    def _merged(self) -> list[tuple[Optional[TensorReader], Any]]:
        """The steps, consecutive copies from one reader joined into one (one hand-off
        to the threads, no wait for the slowest chunk of each part; copies from one
        checkpoint are independent of one another), calls where they were."""
        merged: list[tuple[Optional[TensorReader], Any]] = []
        for reader, step in self._steps:
            if reader is not None and merged and merged[-1][0] is reader:
                merged[-1] = (reader, merged[-1][1] + step)
            else:
                merged.append((reader, step))
        return merged


@dataclass
class PartContext:
    """What a part loader needs: the saver, the checkpoint's reader, the transaction."""

    saver: Any
    txn: Transaction
    reader: TensorReader
    where: str
    manifest: dict[str, Any]
    strict: bool
    tracked: frozenset[str] = frozenset()
    """Tensor keys whose values a delta chain supplies (not read from this checkpoint)."""


class _Key(str):
    """A tensor key standing in for its tensor while a tree is decoded."""

    def numpy(self) -> _Key:
        return self


def _corrupt(ctx: PartContext, part: str, why: str) -> CheckpointCorruptError:
    return CheckpointCorruptError(f"{ctx.where}: part {part!r} {why}")


# --- the part loaders ------------------------------------------------------------
def _model_part(part: str) -> Callable[[PartContext, Any], None]:
    def load(ctx: PartContext, tree: Any) -> None:
        from recframe.checkpoint.saver import CheckpointError, logger, split_model_state

        sparse, dense = split_model_state(ctx.saver.model)
        live = sparse if part == "sparse" else dense
        saved = decode_tree(tree, _Key)  # {state key: tensor key}
        if not isinstance(saved, dict) or not all(isinstance(v, _Key) for v in saved.values()):
            raise _corrupt(ctx, part, "is not a model state (a dict of tensors)")
        missing = sorted(set(live) - set(saved))
        unexpected = sorted(str(k) for k in set(saved) - set(live))
        if (missing or unexpected) and ctx.strict:
            raise CheckpointError(
                f"{ctx.where}: part {part!r} does not match the model: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}; pass strict=False to load what "
                "matches"
            )
        if missing or unexpected:
            logger.warning("%s part %r: missing %s, unexpected %s (strict=False)",
                           ctx.where, part, missing[:5], unexpected[:5])
        targets = {
            str(saved[k]): live[k] for k in live if k in saved and saved[k] not in ctx.tracked
        }
        _check_module_states(ctx, targets)
        ctx.txn.copy(ctx.reader, targets)

    return load


def _check_module_states(ctx: PartContext, targets: dict[str, Any]) -> None:
    """Modules with ``check_restored_state(state, where)`` (a dynamic table's id map) see
    their saved buffers while planning: those are read now (CRC32 checked), checked by
    the module (which raises `CheckpointCorruptError`), and copied at apply instead.
    Saved shapes or dtypes other than the live ones are left to the usual copy, which
    refuses them before reading anything."""
    checks = {}
    for module in ctx.saver.model.modules():
        if callable(getattr(module, "check_restored_state", None)):
            for name, buf in module.named_buffers(recurse=False):
                checks[(buf.data_ptr(), tuple(buf.shape), buf.dtype)] = (module, name)
    found: dict[int, tuple[Any, dict[str, str], dict[str, Any]]] = {}
    for key, live in list(targets.items()) if checks else []:
        if is_sharded(live) or not isinstance(live, torch.Tensor) or not live.numel():
            continue
        owner = checks.get((live.data_ptr(), tuple(live.shape), live.dtype))
        if owner is not None:
            module, name = owner
            entry = found.setdefault(id(module), (module, {}, {}))
            entry[1][name], entry[2][name] = key, live
    for module, keys, live in found.values():
        if any(key not in ctx.reader or list(ctx.reader.shape(key)) != list(live[name].shape)
               or ctx.reader.dtype(key) != live[name].dtype for name, key in keys.items()):
            continue
        state = {name: ctx.reader.read(key) for name, key in keys.items()}
        module.check_restored_state(state, ctx.where)
        for key in keys.values():
            del targets[key]

        def copy(state: dict[str, Any] = state, live: dict[str, Any] = live) -> None:
            with torch.no_grad():
                for name, value in state.items():
                    live[name].copy_(value)

        ctx.txn.call(copy)


def _sparse_opt(ctx: PartContext, tree: Any) -> None:
    opt = ctx.saver.sparse_optimizer
    if opt is None:
        return
    live = opt.state_dict()
    if ctx.tracked:
        _plan_state(ctx, tree, live, "sparse_opt", opt, tracked=ctx.tracked)
    elif _holds_sharded(live):
        _plan_sharded_optimizer(ctx, tree, live, opt)
    else:
        _plan_state(ctx, tree, live, "sparse_opt", opt)


def _extra(ctx: PartContext, tree: Any) -> None:
    from recframe.checkpoint.saver import logger

    saver = ctx.saver
    extra = _read_fresh(ctx, tree)
    if not isinstance(extra, dict):
        raise _corrupt(ctx, "extra", "is not a dict of named states")
    for name, obj in saver._extra.items():
        if name in extra and isinstance(obj, torch.optim.Optimizer):
            _check_param_shapes(ctx, obj, extra[name], f"extra {name!r}")

    def apply() -> Callable[[], None]:
        data_before = dict(saver._extra_data)
        loaded: list[tuple[Any, Any]] = []  # (object, its state before), for the undo

        def undo() -> None:
            for obj, state in reversed(loaded):
                obj.load_state_dict(state)
            saver._extra_data.clear()
            saver._extra_data.update(data_before)

        try:
            for name, obj in saver._extra.items():
                if name not in extra:
                    logger.warning("checkpoint has no extra state %r; keeping its current "
                                   "value", name)
                    continue
                loader = getattr(obj, "load_state_dict", None)
                if callable(loader):
                    saved = getattr(obj, "state_dict", None)
                    if callable(saved):  # (before the load: a half-done one is undone too)
                        loaded.append((obj, saved()))
                    loader(extra[name])
                saver._extra_data[name] = extra[name]
            for name in set(extra) - set(saver._extra):
                saver._extra_data[name] = extra[name]
        except BaseException:
            undo()
            raise
        return undo

    # before the tensor copies: a state its object rejects leaves everything as it was
    ctx.txn.call_first(apply)


def _io_state(ctx: PartContext, per_rank: Any) -> None:
    from recframe import distributed
    from recframe.checkpoint.saver import logger

    world = ctx.manifest.get("world_size", 1)
    if world != distributed.get_world_size():
        logger.warning(
            "checkpoint was saved by %d ranks, this run has %d: RNG streams are not "
            "restored; dataset positions are re-split where the dataset can (resplit)",
            world, distributed.get_world_size(),
        )
        _io_resplit(ctx, per_rank, world)
        return
    tree = per_rank.get(str(distributed.get_rank()))
    if tree is None:
        return
    states = _read_fresh(ctx, tree)
    if not isinstance(states, dict):
        raise _corrupt(ctx, "io_state", "is not a dict of named states")
    saver = ctx.saver

    def apply() -> None:
        for name, obj in saver._io.items():
            if name in states:
                obj.load_state_dict(states[name])
            else:
                logger.warning("checkpoint has no io_state %r", name)

    ctx.txn.call(apply)


def _io_resplit(ctx: PartContext, per_rank: Any, world: int) -> None:
    """Another world size: each io object with ``resplit(states)`` (the train data's
    position) gets every old rank's state, in rank order; the others start afresh."""
    from recframe.checkpoint.saver import logger

    takers = {name: obj for name, obj in ctx.saver._io.items()
              if callable(getattr(obj, "resplit", None))}
    if not takers:
        return
    trees = [per_rank.get(str(r)) if isinstance(per_rank, dict) else None
             for r in range(world)]
    if any(tree is None for tree in trees):
        logger.warning("%s: io_state lacks some of its %d ranks: dataset positions are not "
                       "restored", ctx.where, world)
        return
    states = [_read_fresh(ctx, tree) for tree in trees]
    if not all(isinstance(state, dict) for state in states):
        raise _corrupt(ctx, "io_state", "is not a dict of named states")

    def apply() -> None:
        for name, obj in takers.items():
            obj.resplit([state.get(name) for state in states])

    ctx.txn.call(apply)


PART_LOADERS: dict[str, Callable[[PartContext, Any], None]] = {
    "sparse": _model_part("sparse"),
    "dense": _model_part("dense"),
    "sparse_opt": _sparse_opt,
    "extra": _extra,
    "io_state": _io_state,
}
"""Each checkpoint part's loader: it plans (reads fresh tensors, checks shapes, queues
copies and calls on ``ctx.txn``); nothing live changes until the transaction applies."""


# --- restoring ------------------------------------------------------------------------
def plan_parts(
    saver: Any, txn: Transaction, storage: Any, directory: str, manifest: dict[str, Any],
    parts: list[str], strict: bool, tracked: frozenset[str] = frozenset(),
) -> None:
    """Plan loading ``parts`` of one checkpoint into ``txn`` (through `PART_LOADERS`)."""
    from recframe.checkpoint.saver import CheckpointError

    reader = TensorReader(storage, directory, manifest["tensors"], saver.concurrency)
    ctx = PartContext(saver, txn, reader, storage.display(directory), manifest, strict, tracked)
    trees = manifest["parts"]
    for part in parts:
        if part not in trees:
            if strict and part not in ("sparse_opt", "io_state"):
                raise CheckpointError(f"{ctx.where} has no part {part!r}")
            continue
        PART_LOADERS[part](ctx, trees[part])


def restore(
    saver: Any, storage: Any, directory: str, manifest: dict[str, Any], parts: list[str],
    strict: bool,
) -> dict[str, Any]:
    """Load ``parts`` of a checkpoint (a delta: with its chain) all or nothing."""
    from recframe.checkpoint import incremental

    txn = Transaction()
    try:
        tracked: frozenset[str] = frozenset()
        if incremental.is_delta(manifest):
            tracked = incremental.plan_chain(saver, txn, storage, directory, manifest, parts,
                                             strict)
        plan_parts(saver, txn, storage, directory, manifest, parts, strict, tracked)
        keep = STAGE_IN_MEMORY if STAGE_IN_MEMORY is not None else not storage.is_local
        txn.run(keep)
    finally:
        txn.close()
    return manifest


# --- state trees with live counterparts ------------------------------------------------
def _read_fresh(ctx: PartContext, tree: Any) -> Any:
    """Decode ``tree`` with its tensors read into new memory (checked now)."""
    values = ctx.reader.read_many(dict.fromkeys(tree_tensor_keys(tree)))
    return decode_tree(tree, values.__getitem__)


def _size(value: Any) -> list[int]:
    return list(value.size()) if is_sharded(value) else list(value.shape)


def _plan_state(
    ctx: PartContext, tree: Any, live: Any, prefix: str, opt: Any,
    tracked: frozenset[str] = frozenset(),
) -> None:
    """An optimizer's state: tensors with a live counterpart of the same shape and dtype
    are copied into it (how the state of fused/sharded optimizers is restored), the
    rest read fresh; a counterpart of another shape is a mismatch (``ValueError``), as
    for model tensors. ``tracked``: keys whose live tensors a delta chain filled."""
    reader = ctx.reader
    live_map: dict[str, Any] = {}
    try:
        encode_tree(live, prefix, live_map)
    except TypeError:
        live_map = {}
    keys = tree_tensor_keys(tree)
    in_place: dict[str, Any] = {}
    fresh: list[str] = []
    for key in keys:
        if key in tracked:  # the base's load creates it (resolve_chain checked layouts)
            continue
        cand = live_map.get(key)
        if isinstance(cand, torch.Tensor) or is_sharded(cand):
            shape = reader.shape(key)
            if _size(cand) != shape and math.prod(shape) > 1 and math.prod(_size(cand)) > 1:
                raise ValueError(
                    f"{ctx.where}: optimizer state {key!r} has shape {shape}, the live "
                    f"optimizer's has {_size(cand)}; the model does not match the checkpoint "
                    "(exclude 'sparse_opt' in the load config to start the optimizer fresh)"
                )
            if _size(cand) == shape and cand.dtype == reader.dtype(key):
                in_place[key] = cand
                continue
        fresh.append(key)
    values: dict[str, Any] = reader.read_many(dict.fromkeys(fresh))
    _check_param_shapes(ctx, opt, decode_tree(tree, _Key), prefix,
                        shapes={k: torch.Size(reader.shape(k)) for k in keys if k in reader})
    ctx.txn.copy(reader, in_place)
    values.update(in_place)

    def apply() -> None:
        if tracked:
            now: dict[str, Any] = {}
            encode_tree(opt.state_dict(), prefix, now)  # after the chain was applied
            lost = [k for k in keys if k in tracked and k not in now]
            if lost:
                raise CheckpointCorruptError(
                    f"{ctx.where}: optimizer state {lost[:3]} of the checkpoint is not in "
                    "the live optimizer after its chain was applied"
                )
            values.update({k: now[k] for k in keys if k in tracked})
        opt.load_state_dict(decode_tree(tree, values.__getitem__))

    ctx.txn.call(apply)


def _check_param_shapes(
    ctx: PartContext, opt: Any, saved: Any, what: str,
    shapes: Optional[dict[str, torch.Size]] = None,
) -> None:
    """A torch optimizer's saved per-parameter state must fit today's parameters: a
    state tensor with a parameter's number of dims must have its shape (Adam's moments,
    Adagrad's sums...), else the next step fails far from the cause."""
    if not isinstance(opt, torch.optim.Optimizer) or not isinstance(saved, dict):
        return
    _check_param_groups(ctx, opt, saved.get("param_groups"), what)
    state = saved.get("state")
    if not isinstance(state, dict):
        return
    params = [p for group in opt.param_groups for p in group["params"]]
    for index, entries in state.items():
        if not isinstance(index, int) or not 0 <= index < len(params) \
                or not isinstance(entries, dict):
            continue
        param = params[index]
        for name, value in entries.items():
            if isinstance(value, _Key):
                shape = (shapes or {}).get(str(value))
                if shape is None and str(value) in ctx.reader:
                    shape = torch.Size(ctx.reader.shape(str(value)))
            elif isinstance(value, torch.Tensor):
                shape = value.shape
            else:
                continue
            if shape is not None and len(shape) == param.dim() and param.dim() > 0 \
                    and shape != param.shape:
                raise ValueError(
                    f"{ctx.where}: {what} state {name!r} of parameter {index} has shape "
                    f"{list(shape)}, the parameter has {list(param.shape)}; the model does "
                    "not match the checkpoint"
                )


def _check_param_groups(ctx: PartContext, opt: Any, groups: Any, what: str) -> None:
    """What ``torch.optim.Optimizer.load_state_dict`` checks, checked while planning:
    failing there (in the apply phase) would leave the model already overwritten."""
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ):
        raise CheckpointCorruptError(
            f"{ctx.where}: {what} param_groups is not a list of groups with their params"
        )
    saved = [len(g["params"]) for g in groups]
    live = [len(g["params"]) for g in opt.param_groups]
    if saved != live:
        raise ValueError(
            f"{ctx.where}: {what} has param groups of {saved} parameters, the live "
            f"optimizer {live}; the model does not match the checkpoint"
        )


def _holds_sharded(tree: Any) -> bool:
    if is_sharded(tree):
        return True
    if isinstance(tree, dict):
        return any(_holds_sharded(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(_holds_sharded(v) for v in tree)
    return False


class _Saved:
    """A tensor of the saved tree, read only when used."""

    def __init__(self, key: str) -> None:
        self.key = key

    def numpy(self) -> _Saved:
        return self


def _plan_sharded_optimizer(ctx: PartContext, tree: Any, live: dict[str, Any], opt: Any) -> None:
    """The state of an optimizer of sharded tables (torchrec's fused optimizers), for
    any world size and sharding plan.

    Each rank's optimizer holds state only for the table shards it owns, so the saved
    tree (rank 0's) does not list every rank's entries; the tensors of all ranks are in
    the manifest under their tree keys (``sparse_opt.state.<param>.<name>``), each as a
    global tensor with its shards' boxes. So the live state drives: every sharded live
    tensor is filled from the boxes that overlap its local shards (resharding), and the
    rest (param groups' hyperparameters such as ``lr``, counters) comes from the saved
    tree."""
    from recframe.checkpoint.saver import CheckpointError

    reader = ctx.reader
    live_map: dict[str, Any] = {}
    live_tree = encode_tree(live, "sparse_opt", live_map)
    sharded = {k: v for k, v in live_map.items() if is_sharded(v)}
    missing = sorted(k for k in sharded if k not in reader)
    if missing:
        raise CheckpointError(
            f"{ctx.where}: the checkpoint has no sparse optimizer state {missing[:3]} for "
            "this model's tables (saved with another sparse optimizer or other tables?); "
            "exclude 'sparse_opt' in the load config to start the optimizer fresh"
        )
    saved = decode_tree(tree, _Saved)
    if not isinstance(saved, dict):
        raise _corrupt(ctx, "sparse_opt", "is not an optimizer state")
    needed: set[str] = set()

    def collect(value: Any) -> Any:
        if isinstance(value, _Saved):
            needed.add(value.key)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                collect(v)
        return value

    _merge_sharded(decode_tree(live_tree, live_map.__getitem__), saved, collect)
    values = reader.read_many(dict.fromkeys(needed))
    ctx.txn.copy(reader, sharded)

    def resolve(value: Any) -> Any:
        if isinstance(value, _Saved):
            return values[value.key]
        if isinstance(value, dict):
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if isinstance(value, tuple):
            return tuple(resolve(v) for v in value)
        return value

    def apply() -> None:
        result = decode_tree(live_tree, live_map.__getitem__)
        _merge_sharded(result, saved, resolve)
        opt.load_state_dict(result)

    ctx.txn.call(apply)


def _merge_sharded(result: dict[str, Any], saved: dict[str, Any], resolve: Any) -> None:
    saved_state = saved.get("state") or {}
    for param, entries in (result.get("state") or {}).items():
        theirs = saved_state.get(param) if isinstance(saved_state, dict) else None
        if not isinstance(entries, dict) or not isinstance(theirs, dict):
            continue
        for name, value in entries.items():
            if not is_sharded(value) and name in theirs:
                entries[name] = resolve(theirs[name])
    groups = saved.get("param_groups")
    if isinstance(groups, list) and groups and isinstance(result.get("param_groups"), list):
        # every table of recframe's sharded models shares the hyperparameters; a rank's
        # groups list the parameters it owns, which differ between plans
        for i, group in enumerate(result["param_groups"]):
            source = groups[min(i, len(groups) - 1)]
            if isinstance(source, dict):
                group.update({k: resolve(v) for k, v in source.items() if k != "params"})
    elif "param_groups" in result and groups is None:
        del result["param_groups"]  # saved without them: keep the live hyperparameters
    for key, value in saved.items():
        if key not in ("state", "param_groups"):
            result[key] = resolve(value)
