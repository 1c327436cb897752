"""Retention and cleanup never follow symlinks nor delete outside output_dir: a
``ckpt_N`` linked in from another run is left alone (it and its target)."""

from __future__ import annotations

import os

from test_checkpoint_manager import make_model, set_weights, steps_of

from recframe.checkpoint import CheckpointManager, Saver


def _other_run(tmp_path) -> str:
    other = str(tmp_path / "other")
    manager = CheckpointManager(Saver(make_model(), output_dir=other), save_interval=1)
    manager.step(1)
    manager.close()
    os.makedirs(os.path.join(other, "ckpt_9"))  # an uncommitted leftover over there
    os.makedirs(os.path.join(other, "ckpt_8.staging"))
    return other


def test_pruning_leaves_a_symlinked_checkpoint_and_its_target_alone(tmp_path):
    other = _other_run(tmp_path)
    out = str(tmp_path / "run")
    os.makedirs(out)
    os.symlink(os.path.join(other, "ckpt_1"), os.path.join(out, "ckpt_0"))
    model = make_model()
    manager = CheckpointManager(Saver(model, output_dir=out, max_keep=1), save_interval=1,
                                max_keep=1)
    for step in (1, 2, 3):
        set_weights(model, float(step))
        manager.step(step)
    manager.saver.prune()
    manager.close()
    assert os.path.islink(os.path.join(out, "ckpt_0"))
    assert os.path.exists(os.path.join(other, "ckpt_1", "manifest.json"))  # still committed
    assert steps_of(manager) == [0, 3]  # the link is listed, never counted as ours


def test_cleanup_never_follows_a_symlinked_leftover(tmp_path):
    other = _other_run(tmp_path)
    out = str(tmp_path / "run")
    os.makedirs(out)
    os.symlink(os.path.join(other, "ckpt_9"), os.path.join(out, "ckpt_9"))
    os.symlink(os.path.join(other, "ckpt_8.staging"), os.path.join(out, "ckpt_8.staging"))
    os.makedirs(os.path.join(out, "ckpt_5.staging"))  # this dir's own leftover
    saver = Saver(make_model(), output_dir=out)
    assert saver.uncommitted() == [os.path.join(out, "ckpt_5.staging")]
    manager = CheckpointManager(saver)  # cleans up at start
    manager.close()
    assert not os.path.exists(os.path.join(out, "ckpt_5.staging"))
    for name in ("ckpt_9", "ckpt_8.staging"):
        assert os.path.islink(os.path.join(out, name))
        assert os.path.isdir(os.path.join(other, name))


def test_a_rollback_does_not_move_a_symlinked_checkpoint(tmp_path):
    other = _other_run(tmp_path)
    out = str(tmp_path / "run")
    model = make_model()
    manager = CheckpointManager(Saver(model, output_dir=out, max_keep=5), save_interval=1)
    manager.step(1)
    manager.step(2)
    os.symlink(os.path.join(other, "ckpt_1"), os.path.join(out, "ckpt_7"))
    assert manager.restore(global_step=1) == 1
    manager.step(2, force=True)
    manager.close()
    assert os.path.islink(os.path.join(out, "ckpt_7"))
    assert os.path.exists(os.path.join(other, "ckpt_1", "manifest.json"))
    assert os.listdir(os.path.join(out, "abandoned"))  # the own ckpt_2 went aside
