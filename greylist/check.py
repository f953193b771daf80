"""greylist --check: the settings checked as a run would load them.

DESCRIPTION
    check() loads the settings (config.load, with the command line's
    overrides) and then looks at what a run needs at start, without
    writing or creating anything:

    greylist_log    syslog; a postlog socket that exists; a log file
                    that is not a symbolic link and can be appended to,
                    or created in its directory.
    whitelists      every file readable, every line understood
                    (whitelist.py, the code a run uses).
    database        for LMDB: the directory exists, is not world-writable
                    and is writable; each existing data file (database
                    and tables) is in Postfix's LMDB 0.9 format, not a
                    symbolic link, readable and writable (stores/lmdbfile.py).
                    For Redis: connected to (within
                    greylist_redis_timeout), authenticated, a key of
                    greylist's own read, and the compare-and-set script
                    run on a check key with an expiry that has passed
                    (written and gone at once: a login that may read but
                    not write is found); a note when the
                    server refuses scripts (writes then take WATCH and
                    MULTI/EXEC, one round trip more). Not as root: the
                    password file must belong to the user a run has.
    root            with greylist_user set, everything above is checked
                    as that user (a child process that drops to it, with
                    postdrop kept for postlog, as a run does): the
                    database directory belongs to it, and root's own
                    rules for directories would refuse it. Without it, a
                    note (greylist: spawn(8) runs it as the service's
                    user) or, for greylistd, a problem (it refuses to
                    start as root without greylist_user), unless
                    greylist_allow_root = yes.

    It prints "FILE: ok" on stdout, or each problem as "FILE: problem"
    on stderr, and returns the exit status, 0 or 1; it prints nothing
    when stderr is spawn(8)'s socket (log.stderr_is_a_client()). FILE is the settings
    file, or "(defaults)" without one.
"""

import os
import stat
import sys
from typing import Callable

from greylist.config import Config, ConfigError, is_redis, repeated_settings
from greylist.log import POSTLOG_SOCKET, world_writable_directory


# Postfix's default smtpd_policy_service_max_idle.
SMTPD_POLICY_MAX_IDLE_S = 300


def check(path: str | None, load: Callable[[], Config], daemon: bool = False) -> int:
    """Check the settings that load() returns; print; return 0 or 1.
    daemon: greylistd's check (root without greylist_user is a problem)."""
    name = path or "(defaults)"
    try:
        cfg, failed = load(), ""
    except ConfigError as exc:
        cfg, failed = None, str(exc)
    # Nothing into spawn(8)'s socket (descriptors 0 to 2), should master.cf
    # run --check by mistake: the exit status says it then.
    from greylist.log import stderr_is_a_client
    quiet = stderr_is_a_client()
    if cfg is None:
        return _report(name, [failed], [], quiet)
    if os.geteuid() == 0 and cfg.user and not cfg.allow_root:
        return _as_user(path, cfg, quiet)
    notes = repeated_settings(path) if path else []
    problems = problems_of(cfg, notes)
    if daemon and cfg.idle_timeout_s < SMTPD_POLICY_MAX_IDLE_S:
        notes.append("greylist_idle_timeout = %ds is shorter than smtpd's "
                     "smtpd_policy_service_max_idle (300s by default): greylistd closes "
                     "connections that smtpd still holds, which then connects again"
                     % cfg.idle_timeout_s)
    if os.geteuid() == 0 and not cfg.allow_root:
        if daemon:
            problems.append("started as root, greylistd refuses to run without greylist_user "
                            "(the unprivileged user to serve as)")
        else:
            notes.append("a run as root is refused (greylist_allow_root = no); spawn(8) runs "
                         "it as the service's user: set greylist_user to check as that user, "
                         "or run --check as it")
    if is_redis(cfg) and not problems:
        if os.geteuid() == 0:
            notes.append("the Redis database is not checked as root (its password file "
                         "belongs to the user a run has): run --check as that user")
        else:
            found, more = redis_problems(cfg)
            problems += found
            notes += more
    return _report(name, problems, notes, quiet)


