"""Every code block of README.md and docs/*.md runs: one test per document.

The blocks of a document run in order, in a fresh temporary directory (the current
directory of both kinds), so a later block sees what an earlier one wrote:

* ```` ```python ````: executed in one namespace per document (in this process), so a
  block may use the names an earlier block of the same document defined.
* ```` ```bash ```` / ```` ```sh ````: ``bash -eo pipefail`` with the current
  interpreter's bin directory first on ``PATH`` and as ``.venv/bin`` (``.venv/bin/recframe``
  and plain ``recframe`` both work, as in an activated venv), and this checkout first on
  ``PYTHONPATH``.
* any other fence (```` ```text ````, ```` ```yaml ````, a bare ```` ``` ````): shown
  output, a config or a layout: not run.

Markers, an HTML comment on the line right before the fence (invisible when rendered):

* ``<!-- not-run: reason -->``: do not run this block (it needs torchrun, S3, XLA, a
  GPU, the user's own data, or is a signature rather than an example); the reason is
  required.
* ``<!-- write-file: NAME -->``: write the block's text to ``NAME`` (relative to the
  temporary directory), e.g. the ``run.yaml`` a later command reads.

Write examples with small step counts (tens of updates, small tables): the whole runner
should stay well under a few minutes on two cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
PYTHON_LANGS = ("python", "py")
SHELL_LANGS = ("bash", "sh", "shell", "console")
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<ticks>`{3,})(?P<lang>[\w+-]*)")
_MARKER = re.compile(r"^\s*<!--\s*(?P<kind>not-run|write-file)\s*:\s*(?P<arg>.*?)\s*-->\s*$")


@dataclass
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str = ""  # "not-run" / "write-file" / ""
    marker_arg: str = ""


def documents() -> list[Path]:
    """README.md and every docs/*.md, the paths a user reads."""
    docs = [REPO / "README.md"] + sorted((REPO / "docs").glob("**/*.md"))
    return [d for d in docs if d.is_file()]


def extract_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file with their language and marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        ticks, indent = m.group("ticks"), len(m.group("indent"))
        end = i + 1
        while end < len(lines) and not re.match(rf"^\s*{ticks}`*\s*$", lines[end]):
            end += 1
        body = [line[indent:] if line[:indent].isspace() else line for line in lines[i + 1:end]]
        name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
        block = Block(name, i + 1, m.group("lang").lower(),
                      "\n".join(body) + "\n")
        prev = i - 1
        while prev >= 0 and not lines[prev].strip():
            prev -= 1
        marker = _MARKER.match(lines[prev]) if prev >= 0 else None
        if marker:
            block.marker, block.marker_arg = marker.group("kind"), marker.group("arg")
        blocks.append(block)
        i = end + 1
    return blocks


def _shell_env(tmp: Path) -> dict[str, str]:
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "2")
    venv = tmp / ".venv"
    if not venv.exists():
        venv.mkdir()
        (venv / "bin").symlink_to(bindir, target_is_directory=True)
    return env


def run_block(block: Block, tmp: Path, namespace: dict) -> None:
    where = f"{block.doc}:{block.line}"
    if block.marker == "write-file":
        target = tmp / block.marker_arg
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.code, encoding="utf-8")
    elif block.lang in PYTHON_LANGS:
        exec(compile(block.code, where, "exec"), namespace)  # noqa: S102 - the docs' own code
    elif block.lang in SHELL_LANGS:
        proc = subprocess.run(["bash", "-eo", "pipefail", "-c", block.code], cwd=tmp,
                              env=_shell_env(tmp), capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            pytest.fail(f"{where}: the shell block exited {proc.returncode}\n--- block\n"
                        f"{block.code}--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n"
                        f"{proc.stderr[-3000:]}", pytrace=False)


def runnable(block: Block) -> bool:
    if block.marker == "not-run":
        return False
    return block.marker == "write-file" or block.lang in PYTHON_LANGS + SHELL_LANGS


# --- the runner's own checks -----------------------------------------------------------
def test_extract_blocks_reads_fences_and_markers(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n```python\nx = 1\n```\n\n<!-- not-run: needs a GPU -->\n"
                   "```bash\nnvidia-smi\n```\n<!-- write-file: a/run.yaml -->\n"
                   "```yaml\nk: 1\n```\n````text\n```\n````\n")
    blocks = extract_blocks(doc)
    assert [(b.line, b.lang, b.marker, b.marker_arg) for b in blocks] == [
        (2, "python", "", ""), (7, "bash", "not-run", "needs a GPU"),
        (11, "yaml", "write-file", "a/run.yaml"), (14, "text", "", "")]
    assert blocks[0].code == "x = 1\n" and blocks[3].code == "```\n"
    assert [runnable(b) for b in blocks] == [True, False, True, False]


def test_every_not_run_marker_gives_a_reason():
    for doc in documents():
        for block in extract_blocks(doc):
            if block.marker:
                assert block.marker_arg, f"{block.doc}:{block.line}: a marker needs its reason"


@pytest.mark.parametrize("doc", documents(), ids=lambda d: str(d.relative_to(REPO)))
def test_doc_snippets_run(doc: Path, tmp_path, monkeypatch):
    blocks = [b for b in extract_blocks(doc) if runnable(b)]
    if not blocks:
        pytest.skip(f"{doc.name} has no runnable block")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(doc.name)])
    namespace: dict = {"__name__": "__docs__"}
    had_group = dist.is_available() and dist.is_initialized()
    try:
        for block in blocks:
            run_block(block, tmp_path, namespace)
    finally:
        # a snippet may start a process group (shard_model does, in one process)
        if not had_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
