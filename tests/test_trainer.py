"""`Trainer`: step counting, the hook event sequence, control flags, evaluation,
non-finite losses, metrics from model code, dataset positions and input validation.

Gradient-accumulation equivalence lives in test_accumulation.py."""

from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch
from conftest import ToyCTR, make_batches
from torch import nn

import recframe
from recframe import Hook, HookError, Trainer, TrainingArguments, data
from recframe.optim import dense_parameters, sparse_parameters

_run_ids = itertools.count()


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """The models here are tiny: one thread is faster, and immune to a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_args(tmp_path, **values) -> TrainingArguments:
    """Quiet arguments with an output_dir of its own (a trainer resumes from it)."""
    values.setdefault("output_dir", str(tmp_path / f"run{next(_run_ids)}"))
    values.setdefault("report_to", "none")
    values.setdefault("disable_tqdm", True)
    values.setdefault("log_steps", 1000)
    return TrainingArguments(**values)


def indexed_batches(n: int, batch_size: int = 8, seed: int = 0) -> list[dict]:
    """`make_batches` plus an ``idx`` entry telling which batch the model got."""
    batches = make_batches(n, batch_size, seed=seed)
    for i, batch in enumerate(batches):
        batch["idx"] = torch.full((batch_size,), i)
    return batches


class RecordingCTR(ToyCTR):
    """ToyCTR that records the batches it trains on; training forward number ``n``
    (1-based) in ``bad_calls`` returns ``loss * bad_value`` (NaN/inf)."""

    def __init__(self, bad_calls=(), bad_value=float("nan"), **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[int] = []
        self.autocast_seen: list[bool] = []
        self.bad_calls = set(bad_calls)
        self.bad_value = bad_value

    def forward(self, batch):
        loss = super().forward(batch)
        if self.training:
            self.seen.append(int(batch["idx"][0]))
            self.autocast_seen.append(torch.is_autocast_enabled("cpu"))
            if len(self.seen) in self.bad_calls:
                loss = loss * self.bad_value
        return loss


class EventRecorder(Hook):
    """Records every loop event (checkpoint events aside), step and eval metrics."""

    def __init__(self, priority: int = 0) -> None:
        self.priority = priority
        self.events: list[str] = []
        self.step_metrics: list[dict] = []
        self.eval_metrics: list[dict] = []
        self.train_mode_at_step: list[bool] = []

    def before_train(self, trainer):
        self.events.append("before_train")

    def before_epoch(self, trainer):
        self.events.append("before_epoch")

    def before_step(self, trainer):
        self.events.append("before_step")
        self.train_mode_at_step.append(trainer.model.training)

    def after_step(self, trainer, metrics):
        self.events.append("after_step")
        self.step_metrics.append(dict(metrics))

    def after_epoch(self, trainer):
        self.events.append("after_epoch")

    def after_train(self, trainer):
        self.events.append("after_train")

    def before_evaluate(self, trainer):
        self.events.append("before_evaluate")

    def after_evaluate(self, trainer, metrics):
        self.events.append("after_evaluate")
        self.eval_metrics.append(dict(metrics))

    def end(self, trainer):
        self.events.append("end")


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# --- step counting --------------------------------------------------------------------
def test_train_steps_is_exact_and_a_second_call_continues(tmp_path):
    model = RecordingCTR()
    batches = indexed_batches(20)
    trainer = Trainer(model, make_args(tmp_path), train_dataset=batches)
    state = trainer.train(train_steps=7)
    assert trainer.global_step == state["global_step"] == 7
    assert trainer.state.micro_step == 7
    assert trainer.state.samples_seen == 7 * 8
    assert model.seen == list(range(7))

    trainer.train(train_steps=12)
    assert trainer.global_step == 12
    assert model.seen == list(range(12))  # batches 7..11, none repeated or skipped

    trainer.train(train_steps=10)  # already past: nothing to do
    assert trainer.global_step == 12
    assert model.seen == list(range(12))


def test_args_train_steps_counts_updates_not_micro_batches(tmp_path):
    model = RecordingCTR()
    trainer = Trainer(
        model,
        make_args(tmp_path, train_steps=3, gradient_accumulation_steps=2),
        train_dataset=indexed_batches(10),
    )
    trainer.train()
    assert trainer.global_step == 3
    assert trainer.state.micro_step == 6
    assert model.seen == list(range(6))


def test_train_steps_past_the_data_wraps_into_new_epochs(tmp_path):
    model = RecordingCTR()
    trainer = Trainer(model, make_args(tmp_path), train_dataset=indexed_batches(5))
    trainer.train(train_steps=12)
    assert trainer.global_step == 12
    assert model.seen == [0, 1, 2, 3, 4] * 2 + [0, 1]
    assert trainer.state.epoch == 2
    assert trainer.state.epoch_batches == 2


def test_train_epochs_without_train_steps(tmp_path):
    model = RecordingCTR()
    trainer = Trainer(model, make_args(tmp_path, train_epoch=3), train_dataset=indexed_batches(4))
    trainer.train()
    assert trainer.global_step == 12
    assert trainer.state.epoch == 3
    assert trainer.state.max_steps == 12
    assert model.seen == [0, 1, 2, 3] * 3


def test_max_steps_estimate_after_a_mid_epoch_stop(tmp_path):
    trainer = Trainer(RecordingCTR(), make_args(tmp_path), train_dataset=indexed_batches(10))
    trainer.train(train_steps=5)
    trainer.train()  # finish epoch 0
    assert trainer.global_step == 10
    assert trainer.state.max_steps == trainer.global_step


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_train_rejects_a_bad_step_count(tmp_path, bad):
    trainer = Trainer(ToyCTR(), make_args(tmp_path), train_dataset=make_batches(2, 4))
    with pytest.raises(ValueError, match="train_steps"):
        trainer.train(train_steps=bad)
    assert trainer.global_step == 0


# --- hook events ----------------------------------------------------------------------
def test_hooks_see_every_event_in_loop_order(tmp_path):
    rec = EventRecorder()
    args = make_args(tmp_path, eval_interval_steps=2)
    trainer = Trainer(
        ToyCTR(), args, train_dataset=make_batches(3, 8), eval_dataset=make_batches(2, 8, seed=5),
        hooks=[rec],
    )
    trainer.train()
    assert rec.events == [
        "before_train",
        "before_epoch",
        "before_step", "after_step",
        "before_step", "after_step",
        "before_evaluate", "after_evaluate",  # eval_interval_steps=2
        "before_step", "after_step",
        "after_epoch",
        "after_train",
        "end",
    ]
    assert [m["samples"] for m in rec.step_metrics] == [8, 8, 8]
    assert rec.eval_metrics[0]["num_samples"] == 16
    # training went back to train mode after the evaluation in between
    assert rec.train_mode_at_step == [True, True, True]


def test_every_epoch_gets_its_own_before_and_after_epoch(tmp_path):
    rec = EventRecorder()
    trainer = Trainer(
        ToyCTR(), make_args(tmp_path, train_epoch=2), train_dataset=make_batches(2, 4), hooks=[rec]
    )
    trainer.train()
    assert rec.events == (
        ["before_train"]
        + ["before_epoch", "before_step", "after_step", "before_step", "after_step",
           "after_epoch"] * 2
        + ["after_train", "end"]
    )


def test_end_fires_once_per_outermost_call(tmp_path):
    rec = EventRecorder()
    trainer = Trainer(
        ToyCTR(), make_args(tmp_path), train_dataset=make_batches(2, 4),
        eval_dataset=make_batches(1, 4), hooks=[rec],
    )
    trainer.train()
    assert rec.events.count("end") == 1
    trainer.evaluate()
    assert rec.events.count("end") == 2
    assert rec.events[-3:] == ["before_evaluate", "after_evaluate", "end"]
    trainer.train_and_evaluate(epochs=2)
    assert rec.events.count("end") == 3
    assert rec.events[-1] == "end"


def test_end_fires_once_when_training_evaluates_inside(tmp_path):
    class EvaluateFromHook(Hook):
        def after_step(self, trainer, metrics):
            if trainer.global_step == 1:
                trainer.evaluate()  # a nested public call

    rec = EventRecorder()
    trainer = Trainer(
        ToyCTR(), make_args(tmp_path, eval_interval_steps=2), train_dataset=make_batches(4, 4),
        eval_dataset=make_batches(1, 4), hooks=[rec, EvaluateFromHook()],
    )
    trainer.train()
    assert rec.events.count("before_evaluate") == 3  # steps 1 (nested), 2 and 4
    assert rec.events.count("end") == 1
    assert rec.events[-1] == "end"


def test_end_still_fires_when_a_hook_raises(tmp_path):
    class Boom(Hook):
        def after_step(self, trainer, metrics):
            if trainer.global_step == 2:
                raise RuntimeError("kaboom")

    rec = EventRecorder()
    trainer = Trainer(
        ToyCTR(), make_args(tmp_path), train_dataset=make_batches(5, 4), hooks=[Boom(), rec]
    )
    with pytest.raises(HookError) as info:
        trainer.train()
    message = str(info.value)
    assert "Boom" in message and "after_step" in message and "kaboom" in message
    assert isinstance(info.value.__cause__, RuntimeError)
    assert trainer.global_step == 2
    assert rec.events.count("end") == 1
    assert "after_train" not in rec.events


def test_hooks_run_in_priority_order(tmp_path):
    order: list[str] = []

    class Named(Hook):
        def __init__(self, name: str, priority: int) -> None:
            self.label = name
            self.priority = priority

        def before_train(self, trainer):
            order.append(self.label)

    hooks = [Named("a", 5), Named("b", -1), Named("c", 0), Named("d", 0), Named("e", 3)]
    trainer = Trainer(ToyCTR(), make_args(tmp_path), train_dataset=make_batches(1, 4), hooks=hooks)
    trainer.add_hook(Named("f", -1))  # ties keep insertion order: after b
    trainer.train()
    assert order == ["b", "f", "c", "d", "e", "a"]


def test_add_hook_and_add_hooks(tmp_path):
    first, second, third = EventRecorder(), EventRecorder(), EventRecorder()
    trainer = Trainer(ToyCTR(), make_args(tmp_path), train_dataset=make_batches(2, 4))
    trainer.add_hook(first)
    trainer.add_hooks([second, third])
    trainer.add_hooks(h for h in [])  # any iterable
    trainer.train()
    for rec in (first, second, third):
        assert rec.events.count("after_step") == 2
        assert rec.events.count("end") == 1


@pytest.mark.parametrize("bad", [object(), lambda trainer: None, "LoggerHook", Hook])
def test_a_non_hook_is_a_type_error(tmp_path, bad):
    with pytest.raises(TypeError, match="Hook"):
        Trainer(ToyCTR(), make_args(tmp_path), train_dataset=make_batches(1, 4), hooks=[bad])
    trainer = Trainer(ToyCTR(), make_args(tmp_path), train_dataset=make_batches(1, 4))
    with pytest.raises(TypeError, match="Hook"):
        trainer.add_hook(bad)
    with pytest.raises(TypeError, match="Hook"):
        trainer.add_hooks([EventRecorder(), bad])


def test_a_raising_hook_is_named_in_the_error(tmp_path):
    class Picky(Hook):
        def before_train(self, trainer):
            raise KeyError("missing thing")

    trainer = Trainer(
        ToyCTR(), make_args(tmp_path), train_dataset=make_batches(2, 4), hooks=[Picky()]
    )
    with pytest.raises(HookError, match=r"Picky.*before_train.*missing thing"):
        trainer.train()
    assert trainer.global_step == 0


# --- control flags --------------------------------------------------------------------
def test_should_stop_from_a_hook_stops_at_that_step(tmp_path):
    class StopAt(Hook):
        def after_step(self, trainer, metrics):
            if trainer.global_step == 3:
                trainer.control.should_stop = True

    rec = EventRecorder()
    model = RecordingCTR()
    trainer = Trainer(
        model, make_args(tmp_path), train_dataset=indexed_batches(10), hooks=[StopAt(), rec]
    )
    trainer.train(train_steps=8)
    assert trainer.global_step == 3
    assert model.seen == [0, 1, 2]
    assert rec.events[-2:] == ["after_train", "end"]
    assert "after_epoch" not in rec.events

    # the stop sticks (it is checkpointed: see test_stopping.py) for a target that is
    # not larger than the stopped call's; a larger one continues on purpose
    trainer.train(train_steps=5)
    assert trainer.global_step == 3
    trainer.train(train_steps=9)
    assert trainer.global_step == 9
    assert model.seen == list(range(9))


def test_should_evaluate_from_a_hook_triggers_one_evaluation(tmp_path):
    class EvalAt(Hook):
        def after_step(self, trainer, metrics):
            if trainer.global_step == 2:
                trainer.control.should_evaluate = True

    rec = EventRecorder()
    trainer = Trainer(
        ToyCTR(), make_args(tmp_path), train_dataset=make_batches(4, 4),
        eval_dataset=make_batches(2, 4, seed=3), hooks=[EvalAt(), rec],
    )
    trainer.train()
    steps_and_evals = [e for e in rec.events if e in ("after_step", "after_evaluate")]
    assert steps_and_evals == ["after_step", "after_step", "after_evaluate", "after_step",
                               "after_step"]
    assert trainer.control.should_evaluate is False
    assert trainer.state.last_eval == rec.eval_metrics[0]


# --- evaluation -----------------------------------------------------------------------
def _reference_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Probability that a positive outranks a negative (ties count half)."""
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (pos.numel() * neg.numel()))


