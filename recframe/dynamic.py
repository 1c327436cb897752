"""Dynamic embedding tables: an id->row map with admission and eviction under a row budget.

Real ids are unbounded (new users and items every hour, most seen once). A *dynamic*
table (schema mapping ``kind: dynamic``, see `recframe.schema.DynamicSpec`) keeps an
ordinary embedding table of ``num_embeddings`` rows (the row budget: the memory it may
use) and, in front of it, a recframe-owned map from raw int64 ids to rows:

* rows ``[0, fallback_rows)``: a small hashed fallback table shared by every id that
  has no row of its own (not yet admitted, evicted, or unknown at evaluation);
* rows ``[fallback_rows, num_embeddings)``: one admitted id each.

Lookup is vectorised: the admitted ids are kept sorted (``torch.sort`` when the map
changes; the used rows first, so only they are searched) and each batch is mapped with
one ``torch.searchsorted``; no Python runs per id.

**When the map changes.** Only at a step boundary (`DynamicIdMap.end_step`, run after
the optimizer update by `recframe.hooks.DynamicEmbeddingHook`): during a step, every
micro-batch of a gradient-accumulation window sees one mapping, and the ids it met in
training are queued. At the boundary admitted ids get their frequency (LFU) or last-seen
step (LRU, TTL) updated; the others are counted in a count-min sketch (``min_count``,
one count per lookup) or drawn (``probability``) for admission, deduplicated
(``torch.unique``) only when there are free rows; every
``eviction_interval`` steps rows are evicted first (LFU, LRU or TTL), then admitted ids
fill the free rows (the most frequent first when there are more than free rows). An id
admitted at a boundary is looked up in its own row from the next step on. Evaluation
(``model.eval()`` or no grad) queues nothing, so it never admits an id. While the table
is full and no eviction is due nothing reads the counters, so their updates wait in a
queue (`DynamicIdMap.flush`) until the map next changes, a ``state_dict`` is taken (a
checkpoint), or 64 steps passed: the same values, at a fraction of the per-step cost.

**Row values.** A newly admitted row starts as a copy of the fallback row the id used
until then (a warm start), an evicted row is zeroed, and the optimizer state of both is
reset (`reset_rows`). These writes happen outside the optimizer, so the hook marks the
rows in the incremental-checkpoint `RowTracker`: a delta carries them.

**Sparse back ends and ranks.** recframe's row-wise sparse optimizers (tables with
``sparse=True`` gradients) and torchrec's fused sharded tables (`shard_model`): a
sharded table's rows and its fused optimizer state are reset in each rank's local
shards (views of the live kernels' storage). The map is replicated on every rank: at
the step boundary the ranks all-gather their queued ids, so every rank makes the same
admissions and evictions.

**Checkpoints.** The map is the module's buffers (ids, in-use flags, counts, last-seen
steps, the sorted index, the sketch, the step and admission/eviction totals): part of
the model's state dict, saved with the dense part, in full, in every checkpoint (a delta
too), as raw tensors (no pickle); resume is bit-identical (no RNG: admission by
probability hashes id and step). Restore checks a checkpoint's map before anything live
changes (`DynamicIdMap.check_restored_state`: lengths, duplicate ids, rows out of range,
negative counts; a `CheckpointCorruptError` naming the table).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from recframe.schema import DynamicSpec, FeatureSchema

INT64_MAX = torch.iinfo(torch.int64).max
_MIX = [-4658895280553007687, -7723592293110705685]  # splitmix64's multipliers (signed)
SKETCH_DEPTH = 2
MAX_COUNT = 1 << 30
"""The admission sketch's int32 counters saturate here (and ``min_count`` may not exceed
it): far from int32's wrap-around, so a hot id's count never turns negative."""
MAX_PENDING = 4096
"""Training lookups a table queues at most between two step boundaries."""
QUEUE_STEPS = 64
QUEUE_IDS = 1 << 20
"""Committed steps (ids) whose counter updates may wait for the next flush at most."""


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _hash(ids: torch.Tensor, seed: int) -> torch.Tensor:
    """A well-mixed non-negative int64 hash of int64 ``ids`` (wrapping arithmetic)."""
    salt = (seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ids ^ (salt - (1 << 64) if salt >> 63 else salt)
    x = (x ^ ((x >> 30) & 0x3FFFFFFFF)) * _MIX[0]
    x = (x ^ ((x >> 27) & 0x1FFFFFFFFF)) * _MIX[1]
    x = x ^ ((x >> 31) & 0x1FFFFFFFF)
    return x & INT64_MAX


class _Live:
    """A map's per-step Python state, outside the module: ``nn.Module.__setattr__`` is
    slow (microseconds a call), and this is written every step."""

    __slots__ = ("pending", "queue", "queued", "committed_rows", "used_key", "n_used",
                 "sketch_added")

    def __init__(self) -> None:
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        """Training lookups since the last step boundary: (ids, hit, slot)."""
        self.queue: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
        """Committed steps whose counter updates wait for `DynamicIdMap.flush`:
        (ids, hit, slot, step)."""
        self.queued = 0
        """Ids in ``queue``."""
        self.committed_rows = 0
        """Rows in use after the last `end_step` (the hook's metric, without a count)."""
        self.used_key: Any = None
        self.n_used = 0
        """The count of ``used`` rows, cached while ``used`` is unchanged (its version)."""
        self.sketch_added = MAX_COUNT
        """Sketch counts added since the last clamp to `MAX_COUNT` (unknown at the start
        and after a restore: the first commit clamps)."""


class DynamicIdMap(nn.Module):
    """The id->row map of one dynamic table (module docstring: semantics).

    Args:
        table: the table's name (errors name it and the features using it).
        num_embeddings: the row budget (the table's rows).
        spec: admission and eviction settings.
        features: the sparse features looking the table up (for error messages).
    """

    def __init__(self, table: str, num_embeddings: int, spec: DynamicSpec,
                 features: Optional[list[str]] = None, device: Any = None) -> None:
        super().__init__()
        self.table = table
        self.features = list(features or [table])
        owner = f"dynamic table {table!r} (feature(s) {self.features})"
        spec.check(owner)
        if spec.min_count > MAX_COUNT:
            raise ValueError(f"{owner}: min_count={spec.min_count} can never be reached: "
                             f"the admission counters stop at {MAX_COUNT}")
        if num_embeddings <= spec.fallback_rows:
            raise ValueError(f"{owner}: row budget num_embeddings={num_embeddings} is not "
                             f"above fallback_rows={spec.fallback_rows}")
        self.spec = spec
        self.num_embeddings = num_embeddings
        self.fallback = spec.fallback_rows
        self.capacity = num_embeddings - spec.fallback_rows
        width = spec.sketch_width or 2 * self.capacity
        i64 = dict(dtype=torch.int64, device=device)
        self.register_buffer("ids", torch.zeros(self.capacity, **i64))
        self.register_buffer("used", torch.zeros(self.capacity, dtype=torch.bool, device=device))
        self.register_buffer("counts", torch.zeros(self.capacity, **i64))
        self.register_buffer("last_seen", torch.zeros(self.capacity, **i64))
        self.register_buffer("sorted_ids", torch.full((self.capacity,), INT64_MAX, **i64))
        self.register_buffer("sorted_slots", torch.arange(self.capacity, **i64))
        self.register_buffer("sketch", torch.zeros(SKETCH_DEPTH, width, dtype=torch.int32,
                                                   device=device))
        self.register_buffer("step", torch.zeros((), **i64))
        """The last step whose ids were committed."""
        self.register_buffer("totals", torch.zeros(2, **i64))
        """(ids admitted, rows evicted) since the start."""
        self._live = _Live()
        self.register_state_dict_pre_hook(_flush_before_state_dict)
        odd = [m | 1 for m in (_MIX[1], -7046029254386353131, 0x2545F4914F6CDD1D)]
        # constants, moved with the module by .to(device); not part of the state dict
        self.register_buffer("_sketch_mults",
                             torch.tensor(odd[:SKETCH_DEPTH], device=device).view(-1, 1),
                             persistent=False)
        self.register_buffer("_sketch_offsets",
                             (torch.arange(SKETCH_DEPTH, device=device) * width).view(-1, 1),
                             persistent=False)
        self.register_buffer("_one", torch.ones((), **i64), persistent=False)
        self.register_buffer("_one32", torch.ones((), dtype=torch.int32, device=device),
                             persistent=False)
        self.register_buffer("_empty", torch.zeros(0, **i64), persistent=False)

    @property
    def committed_rows(self) -> int:
        """Rows in use after the last `end_step` (the hook's metric, without a count)."""
        return self._live.committed_rows

    # --- lookup -------------------------------------------------------------------
    def check_ids(self, ids: Any, feature: Optional[str] = None) -> None:
        """A `TypeError` naming the feature unless ``ids`` is an int64 tensor."""
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
            got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            who = f"feature {feature!r}" if feature else f"feature(s) {self.features}"
            raise TypeError(f"{who} (dynamic table {self.table!r}): ids must be "
                            f"raw int64 ids, got {got}; read the column with the "
                            "schema's dynamic mapping (ids int64, or hash for strings)")

    def fallback_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The hashed fallback row of each id (multiply-shift: cheap, every lookup)."""
        if self.fallback == 1:
            return torch.zeros_like(ids)
        x = (ids * _MIX[0]) >> 24
        if self.fallback & (self.fallback - 1) == 0:  # a power of two: the same, cheaper
            return x.bitwise_and_(self.fallback - 1)
        return torch.remainder(x, self.fallback)

    def _used_rows(self) -> int:
        """Rows in use: a Python int, recounted only when ``used`` changed (a restore or
        ``load_state_dict`` writes it in place, which bumps its version)."""
        key = self._version_of_used()
        live = self._live
        if key is None or key != live.used_key:
            live.n_used, live.used_key = int(self.used.sum()), key
        return live.n_used

    def _version_of_used(self) -> Any:
        try:
            used = self.used  # the object (replaced by .to) and its in-place writes
            return id(used), used._version
        except RuntimeError:  # an inference-mode tensor keeps no version: always recount
            return None

    def find(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hit, slot) of each id: whether it has a row, and its slot (row - fallback).
        The sorted index's first `_used_rows` entries are the used rows' ids, so only
        they are searched, and a match is a hit without reading ``used``."""
        n = self._used_rows()
        flat = ids if ids.dim() == 1 else ids.reshape(-1)
        if n == 0:
            hit, slot = torch.zeros_like(flat, dtype=torch.bool), torch.zeros_like(flat)
        else:  # searching all but the last used entry clamps the position to it for free
            pos = torch.searchsorted(self.sorted_ids[: n - 1], flat)
            slot = self.sorted_slots.index_select(0, pos)  # index_select: half [pos]'s cost
            hit = self.sorted_ids.index_select(0, pos) == flat
        return (hit, slot) if ids.dim() == 1 else (hit.view(ids.shape), slot.view(ids.shape))

    def lookup(self, ids: torch.Tensor, record: bool) -> torch.Tensor:
        """Rows of raw ``ids``; ``record``: queue them for `end_step` (training)."""
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
            self.check_ids(ids)
        if record and ids.numel():
            if len(self._live.pending) >= MAX_PENDING:
                raise RuntimeError(
                    f"dynamic table {self.table!r}: {MAX_PENDING} training lookups without "
                    "a step boundary; add recframe.hooks.DynamicEmbeddingHook() to the "
                    "Trainer (or call recframe.dynamic.end_step after each update)")
        hit, slot = self.find(ids)
        if record and ids.numel():
            self._live.pending.append((ids.detach(), hit, slot))
        return torch.where(hit, slot + self.fallback, self.fallback_rows(ids))

    # --- the step boundary --------------------------------------------------------
    def discard_pending(self) -> None:
        """Forget the queued ids (a restore replaces the map they were meant for)."""
        self._live.pending.clear()
        self._live.queue.clear()
        self._live.queued = 0
        self._live.sketch_added = MAX_COUNT  # the restored sketch: clamp at the next commit

    @property
    def rows_used(self) -> int:
        return self._used_rows()

    def end_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Commit the ids queued since the last call as step ``step``: update counts,
        evict (every ``eviction_interval`` steps), admit. Returns ``(admitted rows,
        their fallback rows, evicted rows)`` (int64 table rows) for `reset_rows`.

        The common step (table full, no eviction due) costs a handful of small ops: the
        hits' frequency (LFU) or last-seen step (LRU, TTL: the key eviction reads), and
        the misses' sketch counts; the misses are only deduplicated (``torch.unique``)
        when there are free rows to admit them to."""
        empty = self._empty
        live = self._live
        pending, live.pending = live.pending, []
        self.step.fill_(step)
        if _world_size() > 1:  # a replicated map: every rank commits every rank's ids
            from recframe.distributed import all_gather_cat

            local = torch.cat([p[0].reshape(-1) for p in pending]) if pending else empty
            ids = all_gather_cat(local)
            pending = [(ids, *self.find(ids))] if ids.numel() else []
        if pending:  # the lookups' own hits: the map did not change since
            ids, hit, slot = (pending[0] if len(pending) == 1
                              else (torch.cat([t.reshape(-1) for t in x]) for x in zip(*pending)))
            live.queue.append((ids.reshape(-1), hit.reshape(-1), slot.reshape(-1), step))
            live.queued += ids.numel()
        due = step % self.spec.eviction_interval == 0
        if not due and self._used_rows() == self.capacity and len(live.queue) < QUEUE_STEPS \
                and live.queued < QUEUE_IDS:
            live.committed_rows = self.capacity  # full, no eviction due: nothing to decide
            return empty, empty, empty
        miss = self.flush(step)
        used = self._used_rows()
        evicted = empty
        if due:
            evicted = self._evict(step)
            used -= evicted.numel()
        admitted, fallback = self._admit(miss, step, self.capacity - used)
        live.committed_rows = used + admitted.numel()
        if not (admitted.numel() or evicted.numel()):
            return empty, empty, empty
        self._reindex(live.committed_rows)
        self.totals.add_(torch.tensor([admitted.numel(), evicted.numel()],
                                      device=self.totals.device))
        return admitted + self.fallback, fallback, evicted + self.fallback

    def _evict(self, step: int) -> torch.Tensor:
        spec, used = self.spec, self.used
        if spec.eviction == "ttl":
            slots = (used & (step - self.last_seen >= spec.ttl)).nonzero().squeeze(1)
        else:
            free = self.capacity - self._used_rows()
            n = max(0, math.ceil(spec.evict_fraction * self.capacity) - free)
            if n == 0:
                slots = self._empty
            else:
                key = self.counts if spec.eviction == "lfu" else self.last_seen
                # unused slots sort last; ties: the slot index (stable, deterministic)
                rank = torch.where(used, key, torch.full_like(key, INT64_MAX))
                slots = torch.sort(rank, stable=True).indices[:n]
            if spec.eviction == "lfu":  # decay: the table follows a drifting stream
                self.counts.bitwise_right_shift_(1)
        if slots.numel():
            used.index_fill_(0, slots, False)
            self.counts.index_fill_(0, slots, 0)
            self.last_seen.index_fill_(0, slots, 0)
        self.sketch.bitwise_right_shift_(1)  # old counts fade
        return slots

    def flush(self, step: Optional[int] = None) -> torch.Tensor:
        """Apply the counter updates of the committed steps queued so far: the hits'
        frequency (LFU) or last-seen step (LRU, TTL), the misses' sketch counts. While
        the table is full and no eviction is due nothing reads them, so `end_step`
        queues them (a list append) and they are applied in one go before the map
        next changes, before a ``state_dict`` (a checkpoint), or every `QUEUE_STEPS`
        steps: the same values as applying them at each step. Returns the misses of
        step ``step`` (not counted: `end_step` counts them after its eviction)."""
        live = self._live
        queue, live.queue, live.queued = live.queue, [], 0
        if not queue:
            return self._empty
        last = queue.pop() if queue[-1][3] == step else None
        entries = queue + ([last] if last is not None else [])
        ids, hit, slot = ((entries[0][0], entries[0][1], entries[0][2]) if len(entries) == 1
                          else (torch.cat([e[k] for e in entries]) for k in range(3)))
        seen = slot.masked_select(hit)
        if self.spec.eviction == "lfu":  # only the policy's own key is read
            self.counts.index_add_(0, seen, self._one.expand(seen.numel()))
        elif len(entries) == 1:
            self.last_seen.index_fill_(0, seen, entries[0][3])
        else:  # the latest step each row was seen in
            steps = torch.tensor([e[3] for e in entries], device=seen.device)
            steps = steps.repeat_interleave(
                torch.tensor([e[1].numel() for e in entries], device=seen.device))
            self.last_seen.scatter_reduce_(0, seen, steps.masked_select(hit), "amax")
        counted = self.spec.probability is None and self.spec.min_count > 1
        if counted and queue:
            old = queue[0] if len(queue) == 1 else [torch.cat([e[k] for e in queue])
                                                     for k in range(2)]
            self._count(old[0].masked_select(old[1].logical_not()))
        if last is None:
            return self._empty
        return last[0].masked_select(last[1].logical_not())

    def _count(self, miss: torch.Tensor) -> None:
        """Count ``miss`` (one entry per lookup, repeats included) in the sketch:
        saturating at `MAX_COUNT`, never wrapping."""
        if miss.numel() == 0:
            return
        flat = self.sketch.view(-1)
        cols = self._sketch_cols(miss).view(-1)
        live = self._live
        if live.sketch_added + miss.numel() > MAX_COUNT:  # rare
            flat.clamp_max_(MAX_COUNT)
            live.sketch_added = 0
        live.sketch_added += miss.numel()
        flat.index_add_(0, cols, self._one32.expand(cols.numel()))

    def _sketch_cols(self, ids: torch.Tensor) -> torch.Tensor:
        """The admission sketch's counter of each id in each row: ``[depth, n]`` indices
        into the flattened sketch."""
        x = ids * _MIX[0]  # mix once, then one multiply-shift per sketch row
        x ^= (x >> 31).bitwise_and_(0x1FFFFFFFF)
        cols = torch.remainder((x.unsqueeze(0) * self._sketch_mults) >> 16, self.sketch.shape[1])
        return cols.add_(self._sketch_offsets)

    def _admit(self, miss: torch.Tensor, step: int, free_rows: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Admit from the step's misses (one entry per lookup, repeats included) into
        the ``free_rows`` free rows; with ``min_count``, count them in the sketch first."""
        empty = self._empty
        if miss.numel() == 0:
            return empty, empty
        spec = self.spec
        flat = self.sketch.view(-1)
        use_sketch = spec.probability is None and spec.min_count > 1
        if use_sketch:
            self._count(miss)
        if free_rows == 0:  # full: the counts wait in the sketch for an eviction
            return empty, empty
        ids, cnt = torch.unique(miss, return_counts=True)
        if spec.probability is not None:
            u = _hash(ids, step + 1).double() / float(INT64_MAX)
            admit = u < 1 - (1 - spec.probability) ** cnt.double()
            score = cnt
        elif not use_sketch:
            admit = torch.ones_like(ids, dtype=torch.bool)
            score = cnt
        else:
            est = flat[self._sketch_cols(ids)].min(dim=0).values.long()
            admit = est >= spec.min_count
            score = est
        free = (~self.used).nonzero().squeeze(1)
        cand, ccnt, score = ids[admit], cnt[admit], score[admit]
        if cand.numel() > free.numel():  # the most frequent first; ties: the smaller id
            order = torch.argsort(cand)
            order = order[torch.sort(score[order], descending=True, stable=True).indices]
            order = order[: free.numel()]
            cand, ccnt = cand[order], ccnt[order]
        slots = free[: cand.numel()]
        self.ids.index_copy_(0, slots, cand)
        self.used.index_fill_(0, slots, True)
        self.counts.index_copy_(0, slots, ccnt)
        self.last_seen.index_fill_(0, slots, step)
        return slots, self.fallback_rows(cand)

    def _reindex(self, n_used: Optional[int] = None) -> None:
        """Rebuild the sorted index (``n_used``: the used rows, when known)."""
        n = int(self.used.sum()) if n_used is None else n_used
        self.sorted_ids.copy_(_sorted_index(self.ids, self.used, self.sorted_slots, n))
        self._live.n_used, self._live.used_key = n, self._version_of_used()

    def check_restored_state(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Refuse a checkpoint's map (``state``: its buffers by name, read before
        anything live changes) that is not one this class could have written: a
        `CheckpointCorruptError` naming the table. Restore calls it (part ``dense``)."""
        from recframe.checkpoint.format import CheckpointCorruptError

        live = self.state_dict()
        owner = f"{where}: dynamic table {self.table!r}"
        missing = sorted(set(live) - set(state))
        if missing:
            raise CheckpointCorruptError(f"{owner}: the id map lacks {missing}")
        for name, value in live.items():
            got = state[name]
            if got.dtype != value.dtype or got.shape != value.shape:
                raise CheckpointCorruptError(
                    f"{owner}: id map tensor {name!r} is {got.dtype} {list(got.shape)}, this "
                    f"table's is {value.dtype} {list(value.shape)} (budget "
                    f"{self.num_embeddings}, fallback_rows {self.fallback})")
        check_map_state(state, owner)

    def map_bytes_per_row(self) -> float:
        """Bytes of map state per row of the budget (buffers / num_embeddings)."""
        total = sum(b.numel() * b.element_size() for b in self.state_dict().values())
        return total / self.num_embeddings

    def extra_repr(self) -> str:
        return (f"table={self.table!r}, budget={self.num_embeddings}, "
                f"fallback={self.fallback}, eviction={self.spec.eviction!r}")


def _flush_before_state_dict(module: DynamicIdMap, prefix: str, keep_vars: bool) -> None:
    module.flush()


def _sorted_index(ids: torch.Tensor, used: torch.Tensor, slots_out: Optional[torch.Tensor] = None,
                  n_used: Optional[int] = None) -> torch.Tensor:
    """The sorted index lookups search: the ``n_used`` used rows' ids ascending first,
    then the unused rows (as INT64_MAX, by slot); their slots in ``slots_out``. Returns
    the sorted keys."""
    n = int(used.sum()) if n_used is None else n_used
    keys = ids.masked_fill(~used, INT64_MAX)
    sorted_keys, slots = torch.sort(keys, stable=True)
    if n and int(sorted_keys[n - 1]) == INT64_MAX:  # rare: a used id is INT64_MAX too
        order = torch.argsort(used.logical_not(), stable=True)  # used rows first
        sorted_keys, perm = torch.sort(keys[order], stable=True)
        slots = order[perm]
    if slots_out is not None:
        slots_out.copy_(slots)
    return sorted_keys


def check_map_state(state: dict[str, torch.Tensor], owner: str) -> None:
    """Check that an id map's saved tensors are consistent (`CheckpointCorruptError`
    starting with ``owner`` otherwise): equal lengths, each used id in one row only,
    non-negative counts and steps, and the sorted index the one `_reindex` builds."""
    from recframe.checkpoint.format import CheckpointCorruptError

    def bad(why: str) -> CheckpointCorruptError:
        return CheckpointCorruptError(f"{owner}: corrupt id map: {why}")

    kinds = {"ids": torch.int64, "used": torch.bool, "counts": torch.int64,
             "last_seen": torch.int64, "sorted_ids": torch.int64,
             "sorted_slots": torch.int64, "sketch": torch.int32, "step": torch.int64,
             "totals": torch.int64}
    for name, dtype in kinds.items():
        if name not in state:
            raise bad(f"no {name!r} tensor")
        if state[name].dtype != dtype:
            raise bad(f"{name!r} is {state[name].dtype}, not {dtype}")
    rows = state["ids"].shape
    if len(rows) != 1 or rows[0] < 1:
        raise bad(f"'ids' has shape {list(rows)}, not [dynamic rows]")
    for name in ("used", "counts", "last_seen", "sorted_ids", "sorted_slots"):
        if state[name].shape != rows:
            raise bad(f"{name!r} has shape {list(state[name].shape)}, 'ids' {list(rows)}")
    step, totals, sketch = state["step"], state["totals"], state["sketch"]
    if step.dim() != 0 or int(step) < 0:
        raise bad(f"'step' is {step.tolist()}, not a step >= 0")
    if totals.shape != (2,) or bool((totals < 0).any()):
        raise bad(f"'totals' is {totals.tolist()[:4]}, not (admitted, evicted) >= 0")
    if sketch.dim() != 2 or sketch.shape[0] != SKETCH_DEPTH or bool((sketch < 0).any()):
        raise bad(f"'sketch' ({list(sketch.shape)}) is not {SKETCH_DEPTH} rows of counts >= 0")
    used, ids = state["used"], state["ids"]
    held = ids[used]
    if held.unique().numel() != held.numel():
        raise bad(f"id(s) held by several rows, e.g. {_duplicates(held)[:3]}")
    if bool((state["counts"] < 0).any()):
        raise bad("negative counts")
    last = state["last_seen"]
    if bool(((last < 0) | (last > step)).any()):
        raise bad(f"last-seen steps outside [0, step={int(step)}]")
    slots = torch.empty_like(ids)
    sorted_ids = _sorted_index(ids, used, slots)
    if not (torch.equal(sorted_ids, state["sorted_ids"])
            and torch.equal(slots, state["sorted_slots"])):
        raise bad("the sorted index ('sorted_ids', 'sorted_slots': rows out of range or "
                  "out of order) does not match 'ids' and 'used'")


def _duplicates(ids: torch.Tensor) -> list[int]:
    values, counts = ids.unique(return_counts=True)
    return values[counts > 1].tolist()


class DynamicIdRemapper(nn.Module):
    """Maps the raw ids of a batch's dynamic features to table rows (one `DynamicIdMap`
    per dynamic table; other features pass through unchanged)."""

    def __init__(self, schema: FeatureSchema, device: Any = None) -> None:
        super().__init__()
        maps = {}
        self.feature_tables: dict[str, str] = {}
        for table, spec in schema.dynamic_tables().items():
            features = [c.name for c in schema.sparse if c.table == table]
            maps[table] = DynamicIdMap(table, schema.table(table).num_embeddings, spec,
                                       features, device)
            self.feature_tables.update({f: table for f in features})
        self.maps = nn.ModuleDict(maps)

    def forward(self, features: Any) -> Any:
        """A `KeyedJaggedTensor` (or `recframe.models.PaddedBags`) with rows for ids."""
        record = self.training and torch.is_grad_enabled()
        keys = list(features.keys())
        if hasattr(features, "ids"):  # PaddedBags
            from recframe.models import PaddedBags

            ids = features.ids.clone()
            for i, key in enumerate(keys):
                table = self.feature_tables.get(key)
                if table is None:
                    continue
                m = self.maps[table]
                m.check_ids(ids[i], key)
                real = features.weights[i] != 0
                if record:
                    m.lookup(ids[i][real], True)
                ids[i] = torch.where(real, m.lookup(ids[i], False), ids[i])
            return PaddedBags(keys, ids, features.weights)
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        parts = list(features.values().split(features.length_per_key()))
        for i, key in enumerate(keys):
            table = self.feature_tables.get(key)
            if table is not None:
                if parts[i].dtype != torch.int64:
                    self.maps[table].check_ids(parts[i], key)
                parts[i] = self.maps[table].lookup(parts[i], record)
        return KeyedJaggedTensor(
            keys=keys, values=torch.cat(parts) if parts else features.values(),
            lengths=features.lengths(), weights=features.weights_or_none(),
            stride=features.stride(), length_per_key=features.length_per_key(),
            offset_per_key=features.offset_per_key(),
        )


def remappers(model: nn.Module) -> list[DynamicIdRemapper]:
    return [m for m in model.modules() if isinstance(m, DynamicIdRemapper)]


def table_parameters(model: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """Table name -> (state key, weight) of the model's embedding tables."""
    found = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if len(parts) >= 3 and parts[-1] == "weight" and parts[-3] == "embedding_bags":
            found[parts[-2]] = (name, p)
    return found


