"""The ``recframe`` command line: help, a tiny real training run, ``--config`` files
with flags overriding them, bad values, and ``python -m recframe``."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from recframe import cli
from recframe.arguments import TrainingArguments

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELD_NAMES = [f.name for f in dataclasses.fields(TrainingArguments)]
TINY = ["--num_eval_batches", "2", "--batch_size", "64", "--num_embeddings", "100",
        "--disable_tqdm", "true", "--report_to", "none"]


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """A tiny DLRM: one thread is faster, and immune to a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _final_eval(out: str) -> dict:
    lines = [line for line in out.splitlines() if line.startswith("final eval: ")]
    assert len(lines) == 1, out
    return json.loads(lines[0][len("final eval: "):])


def _logged_train_steps(caplog) -> list[int]:
    """Steps of the LoggerHook's training lines (``step=N epoch=...``)."""
    steps = []
    for record in caplog.records:
        match = re.match(r"step=(\d+) ", record.getMessage())
        if record.name == "recframe" and match:
            steps.append(int(match.group(1)))
    return steps


# --- help -----------------------------------------------------------------------------
def test_help_exits_zero_and_mentions_train(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out
    assert "usage: recframe" in out


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) != 0
    assert "train" in capsys.readouterr().out


def test_train_help_lists_every_training_argument(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in FIELD_NAMES:
        assert f"--{name}" in out, name
    for flag in ("--config", "--model", "--data", "--batch_size", "--num_train_batches"):
        assert flag in out


# --- real runs ------------------------------------------------------------------------
def test_tiny_training_run_prints_the_final_eval(tmp_path, capsys, caplog):
    out_dir = tmp_path / "out"
    rc = cli.main(
        ["train", "--output_dir", str(out_dir), "--num_train_batches", "20", "--log_steps", "5"]
        + TINY
    )
    assert rc == 0
    results = _final_eval(capsys.readouterr().out)
    assert 0.0 <= results["auc"] <= 1.0
    assert results["num_samples"] == 128  # 2 eval batches of 64
    assert results["loss"] > 0 and results["logloss"] > 0
    # one epoch of 20 updates, logged every --log_steps 5
    assert _logged_train_steps(caplog) == [5, 10, 15, 20]
    assert out_dir.is_dir() and any(out_dir.iterdir())  # checkpoints went to --output_dir


@pytest.mark.parametrize("kind", ["yaml", "json"])
def test_config_file_with_flags_overriding(tmp_path, capsys, caplog, kind):
    values = {
        "output_dir": str(tmp_path / "out"),
        "train_steps": 3,
        "log_steps": 100,
        "report_to": "none",
        "disable_tqdm": True,
    }
    config = tmp_path / f"run.{kind}"
    if kind == "yaml":
        config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    else:
        config.write_text(json.dumps(values))
    rc = cli.main(
        ["train", "--config", str(config), "--log_steps", "2", "--num_train_batches", "20"]
        + TINY
    )
    assert rc == 0
    _final_eval(capsys.readouterr().out)
    # train_steps=3 came from the file, log_steps=2 from the flag: lines at 2 and 3 (the end)
    assert _logged_train_steps(caplog) == [2, 3]


def test_bad_value_exits_nonzero_naming_the_field(tmp_path, capsys):
    rc = cli.main(["train", "--output_dir", str(tmp_path / "out"), "--log_steps", "0"] + TINY)
    assert rc != 0
    err = capsys.readouterr().err
    assert "log_steps=0" in err


def test_bad_value_in_a_config_file_exits_nonzero(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("gradient_accumulation_steps: 0\n")
    assert cli.main(["train", "--config", str(config)]) != 0
    assert "gradient_accumulation_steps" in capsys.readouterr().err


def test_missing_config_file_exits_nonzero(tmp_path, capsys):
    missing = str(tmp_path / "missing.yaml")
    assert cli.main(["train", "--config", missing]) != 0
    err = capsys.readouterr().err
    assert missing in err and "does not exist" in err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--log_steps", "five"], "--log_steps"),
        (["--bf16", "perhaps"], "--bf16"),
        (["--model", "transformer"], "--model"),
        (["--no_such_flag"], "no_such_flag"),
    ],
)
def test_unparsable_flags_exit_with_usage(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        cli.main(["train"] + argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_criteo_data_needs_a_train_path(tmp_path, capsys):
    code = cli.main(["train", "--data", "criteo", "--output_dir", str(tmp_path / "out")] + TINY)
    assert code == 2  # a usage error: one line, no traceback
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recframe: error:") and "--train_path" in err[0]


# --- python -m recframe ---------------------------------------------------------------
def test_python_dash_m_recframe_help():
    proc = subprocess.run(
        [sys.executable, "-m", "recframe", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout
    assert "usage: recframe" in proc.stdout
