"""Importing postgrey's database: greylistctl import-postgrey.

DESCRIPTION
    postgrey (1.37, Debian's /usr/sbin/postgrey) keeps two Berkeley DB
    btrees in its --dbdir, inside a transactional environment:

    postgrey.db         key "NET/SENDER/RECIPIENT", value "FIRST,LAST"
                        (epoch seconds; postgrey 1.37 never writes the
                        optional third field ",HOST"). NET is the client
                        address cut to --ipv4cidr (24) or --ipv6cidr (64)
                        bits and written as the network address
                        ("192.0.2.0", "2001:db8:1:2:0:0:0:0"), or with
                        --lookup-by-host the address with its length
                        ("192.0.2.10/32", "2001:db8:0:0:0:0:0:5/128").
                        SENDER is postgrey's own normalisation: a BATV
                        "prvs=" tag removed, everything from the first
                        "+" removed, digit runs between word boundaries
                        replaced by "#"; the null sender is empty. The
                        key is lower-cased (ASCII); each attribute was
                        cut at 512 characters. A triple passed once
                        LAST - FIRST >= --delay.
    postgrey_clients.db key the client address, value "COUNT,LAST": the
                        client auto-whitelist (--auto-whitelist-clients),
                        whitelisted once COUNT reaches its threshold.

    With --privacy both keys are SHA-1 hex digests.

    The files are never read in place: stage() copies postgrey.db,
    postgrey_clients.db and the transaction logs (log.*) into a private
    temporary directory (never through a symlink, regular files only,
    at most MAX_COPY_BYTES), recover() runs db_recover there (a postgrey
    that was killed leaves its last changes in the log only: db_dump of
    its postgrey.db alone shows none of them) after check_log() read the
    logs with db_printlog: a log names the files that a replay creates
    and writes, absolute names too, so whoever controls postgrey's
    directory could otherwise have greylistctl (root, for a dry run)
    write files anywhere; a log that names any file but postgrey's own
    (postgrey.db, postgrey_clients.db, Berkeley DB's __db.N.N names for
    a database being created, all in the environment's directory) is
    not replayed, and the import stops. dump() runs db_dump
    on the copy, without a shell, for at most TOOL_TIMEOUT_S seconds and
    MAX_DUMP_BYTES of output. parse_dump() reads db_dump's output (both
    its formats, bytevalue and -p print). The tools are looked up on
    PATH as db_dump or db5.3_dump, db_recover or db5.3_recover,
    db_printlog or db5.3_printlog (Debian's db-util).

    map_triple() and map_client() turn postgrey's records into greylist's
    (pure); import_postgrey() writes them through the store interface,
    in batches of BATCH, each an update_batch under one short exclusive
    lock (LMDB) or one optimistic transaction (Redis), and never over an
    existing entry. What maps:

    triple      NET -> the client group of greylist_client_match with no
                client name (prefix, or exact), when postgrey's prefix is
                at least as long as greylist's; the sender through
                greylist's normalise_sender(); the recipient case-folded.
                A passed triple becomes a passed record (first and last
                seen kept, count 2) and, with greylist_sender_awl, the
                (client group, sender) entry greylist makes on a pass; a
                pending one a pending record with its first seen.
    client      the address's client group gets a client entry with the
                count (the largest, if several addresses share a group)
                and last seen; a whitelisted one (count at least
                greylist_client_awl_passes) also its client-table entry.

    What does not map (counted as unmappable, by reason): hashed keys
    (--privacy), a postgrey prefix shorter than greylist's (or not the
    whole address with greylist_client_match = exact), a key with more
    "/" than its three fields, a field longer than an RFC 5321 path (256
    octets: postgrey may have cut it), a sender whose local part
    postgrey removed entirely (a leading "+").

    Records expired under postgrey's rules (--max-age after last seen;
    a pending triple --retry-window after first seen, when postgrey would
    start it anew) or greylist's own (decide.expired) are left behind.

DIAGNOSTICS
    MigrateError, with a message for the administrator: a missing tool
    or file, a tool that fails, runs too long or writes too much, a dump
    that is not db_dump output. Nothing is written before the whole dump
    has been read and checked once.

BUGS/LIMITS
    The sender mapping is exact for the usual forms; where postgrey's and
    greylist's normalisations differ (a "+" extension with a
    greylist_sender_delimiter without "+", digits next to characters
    other than . + = _ -, SRS and msprvs1 forms) the key differs, and
    that correspondent is greylisted once more. So are clients that
    greylist groups by pool domain or registered domain (postgrey has no
    client names). Postgrey's whitelist files are not records: name them
    in greylist_whitelist_clients / _recipients.
"""