def _shard_rows(shard: Any, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(which of ``rows`` the local shard holds, their local row indices, its first
    column, its column count)."""
    offsets, sizes = shard.metadata.shard_offsets, shard.metadata.shard_sizes
    r0, n = int(offsets[0]), int(sizes[0])
    c0, nc = (int(offsets[1]), int(sizes[1])) if len(offsets) > 1 else (0, 0)
    inside = (rows >= r0) & (rows < r0 + n)
    return inside, rows[inside] - r0, c0, nc


@torch.no_grad()
def _reset_sharded(weight: Any, optimizer: Any, key: Optional[str], admitted: torch.Tensor,
                   fallback: torch.Tensor, evicted: torch.Tensor) -> None:
    """`reset_rows` for a torchrec-sharded table (its `ShardedTensor`) and the fused
    optimizer's state: each rank writes the rows of its local shards; the fallback
    rows' values reach the ranks holding admitted rows by one all-reduce."""
    dim = int(weight.size(1))
    shards = weight.local_shards()
    device = shards[0].tensor.device if shards else torch.device("cpu")
    fb = torch.zeros(fallback.numel(), dim, dtype=weight.dtype, device=device)
    for shard in shards:
        inside, local, c0, nc = _shard_rows(shard, fallback.to(device))
        fb[inside, c0:c0 + nc] = shard.tensor[local]
    if _world_size() > 1:
        import torch.distributed as dist

        from recframe.distributed import collective_device

        moved = fb.to(collective_device())
        dist.all_reduce(moved)  # each value comes from the one rank holding it
        fb = moved.to(device)
    for shard in shards:
        inside, local, c0, nc = _shard_rows(shard, evicted.to(device))
        shard.tensor[local] = 0
        inside, local, c0, nc = _shard_rows(shard, admitted.to(device))
        shard.tensor[local] = fb[inside, c0:c0 + nc].to(shard.tensor.dtype)
    state = optimizer.state_dict()["state"].get(key, {}) if optimizer is not None else {}
    rows = torch.cat([admitted, evicted])
    for value in state.values():  # e.g. "user.momentum1": views of the live state
        for shard in getattr(value, "local_shards", lambda: [])():
            inside, local, _, _ = _shard_rows(shard, rows.to(shard.tensor.device))
            shard.tensor[local] = 0


@torch.no_grad()
def reset_rows(weight: Any, optimizer: Any, admitted: torch.Tensor,
               fallback: torch.Tensor, evicted: torch.Tensor, key: Optional[str] = None
               ) -> None:
    """Admitted rows start from their fallback row, evicted rows are zeroed, and the
    optimizer's per-row state of both is reset (``initial_accumulator_value`` for
    Adagrad's sum, else zeros). Per-table scalars (Adam's step) are left alone. A
    torchrec-sharded table (``weight`` a `ShardedTensor`, ``optimizer`` the fused one,
    ``key`` the table's state key) is reset shard by shard."""
    if hasattr(weight, "local_shards"):
        _reset_sharded(weight, optimizer, key, admitted, fallback, evicted)
        return
    if evicted.numel():
        weight.index_fill_(0, evicted, 0.0)
    if admitted.numel():
        weight.index_copy_(0, admitted, weight.index_select(0, fallback))
    rows = torch.cat([admitted, evicted])
    if optimizer is None or rows.numel() == 0:
        return
    state = getattr(optimizer, "state", {}).get(weight)
    if not state:
        return
    init = 0.0
    for group in getattr(optimizer, "param_groups", []):
        if any(p is weight for p in group["params"]):
            init = float(group.get("initial_accumulator_value", 0.0))
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 1 \
                and value.shape[0] == weight.shape[0]:
            value.index_fill_(0, rows, init if key == "sum" and value.dim() == 2 else 0.0)


def dynamic_targets(model: nn.Module) -> list[tuple[DynamicIdMap, str, Any]]:
    """(map, table state key, table weight) of every dynamic table of ``model``; the
    weight of a torchrec-sharded table is its `ShardedTensor` (views of the live
    shards)."""
    found = remappers(model)
    if not found:
        return []
    params = table_parameters(model)
    state = model.state_dict()
    out = []
    for remapper in found:
        for table, m in remapper.maps.items():
            keys = [k for k in state if k.endswith(f"embedding_bags.{table}.weight")]
            if len(keys) == 1 and hasattr(state[keys[0]], "local_shards"):
                out.append((m, keys[0], state[keys[0]]))  # sharded: reset shard by shard
            elif table in params:
                out.append((m, *params[table]))
            else:
                raise ValueError(f"dynamic table {table!r}: the model has no embedding table "
                                 "of that name (embedding_bags.<table>.weight)")
    return out


def end_step(model: nn.Module, step: int, optimizer: Any = None, tracker: Any = None,
             targets: Optional[list[tuple[DynamicIdMap, str, nn.Parameter]]] = None
             ) -> dict[str, int]:
    """Commit every dynamic table of ``model`` at step ``step`` (after the optimizer
    update): admission, eviction, row and optimizer-state resets, and incremental
    checkpoint marks (``tracker``: a `RowTracker`). Call it once per optimizer step in
    a loop of your own; the Trainer's `DynamicEmbeddingHook` does. ``targets``:
    `dynamic_targets` of the model, resolved once by a caller that calls every step.
    Returns the rows in use per table."""
    used = {}
    for m, key, weight in dynamic_targets(model) if targets is None else targets:
        admitted, fallback, evicted = m.end_step(step)
        if admitted.numel() or evicted.numel():
            reset_rows(weight, optimizer, admitted, fallback, evicted, key)
            if tracker is not None and key in getattr(tracker, "bits", {}):
                tracker.mark(key, torch.cat([admitted, evicted]))
        used[m.table] = m.committed_rows
    return used


def dynamic_summary(reader: Any) -> dict[str, dict[str, int]]:
    """Rows used / budget per dynamic table of a checkpoint (``reader``: its
    `recframe.checkpoint.format.TensorReader`), from the map's ``...maps.<table>.*``
    tensors (checked as restore checks them: a `CheckpointCorruptError` naming the
    table) and the table's rows: for ``recframe ckpt inspect``."""
    from recframe.checkpoint.format import CheckpointCorruptError

    out: dict[str, dict[str, int]] = {}
    keys = list(reader.meta)
    for key in keys:
        parts = key.split(".")
        if len(parts) < 3 or parts[-3] != "maps" or parts[-1] != "used":
            continue
        table, prefix = parts[-2], key[: -len("used")]
        state = {k[len(prefix):]: reader.read(k) for k in keys
                 if k.startswith(prefix) and "." not in k[len(prefix):]}
        owner = f"dynamic table {table!r}"
        check_map_state(state, owner)
        used, totals = state["used"], state["totals"]
        row = {"rows_used": int(used.sum()), "dynamic_rows": int(used.numel())}
        weights = [k for k in keys if k.endswith(f"embedding_bags.{table}.weight")]
        if len(weights) == 1:
            row["budget"] = int(reader.shape(weights[0])[0])
            row["fallback_rows"] = row["budget"] - row["dynamic_rows"]
            if row["fallback_rows"] < 1:
                raise CheckpointCorruptError(
                    f"{owner}: corrupt id map: {row['dynamic_rows']} dynamic rows for a "
                    f"budget of {row['budget']} rows")
        row.update(admitted=int(totals[0]), evicted=int(totals[1]))
        out[table] = row
    return out
