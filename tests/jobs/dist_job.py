"""Multi-process jobs for tests/test_distributed.py: one process per rank, gloo on
loopback (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the test, or by torchrun).

usage: dist_job.py MODE OUT_DIR [--ckpt DIR] [--steps N]

Modes:
  train   accumulation under DDP (k=2 on half batches equals k=1), ranks with uneven
          data stop together (sized and unsized datasets), eval over all ranks, then a
          Trainer run that checkpoints into --ckpt (async saves: the commit protocol
          runs in a background thread); each rank writes its result JSON
          and its local tensors (``r<rank>.npz``) to OUT_DIR.
  restore restore the latest checkpoint of --ckpt, dump the local tensors.
  sigterm rank 1 alone receives SIGTERM after update 3: both ranks must save at the
          same step (4, where they agree) and stop there.
  kill    train with save_steps=2; rank 1 SIGKILLs itself in the middle of writing the
          step-4 checkpoint (or, with --how raise, its write fails); the ranks left
          record the error they got.

Tensors are dumped without pickle (numpy .npz): ``<part>/<name>|<offsets>``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

import numpy as np
import torch

FEATURES = ["cat_0", "cat_1", "cat_2", "cat_3"]
ROWS = 48


def build(output_dir: str, steps: int, accum: int = 1, batch_size: int = 16,
          save_steps: int = 2, sharding: Any = "mixed", num_batches: int = 12,
          timeout: float = 60.0, async_save: bool = False) -> Any:
    """A DLRM trainer with fused sharded tables (table_wise and row_wise)."""
    from recframe import Trainer, TrainingArguments, distributed
    from recframe.data import SyntheticCriteo
    from recframe.models import DLRM
    from recframe.optim import dense_parameters
    from recframe.optim.fused import shard_model

    torch.manual_seed(0)
    model = DLRM(num_embeddings=ROWS, embedding_dim=4, dense_arch=(8, 4), over_arch=(8, 1),
                 sparse_features=FEATURES)
    dmp, sparse = shard_model(model, optimizer="rowwise_adagrad", lr=0.05, sharding=sharding)
    dense = torch.optim.Adam(dense_parameters(dmp), lr=0.01)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    data = SyntheticCriteo(num_batches=num_batches, batch_size=batch_size, num_embeddings=ROWS,
                           num_sparse=len(FEATURES), ids_per_feature=(1, 3), seed=3,
                           rank=rank, world_size=world)
    args = TrainingArguments(output_dir=output_dir, train_steps=steps,
                             gradient_accumulation_steps=accum, save_steps=save_steps,
                             report_to="none", disable_tqdm=True, log_steps=1000,
                             save_commit_timeout=timeout, max_to_keep=10,
                             async_save=async_save)
    trainer = Trainer(model=dmp, args=args, train_dataset=data, dense_optimizers=(dense, None),
                      sparse_optimizer=sparse)
    return trainer


def local_tensors(trainer: Any) -> dict[str, np.ndarray]:
    """This rank's model, sparse optimizer and dense optimizer tensors."""
    from recframe.checkpoint.format import encode_tree, is_sharded

    out: dict[str, np.ndarray] = {}

    def add(part: str, tree: Any) -> None:
        flat: dict[str, Any] = {}
        encode_tree(tree, part, flat)
        for key, value in flat.items():
            if is_sharded(value):
                for shard in value.local_shards():
                    offsets = ",".join(map(str, shard.metadata.shard_offsets))
                    out[f"{key}|{offsets}|{','.join(map(str, value.size()))}"] = (
                        shard.tensor.detach().clone().numpy())
            else:
                out[f"{key}|full|"] = value.detach().clone().numpy()

    add("model", trainer.model.state_dict())
    sparse_state = trainer.sparse_optimizer.optimizer.state_dict()
    add("sparse_opt", sparse_state["state"])
    dense_state = trainer.dense_optimizer.optimizer.state_dict()
    add("dense_opt", dense_state["state"])
    return out


