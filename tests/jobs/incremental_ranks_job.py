"""One rank of a 2-process (gloo, CPU) incremental-checkpoint job on torchrec sharding.

usage: RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p incremental_ranks_job.py OUT

Each rank trains a sharded DLRM (fused RowWiseAdagrad, table-wise plan: each rank owns
some tables) on its own batches, so rows of one rank's tables are updated by ids only
the other rank saw: the tracker's bitmaps must be all-reduced at save time. Saves
every update (a full one every 4 saves), then a fresh model loads each checkpoint's
model parts (``sparse``, ``dense``: a delta replays its chain, each rank applying the
rows of its own shards) and every rank checks its tables against what it had at that
step. Prints ``OK <rank> <kinds>``.

The fused optimizer's state (row-wise momentum, sharded like its table) and the dense
optimizer are restored too and checked the same way. At step 4 (3 deltas after a full
one) the ranks also write a full checkpoint of the same state under ``OUT/full`` so
that the test can restore both at another world size and compare them.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
warnings.filterwarnings("ignore")

from recframe.checkpoint import CheckpointManager, Saver  # noqa: E402
from recframe.checkpoint.format import is_sharded  # noqa: E402
from recframe.checkpoint.incremental import section  # noqa: E402
from recframe.data import SyntheticCriteo  # noqa: E402
from recframe.models import DLRM  # noqa: E402
from recframe.optim import dense_parameters  # noqa: E402
from recframe.optim.fused import shard_model  # noqa: E402

FEATURES = ["cat_0", "cat_1", "cat_2"]
ROWS = 200


def build(out: str, seed: int):
    torch.manual_seed(seed)
    model = DLRM(num_embeddings=ROWS, embedding_dim=4, dense_arch=(8, 4), over_arch=(8, 1),
                 sparse_features=FEATURES)
    dmp, sparse = shard_model(model, optimizer="rowwise_adagrad", lr=0.05)
    dense = torch.optim.Adam(dense_parameters(dmp), lr=0.01)
    saver = Saver(dmp, sparse, output_dir=out, max_keep=100)
    saver.register_for_checkpointing("dense_optimizer", dense)
    manager = CheckpointManager(saver, save_interval=1, incremental=True,
                                full_checkpoint_every=4)
    return dmp, sparse, dense, manager


def model_state(dmp) -> dict[str, torch.Tensor]:
    """This rank's local table shards and the dense parameters."""
    out = {}
    for key, value in dmp.state_dict().items():
        if is_sharded(value):
            for i, shard in enumerate(value.local_shards()):
                out[f"{key}#{i}"] = shard.tensor.clone()
        else:
            out[key] = value.clone()
    return out


def optimizer_state(sparse, dense) -> dict[str, torch.Tensor]:
    """This rank's fused optimizer state (local shards) and the dense optimizer's."""
    out = {}
    for key, value in sparse.state_dict()["state"].items():
        for name, tensor in value.items():
            if is_sharded(tensor):
                for i, shard in enumerate(tensor.local_shards()):
                    out[f"sparse/{key}/{name}#{i}"] = shard.tensor.clone()
            elif torch.is_tensor(tensor):
                out[f"sparse/{key}/{name}"] = tensor.clone()
    for i, value in dense.state_dict()["state"].items():
        for name, tensor in value.items():
            out[f"dense/{i}/{name}"] = torch.as_tensor(tensor).clone()
    return out


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dmp, sparse, dense, manager = build(out, 0)
    data = list(SyntheticCriteo(num_batches=2 * 6, batch_size=16, num_embeddings=ROWS,
                                num_sparse=3, ids_per_feature=(1, 3), seed=4, rank=rank,
                                world_size=world))
    expected = {}
    dmp.train()
    for step, batch in enumerate(data[:6], start=1):
        dense.zero_grad()
        sparse.zero_grad()
        dmp(batch).backward()
        dense.step()
        sparse.step()
        manager.step(step)
        expected[step] = {**model_state(dmp), **optimizer_state(sparse, dense)}
        if step == 4:  # the end of a chain of 3 deltas, as a full checkpoint
            full = Saver(dmp, sparse, output_dir=os.path.join(out, "full"))
            full.register_for_checkpointing("dense_optimizer", dense)
            full.save(step)
    kinds = [section(c.manifest)["kind"] for c in manager.list()]
    assert kinds == ["full", "delta", "delta", "delta", "full", "delta"], kinds
    assert len(manager.tracker.bits) == len(FEATURES)  # every table is tracked
    changed = section(manager.list()[1].manifest)["changed_rows"]
    assert len(changed) == len(FEATURES) and 0 < sum(changed.values()) < len(FEATURES) * ROWS
    mine = [k for k in expected[6] if "embedding_bags" in k and not k.startswith("sparse/")]
    assert any(k.startswith("sparse/") for k in expected[6]), "no fused optimizer state"
    assert mine, "this rank holds no table shard"
    for step in (3, 4, 6):
        dmp2, _, _, manager2 = build(out, 1 + step)  # other initial values
        sparse2, dense2 = manager2.saver.sparse_optimizer, manager2.saver._extra["dense_optimizer"]
        manager2.saver.load(ckpt_id=step)
        got = {**model_state(dmp2), **optimizer_state(sparse2, dense2)}
        assert got.keys() == expected[step].keys()
        for key in got:
            assert torch.equal(got[key], expected[step][key]), (rank, step, key)
    print(f"OK {rank} {','.join(kinds)} {len(mine)}", flush=True)


if __name__ == "__main__":
    main()
