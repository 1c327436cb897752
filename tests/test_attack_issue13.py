"""Issue 13 under attack: resuming at another world size through the Trainer, and the
readers, the schema and ``recframe data`` fed what users really have (headers, blank
fields, CRLF, stray files, broken files, hostile schemas)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from test_distributed import _env, _free_port
from test_readers import _to_parquet, criteo_lines, write

JOBS = Path(__file__).resolve().parent / "jobs"


# --------------------------------------------------------------------------- re-split


def _launch(world: int, out: Path, data: Path, fmt: str, tag: str, *extra: str) -> list[dict]:
    port = str(_free_port())
    procs = []
    for rank in range(world):
        dist = ({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                 "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": port} if world > 1 else {})
        env = _env(dist)
        if world == 1:
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key, None)
        procs.append(subprocess.Popen(
            [sys.executable, str(JOBS / "data_resplit_job.py"), str(out), str(data), fmt, tag,
             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        for rank, p in enumerate(procs):
            text, _ = p.communicate(timeout=240)
            assert p.returncode == 0, f"{tag} rank {rank}:\n{text[-4000:]}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [json.loads((out / f"{tag}-r{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("fmt,old,new", [("tsv", 2, 1), ("parquet", 1, 2)])
def test_trainer_resumes_at_another_world_size_by_resplitting(tmp_path, fmt, old, new) -> None:
    """A run checkpointed mid-epoch at ``old`` ranks resumes at ``new``: the Trainer
    re-splits the old ranks' positions, so every sample of the epoch is trained once
    across the change (none twice; at several ranks only each rank's last partial batch
    is dropped). Before: the positions were dropped and the epoch started over."""
    lines = criteo_lines(430, seed=21)
    data = tmp_path / "data"
    data.mkdir()
    if fmt == "tsv":
        write(data / "a.tsv", lines[:300])
        write(data / "b.tsv", lines[300:])
    else:
        _to_parquet(data / "a.parquet", lines[:300], 64)
        _to_parquet(data / "b.parquet", lines[300:], 50)
    (data / "README.md").write_text("not data\n")
    out = tmp_path / "run"
    out.mkdir()
    first = _launch(old, out, data, fmt, "first", "--steps", "4")
    assert {r["global_step"] for r in first} == {4} and {r["epoch"] for r in first} == {0}
    second = _launch(new, out, data, fmt, "second")
    assert {r["resumed"] for r in second} == {4}
    assert {r["epoch"] for r in second} == {1}  # the epoch was finished, not restarted
    assert len({r["global_step"] for r in second}) == 1

    from recframe.readers import TabularDataset
    from recframe.schema import FeatureSchema

    whole = next(iter(TabularDataset(str(data), FeatureSchema.criteo(40), format=fmt,
                                     batch_size=1000)))
    expected = Counter(tuple(r) for r in np.concatenate(
        [whole.labels[:, None].numpy(), whole.dense_features.numpy()], axis=1).tolist())
    got = Counter(tuple(np.float32(x).item() for x in row)
                  for r in first + second for row in r["samples"])
    assert not got - expected  # no sample twice, none from elsewhere
    missing = sum((expected - got).values())
    # one process keeps its last partial batch; several drop theirs (< 20 rows each)
    assert missing == 0 if new == 1 else missing < 20 * new


def test_remaining_batches_after_a_resplit(tmp_path) -> None:
    """The Trainer's agreed batch count under several ranks comes from the reader's own
    count after a re-split (len() - done counted the old ranks' batches: 1 -> 2 ranks
    dropped a third of the epoch)."""
    from recframe.readers import TabularDataset
    from recframe.schema import FeatureSchema

    files = [_to_parquet(tmp_path / "a.parquet", criteo_lines(300, seed=3), 64)]
    one = TabularDataset(files, FeatureSchema.criteo(40), batch_size=20, num_workers=0)
    it = iter(one)
    for _ in range(5):
        next(it)
    assert one.remaining_batches() == len(one) - 5 == 10
    for rank in range(2):
        ds = TabularDataset(files, FeatureSchema.criteo(40), batch_size=20, rank=rank,
                            world_size=2, num_workers=0)
        ds.resplit([one.state_dict()])
        assert ds.remaining_batches() == len(list(ds)) == 5  # 100 rows each, not 7 - 5
    assert TabularDataset(files, FeatureSchema.criteo(40), format="parquet",
                          batch_size=20).remaining_batches() == 15
