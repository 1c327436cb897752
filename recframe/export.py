"""Serving artifacts: one file holding the inference graph, its weights and metadata.

`export` loads a checkpoint (any fsspec path; a full checkpoint or an incremental
chain, written by any number of ranks) through the public `Saver` into an unsharded
model built from the schema, wraps it in `ServingModule` (raw feature values in,
probabilities out) and writes ``torch.export``'s program with
``torch.export.save``: a zip holding the graph, the weights (embedding tables fp32, or
row-wise int8/int4 via torchrec's ``quantize_embeddings``) and ``recframe.json``, the
metadata (format, source checkpoint and step, the schema with its feature order and
id mapping, the inputs' layout). Loading needs torch and fbgemm's ops (``import
fbgemm_gpu``: the tables' kernel), never recframe::

    extra = {"recframe.json": ""}
    program = torch.export.load("model.pt2", extra_files=extra)
    probs = program.module()(dense, values, lengths)

Inputs (see docs/serving.md): ``dense`` float32 ``[B, num_dense]`` raw values in the
schema's dense order (NaN = missing: the column's ``fill``), ``values`` int64 ``[N]``
raw ids of every sparse feature, feature-major in the schema's order, ``lengths``
int64 ``[F, B]`` ids per feature and sample. The graph applies the schema's dense
transforms and id mappings (``modulo``; ``hex`` and ``hash`` ids arrive as their
unsigned 64-bit value in an int64, see `raw_id`), so serving runs no recframe code.

`apply_checkpoint` refreshes an artifact from a newer (e.g. incremental) checkpoint
without tracing the graph again: it writes the changed table rows and the dense
weights into the archive's tensor payloads and copies every other entry as it is; the
result equals a full export of that step.

`load_artifact` and `apply_checkpoint` run `check_artifact` on the file's bytes before
torch reads them: ``torch.export.load`` can run code from a hostile file (pickled
payloads, sample inputs, guards compiled into Python).
"""

from __future__ import annotations

import copy
import json
import logging
import operator
import os
import posixpath
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recframe.schema import DenseColumn, FeatureSchema, IdMapping, SparseColumn, TableSpec

logger = logging.getLogger("recframe.export")

FORMAT = "recframe-serving/1"
METADATA = "recframe.json"
QUANTIZE = ("fp32", "int8", "int4")
_U64 = 1 << 64


@dataclass
class ExportInfo:
    """What `export` / `apply_checkpoint` wrote: ``path``, ``bytes``, ``step``,
    ``quantize``, ``seconds`` and (apply) ``changed_rows`` per table."""

    path: str
    bytes: int
    step: Optional[int]
    quantize: str
    seconds: float
    changed_rows: Optional[dict[str, int]] = None


# --------------------------------------------------------------------------- ids
def raw_id(value: Union[int, str], mapping: Union[IdMapping, Mapping[str, Any]]) -> int:
    """The int64 a serving client feeds for one raw id of a column with ``mapping``
    (pure Python, copy it to the serving side): ``modulo``: the integer itself; ``hex``:
    ``int(value, 16)``; ``hash``: ``mix64(fnv1a64(utf8(value)) ^ salt)``; the last two
    as the two's-complement int64 of their unsigned 64-bit value. The graph then takes
    it ``mod num_embeddings`` (unsigned for hex and hash, Python's modulo for modulo)."""
    kind = mapping.kind if isinstance(mapping, IdMapping) else mapping["kind"]
    salt = mapping.salt if isinstance(mapping, IdMapping) else int(mapping.get("salt", 0))
    if kind == "modulo":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"id {value!r} is not an integer")
        out = int(value)
        if not -(1 << 63) <= out < 1 << 63:
            raise ValueError(f"id {value!r} is outside int64")
        return out
    if kind == "hex":
        u = int(str(value), 16)
    elif kind == "hash":
        h = 0xCBF29CE484222325
        for byte in str(value).encode("utf-8"):
            h = ((h ^ byte) * 0x100000001B3) % _U64
        x = h ^ (salt % _U64)
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) % _U64
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) % _U64
        u = x ^ (x >> 31)
    else:
        raise ValueError(f"raw_id: unknown mapping kind {kind!r}")
    return u - _U64 if u >= 1 << 63 else u


def synthetic_schema(num_embeddings: int = 10_000, embedding_dim: int = 16,
                     num_dense: int = 13, num_sparse: int = 26) -> FeatureSchema:
    """The schema of `recframe.data.SyntheticCriteo` batches and of a model built
    without a schema (``int_i`` dense, ``cat_i`` integer ids in tables ``t_cat_i``)."""
    dense = [DenseColumn(f"int_{i}") for i in range(num_dense)]
    sparse = [SparseColumn(f"cat_{i}", table=f"t_cat_{i}") for i in range(num_sparse)]
    tables = [TableSpec(f"t_cat_{i}", num_embeddings, embedding_dim) for i in range(num_sparse)]
    return FeatureSchema(labels=["label"], dense=dense, sparse=sparse, tables=tables)


