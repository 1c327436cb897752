"""Regression tests from an adversarial review of issue 16 (serving artifacts): hostile
artifact files, checkpoints that do not fit, malformed requests, deltas applied out of
order or from elsewhere, fsspec paths. Each case slipped past the first release."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile

import pytest
import torch

from recframe import Trainer, TrainingArguments
from recframe import export as ex
from recframe.data import SyntheticCriteo
from recframe.models import DLRM

ROWS, DIM, F = 500, 8, 4
KWARGS = {"dense_arch": (8, DIM), "over_arch": (8, 1)}
OPTS = {"model": "dlrm", "model_kwargs": KWARGS}


def _schema(rows: int = ROWS, table0: str = "t_cat_0"):
    schema = ex.synthetic_schema(rows, DIM, num_sparse=F)
    data = schema.to_dict()
    data["tables"][0]["name"] = table0
    data["sparse"][0]["table"] = table0
    return ex.FeatureSchema.from_dict(data)


def _train(root, seed: int) -> None:
    torch.manual_seed(seed)
    model = DLRM(schema=_schema(), **KWARGS)
    args = TrainingArguments(output_dir=str(root), train_steps=4, save_steps=2, max_to_keep=5,
                             incremental_checkpoints=True, report_to="none",
                             disable_tqdm=True)
    data = SyntheticCriteo(num_batches=4, batch_size=32, num_embeddings=ROWS, num_sparse=F,
                           seed=seed)
    Trainer(model=model, args=args, train_dataset=data).train()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two runs of the same small DLRM (ckpt_2 full, ckpt_4 a delta) and an fp32
    artifact of run a's ckpt_2."""
    root = tmp_path_factory.mktemp("attack16")
    _train(root / "a", 0)
    _train(root / "b", 1)
    art = ex.export(str(root / "a" / "ckpt_2"), str(root / "a2.pt2"), schema=_schema(), **OPTS)
    return {"root": root, "a": root / "a", "b": root / "b", "art": art.path}


def _inputs(batch: int = 3) -> tuple[torch.Tensor, ...]:
    b = next(iter(SyntheticCriteo(num_batches=1, batch_size=batch, num_embeddings=ROWS,
                                  num_sparse=F, seed=5)))
    return ex.serving_inputs(b, _schema().feature_names)


