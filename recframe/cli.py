"""The ``recframe`` command line.

``recframe train`` trains a model of the zoo on synthetic data, Criteo TSV, or Parquet /
CSV / TSV files under a feature schema (``--data parquet --schema schema.yaml``) with every
`TrainingArguments` field as a flag (``--train_steps 100``) or from ``--config
file.yaml``; its defaults train DLRM on synthetic data in about a minute on 2 cores and
print the final evaluation. ``recframe data convert`` writes CSV/TSV data as Parquet parts.

``recframe ckpt list PATH`` lists the checkpoints of an output_dir (local path or any
fsspec URL), the leftovers of interrupted saves and the checkpoints whose manifest is
corrupt; ``recframe ckpt inspect PATH`` shows one checkpoint's parts, tensors and
files, and ``--verify`` checks what a restore would read (exit status 1 naming the
corrupt file). The ckpt commands only print what `recframe.checkpoint.inspect` finds.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Optional

from recframe.arguments import add_arguments, arguments_from_namespace

log = logging.getLogger("recframe")


_SYNTHETIC_ONLY = {"num_train_batches": 400, "num_eval_batches": 20}
"""Flags (with their defaults) that size the synthetic data only."""
_SCHEMA_SIZED = {"num_embeddings": 10_000, "embedding_dim": 16}
"""Flags (with their defaults) that a --schema's tables replace."""


def _train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (DLRM on synthetic data by default)",
        description="Train a recommendation model. Every TrainingArguments field is a flag; "
        "--config reads them from YAML/JSON and flags override the file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model", default=None, type=_model_choice, metavar="{dlrm,deepfm,PKG.MODULE:FN}",
        help="model of the zoo (default dlrm), or your own: the import path of a factory "
        "fn(args, **model_section) -> nn.Module, called with the TrainingArguments and the "
        "config file's model: section",
    )
    g.add_argument(
        "--data", default=None, type=_data_choice,
        metavar="{synthetic,criteo,parquet,csv,tsv,PKG.MODULE:FN}",
        help="training data (default synthetic): synthetic, Criteo TSV files, Parquet / CSV / "
        "TSV files under --schema, or your own: the import path of a factory "
        "fn(args, **data_section) returning the train dataset or (train, eval)",
    )
    g.add_argument("--train_path", default=None,
                   help="training file(s), glob or directory (any fsspec path)")
    g.add_argument("--eval_path", default=None, help="evaluation file(s), glob or directory")
    g.add_argument("--schema", default=None,
                   help="feature schema YAML/JSON (needed by --data parquet/csv/tsv; its "
                   "tables size the model, so --num_embeddings/--embedding_dim do not apply)")
    g.add_argument("--header", action="store_true", help="CSV/TSV files start with a header")
    g.add_argument("--data_workers", type=_int_at_least(0), default=2,
                   help="background decoding threads per reader (0: decode inline)")
    g.add_argument("--batch_size", type=_int_at_least(1), default=512,
                   help="samples per micro-batch")
    g.add_argument("--num_train_batches", type=_int_at_least(1),
                   default=_SYNTHETIC_ONLY["num_train_batches"],
                   help="synthetic training batches per epoch")
    g.add_argument("--num_eval_batches", type=_int_at_least(0),
                   default=_SYNTHETIC_ONLY["num_eval_batches"],
                   help="synthetic eval batches (0: no evaluation data)")
    g.add_argument("--num_embeddings", type=_int_at_least(1),
                   default=_SCHEMA_SIZED["num_embeddings"], help="rows per table")
    g.add_argument("--embedding_dim", type=_int_at_least(1),
                   default=_SCHEMA_SIZED["embedding_dim"], help="embedding width")
    g.add_argument("--gauc_feature", default=None, metavar="FEATURE",
                   help="sparse feature whose id groups the eval samples for grouped AUC "
                   "(gauc), e.g. a user id column of --schema data (synthetic and criteo "
                   "data: cat_0..cat_25); without it no gauc is computed")
    g.add_argument("--lr", dest="learning_rate", type=float, default=argparse.SUPPRESS,
                   help="the same as --learning_rate (the dense optimizer's learning rate)")
    g.add_argument("--sparse_lr", type=float, default=0.05, help="sparse optimizer learning rate")
    g.add_argument(
        "--sparse_backend", default="fused", choices=["fused", "sparse_grad"],
        help="fused: torchrec sharding with fbgemm kernels fused into backward; sparse_grad: "
        "EmbeddingBag(sparse=True) tables stepped row-wise by recframe's sparse optimizers",
    )
    g.add_argument(
        "--sparse_optimizer", default="rowwise_adagrad",
        choices=["rowwise_adagrad", "adagrad", "sgd", "adam", "adamw"],
        help="optimizer of the embedding tables (fused on CPU: rowwise_adagrad, adagrad, sgd)",
    )
    g.add_argument(
        "--sharding", default=None,
        choices=["table_wise", "row_wise", "table_row_wise", "column_wise", "mixed"],
        help="fused back end: the tables' sharding (default: torchrec's planner chooses; "
        "mixed: tables alternately table_wise and row_wise)",
    )
    add_arguments(p.add_argument_group("training arguments"))
    _add_log_level(p, default=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_train)


