"""Honest rollbacks and output_dir sanity: ``restore(global_step=N)`` with newer
checkpoints starts a new timeline (the newer ones are moved aside into ``abandoned/``
at the first save, never deleted, never mixed with the new saves); an output_dir that
is a checkpoint directory is an error; ``file://localhost/...`` is the same dir."""

from __future__ import annotations

import os

import pytest
from test_checkpoint_manager import make_model, set_weights, steps_of, weight_in

from recframe.checkpoint import CheckpointError, CheckpointManager, Saver


def _run(out: str, steps: range, max_keep: int = 10) -> None:
    model = make_model()
    manager = CheckpointManager(Saver(model, output_dir=out, max_keep=max_keep),
                                save_interval=1)
    for step in steps:
        set_weights(model, float(step))
        manager.step(step)
    manager.close()


def _abandoned(out: str) -> dict[str, list[str]]:
    area = os.path.join(out, "abandoned")
    if not os.path.isdir(area):
        return {}
    return {d: sorted(os.listdir(os.path.join(area, d))) for d in os.listdir(area)}


def test_a_rollback_starts_a_new_timeline(tmp_path):
    out = str(tmp_path)
    _run(out, range(1, 5))  # timeline A: ckpt_1..4 hold 1.0..4.0
    model = make_model(1)
    manager = CheckpointManager(Saver(model, output_dir=out, max_keep=10), save_interval=1)
    assert manager.restore(global_step=2) == 2
    assert _abandoned(out) == {}  # restoring alone changes nothing on storage
    set_weights(model, 30.0)  # timeline B diverges
    assert manager.step(3).endswith("ckpt_3")  # saved (was: silently skipped, 3 <= 4)
    set_weights(model, 40.0)
    assert manager.step(4).endswith("ckpt_4")
    manager.close()
    assert steps_of(manager) == [1, 2, 3, 4]
    assert weight_in(manager.saver, 3) == 30.0 and weight_in(manager.saver, 4) == 40.0
    # A's newer checkpoints are kept aside, intact, not deleted
    (label, moved), = _abandoned(out).items()
    assert label.startswith("from_ckpt_2-") and moved == ["ckpt_3", "ckpt_4"]
    aside = Saver(make_model(), output_dir=os.path.join(out, "abandoned", label))
    assert weight_in(aside, 4) == 4.0
    # a later resume returns timeline B's weights, never A's
    again = make_model(2)
    latest = CheckpointManager(Saver(again, output_dir=out))
    assert latest.restore() == 4
    assert float(again.emb.weight.detach().unique()) == 40.0
    latest.close()


def test_retention_after_a_rollback_only_sees_the_new_timeline(tmp_path):
    out = str(tmp_path)
    _run(out, range(1, 6))
    model = make_model(1)
    manager = CheckpointManager(Saver(model, output_dir=out), save_interval=1, max_keep=2)
    assert manager.restore(global_step=3) == 3
    set_weights(model, 31.0)
    manager.step(4)
    assert steps_of(manager) == [3, 4]  # old ckpt_4, ckpt_5 are aside, not outranking
    manager.close()
    (moved,) = _abandoned(out).values()
    assert moved == ["ckpt_4", "ckpt_5"]


def test_output_dir_that_is_a_checkpoint_is_an_error(tmp_path):
    out = str(tmp_path / "run")
    _run(out, range(1, 3))
    with pytest.raises(CheckpointError, match=r"ckpt_2 is a checkpoint directory.*"
                                              r"set output_dir to .*run"):
        CheckpointManager(Saver(make_model(), output_dir=os.path.join(out, "ckpt_2")))
    assert sorted(os.listdir(os.path.join(out, "ckpt_2")))  # nothing was touched
    with pytest.raises(CheckpointError, match="is a checkpoint directory"):
        CheckpointManager(Saver(make_model(), output_dir=os.path.join(out, "ckpt_9.staging")))


@pytest.mark.parametrize("url", ["file://{}", "file://localhost{}", "file:{}"])
def test_a_file_url_of_the_output_dir_is_the_same_dir(tmp_path, url):
    out = str(tmp_path / "run")
    _run(out, range(1, 3))
    model = make_model(1)
    manager = CheckpointManager(Saver(model, output_dir=url.format(out)))
    assert manager.restore() == 2  # not a silent fresh start somewhere else
    assert manager.saver.storage.root == out
    manager.close()


def test_a_rollback_on_an_object_store_copies_aside_then_uncommits(tmp_path):
    out = f"memory://rollback-{os.getpid()}-{id(tmp_path)}/run"
    _run(out, range(1, 4))
    model = make_model(1)
    manager = CheckpointManager(Saver(model, output_dir=out, max_keep=10), save_interval=1)
    assert manager.restore(global_step=1) == 1
    set_weights(model, 20.0)
    manager.step(2)
    assert steps_of(manager) == [1, 2]
    assert weight_in(manager.saver, 2) == 20.0
    storage = manager.saver.storage
    (label,) = storage.listdir(storage.path("abandoned"))
    aside = Saver(make_model(), output_dir=storage.path("abandoned", label))
    assert [c.step for c in aside.list_checkpoints()] == [2, 3]
    assert weight_in(aside, 3) == 3.0
    manager.close()
