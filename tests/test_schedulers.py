"""LR schedulers that step on a metric (``ReduceLROnPlateau``): stepped once per
evaluation during training with ``metric_for_scheduler``, checkpointed, and refused
without an evaluation dataset."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyCTR, make_batches

from recframe import Hook, Trainer, TrainingArguments
from recframe.optim import dense_parameters
from recframe.optim.core import steps_on_metric


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class RecordingPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.metrics_seen: list[float] = []

    def step(self, metrics, epoch=None):  # noqa: D102
        self.metrics_seen.append(float(metrics))
        super().step(metrics, epoch)


class EvalRecorder(Hook):
    def __init__(self) -> None:
        self.evals: list[dict] = []

    def after_evaluate(self, trainer, metrics):
        self.evals.append(dict(metrics))


def build(path, scheduler_cls=RecordingPlateau, sched_kwargs=None, hooks=(), eval_data=True,
          **values):
    torch.manual_seed(0)
    model = ToyCTR()
    dense = torch.optim.Adam(dense_parameters(model), lr=0.05)
    sched = scheduler_cls(dense, **(sched_kwargs or {"mode": "min", "factor": 0.5,
                                                     "patience": 0}))
    values.setdefault("report_to", "none")
    values.setdefault("disable_tqdm", True)
    values.setdefault("log_steps", 1000)
    args = TrainingArguments(output_dir=str(path), **values)
    trainer = Trainer(model, args, train_dataset=make_batches(16, 8),
                      eval_dataset=make_batches(2, 8, seed=5) if eval_data else None,
                      dense_optimizers=(dense, sched), hooks=list(hooks))
    return trainer, sched


def test_plateau_steps_once_per_round_evaluation_on_the_eval_loss(tmp_path):
    rec = EvalRecorder()
    trainer, sched = build(tmp_path / "run", hooks=[rec])
    trainer.train_and_evaluate(epochs=3, train_steps=2)  # crashed at the first update before
    assert trainer.global_step == 6
    assert sched.metrics_seen == [e["loss"] for e in rec.evals]
    assert len(sched.metrics_seen) == 3


def test_plateau_reduces_the_learning_rate_the_loop_uses(tmp_path):
    # mode="max" on a loss that falls: every evaluation is "no improvement"
    trainer, sched = build(tmp_path / "run",
                           sched_kwargs={"mode": "max", "factor": 0.5, "patience": 0})
    trainer.train_and_evaluate(epochs=3, train_steps=2)
    assert len(sched.metrics_seen) == 3
    lr = trainer.dense_optimizer.optimizer.param_groups[0]["lr"]
    assert lr == pytest.approx(0.05 * 0.5 ** 2)  # the first evaluation only sets `best`


def test_metric_for_scheduler_picks_the_metric(tmp_path):
    rec = EvalRecorder()
    trainer, sched = build(tmp_path / "run", hooks=[rec], metric_for_scheduler="auc",
                           sched_kwargs={"mode": "max"})
    trainer.train_and_evaluate(epochs=2, train_steps=2)
    assert sched.metrics_seen == [e["auc"] for e in rec.evals]


def test_interval_evaluations_step_it_and_a_standalone_evaluate_does_not(tmp_path):
    trainer, sched = build(tmp_path / "run", eval_interval_steps=2)
    trainer.train(train_steps=6)
    assert len(sched.metrics_seen) == 3
    trainer.evaluate()
    assert len(sched.metrics_seen) == 3


def test_train_without_interval_evaluations_warns(tmp_path, caplog):
    trainer, sched = build(tmp_path / "run")
    trainer.train(train_steps=2)
    assert sched.metrics_seen == []
    assert "eval_interval_steps" in caplog.text and "RecordingPlateau" in caplog.text


def test_a_plateau_scheduler_without_eval_dataset_is_an_error_at_construction(tmp_path):
    with pytest.raises(ValueError, match="RecordingPlateau.*eval_dataset"):
        build(tmp_path / "run", eval_data=False)


def test_an_unknown_metric_for_scheduler_names_the_metrics(tmp_path):
    trainer, _ = build(tmp_path / "run", metric_for_scheduler="gauc")
    with pytest.raises(ValueError, match="metric_for_scheduler='gauc'.*'auc'.*'loss'"):
        trainer.train_and_evaluate(epochs=1, train_steps=2)


def test_any_scheduler_whose_step_needs_a_metric_is_detected(tmp_path):
    class OnMetric:
        def __init__(self, optimizer):
            self.optimizer, self.seen = optimizer, []

        def step(self, value):
            self.seen.append(value)

        def state_dict(self):
            return {"seen": list(self.seen)}

        def load_state_dict(self, state):
            self.seen = list(state["seen"])

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert steps_on_metric(OnMetric(opt))
    assert steps_on_metric(torch.optim.lr_scheduler.ReduceLROnPlateau(opt))
    assert not steps_on_metric(torch.optim.lr_scheduler.StepLR(opt, step_size=1))
    assert not steps_on_metric(None)

    trainer, sched = build(tmp_path / "run", scheduler_cls=lambda o, **_: OnMetric(o))
    trainer.train_and_evaluate(epochs=2, train_steps=2)
    assert len(sched.seen) == 2


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items()}


def test_the_plateau_state_is_checkpointed_and_resumes_exactly(tmp_path):
    kwargs = {"mode": "max", "factor": 0.5, "patience": 1}
    ref, ref_sched = build(tmp_path / "ref", sched_kwargs=kwargs)
    ref.train_and_evaluate(epochs=5, train_steps=2)

    first, _ = build(tmp_path / "resumed", sched_kwargs=kwargs)
    first.train_and_evaluate(epochs=2, train_steps=2)
    second, sched = build(tmp_path / "resumed", sched_kwargs=kwargs)
    second.train_and_evaluate(epochs=5, train_steps=2)

    assert second.global_step == 10
    state, ref_state = sched.state_dict(), ref_sched.state_dict()
    for key in ("best", "num_bad_epochs", "last_epoch", "cooldown_counter", "_last_lr"):
        assert state[key] == ref_state[key], key
    assert ref_state["_last_lr"][0] < 0.05  # it did reduce
    a, b = _weights(ref), _weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
