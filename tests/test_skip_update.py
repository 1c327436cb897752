"""A skipped update changes nothing (issue 11, item 3).

Under ``nonfinite_loss="skip"`` a window with a NaN/inf loss, or with a finite loss but
a NaN/inf gradient (made only in backward), leaves the tables, the dense weights and
both optimizers' state bit-identical, at k=1 and k=2, on the sparse-gradient back end
(recframe's row-wise optimizers) and on the fused back end (fbgemm kernels, whose
update recframe defers past the check). The proof: a run with a bad window inserted
ends bit-identical to the run without it.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.distributed as dist
from conftest import ToyCTR, make_batches

from recframe import Trainer, TrainingArguments
from recframe.data import SyntheticCriteo
from recframe.models import DLRM
from recframe.optim import dense_parameters, sparse_parameters
from recframe.optim.fused import shard_model
from recframe.optim.sparse import RowWiseAdagrad, SparseAdam

BAD = 1234.5
"""A dense feature value that marks a micro-batch as bad (see `_poison`)."""


class _InfInBackward(torch.autograd.Function):
    """Identity forward; an infinite gradient backward (a finite loss, bad gradients)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _poison(loss: torch.Tensor, dense: torch.Tensor, mode: str) -> torch.Tensor:
    if not bool((dense == BAD).any()):
        return loss
    if mode == "loss":
        return loss * float("nan")
    return _InfInBackward.apply(loss)