import ipaddress
import os
import re
import selectors
import shutil
import stat
import subprocess
import tempfile
import time
from typing import IO, Callable, Iterator, NamedTuple

from greylist.config import Config
from greylist.core import record as records
from greylist.core.decide import expired
from greylist.core.record import CLIENT, PASSED, PENDING, SENDER, Record
from greylist.core.triple import (BadAddress, Triple, auto_table_key, client_address,
                                  client_group, client_key, keys, normalise_sender)

# Seconds each db_recover or db_dump run may take.
TOOL_TIMEOUT_S = 300.0
# db_dump's output: bytevalue doubles each byte; 1 GiB is some 6 million
# postgrey records.
MAX_DUMP_BYTES = 1 << 30
# The files copied from postgrey's directory, together (Berkeley DB
# logs are 10 MB each, and postgrey removes old ones every hour).
MAX_COPY_BYTES = 4 << 30
# A data line of db_dump: postgrey's key is three fields of at most 512
# characters; hex doubles it.
MAX_LINE_BYTES = 8192
# RFC 5321 4.5.3.1.3: a path is at most 256 octets.
MAX_ADDRESS = 256
# Entries per write transaction (a write lock of about a millisecond).
BATCH = 256
# Distinct greylist keys merged in memory before a flush to the store.
MERGE_CAP = 100_000

TRIPLES = "postgrey.db"
# The directory of a staged copy (stage()) that holds postgrey's files.
ENV = "env"
CLIENTS = "postgrey_clients.db"
DUMP_TOOLS = ("db_dump", "db5.3_dump")
RECOVER_TOOLS = ("db_recover", "db5.3_recover")
PRINTLOG_TOOLS = ("db_printlog", "db5.3_printlog")
# db_printlog's lines of a file name ("\tname: len:  12 data: postgrey.db\\0")
# and the names postgrey's own environment logs.
_LOGGED_NAME = re.compile(r"\t(\w*name): (.*)")
_LOGGED_DATA = re.compile(r"len:\s+([0-9]+)(?: data: (.*))?")
_OWN_NAME = re.compile(r"(?:postgrey|postgrey_clients)\.db|__db\.[0-9a-f]{1,8}\.[0-9a-f]{1,8}")
_LOG_FILE = re.compile(r"log\.[0-9]{10}")


class MigrateError(Exception):
    """The import cannot go on; the message is for the administrator."""


class Postgrey(NamedTuple):
    """postgrey's settings, as it ran (its option names and defaults)."""

    delay_s: int = 300
    max_age_s: int = 35 * 86400
    retry_window_s: int = 2 * 86400
    ipv4cidr: int = 24
    ipv6cidr: int = 64
    lookup_by_host: bool = False


def find_tool(names: tuple[str, ...], path: str | None = None) -> str:
    """The first of names found on PATH (or path); MigrateError if none."""
    search = path if path is not None else os.environ.get("PATH", os.defpath)
    for name in names:
        found = shutil.which(name, path=search)
        if found is not None:
            return found
    raise MigrateError("%s not found on PATH (Debian: apt-get install db-util)" % names[0])


