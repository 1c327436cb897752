"""A narrow storage interface over fsspec: just what checkpoints need.

Paths stay strings (``pathlib`` would mangle ``s3://``). Local filesystems take a fast
path with plain ``open``/``os`` calls so files can be ``fsync``-ed and directories
renamed atomically; every other protocol (memory://, s3://, gs://...) goes through
fsspec, where a single object PUT is atomic and there is no rename.

Every path a `Storage` hands out (``root``, ``path()``, ``join()``) is one that
``Storage(path)`` accepts again and resolves to the same place: an absolute path on a
local filesystem, a full URL (``s3://bucket/run/ckpt_3``) on any other. So a
checkpoint path found by listing an ``s3://`` run can be loaded, logged and handed to
the command line as it is.

Remote credentials and endpoints come from the usual places: the store's own
environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``...), fsspec's
configuration (``FSSPEC_S3_ENDPOINT_URL``, ``FSSPEC_S3_KEY``, ``FSSPEC_S3_SECRET``, or
files in ``~/.config/fsspec``, read when fsspec is imported), or ``storage_options``.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import zlib
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


class StorageError(OSError):
    """A storage operation failed; the message names the path."""


class Storage:
    """A filesystem rooted at ``url`` (a local path or any fsspec URL)."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        if not isinstance(url, str) or not url:
            raise ValueError(f"a storage location must be a non-empty path or URL, got {url!r}")
        self.url = url
        self.storage_options = dict(storage_options)
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.protocol = "file" if self.is_local else _protocol(self.fs)
        if self.is_local:
            self.root = os.path.abspath(root)
        else:
            self.root = self._remote_url(root.rstrip("/") or root, url)

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    # --- names --------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Absolute path of ``parts`` under the root (a URL on remote stores)."""
        return self.join(self.root, *parts)

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

    def strip(self, path: str) -> str:
        """``path`` as the filesystem itself spells it (no protocol)."""
        if self.is_local:
            return path
        return self.fs._strip_protocol(path)

    @property
    def atomic_rename(self) -> bool:
        """Whether a directory can be renamed atomically (local POSIX filesystems)."""
        return self.is_local

    def _remote_url(self, stripped: str, url: str) -> str:
        """The canonical URL of ``stripped``; the user's own spelling where the
        canonical one would not resolve back to it (a protocol whose URLs carry a host
        that the filesystem's paths do not)."""
        candidate = f"{self.protocol}://{stripped.lstrip('/')}"
        try:
            if self.fs._strip_protocol(candidate).rstrip("/") == stripped.rstrip("/"):
                return candidate
        except Exception:  # noqa: BLE001 - an odd protocol: keep the user's URL
            pass
        return url.rstrip("/") if url.rstrip("/") else url

    def _invalidate(self, path: str) -> None:
        """Forget cached listings of ``path`` and its parents: another process (a rank,
        a training run being inspected) may have written there since."""
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache(self.strip(path))

    @contextlib.contextmanager
    def _errors(self, what: str, path: str, keep_not_found: bool = False) -> Iterator[None]:
        """Raise failures as `StorageError` naming ``path``. Remote stores raise more
        than ``OSError`` (a connection or credentials error of their client), so there
        any ``Exception`` is wrapped."""
        try:
            yield
        except StorageError:
            raise
        except FileNotFoundError:
            if keep_not_found:
                raise
            raise StorageError(f"{what} {self.display(path)} failed: not found") from None
        except OSError as e:
            raise StorageError(f"{what} {self.display(path)} failed: {e}") from e
        except Exception as e:
            if self.is_local:
                raise
            raise StorageError(
                f"{what} {self.display(path)} failed: {type(e).__name__}: {e}"
            ) from e

    # --- queries ------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        if self.is_local:
            return os.path.exists(path)
        self._invalidate(path)
        with self._errors("checking", path):
            return bool(self.fs.exists(path))

    def listdir(self, path: str) -> list[str]:
        """Entry names (not paths) in ``path``; empty when it does not exist."""
        try:
            if self.is_local:
                return sorted(os.listdir(path))
            with self._errors("listing", path, keep_not_found=True):
                entries = self.fs.ls(path, detail=False, refresh=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        base = self.strip(path).rstrip("/")
        names = set()
        for entry in entries:
            entry = self.strip(entry).rstrip("/")
            if entry and entry != base:
                names.add(posixpath.basename(entry))
        return sorted(names)

    def size(self, path: str) -> int:
        if self.is_local:
            return os.path.getsize(path)
        self._invalidate(path)
        with self._errors("reading the size of", path, keep_not_found=True):
            return int(self.fs.size(path))

    def file_sizes(self, path: str) -> dict[str, int]:
        """Every file below ``path`` (names relative to it, ``/``-separated) with its
        size; empty when ``path`` does not exist. Local links are not followed (a
        ``ckpt_N`` linked to ``/`` would walk the whole machine): a link counts as
        itself."""
        out: dict[str, int] = {}
        if self.is_local:
            if os.path.islink(path) or os.path.isfile(path):
                with contextlib.suppress(OSError):
                    return {os.path.basename(path): os.lstat(path).st_size}
                return {}
            for dirpath, _dirs, files in os.walk(path):
                for name in files:
                    full = os.path.join(dirpath, name)
                    rel = os.path.relpath(full, path).replace(os.sep, "/")
                    with contextlib.suppress(OSError):  # deleted meanwhile
                        out[rel] = os.lstat(full).st_size
            return out
        self._invalidate(path)
        base = self.strip(path).rstrip("/")
        try:
            with self._errors("listing", path, keep_not_found=True):
                found = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return {}
        for name, info in found.items():
            if info.get("type") == "directory":
                continue
            name = self.strip(name)
            rel = name[len(base) + 1 :] if name.startswith(base + "/") else posixpath.basename(name)
            out[rel] = int(info.get("size") or 0)
        return out

    # --- writes -------------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        try:
            if self.is_local:
                os.makedirs(path, exist_ok=True)
            elif _has_directories(self.fs):
                self.fs.makedirs(path, exist_ok=True)
            # object stores have no directories: a key's prefix needs no creating, and
            # s3fs' makedirs would create a missing *bucket* (a typo becomes a new
            # bucket); the first write reports a missing bucket instead
        except Exception as e:
            if self.is_local and not isinstance(e, OSError):
                raise
            raise StorageError(f"cannot create directory {self.display(path)}: {e}") from e

    def write_chunks(self, path: str, chunks: Iterable[memoryview], durable: bool = True) -> int:
        """Write ``chunks`` to a new file in order; fsync it when ``durable`` and the
        filesystem allows. Returns the bytes written.

        On an object store the file is one (multipart) upload that becomes visible when
        complete; if writing fails half-way the upload is aborted, never completed
        with part of the data."""
        written = 0
        if self.is_local:
            try:
                with open(path, "wb", buffering=0) as f:
                    for chunk in chunks:
                        written += _write_all(f, chunk)
                    if durable:
                        os.fsync(f.fileno())
            except OSError as e:
                raise StorageError(f"writing {self.display(path)} failed: {e}") from e
            return written
        with self._errors("writing", path):
            f = self.fs.open(path, "wb")
        try:
            for chunk in chunks:  # an error of the chunks' producer is raised as it is
                view = chunk.cast("B") if chunk.format != "B" else chunk
                with self._errors("writing", path):
                    f.write(view)
                written += view.nbytes
            with self._errors("writing", path):
                f.close()  # completes the upload: the file appears now
        except BaseException:
            _abandon(f)
            raise
        return written

    def write_bytes_atomic(self, path: str, data: bytes) -> None:
        """Publish a small file all-or-nothing: tmp + fsync + rename locally, one PUT
        on object stores."""
        if self.is_local:
            try:
                tmp = path + ".tmp"
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                self.sync_dir(os.path.dirname(path))
            except OSError as e:
                raise StorageError(f"writing {self.display(path)} failed: {e}") from e
            return
        with self._errors("writing", path):
            self.fs.pipe_file(path, data)

    def rename(self, src: str, dst: str) -> None:
        """Atomically rename a directory (local filesystems only)."""
        if not self.is_local:
            raise StorageError(
                f"cannot rename {self.display(src)}: {self.protocol}:// has no atomic rename"
            )
        try:
            os.rename(src, dst)
            self.sync_dir(os.path.dirname(dst))
        except OSError as e:
            raise StorageError(
                f"renaming {self.display(src)} to {self.display(dst)} failed: {e}"
            ) from e

    def remove_tree(self, path: str) -> None:
        if self.is_local:
            try:
                import shutil

                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
            except OSError as e:
                raise StorageError(f"deleting {self.display(path)} failed: {e}") from e
            return
        self._invalidate(path)
        with self._errors("deleting", path):
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)

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
        """The whole file; ``FileNotFoundError`` when there is none."""
        if self.is_local:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                raise
            except OSError as e:
                raise StorageError(f"reading {self.display(path)} failed: {e}") from e
        with self._errors("reading", path, keep_not_found=True):
            return bytes(self.fs.cat_file(path))

    def open_read(self, path: str) -> Any:
        """A binary file for `read_into`. On remote stores it reads exactly the bytes
        asked for (no read-ahead): every chunk is one ranged GET."""
        if self.is_local:
            try:
                return open(path, "rb", buffering=0)
            except OSError as e:
                raise StorageError(f"opening {self.display(path)} failed: {e}") from e
        with self._errors("opening", path):
            try:
                return self.fs.open(path, "rb", cache_type="none")
            except TypeError:  # a filesystem whose files take no cache_type
                return self.fs.open(path, "rb")


