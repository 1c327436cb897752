"""Issue 14 attacked as a new user in the first hour: each test is a mistake or a
habit that ended in a traceback, a silent no-op or lost work, and now gets a clear
result (exit status 2 and one line naming the flag, field or path for usage errors)."""

from __future__ import annotations

import pytest
import torch
from conftest import ToyCTR, make_batches

from recframe import Trainer, TrainingArguments, cli
from recframe.checkpoint import CheckpointError

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


def test_a_users_ckpt_named_directory_is_not_deleted_as_a_leftover(tmp_path):
    out = tmp_path / "out"
    (out / "ckpt_7").mkdir(parents=True)
    (out / "ckpt_7" / "readme.md").write_text("not a checkpoint")
    Trainer(ToyCTR(), _args(tmp_path, train_steps=1),
            train_dataset=make_batches(2, 8, num_embeddings=32)).train()
    assert (out / "ckpt_7" / "readme.md").read_text() == "not a checkpoint"


def test_a_save_onto_a_users_ckpt_named_directory_is_refused_not_deleted(tmp_path):
    out = tmp_path / "out"
    (out / "ckpt_1").mkdir(parents=True)
    (out / "ckpt_1" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"ckpt_1 .*notes\.txt.*move it out"):
        Trainer(ToyCTR(), _args(tmp_path, train_steps=1),
                train_dataset=make_batches(2, 8, num_embeddings=32)).train()
    assert (out / "ckpt_1" / "notes.txt").read_text() == "mine"


