"""`CheckpointManager`: when to save, what to keep, what to restore; async saves,
SIGTERM, model bank; and the Trainer resuming bit-exactly mid-epoch."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
import torch
from conftest import ToyCTR, make_batches
from test_checkpoint_saver import Counter, assert_same, bits, entries, manifest_of
from torch import nn

import recframe.checkpoint.saver as saver_module
from recframe import Hook, Trainer, TrainingArguments
from recframe.checkpoint import CheckpointError, CheckpointManager, Saver, StorageError
from recframe.checkpoint.async_writer import AsyncWriter
from recframe.optim import dense_parameters, sparse_parameters

WAIT = 60  # seconds: only a safety net against a hang, never a timing assertion


def make_model(seed: int = 0) -> ToyCTR:
    torch.manual_seed(seed)
    return ToyCTR(num_embeddings=16, dim=2)


def set_weights(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)


def steps_of(manager: CheckpointManager) -> list[int]:
    return [c.step for c in manager.list()]


def weight_in(saver: Saver, step: int) -> float:
    """The (uniform) value of the embedding weights in ckpt_<step>."""
    model = make_model(123)
    Saver(model, output_dir=saver.output_dir).load(ckpt_id=step, load_conf={"load": ["sparse"]})
    values = model.emb.weight.detach().unique()
    assert values.numel() == 1
    return float(values)


# --- when to save ----------------------------------------------------------------------
def test_step_saves_every_save_interval(tmp_path):
    saver = Saver(make_model(), output_dir=str(tmp_path), max_keep=10)
    manager = CheckpointManager(saver, save_interval=3)
    saved = [s for s in range(1, 11) if manager.step(s)]
    assert saved == [3, 6, 9]
    assert steps_of(manager) == [3, 6, 9]
    # without a step number, step() counts calls on from the last one
    manager2 = CheckpointManager(Saver(make_model(), output_dir=str(tmp_path / "b")),
                                 save_interval=2)
    assert [manager2.step() is not None for _ in range(4)] == [False, True, False, True]
    assert manager2.global_step == 4


def test_no_interval_saves_only_on_force(tmp_path):
    manager = CheckpointManager(Saver(make_model(), output_dir=str(tmp_path), max_keep=10))
    assert all(manager.step(s) is None for s in range(1, 6))
    assert manager.step(6, force=True).endswith("ckpt_6")
    assert manager.step(6, force=True) is None  # that step is saved already
    assert manager.step(7) is None
    assert steps_of(manager) == [6]


def test_save_interval_secs_with_a_mocked_clock(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    manager = CheckpointManager(Saver(make_model(), output_dir=str(tmp_path), max_keep=10),
                                save_interval_secs=60)
    saved = []
    for step, now in enumerate([1010, 1059.9, 1060, 1100, 1119, 1120.5, 1121], start=1):
        clock[0] = now
        if manager.step(step):
            saved.append(step)
    assert saved == [3, 6]  # 60 s after the start, then 60 s after that save


def test_steps_and_seconds_combine(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    manager = CheckpointManager(Saver(make_model(), output_dir=str(tmp_path), max_keep=10),
                                save_interval=4, save_interval_secs=100)
    saved = []
    for step in range(1, 10):
        clock[0] = {2: 150.0, 3: 160.0}.get(step, clock[0])
        if manager.step(step):
            saved.append(step)
    assert saved == [2, 4, 8]


def test_step_decides_only_where_a_rule_can_fire(tmp_path, monkeypatch):
    """The per-update check is O(1) between the steps where the policy can act; a
    SIGTERM or a forced save on a quiet step still acts at once."""
    manager = CheckpointManager(Saver(make_model(), output_dir=str(tmp_path), max_keep=10),
                                save_interval=5)
    decided = []
    decide = manager.save_policy.decide
    monkeypatch.setattr(manager.save_policy, "decide",
                        lambda ctx: decided.append(ctx.step) or decide(ctx))
    saved = [s for s in range(1, 13) if manager.step(s)]
    assert saved == [5, 10] and decided == [1, 5, 10]
    assert manager.step(12, force=True).endswith("ckpt_12")  # forced on a quiet step
    manager._sigterm_seen = manager.preemption_requested = True  # one rank's SIGTERM
    assert manager.step(13).endswith("ckpt_13") and decided[-1] == 13
    manager.start()  # a new train() call: preemption cleared, the fast path again
    assert manager.step(3) is None and manager.step(4) is None and decided[-1] == 3
    assert manager.step(15).endswith("ckpt_15")


# --- retention ---------------------------------------------------------------------------
def test_max_keep_keeps_the_newest(tmp_path):
    model = make_model()
    manager = CheckpointManager(Saver(model, output_dir=str(tmp_path), max_keep=5),
                                save_interval=1, max_keep=2)
    for step in range(1, 6):
        set_weights(model, step)
        manager.step(step)
        assert steps_of(manager) == list(range(max(1, step - 1), step + 1))
    assert entries(str(tmp_path)) == ["ckpt_4", "ckpt_5"]
    assert weight_in(manager.saver, 5) == 5.0


def test_retention_counts_checkpoints_of_an_earlier_run(tmp_path):
    out = str(tmp_path)
    first = CheckpointManager(Saver(make_model(), output_dir=out, max_keep=10), save_interval=1)
    for step in range(1, 5):
        first.step(step)
    assert steps_of(first) == [1, 2, 3, 4]
    # a new run (new process) with max_keep=2: retention is rebuilt from storage
    second = CheckpointManager(Saver(make_model(), output_dir=out, max_keep=2), save_interval=1)
    assert second.restore() == 4
    second.step(5)
    assert steps_of(second) == [4, 5]


def test_the_restored_checkpoint_is_kept_until_a_newer_one_is_committed(tmp_path):
    out = str(tmp_path)
    model = make_model()
    first = CheckpointManager(Saver(model, output_dir=out, max_keep=10), save_interval=2)
    for step in range(1, 5):
        set_weights(model, step)
        first.step(step)
    assert steps_of(first) == [2, 4]

    model2 = make_model(1)
    manager = CheckpointManager(Saver(model2, output_dir=out), max_keep=1)
    assert manager.restore(global_step=2) == 2
    assert torch.all(model2.emb.weight == 2.0)
    manager.apply_retention()  # max_keep=1 alone would keep only ckpt_4
    assert steps_of(manager) == [2, 4]
    # a newer checkpoint is committed: from now on ckpt_2 counts like any other; the
    # checkpoint just written is never the one deleted; ckpt_4 (the timeline left at
    # the restore) was moved aside by that first save
    set_weights(model2, 3)
    assert manager.step(3, force=True)
    assert steps_of(manager) == [3]
    assert weight_in(manager.saver, 3) == 3.0
    set_weights(model2, 5)
    manager.step(5, force=True)
    assert steps_of(manager) == [5]


def test_a_failed_delete_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    saver = Saver(make_model(), output_dir=str(tmp_path))
    manager = CheckpointManager(saver, save_interval=1, max_keep=1)
    manager.step(1)
    real = saver.storage.remove_tree
    failures = []

    def flaky_remove(path):
        if "ckpt_1" in path and not failures:
            failures.append(path)
            raise StorageError(f"deleting {path} failed: permission denied")
        return real(path)

    monkeypatch.setattr(saver.storage, "remove_tree", flaky_remove)
    with caplog.at_level(logging.WARNING, logger="recframe.checkpoint"):
        assert manager.step(2).endswith("ckpt_2")  # the save itself succeeded
    assert failures
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("could not delete" in w and "ckpt_1" in w for w in warnings), warnings
    assert steps_of(manager) == [1, 2]  # still committed: the manifest went first and failed
    manager.step(3)  # the next retention pass retries
    assert steps_of(manager) == [3]
    assert entries(str(tmp_path)) == ["ckpt_3"]


@pytest.mark.parametrize("mode,values,kept", [
    ("max", [0.6, 0.9, 0.7, 0.8, 0.5], [2, 5]),
    ("min", [0.6, 0.9, 0.4, 0.8, 0.5], [3, 5]),
])
def test_keep_best_by_metric_on_top_of_max_keep(tmp_path, mode, values, kept):
    saver = Saver(make_model(), output_dir=str(tmp_path))
    manager = CheckpointManager(saver, save_interval=1, max_keep=1, keep_best_metric="auc",
                                keep_best_mode=mode)
    current = {}
    manager.metrics_provider = lambda: current
    for step, value in enumerate(values, start=1):
        current = {"auc": value, "loss": 1.0}
        manager.step(step)
    assert steps_of(manager) == kept
    assert manifest_of(manager.list()[0].path)["metrics"]["auc"] == values[kept[0] - 1]

    # a new run rebuilds the ranking from the manifests
    manager2 = CheckpointManager(Saver(make_model(), output_dir=str(tmp_path)), save_interval=1,
                                 max_keep=1, keep_best_metric="auc", keep_best_mode=mode)
    manager2.metrics_provider = lambda: {"auc": float("nan")}
    manager2.restore()
    manager2.step(6)
    assert steps_of(manager2) == [kept[0], 6]


def test_checkpoints_without_the_metric_are_kept_by_max_keep_only(tmp_path):
    manager = CheckpointManager(Saver(make_model(), output_dir=str(tmp_path)), save_interval=1,
                                max_keep=2, keep_best_metric="auc")
    for step in range(1, 5):
        manager.step(step)
    assert steps_of(manager) == [3, 4]


# --- restore ---------------------------------------------------------------------------
def test_restore_without_a_checkpoint_returns_0(tmp_path):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    manager = CheckpointManager(Saver(model, output_dir=str(tmp_path / "nothing")))
    assert manager.restore() == 0
    assert manager.global_step == 0
    assert_same(before, model.state_dict())


def test_restore_latest_or_a_given_step(tmp_path):
    out = str(tmp_path)
    model = make_model()
    counter = Counter()
    saver = Saver(model, output_dir=out, max_keep=10)
    saver.register_for_checkpointing("counter", counter)
    manager = CheckpointManager(saver, save_interval=2)
    for step in range(1, 7):
        set_weights(model, step)
        counter.value = step * 10
        manager.step(step)

    model2, counter2 = make_model(1), Counter()
    saver2 = Saver(model2, output_dir=out, max_keep=10)
    saver2.register_for_checkpointing("counter", counter2)
    manager2 = CheckpointManager(saver2, save_interval=2)
    assert manager2.restore() == 6
    assert manager2.global_step == 6
    assert torch.all(model2.emb.weight == 6.0) and counter2.value == 60
    assert manager2.restore(global_step=2) == 2
    assert torch.all(model2.emb.weight == 2.0) and counter2.value == 20
    with pytest.raises(CheckpointError, match="ckpt_3"):
        manager2.restore(global_step=3)


def test_restore_on_an_object_store(tmp_path):
    import uuid

    out = f"memory://mgr-{uuid.uuid4().hex}"
    model = make_model()
    manager = CheckpointManager(Saver(model, output_dir=out), save_interval=1, max_keep=2)
    for step in range(1, 4):
        set_weights(model, step)
        manager.step(step)
    assert steps_of(manager) == [2, 3]
    model2 = make_model(3)
    assert CheckpointManager(Saver(model2, output_dir=out)).restore() == 3
    assert torch.all(model2.emb.weight == 3.0)


# --- model bank ------------------------------------------------------------------------
def _other_run(out: str):
    model = make_model(7)
    sparse = torch.optim.Adagrad(sparse_parameters(model), lr=0.1)
    set_weights(model, 0.25)
    for state in sparse.state.values():
        state["sum"].fill_(9.0)
    saver = Saver(model, sparse, output_dir=out)
    saver.register_for_checkpointing("trainer_state", Counter(33))
    saver.register_io_state("data", Counter(44))
    CheckpointManager(saver).save(30)
    return model


def _warm_target(out: str):
    model = make_model(8)
    sparse = torch.optim.Adagrad(sparse_parameters(model), lr=0.1)
    state, data = Counter(0), Counter(0)
    saver = Saver(model, sparse, output_dir=out)
    saver.register_for_checkpointing("trainer_state", state)
    saver.register_io_state("data", data)
    return CheckpointManager(saver), model, sparse, state, data


@pytest.mark.parametrize("where", ["output_dir", "ckpt_dir", "memory"])
def test_model_bank_loads_only_the_model_by_default(tmp_path, where):
    import uuid

    other = f"memory://bank-{uuid.uuid4().hex}" if where == "memory" else str(tmp_path / "a")
    _other_run(other)
    path = other.rstrip("/") + "/ckpt_30" if where == "ckpt_dir" else other
    manager, model, sparse, state, data = _warm_target(str(tmp_path / "b"))
    manager.load_model_bank([{"path": path}])
    assert torch.all(model.emb.weight == 0.25) and torch.all(model.mlp[0].weight == 0.25)
    assert all(torch.all(s["sum"] == 0.0) for s in sparse.state.values())  # not its optimizer
    assert state.value == 0 and data.value == 0  # nor its step or data position
    assert manager.restore() == 0  # this run has no checkpoint of its own
    assert manager.global_step == 0


def test_model_bank_entries_choose_parts(tmp_path):
    other = str(tmp_path / "a")
    _other_run(other)
    manager, model, sparse, state, data = _warm_target(str(tmp_path / "b"))
    manager.load_model_bank([{"path": other, "load": ["*"], "exclude": ["dense", "io_state"]}])
    assert torch.all(model.emb.weight == 0.25)
    assert not torch.all(model.mlp[0].weight == 0.25)
    assert all(torch.all(s["sum"] == 9.0) for s in sparse.state.values())
    assert state.value == 33 and data.value == 0
    with pytest.raises(ValueError, match="unknown checkpoint part"):
        manager.load_model_bank([{"path": other, "load": ["weights"]}])
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        manager.load_model_bank([str(tmp_path / "empty")])


def test_trainer_warm_starts_from_model_bank(tmp_path):
    other = str(tmp_path / "a")
    _other_run(other)
    model = make_model(8)
    args = TrainingArguments(output_dir=str(tmp_path / "b"), model_bank=[{"path": other}],
                             report_to="none", disable_tqdm=True)
    trainer = Trainer(model, args, train_dataset=make_batches(2, 4, num_embeddings=16))
    assert trainer.restore() == 0
    assert torch.all(model.emb.weight == 0.25)
    assert trainer.global_step == 0


# --- async save ------------------------------------------------------------------------
class GatedWrites:
    """Patches the Saver's tensor writes: each one waits for a permit, so a test can
    hold a save in flight as long as it needs."""

    def __init__(self, monkeypatch, fail_steps=()):
        self.permits = threading.Semaphore(0)
        self.started = threading.Semaphore(0)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls = 0
        self.fail_steps = set(fail_steps)
        real = saver_module.write_tensors

        def gated(storage, directory, *args, **kwargs):
            with self.lock:
                self.calls += 1
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.started.release()
            try:
                assert self.permits.acquire(timeout=WAIT), "test never released the write"
                step = int(directory.rstrip("/").split("ckpt_")[-1].split(".")[0])
                if step in self.fail_steps:
                    raise StorageError(f"writing {directory}/data.bin failed: disk on fire")
                return real(storage, directory, *args, **kwargs)
            finally:
                with self.lock:
                    self.in_flight -= 1

        monkeypatch.setattr(saver_module, "write_tensors", gated)
        # thread-gated writes need the in-process (snapshot + thread) async path; the
        # forked copy-on-write path is tested in test_async_fork.py
        monkeypatch.setattr(AsyncWriter, "can_fork", lambda self, state: False)

    def wait_started(self):
        assert self.started.acquire(timeout=WAIT), "the save never started writing"


def test_async_save_lets_the_loop_go_on_and_writes_the_snapshot(tmp_path, monkeypatch):
    gate = GatedWrites(monkeypatch)
    model = make_model()
    manager = CheckpointManager(Saver(model, output_dir=str(tmp_path), max_keep=10),
                                save_interval=1, async_save=True)
    set_weights(model, 1.0)
    assert manager.step(1).endswith("ckpt_1")  # returned while the write is held
    gate.wait_started()
    assert steps_of(manager) == []  # not committed yet
    set_weights(model, 2.0)  # training goes on and changes the weights meanwhile
    gate.permits.release()
    manager.wait()
    assert steps_of(manager) == [1]
    assert weight_in(manager.saver, 1) == 1.0  # the state at save time
    manager.close()


def test_async_save_keeps_at_most_one_save_in_flight(tmp_path, monkeypatch):
    gate = GatedWrites(monkeypatch)
    model = make_model()
    manager = CheckpointManager(Saver(model, output_dir=str(tmp_path), max_keep=10),
                                save_interval=1, async_save=True)
    progress = []

    def loop():
        for step in (1, 2, 3):
            set_weights(model, step)
            manager.step(step)
            progress.append(step)
        manager.close()

    worker = threading.Thread(target=loop)
    worker.start()
    gate.wait_started()  # save 1 is writing
    for _ in range(2):
        gate.permits.release()
        gate.wait_started()  # the next save starts only once the previous one is done
    gate.permits.release()
    worker.join(WAIT)
    assert not worker.is_alive()
    assert progress == [1, 2, 3]
    assert gate.calls == 3 and gate.max_in_flight == 1
    assert steps_of(manager) == [1, 2, 3]
    assert [weight_in(manager.saver, s) for s in (1, 2, 3)] == [1.0, 2.0, 3.0]


def test_a_second_save_waits_for_the_first(tmp_path, monkeypatch):
    gate = GatedWrites(monkeypatch)
    manager = CheckpointManager(Saver(make_model(), output_dir=str(tmp_path), max_keep=10),
                                save_interval=1, async_save=True)
    manager.step(1)
    gate.wait_started()
    worker = threading.Thread(target=manager.step, args=(2,))
    worker.start()
    worker.join(0.2)
    assert worker.is_alive()  # blocked behind save 1 (it cannot finish: save 1 is held)
    assert gate.calls == 1
    gate.permits.release()
    gate.wait_started()
    gate.permits.release()
    worker.join(WAIT)
    manager.close()
    assert steps_of(manager) == [1, 2]


@pytest.mark.parametrize("surface", ["next_save", "wait", "close"])
def test_a_background_error_surfaces(tmp_path, monkeypatch, surface):
    gate = GatedWrites(monkeypatch, fail_steps={1})
    manager = CheckpointManager(Saver(make_model(), output_dir=str(tmp_path), max_keep=10),
                                save_interval=1, async_save=True)
    manager.step(1)  # no error yet: it is in the background
    gate.permits.release()
    gate.permits.release()
    with pytest.raises(CheckpointError, match="disk on fire") as info:
        if surface == "next_save":
            manager.step(2)
        elif surface == "wait":
            manager.wait()
        else:
            manager.close()
    assert "ckpt_1" in str(info.value)
    manager.wait()  # raised once, then cleared
    assert 1 not in steps_of(manager)
    manager.step(3)
    manager.close()
    assert 3 in steps_of(manager)


def test_trainer_async_save_finishes_before_train_returns(tmp_path, monkeypatch):
    gate = GatedWrites(monkeypatch)
    close_entered, stop = threading.Event(), threading.Event()
    real_close = CheckpointManager.close

    def close(self):
        close_entered.set()
        real_close(self)

    monkeypatch.setattr(CheckpointManager, "close", close)

    def releaser():  # lets the writes through; the final one only once train() is closing
        started = 0
        while not stop.is_set():
            if not gate.started.acquire(timeout=0.05):
                continue
            started += 1
            if started == 3:
                close_entered.wait(WAIT)
            gate.permits.release()

    worker = threading.Thread(target=releaser, daemon=True)
    worker.start()
    model = make_model()
    args = TrainingArguments(output_dir=str(tmp_path), save_steps=2, async_save=True,
                             report_to="none", disable_tqdm=True, max_to_keep=10)
    trainer = Trainer(model, args, train_dataset=make_batches(5, 4, num_embeddings=16))
    try:
        trainer.train()
    finally:
        stop.set()
        worker.join(WAIT)
    # train() returned: the final save (held until close() began) is committed
    assert close_entered.is_set()
    assert steps_of(trainer.checkpoint_manager) == [2, 4, 5]
    check = make_model(9)
    Saver(check, output_dir=str(tmp_path)).load(load_conf={"load": ["sparse", "dense"]})
    assert_same(model.state_dict(), check.state_dict())


# --- SIGTERM ---------------------------------------------------------------------------
class SigtermAt(Hook):
    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, trainer, metrics):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_at_the_next_step_and_stops(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    model = make_model()
    args = TrainingArguments(output_dir=str(tmp_path), save_steps=None, save_on_sigterm=True,
                             report_to="none", disable_tqdm=True)
    trainer = Trainer(model, args, train_dataset=make_batches(20, 4, num_embeddings=16),
                      hooks=[SigtermAt(3)])
    trainer.train(train_steps=10)
    assert trainer.global_step == 3  # os.kill runs the Python handler before returning
    assert steps_of(trainer.checkpoint_manager) == [trainer.global_step]
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back
    check = make_model(9)
    Saver(check, output_dir=str(tmp_path)).load(load_conf={"load": ["sparse", "dense"]})
    assert_same(model.state_dict(), check.state_dict())
    # the same command again resumes there and finishes the run
    trainer2 = Trainer(make_model(1), args, train_dataset=make_batches(20, 4, num_embeddings=16))
    trainer2.train(train_steps=10)
    assert trainer2.global_step == 10


def test_manager_sigterm_requests_a_save(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    manager = CheckpointManager(Saver(make_model(), output_dir=str(tmp_path)),
                                save_interval=100, save_on_sigterm=True)
    manager.start()
    try:
        assert manager.step(1) is None
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # let the Python-level handler run
            if manager.preemption_requested:
                break
            time.sleep(0.001)
        assert manager.preemption_requested
        assert manager.step(2).endswith("ckpt_2")
    finally:
        manager.close()
    assert signal.getsignal(signal.SIGTERM) == before


# --- Trainer: exact resume mid-epoch with accumulation and a stateful dataset ----------
class StatefulBatches:
    """A dataset with its own position (state_dict / load_state_dict)."""

    def __init__(self, n: int, batch_size: int = 4) -> None:
        self.batches = make_batches(n, batch_size, seed=11, num_embeddings=16)
        for i, batch in enumerate(self.batches):
            batch["idx"] = torch.full((batch_size,), i)
        self.next = 0
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        if self.next >= len(self.batches):
            self.next, self.epoch = 0, self.epoch + 1
        while self.next < len(self.batches):
            batch = self.batches[self.next]
            self.next += 1
            yield batch
        self.next, self.epoch = 0, self.epoch + 1

    def state_dict(self):
        return {"next": self.next, "epoch": self.epoch}

    def load_state_dict(self, state):
        self.next, self.epoch = state["next"], state["epoch"]


class NoisyRecorder(ToyCTR):
    """Dropout (the RNG must be restored) and a record of the batches trained."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        super().__init__(num_embeddings=16, dim=4)
        self.drop = nn.Dropout(0.3)
        self.seen: list[int] = []

    def forward(self, batch):
        if self.training:
            self.seen.append(int(batch["idx"][0]))
        return super().forward(dict(batch, dense=self.drop(batch["dense"])))


