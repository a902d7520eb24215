"""Where shard folders live: a local folder, or any URI pyarrow understands (s3://, gs://).

Samples are read by their manifest byte ranges in either case: pread on a local file, a
ranged GET (pyarrow's read_at) on an object store. Object-store credentials and endpoints
come from the usual environment (AWS_*, GOOGLE_*), as for run storage.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def is_remote(location: str | Path) -> bool:
    """Whether a shard folder (or file) is a URI rather than a local path."""
    return "://" in str(location)


def join(folder: str | Path, name: str) -> str:
    """folder/name for a local path or a URI."""
    return f"{str(folder).rstrip('/')}/{name}" if is_remote(folder) else str(Path(folder) / name)


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def exists(location: str | Path) -> bool:
    """Whether a file exists, locally or in an object store."""
    if not is_remote(location):
        return Path(location).is_file()
    import pyarrow.fs as pafs

    fs, path = _filesystem(str(location))
    return fs.get_file_info(path).type == pafs.FileType.File


def read_bytes(location: str | Path) -> bytes:
    """The whole content of a (small) file, locally or in an object store."""
    if not is_remote(location):
        return Path(location).read_bytes()
    fs, path = _filesystem(str(location))
    with fs.open_input_stream(path) as f:
        return f.read()


def size(location: str | Path) -> int | None:
    """The size in bytes of a file, locally or in an object store; None if it is missing."""
    if not is_remote(location):
        path = Path(location)
        return path.stat().st_size if path.is_file() else None
    import pyarrow.fs as pafs

    fs, path = _filesystem(str(location))
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def sha256(location: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, locally or in an object store, read in chunks."""
    h = hashlib.sha256()
    if is_remote(location):
        fs, path = _filesystem(str(location))
        stream = fs.open_input_stream(path)
    else:
        stream = open(location, "rb")  # noqa: SIM115 - closed by the with below
    with stream as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ShardFile:
    """Random access to one shard: read_at(size, offset) -> bytes (fewer at the end of the
    file). Local files use pread (no shared position, so forked workers may share it); remote
    ones pyarrow's ranged reads."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        self._fd = self._remote = None  # set before opening, so close() always works
        if is_remote(location):
            fs, path = _filesystem(self.location)
            self._remote = fs.open_input_file(path)
        else:
            self._fd = os.open(self.location, os.O_RDONLY)

    def read_at(self, size: int, offset: int) -> bytes:
        """`size` bytes from `offset` (fewer if the file ends first)."""
        if self._fd is not None:
            return os.pread(self._fd, size, offset)
        return self._remote.read_at(size, offset)

    def close(self) -> None:
        """Release the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        elif self._remote is not None:
            self._remote.close()
            self._remote = None

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> ShardFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