class PoisonCTR(ToyCTR):
    def __init__(self, mode: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mode = mode

    def forward(self, batch):
        return _poison(super().forward(batch), batch["dense"], self.mode)


class PoisonDLRM(DLRM):
    def __init__(self, mode: str) -> None:
        torch.manual_seed(0)
        super().__init__(num_embeddings=40, embedding_dim=4, dense_arch=(8, 4),
                         over_arch=(8, 1), sparse_features=["cat_0", "cat_1", "cat_2"])
        self.mode = mode

    def forward(self, batch):
        return _poison(super().forward(batch), batch.dense_features, self.mode)


def _mark_bad(batch):
    batch = copy.copy(batch)
    if isinstance(batch, dict):
        batch["dense"] = batch["dense"].clone()
        batch["dense"][0, 0] = BAD
    else:
        dense = batch.dense_features.clone()
        dense[0, 0] = BAD
        batch = type(batch)(dense_features=dense, sparse_features=batch.sparse_features,
                            labels=batch.labels)
    return batch


def _with_bad_window(batches, k, where):
    """``batches`` with one window of k micro-batches inserted before window ``where``;
    its first micro-batch is bad, the others are good (copies of the data)."""
    window = [_mark_bad(batches[0])] + list(batches[1:k])
    return batches[: where * k] + window + batches[where * k:]


def _state(model, dense, sparse) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        if hasattr(value, "local_shards"):
            value = value.local_shards()[0].tensor
        out[f"model/{key}"] = value.detach().clone()
    for prefix, opt in (("dense", dense), ("sparse", sparse)):
        state = opt.state_dict()
        if "iter" in state:  # fused: the kernels' iteration counts
            out[f"{prefix}/iter"] = torch.tensor(state["iter"])
        for pkey, entries in state["state"].items():
            for name, value in entries.items():
                if hasattr(value, "local_shards"):
                    value = value.local_shards()[0].tensor
                out[f"{prefix}/{pkey}/{name}"] = torch.as_tensor(value).detach().clone()
    return out


def _train(tmp_path, backend, mode, batches, k, **args):
    if backend.startswith("fused"):
        name = "adam" if backend == "fused-adam" else "rowwise_adagrad"
        model, sparse = shard_model(PoisonDLRM(mode), optimizer=name, lr=0.1)
    else:
        torch.manual_seed(0)
        model = PoisonCTR(mode)
        opt_cls = SparseAdam if backend == "sparse-adam" else RowWiseAdagrad
        sparse = opt_cls(sparse_parameters(model), lr=0.05)
    dense = torch.optim.Adam(dense_parameters(model), lr=0.01)
    args.setdefault("save_steps", None)
    args.setdefault("output_dir", str(tmp_path / f"run{id(model)}"))
    trainer = Trainer(
        model=model,
        args=TrainingArguments(gradient_accumulation_steps=k, report_to="none",
                               disable_tqdm=True, log_steps=1000, **args),
        train_dataset=batches, dense_optimizers=(dense, None), sparse_optimizer=sparse,
    )
    trainer.train()
    return trainer, _state(model, dense, sparse)


@pytest.fixture(scope="module")
def _process_group():
    existed = dist.is_initialized()
    yield
    if not existed and dist.is_initialized():
        dist.destroy_process_group()


def _data(backend, n):
    if backend.startswith("fused"):
        return list(SyntheticCriteo(num_batches=n, batch_size=16, num_embeddings=40,
                                    num_sparse=3, ids_per_feature=(1, 3), seed=1))
    return make_batches(n, 16, seed=1)


@pytest.mark.parametrize("mode", ["loss", "grad"], ids=["nan-loss", "inf-grad-only"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("backend", [
    "fused", "sparse-adam", "sparse-rowwise",
    # fbgemm's Adam counts iterations (bias correction): the skipped lookup's is taken back
    pytest.param("fused-adam", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                        reason="fused Adam needs a GPU")),
])
def test_a_skipped_window_changes_nothing(tmp_path, _process_group, caplog, backend, k, mode):
    good = _data(backend, 4 * k)
    ref, ref_state = _train(tmp_path, backend, mode, good, k, nonfinite_loss="skip")
    bad, bad_state = _train(tmp_path, backend, mode, _with_bad_window(good, k, 2), k,
                            nonfinite_loss="skip")
    assert ref.state.skipped_updates == 0 and bad.state.skipped_updates == 1
    assert bad.global_step == ref.global_step + 1 == 5
    assert bad_state.keys() == ref_state.keys()
    for key in ref_state:  # tables, dense weights, both optimizers' state
        assert torch.equal(bad_state[key], ref_state[key]), key
        assert torch.isfinite(bad_state[key].float()).all(), key
    expected = "non-finite loss at step 3" if mode == "loss" else "non-finite gradient"
    assert any(expected in r.getMessage() for r in caplog.records)


def test_a_non_finite_gradient_is_counted_and_reported(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    batches = make_batches(4, 8)
    batches[1] = _mark_bad(batches[1])
    trainer, state = _train(tmp_path, "sparse-adam", "grad", batches, 1, nonfinite_loss="skip")
    assert trainer.state.skipped_updates == 1
    # SparseAdam stepped 3 times, not 4
    assert {int(v) for k, v in state.items() if k.endswith("/step")} == {3}
    messages = [r.getMessage() for r in caplog.records if "non-finite gradient" in r.getMessage()]
    assert len(messages) == 1 and "step 2" in messages[0]


def test_fused_skips_with_incremental_checkpoints_restore_exactly(tmp_path, _process_group):
    """Row tracking of a fused table marks the rows a skipped window looked up (harmless:
    they are written again) and misses no row that changed: the delta chain restores
    the live state bit-identically."""
    batches = _with_bad_window(_data("fused", 4), 1, 1)
    out = tmp_path / "inc"
    trainer, live = _train(tmp_path, "fused", "loss", batches, 1, nonfinite_loss="skip",
                           output_dir=str(out), save_steps=1, incremental_checkpoints=True)
    assert trainer.state.skipped_updates == 1
    kinds = [c.manifest.get("incremental", {}).get("kind")
             for c in trainer.checkpoint_manager.list()]
    assert "delta" in kinds
    model, sparse = shard_model(PoisonDLRM("loss"), optimizer="rowwise_adagrad", lr=0.1)
    dense = torch.optim.Adam(dense_parameters(model), lr=0.01)
    again = Trainer(model=model, args=TrainingArguments(output_dir=str(out), report_to="none",
                                                        disable_tqdm=True),
                    train_dataset=batches, dense_optimizers=(dense, None),
                    sparse_optimizer=sparse)
    assert again.restore() == 5
    restored = _state(model, dense, sparse)
    for key in live:
        assert torch.equal(restored[key], live[key]), key


def test_ranks_agree_on_a_bad_window_seen_by_one(tmp_path):
    """2 gloo processes, row-wise sharded fused tables, no DDP: rank 0's NaN loss makes
    both ranks skip that update under ``skip``, and both raise under ``raise``
    (tests/jobs/skip_ranks_job.py)."""
    import os
    import socket
    import subprocess
    import sys

    job = os.path.join(os.path.dirname(__file__), "jobs", "skip_ranks_job.py")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, job, str(tmp_path / "run")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            outs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (code, out, err) in enumerate(outs):
        assert code == 0, err[-3000:]
        assert f"OK skip {rank} skipped=1 steps=4 finite=True" in out, (out, err[-3000:])
        assert f"RAISED {rank} non-finite loss at step 2" in out, (out, err[-3000:])
    assert "on another rank" in outs[1][1] and "on another rank" not in outs[0][1]
