"""The multi-rank commit protocol: a rank whose state cannot be collected tells the
others at once; store keys are fresh per `Saver` and never drawn from torch's seeded
generator; a second `Saver` in the same process group never reads the first one's
answers."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from conftest import ToyCTR

from recframe import distributed
from recframe.checkpoint import Saver


class FakeStore:
    """An in-memory stand-in for torchrun's key-value store."""

    def __init__(self):
        self.kv = {}

    def set(self, k, v):
        self.kv[k] = v if isinstance(v, bytes) else v.encode()

    def get(self, k):
        return self.kv[k]

    def wait(self, keys, timeout):
        if not all(k in self.kv for k in keys):
            raise RuntimeError("timeout")

    def check(self, keys):
        return all(k in self.kv for k in keys)

    def delete_key(self, k):
        self.kv.pop(k, None)


class Broken:
    def state_dict(self): raise RuntimeError("io state of this rank is broken")
    def load_state_dict(self, s): pass


@pytest.mark.parametrize("rank", [0, 1])
def test_collect_state_failure_is_published(tmp_path, monkeypatch, rank):
    store = FakeStore()
    monkeypatch.setattr(distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "get_rank", lambda: rank)
    monkeypatch.setattr(distributed, "store", lambda: store)
    saver = Saver(ToyCTR(num_embeddings=10, dim=4), output_dir=str(tmp_path), commit_timeout=1)
    saver._token = "tok"
    saver.register_io_state("data", Broken())
    if rank == 1:
        store.set("recframe/ckpt/tok/1/ckpt_5/staged", b"ok")
    with pytest.raises(RuntimeError, match="broken"):
        saver.save(5)
    key = "recframe/ckpt/tok/1/ckpt_5/" + ("commit" if rank == 0 else "written/1")
    assert key in store.kv, f"rank {rank} failed silently (the others wait the timeout): {store.kv}"


@pytest.fixture
def group():
    distributed.init_default_group()  # the process's gloo world of one


def test_run_token_is_fresh_per_run_even_with_the_same_seed(group, tmp_path):
    # two attempts of a torchrun job (same seed, or same RNG state restored from the
    # same checkpoint) must not share store keys
    torch.manual_seed(1234)
    a = Saver(ToyCTR(num_embeddings=10, dim=4), output_dir=str(tmp_path))._run_token()
    torch.manual_seed(1234)
    b = Saver(ToyCTR(num_embeddings=10, dim=4), output_dir=str(tmp_path))._run_token()
    assert a != b, f"both attempts use store keys recframe/ckpt/{a}/<seq>/<name>"


def test_run_token_does_not_consume_the_training_rng(group, tmp_path):
    saver = Saver(ToyCTR(num_embeddings=10, dim=4), output_dir=str(tmp_path))
    torch.manual_seed(0)
    before = torch.get_rng_state().clone()
    saver._run_token()  # what prepare_distributed / the first group save call
    assert torch.equal(before, torch.get_rng_state()), \
        "the first save of a run advances torch's global RNG (resumed runs diverge)"

# Two Savers in the same 2-rank process group (e.g. a second Trainer in the same
# job, both seeded the same): the second one's first save reuses the first one's store
# keys (same token, seq restarts at 1, name ckpt_1): rank 1 reads the stale answers.


def _worker(rank, port, out, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from conftest import ToyCTR

    from recframe.checkpoint import Saver
    dist.init_process_group("gloo", rank=rank, world_size=2)
    res = {}
    # run A: rank 0 cannot write (e.g. disk full) -> no commit
    torch.manual_seed(0)
    a = Saver(ToyCTR(num_embeddings=10, dim=4), output_dir=f"{out}/A", commit_timeout=20)
    if rank == 0:
        def boom(*args, **kw):
            raise OSError("disk full")
        a._write_rank = boom
    try:
        a.save(1)
        res["A"] = "ok"
    except Exception as e:
        res["A"] = f"error: {e}"[:200]
    dist.barrier()
    # run B (same process group, same seed), another output dir: everything works
    torch.manual_seed(0)
    b = Saver(ToyCTR(num_embeddings=10, dim=4), output_dir=f"{out}/B", commit_timeout=20)
    res["token_equal"] = a._token == b._token if rank == 0 else None
    try:
        b.save(1)
        res["B"] = "ok"
    except Exception as e:
        res["B"] = f"error: {e}"[:300]
    dist.barrier()
    res["B_committed"] = os.path.exists(f"{out}/B/ckpt_1/manifest.json")
    results[rank] = json.dumps(res)
    dist.destroy_process_group()
    # rank 0 hosts the store: it leaves last (a host exiting under a peer's teardown
    # aborts the peer)
    results[f"left{rank}"] = True
    deadline = time.monotonic() + 60
    while rank == 0 and "left1" not in results and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_second_saver_in_the_same_group_never_reads_stale_keys(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mgr = mp.Manager()
    results = mgr.dict()
    mp.spawn(_worker, args=(port, str(tmp_path), results), nprocs=2, join=True)
    r0, r1 = json.loads(results[0]), json.loads(results[1])
    assert r0["B"] == "ok" and r0["B_committed"]
    assert r1["B"] == "ok", f"rank 1 got a stale answer of run A: {r1['B']}"
