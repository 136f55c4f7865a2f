"""Open an indexed file for serving only if it is still the file that was indexed.

The server answers /file/ID and /thumb/ID from the path stored in the index. Whatever is at that path now
may have been swapped: a symlink to /etc/shadow, a text file, the index's own meta.sqlite copied over the
photo. `open_indexed` opens the path without following a symlink in its last component, refuses anything
that is not a regular file or that lies inside the index directory, and compares the open descriptor's
size and mtime with the row (and, when they differ, its content hash: a file touched but not changed is
still fine). The caller reads from that descriptor, never from the path again, so a swap after the check
cannot change what is sent.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass

CHANGED = "changed since it was indexed; run index"
_CHUNK = 1 << 20


class FileChanged(Exception):
    """The file at the indexed path is gone or is not the one indexed (the message says which)."""


@dataclass
class CheckedFile:
    fd: int
    size: int
    mtime_ns: int
    path: str

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):  # a response that was never started (client gone) must not leak the descriptor
        try:
            self.close()
        except OSError:
            pass

    def chunks(self, size: int = 256 * 1024):
        """The file's bytes from the checked descriptor (closed at the end or when the client goes)."""
        try:
            offset = 0
            while True:
                data = os.pread(self.fd, size, offset)
                if not data:
                    return
                offset += len(data)
                yield data
        finally:
            self.close()

    def reader(self):
        """A binary file object on a duplicate of the descriptor, at the start (for PIL)."""
        f = os.fdopen(os.dup(self.fd), "rb")
        f.raw.name = os.path.basename(self.path)  # for error messages (else the descriptor's number)
        f.seek(0)
        return f


def _fd_hash(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while True:
        data = os.pread(fd, _CHUNK, offset)
        if not data:
            return h.hexdigest()
        h.update(data)
        offset += len(data)


def _opened_path(fd: int, fallback: str) -> str:
    """Where the descriptor really points (Linux: /proc/self/fd), else the resolved path."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(fallback)


def _inside(path: str, directory: str) -> bool:
    directory = directory.rstrip(os.sep) + os.sep
    return path == directory[:-1] or path.startswith(directory)


def open_indexed(path: str, size: int, mtime_ns: int, content_hash: str, index_root) -> CheckedFile:
    """The indexed file at `path`, open, checked against the row's size, mtime and hash. Raises
    FileChanged with a reason otherwise. The caller owns (and closes) the descriptor."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: a FIFO swapped in must not hang the worker
    except FileNotFoundError:
        raise FileChanged("is no longer on disk") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK):  # the last component is now a symlink
            raise FileChanged(CHANGED) from None
        raise FileChanged(f"cannot be read ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileChanged(CHANGED)
        root = os.path.realpath(os.fspath(index_root))
        if _inside(_opened_path(fd, path), root):
            raise FileChanged(CHANGED)
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns) and _fd_hash(fd) != content_hash:
            raise FileChanged(CHANGED)
        return CheckedFile(fd, st.st_size, st.st_mtime_ns, path)
    except BaseException:
        os.close(fd)
        raise
