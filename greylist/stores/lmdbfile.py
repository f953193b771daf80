"""Checks of a Postfix lmdb table's file before LMDB maps it.

DESCRIPTION
    The table lmdb:NAME is the single file NAME.lmdb. Before it is
    mapped, check_directory() refuses a missing or world-writable
    directory, and, for a process running as root, a directory that
    another user owns or that a group can write: root never opens,
    creates or deletes a file on behalf of a directory another user can
    write (that user could link the name to any file of root's). Any
    other process refuses a directory that another user owns, or that a
    group other than its own can write: that user, or that group's
    users, could put a table of theirs, which Postfix trusts, in place
    of ours.
    open_data_file() opens the file itself with O_NOFOLLOW (a symbolic
    link is refused, never followed) or creates it with O_EXCL and the
    mode the table needs; the checks that follow look at the opened
    descriptor, not the path. check_format() refuses a world-writable
    file, a file in LMDB 1.0's data format v3 (which Postfix's LMDB 0.9
    cannot read) and a file that is not LMDB at all; check_length(), run
    under a shared lock so that a writer growing the file is not taken
    for damage, refuses a file shorter than its newest meta page says,
    which LMDB would read through its map until the process died of
    SIGBUS, without a reply or a log line. describe() turns an LMDB
    error into a message that names the recovery.

    Modes: the database itself is created 0600 (Postfix never reads
    it); a table that Postfix reads (the client, correspondent and
    postscreen tables) 0640 when its directory is set-group-ID, so that
    the directory's group (postfix, as the README installs it) can read
    it and nobody else can, and otherwise 0644, as Postfix creates its
    own tables (slmdb.c). An existing file keeps its mode.

DIAGNOSTICS
    StoreError, with a message for the administrator.
"""

import errno
import os
import stat
import struct

import lmdb

from greylist.stores.base import StoreError

SUFFIX = ".lmdb"
# LMDB 0.9 meta page: 16-byte page header (64-bit), then mm_magic and
# mm_version; MDB_DATA_VERSION is 1 for 0.9 (mdb.c). LMDB 1.0 writes 3.
MDB_MAGIC = 0xBEEFC0DE
_META_V1 = struct.pack("=II", MDB_MAGIC, 1)
# What a data file of format 1 has at 16 in its first page.
META_V1 = _META_V1
# Offsets in an LMDB 0.9 meta page on 64-bit hosts (mdb.c MDB_meta): the
# page size is kept in the free DB's md_pad, then mm_last_pg, mm_txnid.
_META_PAGE_SIZE = 40
_META_LAST_PAGE = 136
_META_END = 152
MOVE_ASIDE = "move the file aside (do not truncate it) and a new one is created"


def data_file(name: str) -> str:
    """Return the data file of the Postfix table lmdb:name."""
    return name + SUFFIX


def check_directory(path: str, what: str = "database") -> None:
    """Raise StoreError unless path's directory exists and is safe to use:
    not world-writable, as root neither another user's nor
    group-writable, and otherwise root's or this process's user's and
    writable by no group but this process's own. what: the file's kind,
    for the message."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise StoreError("%s directory %s: %s" % (what, directory, exc.strerror)) from None
    if st.st_mode & stat.S_IWOTH:
        raise StoreError("refusing %s directory %s: it is world-writable; use "
                         "a directory writable only by the policy user" % (what, directory))
    if os.geteuid() == 0:
        if st.st_uid != 0 or st.st_mode & stat.S_IWGRP:
            raise StoreError("refusing to use %s directory %s as root: another user "
                             "can write it (owner uid %d, mode %04o); run as the policy user"
                             % (what, directory, st.st_uid, stat.S_IMODE(st.st_mode)))
    elif st.st_uid not in (0, os.geteuid()):
        # Its owner can write it (or chmod it so), and could do the same.
        raise StoreError("refusing %s directory %s: it belongs to uid %d, neither "
                         "root nor this process's user; use a directory of the policy "
                         "user's" % (what, directory, st.st_uid))
    elif st.st_mode & stat.S_IWGRP and st.st_gid != os.getegid():
        # Its group's users (postfix, with -g postfix -m 2770) could put
        # their own file in place of a table that Postfix trusts.
        raise StoreError("refusing %s directory %s: its group (gid %d), which is not "
                         "this process's, can write it (mode %04o); use a directory that "
                         "only the policy user can write, as install -d -o greylist -g "
                         "postfix -m 2750 makes it"
                         % (what, directory, st.st_gid, stat.S_IMODE(st.st_mode)))


def open_data_file(path: str, readonly: bool, private: bool) -> tuple[int, bool]:
    """Open path for LMDB and return (descriptor, existed).

    An existing file is opened with O_NOFOLLOW and O_NONBLOCK and must
    be a regular file; a missing one (unless readonly) is created with O_EXCL, so a
    dangling link is never followed either, with the mode of the module
    description. Raises StoreError.
    """
    # O_NONBLOCK: a FIFO at the name would hang a read-only open(2) for
    # ever (greylistctl stats); on a regular file it changes nothing.
    flags = ((os.O_RDONLY if readonly else os.O_RDWR) | os.O_NOFOLLOW | os.O_NONBLOCK
             | os.O_CLOEXEC)
    try:
        fd = os.open(path, flags)
        existed = True
    except FileNotFoundError:
        if readonly:
            raise StoreError("%s: no such database" % path) from None
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            existed = False
        except FileExistsError:
            return open_data_file(path, readonly, private)  # Another process won.
        except OSError as exc:
            raise StoreError("cannot create %s: %s" % (path, _reason(exc))) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError("refusing %s: it is a symbolic link; the database must "
                             "be a file in its directory" % path) from None
        raise StoreError("cannot open %s: %s" % (path, _reason(exc))) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError("refusing %s: not a regular file" % path)
        if readonly and st.st_size == 0:
            # LMDB initialises an empty file when it may write; a reader
            # cannot (py-lmdb: "Bad file descriptor").
            raise StoreError("%s: an empty file, no database yet (greylist initialises it "
                             "at its first write)" % path)
        if not existed:
            # Whatever the umask: see the module description.
            os.fchmod(fd, 0o600 if private else _table_mode(path))
    except BaseException:
        os.close(fd)
        raise
    return fd, existed


def _table_mode(path: str) -> int:
    directory = os.stat(os.path.dirname(os.path.abspath(path)))
    return 0o640 if directory.st_mode & stat.S_ISGID else 0o644


def _reason(exc: OSError) -> str:
    """An OSError's reason, naming a full file system as such."""
    if exc.errno == errno.ENOSPC:
        return "the file system is full"
    return exc.strerror or str(exc)