def _resume_trainer(out, seed):
    model = NoisyRecorder(seed)
    dense = torch.optim.Adam(dense_parameters(model), lr=0.02)
    sched = torch.optim.lr_scheduler.StepLR(dense, step_size=2, gamma=0.5)
    sparse = torch.optim.Adagrad(sparse_parameters(model), lr=0.05)
    data = StatefulBatches(9)  # an odd epoch: its last accumulation window is partial
    args = TrainingArguments(output_dir=str(out), gradient_accumulation_steps=2, save_steps=2,
                             report_to="none", disable_tqdm=True, log_steps=1000,
                             dataloader_prefetch=2, max_to_keep=3)
    trainer = Trainer(model, args, train_dataset=data, dense_optimizers=(dense, sched),
                      sparse_optimizer=sparse)
    return trainer, model, dense, sched, sparse, data


@pytest.mark.parametrize("stop_at", [3, 5, 6])
def test_trainer_resumes_exactly_mid_epoch_with_accumulation(tmp_path, stop_at):
    total = 8
    straight = _resume_trainer(tmp_path / "straight", seed=0)
    straight[0].train(train_steps=total)

    first = _resume_trainer(tmp_path / "resumed", seed=0)
    first[0].train(train_steps=stop_at)
    assert first[0].global_step == stop_at
    second = _resume_trainer(tmp_path / "resumed", seed=1)  # different init: all restored
    assert second[0].restore() == stop_at
    second[0].train(train_steps=total)

    (t_a, m_a, d_a, s_a, sp_a, data_a), (t_b, m_b, d_b, s_b, sp_b, data_b) = straight, second
    assert m_a.seen == first[1].seen + m_b.seen  # the exact batches, none twice or skipped
    assert t_a.state.state_dict() == t_b.state.state_dict()
    assert data_a.state_dict() == data_b.state_dict()
    for key, value in m_a.state_dict().items():
        assert torch.equal(bits(value), bits(m_b.state_dict()[key])), key
    assert_same(d_a.state_dict(), d_b.state_dict(), "dense optimizer")
    assert_same(sp_a.state_dict(), sp_b.state_dict(), "sparse optimizer")
    assert s_a.state_dict() == s_b.state_dict()
