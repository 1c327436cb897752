"""Regression tests from a review of issue 11 (items 1-5) on the paths users take."""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "jobs"))

from loader_resume_job import Recorder, _sample, make_loader, parameters  # noqa: E402

from recframe import Trainer, TrainingArguments  # noqa: E402


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), train_epoch=1, save_steps=None, report_to="none",
                disable_tqdm=True, log_steps=1000)
    base.update(kw)
    return TrainingArguments(**base)


# --- a train() call that failed mid-window, then train() again -------------------------
class Flaky(Recorder):
    """Raises once, at its ``fail_at``-th training forward (a transient error: an OOM, a
    Ctrl-C in a notebook)."""

    def __init__(self, fail_at: int, error: type[BaseException]) -> None:
        super().__init__()
        self.drop.p = 0.0
        self.calls, self.fail_at, self.error = 0, fail_at, error

    def forward(self, batch):
        if self.training:
            self.calls += 1
            if self.calls == self.fail_at:
                raise self.error("transient")
        return super().forward(batch)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("kind", ["list", "dataloader", "stateful"])
def test_a_window_that_failed_is_trained_again_without_its_gradients(tmp_path, kind, error):
    """k=2; the 2nd micro-batch of window 2 raises; train() again. Before the fix the
    window's 1st micro-batch counted as trained (never trained again) and its gradients
    stayed in ``.grad`` and leaked into the next window, which then held 3 micro-batches
    weighed as 2, and every later window was shifted by one: silently not the run
    without the error."""

    def data():
        if kind == "list":
            return [b for b in make_loader("dataloader", shuffle=False)]
        return make_loader(kind, shuffle=False)

    torch.manual_seed(0)
    straight = Flaky(0, error)
    Trainer(straight, _args(tmp_path / "a", gradient_accumulation_steps=2),
            train_dataset=data()).train()
    torch.manual_seed(0)
    flaky = Flaky(4, error)
    trainer = Trainer(flaky, _args(tmp_path / "b", gradient_accumulation_steps=2),
                      train_dataset=data())
    with pytest.raises(error):
        trainer.train()
    assert trainer.global_step == 1 and trainer.state.epoch_batches == 2
    trainer.train()
    assert flaky.seen[:3] == straight.seen[:3]  # batch 2 trained, then the error
    assert flaky.seen[3:] == straight.seen[2:]  # the failed window again, from batch 2
    a, b = parameters(straight), parameters(flaky)
    for key in a:
        assert np.array_equal(a[key], b[key]), key


# --- DataLoader(num_workers>0, persistent_workers=True) over an IterableDataset --------
class EpochShuffled(IterableDataset):
    """Shards over workers; shuffles by its own epoch counter, which its ``__iter__``
    advances (the usual pattern); has ``state_dict``/``load_state_dict``."""

    def __init__(self, n: int = 16) -> None:
        self.n, self.epoch = n, 0

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.epoch))
        self.epoch += 1
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for i in order.tolist()[worker::workers]:
            yield _sample(i)

    def state_dict(self):
        return {"epoch": self.epoch}

    def load_state_dict(self, state):
        self.epoch = state["epoch"]


def test_persistent_workers_over_an_iterable_dataset_are_named(tmp_path, caplog):
    """The dataset's iteration state lives in the persistent workers' copies (recframe
    cannot read or checkpoint it): a resume in a later epoch starts fresh workers, and
    their copies replay epoch 0's order (checked below), so the run must say so at the
    start, as it does for other loaders it cannot resume exactly."""
    caplog.set_level(logging.WARNING, logger="recframe")

    def loader():
        return DataLoader(EpochShuffled(), batch_size=4, num_workers=2, persistent_workers=True)

    torch.manual_seed(0)
    model = Recorder()
    Trainer(model, _args(tmp_path, train_epoch=2), train_dataset=loader()).train()
    assert model.seen[:4] != model.seen[4:]  # epoch 1 has its own order
    # what a resume at the start of epoch 1 gets: fresh workers, fresh dataset copies
    fresh = [b["idx"].tolist() for b in loader()]
    assert fresh == model.seen[:4]
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("EpochShuffled" in m and "persistent_workers" in m and "docs/resume.md" in m
               for m in messages), messages


def test_non_persistent_workers_over_an_iterable_dataset_do_not_warn(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="recframe")
    loader = DataLoader(EpochShuffled(), batch_size=4, num_workers=2)
    torch.manual_seed(0)
    Trainer(Recorder(), _args(tmp_path), train_dataset=loader).train(1)
    assert not [r for r in caplog.records if "docs/resume.md" in r.getMessage()]


