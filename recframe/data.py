"""Datasets of Criteo-style CTR batches, and `batch_size_of` for the trainer.

Both datasets yield `torchrec.datasets.utils.Batch` objects (dense features
``[B, num_dense]`` float32, sparse features as a `KeyedJaggedTensor` keyed by
``cat_0..cat_{n-1}``, labels ``[B]`` float32) and keep their own position:
``state_dict()`` called right after a batch was received describes the data *after*
that batch, so a checkpoint resumes at exactly the next unconsumed sample even though
the trainer reads one batch ahead.

They are batch-level datasets meant to be iterated directly (or through a
``DataLoader(batch_size=None, num_workers=0)``): in worker processes the position
would live in the workers, out of reach of ``state_dict()``. The position belongs to
the dataset, so keep one live iterator per dataset object at a time.

torchrec is imported lazily, so `batch_size_of` (used by the trainer) works without it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
from torch.utils.data import IterableDataset

if TYPE_CHECKING:
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

# Same names as torchrec.datasets.criteo.DEFAULT_INT_NAMES / DEFAULT_CAT_NAMES (a test
# checks it); spelled out here so importing this module does not import torchrec.
DEFAULT_INT_NAMES: list[str] = [f"int_{i}" for i in range(13)]
DEFAULT_CAT_NAMES: list[str] = [f"cat_{i}" for i in range(26)]

_MASK64 = (1 << 64) - 1


def int_feature_names(num_dense: int) -> list[str]:
    """``int_0 .. int_{num_dense-1}`` (Criteo's dense feature names)."""
    return [f"int_{i}" for i in range(num_dense)]


def cat_feature_names(num_sparse: int) -> list[str]:
    """``cat_0 .. cat_{num_sparse-1}``: the KJT keys both datasets use."""
    return [f"cat_{i}" for i in range(num_sparse)]


# --------------------------------------------------------------------------- batch size


def batch_size_of(batch: Any) -> int:
    """Number of samples in ``batch``, whatever its container.

    `Batch` (or anything with ``labels``) -> ``labels.shape[0]``; a tensor -> its first
    dimension; a `KeyedJaggedTensor` -> its stride; an object with ``batch_size`` (an
    int or a ``torch.Size``) -> that; a dict -> its ``"labels"`` (or ``"label"``) entry
    if any, else the first value with a size; a list of dicts -> its length (one dict a
    sample); a list/tuple -> the size most of its elements share (a tie: the first
    element's), so EmbeddingBag's flat ``(ids, offsets, labels)`` counts samples, not ids.
    Raises ValueError when no size can be found.
    """
    size = _find_batch_size(batch)
    if size is None:
        raise ValueError(
            f"batch_size_of: cannot tell the number of samples in a {type(batch).__name__}: "
            "expected a Batch, a tensor with a batch dimension, a KeyedJaggedTensor, an "
            "object with `labels` or `batch_size`, or a dict/list/tuple holding a tensor"
        )
    return size


def _find_batch_size(obj: Any) -> Optional[int]:
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0]) if obj.dim() > 0 else None
    if type(obj) is dict or isinstance(obj, Mapping):  # a dict skips the ABC check
        for key in ("labels", "label"):
            if key in obj:
                value = obj[key]
                if isinstance(value, torch.Tensor):  # the usual labels: no recursion
                    found = int(value.shape[0]) if value.dim() > 0 else None
                else:
                    found = _find_batch_size(value)
                if found is not None:
                    return found
        for value in obj.values():
            found = _find_batch_size(value)
            if found is not None:
                return found
        return None
    if isinstance(obj, (list, tuple)):
        if obj and all(isinstance(v, Mapping) for v in obj):
            return len(obj)  # a list of samples (a collate_fn that keeps them apart)
        sizes = [s for s in map(_find_batch_size, obj) if s is not None]
        if not sizes:
            return None
        # elements that disagree: EmbeddingBag's flat ids beside per-sample offsets and
        # labels; the size most elements share wins (a tie: the first element's)
        return max(sizes, key=sizes.count)
    labels = getattr(obj, "labels", None)
    if labels is not None and not callable(labels):
        found = _find_batch_size(labels)
        if found is not None:
            return found
    stride = getattr(obj, "stride", None)
    if callable(stride) and callable(getattr(obj, "lengths", None)):  # KeyedJaggedTensor
        return int(stride())
    size = getattr(obj, "batch_size", None)
    if isinstance(size, torch.Size):
        return int(size[0]) if len(size) > 0 else None
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    return None


