"""`CheckpointManager`: ties the checkpoint pieces together for a training loop.

Each decision lives in one place; open the module that owns it:

- *when to save* (interval, wall time, SIGTERM, the multi-rank agreement):
  `recframe.checkpoint.policies.SaveDecisionPolicy`;
- *what to keep* (max_keep, keep-best, incremental chains, the checkpoint restored
  from): `recframe.checkpoint.policies.KeepPolicy`;
- *how it is written* (now, or in the background: thread or copy-on-write fork with
  huge pages): `recframe.checkpoint.async_writer`;
- *who may write* the output dir (one job, a lease naming it):
  `recframe.checkpoint.lock`;
- writing, reading, deleting and moving checkpoints: `recframe.checkpoint.saver.Saver`.

``restore()`` loads the newest committed checkpoint that reads back intact (a corrupt
one is skipped with a warning) and returns its step, 0 when there is none. Resuming
from a checkpoint older than the newest (``restore(global_step=N)``, or a fallback
past corrupt ones) starts a new timeline: at the run's first save the newer
checkpoints are moved aside into ``<output_dir>/abandoned/`` (`Saver.move_aside`),
never deleted and never mixed with the new run's saves.
"""

from __future__ import annotations

import builtins
import logging
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from recframe import distributed
from recframe.checkpoint.async_writer import AsyncWriter, SyncWriter
from recframe.checkpoint.format import CheckpointCorruptError
from recframe.checkpoint.incremental import plan_save
from recframe.checkpoint.lock import DEFAULT_LEASE_SECS, WriterLock, WriterLockError
from recframe.checkpoint.policies import (
    AnyOf,
    BestN,
    FullEvery,
    IntervalPolicy,
    KeepPolicy,
    LatestN,
    SaveContext,
    SaveDecisionPolicy,
)
from recframe.checkpoint.saver import (
    MANIFEST,
    CheckpointError,
    CheckpointInfo,
    Saver,
    ckpt_name,
)
from recframe.checkpoint.storage import StorageError, _has_directories

logger = logging.getLogger("recframe.checkpoint")

_CKPT_DIR_RE = re.compile(r"^ckpt_\d+(\.staging)?$")


