"""Exact resume with torch's own data loading (docs/resume.md): a run interrupted
mid-epoch and resumed trains every sample exactly once per epoch, in the order of an
uninterrupted run, and ends bit-identical to it; repeated ``train()`` calls lose no
batch."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Sampler

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "jobs"))

from loader_resume_job import (  # noqa: E402
    BATCH,
    SAMPLES,
    IndexedSamples,
    Recorder,
    make_loader,
    parameters,
)

from recframe import Hook, Trainer, TrainingArguments  # noqa: E402
from recframe.data import SyntheticCriteo  # noqa: E402

JOB = os.path.join(os.path.dirname(__file__), "jobs", "loader_resume_job.py")
STEPS_PER_EPOCH = SAMPLES // BATCH


class Crash(RuntimeError):
    pass


class CrashAt(Hook):
    """Fails the run right after update ``step``, before that step's checkpoint."""

    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, trainer, metrics):
        if trainer.global_step == self.step:
            raise Crash(f"crash at step {self.step}")


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), train_epoch=2, save_steps=4, report_to="none",
                disable_tqdm=True, log_steps=1000)
    base.update(kw)
    return TrainingArguments(**base)


def _run(out, loader_factory, crash_at=None):
    """One 'process': the user's script builds model and loader from seed 0 and trains;
    returns (model, trainer), or the model of a run that crashed."""
    torch.manual_seed(0)
    model = Recorder()
    hooks = [CrashAt(crash_at)] if crash_at else []
    trainer = Trainer(model, _args(out), train_dataset=loader_factory(), hooks=hooks)
    if crash_at:
        with pytest.raises(Exception, match="crash at step"):
            trainer.train()
    else:
        trainer.train()
    return model, trainer


def _check_epochs(seen: list[list[int]]) -> None:
    assert len(seen) == 2 * STEPS_PER_EPOCH
    for epoch in range(2):
        flat = [i for b in seen[epoch * STEPS_PER_EPOCH:(epoch + 1) * STEPS_PER_EPOCH]
                for i in b]
        assert sorted(flat) == list(range(SAMPLES)), f"epoch {epoch}: {flat}"


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


CASES = [  # kind, workers, persistent_workers, shuffle, crash after update
    ("dataloader", 0, False, True, 9),
    ("dataloader", 0, False, True, 5),  # in the first epoch
    ("dataloader", 0, False, False, 9),  # no shuffle, dropout: the loader's own draws
    ("dataloader", 2, False, True, 9),
    ("dataloader", 2, True, True, 9),  # workers kept across epochs
    ("dataloader", 2, True, True, 5),
    ("stateful", 0, False, True, 9),
    ("stateful", 0, False, True, 5),
    ("stateful", 2, False, True, 9),
    ("stateful", 2, True, True, 9),
    ("iterable", 0, False, True, 9),
    ("iterable", 0, False, True, 5),
]


@pytest.mark.parametrize("kind,workers,persistent,shuffle,crash_at", CASES)
def test_resume_mid_epoch_is_exact(tmp_path, kind, workers, persistent, shuffle, crash_at):
    def factory():
        return make_loader(kind, workers, persistent, shuffle)

    straight, trainer = _run(tmp_path / "a", factory)
    assert trainer.global_step == 2 * STEPS_PER_EPOCH
    _check_epochs(straight.seen)

    crashed, _ = _run(tmp_path / "b", factory, crash_at=crash_at)
    resumed, trainer = _run(tmp_path / "b", factory)
    saved = crash_at - crash_at % 4  # the last checkpoint before the crash
    assert len(resumed.seen) == 2 * STEPS_PER_EPOCH - saved  # resumed, not restarted
    seen = crashed.seen[:saved] + resumed.seen
    assert seen == straight.seen  # every sample once per epoch, in the same order
    _assert_same(parameters(straight), parameters(resumed))


