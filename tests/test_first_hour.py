"""The first hour of a new user (issue 14): quiet, readable output; clear errors; the
names Hugging Face Trainer users type by habit."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ToyCTR, make_batches

from recframe import Trainer, TrainingArguments
from recframe.hooks.logger import LoggerHook

TINY = ["--batch_size", "16", "--num_embeddings", "50", "--embedding_dim", "4",
        "--num_train_batches", "6", "--num_eval_batches", "1", "--log_steps", "2"]


def _env() -> dict:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTHONWARNINGS", None)
    return env


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=_env(), timeout=240, **kw)


# --- item 2: quiet, readable output ------------------------------------------------
def test_cli_train_prints_no_third_party_warnings(tmp_path):
    """torchrec's topology / storage reservation / LOCAL_WORLD_SIZE warnings, the fx
    tracing notice and fbgemm's library lines are gone; recframe's own log stays. Under
    ``-W default`` too: the import-time DeprecationWarnings of fbgemm, torch.jit (while
    torch.distributed.optim is imported), torchrec and torchmetrics are gone as well."""
    proc = _run(["-W", "default", "-m", "recframe", "train", "--output_dir",
                 str(tmp_path / "run"), "--train_steps", "3", "--report_to",
                 "tensorboard,jsonl", *TINY])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    noisy = [ln for ln in lines if "warning" in ln.lower() or "Successfully loaded" in ln]
    assert noisy == [], proc.stderr
    assert any("recframe: step=2 epoch=0" in ln for ln in lines), proc.stderr
    assert "final eval" in proc.stdout
    # make demo's second command: an int8 export (torch.ao's quantization notice)
    proc = _run(["-W", "default", "-m", "recframe", "export", str(tmp_path / "run"),
                 str(tmp_path / "model.pt2"), "--quantize", "int8", "--num_embeddings", "50",
                 "--embedding_dim", "4"])
    assert proc.returncode == 0, proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if "warning" in ln.lower()] == [], proc.stderr


def test_python_api_logs_progress_at_info_by_default(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from conftest import ToyCTR, make_batches
        from recframe import Trainer, TrainingArguments
        args = TrainingArguments(output_dir={str(tmp_path / "api")!r}, log_steps=2,
                                 disable_tqdm=True, report_to="none")
        Trainer(ToyCTR(), args, train_dataset=make_batches(4, 8)).train()
    """)
    proc = _run(["-c", script])
    assert proc.returncode == 0, proc.stderr
    assert "INFO recframe: step=2 epoch=0" in proc.stderr
    assert "INFO recframe: step=4 epoch=0" in proc.stderr


def test_python_api_respects_the_users_logging(tmp_path):
    script = textwrap.dedent(f"""
        import logging, sys
        logging.basicConfig(level=logging.WARNING, format="USER %(message)s")
        logging.getLogger("recframe").setLevel(logging.WARNING)
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from conftest import ToyCTR, make_batches
        from recframe import Trainer, TrainingArguments
        args = TrainingArguments(output_dir={str(tmp_path / "api")!r}, log_steps=2,
                                 disable_tqdm=True, report_to="none")
        Trainer(ToyCTR(), args, train_dataset=make_batches(4, 8)).train()
    """)
    proc = _run(["-c", script])
    assert proc.returncode == 0, proc.stderr
    assert "step=2" not in proc.stderr  # INFO not shown: the user asked for WARNING


def test_log_and_bar_agree_on_the_epoch_of_an_epochs_last_update(tmp_path):
    """The update that ends pass 0 is logged as epoch 0, as the bar shows it."""
    hook = LoggerHook(log_steps=2)
    args = TrainingArguments(output_dir=str(tmp_path / "o"), disable_tqdm=True,
                             report_to="none", train_epoch=2)
    trainer = Trainer(ToyCTR(), args, train_dataset=make_batches(2, 8), hooks=[hook])
    seen = []
    orig = hook._write_train

    def spy(t):
        orig(t)
        seen.append(dict(hook.last_logged))

    hook._write_train = spy
    trainer.train()
    assert [(v["step"], v["epoch"]) for v in seen] == [(2, 0), (4, 1)]


def test_progress_bar_routes_log_lines_through_tqdm_and_shows_samples_per_sec(tmp_path):
    import io

    from recframe.hooks import ProgressBarHook

    stream = io.StringIO()
    handler = logging.StreamHandler(sys.stderr)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        bar = ProgressBarHook(postfix_steps=1, file=stream)
        args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none",
                                 train_steps=3)
        trainer = Trainer(ToyCTR(), args, train_dataset=make_batches(4, 8), hooks=[bar])
        replaced = []
        orig = bar.before_train

        def spy(t):
            orig(t)
            replaced.append(handler in root.handlers)

        bar.before_train = spy
        trainer.train()
    finally:
        root.removeHandler(handler)
    assert replaced and replaced[0] is False  # tqdm's handler stood in during training
    assert "samples/s=" in stream.getvalue()


