"""greylistctl: manage a greylist database while greylist runs.

DESCRIPTION
    Commands for administrators, safe while policy processes use the
    database: every read runs under a shared lock and every change under
    a short exclusive one, as greylist(8) does.

    cleanup     Run a full cleanup pass now (cleanup.py), sharing the pass
                with the policy processes; --dry-run only counts.
    stats       Entries per state, file and map sizes, oldest and newest.
    check       Whether the database and its tables open, read to the end
                and take a write (a trial commit in a child process,
                stores/writecheck.py): the damage an unlocked writer such as
                postmap -i leaves is found here, with its recovery.
    show        What the database holds for a triple and what greylist
                would answer now, with the reason: the policy handler's
                own evaluation (handlers/policy.py explain()), with the
                same whitelists and reply text, on the records as they
                are; nothing is written.
    dump        key<TAB>value lines, like postmap -s: the database, the
                client table (--table) or the correspondent table
                (--correspondents).
    whitelist   Add or remove a manual client group, host or (client,
                sender) entry, keeping the automatic entry it displaces
                beside it, under KEY/#auto; list the manual entries.
    postscreen  What the postscreen callout answers for a client now,
                and why, with the postscreen table's entry.
    import      Copy an LMDB database (lmdb:LMDB) and its tables into the
                Redis database of the settings: a site moving from one
                host to several. Expired entries are left behind.
    import-postgrey
                Import postgrey's database (migrate.py): its triples and
                its client auto-whitelist, never over existing entries.
    report      Defers and passes per day, triples that never retried,
                top clients and senders, from greylist's log lines
                (report.py), in the manner of postgreyreport.

    Started as root, greylistctl becomes the policy user (the owner of
    the database directory, or greylist_user for a root-owned one), so
    that the files it creates belong to that user, and it never opens a
    file on behalf of a directory another user can write (_become_owner).

DIAGNOSTICS
    Exit status 0 on success, 1 when the database cannot be used, 2 for
    a usage or settings error, 75 (EX_TEMPFAIL) when another process
    held the cleanup state for longer than BUSY_WAIT_S.
"""

import os
import sys
import time
from typing import Callable

from docopt import DocoptExit, docopt

from greylist import __version__
from greylist.config import Config, ConfigError, is_redis, load, log_target, parse_setting
from greylist.core import record as records
from greylist.core.decide import expire_at, expired
from greylist.core.message import Session
from greylist.core.tables import MANUAL_OK, screen_denied
from greylist.core.triple import (BadAddress, client_address, client_group, client_key,
                                  escape, keys, normalise_sender, registered_domain, sender_key,
                                  table_key, triple_from_request)
from greylist.handlers.policy import PolicyHandler
from greylist.log import Log, drop_to, to_stderr
from greylist.protocols.policy import ProtocolError
from greylist.stores.base import Store, StoreError
from greylist.stores.cleanup import MANUAL_BATCH, Cleaner
from greylist.whitelist import Whitelists
from greylist.wiring import (client_table, correspondent_table, database, host_name,
                             postscreen_table)

USAGE = """\
Manage a greylist database.

Usage:
  greylistctl [options] cleanup [--dry-run]
  greylistctl [options] stats
  greylistctl [options] check
  greylistctl [options] show CLIENT SENDER RECIPIENT [--client-name NAME]
  greylistctl [options] dump [--table | --correspondents | --postscreen]
  greylistctl [options] postscreen CLIENT
  greylistctl [options] import LMDB
  greylistctl [options] import-postgrey DBDIR [--dry-run] [--delay N] [--max-age N] [--retry-window N] [--ipv4cidr N] [--ipv6cidr N] [--lookup-by-host]
  greylistctl [options] report [--delay N] [--top N] [LOGFILE...]
  greylistctl [options] whitelist (add | remove) CLIENT [SENDER]
  greylistctl [options] whitelist (add | remove) --host CLIENT
  greylistctl [options] whitelist list
  greylistctl -h | --help
  greylistctl --version

Options:
  -c FILE, --config FILE    Read settings from FILE, as greylist does.
  -d PATH, --database PATH  Database lmdb:PATH (greylist_database).
  --dry-run                 Count what cleanup or import-postgrey would do;
                            change nothing.
  --client-name NAME        The client's verified name (for domain matching).
  --table                   Dump the client table instead of the database.
  --correspondents          Dump the correspondent table instead.
  --postscreen              Dump the postscreen table instead.
  --host                    Whitelist the one address CLIENT, not its client group.
  --delay N                 postgrey's --delay (import-postgrey, default 300);
                            how long a deferred triple has to retry (report,
                            default greylist_delay).
  --max-age N               postgrey's --max-age in days (default 35).
  --retry-window N          postgrey's --retry-window in days, or hours
                            with h (default 2).
  --ipv4cidr N              postgrey's --ipv4cidr (default 24).
  --ipv6cidr N              postgrey's --ipv6cidr (default 64).
  --lookup-by-host          postgrey ran with --lookup-by-host.
  --top N                   Clients and senders listed (report, default 10).
  -h, --help                Show this help.
  --version                 Show the version.
"""

BUSY_WAIT_S = 60.0
# Who runs the Berkeley DB tools of import-postgrey when greylistctl stays root.
TOOL_USER = "nobody"
# The suffix of the key where a manual entry keeps what it displaced.
KEPT_SUFFIX = "/#auto"
EX_TEMPFAIL = 75