def test_evaluate_matches_a_hand_computation(tmp_path):
    torch.manual_seed(0)
    model = ToyCTR()
    evals = make_batches(2, 16, seed=7) + make_batches(1, 8, seed=8)  # uneven sizes
    trainer = Trainer(
        model, make_args(tmp_path), train_dataset=make_batches(3, 16), eval_dataset=evals
    )
    trainer.train()
    before = _params(model)

    results = trainer.evaluate()
    assert {"loss", "auc", "logloss", "num_samples"} <= set(results)
    assert results["num_samples"] == 40

    model.eval()
    with torch.no_grad():
        logits = [model.mlp(torch.cat([model.emb(b["ids"]), b["dense"]], 1)).squeeze(1)
                  for b in evals]
        losses = [float(model(b)) for b in evals]
    logits_all = torch.cat(logits).double()
    labels_all = torch.cat([b["label"] for b in evals]).double()
    expected_loss = sum(loss * len(b["label"]) for loss, b in zip(losses, evals)) / 40
    assert results["loss"] == pytest.approx(expected_loss, rel=1e-6)
    expected_logloss = float(
        nn.functional.binary_cross_entropy_with_logits(logits_all, labels_all)
    )
    assert results["logloss"] == pytest.approx(expected_logloss, rel=1e-6)
    assert results["auc"] == pytest.approx(_reference_auc(logits_all, labels_all), abs=1e-6)

    assert _same(before, _params(model))  # evaluation does not train
    assert trainer.state.last_eval == results


