"""Serving artifacts: export from a checkpoint (full or incremental), load without
recframe, int8 tables, raw feature values in, apply a newer checkpoint's rows, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from recframe import Trainer, TrainingArguments
from recframe import export as ex
from recframe.data import SyntheticCriteo
from recframe.models import DLRM

ROWS, DIM = 10_000, 16
KWARGS = {"dense_arch": (16, DIM), "over_arch": (16, 1)}


def _data(n: int, batch: int, seed: int) -> SyntheticCriteo:
    return SyntheticCriteo(num_batches=n, batch_size=batch, num_embeddings=ROWS,
                           ids_per_feature=(1, 3), seed=seed)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A DLRM trained 8 steps with incremental checkpoints: ckpt_4 full, ckpt_8 a delta;
    artifacts of ckpt_4 (fp32, int8) and of ckpt_8 (fp32, int8)."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = DLRM(num_embeddings=ROWS, embedding_dim=DIM, **KWARGS)
    args = TrainingArguments(output_dir=str(root / "run"), train_steps=8, save_steps=4,
                             max_to_keep=5, incremental_checkpoints=True,
                             report_to="none", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=_data(40, 64, 0)).train()
    out = {"root": root, "model": model.eval(), "run": root / "run"}
    for step in (4, 8):
        for q in ("fp32", "int8"):
            path = str(root / f"s{step}_{q}.pt2")
            out[(step, q)] = ex.export(str(root / "run" / f"ckpt_{step}"), path,
                                       model="dlrm", model_kwargs=KWARGS, quantize=q,
                                       num_embeddings=ROWS, embedding_dim=DIM)
    return out


def _inputs(batches: list) -> list[tuple[torch.Tensor, ...]]:
    return [ex.serving_inputs(b, ex.synthetic_schema(ROWS, DIM).feature_names)
            for b in batches]


LOADER = textwrap.dedent("""
    import json, sys
    import torch
    import fbgemm_gpu  # noqa: F401  (the tables' kernel)

    inputs = torch.load(sys.argv[1], weights_only=True)
    results = {}
    for name in sys.argv[3:]:
        extra = {"recframe.json": ""}
        program = torch.export.load(name, extra_files=extra)
        meta = json.loads(extra["recframe.json"])
        module = program.module()
        with torch.no_grad():
            results[name] = [module(*x) for x in inputs]
        results[name + ":step"] = torch.tensor(meta["source"]["step"])
    assert "recframe" not in sys.modules, "the artifact pulled recframe in"
    assert "torchrec" not in sys.modules, "the artifact pulled torchrec in"
    torch.save(results, sys.argv[2])