def _rewrite(src: str, dst, edit) -> str:
    """Copy the artifact zip ``src`` to ``dst`` with ``edit(name, bytes) -> bytes``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))
    return str(dst)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file when unpickled


# --- hostile artifact files ----------------------------------------------------------
def test_a_pickle_in_the_sample_inputs_is_refused_before_torch_unpickles_it(runs, tmp_path):
    """torch.export.load falls back to torch.load(weights_only=False) on sample inputs
    that weights_only cannot read: a hostile artifact ran code on load."""
    marker = tmp_path / "ran"
    buf = io.BytesIO()
    torch.save(_Evil(str(marker)), buf)
    bad = _rewrite(runs["art"], tmp_path / "evil.pt2",
                   lambda n, b: buf.getvalue() if "/sample_inputs/" in n else b)
    with pytest.raises(ValueError, match=r"sample_inputs/model.pt is not plain tensors"):
        ex.load_artifact(bad)
    with pytest.raises(ValueError, match="refused"):
        ex.apply_checkpoint(bad, str(runs["a"] / "ckpt_4"), output=str(tmp_path / "o.pt2"))
    assert not marker.exists() and not (tmp_path / "o.pt2").exists()


def _edit_program(key: str, value):
    def edit(name: str, data: bytes) -> bytes:
        if not name.endswith("models/model.json"):
            return data
        program = json.loads(data)
        value(program) if callable(value) else program.__setitem__(key, value)
        return json.dumps(program).encode()
    return edit


def test_guards_that_are_not_shape_checks_are_refused(runs, tmp_path):
    """``.module()`` compiles the stored guards into Python and runs them every call."""
    bad = _rewrite(runs["art"], tmp_path / "g.pt2", _edit_program(
        "guards_code", ["__import__('os').system('true') == 0"]))
    with pytest.raises(ValueError, match=r"guard .*__import__.* is not a shape check"):
        ex.load_artifact(bad)


def test_a_graph_calling_anything_but_aten_or_fbgemm_ops_is_refused(runs, tmp_path):
    def retarget(program: dict) -> None:
        program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.hub.load"

    bad = _rewrite(runs["art"], tmp_path / "t.pt2", _edit_program("", retarget))
    with pytest.raises(ValueError, match=r"node target 'torch.hub.load' is no aten/fbgemm op"):
        ex.load_artifact(bad)


def test_pickled_weight_payloads_are_refused(runs, tmp_path):
    def pickled(name: str, data: bytes) -> bytes:
        if not name.endswith("model_weights_config.json"):
            return data
        config = json.loads(data)
        next(iter(config["config"].values()))["use_pickle"] = True
        return json.dumps(config).encode()

    bad = _rewrite(runs["art"], tmp_path / "p.pt2", pickled)
    with pytest.raises(ValueError, match="is a pickled object, not a tensor"):
        ex.load_artifact(bad)


def test_entries_outside_the_archive_and_non_zips_are_refused(runs, tmp_path):
    bad = tmp_path / "trav.pt2"
    shutil.copy(runs["art"], bad)
    with zipfile.ZipFile(bad, "a") as z:
        z.writestr("../../outside", b"x")
    with pytest.raises(ValueError, match=r"entry '../../outside' points outside"):
        ex.load_artifact(str(bad))
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    for fn in (ex.load_artifact, ex.read_metadata):
        with pytest.raises(ValueError, match="not a zip archive"):
            fn(str(junk))
        with pytest.raises(ValueError, match="no such artifact file"):
            fn(str(tmp_path / "missing.pt2"))


# --- checkpoints that do not fit ---------------------------------------------------
@pytest.mark.parametrize("schema, match", [
    (lambda: _schema(table0="renamed"), r"renamed"),
    (lambda: _schema(rows=ROWS + 1), r"t_cat_0.*\[500, 8\]"),
])
def test_export_of_a_checkpoint_with_a_renamed_or_resized_table_names_it(runs, tmp_path,
                                                                         schema, match):
    with pytest.raises(ValueError, match=match):
        ex.export(str(runs["a"] / "ckpt_4"), str(tmp_path / "x.pt2"), schema=schema(), **OPTS)
    assert not (tmp_path / "x.pt2").exists()


def test_missing_checkpoint_run_or_artifact_is_a_clear_cli_error(runs, tmp_path, capsys):
    from recframe.cli import main

    missing = str(tmp_path / "no-run")
    assert main(["export", "--apply-delta", missing, runs["art"]]) == 2
    assert f"checkpoint {missing} does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", "--apply-delta", str(tmp_path / "empty"), runs["art"]]) == 2
    assert "holds no committed checkpoint" in capsys.readouterr().err
    assert main(["export", "--apply-delta", str(runs["a"]), str(tmp_path / "none.pt2")]) == 2
    assert "none.pt2: no such artifact file" in capsys.readouterr().err
    assert main(["export", missing, str(tmp_path / "y.pt2")]) == 2
    assert "does not exist" in capsys.readouterr().err


# --- deltas out of order / from elsewhere -------------------------------------------------
def test_apply_of_an_older_step_is_refused_and_leaves_the_artifact(runs, tmp_path):
    live = tmp_path / "live.pt2"
    shutil.copy(runs["art"], live)
    ex.apply_checkpoint(str(live), str(runs["a"] / "ckpt_4"))
    before = live.read_bytes()
    with pytest.raises(ValueError, match=r"step 2, older than the step 4"):
        ex.apply_checkpoint(str(live), str(runs["a"] / "ckpt_2"))
    assert live.read_bytes() == before


def test_apply_of_another_runs_checkpoint_equals_its_full_export(runs, tmp_path):
    """Rows are found by comparison, not trusted from the delta: another run's checkpoint
    gives exactly that checkpoint's model, never a mix of both runs."""
    got = ex.apply_checkpoint(runs["art"], str(runs["b"] / "ckpt_4"),
                              output=str(tmp_path / "mixed.pt2"))
    want = ex.export(str(runs["b"] / "ckpt_4"), str(tmp_path / "b4.pt2"), schema=_schema(),
                     **OPTS)
    a, _ = ex.load_artifact(got.path)
    b, _ = ex.load_artifact(want.path)
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(a.module()(*x), b.module()(*x))


def test_apply_onto_an_artifact_of_another_model_is_refused(runs, tmp_path):
    torch.manual_seed(0)
    other = DLRM(schema=_schema(), dense_arch=(4, DIM), over_arch=(4, 1))
    from recframe.checkpoint import Saver

    Saver(other, output_dir=str(tmp_path / "other")).save(9)
    with pytest.raises(ValueError, match="does not match"):
        ex.apply_checkpoint(runs["art"], str(tmp_path / "other"),
                            output=str(tmp_path / "o.pt2"))
    assert not (tmp_path / "o.pt2").exists()


def test_export_load_and_apply_on_an_fsspec_memory_path(runs):
    info = ex.export(str(runs["a"] / "ckpt_2"), "memory://serving16/m.pt2", schema=_schema(),
                     **OPTS)
    assert info.bytes > 0 and ex.read_metadata(info.path)["source"]["step"] == 2
    fresh = ex.apply_checkpoint(info.path, str(runs["a"] / "ckpt_4"))
    program, meta = ex.load_artifact(fresh.path)
    assert meta["source"]["step"] == 4
    with torch.no_grad():
        assert program.module()(*_inputs()).shape == (3,)


# --- malformed requests -------------------------------------------------------------
def test_values_that_do_not_add_up_to_the_lengths_raise_not_predict(runs):
    """fbgemm's default bounds check "repaired" the offsets and predicted from them."""
    program, _ = ex.load_artifact(runs["art"])
    dense, values, lengths = _inputs()
    with torch.no_grad(), pytest.raises(RuntimeError, match="num_indices"):
        program.module()(dense, values[:-1], lengths)