def main(argv: list[str] | None = None, clock: Callable[[], float] = time.time) -> int:
    """Run one greylistctl command; return the exit status.

    clock is the time source of show (tests). A reader that goes away
    (greylistctl dump | head) ends the output without a traceback: exit
    status 1, and nothing more is written to the closed pipe. Interrupted:
    exit status 130, without a traceback.
    """
    try:
        status = _command(argv, clock)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())  # so that the flush at exit is quiet too
        os.close(null)
        return 1
    except KeyboardInterrupt:
        # Also where no database is open yet (report, import-postgrey's copy).
        return 130


def _command(argv: list[str] | None, clock: Callable[[], float]) -> int:
    try:
        args = docopt(USAGE, argv=argv, version=__version__)
    except DocoptExit as exc:
        from greylist.cli.greylist import usage_error
        usage_error(exc, sys.argv[1:] if argv is None else argv, "greylistctl")
        return 2
    try:
        overrides = {}
        if args["--database"]:
            overrides = dict([parse_setting("greylist_database", args["--database"])])
        cfg = load(args["--config"], overrides)
    except ConfigError as exc:
        # To stderr and to the log the settings name (issue 15), not to
        # stdout.
        Log("greylistctl", log_target(args["--config"])).fatal(str(exc))
        return 2
    if args["report"]:
        # Before the switch to the policy user: the log files are root's or adm's.
        from greylist.report import run
        return run(args["LOGFILE"], cfg, args["--delay"], args["--top"])
    writes = bool(args["cleanup"] and not args["--dry-run"]
                  or args["whitelist"] and not args["list"] or args["import"]
                  or args["import-postgrey"] and not args["--dry-run"])
    # Only show and postscreen look keys up, and so read (or make) the
    # privacy secret; dump, stats, check and whitelist list never do.
    user = _policy_user(cfg, writes, hashes=bool(args["show"] or args["postscreen"]))
    if isinstance(user, str):
        Log("greylistctl", cfg.log, cfg.verbose).fatal(user)
        return 1
    if args["import-postgrey"]:
        # postgrey's files are its user's: copy them while still root.
        staged = _stage_postgrey(cfg, args, user)
        if isinstance(staged, int):
            return staged
    _become(cfg, user)
    log = Log("greylistctl", cfg.log, cfg.verbose)
    store, keyed = database(cfg, log, readonly=not writes)
    try:
        if args["import-postgrey"]:
            return _import_postgrey(keyed, cfg, log, args, staged)
        if args["cleanup"]:
            return _cleanup(store, cfg, log, args["--dry-run"])
        if args["check"]:
            return _check(store, cfg)
        if args["stats"]:
            return _stats(store, cfg)
        if args["show"]:
            return _show(keyed, cfg, log, args, clock)
        if args["postscreen"]:
            return _postscreen(keyed, cfg, log, args["CLIENT"])
        if args["import"]:
            return _import(store, cfg, log, args["LMDB"], keyed)
        if args["dump"]:
            if args["--postscreen"]:
                table = _screened(cfg, readonly=True)
                if table is None:
                    to_stderr("greylistctl: no postscreen table (greylist_postscreen_table = "
                              "none, or greylist_privacy = yes)" if not cfg.postscreen_table
                              else "greylistctl: %s.lmdb: no such database" % cfg.postscreen_table)
                    return 1
                return _dump(table)
            if args["--correspondents"]:
                table = _learned(cfg, readonly=True)
                if table is None:
                    to_stderr("greylistctl: no correspondent table (greylist_correspondent_table"
                              " = none, or greylist_privacy = yes)" if not cfg.correspondent_table
                              else "greylistctl: %s.lmdb: no such database"
                              % cfg.correspondent_table)
                    return 1
                return _dump(table)
            if not args["--table"]:
                return _dump(store)
            table = _table(cfg, writable=False, readonly=True)
            if table is None:
                to_stderr("greylistctl: no client table (greylist_client_table = none, "
                          "or greylist_privacy = yes)" if not cfg.client_table else
                          "greylistctl: %s.lmdb: no such database" % cfg.client_table)
                return 1
            return _dump(table)
        return _whitelist(keyed, cfg, log, args)
    except StoreError as exc:
        to_stderr("greylistctl: %s" % exc)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        store.close()


def _policy_user(cfg, writes: bool, hashes: bool = True) -> tuple[int, int] | str | None:
    """As root, the (uid, gid) of the user the policy processes run as,
    whom greylistctl becomes so that the files it creates are theirs and
    no file is opened on behalf of a directory another user can write;
    None to stay as it is; a string: why greylistctl must not go on.

    That user is the owner of the database directory when it is not
    root; for a root-owned directory, root itself with
    greylist_allow_root = yes, else greylist_user. Without either,
    greylistctl reads as root (lmdbfile.py refuses a directory a group
    can write) and refuses to change anything: files it created would be
    root's, and the policy processes could not write them (issue 15);
    nor make a missing privacy secret, for a command that hashes keys
    (hashes) and so would make it.
    """
    if os.geteuid() != 0:
        return None
    if is_redis(cfg):
        # No directory to own: greylist_user, when set, so that the
        # privacy secret it may create is that user's (found in review:
        # made as root, it failed every greylist process afterwards).
        if cfg.user:
            return _named_user(cfg)
        return _secret_refusal(cfg)
    directory = os.path.dirname(os.path.abspath(cfg.database))
    try:
        st = os.stat(directory)
    except OSError:
        return None  # Reported when the database is opened.
    if st.st_uid != 0:
        # The owner's own group, as spawn(8)'s user= gives it, not the
        # directory's (root's, after install -d -o USER), and never root's.
        import pwd
        try:
            gid = pwd.getpwuid(st.st_uid).pw_gid
        except KeyError:
            gid = st.st_gid
        if gid == 0:
            return ("refusing to run as the owner of %s with group root (gid 0): give "
                    "that user a group of its own" % directory)
        return st.st_uid, gid
    if cfg.allow_root:
        return None
    if cfg.user:
        return _named_user(cfg)
    if not writes:
        # Reading as root: a missing secret would be made root's, and the
        # policy processes fail open on a secret they cannot read (found
        # in review: show made it). A read that hashes no key makes none
        # (found in review: dump and stats were refused).
        return _secret_refusal(cfg) if hashes else None
    return ("refusing to change the database in %s as root: the directory is root's, so "
            "the files created there would be root's and the policy processes could not "
            "write them; give the directory to the policy user (chown USER %s), set "
            "greylist_user, or run greylistctl as that user" % (directory, directory))


