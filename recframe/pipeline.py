"""The input pipeline between a dataset and the loop: look-ahead, device copy and
dataset position.

Looking one batch ahead tells the loop which micro-batch is the last of the data (so a
last partial accumulation window can be closed) and lets the next batch's device copy
overlap the current step. Because the dataset runs ahead of training, the position
that a checkpoint must record is captured *per batch*, right after the batch was
produced, and the loop puts a stateful dataset back to the position of the last batch
it actually trained when it stops early.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple, Optional

from recframe.device import Device

logger = logging.getLogger(__name__)


class StreamItem(NamedTuple):
    batch: Any
    position: Optional[dict[str, Any]]
    """The dataset's ``state_dict()`` right after this batch (None if not stateful)."""
    is_last: bool
    """No batch follows this one in the current pass."""


def is_stateful(dataset: Any) -> bool:
    return callable(getattr(dataset, "state_dict", None)) and callable(
        getattr(dataset, "load_state_dict", None)
    )


class BatchStream:
    """Iterates ``dataset`` once, ``prefetch`` batches ahead, yielding `StreamItem`s."""

    def __init__(
        self,
        dataset: Iterable[Any],
        device: Device,
        prefetch: int = 1,
        skip: int = 0,
        limit: Optional[int] = None,
        sync_every: Optional[int] = None,
        drain: bool = True,
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
        self.stateful = is_stateful(dataset)
        self.dropped = 0

    def __iter__(self) -> Iterator[StreamItem]:
        it = iter(self.dataset)
        if self.skip:
            # A dataset without its own position: fast-forward past trained batches.
            skipped = sum(1 for _ in itertools.islice(it, self.skip))
            if skipped < self.skip:
                logger.warning(
                    "dataset ended after %d of %d batches being skipped on resume",
                    skipped,
                    self.skip,
                )

        def host_items() -> Iterator[tuple[Any, Optional[dict[str, Any]]]]:
            # the position is read right after its batch, by whoever pulls (the device
            # stage may pull from a background thread)
            for batch in it:
                yield batch, (self.dataset.state_dict() if self.stateful else None)  # type: ignore[attr-defined]

        # the device stage: moves each batch (XLA: torch-xla's parallel loader)
        source = self.device.wrap_loader(host_items(), self.prefetch)
        self._source = source
        buffer: list[tuple[Any, Optional[dict[str, Any]]]] = []
        exhausted = False

        ahead = max(1, self.prefetch)

        def fill(target: int) -> None:
            nonlocal exhausted
            while not exhausted and len(buffer) < target:
                try:
                    buffer.append(next(source))
                except StopIteration:
                    exhausted = True
                    return

        try:
            if self.limit is None and self.sync_every is None:
                fill(ahead + 1)
                while buffer:
                    batch, position = buffer.pop(0)
                    fill(ahead)
                    yield StreamItem(batch, position, is_last=not buffer)
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
                    self.dropped = len(buffer) - 1 + sum(1 for _ in source)
                    if self.dropped:
                        logger.warning(
                            "dropped %d batches of this rank beyond the %d that every rank "
                            "has in this pass (uneven data across ranks)", self.dropped, limit,
                        )
                batch, position = buffer.pop(0)
                index += 1
                yield StreamItem(batch, position, is_last=is_last)
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
