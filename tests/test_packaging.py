"""Packaging: the runtime set carries no dev/test tools, the license is declared, and
the API reference builds from the docstrings without a broken reference."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
DEV_TOOLS = {"pytest", "ruff", "moto", "pdoc"}


def _names(lines: list[str]) -> set[str]:
    out = set()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            out.add(re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0].lower())
    return out


def test_runtime_requirements_hold_no_dev_tools():
    runtime = _names((ROOT / "requirements" / "cpu.txt").read_text().splitlines())
    assert runtime, "requirements/cpu.txt lists nothing"
    assert not runtime & DEV_TOOLS, runtime & DEV_TOOLS
    dev = _names((ROOT / "requirements" / "dev.txt").read_text().splitlines())
    assert DEV_TOOLS <= dev
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not _names(project["dependencies"]) & DEV_TOOLS


def test_license_file_and_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0" in text


def test_api_reference_builds(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "api_reference.py"), str(tmp_path / "api")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "api" / "recframe" / "trainer.html").exists()
