"""A narrow storage interface over fsspec: just what checkpoints need.

Paths stay strings (``pathlib`` would mangle ``s3://``). Local filesystems take a fast
path with plain ``open``/``os`` calls so files can be ``fsync``-ed and directories
renamed atomically; every other protocol (memory://, s3://, gs://...) goes through
fsspec, where a single object PUT is atomic and there is no rename.
"""

from __future__ import annotations

import os
import posixpath
import zlib
from collections.abc import Iterable
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


class StorageError(OSError):
    """A storage operation failed; the message names the path."""


class Storage:
    """A filesystem rooted at ``url`` (a local path or any fsspec URL)."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.root = os.path.abspath(root) if self.is_local else root.rstrip("/")
        self.protocol = "file" if self.is_local else _protocol(self.fs)

    # --- names --------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Absolute path of ``parts`` under the root (as the filesystem spells it)."""
        if self.is_local:
            return os.path.join(self.root, *parts)
        return posixpath.join(self.root, *parts)

    def join(self, path: str, *parts: str) -> str:
        """``path`` (a full path on this filesystem) joined with ``parts``."""
        if self.is_local:
            return os.path.join(path, *parts)
        return posixpath.join(path, *parts)

    def display(self, path: str) -> str:
        """The path as a user would type it (with the protocol for remote stores)."""
        if self.is_local or "://" in path:
            return path
        return f"{self.protocol}://{path.lstrip('/')}" if self.protocol else path

    @property
    def atomic_rename(self) -> bool:
        """Whether a directory can be renamed atomically (local POSIX filesystems)."""
        return self.is_local

    # --- queries ------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        if self.is_local:
            return os.path.exists(path)
        return self.fs.exists(path)

    def listdir(self, path: str) -> list[str]:
        """Entry names (not paths) in ``path``; empty when it does not exist."""
        try:
            if self.is_local:
                return sorted(os.listdir(path))
            entries = self.fs.ls(path, detail=False, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        base = path.rstrip("/")
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries if e.rstrip("/") != base)

    def size(self, path: str) -> int:
        if self.is_local:
            return os.path.getsize(path)
        return int(self.fs.size(path))

    # --- writes -------------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        try:
            if self.is_local:
                os.makedirs(path, exist_ok=True)
            else:
                self.fs.makedirs(path, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create directory {self.display(path)}: {e}") from e

    def write_chunks(self, path: str, chunks: Iterable[memoryview], durable: bool = True) -> int:
        """Write ``chunks`` to a new file in order; fsync it when ``durable`` and the
        filesystem allows. Returns the bytes written."""
        written = 0
        try:
            if self.is_local:
                with open(path, "wb", buffering=0) as f:
                    for chunk in chunks:
                        written += _write_all(f, chunk)
                    if durable:
                        os.fsync(f.fileno())
            else:
                with self.fs.open(path, "wb") as f:
                    for chunk in chunks:
                        f.write(chunk)
                        written += chunk.nbytes
        except OSError as e:
            raise StorageError(f"writing {self.display(path)} failed: {e}") from e
        return written

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        """Publish a small file all-or-nothing: tmp + fsync + rename locally, one PUT
        on object stores."""
        try:
            if self.is_local:
                tmp = path + ".tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                self.sync_dir(os.path.dirname(path))
            else:
                self.fs.pipe_file(path, data)
        except OSError as e:
            raise StorageError(f"writing {self.display(path)} failed: {e}") from e

    def rename(self, src: str, dst: str) -> None:
        """Atomically rename a directory (local filesystems only)."""
        try:
            os.rename(src, dst)
            self.sync_dir(os.path.dirname(dst))
        except OSError as e:
            raise StorageError(
                f"renaming {self.display(src)} to {self.display(dst)} failed: {e}"
            ) from e

    def remove_tree(self, path: str) -> None:
        try:
            if self.is_local:
                import shutil

                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
            elif self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except OSError as e:
            raise StorageError(f"deleting {self.display(path)} failed: {e}") from e

    def sync_dir(self, path: str) -> None:
        """fsync a directory so a rename or new entry in it is durable."""
        if not self.is_local:
            return
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    # --- reads --------------------------------------------------------------------
    def read_bytes(self, path: str) -> bytes:
        try:
            if self.is_local:
                with open(path, "rb") as f:
                    return f.read()
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise
        except OSError as e:
            raise StorageError(f"reading {self.display(path)} failed: {e}") from e

    def open_read(self, path: str) -> Any:
        try:
            if self.is_local:
                return open(path, "rb", buffering=0)
            return self.fs.open(path, "rb")
        except OSError as e:
            raise StorageError(f"opening {self.display(path)} failed: {e}") from e


def read_into(f: Any, offset: int, out: memoryview, path: str) -> None:
    """Fill ``out`` from byte ``offset`` of the open file ``f``; a short read means the
    file was truncated."""
    f.seek(offset)
    view = out.cast("B") if out.format != "B" else out
    got = 0
    readinto = getattr(f, "readinto", None)
    while got < view.nbytes:
        if readinto is not None:
            n = readinto(view[got:])
        else:
            data = f.read(view.nbytes - got)
            n = len(data)
            view[got : got + n] = data
        if not n:
            raise StorageError(
                f"{path} is truncated: expected {view.nbytes} bytes at offset {offset}, "
                f"got {got}"
            )
        got += n


def crc32(view: memoryview, value: int = 0) -> int:
    return zlib.crc32(view, value)


def _write_all(f: Any, chunk: memoryview) -> int:
    view = chunk.cast("B") if chunk.format != "B" else chunk
    total = 0
    while total < view.nbytes:
        n = f.write(view[total:])
        if n is None:
            n = view.nbytes - total
        total += n
    return total


def _protocol(fs: Any) -> str:
    proto = fs.protocol
    if isinstance(proto, (tuple, list)):
        proto = proto[0]
    return str(proto)
