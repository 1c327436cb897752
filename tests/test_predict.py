"""Inference contract: ``model.predict(batch)`` gives probabilities, `Trainer.predict`
runs it over a dataset (in memory, streamed to a file, under torchrun gathered on rank
0), and a batch the model cannot read fails naming the feature or tensor."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recframe import Trainer, TrainingArguments
from recframe.data import SyntheticCriteo
from recframe.models import DLRM, DeepFM

ROOT = Path(__file__).resolve().parent.parent


def _model(name: str = "dlrm") -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "dlrm":
        return DLRM(num_embeddings=50, embedding_dim=4, num_dense=13, dense_arch=(8, 4),
                    over_arch=(8, 1))
    return DeepFM(num_embeddings=50, embedding_dim=4, num_dense=13, deep_arch=(8,))


def _data(n: int = 3, seed: int = 0) -> list[Batch]:
    return list(SyntheticCriteo(num_batches=n, batch_size=16, num_embeddings=50, seed=seed))


def _trainer(model: torch.nn.Module, tmp_path: Path) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none",
                             disable_tqdm=True)
    return Trainer(model=model, args=args)


@pytest.mark.parametrize("name", ["dlrm", "deepfm"])
def test_predict_is_sigmoid_of_the_logits_the_loss_uses(name: str) -> None:
    model = _model(name).eval()
    batch = _data(1)[0]
    with torch.no_grad():
        probs = model.predict(batch)
        logits = model.logits(batch)
        assert probs.shape == (16,) and bool(((probs > 0) & (probs < 1)).all())
        assert torch.allclose(probs, torch.sigmoid(logits))
        loss = torch.nn.functional.binary_cross_entropy(probs.double(), batch.labels.double())
        assert float(model(batch)) == pytest.approx(float(loss), rel=1e-5)


def test_trainer_predict_returns_predictions_and_labels(tmp_path: Path) -> None:
    model = _model()
    data = _data(3)
    result = _trainer(model, tmp_path).predict(data)
    with torch.no_grad():
        expected = torch.cat([model.predict(b) for b in data])
    assert result.num_samples == 48
    assert torch.equal(result.predictions, expected)
    assert torch.equal(result.labels, torch.cat([b.labels for b in data]))
    assert model.training  # the train/eval mode is given back


def test_trainer_predict_skips_an_empty_batch(tmp_path: Path) -> None:
    """A batch of 0 samples (torchrec cannot split its jagged tensor) contributes
    nothing instead of failing the whole prediction run."""
    model = _model()
    data = _data(2)
    b = data[0]
    kjt = b.sparse_features
    empty = Batch(b.dense_features[:0], KeyedJaggedTensor.from_lengths_sync(
        kjt.keys(), kjt.values()[:0], torch.zeros(0, dtype=torch.int32)), b.labels[:0])
    result = _trainer(model, tmp_path).predict([empty, data[0], empty, data[1]])
    with torch.no_grad():
        expected = torch.cat([model.predict(x) for x in data])
    assert result.num_samples == 32 and torch.equal(result.predictions, expected)
    assert torch.equal(result.labels, torch.cat([x.labels for x in data]))


def test_trainer_predict_on_a_dataloader_without_labels(tmp_path: Path) -> None:
    data = _data(2)

    class Unlabelled(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> dict:
            b = data[i]
            return {"dense_features": b.dense_features, "sparse_features": b.sparse_features}

    class Rows:  # what a model sees: attribute access over the loader's dicts
        def __init__(self, d: dict) -> None:
            self.__dict__.update(d)

        def to(self, device, non_blocking=False):  # noqa: ANN001
            return self

    loader = torch.utils.data.DataLoader(Unlabelled(), batch_size=None,
                                         collate_fn=lambda d: Rows(d))
    model = _model()
    result = _trainer(model, tmp_path).predict(loader)
    assert result.labels is None and result.num_samples == 32
    with torch.no_grad():
        assert torch.equal(result.predictions, torch.cat([model.predict(b) for b in data]))


@pytest.mark.parametrize("suffix", ["tsv", "parquet"])
def test_trainer_predict_streams_to_a_file(tmp_path: Path, suffix: str, monkeypatch) -> None:
    import recframe.predict as predict_mod

    monkeypatch.setattr(predict_mod, "FLUSH_ROWS", 20)  # several flushes
    model = _model()
    data = _data(3)
    path = str(tmp_path / f"preds.{suffix}")
    result = _trainer(model, tmp_path).predict(data, output=path)
    assert result.path == path and result.num_samples == 48
    assert result.predictions.numel() == 0
    if suffix == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        preds, labels = table["prediction"].to_numpy(), table["label"].to_numpy()
    else:
        rows = np.loadtxt(path, skiprows=1, delimiter="\t")
        preds, labels = rows[:, 0], rows[:, 1]
        assert open(path).readline() == "prediction\tlabel\n"
    with torch.no_grad():
        expected = torch.cat([model.predict(b) for b in data]).numpy()
    np.testing.assert_allclose(preds, expected, rtol=1e-7, atol=1e-8)
    np.testing.assert_array_equal(labels, torch.cat([b.labels for b in data]).numpy())


def test_predict_names_a_missing_feature_and_a_wrong_dtype() -> None:
    model = _model().eval()
    b = _data(1)[0]
    kjt = b.sparse_features
    keys = kjt.keys()[1:]  # cat_0 missing
    lengths = kjt.lengths().reshape(len(kjt.keys()), -1)[1:].reshape(-1)
    values = torch.cat([kjt[k].values() for k in keys])
    short = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths)
    with pytest.raises(ValueError, match=r"no feature\(s\) \['cat_0'\]"):
        model.predict(Batch(b.dense_features, short, b.labels))
    with pytest.raises(ValueError, match="dense_features must be floating point"):
        model.predict(Batch(b.dense_features.long(), kjt, b.labels))
    with pytest.raises(ValueError, match=r"dense_features must be \[B, 13\]"):
        model.predict(Batch(b.dense_features[:, :5], kjt, b.labels))
    floaty = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values().float(),
                               lengths=kjt.lengths())
    with pytest.raises(ValueError, match="values must be integer ids"):
        model.predict(Batch(b.dense_features, floaty, b.labels))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_predict_under_two_ranks_gathers_every_sample_on_rank_0(tmp_path: Path) -> None:
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RANK=str(rank),
                   WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / "tests/jobs/predict_job.py"), str(tmp_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    local = [np.load(tmp_path / f"local{r}.npz") for r in range(2)]
    per_rank = [[f[k] for k in sorted(f.files, key=lambda s: int(s.split("_")[1]))][:-1]
                for f in local]
    # step 0: rank 0, rank 1; step 1: rank 0, rank 1; step 2: rank 0 alone
    expected = np.concatenate([per_rank[0][0], per_rank[1][0], per_rank[0][1],
                               per_rank[1][1], per_rank[0][2]])
    got = np.load(tmp_path / "gathered.npz")
    assert got["predictions"].shape == (40,) and got["labels"].shape == (40,)
    np.testing.assert_allclose(got["predictions"], expected, rtol=0, atol=1e-6)
    assert int(got["n"]) == 40
    rows = np.loadtxt(tmp_path / "preds.tsv", skiprows=1, delimiter="\t")
    np.testing.assert_allclose(rows[:, 0], expected, atol=1e-6)