def _secret_refusal(cfg) -> str | None:
    """Staying root: why a missing privacy secret must not be made, or None."""
    if cfg.privacy and cfg.secret_file and not os.path.lexists(cfg.secret_file):
        return ("refusing to create the privacy secret %s as root: the greylist "
                "processes could not read it; set greylist_user, or run greylistctl "
                "as the greylist user" % cfg.secret_file)
    return None


def _named_user(cfg) -> tuple[int, int] | str:
    import pwd
    try:
        user = pwd.getpwnam(cfg.user)
    except KeyError:
        return "greylist_user %s: no such user" % cfg.user
    if user.pw_gid == 0 and user.pw_uid != 0:  # (root itself: nothing to drop)
        return "greylist_user %s has group root (gid 0): give it a group of its own" % cfg.user
    return user.pw_uid, user.pw_gid


def _become(cfg, user: tuple[int, int] | None) -> None:
    """Become user (see _policy_user), if one. With greylist_log = postlog
    the group postdrop is kept: the socket is under Postfix's public/
    (group postdrop, mode 0710), as for the policy processes
    (user=...:postdrop)."""
    if user is None:
        return
    if cfg.client_match == "domain":
        registered_domain("example.com")  # load the suffix list while we can
    drop_to(user[0], user[1], cfg.log)


def _existing(cfg: Config, name: str, build, writable: bool, readonly: bool) -> Store | None:
    """The table named name (a Config field) as build() opens it; None if
    there is none, or (unless writable) it does not exist yet."""
    path = getattr(cfg, name)
    if not path or not (writable or is_redis(cfg) or os.path.exists(path + ".lmdb")):
        return None
    return build(cfg, readonly=readonly)


def _table(cfg: Config, writable: bool, readonly: bool = False) -> Store | None:
    """The client table (see _existing)."""
    return _existing(cfg, "client_table", client_table, writable, readonly)


def _learned(cfg: Config, writable: bool = False, readonly: bool = False) -> Store | None:
    """The correspondent table (see _existing)."""
    return _existing(cfg, "correspondent_table", correspondent_table, writable, readonly)


def _screened(cfg: Config, writable: bool = False, readonly: bool = False) -> Store | None:
    """The postscreen table (see _existing)."""
    return _existing(cfg, "postscreen_table", postscreen_table, writable, readonly)


def _kept_key(key: bytes) -> bytes:
    """Where a manual entry at key keeps the automatic value it displaced.

    KEY/#auto: "#" is escaped in senders and recipients and no client
    group has one, so no other key looks like it; the part before the
    first "/" is key's own, so Redis tags it like key (one cluster slot),
    and Postfix never looks it up. Bounded like every key."""
    return client_key(key.decode("utf-8", "replace") + KEPT_SUFFIX)


def _displace(store: Store, key: bytes, value: bytes,
              is_manual: Callable[[bytes], bool]) -> bytes | None:
    """Write the manual value at key in one atomic update, moving an
    automatic value found there to _kept_key(key); return the manual
    value already there (then nothing is written), else None."""
    def change(olds: list[bytes | None]) -> tuple[list[bytes | None], bytes | None]:
        old = olds[0]
        if old is not None and is_manual(old):
            return [None, None], old
        return [value, old], None
    return store.update_many([key, _kept_key(key)], change)


def _restore(store: Store, key: bytes, is_manual: Callable[[bytes], bool],
             live: Callable[[bytes], bool]) -> bool:
    """Remove the manual value at key and put back the automatic value
    kept beside it, if that is still live (else it is dropped: cleanup
    would drop it); return whether a manual value was there. Any other
    value at key is left alone."""
    kept_key = _kept_key(key)
    old, kept = store.get_many([key, kept_key])
    if old is None or not is_manual(old):
        return False
    if kept is not None and live(kept):
        store.update_many([key], lambda olds: (
            [kept] if olds[0] is not None and is_manual(olds[0]) else [None], None))
    else:
        store.delete_if([key], lambda k, value: value is not None and is_manual(value))
    store.delete_if([kept_key], lambda k, value: value is not None)
    return True


def _manual_record(value: bytes | None) -> bool:
    record = None if value is None else records.decode(value)
    return record is not None and record.state == records.MANUAL