def stage(dbdir: str, owner: tuple[int, int] | None = None,
          max_bytes: int = MAX_COPY_BYTES, tool_user: tuple[int, int] | None = None) -> str:
    """Copy postgrey's database files from dbdir into the directory ENV of
    a new private temporary directory and return the latter's name; owner
    (uid, gid) gets both (greylistctl drops root after staging). With
    tool_user (root staying root), ENV is that user's, for the Berkeley DB
    tools that run as it (run_tool), and the staged directory stays
    root's, mode 0711: the tools reach ENV by name, and cannot touch the
    outputs that root reads beside it. The caller removes it (unstage).
    MigrateError if dbdir or postgrey.db cannot be read."""
    try:
        dirfd = os.open(dbdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise MigrateError("%s: %s%s" % (dbdir, exc.strerror, " (a symbolic link?)"
                                         if os.path.islink(dbdir) else "")) from None
    staged = tempfile.mkdtemp(prefix="greylistctl-postgrey-")
    try:
        env = os.path.join(staged, ENV)
        os.mkdir(env, 0o700)
        names = sorted(name for name in os.listdir(dirfd)
                       if name in (TRIPLES, CLIENTS) or _LOG_FILE.fullmatch(name))
        if TRIPLES not in names:
            raise MigrateError("%s: no %s there (postgrey's --dbdir?)" % (dbdir, TRIPLES))
        todir = os.open(env, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            left = max_bytes
            for name in names:
                left -= _copy(dirfd, todir, name, left, dbdir)
            # Through the descriptor, never by path, and the staged
            # directory last: once owner has it, owner could put a link
            # in the place of ENV, and root would chown what it names.
            if owner is not None or tool_user is not None:
                for name in names:
                    os.chown(name, *(tool_user or owner), dir_fd=todir,
                             follow_symlinks=False)
                os.fchown(todir, *(tool_user or owner))
        finally:
            os.close(todir)
        if tool_user is not None:
            os.chmod(staged, 0o711)
        if owner is not None:
            os.chown(staged, *owner)
    except OSError as exc:
        unstage(staged)
        raise MigrateError("copying %s: %s" % (dbdir, exc)) from None
    except BaseException:
        unstage(staged)
        raise
    finally:
        os.close(dirfd)
    return staged


def _copy(dirfd: int, todir: int, name: str, left: int, dbdir: str) -> int:
    """Copy one regular file, never through a symlink; return its size."""
    try:
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                      dir_fd=dirfd)
    except OSError as exc:
        raise MigrateError("%s/%s: %s" % (dbdir, name, exc.strerror)) from None
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode):
            raise MigrateError("%s/%s: not a regular file" % (dbdir, name))
        if st.st_size > left:
            raise MigrateError("%s: more than %d bytes of database files"
                               % (dbdir, MAX_COPY_BYTES))
        dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                      | os.O_CLOEXEC, 0o600, dir_fd=todir)
        try:
            copied = 0
            while copied <= st.st_size:
                chunk = os.read(src, 1 << 20)
                if not chunk:
                    break
                copied += len(chunk)
                os.write(dst, chunk)
            if copied > st.st_size:
                raise MigrateError("%s/%s grew while it was copied: stop postgrey first"
                                   % (dbdir, name))
            return copied
        finally:
            os.close(dst)
    finally:
        os.close(src)


def unstage(staged: str) -> None:
    """Remove a directory that stage() made."""
    shutil.rmtree(staged, ignore_errors=True)


def run_tool(argv: list[str], out_path: str | None, timeout_s: float = TOOL_TIMEOUT_S,
             max_bytes: int = MAX_DUMP_BYTES, user: tuple[int, int] | None = None) -> None:
    """Run argv without a shell, its output to out_path (created, never
    through a symlink), at most max_bytes of it and timeout_s seconds, as
    user (uid, gid; no supplementary groups) if given; MigrateError when
    it fails, runs too long or writes too much."""
    tool = os.path.basename(argv[0])
    out = -1
    if out_path is not None:
        try:
            out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise MigrateError("%s: %s" % (out_path, exc.strerror)) from None
    try:
        with tempfile.TemporaryFile() as errors:
            try:
                drop = {} if user is None else {"user": user[0], "group": user[1],
                                                "extra_groups": []}
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=errors, close_fds=True, **drop)
            except OSError as exc:
                raise MigrateError("%s: %s" % (tool, exc.strerror)) from None
            try:
                _drain(proc, out, tool, time.monotonic() + timeout_s, max_bytes, timeout_s)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                proc.stdout.close()
            if proc.returncode != 0:
                errors.seek(0)
                said = errors.read(1000).decode("utf-8", "replace").strip().splitlines()
                raise MigrateError("%s failed (exit status %d)%s" % (
                    tool, proc.returncode, (": " + said[0][:300]) if said else ""))
    finally:
        if out >= 0:
            os.close(out)


def _drain(proc: subprocess.Popen, out: int, tool: str, deadline: float,
           max_bytes: int, timeout_s: float) -> None:
    """Copy proc's output to out until EOF, within the deadline and cap."""
    written = 0
    fd = proc.stdout.fileno()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise MigrateError("%s ran for more than %g s; stopped" % (tool, timeout_s))
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            written += len(chunk)
            if written > max_bytes:
                raise MigrateError("%s wrote more than %d bytes; stopped" % (tool, max_bytes))
            if out >= 0:
                os.write(out, chunk)
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise MigrateError("%s ran for more than %g s; stopped" % (tool, timeout_s)) from None


