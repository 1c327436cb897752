"""The readers under the Trainer: exact resume after a SIGKILL mid-file (background
decoding, look-ahead), and two gloo ranks training on unequal files, each reading only
its share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from test_distributed import _env, _free_port
from test_readers import criteo_lines, write

JOBS = Path(__file__).resolve().parent / "jobs"
ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, expect_kill: bool = False) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(JOBS / "data_resume_job.py"), *args],
                          capture_output=True, text=True, timeout=300, env=env)
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


def test_sigkill_mid_file_then_resume_is_bitwise_identical(tmp_path) -> None:
    """230 rows (7 full batches and a tail) in a CRLF file and a .gz file; killed after
    update 5 (mid-file, decoding threads running ahead), the rerun resumes at the saved
    position and ends with the same parameters as an uninterrupted run over 1.5 epochs."""
    lines = criteo_lines(230, seed=11)
    data = tmp_path / "data"
    data.mkdir()
    write(data / "a.tsv", lines[:170], eol="\r\n", blank_every=40)
    write(data / "b.tsv.gz", lines[170:])
    (data / "README.md").write_text("not data\n")
    glob = str(data)
    _run(str(tmp_path / "ref"), str(tmp_path / "ref.npz"), glob, "--steps", "12")
    _run(str(tmp_path / "cut"), str(tmp_path / "x.npz"), glob, "--steps", "12", "--kill-at",
         "5", expect_kill=True)
    assert (tmp_path / "cut" / "ckpt_4").is_dir() or (tmp_path / "cut" / "ckpt_5").is_dir()
    _run(str(tmp_path / "cut"), str(tmp_path / "cut.npz"), glob, "--steps", "12")
    with np.load(tmp_path / "ref.npz") as a, np.load(tmp_path / "cut.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key
        assert a["position"][2] == 1  # in the second epoch


def test_two_gloo_ranks_train_on_unequal_files(tmp_path) -> None:
    lines = criteo_lines(600, seed=12)
    data = tmp_path / "data"
    data.mkdir()
    write(data / "big.tsv", lines[:450])
    write(data / "small.tsv", lines[450:470])
    write(data / "mid.tsv", lines[470:])
    (data / "convert.py").write_text("print('not data')\n")
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = _env({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                    "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        procs.append(subprocess.Popen(
            [sys.executable, str(JOBS / "data_dist_job.py"), str(tmp_path), str(data)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        for rank, p in enumerate(procs):
            out, _ = p.communicate(timeout=240)
            assert p.returncode == 0, f"rank {rank}:\n{out[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = [json.loads((tmp_path / f"result-r{r}.json").read_text()) for r in range(2)]
    assert results[0]["global_step"] == results[1]["global_step"] > 0
    # every line trained by one rank at most; only each rank's last partial batch is
    # dropped (drop_last under several ranks: sharded lookups need equal batch sizes)
    from recframe.readers import criteo_tsv

    whole = next(iter(criteo_tsv(str(data), batch_size=1000, num_embeddings=40)))
    expected = Counter(tuple(r) for r in np.concatenate(
        [whole.labels[:, None].numpy(), whole.dense_features.numpy()], axis=1).tolist())
    got = [tuple(np.float32(x).item() for x in r) for res in results for r in res["samples"]]
    assert not Counter(got) - expected  # no sample twice, none from elsewhere
    assert len(got) > 600 - 2 * 25
    counts = [len(r["samples"]) for r in results]
    assert abs(counts[0] - counts[1]) <= 25  # the shares end within one batch
    assert 25 * results[0]["global_step"] == min(counts)  # both trained all they agreed on
    total = sum(f.stat().st_size for f in data.iterdir() if f.suffix == ".tsv")
    for r in results:
        assert r["bytes_read"] <= 0.55 * total
        assert not any(f.endswith("convert.py") for f in r["files"])