def test_evaluate_restores_the_models_mode(tmp_path):
    model = ToyCTR()
    trainer = Trainer(model, make_args(tmp_path), eval_dataset=make_batches(1, 8))
    model.train()
    trainer.evaluate()
    assert model.training
    model.eval()
    trainer.evaluate()
    assert not model.training


def test_eval_steps_limits_the_batches(tmp_path):
    rec = EventRecorder()
    evals = make_batches(5, 8, seed=2)
    trainer = Trainer(
        ToyCTR(), make_args(tmp_path, eval_steps=2, eval_interval_steps=1),
        train_dataset=make_batches(1, 8), eval_dataset=evals, hooks=[rec],
    )
    assert trainer.evaluate(eval_steps=3)["num_samples"] == 24
    assert trainer.evaluate(eval_steps=99)["num_samples"] == 40
    assert trainer.evaluate()["num_samples"] == 16  # None: args.eval_steps (2 batches)
    trainer.train()
    # evaluations inside train() use args.eval_steps
    assert rec.eval_metrics[-1]["num_samples"] == 16


def test_evaluating_twice_gives_identical_results(tmp_path):
    trainer = Trainer(
        ToyCTR(), make_args(tmp_path), train_dataset=make_batches(2, 8),
        eval_dataset=make_batches(3, 8, seed=4),
    )
    trainer.train()
    assert trainer.evaluate() == trainer.evaluate()