# --- per-sample weighting needs the number of samples -----------------------------------
class BagModel(nn.Module):
    """nn.EmbeddingBag's flat input: a batch is ``(ids, offsets, labels)``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(50, 4, mode="mean")
        self.linear = nn.Linear(4, 1)

    def forward(self, batch):
        ids, offsets, labels = batch
        logits = self.linear(self.emb(ids, offsets)).squeeze(1)
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)


def _bags(samples: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (samples,), generator=g)
    ids = torch.randint(0, 50, (int(lengths.sum()),), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    return ids, offsets, torch.randint(0, 2, (samples,), generator=g).float()


def _concat(parts):
    ids = torch.cat([p[0] for p in parts])
    starts = torch.tensor([0] + [len(p[0]) for p in parts[:-1]]).cumsum(0)
    offsets = torch.cat([p[1] + s for p, s in zip(parts, starts)])
    return ids, offsets, torch.cat([p[2] for p in parts])


def test_equal_micro_batches_of_flat_embedding_bag_input_weigh_equally(tmp_path):
    """(ids, offsets, labels) of nn.EmbeddingBag: the samples are the offsets/labels,
    not the flat ids (before the fix: weighed 27/43 and 16/43 instead of 1/2)."""
    micro = [_bags(8, 1), _bags(8, 3)]
    assert len(micro[0][0]) != len(micro[1][0])  # same samples, other id counts

    def train(batches, k):
        torch.manual_seed(0)
        model = BagModel()
        dense = torch.optim.SGD(model.linear.parameters(), lr=0.5)
        sparse = torch.optim.SGD(model.emb.parameters(), lr=0.5)
        Trainer(model, _args(tmp_path / f"k{k}", gradient_accumulation_steps=k),
                train_dataset=batches, dense_optimizers=(dense, None),
                sparse_optimizer=sparse).train()
        return model

    big, acc = train([_concat(micro)], 1), train(micro, 2)
    for (name, a), (_, b) in zip(big.named_parameters(), acc.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), (name, (a - b).abs().max())


def test_a_failed_window_leaves_no_deferred_lookup_on_the_fused_back_end(tmp_path):
    """The fused back end defers a window's table update to its end: a window that
    failed must drop its recorded lookups too (before the fix they were replayed into
    the next window's update)."""
    import torch.distributed as dist

    from recframe.data import SyntheticCriteo
    from recframe.models import DLRM
    from recframe.optim import dense_parameters
    from recframe.optim.fused import shard_model

    existed = dist.is_initialized()

    class FailOnce(Trainer):
        fail_at, calls = 0, 0

        def _train_step(self, data, epoch, metrics):
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("transient")
            super()._train_step(data, epoch, metrics)

    def run(fail_at):
        torch.manual_seed(0)
        dlrm = DLRM(num_embeddings=40, embedding_dim=4, dense_arch=(8, 4), over_arch=(8, 1),
                    sparse_features=["cat_0", "cat_1", "cat_2"])
        dmp, sparse = shard_model(dlrm, optimizer="rowwise_adagrad", lr=0.1)
        dense = torch.optim.Adam(dense_parameters(dmp), lr=0.01)
        data = list(SyntheticCriteo(num_batches=6, batch_size=8, num_embeddings=40,
                                    num_sparse=3, ids_per_feature=(1, 3), seed=1))
        trainer = FailOnce(dmp, _args(tmp_path / str(fail_at), gradient_accumulation_steps=2),
                           train_dataset=data, dense_optimizers=(dense, None),
                           sparse_optimizer=sparse)
        trainer.fail_at = fail_at
        if fail_at:
            with pytest.raises(RuntimeError, match="transient"):
                trainer.train()
        trainer.train()
        return {k: (v.local_shards()[0].tensor if hasattr(v, "local_shards") else v).clone()
                for k, v in dmp.state_dict().items()}

    try:
        straight, retried = run(0), run(4)
    finally:
        if not existed and dist.is_initialized():
            dist.destroy_process_group()
    for key in straight:
        assert torch.equal(straight[key], retried[key]), key


def test_batch_size_of_counts_samples_in_common_containers():
    from recframe.data import batch_size_of

    ids, offsets, labels = torch.arange(27), torch.arange(8), torch.zeros(8)
    assert batch_size_of((ids, offsets, labels)) == 8
    assert batch_size_of({"ids": ids, "label": labels}) == 8
    assert batch_size_of([{"x": torch.ones(3)} for _ in range(5)]) == 5  # kept apart