# --- typos ------------------------------------------------------------------------------
def test_a_mistyped_flag_names_the_flag_it_resembles(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--trian_steps", "3", "--ouput_dir=x"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--trian_steps -> --train_steps" in err and "--ouput_dir -> --output_dir" in err
    with pytest.raises(SystemExit):
        cli.main(["ckpt", "list", "--jsn", "x"])
    assert "--jsn -> --json" in capsys.readouterr().err


def test_a_subcommand_flag_before_the_subcommand_says_where_it_goes(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--output_dir", "x", "train"])
    assert info.value.code == 2
    assert ("--output_dir is a flag of `recframe train`: put it after the subcommand"
            in capsys.readouterr().err)
    ns = cli.build_parser().parse_args(["--log_level", "debug", "train", "--output_dir", "x"])
    assert (ns.log_level, ns.output_dir) == ("DEBUG", "x")


def test_a_config_file_with_an_unknown_key_names_the_file_and_the_close_field(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: out\ntrain_stepz: 3\n")
    assert cli.main(["train", "--config", str(config)]) == 2
    line = _error_line(capsys)
    assert str(config) in line and "'train_stepz' -> 'train_steps'" in line
    with pytest.raises(ValueError, match=r"run\.yaml.*'train_stepz' -> 'train_steps'"):
        TrainingArguments.from_file(str(config))


def test_a_mistyped_choice_names_the_close_one(capsys):
    with pytest.raises(ValueError, match=r"lr_scheduler_type='cosin'.*did you mean 'cosine'"):
        TrainingArguments(lr_scheduler_type="cosin")
    assert cli.main(["train", "--device", "cdua"]) == 2
    assert "did you mean 'cuda'?" in _error_line(capsys)


@pytest.mark.parametrize("flag", ["--batch_size", "--num_train_batches", "--num_embeddings"])
def test_non_positive_sizes_are_usage_errors_naming_the_flag(flag, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", flag, "0"])
    assert info.value.code == 2
    assert f"argument {flag}: must be an integer >= 1" in capsys.readouterr().err


# --- data and checkpoint paths ------------------------------------------------------------
def test_a_missing_train_path_file_is_one_line_naming_the_flag(tmp_path, capsys):
    missing = str(tmp_path / "nope.tsv")
    code = cli.main(["train", *TINY, "--data", "criteo", "--train_path", missing,
                     "--output_dir", str(tmp_path / "o")])
    assert code == 2
    line = _error_line(capsys)
    assert f"--train_path {missing}" in line


def _trained_dir(tmp_path) -> str:
    out = str(tmp_path / "first")
    assert cli.main(["train", *TINY, "--output_dir", out, "--train_steps", "1"]) == 0
    return out


def test_resume_from_checkpoint_paths_that_are_not_checkpoints(tmp_path, capsys):
    first = _trained_dir(tmp_path)
    capsys.readouterr()
    other = ["--output_dir", str(tmp_path / "second"), "--train_steps", "2"]
    missing = str(tmp_path / "nope")
    assert cli.main(["train", *TINY, *other, "--resume_from_checkpoint", missing]) == 2
    line = _error_line(capsys)
    assert f"--resume_from_checkpoint {missing}" in line and "does not exist" in line
    # an output_dir instead of one of its checkpoints: the error names the checkpoint
    assert cli.main(["train", *TINY, *other, "--resume_from_checkpoint", first]) == 2
    assert f"--resume_from_checkpoint {first}/ckpt_1" in _error_line(capsys)
    # the checkpoint named works, and so does ckpt_<n> of output_dir
    assert cli.main(["train", *TINY, *other, "--resume_from_checkpoint",
                     first + "/ckpt_1"]) == 0
    assert cli.main(["train", *TINY, "--output_dir", first, "--train_steps", "2",
                     "--resume_from_checkpoint", "ckpt_1"]) == 0


def test_resume_from_another_models_checkpoint_names_that_checkpoint(tmp_path, capsys):
    first = _trained_dir(tmp_path)
    capsys.readouterr()
    code = cli.main(["train", *TINY, "--embedding_dim", "8", "--output_dir",
                     str(tmp_path / "fresh"), "--resume_from_checkpoint", first + "/ckpt_1"])
    assert code == 2
    line = _error_line(capsys)
    assert f"resume_from_checkpoint='{first}/ckpt_1'" in line and "different model" in line
    assert "fresh holds" not in line  # not the output_dir, which holds nothing


# --- the user's factories --------------------------------------------------------------------
def test_a_factory_that_raises_is_one_line_naming_the_flag(tmp_path, monkeypatch, capsys):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "f.py").write_text(
        "def model(args):\n    raise RuntimeError('no such table')\n"
        "def data(args):\n    raise ValueError('bad bucket')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = ["--output_dir", str(tmp_path / "o")]
    assert cli.main(["train", *TINY, *out, "--model", "userpkg.f:model"]) == 1
    assert "--model userpkg.f:model raised RuntimeError: no such table" in _error_line(capsys)
    assert cli.main(["train", *TINY, *out, "--data", "userpkg.f:data"]) == 1
    assert "--data userpkg.f:data raised ValueError: bad bucket" in _error_line(capsys)


def test_export_apply_delta_onto_a_missing_artifact_is_one_line(tmp_path, capsys):
    first = _trained_dir(tmp_path)
    capsys.readouterr()
    artifact = str(tmp_path / "model.pt2")
    assert cli.main(["export", "--apply-delta", first, artifact]) == 2
    line = _error_line(capsys)
    assert artifact in line and f"recframe export CHECKPOINT {artifact}" in line


def test_eval_interval_with_no_eval_data_on_the_cli_warns(tmp_path, caplog):
    """--num_eval_batches 0 is the CLI's way to train without eval data (it was an error
    naming no flag); --eval_interval_steps then does nothing, and says so."""
    code = cli.main(["train", *TINY, "--num_eval_batches", "0", "--eval_interval_steps", "1",
                     "--train_steps", "2", "--output_dir", str(tmp_path / "o")])
    assert code == 0
    assert any("eval_interval_steps=1 does nothing" in r.getMessage() for r in caplog.records)


def test_user_code_still_gets_torch_jit_deprecation_warnings(tmp_path):
    """The torch.jit notices are silenced only while torch.distributed.optim imports."""
    import os
    import subprocess
    import sys

    script = tmp_path / "user.py"
    script.write_text("import recframe, torch, torch.distributed.optim\n"
                      "def f(x: int) -> int:\n    return x\n"
                      "torch.jit.script(f)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, "-W", "default", str(script)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "Warning" in ln]
    assert len(lines) == 1 and "torch.jit.script` is deprecated" in lines[0], proc.stderr


def test_metrics_jsonl_and_the_log_agree_on_the_epoch(tmp_path, caplog):
    """The last update of epoch 0 was logged as epoch=0 but written as "epoch": 1."""
    import json

    trainer = Trainer(ToyCTR(), _args(tmp_path, log_steps=2, report_to="jsonl",
                                      eval_interval_steps=2),
                      train_dataset=make_batches(2, 8), eval_dataset=make_batches(1, 8))
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert [(r["kind"], r["step"], r["epoch"]) for r in records] == [
        ("train", 2, 0), ("eval", 2, 0)]
    logged = [r.getMessage() for r in caplog.records if "step=2 epoch=" in r.getMessage()]
    assert logged and all("epoch=0" in m for m in logged), logged


# --- grouped AUC from the CLI and for models that do not pass groups ----------------------
def test_groups_of_reads_the_first_id_of_a_sparse_feature_or_a_dict_column():
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recframe.metrics import groups_of

    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item"], values=torch.tensor([7, 9, 3, 1, 2, 3, 4]),
        lengths=torch.tensor([1, 0, 2, 1, 2, 1]))
    assert groups_of(kjt, "user").tolist() == [7, -1, 9]
    assert groups_of({"ids": torch.tensor([[5, 1], [6, 2]])}, "ids").tolist() == [5, 6]
    with pytest.raises(ValueError, match=r"'usr' is not a sparse feature.*\['user', 'item'\]"):
        groups_of(kjt, "usr")


def test_group_predictions_by_gives_the_gauc_of_the_feature_groups(tmp_path):
    from recframe.metrics import collect_predictions, group_predictions_by, grouped_auc

    model, evals = ToyCTR(), make_batches(3, 16, seed=3, num_embeddings=6)
    trainer = Trainer(model, _args(tmp_path), train_dataset=make_batches(1, 8),
                      eval_dataset=evals)
    assert "gauc" not in trainer.evaluate()  # nothing names the groups
    handle = group_predictions_by(model, "ids")
    results = trainer.evaluate()
    with torch.no_grad(), collect_predictions() as seen:
        for batch in evals:
            model(batch)
    logits, labels = torch.cat(seen.logits), torch.cat(seen.labels)
    expected, counted = grouped_auc(logits, labels, torch.cat([b["ids"][:, 0] for b in evals]))
    assert counted > 1 and results["gauc_groups"] == counted
    assert results["gauc"] == pytest.approx(expected)
    handle.remove()
    assert "gauc" not in trainer.evaluate()


def test_cli_gauc_feature(tmp_path, capsys):
    out = ["--output_dir", str(tmp_path / "o"), "--train_steps", "1", "--num_eval_batches", "2"]
    assert cli.main(["train", *TINY, *out, "--gauc_feature", "cat_0"]) == 0
    final = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("final eval")]
    assert '"gauc": ' in final[0] and '"gauc_groups": ' in final[0]
    assert cli.main(["train", *TINY, *out, "--gauc_feature", "user_id"]) == 2
    assert "--gauc_feature user_id: not a sparse feature" in _error_line(capsys)
    assert cli.main(["train", *TINY, *out, "--keep_best_metric", "gauc"]) == 2
    assert "add --gauc_feature FEATURE" in _error_line(capsys)


def test_cli_keep_best_metric_the_builtin_models_never_compute_is_a_usage_error(tmp_path,
                                                                                capsys):
    """It trained the whole run and warned only at the first evaluation."""
    out = ["--output_dir", str(tmp_path / "o"), "--train_steps", "1"]
    assert cli.main(["train", *TINY, *out, "--keep_best_metric", "aucc"]) == 2
    line = _error_line(capsys)
    assert "--keep_best_metric aucc" in line and "did you mean auc?" in line
    assert not (tmp_path / "o").exists()
    assert cli.main(["train", *TINY, *out, "--keep_best_metric", "ne",
                     "--keep_best_mode", "min"]) == 0


def test_dataloader_num_workers_on_synthetic_data_warns(tmp_path, caplog):
    code = cli.main(["train", *TINY, "--dataloader_num_workers", "2", "--train_steps", "1",
                     "--output_dir", str(tmp_path / "o")])
    assert code == 0
    assert any("--dataloader_num_workers 2 does nothing with --data synthetic"
               in r.getMessage() for r in caplog.records)


def test_ckpt_list_on_an_empty_dir_asks_whether_it_is_the_output_dir(tmp_path, capsys):
    assert cli.main(["ckpt", "list", str(tmp_path)]) == 0
    assert "is PATH the run's --output_dir?" in capsys.readouterr().out


def test_factories_import_from_the_current_directory(tmp_path, monkeypatch, capsys):
    """`.venv/bin/recframe train --model my_pkg.job:build` from the project directory:
    the console script's sys.path lacks the current directory (python -m has it)."""
    import sys

    pkg = tmp_path / "cwdpkg14"
    pkg.mkdir()
    (pkg / "job.py").write_text(
        "from conftest import ToyCTR, make_batches\n"
        "def model(args):\n    return ToyCTR(num_embeddings=32)\n"
        "def data(args):\n    return make_batches(2, 8, num_embeddings=32)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    code = cli.main(["train", *TINY, "--model", "cwdpkg14.job:model", "--data",
                     "cwdpkg14.job:data", "--train_steps", "1", "--output_dir", "o"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "ckpt_1" / "manifest.json").exists()


def test_load_best_model_at_end_without_eval_data_names_that_flag(tmp_path, caplog):
    """It warned about keep_best_metric='loss', a field the user never set."""
    Trainer(ToyCTR(), _args(tmp_path, train_steps=1, load_best_model_at_end=True),
            train_dataset=make_batches(1, 8))
    hits = [r.getMessage() for r in caplog.records if "does nothing" in r.getMessage()]
    assert len(hits) == 1 and "load_best_model_at_end=True does nothing" in hits[0], hits


def test_keep_best_metric_computed_only_by_compute_metrics_keeps_that_checkpoint(tmp_path,
                                                                              caplog):
    values = iter([0.5, 0.1, 0.7, 0.9])
    trainer = Trainer(
        ToyCTR(), _args(tmp_path, train_steps=4, save_steps=1, max_to_keep=1,
                        eval_interval_steps=1, keep_best_metric="mine", keep_best_mode="min"),
        train_dataset=make_batches(4, 8), eval_dataset=make_batches(1, 8),
        compute_metrics=lambda p: {"mine": next(values)})
    trainer.train()
    assert [c.step for c in trainer.saver.list_checkpoints()] == [2, 4]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_second_job_on_the_same_output_dir_is_one_line(tmp_path, capsys):
    """A live job of another host holds the output dir: a traceback ended the second."""
    import json
    import time

    out = tmp_path / "out"
    out.mkdir()
    now = time.time()
    (out / ".recframe-writer.lock").write_text(json.dumps({
        "run_id": "other-run", "host": "another-host", "pid": 4242, "renewed_unix": now,
        "expires_unix": now + 600, "lease_seconds": 600}))
    assert cli.main(["train", *TINY, "--output_dir", str(out)]) == 1
    assert "is in use by another job: run other-run" in _error_line(capsys)
