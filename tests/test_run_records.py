"""Run records: one TensorBoard event file per run (resumes append, config as hparams
and text), ``report_to`` tensorboard/jsonl/none, metrics.jsonl, run_config.json, and
all of them on an ``s3://`` output dir through fsspec (moto server of test_s3)."""

from __future__ import annotations

import glob
import json
import os

import fsspec
import pytest
import torch
from conftest import ToyCTR, make_batches

from recframe import Trainer, TrainingArguments
from recframe.hooks import JsonlLoggerHook, RunConfigHook, TensorBoardHook
from recframe.hooks.run_config import load_run_config

try:  # the moto S3 server fixtures of test_s3 (skipped there without s3fs/moto)
    from test_s3 import s3, s3_endpoint  # noqa: F401

    HAVE_S3 = True
except pytest.skip.Exception:
    HAVE_S3 = False


def _args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), log_steps=1, save_steps=2, disable_tqdm=True,
                eval_interval_steps=2)
    base.update(kw)
    return TrainingArguments(**base)


def _trainer(out, **kw) -> Trainer:
    torch.manual_seed(0)
    return Trainer(ToyCTR(), _args(out, **kw), train_dataset=make_batches(8, 8),
                   eval_dataset=make_batches(2, 16, seed=5))


def _events(path_glob: str) -> list:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    files = glob.glob(path_glob)
    assert len(files) == 1, files
    return list(EventFileLoader(files[0]).Load())


def _scalars(log_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def test_report_to_accepts_lists_and_none(tmp_path):
    assert TrainingArguments(report_to="none").report_targets == []
    assert TrainingArguments(report_to="tensorboard,jsonl").report_targets == [
        "tensorboard", "jsonl"]
    assert TrainingArguments(report_to=["jsonl"]).report_targets == ["jsonl"]
    kinds = lambda t: {type(h) for h in t.hooks}  # noqa: E731
    both = kinds(_trainer(tmp_path / "a", report_to=["tensorboard", "jsonl"]))
    assert {TensorBoardHook, JsonlLoggerHook, RunConfigHook} <= both
    none = kinds(_trainer(tmp_path / "b", report_to="none"))
    assert TensorBoardHook not in none and JsonlLoggerHook not in none
    with pytest.raises(ValueError, match="report_to"):
        TrainingArguments(report_to="wandb")
    args = TrainingArguments.from_cli(["--report_to", "tensorboard,jsonl"])
    assert args.report_targets == ["tensorboard", "jsonl"]


def test_one_event_file_per_run_with_config_and_recsys_metrics(tmp_path):
    out = tmp_path / "run"
    _trainer(out, report_to="tensorboard").train(train_steps=4)
    # a restart of the same run resumes from ckpt_4 and appends to the same file
    _trainer(out, report_to="tensorboard").train(train_steps=6)
    events = _events(str(out / "logs" / "events.out.tfevents.*"))
    tags = {v.tag for e in events if e.HasField("summary") for v in e.summary.value}
    assert {"_hparams_/experiment", "_hparams_/session_start_info",
            "run_config/text_summary"} <= tags
    text = next(v.tensor.string_val[0].decode() for e in events if e.HasField("summary")
                for v in e.summary.value if v.tag == "run_config/text_summary")
    assert f'"output_dir": "{out}"' in text and "ToyCTR" in text
    scalars = _scalars(out / "logs")
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    for name in ("auc", "ne", "calibration", "logloss"):
        assert [s for s, _ in scalars[f"eval/{name}"]] == [2, 4, 6], name


def test_run_config_json_is_strict_and_kept_when_the_config_changes(tmp_path):
    out = tmp_path / "run"
    trainer = _trainer(out, report_to="none", max_grad_norm=1.0)
    trainer.train(train_steps=2)
    assert not (out / "logs").exists() and not (out / "metrics.jsonl").exists()
    raw = (out / "run_config.json").read_text()

    def no_constants(name):
        raise AssertionError(f"not strict JSON: {name}")

    record = json.loads(raw, parse_constant=no_constants)
    assert record["args"] == json.loads(json.dumps(trainer.args.to_dict()))
    assert record["model"]["class"] == "conftest.ToyCTR"
    assert record["dense_optimizer"] == "torch.optim.adamw.AdamW"
    assert record["world_size"] == 1 and record["started_at_step"] == 0
    assert load_run_config(str(out)) == record
    # rebuilt from the record, the arguments are the run's own
    assert TrainingArguments.from_dict(record["args"]) == trainer.args

    # the same configuration resumed: one file; a changed one keeps the previous
    _trainer(out, report_to="none", max_grad_norm=1.0, train_steps=3).train()
    assert sorted(os.listdir(out)) == sorted(n for n in os.listdir(out)
                                             if not n.startswith("run_config.step_"))
    _trainer(out, report_to="none", max_grad_norm=2.0).train(train_steps=4)
    kept = json.loads((out / "run_config.step_3.json").read_text())
    assert kept["args"]["max_grad_norm"] == 1.0
    assert load_run_config(str(out))["args"]["max_grad_norm"] == 2.0


def test_jsonl_metrics_file_drops_lines_past_the_resumed_checkpoint(tmp_path):
    out = tmp_path / "run"
    _trainer(out, report_to="jsonl").train(train_steps=4)
    path = out / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in lines] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)]
    assert {"loss", "lr", "samples_per_sec", "epoch", "time"} <= set(lines[0])
    assert {"auc", "ne", "calibration", "loss"} <= set(lines[2])
    # a run that died at step 5 after the step-4 checkpoint, and a torn last line
    with open(path, "a") as f:
        f.write(json.dumps({"kind": "train", "step": 5, "loss": 9.0}) + "\n")
        f.write('{"kind": "train", "st')
    _trainer(out, report_to="jsonl").train(train_steps=6)
    steps = [(r["kind"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]
    assert steps[6:] == [("train", 5), ("train", 6), ("eval", 6)]
    assert all(r.get("loss") != 9.0 for r in map(json.loads, path.read_text().splitlines()))


def test_jsonl_nonfinite_values_are_strict_json(tmp_path):
    from recframe.hooks.jsonl import json_safe

    assert json_safe(float("nan")) is None and json_safe(torch.tensor(2.5)) == 2.5
    assert json_safe(torch.ones(3)) == "tensor([1., 1., 1.])"


# --- s3:// through fsspec, with the credentials of the checkpoints ---------------------
@pytest.mark.skipif(not HAVE_S3, reason="needs s3fs and moto[server]")
def test_records_on_s3_use_fsspec_credentials(s3, tmp_path):  # noqa: F811
    fs, prefix = s3
    _trainer(prefix, report_to=["tensorboard", "jsonl"]).train(train_steps=2)
    _trainer(prefix, report_to=["tensorboard", "jsonl"]).train(train_steps=4)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(prefix))
    assert {"ckpt_4", "logs", "metrics.jsonl", "run_config.json"} <= set(names)
    events = fs.ls(f"{prefix}/logs")
    assert len(events) == 1 and "tfevents" in events[0]
    local = tmp_path / "logs"
    local.mkdir()
    fs.get(events[0], str(local / os.path.basename(events[0])))
    assert [s for s, _ in _scalars(local)["train/loss"]] == [1, 2, 3, 4]
    with fsspec.open(f"{prefix}/metrics.jsonl", "r") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 2, 3, 4, 4]
    assert load_run_config(prefix)["args"]["output_dir"] == prefix
