"""A missing bucket at start/restore is a clear error, not a silent fresh start (the
manager never creates buckets); the writer lock and run id work on S3."""

from __future__ import annotations

import uuid

import pytest
from test_checkpoint_manager import make_model

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from test_s3 import BUCKET, s3_endpoint  # noqa: E402, F401 - the moto server fixture

from recframe.checkpoint import CheckpointError, CheckpointManager, Saver  # noqa: E402
from recframe.checkpoint.lock import WriterLock  # noqa: E402


def test_a_missing_bucket_is_an_error_at_start(s3_endpoint):  # noqa: F811
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    with pytest.raises(CheckpointError, match=f"bucket '{bucket}' of output_dir "
                                              f"s3://{bucket}/run does not exist"):
        CheckpointManager(Saver(make_model(), output_dir=f"s3://{bucket}/run"))


def test_the_writer_lock_and_run_id_on_s3(s3_endpoint):  # noqa: F811
    out = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
    manager = CheckpointManager(Saver(make_model(), output_dir=out), save_interval=1)
    assert manager.restore() == 0
    manager.step(1)
    manifest = manager.saver.read_manifest(manager.saver.storage.path("ckpt_1"))
    assert manifest["run_id"] == manager.lock.run_id
    assert WriterLock(manager.saver.storage).read()["run_id"] == manager.lock.run_id
    manager.close()
    assert WriterLock(manager.saver.storage).read() is None
