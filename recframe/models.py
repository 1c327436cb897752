"""CTR models that follow the trainer's contract: ``model(batch)`` returns a scalar loss.

Each model also hands its logits to `recframe.metrics.add_predictions` so an active
evaluation can compute AUC. Embedding tables live only in the model's
`EmbeddingBagCollection` (``model.ebc``); everything else is dense, which is what the
sparse/dense parameter split of the optimizers relies on.

Embedding back ends (``embedding_backend=``): ``"torchrec"`` is torchrec's
`EmbeddingBagCollection` (fbgemm kernels, jagged `KeyedJaggedTensor` input, shardable);
``"nn"`` is `EmbeddingBagTables`, the same ``nn.EmbeddingBag`` tables (same parameter
names, same initial values, interchangeable checkpoints) pooled with plain torch ops
from fixed-shape `PaddedBags` input, which is what an XLA device (TPU) needs: no
fbgemm, and static shapes so the graph compiles once. ``"auto"`` picks ``"nn"`` for an
XLA ``device`` and ``"torchrec"`` otherwise; `recframe.xla.XLADevice` also swaps a
torchrec collection for `EmbeddingBagTables` when it places a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torchrec.datasets.utils import Batch
    from torchrec.models.dlrm import DLRM as TorchrecDLRM
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
except ImportError as e:  # recframe itself imports without torchrec; its models need it
    raise ImportError(
        f"recframe.models needs torchrec ({e}). Install it beside fbgemm-gpu-cpu with: "
        "pip install -r requirements/cpu.txt && pip install --no-deps -r "
        "requirements/torchrec.txt"
    ) from e

from recframe.data import DEFAULT_CAT_NAMES
from recframe.metrics import add_predictions
from recframe.schema import FeatureSchema

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


def build_ebc_from_schema(
    schema: FeatureSchema, device: DeviceLike = None
) -> EmbeddingBagCollection:
    """The schema's tables (sum pooling), each looked up by the sparse columns that name
    it: a table shared by several features is one table."""
    if not isinstance(schema, FeatureSchema):
        raise ValueError(f"schema must be a FeatureSchema, got {type(schema).__name__}")
    for t in schema.tables:
        if not t.name.isidentifier() or hasattr(nn.ModuleDict, t.name):
            ok = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in t.name)
            ok = ok if ok.isidentifier() and not hasattr(nn.ModuleDict, ok) else f"t_{ok}"
            users = [c.name for c in schema.sparse if c.table == t.name]
            raise ValueError(f"schema: table name {t.name!r} cannot name a module (an "
                             f"identifier that is no nn.ModuleDict attribute): set table: "
                             f"{ok} on sparse column(s) {users} (a column's table defaults to "
                             "its name), and rename the table where the schema's tables list "
                             "it")
    tables = [
        EmbeddingBagConfig(
            name=t.name,
            embedding_dim=t.embedding_dim,
            num_embeddings=t.num_embeddings,
            feature_names=[c.name for c in schema.sparse if c.table == t.name],
        )
        for t in schema.tables
    ]
    return EmbeddingBagCollection(tables=tables, device=_device(device))


def _schema_overrides(owner: str, schema: Optional[FeatureSchema], **given: Any) -> None:
    """With a schema, the table arguments come from it: refuse conflicting ones."""
    if schema is None:
        return
    if not isinstance(schema, FeatureSchema):
        raise ValueError(f"{owner}: schema must be a FeatureSchema, got {type(schema).__name__}")
    if not schema.dense:
        raise ValueError(f"{owner}: the schema has no dense column; {owner} needs at least one")
    set_ = sorted(k for k, v in given.items() if v is not None)
    if set_:
        raise ValueError(f"{owner}: {set_} come from the schema; do not pass them with schema=")


EMBEDDING_BACKENDS = ("auto", "torchrec", "nn")


class PaddedBags:
    """Fixed-shape sparse input for `EmbeddingBagTables`: every bag padded to
    ``bag_size`` ids.

    ``ids`` ``[F, B, L]`` int64 and ``weights`` ``[F, B, L]`` float32 (1 for an id, 0
    for a padding slot, whose id is 0), keyed by ``keys`` (feature names, in the order
    of the first dimension). Batches of one ``B`` and ``L`` have one shape, so an XLA
    graph over them compiles once. Duck-types the part of `KeyedJaggedTensor` that the
    models use (``keys()``, ``stride()``, ``to()``).
    """

    def __init__(self, keys: Sequence[str], ids: torch.Tensor, weights: torch.Tensor) -> None:
        if ids.dim() != 3 or ids.shape != weights.shape or ids.shape[0] != len(keys):
            raise ValueError(
                f"PaddedBags: ids and weights must both be [F={len(keys)}, B, L], got "
                f"{tuple(ids.shape)} and {tuple(weights.shape)}"
            )
        self._keys = list(keys)
        self.ids = ids
        self.weights = weights

    @classmethod
    def from_kjt(cls, kjt: KeyedJaggedTensor, bag_size: Optional[int] = None) -> PaddedBags:
        """Pad a (host, unweighted) `KeyedJaggedTensor`. ``bag_size`` defaults to the smallest power
        of two that holds the longest bag, so varying bag sizes give few shapes; a bag
        longer than an explicit ``bag_size`` is an error, never silently truncated."""
        keys = list(kjt.keys())
        num_keys, batch = len(keys), int(kjt.stride())
        lengths = kjt.lengths().to(torch.int64).reshape(num_keys * batch)
        longest = int(lengths.max()) if lengths.numel() else 0
        if bag_size is None:
            bag_size = 1 << max(0, math.ceil(math.log2(max(longest, 1))))
        elif bag_size < longest:
            raise ValueError(
                f"PaddedBags.from_kjt: a bag holds {longest} ids, more than bag_size={bag_size}"
            )
        values = kjt.values().to(torch.int64)
        rows = torch.repeat_interleave(torch.arange(num_keys * batch), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        slots = torch.arange(values.numel()) - starts[rows]
        ids = torch.zeros(num_keys * batch, bag_size, dtype=torch.int64)
        weights = torch.zeros(num_keys * batch, bag_size, dtype=torch.float32)
        ids[rows, slots] = values
        weights[rows, slots] = 1.0
        shape = (num_keys, batch, bag_size)
        return cls(keys, ids.view(shape), weights.view(shape))

    def keys(self) -> list[str]:
        return list(self._keys)

    def stride(self) -> int:
        """The batch size (as `KeyedJaggedTensor.stride`)."""
        return int(self.ids.shape[1])

    @property
    def bag_size(self) -> int:
        return int(self.ids.shape[2])

    def to(self, device: Any = None, non_blocking: bool = False) -> PaddedBags:
        return PaddedBags(
            self._keys,
            self.ids.to(device, non_blocking=non_blocking),
            self.weights.to(device, non_blocking=non_blocking),
        )

    def __repr__(self) -> str:
        return f"PaddedBags(keys={len(self._keys)}, shape={tuple(self.ids.shape)})"


class EmbeddingBagTables(nn.Module):
    """Pooled embedding tables as plain ``nn.EmbeddingBag`` modules: the ``"nn"`` back end.

    Holds the modules under ``embedding_bags.<table>`` exactly as torchrec's
    `EmbeddingBagCollection` does, so state-dict keys, checkpoints and the
    sparse/dense parameter split are the same for both back ends (`from_ebc` even
    reuses the collection's modules and parameters). ``forward`` takes `PaddedBags`
    (static shapes: what XLA needs) or a `KeyedJaggedTensor` (padded here, on the
    host) and returns a `KeyedTensor` like the collection.

    Pooling gathers rows with ``F.embedding`` and sums them weighted by the padding
    mask (``mean`` divides by the bag length): torch-xla lowers that to a gather, while
    ``F.embedding_bag`` would fall back to the CPU on every step. Gradients are dense
    (XLA has no sparse tensors); recframe's row-wise optimizers update the rows whose
    gradient is non-zero.
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        device: DeviceLike = None,
        embedding_bags: Optional[nn.ModuleDict] = None,
    ) -> None:
        super().__init__()
        self._configs = list(tables)
        if not self._configs:
            raise ValueError("EmbeddingBagTables: needs at least one table")
        if embedding_bags is None:  # same modules and initialisation as torchrec's
            ebc = EmbeddingBagCollection(tables=self._configs, device=_device(device))
            embedding_bags = ebc.embedding_bags
        self.embedding_bags = embedding_bags
        self._features: list[tuple[str, str]] = []  # (feature, table)
        for config in self._configs:
            mode = self.embedding_bags[config.name].mode
            if mode not in ("sum", "mean"):
                raise ValueError(
                    f"EmbeddingBagTables: table {config.name!r} pools with {mode!r}; only "
                    "sum and mean are supported"
                )
            self._features += [(f, config.name) for f in config.feature_names]

    @classmethod
    def from_ebc(cls, ebc: EmbeddingBagCollection) -> EmbeddingBagTables:
        """The same tables (the very modules and parameters) behind the nn back end."""
        if ebc.is_weighted():
            raise ValueError(
                "EmbeddingBagTables: weighted EmbeddingBagCollections are not supported"
            )
        return cls(ebc.embedding_bag_configs(), embedding_bags=ebc.embedding_bags)

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return list(self._configs)

    @property
    def feature_names(self) -> list[str]:
        return [f for f, _ in self._features]

    def forward(self, features: Union[PaddedBags, KeyedJaggedTensor]) -> KeyedTensor:
        if isinstance(features, KeyedJaggedTensor):
            features = PaddedBags.from_kjt(features)
        index = {k: i for i, k in enumerate(features.keys())}
        pooled = []
        for feature, table in self._features:
            if feature not in index:
                raise KeyError(f"EmbeddingBagTables: the input has no feature {feature!r}")
            i = index[feature]
            bag = self.embedding_bags[table]
            w = features.weights[i]
            rows = F.embedding(features.ids[i], bag.weight)  # [B, L, D]
            out = (rows * w.unsqueeze(-1).to(rows.dtype)).sum(dim=1)
            if bag.mode == "mean":
                out = out / w.sum(dim=1, keepdim=True).clamp(min=1).to(out.dtype)
            pooled.append(out.float())
        return KeyedTensor(
            keys=self.feature_names,
            length_per_key=[p.shape[1] for p in pooled],
            values=torch.cat(pooled, dim=1),
        )