# --------------------------------------------------------------------------- KJT helper


def make_kjt(
    keys: Sequence[str],
    values: torch.Tensor,
    lengths: torch.Tensor,
    batch_size: Optional[int] = None,
) -> KeyedJaggedTensor:
    """A `KeyedJaggedTensor` from flat key-major ``values`` and ``lengths``.

    ``lengths`` is ``[len(keys), B]`` or flat ``[len(keys) * B]`` in key-major order (all
    of key 0's bag sizes for the batch, then key 1's, ...); ``values`` holds the ids in
    the same order. Values become int64 and lengths int32 (what torchrec's own Criteo
    pipeline produces). Shapes are checked here, where a mistake is still cheap to see.
    """
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    num_keys = len(keys)
    if num_keys == 0:
        raise ValueError("make_kjt: keys must not be empty")
    if lengths.dim() == 2:
        if lengths.shape[0] != num_keys:
            raise ValueError(f"make_kjt: lengths has {lengths.shape[0]} rows for {num_keys} keys")
        lengths = lengths.reshape(-1)
    elif lengths.dim() != 1:
        raise ValueError(f"make_kjt: lengths must be 1-D or 2-D, got shape {tuple(lengths.shape)}")
    if lengths.numel() % num_keys:
        raise ValueError(
            f"make_kjt: {lengths.numel()} lengths do not split evenly over {num_keys} keys"
        )
    stride = lengths.numel() // num_keys
    if batch_size is not None and batch_size != stride:
        raise ValueError(f"make_kjt: lengths give batch size {stride}, expected {batch_size}")
    if values.dim() != 1:
        raise ValueError(f"make_kjt: values must be 1-D, got shape {tuple(values.shape)}")
    if lengths.device.type == "cpu" and int(lengths.sum()) != values.numel():
        raise ValueError(
            f"make_kjt: lengths sum to {int(lengths.sum())} but there are {values.numel()} values"
        )
    return KeyedJaggedTensor(
        keys=list(keys),
        values=values.to(torch.int64),
        lengths=lengths.to(torch.int32),
        stride=stride,
    )


def _make_batch(dense: torch.Tensor, kjt: KeyedJaggedTensor, labels: torch.Tensor) -> Batch:
    from torchrec.datasets.utils import Batch

    return Batch(dense_features=dense, sparse_features=kjt, labels=labels)


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_rank(rank: Any, world_size: Any) -> tuple[int, int]:
    world_size = _check_int("world_size", world_size, 1)
    rank = _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
    return rank, world_size


def _per_feature_sizes(num_embeddings: Any, num_sparse: int) -> list[int]:
    if isinstance(num_embeddings, (list, tuple)):
        if len(num_embeddings) != num_sparse:
            raise ValueError(
                f"num_embeddings has {len(num_embeddings)} entries for {num_sparse} "
                "sparse features; give one per feature or a single int"
            )
        return [_check_int("num_embeddings", n, 1) for n in num_embeddings]
    return [_check_int("num_embeddings", num_embeddings, 1)] * num_sparse


# --------------------------------------------------------------------------- synthetic


