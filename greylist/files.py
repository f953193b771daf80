"""Reading the small files an administrator names: settings, whitelists,
secrets.

DESCRIPTION
    read_small() opens without blocking (a FIFO put in the file's place
    would hang open(2) for ever, and with it greylistd's event loop at a
    SIGHUP), takes only a regular file, and reads at most cap bytes: a
    larger file (or /dev/zero) is an error, never read whole. follow:
    whether a symbolic link at the path is followed (settings and
    whitelist files may be links, as Postfix's own files may; a secret
    never is).

DIAGNOSTICS
    OSError, with a strerror that says what is wrong.
"""

import errno
import os
import stat


def read_small(path: str, cap: int, follow: bool = True) -> tuple[bytes, os.stat_result]:
    """The bytes of the regular file at path, and its status."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        chunks, size = [], 0
        while size <= cap:
            chunk = os.read(fd, min(65536, cap + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > cap:
            raise OSError(errno.EFBIG, "larger than %d bytes" % cap)
        return b"".join(chunks), st
    finally:
        os.close(fd)