def _report(name: str, problems: list[str], notes: list[str], quiet: bool) -> int:
    """Print the notes and problems (not into spawn(8)'s socket); the status."""
    if not quiet:
        from greylist.log import to_stderr
        for note in notes:
            print("%s: note: %s" % (name, note))
        sys.stdout.flush()
        for problem in problems:
            to_stderr("%s: %s" % (name, problem))
        if not problems:
            print("%s: ok" % name)
    return 1 if problems else 0


def _as_user(path: str | None, cfg: Config, quiet: bool) -> int:
    """check() as greylist_user, in a child that drops to it as a run
    does; the child's status."""
    import pwd
    name = path or "(defaults)"
    try:
        entry = pwd.getpwnam(cfg.user)
    except KeyError:
        return _report(name, ["greylist_user: no user %r" % cfg.user], [], quiet)
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        return _report(name, ["greylist_user %r is root or has group root" % cfg.user],
                       [], quiet)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            from greylist.log import drop_to
            drop_to(entry.pw_uid, entry.pw_gid, cfg.log)
            status = check(path, lambda: cfg)
            sys.stdout.flush()
        except BaseException as exc:  # noqa: BLE001 (the child must exit here)
            _report(name, ["checking as %s: %s" % (cfg.user, exc)], [], quiet)
        finally:
            os._exit(status)
    _, waited = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(waited) if os.WIFEXITED(waited) else 1


def problems_of(cfg: Config, notes: list[str] | None = None) -> list[str]:
    """What would fail, or vanish, in a run with these settings; what
    works but may not be meant goes into notes, if given."""
    problems = log_problems(cfg.log)
    from greylist.whitelist import Whitelists
    Whitelists(cfg, problems.append, note=None if notes is None else notes.append)
    if not is_redis(cfg):
        problems += database_problems(cfg)
    elif cfg.privacy and cfg.secret_file and not os.path.lexists(cfg.secret_file):
        # With Redis the policy programs never make it (privacy.py).
        problems.append("greylist_secret_file %s does not exist: copy it from the host that "
                        "has it (with a Redis database greylist does not make one)"
                        % cfg.secret_file)
    return problems


def log_problems(target: str) -> list[str]:
    """Why lines to greylist_log would not arrive, if they would not."""
    if target == "syslog":
        return []
    if target.startswith("postlog"):
        socket_path = target.partition(":")[2] or POSTLOG_SOCKET
        try:
            if stat.S_ISSOCK(os.stat(socket_path).st_mode):
                return []
            return ["greylist_log: %s is not a socket" % socket_path]
        except OSError as exc:
            return ["greylist_log: postlog socket %s: %s (is Postfix's postlog service "
                    "running?)" % (socket_path, exc.strerror)]
    directory = os.path.dirname(os.path.abspath(target))
    try:
        if world_writable_directory(target):
            return ["greylist_log: %s is world-writable: use a directory that only its "
                    "owner can write" % directory]
    except OSError:
        pass  # Reported below.
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        if not os.path.isdir(directory):
            return ["greylist_log: directory %s does not exist" % directory]
        if not os.access(directory, os.W_OK | os.X_OK):
            return ["greylist_log: cannot create %s: directory not writable" % target]
        return []
    except OSError as exc:
        return ["greylist_log: %s: %s" % (target, exc.strerror)]
    if stat.S_ISLNK(st.st_mode):
        return ["greylist_log: %s is a symbolic link" % target]
    if not stat.S_ISREG(st.st_mode):
        return ["greylist_log: %s is not a regular file" % target]
    if not os.access(target, os.W_OK):
        return ["greylist_log: %s is not writable" % target]
    return []


