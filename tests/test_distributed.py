"""Several processes (gloo on loopback): training under DDP with torchrec-sharded tables,
checkpoints across ranks and restore at another world size, a rank killed mid-save,
and the CLI under torchrun.

Each multi-process test launches 2 processes (tests/jobs/dist_job.py, or torchrun) with
small models and a few steps; every launch is bounded by a timeout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
JOBS = Path(__file__).resolve().parent / "jobs"
JOB = JOBS / "dist_job.py"
LAUNCH_TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    for key in ("TORCHELASTIC_RUN_ID", "GROUP_RANK"):
        env.pop(key, None)
    return env


def _launch(mode: str, out: Path, ckpt: Path, *extra: str, world: int = 2
            ) -> list[subprocess.CompletedProcess]:
    """Run dist_job.py MODE on ``world`` processes; returns each one's result."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = _env({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                    "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port})
        procs.append(subprocess.Popen(
            [sys.executable, str(JOB), mode, str(out), "--ckpt", str(ckpt), *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    results = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=LAUNCH_TIMEOUT)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def _check_ok(results: list[subprocess.CompletedProcess]) -> None:
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank} exited {r.returncode}:\n{r.stdout[-4000:]}"


def _result(out: Path, rank: int) -> dict:
    return json.loads((out / f"result-r{rank}.json").read_text())


def _assemble(dumps: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Whole tensors from the ranks' local shards (``name|offsets|size`` keys);
    replicated tensors must be equal on every rank (DDP keeps dense state in step)."""
    whole: dict[str, np.ndarray] = {}
    for dump in dumps:
        for key, value in dump.items():
            name, offsets, size = key.split("|")
            if offsets == "full":
                if name in whole:
                    np.testing.assert_array_equal(whole[name], value, err_msg=name)
                whole[name] = value
                continue
            shape = [int(s) for s in size.split(",")]
            target = whole.setdefault(name, np.full(shape, np.nan, dtype=value.dtype))
            index = tuple(slice(int(o), int(o) + n)
                          for o, n in zip(offsets.split(","), value.shape))
            target[index] = value
    return whole


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert not np.isnan(a[key]).any() if a[key].dtype.kind == "f" else True, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def dist_jobs():
    """Lazily imported tests/jobs/dist_job.py (its builders run in this process too)."""
    sys.path.insert(0, str(JOBS))
    try:
        import dist_job

        yield dist_job
    finally:
        sys.path.remove(str(JOBS))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_two_ranks_train_save_and_reshard_2_to_1_to_2(tmp_path, dist_jobs):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    _check_ok(_launch("train", out, ckpt, "--steps", "6"))
    r0, r1 = _result(out, 0), _result(out, 1)

    # tables sharded by torchrec's planner: both table-wise and row-wise
    assert sorted(set(r0["plan"].values())) == ["row_wise", "table_wise"]
    assert r0["plan"] == r1["plan"]
    # gradient accumulation under DDP is exact (k=2 on half batches == k=1), and the
    # dense gradients are all-reduced once per update, not per micro-batch (no_sync)
    for r in (r0, r1):
        assert r["accumulation"]["compared"] >= 12
        assert r["accumulation"]["max_diff"] < 1e-6
        updates, windows = r["accumulation"]["allreduces"]
        assert updates == windows >= 3
    # rank r has 5 + 2r batches: both stop after 5, with or without len()
    assert r0["uneven_steps"] == r1["uneven_steps"] == {"sized": 5, "unsized": 5}
    # eval metrics over both ranks' samples (4 batches of 8, 2 per rank), same everywhere
    assert r0["eval"]["num_samples"] == 32
    assert r0["eval"] == r1["eval"]
    assert r0["global_step"] == r1["global_step"] == 6

    # the checkpoints (saved in the background): each rank wrote its own shard files
    assert sorted(p.name for p in ckpt.iterdir()) == ["ckpt_2", "ckpt_4", "ckpt_6",
                                                     "run_config.json"]
    manifest = json.loads((ckpt / "ckpt_6" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert {f["rank"] for f in manifest["files"].values()} == {0, 1}

    trained = _assemble([_load_npz(out / "r0.npz"), _load_npz(out / "r1.npz")])
    assert any(k.startswith("sparse_opt") for k in trained)

    # 2 -> 1: one process (the planner's own single-process plan) restores the same
    # model, sparse optimizer (moments of table-wise and row-wise shards) and dense
    # optimizer state
    single = dist_jobs.build(str(ckpt), steps=7, sharding=None)
    assert single.restore() == 6
    _assert_same(_assemble([dist_jobs.local_tensors(single)]), trained)
    single.train()  # one more update at world size 1; its final checkpoint is ckpt_7
    after = _assemble([dist_jobs.local_tensors(single)])
    assert json.loads((ckpt / "ckpt_7" / "manifest.json").read_text())["world_size"] == 1

    # 1 -> 2: two ranks restore exactly what the single process saved
    back = tmp_path / "back"
    back.mkdir()
    _check_ok(_launch("restore", back, ckpt))
    assert _result(back, 0)["restored_step"] == _result(back, 1)["restored_step"] == 7
    _assert_same(_assemble([_load_npz(back / "r0.npz"), _load_npz(back / "r1.npz")]), after)


def test_rank_killed_mid_save_leaves_no_commit(tmp_path, dist_jobs):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    results = _launch("kill", out, ckpt, "--steps", "6", "--timeout", "8")
    assert results[1].returncode == -9, results[1].stdout[-3000:]  # SIGKILLed in its save
    assert results[0].returncode == 0, results[0].stdout[-3000:]
    error = _result(out, 0)["error"]
    assert error is not None and "CheckpointError" in error
    assert "ckpt_4 was not committed" in error and "rank(s) [1]" in error
    assert _result(out, 0)["global_step"] == 4  # rank 0 stopped at the failed save

    assert (ckpt / "ckpt_2" / "manifest.json").exists()
    assert not (ckpt / "ckpt_4").exists()
    assert not (ckpt / "ckpt_4.staging" / "manifest.json").exists()

    # the previous checkpoint restores (here in one process)
    trainer = dist_jobs.build(str(ckpt), steps=3, sharding=None)
    assert trainer.restore() == 2
    assert trainer.global_step == 2
    assert not trainer.saver.uncommitted()  # the manager cleaned the leftover


def test_rank_whose_write_fails_stops_the_commit_at_once(tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    # a long timeout: rank 0 learns of the failure from rank 1's report, not by waiting
    _check_ok(_launch("kill", out, ckpt, "--steps", "6", "--timeout", "600",
                      "--how", "raise"))
    error0, error1 = _result(out, 0)["error"], _result(out, 1)["error"]
    assert "ckpt_4 was not committed" in error0
    assert "rank 1 failed to write: OSError(28, 'No space left on device (injected)')" in error0
    assert error1.startswith("OSError") and "injected" in error1
    assert (ckpt / "ckpt_2" / "manifest.json").exists()
    assert not (ckpt / "ckpt_4").exists()


def test_sigterm_on_one_rank_saves_and_stops_all_at_the_same_step(tmp_path):
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    _check_ok(_launch("sigterm", out, ckpt, "--steps", "8"))
    for rank in (0, 1):
        result = _result(out, rank)
        # SIGTERM after update 3 on rank 1 only; the ranks agree every 2 updates
        assert result["global_step"] == 4 and result["preempted"] is True
    assert sorted(p.name for p in ckpt.iterdir()) == ["ckpt_4", "run_config.json"]
    assert json.loads((ckpt / "ckpt_4" / "manifest.json").read_text())["world_size"] == 2


def test_cli_under_torchrun_then_single_process_resumes(tmp_path):
    out = tmp_path / "run"
    common = ["train", "--output_dir", str(out), "--num_train_batches", "16",
              "--num_eval_batches", "4", "--batch_size", "32", "--num_embeddings", "100",
              "--save_steps", "2", "--report_to", "none", "--disable_tqdm", "true",
              "--log_steps", "2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "recframe"]
    run = subprocess.run(
        torchrun + common + ["--train_steps", "4", "--sharding", "mixed",
                             "--gradient_accumulation_steps", "2"],
        env=_env({}), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    # rank 0 alone logs and prints; the eval covers both ranks' samples
    assert run.stdout.count("final eval:") == 1
    summary = json.loads(run.stdout.split("final eval:", 1)[1].splitlines()[0])
    assert summary["num_samples"] == 4 * 32
    assert run.stderr.count("step=2 epoch=0") == 1
    manifest = json.loads((out / "ckpt_4" / "manifest.json").read_text())
    assert manifest["world_size"] == 2

    single = subprocess.run(
        [sys.executable, "-m", "recframe"] + common + ["--train_steps", "6"],
        env=_env({}), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
    )
    assert single.returncode == 0, single.stderr[-5000:]
    assert f"resumed from {out}/ckpt_4 (global_step=4" in single.stderr
    assert "saved by 2 ranks, this run has 1" in single.stderr
    assert json.loads((out / "ckpt_6" / "manifest.json").read_text())["world_size"] == 1


# --- single-process pieces of the multi-process path ----------------------------------
class _Counting:
    """A stateful dataset of n integers (position: how many were read)."""

    def __init__(self, n: int) -> None:
        self.n, self.pos = n, 0

    def __iter__(self):
        while self.pos < self.n:
            self.pos += 1
            yield self.pos - 1

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


@pytest.mark.parametrize("prefetch", [1, 3])
def test_batch_stream_limit_stops_at_the_agreed_count_and_drains(prefetch):
    from recframe.device import resolve_device
    from recframe.pipeline import BatchStream

    data = _Counting(7)
    stream = BatchStream(data, resolve_device("cpu"), prefetch, limit=4)
    items = list(stream)
    assert [i.batch for i in items] == [0, 1, 2, 3]
    assert [i.is_last for i in items] == [False, False, False, True]
    assert stream.dropped == 3 and data.pos == 7  # the pass was read to its end
    assert [i.position for i in items[:3]] == [{"pos": 1}, {"pos": 2}, {"pos": 3}]
    assert list(BatchStream(_Counting(3), resolve_device("cpu"), 1, limit=0)) == []


@pytest.mark.parametrize("n,every", [(7, 2), (6, 2), (1, 4), (0, 3), (5, 1)])
@pytest.mark.parametrize("cap", [None, 3])
def test_batch_stream_sync_every_marks_the_last_batch(n, every, cap):
    from recframe.device import resolve_device
    from recframe.pipeline import BatchStream

    data = _Counting(n)
    items = list(BatchStream(data, resolve_device("cpu"), 1, limit=cap, sync_every=every,
                             drain=False))
    expected = n if cap is None else min(n, cap)
    assert [i.batch for i in items] == list(range(expected))
    assert [i.is_last for i in items] == [k == expected - 1 for k in range(expected)]
    assert data.pos <= expected + every + 1  # read ahead at most a window, never drained


def test_shard_model_sharding_argument_is_checked():
    from recframe.optim.fused import _allowed_shardings

    tables = ["a", "b", "c"]
    assert _allowed_shardings(tables, "mixed", 2) == {
        "a": ["table_wise"], "b": ["row_wise"], "c": ["table_wise"]}
    assert "column_wise" not in _allowed_shardings(tables, None, 2)["a"]
    assert _allowed_shardings(tables, {"b": "row_wise"}, 2)["b"] == ["row_wise"]
    with pytest.raises(ValueError, match="choose from"):
        _allowed_shardings(tables, "rows", 2)
    with pytest.raises(ValueError, match=r"unknown table\(s\) \['z'\]"):
        _allowed_shardings(tables, {"z": ["row_wise"]}, 2)
    with pytest.raises(ValueError, match="non-empty list"):
        _allowed_shardings(tables, {"a": []}, 2)


def test_saver_commit_timeout_is_checked():
    from recframe.checkpoint import Saver

    with pytest.raises(ValueError, match="commit_timeout"):
        Saver(torch.nn.Linear(2, 2), commit_timeout=0)