def _int_at_least(minimum: int) -> Any:
    """An argparse type: an integer >= ``minimum`` (argparse names the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


MODELS = ("dlrm", "deepfm")
DATA = ("synthetic", "criteo", "parquet", "csv", "tsv")


def _builtin_or_import_path(builtin: tuple[str, ...], what: str) -> Any:
    """An argparse ``type`` taking one of ``builtin`` or a ``pkg.module:factory`` path."""
    def choice(text: str) -> str:
        if text in builtin or _is_import_path(text):
            return text
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither {what} ({', '.join(builtin)}) nor an import path "
            "pkg.module:factory"
        )
    return choice


_model_choice = _builtin_or_import_path(MODELS, "a model of the zoo")
_data_choice = _builtin_or_import_path(DATA, "built-in data")


def _is_import_path(text: str) -> bool:
    module, sep, attr = text.partition(":")
    return bool(sep) and all(p.isidentifier() for p in module.split(".")) and all(
        p.isidentifier() for p in attr.split(".")
    )


def _load_factory(spec: str, what: str) -> Any:
    """The callable at ``pkg.module:attr``; errors name the flag and the path."""
    import importlib
    import os

    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # the user's project directory, as `python -m` has
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(
            f"--{what} {spec}: cannot import {module_name!r} ({e}); run from the directory "
            "that holds its package, or put it on PYTHONPATH or install it"
        ) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--{what} {spec}: {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--{what} {spec}: {attr!r} is not callable")
    return obj


def _call_factory(spec: str, what: str, args: Any, kwargs: dict[str, Any]) -> Any:
    """Call the user's factory; a section that does not fit its signature is a usage
    error, an exception inside it one line naming the flag (the traceback at DEBUG)."""
    import inspect

    factory = _load_factory(spec, what)
    try:
        signature: Optional[inspect.Signature] = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C callable: no signature to check
        signature = None
    if signature is not None:
        try:
            signature.bind(args, **kwargs)
        except TypeError as bad:  # the call itself does not fit: say which section to fix
            raise ValueError(
                f"--{what} {spec}: the {what}: section {sorted(kwargs)} does not fit "
                f"{getattr(factory, '__name__', spec)}{signature}: {bad}"
            ) from None
    try:
        return factory(args, **kwargs)
    except Exception as e:
        log.debug("--%s %s raised:", what, spec, exc_info=True)
        raise FactoryError(
            f"--{what} {spec} raised {type(e).__name__}: {e} (--log_level DEBUG shows "
            "the traceback)"
        ) from e


class FactoryError(Exception):
    """The user's model or data factory raised (exit status 1)."""


