"""`Trainer`: the training loop of recframe.

The loop is small on purpose; the detail lives with the component that owns it:
optimizer views and gradient accumulation in `recframe.optim`, the input pipeline in
`recframe.pipeline`, devices in `recframe.device`, hooks in `recframe.hooks`,
checkpoints in `recframe.checkpoint`, collectives in `recframe.distributed`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from recframe import distributed
from recframe.allocator import keep_freed_memory, leave_allocator_alone
from recframe.arguments import TrainingArguments
from recframe.checkpoint import CheckpointError, CheckpointManager, Saver
from recframe.console import default_logging
from recframe.data import batch_size_of
from recframe.device import Device, RNGState, resolve_device, set_seed
from recframe.hooks import (
    Event,
    Hook,
    HookRegistry,
    JsonlLoggerHook,
    LoggerHook,
    ProgressBarHook,
    RunConfigHook,
    TensorBoardHook,
)
from recframe.metrics import collect_predictions, pop_global_metrics
from recframe.optim import (
    AccumulationWindow,
    OptimizerView,
    SchedulerView,
    check_disjoint,
    current_lr,
    default_dense_optimizer,
    split_sparse_dense_parameters,
)
from recframe.optim.schedules import build_scheduler
from recframe.optim.sparse import default_sparse_optimizer, warn_if_dense_optimizer_holds_tables
from recframe.pipeline import BatchStream, TrainData, is_stateful, remaining_batches
from recframe.predict import Predictions, predict_dataset
from recframe.state import TrainerControl, TrainerState

logger = logging.getLogger("recframe")


class EvalPrediction(NamedTuple):
    """What ``compute_metrics`` gets (Hugging Face's name): every rank's logits and
    labels of the evaluation, as the model reported them with ``add_predictions``."""

    predictions: torch.Tensor
    label_ids: torch.Tensor


class CheckpointMismatchError(ValueError):
    """output_dir holds a checkpoint of another model; the message says how to start
    fresh."""


def _planned_updates(args: TrainingArguments, dataset: Any) -> Optional[int]:
    """The run's optimizer updates (for decaying schedules): ``train_steps``, else
    ``train_epoch`` passes over a dataset with a ``len()``; None when unknown."""
    if args.train_steps is not None:
        return args.train_steps
    try:
        batches = len(dataset)
    except TypeError:
        return None
    return -(-batches // args.gradient_accumulation_steps) * args.train_epoch


class Trainer:
    """Trains a model whose ``forward(batch)`` returns a scalar loss.

    Args:
        model: the model; ``model(batch)`` returns the loss (as in RecIS).
        args: run arguments (defaults when ``None``).
        train_dataset / eval_dataset: any iterable of batches (DataLoader,
            IterableDataset, list of batch dicts). A dataset with
            ``state_dict``/``load_state_dict`` is resumed at its exact position.
        hooks: extra hooks (built in: a logger, the run_config.json writer, a progress
            bar, and TensorBoard / metrics.jsonl as ``args.report_to`` asks).
        dense_optimizers: ``(optimizer, lr_scheduler)``; either may be ``None``. The
            default optimizer is AdamW(lr=1e-3) over the non-embedding parameters.
        sparse_optimizer: the optimizer of the embedding tables (a recframe sparse
            optimizer, the `FusedSparseOptimizer` of `recframe.optim.fused.shard_model`, or
            any torch optimizer); when ``None``: a sharded model's own fused optimizer,
            else recframe's RowWiseAdagrad(lr=0.01) over the tables no optimizer holds.
        compute_metrics: as in Hugging Face's Trainer, ``fn(EvalPrediction)`` returning
            extra eval metrics from all ranks' logits (``predictions``) and labels
            (``label_ids``) that the model reported with ``add_predictions``.
    """

    def __init__(
        self,
        model: nn.Module,
        args: Optional[TrainingArguments] = None,
        train_dataset: Optional[Iterable[Any]] = None,
        eval_dataset: Optional[Iterable[Any]] = None,
        hooks: Optional[Iterable[Hook]] = None,
        dense_optimizers: tuple[Any, Any] = (None, None),
        sparse_optimizer: Any = None,
        compute_metrics: Optional[Callable[[EvalPrediction], dict[str, float]]] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Trainer(model=...) must be a torch.nn.Module, got {type(model)}")
        if args is None:
            args = TrainingArguments()
        if not isinstance(args, TrainingArguments):
            raise TypeError(f"Trainer(args=...) must be TrainingArguments, got {type(args)}")
        if not (isinstance(dense_optimizers, (tuple, list)) and len(dense_optimizers) == 2):
            raise TypeError(
                "Trainer(dense_optimizers=...) must be a pair (optimizer, lr_scheduler); "
                "use (optimizer, None) when there is no scheduler"
            )
        self.args = args
        default_logging()  # recframe's progress at INFO unless the user set up logging
        if args.keep_freed_memory:
            keep_freed_memory()  # every update reuses warm pages (recframe/allocator.py)
        else:
            leave_allocator_alone()  # nor may a reader set it later
        set_seed(args.seed)
        self.device: Device = resolve_device(args.device)
        self.model = self.device.prepare_model(model)
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.state = TrainerState()
        self.control = TrainerControl()

        dense_opt, scheduler = dense_optimizers
        sparse_params, dense_params = split_sparse_dense_parameters(self.unwrapped_model)
        if dense_opt is None and dense_params:
            dense_opt = default_dense_optimizer(
                dense_params.values(), lr=args.learning_rate, weight_decay=args.weight_decay
            )
        if scheduler is None and dense_opt is not None:
            scheduler = build_scheduler(
                dense_opt, args.lr_scheduler_type, _planned_updates(args, train_dataset),
                args.warmup_steps, args.warmup_ratio,
            )
        if sparse_optimizer is None and sparse_params:
            sparse_optimizer = default_sparse_optimizer(
                self.model, sparse_params.values(), dense_opt
            )
        check_disjoint(dense_opt, sparse_optimizer)
        warn_if_dense_optimizer_holds_tables(dense_opt, self.unwrapped_model)

        self.window = AccumulationWindow(
            args.gradient_accumulation_steps, args.nonfinite_loss, args.accumulation_weighting
        )
        step_fn = self.device.optimizer_step
        self.dense_optimizer = OptimizerView(
            dense_opt, self.window, step_fn, args.max_grad_norm, name="dense"
        )
        self.sparse_optimizer = OptimizerView(sparse_optimizer, self.window, step_fn, name="sparse")
        self.dense_lr_scheduler = SchedulerView(scheduler, self.window)
        if self.dense_lr_scheduler.on_metric and eval_dataset is None:
            raise ValueError(
                f"the scheduler {type(scheduler).__name__} steps on an evaluation metric "
                f"(TrainingArguments.metric_for_scheduler={args.metric_for_scheduler!r}), but "
                "Trainer got no eval_dataset: pass eval_dataset=... and evaluate during "
                "training (eval_interval_steps, or train_and_evaluate), or use a scheduler "
                "that steps every update"
            )

        self.compute_metrics = compute_metrics
        if args.eval_interval_steps is not None and eval_dataset is None:
            logger.warning(
                "TrainingArguments.eval_interval_steps=%d does nothing: no eval_dataset was "
                "given (CLI: --eval_path)", args.eval_interval_steps,
            )
        if args.keep_best_metric and eval_dataset is None:
            logger.warning(
                "TrainingArguments.%s does nothing: no eval_dataset was given, so no "
                "checkpoint gets the metric %r",
                "load_best_model_at_end=True" if args.load_best_model_at_end
                else f"keep_best_metric={args.keep_best_metric!r}", args.keep_best_metric,
            )

        self.hooks = HookRegistry()
        self.hooks.add(LoggerHook(args.log_steps))
        self.hooks.add(RunConfigHook())
        if "tensorboard" in args.report_targets:
            self.hooks.add(TensorBoardHook())
        if "jsonl" in args.report_targets:
            self.hooks.add(JsonlLoggerHook())
        if not args.disable_tqdm:
            self.hooks.add(ProgressBarHook())
        if hooks:
            self.add_hooks(hooks)

        self._restored = False
        self._depth = 0
        self._warned: set[str] = set()
        self._marks_steps = type(self.device).mark_step is not Device.mark_step
        self._eval_start_state: Optional[dict[str, Any]] = None
        # the train dataset's stream, position and loader RNG (checkpointed)
        self.train_data = TrainData(
            lambda: self.train_dataset, self.device, args.dataloader_prefetch, args.seed
        )
        self._target: Optional[dict[str, int]] = None  # the running call's target
        self.saver, self.checkpoint_manager = self._build_checkpointing()

    def _build_checkpointing(self) -> tuple[Saver, CheckpointManager]:
        """Saver + CheckpointManager from the arguments, with everything a bit-exact
        resume needs registered."""
        args = self.args
        saver = Saver(
            self.unwrapped_model,
            self.sparse_optimizer.optimizer,
            output_dir=args.output_dir,
            max_keep=args.max_to_keep,
            concurrency=args.save_concurrency_per_rank,
            commit_timeout=args.save_commit_timeout,
        )
        saver.register_for_checkpointing("dense_optimizer", self.dense_optimizer)
        saver.register_for_checkpointing("dense_lr_scheduler", self.dense_lr_scheduler)
        saver.register_for_checkpointing("trainer_state", self.state)
        saver.register_for_checkpointing("hooks", self.hooks)
        saver.register_io_state("rng", RNGState(self.device))
        saver.register_io_state("train_data", self.train_data)
        manager = CheckpointManager(
            saver,
            save_interval=args.save_steps,
            save_interval_secs=args.save_interval_secs,
            max_keep=args.max_to_keep,
            keep_best_metric=args.keep_best_metric,
            keep_best_mode=args.keep_best_mode,
            async_save=args.async_save,
            save_on_sigterm=args.save_on_sigterm,
            agree_every=args.dist_sync_steps,
            incremental=args.incremental_checkpoints,
            full_checkpoint_every=args.full_checkpoint_every,
        )
        manager.metrics_provider = lambda: self.state.last_eval
        return saver, manager

    # --- public API ---------------------------------------------------------------
    @property
    def unwrapped_model(self) -> nn.Module:
        """The user's model without DDP/DMP wrappers."""
        model = self.model
        while hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        return model

    @property
    def data_position(self) -> Optional[dict[str, Any]]:
        """A stateful train dataset's position after the last trained batch."""
        return self.train_data.position

    @property
    def global_step(self) -> int:
        return self.state.global_step

    @property
    def is_main_process(self) -> bool:
        return distributed.is_main_process()

    def add_hook(self, hook: Hook) -> None:
        self.hooks.add(hook)

    def add_hooks(self, hooks: Iterable[Hook]) -> None:
        self.hooks.add_all(hooks)

    def restore(self) -> int:
        """Warm-start from ``model_bank`` and resume from the latest checkpoint in
        ``output_dir``; returns the step resumed from (0 when starting fresh). Runs once."""
        if self._restored:
            return self.state.global_step
        self._restored = True
        if self.args.model_bank:
            self.checkpoint_manager.load_model_bank(self.args.model_bank)
        step = self._resume()
        if not self.is_main_process:
            pass  # the log is rank 0's
        elif step:
            logger.info(
                "resumed from %s/ckpt_%d (global_step=%d, epoch=%d)",
                self.args.output_dir, step, self.state.global_step, self.state.epoch,
            )
        else:
            logger.info("no checkpoint in %s: starting from step 0", self.args.output_dir)
        if step:
            self.hooks.fire(Event.AFTER_RESTORE, self, step)
        return step

    def _resume(self) -> int:
        """Load what ``resume_from_checkpoint`` / ``overwrite_output_dir`` ask for; a
        checkpoint of another model is an error that says how to start fresh."""
        args, manager = self.args, self.checkpoint_manager
        target = args.resume_from_checkpoint
        if args.overwrite_output_dir:
            self._clear_output_dir()
            return 0
        if target is False:  # start fresh; never silently on top of another run's steps
            found = manager.saver.list_checkpoints()
            if found:
                raise ValueError(
                    f"TrainingArguments.resume_from_checkpoint=False, but {args.output_dir} "
                    f"holds checkpoints ({found[-1].name}): pass overwrite_output_dir=True "
                    "to delete them, or use another output_dir"
                )
            return 0
        try:
            if isinstance(target, str):
                return self._resume_from_path(target)
            step = manager.restore()
        except (CheckpointError, ValueError) as e:
            if "does not match" not in str(e):
                raise
            if isinstance(target, str):  # the user's path, not output_dir's checkpoint
                raise CheckpointMismatchError(
                    f"resume_from_checkpoint={target!r} is a checkpoint of a different "
                    f"model: {e}. Build the model it was trained with, or leave "
                    "resume_from_checkpoint unset"
                ) from e
            raise CheckpointMismatchError(
                f"{args.output_dir} holds a checkpoint of a different model: {e}. To start "
                "fresh there, pass overwrite_output_dir=True (recframe train "
                "--overwrite_output_dir true: deletes its checkpoints), or use another "
                "output_dir"
            ) from e
        if target is True and step == 0:
            raise ValueError(
                f"TrainingArguments.resume_from_checkpoint=True, but {args.output_dir} has no "
                "committed checkpoint; leave it unset to start fresh"
            )
        return step

    def _resume_from_path(self, path: str) -> int:
        saver = self.checkpoint_manager.saver
        name = path.rstrip("/").rsplit("/", 1)[-1]
        inside = [c for c in saver.list_checkpoints() if c.name == name]
        if inside and path.rstrip("/") in (inside[0].path.rstrip("/"), name):
            return self.checkpoint_manager.restore(global_step=inside[0].step)
        try:
            saver.load(ckpt_path=path)
        except FileNotFoundError as e:
            raise ValueError(
                f"TrainingArguments.resume_from_checkpoint={path!r}: no checkpoint there"
            ) from e
        return int(self.state.global_step)

    def _clear_output_dir(self) -> None:
        """``overwrite_output_dir``: delete the checkpoints and leftovers (rank 0)."""
        saver = self.checkpoint_manager.saver
        if self.is_main_process:
            doomed = [c.path for c in saver.list_checkpoints()] + saver.uncommitted()
            for path in doomed:
                saver.storage.remove_tree(path)
            if doomed:
                logger.info("overwrite_output_dir: deleted %d checkpoint(s) in %s",
                            len(doomed), self.args.output_dir)
        distributed.barrier()
        # the manager read the deleted latest step when it was built: forget it, or the
        # new run's save at that step counts as done and is never written
        self.checkpoint_manager._last_saved_step = -1

    def train(self, train_steps: Optional[int] = None) -> dict[str, Any]:
        """Train until ``train_steps`` optimizer updates in all (resumed ones count),
        or ``args.train_epoch`` epochs when no step count is given."""
        steps = self.args.train_steps if train_steps is None else train_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or steps < 1):
            raise ValueError(f"train(train_steps={steps!r}) is invalid: must be an integer >= 1")
        with self._outermost():
            self.restore()
            goal = {"steps": steps} if steps is not None else {"epochs": self.args.train_epoch}
            if steps is not None and steps < self.state.global_step and self.is_main_process:
                logger.warning(
                    "train_steps=%d is below the step %d resumed from %s: nothing to train "
                    "(train_steps counts all updates, resumed ones too); raise it to go on",
                    steps, self.state.global_step, self.args.output_dir,
                )
            if self._may_train(goal):
                if self.dense_lr_scheduler.on_metric and "plateau-train" not in self._warned and (
                    self.eval_dataset is None or self.args.eval_interval_steps is None
                ):
                    self._warned.add("plateau-train")
                    logger.warning(
                        "%s steps once per evaluation, and train() evaluates only every "
                        "eval_interval_steps (unset, or no eval_dataset): its learning rate "
                        "will not change; set eval_interval_steps or use train_and_evaluate",
                        type(self.dense_lr_scheduler.scheduler).__name__,
                    )
                if steps is not None:
                    self._train_until(max_steps=steps)
                else:
                    self._train_until(max_epochs=self.args.train_epoch)
                if self.args.load_best_model_at_end:
                    self._load_best_model()
        return self.state.state_dict()

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: the model weights (not the optimizers or the
        position) of the kept checkpoint with the best ``keep_best_metric``."""
        name, mode = self.args.keep_best_metric, self.args.keep_best_mode
        scored = [(float(c.manifest.get("metrics", {})[name]), c)
                  for c in self.checkpoint_manager.saver.list_checkpoints()
                  if name in (c.manifest.get("metrics") or {})]
        if not scored:
            logger.warning(
                "load_best_model_at_end: no checkpoint has the metric %r (evaluate during "
                "training: eval_interval_steps); keeping the last model", name,
            )
            return
        pick = max if mode == "max" else min
        value, best = pick(scored, key=lambda vc: vc[0])
        self.checkpoint_manager.saver.load(
            ckpt_path=best.path, load_conf={"load": ["sparse", "dense"]}
        )
        if self.is_main_process:
            logger.info("load_best_model_at_end: loaded the model of %s (%s=%.6g)",
                        best.name, name, value)

    def evaluate(self, eval_steps: Optional[int] = None) -> dict[str, float]:
        """Evaluate on ``eval_dataset``: mean loss, AUC and log loss (when the model
        reports predictions with ``recframe.metrics.add_predictions``)."""
        with self._outermost():
            if self._depth == 1:
                self.restore()
            return self._evaluate(eval_steps, in_training=False)

    def train_and_evaluate(
        self,
        epochs: int = 1,
        train_steps: Optional[int] = None,
        eval_steps: Optional[int] = None,
    ) -> dict[str, float]:
        """``epochs`` rounds of (train one epoch, or ``train_steps`` more updates;
        then evaluate); returns the last evaluation's results.

        A round's evaluation runs before its final checkpoint, so that checkpoint holds
        what the evaluation decided (hook state, a stop, the plateau scheduler). Resumed,
        rounds finished before are not redone, and a round whose checkpoint predates
        its evaluation (an interval save at the round's last step, then a crash) is
        evaluated then. A hook's ``control.should_stop`` (e.g. `EarlyStoppingHook` in
        a round's evaluation) ends the call; a SIGTERM ends it without evaluating."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"train_and_evaluate(epochs={epochs!r}): must be an integer >= 1")
        if train_steps is not None and (isinstance(train_steps, bool)
                                        or not isinstance(train_steps, int) or train_steps < 1):
            raise ValueError(
                f"train_and_evaluate(train_steps={train_steps!r}): must be an integer >= 1"
            )
        goal = {"steps": epochs * train_steps} if train_steps is not None else {"epochs": epochs}
        results: Optional[dict[str, float]] = None
        with self._outermost():
            self.restore()
            if not self._may_train(goal):
                return self._results_now(eval_steps)
            state = self.state
            for r in range(epochs):
                if train_steps is not None:
                    target: dict[str, int] = {"max_steps": (r + 1) * train_steps}
                    reached = state.global_step >= (r + 1) * train_steps
                    at_round_end = state.global_step == (r + 1) * train_steps
                else:
                    target = {"max_epochs": r + 1}
                    reached = state.epoch >= r + 1
                    at_round_end = state.epoch == r + 1 and state.epoch_batches == 0
                if not reached:
                    results = self._train_until(**target, evaluate=True, eval_steps=eval_steps)
                    if self.checkpoint_manager.preemption_requested:
                        return dict(state.last_eval)  # preempted: the rest after a restart
                elif at_round_end and state.evaluated_step != state.global_step:
                    # resumed from this round's checkpoint, taken before its evaluation
                    results = self._round_evaluation(eval_steps)
                    self._note_stop()
                if self.control.should_stop:
                    break
            if results is None:  # every round was done before this call
                results = self._results_now(eval_steps)
        return results

    def predict(
        self, dataset: Optional[Iterable[Any]] = None, output: Optional[str] = None,
        max_batches: Optional[int] = None,
    ) -> Predictions:
        """Probabilities over ``dataset`` (default: ``eval_dataset``), with its labels when
        it has them, gathered on rank 0 under torchrun; ``output`` streams them to a
        Parquet / TSV file instead (`recframe.predict.predict_dataset`). Restores the
        latest checkpoint first, as `evaluate` does."""
        dataset = self.eval_dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("Trainer.predict needs a dataset (or Trainer(eval_dataset=...))")
        with self._outermost():
            if self._depth == 1:
                self.restore()
            return predict_dataset(self.model, dataset, self.device, output, max_batches)

    # --- the step -----------------------------------------------------------------
    def _train_step(self, data: Any, epoch: int, metrics: dict[str, Any]) -> None:
        """One micro-batch, written as RecIS documents it. Override freely, in any call
        order: the optimizers and scheduler seen here are accumulation-aware views
        (``zero_grad`` keeps the window's gradients, ``step`` runs once at its end)."""
        self.dense_optimizer.zero_grad()
        self.sparse_optimizer.zero_grad()
        loss = self.model(data)
        metrics.update(loss=loss)
        loss.backward()
        self.dense_optimizer.step()
        self.sparse_optimizer.step()
        self.dense_lr_scheduler.step()

    # --- loop internals -----------------------------------------------------------
    @contextlib.contextmanager
    def _outermost(self) -> Iterator[None]:
        """``end`` fires once, when the outermost public call returns."""
        self._depth += 1
        if self._depth == 1:
            self.hooks.rearm_end()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.hooks.fire(Event.END, self)

    def _estimate_max_steps(self, max_steps: Optional[int], max_epochs: Optional[int]) -> Any:
        if max_steps is not None:
            return max_steps
        try:
            per_epoch = -(-len(self.train_dataset) // self.args.gradient_accumulation_steps)  # type: ignore[arg-type]
        except TypeError:
            return None
        done_in_epoch = -(-self.state.epoch_batches // self.args.gradient_accumulation_steps)
        return self.state.global_step + per_epoch * (max_epochs - self.state.epoch) - done_in_epoch

    def _may_train(self, goal: dict[str, int]) -> bool:
        """Whether a public call with target ``goal`` trains: not when a hook stopped
        this run before (``state.stopped``, checkpointed), unless ``goal`` is larger
        than the stopped call's target or ``args.resume_training`` is set."""
        state = self.state
        if state.stopped:
            before = state.stop_target or {}
            (unit, value), = goal.items()
            larger = unit in before and value > before[unit]
            if not (larger or self.args.resume_training):
                if self.is_main_process:
                    logger.warning(
                        "this run was stopped early by a hook at step %d (target %s), and "
                        "the stop is checkpointed: not training again. To continue, ask "
                        "for a larger target or set TrainingArguments.resume_training=True",
                        state.global_step, _target_text(before),
                    )
                return False
            if self.is_main_process:
                logger.info(
                    "continuing a run stopped early at step %d (%s)", state.global_step,
                    "resume_training" if not larger else f"target {_target_text(goal)} > "
                    f"{_target_text(before)}",
                )
            state.stopped, state.stop_target = False, None
        self._target = dict(goal)
        return True

    def _note_stop(self) -> None:
        """Record in the state (so in the next checkpoint) that a hook stopped training;
        a SIGTERM preemption is not a stop: the restarted job must go on."""
        if (self.control.should_stop and not self.state.stopped
                and not self.checkpoint_manager.preemption_requested):
            self.state.stopped = True
            self.state.stop_target = None if self._target is None else dict(self._target)

    def _train_until(
        self,
        max_steps: Optional[int] = None,
        max_epochs: Optional[int] = None,
        evaluate: bool = False,
        eval_steps: Optional[int] = None,
    ) -> Optional[dict[str, float]]:
        """Train to the target; with ``evaluate``, evaluate (a round of
        `train_and_evaluate`) before the final checkpoint and return the results."""
        if self.train_dataset is None:
            raise ValueError("Trainer.train needs Trainer(train_dataset=...): none was given")
        self.state.max_steps = self._estimate_max_steps(max_steps, max_epochs)
        self.control.should_stop = False
        self.model.train()
        self.checkpoint_manager.start()
        # read once per call, not per update: the skip decision agrees across ranks only
        # where there are several
        self.window.single_process = (not distributed.is_initialized()
                                      or distributed.get_world_size() == 1)
        # whether the device cuts graphs (XLA); eager devices' mark_step is a no-op, not
        # called per update
        self._marks_steps = type(self.device).mark_step is not Device.mark_step
        failed = True
        try:
            self.hooks.fire(Event.BEFORE_TRAIN, self)
            while not self.control.should_stop:
                if max_steps is not None and self.state.global_step >= max_steps:
                    break
                if max_epochs is not None and self.state.epoch >= max_epochs:
                    break
                if not self._train_epoch(max_steps):
                    break
            self.hooks.fire(Event.AFTER_TRAIN, self)
            results = None
            if evaluate and not self.checkpoint_manager.preemption_requested:
                results = self._round_evaluation(eval_steps)
            self._save_checkpoint(final=True)
            failed = False
        finally:
            self.train_data.pause(failed)  # keeps (or puts back) the look-ahead
            try:
                self.checkpoint_manager.close()  # a save in flight finishes first
            except Exception:
                if not failed:
                    raise
                logger.exception("a background checkpoint save failed too")
        return results

    def _train_epoch(self, max_steps: Optional[int]) -> bool:
        """Train (the rest of) one pass; returns False when the data ran dry."""
        dataset, done = self.train_dataset, self.state.epoch_batches
        first = self.train_data.open(
            self.state.epoch, done, lambda: self._agreed_batches(dataset, done)
        )
        if first is None:
            if self.state.global_step == 0 and self.state.epoch_batches == 0:
                raise ValueError("train_dataset yielded no batches; check the dataset")
            logger.warning(
                "train_dataset yielded no batches in epoch %d (a one-shot iterator cannot "
                "be re-iterated); stopping at step %d",
                self.state.epoch,
                self.state.global_step,
            )
            return False
        return self._train_pass(self.train_data, max_steps)

    def _agreed_batches(
        self, dataset: Any, done: int, cap: Optional[int] = None
    ) -> tuple[Optional[int], Optional[int]]:
        """With several ranks, ``(limit, sync_every)`` for a `BatchStream` so that every
        rank runs the same number of batches (the sharded tables' lookups are
        collectives: a rank that stopped early would leave the others hanging). A
        dataset with ``len()`` costs one all-reduce per pass (the smallest remaining
        count wins, capped by ``cap``); without, the ranks agree every
        ``dist_sync_steps`` batches. One process: ``(cap, None)``."""
        if distributed.get_world_size() == 1 or not distributed.is_initialized():
            return cap, None
        remaining = remaining_batches(dataset, done)
        if remaining is None:
            # an endless or unsized dataset: agree as we go (up to the cap, if any)
            return cap, self.args.dist_sync_steps
        if cap is not None:
            remaining = min(remaining, cap)
        return distributed.all_reduce_min_int(remaining), None

    def _train_pass(self, feed: TrainData, max_steps: Optional[int]) -> bool:
        self.hooks.fire(Event.BEFORE_EPOCH, self)
        k = self.args.gradient_accumulation_steps
        end_of_data = False
        while feed.pending is not None and not self.control.should_stop:
            if max_steps is not None and self.state.global_step >= max_steps:
                break
            if self.hooks.listeners[Event.BEFORE_STEP]:  # usually none: no fire() call
                self.hooks.fire(Event.BEFORE_STEP, self)
                if self.control.should_stop:  # a before_step hook stops before this update
                    break
            self.window.reset(self.state.global_step + 1)  # and its views' windows
            step_metrics: dict[str, Any] = {}
            samples = 0
            start = (self.state.epoch_batches, self.state.micro_step, feed.position,
                     feed.loader_rng)
            try:
                for index in range(k):
                    item = feed.take()
                    size = index + 1 if item.is_last else k
                    n = batch_size_of(item.batch)
                    samples += n
                    self._run_micro_batch(item.batch, index, size, step_metrics, n)
                    self.state.epoch_batches += 1
                    if item.position is not None:  # else feed.trained(item) does nothing
                        feed.trained(item)
                    if item.is_last:
                        end_of_data = True
                        break
                # the optimizers' and scheduler's steps requested in _train_step run here
                skipped = self.window.update()
            except BaseException:
                # a window that failed before its update (an error, Ctrl-C) counts for
                # nothing: the next train() call trains it again from its first
                # micro-batch, without its gradients
                (self.state.epoch_batches, self.state.micro_step, feed.position,
                 feed.loader_rng) = start
                self.window.drop()
                raise
            if end_of_data:
                # close the pass before the update's checkpoint, so a resume starts the
                # next pass
                self.state.epoch += 1
                self.state.epoch_batches = 0
                feed.end_pass()
            self._finish_update(step_metrics, samples, skipped)
        if end_of_data:
            self.hooks.fire(Event.AFTER_EPOCH, self)
        return True

    def _run_micro_batch(
        self, batch: Any, index: int, size: int, step_metrics: dict[str, Any],
        samples: Optional[int] = None,
    ) -> None:
        metrics: dict[str, Any] = {}
        window = self.window
        window.begin(index, size, metrics, batch_size_of(batch) if samples is None else samples)
        boundary = index >= size - 1  # window.is_boundary, without the property call
        if boundary and not self.args.bf16:  # the usual micro-batch: no context to enter
            self._train_step(batch, self.state.epoch, metrics)
        else:
            sync_ctx = _no_sync(self.model) if not boundary else contextlib.nullcontext()
            with sync_ctx, self.device.autocast(self.args.bf16):
                self._train_step(batch, self.state.epoch, metrics)
        if not boundary and self._marks_steps:
            # lazy devices (XLA): one graph per micro-batch, whatever k (the update's own
            # graph is cut by _finish_update)
            self.device.mark_step()
        self.state.micro_step += 1
        loss = metrics.get("loss")
        if loss.__class__ is torch.Tensor or isinstance(loss, torch.Tensor):  # no call, usually
            window.losses.append(loss.detach())
        elif "no-loss" not in self._warned:
            self._warned.add("no-loss")
            logger.warning(
                "_train_step did not record the loss (metrics.update(loss=loss)); loss is "
                "neither logged nor checked for NaN/inf"
            )
        if len(metrics) > 1 or loss is None:  # metrics of the user's beside the loss
            for key, value in metrics.items():
                if key != "loss":
                    step_metrics[key] = (value.detach() if isinstance(value, torch.Tensor)
                                         else value)
        recorded = pop_global_metrics()
        if recorded:
            step_metrics.update(recorded)

    def _finish_update(self, step_metrics: dict[str, Any], samples: int, skipped: bool) -> None:
        self.state.global_step += 1
        self.state.samples_seen += samples
        loss = self.window.mean_loss()
        if loss is not None:
            step_metrics["loss"] = loss
        lr = current_lr(self.dense_optimizer.optimizer)
        if lr is not None:
            step_metrics["lr"] = lr
        step_metrics["samples"] = samples
        if self.dense_optimizer.last_grad_norm is not None:
            step_metrics["grad_norm"] = self.dense_optimizer.last_grad_norm.detach()
        if skipped:
            self.state.skipped_updates += 1
            step_metrics["skipped_updates"] = self.state.skipped_updates
        if self._marks_steps:
            self.device.mark_step()
        self.hooks.fire(Event.AFTER_STEP, self, step_metrics)
        interval = self.args.eval_interval_steps
        due = interval is not None and self.state.global_step % interval == 0
        if self.eval_dataset is not None and (due or self.control.should_evaluate):
            self._evaluate(self.args.eval_steps)
        self._save_checkpoint(final=False)
        if self.checkpoint_manager.preemption_requested:
            self.control.should_stop = True
        self.control.reset_step_flags()

    def _save_checkpoint(self, final: bool) -> None:
        if self.control.should_stop:
            self._note_stop()
        path = self.checkpoint_manager.step(
            self.state.global_step, force=final or self.control.should_save
        )
        if path:
            self.hooks.fire(Event.AFTER_SAVE, self, path)

    def _round_evaluation(self, eval_steps: Optional[int]) -> dict[str, float]:
        """The evaluation of a round's end: not repeated when this step was already
        evaluated during training (hooks and schedulers see each model once)."""
        if self.state.evaluated_step == self.state.global_step and self.state.last_eval:
            return dict(self.state.last_eval)
        return self._evaluate(eval_steps)

    def _results_now(self, eval_steps: Optional[int]) -> dict[str, float]:
        """Results for a call that trains nothing: those of this step's evaluation during
        training, else a fresh evaluation outside training."""
        if self.state.evaluated_step == self.state.global_step and self.state.last_eval:
            return dict(self.state.last_eval)
        return self._evaluate(eval_steps, in_training=False)

    def _step_metric_scheduler(self, results: dict[str, float]) -> None:
        """Step a metric-driven scheduler (``ReduceLROnPlateau``) on this evaluation's
        ``args.metric_for_scheduler``."""
        view = self.dense_lr_scheduler
        if not view.on_metric:
            return
        name = self.args.metric_for_scheduler
        if name not in results:
            raise ValueError(
                f"TrainingArguments.metric_for_scheduler={name!r} is not among the evaluation "
                f"metrics {sorted(results)}; set it to one of them "
                f"({type(view.scheduler).__name__} steps on it after each evaluation)"
            )
        view.scheduler.step(float(results[name]))

    def _evaluate(self, eval_steps: Optional[int], in_training: bool = True) -> dict[str, float]:
        """Evaluate; ``in_training``: an evaluation that is part of training (interval or
        round), which steps a metric-driven scheduler and is recorded in the state."""
        if eval_steps is None:
            eval_steps = self.args.eval_steps  # None: the whole eval dataset
        if self.eval_dataset is None:
            raise ValueError("Trainer.evaluate needs Trainer(eval_dataset=...): none was given")
        dataset = self.eval_dataset
        if is_stateful(dataset):  # every evaluation starts at the same place
            if self._eval_start_state is None:
                self._eval_start_state = dataset.state_dict()  # type: ignore[attr-defined]
            else:
                dataset.load_state_dict(self._eval_start_state)  # type: ignore[attr-defined]
        was_training = self.model.training
        self.model.eval()
        self.hooks.fire(Event.BEFORE_EVALUATE, self)
        loss_sum = torch.zeros((), dtype=torch.float64)
        count = 0
        with torch.no_grad(), collect_predictions() as collector:
            limit, sync_every = self._agreed_batches(dataset, 0, eval_steps)
            stream = BatchStream(dataset, self.device, 1, limit=limit, sync_every=sync_every,
                                 drain=False)
            for i, item in enumerate(stream):
                if eval_steps is not None and i >= eval_steps:
                    break
                with self.device.autocast(self.args.bf16):
                    loss = self.model(item.batch)
                n = batch_size_of(item.batch)
                loss_sum += loss.detach().double().cpu() * n
                count += n
            pop_global_metrics()
            results = collector.compute()
            if self.compute_metrics is not None:
                logits, labels = collector.gathered()
                results.update(self.compute_metrics(EvalPrediction(logits, labels)))
        total = distributed.all_reduce_sum(float(count))
        if total == 0:
            raise ValueError("eval_dataset yielded no batches; check the dataset")
        results["loss"] = distributed.all_reduce_sum(float(loss_sum)) / total
        results["num_samples"] = total
        self.state.last_eval = dict(results)
        best = self.args.keep_best_metric
        if best and best not in results and "keep-best" not in self._warned:
            self._warned.add("keep-best")
            logger.warning(
                "TrainingArguments.keep_best_metric=%r is not among the evaluation metrics "
                "%s: no checkpoint is kept as the best; set it to one of them",
                best, sorted(results),
            )
        if is_stateful(dataset) and self._eval_start_state is not None:
            dataset.load_state_dict(self._eval_start_state)  # type: ignore[attr-defined]
        if in_training:
            self.state.evaluated_step = self.state.global_step
            self._step_metric_scheduler(results)
        self.hooks.fire(Event.AFTER_EVALUATE, self, results)
        self.model.train(was_training)
        return results


def _no_sync(model: nn.Module) -> Any:
    """DDP's ``no_sync`` for a non-final micro-batch: the model itself when it is a
    DistributedDataParallel, or the DDP module inside torchrec's
    DistributedModelParallel (its dense part); a null context when there is none."""
    from torch.nn.parallel import DistributedDataParallel

    current: Any = model
    for _ in range(4):
        if isinstance(current, DistributedDataParallel):
            return current.no_sync()
        inner = getattr(current, "_dmp_wrapped_module", None)
        if not isinstance(inner, nn.Module):
            break
        current = inner
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if callable(no_sync) else contextlib.nullcontext()


def _target_text(target: dict[str, int]) -> str:
    return ", ".join(f"{value} {unit}" for unit, value in target.items()) or "unknown"
