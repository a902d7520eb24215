"""Run storage: a local folder or any URI pyarrow understands (s3://, gs://, ...).

Paths inside a run are relative ("trials/params.json"). Writes go to a temporary name and are
then moved into place where the filesystem can (local); object stores make a put atomic.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow.fs as pafs


class Storage:
    """Read and write files under one root (local path or URI)."""

    def __init__(self, root: str):
        self.root_uri = root
        if "://" in root:
            self.fs, self.root = pafs.FileSystem.from_uri(root)
            self.local = False
        else:
            self.fs = pafs.LocalFileSystem()
            self.root = str(Path(root).resolve())
            self.local = True

    def path(self, rel: str) -> str:
        """The filesystem path of `rel`."""
        return f"{self.root}/{rel}" if rel else self.root

    def uri(self, rel: str = "") -> str:
        """A path or URI of `rel` for other tools (Ray's storage_path, W&B, users)."""
        if self.local:
            return self.path(rel)
        scheme = self.root_uri.split("://", 1)[0]
        return f"{scheme}://{self.path(rel)}"

    def child(self, rel: str) -> Storage:
        """A Storage rooted at `rel` inside this one."""
        return Storage(self.uri(rel))

    def exists(self, rel: str) -> bool:
        """Whether the file or folder `rel` exists."""
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def makedirs(self, rel: str = "") -> None:
        """Create the folder `rel` (and parents)."""
        self.fs.create_dir(self.path(rel), recursive=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a file atomically (temporary name + move on local disks)."""
        parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
        self.makedirs(parent)
        if self.local:
            tmp = self.path(rel) + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path(rel))
        else:
            with self.fs.open_output_stream(self.path(rel)) as f:
                f.write(data)

    def read_bytes(self, rel: str) -> bytes:
        """The content of file `rel`."""
        with self.fs.open_input_file(self.path(rel)) as f:
            return f.read()

    def write_json(self, rel: str, data: object) -> None:
        """Write JSON atomically."""
        self.write_bytes(rel, json.dumps(data, indent=2).encode())

    def read_json(self, rel: str) -> object:
        """Parse JSON file `rel`."""
        return json.loads(self.read_bytes(rel))

    def save_torch(self, rel: str, obj: object) -> None:
        """torch.save to `rel` atomically."""
        import torch

        buf = io.BytesIO()
        torch.save(obj, buf)
        self.write_bytes(rel, buf.getvalue())

    def load_torch(self, rel: str) -> object:
        """torch.load of `rel` with weights_only=True (nothing in it can run code)."""
        import torch

        return torch.load(io.BytesIO(self.read_bytes(rel)), map_location="cpu",
                          weights_only=True)