def test_evaluate_without_labels_in_both_classes_has_no_auc(tmp_path):
    batch = make_batches(1, 8)[0]
    batch["label"] = torch.ones(8)
    results = Trainer(ToyCTR(), make_args(tmp_path), eval_dataset=[batch]).evaluate()
    assert "auc" not in results
    assert results["num_samples"] == 8


# --- non-finite losses ----------------------------------------------------------------
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_loss_raise_names_the_step(tmp_path, bad_value):
    model = RecordingCTR(bad_calls={3}, bad_value=bad_value)
    snapshots = {}

    class Snapshot(Hook):
        def after_step(self, trainer, metrics):
            snapshots[trainer.global_step] = _params(trainer.model)

    trainer = Trainer(
        model, make_args(tmp_path), train_dataset=indexed_batches(6), hooks=[Snapshot()]
    )
    with pytest.raises(FloatingPointError, match=r"step 3\b"):
        trainer.train()
    assert trainer.global_step == 2
    assert _same(snapshots[2], _params(model))  # the bad update was not applied


def test_nonfinite_loss_raise_names_step_and_micro_batch_with_accumulation(tmp_path):
    model = RecordingCTR(bad_calls={5})  # update 3, micro-batch 1 of 2
    trainer = Trainer(
        model, make_args(tmp_path, gradient_accumulation_steps=2),
        train_dataset=indexed_batches(8),
    )
    with pytest.raises(FloatingPointError, match=r"step 3 \(micro-batch 1 of 2"):
        trainer.train()