def resolve_embedding_backend(backend: str, device: DeviceLike = None) -> str:
    """``"auto"`` -> ``"nn"`` for an XLA ``device``, else ``"torchrec"``."""
    if backend not in EMBEDDING_BACKENDS:
        raise ValueError(
            f"embedding_backend={backend!r} is invalid: must be one of {EMBEDDING_BACKENDS}"
        )
    if backend == "auto":
        dev = _device(device)
        return "nn" if dev is not None and dev.type == "xla" else "torchrec"
    return backend


def _device(device: DeviceLike) -> Optional[torch.device]:
    return None if device is None else torch.device(device)


def dynamic_remapper(schema: Optional[FeatureSchema], device: DeviceLike = None
                     ) -> Optional[nn.Module]:
    """The id->row maps of the schema's dynamic tables (`recframe.dynamic`), or None."""
    if schema is None or not schema.dynamic_tables():
        return None
    from recframe.dynamic import DynamicIdRemapper

    return DynamicIdRemapper(schema, _device(device))


def _sparse_input(model: nn.Module, batch: Batch) -> Any:
    """The batch's sparse features, dynamic-table ids mapped to rows."""
    dynamic = getattr(model, "dynamic", None)
    return batch.sparse_features if dynamic is None else dynamic(batch.sparse_features)


