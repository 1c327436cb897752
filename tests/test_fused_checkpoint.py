"""Checkpoints of a torchrec-sharded model with a fused optimizer: ShardedTensor tables
and fused optimizer state round-trip, and training resumed from them continues
bit-exactly (with and without gradient accumulation)."""

from __future__ import annotations

import pytest
import torch

from recframe import Trainer, TrainingArguments
from recframe.data import SyntheticCriteo
from recframe.models import DLRM
from recframe.optim import dense_parameters
from recframe.optim.fused import shard_model

FEATURES = ["cat_0", "cat_1", "cat_2"]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _trainer(out, steps, accum, opt):
    torch.manual_seed(0)
    model = DLRM(num_embeddings=60, embedding_dim=4, dense_arch=(8, 4), over_arch=(8, 1),
                 sparse_features=FEATURES)
    dmp, sparse = shard_model(model, optimizer=opt, lr=0.05)
    dense = torch.optim.Adam(dense_parameters(dmp), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(dense, step_size=2, gamma=0.5)
    data = SyntheticCriteo(num_batches=7, batch_size=16, num_embeddings=60, num_sparse=3,
                           ids_per_feature=(1, 3), seed=2)
    args = TrainingArguments(output_dir=str(out), train_steps=steps,
                             gradient_accumulation_steps=accum, save_steps=2,
                             report_to="none", disable_tqdm=True)
    return Trainer(model=dmp, args=args, train_dataset=data, dense_optimizers=(dense, sched),
                   sparse_optimizer=sparse), dmp


def _flat(dmp, sparse):
    out = {}
    for key, value in dmp.state_dict().items():
        out[key] = (value.local_shards()[0].tensor if hasattr(value, "local_shards")
                    else value).clone()
    for key, value in sparse.state_dict()["state"].items():
        for name, t in value.items():
            out[f"opt.{key}.{name}"] = (t.local_shards()[0].tensor
                                        if hasattr(t, "local_shards") else t).clone()
    return out


@pytest.mark.parametrize(
    "opt,accum", [("rowwise_adagrad", 1), ("adagrad", 2), ("rowwise_adagrad", 3)]
)
def test_fused_resume_is_bitwise_identical(tmp_path, opt, accum):
    straight, dmp_a = _trainer(tmp_path / "a", 6, accum, opt)
    straight.train()
    first, _ = _trainer(tmp_path / "b", 3, accum, opt)
    first.train()
    resumed, dmp_b = _trainer(tmp_path / "b", 6, accum, opt)
    assert resumed.restore() == 3
    resumed.train()
    a = _flat(dmp_a, straight.sparse_optimizer.optimizer)
    b = _flat(dmp_b, resumed.sparse_optimizer.optimizer)
    assert a.keys() == b.keys()
    assert any(k.startswith("opt.") for k in a)  # optimizer state is compared too
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and the tables trained at all
    fresh, dmp_c = _trainer(tmp_path / "c", 1, accum, opt)
    c = _flat(dmp_c, fresh.sparse_optimizer.optimizer)
    table = next(k for k in a if "embedding_bags" in k and not k.startswith("opt."))
    assert not torch.equal(a[table], c[table])