""")


def test_artifact_loads_without_recframe_and_reproduces_predictions(trained, tmp_path):
    from torchmetrics.functional.classification import binary_auroc

    batches = list(_data(8, 512, 7))  # 4096 eval samples
    inputs = _inputs(batches)
    torch.save(inputs, tmp_path / "in.pt")
    (tmp_path / "load.py").write_text(LOADER)
    fp32, int8 = trained[(8, "fp32")].path, trained[(8, "int8")].path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, str(tmp_path / "load.py"), str(tmp_path / "in.pt"),
                          str(tmp_path / "out.pt"), fp32, int8],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert int(got[fp32 + ":step"]) == 8
    model = trained["model"]  # trained to step 8: what ckpt_8 holds
    with torch.no_grad():
        expected = torch.cat([model.predict(b) for b in batches])
    p32, p8 = torch.cat(got[fp32]), torch.cat(got[int8])
    assert float((p32 - expected).abs().max()) <= 1e-6
    labels = torch.cat([b.labels for b in batches]).long()
    auc32 = float(binary_auroc(p32, labels, thresholds=None))
    auc8 = float(binary_auroc(p8, labels, thresholds=None))
    assert abs(auc8 - auc32) <= 0.002, (auc32, auc8)
    assert not torch.equal(p8, p32)  # the tables really are int8
    assert trained[(8, "int8")].bytes <= 0.35 * trained[(8, "fp32")].bytes


def test_metadata_records_source_schema_and_feature_order(trained):
    meta = ex.read_metadata(trained[(8, "int8")].path)
    assert meta["format"] == ex.FORMAT and meta["quantize"] == "int8"
    assert meta["source"]["step"] == 8 and meta["source"]["incremental"] == "delta"
    assert meta["feature_order"] == [f"cat_{i}" for i in range(26)]
    assert meta["id_mapping"]["cat_3"] == {"kind": "modulo", "salt": 0, "table": "t_cat_3",
                                           "num_embeddings": ROWS}
    assert meta["id_maps"] == {}
    assert ex.FeatureSchema.from_dict(meta["schema"]).to_dict() == meta["schema"]


@pytest.mark.parametrize("quantize", ["fp32", "int8"])
def test_apply_checkpoint_equals_a_full_export(trained, tmp_path, quantize):
    base = trained[(4, quantize)].path
    full = trained[(8, quantize)].path
    info = ex.apply_checkpoint(base, str(trained["run"] / "ckpt_8"),
                               output=str(tmp_path / "fresh.pt2"))
    assert info.step == 8 and sum(info.changed_rows.values()) > 0
    if quantize == "fp32":  # only the rows the 4 updates touched were rewritten
        assert sum(info.changed_rows.values()) < 26 * ROWS
    fresh, meta = ex.load_artifact(info.path)
    want, _ = ex.load_artifact(full)
    assert meta["source"]["step"] == 8
    a, b = ex._program_tensors(fresh), ex._program_tensors(want)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    old, _ = ex.load_artifact(base)
    x = _inputs(list(_data(1, 256, 3)))[0]
    with torch.no_grad():
        assert torch.equal(fresh.module()(*x), want.module()(*x))
        assert not torch.equal(old.module()(*x), want.module()(*x))


def test_apply_checkpoint_in_place_keeps_a_whole_file(trained, tmp_path):
    import shutil

    path = tmp_path / "live.pt2"
    shutil.copy(trained[(4, "fp32")].path, path)
    ex.apply_checkpoint(str(path), str(trained["run"]))  # the output_dir: its latest
    assert ex.read_metadata(str(path))["source"]["step"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.pt2"]


def test_raw_values_go_in_hex_hash_modulo_and_dense_transforms(tmp_path):
    """The graph applies the schema's id mappings and dense transforms: raw CSV values
    (via `raw_id`) give the predictions recframe's reader + model give."""
    from recframe.checkpoint import Saver
    from recframe.readers import TabularDataset
    from recframe.schema import FeatureSchema, hash_strings

    schema = FeatureSchema.from_dict({
        "labels": ["y"],
        "dense": [{"name": "price", "transform": "standardize", "mean": 3.0, "std": 2.0,
                   "fill": 1.5}, {"name": "views", "transform": "log1p"}],
        "sparse": [{"name": "user", "mapping": {"kind": "hash", "salt": 7}},
                   {"name": "item", "table": "item_t", "mapping": "hex"},
                   {"name": "tags", "table": "item_t", "delimiter": "|"}],
        "tables": [{"name": "user", "num_embeddings": 97, "embedding_dim": 8},
                   {"name": "item_t", "num_embeddings": 61, "embedding_dim": 8}],
    })
    assert ex.raw_id("user_42", {"kind": "hash", "salt": 0}) & (2**64 - 1) == \
        int(hash_strings(["user_42"])[0])
    rows = [("1", "2.5", "10", "alice", "ff", "3|-4|5"),
            ("0", "", "-3", "bob", "FFFFFFFFFFFFFFFF", ""),
            ("1", "7", "", "", "1a", "-9"),
            ("0", "-1", "0.5", "carol", "0", "12|13")]
    csv = tmp_path / "d.csv"
    csv.write_text("y,price,views,user,item,tags\n" + "\n".join(",".join(r) for r in rows))
    batch = next(iter(TabularDataset(str(csv), schema, format="csv", header=True,
                                     batch_size=4, num_workers=0)))
    torch.manual_seed(1)
    model = DLRM(schema=schema, dense_arch=(8, 8), over_arch=(8, 1)).eval()
    Saver(model, output_dir=str(tmp_path / "ck")).save(1)
    art = ex.export(str(tmp_path / "ck"), str(tmp_path / "m.pt2"), model="dlrm",
                    schema=schema, model_kwargs={"dense_arch": (8, 8), "over_arch": (8, 1)})
    nan = float("nan")
    dense = torch.tensor([[float(r[1]) if r[1] else nan, float(r[2]) if r[2] else nan]
                          for r in rows])
    values, lengths = [], []
    for j, col in enumerate(schema.sparse):
        per = []
        for r in rows:
            raw = r[3 + j]
            items = [x for x in (raw.split(col.delimiter) if col.delimiter else [raw]) if x]
            per.append(len(items))
            values += [ex.raw_id(x, col.mapping) for x in items]
        lengths.append(per)
    program, _ = ex.load_artifact(art.path)
    with torch.no_grad():
        got = program.module()(dense, torch.tensor(values), torch.tensor(lengths))
        want = model.predict(batch)
    assert float((got - want).abs().max()) <= 1e-6