def foreign_names(printed: IO[bytes]) -> list[str]:
    """The file names in db_printlog output that are not postgrey's own
    (see check_log), at most three."""
    found: list[str] = []
    for raw in printed:
        match = _LOGGED_NAME.fullmatch(raw.decode("utf-8", "replace").rstrip("\n"))
        if match is None or match.group(1) == "appname":
            continue
        field, value = match.groups()
        data = _LOGGED_DATA.fullmatch(value)
        if data is None:
            bad = value
        elif field == "dirname":
            bad = None if data.group(1) == "0" else value
        else:
            name = (data.group(2) or "").removesuffix("\\0")
            bad = None if _OWN_NAME.fullmatch(name) else name
        if bad is not None and bad not in found:
            found.append(bad[:100])
            if len(found) == 3:
                break
    return found


def check_log(staged: str, timeout_s: float = TOOL_TIMEOUT_S,
              user: tuple[int, int] | None = None) -> None:
    """MigrateError unless every file that the staged logs name is
    postgrey's own, in the environment's directory (db_printlog, run as
    user if given)."""
    env = os.path.join(staged, ENV)
    if not any(_LOG_FILE.fullmatch(name) for name in os.listdir(env)):
        return
    out = os.path.join(staged, "log.printed")
    run_tool([find_tool(PRINTLOG_TOOLS), "-h", env], out, timeout_s, user=user)
    with open(out, "rb") as printed:
        foreign = foreign_names(printed)
    os.unlink(out)
    if foreign:
        raise MigrateError("postgrey's transaction log names files that are not postgrey's "
                           "(%s): it is not replayed, nothing is imported; check who can "
                           "write postgrey's directory" % ", ".join(map(repr, foreign)))


def recover(staged: str, tool: str | None = None, timeout_s: float = TOOL_TIMEOUT_S,
            user: tuple[int, int] | None = None) -> None:
    """Run db_recover in the staged copy (its logs into its files), once
    check_log() found only postgrey's own files named in them; both as
    user if given."""
    check_log(staged, timeout_s, user)
    run_tool([tool or find_tool(RECOVER_TOOLS), "-h", os.path.join(staged, ENV)], None,
             timeout_s, user=user)


def dump(staged: str, name: str, tool: str | None = None,
         timeout_s: float = TOOL_TIMEOUT_S, max_bytes: int = MAX_DUMP_BYTES,
         user: tuple[int, int] | None = None) -> str | None:
    """Run db_dump (as user if given) on the staged copy of name; return
    the dump file's name, or None if postgrey had no such file."""
    source = os.path.join(staged, ENV, name)
    if not os.path.exists(source):
        return None
    out = os.path.join(staged, name + ".dump")
    run_tool([tool or find_tool(DUMP_TOOLS), source], out, timeout_s, max_bytes, user)
    return out


class DumpError(MigrateError):
    """Input that is not db_dump output."""


