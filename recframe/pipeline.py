"""The input pipeline between a dataset and the loop: look-ahead, device copy, the
loader's own RNG stream and the dataset position.

Looking one batch ahead tells the loop which micro-batch is the last of the data (so a
last partial accumulation window can be closed) and lets the next batch's device copy
overlap the current step. Because the dataset runs ahead of training, the position
that a checkpoint must record is captured *per batch*, right after the batch was
produced; `TrainData` keeps the position of the last batch actually trained, puts a
stateful dataset back there when a ``train()`` call ends, and keeps any other stream
(with its look-ahead) open for the next call, so repeated calls lose no batch.

Data loading draws from torch's global RNG (every ``DataLoader.__iter__`` draws a base
seed, a ``RandomSampler`` without a generator draws its permutation's seed, a dataset
may call ``torch.rand``). Every pull therefore runs on a `LoaderRNG` of its own, seeded
per pass from ``args.seed`` and the epoch: the loader neither moves the model's stream
(dropout) nor depends on it, and a resumed pass replays the same draws. The rules are
in docs/resume.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch

from recframe.device import Device

logger = logging.getLogger(__name__)

_END = object()


@dataclass(frozen=True)
class StreamItem:
    """One batch of a `BatchStream`, with where the dataset stands after it."""

    batch: Any
    position: Optional[dict[str, Any]]
    """The dataset's ``state_dict()`` right after this batch (None if not stateful)."""
    is_last: bool
    """No batch follows this one in the current pass."""
    rng: Optional[torch.Tensor] = None
    """The loader RNG's state right after this batch (with ``position`` only)."""


def is_stateful(dataset: Any) -> bool:
    return callable(getattr(dataset, "state_dict", None)) and callable(
        getattr(dataset, "load_state_dict", None)
    )


def pass_seed(seed: int, epoch: int) -> int:
    """The loader RNG's seed for pass ``epoch`` of a run seeded with ``seed``."""
    from recframe.data import _mix

    return _mix(seed, 0x10ADE5, epoch)


class LoaderRNG:
    """torch's global CPU RNG as the data loader sees it: a stream of its own.

    `call` swaps this stream in for the duration of one call (an ``iter()`` or a
    ``next()`` of the dataset) and the caller's stream back after it, so whatever the
    loader draws comes from here and the model's stream does not move (about 2 us).
    """

    def __init__(self, seed: int) -> None:
        self.state = torch.Generator().manual_seed(seed).get_state()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        outer = torch.get_rng_state()
        torch.set_rng_state(self.state)
        try:
            return fn(*args)
        finally:
            self.state = torch.get_rng_state()
            torch.set_rng_state(outer)


def _isolates(device: Device) -> bool:
    """Whether pulls run in the caller's thread (the base device stage): the global RNG
    can then be swapped around them. A device that reads in background threads (XLA)
    would race with the model's own draws, so there the loader uses the global RNG."""
    return getattr(type(device).wrap_loader, "__func__", type(device).wrap_loader) is (
        Device.wrap_loader
    )