def read_into(f: Any, offset: int, out: memoryview, path: str) -> None:
    """Fill ``out`` from byte ``offset`` of the open file ``f``; a short read means the
    file was truncated. A local file is read with ``pread`` (positional: no seek, and
    threads may share one open file)."""
    view = out.cast("B") if out.format != "B" else out
    got = 0
    if isinstance(f, io.FileIO):
        fd = f.fileno()
        while got < view.nbytes:
            n = os.preadv(fd, [view[got:]], offset + got)
            if not n:
                break
            got += n
    else:
        f.seek(offset)
        readinto = getattr(f, "readinto", None)
        while got < view.nbytes:
            if readinto is not None:
                n = readinto(view[got:])
            else:
                data = f.read(view.nbytes - got)
                n = len(data)
                view[got : got + n] = data
            if not n:
                break
            got += n
    if got < view.nbytes:
        raise StorageError(
            f"{path} is truncated: expected {view.nbytes} bytes at offset {offset}, "
            f"got {got}"
        )


try:  # ISA-L's CRC32: the same polynomial and values as zlib's, several times faster
    from isal.isal_zlib import crc32 as _fast_crc32
except ImportError:  # pragma: no cover - isal is in requirements/cpu.txt
    _fast_crc32 = None


def crc32(view: memoryview, value: int = 0) -> int:
    """zlib-compatible CRC32 of ``view`` continuing from ``value`` (what every chunk's
    checksum in a manifest is). Uses ISA-L when installed, else zlib: same values."""
    if _fast_crc32 is not None:
        return _fast_crc32(view, value)
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


def _abandon(f: Any) -> None:
    """Drop a half-written remote file without publishing it: abort its multipart
    upload where the file can (``discard``), and never ``close()`` it (closing an
    fsspec file completes the upload with what was written so far)."""
    discard = getattr(f, "discard", None)
    if callable(discard):
        with contextlib.suppress(Exception):
            discard()
    with contextlib.suppress(Exception):
        f.closed = True  # fsspec's buffered files: no upload from close() / __del__


_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})


def _has_directories(fs: Any) -> bool:
    protos = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return not any(p in _OBJECT_STORES for p in protos)


def _protocol(fs: Any) -> str:
    proto = fs.protocol
    if isinstance(proto, (tuple, list)):
        proto = proto[0]
    return str(proto)
