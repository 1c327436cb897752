"""CTR models that follow the trainer's contract: ``model(batch)`` returns a scalar loss.

Each model also hands its logits to `recframe.metrics.add_predictions` so an active
evaluation can compute AUC. Embedding tables live only in the model's
`EmbeddingBagCollection` (``model.ebc``); everything else is dense, which is what the
sparse/dense parameter split of the optimizers relies on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM as TorchrecDLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recframe.data import DEFAULT_CAT_NAMES
from recframe.metrics import add_predictions

DeviceLike = Union[torch.device, str, None]


def _positive_int(owner: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")
    return value


def _layer_sizes(owner: str, name: str, sizes: Any, min_len: int = 1) -> list[int]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) < min_len:
        raise ValueError(
            f"{owner}: {name} must be a sequence of at least {min_len} layer size(s), got {sizes!r}"
        )
    return [_positive_int(owner, f"{name} entries", s) for s in sizes]


def build_ebc(
    sparse_features: Sequence[str],
    num_embeddings: Union[int, Sequence[int]],
    embedding_dim: int,
    device: DeviceLike = None,
    owner: str = "build_ebc",
) -> EmbeddingBagCollection:
    """One table ``t_<feature>`` per categorical feature (sum pooling)."""
    features = list(sparse_features)
    if isinstance(sparse_features, str) or not features:
        raise ValueError(f"{owner}: sparse_features must be a non-empty list of feature names")
    if not all(isinstance(f, str) and f for f in features):
        raise ValueError(f"{owner}: sparse_features must be non-empty strings, got {features!r}")
    if len(set(features)) != len(features):
        raise ValueError(f"{owner}: sparse_features has duplicates: {features!r}")
    if isinstance(num_embeddings, (list, tuple)):
        if len(num_embeddings) != len(features):
            raise ValueError(
                f"{owner}: num_embeddings has {len(num_embeddings)} entries for "
                f"{len(features)} sparse features"
            )
        sizes = [_positive_int(owner, "num_embeddings", n) for n in num_embeddings]
    else:
        sizes = [_positive_int(owner, "num_embeddings", num_embeddings)] * len(features)
    _positive_int(owner, "embedding_dim", embedding_dim)
    tables = [
        EmbeddingBagConfig(
            name=f"t_{feature}",
            embedding_dim=embedding_dim,
            num_embeddings=size,
            feature_names=[feature],
        )
        for feature, size in zip(features, sizes)
    ]
    return EmbeddingBagCollection(tables=tables, device=_device(device))


def _device(device: DeviceLike) -> Optional[torch.device]:
    return None if device is None else torch.device(device)


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    add_predictions(logits, labels)
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class DLRM(nn.Module):
    """DLRM (torchrec's `DLRM`: bottom MLP, pairwise dot interactions, top MLP).

    ``dense_arch`` defaults to ``(128, embedding_dim)``; its last size must equal
    ``embedding_dim`` because the bottom MLP output joins the embeddings in the dot
    interaction. ``over_arch`` must end in 1 (one logit per sample).
    """

    def __init__(
        self,
        num_embeddings: Union[int, Sequence[int]] = 10_000,
        embedding_dim: int = 16,
        num_dense: int = 13,
        sparse_features: Sequence[str] = tuple(DEFAULT_CAT_NAMES),
        dense_arch: Optional[Sequence[int]] = None,
        over_arch: Sequence[int] = (128, 1),
        device: DeviceLike = None,
    ) -> None:
        super().__init__()
        owner = "DLRM"
        embedding_dim = _positive_int(owner, "embedding_dim", embedding_dim)
        self.num_dense = _positive_int(owner, "num_dense", num_dense)
        dense_sizes = _layer_sizes(
            owner, "dense_arch", (128, embedding_dim) if dense_arch is None else dense_arch
        )
        if dense_sizes[-1] != embedding_dim:
            raise ValueError(
                f"DLRM: dense_arch must end with embedding_dim ({embedding_dim}) so the "
                f"dense output can interact with the embeddings, got {dense_sizes}"
            )
        over_sizes = _layer_sizes(owner, "over_arch", over_arch, min_len=2)
        if over_sizes[-1] != 1:
            raise ValueError(f"DLRM: over_arch must end with 1 (one logit), got {over_sizes}")
        self.sparse_features = list(sparse_features)
        self.embedding_dim = embedding_dim
        ebc = build_ebc(sparse_features, num_embeddings, embedding_dim, device, owner)
        self.model = TorchrecDLRM(
            embedding_bag_collection=ebc,
            dense_in_features=self.num_dense,
            dense_arch_layer_sizes=dense_sizes,
            over_arch_layer_sizes=over_sizes,
            dense_device=_device(device),
        )

    @property
    def ebc(self) -> nn.Module:
        """The embedding tables (registered once, inside torchrec's DLRM, so sharding
        sees one module at one path)."""
        return self.model.sparse_arch.embedding_bag_collection

    def predict(self, batch: Batch) -> torch.Tensor:
        """Logits ``[B]`` (no sigmoid)."""
        return self.model(batch.dense_features, batch.sparse_features).squeeze(-1)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Mean binary cross-entropy over the batch."""
        return _loss(self.predict(batch), batch.labels)


class DeepFM(nn.Module):
    """DeepFM (Guo et al. 2017) over an `EmbeddingBagCollection`.

    The dense features are projected to one more ``embedding_dim`` field; then
    ``logit = linear(dense) + FM(fields) + MLP(concat(fields))``, where the FM term is
    the sum of pairwise dot products of the fields. Written out here rather than with
    torchrec's ``SimpleDeepFMNN``, whose last layer is a sigmoid (probabilities, not
    the logits BCE-with-logits and AUC need). Unlike the paper there is no per-id
    first-order weight (it would need width-1 tables); the deep part covers it.
    """

    def __init__(
        self,
        num_embeddings: Union[int, Sequence[int]] = 10_000,
        embedding_dim: int = 16,
        num_dense: int = 13,
        sparse_features: Sequence[str] = tuple(DEFAULT_CAT_NAMES),
        deep_arch: Sequence[int] = (256, 128),
        device: DeviceLike = None,
    ) -> None:
        super().__init__()
        owner = "DeepFM"
        embedding_dim = _positive_int(owner, "embedding_dim", embedding_dim)
        self.num_dense = _positive_int(owner, "num_dense", num_dense)
        hidden = _layer_sizes(owner, "deep_arch", deep_arch)
        self.sparse_features = list(sparse_features)
        self.embedding_dim = embedding_dim
        self.ebc = build_ebc(sparse_features, num_embeddings, embedding_dim, device, owner)
        dev = _device(device)
        self.dense_linear = nn.Linear(self.num_dense, 1, device=dev)
        self.dense_proj = nn.Linear(self.num_dense, embedding_dim, device=dev)
        layers: list[nn.Module] = []
        width = (len(self.sparse_features) + 1) * embedding_dim
        for size in hidden:
            layers += [nn.Linear(width, size, device=dev), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1, device=dev))
        self.deep = nn.Sequential(*layers)

    def predict(self, batch: Batch) -> torch.Tensor:
        """Logits ``[B]`` (no sigmoid)."""
        pooled = self.ebc(batch.sparse_features).to_dict()
        fields = [self.dense_proj(batch.dense_features)]
        fields += [pooled[name] for name in self.sparse_features]
        stacked = torch.stack(fields, dim=1)  # [B, F + 1, D]
        fm = 0.5 * (stacked.sum(dim=1).pow(2) - stacked.pow(2).sum(dim=1)).sum(dim=1)
        deep = self.deep(stacked.flatten(1)).squeeze(-1)
        return self.dense_linear(batch.dense_features).squeeze(-1) + fm + deep

    def forward(self, batch: Batch) -> torch.Tensor:
        """Mean binary cross-entropy over the batch."""
        return _loss(self.predict(batch), batch.labels)


MODELS: dict[str, Callable[..., nn.Module]] = {"dlrm": DLRM, "deepfm": DeepFM}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """The model registered as ``name`` (case-insensitive), built with ``kwargs``."""
    model_cls = MODELS.get(name.lower()) if isinstance(name, str) else None
    if model_cls is None:
        raise ValueError(f"build_model: unknown model {name!r}; choices: {sorted(MODELS)}")
    return model_cls(**kwargs)