def test_loader_draws_do_not_move_the_model_rng(tmp_path):
    """Iterating a DataLoader draws a base seed from torch's global RNG: the trainer runs
    the loader on a stream of its own, so the model's stream (dropout) only moves with
    the model's own draws."""
    loader = DataLoader(IndexedSamples(8), batch_size=4, shuffle=True)
    torch.manual_seed(0)
    model = Recorder()
    model.drop.p = 0.0
    trainer = Trainer(model, _args(tmp_path, train_epoch=3), train_dataset=loader,
                      eval_dataset=DataLoader(IndexedSamples(8), batch_size=4))
    before = torch.get_rng_state()
    trainer.train()
    trainer.evaluate()
    assert torch.equal(torch.get_rng_state(), before)


def test_epochs_differ_and_follow_the_seed(tmp_path):
    orders = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed * 7)  # the user's global RNG does not matter
        model = Recorder()
        Trainer(model, _args(tmp_path / str(len(orders)), seed=seed),
                train_dataset=make_loader("dataloader")).train()
        orders.append(model.seen)
    assert orders[0] == orders[1]
    assert orders[0] != orders[2]
    assert orders[0][:STEPS_PER_EPOCH] != orders[0][STEPS_PER_EPOCH:]


@pytest.mark.parametrize("workers,persistent", [(0, False), (2, True)])
def test_a_users_generator_is_replayed(tmp_path, workers, persistent):
    """DataLoader(generator=g): g's state at the pass's start is checkpointed, so the
    resumed run (whose script builds a fresh g) replays the same permutation; with
    persistent workers too (torch skips the base-seed draw from g when it reuses them)."""

    def factory():
        return DataLoader(IndexedSamples(), batch_size=BATCH, shuffle=True,
                          generator=torch.Generator().manual_seed(5), num_workers=workers,
                          persistent_workers=persistent)

    straight, _ = _run(tmp_path / "a", factory)
    crashed, _ = _run(tmp_path / "b", factory, crash_at=9)
    resumed, _ = _run(tmp_path / "b", factory)
    assert crashed.seen[:8] + resumed.seen == straight.seen
    _assert_same(parameters(straight), parameters(resumed))


def test_distributed_sampler_gets_set_epoch(tmp_path):
    from torch.utils.data.distributed import DistributedSampler

    def factory():
        data = IndexedSamples()
        sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=4)
        return DataLoader(data, batch_size=BATCH, sampler=sampler)

    straight, _ = _run(tmp_path / "a", factory)
    _check_epochs(straight.seen)
    assert straight.seen[:STEPS_PER_EPOCH] != straight.seen[STEPS_PER_EPOCH:]
    crashed, _ = _run(tmp_path / "b", factory, crash_at=9)
    resumed, _ = _run(tmp_path / "b", factory)
    assert crashed.seen[:8] + resumed.seen == straight.seen


# --- repeated train() calls ----------------------------------------------------------
def _dict_batches(n: int):
    return [
        {"idx": torch.full((4,), i), "ids": torch.randint(0, 64, (4, 2)),
         "dense": torch.randn(4, 3), "label": torch.ones(4)}
        for i in range(n)
    ]


def test_repeated_train_calls_over_a_generator_lose_nothing(tmp_path):
    torch.manual_seed(0)
    batches = _dict_batches(8)
    model = Recorder()
    trainer = Trainer(model, _args(tmp_path), train_dataset=(b for b in batches))
    trainer.train(2)
    trainer.train(4)
    assert [b[0] for b in model.seen] == [0, 1, 2, 3]


@pytest.mark.parametrize("kind,workers", [("dataloader", 0), ("dataloader", 2),
                                          ("stateful", 0), ("stateful", 2), ("iterable", 0)])
def test_repeated_train_calls_over_a_loader_equal_one_call(tmp_path, kind, workers):
    torch.manual_seed(0)
    one = Recorder()
    Trainer(one, _args(tmp_path / "a"), train_dataset=make_loader(kind, workers)).train(9)
    torch.manual_seed(0)
    split = Recorder()
    trainer = Trainer(split, _args(tmp_path / "b"), train_dataset=make_loader(kind, workers))
    for steps in (2, 4, 5, 9):
        trainer.train(steps)
    assert split.seen == one.seen
    _assert_same(parameters(one), parameters(split))