class BatchStream:
    """Iterates ``dataset`` once, ``prefetch`` batches ahead, yielding `StreamItem`s.

    ``rng``: the `LoaderRNG` every ``iter()``/``next()`` of the dataset runs on (a fresh
    one seeded 0 when None; lists and tuples, which draw nothing, run without).
    ``state_source``: the object whose ``state_dict()`` is the position after each
    batch (default: the dataset when it is stateful). ``resume_rng``: the loader RNG
    state to continue from once the dataset is iterated (a stateful dataset resumed
    mid-pass).
    """

    def __init__(
        self,
        dataset: Iterable[Any],
        device: Device,
        prefetch: int = 1,
        skip: int = 0,
        limit: Optional[int] = None,
        sync_every: Optional[int] = None,
        drain: bool = True,
        rng: Optional[LoaderRNG] = None,
        state_source: Any = None,
        resume_rng: Optional[torch.Tensor] = None,
    ) -> None:
        self.dataset = dataset
        self.device = device
        self.prefetch = prefetch
        self.skip = skip
        self.limit = limit
        """Yield at most this many batches (the ranks' agreed count); the rest of the
        pass is read and dropped, so a stateful dataset still ends its pass."""
        self.sync_every = sync_every
        """With several ranks and no agreed ``limit``: every this many batches, the ranks
        agree (one all-reduce) on how many batches they all still have, reading that
        many ahead, so that all stop at the same batch."""
        self.drain = drain
        """At ``limit``, read the rest of the pass and drop it (a training pass: the
        dataset ends its pass); False for an evaluation capped at ``eval_steps``."""
        if state_source is None and is_stateful(dataset):
            state_source = dataset
        self.state_source = state_source
        self.stateful = state_source is not None
        if isinstance(dataset, (list, tuple)) or not _isolates(device):
            rng = None
        elif rng is None:
            rng = LoaderRNG(0)
        self.rng = rng
        self.resume_rng = resume_rng
        self.dropped = 0

    def __iter__(self) -> Iterator[StreamItem]:
        rng = self.rng
        if rng is None:
            it = iter(self.dataset)

            def pull() -> Any:
                return next(it, _END)
        else:
            it = rng.call(iter, self.dataset)
            if self.resume_rng is not None:
                rng.state = self.resume_rng

            def pull() -> Any:
                return rng.call(next, it, _END)

        for done in range(self.skip):
            # A dataset without its own position: fast-forward past trained batches.
            if pull() is _END:
                logger.warning(
                    "dataset ended after %d of %d batches being skipped on resume",
                    done,
                    self.skip,
                )
                break
        source = self.state_source

        def host_items() -> Iterator[tuple[Any, Any]]:
            # the position is read right after its batch, by whoever pulls (the device
            # stage may pull from a background thread)
            while (batch := pull()) is not _END:
                if source is None:
                    yield batch, None
                else:
                    state = rng.state if rng is not None else None
                    yield batch, (source.state_dict(), state)

        # the device stage: moves each batch (XLA: torch-xla's parallel loader)
        source_items = self.device.wrap_loader(host_items(), self.prefetch)
        self._source = source_items
        buffer: list[tuple[Any, Any]] = []
        exhausted = False

        ahead = max(1, self.prefetch)

        def fill(target: int) -> None:
            nonlocal exhausted
            while not exhausted and len(buffer) < target:
                try:
                    buffer.append(next(source_items))
                except StopIteration:
                    exhausted = True
                    return

        def item(entry: tuple[Any, Any], is_last: bool) -> StreamItem:
            batch, where = entry
            if where is None:
                return StreamItem(batch, None, is_last)
            return StreamItem(batch, where[0], is_last, where[1])

        try:
            if self.limit is None and self.sync_every is None:
                fill(ahead + 1)
                while buffer:
                    batch, where = buffer.pop(0)
                    fill(ahead)
                    # item(), inline: a call less per batch
                    yield (StreamItem(batch, None, not buffer) if where is None
                           else StreamItem(batch, where[0], not buffer, where[1]))
                return
            cap, agreed, safe, index = self.limit, None, 0, 0
            limit = cap
            while True:
                if self.sync_every is not None and agreed is None and index + 1 >= safe:
                    # agree with the other ranks how many of the next sync_every + 1
                    # batches all of them have (the same calls on every rank: index,
                    # safe and agreed are the same everywhere)
                    window = max(1, self.sync_every)
                    fill(window + 1)
                    from recframe import distributed

                    have = distributed.all_reduce_min_int(len(buffer))
                    if have == window + 1:
                        safe = index + have
                    else:
                        agreed = index + have
                        limit = agreed if cap is None else min(cap, agreed)
                if limit is not None and index >= limit:
                    break
                fill(max(ahead, 1))
                if not buffer:
                    break
                is_last = limit is not None and index + 1 >= limit
                if is_last and self.drain:
                    # past the agreed count: read the rest of the pass and drop it, so a
                    # stateful dataset stands at its end like every other rank's
                    self.dropped = len(buffer) - 1 + sum(1 for _ in source_items)
                    if self.dropped:
                        logger.warning(
                            "dropped %d batches of this rank beyond the %d that every rank "
                            "has in this pass (uneven data across ranks)", self.dropped, limit,
                        )
                entry = buffer.pop(0)
                index += 1
                yield item(entry, is_last=is_last)
                if is_last:
                    return
        finally:
            self.close()

    def close(self) -> None:
        """Stop the device stage (a background loader stops pulling from the dataset
        before this returns, so the dataset may then be rewound)."""
        source, self._source = getattr(self, "_source", None), None
        close = getattr(source, "close", None)
        if callable(close):
            close()


# --------------------------------------------------------------------------- train data


def _is_torch_loader(dataset: Any) -> bool:
    return isinstance(dataset, torch.utils.data.DataLoader)