def _resolve_factories(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Fill ``ns.model``/``ns.data`` (flag, else the section's ``factory``, else the
    default) and return the config file's sections without their ``factory`` keys."""
    from recframe.arguments import config_sections

    sections = config_sections(getattr(ns, "config", None))
    for name, default, check in (("model", "dlrm", _model_choice),
                                 ("data", "synthetic", _data_choice)):
        from_file = sections[name].pop("factory", None)
        if getattr(ns, name) is None:
            try:
                setattr(ns, name, check(str(from_file)) if from_file else default)
            except argparse.ArgumentTypeError as e:
                raise ValueError(f"config file {ns.config!r}: {name}.factory: {e}") from e
        if sections[name] and not _is_import_path(getattr(ns, name)):
            raise ValueError(
                f"config file {ns.config!r} has a {name}: section, but --{name} "
                f"{getattr(ns, name)} is built in and takes no arguments; name your factory "
                f"(--{name} pkg.module:fn, or {name}.factory in the file)"
            )
    return sections


def _add_log_level(parser: argparse.ArgumentParser, default: Any) -> None:
    """``--log_level``, accepted before or after the subcommand."""
    parser.add_argument("--log_level", default=default, type=_log_level, metavar="LEVEL",
                        help="level of recframe's log: DEBUG, INFO, WARNING, ERROR")


def _log_level(text: str) -> str:
    level = str(text).upper()
    if not isinstance(logging.getLevelName(level), int):
        raise argparse.ArgumentTypeError(
            f"unknown log level {text!r}; use DEBUG, INFO, WARNING or ERROR"
        )
    return level


def _data_schema(ns: argparse.Namespace) -> Any:
    """The feature schema of the file data, or None for synthetic data."""
    from recframe.schema import FeatureSchema

    if ns.data == "synthetic":
        return None
    if ns.data == "criteo":
        return FeatureSchema.criteo(ns.num_embeddings, ns.embedding_dim)
    if not ns.schema:
        hint = "a YAML file naming the label, dense and sparse columns: see docs/data.md"
        if ns.train_path and isinstance(ns.train_path, str):
            beside = ns.train_path.rstrip("/") + "/schema.yaml"
            import fsspec

            try:
                fs, path = fsspec.core.url_to_fs(beside)
                if fs.exists(path):
                    hint = f"recframe data convert wrote {beside}: pass --schema {beside}"
            except (OSError, ValueError, ImportError):
                pass  # only a hint
        raise ValueError(f"recframe train --data {ns.data} needs --schema schema.yaml, the "
                         f"feature schema the files are read with ({hint})")
    return FeatureSchema.from_file(ns.schema)


def _warn_unused_flags(ns: argparse.Namespace) -> None:
    """One warning per flag set away from its default that file data ignores: the
    synthetic data's batch counts, the table sizes a --schema's tables replace, and
    --header for Parquet."""
    why = {"num_train_batches": "the training files set the batches of an epoch "
                                "(--train_steps sets the updates)",
           "num_eval_batches": "--eval_path names the evaluation files (--eval_steps limits "
                               "the batches an evaluation reads)"}
    flags = dict(_SYNTHETIC_ONLY)
    if ns.data != "criteo":  # criteo's preset schema takes them
        flags.update(_SCHEMA_SIZED)
        why.update(dict.fromkeys(_SCHEMA_SIZED, f"the tables of --schema {ns.schema} size the "
                                 "model: set num_embeddings / embedding_dim there"))
    for name, default in flags.items():
        if getattr(ns, name) != default:
            log.warning("--%s %s does nothing with --data %s: %s", name, getattr(ns, name),
                        ns.data, why[name])
    if ns.header and ns.data == "parquet":
        log.warning("--header does nothing with --data parquet: Parquet files name their "
                    "columns (--header is for CSV/TSV files whose first line names them)")


def _build_data(
    ns: argparse.Namespace, seed: int, schema: Any = None, workers: Optional[int] = None
) -> tuple[Any, Any]:
    """Training and evaluation data; under torchrun each rank reads its own part."""
    from recframe import distributed
    from recframe.data import SyntheticCriteo

    ranks = dict(rank=distributed.get_rank(), world_size=distributed.get_world_size())
    if ns.data != "synthetic":
        from recframe.readers import TabularDataset

        if not ns.train_path:
            raise ValueError(
                f"recframe train --data {ns.data} needs --train_path PATH (the training "
                "files: a file, glob or directory)"
            )
        _warn_unused_flags(ns)
        fmt = "tsv" if ns.data == "criteo" else ns.data
        workers = ns.data_workers if workers is None else workers
        common = dict(format=fmt, batch_size=ns.batch_size, header=ns.header,
                      num_workers=workers, **ranks)
        opened = []
        for flag, path in (("--train_path", ns.train_path), ("--eval_path", ns.eval_path)):
            try:
                opened.append(TabularDataset(path, schema, **common) if path else None)
            except FileNotFoundError as e:
                raise ValueError(f"{flag} {path}: {e}; pass existing files, a glob or a "
                                 "directory (any fsspec path)") from e
        return opened[0], opened[1]
    if workers is not None:
        log.warning("--dataloader_num_workers %d does nothing with --data synthetic: its "
                    "batches are generated in the training process", workers)
    common = dict(batch_size=ns.batch_size, num_embeddings=ns.num_embeddings, **ranks)
    train = SyntheticCriteo(num_batches=ns.num_train_batches, seed=seed, **common)
    # evaluation batches come from the same distribution, past the training batches
    evals = None
    if ns.num_eval_batches:
        evals = SyntheticCriteo(num_batches=ns.num_eval_batches, seed=seed + 1_000_003,
                                **common)
    return train, evals


def _sparse_side(model: Any, ns: argparse.Namespace, device: str) -> tuple[Any, Any]:
    """The model as trained (sharded for the fused back end) and its sparse optimizer."""
    from torch import nn

    backend = ns.sparse_backend
    if backend == "fused" and device == "xla":
        log.info("--device xla: fbgemm's fused tables do not run on XLA; the tables "
                 "train with --sparse_backend sparse_grad (dense gradients on XLA)")
        backend = "sparse_grad"
    if backend == "fused":
        from recframe.optim.fused import _embedding_collections, shard_model

        if _is_import_path(ns.model) and not _embedding_collections(model):
            return model, None  # no torchrec tables: the Trainer's sparse default

        return shard_model(
            model, optimizer=ns.sparse_optimizer, lr=ns.sparse_lr, sharding=ns.sharding
        )
    from recframe import distributed

    if distributed.get_world_size() > 1:
        raise ValueError(
            "--sparse_backend sparse_grad trains in one process; several processes "
            "(torchrun) need --sparse_backend fused (torchrec sharding)"
        )
    from recframe.optim.sparse import build_sparse_optimizer

    for module in model.modules():
        if isinstance(module, (nn.EmbeddingBag, nn.Embedding)):
            module.sparse = True  # sparse COO gradients: only touched rows
    return model, build_sparse_optimizer(model, ns.sparse_optimizer, lr=ns.sparse_lr)


def _cmd_train(ns: argparse.Namespace) -> int:
    import torch

    from recframe.device import device_kind
    from recframe.models import build_model
    from recframe.trainer import Trainer

    args = arguments_from_namespace(ns)
    sections = _resolve_factories(ns)
    _check_output_dir(args.output_dir)
    _check_resume_path(args)
    if _is_import_path(ns.data):
        schema = None
        made = _call_factory(ns.data, "data", args, sections["data"])
        train_data, eval_data = made if isinstance(made, tuple) and len(made) == 2 else (
            made, None)
    else:
        schema = _data_schema(ns)
        if schema is not None and len(schema.labels) > 1 and not _is_import_path(ns.model):
            raise ValueError(f"--model {ns.model} predicts one label per sample, but --schema "
                             f"{ns.schema} names {len(schema.labels)}: {schema.labels}; keep "
                             "one in labels, or train your own model (--model PKG.MODULE:FN)")
        train_data, eval_data = _build_data(ns, args.seed, schema, args.dataloader_num_workers)
    torch.manual_seed(args.seed)
    if _is_import_path(ns.model):
        model = _call_factory(ns.model, "model", args, sections["model"])
        if not isinstance(model, torch.nn.Module):
            raise ValueError(f"--model {ns.model} returned {type(model).__name__}, not an "
                             "nn.Module whose forward(batch) returns the loss")
    elif schema is not None:  # the tables come from the schema the data is read with
        model = build_model(ns.model, schema=schema)
    else:
        model = build_model(
            ns.model, num_embeddings=ns.num_embeddings, embedding_dim=ns.embedding_dim
        )
    _check_gauc(ns, args, schema)
    dynamic = getattr(model, "dynamic", None) is not None  # before sharding wraps it
    model, sparse_opt = _sparse_side(model, ns, device_kind(args.device))
    if ns.gauc_feature:
        from recframe.metrics import group_predictions_by

        group_predictions_by(model, ns.gauc_feature)
    trainer = Trainer(  # the dense optimizer and schedule: from the training arguments
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        sparse_optimizer=sparse_opt,
    )
    if dynamic:
        from recframe.hooks import DynamicEmbeddingHook

        trainer.add_hook(DynamicEmbeddingHook())
    trainer.train()
    if eval_data is not None:
        results = trainer.evaluate()  # every rank: the metrics cover all ranks' samples
        if trainer.is_main_process:
            summary = {k: round(v, 4) for k, v in results.items()}
            print("final eval: " + json.dumps(summary), flush=True)
    from recframe import distributed

    if distributed.get_world_size() > 1:  # launched by torchrun: leave the group cleanly
        import torch.distributed as dist

        distributed.barrier()
        dist.destroy_process_group()
    return 0


BUILTIN_EVAL_METRICS = ("loss", "num_samples", "logloss", "ne", "calibration", "auc")
"""What an evaluation of a built-in model reports (plus gauc with --gauc_feature)."""


def _check_gauc(ns: argparse.Namespace, args: Any, schema: Any) -> None:
    """``--gauc_feature`` must name a sparse feature of the built-in data; a metric the
    built-in models never compute (``--keep_best_metric aucc``), or one that needs gauc
    without it, is a usage error naming the flag and the fix, before any training."""
    from recframe.data import DEFAULT_CAT_NAMES

    builtin = not _is_import_path(ns.data)
    names = schema.feature_names if schema is not None else DEFAULT_CAT_NAMES
    if ns.gauc_feature and builtin and ns.gauc_feature not in names:
        raise ValueError(f"--gauc_feature {ns.gauc_feature}: not a sparse feature of the "
                         f"{ns.data} data; its features: {', '.join(names)}")
    if _is_import_path(ns.model):
        return  # the user's model may pass add_predictions(..., groups=...) itself
    known = BUILTIN_EVAL_METRICS + (("gauc", "gauc_groups") if ns.gauc_feature else ())
    best = args.keep_best_metric
    if best and best not in known and best not in ("gauc", "gauc_groups"):
        import difflib

        close = difflib.get_close_matches(best, known, n=1)
        raise ValueError(
            f"--keep_best_metric {best}: the {ns.model} model's evaluations compute "
            f"{', '.join(known)}" + (f" (did you mean {close[0]}?)" if close else "")
        )
    if ns.gauc_feature:
        return
    for flag in ("keep_best_metric", "metric_for_scheduler"):
        if getattr(args, flag) in ("gauc", "gauc_groups"):
            raise ValueError(
                f"--{flag} {getattr(args, flag)}: gauc (grouped AUC) needs the column that "
                "groups the samples: add --gauc_feature FEATURE (e.g. a user id column; "
                "synthetic data: cat_0)"
            )


def _check_output_dir(url: str) -> None:
    """A remote output_dir must be reachable before any work: a missing credential or
    bucket is one line naming the URL and the fix, not a traceback after the model is
    built."""
    if "://" not in url or url.startswith(("file://", "memory://")):
        return
    from recframe.checkpoint.storage import Storage

    try:
        storage = Storage(url)
        storage.listdir(storage.root)
    except ImportError as e:
        raise ValueError(f"--output_dir {url}: {e}") from e
    except Exception as e:  # noqa: BLE001 - botocore/gcsfs raise their own classes
        text = str(e)
        hint = ""
        if "credential" in text.lower():
            hint = (" (no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
                    "AWS_PROFILE, plus FSSPEC_S3_ENDPOINT_URL for a non-AWS store)")
        raise OutputDirError(f"cannot use --output_dir {url}{hint}: {text}") from e


def _check_resume_path(args: Any) -> None:
    """``--resume_from_checkpoint PATH`` must name a committed checkpoint (or a
    ``ckpt_<step>`` of output_dir): a typo or an output_dir is one line, before work."""
    import re

    from recframe.checkpoint.storage import Storage

    target = args.resume_from_checkpoint
    if not isinstance(target, str):
        return
    flag = f"--resume_from_checkpoint {target}"
    try:
        if re.fullmatch(r"ckpt_\d+", target.strip("/")):
            inside = Storage(args.output_dir)
            if inside.exists(inside.join(inside.path(target.strip("/")), "manifest.json")):
                return
        storage = Storage(target)
        if storage.exists(storage.join(storage.root, "manifest.json")):
            return
        if not storage.exists(storage.root):
            raise ValueError(f"{flag}: {storage.display(storage.root)} does not exist; pass a "
                             "checkpoint directory (recframe ckpt list OUTPUT_DIR shows them) "
                             "or true for output_dir's latest")
        names = [] if storage.fs.isfile(storage.root) else storage.listdir(storage.root)
    except ImportError as e:
        raise ValueError(f"{flag}: {e}") from e
    steps = sorted(int(n[5:]) for n in names if re.fullmatch(r"ckpt_\d+", n) and storage.exists(
        storage.join(storage.path(n), "manifest.json")))
    if steps:
        raise ValueError(
            f"{flag} is an output_dir, not a checkpoint: pass one of its checkpoints, e.g. "
            f"--resume_from_checkpoint {storage.join(storage.root, f'ckpt_{steps[-1]}')}"
        )
    raise ValueError(f"{flag}: {storage.display(storage.root)} is not a committed checkpoint "
                     "(no manifest.json); recframe ckpt list OUTPUT_DIR shows the checkpoints")


class OutputDirError(Exception):
    """The output_dir cannot be used (exit status 1)."""


# --- recframe data ------------------------------------------------------------------


def _data_parser(sub: Any) -> None:
    p = sub.add_parser(
        "data", help="convert CSV/TSV data to Parquet",
        description="Data tools: `recframe data convert` writes CSV/TSV (Criteo TSV, or any "
        "CSV/TSV under --schema) as Parquet parts, so later epochs read columnar data.",
    )
    data_sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    c = data_sub.add_parser(
        "convert", help="CSV/TSV files to Parquet parts",
        description="Read INPUT (files, globs or directories; .gz and other compressions "
        "inferred) under the schema (--criteo or --schema) and write raw Parquet parts "
        "part-NNNNN.parquet plus schema.yaml to OUTPUT. Bad input fails naming the line.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("input", nargs="+", metavar="INPUT", help="CSV/TSV files, globs, dirs")
    c.add_argument("--output", required=True, help="output directory (any fsspec path)")
    group = c.add_mutually_exclusive_group(required=True)
    group.add_argument("--criteo", action="store_true", help="Criteo TSV (the preset schema)")
    group.add_argument("--schema", help="feature schema YAML/JSON")
    c.add_argument("--format", default="tsv", choices=["csv", "tsv", "parquet"],
                   help="input format (parquet: only with --prepare)")
    c.add_argument("--header", action="store_true", help="input files start with a header")
    c.add_argument("--unlabelled", action="store_true",
                   help="input files lack the label/weight columns (Criteo's test.txt)")
    c.add_argument("--rows_per_file", type=int, default=1_000_000, help="rows per part")
    c.add_argument("--row_group_size", type=int, default=65_536, help="rows per row group")
    c.add_argument("--compression", default="lz4", choices=["lz4", "zstd", "snappy", "none"],
                   help="Parquet codec: lz4 reads fastest for its size (a CPU-bound trainer "
                   "reads every epoch); zstd writes the smallest files (~0.7x lz4's bytes, "
                   "~1.7x its read CPU: for slow storage); none the biggest, cheapest to "
                   "read (docs/data.md)")
    c.add_argument("--prepare", action="store_true",
                   help="write the schema's output instead of raw columns: dense values "
                   "filled and transformed, ids mapped to table rows. Reading skips that "
                   "work (about half the read CPU per row) but the files then fit only this "
                   "schema's columns, transforms and table sizes (checked when read)")
    c.add_argument("--no_progress", action="store_true", help="no progress bar")
    c.set_defaults(func=_cmd_data_convert)
    p.set_defaults(func=lambda ns: _ckpt_help(p))


def _cmd_data_convert(ns: argparse.Namespace) -> int:
    from recframe.readers import DataError, TabularDataset, convert_to_parquet
    from recframe.schema import FeatureSchema

    schema = FeatureSchema.criteo() if ns.criteo else FeatureSchema.from_file(ns.schema)
    if ns.format == "parquet" and not ns.prepare:
        print("recframe: error: Parquet input is already columnar: train on it as it is, "
              "or add --prepare to write prepared parts", file=sys.stderr)
        return 1
    fmt = "tsv" if ns.criteo and ns.format != "parquet" else ns.format
    try:
        source = TabularDataset(ns.input, schema, format=fmt,
                                header=ns.header, labelled=not ns.unlabelled, num_workers=0)
        parts = convert_to_parquet(source, ns.output, rows_per_file=ns.rows_per_file,
                                   row_group_size=ns.row_group_size,
                                   compression=ns.compression,
                                   progress=not ns.no_progress, prepare=ns.prepare)
    except (DataError, FileNotFoundError, FileExistsError) as e:
        print(f"recframe: error: {e}", file=sys.stderr)
        return 1
    what = "prepared Parquet part(s)" if ns.prepare else "Parquet part(s)"
    print(f"wrote {len(parts)} {what} and schema.yaml to {ns.output}", flush=True)
    return 0


# --- recframe ckpt ------------------------------------------------------------------


class _CkptCommandError(Exception):
    """A ckpt subcommand cannot go on; the message says why (exit status 1)."""


def _ckpt_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ckpt",
        help="list, inspect and verify checkpoints",
        description="Look at the checkpoints of an output_dir (a local path or any fsspec "
        "URL: memory://, s3://, gs://...). Remote credentials and endpoints come from the "
        "store's environment variables or fsspec's (FSSPEC_S3_ENDPOINT_URL...).",
    )
    ckpt_sub = p.add_subparsers(dest="ckpt_command", metavar="SUBCOMMAND")
    ls = ckpt_sub.add_parser(
        "list",
        help="committed checkpoints of an output_dir and leftovers of interrupted saves",
        description="List the committed checkpoints under PATH (step, size, files, world "
        "size, creation time, metrics), oldest first, then the leftovers of interrupted "
        "saves (staging directories, ckpt_<n> without a manifest), marked uncommitted.",
    )
    ls.add_argument("path", metavar="PATH", help="an output_dir (or one checkpoint directory)")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.set_defaults(func=_cmd_ckpt_list)
    ins = ckpt_sub.add_parser(
        "inspect",
        help="one checkpoint's parts, tensors and files; --verify checks every chunk",
        description="Show one checkpoint: PATH is a checkpoint directory, or an output_dir "
        "whose latest committed checkpoint (or --step N) is shown. --verify reads every "
        "chunk of every data file and checks its size and CRC32; the exit status is 1 when "
        "anything is corrupt, and each corrupt file is named.",
    )
    ins.add_argument("path", metavar="PATH", help="a checkpoint directory or an output_dir")
    ins.add_argument("--step", type=int, default=None,
                     help="inspect ckpt_<STEP> of the output_dir instead of the latest")
    ins.add_argument("--verify", action="store_true",
                     help="read every chunk back and check sizes and CRC32 checksums")
    ins.add_argument("--threads", type=int, default=4,
                     help="files verified in parallel (with --verify)")
    ins.add_argument("--json", action="store_true", help="print one JSON object")
    ins.set_defaults(func=_cmd_ckpt_inspect)
    p.set_defaults(func=lambda ns: _ckpt_help(p))


def _ckpt_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _open_storage(path: str) -> Any:
    from recframe.checkpoint.storage import Storage

    try:
        return Storage(path)
    except ImportError as e:  # e.g. s3fs / gcsfs not installed
        raise _CkptCommandError(f"cannot open {path}: {e}") from e


def _human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{n} B"  # pragma: no cover


def _metrics_text(metrics: dict[str, Any]) -> str:
    if not metrics:
        return "-"
    parts = []
    for key, value in sorted(metrics.items()):
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def _cmd_ckpt_list(ns: argparse.Namespace) -> int:
    return _run_ckpt(_ckpt_list, ns)


def _cmd_ckpt_inspect(ns: argparse.Namespace) -> int:
    return _run_ckpt(_ckpt_inspect, ns)


def _run_ckpt(fn: Any, ns: argparse.Namespace) -> int:
    import os

    from recframe.checkpoint.format import CheckpointCorruptError
    from recframe.checkpoint.inspect import CheckpointNotFound
    from recframe.checkpoint.manifest import CheckpointVersionError
    from recframe.checkpoint.storage import StorageError

    try:
        status = int(fn(ns))
        sys.stdout.flush()  # a closed pipe is reported here, inside the try
        return status
    except BrokenPipeError:  # ``| head`` closed stdout: stop quietly, as cat would
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes
        return 141
    except (_CkptCommandError, CheckpointNotFound, CheckpointCorruptError,
            CheckpointVersionError, StorageError) as e:
        print(f"recframe: error: {e}", file=sys.stderr)
        return 1


def _ckpt_list(ns: argparse.Namespace) -> int:
    from recframe.checkpoint import inspect

    storage = _open_storage(ns.path)
    own, _ = inspect.own_checkpoint(storage)
    if own is not None:  # PATH is itself a checkpoint directory
        found = {"checkpoints": [inspect.summary(storage, storage.root, own)],
                 "uncommitted": [], "corrupt": []}
    else:
        if not storage.exists(storage.root):
            raise _CkptCommandError(f"{storage.display(storage.root)} does not exist")
        if storage.fs.isfile(storage.root):
            raise _CkptCommandError(
                f"{storage.display(storage.root)} is a file; pass an output_dir (the "
                "directory of ckpt_<step> checkpoints) or one checkpoint directory"
            )
        found = inspect.scan(storage)
    committed, leftovers, corrupt = found["checkpoints"], found["uncommitted"], found["corrupt"]
    if ns.json:
        print(json.dumps({"path": storage.display(storage.root), **found}, indent=2))
        return 0
    print(f"{storage.display(storage.root)}: {len(committed)} committed checkpoint(s)"
          + (f", {len(leftovers)} uncommitted leftover(s)" if leftovers else "")
          + (f", {len(corrupt)} corrupt" if corrupt else ""))
    if committed or leftovers or corrupt:
        rows = [
            [c["name"], c["step"], "committed", _kind_text(c), _human_bytes(c["bytes"]),
             c["files"], c["world_size"], c["created"] or "-", _metrics_text(c["metrics"])]
            for c in committed
        ]
        rows += [
            [c["name"], c["step"], c["state"].upper(), "-", _human_bytes(c["bytes"]),
             c["files"], "-", "-", c["reason"]]
            for c in sorted(leftovers + corrupt, key=lambda c: (c["step"], c["name"]))
        ]
        print(_text_table(
            ["name", "step", "state", "kind", "size", "files", "world", "created", "metrics"],
            rows,
        ))
    else:
        print("(no ckpt_<step> directories: is PATH the run's --output_dir?)")
    return 0


def _kind_text(summary: dict[str, Any]) -> str:
    """``full``, or ``delta of ckpt_<parent> (base ckpt_<b>, k deltas)``."""
    chain = summary.get("chain") or []
    if summary.get("kind") != "delta" or len(chain) < 2:
        return "full"
    return f"delta of {chain[-2]} (base {chain[0]}, {len(chain) - 1} deltas)"


def _text_table(headers: list[str], rows: list[list[Any]]) -> str:
    text = [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in text]
    return "\n".join(lines)


def _ckpt_inspect(ns: argparse.Namespace) -> int:
    from recframe.checkpoint import inspect

    storage = _open_storage(ns.path)
    own, reason = (None, None) if ns.step is not None else inspect.own_checkpoint(storage)
    if reason is not None:
        raise _CkptCommandError(reason)
    path, manifest = (storage.root, own) if own is not None else inspect.find(storage, ns.step)
    info = inspect.describe(storage, path, manifest)
    problems: Optional[list[str]] = None
    if ns.verify:
        problems = inspect.verify(storage, path, manifest, ns.threads)
        info["verify"] = {"ok": not problems, "problems": problems}
    if ns.json:
        print(json.dumps(info, indent=2))
    else:
        _print_inspect(info)
    if problems:
        for problem in problems:
            print(f"recframe: corrupt: {problem}", file=sys.stderr)
        return 1
    return 0


def _entries_text(entries: list[str], width: int = 72) -> str:
    """The first entries that fit in ``width`` characters, then how many more."""
    shown: list[str] = []
    for i, name in enumerate(entries):
        rest = len(entries) - i
        text = ", ".join(shown + [name])
        if shown and len(text) + len(f" (+{rest - 1} more)") > width:
            return ", ".join(shown) + f" (+{rest} more)"
        shown.append(name)
    return ", ".join(shown)


def _print_inspect(info: dict[str, Any]) -> None:
    print(f"checkpoint  {info['path']}")
    print(f"step        {info['step']}")
    print(f"world size  {info['world_size']}")
    print(f"created     {info['created'] or '-'}")
    print(f"recframe    {info['recframe_version']} (format {info['format_version']})")
    print(f"size        {_human_bytes(info['bytes'])} in {info['files']} files")
    print(f"kind        {_kind_text(info)}")
    if info.get("kind") == "delta":
        print(f"chain       {' -> '.join(info['chain'])} (restore replays it in order)")
        changed = info.get("changed_rows") or {}
        print(f"changed     {sum(changed.values())} rows in {len(changed)} table(s)")
    print(f"metrics     {_metrics_text(info['metrics'])}")
    for table, d in (info.get("dynamic_tables") or {}).items():
        print(f"dynamic     {table}: {d['rows_used']}/{d['dynamic_rows']} rows used (budget "
              f"{d.get('budget', '?')} with fallback), admitted {d.get('admitted', '?')}, "
              f"evicted {d.get('evicted', '?')}")
    print("\nparts")
    print(_text_table(
        ["part", "tensors", "size", "entries"],
        [[p["part"], p["tensors"], _human_bytes(p["bytes"]), _entries_text(p["entries"])]
         for p in info["parts"]],
    ))
    print("\ntensors")
    print(_text_table(
        ["key", "dtype", "shape", "size", "shards", "chunks"],
        [[t["key"], t["dtype"], "x".join(map(str, t["shape"])) or "scalar",
          _human_bytes(t["bytes"]), t["shards"], t["chunks"]] for t in info["tensors"]],
    ))
    print("\nfiles")
    print(_text_table(
        ["file", "rank", "size", "chunks"],
        [[f["name"], f["rank"], _human_bytes(f["bytes"]), f["chunks"]]
         for f in info["data_files"]] + [["manifest.json", 0, "-", "-"]],
    ))
    verify = info.get("verify")
    if verify is not None:
        if verify["ok"]:
            print("\nverify      OK: every chunk has its size and CRC32")
        else:
            print(f"\nverify      FAILED: {len(verify['problems'])} problem(s)")
            for problem in verify["problems"]:
                print(f"  {problem}")


# --- recframe export -----------------------------------------------------------------


def _export_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint as a serving artifact (one file)",
        description="Export CHECKPOINT (an output_dir: its latest checkpoint; or a ckpt_<step> "
        "directory; any fsspec path, full or incremental, any world size) to OUTPUT, one "
        "file holding the torch.export graph, its weights (tables fp32 or row-wise int8/int4) "
        "and the schema; load it with torch.export.load, no recframe needed (docs/serving.md). "
        "With --apply-delta CHECKPOINT ARTIFACT: write a newer checkpoint's changed rows "
        "into ARTIFACT without re-exporting the graph.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoint", help="output_dir or ckpt_<step> directory")
    p.add_argument("output", help="artifact file to write (with --apply-delta: to update)")
    p.add_argument("--apply-delta", dest="apply_delta", action="store_true",
                   help="update the existing artifact OUTPUT with CHECKPOINT's weights")
    p.add_argument("--to", default=None,
                   help="--apply-delta: write the updated artifact here instead of in place")
    p.add_argument("--model", default="dlrm", choices=["dlrm", "deepfm"],
                   help="the model the checkpoint was trained as")
    p.add_argument("--schema", default=None,
                   help="feature schema YAML/JSON it was trained with (default: synthetic data's)")
    p.add_argument("--num_embeddings", type=int, default=10_000,
                   help="rows per table (without --schema)")
    p.add_argument("--embedding_dim", type=int, default=16, help="table width (without --schema)")
    p.add_argument("--model_kwargs", default=None,
                   help='other model arguments as JSON, e.g. \'{"dense_arch": [128, 16]}\'')
    p.add_argument("--quantize", default="fp32", choices=["fp32", "int8", "int4"],
                   help="embedding tables: fp32, or row-wise int8 / int4 (fbgemm CPU kernels)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(ns: argparse.Namespace) -> int:
    from recframe import export as serving

    if ns.apply_delta:
        info = serving.apply_checkpoint(ns.output, ns.checkpoint, output=ns.to)
        rows = sum((info.changed_rows or {}).values())
        what = f"updated to step {info.step} ({rows} changed rows)"
    else:
        try:
            kwargs = json.loads(ns.model_kwargs) if ns.model_kwargs else None
        except json.JSONDecodeError as e:
            raise ValueError(f"--model_kwargs is not JSON: {e}") from None
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError(f"--model_kwargs must be a JSON object, got {ns.model_kwargs!r}")
        info = serving.export(ns.checkpoint, ns.output, model=ns.model, schema=ns.schema,
                              model_kwargs=kwargs, quantize=ns.quantize,
                              num_embeddings=ns.num_embeddings, embedding_dim=ns.embedding_dim)
        what = f"exported step {info.step}"
    print(f"{info.path}: {info.bytes / 2**20:.2f} MiB ({info.quantize}), {what} in "
          f"{info.seconds:.1f} s", flush=True)
    return 0


def _version() -> str:
    from recframe import __version__

    return __version__


class _Parser(argparse.ArgumentParser):
    """argparse, with an unknown flag's likely intended name: ``--trian_steps`` is
    ``unrecognized arguments: --trian_steps (did you mean --train_steps?)``."""

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        self._check_order(argv)
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}"
                       + (_expanded_glob_hint(argv, extras) or _suggestions(self, ns, extras)))
        return ns


    def _check_order(self, argv: list[str]) -> None:
        """``recframe --train_steps 5 train``: a subcommand's flag before the subcommand
        is an error saying where it goes (argparse would call the value a command)."""
        commands: dict[str, argparse.ArgumentParser] = {}
        own: set[str] = set()
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                commands = dict(action.choices)
            own.update(action.option_strings)
        command = next((t for t in argv if t in commands), None)
        if command is None:
            return
        for token in argv[:argv.index(command)]:
            flag = token.split("=", 1)[0]
            if token.startswith("-") and flag not in own and any(
                flag in a.option_strings for a in commands[command]._actions
            ):
                self.error(f"{flag} is a flag of `recframe {command}`: put it after the "
                           f"subcommand (recframe {command} {flag} ...)")