# --- item 3: clear errors instead of tracebacks; no silent no-ops -----------------------
def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "out"), disable_tqdm=True, report_to="none",
                log_steps=100)
    base.update(kw)
    return TrainingArguments(**base)


class RenamedCTR(ToyCTR):
    """The same network under other parameter names: another model."""

    def __init__(self) -> None:
        super().__init__()
        self.table = self.emb
        del self.emb

    def forward(self, batch):
        self.emb = self.table
        try:
            return super().forward(batch)
        finally:
            del self.emb


@pytest.mark.parametrize("other", [lambda: ToyCTR(num_embeddings=32), RenamedCTR],
                         ids=["shape", "names"])
def test_resuming_another_models_checkpoint_names_tensors_and_the_fix(tmp_path, other):
    from recframe.trainer import CheckpointMismatchError

    data = make_batches(4, 8, num_embeddings=32)
    Trainer(ToyCTR(), _args(tmp_path, train_steps=2), train_dataset=data).train()
    trainer = Trainer(other(), _args(tmp_path, train_steps=4), train_dataset=data)
    with pytest.raises(CheckpointMismatchError) as info:
        trainer.train()
    text = str(info.value)
    assert "overwrite_output_dir" in text and "emb" in text and str(tmp_path / "out") in text
    # the fix it names works: a fresh start that deletes the old checkpoints
    fresh = Trainer(other(), _args(tmp_path, train_steps=1, overwrite_output_dir=True),
                    train_dataset=data)
    fresh.train()
    assert fresh.global_step == 1
    assert [c.step for c in fresh.saver.list_checkpoints()] == [1]


