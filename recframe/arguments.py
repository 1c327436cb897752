"""`TrainingArguments`: every knob of a training run, validated once, loadable from
YAML/JSON files and command-line flags.

Field names and meanings follow RecIS's ``TrainingArguments`` so configs carry over;
recframe adds seeding, clipping, device choice, bf16, TensorBoard, evaluation and
checkpoint policies. Every field is checked in ``__post_init__``: a bad value raises
``ValueError`` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Optional, Union

import fsspec

DEVICES = ("auto", "cpu", "cuda", "xla")
NONFINITE_POLICIES = ("raise", "skip")
ACCUMULATION_WEIGHTINGS = ("samples", "micro_batches")
REPORT_TO = ("tensorboard", "jsonl", "none")
METRIC_MODES = ("min", "max")
LR_SCHEDULER_TYPES = ("constant", "constant_with_warmup", "linear", "cosine")


@dataclass
class TrainingArguments:
    """Arguments of a training run (RecIS-compatible names and defaults).

    ``train_steps`` counts optimizer updates (one update per
    ``gradient_accumulation_steps`` micro-batches); ``None`` trains ``train_epoch``
    full passes over the data.
    """

    # --- RecIS fields -------------------------------------------------------------
    output_dir: str = "output_dir"
    """Checkpoint root: a local path or any fsspec URL (memory://, s3://, gs://)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer update; gradients are averaged over them."""
    model_bank: Optional[list] = None
    """Warm-start entries ``{"path", "load", "exclude", "strict"}`` loaded before restore."""
    log_steps: int = 100
    """Log step, loss, samples/s and lr every this many optimizer updates."""
    train_steps: Optional[int] = None
    """Optimizer updates to run; ``None`` runs ``train_epoch`` epochs."""
    train_epoch: int = 1
    """Passes over the training data when ``train_steps`` is ``None``."""
    eval_steps: Optional[int] = None
    """Batches per evaluation; ``None`` evaluates the whole eval dataset. RecIS's meaning,
    kept: Hugging Face's eval_steps (evaluate every N updates) is eval_interval_steps
    here."""
    save_steps: Optional[int] = 1000
    """Checkpoint every this many optimizer updates; ``None`` or 0 saves only at the end."""
    max_to_keep: int = 5
    """Committed checkpoints kept on storage (oldest deleted first)."""
    save_concurrency_per_rank: int = 4
    """Writer threads per rank when saving a checkpoint."""

    # --- recframe additions -------------------------------------------------------
    seed: int = 42
    """Seed of python, numpy and torch RNGs, set when the Trainer is built."""
    max_grad_norm: Optional[float] = None
    """Clip the global L2 norm of dense gradients to this value before each update."""
    device: str = "auto"
    """auto (cuda if available, else xla if PJRT_DEVICE is set, else cpu), cpu, cuda, xla."""
    bf16: bool = False
    """Run the train step under bfloat16 autocast."""
    logging_dir: Optional[str] = None
    """TensorBoard event directory; defaults to ``<output_dir>/logs``."""
    report_to: Union[str, list] = "tensorboard"
    """Where metrics are reported besides the log: tensorboard (event files in
    logging_dir), jsonl (<output_dir>/metrics.jsonl), none, or several (a list, or
    comma-separated on the command line); `report_targets` lists them."""
    disable_tqdm: bool = False
    """Hide the progress bar."""
    eval_interval_steps: Optional[int] = None
    """During ``train`` evaluate every this many updates (needs an eval dataset); what
    Hugging Face calls eval_steps."""
    nonfinite_loss: str = "raise"
    """On a NaN/inf loss: raise (naming the step) or skip that update (skip also drops an
    update whose loss is finite but whose gradients are not)."""
    accumulation_weighting: str = "samples"
    """How gradient accumulation weighs a window's micro-batches (each loss a mean over
    its micro-batch): samples (n_i/N, as one batch of all N samples) or micro_batches
    (1/k each)."""
    dataloader_prefetch: int = 1
    """Batches fetched (and copied to the device) ahead of the one being trained."""
    save_interval_secs: Optional[float] = None
    """Also checkpoint when this many seconds have passed since the last save."""
    save_on_sigterm: bool = True
    """Checkpoint and stop cleanly when the process receives SIGTERM (preemption)."""
    async_save: bool = False
    """Write checkpoints in the background; the loop waits only for a host snapshot."""
    keep_best_metric: Optional[str] = None
    """Eval metric (e.g. auc) whose best checkpoint is kept on top of ``max_to_keep``."""
    keep_best_mode: str = "max"
    """Whether a larger (max) or smaller (min) ``keep_best_metric`` is better."""
    save_commit_timeout: float = 600.0
    """Several ranks: seconds to wait for every rank's checkpoint shards before the
    commit; a rank that failed, died or hung means no commit and an error naming it."""
    dist_sync_steps: int = 16
    """Several ranks: how often (in batches, or updates for time-based saves and
    SIGTERM) ranks agree on whether to go on when the data has no ``len()``."""
    incremental_checkpoints: bool = False
    """Write delta checkpoints: only the embedding-table rows changed since the previous
    checkpoint (plus the full dense state); see docs/checkpoints.md."""
    full_checkpoint_every: int = 10
    """With ``incremental_checkpoints``: every this many saves is a full checkpoint."""
    metric_for_scheduler: str = "loss"
    """Evaluation metric a metric-driven LR scheduler (``ReduceLROnPlateau``) steps on,
    once per evaluation during training; the default is the eval loss."""
    resume_training: bool = False
    """Continue a run that a hook stopped early (``control.should_stop``). The stop is
    checkpointed: without this flag (or a larger train_steps) a restart trains nothing."""
    keep_freed_memory: bool = True
    """Linux/glibc: keep freed host memory in the heap (mallopt), so each update reuses
    warm pages instead of page-faulting fresh ones; see recframe/allocator.py."""

    # --- Hugging Face Trainer names -----------------------------------------------
    resume_from_checkpoint: Optional[Union[bool, str]] = None
    """None: resume from output_dir's latest checkpoint when there is one (RecIS); true:
    the same, but an error when there is none; false: start fresh, an error when
    output_dir holds checkpoints; a path: that checkpoint directory."""
    overwrite_output_dir: bool = False
    """Start fresh: delete output_dir's checkpoints (and leftovers of interrupted saves)
    instead of resuming from them."""
    learning_rate: float = 1e-3
    """Learning rate of the default dense optimizer (AdamW) and peak of the schedule."""
    weight_decay: float = 0.0
    """Decoupled weight decay of the default dense optimizer (AdamW)."""
    lr_scheduler_type: str = "constant"
    """Schedule of the default dense optimizer: constant, constant_with_warmup, linear
    (to 0 at the last update) or cosine (to 0); all warm up over warmup_steps first."""
    warmup_steps: int = 0
    """Updates of linear warm-up from 0 to learning_rate (wins over warmup_ratio)."""
    warmup_ratio: float = 0.0
    """Warm-up as a share of the run's updates (used when warmup_steps is 0)."""
    dataloader_num_workers: Optional[int] = None
    """Background workers reading the data: the recframe CLI's readers (their decoding
    threads, --data_workers otherwise) and the user's data factory (--data pkg:fn). The
    Trainer builds no DataLoader: from Python, pass DataLoader(num_workers=...) yourself."""
    load_best_model_at_end: bool = False
    """After train: load the model weights of the checkpoint with the best
    keep_best_metric (default then: the eval loss, min) of the evaluations during
    training (eval_interval_steps)."""

    def __post_init__(self) -> None:
        _check_str(self, "output_dir", nonempty=True)
        _check_int(self, "gradient_accumulation_steps", minimum=1)
        if self.model_bank is not None:
            if not isinstance(self.model_bank, (list, tuple)) or not all(
                isinstance(e, (dict, str)) for e in self.model_bank
            ):
                _fail(self, "model_bank", "a list of {'path', 'load', 'exclude', 'strict'} dicts")
            self.model_bank = list(self.model_bank)
        _check_int(self, "log_steps", minimum=1)
        _check_int(self, "train_steps", minimum=1, optional=True)
        _check_int(self, "train_epoch", minimum=1)
        _check_int(self, "eval_steps", minimum=1, optional=True)
        _check_int(self, "save_steps", minimum=0, optional=True)
        _check_int(self, "max_to_keep", minimum=1)
        _check_int(self, "save_concurrency_per_rank", minimum=1)
        _check_int(self, "seed", minimum=0)
        _check_float(self, "max_grad_norm", positive=True, optional=True)
        _check_choice(self, "device", DEVICES)
        _check_bool(self, "bf16")
        _check_str(self, "logging_dir", optional=True, nonempty=True)
        _check_report_to(self)
        _check_bool(self, "disable_tqdm")
        _check_int(self, "eval_interval_steps", minimum=1, optional=True)
        _check_choice(self, "nonfinite_loss", NONFINITE_POLICIES)
        _check_choice(self, "accumulation_weighting", ACCUMULATION_WEIGHTINGS)
        _check_int(self, "dataloader_prefetch", minimum=1)
        _check_float(self, "save_interval_secs", positive=True, optional=True)
        _check_bool(self, "save_on_sigterm")
        _check_bool(self, "async_save")
        _check_str(self, "keep_best_metric", optional=True, nonempty=True)
        _check_choice(self, "keep_best_mode", METRIC_MODES)
        _check_float(self, "save_commit_timeout", positive=True)
        _check_int(self, "dist_sync_steps", minimum=1)
        _check_bool(self, "incremental_checkpoints")
        _check_int(self, "full_checkpoint_every", minimum=1)
        _check_str(self, "metric_for_scheduler", nonempty=True)
        _check_bool(self, "resume_training")
        _check_bool(self, "keep_freed_memory")
        if isinstance(self.resume_from_checkpoint, os.PathLike):
            self.resume_from_checkpoint = os.fspath(self.resume_from_checkpoint)
        if self.resume_from_checkpoint is not None and not (
            isinstance(self.resume_from_checkpoint, bool)
            or (isinstance(self.resume_from_checkpoint, str)
                and self.resume_from_checkpoint.strip())
        ):
            _fail(self, "resume_from_checkpoint", "true, false, a checkpoint path or None")
        _check_bool(self, "overwrite_output_dir")
        if self.overwrite_output_dir and self.resume_from_checkpoint not in (None, False):
            raise ValueError(
                "TrainingArguments.overwrite_output_dir=True deletes the checkpoints that "
                f"resume_from_checkpoint={self.resume_from_checkpoint!r} asks to resume "
                "from: set only one of them"
            )
        _check_float(self, "learning_rate", positive=True)
        _check_float(self, "weight_decay", positive=False)
        if not 0.0 <= self.weight_decay < float("inf"):
            _fail(self, "weight_decay", "a finite number >= 0")
        _check_choice(self, "lr_scheduler_type", LR_SCHEDULER_TYPES)
        _check_int(self, "warmup_steps", minimum=0)
        _check_float(self, "warmup_ratio", positive=False)
        if not 0.0 <= self.warmup_ratio < 1.0:
            _fail(self, "warmup_ratio", "a number in [0, 1)")
        _check_int(self, "dataloader_num_workers", minimum=0, optional=True)
        _check_bool(self, "load_best_model_at_end")
        if self.load_best_model_at_end and not self.keep_best_metric:
            # as Hugging Face's metric_for_best_model: the eval loss, smaller is better
            self.keep_best_metric, self.keep_best_mode = "loss", "min"

    # --- derived values -----------------------------------------------------------
    @property
    def resolved_logging_dir(self) -> str:
        """TensorBoard directory: ``logging_dir`` or ``<output_dir>/logs``."""
        if self.logging_dir:
            return self.logging_dir
        return self.output_dir.rstrip("/") + "/logs"

    @property
    def report_targets(self) -> list[str]:
        """``report_to`` as a list: ``["tensorboard"]``, ``["tensorboard", "jsonl"]``, ``[]``."""
        return _report_targets(self.report_to) or []

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # --- loading ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingArguments:
        """Build from a mapping; an unknown key is an error that lists the valid ones."""
        if not isinstance(values, dict):
            raise ValueError(f"TrainingArguments config must be a mapping, got {type(values)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names, key=str)
        if unknown:
            raise ValueError(f"unknown TrainingArguments field(s) {unknown}"
                             + _close_names(unknown, names) + f"; valid fields: {sorted(names)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str, **overrides: Any) -> TrainingArguments:
        """Load a YAML (.yaml/.yml) or JSON (.json) file from any fsspec path."""
        values = load_config_file(path)
        values.update(overrides)
        try:
            return cls.from_dict(values)
        except ValueError as e:
            raise ValueError(f"config file {os.fspath(path)!r}: {e}") from e

    @classmethod
    def from_cli(cls, argv: Optional[list[str]] = None) -> TrainingArguments:
        """Parse ``--field value`` flags (and ``--config file.yaml``) into arguments."""
        parser = argparse.ArgumentParser(description="recframe training arguments")
        add_arguments(parser)
        ns = parser.parse_args(argv)
        return arguments_from_namespace(ns)


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON config mapping; errors name the file and the fix."""
    import yaml

    path = os.fspath(path)  # a pathlib.Path works too (``.lower()`` below needs a str)
    try:
        with fsspec.open(path, "r") as f:
            text = f.read()
    except FileNotFoundError as e:
        raise ValueError(f"config file {path!r} does not exist") from e
    except IsADirectoryError as e:
        raise ValueError(f"config file {path!r} is a directory; pass a .yaml or .json file") from e
    lower = path.lower()
    try:
        if lower.endswith(".json"):
            values = json.loads(text)
        elif lower.endswith((".yaml", ".yml")):
            values = yaml.safe_load(text)
        else:
            raise ValueError(
                f"config file {path!r}: unknown extension; use .yaml, .yml or .json"
            )
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"config file {path!r} is not valid: {e}") from e
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of field: value")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one ``--<field>`` flag per TrainingArguments field."""
    parser.add_argument(
        "--config", default=None, help="YAML or JSON file of TrainingArguments; flags override it"
    )
    hints = typing.get_type_hints(TrainingArguments)
    docs = _field_docs()
    for f in dataclasses.fields(TrainingArguments):
        conv, metavar = _converter(f.name, hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        parser.add_argument(
            f"--{f.name}",
            type=conv,
            default=argparse.SUPPRESS,
            metavar=metavar,
            help=f"{docs.get(f.name, '')} (default: {default})",
        )


CONFIG_SECTIONS = ("model", "data")
"""Sections of a ``recframe train --config`` file beside the training arguments: the
keyword arguments of the user's model and data factories (see `config_sections`)."""


def config_sections(path: Optional[str]) -> dict[str, dict[str, Any]]:
    """The ``model:`` and ``data:`` mappings of a config file (empty when absent)."""
    values = load_config_file(path) if path else {}
    sections: dict[str, dict[str, Any]] = {}
    for name in CONFIG_SECTIONS:
        section = values.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(
                f"config file {path!r}: {name!r} must be a mapping of the {name} factory's "
                f"keyword arguments (and optionally factory: pkg.module:function)"
            )
        sections[name] = dict(section)
    return sections


def arguments_from_namespace(ns: argparse.Namespace) -> TrainingArguments:
    """Merge ``--config`` file values with the flags given explicitly (flags win); the
    file's ``model:``/``data:`` sections are the factories' (`config_sections`)."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    values: dict[str, Any] = {}
    config = getattr(ns, "config", None)
    if config:
        values.update(load_config_file(config))
        for name in CONFIG_SECTIONS:
            values.pop(name, None)
    values.update({k: v for k, v in vars(ns).items() if k in names})
    try:
        return TrainingArguments.from_dict(values)
    except ValueError as e:
        if config and not set(values) <= names:  # the file's keys are the unknown ones
            raise ValueError(f"config file {config!r}: {e}") from e
        raise


# --- helpers ------------------------------------------------------------------------
def _close_names(unknown: list[Any], names: set[str]) -> str:
    """`` (did you mean 'train_steps'?)`` for unknown keys close to a field name."""
    import difflib

    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.75)
        hints += [f"{key!r} -> {close[0]!r}"] if close else []
    return f" (did you mean: {', '.join(hints)}?)" if hints else ""


def _fail(args: Any, name: str, allowed: str) -> None:
    value = getattr(args, name)
    raise ValueError(f"TrainingArguments.{name}={value!r} is invalid: must be {allowed}")


def _check_int(args: Any, name: str, minimum: int, optional: bool = False) -> None:
    value = getattr(args, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(args, name, f"an integer >= {minimum}" + (" or None" if optional else ""))


def _check_float(args: Any, name: str, positive: bool, optional: bool = False) -> None:
    value = getattr(args, name)
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok and positive:
        ok = value > 0 and value == value and value != float("inf")
    if not ok:
        _fail(args, name, "a finite number > 0" + (" or None" if optional else ""))
    setattr(args, name, float(value))


def _check_bool(args: Any, name: str) -> None:
    if not isinstance(getattr(args, name), bool):
        _fail(args, name, "true or false")


def _check_str(args: Any, name: str, optional: bool = False, nonempty: bool = False) -> None:
    value = getattr(args, name)
    if value is None and optional:
        return
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
        setattr(args, name, value)
    if not isinstance(value, str) or (nonempty and not value.strip()):
        _fail(args, name, "a non-empty string" + (" or None" if optional else ""))


def _check_choice(args: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(args, name)
    if value not in choices:
        import difflib

        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
        _fail(args, name, "one of " + ", ".join(repr(c) for c in choices)
              + (f" (did you mean {close[0]!r}?)" if close else ""))


def _report_targets(value: Any) -> Optional[list[str]]:
    """``report_to`` as a list of destinations (``none`` alone: empty); None if invalid."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        return None
    names = [n.strip() for n in names if n.strip()]
    if not names or any(n not in REPORT_TO for n in names) or (
        "none" in names and len(names) > 1
    ):
        return None
    return [n for n in dict.fromkeys(names) if n != "none"]


def _check_report_to(args: Any) -> None:
    if isinstance(args.report_to, tuple):
        args.report_to = list(args.report_to)
    if _report_targets(args.report_to) is None:
        _fail(args, "report_to", "one of " + ", ".join(map(repr, REPORT_TO))
              + ", or a list (or comma-separated string) of tensorboard and jsonl")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_bool_or_str(text: str) -> Union[bool, str]:
    try:
        return _parse_bool(text)
    except argparse.ArgumentTypeError:
        return text


def _optional(conv: Any) -> Any:
    def parse(text: str) -> Any:
        if text.strip().lower() in ("none", "null", ""):
            return None
        return conv(text)

    parse.__name__ = getattr(conv, "__name__", "value")
    return parse


def _parse_json_list(text: str) -> list:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON list, got {text!r}: {e}") from e
    if not isinstance(value, list):
        raise argparse.ArgumentTypeError(f"expected a JSON list, got {text!r}")
    return value


def _converter(name: str, hint: Any) -> tuple[Any, str]:
    origin = typing.get_origin(hint)
    optional = False
    if origin in (Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(inner) < len(typing.get_args(hint))
        if set(inner) == {bool, str}:
            return _optional(_parse_bool_or_str), "BOOL|PATH"
        hint = inner[0]
        origin = typing.get_origin(hint)
    if hint is bool:
        conv, metavar = _parse_bool, "BOOL"
    elif hint is int:
        conv, metavar = int, "INT"
    elif hint is float:
        conv, metavar = float, "FLOAT"
    elif hint is list or origin is list:
        conv, metavar = _parse_json_list, "JSON"
    else:
        conv, metavar = str, "STR"
    return (_optional(conv) if optional else conv), metavar


def _field_docs() -> dict[str, str]:
    """Read the attribute docstrings under each field (used for ``--help``)."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(TrainingArguments))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(getattr(nxt, "value", None), ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


__all__ = [
    "CONFIG_SECTIONS", "TrainingArguments", "add_arguments", "arguments_from_namespace",
    "config_sections", "load_config_file",
]
