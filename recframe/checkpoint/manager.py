"""`CheckpointManager`: when to save, what to keep, what to restore.

- ``step()`` saves every ``save_interval`` optimizer updates (and/or every
  ``save_interval_secs``), on demand (``force``), and when SIGTERM asked for it;
- retention keeps the ``max_keep`` newest committed checkpoints plus the best ones by
  an eval metric, is rebuilt from storage (never from memory), never touches the
  checkpoint being written nor, until a newer one is committed, the one restored from;
  a failed delete is logged;
- ``restore()`` loads the newest committed checkpoint that reads back intact (a corrupt
  one is skipped with a warning) and returns its step, 0 when there is none;
- ``async_save`` writes in a background thread after a host snapshot: at most one save
  in flight, a background error is raised at the next save or at ``wait()``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from recframe import distributed
from recframe.checkpoint.format import (
    CheckpointCorruptError,
    encode_tree,
    is_sharded,
    snapshot_state,
)
from recframe.checkpoint.hugepages import collapse, huge_page_ranges
from recframe.checkpoint.incremental import keep_closure, plan_save
from recframe.checkpoint.policies import AnyOf, BestN, FullEvery, IntervalPolicy, LatestN
from recframe.checkpoint.saver import (
    CheckpointError,
    CheckpointInfo,
    Saver,
    ckpt_name,
)
from recframe.checkpoint.storage import StorageError

logger = logging.getLogger("recframe.checkpoint")


class CheckpointManager:
    """Saves on an interval, keeps ``max_keep`` (and the best), restores the latest.

    Args:
        saver: the `Saver` that writes and reads checkpoints.
        save_interval: save every this many optimizer updates (None/0: only on demand).
        save_interval_secs: also save when this many seconds passed since the last save.
        max_keep: committed checkpoints kept (default: ``saver.max_keep``).
        keep_best_metric / keep_best_mode: also keep the best checkpoint by this eval
            metric (recorded in each manifest at save time).
        async_save: write in a background thread after a host snapshot.
        save_on_sigterm: on SIGTERM, request a save at the next step (see
            ``preemption_requested``); the trainer then stops.
        incremental: write delta checkpoints (only the embedding-table rows changed since
            the previous checkpoint; see `recframe.checkpoint.incremental`).
        full_checkpoint_every: with ``incremental``, every this many saves is a full one
            (`FullEvery`).
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
    ) -> None:
        self.saver = saver
        self.agree_every = max(1, int(agree_every))
        """Several ranks: every this many steps they agree (one all-reduce) on the
        decisions that may differ between them: a time-based save, a SIGTERM."""
        self._sigterm_seen = False
        self.full_policy = FullEvery(full_checkpoint_every)
        self.tracker: Any = None
        """The `RowTracker` of incremental checkpoints (None: every save is full)."""
        if incremental:
            from recframe.optim.tracking import RowTracker

            self.tracker = RowTracker(saver.model, saver.sparse_optimizer)
            saver.row_tracker = self.tracker
        self._pending: Optional[tuple[dict[str, Any], dict[str, Any], int]] = None
        self.save_policy = IntervalPolicy(save_interval, save_interval_secs)
        keep = LatestN(max_keep if max_keep is not None else saver.max_keep)
        self.preservation = (
            AnyOf(keep, BestN(keep_best_metric, keep_best_mode)) if keep_best_metric else keep
        )
        self.async_save = async_save
        self.fork_snapshot = True
        """Async saves of host state in one process fork a copy-on-write writer."""
        self.huge_pages = True
        """After a forked save, back the state with huge pages so the next fork (the
        time the loop is blocked) copies 512x fewer page-table entries."""
        self.global_step = 0
        self.metrics_provider: Optional[Callable[[], dict[str, float]]] = None
        self.preemption_requested = False
        self._restored_step: Optional[int] = None
        self._last_saved_step = -1
        self._last_saved_time = time.monotonic()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._previous_handler: Any = None
        self.save_on_sigterm = save_on_sigterm
        self.saver.clean_uncommitted()
        latest = self.saver.latest_checkpoint()
        if latest is not None:
            self._last_saved_step = latest.step

    # --- saving -------------------------------------------------------------------
    def step(self, global_step: Optional[int] = None, force: bool = False) -> Optional[str]:
        """Call once per optimizer update; saves when the policy (or ``force``, or a
        SIGTERM) says so. Returns the committed path, or None."""
        if global_step is None:
            self.global_step += 1
        else:
            self.global_step = global_step
        step = self.global_step
        if distributed.get_world_size() > 1:
            return self._step_of_many(step, force)
        if self.preemption_requested:
            force = True
        if force and step == self._last_saved_step:
            return None
        if force or self.save_policy.should_save(
            step, self._last_saved_step, self._last_saved_time
        ):
            return self.save(step)
        return None

    def _step_of_many(self, step: int, force: bool) -> Optional[str]:
        """`step` with several ranks: every rank must save at the same step. The step
        interval is the same everywhere; wall time and SIGTERM are not, so they count
        only at steps that are multiples of ``agree_every``, where the ranks agree
        (max over ranks: one rank's SIGTERM or timer saves, and stops, all)."""
        policy = self.save_policy
        due = bool(policy.steps and step % policy.steps == 0 and step > self._last_saved_step)
        if (policy.seconds or self.save_on_sigterm) and step % self.agree_every == 0:
            mine = 2 if (self._sigterm_seen or self.preemption_requested) else (
                1 if policy.seconds and time.monotonic() - self._last_saved_time
                >= policy.seconds else 0)
            agreed = distributed.all_reduce_max_int(mine)
            if agreed >= 2:
                self.preemption_requested = True
            due = due or (agreed == 1 and step > self._last_saved_step)
        if self.preemption_requested:
            force = True
        if force and step == self._last_saved_step:
            return None
        if force or due:
            return self.save(step)
        return None

    def save(self, global_step: Optional[int] = None) -> Optional[str]:
        """Save ``ckpt_<global_step>`` now (None if that id is already committed)."""
        step = self.global_step if global_step is None else global_step
        self.wait()  # at most one save in flight; surfaces a background error
        path = self.saver.storage.path(ckpt_name(step))
        if self.saver.read_manifest(path, quiet=True) is not None:
            logger.info("checkpoint %s already committed; not saving it twice", path)
            self._last_saved_step = step
            return None
        metrics = dict(self.metrics_provider() if self.metrics_provider else {})
        started = time.monotonic()
        if self.async_save:
            self.saver.prepare_distributed()  # its collective runs here, not in the thread
            # a save in flight counts as done for the interval (its error surfaces later)
            self._last_saved_step, self._last_saved_time = step, started
            full = self.saver.collect_state()
            state, extra = self._plan(step, full)
            try:
                if self._can_fork(state):
                    # the tables' own memory (a delta's state holds only copied rows)
                    ranges = huge_page_ranges(_host_tensors(full)) if self.huge_pages else []
                    child = self._fork(step, state, metrics, extra)
                    target, args = self._forked_save, (step, metrics, child, ranges)
                else:
                    target, args = self._background_save, (
                        step, snapshot_state(state), metrics, extra
                    )
            except BaseException:
                self._settle(failed=True)
                raise
            del full
            self._thread = threading.Thread(
                target=target, args=args, name="recframe-async-save", daemon=False,
            )
            self._thread.start()
            return path
        state, extra = (None, None) if self.tracker is None else self._plan(
            step, self.saver.collect_state()
        )
        try:
            self.saver.save(step, metrics=metrics, prune=False, state=state,
                            manifest_extra=extra)
        except BaseException:
            self._settle(failed=True)
            raise
        self._settle(failed=False)
        # only now: a save that failed is not "saved" (a retry of that step may run)
        self._last_saved_step, self._last_saved_time = step, started
        self._after_commit(step)
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

    def _background_save(
        self, step: int, state: dict[str, Any], metrics: dict, extra: Optional[dict] = None
    ) -> None:
        try:
            self.saver.save(step, metrics=metrics, state=state, prune=False,
                            manifest_extra=extra)
            self._after_commit(step)
        except BaseException as e:  # noqa: BLE001 - surfaced at the next save / wait()
            self._error = e

    def _can_fork(self, state: dict[str, Any]) -> bool:
        """A copy-on-write snapshot (fork) needs one process (no collectives in the
        child), a local filesystem (no client threads to inherit) and host tensors."""
        if not self.fork_snapshot or not hasattr(os, "fork"):
            return False
        if distributed.get_world_size() != 1 or not self.saver.storage.is_local:
            return False
        try:
            tensors = _host_tensors(state, all_tensors=True)
        except TypeError:
            return False
        return all(getattr(v, "device", torch.device("cpu")).type == "cpu" for v in tensors)

    def _fork(
        self, step: int, state: dict[str, Any], metrics: dict, extra: Optional[dict] = None
    ) -> tuple[int, int]:
        """Fork a child that writes and commits the checkpoint from its copy-on-write
        view of memory; the loop is blocked only for the fork itself."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: plain file I/O only, then _exit
            code, message = 0, b""
            try:
                os.close(read_fd)
                _die_with_parent()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                torch.set_num_threads(1)  # no OpenMP pool in a forked child
                self.saver.save(step, metrics=metrics, state=state, prune=False,
                                manifest_extra=extra)
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                code, message = 1, f"{type(e).__name__}: {e}".encode()[:4000]
            finally:
                try:
                    os.write(write_fd, message)
                finally:
                    os._exit(code)
        os.close(write_fd)
        return pid, read_fd

    def _forked_save(
        self, step: int, metrics: dict, child: tuple[int, int], ranges: list[tuple[int, int]]
    ) -> None:
        pid, read_fd = child  # the child holds its own (copy-on-write) view of the state
        try:
            with os.fdopen(read_fd, "rb") as pipe:
                message = pipe.read().decode(errors="replace")
            _, status = os.waitpid(pid, 0)
            # the writer is gone: pages the loop wrote meanwhile were split to 4 KiB;
            # huge pages again make the next fork ~5x cheaper (see hugepages.py)
            collapse(ranges)
            if os.waitstatus_to_exitcode(status) != 0:
                raise CheckpointError(
                    message or f"the checkpoint writer process died ({status})"
                )
            self._after_commit(step)
        except BaseException as e:  # noqa: BLE001 - surfaced at the next save / wait()
            self._error = e

    def _after_commit(self, step: int) -> None:
        if self._restored_step is not None and step > self._restored_step:
            self._restored_step = None  # a newer one is committed: no longer protected
        # never the checkpoint just written (after a restore from an older step, newer
        # ones of the abandoned run may outrank it)
        self.apply_retention(protect={step})

    def wait(self) -> None:
        """Block until a background save finishes; raise its error if it failed."""
        thread = self._thread
        if thread is not None:
            thread.join()
            self._thread = None
            self._settle(failed=self._error is not None)
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"the background checkpoint save failed: {error}") from error

    def close(self) -> None:
        """Finish any save in flight and restore the previous SIGTERM handler."""
        try:
            self.wait()
        finally:
            if self._previous_handler is not None:
                try:
                    signal.signal(signal.SIGTERM, self._previous_handler)
                except ValueError:
                    pass
                self._previous_handler = None

    # --- retention ----------------------------------------------------------------
    def apply_retention(self, protect: Optional[set[int]] = None) -> list[str]:
        """Delete committed checkpoints the preservation policy does not keep (nor
        the steps in ``protect``)."""
        if not distributed.is_main_process():
            return []
        found = self.saver.list_checkpoints()
        keep = self.preservation.select(found) | set(protect or ())
        if self._restored_step is not None:
            keep.add(self._restored_step)
        keep = keep_closure(found, keep)  # a kept delta keeps its chain
        return self.saver.delete([c for c in found if c.step not in keep])

    def list(self) -> list[CheckpointInfo]:
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
            self._restored_step = ckpt.step
            self._last_saved_step = max(self._last_saved_step, ckpt.step)
            return ckpt.step
        if found:
            raise CheckpointError(
                f"no checkpoint under {self.saver.output_dir} could be read back; see the "
                "warnings above"
            )
        return 0

    def load_model_bank(self, entries: list[Any]) -> None:
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
        """Training starts: install the SIGTERM handler (``save_on_sigterm``)."""
        self.preemption_requested = False
        self._sigterm_seen = False
        if self.save_on_sigterm and self._previous_handler is None:
            self._install_sigterm()

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: Any) -> None:
            logger.warning("SIGTERM received: saving a checkpoint at the next step, then stopping")
            if distributed.get_world_size() > 1:
                self._sigterm_seen = True  # the ranks agree on the step (see _step_of_many)
            else:
                self.preemption_requested = True

        self._previous_handler = signal.signal(signal.SIGTERM, handler)


def _host_tensors(state: dict[str, Any], all_tensors: bool = False) -> list[Any]:
    """The tensors of a state tree, a sharded tensor's local shards in its place
    (``all_tensors``: also an empty sharded tensor, as itself)."""
    tensors: dict[str, Any] = {}
    encode_tree(state, "state", tensors)
    out = []
    for value in tensors.values():
        if is_sharded(value):
            shards = [s.tensor for s in value.local_shards()]
            out.extend(shards if shards or not all_tensors else [value])
        else:
            out.append(value)
    return out


def _die_with_parent() -> None:
    """Linux: the forked writer is killed when the training process dies, so a killed
    run never leaves a writer racing the rerun (its staging dir is cleaned up then)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


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
