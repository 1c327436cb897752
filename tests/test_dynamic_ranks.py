"""Dynamic tables on 2 gloo ranks (torchrec row-wise sharding, fused optimizer): the map
is replicated (every rank commits every rank's ids, so the maps stay equal and hold
both ranks' ids), and the checkpoint restores in one process (2 -> 1); an incremental
chain (full + deltas) restores bit-identical on 2 ranks and in one process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_distributed import JOBS, _check_ok, _env, _free_port, _load_npz  # noqa: E402

JOB = JOBS / "dynamic_job.py"
TIMEOUT = 240


def _launch(out: Path, ckpt: Path, world: int = 2, *extra: str) -> list:
    import subprocess

    port = str(_free_port())
    procs = [subprocess.Popen(
        [sys.executable, str(JOB), str(out), str(ckpt), *extra],
        env=_env({"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                  "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": port}),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    results = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=TIMEOUT)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.fixture()
def job():
    sys.path.insert(0, str(JOBS))
    try:
        import dynamic_job

        yield dynamic_job
    finally:
        sys.path.remove(str(JOBS))


def test_two_ranks_replicate_the_map_and_restore_in_one_process(tmp_path, job) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    _check_ok(_launch(out, ckpt))
    r0, r1 = _load_npz(out / "r0.npz"), _load_npz(out / "r1.npz")
    maps = sorted(k for k in r0 if k.startswith("map."))
    for key in maps:  # replicated: equal on both ranks
        np.testing.assert_array_equal(r0[key], r1[key], err_msg=key)
    held = set(r0["map.ids"][r0["map.used"]].tolist())
    ids = [set(json.loads((out / f"result-r{r}.json").read_text())["ids"]) for r in (0, 1)]
    assert held & ids[0] and held & ids[1]  # admitted ids from both ranks' data
    assert int(r0["map.totals"][1]) > 0  # eviction ran
    shards = {int(k.split("|")[1]): v for d in (r0, r1) for k, v in d.items()
              if k.startswith("weight|")}
    table = np.concatenate([shards[o] for o in sorted(shards)])
    assert table.shape == (24, 4) and len(shards) == 2  # row-wise: one shard per rank

    # 2 -> 1: one process restores the 2-rank checkpoint: the same map and table
    model, dmp, trainer = job.build(str(ckpt), job.STEPS, 0)
    assert trainer.restore() == job.STEPS
    restored = job.dump(model, dmp)
    for key in maps:
        np.testing.assert_array_equal(restored[key], r0[key], err_msg=key)
    np.testing.assert_array_equal(restored["weight|0"], table)
    assert torch.equal(model.dynamic.maps["user"].lookup(
        torch.tensor(sorted(held)), False), torch.tensor(
        [int(np.flatnonzero((r0["map.ids"] == i) & r0["map.used"])[0]) + 4
         for i in sorted(held)]))


def _whole(dumps: list[dict], name: str) -> np.ndarray:
    """A row-wise sharded tensor put together from the ranks' ``name|offset`` shards."""
    shards = {int(k.split("|")[1]): v for d in dumps for k, v in d.items()
              if k.startswith(name + "|")}
    return np.concatenate([shards[o] for o in sorted(shards)])


def test_two_ranks_incremental_chain_restores_bit_identical_on_two_ranks_and_one(
        tmp_path, job) -> None:
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    _check_ok(_launch(out, ckpt, 2, "incremental"))
    manifests = {int(p.parent.name.split("_")[1]): json.loads(p.read_text())
                 for p in ckpt.glob("ckpt_*/manifest.json")}
    kinds = [manifests[s]["incremental"]["kind"] for s in sorted(manifests)]
    assert kinds[-1] == "delta" and "full" in kinds  # the newest is a delta of a chain
    live = [_load_npz(out / f"r{r}.npz") for r in (0, 1)]
    assert int(live[0]["map.totals"][0]) > 0 and int(live[0]["map.totals"][1]) > 0
    for r in (0, 1):  # each rank restored the chain into a fresh model: bit-identical
        restored = _load_npz(out / f"restored-r{r}.npz")
        assert restored.keys() == live[r].keys()
        for key in live[r]:
            np.testing.assert_array_equal(restored[key], live[r][key], err_msg=f"r{r} {key}")

    # 2 -> 1: one process restores the 2-rank chain: the same map, table and momentum
    model, dmp, trainer = job.build(str(ckpt), job.STEPS, 0, incremental=True, seed=2)
    assert trainer.restore() == job.STEPS
    one = job.dump(model, dmp, trainer.sparse_optimizer.optimizer)
    for key in (k for k in live[0] if k.startswith("map.")):
        np.testing.assert_array_equal(one[key], live[0][key], err_msg=key)
    for name in ("weight", "momentum"):
        np.testing.assert_array_equal(_whole([one], name), _whole(live, name), err_msg=name)
