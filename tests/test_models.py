"""Tests of recframe.models: loss contract, gradients, predictions, registry, learning."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recframe.data import DEFAULT_CAT_NAMES, SyntheticCriteo
from recframe.metrics import collect_predictions
from recframe.models import DLRM, MODELS, DeepFM, build_model

SMALL = {"num_embeddings": 100, "embedding_dim": 8}


def _small(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    extra = {"dense_arch": (16, 8), "over_arch": (16, 1)} if name == "dlrm" else {}
    return build_model(name, **{**SMALL, **extra, **kwargs})


def _batch(**kwargs):
    args = {"num_batches": 1, "batch_size": 32, "num_embeddings": 100, **kwargs}
    return SyntheticCriteo(**args).generate(0)


def _embedding_params(model: nn.Module) -> set[int]:
    """Parameters of embedding modules, the way the sparse/dense split finds them."""
    kinds = (EmbeddingBagCollection, nn.EmbeddingBag, nn.Embedding)
    return {id(p) for m in model.modules() if isinstance(m, kinds) for p in m.parameters()}


@pytest.mark.parametrize("name", ["dlrm", "deepfm"])
def test_loss_is_scalar_and_gradients_reach_tables_and_mlp(name: str) -> None:
    model = _small(name)
    batch = _batch(ids_per_feature=(0, 3))
    loss = model(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    tables = dict(model.ebc.named_parameters())
    assert len(tables) == 26
    used = batch.sparse_features["cat_0"].values().unique()
    grad = next(p for n, p in tables.items() if "t_cat_0" in n).grad
    assert grad is not None
    assert grad[used].abs().sum() > 0
    unused = torch.ones(grad.shape[0], dtype=torch.bool)
    unused[used] = False
    assert grad[unused].abs().sum() == 0
    sparse = _embedding_params(model)
    dense = [p for p in model.parameters() if id(p) not in sparse]
    assert dense, "the MLP parameters must not live in embedding modules"
    assert all(p.grad is not None for p in dense)
    assert sum(float(p.grad.abs().sum()) for p in dense) > 0


@pytest.mark.parametrize("name", ["dlrm", "deepfm"])
def test_loss_is_bce_of_predict_and_predictions_are_collected(name: str) -> None:
    model = _small(name)
    batch = _batch()
    with torch.no_grad():
        logits = model.logits(batch)
        assert torch.allclose(model.predict(batch), torch.sigmoid(logits))
        assert logits.shape == (32,)
        expected = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        with collect_predictions() as collector:
            loss = model(batch)
        assert torch.allclose(loss, expected)
        assert len(collector) == 32
        assert torch.allclose(collector.logits[0], logits)
        assert torch.equal(collector.labels[0], batch.labels)
        model(batch)  # outside an evaluation nothing is collected, nothing fails
    assert len(collector) == 32


@pytest.mark.parametrize("name", ["dlrm", "deepfm"])
def test_embeddings_live_only_in_the_ebc(name: str) -> None:
    model = _small(name, num_embeddings=[10 + i for i in range(26)])
    assert isinstance(model.ebc, EmbeddingBagCollection)
    assert _embedding_params(model) == {id(p) for p in model.ebc.parameters()}
    configs = model.ebc.embedding_bag_configs()
    assert [c.name for c in configs] == [f"t_{f}" for f in DEFAULT_CAT_NAMES]
    assert [c.feature_names for c in configs] == [[f] for f in DEFAULT_CAT_NAMES]
    assert [c.num_embeddings for c in configs] == [10 + i for i in range(26)]


def test_dlrm_wraps_torchrec_dlrm() -> None:
    from torchrec.models.dlrm import DLRM as TorchrecDLRM

    model = DLRM(num_embeddings=50, embedding_dim=4, dense_arch=(8, 4), over_arch=(8, 1))
    assert isinstance(model.model, TorchrecDLRM)
    assert model.model.sparse_arch.embedding_bag_collection is model.ebc


def test_custom_features_and_dense_width() -> None:
    features = ["user", "item", "shop"]
    batch = _batch(num_sparse=3, num_dense=5)
    renamed = type(batch)(
        dense_features=batch.dense_features,
        sparse_features=type(batch.sparse_features)(
            keys=features,
            values=batch.sparse_features.values(),
            lengths=batch.sparse_features.lengths(),
        ),
        labels=batch.labels,
    )
    for name in ("dlrm", "deepfm"):
        model = _small(name, num_dense=5, sparse_features=features)
        assert model(renamed).dim() == 0


@pytest.fixture
def one_thread():
    """Small models train faster on one thread, and much faster on a busy machine,
    where OpenMP workers wait on each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("name", ["dlrm", "deepfm"])
def test_short_training_learns_synthetic_labels(name: str, one_thread: None) -> None:
    torch.manual_seed(0)
    n = 1000
    model = _small(name, num_embeddings=n)
    sparse = _embedding_params(model)
    # DeepFM's pairwise FM term wants a gentler embedding learning rate.
    sparse_lr, dense_lr = (0.1, 3e-3) if name == "dlrm" else (0.01, 1e-2)
    opt_sparse = torch.optim.Adagrad(model.ebc.parameters(), lr=sparse_lr)
    opt_dense = torch.optim.Adam(
        [p for p in model.parameters() if id(p) not in sparse], lr=dense_lr
    )
    for batch in SyntheticCriteo(num_batches=100, batch_size=256, num_embeddings=n, seed=1):
        loss = model(batch)
        opt_sparse.zero_grad()
        opt_dense.zero_grad()
        loss.backward()
        opt_sparse.step()
        opt_dense.step()
    model.eval()
    evaluation = SyntheticCriteo(num_batches=4, batch_size=512, num_embeddings=n, seed=2)
    with torch.no_grad(), collect_predictions() as collector:
        for batch in evaluation:
            model(batch)
    assert collector.compute()["auc"] > 0.6


def test_build_model_registry() -> None:
    assert set(MODELS) == {"dlrm", "deepfm"}
    assert isinstance(build_model("dlrm", **SMALL, dense_arch=(8, 8)), DLRM)
    assert isinstance(build_model("DeepFM", **SMALL), DeepFM)
    with pytest.raises(ValueError, match="unknown model 'wide'.*deepfm.*dlrm"):
        build_model("wide")
    with pytest.raises(ValueError, match="choices"):
        build_model(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "cls, kwargs, needle",
    [
        (DLRM, {"embedding_dim": 16, "dense_arch": (32, 8)}, "dense_arch must end with"),
        (DLRM, {"over_arch": (16, 2)}, "over_arch"),
        (DLRM, {"over_arch": (1,)}, "over_arch"),
        (DLRM, {"num_embeddings": [10, 10]}, "num_embeddings"),
        (DLRM, {"num_embeddings": 0}, "num_embeddings"),
        (DLRM, {"embedding_dim": 0}, "embedding_dim"),
        (DLRM, {"sparse_features": []}, "sparse_features"),
        (DLRM, {"sparse_features": ["a", "a"]}, "sparse_features"),
        (DeepFM, {"deep_arch": ()}, "deep_arch"),
        (DeepFM, {"num_dense": 0}, "num_dense"),
        (DeepFM, {"sparse_features": "cat_0"}, "sparse_features"),
    ],
)
def test_bad_model_arguments(cls: type, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        cls(**kwargs)
