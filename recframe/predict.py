"""Batch inference over a dataset: `predict_dataset` (what `Trainer.predict` runs).

Every rank predicts its own share of the dataset; the ranks move in lockstep (one
``all_reduce`` per batch says whether any rank has data left) and gather each step's
predictions with `recframe.distributed.all_gather_cat` (tensors, no pickles), so rank 0
holds all of them in the order (step 0: rank 0, rank 1, ...; step 1: ...). A rank whose
share ran out repeats its last batch and contributes nothing: a sharded model's table
lookups are collectives, and no rank may stop early.

Results go to memory (`Predictions`) or, for sets too large for it, stream to a file on
rank 0 (``output=``): Parquet (``.parquet``, one row group per flush) or tab-separated
text (anything else), columns ``prediction`` and, when the batches carry labels,
``label``. Any fsspec path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

from recframe import distributed
from recframe.device import Device

FLUSH_ROWS = 1 << 16
"""Rows buffered on rank 0 before a write to the output file."""


@dataclasses.dataclass
class Predictions:
    """``predictions`` ``[N]`` float32 probabilities, ``labels`` ``[N]`` float32 when
    every batch had labels (else None), ``path`` the output file when streamed (then the
    tensors are empty) and ``num_samples``."""

    predictions: torch.Tensor
    labels: Optional[torch.Tensor]
    num_samples: int
    path: Optional[str] = None


def _predict_fn(model: nn.Module) -> Any:
    inner = model
    while not callable(getattr(inner, "predict", None)) and isinstance(
        getattr(inner, "module", None), nn.Module
    ):
        inner = inner.module
    fn = getattr(inner, "predict", None)
    if not callable(fn):
        raise TypeError(
            f"{type(model).__name__} has no predict(batch) method returning probabilities; "
            "recframe's DLRM and DeepFM have one, add one to your model"
        )
    # under a wrapper (DDP / torchrec's DistributedModelParallel) this is the user's
    # model, whose tables the wrapper has replaced by sharded ones in place
    return fn


def _is_empty(batch: Any) -> bool:
    """Whether ``batch`` holds no samples (a reader's empty last chunk, a filtered
    batch): torchrec's jagged tensors cannot be split at batch size 0, so the model is
    not called on it."""
    for name in ("dense_features", "labels"):
        t = batch.get(name) if isinstance(batch, dict) else getattr(batch, name, None)
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t.shape[0] == 0
    return False


def _labels_of(batch: Any) -> Optional[torch.Tensor]:
    labels = getattr(batch, "labels", None)
    if labels is None and isinstance(batch, dict):
        labels = batch.get("labels")
    return labels if isinstance(labels, torch.Tensor) else None


class _Sink:
    """Rank 0's output file, written in chunks of `FLUSH_ROWS` rows."""

    def __init__(self, path: str) -> None:
        import fsspec

        self.path = path
        self.parquet = str(path).endswith(".parquet")
        self._file = fsspec.open(path, "wb").open()
        self._writer: Any = None
        self._preds: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._rows = 0
        self._with_labels: Optional[bool] = None

    def add(self, preds: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
        if self._with_labels is None:
            self._with_labels = labels is not None
        self._preds.append(preds)
        if labels is not None and self._with_labels:
            self._labels.append(labels)
        self._rows += preds.numel()
        if self._rows >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self._preds:
            return
        preds = torch.cat(self._preds).numpy()
        labels = torch.cat(self._labels).numpy() if self._with_labels else None
        self._preds, self._labels, self._rows = [], [], 0
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            cols = {"prediction": pa.array(preds)}
            if labels is not None:
                cols["label"] = pa.array(labels)
            table = pa.table(cols)
            if self._writer is None:
                self._writer = pq.ParquetWriter(self._file, table.schema)
            self._writer.write_table(table)
            return
        if self._writer is None:
            self._writer = True
            self._file.write(b"prediction\tlabel\n" if labels is not None else b"prediction\n")
        if labels is None:
            lines = "".join(f"{p:.9g}\n" for p in preds.tolist())
        else:
            lines = "".join(f"{p:.9g}\t{lab:g}\n" for p, lab in zip(preds.tolist(),
                                                                    labels.tolist()))
        self._file.write(lines.encode())

    def close(self) -> None:
        self.flush()
        if self.parquet and self._writer is not None:
            self._writer.close()
        elif self.parquet:  # no rows at all: still a valid (empty) file
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"prediction": pa.array([], pa.float32())}), self._file)
        self._file.close()


def predict_dataset(
    model: nn.Module,
    dataset: Iterable[Any],
    device: Device,
    output: Optional[str] = None,
    max_batches: Optional[int] = None,
) -> Predictions:
    """Run ``model.predict(batch)`` over ``dataset`` (eval mode, no grad) on every rank
    and gather the results on rank 0 (see the module docstring). ``output``: stream them
    to that file instead of keeping them in memory. Other ranks return an empty
    `Predictions` holding only ``num_samples``."""
    predict = _predict_fn(model)
    main = distributed.is_main_process()
    world = distributed.get_world_size() if distributed.is_initialized() else 1
    sink = _Sink(output) if output is not None and main else None
    preds_out: list[torch.Tensor] = []
    labels_out: list[torch.Tensor] = []
    with_labels = True
    total = 0
    last: Any = None
    # empty batches are skipped: a rank left with fewer batches repeats its last one
    iterator = (b for b in dataset if not _is_empty(b))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            step = 0
            while True:
                batch = None
                if max_batches is None or step < max_batches:
                    batch = next(iterator, None)
                have = batch is not None
                if world > 1:
                    have_any = distributed.all_reduce_max_int(int(have)) > 0
                else:
                    have_any = have
                if not have_any:
                    break
                if not have and last is None:
                    raise ValueError(
                        f"predict: rank {distributed.get_rank()} got no batch at all while "
                        "others did; give every rank at least one batch of its share"
                    )
                run = device.move(batch if have else last)
                probs = predict(run).detach().reshape(-1).float()
                labels = _labels_of(run) if have else None
                if not have:  # a filler batch: keeps the collectives in step
                    probs = probs[:0]
                step += 1
                last = batch if have else last
                if step == 1:  # the first step decides whether there is a label column
                    has = (not have) or labels is not None
                    with_labels = (distributed.all_reduce_min_int(int(has)) > 0 if world > 1
                                   else has)
                elif have and (labels is not None) != with_labels:
                    raise ValueError(
                        f"predict: batch {step} {'lacks' if with_labels else 'has'} labels "
                        "unlike the first batch; a dataset must be labelled throughout or not"
                    )
                probs = distributed.all_gather_cat(probs.cpu())
                lab = None
                if with_labels:
                    lab = labels.detach().reshape(-1).float().cpu() if labels is not None \
                        else torch.empty(0)
                    lab = distributed.all_gather_cat(lab)
                total += probs.numel()
                if not main:
                    continue
                if sink is not None:
                    sink.add(probs, lab)
                else:
                    preds_out.append(probs)
                    if lab is not None:
                        labels_out.append(lab)
    finally:
        model.train(was_training)
        if sink is not None:
            sink.close()
    if sink is not None or not main:
        return Predictions(torch.empty(0), None, total, output)
    preds = torch.cat(preds_out) if preds_out else torch.empty(0)
    labels_t = torch.cat(labels_out) if with_labels and labels_out else None
    return Predictions(preds, labels_t, total)