class CheckpointManager:
    """Saves when the save policy says so, keeps what the keep policy keeps, restores
    the latest; the one writer of its output dir.

    Args:
        saver: the `Saver` that writes and reads checkpoints.
        save_interval: save every this many optimizer updates (None/0: only on demand).
        save_interval_secs: also save when this many seconds passed since the last save.
        max_keep: committed checkpoints kept (default: ``saver.max_keep``).
        keep_best_metric / keep_best_mode: also keep the best checkpoint by this eval
            metric (recorded in each manifest at save time).
        async_save: write in the background (`AsyncWriter`) after a host snapshot.
        save_on_sigterm: on SIGTERM, request a save at the next step (see
            ``preemption_requested``); the trainer then stops.
        agree_every: with several ranks, every this many steps they agree (one
            all-reduce) on the decisions that may differ between them: a time-based
            save, a SIGTERM.
        incremental: write delta checkpoints (only the embedding-table rows changed since
            the previous checkpoint; see `recframe.checkpoint.incremental`).
        full_checkpoint_every: with ``incremental``, every this many saves is a full one
            (`FullEvery`).
        lease_secs: the writer lock's lease (`recframe.checkpoint.lock`): a job that
            died without releasing it blocks another host for at most this long.

    Raises:
        WriterLockError: another live job writes ``output_dir`` (the error names it).
        CheckpointError: ``output_dir`` is a checkpoint directory, or its bucket is
            missing.
    """

    def __init__(
        self,
        saver: Saver,
        save_interval: Optional[int] = None,
        save_interval_secs: Optional[float] = None,
        max_keep: Optional[int] = None,
        keep_best_metric: Optional[str] = None,
        keep_best_mode: str = "max",
        async_save: bool = False,
        save_on_sigterm: bool = False,
        agree_every: int = 16,
        incremental: bool = False,
        full_checkpoint_every: int = 10,
        lease_secs: float = DEFAULT_LEASE_SECS,
    ) -> None:
        self.saver = saver
        self.save_policy = SaveDecisionPolicy(
            IntervalPolicy(save_interval, save_interval_secs), agree_every, save_on_sigterm
        )
        keep = LatestN(max_keep if max_keep is not None else saver.max_keep)
        self.keep_policy = KeepPolicy(
            AnyOf(keep, BestN(keep_best_metric, keep_best_mode)) if keep_best_metric else keep
        )
        self.full_policy = FullEvery(full_checkpoint_every)
        self.tracker: Any = None
        """The `RowTracker` of incremental checkpoints (None: every save is full)."""
        if incremental:
            from recframe.optim.tracking import RowTracker

            self.tracker = RowTracker(saver.model, saver.sparse_optimizer)
            saver.row_tracker = self.tracker
        self._pending: Optional[tuple[dict[str, Any], dict[str, Any], int]] = None
        self.writer: SyncWriter = AsyncWriter(saver) if async_save else SyncWriter(saver)
        self.global_step = 0
        self.metrics_provider: Optional[Callable[[], dict[str, float]]] = None
        self.preemption_requested = False
        self._sigterm_seen = False
        self._quiet_after, self._quiet_until = 0, 0
        """Steps strictly between these need no save decision (`step`'s fast path)."""
        self._last_saved_step = -1
        self._last_saved_time = time.monotonic()
        self._previous_handler: Any = None
        self._rolled_back_to: Optional[int] = None
        self._locked = False
        self.save_on_sigterm = save_on_sigterm
        _check_output_dir(saver)
        self.lock = WriterLock(saver.storage, lease_secs)
        saver.writer_lock = self.lock
        self._acquire()
        self.saver.clean_uncommitted()  # ours now: any leftover is provably abandoned
        latest = self.saver.latest_checkpoint()
        if latest is not None:
            self._last_saved_step = latest.step

    @property
    def agree_every(self) -> int:
        return self.save_policy.agree_every

    @agree_every.setter
    def agree_every(self, value: int) -> None:
        self.save_policy.agree_every = max(1, int(value))
        self._quiet_until = 0  # the agreement steps moved: decide again

    @property
    def async_save(self) -> bool:
        return self.writer.asynchronous

    # --- the writer lock ----------------------------------------------------------
    def _acquire(self) -> None:
        """Rank 0 takes the output dir's writer lock and renews it while the run lives;
        every rank learns whether it could (a refused job stops on every rank)."""
        self._locked = True  # on every rank (only rank 0 holds the file)
        error: Optional[BaseException] = None
        if distributed.is_main_process() and not self.lock.held:
            try:
                self.lock.acquire()
                self.lock.start_renewing()
            except (WriterLockError, OSError) as e:
                error = e
        (ok,) = distributed.broadcast_ints([0 if error else 1])
        if error is not None:
            raise error
        if not ok:
            raise WriterLockError(
                f"rank 0 could not take the writer lock of "
                f"{self.saver.storage.display(self.saver.storage.root)} (see its log)"
            )

    # --- saving -------------------------------------------------------------------
    def step(self, global_step: Optional[int] = None, force: bool = False) -> Optional[str]:
        """Call once per optimizer update (on every rank); saves when the save policy
        (or ``force``, or a SIGTERM) says so. Returns the committed path, or None."""
        if global_step is None:
            self.global_step += 1
        else:
            self.global_step = global_step
        step = self.global_step
        if (self._quiet_after < step < self._quiet_until and not force
                and not (self._sigterm_seen or self.preemption_requested)):
            return None  # no rule can fire before _quiet_until (the usual update: O(1))
        world_size = distributed.get_world_size()
        self._quiet_after = step
        self._quiet_until = self.save_policy.next_decision_step(step, world_size)
        decision = self.save_policy.decide(SaveContext(
            step=step,
            last_saved_step=self._last_saved_step,
            seconds_since_save=time.monotonic() - self._last_saved_time,
            preemption=self._sigterm_seen or self.preemption_requested,
            world_size=world_size,
            force=force or self.preemption_requested,
        ))
        if decision.preempt:
            self.preemption_requested = True
        return self.save(step) if decision.save else None

    def save(self, global_step: Optional[int] = None) -> Optional[str]:
        """Save ``ckpt_<global_step>`` now (None if that id is already committed)."""
        step = self.global_step if global_step is None else global_step
        self.wait()  # at most one save in flight; surfaces a background error
        self._leave_abandoned_timeline()
        path = self.saver.storage.path(ckpt_name(step))
        if self.saver.read_manifest(path, quiet=True) is not None:
            logger.info("checkpoint %s already committed; not saving it twice", path)
            self._last_saved_step = step
            return None
        metrics = dict(self.metrics_provider() if self.metrics_provider else {})
        started = time.monotonic()
        asynchronous = self.writer.asynchronous
        full = self.saver.collect_state() if asynchronous or self.tracker is not None else None
        state, extra = (None, None) if full is None else self._plan(step, full)
        if asynchronous:
            # a save in flight counts as done for the interval (its error surfaces later)
            self._last_saved_step, self._last_saved_time = step, started
        try:
            self.writer.submit(step, state, metrics, extra, self._after_commit, live=full)
        except BaseException:
            self._settle(failed=True)
            raise
        del full
        if not asynchronous:
            self._settle(failed=False)
            # only now: a save that failed is not "saved" (a retry of that step may run)
            self._last_saved_step, self._last_saved_time = step, started
        return path

    def _plan(
        self, step: int, state: dict[str, Any]
    ) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
        """Incremental mode: take the tracker's bitmaps and make the state a delta (or
        a full one); the bitmaps go back to the tracker if the save fails."""
        if self.tracker is None:
            return state, None
        taken = self.tracker.take()
        try:
            state, incremental = plan_save(
                state, self.tracker, ckpt_name(step), taken, self.full_policy
            )
        except BaseException:
            self.tracker.give_back(taken)
            raise
        self._pending = (taken, incremental, self.tracker.generation)
        return state, {"incremental": incremental}

    def _settle(self, failed: bool) -> None:
        """The save planned by `_plan` committed (the tracker now counts from it) or
        failed (its rows are merged back: they belong to the next checkpoint)."""
        pending, self._pending = self._pending, None
        if pending is None or self.tracker is None:
            return
        taken, incremental, generation = pending
        if failed:
            self.tracker.give_back(taken)
        else:
            self.tracker.committed(incremental, generation)

    def _after_commit(self, step: int) -> None:
        self.keep_policy.committed(step)
        # never the checkpoint just written (it must survive whatever the policy says)
        self.apply_retention(protect={step})

    def wait(self) -> None:
        """Block until a background save finishes; raise its error if it failed."""
        if not self.writer.pending:
            return
        error = self.writer.wait()
        self._settle(failed=error is not None)
        if error is not None:
            raise CheckpointError(f"the background checkpoint save failed: {error}") from error

    def close(self) -> None:
        """Finish any save in flight, release the writer lock and restore the previous
        SIGTERM handler."""
        try:
            self.wait()
        finally:
            self.lock.release()
            self._locked = False
            if self._previous_handler is not None:
                try:
                    signal.signal(signal.SIGTERM, self._previous_handler)
                except ValueError:
                    pass
                self._previous_handler = None

    # --- retention ----------------------------------------------------------------
    def apply_retention(self, protect: Optional[set[int]] = None) -> builtins.list[str]:
        """Delete this run's committed checkpoints the keep policy does not keep (nor
        the steps in ``protect``); checkpoints linked in from elsewhere are left alone."""
        if not distributed.is_main_process():
            return []
        found = self.saver.owned(self.saver.list_checkpoints())
        return self.saver.delete(self.keep_policy.deletable(found, protect))

    def list(self) -> builtins.list[CheckpointInfo]:
        return self.saver.list_checkpoints()

    # --- restoring ----------------------------------------------------------------
    def restore(self, global_step: Optional[int] = None) -> int:
        """Load the latest committed checkpoint (or ``ckpt_<global_step>``); returns
        its step, or 0 when there is none. A checkpoint that fails to read back
        (corrupt or truncated file) is skipped for the previous one, with a warning."""
        try:  # a save in flight finishes first (its retention must not race the load)
            self.wait()
        except CheckpointError as e:
            logger.warning("%s; restoring from what is committed", e)
        found = self.saver.list_checkpoints()
        if global_step is not None:
            found = [c for c in found if c.step == global_step]
            if not found:
                raise CheckpointError(
                    f"no committed checkpoint ckpt_{global_step} under {self.saver.output_dir}"
                )
        many = distributed.get_world_size() > 1
        if many:
            # every rank must load the same checkpoint: rank 0's listing decides
            mine = {c.step: c for c in found}
            steps = distributed.broadcast_ints([c.step for c in found])
            found = [mine.get(step) or CheckpointInfo(step, "", {}) for step in steps]
        for ckpt in reversed(found):
            error: Optional[BaseException] = None
            try:
                if not ckpt.path:
                    raise StorageError(f"{ckpt.name} is not visible from this rank")
                self.saver.load(ckpt_path=ckpt.path)
            except (CheckpointCorruptError, StorageError) as e:
                error = e
            if many:
                ok = distributed.all_gather_cat(torch.tensor([0 if error else 1]))
                failed = [rank for rank, flag in enumerate(ok.tolist()) if not flag]
                if failed and not error:
                    error = CheckpointError(
                        f"rank(s) {failed} could not read {ckpt.name} (see their log)"
                    )
            if error is not None:
                if global_step is not None:
                    raise error
                logger.warning(
                    "checkpoint %s is unreadable (%s); falling back to the previous one",
                    ckpt.path or ckpt.name, error,
                )
                continue
            if self.tracker is not None:  # the next save is a full one
                self.tracker.reset()
            self.global_step = ckpt.step
            self.keep_policy.restored(ckpt.step)
            self._start_timeline(ckpt.step)
            if global_step is None and ckpt is found[-1]:
                # the newest: what a run killed between a commit and its retention left
                # over is pruned now, so kills in a row never pile up checkpoints (not
                # on a rollback: the newer timeline is moved aside at the first save)
                self.apply_retention(protect={ckpt.step})
            return ckpt.step
        if found:
            raise CheckpointError(
                f"no checkpoint under {self.saver.output_dir} could be read back; see the "
                "warnings above"
            )
        return 0

    def _start_timeline(self, step: int) -> None:
        """The run goes on from ``step``: checkpoints newer than it belong to the
        timeline it left (a rollback, or a fallback past unreadable ones). They are
        moved aside at this run's first save (`_leave_abandoned_timeline`), so a
        restore only to look at an older checkpoint changes nothing on storage."""
        self._last_saved_step = step
        self._rolled_back_to = step

    def _leave_abandoned_timeline(self) -> None:
        """Before the first save after a restore: rank 0 moves every checkpoint newer
        than the restored one into ``abandoned/`` so they are never mixed with this
        run's saves nor restored later in its place."""
        step, self._rolled_back_to = self._rolled_back_to, None
        if step is None:  # the same on every rank (restore is collective)
            return
        error: Optional[BaseException] = None
        if distributed.is_main_process():
            try:
                newer = [c for c in self.saver.owned(self.saver.list_checkpoints())
                         if c.step > step]
                known = {c.step for c in newer}
                newer += [c for c in self._unreadable_newer(step) if c.step not in known]
                if newer:
                    label = (f"from_ckpt_{step}-{time.strftime('%Y%m%dT%H%M%S')}-"
                             f"{self.lock.run_id[:8]}")
                    self.saver.move_aside(newer, label)
            except Exception as e:  # noqa: BLE001 - raised below, on every rank
                error = e
        # the other ranks check "already committed?" only once rank 0 moved them aside
        (ok,) = distributed.broadcast_ints([0 if error else 1])
        if error is not None or not ok:
            self._rolled_back_to = step  # retried at the next save
            raise CheckpointError(
                f"could not move the checkpoints newer than ckpt_{step} aside (rank 0: "
                f"{error or 'see its log'}); not saving into a mixed timeline"
            ) from error

    def _unreadable_newer(self, step: int) -> builtins.list[CheckpointInfo]:
        """``ckpt_<n>`` directories newer than ``step`` whose manifest exists but does
        not parse (listing skips them): part of the abandoned timeline too."""
        out = []
        storage = self.saver.storage
        for name in storage.listdir(storage.root):
            if not _CKPT_DIR_RE.match(name) or name.endswith(".staging"):
                continue
            n = int(name.split("_", 1)[1])
            path = storage.path(name)
            if n > step and not self.saver.is_foreign(path) \
                    and storage.exists(storage.join(path, MANIFEST)):
                out.append(CheckpointInfo(n, path, {}))
        return out

    def load_model_bank(self, entries: builtins.list[Any]) -> None:
        """Warm-start from other runs: each entry is a path or ``{"path", "load",
        "exclude", "strict"}``; ``load`` defaults to the model only (sparse, dense),
        never another run's optimizer or step."""
        for entry in entries:
            conf = {"path": entry} if isinstance(entry, str) else dict(entry)
            path = conf.pop("path", None)
            if not path:
                raise ValueError(f"model_bank entry {entry!r} has no 'path'")
            conf.setdefault("load", ["sparse", "dense"])
            target = _resolve_bank_path(self.saver, path)
            logger.info("warm-starting from %s (load=%s)", target, conf["load"])
            self.saver.load_by_config(target, conf)

    # --- preemption ---------------------------------------------------------------
    def start(self) -> None:
        """Training starts: hold the writer lock (again, after `close`) and install the
        SIGTERM handler (``save_on_sigterm``)."""
        if not self._locked:  # the same on every rank: _acquire is a collective
            self._acquire()
        self.preemption_requested = False
        self._sigterm_seen = False
        self._quiet_until = 0  # the policy or the world size may have changed since
        if self.save_on_sigterm and self._previous_handler is None:
            self._install_sigterm()

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: Any) -> None:
            logger.warning("SIGTERM received: saving a checkpoint at the next step, then stopping")
            self._sigterm_seen = True  # the save policy decides the step (ranks agree)
            if distributed.get_world_size() == 1:
                self.preemption_requested = True  # one rank: nothing to agree on

        self._previous_handler = signal.signal(signal.SIGTERM, handler)