# SET ... EXAT, in every write, came with Redis 6.2 (Valkey reports 7.2).
MIN_REDIS = (6, 2)


def _redis_version(info) -> tuple[int, ...] | None:
    """The redis_version of an INFO server reply (as redis-py parses it, a
    dict, or the raw text), or None."""
    if isinstance(info, dict):
        value = str(info.get("redis_version", ""))
    else:
        text = info.decode("ascii", "replace") if isinstance(info, bytes) else str(info)
        value = next((line.partition(":")[2].strip() for line in text.splitlines()
                      if line.startswith("redis_version:")), "")
    parts = value.split(".")[:3]
    if all(part.isdigit() and len(part) <= 6 for part in parts):
        return tuple(int(part) for part in parts)
    return None


def _info_server(connection) -> bytes:
    """INFO server, or b"" where it is refused (an ACL without INFO, which
    greylist does not need): outside Connection.call, so that a refusal
    does not start the back-off of the checks after it."""
    import redis
    try:
        return connection.client().execute_command("INFO", "server")
    except (redis.exceptions.RedisError, OSError):
        return b""


def redis_problems(cfg: Config) -> tuple[list[str], list[str]]:
    """Why a run could not use the Redis database, and notes."""
    from greylist.stores.base import StoreError
    from greylist.stores.redisstore import RedisStore
    from greylist.wiring import redis_connection
    notes: list[str] = []
    connection = redis_connection(cfg, notice=notes.append)
    store = RedisStore(connection, "db")
    try:
        store.get_many([b"greylist-check"])
        version = _redis_version(_info_server(connection))
        if version is not None and version < MIN_REDIS:
            return ["greylist_database: Redis %s; greylist needs %d.%d or later (its "
                    "writes use SET EXAT)" % (".".join(map(str, version)), *MIN_REDIS)], notes
        # A write of greylist's kind (the script's GET and SET, key
        # permissions included) that leaves nothing: its expiry has passed,
        # so Redis deletes the key as it sets it. A login that may read
        # but not write (an ACL without SET, or %R~ keys) fails open on
        # every new triple.
        check_key = store.stored(b"greylist-check")
        connection.compare_and_set([check_key], {check_key: None},
                                   {check_key: (b"greylist-check", 1)})
        if not connection.scripting:
            # What writes use instead: allowed too?
            connection.reads([("WATCH", store.stored(b"greylist-check")), ("UNWATCH",)])
    except StoreError as exc:
        if "MasterNotFoundError" in str(exc):
            # What each sentinel says, as the lookup's error does not.
            notes.extend(connection.sentinel_answers())
        return ["greylist_database: %s" % exc], notes
    finally:
        connection.close()
    return [], notes


def database_problems(cfg: Config) -> list[str]:
    """Why the LMDB database or its tables would not open."""
    from greylist.stores.base import StoreError
    from greylist.stores.lmdbfile import check_directory, check_format, data_file
    problems = []
    try:
        check_directory(cfg.database)
    except StoreError as exc:
        return [str(exc)]
    for table in (cfg.database, cfg.client_table, cfg.correspondent_table,
                  cfg.postscreen_table):
        if not table:
            continue
        path = data_file(table)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not os.access(os.path.dirname(path), os.W_OK | os.X_OK):
                problems.append("cannot create %s: directory not writable" % path)
            continue
        except OSError as exc:
            problems.append("%s: %s" % (path, exc.strerror))
            continue
        if stat.S_ISLNK(st.st_mode):
            problems.append("%s is a symbolic link" % path)
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            problems.append("cannot open %s: %s" % (path, exc.strerror))
            continue
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            problems.append("%s is not a regular file" % path)
            continue
        try:
            check_format(path, fd)
        except StoreError as exc:
            problems.append(str(exc))
            continue
        finally:
            os.close(fd)
        if not os.access(path, os.R_OK | os.W_OK):
            problems.append("%s is not readable and writable" % path)
    return problems