def _untable(table: Store, store: Store, cfg: Config, group: str) -> int:
    """Pool and domain modes: remove the client table's automatic entries
    of a prefix group's hosts (core/triple.py auto_table_key) once the
    group's own entry no longer whitelists it; return how many. Manual
    host entries ("OK manual") stay. A domain group's hosts cannot be
    told from their addresses: theirs expire with their lifetime."""
    from greylist.core.decide import whitelisted_client
    if cfg.client_match not in ("pool", "domain"):
        return 0
    now = int(time.time())
    value = store.get(client_key(group))
    record = None if value is None else records.decode(value)
    if record is not None and (record.state == records.MANUAL or (
            whitelisted_client(record, cfg) and not expired(record, now, cfg))):
        return 0
    doomed = []
    for key, stamp in table.items(MANUAL_BATCH):
        if not stamp.isdigit():
            continue
        try:
            address = client_address(key.decode("ascii"))
        except (BadAddress, UnicodeDecodeError):
            continue
        if address.encode("ascii") == key and client_group(address, None, cfg) == group:
            doomed.append(key)
    if not doomed:
        return 0
    return table.delete_if(doomed, lambda k, v: v is not None and v.isdigit())


def _unscreen(screened: Store, store: Store, cfg: Config, group: str | None = None) -> int:
    """Take back the postscreen table's entries that no manual entry
    covers any more; return how many changed.

    With group, those of the group's addresses (the policy service added
    each address it saw from the group); without, the "permit manual"
    entries of addresses whose own group has no manual entry (those a
    pool or domain group's manual-client passes wrote: found in review,
    they stayed for ever). An address that is a manual host entry, or
    whose group still has a manual entry, keeps its entry. A "permit
    manual" that displaced an automatic entry gives it back while it is
    live; "permit STAMP" entries stay while their group's automatic
    client entry is a live auto-whitelisting.
    """
    from greylist.core.decide import whitelisted_client
    from greylist.core.tables import MANUAL_PERMIT, permit_expired
    now = int(time.time())
    groups: dict[str, records.Record | None] = {}

    def record_of(name: str) -> records.Record | None:
        if name not in groups:
            value = store.get(client_key(name))
            groups[name] = None if value is None else records.decode(value)
        return groups[name]

    changed = 0
    for key, value in list(screened.items(MANUAL_BATCH)):
        try:
            address = client_address(key.decode("ascii"))
            found = client_group(address, None, cfg)
        except (BadAddress, UnicodeDecodeError):
            continue  # kept values (KEY/#auto) and others that are no address
        if (group is None and value != MANUAL_PERMIT) or (group is not None
                                                          and found != group):
            continue
        auto = record_of(found)
        if auto is not None and auto.state == records.MANUAL or (
                address != found and _manual_record(store.get(client_key(address)))):
            continue
        if value == MANUAL_PERMIT:
            changed += _restore(screened, key, lambda v: v == MANUAL_PERMIT,
                                lambda v: not permit_expired(v, now, cfg.max_age_s))
        elif not (auto is not None and whitelisted_client(auto, cfg)
                  and not expired(auto, now, cfg)):
            changed += screened.delete_if([key], lambda k, v: v is not None
                                          and v != MANUAL_PERMIT)
    return changed


def _postscreen(store: Store, cfg: Config, log: Log, client: str) -> int:
    from greylist.callout import PostscreenService
    from greylist.handlers.postscreen import UNPROVEN_HOST, PostscreenHandler
    from greylist.protocols.policy import ProtocolError
    from greylist.protocols.postscreen import check
    try:
        address = check({"client_address": client, "server_address": "127.0.0.1",
                         "client_port": "0", "server_port": "25"})
    except ProtocolError:
        to_stderr("greylistctl: %s is not an IP address" % client)
        return 2
    # The callout logs a store failure and answers ignore: say it here.
    store.open()
    quiet = Log("greylistctl", "/dev/null")
    table = _screened(cfg, readonly=True)
    service = PostscreenService(PostscreenHandler(cfg), store, Whitelists(cfg, log.warning),
                                quiet, table=table)
    verdict = service.verdict(address)
    group = client_group(address, None, cfg)
    value = store.get(client_key(group))
    record = None if value is None else records.decode(value)
    print("client group: %s" % group)
    print("client entry: %s" % ("absent" if record is None else _describe(
        record, int(time.time()), cfg)))
    if table is not None:
        entry = table.get(address.encode("ascii"))
        print("postscreen table: %s" % ("absent" if entry is None
                                        else entry.decode("ascii", "replace")))
        table.close()
    print("callout answer: action=%s%s\nreason: %s" % (
        verdict.action, "" if verdict.ttl is None else " ttl=%d" % verdict.ttl,
        verdict.reason))
    if verdict.reason == UNPROVEN_HOST:
        print("(the client group's automatic entry is proof for the hosts that the policy "
              "service saw with their names, which %s; greylist_client_match = %s keeps "
              "access-network hosts apart)"
              % ("the postscreen table lists" if cfg.postscreen_table else
                 "only a postscreen table could list (greylist_postscreen_table is none, "
                 "or privacy mode)", cfg.client_match))
    return 0