def _resolve_bank_path(saver: Saver, path: str) -> str:
    """A checkpoint directory, or a run's output_dir (then its latest checkpoint)."""
    from recframe.checkpoint.saver import read_manifest
    from recframe.checkpoint.storage import Storage

    storage = Storage(path, **saver.storage_options)
    if read_manifest(storage, storage.root, quiet=True) is not None:
        return path
    other = Saver(saver.model, output_dir=path, storage_options=saver.storage_options)
    latest = other.latest_checkpoint()
    if latest is None:
        raise CheckpointError(f"model_bank path {path!r} holds no committed checkpoint")
    return latest.path if "://" not in path else storage.display(latest.path)


def _check_output_dir(saver: Saver) -> None:
    """Refuse an output dir that cannot be a run's: a checkpoint directory itself, or a
    bucket that does not exist (listing it would silently look like a fresh start)."""
    storage = saver.storage
    root = storage.root.rstrip("/")
    base = root.rsplit("/", 1)[-1]
    if _CKPT_DIR_RE.match(base) or storage.exists(storage.join(storage.root, MANIFEST)):
        parent = root[: -len(base)].rstrip("/") or "/"
        raise CheckpointError(
            f"output_dir {storage.display(storage.root)} is a checkpoint directory, not a "
            f"run's output dir: set output_dir to {storage.display(parent)} to resume that "
            "run, or use model_bank to start from this checkpoint's weights"
        )
    if storage.is_local or _has_directories(storage.fs):
        return
    bucket = storage.strip(storage.root).strip("/").split("/", 1)[0]
    try:
        exists = bool(storage.fs.exists(bucket))
    except Exception as e:  # noqa: BLE001 - a client error: say which bucket
        raise CheckpointError(
            f"cannot check the bucket {bucket!r} of output_dir "
            f"{storage.display(storage.root)}: {type(e).__name__}: {e}"
        ) from e
    if not exists:
        raise CheckpointError(
            f"the bucket {bucket!r} of output_dir {storage.display(storage.root)} does not "
            "exist (or is not visible with these credentials); recframe never creates "
            "buckets: create it or fix the URL"
        )