def _expanded_glob_hint(argv: list[str], extras: list[str]) -> str:
    """`` (quote the glob ...)`` when the unknown arguments are existing files that follow
    a flag's value: ``--train_path data/*.parquet`` unquoted, which the shell expanded
    into one value per file (the flag takes the first)."""
    import os

    if not all(not e.startswith("-") and os.path.exists(e) for e in extras):
        return ""
    at = next((i for i in range(1, len(argv)) if argv[i] == extras[0]), None)
    if at is None:
        return ""
    if argv[at - 1].startswith("--") and "=" in argv[at - 1]:  # --train_path=a b c
        flag, first = argv[at - 1].split("=", 1)
    elif at >= 2 and argv[at - 2].startswith("--"):
        flag, first = argv[at - 2], argv[at - 1]
    else:
        return ""
    if not os.path.exists(first):
        return ""
    ext = os.path.splitext(first)[1]
    pattern = os.path.join(os.path.dirname(first) or ".", f"*{ext}")
    return (f" (the shell expanded a glob after {flag} into {len(extras) + 1} files; quote "
            f"it, {flag} '{pattern}', or pass the directory)")


def _suggestions(parser: argparse.ArgumentParser, ns: argparse.Namespace,
                 extras: list[str]) -> str:
    """`` (did you mean --x?)`` for the unknown flags close to a flag of the command."""
    import difflib

    options: list[str] = []
    while parser is not None:
        chosen = None
        for action in parser._actions:
            options += [o for o in action.option_strings if o.startswith("--")]
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(ns, action.dest, None) or "")
        parser = chosen
    hints = []
    for token in extras:
        if token.startswith("--"):
            close = difflib.get_close_matches(token.split("=", 1)[0], options, n=1,
                                              cutoff=0.75)
            hints += [f"{token.split('=', 1)[0]} -> {close[0]}"] if close else []
    return f" (did you mean: {', '.join(hints)}?)" if hints else ""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="recframe",
        description="recframe: train recommendation models (dense + sparse optimizers, "
        "gradient accumulation, hooks, crash-proof checkpoints).",
    )
    parser.add_argument("--version", action="version", version=f"recframe {_version()}")
    _add_log_level(parser, default="INFO")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _train_parser(sub)
    _data_parser(sub)
    _ckpt_parser(sub)
    _export_parser(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    # recframe's own log at the chosen level; third-party chatter (fbgemm's library
    # loading, torchrec's planner) only from WARNING up
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("recframe").setLevel(
        getattr(logging, str(ns.log_level).upper(), logging.INFO)
    )
    if not getattr(ns, "func", None):
        parser.print_help()
        return 2
    from recframe.checkpoint.lock import WriterLockError

    try:
        return int(ns.func(ns) or 0)
    except ValueError as e:
        print(f"recframe: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # a path the user named does not exist
        print(f"recframe: error: {_not_found_text(ns, e)}", file=sys.stderr)
        return 2
    except (OutputDirError, FactoryError, WriterLockError) as e:  # e.g. a second job
        print(f"recframe: error: {e}", file=sys.stderr)
        return 1


def _not_found_text(ns: argparse.Namespace, error: FileNotFoundError) -> str:
    """A missing file as one line: which path, and for the commands that need one
    made first (``export --apply-delta``'s artifact), how to make it."""
    import os

    missing = error.filename or ""
    if getattr(ns, "command", None) == "export" and getattr(ns, "apply_delta", False):
        same = missing and os.path.abspath(str(missing)) == os.path.abspath(ns.output)
        if same or not os.path.exists(ns.output):
            return (f"recframe export --apply-delta: the artifact {ns.output} does not exist; "
                    f"--apply-delta updates an artifact that `recframe export CHECKPOINT "
                    f"{ns.output}` wrote: run that first")
    return f"{missing}: no such file or directory" if missing else str(error)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
