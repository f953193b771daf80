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
    /FILE           lines appended to a file.

    Warnings start with "warning: " and fatal errors with "fatal: ", as
    in Postfix. Debug lines are written only when the -v count reaches
    their level. A logging failure is never allowed to fail the service.
"""

import os
import socket
import syslog
import time

POSTLOG_SOCKET = "/var/spool/postfix/public/postlog"
MAX_MESSAGE = 2000


class Log:
    """A logger for one process; see the module description for targets."""

    def __init__(self, ident: str = "greylist", target: str = "syslog",
                 verbose: int = 0) -> None:
        self.ident = ident
        self.verbose = verbose
        self._target = target
        self._socket: socket.socket | None = None
        self._host = socket.gethostname().split(".")[0]
        if target == "syslog":
            syslog.openlog(ident, syslog.LOG_PID, syslog.LOG_MAIL)
        elif target.startswith("postlog"):
            self._path = target.partition(":")[2] or POSTLOG_SOCKET
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)
        else:
            self._path = target

    def info(self, message: str) -> None:
        """Log an informational line."""
        self._write(syslog.LOG_INFO, message)

    def warning(self, message: str) -> None:
        """Log a problem that the program recovers from."""
        self._write(syslog.LOG_WARNING, "warning: " + message)

    def fatal(self, message: str) -> None:
        """Log an error that ends the program (the caller exits)."""
        self._write(syslog.LOG_CRIT, "fatal: " + message)

    def debug(self, level: int, message: str) -> None:
        """Log message if -v was given at least level times."""
        if self.verbose >= level:
            self._write(syslog.LOG_INFO, message)

    def _write(self, priority: int, message: str) -> None:
        # One record per message: no newlines, bounded length, no surrogates.
        message = message.replace("\n", " ")[:MAX_MESSAGE]
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        try:
            if self._target == "syslog":
                syslog.syslog(priority, message)
                return
            stamp = time.strftime("%b %e %H:%M:%S")
            line = "%s %s %s[%d]: %s" % (stamp, self._host, self.ident, os.getpid(),
                                         message)
            if self._socket is not None:
                self._socket.sendto(line.encode("utf-8"), self._path)
            else:
                # 0640 whatever the umask: the lines name mail addresses.
                fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                             | os.O_CLOEXEC, 0o640)
                with os.fdopen(fd, "a", encoding="utf-8") as handle:
                    handle.write(line + "\n")
        except OSError:
            pass  # Logging must never fail the service.
