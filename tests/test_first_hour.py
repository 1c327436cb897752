"""The first hour of a new user (issue 14): quiet, readable output; clear errors; the
names Hugging Face Trainer users type by habit."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

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
    tracing notice and fbgemm's library lines are gone; recframe's own log stays."""
    proc = _run(["-m", "recframe", "train", "--output_dir", str(tmp_path / "run"),
                 "--train_steps", "3", *TINY])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    noisy = [ln for ln in lines if "warning" in ln.lower() or "Successfully loaded" in ln]
    assert noisy == [], proc.stderr
    assert any("recframe: step=2 epoch=0" in ln for ln in lines), proc.stderr
    assert "final eval" in proc.stdout


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
    orig = hook._write_train_line

    def spy(t):
        orig(t)
        seen.append(dict(hook.last_logged))

    hook._write_train_line = spy
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
