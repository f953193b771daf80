"""Checks of a Postfix lmdb table's file before LMDB maps it.

DESCRIPTION
    The table lmdb:NAME is the single file NAME.lmdb. Before it is
    mapped, check_directory() refuses a missing or world-writable
    directory, and check_format() refuses a world-writable file, a file
    in LMDB 1.0's data format v3 (which Postfix's LMDB 0.9 cannot read),
    a file that is not LMDB at all, and a file shorter than its newest
    meta page says, which LMDB would read through its map until the
    process died of SIGBUS, without a reply or a log line. describe()
    turns an LMDB error into a message that names the recovery.

DIAGNOSTICS
    StoreError, with a message for the administrator.
"""

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
# Offsets in an LMDB 0.9 meta page on 64-bit hosts (mdb.c MDB_meta): the
# page size is kept in the free DB's md_pad, then mm_last_pg, mm_txnid.
_META_PAGE_SIZE = 40
_META_LAST_PAGE = 136
_META_END = 152
MOVE_ASIDE = "move the file aside (do not truncate it) and a new one is created"


def data_file(name: str) -> str:
    """Return the data file of the Postfix table lmdb:name."""
    return name + SUFFIX


def check_directory(path: str) -> None:
    """Raise StoreError unless path's directory exists and is not world-writable."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise StoreError("database directory %s: %s" % (directory, exc.strerror)) from None
    if st.st_mode & stat.S_IWOTH:
        raise StoreError("refusing database directory %s: it is world-writable; use "
                         "a directory writable only by the policy user" % directory)


def check_format(path: str) -> bool:
    """Check an existing data file's LMDB format; return False if it is absent.

    Raises StoreError for a world-writable file, a file in LMDB 1.0's
    format v3, and a file that is not an LMDB database at all. Opens and
    closes the file, so it must not run while this process holds a lock.
    """
    try:
        with open(path, "rb") as handle:
            st = os.fstat(handle.fileno())
            mode, size = st.st_mode, st.st_size
            head = handle.read(32)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StoreError("cannot read %s: %s" % (path, exc.strerror)) from None
    if mode & stat.S_IWOTH:
        raise StoreError("refusing world-writable database file %s" % path)
    if not head:
        return True  # Empty: LMDB initialises it.
    if head[16:24] == _META_V1:
        _check_length(path, size)
        return True
    if head[24:28] == struct.pack("=I", MDB_MAGIC):
        version = struct.unpack("=I", head[28:32])[0]
        raise StoreError("%s is in LMDB data format v%d, which Postfix's LMDB 0.9 "
                         "cannot read; %s" % (path, version, MOVE_ASIDE))
    raise StoreError("%s is not an LMDB 0.9 database (corrupt or foreign file); %s"
                     % (path, MOVE_ASIDE))


_DAMAGE = tuple(getattr(lmdb, name) for name in (
    "CorruptedError", "PageNotFoundError", "InvalidError", "PanicError",
    "BadTxnError", "VersionMismatchError") if hasattr(lmdb, name))


def describe(path: str, exc: Exception) -> str:
    """An error message; for a damaged file it names the recovery."""
    if isinstance(exc, _DAMAGE):
        return "%s is damaged (%s); %s" % (path, exc, MOVE_ASIDE)
    text = str(exc)
    return text if path in text else "%s: %s" % (path, text)


def _check_length(path: str, size: int) -> None:
    """Raise StoreError if the file is shorter than its newest meta page says.

    LMDB would read the missing pages through its map and the process
    would die of SIGBUS, without a reply or a log line.
    """
    try:
        with open(path, "rb") as handle:
            first = handle.read(_META_END)
            page_size = struct.unpack_from("=I", first, _META_PAGE_SIZE)[0]
            if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
                raise StoreError("%s has an invalid page size; %s" % (path, MOVE_ASIDE))
            handle.seek(page_size)
            second = handle.read(_META_END)
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