def test_nonfinite_loss_skip_drops_only_that_update(tmp_path, caplog):
    model = RecordingCTR(bad_calls={3})
    before_step: dict[int, dict] = {}
    changed: dict[int, bool] = {}

    class Watch(Hook):
        def before_step(self, trainer):
            before_step[trainer.global_step + 1] = _params(trainer.model)

        def after_step(self, trainer, metrics):
            step = trainer.global_step
            changed[step] = not _same(before_step[step], _params(trainer.model))

    rec = EventRecorder()
    dense_opt = torch.optim.AdamW(dense_parameters(model), lr=1e-2)
    sparse_opt = torch.optim.SGD(sparse_parameters(model), lr=0.1)
    trainer = Trainer(
        model, make_args(tmp_path, nonfinite_loss="skip"), train_dataset=indexed_batches(6),
        hooks=[Watch(), rec], dense_optimizers=(dense_opt, None), sparse_optimizer=sparse_opt,
    )
    trainer.train()
    assert trainer.global_step == 6  # training went on
    assert changed == {1: True, 2: True, 3: False, 4: True, 5: True, 6: True}
    assert trainer.state.skipped_updates == 1
    assert rec.step_metrics[2]["skipped_updates"] == 1
    assert "skipped_updates" not in rec.step_metrics[1]
    # AdamW took 5 steps, not 6: the skipped update never reached the optimizer
    assert all(int(s["step"]) == 5 for s in dense_opt.state.values())
    # no NaN gradient leaked into later updates
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any("non-finite loss at step 3" in r.getMessage() for r in caplog.records)


def test_nonfinite_loss_skip_counts_every_skipped_update(tmp_path):
    model = RecordingCTR(bad_calls={1, 4, 5})
    trainer = Trainer(
        model, make_args(tmp_path, nonfinite_loss="skip"), train_dataset=indexed_batches(6)
    )
    trainer.train()
    assert trainer.state.skipped_updates == 3
    assert trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- metrics and custom steps ---------------------------------------------------------
class MetricCTR(ToyCTR):
    """Reports metrics through recframe.add_metric from inside forward."""

    def forward(self, batch):
        if self.training:
            recframe.add_metric("pos_rate", batch["label"].mean())
        else:
            recframe.add_metric("eval_only", 1.0)
        return super().forward(batch)


def test_add_metric_from_model_code_reaches_after_step(tmp_path):
    rec = EventRecorder()
    batches = make_batches(4, 8)
    trainer = Trainer(
        MetricCTR(), make_args(tmp_path, eval_interval_steps=2), train_dataset=batches,
        eval_dataset=make_batches(1, 8, seed=9), hooks=[rec],
    )
    trainer.train()
    assert len(rec.step_metrics) == 4
    for metrics, batch in zip(rec.step_metrics, batches):
        assert float(metrics["pos_rate"]) == pytest.approx(float(batch["label"].mean()))
        # metrics recorded during an evaluation do not leak into training steps
        assert "eval_only" not in metrics
    assert recframe.get_global_metrics() == {}


def test_metrics_updated_in_a_custom_train_step_reach_after_step(tmp_path):
    class Custom(Trainer):
        def _train_step(self, data, epoch, metrics):
            metrics.update(epoch=epoch, batch_rows=len(data["label"]))
            super()._train_step(data, epoch, metrics)

    rec = EventRecorder()
    trainer = Custom(
        ToyCTR(), make_args(tmp_path, train_epoch=2), train_dataset=make_batches(2, 6),
        hooks=[rec],
    )
    trainer.train()
    assert [m["epoch"] for m in rec.step_metrics] == [0, 0, 1, 1]
    assert all(m["batch_rows"] == 6 for m in rec.step_metrics)
    assert all(torch.isfinite(m["loss"]) for m in rec.step_metrics)


def test_a_train_step_that_never_records_the_loss_warns_once_and_trains(tmp_path, caplog):
    class NoLoss(Trainer):
        def _train_step(self, data, epoch, metrics):
            self.dense_optimizer.zero_grad()
            self.sparse_optimizer.zero_grad()
            self.model(data).backward()
            self.dense_optimizer.step()
            self.sparse_optimizer.step()

    model = ToyCTR()
    before = _params(model)
    rec = EventRecorder()
    trainer = NoLoss(model, make_args(tmp_path), train_dataset=make_batches(4, 8), hooks=[rec])
    with caplog.at_level(logging.WARNING, logger="recframe"):
        trainer.train()
    assert trainer.global_step == 4
    assert not _same(before, _params(model))
    warnings = [r for r in caplog.records if "did not record the loss" in r.getMessage()]
    assert len(warnings) == 1
    assert all("loss" not in m for m in rec.step_metrics)


def test_a_train_step_that_never_steps_an_optimizer_warns(tmp_path, caplog):
    class NoDenseStep(Trainer):
        def _train_step(self, data, epoch, metrics):
            loss = self.model(data)
            metrics.update(loss=loss)
            loss.backward()
            self.sparse_optimizer.step()

    model = ToyCTR()
    dense_before = [p.detach().clone() for p in dense_parameters(model)]
    trainer = NoDenseStep(model, make_args(tmp_path), train_dataset=make_batches(3, 8))
    trainer.train()
    assert trainer.global_step == 3
    assert all(torch.equal(a, b) for a, b in zip(dense_before, dense_parameters(model)))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("never called dense_optimizer.step()" in m for m in messages) == 1