def _import(store: Store, cfg: Config, log: Log, source: str, keyed: Store) -> int:
    """Copy an LMDB database and its tables into the Redis database.

    In privacy mode (keyed: the database as handlers key it) a plaintext
    key is written hashed; a key that is a hash already (a database of
    privacy mode) is copied as it is. Without privacy mode, hashed keys
    are left behind: no plaintext request would ever find them. An entry
    that the Redis database holds already is kept (_put_new)."""
    from greylist.config import resolve
    from greylist.core.decide import expired
    from greylist.core.tables import stamp_expire_at
    if not is_redis(cfg):
        to_stderr("greylistctl: import copies into a Redis database; greylist_database is %s"
                  % cfg.database)
        return 2
    # Postfix's name (lmdb:PATH), as the usage and greylistctl(8) write
    # it, or the file's: as greylist_database and --database take them.
    source = source.removeprefix("lmdb:").removesuffix(".lmdb")
    lmdb_cfg = resolve(cfg._replace(database=source, client_table="",
                                    correspondent_table="", postscreen_table="",
                                    resolved=False))
    now = int(time.time())
    pairs = [("database", database(lmdb_cfg, readonly=True)[0], store,
              lambda value: (lambda r: r is not None and not expired(r, now, cfg))(
                  records.decode(value)))]
    for label, name, target, lifetime in (
            ("client table", lmdb_cfg.client_table, _table(cfg, writable=True), cfg.max_age_s),
            ("correspondent table", lmdb_cfg.correspondent_table, _learned(cfg, writable=True),
             cfg.correspondent_lifetime_s),
            ("postscreen table", lmdb_cfg.postscreen_table, _screened(cfg, writable=True),
             cfg.max_age_s)):
        if name and target is not None and os.path.exists(name + ".lmdb"):
            from greylist.stores.lmdb import LmdbStore
            pairs.append((label, LmdbStore(name, readonly=True), target,
                          lambda value, lifetime=lifetime: (lambda at: at is None or at > now)(
                              stamp_expire_at(value, lifetime))))
    from greylist.core.triple import stale_group_key
    from greylist.stores.privacy import looks_hashed
    for label, source_store, target, live in pairs:
        copied = skipped = hashes = kept = 0
        for key, value in source_store.items(MANUAL_BATCH):
            if label == "client table" and value.isdigit() and stale_group_key(
                    key, cfg.client_match):
                skipped += 1  # A group entry of an older version (cleanup drops them).
            elif not live(value):
                skipped += 1
            elif label == "database" and not cfg.privacy and looks_hashed(key):
                hashes += 1
            # A plaintext key in privacy mode is hashed on the way (keyed).
            elif _put_new(keyed if label == "database" and cfg.privacy
                          and not looks_hashed(key) else target, key, value):
                copied += 1
            else:
                kept += 1
        source_store.close()
        found = ", %d already in Redis kept" % kept if kept else ""
        print("import: %s: %d copied, %d expired left behind%s" % (label, copied, skipped,
                                                                  found))
        log.info("import from %s: %s: %d copied, %d expired left behind%s"
                 % (source, label, copied, skipped, found))
        if hashes:
            print("import: %s: %d keys left behind that are privacy mode's keyed hashes "
                  "(greylist_privacy = no here)" % (label, hashes))
    return 0


def _put_new(target: Store, key: bytes, value: bytes) -> bool:
    """Write value at key unless the Redis database has an entry there
    already (written since the switch, or a manual entry): an import never
    takes a live record back to an older one. Whether it wrote."""
    return target.update(key, lambda old: (value, True) if old is None else (None, False))


def _stage_postgrey(cfg: Config, args: dict, user: tuple[int, int] | None
                    ) -> tuple[str, tuple[int, int] | None] | int:
    """Check postgrey's options and copy its files (migrate.stage()) for
    user (_policy_user()); (the staged directory, the user the Berkeley DB
    tools run as), or an exit status.

    Staying root (a dry run, greylist_allow_root), greylistctl runs the
    tools as nobody: they parse files that postgrey's account controls."""
    from greylist import migrate
    try:
        migrate.options(args["--delay"], args["--max-age"], args["--retry-window"],
                        args["--ipv4cidr"], args["--ipv6cidr"], args["--lookup-by-host"])
    except migrate.MigrateError as exc:
        to_stderr("greylistctl: import-postgrey: %s" % exc)
        return 2
    tools = None
    if os.geteuid() == 0 and (user is None or user[0] == 0):  # greylist_user = root too
        import pwd
        try:
            nobody = pwd.getpwnam(TOOL_USER)
        except KeyError:
            to_stderr("greylistctl: import-postgrey: no user %s to run the Berkeley DB tools "
                      "as (they are never run as root); set greylist_user" % TOOL_USER)
            return 1
        tools = (nobody.pw_uid, nobody.pw_gid)
    try:
        return migrate.stage(args["DBDIR"], user, tool_user=tools), tools
    except migrate.MigrateError as exc:
        to_stderr("greylistctl: import-postgrey: %s" % exc)
        return 1


def _import_postgrey(store: Store, cfg: Config, log: Log, args: dict,
                     staging: tuple[str, tuple[int, int] | None]) -> int:
    """Import postgrey's staged database (migrate.py) into the database."""
    from greylist import migrate
    staged, tools = staging
    dry_run = args["--dry-run"]
    pg = migrate.options(args["--delay"], args["--max-age"], args["--retry-window"],
                         args["--ipv4cidr"], args["--ipv6cidr"], args["--lookup-by-host"])
    table = None
    try:
        table = _table(cfg, writable=not dry_run)
        migrate.recover(staged, user=tools)
        triples = migrate.dump(staged, migrate.TRIPLES, user=tools)
        clients = migrate.dump(staged, migrate.CLIENTS, user=tools)
        tallies = migrate.import_postgrey(store, table, triples, clients, pg, cfg,
                                          int(time.time()), dry_run)
    except migrate.MigrateError as exc:
        to_stderr("greylistctl: import-postgrey: %s" % exc)
        log.warning("import-postgrey from %s: %s" % (args["DBDIR"], exc))
        return 1
    finally:
        migrate.unstage(staged)
        if table is not None:
            table.close()
    for tally in tallies:
        print("import-postgrey: %s" % tally.line(dry_run))
        for why, count in sorted(tally.why.items()):
            print("  %d %s" % (count, why))
        log.info("import-postgrey from %s%s: %s" % (
            args["DBDIR"], " (dry run)" if dry_run else "", tally.line(dry_run)))
    return 0