# --------------------------------------------------------------------------- module
class ServingModule(nn.Module):
    """Raw features in, probabilities out: the schema's dense ``fill`` and
    transforms and its id mappings as torch ops, then ``model.predict``.

    ``forward(dense [B, D] float32, values [N] int64, lengths [F, B] int64)``.
    """

    def __init__(self, model: nn.Module, schema: FeatureSchema) -> None:
        super().__init__()
        self.model = model
        self.features = schema.feature_names
        dense = schema.dense
        self.register_buffer("fill", torch.tensor([d.fill for d in dense], dtype=torch.float64))
        self.register_buffer("fill32", self.fill.float())  # no transforms: no cast per call
        self.register_buffer("log1p", torch.tensor([d.transform == "log1p" for d in dense]))
        self.register_buffer("standardize",
                             torch.tensor([d.transform == "standardize" for d in dense]))
        self.register_buffer("mean", torch.tensor([d.mean for d in dense], dtype=torch.float64))
        self.register_buffer("std", torch.tensor([d.std for d in dense], dtype=torch.float64))
        rows = [schema.num_embeddings_of(c) for c in schema.sparse]
        unsigned = [c.mapping.kind in ("hex", "hash") for c in schema.sparse]
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.int64))
        # u mod n for an int64 x holding u: (x mod n + [x < 0] * (2**64 mod n)) mod n
        self.register_buffer("wrap", torch.tensor(
            [(_U64 % n) if u else 0 for n, u in zip(rows, unsigned)], dtype=torch.int64))
        # what the graph needs of the above, fixed when it is traced: a schema without
        # dense transforms fills NaNs in float32 (the same values as in float64, then
        # rounded), one table size for all features is a scalar modulus (no per-id
        # feature lookup), and the unsigned wrap runs only where a feature is hex/hash
        self.transforms = any(d.transform in ("log1p", "standardize") for d in dense)
        self.unsigned = any(unsigned)
        self.modulus: Optional[int] = rows[0] if len(set(rows)) == 1 else None

    def forward(self, dense: torch.Tensor, values: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        if self.transforms:
            x = dense.double()
            x = torch.where(torch.isnan(x), self.fill, x)
            x = torch.where(self.log1p, torch.log1p(x.clamp(min=0.0)), x)
            x = torch.where(self.standardize, (x - self.mean) / self.std, x)
            x = x.float()
        else:
            x = torch.where(torch.isnan(dense), self.fill32, dense)
        if self.modulus is not None and not self.unsigned:
            ids = torch.remainder(values, self.modulus)
        else:
            # the feature of each id (values are feature-major): where its position falls
            # among the features' cumulative counts (repeat_interleave is ~100x slower)
            ends = torch.cumsum(lengths.sum(dim=1), dim=0)
            feature = torch.searchsorted(ends, torch.arange(values.shape[0]), right=True)
            n = self.rows[feature]
            ids = torch.remainder(values, n)
            if self.unsigned:
                ids = torch.remainder(ids + (values < 0).long() * self.wrap[feature], n)
        kjt = KeyedJaggedTensor(keys=self.features, values=ids, lengths=lengths.reshape(-1))
        batch = Batch(dense_features=x, sparse_features=kjt,
                      labels=torch.zeros(dense.shape[0]))
        return self.model.predict(batch)


def serving_inputs(batch: Batch, features: list[str]) -> tuple[torch.Tensor, ...]:
    """A recframe batch (already mapped ids, transformed dense) as artifact inputs:
    valid for a schema whose dense columns have no transform and ids are ``modulo``
    (e.g. `synthetic_schema`), where raw and mapped values coincide."""
    kjt = batch.sparse_features
    if list(kjt.keys()) != list(features):
        kjt = KeyedJaggedTensor.from_jt_dict({k: kjt[k] for k in features})
    b = batch.dense_features.shape[0]
    return (batch.dense_features.float(), kjt.values().long(),
            kjt.lengths().long().reshape(len(features), b))


# --------------------------------------------------------------------------- building
def _schema_of(schema: Any, num_embeddings: int, embedding_dim: int) -> FeatureSchema:
    if schema is None:
        return synthetic_schema(num_embeddings, embedding_dim)
    if isinstance(schema, FeatureSchema):
        return schema
    if isinstance(schema, Mapping):
        return FeatureSchema.from_dict(schema)
    return FeatureSchema.from_file(str(schema))


def build_serving_model(model: str, schema: FeatureSchema,
                        model_kwargs: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """The unsharded recframe model (torchrec tables on the CPU) the artifact is made of."""
    from recframe.models import build_model

    kwargs = dict(model_kwargs or {})
    kwargs.update(schema=schema, embedding_backend="torchrec", device="cpu")
    return build_model(model, **kwargs).eval()


def _resolve_checkpoint(model: nn.Module, checkpoint: str) -> tuple[Any, str]:
    """(Saver, checkpoint directory): ``checkpoint`` is an output_dir (its latest
    checkpoint) or one ``ckpt_<step>`` directory."""
    from recframe.checkpoint import Saver

    root = Saver(model, output_dir=checkpoint)
    latest = root.latest_checkpoint()
    if latest is not None:
        return root, latest.path
    import fsspec

    path = str(checkpoint).rstrip("/")
    fs, local = fsspec.core.url_to_fs(path)
    if not fs.exists(posixpath.join(local, "manifest.json")):
        what = "does not exist" if not fs.exists(local) else "holds no committed checkpoint"
        raise ValueError(f"export: checkpoint {checkpoint} {what}; give a run's output_dir "
                         "(its latest committed checkpoint) or one of its ckpt_<step> "
                         "directories")
    parent = posixpath.dirname(path) or "."
    return Saver(model, output_dir=parent), path


def load_checkpoint(model: nn.Module, checkpoint: str) -> dict[str, Any]:
    """Load the model part of ``checkpoint`` into ``model``; an error names the
    checkpoint and what does not match (model, schema)."""
    from recframe.checkpoint import CheckpointCorruptError, CheckpointError, StorageError

    saver, path = _resolve_checkpoint(model, checkpoint)
    try:
        return saver.load(ckpt_path=path, load_conf={"load": ["sparse", "dense"]})
    except (CheckpointCorruptError, StorageError, OSError):
        raise  # a damaged or unreadable checkpoint: its own message names the file
    except CheckpointError as e:
        raise ValueError(f"export: checkpoint {path}: {e}; build the model with the "
                         "model name, schema and sizes it was trained with") from None
    except (RuntimeError, ValueError) as e:
        raise ValueError(
            f"export: checkpoint {path} does not match the {type(model).__name__} built from "
            f"the schema ({e}); pass the schema / --num_embeddings / --embedding_dim it was "
            "trained with") from None


def _quantize(module: ServingModule, quantize: str) -> None:
    """Swap the tables for torchrec's inference collection: fbgemm's batched kernel
    looks up every table in one call (fp32 too: the same values as the training
    tables, and a graph a third the size of the per-table one)."""
    from torchrec.inference.modules import quantize_embeddings
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

    dtype = {"fp32": torch.float, "int8": torch.qint8, "int4": torch.quint4x2}[quantize]
    # CPU rows unpadded (the default 16-byte alignment would double an int8 row of 16)
    quant_prep_customize_row_alignment(module, [EmbeddingBagCollection], 1)
    quantize_embeddings(module, dtype=dtype, inplace=True)
    # fbgemm's default (WARNING) "repairs" ids and offsets that do not fit, e.g. fewer
    # values than the lengths sum to, and predicts from the repaired input: FATAL
    # raises instead (the ids themselves are in range by the graph's modulo)
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

    for _, sub in _submodules(module):
        if hasattr(sub, "bounds_check_mode_int"):
            sub.bounds_check_mode_int = BoundsCheckMode.FATAL.value


def _example(schema: FeatureSchema, batch: int = 4) -> tuple[torch.Tensor, ...]:
    f = len(schema.sparse)
    lengths = torch.tensor([[1, 2, 0, 1][i % 4] for i in range(batch)] * f).reshape(f, batch)
    lengths[:, 0] += 1
    values = torch.arange(int(lengths.sum()), dtype=torch.int64)
    return torch.zeros(batch, len(schema.dense)), values, lengths


def _submodules(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of ``module`` and everything below it, including modules held
    in plain lists (torchrec's quantised collections keep their fbgemm kernels so)."""
    out = [(prefix, module)]
    for key, value in vars(module).items():
        if key == "_modules":
            children = [(k, v) for k, v in value.items() if v is not None]
        elif isinstance(value, (list, tuple)):
            children = [(f"{key}.{i}", v) for i, v in enumerate(value)
                        if isinstance(v, nn.Module)]
        else:
            continue
        for name, child in children:
            out += _submodules(child, f"{prefix}.{name}" if prefix else name)
    return out


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    items = list(module._parameters.items()) + list(module._buffers.items())
    items += [(k, v) for k, v in vars(module).items() if isinstance(v, torch.Tensor)]
    return [(k, v) for k, v in items if isinstance(v, torch.Tensor)]


def _named_tensor(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor at ``name`` (a path of attributes and list indices)."""
    obj: Any = module
    for part in name.split("."):
        obj = obj[int(part)] if isinstance(obj, (list, tuple)) else getattr(obj, part)
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{name} is no tensor of the model")
    return obj


def _map_tensors(module: nn.Module, program: Any) -> dict[str, str]:
    """``{program tensor key: module tensor name}``: the same object, or (a constant
    torch.export lifted as a copy, e.g. fbgemm's packed int8 tables) an equal tensor
    of the same shape and dtype. `apply_checkpoint` refreshes these from a new model."""
    candidates: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for path, sub in _submodules(module):
        for key, t in _own_tensors(sub):
            if id(t) not in seen:
                seen.add(id(t))
                candidates.append((f"{path}.{key}" if path else key, t))
    by_id = {id(t): n for n, t in candidates}
    out: dict[str, str] = {}
    for key, t in _program_tensors(program).items():
        if id(t) in by_id:
            out[key] = by_id[id(t)]
            continue
        for name, c in candidates:
            if c.shape == t.shape and c.dtype == t.dtype and torch.equal(c, t):
                out[key] = name
                break
    return out


def _fold_split_cat(program: Any) -> int:
    """Replace ``cat(split(x, sizes, dim), dim)`` (all the pieces, in order) by ``x``:
    torchrec splits the batched kernel's ``[B, tables * dim]`` output per feature and
    DLRM's sparse arch concatenates them back, a copy of the whole output per call.
    Returns how many were folded."""
    aten = torch.ops.aten
    folded = 0
    for node in list(program.graph.nodes):
        if node.op != "call_function" or node.target != aten.cat.default:
            continue
        pieces = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not pieces or any(p.op != "call_function" or p.target is not operator.getitem
                             for p in pieces):
            continue
        split = pieces[0].args[0]
        if split.op != "call_function" or split.target != aten.split_with_sizes.default:
            continue
        sizes = split.args[1]
        split_dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        rank = split.args[0].meta["val"].dim()
        if (split_dim % rank != dim % rank or len(pieces) != len(sizes)
                or [(p.args[0], p.args[1]) for p in pieces]
                != [(split, i) for i in range(len(sizes))]):
            continue
        node.replace_all_uses_with(split.args[0])
        folded += 1
    return folded


def _gather_pairs(program: Any) -> int:
    """Replace ``x[:, i, j]`` (``aten.index`` with two index vectors, DLRM's pairwise
    interaction picking the upper triangle of ``[B, n, n]``) by
    ``x.reshape(-1, n * n).index_select(1, i * n + j)``: the same values, gathered by
    a 1-D index (~6x faster at batch 1024 on CPU than ``aten.index``'s general path).
    Returns how many were replaced."""
    aten = torch.ops.aten
    graph = program.graph
    replaced = 0
    for node in list(graph.nodes):
        if node.target != aten.index.Tensor:
            continue
        x, idx = node.args[0], node.args[1]
        if len(idx) != 3 or idx[0] is not None or not all(
                isinstance(a, torch.fx.Node) for a in idx[1:]):
            continue
        xv, iv, jv = x.meta.get("val"), idx[1].meta.get("val"), idx[2].meta.get("val")
        if (not isinstance(xv, torch.Tensor) or xv.dim() != 3
                or not all(isinstance(d, int) for d in xv.shape[1:])
                or any(not isinstance(v, torch.Tensor) or v.dim() != 1
                       or v.dtype != torch.int64 for v in (iv, jv))):
            continue
        cols = xv.shape[2]
        mode = xv.fake_mode
        i_const, j_const = _constant_of(program, idx[1]), _constant_of(program, idx[2])
        vals: dict[Any, Any] = {}
        if i_const is not None and j_const is not None:
            # fixed pairs (DLRM's triu_indices, a non-persistent buffer): the flat index
            # is a constant of the program, not two selects, a mul and an add per call
            flat = _add_constant(program, "pairs_flat_index", i_const * cols + j_const)
        else:
            with graph.inserting_before(node):
                row = graph.call_function(aten.mul.Tensor, (idx[1], cols))
                flat = graph.call_function(aten.add.Tensor, (row, idx[2]))
            with mode:
                vals[row] = iv * cols
                vals[flat] = vals[row] + jv
        with graph.inserting_before(node):
            rows = graph.call_function(aten.reshape.default, (x, [-1, xv.shape[1] * cols]))
            out = graph.call_function(aten.index_select.default, (rows, 1, flat))
        with mode:
            vals[rows] = xv.reshape(-1, xv.shape[1] * cols)
            vals[out] = vals[rows].index_select(1, flat.meta["val"] if flat not in vals
                                               else vals[flat])
        for new, val in vals.items():
            new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
            new.meta["val"] = val
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        replaced += 1
    return replaced


def _constant_of(program: Any, node: Any) -> Optional[torch.Tensor]:
    """The value of ``node`` when it is fixed at export: a constant tensor or a
    non-persistent buffer of the program (no checkpoint writes it), or an
    ``aten.select.int`` of one; else None."""
    from torch.export.graph_signature import InputKind

    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "call_function" and node.target == torch.ops.aten.select.int:
        src = _constant_of(program, node.args[0])
        return None if src is None else src.select(node.args[1], node.args[2])
    if node.op != "placeholder":
        return None
    for spec in program.graph_signature.input_specs:
        if spec.arg.name == node.name and (
                spec.kind == InputKind.CONSTANT_TENSOR
                or (spec.kind == InputKind.BUFFER and spec.persistent is False)):
            value = program.constants.get(spec.target)
            return value if isinstance(value, torch.Tensor) else None
    return None


def _add_constant(program: Any, name: str, value: torch.Tensor) -> Any:
    """A new constant tensor input of the program (placed before the user inputs, as
    lifted inputs are); its placeholder node."""
    from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

    specs = program.graph_signature.input_specs
    while name in program.constants or name in program.state_dict:
        name += "_"
    first_user = next(i for i, s in enumerate(specs) if s.kind == InputKind.USER_INPUT)
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    with program.graph.inserting_before(nodes[specs[first_user].arg.name]):
        node = program.graph.placeholder(f"c_{name}")
    fake = next(n.meta["val"] for n in nodes.values()
                if isinstance(n.meta.get("val"), torch.Tensor)).fake_mode
    node.meta["val"] = fake.from_tensor(value, static_shapes=True)
    specs.insert(first_user, InputSpec(kind=InputKind.CONSTANT_TENSOR,
                                       arg=TensorArgument(name=node.name), target=name,
                                       persistent=None))
    program.constants[name] = value.clone()
    return node


def _drop_orphan_item_checks(graph: Any) -> int:
    """Erase the ``_assert_scalar`` checks on ``.item()`` values that nothing but such
    checks reads (torchrec sums each feature's lengths to a Python int for per-key
    offsets; once those are gone, only "that sum >= 0" is left, per feature per call).
    Lengths are checked where they are read: `check_inputs` refuses negative ones and
    fbgemm's ``bounds_check_indices`` guards the kernel. Then ``_drop_dead_nodes``
    takes the sums themselves away. Returns how many checks went."""
    aten = torch.ops.aten
    dropped = 0
    for item in [n for n in graph.nodes if n.target == aten.item.default]:
        below, frontier, orphan = [], list(item.users), True
        while frontier and orphan:
            node = frontier.pop()
            below.append(node)
            if node.target == aten._assert_scalar.default:
                continue
            # only Python arithmetic / comparisons on the symbol may lie between
            orphan = node.op == "call_function" and getattr(node.target, "__module__",
                                                            None) in ("_operator", "operator")
            frontier += list(node.users)
        if orphan:
            for node in below:
                if node.target == aten._assert_scalar.default and node in graph.nodes:
                    graph.erase_node(node)
                    dropped += 1
    return dropped


def _drop_dead_nodes(program: Any) -> int:
    """Erase graph nodes whose results nothing reads: the unused labels tensor,
    torchrec's per-key offsets the batched kernel never reads (with the in-place
    ``detach_`` that would keep them alive) and export's dtype re-checks of
    intermediates (``_assert_tensor_metadata``: fixed by the inputs' dtypes; the
    program's guards check shapes only, so `check_inputs` is where a caller's dtypes are
    checked by name: int32 ids and lengths still map and predict the same, float64
    dense values fail in the first linear layer). A served call runs every node one by one, so each
    one dropped is time saved at batch 1 (see `_drop_orphan_item_checks` for the
    remaining data checks).
    Returns how many nodes went."""
    aten = torch.ops.aten
    removable = {aten.detach_.default, aten._assert_tensor_metadata.default}
    graph = program.graph
    dropped = 0
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.op != "call_function" or node.users:
                continue
            if node.target in removable or not node.is_impure():
                graph.erase_node(node)
                dropped += 1
                changed = True
        checks = _drop_orphan_item_checks(graph)
        dropped += checks
        changed = changed or checks > 0
    program.graph_module.recompile()
    _drop_orphan_ranges(program)
    return dropped


def _drop_orphan_ranges(program: Any) -> None:
    """Forget the value ranges of symbols no node mentions any more (the erased
    ``.item()`` results): saved, each would make every load warn that it "did not
    appear in the graph"."""
    used: set[Any] = set()
    for node in program.graph.nodes:
        vals = node.meta.get("val")
        for v in vals if isinstance(vals, (list, tuple)) else [vals]:
            if isinstance(v, torch.Tensor):
                for d in (*v.shape, *v.stride(), v.storage_offset()):
                    if isinstance(d, torch.SymInt):
                        used |= d.node.expr.free_symbols
            elif isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                used |= v.node.expr.free_symbols
    ranges = program._range_constraints
    for symbol in [s for s in ranges if s not in used]:
        del ranges[symbol]


def _drop_unused_buffers(program: Any) -> None:
    """Remove buffers no graph node reads (torchrec's quantised collections keep
    per-table views of the packed table the kernel reads: saved, they would store
    the tables twice)."""
    from torch.export.graph_signature import InputKind

    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    keep = []
    for spec in program.graph_signature.input_specs:
        node = placeholders.get(spec.arg.name)
        if spec.kind == InputKind.BUFFER and node is not None and not node.users:
            program.graph.erase_node(node)
            program.state_dict.pop(spec.target, None)
            if spec.persistent is False:  # non-persistent buffers live with the constants
                program.constants.pop(spec.target, None)
        else:
            keep.append(spec)
    program.graph_signature.input_specs[:] = keep
    program.graph_module.recompile()


def _drop_noop_nodes(program: Any) -> int:
    """Bypass nodes that return their input unchanged: a cast to the dtype the tensor
    already has (``aten.to.dtype``: the kernel's int64 offsets, the float32 logits)
    and a ``view(x, [-1])`` of a 1-D ``x``. Each is a dispatch per served call for
    nothing. Returns how many went (`_drop_dead_nodes` erases them)."""
    aten = torch.ops.aten
    dropped = 0
    for node in list(program.graph.nodes):
        if node.op != "call_function" or not node.args:
            continue
        src = node.args[0]
        val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor):
            continue
        same = False
        if node.target == aten.to.dtype and not node.kwargs:
            same = len(node.args) == 2 and node.args[1] == val.dtype
        elif node.target in (aten.view.default, aten.reshape.default):
            same = val.dim() == 1 and list(node.args[1]) == [-1]
        if same:
            node.replace_all_uses_with(src)
            dropped += 1
    return dropped


def _flat_names(program: Any) -> dict[str, str]:
    """Rename the program's weights from their module paths (``model.model.dense_arch.
    model._mlp.0._linear.weight``) to one flat attribute each (dots as ``_``):
    ``ExportedProgram.module()`` rebuilds the path as nested submodules, and the served
    call then walks it with ``nn.Module.__getattr__`` per level for every weight on
    every call (~100 lookups, a fifth of a batch-1 call). Returns ``{old: new}``."""
    taken = set()
    renamed: dict[str, str] = {}
    for spec in program.graph_signature.input_specs:
        if not spec.target or "." not in spec.target:
            if spec.target:
                taken.add(spec.target)
            continue
        new = base = spec.target.replace(".", "_")
        n = 1
        while new in taken:
            new, n = f"{base}_{n}", n + 1
        taken.add(new)
        renamed[spec.target] = new
        spec.target = new
    program._state_dict = {renamed.get(k, k): v for k, v in program.state_dict.items()}
    program._constants = {renamed.get(k, k): v for k, v in program.constants.items()}
    return renamed


def _program_tensors(program: Any) -> dict[str, torch.Tensor]:
    out = dict(program.state_dict)
    out.update({k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)})
    return out


def export(
    checkpoint: str,
    output: str,
    *,
    model: str = "dlrm",
    schema: Any = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    quantize: str = "fp32",
    num_embeddings: int = 10_000,
    embedding_dim: int = 16,
) -> ExportInfo:
    """Export ``checkpoint`` (an output_dir: its latest; or a ``ckpt_<step>``
    directory; any fsspec path) to the artifact file ``output`` (any fsspec path).

    ``model``: ``"dlrm"`` / ``"deepfm"``; ``schema``: a `FeatureSchema`, its file or
    dict, or None for synthetic data's (``num_embeddings`` rows, ``embedding_dim``
    wide); ``model_kwargs``: the other constructor arguments it was trained with
    (``dense_arch``, ``over_arch``, ``deep_arch``); ``quantize``: ``fp32``, ``int8``
    (row-wise) or ``int4``."""
    start = time.perf_counter()
    if quantize not in QUANTIZE:
        raise ValueError(f"export: quantize must be one of {QUANTIZE}, got {quantize!r}")
    feature_schema = _schema_of(schema, num_embeddings, embedding_dim)
    dynamic = [c.name for c in feature_schema.sparse if c.mapping.kind == "dynamic"]
    if dynamic:  # the artifact has no id map yet (its "id_maps" slot stays empty)
        raise ValueError(
            f"export: feature(s) {dynamic} use dynamic embedding tables, whose id->row map "
            "the serving artifact cannot carry yet; export a schema with modulo/hash ids"
        )
    net = build_serving_model(model, feature_schema, model_kwargs)
    manifest = load_checkpoint(net, checkpoint)
    module = ServingModule(net, feature_schema).eval()
    _quantize(module, quantize)
    program = _trace(module, feature_schema)
    _fold_split_cat(program)
    _gather_pairs(program)
    _drop_noop_nodes(program)
    _drop_dead_nodes(program)
    _drop_unused_buffers(program)
    _flat_names(program)
    tensors = _map_tensors(module, program)
    meta = _metadata(feature_schema, model, model_kwargs, quantize, checkpoint, manifest,
                     tensors)
    nbytes = _save(program, meta, output)
    return ExportInfo(output, nbytes, meta["source"]["step"], quantize,
                      time.perf_counter() - start)


def _trace(module: ServingModule, schema: FeatureSchema) -> Any:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1 << 20)
    ids = Dim("ids", min=0, max=1 << 40)
    # torch.fx's one-time notice about is_fx_tracing is addressed to library authors
    noisy = logging.getLogger("torch.fx._symbolic_trace")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with torch.no_grad():
            return torch.export.export(
                module, _example(schema),
                dynamic_shapes={"dense": {0: batch}, "values": {0: ids}, "lengths": {1: batch}},
                strict=False,
            )
    finally:
        noisy.setLevel(level)


def _metadata(schema: FeatureSchema, model: str, model_kwargs: Any, quantize: str,
              checkpoint: str, manifest: dict[str, Any], tensors: dict[str, str]) -> dict:
    from recframe import __version__

    return {
        "format": FORMAT,
        "recframe_version": __version__,
        "torch_version": torch.__version__,
        "created": time.time(),
        "model": model,
        "model_kwargs": {k: list(v) if isinstance(v, tuple) else v
                         for k, v in dict(model_kwargs or {}).items()},
        "quantize": quantize,
        "source": {"checkpoint": str(checkpoint), "name": manifest.get("name"),
                   "step": manifest.get("step"),
                   "incremental": (manifest.get("incremental") or {}).get("kind", "full")},
        "schema": schema.to_dict(),
        "inputs": {
            "dense": {"dtype": "float32", "shape": ["B", len(schema.dense)],
                      "columns": schema.dense_names, "missing": "NaN (the column's fill)"},
            "values": {"dtype": "int64", "shape": ["N"],
                       "order": "feature-major, features in feature_order"},
            "lengths": {"dtype": "int64", "shape": [len(schema.sparse), "B"]},
        },
        "feature_order": schema.feature_names,
        "id_mapping": {c.name: {**c.mapping.to_dict(), "table": c.table,
                                "num_embeddings": schema.num_embeddings_of(c)}
                       for c in schema.sparse},
        # extension point (dynamic embedding tables): a table whose ids are looked up
        # in a learned id -> row map records {"table": {"kind": ..., "tensor": ...}} here
        "id_maps": {},
        "output": "probability [B] float32",
        "tensors": tensors,
    }


def _save(program: Any, meta: dict[str, Any], output: str) -> int:
    """Write the artifact beside ``output`` and rename it over: a reader (or a crash)
    never sees half a file, and an existing artifact stays whole until then."""
    return _write_atomic(output, lambda f: torch.export.save(
        program, f, extra_files={METADATA: json.dumps(meta, indent=1)}))


def _write_atomic(output: str, write: Any) -> int:
    """``write(file)`` to a temporary file beside ``output``, then rename it over."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with fs.open(tmp, "wb") as f:
            write(f)
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)
    return int(fs.size(path))


def _open_artifact(artifact: str) -> Any:
    import fsspec

    try:
        return fsspec.open(artifact, "rb").open()
    except FileNotFoundError:
        raise ValueError(f"{artifact}: no such artifact file; write one with `recframe export "
                         f"CHECKPOINT {artifact}`") from None


def _metadata_of(z: Any, artifact: str) -> dict[str, Any]:
    found = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == METADATA]
    if not found:
        raise ValueError(f"{artifact} is no recframe serving artifact (no {METADATA})")
    try:
        meta = json.loads(z.read(found[0]))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{artifact}: {found[0]} is not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{artifact}: format {got!r}, expected {FORMAT!r}")
    return meta


def read_metadata(artifact: str) -> dict[str, Any]:
    """The artifact's ``recframe.json`` (without loading the program's weights)."""
    import zipfile

    with _open_artifact(artifact) as f:
        try:
            with zipfile.ZipFile(f) as z:
                return _metadata_of(z, artifact)
        except zipfile.BadZipFile:
            raise ValueError(f"{artifact} is no recframe serving artifact (not a zip "
                             "archive)") from None


# what a graph this module exports may call, and what its shape guards may say (the
# guards become Python source that ``ExportedProgram.module()`` compiles and runs)
_OPS = ("torch.ops.aten.", "torch.ops.fbgemm.", "_operator.")
_GUARD = re.compile(r"(?:\s+|L\['[A-Za-z_][A-Za-z0-9_]*'\](?:\.size\(\)\[\d+\])?|\d+"
                    r"|==|!=|<=|>=|<|>|\+|-|\*|//|%|\(|\)|and|or|not)*")


def check_artifact(data: bytes, artifact: str = "artifact") -> dict[str, Any]:
    """Refuse (ValueError naming the entry) an artifact whose loading could run code:
    ``torch.export.load`` unpickles payloads marked ``use_pickle`` and custom objects
    with plain pickle, falls back to ``torch.load(weights_only=False)`` for sample
    inputs it cannot read safely, and ``.module()`` compiles the stored guards into
    Python; a graph may name any ``torch.*`` callable. Allowed: tensor payloads only,
    sample inputs that ``weights_only`` reads, shape comparisons as guards, aten /
    fbgemm ops; entry names without ``..`` or a leading ``/``. Returns the metadata."""
    import io
    import zipfile

    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ValueError(f"{artifact} is no recframe serving artifact (not a zip "
                         "archive)") from None
    with z:
        names = z.namelist()
        for name in names:
            parts = name.replace("\\", "/").split("/")
            if name.startswith("/") or ".." in parts or ":" in parts[0]:
                raise ValueError(f"{artifact}: entry {name!r} points outside the archive")
        meta = _metadata_of(z, artifact)

        def refuse(name: str, why: str) -> None:
            raise ValueError(f"{artifact}: refused to load, {name} {why} (loading it could "
                             "run code); re-export the checkpoint with recframe")

        for name in names:
            leaf = name.rsplit("/", 1)[-1]
            if leaf in ("model_weights_config.json", "model_constants_config.json"):
                config = json.loads(z.read(name)).get("config", {})
                for key, entry in config.items():
                    path = str(entry.get("path_name", ""))
                    if entry.get("use_pickle") or not path.startswith(("weight_", "tensor_")):
                        refuse(f"{name}: {key!r}", "is a pickled object, not a tensor")
            elif "/sample_inputs/" in name:
                try:
                    torch.load(io.BytesIO(z.read(name)), weights_only=True)
                except Exception as e:  # noqa: BLE001 (any failure: unsafe to fall back)
                    refuse(name, f"is not plain tensors ({type(e).__name__})")
            elif "/models/" in name and leaf.endswith(".json"):
                program = json.loads(z.read(name))
                for guard in program.get("guards_code") or []:
                    if not isinstance(guard, str) or not _GUARD.fullmatch(guard):
                        refuse(f"{name}: guard {str(guard)[:80]!r}", "is not a shape check")
                nodes = (program.get("graph_module") or {}).get("graph", {}).get("nodes", [])
                for node in nodes:
                    target = str(node.get("target", ""))
                    if not target.startswith(_OPS):
                        refuse(f"{name}: node target {target[:80]!r}", "is no aten/fbgemm op")
    return meta


def load_artifact(artifact: str) -> tuple[Any, dict[str, Any]]:
    """``(ExportedProgram, metadata)`` (what a serving process does, with recframe's
    checks: `check_artifact` first, on the very bytes then loaded, and the quantised
    kernels' ops registered)."""
    import io

    with _open_artifact(artifact) as f:
        data = f.read()
    meta = check_artifact(data, artifact)
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm: the tables' kernel)
    program = torch.export.load(io.BytesIO(data))
    return program, meta


def check_inputs(meta: Mapping[str, Any], dense: Any, values: Any, lengths: Any) -> None:
    """Raise a ValueError naming the tensor when the artifact's inputs are malformed
    (the exported graph's own guards name no input)."""
    d = len(meta["inputs"]["dense"]["columns"])
    f = len(meta["feature_order"])
    for name, t, dtype in (("dense", dense, torch.float32), ("values", values, torch.int64),
                           ("lengths", lengths, torch.int64)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"artifact input {name!r} must be a tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise ValueError(f"artifact input {name!r} must be {dtype}, got {t.dtype}")
    if dense.dim() != 2 or dense.shape[1] != d:
        raise ValueError(f"artifact input 'dense' must be [B, {d}] (columns "
                         f"{meta['inputs']['dense']['columns']}), got {tuple(dense.shape)}")
    if lengths.dim() != 2 or lengths.shape != (f, dense.shape[0]):
        raise ValueError(f"artifact input 'lengths' must be [{f}, B={dense.shape[0]}] (one row "
                         f"per feature of {meta['feature_order']}), got {tuple(lengths.shape)}")
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError(f"artifact input 'lengths' must be >= 0 (ids per feature and "
                         f"sample), got {int(lengths.min())}")
    if values.dim() != 1 or values.shape[0] != int(lengths.sum()):
        raise ValueError(f"artifact input 'values' must be [sum(lengths)={int(lengths.sum())}], "
                         f"got {tuple(values.shape)}")


def inputs_from_features(
    meta: Mapping[str, Any], dense: Mapping[str, Any], sparse: Mapping[str, Any],
    ignore_unknown: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The artifact's three inputs from raw values by name: ``dense[column]`` a list of
    B numbers (None: missing), ``sparse[feature]`` a list of B lists of raw ids (ints,
    hex or plain strings, mapped by `raw_id`). A missing column or feature, or (unless
    ``ignore_unknown``) one the artifact does not know, is an error naming it."""
    columns, features = meta["inputs"]["dense"]["columns"], meta["feature_order"]
    missing = [c for c in columns if c not in dense] + [f for f in features if f not in sparse]
    if missing:
        raise ValueError(f"the artifact needs feature(s) {missing}; it reads dense columns "
                         f"{columns} and sparse features {features}")
    unknown = [c for c in dense if c not in columns] + [f for f in sparse if f not in features]
    if unknown and not ignore_unknown:
        raise ValueError(f"feature(s) {unknown} are not in the artifact's schema (dense "
                         f"columns {columns}, sparse features {features}): a request of a "
                         "newer schema? drop them, or pass ignore_unknown=True")
    sizes = {len(dense[c]) for c in columns} | {len(sparse[f]) for f in features}
    if len(sizes) != 1:
        raise ValueError(f"every feature needs the same number of samples, got sizes {sizes}")
    rows = []
    for c in columns:
        try:
            rows.append([float("nan") if v is None else float(v) for v in dense[c]])
        except (TypeError, ValueError):
            raise ValueError(f"dense column {c!r}: values must be numbers or None") from None
    dense_t = torch.tensor(rows, dtype=torch.float64).T.float().reshape(sizes.pop(), len(columns))
    values: list[int] = []
    lengths: list[list[int]] = []
    for f in features:
        mapping = meta["id_mapping"][f]
        per = []
        for bag in sparse[f]:
            bag = [] if bag is None else ([bag] if isinstance(bag, (int, str)) else list(bag))
            try:
                values += [raw_id(v, mapping) for v in bag]
            except (TypeError, ValueError):
                raise ValueError(f"sparse feature {f!r}: {bag!r} holds an id its "
                                 f"{mapping['kind']} mapping cannot read") from None
            per.append(len(bag))
        lengths.append(per)
    return (dense_t, torch.tensor(values, dtype=torch.int64).reshape(-1),
            torch.tensor(lengths, dtype=torch.int64).reshape(len(features), -1))


_ROWS_PER_CHUNK = 1 << 14


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the widest integers its rows split into: rows then compare by their bits
    (a float ``-0.0`` differs from ``0.0``, a ``NaN`` equals itself) with a few wide
    compares instead of one per byte or float."""
    width = t.shape[1] * t.element_size()
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = torch.empty(0, dtype=dtype).element_size()
        if width % size == 0 and (t.storage_offset() * t.element_size()) % size == 0:
            try:
                return t.view(dtype)
            except RuntimeError:
                continue
    return t


def _copy_changed_rows(old: torch.Tensor, new: torch.Tensor) -> int:
    """Copy the rows of ``new`` whose bits differ into ``old`` (in place); their number.
    In chunks of rows: the comparison's temporaries stay small (a whole-table ``!=``
    allocated a mask as large as the table, ~1 s on the benchmark's 256 MB)."""
    a, b = _bits(old), _bits(new)
    count = 0
    for start in range(0, a.shape[0], _ROWS_PER_CHUNK):
        x, y = a[start:start + _ROWS_PER_CHUNK], b[start:start + _ROWS_PER_CHUNK]
        rows = torch.ne(x, y).any(dim=1).nonzero().squeeze(1)
        if rows.numel():
            x.index_copy_(0, rows, y.index_select(0, rows))
            count += int(rows.numel())
    return count


def _packed_tables(module: nn.Module, name: str, old: torch.Tensor,
                   new: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``[(table, old rows, new rows)]``: byte views ``[rows, row bytes]`` of each table
    inside fbgemm's packed weights buffer ``name`` (empty for any other tensor)."""
    owner_name, _, attr = name.rpartition(".")
    if old.dim() != 1 or old.dtype != torch.uint8 or attr not in ("weights_host", "weights_dev"):
        return []
    owner: Any = module
    for part in owner_name.split("."):
        owner = owner[int(part)] if isinstance(owner, (list, tuple)) else getattr(owner, part)
    out = []
    specs = owner.embedding_specs
    for i, (weights, _) in enumerate(owner.split_embedding_weights()):
        base = int(owner.weights_offsets[i])
        rows, stride = weights.shape[0], weights.stride(0)
        if base + rows * stride > old.numel():
            raise ValueError(f"apply_checkpoint: the packed tables of {name} do not fit")
        view = (rows, stride)
        out.append((str(specs[i][0]), old.as_strided(view, (stride, 1), base),
                    new.as_strided(view, (stride, 1), base)))
    return out


def _payload_views(z: Any, buf: bytearray, expected: Mapping[str, torch.Tensor],
                   artifact: str) -> dict[str, tuple[str, torch.Tensor]]:
    """``{program tensor key: (zip entry, tensor viewing buf)}``: the raw tensor payloads
    of the archive (uncompressed entries, laid out as their ``tensor_meta`` says), as
    writable views of ``buf``, the archive's bytes; dtype from ``expected[key]``."""
    import zipfile

    infos = {i.filename: i for i in z.infolist()}
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for cfg in [n for n in infos if n.endswith(("/model_weights_config.json",
                                                "/model_constants_config.json"))]:
        folder = cfg.rsplit("/", 1)[0]
        for key, entry in json.loads(z.read(cfg)).get("config", {}).items():
            if key not in expected:
                continue
            name = f"{folder}/{entry['path_name']}"
            info = infos.get(name)
            want = expected[key]
            tmeta = entry.get("tensor_meta") or {}
            sizes = [d.get("as_int") for d in tmeta.get("sizes", [])]
            strides = [d.get("as_int") for d in tmeta.get("strides", [])]
            offset = (tmeta.get("storage_offset") or {}).get("as_int", 0)
            if (info is None or info.compress_type != zipfile.ZIP_STORED
                    or sizes != list(want.shape) or info.file_size % want.element_size()):
                raise ValueError(
                    f"apply_checkpoint: tensor {key!r} is {sizes} in {artifact} but "
                    f"{list(want.shape)} {want.dtype} in the checkpoint's model: re-export "
                    "instead")
            header = buf[info.header_offset:info.header_offset + 30]
            start = (info.header_offset + 30 + int.from_bytes(header[26:28], "little")
                     + int.from_bytes(header[28:30], "little"))
            raw = torch.frombuffer(buf, dtype=torch.uint8, count=info.file_size,
                                   offset=start) if info.file_size else torch.empty(
                                       0, dtype=torch.uint8)
            storage = raw.view(want.dtype)
            need = offset + sum((n - 1) * st for n, st in zip(sizes, strides)) + 1
            if any(n == 0 for n in sizes):
                need = 0
            if need > storage.numel():
                raise ValueError(f"apply_checkpoint: {artifact}: {name} is too short for "
                                 f"tensor {key!r}")
            out[key] = (name, storage.as_strided(sizes, strides, offset))
    return out


def apply_checkpoint(artifact: str, checkpoint: str, output: Optional[str] = None) -> ExportInfo:
    """Refresh ``artifact`` (written to ``output``, default in place) with the weights of
    ``checkpoint`` (e.g. the newest incremental one) without tracing the graph: the
    model is rebuilt from the artifact's metadata, loaded, quantised like the artifact,
    and each table row that differs is copied into the artifact's tensor payloads (the
    dense weights are replaced), in the archive's bytes: the program is neither loaded
    nor serialised again, the other entries are copied as they are. Equal to `export`
    of that checkpoint."""
    import io
    import zipfile

    start = time.perf_counter()
    with _open_artifact(artifact) as f:
        data = f.read()
    meta = check_artifact(data, artifact)
    schema = FeatureSchema.from_dict(meta["schema"])
    net = build_serving_model(meta["model"], schema, meta["model_kwargs"])
    manifest = load_checkpoint(net, checkpoint)
    had, step = (meta.get("source") or {}).get("step"), manifest.get("step")
    if isinstance(had, int) and isinstance(step, int) and step < had:
        raise ValueError(
            f"apply_checkpoint: {checkpoint} is step {step}, older than the step {had} "
            f"{artifact} holds; deltas only move an artifact forward (to roll back, export "
            f"that checkpoint in full: recframe export {checkpoint} ...)")
    module = ServingModule(net, schema).eval()
    _quantize(module, meta["quantize"])
    buf = bytearray(data)
    z = zipfile.ZipFile(io.BytesIO(data))
    expected = {key: _named_tensor(module, name) for key, name in meta["tensors"].items()}
    current = _payload_views(z, buf, expected, artifact)
    changed: dict[str, int] = {}
    with torch.no_grad():
        for key, name in meta["tensors"].items():
            if key not in current:
                raise ValueError(f"apply_checkpoint: {artifact} has no tensor {key!r}")
            (_, old), new = current[key], expected[key]
            packed = _packed_tables(module, name, old, new)
            if packed:  # fbgemm's buffer of all tables: row by row within each table
                for table, old_rows, new_rows in packed:
                    changed[table] = _copy_changed_rows(old_rows, new_rows)
                if not torch.equal(old, new):  # the bytes between tables (alignment)
                    old.copy_(new)
            elif old.dim() == 2 and "embedding_bags" in name:  # an fp32 table
                changed[name] = _copy_changed_rows(old, new)
            elif not torch.equal(old, new):
                old.copy_(new)
    meta["source"] = {"checkpoint": str(checkpoint), "name": manifest.get("name"),
                      "step": manifest.get("step"),
                      "incremental": (manifest.get("incremental") or {}).get("kind", "full")}
    meta["created"] = time.time()
    target = output or artifact
    payloads = {name for name, _ in current.values()}

    def write(f: Any) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as out:
            for info in z.infolist():
                entry = copy.copy(info)  # writestr sets the copy's offsets, not z's
                if info.filename.rsplit("/", 1)[-1] == METADATA:
                    out.writestr(entry, json.dumps(meta, indent=1))
                elif info.filename in payloads:
                    head = buf[info.header_offset + 26:info.header_offset + 30]
                    begin = (info.header_offset + 30 + int.from_bytes(head[:2], "little")
                             + int.from_bytes(head[2:], "little"))
                    out.writestr(entry, memoryview(buf)[begin:begin + info.file_size])
                else:
                    out.writestr(entry, z.read(info.filename))

    nbytes = _write_atomic(target, write)  # in place: renamed over the old file when whole
    return ExportInfo(target, nbytes, manifest.get("step"), meta["quantize"],
                      time.perf_counter() - start, changed)
