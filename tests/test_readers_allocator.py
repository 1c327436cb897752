"""`tune_allocator`: glibc malloc keeps freed memory for the next decoded block (set once
per process when a reader starts, unless the user set glibc's own variables or passed
``tune_allocator=False``)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
from test_readers import criteo_lines, write

from recframe import readers
from recframe.readers import ALLOCATOR_SETTINGS, convert_to_parquet, criteo_tsv


class _FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

        def mallopt(param: int, value: int) -> int:
            self.calls.append((param, value))
            return 1

        self.mallopt = mallopt


@pytest.fixture
def fake_libc(monkeypatch):
    """A fresh process state and a libc that records mallopt calls."""
    libc = _FakeLibc()
    monkeypatch.setattr(readers, "_allocator_tuned", None)
    monkeypatch.setattr(readers, "_mallopt", lambda: libc.mallopt)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    for k in (*readers._ALLOCATOR_ENV, "GLIBC_TUNABLES"):
        monkeypatch.delenv(k, raising=False)
    return libc


WANT = [(-3, ALLOCATOR_SETTINGS["mmap_threshold"]), (-1, ALLOCATOR_SETTINGS["trim_threshold"])]


def test_iterating_a_reader_tunes_once_per_process(tmp_path, fake_libc) -> None:
    raw = write(tmp_path / "day_0", criteo_lines(40, seed=1))
    assert sum(len(b.labels) for b in criteo_tsv(raw, batch_size=16)) == 40
    assert fake_libc.calls == WANT
    list(criteo_tsv(raw, batch_size=16))  # a second reader, a second pass: no more calls
    assert fake_libc.calls == WANT and readers.tune_allocator() is True


def test_opt_out_and_user_settings_are_left_alone(tmp_path, fake_libc, monkeypatch) -> None:
    raw = write(tmp_path / "day_0", criteo_lines(40, seed=2))
    list(criteo_tsv(raw, batch_size=16, tune_allocator=False))
    assert fake_libc.calls == []
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    list(criteo_tsv(raw, batch_size=16))
    assert fake_libc.calls == [] and readers.tune_allocator() is False


def test_malloc_tunables_are_left_alone_other_tunables_are_not(fake_libc, monkeypatch) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1000000")
    assert readers.tune_allocator() is False and fake_libc.calls == []
    monkeypatch.setattr(readers, "_allocator_tuned", None)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX512F")
    assert readers.tune_allocator() is True and fake_libc.calls == WANT


def test_not_glibc_is_left_alone(fake_libc, monkeypatch) -> None:
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert readers.tune_allocator() is False and fake_libc.calls == []


def test_convert_tunes_too(tmp_path, fake_libc) -> None:
    raw = write(tmp_path / "day_0", criteo_lines(40, seed=3))
    convert_to_parquet(criteo_tsv(raw), str(tmp_path / "pq"), progress=False)
    assert fake_libc.calls == WANT


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc only")
def test_real_glibc_accepts_the_settings() -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in (*readers._ALLOCATOR_ENV, "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", "from recframe.readers import tune_allocator; "
                          "print(tune_allocator(), tune_allocator())"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]
