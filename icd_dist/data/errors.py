"""Errors about input data; every message names the shard and the sample."""

from __future__ import annotations


class BadSampleError(ValueError):
    """A sample that cannot be used: corrupt image or label, ids out of range, size mismatch,
    missing member, truncated shard or checksum mismatch."""

    def __init__(self, reason: str, key: str | None = None, shard: str | None = None):
        self.reason = reason
        self.key = key
        self.shard = shard
        where = []
        if shard:
            where.append(f"shard {shard}")
        if key:
            where.append(f"sample {key!r}")
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)

    def __reduce__(self):
        return (type(self), (self.reason, self.key, self.shard))


class BadShardError(ValueError):
    """Shard files that do not match their manifest (missing, truncated or replaced, checksum
    mismatch), found before anything reads them; the message is one line naming the folder,
    each bad shard and why."""

    def __init__(self, folder: str, problems: list[str]):
        self.folder = str(folder)
        self.problems = list(problems)
        super().__init__(f"{self.folder}: {'; '.join(self.problems)}")

    def __reduce__(self):
        return (type(self), (self.folder, self.problems))