def parse_dump(stream: IO[bytes], label: str = "dump") -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) pairs of db_dump output (format bytevalue or
    print); DumpError, with the line number, for anything else."""
    number = 0
    printable = None
    fmt = None
    pending = None

    def bad(what: str) -> DumpError:
        return DumpError("%s line %d: %s" % (label, number, what))

    while True:
        line = stream.readline(MAX_LINE_BYTES + 2)
        number += 1
        if not line:
            raise bad("ends before HEADER=END" if printable is None
                      else "ends before DATA=END")
        if not line.endswith(b"\n"):
            raise bad("line too long" if len(line) > MAX_LINE_BYTES else "no newline")
        line = line[:-1]
        if printable is None:
            if line == b"HEADER=END":
                if fmt is None:
                    raise bad("no format= line in the header")
                printable = fmt == b"print"
                continue
            name, eq, setting = line.partition(b"=")
            if not eq or not re.fullmatch(rb"[a-z_A-Z]{1,32}", name):
                raise bad("not a db_dump header line: %s" % repr(line)[:80])
            if name == b"VERSION" and setting != b"3":
                raise bad("db_dump format version %s, expected 3" % repr(setting)[:20])
            if name == b"format":
                if setting not in (b"bytevalue", b"print"):
                    raise bad("unknown format %s" % repr(setting)[:20])
                fmt = setting
            if name == b"type" and setting not in (b"btree", b"hash"):
                raise bad("database type %s, expected btree" % repr(setting)[:20])
            continue
        if line == b"DATA=END":
            if pending is not None:
                raise bad("a key without a value")
            return
        if not line.startswith(b" "):
            raise bad("not a data line: %s" % repr(line)[:80])
        try:
            field = _unprint(line[1:]) if printable else bytes.fromhex(line[1:].decode("ascii"))
        except (ValueError, UnicodeDecodeError):
            raise bad("bad %s data" % ("print" if printable else "bytevalue")) from None
        if pending is None:
            pending = field
        else:
            yield pending, field
            pending = None


def _unprint(text: bytes) -> bytes:
    """db_dump -p: printable bytes as they are, "\\\\" and "\\hh" escapes."""
    if b"\\" not in text:
        return text
    out = bytearray()
    i = 0
    while i < len(text):
        byte = text[i]
        if byte != 0x5c:
            out.append(byte)
            i += 1
        elif text[i + 1:i + 2] == b"\\":
            out.append(0x5c)
            i += 2
        else:
            hexa = text[i + 1:i + 3]
            if len(hexa) != 2 or not re.fullmatch(rb"[0-9a-fA-F]{2}", hexa):
                raise ValueError("bad escape")
            out.append(int(hexa, 16))
            i += 3
    return bytes(out)


class Mapped(NamedTuple):
    """What one postgrey record becomes: outcome is "ok", "expired",
    "unmappable" or "malformed"; why says why not ok."""

    outcome: str
    why: str = ""
    entries: tuple[tuple[bytes, Record], ...] = ()
    table: tuple[bytes, bytes] | None = None


_FIRST_LAST = re.compile(rb"([0-9]{1,19}),([0-9]{1,19})(?:,.{0,600})?", re.DOTALL)
_HASHED = re.compile(rb"[0-9a-f]{40}")


def _numbers(key: bytes, value: bytes, form: str) -> "tuple[int, int] | Mapped":
    """The two numbers of a postgrey value of the form form, or the
    Mapped outcome of a value that is not one or of a hashed key."""
    match = _FIRST_LAST.fullmatch(value)
    if match is None:
        return Mapped("malformed", "value is not " + form)
    if _HASHED.fullmatch(key):
        return Mapped("unmappable", "hashed key (postgrey --privacy)")
    return int(match.group(1)), int(match.group(2))


def map_triple(key: bytes, value: bytes, pg: Postgrey, cfg: Config, now: int) -> Mapped:
    """Map one postgrey.db record (see DESCRIPTION)."""
    numbers = _numbers(key, value, "FIRST,LAST")
    if isinstance(numbers, Mapped):
        return numbers
    first, last = numbers
    text = key.decode("utf-8", "surrogateescape")
    fields = text.split("/")
    net, prefix = fields[0], None
    if len(fields) > 1 and fields[1] in ("32", "128"):
        prefix = int(fields.pop(1))
    if len(fields) != 3:
        return Mapped("unmappable" if len(fields) > 3 else "malformed",
                      "more than three fields" if len(fields) > 3 else "not NET/SENDER/RECIPIENT")
    _, sender, recipient = fields
    group = _group(net, prefix, pg, cfg)
    if not group.startswith("ok:"):
        return Mapped(*group.split(":", 1))
    group = group[3:]
    if len(sender) > MAX_ADDRESS or len(recipient) > MAX_ADDRESS:
        return Mapped("unmappable", "longer than an address (cut by postgrey?)")
    if not recipient:
        return Mapped("malformed", "empty recipient")
    if sender.startswith("@"):
        return Mapped("unmappable", "sender's local part removed by postgrey")
    triple = Triple(group, normalise_sender(sender, cfg), recipient.casefold())
    passed = last - first >= pg.delay_s
    if passed:
        entry = Record(first, last, 2, PASSED)
        gone = now - last > pg.max_age_s
    else:
        entry = Record(first, last, 1, PENDING)
        gone = now - first > pg.retry_window_s
    if gone or expired(entry, now, cfg):
        return Mapped("expired")
    found = keys(triple)
    entries = ((found.triple, entry),)
    if passed and cfg.sender_awl:
        entries += ((found.sender, Record(last, last, 1, SENDER)),)
    return Mapped("ok", entries=entries)


def _group(net: str, prefix: int | None, pg: Postgrey, cfg: Config) -> str:
    """"ok:GROUP", or "unmappable:WHY" / "malformed:WHY" for postgrey's NET."""
    try:
        address = ipaddress.ip_address(net)
    except ValueError:
        return "malformed:client net is not an address"
    v6 = address.version == 6
    if v6 and address.ipv4_mapped is not None:
        return "unmappable:IPv4-mapped IPv6 client net"
    full = 128 if v6 else 32
    if prefix is None:
        prefix = full if pg.lookup_by_host else (pg.ipv6cidr if v6 else pg.ipv4cidr)
    elif prefix != full:
        return "malformed:client net /%d" % prefix
    ours = full if cfg.client_match == "exact" else (cfg.ipv6_prefix if v6 else cfg.ipv4_prefix)
    if prefix < ours:
        return "unmappable:postgrey's /%d is coarser than greylist's /%d" % (prefix, ours)
    return "ok:" + client_group(str(address), None, cfg)


