"""The readers keep freed memory for the next decoded block (`recframe.allocator`'s
`keep_freed_memory`, as the Trainer does): when a reader starts iterating or converting,
unless the user passed ``keep_freed_memory=False`` (to the reader, or to a Trainer built
first), set glibc's own variables, or runs another malloc. Each case in a fresh process:
glibc's settings are process-wide and set once."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys

import pytest
from test_readers import criteo_lines, write

from recframe import allocator

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
pytestmark = pytest.mark.skipif(not GLIBC or not hasattr(ctypes.CDLL(None), "mallinfo2"),
                                reason="glibc >= 2.33 only")

# how many bytes of a 64 MiB malloc glibc maps on its own (above its mmap threshold):
# all of them by default, none once freed memory is kept
PROBE = """
import ctypes, sys

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]

def mapped():
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(64 << 20)
    grown = libc.mallinfo2().hblkhd - before
    libc.free(p)
    return grown // (1 << 20)

from recframe.readers import convert_to_parquet, criteo_tsv
first = mapped()
SETUP
print(first, mapped())
"""


def _run(tmp_path, setup: str, **env: str) -> list[str]:
    raw = write(tmp_path / "day_0", criteo_lines(30, seed=1))
    clean = {k: v for k, v in os.environ.items()
             if k not in (*allocator.ALLOCATOR_ENV, "GLIBC_TUNABLES", "LD_PRELOAD")}
    code = PROBE.replace("SETUP", setup.replace("RAW", repr(raw)).replace(
        "OUT", repr(str(tmp_path / "pq"))))
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env},
                          capture_output=True, text=True, check=True).stdout.split()


def test_iterating_a_reader_keeps_freed_memory(tmp_path) -> None:
    assert _run(tmp_path, "assert sum(len(b.labels) for b in criteo_tsv(RAW)) == 30") == [
        "64", "0"]


def test_converting_keeps_freed_memory(tmp_path) -> None:
    assert _run(tmp_path, "convert_to_parquet(criteo_tsv(RAW), OUT, progress=False)") == [
        "64", "0"]


def test_opting_out_on_the_reader_leaves_glibcs_defaults(tmp_path) -> None:
    assert _run(tmp_path, "list(criteo_tsv(RAW, keep_freed_memory=False))") == ["64", "64"]


def test_a_trainer_that_opted_out_first_is_followed(tmp_path) -> None:
    """``TrainingArguments(keep_freed_memory=False)`` holds for the whole process: the
    reader iterating after the Trainer was built does not set it either."""
    setup = """
from recframe import Trainer, TrainingArguments
from recframe.models import DLRM
data = criteo_tsv(RAW, num_embeddings=100)
args = TrainingArguments(output_dir=OUT, keep_freed_memory=False, report_to="none")
Trainer(DLRM(schema=data.schema), args, train_dataset=data)
list(criteo_tsv(RAW))
"""
    assert _run(tmp_path, setup) == ["64", "64"]


def test_the_users_malloc_settings_are_left_alone(tmp_path) -> None:
    assert _run(tmp_path, "list(criteo_tsv(RAW))", MALLOC_TRIM_THRESHOLD_="1000000") == [
        "64", "64"]
    assert _run(tmp_path, "list(criteo_tsv(RAW))",
                GLIBC_TUNABLES="glibc.malloc.mmap_threshold=1000000") == ["64", "64"]


# a malloc preloaded over glibc's under a name of its own: glibc's allocator underneath
# and a mallopt that accepts anything and does nothing (as tcmalloc's)
SHIM = r"""
#include <stddef.h>
extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
void *malloc(size_t n) { return __libc_malloc(n); }
void free(void *p) { __libc_free(p); }
void *calloc(size_t a, size_t b) { return __libc_calloc(a, b); }
void *realloc(void *p, size_t n) { return __libc_realloc(p, n); }
int mallopt(int param, int value) { (void)param; (void)value; return 1; }
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_a_preloaded_malloc_is_not_reported_kept(tmp_path) -> None:
    (tmp_path / "shim.c").write_text(SHIM)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / "shim.so"),
                    str(tmp_path / "shim.c")], check=True, capture_output=True)
    code = "from recframe.allocator import keep_freed_memory; print(keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if k not in allocator.ALLOCATOR_ENV}
    out = subprocess.run([sys.executable, "-c", code],
                         env={**env, "LD_PRELOAD": str(tmp_path / "shim.so")},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]
