"""`ProfilerHook`: a ``torch.profiler`` trace of a few training steps.

Traces are written by ``torch.profiler.tensorboard_trace_handler`` as
``<output_dir>/<host>_<pid>.<time>.pt.trace.json``, which TensorBoard's profiler
plugin (``torch-tb-profiler``) and chrome://tracing / Perfetto can open. Each
optimizer update is one profiler step, so ``wait``/``warmup``/``active`` count
updates.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Optional

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

from recframe.hooks.base import Hook

if TYPE_CHECKING:
    from recframe.trainer import Trainer

logger = logging.getLogger("recframe")


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"ProfilerHook: {name} must be an integer >= {minimum}, got {value!r}")


class ProfilerHook(Hook):
    """Profiles training with ``torch.profiler`` on every process.

    Args:
        output_dir: trace directory (local path); ``None`` uses
            ``<trainer.args.resolved_logging_dir>/profile``, so TensorBoard pointed at
            the logging directory shows it as the run ``profile``.
        wait, warmup, active, repeat: the ``torch.profiler.schedule`` in updates;
            ``repeat=0`` repeats the cycle until training ends.
        record_shapes, profile_memory, with_stack: passed to ``torch.profiler.profile``.

    CPU activity is always recorded, CUDA activity when CUDA is available. The
    profiler starts in ``before_train`` and stops (writing a trace cut short in its
    active phase) at ``after_train``/``end``; each ``train`` call profiles anew.
    Runs first (priority -100) so its step boundary sits right after the update.
    """

    priority = -100

    def __init__(
        self,
        output_dir: Optional[str] = None,
        wait: int = 1,
        warmup: int = 1,
        active: int = 3,
        repeat: int = 1,
        record_shapes: bool = False,
        profile_memory: bool = False,
        with_stack: bool = False,
    ) -> None:
        if output_dir is not None and (not isinstance(output_dir, str) or not output_dir.strip()):
            raise ValueError(
                f"ProfilerHook: output_dir must be a non-empty string, got {output_dir!r}"
            )
        _check_count("wait", wait, 0)
        _check_count("warmup", warmup, 0)
        _check_count("active", active, 1)
        _check_count("repeat", repeat, 0)
        self.output_dir = output_dir
        self.wait = wait
        self.warmup = warmup
        self.active = active
        self.repeat = repeat
        self.record_shapes = record_shapes
        self.profile_memory = profile_memory
        self.with_stack = with_stack
        self.profiler: Optional[profile] = None
        self.resolved_output_dir: Optional[str] = None
        """Trace directory of the current (or last) profiling session."""

    def _activities(self) -> list[ProfilerActivity]:
        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        return activities

    def before_train(self, trainer: Trainer) -> None:
        self._stop()
        out = self.output_dir or os.path.join(trainer.args.resolved_logging_dir, "profile")
        os.makedirs(out, exist_ok=True)
        self.resolved_output_dir = out
        self.profiler = profile(
            activities=self._activities(),
            schedule=schedule(
                wait=self.wait, warmup=self.warmup, active=self.active, repeat=self.repeat
            ),
            on_trace_ready=tensorboard_trace_handler(out),
            record_shapes=self.record_shapes,
            profile_memory=self.profile_memory,
            with_stack=self.with_stack,
        )
        self.profiler.start()
        if trainer.is_main_process:
            logger.info(
                "profiling updates %d..%d (wait=%d warmup=%d active=%d repeat=%d) into %s",
                trainer.state.global_step + self.wait + self.warmup + 1,
                trainer.state.global_step + self.wait + self.warmup + self.active,
                self.wait,
                self.warmup,
                self.active,
                self.repeat,
                out,
            )

    def after_step(self, trainer: Trainer, metrics: dict) -> None:
        if self.profiler is not None:
            self.profiler.step()

    def _stop(self) -> None:
        if self.profiler is not None:
            prof, self.profiler = self.profiler, None
            prof.stop()

    def after_train(self, trainer: Trainer) -> None:
        self._stop()

    def end(self, trainer: Trainer) -> None:
        self._stop()


__all__ = ["ProfilerHook"]