def test_empty_batch_and_a_sample_with_only_empty_bags(runs):
    program, meta = ex.load_artifact(runs["art"])
    dense = {f"int_{i}": [] for i in range(13)}
    sparse = {f"cat_{i}": [] for i in range(F)}
    with torch.no_grad():
        assert program.module()(*ex.inputs_from_features(meta, dense, sparse)).shape == (0,)
        one = ex.inputs_from_features(meta, {k: [None] for k in dense},
                                      {k: [[]] for k in sparse})
        out = program.module()(*one)
    assert out.shape == (1,) and bool(torch.isfinite(out).all())


def test_ids_out_of_int64_or_not_integers_and_unknown_features_name_the_feature(runs):
    _, meta = ex.load_artifact(runs["art"])
    dense = {f"int_{i}": [0.5] for i in range(13)}
    sparse = {f"cat_{i}": [[1]] for i in range(F)}
    for bad in (1 << 64, -(1 << 63) - 1, 1.5):
        with pytest.raises(ValueError, match="sparse feature 'cat_2'"):
            ex.inputs_from_features(meta, dense, {**sparse, "cat_2": [[bad]]})
    assert ex.inputs_from_features(meta, dense, {**sparse, "cat_2": [[-(1 << 63), 2.0]]})
    with pytest.raises(ValueError, match=r"\['cat_9'\] are not in the artifact's schema"):
        ex.inputs_from_features(meta, dense, {**sparse, "cat_9": [[1]]})
    d, v, ln = ex.inputs_from_features(meta, dense, {**sparse, "cat_9": [[1]]},
                                       ignore_unknown=True)
    assert ln.shape == (F, 1)


def test_nan_dense_values_take_the_columns_fill(runs):
    program, _ = ex.load_artifact(runs["art"])
    dense, values, lengths = _inputs()
    fill = torch.zeros_like(dense)  # synthetic columns' fill is 0.0
    with torch.no_grad():
        nan = program.module()(torch.full_like(dense, float("nan")), values, lengths)
        assert torch.equal(nan, program.module()(fill, values, lengths))


def test_a_failed_in_place_apply_leaves_no_temporary_file(runs, tmp_path):
    """An in-place apply that fails leaves no temporary file beside the artifact."""
    live = tmp_path / "live.pt2"
    shutil.copy(runs["art"], live)
    with pytest.raises(ValueError):
        ex.apply_checkpoint(str(live), str(tmp_path / "nothing"))
    assert sorted(os.listdir(tmp_path)) == ["live.pt2"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_changed_rows_are_found_by_their_bits_across_chunks(dtype, monkeypatch):
    """apply_checkpoint copies a row whose bits differ even where the values compare
    equal (``-0.0`` vs ``0.0``), also in a row past the first chunk."""
    monkeypatch.setattr(ex, "_ROWS_PER_CHUNK", 4)
    old = torch.zeros(10, 12, dtype=dtype)
    new = old.clone()
    if dtype == torch.float32:
        new[1, 3] = -0.0
    else:
        new[1, 3] = 7
    new[9, 0] = 1
    assert ex._copy_changed_rows(old, new) == 2
    assert torch.equal(old.view(torch.uint8), new.view(torch.uint8))
    packed = torch.zeros(4 * 36 + 4, dtype=torch.uint8)  # int8 rows of 36 bytes at offset 4
    view = packed.as_strided((4, 36), (36, 1), 4)
    target = torch.zeros(4, 36, dtype=torch.uint8)
    target[3, 35] = 5
    assert ex._copy_changed_rows(view, target) == 1 and int(packed[-1]) == 5


def test_a_two_rank_incremental_chain_exports_like_its_full_checkpoint(tmp_path):
    """A chain (a full checkpoint and 3 deltas) written by 2 ranks with sharded tables,
    exported in one process, equals the export of the 2-rank full checkpoint of the same
    step (tests/jobs/incremental_ranks_job.py writes both)."""
    import socket
    import subprocess
    import sys

    job = os.path.join(os.path.dirname(__file__), "jobs", "incremental_ranks_job.py")
    sys.path.insert(0, os.path.dirname(job))
    try:
        import incremental_ranks_job as ranks_job
    finally:
        sys.path.remove(os.path.dirname(job))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, job, str(tmp_path / "run")],
        env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                 LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                 OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    rows, features = ranks_job.ROWS, ranks_job.FEATURES
    schema = ex.synthetic_schema(rows, 4, num_sparse=len(features))
    assert schema.feature_names == list(features)
    opts = {"model": "dlrm", "schema": schema,
            "model_kwargs": {"dense_arch": (8, 4), "over_arch": (8, 1)}}
    run = tmp_path / "run"
    chain = ex.export(str(run / "ckpt_4"), str(tmp_path / "chain.pt2"), **opts)
    full = ex.export(str(run / "full" / "ckpt_4"), str(tmp_path / "full.pt2"), **opts)
    assert ex.read_metadata(chain.path)["source"]["incremental"] == "delta"
    a, _ = ex.load_artifact(chain.path)
    b, _ = ex.load_artifact(full.path)
    ta, tb = ex._program_tensors(a), ex._program_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