# --- gradient clipping and bf16 -------------------------------------------------------
def test_max_grad_norm_clips_and_reports_the_norm(tmp_path):
    torch.manual_seed(0)
    model = ToyCTR(sparse=False)
    batch = make_batches(1, 16, seed=3)[0]

    reference = copy.deepcopy(model)
    reference(batch).backward()
    grads = [p.grad for p in dense_parameters(reference)]
    true_norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    assert true_norm > 1e-2  # so that 1e-3 clips

    before = [p.detach().clone() for p in dense_parameters(model)]
    rec = EventRecorder()
    dense_opt = torch.optim.SGD(dense_parameters(model), lr=1.0)
    sparse_opt = torch.optim.SGD(sparse_parameters(model), lr=0.0)
    trainer = Trainer(
        model, make_args(tmp_path, max_grad_norm=1e-3), train_dataset=[batch], hooks=[rec],
        dense_optimizers=(dense_opt, None), sparse_optimizer=sparse_opt,
    )
    trainer.train()
    assert float(rec.step_metrics[0]["grad_norm"]) == pytest.approx(true_norm, rel=1e-5)
    # SGD(lr=1) moved the dense parameters by the clipped gradient: norm 1e-3
    moved = torch.cat([(b - a.detach()).reshape(-1)
                       for a, b in zip(dense_parameters(model), before)])
    assert float(moved.norm()) == pytest.approx(1e-3, rel=1e-4)


def test_no_grad_norm_metric_without_max_grad_norm(tmp_path):
    rec = EventRecorder()
    Trainer(ToyCTR(), make_args(tmp_path), train_dataset=make_batches(2, 8), hooks=[rec]).train()
    assert all("grad_norm" not in m for m in rec.step_metrics)


def test_a_skipped_update_reports_no_stale_grad_norm(tmp_path):
    rec = EventRecorder()
    model = RecordingCTR(bad_calls={2})
    Trainer(
        model, make_args(tmp_path, max_grad_norm=1.0, nonfinite_loss="skip"),
        train_dataset=indexed_batches(3), hooks=[rec],
    ).train()
    assert "grad_norm" in rec.step_metrics[0]
    assert "grad_norm" not in rec.step_metrics[1]


def test_bf16_trains_on_cpu(tmp_path):
    torch.manual_seed(0)
    model = RecordingCTR()
    before = _params(model)
    rec = EventRecorder()
    trainer = Trainer(
        model, make_args(tmp_path, bf16=True, device="cpu"), train_dataset=indexed_batches(4),
        eval_dataset=make_batches(2, 8, seed=1), hooks=[rec],
    )
    trainer.train()
    assert trainer.global_step == 4
    assert model.autocast_seen == [True] * 4  # the step ran under autocast
    assert all(torch.isfinite(m["loss"]) for m in rec.step_metrics)
    assert not _same(before, _params(model))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    results = trainer.evaluate()
    assert torch.isfinite(torch.tensor(results["loss"]))


def test_without_bf16_no_autocast(tmp_path):
    model = RecordingCTR()
    Trainer(model, make_args(tmp_path), train_dataset=indexed_batches(2)).train()
    assert model.autocast_seen == [False, False]