def map_client(key: bytes, value: bytes, pg: Postgrey, cfg: Config, now: int) -> Mapped:
    """Map one postgrey_clients.db record (see DESCRIPTION)."""
    numbers = _numbers(key, value, "COUNT,LAST")
    if isinstance(numbers, Mapped):
        return numbers
    count, last = numbers
    try:
        address = client_address(key.decode("ascii"))
    except (BadAddress, UnicodeDecodeError):
        return Mapped("malformed", "key is not an address")
    if address == "unknown":
        return Mapped("malformed", "key is not an address")
    entry = Record(last, last, count, CLIENT)
    if now - last > pg.max_age_s or expired(entry, now, cfg):
        return Mapped("expired")
    group = client_group(address, None, cfg)
    table = None
    if cfg.client_awl_passes and count >= cfg.client_awl_passes:
        table = (auto_table_key(address, group, cfg.client_match), b"%d" % last)
    return Mapped("ok", entries=((client_key(group), entry),), table=table)


def merge(old: Record | None, new: Record) -> Record:
    """One record for several postgrey records with the same greylist key:
    passed over pending, the earliest first, the latest last, the largest
    count."""
    if old is None:
        return new
    if old.state != new.state and PASSED in (old.state, new.state):
        return old if old.state == PASSED else new
    return Record(min(old.first_seen, new.first_seen), max(old.last_seen, new.last_seen),
                  max(old.count, new.count), old.state)


