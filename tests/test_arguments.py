"""`TrainingArguments`: RecIS defaults, per-field validation, loading from dicts,
YAML/JSON files (local and fsspec) and command-line flags."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import uuid

import fsspec
import pytest

from recframe.arguments import TrainingArguments

FIELD_NAMES = [f.name for f in dataclasses.fields(TrainingArguments)]


# --- defaults -------------------------------------------------------------------------
def test_defaults_match_recis():
    args = TrainingArguments()
    assert args.gradient_accumulation_steps == 1
    assert args.output_dir == "output_dir"
    assert args.model_bank is None
    assert args.log_steps == 100
    assert args.train_steps is None
    assert args.train_epoch == 1
    assert args.eval_steps is None
    assert args.save_steps == 1000
    assert args.max_to_keep == 5
    assert args.save_concurrency_per_rank == 4


def test_recframe_defaults():
    args = TrainingArguments()
    assert args.seed == 42
    assert args.max_grad_norm is None
    assert args.device == "auto"
    assert args.bf16 is False
    assert args.logging_dir is None
    assert args.report_to == "tensorboard"
    assert args.nonfinite_loss == "raise"
    assert args.accumulation_weighting == "samples"
    assert args.dataloader_prefetch == 1
    assert args.save_on_sigterm is True
    assert args.async_save is False
    assert args.keep_best_mode == "max"
    assert args.save_commit_timeout == 600.0
    assert args.dist_sync_steps == 16
    assert args.incremental_checkpoints is False
    assert args.full_checkpoint_every == 10
    assert args.metric_for_scheduler == "loss"
    assert args.resume_training is False
    assert args.keep_freed_memory is True


# --- validation -----------------------------------------------------------------------
BAD_VALUES = {
    "output_dir": ["", "   ", None, 3],
    "gradient_accumulation_steps": [0, -1, 1.0, True, "2", None],
    "model_bank": ["path/to/ckpt", {"path": "x"}, [1], [None], 5],
    "log_steps": [0, -3, 2.5, False, None],
    "train_steps": [0, -5, 1.5, True, "10"],
    "train_epoch": [0, None, 1.0, True],
    "eval_steps": [0, -1, 2.0, "3"],
    "save_steps": [-1, 1.5, True, "100"],
    "max_to_keep": [0, None, 2.0],
    "save_concurrency_per_rank": [0, 1.0, None],
    "seed": [-1, 1.5, None, True, "42"],
    "max_grad_norm": [0, 0.0, -1.0, float("nan"), float("inf"), True, "1.0"],
    "device": ["gpu", "", None, "CPU", "cuda:0"],
    "bf16": ["true", 1, 0, None],
    "logging_dir": ["", "  ", 5],
    "report_to": ["wandb", None, "", ["tensorboard", "wandb"], ["none", "jsonl"]],
    "disable_tqdm": ["yes", 0, None],
    "eval_interval_steps": [0, -2, 1.5],
    "nonfinite_loss": ["ignore", None, "RAISE"],
    "accumulation_weighting": ["sample", None, "batches", 1],
    "dataloader_prefetch": [0, None, 1.5],
    "save_interval_secs": [0, -1, float("nan"), float("inf"), "10", False],
    "save_on_sigterm": [None, "false", 1],
    "async_save": [1, "no"],
    "keep_best_metric": ["", "   ", 3],
    "keep_best_mode": ["maximize", None, "MAX"],
    "save_commit_timeout": [0, -1, float("nan"), float("inf"), None, "60", True],
    "dist_sync_steps": [0, -1, 1.5, None, True],
    "incremental_checkpoints": [1, "yes", None],
    "full_checkpoint_every": [0, -1, 2.0, True, None, "10"],
    "metric_for_scheduler": ["", "  ", None, 3],
    "resume_training": [1, "yes", None],
    "keep_freed_memory": [1, "no", None],
    "resume_from_checkpoint": [1, "", "  ", 2.5],
    "overwrite_output_dir": [1, "yes", None],
    "learning_rate": [0, -1e-3, "0.1", None, float("nan")],
    "weight_decay": [-0.1, "0", None, float("inf"), float("nan")],
    "lr_scheduler_type": ["step", "", None],
    "warmup_steps": [-1, 1.5, None],
    "warmup_ratio": [-0.1, 1.0, "0.1", None],
    "dataloader_num_workers": [-1, 1.5, "2"],
    "load_best_model_at_end": [1, "yes", None],
}


def test_every_field_has_bad_values_listed():
    assert set(BAD_VALUES) == set(FIELD_NAMES)


@pytest.mark.parametrize(
    "field,value",
    [(name, value) for name, values in BAD_VALUES.items() for value in values],
    ids=lambda v: repr(v)[:20],
)
def test_bad_value_raises_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        TrainingArguments(**{field: value})
    message = str(info.value)
    assert f"TrainingArguments.{field}=" in message
    assert repr(value) in message


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("save_steps", 0, 0),
        ("save_steps", None, None),
        ("train_steps", 1, 1),
        ("seed", 0, 0),
        ("max_grad_norm", 1, 1.0),
        ("save_interval_secs", 30, 30.0),
        ("model_bank", ("a", {"path": "b"}), ["a", {"path": "b"}]),
        ("model_bank", [], []),
        ("logging_dir", "memory://tb", "memory://tb"),
        ("keep_best_metric", "auc", "auc"),
        ("keep_best_mode", "min", "min"),
        ("full_checkpoint_every", 1, 1),
        ("nonfinite_loss", "skip", "skip"),
        ("report_to", "none", "none"),
    ],
)
def test_valid_edge_values_are_accepted_and_normalised(field, value, expected):
    args = TrainingArguments(**{field: value})
    got = getattr(args, field)
    assert got == expected
    assert type(got) is type(expected)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "xla"])
def test_every_device_choice_is_accepted(device):
    assert TrainingArguments(device=device).device == device


def test_pathlike_output_dir_becomes_a_string(tmp_path):
    args = TrainingArguments(output_dir=tmp_path / "run", logging_dir=tmp_path / "tb")
    assert args.output_dir == str(tmp_path / "run")
    assert args.logging_dir == str(tmp_path / "tb")
    assert isinstance(args.output_dir, str) and isinstance(args.logging_dir, str)


# --- derived values / dicts -----------------------------------------------------------
@pytest.mark.parametrize(
    "output_dir,logging_dir,expected",
    [
        ("output_dir", None, "output_dir/logs"),
        ("runs/a/", None, "runs/a/logs"),
        ("memory://bucket/run", None, "memory://bucket/run/logs"),
        ("runs/a", "/elsewhere/tb", "/elsewhere/tb"),
    ],
)
def test_resolved_logging_dir(output_dir, logging_dir, expected):
    args = TrainingArguments(output_dir=output_dir, logging_dir=logging_dir)
    assert args.resolved_logging_dir == expected


def test_to_dict_round_trips_through_from_dict():
    args = TrainingArguments(
        output_dir="x", train_steps=7, max_grad_norm=0.5, model_bank=[{"path": "p"}], bf16=True
    )
    values = args.to_dict()
    assert set(values) == set(FIELD_NAMES)
    assert TrainingArguments.from_dict(values) == args


def test_from_dict_unknown_key_lists_valid_fields():
    with pytest.raises(ValueError) as info:
        TrainingArguments.from_dict({"log_steps": 5, "trian_steps": 10, "lr": 0.1})
    message = str(info.value)
    assert "trian_steps" in message and "lr" in message
    for name in FIELD_NAMES:
        assert name in message


def test_from_dict_validates_values():
    with pytest.raises(ValueError, match="log_steps"):
        TrainingArguments.from_dict({"log_steps": 0})


@pytest.mark.parametrize("values", [["log_steps", 5], "log_steps: 5", None])
def test_from_dict_rejects_non_mapping(values):
    with pytest.raises(ValueError, match="mapping"):
        TrainingArguments.from_dict(values)


# --- files ----------------------------------------------------------------------------
CONFIG = {
    "output_dir": "memory://runs/x",
    "train_steps": 100,
    "log_steps": 10,
    "bf16": True,
    "max_grad_norm": 1.0,
    "model_bank": [{"path": "memory://bank/ckpt", "exclude": ["emb"]}],
}
YAML_TEXT = """\
output_dir: memory://runs/x
train_steps: 100
log_steps: 10
bf16: true
max_grad_norm: 1.0
model_bank:
  - path: memory://bank/ckpt
    exclude: [emb]
