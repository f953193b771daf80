"""Logging to syslog (mail facility), Postfix's postlog socket, or a file.

DESCRIPTION
    Under spawn(8) stderr is the Postfix socket, so nothing is ever
    written there. The greylist_log setting selects where lines go:

    syslog          syslog(3) with facility mail and the process ID.
                    Where no syslog socket exists the C library drops
                    the lines silently.
    postlog[:PATH]  datagrams to Postfix's postlogd(8) socket, default
                    /var/spool/postfix/public/postlog, for hosts that
                    log with maillog_file (Postfix 3.4 and later); the
                    lines land in Postfix's own log file.
    /FILE           lines appended to a file, opened again within a
                    second when it is rotated or removed; never through
                    a symbolic link, nor in a world-writable directory
                    (the lines are lost instead).

    File and postlog lines look like the lines Postfix's own programs
    write to maillog_file (msg_logger.c): a time stamp "%b %d %H:%M:%S"
    (day zero-padded, no sub-second part), the first label of the host
    name, then "ident[pid]: ". Postfix takes the host from myhostname;
    running postconf at every start would cost a spawned process more
    than its requests, so the host is greylist_log_hostname when set
    (set it to Postfix's myhostname when that is not the system's host
    name), else the system's host name.

    Warnings start with "warning: " and fatal errors with "fatal: ", as
    in Postfix; fatal errors also go to stderr, unless it is the socket
    that spawn(8) connects (stderr_is_a_client()). The clock that stamps file and postlog lines is injected
    (time.time by default). Debug lines are written only when the -v count reaches
    their level. A logging failure is never allowed to fail the service.
"""

import errno
import os
import stat
import syslog
import time
from typing import Callable

POSTLOG_SOCKET = "/var/spool/postfix/public/postlog"
MAX_MESSAGE = 2000


def world_writable_directory(path: str) -> str | None:
    """The directory of a log file at path if anyone can write it (no log
    file there, nor one that greylist --check accepts); else None.
    OSError if the directory cannot be looked at."""
    directory = os.path.dirname(os.path.abspath(path))
    return directory if os.stat(directory).st_mode & stat.S_IWOTH else None