def _cleanup(store: Store, cfg: Config, log: Log, dry_run: bool) -> int:
    if is_redis(cfg):
        print("cleanup: not needed: Redis expires each entry at the end of its lifetime")
        return 0
    # A real run creates a missing database and tables: smtpd needs a
    # table to exist before check_client_access names it.
    table = _table(cfg, writable=not dry_run)
    learned = _learned(cfg, writable=not dry_run)
    screened = _screened(cfg, writable=not dry_run)
    cleaner = Cleaner(store, table, cfg, log, batch=MANUAL_BATCH, correspondents=learned,
                      postscreen=screened)
    if dry_run:
        retained, dropped = cleaner.count(int(time.time()))
        print("cleanup: dry run retained=%d dropped=%d (nothing changed)"
              % (retained, dropped))
        return 0
    store.open()
    began = time.monotonic()
    busy_since = None
    state = None
    terminal = sys.stdout.isatty()
    try:
        while True:
            stepped = cleaner.step(budget_s=0.2, start=True)
            if stepped is None:
                busy_since = busy_since or time.monotonic()
                if time.monotonic() - busy_since > BUSY_WAIT_S:
                    to_stderr("greylistctl: another process held the cleanup state for %d s; "
                              "try again later" % BUSY_WAIT_S)
                    return EX_TEMPFAIL
                time.sleep(0.05)
                continue
            busy_since, state = None, stepped
            if state.position is None:
                break
            if terminal:
                print("\rcleanup: %d entries examined, %d dropped"
                      % (state.retained + state.dropped, state.dropped), end="", flush=True)
    except KeyboardInterrupt:
        if state is not None:
            cleaner.abandon(state)
        raise
    finally:
        cleaner.close()
    if terminal:
        print()
    print("cleanup: full retained=%d dropped=%d" % (state.retained, state.dropped))
    print("cleanup: %.1f s, longest write lock %.1f ms"
          % (time.monotonic() - began, 1000 * cleaner.longest_write_s))
    return 0


def _check(store: Store, cfg: Config) -> int:
    """greylistctl check: each existing file opened, read to its end and
    given a trial commit; one line each; 1 if any is damaged."""
    if is_redis(cfg):
        try:
            store.get(b"greylist-check")
        except StoreError as exc:
            print("check: %s" % exc)
            return 1
        print("check: %s: answers (Redis checks its own files)" % cfg.database)
        return 0
    from greylist.stores.lmdbenv import Environment
    damaged = 0
    if not os.path.exists(cfg.database + ".lmdb"):
        print("check: %s.lmdb: no such database" % cfg.database)
        return 1
    for name in (cfg.database, cfg.client_table, cfg.correspondent_table,
                 cfg.postscreen_table):
        if not name or not os.path.exists(name + ".lmdb"):
            continue  # A table that no request has needed yet.
        # All in a child process: damage can make a read abort too.
        env = Environment(name, lock_timeout_s=cfg.lock_timeout_ms / 1000)
        try:
            problem, entries = env.verify()
        finally:
            env.close()
        if problem is not None:
            print("check: %s" % problem)
            damaged += 1
            continue
        print("check: %s.lmdb: ok, %d entries, a trial write commits" % (name, entries))
    return 1 if damaged else 0


def _stats(store: Store, cfg: Config) -> int:
    now = int(time.time())
    counts: dict[str, int] = {}
    oldest = newest = None
    stale = 0
    for key, value in store.items():
        record = records.decode(value)
        state = "malformed" if record is None else record.state
        counts[state] = counts.get(state, 0) + 1
        if record is None:
            continue
        stale += expired(record, now, cfg)
        if oldest is None or record.first_seen < oldest[0]:
            oldest = (record.first_seen, key)
        if newest is None or record.last_seen > newest[0]:
            newest = (record.last_seen, key)
    info = store.info()
    print("database: %s" % store.path)
    print("entries: %d" % info["entries"])
    for state in records.STATES + ("malformed",):
        if state in counts:
            print("  %s: %d" % (state, counts[state]))
    print("expired, awaiting cleanup: %d" % stale)
    if "file_size" in info:
        print("file size: %d bytes" % info["file_size"])
        print("map size: %d bytes" % info["map_size"])
    for label, found in (("oldest first seen", oldest), ("newest last seen", newest)):
        if found is not None:
            print("%s: %s %s" % (label, _when(found[0]), found[1].decode("utf-8", "replace")))
    # Read-only, as the database: a user who may only read them can run stats.
    for label, table in (("client table", _table(cfg, writable=False, readonly=True)),
                         ("correspondent table", _learned(cfg, readonly=True)),
                         ("postscreen table", _screened(cfg, readonly=True))):
        if table is not None:
            print("%s: %s, %d entries" % (label, table.path, table.info()["entries"]))
            table.close()
    return 0


