"""Issue 14 attacked as a new user in the first hour: each test is a mistake or a
habit that ended in a traceback, a silent no-op or lost work, and now gets a clear
result (exit status 2 and one line naming the flag, field or path for usage errors)."""

from __future__ import annotations

import pytest
from conftest import ToyCTR, make_batches

from recframe import Trainer, TrainingArguments

TINY = ["--batch_size", "8", "--num_embeddings", "20", "--embedding_dim", "4",
        "--num_train_batches", "2", "--num_eval_batches", "1", "--disable_tqdm", "true",
        "--report_to", "none", "--log_level", "WARNING"]


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), disable_tqdm=True, report_to="none",
                log_steps=100)
    base.update(kw)
    return TrainingArguments(**base)


def _error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.startswith("recframe: error:")]
    assert len(err) == 1, err
    return err[0]


# --- overwrite_output_dir ---------------------------------------------------------------
def test_overwrite_output_dir_saves_the_new_runs_checkpoint_at_a_deleted_step(tmp_path):
    """The second run of the same command with --overwrite_output_dir deleted ckpt_2 and
    then never wrote its own ckpt_2 (the manager still thought step 2 was saved)."""
    data = make_batches(4, 8, num_embeddings=32)
    Trainer(ToyCTR(), _args(tmp_path, train_steps=2), train_dataset=data).train()
    again = Trainer(ToyCTR(), _args(tmp_path, train_steps=2, overwrite_output_dir=True),
                    train_dataset=data)
    again.train()
    assert [c.step for c in again.saver.list_checkpoints()] == [2]


def test_overwrite_output_dir_never_deletes_files_recframe_did_not_write(tmp_path):
    out = tmp_path / "out"
    (out / "ckpt_notes").mkdir(parents=True)
    (out / "ckpt_notes" / "a.txt").write_text("mine")
    (out / "notes.txt").write_text("mine")
    data = make_batches(2, 8, num_embeddings=32)
    Trainer(ToyCTR(), _args(tmp_path, train_steps=1), train_dataset=data).train()
    Trainer(ToyCTR(), _args(tmp_path, train_steps=1, overwrite_output_dir=True),
            train_dataset=data).train()
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "ckpt_notes" / "a.txt").read_text() == "mine"
    assert (out / "ckpt_1" / "manifest.json").exists()


@pytest.mark.xfail(strict=True, reason="checkpoint/saver.py (not this branch's file): a "
                   "ckpt_<n> directory without manifest counts as a leftover of an "
                   "interrupted save and is deleted whatever it holds")
def test_a_users_ckpt_named_directory_is_not_deleted_as_a_leftover(tmp_path):
    out = tmp_path / "out"
    (out / "ckpt_7").mkdir(parents=True)
    (out / "ckpt_7" / "readme.md").write_text("not a checkpoint")
    Trainer(ToyCTR(), _args(tmp_path, train_steps=1),
            train_dataset=make_batches(2, 8, num_embeddings=32)).train()
    assert (out / "ckpt_7" / "readme.md").read_text() == "not a checkpoint"