"""


@pytest.fixture
def memory_dir():
    """A fresh memory:// folder, removed afterwards."""
    root = f"memory://recframe-test-args-{uuid.uuid4().hex}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _write(url: str, text: str) -> str:
    with fsspec.open(url, "w") as f:
        f.write(text)
    return url


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".YAML"])
def test_from_file_yaml(tmp_path, suffix):
    path = tmp_path / f"cfg{suffix}"
    path.write_text(YAML_TEXT)
    args = TrainingArguments.from_file(str(path))
    assert args == TrainingArguments(**CONFIG)


def test_from_file_json(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(CONFIG))
    assert TrainingArguments.from_file(str(path)) == TrainingArguments(**CONFIG)


@pytest.mark.parametrize("name,text", [("cfg.yaml", YAML_TEXT), ("cfg.json", json.dumps(CONFIG))])
def test_from_file_memory_url(memory_dir, name, text):
    url = _write(f"{memory_dir}/{name}", text)
    assert TrainingArguments.from_file(url) == TrainingArguments(**CONFIG)


def test_from_file_overrides_win(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(YAML_TEXT)
    args = TrainingArguments.from_file(str(path), log_steps=3, train_steps=None)
    assert args.log_steps == 3
    assert args.train_steps is None
    assert args.bf16 is True


def test_from_file_empty_yaml_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    assert TrainingArguments.from_file(str(path)) == TrainingArguments()


@pytest.mark.parametrize("name", ["cfg.txt", "cfg", "cfg.toml", "cfg.yaml.bak"])
def test_from_file_bad_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text(YAML_TEXT)
    with pytest.raises(ValueError) as info:
        TrainingArguments.from_file(str(path))
    assert str(path) in str(info.value)
    assert "extension" in str(info.value)


@pytest.mark.parametrize(
    "name,text",
    [("bad.yaml", "log_steps: [1, 2\n"), ("bad.yml", "a: b: c\n"), ("bad.json", "{log_steps: 5")],
)
def test_from_file_invalid_syntax(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        TrainingArguments.from_file(str(path))
    assert str(path) in str(info.value)
    assert "not valid" in str(info.value)


@pytest.mark.parametrize(
    "name,text",
    [("list.yaml", "- log_steps\n- 5\n"), ("scalar.yaml", "5\n"), ("list.json", "[1, 2]")],
)
def test_from_file_non_mapping(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match="mapping") as info:
        TrainingArguments.from_file(str(path))
    assert str(path) in str(info.value)


def test_from_file_missing_local(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="does not exist") as info:
        TrainingArguments.from_file(path)
    assert path in str(info.value)


def test_from_file_missing_memory_url(memory_dir):
    url = f"{memory_dir}/nope.json"
    with pytest.raises(ValueError, match="does not exist") as info:
        TrainingArguments.from_file(url)
    assert url in str(info.value)


def test_from_file_unknown_key_and_bad_value(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("log_step: 5\n")
    with pytest.raises(ValueError, match="valid fields"):
        TrainingArguments.from_file(str(path))
    path.write_text("log_steps: 0\n")
    with pytest.raises(ValueError, match="log_steps=0"):
        TrainingArguments.from_file(str(path))


# --- command line ---------------------------------------------------------------------
# one (flag text, parsed value) per field, each different from the default
CLI_VALUES = {
    "output_dir": ("s3://bucket/run", "s3://bucket/run"),
    "gradient_accumulation_steps": ("4", 4),
    "model_bank": ('[{"path": "x"}]', [{"path": "x"}]),
    "log_steps": ("5", 5),
    "train_steps": ("100", 100),
    "train_epoch": ("3", 3),
    "eval_steps": ("7", 7),
    "save_steps": ("0", 0),
    "max_to_keep": ("2", 2),
    "save_concurrency_per_rank": ("8", 8),
    "seed": ("0", 0),
    "max_grad_norm": ("0.5", 0.5),
    "device": ("cpu", "cpu"),
    "bf16": ("true", True),
    "logging_dir": ("/tmp/tb", "/tmp/tb"),
    "report_to": ("none", "none"),
    "disable_tqdm": ("1", True),
    "eval_interval_steps": ("10", 10),
    "nonfinite_loss": ("skip", "skip"),
    "accumulation_weighting": ("micro_batches", "micro_batches"),
    "dataloader_prefetch": ("3", 3),
    "save_interval_secs": ("60", 60.0),
    "save_on_sigterm": ("false", False),
    "async_save": ("yes", True),
    "keep_best_metric": ("auc", "auc"),
    "keep_best_mode": ("min", "min"),
    "save_commit_timeout": ("30", 30.0),
    "dist_sync_steps": ("4", 4),
    "incremental_checkpoints": ("true", True),
    "full_checkpoint_every": ("4", 4),
    "metric_for_scheduler": ("auc", "auc"),
    "resume_training": ("true", True),
    "keep_freed_memory": ("false", False),
    "resume_from_checkpoint": ("true", True),
    "overwrite_output_dir": ("true", True),
    "learning_rate": ("0.01", 0.01),
    "weight_decay": ("0.1", 0.1),
    "lr_scheduler_type": ("cosine", "cosine"),
    "warmup_steps": ("10", 10),
    "warmup_ratio": ("0.1", 0.1),
    "dataloader_num_workers": ("4", 4),
    "load_best_model_at_end": ("true", True),
}
# fields a flag also sets (as Hugging Face does): the best model is the lowest eval loss
IMPLIED = {"load_best_model_at_end": {"keep_best_metric", "keep_best_mode"}}


def test_every_field_has_a_cli_case():
    assert set(CLI_VALUES) == set(FIELD_NAMES)


@pytest.mark.parametrize("field", FIELD_NAMES)
def test_from_cli_every_field_flag(field):
    text, expected = CLI_VALUES[field]
    args = TrainingArguments.from_cli([f"--{field}", text])
    got = getattr(args, field)
    assert got == expected
    assert type(got) is type(expected)
    # nothing else moved off its default
    defaults = TrainingArguments().to_dict()
    changed = {k for k, v in args.to_dict().items() if v != defaults[k]}
    assert changed == {field} | IMPLIED.get(field, set())


def test_from_cli_no_flags_gives_defaults():
    assert TrainingArguments.from_cli([]) == TrainingArguments()


@pytest.mark.parametrize(
    "text,expected",
    [("true", True), ("True", True), ("1", True), ("yes", True), ("on", True),
     ("false", False), ("FALSE", False), ("0", False), ("no", False), ("off", False)],
)
def test_from_cli_bool_spellings(text, expected):
    assert TrainingArguments.from_cli(["--bf16", text]).bf16 is expected


@pytest.mark.parametrize("text", ["none", "None", "null", ""])
def test_from_cli_optional_none(text):
    args = TrainingArguments.from_cli(
        ["--max_grad_norm", text, "--train_steps", text, "--save_steps", text]
    )
    assert args.max_grad_norm is None
    assert args.train_steps is None
    assert args.save_steps is None


def test_from_cli_model_bank_json():
    args = TrainingArguments.from_cli(
        ["--model_bank", '[{"path": "x", "exclude": ["emb"]}, "plain/path"]']
    )
    assert args.model_bank == [{"path": "x", "exclude": ["emb"]}, "plain/path"]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--bf16", "maybe"], "--bf16"),
        (["--train_steps", "ten"], "--train_steps"),
        (["--log_steps", "none"], "--log_steps"),  # not Optional: none is not a value
        (["--max_grad_norm", "big"], "--max_grad_norm"),
        (["--model_bank", '{"path": "x"}'], "JSON list"),
        (["--model_bank", "[oops"], "JSON list"),
        (["--no_such_flag", "1"], "no_such_flag"),
    ],
)
def test_from_cli_unparsable_flag_exits_with_usage(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        TrainingArguments.from_cli(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_from_cli_invalid_value_raises_naming_field():
    with pytest.raises(ValueError, match=r"TrainingArguments\.log_steps=0"):
        TrainingArguments.from_cli(["--log_steps", "0"])
    with pytest.raises(ValueError, match="device='tpu'"):
        TrainingArguments.from_cli(["--device", "tpu"])


@pytest.mark.parametrize("kind", ["yaml", "json"])
def test_from_cli_config_file_with_flags_overriding(tmp_path, kind):
    path = tmp_path / f"cfg.{kind}"
    path.write_text(YAML_TEXT if kind == "yaml" else json.dumps(CONFIG))
    args = TrainingArguments.from_cli(
        ["--config", str(path), "--log_steps", "3", "--bf16", "false", "--max_grad_norm", "none"]
    )
    # flags win ...
    assert args.log_steps == 3
    assert args.bf16 is False
    assert args.max_grad_norm is None
    # ... the rest comes from the file, flags absent from both keep their defaults
    assert args.train_steps == 100
    assert args.output_dir == "memory://runs/x"
    assert args.model_bank == CONFIG["model_bank"]
    assert args.seed == 42


def test_from_cli_config_order_does_not_matter(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("log_steps: 10\n")
    before = TrainingArguments.from_cli(["--log_steps", "4", "--config", str(path)])
    after = TrainingArguments.from_cli(["--config", str(path), "--log_steps", "4"])
    assert before.log_steps == after.log_steps == 4


def test_from_cli_config_on_memory_url(memory_dir):
    url = _write(f"{memory_dir}/cfg.yaml", "train_steps: 9\nreport_to: none\n")
    args = TrainingArguments.from_cli(["--config", url, "--train_steps", "11"])
    assert args.train_steps == 11
    assert args.report_to == "none"


def test_from_cli_config_errors_name_the_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("log_stepz: 10\n")
    with pytest.raises(ValueError, match="valid fields"):
        TrainingArguments.from_cli(["--config", str(path)])
    with pytest.raises(ValueError, match="does not exist"):
        TrainingArguments.from_cli(["--config", str(tmp_path / "missing.yaml")])


def test_cli_help_documents_fields(capsys):
    with pytest.raises(SystemExit) as info:
        TrainingArguments.from_cli(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in FIELD_NAMES:
        assert f"--{name}" in out
    assert "--config" in out
    # the attribute docstrings are the help text
    assert "Micro-batches per optimizer update" in " ".join(out.split())


def test_from_file_accepts_a_pathlib_path(tmp_path):
    path = pathlib.Path(tmp_path) / "cfg.json"
    path.write_text('{"log_steps": 9}')
    assert TrainingArguments.from_file(path).log_steps == 9
    yaml_path = pathlib.Path(tmp_path) / "cfg.yml"
    yaml_path.write_text("log_steps: 8\n")
    assert TrainingArguments.from_file(yaml_path).log_steps == 8