def _show(store: Store, cfg: Config, log: Log, args: dict,
          clock: Callable[[], float]) -> int:
    attrs = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
             "client_address": args["CLIENT"], "sender": args["SENDER"],
             "recipient": args["RECIPIENT"]}
    if args["--client-name"]:
        attrs["client_name"] = args["--client-name"]
    attrs = {name: value for name, value in attrs.items() if value not in ("", "<>")}
    if "recipient" not in attrs:
        to_stderr("greylistctl: show needs a RECIPIENT (the policy service answers DUNNO "
                  "without one)")
        return 2
    now = int(clock())
    handler = PolicyHandler(cfg, host_name())
    exemptions = Whitelists(cfg, log.warning).exemptions(now)
    try:
        answer, pending, outcome = handler.explain(attrs, Session(), now, exemptions,
                                                   store.get_many)
    except ProtocolError as exc:
        to_stderr("greylistctl: %s" % exc)
        return 2
    if pending is None:
        # Answered without its records (an exemption, say): show them all
        # the same, as a new request of this connection would read them.
        try:
            triple = triple_from_request(attrs, cfg, client_address(attrs.get("client_address")))
        except BadAddress as exc:
            to_stderr("greylistctl: %s" % exc)
            return 2
        found = keys(triple)
        outcome = handler.change(found, now, False)(store.get_many(found))[1]
    else:
        triple, found = pending.triple, pending.keys
    print("client group: %s" % triple.client)
    print("sender: %s" % _printable(triple.sender))
    print("recipient: %s" % _printable(triple.recipient))
    for warning in outcome.warnings:
        print("warning: %s" % warning)
    reason = answer.decision.reason
    for where in Whitelists(cfg, log.warning).provenance(
            reason, attrs, client_address(attrs.get("client_address"))):
        # The file and line (or setting) of the exemption (issue 15).
        print("%s: %s" % (reason, where))
    for label, k, record in zip(("triple", "sender entry", "client entry",
                                 "correspondent pair"), found, outcome.records):
        if k is None:
            print("%s: none (%s)" % (label, "clients without an address have no client "
                                     "entry" if label == "client entry" else
                                     "greylist_correspondent_check = no, or the null sender"))
            continue
        shown = "absent" if record is None else _describe(record, now, cfg)
        print("%s: %s\n  %s" % (label, _shown_key(store, k), shown))
        if record is not None and record.state == records.MANUAL:
            _show_kept(store, k, now, cfg)
    address = client_address(attrs.get("client_address"))
    if address not in (triple.client, "unknown"):
        # A manual host entry (whitelist add --host): Postfix reads it from
        # the client table; the policy service matches client groups.
        host = client_key(address)
        value = store.get(host)
        record = None if value is None else records.decode(value)
        if record is not None and record.state == records.MANUAL:
            print("host entry: %s\n  %s" % (_shown_key(store, host),
                                            _describe(record, now, cfg)))
            print("  (check_client_access on the client table accepts the host before "
                  "the policy service is asked)")
    print("decision now: %s\nreason: %s" % (answer.action, reason))
    return 0


def _printable(address: str) -> str:
    """address as the log writes it: white space and controls as %xx, so
    that an address cannot add lines or fields to the output."""
    return address if address.isprintable() and " " not in address else escape(address)


def _show_kept(store: Store, key: bytes, now: int, cfg: Config) -> None:
    """Print the automatic entry a manual one keeps beside it, if any."""
    value = store.get(_kept_key(key))
    record = None if value is None else records.decode(value)
    if record is not None:
        print("  keeps the automatic entry %s\n    %s"
              % (_shown_key(store, _kept_key(key)), _describe(record, now, cfg)))


def _shown_key(store, key: bytes) -> str:
    """The key as stored (hashed in privacy mode)."""
    stored = store.hash(key) if hasattr(store, "hash") else key
    return stored.decode("utf-8", "replace")


def _describe(record, now: int, cfg) -> str:
    """A record's state, times and count, and when it expires: with the
    lifetimes of cleanup (core/decide.py expire_at())."""
    at = expire_at(record, cfg)
    if at is None:
        until = "never expires"
    elif at > now:
        until = "expires %s (in %s)" % (_when(at), _duration(at - now))
    else:
        until = "expired %s (%s ago)" % (_when(at), _duration(now - at))
    state = "expired" if expired(record, now, cfg) else "live"
    return "%s, first seen %s, last seen %s, count %d (%s), %s" % (
        record.state, _when(record.first_seen), _when(record.last_seen), record.count, state,
        until)


