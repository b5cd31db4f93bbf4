"""Reading a file somebody named (a command-line argument, a config entry) without trusting it.

Only regular files are read: a FIFO blocks forever, `/dev/zero` never ends, a directory has no bytes.
The file is opened without blocking and checked on the open descriptor, so a file swapped after the
check is checked too, and at most the limit plus one byte is ever read, whatever the size claims.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


class NotARegularFile(ValueError):
    """The path names a directory, a pipe, a device or a socket; the message says which."""


class FileTooLarge(ValueError):
    """The file is larger than the limit; `size` is how large (at least the limit plus one byte)."""

    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of the regular file at `path` if there are at most `max_bytes` of them.

    Raises `NotARegularFile`, `FileTooLarge`, or `OSError` when the file can't be opened or read."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
            raise NotARegularFile(f"{path} is {kind}, not a regular file.")
        if info.st_size > max_bytes:
            raise FileTooLarge(info.st_size)
    except BaseException:
        os.close(descriptor)
        raise
    with os.fdopen(descriptor, "rb") as file:
        data = file.read(max_bytes + 1)
    if len(data) > max_bytes:  # the file grew after the check
        raise FileTooLarge(len(data))
    return data