def remaining_batches(dataset: Any, done: int) -> Optional[int]:
    """Batches left in the current pass of ``dataset``, ``done`` of them trained: the
    source's own ``remaining_batches()`` when it has one (after a re-split from another
    world size ``len() - done`` counts the old ranks' batches), else ``len(dataset) -
    done``; None for an unsized dataset."""
    count = getattr(state_source(dataset), "remaining_batches", None)
    if callable(count):
        return count()
    try:
        return max(0, len(dataset) - done)
    except TypeError:
        return None


def state_source(dataset: Any) -> Any:
    """The object whose ``state_dict()`` is ``dataset``'s position, or None: the dataset
    itself when stateful (recframe's datasets, torchdata's ``StatefulDataLoader``), or
    the IterableDataset of a ``DataLoader(num_workers=0)`` when that one is stateful (it
    is read in this process, one batch per ``next()``)."""
    if is_stateful(dataset):
        return dataset
    if _is_torch_loader(dataset) and dataset.num_workers == 0:
        inner = dataset.dataset
        if isinstance(inner, torch.utils.data.IterableDataset) and is_stateful(inner):
            return inner
    return None


def _samplers(loader: Any) -> list[Any]:
    """The loader's sampler objects (distinct): sampler, batch sampler, its sampler."""
    found: list[Any] = []
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (getattr(loader, "sampler", None), batch_sampler,
                getattr(batch_sampler, "sampler", None)):
        if obj is not None and all(obj is not seen for seen in found):
            found.append(obj)
    return found


def _generators(loader: Any) -> list[torch.Generator]:
    """The torch generators a loader and its samplers draw from (distinct)."""
    found: list[torch.Generator] = []
    for obj in (loader, *_samplers(loader)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not seen for seen in found):
            found.append(g)
    return found


def _reuses_workers(loader: Any) -> bool:
    """Whether ``iter(loader)`` will reuse the persistent workers of an earlier pass: torch
    then skips the base-seed draw it makes at every other ``iter()``."""
    return (_is_torch_loader(loader) and loader.persistent_workers and loader.num_workers > 0
            and getattr(loader, "_iterator", None) is not None)


def _draw_base_seed(loader: Any) -> None:
    """The draw ``DataLoader.__iter__`` makes for its base seed (as torch makes it), for
    a pass that reuses persistent workers: every pass then draws the same, so a pass
    resumed in a fresh process (whose first ``iter()`` draws it) replays the same
    sampler order."""
    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)


def _unreplayable(sampler: Any) -> Any:
    """The sampler (``sampler`` or the one a BatchSampler wraps) whose order is not a
    function of what recframe replays, or None. Replayable: no randomness, a torch
    ``generator`` attribute (None: the loader RNG; else its checkpointed state), or
    ``set_epoch`` (DistributedSampler)."""
    from torch.utils.data import BatchSampler, SequentialSampler
    from torch.utils.data.dataloader import _InfiniteConstantSampler

    if isinstance(sampler, (SequentialSampler, _InfiniteConstantSampler)):
        return None
    if hasattr(sampler, "generator") or callable(getattr(sampler, "set_epoch", None)):
        return None
    if isinstance(sampler, BatchSampler):
        return _unreplayable(sampler.sampler)
    return sampler


def exactness_warning(dataset: Any) -> Optional[str]:
    """Why a resume over ``dataset`` cannot be exact, and what to use instead; None when
    it is (the rules of docs/resume.md)."""
    if state_source(dataset) is not None:
        return None
    name = type(dataset).__name__
    if isinstance(dataset, Iterator):
        return (
            f"train_dataset is a {name}, a one-shot iterator without state_dict(): a "
            "resumed run cannot find its position in it and trains from wherever the new "
            "iterator starts (samples trained twice or never). Pass a re-iterable dataset "
            "(a list, a torch DataLoader) or one with state_dict()/load_state_dict() "
            "(torchdata's StatefulDataLoader, recframe.data's datasets); see docs/resume.md"
        )
    if (_is_torch_loader(dataset) and dataset.num_workers > 0 and dataset.persistent_workers
            and isinstance(dataset.dataset, torch.utils.data.IterableDataset)):
        inner = type(dataset.dataset).__name__
        return (
            f"train_dataset is a {name}(num_workers={dataset.num_workers}, "
            f"persistent_workers=True) over the IterableDataset {inner}: its iteration state "
            "lives in the workers' copies and carries over from one epoch to the next, and "
            "a resumed run starts fresh workers whose copies start over, so a resume in a "
            "later epoch may read other samples than an uninterrupted run. Use "
            "persistent_workers=False, num_workers=0 with state_dict()/load_state_dict(), "
            "or torchdata's StatefulDataLoader; see docs/resume.md"
        )
    if _is_torch_loader(dataset):
        sampler = _unreplayable(dataset.batch_sampler if dataset.batch_sampler is not None
                                else dataset.sampler)
        if sampler is not None:
            return (
                f"train_dataset is a {name} whose {type(sampler).__name__} has neither a "
                "torch `generator` attribute (recframe replays its state) nor set_epoch(): "
                "if it draws from Python's or numpy's RNG, a resumed run trains other "
                "samples than an uninterrupted one. Give it a `generator` attribute (a "
                "torch.Generator or None) or use torchdata's StatefulDataLoader; see "
                "docs/resume.md"
            )
    return None


