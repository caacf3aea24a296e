"""The disk tier's file operations: reading only regular files, writing by rename.

Plain functions over path strings, so :mod:`kvstrata.tiers.disk` keeps the tier's
bookkeeping (index, LRU, capacity) and these keep the file system's hostile cases
(see that module's docstring): a name that holds anything but a regular file is
:class:`NotAnObject`; other file-system failures are ``OSError`` for the caller to wrap.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import uuid

#: errors that concern one object's name (a directory or file in its way), not the tier:
#: that object is skipped, the rest of the batch goes on
NAME_ERRORS = {errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ELOOP, errno.ENOTEMPTY}


class NotAnObject(Exception):
    """The name holds something the tier cannot have written (not a regular file, too large)."""


def read_range(path: str, start: int, end: int | None, max_size: int) -> bytes | None:
    """Bytes [start, end) of the regular file ``path`` (to its end if ``end`` is None); None if
    absent. Raises NotAnObject for a name that holds anything else (never opened if lstat says
    so; O_NONBLOCK, O_NOFOLLOW and fstat cover a swap between lstat and open) or a file larger
    than ``max_size``; OSError when the file system fails."""
    try:
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):
            raise NotAnObject(f"{kind(mode)} under the object's name")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # swapped for a symlink after the lstat
            raise NotAnObject("symlink under the object's name") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAnObject(f"{kind(st.st_mode)} under the object's name")
        if st.st_size > max_size:  # puts larger than the tier are never stored
            raise NotAnObject(f"file of {st.st_size} bytes, larger than the tier ({max_size})")
        # Files are replaced by rename, never changed in place: the size of the
        # open file is the size of the object it holds.
        stop = st.st_size if end is None else min(end, st.st_size)
        return pread(fd, start, max(0, stop - start))
    finally:
        os.close(fd)


def write_by_rename(path: str, data: bytes) -> bool:
    """Write ``data`` under ``path`` through a temporary file and a rename; False if that name
    cannot take a file (a directory in the way). Raises OSError when the file system fails.

    The temporary name is random and created with O_EXCL|O_NOFOLLOW: nothing planted in the
    directory (a FIFO, a symlink) can be opened or followed by the write.
    """
    parent, name = os.path.split(path)
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        os.makedirs(parent, exist_ok=True)
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
    except OSError as exc:
        if exc.errno in NAME_ERRORS:
            return False
        raise
    try:
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        unlink_quietly(tmp)
        if exc.errno in NAME_ERRORS:
            return False
        raise
    return True


def kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def pread(fd: int, offset: int, n: int) -> bytes:
    """``n`` bytes from ``offset``, fewer only at end of file."""
    data = os.pread(fd, n, offset)
    if len(data) == n or not data:
        return data
    parts = [data]  # a short read before the end: rare (signals), but allowed
    got = len(data)
    while got < n:
        more = os.pread(fd, n - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