def test_export_refuses_a_checkpoint_of_another_model_or_schema(trained, tmp_path):
    ckpt = str(trained["run"] / "ckpt_8")
    with pytest.raises(ValueError, match=r"ckpt_8 does not match.*t_cat_0.*\[10000, 16\]"):
        ex.export(ckpt, str(tmp_path / "x.pt2"), model="dlrm", model_kwargs=KWARGS,
                  num_embeddings=500, embedding_dim=DIM)
    with pytest.raises(ValueError, match=r"ckpt_8.*does not match"):
        ex.export(ckpt, str(tmp_path / "x.pt2"), model="deepfm", num_embeddings=ROWS,
                  embedding_dim=DIM)
    with pytest.raises(ValueError, match="quantize must be one of"):
        ex.export(ckpt, str(tmp_path / "x.pt2"), quantize="int2")
    with pytest.raises(ValueError, match="checkpoint .*nothing does not exist"):
        ex.export(str(tmp_path / "nothing"), str(tmp_path / "x.pt2"))
    assert not (tmp_path / "x.pt2").exists()


def test_artifact_input_errors_name_the_tensor_or_feature(trained):
    program, meta = ex.load_artifact(trained[(8, "fp32")].path)
    dense, values, lengths = _inputs(list(_data(1, 8, 3)))[0]
    ex.check_inputs(meta, dense, values, lengths)
    with pytest.raises(ValueError, match="'values' must be torch.int64, got torch.int32"):
        ex.check_inputs(meta, dense, values.int(), lengths)
    with pytest.raises(ValueError, match=r"'lengths' must be \[26, B=8\]"):
        ex.check_inputs(meta, dense, values, lengths[1:])
    with pytest.raises(ValueError, match="'dense' must be torch.float32"):
        ex.check_inputs(meta, dense.double(), values, lengths)
    negative = lengths.clone()
    negative[3, 0], negative[4, 0] = -1, negative[4, 0] + 1  # same total, one bag < 0
    with pytest.raises(ValueError, match="'lengths' must be >= 0"):
        ex.check_inputs(meta, dense, values, negative)
    with pytest.raises(Exception, match="lengths"):  # the graph's own guard
        program.module()(dense, values, lengths[1:])
    sparse = {f"cat_{i}": [[i, 2 * i]] for i in range(26)}
    dense_raw = {f"int_{i}": [0.5] for i in range(13)}
    d, v, ln = ex.inputs_from_features(meta, dense_raw, sparse)
    with torch.no_grad():
        assert program.module()(d, v, ln).shape == (1,)
    del sparse["cat_7"]
    with pytest.raises(ValueError, match=r"needs feature\(s\) \['cat_7'\]"):
        ex.inputs_from_features(meta, dense_raw, sparse)
    sparse["cat_7"] = [["x1"]]
    with pytest.raises(ValueError, match="sparse feature 'cat_7'"):
        ex.inputs_from_features(meta, dense_raw, sparse)


def test_cli_export_and_apply_delta(trained, tmp_path, capsys):
    from recframe.cli import main

    out = tmp_path / "cli.pt2"
    code = main(["export", str(trained["run"] / "ckpt_4"), str(out), "--quantize", "int8",
                 "--num_embeddings", str(ROWS), "--embedding_dim", str(DIM),
                 "--model_kwargs", json.dumps(KWARGS)])
    assert code == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "MiB" in printed
    code = main(["export", "--apply-delta", str(trained["run"] / "ckpt_8"), str(out)])
    assert code == 0
    assert ex.read_metadata(str(out))["source"]["step"] == 8
    code = main(["export", str(trained["run"]), str(tmp_path / "y.pt2"), "--model", "deepfm"])
    assert code == 2
    assert "does not match" in capsys.readouterr().err


def test_int4_tables_run_on_fbgemm_cpu_kernels(trained, tmp_path):
    info = ex.export(str(trained["run"] / "ckpt_8"), str(tmp_path / "m4.pt2"), model="dlrm",
                     model_kwargs=KWARGS, quantize="int4", num_embeddings=ROWS,
                     embedding_dim=DIM)
    assert info.bytes < trained[(8, "int8")].bytes
    program, meta = ex.load_artifact(info.path)
    assert meta["quantize"] == "int4"
    batches = list(_data(2, 256, 7))
    with torch.no_grad():
        got = torch.cat([program.module()(*x) for x in _inputs(batches)])
        want = torch.cat([trained["model"].predict(b) for b in batches])
    assert float((got - want).abs().max()) < 1e-2