def test_cli_resume_mismatch_is_a_one_line_usage_error(tmp_path, capsys):
    from recframe import cli

    tiny = ["--batch_size", "8", "--num_embeddings", "20", "--embedding_dim", "4",
            "--num_train_batches", "2", "--num_eval_batches", "1", "--disable_tqdm", "true",
            "--report_to", "none", "--output_dir", str(tmp_path / "o"), "--train_steps", "1"]
    assert cli.main(["train", *tiny]) == 0
    capsys.readouterr()
    assert cli.main(["train", *tiny, "--embedding_dim", "8", "--train_steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite_output_dir" in err[0], err


def test_log_level_after_the_subcommand(capsys):
    from recframe import cli

    ns = cli.build_parser().parse_args(["train", "--log_level", "debug"])
    assert ns.log_level == "DEBUG"
    assert cli.build_parser().parse_args(["--log_level", "error", "train"]).log_level == "ERROR"
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["train", "--log_level", "loud"])
    assert info.value.code == 2
    assert "unknown log level 'loud'" in capsys.readouterr().err


def test_version_flag(capsys):
    from recframe import __version__, cli

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"recframe {__version__}"


def test_train_steps_below_the_resumed_step_warns(tmp_path, caplog):
    Trainer(ToyCTR(), _args(tmp_path, train_steps=3), train_dataset=make_batches(4, 8)).train()
    caplog.clear()
    trainer = Trainer(ToyCTR(), _args(tmp_path, train_steps=2), train_dataset=make_batches(4, 8))
    trainer.train()
    assert trainer.global_step == 3
    assert any("train_steps=2 is below the step 3" in r.getMessage() for r in caplog.records)


def test_eval_interval_without_eval_data_warns(tmp_path, caplog):
    Trainer(ToyCTR(), _args(tmp_path, eval_interval_steps=2), train_dataset=make_batches(2, 8))
    assert any("eval_interval_steps=2 does nothing" in r.getMessage() for r in caplog.records)


def test_keep_best_metric_nobody_computes_warns_once(tmp_path, caplog):
    trainer = Trainer(ToyCTR(), _args(tmp_path, train_steps=2, eval_interval_steps=1,
                                      keep_best_metric="gauc_typo"),
                      train_dataset=make_batches(2, 8), eval_dataset=make_batches(1, 8))
    trainer.train()
    hits = [r for r in caplog.records if "keep_best_metric='gauc_typo'" in r.getMessage()]
    assert len(hits) == 1 and "auc" in hits[0].getMessage()


def test_ckpt_list_on_a_file_is_an_error(tmp_path, capsys):
    from recframe import cli

    path = tmp_path / "notes.txt"
    path.write_text("x")
    assert cli.main(["ckpt", "list", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0] and str(path) in err[0]


def test_s3_output_dir_without_credentials_is_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("s3fs")
    from recframe import cli

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    import fsspec

    fsspec.config.conf.pop("s3", None)
    fsspec.filesystem("s3").clear_instance_cache()
    code = cli.main(["train", "--output_dir", "s3://recframe-no-such-bucket/run"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "AWS_ACCESS_KEY_ID" in err[0] and "s3://recframe-no-such" in err[0]


# --- item 5: Hugging Face names ----------------------------------------------------------
def test_learning_rate_and_weight_decay_reach_the_default_optimizer(tmp_path):
    trainer = Trainer(ToyCTR(), _args(tmp_path, learning_rate=0.05, weight_decay=0.1),
                      train_dataset=make_batches(2, 8))
    opt = trainer.dense_optimizer.optimizer
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["lr"] == 0.05 and opt.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant_with_warmup"])
def test_lr_scheduler_type_with_warmup(tmp_path, kind):
    from recframe.optim.schedules import lr_factor

    seen = []

    class Spy(LoggerHook):
        def after_step(self, trainer, metrics):
            seen.append(float(metrics["lr"]))

    trainer = Trainer(ToyCTR(), _args(tmp_path, train_steps=6, lr_scheduler_type=kind,
                                      warmup_ratio=0.34, learning_rate=0.1),
                      train_dataset=make_batches(6, 8), hooks=[Spy()])
    trainer.train()
    # the lr after update s is the factor of update s (warm-up: ceil(6 * 0.34) = 3 updates)
    expected = [0.1 * lr_factor(kind, s, 3, 6) for s in range(1, 7)]
    assert seen == pytest.approx(expected)
    assert seen[0] < seen[1] < seen[2]  # warming up
    if kind != "constant_with_warmup":
        assert seen[-1] == pytest.approx(0.0)


def test_decaying_schedule_without_a_length_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="train_steps"):
        Trainer(ToyCTR(), _args(tmp_path, lr_scheduler_type="linear"),
                train_dataset=iter(make_batches(2, 8)))


def test_resume_from_checkpoint_true_and_path(tmp_path):
    with pytest.raises(ValueError, match="no committed checkpoint"):
        Trainer(ToyCTR(), _args(tmp_path, resume_from_checkpoint=True),
                train_dataset=make_batches(2, 8)).train()
    Trainer(ToyCTR(), _args(tmp_path, train_steps=4, save_steps=2),
            train_dataset=make_batches(4, 8)).train()
    older = str(tmp_path / "out" / "ckpt_2")
    trainer = Trainer(ToyCTR(), _args(tmp_path, train_steps=4, resume_from_checkpoint=older),
                      train_dataset=make_batches(4, 8))
    assert trainer.restore() == 2 and trainer.global_step == 2
    latest = Trainer(ToyCTR(), _args(tmp_path, train_steps=4, resume_from_checkpoint=True),
                     train_dataset=make_batches(4, 8))
    assert latest.restore() == 4
    with pytest.raises(ValueError, match="overwrite_output_dir"):
        Trainer(ToyCTR(), _args(tmp_path, resume_from_checkpoint=False),
                train_dataset=make_batches(4, 8)).restore()


def test_compute_metrics_adds_custom_eval_metrics(tmp_path):
    def compute_metrics(p):
        assert p.predictions.shape == p.label_ids.shape == (16,)
        return {"pos_rate": float(p.label_ids.mean())}

    batches = make_batches(2, 8)
    trainer = Trainer(ToyCTR(), _args(tmp_path), eval_dataset=batches,
                      compute_metrics=compute_metrics)
    results = trainer.evaluate()
    labels = torch.cat([b["label"] for b in batches])
    assert results["pos_rate"] == pytest.approx(float(labels.mean()))
    assert "auc" in results


def test_load_best_model_at_end(tmp_path):
    batches = make_batches(8, 8)
    trainer = Trainer(ToyCTR(), _args(tmp_path, train_steps=6, save_steps=1, max_to_keep=1,
                                      eval_interval_steps=1, load_best_model_at_end=True,
                                      learning_rate=0.3),
                      train_dataset=batches, eval_dataset=batches[:2])
    losses = []

    class Spy(LoggerHook):
        def after_evaluate(self, trainer, metrics):
            losses.append(metrics["loss"])

    trainer.add_hook(Spy())
    trainer.train()
    assert trainer.args.keep_best_metric == "loss"
    assert trainer.evaluate()["loss"] == pytest.approx(min(losses))


# --- item 4: the user's own model and data on the CLI ------------------------------------
USER_PKG = '''
import torch
from torch import nn

from recframe.metrics import add_predictions

SEEN = {}


class Net(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.emb = nn.EmbeddingBag(64, 4, mode="sum", sparse=True)
        self.mlp = nn.Sequential(nn.Linear(7, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, batch):
        x = torch.cat([self.emb(batch["ids"]), batch["dense"]], dim=1)
        logits = self.mlp(x).squeeze(1)
        add_predictions(logits, batch["label"])
        return nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])


def build_model(args, hidden=8):
    SEEN["model"] = (args.train_steps, hidden)
    return Net(hidden)


def build_data(args, n=4, batch_size=8):
    from conftest import make_batches

    SEEN["data"] = (args.seed, n, batch_size)
    return make_batches(n, batch_size), make_batches(1, batch_size, seed=1)
'''


def test_cli_trains_the_users_model_and_data_from_a_config_file(tmp_path, monkeypatch, capsys):
    from recframe import cli

    (tmp_path / "team_pkg_fh.py").write_text(USER_PKG)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "job.yaml"
    config.write_text(textwrap.dedent(f"""
        output_dir: {tmp_path / "run"}
        train_steps: 3
        seed: 7
        disable_tqdm: true
        report_to: none
        model:
          factory: team_pkg_fh:build_model
          hidden: 5
        data:
          n: 3
          batch_size: 4
    """))
    code = cli.main(["train", "--config", str(config), "--data", "team_pkg_fh:build_data"])
    assert code == 0, capsys.readouterr().err
    import team_pkg_fh

    assert team_pkg_fh.SEEN == {"model": (3, 5), "data": (7, 3, 4)}
    assert "final eval" in capsys.readouterr().out
    assert (tmp_path / "run" / "ckpt_3").is_dir()


@pytest.mark.parametrize("argv, needle", [
    (["--model", "team_pkg_fh:nope"], "has no 'nope'"),
    (["--model", "no_such_pkg_fh:build"], "cannot import 'no_such_pkg_fh'"),
    (["--model", "team_pkg_fh:build_model", "--data", "team_pkg_fh:build_data",
      "--config", "BAD"], "does not fit"),
])
def test_cli_factory_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, needle):
    from recframe import cli

    (tmp_path / "team_pkg_fh.py").write_text(USER_PKG)
    monkeypatch.syspath_prepend(str(tmp_path))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  width: 3\n")
    argv = [str(bad) if a == "BAD" else a for a in argv]
    code = cli.main(["train", "--output_dir", str(tmp_path / "o"), *argv])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


# --- item 8: recframe's models without torchrec -----------------------------------------
def test_models_without_torchrec_name_the_install_command():
    script = textwrap.dedent("""
        import sys
        sys.modules["torchrec"] = None  # as if it were not installed
        import recframe  # the core imports without torchrec
        try:
            import recframe.models
        except ImportError as e:
            print(e)
        else:
            raise SystemExit("imported")
    """)
    proc = _run(["-c", script])
    assert proc.returncode == 0, proc.stderr
    assert "pip install --no-deps -r requirements/torchrec.txt" in proc.stdout


def test_criteo_bar_gets_a_total(tmp_path):
    """Criteo TSV (no len()): the bar's total comes from the reader's position."""
    import io
    import random

    from recframe.hooks import ProgressBarHook
    from recframe.readers import criteo_tsv

    rng = random.Random(0)
    path = tmp_path / "day_0.tsv"
    with open(path, "w") as f:
        for _ in range(160):
            cols = [str(rng.randint(0, 1))] + [str(rng.randint(0, 9)) for _ in range(13)]
            f.write("\t".join(cols + [f"{rng.getrandbits(32):08x}" for _ in range(26)]) + "\n")
    data = criteo_tsv(str(path), num_embeddings=50, embedding_dim=4, batch_size=16,
                      num_workers=0)
    from recframe.models import build_model

    model = build_model("dlrm", num_embeddings=50, embedding_dim=4)
    bar = ProgressBarHook(file=io.StringIO())
    totals = []

    class Spy(LoggerHook):
        def after_step(self, trainer, metrics):
            totals.append(bar.bar.total)

    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", train_epoch=2,
                             log_steps=100)
    trainer = Trainer(model, args, train_dataset=data, hooks=[bar, Spy()])
    trainer.train()
    assert trainer.global_step == 20
    assert all(t is not None for t in totals)
    assert totals[-1] == 20 and totals[10] == 20  # exact once a pass is complete
    assert all(abs(t - 20) <= 2 for t in totals)  # close during the first pass