def _loss(logits: torch.Tensor, labels: torch.Tensor,
          weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean BCE; with per-sample ``weights`` (a schema's weight column) the weighted mean
    ``sum(w * bce) / sum(w)``."""
    if labels.dim() != 1:
        raise ValueError(f"the models predict one label per sample; got labels of shape "
                         f"{tuple(labels.shape)} (a schema with several label columns)")
    add_predictions(logits, labels)
    if weights is None:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    w = weights.float()
    per_sample = F.binary_cross_entropy_with_logits(logits.float(), labels.float(),
                                                    reduction="none")
    return (per_sample * w).sum() / w.sum().clamp(min=torch.finfo(torch.float32).tiny)


def check_batch(model: nn.Module, batch: Any) -> None:
    """Refuse a batch the model cannot read, naming the tensor or feature: dense
    features must be floating ``[B, num_dense]``, the sparse features must hold every
    feature the model embeds (extra keys are refused by the tables themselves)."""
    owner = type(model).__name__
    dense = getattr(batch, "dense_features", None)
    sparse = getattr(batch, "sparse_features", None)
    if not isinstance(dense, torch.Tensor):
        raise ValueError(f"{owner}: batch.dense_features must be a tensor, got "
                         f"{type(dense).__name__}")
    if not dense.is_floating_point():
        raise ValueError(f"{owner}: batch.dense_features must be floating point, got "
                         f"{dense.dtype}")
    if dense.dim() != 2 or dense.shape[1] != model.num_dense:  # type: ignore[operator]
        raise ValueError(f"{owner}: batch.dense_features must be [B, {model.num_dense}], "
                         f"got {tuple(dense.shape)}")
    keys = getattr(sparse, "keys", None)
    if not callable(keys):
        raise ValueError(f"{owner}: batch.sparse_features must be a KeyedJaggedTensor, got "
                         f"{type(sparse).__name__}")
    present = set(keys())
    missing = [f for f in model.sparse_features if f not in present]  # type: ignore[union-attr]
    if missing:
        raise ValueError(f"{owner}: batch.sparse_features has no feature(s) {missing}; the "
                         f"model embeds {model.sparse_features}")
    if isinstance(sparse, KeyedJaggedTensor):
        values = sparse.values()
        if values.is_floating_point() or values.dtype == torch.bool:
            raise ValueError(f"{owner}: batch.sparse_features values must be integer ids, "
                             f"got {values.dtype}")


def _embedding_tables(
    model: nn.Module,
    owner: str,
    schema: Optional[FeatureSchema],
    num_embeddings: Union[int, Sequence[int], None],
    embedding_dim: Optional[int],
    num_dense: Optional[int],
    sparse_features: Optional[Sequence[str]],
    device: DeviceLike,
) -> EmbeddingBagCollection:
    """The tables of a built-in model, from ``schema`` or from the explicit sizes (the
    defaults: Criteo's 26 features, 10k rows, dim 16, 13 dense), validated; sets the
    model's ``schema``, ``num_dense``, ``sparse_features`` and ``embedding_dim``."""
    _schema_overrides(owner, schema, num_embeddings=num_embeddings,
                      embedding_dim=embedding_dim, num_dense=num_dense,
                      sparse_features=sparse_features)
    if schema is not None:
        embedding_dim, num_dense = schema.embedding_dim, len(schema.dense)
        sparse_features = schema.feature_names
    num_embeddings = 10_000 if num_embeddings is None else num_embeddings
    sparse_features = DEFAULT_CAT_NAMES if sparse_features is None else sparse_features
    model.schema = schema
    model.embedding_dim = _positive_int(owner, "embedding_dim",
                                        16 if embedding_dim is None else embedding_dim)
    model.num_dense = _positive_int(owner, "num_dense", 13 if num_dense is None else num_dense)
    model.sparse_features = list(sparse_features)
    if schema is not None:
        return build_ebc_from_schema(schema, device)
    return build_ebc(sparse_features, num_embeddings, model.embedding_dim, device, owner)


class DLRM(nn.Module):
    """DLRM (torchrec's `DLRM`: bottom MLP, pairwise dot interactions, top MLP).

    ``dense_arch`` defaults to ``(128, embedding_dim)``; its last size must equal
    ``embedding_dim`` because the bottom MLP output joins the embeddings in the dot
    interaction. ``over_arch`` must end in 1 (one logit per sample).
    ``embedding_backend``: see the module docstring (``"nn"`` for XLA).
    ``schema``: a `FeatureSchema` giving the tables (shared tables included), the
    sparse features and ``num_dense``; then leave ``num_embeddings``, ``embedding_dim``,
    ``num_dense`` and ``sparse_features`` out.
    """

    def __init__(
        self,
        num_embeddings: Union[int, Sequence[int], None] = None,
        embedding_dim: Optional[int] = None,
        num_dense: Optional[int] = None,
        sparse_features: Optional[Sequence[str]] = None,
        dense_arch: Optional[Sequence[int]] = None,
        over_arch: Sequence[int] = (128, 1),
        device: DeviceLike = None,
        embedding_backend: str = "auto",
        schema: Optional[FeatureSchema] = None,
    ) -> None:
        super().__init__()
        owner = "DLRM"
        ebc = _embedding_tables(self, owner, schema, num_embeddings, embedding_dim, num_dense,
                                sparse_features, device)
        embedding_dim = self.embedding_dim
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
        self.model = TorchrecDLRM(
            embedding_bag_collection=ebc,
            dense_in_features=self.num_dense,
            dense_arch_layer_sizes=dense_sizes,
            over_arch_layer_sizes=over_sizes,
            dense_device=_device(device),
        )
        self.embedding_backend = resolve_embedding_backend(embedding_backend, device)
        if self.embedding_backend == "nn":  # same tables, same place, same initial values
            self.model.sparse_arch.embedding_bag_collection = EmbeddingBagTables.from_ebc(ebc)
        self.dynamic = dynamic_remapper(schema, device)

    @property
    def ebc(self) -> nn.Module:
        """The embedding tables (registered once, inside torchrec's DLRM, so sharding
        sees one module at one path)."""
        return self.model.sparse_arch.embedding_bag_collection

    def logits(self, batch: Batch) -> torch.Tensor:
        """Logits ``[B]`` (no sigmoid)."""
        check_batch(self, batch)
        return self.model(batch.dense_features, _sparse_input(self, batch)).squeeze(-1)

    def predict(self, batch: Batch) -> torch.Tensor:
        """Click probabilities ``[B]`` (``sigmoid(logits)``); no labels needed."""
        return torch.sigmoid(self.logits(batch).float())

    def forward(self, batch: Batch) -> torch.Tensor:
        """Mean binary cross-entropy over the batch."""
        return _loss(self.logits(batch), batch.labels, getattr(batch, "weights", None))


class DeepFM(nn.Module):
    """DeepFM (Guo et al. 2017) over an `EmbeddingBagCollection`.

    The dense features are projected to one more ``embedding_dim`` field; then
    ``logit = linear(dense) + FM(fields) + MLP(concat(fields))``, where the FM term is
    the sum of pairwise dot products of the fields. Written out here rather than with
    torchrec's ``SimpleDeepFMNN``, whose last layer is a sigmoid (probabilities, not
    the logits BCE-with-logits and AUC need). Unlike the paper there is no per-id
    first-order weight (it would need width-1 tables); the deep part covers it.
    ``embedding_backend`` and ``schema`` as in `DLRM`.
    """

    def __init__(
        self,
        num_embeddings: Union[int, Sequence[int], None] = None,
        embedding_dim: Optional[int] = None,
        num_dense: Optional[int] = None,
        sparse_features: Optional[Sequence[str]] = None,
        deep_arch: Sequence[int] = (256, 128),
        device: DeviceLike = None,
        embedding_backend: str = "auto",
        schema: Optional[FeatureSchema] = None,
    ) -> None:
        super().__init__()
        owner = "DeepFM"
        ebc = _embedding_tables(self, owner, schema, num_embeddings, embedding_dim, num_dense,
                                sparse_features, device)
        embedding_dim = self.embedding_dim
        hidden = _layer_sizes(owner, "deep_arch", deep_arch)
        self.embedding_backend = resolve_embedding_backend(embedding_backend, device)
        self.ebc = EmbeddingBagTables.from_ebc(ebc) if self.embedding_backend == "nn" else ebc
        self.dynamic = dynamic_remapper(schema, device)
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

    def logits(self, batch: Batch) -> torch.Tensor:
        """Logits ``[B]`` (no sigmoid)."""
        check_batch(self, batch)
        pooled = self.ebc(_sparse_input(self, batch)).to_dict()
        fields = [self.dense_proj(batch.dense_features)]
        fields += [pooled[name] for name in self.sparse_features]
        stacked = torch.stack(fields, dim=1)  # [B, F + 1, D]
        fm = 0.5 * (stacked.sum(dim=1).pow(2) - stacked.pow(2).sum(dim=1)).sum(dim=1)
        deep = self.deep(stacked.flatten(1)).squeeze(-1)
        return self.dense_linear(batch.dense_features).squeeze(-1) + fm + deep

    def predict(self, batch: Batch) -> torch.Tensor:
        """Click probabilities ``[B]`` (``sigmoid(logits)``); no labels needed."""
        return torch.sigmoid(self.logits(batch).float())

    def forward(self, batch: Batch) -> torch.Tensor:
        """Mean binary cross-entropy over the batch."""
        return _loss(self.logits(batch), batch.labels, getattr(batch, "weights", None))


MODELS: dict[str, Callable[..., nn.Module]] = {"dlrm": DLRM, "deepfm": DeepFM}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """The model registered as ``name`` (case-insensitive), built with ``kwargs``."""
    model_cls = MODELS.get(name.lower()) if isinstance(name, str) else None
    if model_cls is None:
        raise ValueError(f"build_model: unknown model {name!r}; choices: {sorted(MODELS)}")
    return model_cls(**kwargs)