# --- datasets -------------------------------------------------------------------------
def test_a_dataloader_works_as_train_dataset(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    batches = make_batches(1, 40, seed=11)[0]
    tensors = TensorDataset(batches["ids"], batches["dense"], batches["label"], torch.arange(40))

    def collate(rows):
        ids, dense, label, row = (torch.stack(col) for col in zip(*rows))
        return {"ids": ids, "dense": dense, "label": label, "idx": row // 8}

    loader = DataLoader(tensors, batch_size=8, shuffle=False, collate_fn=collate)
    model = RecordingCTR()
    rec = EventRecorder()
    trainer = Trainer(
        model, make_args(tmp_path, train_epoch=2), train_dataset=loader,
        eval_dataset=loader, hooks=[rec],
    )
    trainer.train(train_steps=3)
    assert model.seen == [0, 1, 2]
    trainer.train()  # finish the 2 epochs: a re-iterable loader resumes at batch 3
    assert trainer.global_step == 10
    assert trainer.state.epoch == 2
    assert model.seen == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert sum(m["samples"] for m in rec.step_metrics) == 80
    assert trainer.evaluate()["num_samples"] == 40


def test_a_one_shot_generator_stops_with_a_warning(tmp_path, caplog):
    model = RecordingCTR()
    batches = indexed_batches(5)
    trainer = Trainer(model, make_args(tmp_path), train_dataset=(b for b in batches))
    with caplog.at_level(logging.WARNING, logger="recframe"):
        trainer.train(train_steps=50)
    assert trainer.global_step == 5
    assert model.seen == [0, 1, 2, 3, 4]
    assert any("yielded no batches" in r.getMessage() for r in caplog.records)


def test_a_one_shot_iterator_continues_across_train_calls(tmp_path):
    model = RecordingCTR()
    trainer = Trainer(model, make_args(tmp_path), train_dataset=iter(indexed_batches(10)))
    trainer.train(train_steps=3)
    trainer.train(train_steps=6)
    assert trainer.global_step == 6
    assert len(set(model.seen)) == 6  # nothing trained twice


def test_an_empty_train_dataset_is_an_error(tmp_path):
    trainer = Trainer(ToyCTR(), make_args(tmp_path), train_dataset=[])
    with pytest.raises(ValueError, match="no batches"):
        trainer.train()


def test_an_empty_eval_dataset_is_an_error(tmp_path):
    trainer = Trainer(ToyCTR(), make_args(tmp_path), eval_dataset=[])
    with pytest.raises(ValueError, match="no batches"):
        trainer.evaluate()


def test_missing_datasets_are_errors(tmp_path):
    trainer = Trainer(ToyCTR(), make_args(tmp_path))
    with pytest.raises(ValueError, match="train_dataset"):
        trainer.train()
    with pytest.raises(ValueError, match="eval_dataset"):
        trainer.evaluate()
    with pytest.raises(ValueError, match="train_dataset"):
        trainer.train_and_evaluate()


# --- constructor validation -----------------------------------------------------------
def test_constructor_type_errors(tmp_path):
    with pytest.raises(TypeError, match="nn.Module"):
        Trainer(lambda batch: batch, make_args(tmp_path))
    with pytest.raises(TypeError, match="TrainingArguments"):
        Trainer(ToyCTR(), {"output_dir": str(tmp_path)})


def _bad_pairs():
    model = ToyCTR()
    opt = torch.optim.SGD(dense_parameters(model), lr=0.1)
    return [opt, (opt,), (opt, None, None), None, "adam"]


@pytest.mark.parametrize("pair", _bad_pairs(), ids=["optimizer", "1-tuple", "3-tuple", "none",
                                                    "str"])
def test_bad_dense_optimizers_shape_is_a_type_error(tmp_path, pair):
    with pytest.raises(TypeError, match="dense_optimizers"):
        Trainer(ToyCTR(), make_args(tmp_path), dense_optimizers=pair)


def test_a_parameter_in_both_optimizers_is_an_error(tmp_path):
    model = ToyCTR()
    dense = torch.optim.AdamW(model.parameters(), lr=1e-3)  # embedding included
    sparse = torch.optim.SGD(sparse_parameters(model), lr=0.1)
    with pytest.raises(ValueError, match="both"):
        Trainer(model, make_args(tmp_path), dense_optimizers=(dense, None),
                sparse_optimizer=sparse)


def test_default_optimizers_cover_dense_and_sparse_parameters(tmp_path):
    model = ToyCTR()
    before = _params(model)
    trainer = Trainer(model, make_args(tmp_path), train_dataset=make_batches(2, 8))
    trainer.train()
    after = _params(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every tensor trained
    assert isinstance(trainer.dense_optimizer.optimizer, torch.optim.AdamW)
    from recframe.optim.sparse import RowWiseAdagrad

    assert isinstance(trainer.sparse_optimizer.optimizer, RowWiseAdagrad)


# --- SyntheticCriteo + DLRM -----------------------------------------------------------
class DenseOnlyCTR(nn.Module):
    """A cheap model over `Batch` objects (dense features only)."""

    def __init__(self, num_dense: int) -> None:
        super().__init__()
        self.linear = nn.Linear(num_dense, 1)
        self.fingerprints: list[float] = []

    def forward(self, batch):
        if self.training:
            self.fingerprints.append(float(batch.dense_features.sum()))
        logits = self.linear(batch.dense_features).squeeze(-1)
        recframe.add_predictions(logits, batch.labels)
        return nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)


def _synthetic(num_batches: int, seed: int = 0, batch_size: int = 8):
    return data.SyntheticCriteo(
        num_batches=num_batches, batch_size=batch_size, num_dense=3, num_sparse=2,
        num_embeddings=20, seed=seed,
    )


def _fingerprint(batch) -> float:
    return float(batch.dense_features.sum())


@pytest.mark.parametrize("accumulation,prefetch", [(1, 1), (2, 1), (1, 3), (3, 2)])
def test_stateful_dataset_points_at_the_next_untrained_batch(tmp_path, accumulation, prefetch):
    dataset = _synthetic(20)
    expected = [_fingerprint(dataset.generate(i)) for i in range(20)]
    model = DenseOnlyCTR(3)
    trainer = Trainer(
        model,
        make_args(tmp_path, gradient_accumulation_steps=accumulation,
                  dataloader_prefetch=prefetch),
        train_dataset=dataset,
    )
    trainer.train(train_steps=2)
    consumed = 2 * accumulation
    assert model.fingerprints == expected[:consumed]
    # the look-ahead batches were put back: the dataset resumes right after the last
    # trained batch, and the trainer's recorded position agrees
    assert dataset.state_dict()["next_batch"] == consumed
    assert trainer.data_position == dataset.state_dict()
    assert _fingerprint(next(iter(dataset))) == expected[consumed]
    dataset.load_state_dict(trainer.data_position)

    trainer.train(train_steps=4)
    assert model.fingerprints == expected[: 4 * accumulation]
    assert dataset.state_dict()["next_batch"] == 4 * accumulation


def test_stateful_dataset_after_a_full_epoch_starts_the_next(tmp_path):
    dataset = _synthetic(4)
    model = DenseOnlyCTR(3)
    trainer = Trainer(model, make_args(tmp_path), train_dataset=dataset)
    trainer.train()
    assert trainer.state.epoch == 1
    assert dataset.state_dict()["epoch"] == 1
    assert dataset.state_dict()["next_batch"] == 0
    trainer.train(train_steps=6)
    assert model.fingerprints[4:] == model.fingerprints[:2]


def test_should_stop_mid_epoch_puts_stateful_look_ahead_back(tmp_path):
    class StopAt(Hook):
        def after_step(self, trainer, metrics):
            if trainer.global_step == 3:
                trainer.control.should_stop = True

    dataset = _synthetic(10)
    trainer = Trainer(
        DenseOnlyCTR(3), make_args(tmp_path, dataloader_prefetch=2), train_dataset=dataset,
        hooks=[StopAt()],
    )
    trainer.train()
    assert trainer.global_step == 3
    assert dataset.state_dict()["next_batch"] == 3


def test_should_stop_before_the_first_batch_leaves_the_dataset_in_place(tmp_path):
    class StopInBeforeEpoch(Hook):
        def before_epoch(self, trainer):
            trainer.control.should_stop = True

    dataset = _synthetic(10)
    trainer = Trainer(
        DenseOnlyCTR(3), make_args(tmp_path), train_dataset=dataset,
        hooks=[StopInBeforeEpoch()],
    )
    trainer.train()
    assert trainer.global_step == 0
    assert dataset.state_dict()["next_batch"] == 0


def test_stateful_eval_dataset_rewinds_between_evaluations(tmp_path):
    evals = _synthetic(3, seed=1)
    trainer = Trainer(
        DenseOnlyCTR(3), make_args(tmp_path, eval_interval_steps=2),
        train_dataset=_synthetic(4), eval_dataset=evals,
    )
    first = trainer.evaluate()
    assert evals.state_dict()["next_batch"] == 0
    assert trainer.evaluate() == first
    # a partial evaluation also leaves the eval set at its start
    assert trainer.evaluate(eval_steps=1)["num_samples"] == 8
    assert trainer.evaluate() == first
    trainer.train()  # evaluates at steps 2 and 4 on the same 24 samples
    assert trainer.state.last_eval["num_samples"] == 24


def test_dlrm_learns_synthetic_criteo(tmp_path):
    models = pytest.importorskip("recframe.models")
    torch.manual_seed(0)
    num_sparse = 6
    train = data.SyntheticCriteo(
        num_batches=150, batch_size=64, num_sparse=num_sparse, num_embeddings=40, seed=0
    )
    evals = data.SyntheticCriteo(
        num_batches=2, batch_size=256, num_sparse=num_sparse, num_embeddings=40, seed=1
    )
    model = models.DLRM(
        num_embeddings=40, embedding_dim=8, sparse_features=data.cat_feature_names(num_sparse),
        dense_arch=(16, 8), over_arch=(16, 1),
    )
    trainer = Trainer(
        model, make_args(tmp_path), train_dataset=train, eval_dataset=evals,
        dense_optimizers=(torch.optim.Adam(dense_parameters(model), lr=3e-3), None),
        sparse_optimizer=torch.optim.Adagrad(sparse_parameters(model), lr=0.1),
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert trainer.global_step == 150
    assert after["num_samples"] == 512
    assert after["auc"] > 0.6
    assert after["auc"] > before["auc"]
    assert after["loss"] < before["loss"]


def test_evaluate_uses_args_eval_steps_by_default(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), eval_steps=2, report_to="none",
                             disable_tqdm=True)
    trainer = Trainer(ToyCTR(), args, eval_dataset=make_batches(10, 8))
    assert trainer.evaluate()["num_samples"] == 16
    assert trainer.evaluate(eval_steps=3)["num_samples"] == 24
