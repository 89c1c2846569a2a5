"""Reading a file a user names (a job file, a template, a config, a password file): only a
regular file, and only so much of it.

``Path(p).read_text()`` on ``/dev/zero`` reads until memory runs out (16 GB in 8 s, seen with
``source pg --template /dev/zero``), and on a FIFO it blocks forever. Errors are ``OSError``
with a ``strerror`` in plain words, so callers keep their one ``except OSError``.
"""
from __future__ import annotations

import errno
import os
import stat

#: Default cap: a job file of a few hundred thousand jobs fits; a config never comes near.
MAX_BYTES = 512 * 2**20


def read_text(path: str | os.PathLike, limit: int = MAX_BYTES) -> str:
    """The text of the regular file ``path`` (UTF-8), at most ``limit`` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a device, FIFO or directory)",
                          str(path))
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit:,} bytes", str(path))
        chunks, got = [], 0
        while True:
            b = os.read(fd, min(1 << 20, limit + 1 - got))
            if not b:
                break
            chunks.append(b)
            got += len(b)
            if got > limit:  # it grew while we read
                raise OSError(errno.EFBIG, f"larger than {limit:,} bytes", str(path))
    finally:
        os.close(fd)
    return b"".join(chunks).decode()