class Tally:
    """Counts of one postgrey file's import."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.read = self.imported = self.existing = self.expired = 0
        self.table = 0
        self.why: dict[str, int] = {}
        self.malformed = 0

    def count(self, mapped: Mapped) -> None:
        self.read += 1
        if mapped.outcome == "expired":
            self.expired += 1
        elif mapped.outcome in ("unmappable", "malformed"):
            self.malformed += mapped.outcome == "malformed"
            reason = "%s: %s" % (mapped.outcome, mapped.why)
            self.why[reason] = self.why.get(reason, 0) + 1

    def line(self, dry_run: bool) -> str:
        unmappable = sum(self.why.values()) - self.malformed
        text = ("%s: %d records, %d entries %s, %d existing left alone, %d unmappable, "
                "%d malformed, %d expired" % (
                    self.label, self.read, self.imported,
                    "to import" if dry_run else "imported", self.existing, unmappable,
                    self.malformed, self.expired))
        if self.table:
            text += ", %d client-table entries" % self.table
        return text


class _Writer:
    """Merges mapped entries, and writes them in batches, never over an
    existing entry (dry run: only counts them)."""

    def __init__(self, store, tally: Tally, dry_run: bool) -> None:
        self.store, self.tally, self.dry_run = store, tally, dry_run
        self.merged: dict[bytes, Record] = {}

    def add(self, key: bytes, entry: Record) -> None:
        self.merged[key] = merge(self.merged.get(key), entry)
        if len(self.merged) >= MERGE_CAP:
            self.flush()

    def flush(self) -> None:
        items = list(self.merged.items())
        self.merged = {}
        for start in range(0, len(items), BATCH):
            chunk = items[start:start + BATCH]
            if self.dry_run:
                found = self.store.get_many([k for k, _ in chunk])
                results = ["existing" if v is not None else "imported" for v in found]
            else:
                results = self.store.update_batch([([k], _keep(records.encode(r)))
                                                   for k, r in chunk])
            for result in results:
                if isinstance(result, Exception):
                    raise result
                if result == "existing":
                    self.tally.existing += 1
                else:
                    self.tally.imported += 1


def _keep(value: bytes) -> Callable:
    """The change that writes value only where there is no entry."""
    def change(olds: list[bytes | None]) -> tuple[list[bytes | None], str]:
        if olds[0] is not None:
            return [None], "existing"
        return [value], "imported"
    return change


def check(path: str, label: str) -> int:
    """Read a dump file once; return its record count, DumpError if bad."""
    with open(path, "rb") as stream:
        return sum(1 for _ in parse_dump(stream, label))


def import_postgrey(store, table, triples: str, clients: str | None, pg: Postgrey,
                    cfg: Config, now: int, dry_run: bool = False) -> list[Tally]:
    """Import the dumps triples (of postgrey.db) and clients (of
    postgrey_clients.db, or None) into store, the database as handlers
    key it, and table, the client table (or None). Both dumps are checked
    first (DumpError); returns the tallies of both files."""
    check(triples, TRIPLES)
    if clients is not None:
        check(clients, CLIENTS)
    tallies = []
    for path, label, mapper in ((triples, TRIPLES, map_triple), (clients, CLIENTS, map_client)):
        tally = Tally(label)
        tallies.append(tally)
        if path is None:
            continue
        writer = _Writer(store, tally, dry_run)
        rows: dict[bytes, int] = {}
        with open(path, "rb") as stream:
            for key, value in parse_dump(stream, label):
                mapped = mapper(key, value, pg, cfg, now)
                tally.count(mapped)
                for k, entry in mapped.entries:
                    writer.add(k, entry)
                if mapped.table is not None and table is not None:
                    row, stamp = mapped.table
                    rows[row] = max(rows.get(row, 0), int(stamp))
        writer.flush()
        if rows:
            table_tally = Tally("client table")
            table_writer = _Writer(table, table_tally, dry_run)
            for k, stamp in rows.items():
                table_writer.merged[k] = b"%d" % stamp
            _write_table(table_writer)
            tally.table = table_tally.imported
    return tallies


def _write_table(writer: _Writer) -> None:
    """Write the client table rows (raw values) that are not there."""
    items = list(writer.merged.items())
    for start in range(0, len(items), BATCH):
        chunk = items[start:start + BATCH]
        if writer.dry_run:
            found = writer.store.get_many([k for k, _ in chunk])
            writer.tally.imported += sum(v is None for v in found)
            continue
        for result in writer.store.update_batch([([k], _keep(v)) for k, v in chunk]):
            if isinstance(result, Exception):
                raise result
            writer.tally.imported += result == "imported"


def options(delay: str | None = None, max_age: str | None = None,
            retry_window: str | None = None, ipv4cidr: str | None = None,
            ipv6cidr: str | None = None, lookup_by_host: bool = False) -> Postgrey:
    """postgrey's settings from its own option values: --delay in seconds,
    --max-age in days, --retry-window in days or hours ("6h"); a Postfix
    unit (s, m, h, d, w) is also accepted. MigrateError for a bad value."""
    pg = Postgrey()

    def duration(name: str, value: str | None, default: int, bare: int) -> int:
        if value is None:
            return default
        match = re.fullmatch(r"([0-9]{1,9})([smhdw]?)", value.strip())
        if match is None:
            raise MigrateError("--%s: expected a number with an optional unit s, m, h, d "
                               "or w, not %r" % (name, value[:40]))
        unit = {"": bare, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
        return int(match.group(1)) * unit[match.group(2)]

    def cidr(name: str, value: str | None, default: int, bits: int) -> int:
        if value is None:
            return default
        if not re.fullmatch(r"[0-9]{1,3}", value.strip()) or not 0 < int(value) <= bits:
            raise MigrateError("--%s: expected 1 to %d, not %r" % (name, bits, value[:40]))
        return int(value)

    return Postgrey(duration("delay", delay, pg.delay_s, 1),
                    duration("max-age", max_age, pg.max_age_s, 86400),
                    duration("retry-window", retry_window, pg.retry_window_s, 86400),
                    cidr("ipv4cidr", ipv4cidr, pg.ipv4cidr, 32),
                    cidr("ipv6cidr", ipv6cidr, pg.ipv6cidr, 128), bool(lookup_by_host))