class Log:
    """A logger for one process; see the module description for targets."""

    def __init__(self, ident: str = "greylist", target: str = "syslog",
                 verbose: int = 0, clock: Callable[[], float] = time.time,
                 host: str = "") -> None:
        self.ident = ident
        self.verbose = verbose
        self.clock = clock
        self._target = target
        self._socket = None
        # The first label only, as msg_logger.c writes myhostname.
        self._host = (host or os.uname().nodename).split(".")[0] or "amnesiac"
        if target == "syslog":
            syslog.openlog(ident, syslog.LOG_PID, syslog.LOG_MAIL)
        elif target.startswith("postlog"):
            # Imported here: only the postlog target needs a socket.
            import socket
            self._path = target.partition(":")[2] or POSTLOG_SOCKET
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)
        else:
            self._path = target
        self._fd = -1
        self._file_id = (0, 0)
        self._checked_at = -1
        self._stamp_at = -1
        self._stamp = ""
        self._prefix = "%s %s[%d]: " % (self._host, ident, os.getpid())

    def info(self, message: str) -> None:
        """Log an informational line."""
        self._write(syslog.LOG_INFO, message)

    def warning(self, message: str) -> None:
        """Log a problem that the program recovers from."""
        self._write(syslog.LOG_WARNING, "warning: " + message)

    def fatal(self, message: str) -> None:
        """Log an error that ends the program (the caller exits), and write
        it to stderr (a terminal, a cron mail, a systemd journal), unless
        stderr is the client's socket as spawn(8) connects it: an
        administrator sees why a program stops, Postfix never does."""
        self._write(syslog.LOG_CRIT, "fatal: " + message)
        to_stderr("%s: fatal: %s" % (self.ident, message))

    def debug(self, level: int, message: str) -> None:
        """Log message if -v was given at least level times."""
        if self.verbose >= level:
            self._write(syslog.LOG_INFO, message)

    def _write(self, priority: int, message: str) -> None:
        # One record per message: no newlines, bounded length, and
        # surrogates (bytes that were not UTF-8) written as \udcXX.
        message = message.replace("\n", " ")[:MAX_MESSAGE]
        try:
            if self._target == "syslog":
                syslog.syslog(priority, message.encode("utf-8", "backslashreplace")
                              .decode("utf-8"))
                return
            now = int(self.clock())
            if now != self._stamp_at:
                self._stamp_at = now
                # msg_logger.c's format: "Dec 01 14:09:30".
                self._stamp = time.strftime("%b %d %H:%M:%S ", time.localtime(now))
            line = (self._stamp + self._prefix + message).encode("utf-8", "backslashreplace")
            if self._socket is not None:
                self._socket.sendto(line, self._path)
            else:
                os.write(self._file(now), line + b"\n")
        except OSError:
            self.close()  # Logging must never fail the service.

    def close(self) -> None:
        """Close the log file, if one is open."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _file(self, now: int) -> int:
        """The log file's descriptor, kept open; opened again when the path
        names another file (rotated or removed), which is looked at once a
        second. Created 0640 whatever the umask: the lines name mail
        addresses. O_APPEND and one write(2) per line, so the lines of
        concurrent processes do not mix."""
        if self._fd >= 0:
            if now == self._checked_at:
                return self._fd
            try:
                st = os.stat(self._path)
                if (st.st_ino, st.st_dev) == self._file_id:
                    self._checked_at = now
                    return self._fd
            except OSError:
                pass
        self.close()
        # Never through a symbolic link (issue 15: root's greylistctl
        # followed one): a link at the name loses the lines instead. Never
        # a FIFO or device either (O_NONBLOCK: an open of a FIFO with no
        # reader does not wait), which would hang root's commands.
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        # Never in a directory that anyone can write (/tmp): another user
        # could put a file of theirs at the name and read the lines.
        if world_writable_directory(self._path):
            raise OSError(errno.EPERM, "the directory is world-writable", self._path)
        try:
            fd = os.open(self._path, flags)
        except FileNotFoundError:
            fd = os.open(self._path, flags | os.O_CREAT | os.O_EXCL, 0o640)
            os.fchmod(fd, 0o640)  # Whatever the umask (spawn(8): the master's).
            _give_to_directory_owner(fd, self._path)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file", self._path)
        self._fd = fd
        self._file_id = (st.st_ino, st.st_dev)
        self._checked_at = now
        return self._fd


def _give_to_directory_owner(fd: int, path: str) -> None:
    """A log file that root just created in a directory of another user
    (the greylist user's log directory) becomes that user's: a fatal
    error at start, logged as root, must not leave a file that the
    unprivileged processes can no longer write."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(os.path.dirname(os.path.abspath(path)))
        if st.st_uid != 0:
            os.fchown(fd, st.st_uid, st.st_gid)
    except OSError:
        pass


def log_groups(target: str) -> list[int]:
    """The supplementary groups a process that gives up root keeps to log
    to target: postdrop for postlog (the socket is under Postfix's public
    directory, group postdrop, mode 0710, as the policy processes get it
    with user=...:postdrop), else none."""
    if not target.startswith("postlog"):
        return []
    import grp
    try:
        gid = grp.getgrnam("postdrop").gr_gid
    except KeyError:
        return []
    return [] if gid == 0 else [gid]


def drop_to(uid: int, gid: int, target: str) -> list[int]:
    """Give up root for uid and gid, in the order that works (groups,
    then the group, then the user: a process that is no longer root
    cannot change its groups), keeping only the groups that logging to
    target needs (log_groups()); return those. Raises OSError."""
    kept = log_groups(target)
    os.setgroups(kept)
    os.setgid(gid)
    os.setuid(uid)
    return kept


def to_stderr(line: str) -> None:
    """Write line to stderr for an administrator, unless stderr is the
    client's socket as spawn(8) connects it (stderr_is_a_client()): the
    one place where greylist writes there."""
    if stderr_is_a_client():
        return
    try:
        os.write(2, (line + "\n").encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def stderr_is_a_client() -> bool:
    """Whether descriptor 2 is the socket on descriptor 0, as spawn(8)
    connects them: bytes there would reach Postfix as a reply."""
    try:
        err, into = os.fstat(2), os.fstat(0)
    except OSError:
        return True
    import stat
    return stat.S_ISSOCK(err.st_mode) and (err.st_dev, err.st_ino) == (into.st_dev, into.st_ino)