class TrainData:
    """The train dataset as the loop reads it: one pass at a time, the position of the
    last trained batch, and that position as a checkpointable object (``io_state``
    "train_data").

    How each kind resumes (docs/resume.md):

    - stateful (``state_source`` is not None): the source's ``state_dict()`` after the
      last trained batch, with the loader RNG's state there; a ``train()`` call that
      ends puts the source back there (its look-ahead is read again by the next call).
    - any other re-iterable dataset (a list, a torch ``DataLoader``): the pass is
      replayed: same loader RNG seed (``pass_seed``), ``sampler.set_epoch(epoch)``, the
      loader's generators at their states of the pass's start (checkpointed), and the
      trained batches are read and dropped. Between ``train()`` calls the stream stays
      open, its look-ahead kept, so nothing is re-read or lost.
    - a one-shot iterator: the stream stays open between calls; a resume cannot find
      its position (`exactness_warning` says so once).

    ``dataset_of`` returns the current train dataset (the trainer's attribute may be
    replaced between calls; a new one starts a new stream).
    """

    def __init__(
        self, dataset_of: Callable[[], Any], device: Device, prefetch: int, seed: int
    ) -> None:
        self._dataset_of = dataset_of
        self.device = device
        self.prefetch = prefetch
        self.seed = seed
        self.position: Optional[dict[str, Any]] = None
        """A stateful source's ``state_dict()`` after the last trained batch."""
        self.loader_rng: Optional[torch.Tensor] = None
        """The loader RNG's state after the last trained batch (stateful sources)."""
        self.generators: Optional[list[torch.Tensor]] = None
        """A torch DataLoader's generator states at the start of the current pass."""
        self.pending: Optional[StreamItem] = None
        """The next untrained batch of the open pass (None: no pass open, or its end)."""
        self._stream: Optional[BatchStream] = None
        self._iter: Optional[Iterator[StreamItem]] = None
        self._dataset: Any = None
        self._bound: Any = None  # the dataset that position and generators describe
        self._checked = False

    @property
    def dataset(self) -> Any:
        return self._dataset_of()

    # --- the loop's side ---------------------------------------------------------
    def open(
        self,
        epoch: int,
        done: int,
        agree: Callable[[], tuple[Optional[int], Optional[int]]],
    ) -> Optional[StreamItem]:
        """The first untrained batch of pass ``epoch``, of which ``done`` batches were
        trained: the open stream's look-ahead when a pass is open, else a new stream
        (``agree()`` gives its ``(limit, sync_every)``). None: the pass has no batch."""
        dataset = self.dataset
        if self._iter is not None:
            if self._dataset is dataset:
                return self.pending
            self.close()
        if self._bound is not None and self._bound is not dataset:
            # trainer.train_dataset was replaced: the old position means nothing here
            self.position = self.loader_rng = self.generators = None
        self._bound = dataset
        if not self._checked:
            self._checked = True
            message = exactness_warning(dataset)
            if message:
                logger.warning(message)
        source = state_source(dataset)
        resume_rng = None
        if source is not None:
            if self.position is None:
                self.position = source.state_dict()
            skip = 0
            resume_rng = self.loader_rng if done else None
        else:
            skip = 0 if isinstance(dataset, Iterator) else done
        if _is_torch_loader(dataset):
            self._prepare_loader(dataset, epoch, replay_generators=source is None)
        rng = LoaderRNG(pass_seed(self.seed, epoch))
        if source is None and _reuses_workers(dataset):
            rng.call(_draw_base_seed, dataset)
        limit, sync_every = agree()
        stream = BatchStream(
            dataset, self.device, self.prefetch, skip=skip, limit=limit,
            sync_every=sync_every, rng=rng, state_source=source, resume_rng=resume_rng,
        )
        self._stream, self._dataset = stream, dataset
        self._iter = iter(stream)
        self.pending = next(self._iter, None)
        if self.pending is None:
            self.close()
        return self.pending

    def take(self) -> StreamItem:
        """The next batch of the open pass; reads the one after it (the look-ahead)
        unless this one is the pass's last."""
        item = self.pending
        if item is None or self._iter is None:
            raise RuntimeError("TrainData.take: no batch is pending (open a pass first)")
        self.pending = None if item.is_last else next(self._iter, None)
        return item

    def trained(self, item: StreamItem) -> None:
        """``item`` was trained: a checkpoint from now on resumes after it."""
        if item.position is not None:
            self.position, self.loader_rng = item.position, item.rng

    def end_pass(self) -> None:
        """The pass's last batch was trained: the next pass starts at the source's
        current position (the look-ahead reached its end), the loader's generators
        where this pass left them."""
        stream, dataset = self._stream, self._dataset
        if stream is not None and stream.state_source is not None:
            self.position = stream.state_source.state_dict()
            self.loader_rng = None
        self._drop()
        if _is_torch_loader(dataset) and state_source(dataset) is None:
            self.generators = [g.get_state() for g in _generators(dataset)]

    def pause(self, failed: bool = False) -> None:
        """A ``train()`` call returns: a stateful source goes back to the last trained
        batch (the next call reopens it there); any other stream stays open with its
        look-ahead, unless the call ``failed`` (the next call then replays the pass)."""
        if self._stream is not None and (failed or self._stream.stateful):
            self.close()

    def close(self) -> None:
        """Stop the open stream (a background loader stops reading first); a stateful
        source goes back to the last trained batch."""
        stream = self._stream
        self._drop()
        if stream is not None and stream.state_source is not None and self.position is not None:
            stream.state_source.load_state_dict(self.position)

    def _drop(self) -> None:
        it = self._iter
        self._stream = self._iter = self.pending = self._dataset = None
        close = getattr(it, "close", None)
        if callable(close):
            close()  # the generator's ``finally`` stops the device stage

    def _prepare_loader(self, loader: Any, epoch: int, replay_generators: bool) -> None:
        """Before a torch DataLoader's pass: ``set_epoch(epoch)`` on its samplers that
        have it, and its generators back at the pass's start (recorded when unknown)."""
        for sampler in _samplers(loader):
            set_epoch = getattr(sampler, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)
        if not replay_generators:
            return  # a stateful loader's own state holds its generators
        generators = _generators(loader)
        if self.generators is not None and len(self.generators) == len(generators):
            for generator, state in zip(generators, self.generators):
                generator.set_state(torch.as_tensor(state, dtype=torch.uint8))
        else:
            self.generators = [g.get_state() for g in generators]

    # --- checkpoint side ---------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "loader_rng": self.loader_rng,
            "generators": self.generators,
        }

    def resplit(self, states: list[Any]) -> None:
        """Resume from a checkpoint saved at another world size: ``states`` holds every
        old rank's ``state_dict()``, in rank order. A source with ``resplit`` (a
        `recframe.readers.TabularDataset`) lays the data the old ranks had left this
        epoch end to end and re-splits it over this run's ranks, so every sample of the
        epoch is trained once across the change; any other source keeps its position
        (warned: a resume there cannot be exact)."""
        self.close()
        self._bound = self.dataset
        source = state_source(self._bound)
        positions = [s.get("position") if isinstance(s, dict) else None for s in states]
        resplit = getattr(source, "resplit", None)
        if not callable(resplit) or any(p is None for p in positions):
            logger.warning(
                "the checkpoint was saved by %d ranks and train_dataset (%s) cannot re-split "
                "their positions (it has no resplit(states)): the data restarts at its "
                "current position", len(states), type(self._bound).__name__)
            return
        resplit(positions)
        self.position, self.loader_rng, self.generators = source.state_dict(), None, None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.position = state.get("position")
        self.loader_rng = state.get("loader_rng")
        self.generators = state.get("generators")
        self._bound = self.dataset
        source = state_source(self._bound)
        if self.position is not None and source is not None:
            source.load_state_dict(self.position)
