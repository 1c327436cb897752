"""Exact resume: N steps in one run equal k steps, SIGKILL, and the same command again,
bit for bit, with dense and sparse optimizers, with and without accumulation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

JOB = os.path.join(os.path.dirname(__file__), "jobs", "resume_job.py")


def run_job(out, result, *extra, expect_kill=False):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, JOB, str(out), str(result), *map(str, extra)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def load(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize(
    "model,opt,accum,asynchronous,incremental",
    [("toy", "adam", 1, False, False), ("toy", "adam", 3, False, False),
     ("toy", "sgd", 2, True, False), ("dlrm", "adagrad", 1, False, False),
     ("dlrm", "adam", 2, True, False),
     # incremental checkpoints: ckpt_2 full, ckpt_4 a delta (restored from its chain)
     ("toy", "adam", 1, False, True), ("toy", "sgd", 2, True, True),
     ("dlrm", "adagrad", 1, False, True)],
)
def test_sigkill_and_rerun_is_bitwise_identical(tmp_path, model, opt, accum, asynchronous,
                                                incremental):
    steps, kill_at = 9, 5
    common = ["--steps", steps, "--accum", accum, "--model", model, "--opt", opt]
    if asynchronous:
        common.append("--async-save")
    if incremental:
        common.append("--incremental")
    run_job(tmp_path / "straight", tmp_path / "a.npz", *common)
    run_job(tmp_path / "resumed", tmp_path / "unused.npz", *common, "--kill-at", kill_at,
            expect_kill=True)
    assert not (tmp_path / "unused.npz").exists()
    if incremental:
        kinds = {}
        for name in ("ckpt_2", "ckpt_4"):
            path = tmp_path / "resumed" / name / "manifest.json"
            if path.exists():
                kinds[name] = json.loads(path.read_text())["incremental"]["kind"]
        assert kinds.get("ckpt_2") == "full"
        assert kinds.get("ckpt_4", "delta") == "delta"  # (async: may not have committed)
        assert "ckpt_4" in kinds or asynchronous
    proc = run_job(tmp_path / "resumed", tmp_path / "b.npz", *common)
    assert "resumed from" in proc.stderr
    # (an async save of step 4 may still have been writing when the kill came: then the
    # rerun resumes from step 2, which must give the same result)
    assert "ckpt_4" in proc.stderr or (asynchronous and "ckpt_2" in proc.stderr)
    a, b = load(tmp_path / "a.npz"), load(tmp_path / "b.npz")
    assert a.keys() == b.keys()
    assert int(a["global_step"]) == int(b["global_step"]) == steps
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_rerun_after_finish_is_a_no_op(tmp_path):
    common = ["--steps", 4, "--model", "toy"]
    run_job(tmp_path / "run", tmp_path / "a.npz", *common)
    run_job(tmp_path / "run", tmp_path / "b.npz", *common)
    a, b = load(tmp_path / "a.npz"), load(tmp_path / "b.npz")
    for key in a:
        assert np.array_equal(a[key], b[key]), key
