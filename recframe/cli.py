"""The ``recframe`` command line.

``recframe train`` trains a model of the zoo on synthetic or Criteo TSV data with every
`TrainingArguments` field as a flag (``--train_steps 100``) or from ``--config
file.yaml``; its defaults train DLRM on synthetic data in about a minute on 2 cores and
print the final evaluation.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Optional

from recframe.arguments import add_arguments, arguments_from_namespace

log = logging.getLogger("recframe")


def _train_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (DLRM on synthetic data by default)",
        description="Train a recommendation model. Every TrainingArguments field is a flag; "
        "--config reads them from YAML/JSON and flags override the file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="dlrm", choices=["dlrm", "deepfm"], help="model of the zoo")
    g.add_argument(
        "--data", default="synthetic", choices=["synthetic", "criteo"], help="training data"
    )
    g.add_argument("--train_path", default=None, help="Criteo TSV file(s) or glob (any fsspec)")
    g.add_argument("--eval_path", default=None, help="Criteo TSV file(s) for evaluation")
    g.add_argument("--batch_size", type=int, default=512, help="samples per micro-batch")
    g.add_argument(
        "--num_train_batches", type=int, default=400, help="synthetic training batches per epoch"
    )
    g.add_argument("--num_eval_batches", type=int, default=20, help="synthetic eval batches")
    g.add_argument("--num_embeddings", type=int, default=10_000, help="rows per table")
    g.add_argument("--embedding_dim", type=int, default=16, help="embedding width")
    g.add_argument("--lr", type=float, default=1e-3, help="dense (Adam) learning rate")
    g.add_argument("--sparse_lr", type=float, default=0.05, help="sparse (Adagrad) learning rate")
    add_arguments(p.add_argument_group("training arguments"))
    p.set_defaults(func=_cmd_train)


def _build_data(ns: argparse.Namespace, seed: int) -> tuple[Any, Any]:
    from recframe.data import CriteoTSVDataset, SyntheticCriteo

    if ns.data == "criteo":
        if not ns.train_path:
            raise SystemExit("recframe train --data criteo needs --train_path PATH")
        train = CriteoTSVDataset(
            ns.train_path, batch_size=ns.batch_size, num_embeddings=ns.num_embeddings
        )
        evals = (
            CriteoTSVDataset(ns.eval_path, batch_size=ns.batch_size,
                             num_embeddings=ns.num_embeddings)
            if ns.eval_path
            else None
        )
        return train, evals
    common = dict(batch_size=ns.batch_size, num_embeddings=ns.num_embeddings)
    train = SyntheticCriteo(num_batches=ns.num_train_batches, seed=seed, **common)
    # evaluation batches come from the same distribution, past the training batches
    evals = SyntheticCriteo(num_batches=ns.num_eval_batches, seed=seed + 1_000_003, **common)
    return train, evals


def _cmd_train(ns: argparse.Namespace) -> int:
    import torch

    from recframe.models import build_model
    from recframe.optim import dense_parameters, sparse_parameters
    from recframe.trainer import Trainer

    args = arguments_from_namespace(ns)
    train_data, eval_data = _build_data(ns, args.seed)
    torch.manual_seed(args.seed)
    model = build_model(
        ns.model, num_embeddings=ns.num_embeddings, embedding_dim=ns.embedding_dim
    )
    dense_opt = torch.optim.Adam(dense_parameters(model), lr=ns.lr)
    sparse_opt = torch.optim.Adagrad(sparse_parameters(model), lr=ns.sparse_lr)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        dense_optimizers=(dense_opt, None),
        sparse_optimizer=sparse_opt,
    )
    trainer.train()
    if eval_data is not None:
        results = trainer.evaluate()
        summary = {k: round(v, 4) for k, v in results.items()}
        print("final eval: " + json.dumps(summary), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recframe",
        description="recframe: train recommendation models (dense + sparse optimizers, "
        "gradient accumulation, hooks, crash-proof checkpoints).",
    )
    parser.add_argument("--log_level", default="INFO", help="python logging level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _train_parser(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(ns.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(ns, "func", None):
        parser.print_help()
        return 2
    try:
        return int(ns.func(ns) or 0)
    except ValueError as e:
        print(f"recframe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