def _mix(*parts: int) -> int:
    """splitmix64 over ``parts``: a well-spread 63-bit generator seed."""
    x = 0x243F6A8885A308D3
    for part in parts:
        x = (x ^ (part & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


_DENSE_MU = 1.0
_DENSE_SIGMA = 1.5


def _dense_sample(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """log(1 + floor(exp(N(mu, sigma)))): Criteo-like counts, already log-transformed."""
    raw = torch.randn(shape, generator=generator).mul_(_DENSE_SIGMA).add_(_DENSE_MU).exp_()
    return raw.floor_().log1p_()


@lru_cache(maxsize=1)
def _dense_moments() -> tuple[float, float]:
    """Mean and std of `_dense_sample`, to standardise the dense part of the logit."""
    sample = _dense_sample((1 << 18,), torch.Generator().manual_seed(12345))
    return float(sample.mean()), float(sample.std())


class SyntheticCriteo(IterableDataset):
    """Deterministic Criteo-like batches whose labels can be learned.

    Global batch ``i`` is a pure function of ``(seed, i)`` (its own `torch.Generator`),
    so resuming is exact and ranks never overlap: rank ``r`` reads the global batches
    ``i`` with ``i % world_size == r``. With ``num_batches`` finite every rank gets
    ``num_batches // world_size`` batches (the remainder is dropped, so all ranks take
    the same number of steps and none waits forever in a collective); ``None`` is
    endless. Every epoch repeats the same batches.

    Features:
      * dense: ``log(1 + floor(exp(N(1, 1.5))))``: non-negative counts, already passed
        through the same ``log(1 + x)`` that `CriteoTSVDataset` applies.
      * sparse: bags of ids per feature (``ids_per_feature``: a fixed size, or
        ``(lo, hi)`` for sizes uniform in ``[lo, hi]``); ids follow a bounded power law
        ``P(id) ~ (id + 1) ** -alpha`` over ``[0, num_embeddings)``: id 0 is the most
        frequent. ``alpha=1`` is Zipf-like, ``alpha=0`` uniform.
    Labels: ``Bernoulli(sigmoid(logit))`` with ``logit = dense_std @ w + sum over ids of
    v(feature, id) + bias + noise``, where ``w`` is fixed by ``task_seed`` (so a train
    and an eval set that differ in ``seed`` share one labelling function) and
    ``v = (((id + 7919 f + 1) * 2654435761) mod 1000003) / 1000003 - 0.5`` (scaled), so a model
    that learns per-id embeddings can reach a high AUC on the frequent ids.
    """

    _PRIME = 1000003
    _MULT = 2654435761

    def __init__(
        self,
        *,
        num_batches: Optional[int] = 1000,
        batch_size: int = 512,
        num_dense: int = 13,
        num_embeddings: Union[int, Sequence[int]] = 10_000,
        num_sparse: int = 26,
        ids_per_feature: Union[int, tuple[int, int]] = 1,
        alpha: float = 1.0,
        label_noise: float = 0.5,
        seed: int = 0,
        task_seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if num_batches is not None:
            _check_int("num_batches", num_batches, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.num_dense = _check_int("num_dense", num_dense, 1)
        self.num_sparse = _check_int("num_sparse", num_sparse, 1)
        self.num_embeddings: list[int] = _per_feature_sizes(num_embeddings, num_sparse)
        if isinstance(ids_per_feature, (tuple, list)):
            if len(ids_per_feature) != 2:
                raise ValueError(
                    f"ids_per_feature must be an int or a (lo, hi) pair, got {ids_per_feature!r}"
                )
            lo = _check_int("ids_per_feature", ids_per_feature[0], 0)
            hi = _check_int("ids_per_feature", ids_per_feature[1], max(lo, 1))
            self.ids_per_feature: Union[int, tuple[int, int]] = (lo, hi)
            mean_bag = (lo + hi) / 2
        else:
            self.ids_per_feature = _check_int("ids_per_feature", ids_per_feature, 1)
            mean_bag = float(self.ids_per_feature)
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not (0 <= alpha < math.inf)
        ):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        if (
            isinstance(label_noise, bool)
            or not isinstance(label_noise, (int, float))
            or not (0 <= label_noise < math.inf)
        ):
            raise ValueError(f"label_noise must be a finite number >= 0, got {label_noise!r}")
        self.label_noise = float(label_noise)
        for name, value in (("seed", seed), ("task_seed", task_seed)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        self.seed = seed
        self.task_seed = task_seed
        self.rank, self.world_size = _check_rank(rank, world_size)
        if num_batches is not None and num_batches < self.world_size:
            raise ValueError(
                f"num_batches ({num_batches}) must be >= world_size ({self.world_size}) so "
                "that every rank gets a batch"
            )
        self.num_batches = num_batches
        self.feature_names: list[str] = cat_feature_names(self.num_sparse)
        self.dense_names: list[str] = int_feature_names(self.num_dense)

        # Fixed parts of the label model: dense weights (from task_seed, not seed, so a
        # train and an eval set with different seeds share one labelling function) and
        # scales that keep the dense and sparse parts of the logit at a std of about 0.5
        # and 1.5.
        weights_gen = torch.Generator().manual_seed(_mix(task_seed, 2))
        mean, std = _dense_moments()
        w = torch.randn(self.num_dense, generator=weights_gen, dtype=torch.float64)
        self._dense_w = (w * (0.5 / math.sqrt(self.num_dense) / std)).float()
        self._dense_offset = float(mean * self._dense_w.double().sum())
        self._sparse_scale = 1.5 * math.sqrt(12.0 / (self.num_sparse * max(mean_bag, 1.0)))
        self._bias = -1.0
        self._sizes = torch.tensor(self.num_embeddings, dtype=torch.float64)
        self._mult = self._MULT % self._PRIME

        self._next = 0
        self._epoch = 0

    # ---------------------------------------------------------------- generation
    def __len__(self) -> int:
        """Batches this rank yields per epoch (TypeError when endless)."""
        if self.num_batches is None:
            raise TypeError("SyntheticCriteo(num_batches=None) is endless and has no length")
        return self.num_batches // self.world_size

    def _sample_ids(self, feature: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Power-law ids by inverting the CDF of a density ~ x**-alpha on [1, N + 1)."""
        n = self._sizes[feature]
        u = torch.rand(feature.shape, generator=generator, dtype=torch.float64)
        if abs(self.alpha - 1.0) < 1e-9:
            x = torch.exp(u * torch.log1p(n))
        else:
            e = 1.0 - self.alpha
            x = (1.0 + u * ((n + 1.0) ** e - 1.0)) ** (1.0 / e)
        ids = torch.minimum(x.floor_() - 1.0, n - 1.0).clamp_(min=0.0)
        return ids.to(torch.int64)

    def id_value(self, feature: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The per-(feature, id) contribution to the logit, in [-0.5, 0.5) (unscaled)."""
        hashed = ((ids % self._PRIME + feature * 7919 + 1) * self._mult) % self._PRIME
        return hashed.to(torch.float32) / self._PRIME - 0.5

    def generate(self, index: int) -> Batch:
        """Global batch ``index``: the same for a given ``(seed, index)``, always."""
        _check_int("index", index, 0)
        g = torch.Generator().manual_seed(_mix(self.seed, 1, index))
        b, f = self.batch_size, self.num_sparse
        dense = _dense_sample((b, self.num_dense), g)
        if isinstance(self.ids_per_feature, tuple):
            lo, hi = self.ids_per_feature
            lengths = torch.randint(lo, hi + 1, (f, b), generator=g, dtype=torch.int64)
        else:
            lengths = torch.full((f, b), self.ids_per_feature, dtype=torch.int64)
        flat_lengths = lengths.reshape(-1)
        feature = torch.repeat_interleave(torch.arange(f), lengths.sum(dim=1))
        ids = self._sample_ids(feature, g)
        sample = torch.repeat_interleave(torch.arange(f * b) % b, flat_lengths)
        sparse_term = torch.zeros(b).index_add_(0, sample, self.id_value(feature, ids))
        logit = dense @ self._dense_w - self._dense_offset
        logit += sparse_term * self._sparse_scale + self._bias
        if self.label_noise:
            logit += torch.randn(b, generator=g) * self.label_noise
        labels = torch.bernoulli(torch.sigmoid(logit), generator=g)
        kjt = make_kjt(self.feature_names, ids, flat_lengths, batch_size=b)
        return _make_batch(dense, kjt, labels)

    # ---------------------------------------------------------------- iteration / position
    def __iter__(self) -> Iterator[Batch]:
        """Yield this rank's batches from the current position to the end of the epoch.

        A position at the very end (restored from the state after an epoch's last
        batch) starts the next epoch instead of yielding nothing.
        """
        total = None if self.num_batches is None else len(self)
        if total is not None and self._next >= total:
            self._next = 0
            self._epoch += 1
        while total is None or self._next < total:
            batch = self.generate(self._next * self.world_size + self.rank)
            self._next += 1  # before the yield: state_dict() now counts this batch
            yield batch
        self._next = 0
        self._epoch += 1

    def state_dict(self) -> dict[str, Any]:
        """Position after the batches yielded so far (``next_batch`` counts this rank's
        batches in the current ``epoch``)."""
        return {
            "next_batch": self._next,
            "epoch": self._epoch,
            "seed": self.seed,
            "task_seed": self.task_seed,
            "world_size": self.world_size,
            "num_batches": self.num_batches,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state``; refuses a state from a different seed, world size or
        length, whose batch numbering would mean other data."""
        for key in ("seed", "task_seed", "world_size", "num_batches"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"load_state_dict: state has {key}={state[key]!r} but this dataset has "
                    f"{key}={getattr(self, key)!r}"
                )
        next_batch = _check_int("next_batch", state.get("next_batch"), 0)
        if self.num_batches is not None and next_batch > len(self):
            raise ValueError(
                f"load_state_dict: next_batch={next_batch} is past this rank's {len(self)} batches"
            )
        self._next = next_batch
        self._epoch = _check_int("epoch", state.get("epoch", 0), 0)


# --------------------------------------------------------------------------- Criteo TSV

_GLOB_CHARS = re.compile(r"[*?\[]")
_CRITEO_FIELDS = 1 + 13 + 26


def _basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _expand_paths(paths: Union[str, Sequence[str]]) -> list[str]:
    """Files named by ``paths`` (files, globs or directories), as full fsspec URLs.

    A glob's matches are sorted; a directory stands for the files directly in it (names
    starting with ``.`` or ``_``, such as ``_SUCCESS``, are skipped).
    """
    import fsspec

    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, (list, tuple)) or not paths:
        raise ValueError(f"paths must be a path, glob or non-empty list of them, got {paths!r}")
    urls: list[str] = []
    for pattern in paths:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"paths entries must be non-empty strings, got {pattern!r}")
        fs, path = fsspec.core.url_to_fs(pattern)
        if _GLOB_CHARS.search(path):
            infos = fs.glob(path, detail=True)
            found = sorted(name for name, info in infos.items() if info.get("type") != "directory")
        elif fs.isdir(path):
            found = sorted(
                info["name"]
                for info in fs.ls(path, detail=True)
                if info.get("type") != "directory"
                and not _basename(info["name"]).startswith((".", "_"))
            )
        elif fs.exists(path):
            found = [path]
        else:
            found = []
        if not found:
            raise FileNotFoundError(f"CriteoTSVDataset: no file matches {pattern!r}")
        for name in found:
            url = fs.unstrip_protocol(name)
            if url not in urls:
                urls.append(url)
    return urls


class CriteoTSVDataset(IterableDataset):
    """Batches read from Criteo TSV files (``label \\t 13 ints \\t 26 hex ids``).

    ``paths`` are files, globs or directories on any fsspec filesystem (local,
    ``memory://``, ``s3://`` ...); ``.gz`` and other compressions are inferred from the
    name. Files are read in the given order (each glob's matches sorted) and batches run
    on across file boundaries.

    * dense: ``log(1 + max(x, 0))``; an empty field counts as 0.
    * categorical: ``int(hex, 16) % num_embeddings[f]``; an empty field is a bag of
      length 0 (pooled to a zero vector), so "missing" never collides with a real id.
    * ranks: line ``j`` (0-based, counted per file, blank lines included) of every file
      goes to rank ``j % world_size``; every rank reads all files. Ranks may end up to one
      batch apart, so a distributed trainer must tolerate uneven ends.
    * ``drop_last``: drop the epoch's final partial batch.

    ``state_dict()`` is ``{"file_index", "line", "epoch", ...}``: the next sample is read
    after the first ``line`` lines of file ``file_index``. A malformed line raises
    ValueError naming the file and line number.
    """

    def __init__(
        self,
        paths: Union[str, Sequence[str]],
        *,
        batch_size: int = 512,
        num_embeddings: Union[int, Sequence[int]] = 10_000,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.num_dense = 13
        self.num_sparse = 26
        self.num_embeddings: list[int] = _per_feature_sizes(num_embeddings, self.num_sparse)
        self.rank, self.world_size = _check_rank(rank, world_size)
        if not isinstance(drop_last, bool):
            raise ValueError(f"drop_last must be a bool, got {drop_last!r}")
        self.drop_last = drop_last
        self.feature_names: list[str] = list(DEFAULT_CAT_NAMES)
        self.dense_names: list[str] = list(DEFAULT_INT_NAMES)
        self.files: list[str] = _expand_paths(paths)
        self._sizes = torch.tensor(self.num_embeddings, dtype=torch.int64)
        self._file_index = 0
        self._line = 0
        self._epoch = 0

    # ---------------------------------------------------------------- parsing
    def _parse_row(
        self, fields: list[str], url: str, line_no: int
    ) -> tuple[int, list[int], list[int]]:
        """One row, checked field by field: (label, 13 dense ints, 26 ids, -1 = missing).

        The slow path: used only when the batch-wide conversion fails, to name the bad
        field (or to handle ids too large for int64)."""
        column = 0
        try:
            label = int(fields[0])
            if label not in (0, 1):
                raise ValueError("the label must be 0 or 1")
            dense = []
            for column in range(1, 14):
                dense.append(int(fields[column]) if fields[column] else 0)
            cats = []
            for f, column in enumerate(range(14, _CRITEO_FIELDS)):
                text = fields[column]
                cats.append(int(text, 16) % self.num_embeddings[f] if text else -1)
        except ValueError as exc:
            raise ValueError(
                f"{url}:{line_no}: malformed field {column + 1} ({fields[column]!r}): {exc}"
            ) from None
        return label, dense, cats

    def _build(self, rows: list[list[str]], where: list[tuple[str, int]]) -> Batch:
        """Convert a batch of split rows (fast path over the whole batch)."""
        b = len(rows)
        try:  # numpy builds arrays from Python lists several times faster than torch
            labels = torch.from_numpy(np.array([int(r[0]) for r in rows], dtype=np.float32))
            if not bool(((labels == 0) | (labels == 1)).all()):
                raise ValueError("label not 0/1")
            dense = torch.from_numpy(
                np.array([int(x) if x else 0 for r in rows for x in r[1:14]], dtype=np.float64)
            )
            present = torch.from_numpy(np.array([x != "" for r in rows for x in r[14:]]))
            ids = torch.from_numpy(
                np.array([int(x, 16) if x else 0 for r in rows for x in r[14:]], dtype=np.int64)
            )
        except (ValueError, OverflowError):  # find the bad line, or ids beyond int64
            parsed = [self._parse_row(r, url, n) for r, (url, n) in zip(rows, where)]
            labels = torch.tensor([p[0] for p in parsed], dtype=torch.float32)
            dense = torch.tensor([x for p in parsed for x in p[1]], dtype=torch.float64)
            raw = torch.tensor([x for p in parsed for x in p[2]], dtype=torch.int64)
            present, ids = raw >= 0, raw.clamp(min=0)
        dense_t = dense.clamp_(min=0).log1p_().to(torch.float32).reshape(b, 13)
        ids = torch.remainder(ids.reshape(b, 26), self._sizes).t().reshape(-1)  # key-major
        present = present.reshape(b, 26).t().reshape(-1)
        kjt = make_kjt(self.feature_names, ids[present], present.to(torch.int32), batch_size=b)
        return _make_batch(dense_t, kjt, labels)

    # ---------------------------------------------------------------- iteration / position
    def _pass(self) -> Iterator[Batch]:
        """One pass from the current position to the end of the files."""
        import fsspec

        rows: list[list[str]] = []
        where: list[tuple[str, int]] = []
        start_file, skip = self._file_index, self._line
        for file_index in range(start_file, len(self.files)):
            url = self.files[file_index]
            with fsspec.open(
                url, "rt", compression="infer", encoding="utf-8", errors="replace", newline=""
            ) as handle:
                for line_no, line in enumerate(handle, start=1):
                    if line_no <= skip or (line_no - 1) % self.world_size != self.rank:
                        continue
                    fields = line.rstrip("\r\n").split("\t")
                    if len(fields) != _CRITEO_FIELDS:
                        if not line.strip():
                            continue  # blank line
                        raise ValueError(
                            f"{url}:{line_no}: expected {_CRITEO_FIELDS} tab-separated fields "
                            f"(label, 13 integer, 26 categorical), got {len(fields)}"
                        )
                    rows.append(fields)
                    where.append((url, line_no))
                    if len(rows) == self.batch_size:
                        batch = self._build(rows, where)
                        rows, where = [], []
                        self._file_index, self._line = file_index, line_no
                        yield batch
            skip = 0
        if rows and not self.drop_last:
            batch = self._build(rows, where)
            self._file_index, self._line = len(self.files), 0
            yield batch

    def _next_epoch(self) -> None:
        self._file_index, self._line = 0, 0
        self._epoch += 1

    def __iter__(self) -> Iterator[Batch]:
        """Yield batches from the current position to the end of the epoch.

        Resuming from an epoch's end (its last batch's state; with ``drop_last``, also a
        position where only the dropped tail is left) starts the next epoch instead of
        yielding nothing.
        """
        if self._file_index >= len(self.files):
            self._next_epoch()
        mid_epoch = (self._file_index, self._line) != (0, 0)
        yielded = False
        for batch in self._pass():
            yielded = True
            yield batch
        self._next_epoch()
        if mid_epoch and not yielded:
            yield from self._pass()
            self._next_epoch()

    def state_dict(self) -> dict[str, Any]:
        """Position after the batches yielded so far."""
        in_range = self._file_index < len(self.files)
        return {
            "file_index": self._file_index,
            "line": self._line,
            "epoch": self._epoch,
            "file": self.files[self._file_index] if in_range else None,
            "num_files": len(self.files),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state``; refuses one taken over other files or another world size."""
        for key, mine in (("num_files", len(self.files)), ("world_size", self.world_size)):
            if key in state and state[key] != mine:
                raise ValueError(
                    f"load_state_dict: state has {key}={state[key]!r} but this dataset has "
                    f"{key}={mine!r}"
                )
        file_index = _check_int("file_index", state.get("file_index"), 0)
        if file_index > len(self.files):
            raise ValueError(
                f"load_state_dict: file_index={file_index} but there are {len(self.files)} files"
            )
        name = state.get("file")
        if (
            name is not None
            and file_index < len(self.files)
            and _basename(name) != _basename(self.files[file_index])
        ):
            raise ValueError(
                f"load_state_dict: state is in file {name!r} but file {file_index} is now "
                f"{self.files[file_index]!r}"
            )
        self._file_index = file_index
        self._line = _check_int("line", state.get("line", 0), 0)
        self._epoch = _check_int("epoch", state.get("epoch", 0), 0)


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """Split a `Batch` into ``parts`` equal micro-batches (in sample order), e.g. to
    check that k micro-batches train like the whole batch."""
    size = batch.labels.shape[0]
    if parts < 1 or size % parts:
        raise ValueError(f"split_batch: {size} samples do not split into {parts} equal parts")
    kjt = batch.sparse_features
    keys = kjt.keys()
    lengths = kjt.lengths().view(len(keys), size)
    per_key = kjt.values().split(kjt.length_per_key())
    starts = torch.zeros(len(keys), size + 1, dtype=torch.long)
    starts[:, 1:] = lengths.long().cumsum(1)
    n = size // parts
    out = []
    for i in range(parts):
        lo, hi = i * n, (i + 1) * n
        values = torch.cat([per_key[f][starts[f, lo] : starts[f, hi]] for f in range(len(keys))])
        out.append(
            _make_batch(
                batch.dense_features[lo:hi],
                make_kjt(keys, values, lengths[:, lo:hi]),
                batch.labels[lo:hi],
            )
        )
    return out