def check_format(path: str, fd: int) -> None:
    """Check the LMDB format of the open file fd (path names it in errors).

    Raises StoreError for a world-writable file, a file in LMDB 1.0's
    format v3, and a file that is not an LMDB database at all. An empty
    file passes: LMDB initialises it. The magic and version of the first
    meta page never change once written, so no lock is needed.
    """
    try:
        mode = os.fstat(fd).st_mode
        head = os.pread(fd, 32, 0)
    except OSError as exc:
        raise StoreError("cannot read %s: %s" % (path, exc.strerror)) from None
    if mode & stat.S_IWOTH:
        raise StoreError("refusing world-writable database file %s" % path)
    if not head or head[16:24] == _META_V1:
        return
    if head[24:28] == struct.pack("=I", MDB_MAGIC):
        version = struct.unpack("=I", head[28:32])[0]
        raise StoreError("%s is in LMDB data format v%d, which Postfix's LMDB 0.9 "
                         "cannot read; %s" % (path, version, MOVE_ASIDE))
    raise StoreError("%s is not an LMDB 0.9 database (corrupt or foreign file); %s"
                     % (path, MOVE_ASIDE))


_DAMAGE = tuple(getattr(lmdb, name) for name in (
    "CorruptedError", "PageNotFoundError", "InvalidError", "PanicError",
    "BadTxnError", "VersionMismatchError", "CursorFullError") if hasattr(lmdb, name))


# Free space under which LMDB's "Input/output error" is a full file
# system: LMDB 0.9 reports a short write(2) as EIO (mdb_page_flush).
FULL_BELOW_BYTES = 1024 * 1024


def describe(path: str, exc: Exception) -> str:
    """An error message; for a damaged file it names the recovery, and an
    I/O error on a full file system says so."""
    if isinstance(exc, _DAMAGE):
        return "%s is damaged (%s); %s" % (path, exc, MOVE_ASIDE)
    text = str(exc)
    if "Input/output error" in text:
        try:
            vfs = os.statvfs(os.path.dirname(os.path.abspath(path)))
            if vfs.f_bavail * vfs.f_frsize < FULL_BELOW_BYTES:
                text += " (the file system is full)"
        except OSError:
            pass
    return text if path in text else "%s: %s" % (path, text)


def check_length(path: str, fd: int) -> None:
    """Raise StoreError if the open file fd is shorter than its newest
    meta page says. Only under a lock: a writer extends the file before
    it writes the meta page that names the new pages.

    LMDB would read the missing pages through its map and the process
    would die of SIGBUS, without a reply or a log line.
    """
    try:
        size = os.fstat(fd).st_size
        if not size:
            return
        first = os.pread(fd, _META_END, 0)
        page_size = struct.unpack_from("=I", first, _META_PAGE_SIZE)[0]
        if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
            raise StoreError("%s has an invalid page size; %s" % (path, MOVE_ASIDE))
        second = os.pread(fd, _META_END, page_size)
    except (OSError, struct.error) as exc:
        raise StoreError("cannot read %s: %s" % (path, exc)) from None
    metas = [struct.unpack_from("=QQ", meta, _META_LAST_PAGE) for meta in (first, second)
             if len(meta) == _META_END and meta[16:24] == _META_V1]
    if not metas:
        raise StoreError("%s has no valid meta page; %s" % (path, MOVE_ASIDE))
    last_page = max(metas, key=lambda meta: meta[1])[0]
    if size < (last_page + 1) * page_size:
        raise StoreError("%s is truncated (%d bytes, its meta page needs %d); %s"
                         % (path, size, (last_page + 1) * page_size, MOVE_ASIDE))