class _Sized:
    """A list of batches (has len())."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        return iter(self.batches)


class _Unsized:
    """The same batches without len(): the ranks agree every dist_sync_steps."""

    def __init__(self, batches: list[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)


def _uneven(out: str, rank: int) -> dict[str, Any]:
    """Rank r has 5 + 2r batches; every rank must stop after 5 updates."""
    from recframe import Trainer, TrainingArguments
    from recframe.data import SyntheticCriteo

    results = {}
    for name, wrap in (("sized", _Sized), ("unsized", _Unsized)):
        trainer = build(os.path.join(out, f"uneven-{name}"), steps=100)
        source = SyntheticCriteo(num_batches=40, batch_size=8, num_embeddings=ROWS,
                                 num_sparse=len(FEATURES), seed=5, rank=rank, world_size=2)
        batches = [b for _, b in zip(range(5 + 2 * rank), source)]
        args = TrainingArguments(output_dir=os.path.join(out, f"uneven-{name}"), train_epoch=1,
                                 save_steps=0, report_to="none", disable_tqdm=True,
                                 dist_sync_steps=2)
        uneven = Trainer(model=trainer.model, args=args, train_dataset=wrap(batches),
                         dense_optimizers=(trainer.dense_optimizer.optimizer, None),
                         sparse_optimizer=trainer.sparse_optimizer.optimizer)
        uneven.train()
        results[name] = uneven.global_step
    return results


def _accumulation(out: str) -> dict[str, float]:
    """k=1 on batches of 16 vs k=2 on the halves: the same updates under DDP."""
    a = build(os.path.join(out, "acc-1"), steps=3, accum=1, batch_size=16, save_steps=0)
    b = build(os.path.join(out, "acc-2"), steps=3, accum=2, batch_size=8, num_batches=24,
              save_steps=0)
    # the same samples: batch i of size 16 is micro-batches 2i, 2i+1 of size 8 (B's
    # data is built from A's by splitting each batch)
    from recframe.data import split_batch

    a_batches = list(a.train_dataset)
    b.train_dataset = _Sized([half for batch in a_batches for half in split_batch(batch, 2)])
    a.train_dataset = _Sized(a_batches)
    counts = [_count_allreduces(a), _count_allreduces(b)]
    a.train()
    b.train()
    ta, tb = local_tensors(a), local_tensors(b)
    diffs = {}
    for key in ta:
        if key.startswith(("model.", "sparse_opt.")):
            diffs[key] = float(np.abs(ta[key] - tb[key]).max()) if ta[key].size else 0.0
    return {"max_diff": max(diffs.values()), "compared": len(diffs),
            "allreduces": [c[0] for c in counts]}


def _count_allreduces(trainer: Any) -> list[int]:
    """Count the gradient all-reduces of the DDP module inside torchrec's DMP."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    count = [0]

    def hook(state, bucket):  # no annotations: DDP checks them against real types
        count[0] += 1
        return allreduce_hook(state, bucket)

    trainer.model._dmp_wrapped_module.register_comm_hook(None, hook)
    return count


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "restore", "kill", "sigterm"])
    p.add_argument("out")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--how", choices=["kill", "raise"], default="kill",
                   help="kill: rank 1 SIGKILLs itself mid-save; raise: its write fails")
    ns = p.parse_args()
    torch.set_num_threads(1)
    from recframe import distributed

    distributed.init_default_group(timeout=120)
    rank = distributed.get_rank()
    result: dict[str, Any] = {"rank": rank, "world_size": distributed.get_world_size()}
    if ns.mode == "train":
        result["accumulation"] = _accumulation(ns.out)
        result["uneven_steps"] = _uneven(ns.out, rank)
        trainer = build(ns.ckpt, steps=ns.steps, async_save=True)  # commits from a thread
        result["plan"] = {
            name: sharding.sharding_type
            for module_plan in trainer.model.plan.plan.values()
            for name, sharding in module_plan.items()
        }
        trainer.train()
        from recframe.data import SyntheticCriteo

        evals = SyntheticCriteo(num_batches=4, batch_size=8, num_embeddings=ROWS,
                                num_sparse=len(FEATURES), seed=9, rank=rank, world_size=2)
        trainer.eval_dataset = evals
        result["eval"] = trainer.evaluate()
        result["global_step"] = trainer.global_step
        np.savez(os.path.join(ns.out, f"r{rank}.npz"), **local_tensors(trainer))
    elif ns.mode == "sigterm":
        from recframe import Hook

        class TermAt(Hook):
            """Rank 1 alone gets SIGTERM (a preemption notice) after update 3."""

            def after_step(self, trainer: Any, metrics: Any) -> None:
                if rank == 1 and trainer.global_step == 3:
                    os.kill(os.getpid(), signal.SIGTERM)

        trainer = build(ns.ckpt, steps=ns.steps, save_steps=0)
        trainer.args.dist_sync_steps = 2
        trainer.checkpoint_manager.agree_every = 2
        trainer.add_hook(TermAt())
        trainer.train()
        result["global_step"] = trainer.global_step
        result["preempted"] = trainer.checkpoint_manager.preemption_requested
    elif ns.mode == "restore":
        trainer = build(ns.ckpt, steps=1)
        result["restored_step"] = trainer.restore()
        np.savez(os.path.join(ns.out, f"r{rank}.npz"), **local_tensors(trainer))
    else:
        from recframe.checkpoint.saver import Saver

        original = Saver._write_rank

        def write_then_die(self: Any, state: Any, directory: str, r: int) -> Any:
            written = original(self, state, directory, r)
            if r == 1 and "ckpt_4" in directory:
                if ns.how == "raise":
                    raise OSError(28, "No space left on device (injected)")
                os.kill(os.getpid(), signal.SIGKILL)  # mid-save: shards written, no report
            return written

        Saver._write_rank = write_then_die  # type: ignore[method-assign]
        trainer = build(ns.ckpt, steps=ns.steps, timeout=ns.timeout)
        started = time.monotonic()
        try:
            trainer.train()
            result["error"] = None
        except Exception as e:  # noqa: BLE001 - the test checks the message
            result["error"] = f"{type(e).__name__}: {e}"
        result["seconds_to_error"] = time.monotonic() - started
        result["global_step"] = trainer.global_step
        with open(os.path.join(ns.out, f"result-r{rank}.json"), "w") as f:
            json.dump(result, f)
        os._exit(0)  # the peer is gone: skip the process group's teardown
    with open(os.path.join(ns.out, f"result-r{rank}.json"), "w") as f:
        json.dump(result, f)
    leave_group(ns.out, rank)


def leave_group(out: str, rank: int) -> None:
    """Destroy the process group; then rank 0, which hosts the rendezvous store here
    (torchrun would host it in its agent), waits until every rank has left: a store
    host that exits while a peer still tears down aborts that peer. Ends the process
    (exit status 0): call it last, once the job's results are written."""
    import torch.distributed as dist

    from recframe import distributed

    world = distributed.get_world_size()
    distributed.barrier()
    dist.destroy_process_group()
    tag = os.environ.get("MASTER_PORT", "0")
    open(os.path.join(out, f"left-{tag}-r{rank}"), "w").close()
    if rank == 0:
        deadline = time.monotonic() + 60
        others = [os.path.join(out, f"left-{tag}-r{r}") for r in range(1, world)]
        while not all(map(os.path.exists, others)) and time.monotonic() < deadline:
            time.sleep(0.02)
    # the results are written and the group is gone: exit without the interpreter's and
    # the C++ runtime's teardown, where a gloo/store thread still being torn down can
    # abort the process ("terminate called without an active exception", seen in CI)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