class _Dense(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        self.seen: list[float] = []

    def forward(self, batch):
        if self.training:
            self.seen.append(float(batch.dense_features.sum()))
        logits = self.linear(batch.dense_features).squeeze(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)


def test_train_and_evaluate_rounds_over_a_dataloader_train_in_order(tmp_path):
    def synthetic():
        return SyntheticCriteo(num_batches=10, batch_size=4, num_dense=3, num_sparse=2,
                               num_embeddings=20, seed=1)

    expected = [float(synthetic().generate(i).dense_features.sum()) for i in range(6)]
    model = _Dense()
    trainer = Trainer(model, _args(tmp_path), train_dataset=DataLoader(synthetic(),
                      batch_size=None), eval_dataset=[synthetic().generate(0)])
    trainer.train_and_evaluate(epochs=3, train_steps=2)
    assert model.seen == expected


# --- where exactness is impossible: one warning, at the start ------------------------
def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
            and "docs/resume.md" in r.getMessage()]


def test_a_generator_is_named_once_at_the_start(tmp_path, caplog):
    torch.manual_seed(0)
    trainer = Trainer(Recorder(), _args(tmp_path),
                      train_dataset=(b for b in _dict_batches(4)))
    trainer.train(1)
    trainer.train(2)
    (message,) = _warnings(caplog)
    assert "generator" in message and "state_dict" in message


def test_a_sampler_without_generator_is_named(tmp_path, caplog):
    class NumpyShuffle(Sampler):
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __iter__(self):
            return iter(np.random.permutation(self.n).tolist())

    loader = DataLoader(IndexedSamples(8), batch_size=4, sampler=NumpyShuffle(8))
    torch.manual_seed(0)
    Trainer(Recorder(), _args(tmp_path), train_dataset=loader).train(1)
    (message,) = _warnings(caplog)
    assert "NumpyShuffle" in message and "StatefulDataLoader" in message


@pytest.mark.parametrize("kind", ["dataloader", "stateful", "iterable"])
def test_exact_loaders_do_not_warn(tmp_path, caplog, kind):
    torch.manual_seed(0)
    Trainer(Recorder(), _args(tmp_path), train_dataset=make_loader(kind)).train(1)
    assert _warnings(caplog) == []


# --- SIGKILL mid-epoch, a DataLoader with 2 workers ------------------------------------
def _job(out, result, log, *extra, expect_kill=False):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, JOB, str(out), str(result), str(log),
                           *map(str, extra)], capture_output=True, text=True, timeout=300,
                          env=env)
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _log(path) -> dict[int, list[int]]:
    steps: dict[int, list[int]] = {}
    for line in path.read_text().splitlines():
        step, *idx = map(int, line.split())
        steps[step] = idx  # a step trained again after the resume: its last run counts
    return steps


@pytest.mark.parametrize("extra", [[], ["--persistent"]])
def test_sigkill_mid_epoch_with_two_workers(tmp_path, extra):
    common = ["--loader", "dataloader", "--workers", 2, *extra]
    _job(tmp_path / "a", tmp_path / "a.npz", tmp_path / "a.log", *common)
    _job(tmp_path / "b", tmp_path / "unused.npz", tmp_path / "b.log", *common,
         "--kill-at", 9, expect_kill=True)
    proc = _job(tmp_path / "b", tmp_path / "b.npz", tmp_path / "b.log", *common)
    assert "resumed from" in proc.stderr and "ckpt_8" in proc.stderr
    straight, resumed = _log(tmp_path / "a.log"), _log(tmp_path / "b.log")
    assert resumed == straight
    _check_epochs([straight[s] for s in sorted(straight)])
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        _assert_same(dict(a), dict(b))


def test_a_replaced_train_dataset_starts_at_its_own_position(tmp_path):
    def synthetic(seed):
        return SyntheticCriteo(num_batches=6, batch_size=4, num_dense=3, num_sparse=2,
                               num_embeddings=20, seed=seed)

    model = _Dense()
    trainer = Trainer(model, _args(tmp_path), train_dataset=synthetic(1))
    trainer.train(2)
    second = synthetic(2)
    trainer.train_dataset = second
    trainer.train(3)  # finishes epoch 0 over the new data set, from its batch 0
    assert model.seen[2] == float(second.generate(0).dense_features.sum())
    assert second.state_dict()["next_batch"] == 1
