"""`ProgressBarHook`: a tqdm bar over optimizer updates on the main process."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, Optional, TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from recframe.hooks.base import Hook
from recframe.hooks.logger import IntervalMeter

if TYPE_CHECKING:
    from recframe.trainer import Trainer

NON_TTY_MININTERVAL = 30.0
"""Seconds between redraws when the output is not a terminal (keeps log files short)."""


class ProgressBarHook(Hook):
    """Shows a progress bar of optimizer updates with the recent mean loss.

    Args:
        postfix_steps: at least this many updates between refreshes of the loss
            postfix. Reading the loss syncs the device, so it is read only when the bar
            is about to redraw (tqdm's ``mininterval``): never between two redraws.
        file: stream of the bar; ``None`` means ``sys.stderr`` when training starts.

    The bar's total is ``state.max_steps`` (unknown when ``None``) and it starts at
    ``state.global_step`` on resume. Hidden on non-main processes and when
    ``trainer.args.disable_tqdm`` is set. When the stream is not a terminal the bar
    redraws at most every 30 s instead of continuously. While the bar is shown, log
    lines to the console go through ``tqdm.write`` (tqdm's logging redirect), so they
    print above the bar instead of into it. The postfix shows the same loss and
    samples/s as the `LoggerHook` line (evaluation time left out of both).
    """

    priority = 100

    def __init__(self, postfix_steps: int = 10, file: Optional[TextIO] = None) -> None:
        if (
            isinstance(postfix_steps, bool)
            or not isinstance(postfix_steps, int)
            or (postfix_steps < 1)
        ):
            raise ValueError(
                f"ProgressBarHook: postfix_steps must be an integer >= 1, got {postfix_steps!r}"
            )
        self.postfix_steps = postfix_steps
        self.file = file
        self.bar: Optional[Any] = None
        self._meter = IntervalMeter()
        self._redirect: Optional[contextlib.ExitStack] = None
        self._estimate: Optional[_PassEstimate] = None

    def before_train(self, trainer: Trainer) -> None:
        self._close()
        if not trainer.is_main_process or getattr(trainer.args, "disable_tqdm", False):
            return
        stream = self.file if self.file is not None else sys.stderr
        isatty = getattr(stream, "isatty", None)
        interactive = bool(isatty()) if callable(isatty) else False
        state = trainer.state
        self.bar = tqdm(
            total=state.max_steps,
            initial=int(state.global_step),
            desc="train",
            unit="step",
            file=stream,
            dynamic_ncols=interactive,
            mininterval=0.1 if interactive else NON_TTY_MININTERVAL,
            leave=True,
        )
        self._meter.reset()
        self._estimate = None
        if state.max_steps is None:  # an epoch of unknown length (CSV/TSV files)
            self._estimate = _PassEstimate.of(trainer)
        # the loggers that print to the console (tqdm would give one without a handler
        # a second, unformatted one)
        loggers = [lg for lg in (logging.getLogger(), logging.getLogger("recframe"))
                   if lg.handlers]
        self._redirect = contextlib.ExitStack()
        if loggers:
            self._redirect.enter_context(logging_redirect_tqdm(loggers))

    def before_epoch(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.set_description(f"train epoch {trainer.state.epoch}", refresh=False)

    def after_step(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if self.bar is None:
            return
        meter = self._meter
        meter.add(metrics)
        if meter.steps >= self.postfix_steps:
            # _redraw_due(), inline (a call less per update)
            last = getattr(self.bar, "last_print_t", None)
            interval = getattr(self.bar, "mininterval", None)
            if last is None or interval is None or time.time() - last >= interval:
                self._refresh_postfix()  # drawn by the update below
        step = int(trainer.state.global_step)
        if self._estimate is not None:
            total = self._estimate.total(trainer)
            if total is not None:
                self.bar.total = max(total, step)
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)

    def _refresh_postfix(self) -> None:
        assert self.bar is not None
        postfix = {}
        loss = self._meter.mean_loss()
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        postfix["samples/s"] = f"{self._meter.samples_per_sec():.1f}"
        self.bar.set_postfix(postfix, refresh=False)
        self._meter.reset()

    def before_evaluate(self, trainer: Trainer) -> None:
        self._meter.pause()

    def after_evaluate(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._meter.resume()

    def _close(self) -> None:
        if self.bar is not None:
            if self._meter.steps > 0:
                self._refresh_postfix()
            self.bar.close()
            self.bar = None
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None

    def after_train(self, trainer: Trainer) -> None:
        self._close()

    def end(self, trainer: Trainer) -> None:
        self._close()


class _PassEstimate:
    """The run's updates for file data without ``len()`` (CSV/TSV `TabularDataset`):
    its ``state_dict()`` gives this rank's byte spans (``plan``) and the position after
    the batches yielded so far (``part``, ``offset``). During the first pass the total
    is the batches read so far (trained, plus the pipeline's look-ahead) scaled by the
    share of the pass consumed, in updates; once a pass is
    complete, its exact update count; times the passes to train. Compressed files
    (spans without an end) give no estimate."""

    def __init__(self, dataset: Any, trainer: Trainer) -> None:
        self.dataset = dataset
        state = trainer.state
        self._step_at = int(state.global_step)
        self._micro_at = int(state.micro_step)
        self._epoch_at = int(state.epoch)
        self._fresh_pass = int(getattr(state, "epoch_batches", 0)) == 0
        self._done_at = self._consumed()
        self._per_epoch: Optional[float] = None

    @classmethod
    def of(cls, trainer: Trainer) -> Optional[_PassEstimate]:
        dataset = getattr(trainer, "train_dataset", None)
        if not callable(getattr(dataset, "state_dict", None)):
            return None
        try:
            plan = dataset.state_dict().get("plan")
            if not plan or any(span[2] is None for span in plan):
                return None
            estimate = cls(dataset, trainer)
        except Exception:  # noqa: BLE001 - an estimate only: no total rather than an error
            return None
        return estimate if estimate._span() > 0 else None

    def _span(self) -> int:
        return sum(int(end) - int(start) for _, start, end in self.dataset.state_dict()["plan"])

    def _consumed(self) -> int:
        sd = self.dataset.state_dict()
        plan, part = sd["plan"], int(sd["part"])
        done = sum(int(end) - int(start) for _, start, end in plan[:part])
        if part < len(plan):
            done += max(0, int(sd["offset"]) - int(plan[part][1]))
        return done

    def total(self, trainer: Trainer) -> Optional[int]:
        state = trainer.state
        steps = int(state.global_step) - self._step_at
        if self._per_epoch is None and int(state.epoch) > self._epoch_at and self._fresh_pass:
            self._per_epoch = float(steps)  # the first whole pass: exact
        per_epoch = self._per_epoch
        if per_epoch is None:
            done = self._consumed() - self._done_at
            span = self._span()
            if done <= 0 or steps <= 0:
                return None
            # the reader is ahead of training by the pipeline's look-ahead batches
            args = trainer.args
            yielded = int(state.micro_step) - self._micro_at + args.dataloader_prefetch + 1
            batches = yielded * span / min(float(done), float(span))
            per_epoch = batches / args.gradient_accumulation_steps
        left = max(0, int(trainer.args.train_epoch) - self._epoch_at)
        return self._step_at + int(round(per_epoch * left))


__all__ = ["ProgressBarHook"]