def test_export_refuses_dynamic_tables_by_name(tmp_path):
    """The artifact cannot carry a dynamic table's id->row map yet: a clear error naming
    the feature, not an artifact that looks ids up in the wrong rows."""
    from recframe.schema import FeatureSchema

    schema = FeatureSchema.from_dict({
        "labels": ["y"], "dense": ["x0"],
        "sparse": [{"name": "user", "mapping": {"kind": "dynamic", "dynamic": {
            "fallback_rows": 4, "eviction": "lru", "eviction_interval": 2}}}],
        "tables": [{"name": "user", "num_embeddings": 24, "embedding_dim": 4}],
    })
    with pytest.raises(ValueError, match=r"\['user'\].*dynamic"):
        ex.export(str(tmp_path / "none"), str(tmp_path / "a.pt2"), schema=schema)


def test_served_graph_runs_no_dead_or_copying_nodes(trained, caplog):
    """The fp32 artifact's graph (what `.module()` runs node by node per call): the
    batched kernel's output goes to the interaction without a split + cat copy, no
    unused labels / per-key offsets / dtype re-checks, the interaction's pairs gathered
    by a flat index, and (one table size, modulo ids) a scalar modulus instead of a
    per-id feature lookup."""
    import logging

    with caplog.at_level(logging.WARNING):
        program, _ = ex.load_artifact(trained[(8, "fp32")].path)
    # no value ranges left behind for the erased nodes' symbols (each warned per load)
    assert "did not appear in the graph" not in caplog.text
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    for op in ("aten.split_with_sizes", "aten._assert_tensor_metadata", "aten.zeros",
               "aten.searchsorted", "aten.detach_", "aten.item", "aten._assert_scalar",
               "aten.index.Tensor"):
        assert not [t for t in targets if t.startswith(op)], (op, targets)
    # the kernel's offsets only (torchrec's unused per-key offsets went)
    assert targets.count("fbgemm.asynchronous_complete_cumsum.default") == 1
    assert targets.count("aten.index_select.default") == 1  # the interaction's pairs
    assert len(targets) < 40, len(targets)  # 26 features: ~250 before the pruning
    # no casts to the dtype a tensor already has, no view of a 1-D tensor as 1-D
    assert "aten.to.dtype" not in targets and "aten.view.default" not in targets, targets
    # the interaction's fixed pairs: one constant flat index, not computed per call
    assert not [t for t in targets if t.startswith(("aten.select", "aten.mul"))], targets
    # every weight one flat attribute of the served module: a call reads each with one
    # lookup, not a walk down model.model.dense_arch.model._mlp.0._linear per weight
    weights = [s.target for s in program.graph_signature.input_specs if s.target]
    assert weights and not [w for w in weights if "." in w], weights
    served = program.module()
    assert not [n for n, _ in served.named_children() if n != "_guards_fn"]
    assert "getattr(" not in served.code


@pytest.mark.parametrize("kinds", [("modulo", "modulo"), ("modulo", "hash"), ("hex", "hash")])
@pytest.mark.parametrize("sizes", [(7, 7), (7, 1000)])
def test_id_mapping_paths_agree_with_raw_id_arithmetic(kinds, sizes):
    """Every specialised id path of `ServingModule` (scalar modulus, per-feature
    modulus, unsigned wrap) maps an int64 as `raw_id`'s contract says: Python's
    modulo for modulo ids, the unsigned value's modulo for hex/hash ids; a missing
    dense value (no transform: the float32 path) becomes its column's fill."""
    from recframe.schema import FeatureSchema

    schema = FeatureSchema.from_dict({
        "labels": ["y"], "dense": [{"name": "d", "fill": 2.5}, {"name": "e"}],
        "sparse": [{"name": f"f{i}", "table": f"t{i}", "mapping": {"kind": k}}
                   for i, k in enumerate(kinds)],
        "tables": [{"name": f"t{i}", "num_embeddings": n, "embedding_dim": 4}
                   for i, n in enumerate(sizes)]})

    class Echo(torch.nn.Module):
        def predict(self, batch):
            self.dense = batch.dense_features
            return batch.sparse_features.values()

    module = ex.ServingModule(Echo(), schema)
    raw = [-(1 << 63), -5, -1, 0, 3, 999, (1 << 63) - 1]
    values = torch.tensor(raw + raw, dtype=torch.int64)
    lengths = torch.tensor([[len(raw)], [len(raw)]])
    echo = module.model
    got = module(torch.tensor([[float("nan"), 0.25]]), values, lengths).tolist()
    want = [(v % (1 << 64) if k in ("hex", "hash") else v) % n
            for k, n in zip(kinds, sizes) for v in raw]
    assert got == want
    assert echo.dense.dtype == torch.float32 and echo.dense.tolist() == [[2.5, 0.25]]