def _duration(seconds: int) -> str:
    """seconds in its largest unit, and the next one unless it is zero:
    "29d 23h", "26d", "4m 10s", "9s"."""
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for index, (unit, size) in enumerate(units):
        if seconds >= size or unit == "s":
            shown = "%d%s" % (seconds // size, unit)
            if unit != "s":
                rest, (next_unit, next_size) = seconds % size, units[index + 1]
                if rest // next_size:
                    shown += " %d%s" % (rest // next_size, next_unit)
            return shown
    raise AssertionError("unreachable")


def _when(stamp: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(stamp))


def _dump(store: Store) -> int:
    for key, value in store.items():
        print("%s\t%s" % (key.decode("utf-8", "replace"), value.decode("utf-8", "replace")))
    return 0


def _whitelist(store: Store, cfg: Config, log: Log, args: dict) -> int:
    """whitelist add and remove: a client group, a host or a (client
    group, sender) entry, in the database and the tables."""
    from greylist.core.tables import MANUAL_PERMIT, permit_expired, stamp_expire_at
    if args["list"]:
        return _whitelist_list(store, cfg)
    client = args["CLIENT"]
    address = None
    host = args["--host"]
    try:
        address = client_address(client)
        group = client_group(address, None, cfg)
        table_name = table_key(address, group)
    except BadAddress:
        group = None
        if not host and cfg.client_match == "domain":
            group = registered_domain(client.casefold())
        elif not host and cfg.client_match == "pool":
            from greylist.core.pools import POOL_ALIASES, pool_of, pool_set
            group = pool_of(client.casefold(), pool_set(cfg.pool_domains))
            group = POOL_ALIASES.get(group, group)
        if group is None:
            to_stderr("greylistctl: %s is not an IP address%s" % (
                client, "" if host else {"domain": " or a registered domain",
                                         "pool": " or a pool domain"}.get(cfg.client_match, "")))
            return 2
        table_name = group.encode("utf-8")
    if group == "unknown":
        to_stderr("greylistctl: clients without an address cannot be whitelisted")
        return 2
    # A host in a wider group: its own key in the database (for list and
    # show), its address in the client table, which check_client_access
    # looks up before the group's partial forms, and in the postscreen
    # table. The policy service reads client groups only (a fifth read
    # per request otherwise), so without a client table it would not
    # see the entry: refused.
    single = host and group != address
    if single:
        group, table_name = address, address.encode("ascii")
    sender = args["SENDER"]
    if sender:
        normalised = normalise_sender(sender, cfg)
        k = sender_key(group, normalised)
        what = "%s %s" % (group, _printable(normalised))
    else:
        k, what = client_key(group), ("host %s" % group if single else group)
    table = None if sender else _table(cfg, writable=args["add"])
    if single and table is None and args["add"]:
        to_stderr("greylistctl: --host needs the client table (greylist_client_table), read "
                  "by check_client_access before the policy service: the policy service "
                  "matches client groups (%s)" % client_group(address, None, cfg))
        return 2
    # The postscreen table lists addresses: an address given, or (on
    # remove) the addresses a pool or domain group left there.
    screened = None if sender or (address is None and args["add"]) else _screened(
        cfg, writable=args["add"])
    now = int(time.time())
    is_ok = MANUAL_OK.__eq__
    table_live = (lambda value: (lambda at: at is None or at > now)(
        stamp_expire_at(value, cfg.max_age_s)))
    if args["add"]:
        manual = records.encode(records.Record(now, now, 1, records.MANUAL))
        # Keep the automatic entry (and its pass count) beside the manual
        # one, so that remove gives it back as it was (issue 15).
        listed = _displace(store, k, manual, _manual_record)
        if table is not None:
            # "OK manual": Postfix reads OK, and cleanup, which expires
            # time stamps, keeps it as long as the manual entry.
            _displace(table, table_name, MANUAL_OK, is_ok)
        if screened is not None and screen_denied(address, cfg.postscreen_drop_networks,
                                                  cfg.postscreen_enforce_networks):
            # The callout drops or enforces it: the table must not permit it.
            print("not in the postscreen table: %s is in greylist_postscreen_drop_networks "
                  "or greylist_postscreen_enforce_networks" % address)
        elif screened is not None:
            _displace(screened, address.encode("ascii"), MANUAL_PERMIT,
                      MANUAL_PERMIT.__eq__)
        if listed is not None:
            record = records.decode(listed)
            print("already listed: %s (added %s)" % (what, _when(record.first_seen)))
            return 0
        log.info("whitelist: added %s" % what)
        print("added: %s" % what)
    else:
        live = (lambda value: (lambda r: r is not None and not expired(r, now, cfg))(
            records.decode(value)))
        was_manual = existed = _restore(store, k, _manual_record, live)
        if not existed:
            # No manual entry: remove an automatic one with the same key.
            existed = store.delete(k)
        # An IPv6 host and its group share the client table key of the
        # address the group was added with: the other's entry keeps it.
        if single:
            shared = ":" in address and _manual_record(store.get(client_key(
                client_group(address, None, cfg))))
        else:
            shared = (address is not None and ":" in address and address != group
                      and _manual_record(store.get(client_key(address))))
        if table is not None and not shared:
            # "OK manual" gives back the time stamp it displaced; removing
            # an automatic entry removes its time stamp.
            if not _restore(table, table_name, is_ok, table_live) and not was_manual:
                table.delete(table_name)
            if address is not None and not single:
                _untable(table, store, cfg, group)
        if screened is not None and single:
            if not _manual_record(store.get(client_key(client_group(address, None, cfg)))):
                _restore(screened, address.encode("ascii"), MANUAL_PERMIT.__eq__,
                         lambda value: not permit_expired(value, now, cfg.max_age_s))
        elif screened is not None and address is not None:
            _unscreen(screened, store, cfg, group)
        elif screened is not None:
            _unscreen(screened, store, cfg)
        log.info("whitelist: removed %s" % what)
        print(("removed: %s" if existed else "not listed: %s") % what)
    for each in (table, screened):
        if each is not None:
            each.close()
    return 0


def _whitelist_list(store: Store, cfg: Config) -> int:
    """whitelist list: every manual entry, with when it was added, and
    the automatic entry it keeps, if any."""
    manual: list[tuple[bytes, records.Record]] = []
    kept: dict[bytes, records.Record] = {}
    suffix = KEPT_SUFFIX.encode("ascii")
    for key, value in store.items(MANUAL_BATCH):
        record = records.decode(value)
        if record is None:
            continue
        if key.endswith(suffix):
            kept[key] = record
        elif record.state == records.MANUAL:
            manual.append((key, record))
    hashed = hasattr(store, "hash")
    for key, record in manual:
        shown = key.decode("utf-8", "replace")
        if hashed:
            kind = "entry"   # privacy mode: the key is a keyed hash
        elif "/" in shown:
            kind, shown = "sender", shown.replace("/", " ", 1)
        else:
            kind = "client"
            try:
                if client_group(client_address(shown), None, cfg) != shown:
                    kind = "host"
            except BadAddress:
                pass
        line = "%s %s added %s" % (kind, shown, _when(record.first_seen))
        auto = None if hashed else kept.get(_kept_key(key))
        if auto is not None:
            line += "; keeps the automatic %s entry, count %d" % (auto.state, auto.count)
        print(line)
    if not manual:
        print("no manual entries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
