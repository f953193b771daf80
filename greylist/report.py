"""greylistctl report: defers and passes from greylist's own log lines.

DESCRIPTION
    In the manner of postgreyreport, but from the log alone: run() reads
    log files (greylist_log files, or Postfix's maillog or syslog with
    other programs' lines among them; gzip files are read as such; no
    file, or "-", is standard input) and prints

    - per day, the RCPT decisions deferred, passed, and answered with
      greylist_failure_action (reason database-failure);
    - the triples deferred that never retried after DELAY seconds: never
      passed, and all their attempts within DELAY of the first (the
      --delay of postgreyreport; default greylist_delay). Triples first
      deferred within DELAY of the last line read are left out and
      counted: they may still retry;
    - the top clients (addresses) and senders of deferred requests.

    A decision line is the one handlers/policy.py writes, after a
    "greylist...[PID]: " tag (any of greylist's programs):
    "action=ACTION reason=REASON age=N client=ADDRESS sender=SENDER
    rcpt=RECIPIENT". Triples are keyed as greylist keys them
    (core/triple.py, with the settings; no client names are logged, so
    pools are grouped by prefix). Time stamps are syslog's "Mmm dd
    hh:mm:ss" or RFC 3339 ("2026-12-01T10:00:00+01:00"); the year of the
    first is not written, and is taken as this year, or the last for a
    month after this one, going up at each turn of the year.

    Bounded: lines longer than MAX_LINE bytes are skipped and counted as
    malformed, and each table (triples, clients, senders) counts at most
    MAX_KEYS distinct keys; the report says when one was full (its
    counts are then lower bounds).

DIAGNOSTICS
    Lines of greylist's programs that do not parse (a decision line cut
    short, a bad time stamp or client address, an overlong line) are
    skipped and counted as malformed; other programs' lines, and
    greylist's other lines (warnings, screened requests), are counted
    and skipped. A file that cannot be opened (or is a symbolic link)
    or read: a message and exit status 1.
"""

import calendar
import os
import re
import stat
import sys
import time
import zlib
from typing import IO, NamedTuple

from greylist.config import Config
from greylist.core.decide import DATABASE_FAILURE
from greylist.core.triple import BadAddress, client_address, triple_from_request
from greylist.log import to_stderr

# log.py's MAX_MESSAGE (2000) with its syslog prefix, and room to spare.
MAX_LINE = 4096
# Distinct keys per table.
MAX_KEYS = 100_000
# Days in the per-day table.
MAX_DAYS = 3660

_MONTHS = {name: number for number, name in enumerate(calendar.month_abbr) if name}
_SYSLOG = re.compile(r"([A-Z][a-z]{2}) {1,2}([0-9]{1,2}) ([0-9]{2}):([0-9]{2}):([0-9]{2}) ")
_RFC3339 = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})[T ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
                      r"(?:[.,][0-9]{1,9})?(Z|[+-][0-9]{2}:?[0-9]{2})? ")
# The tag right after the time stamp (_SYSLOG or _RFC3339, which end in
# its space) and the host name, where syslog and log.py write it: found
# anywhere in the line, it could be text that a client wrote into another
# program's line (Postfix logs a non-SMTP command as it came). BusyBox's
# syslogd writes the facility and level between the two ("mail.info").
_TAG = re.compile(r"\S+ (?:[a-z0-9]{1,8}\.[a-z]{1,7} )?greylist[a-z-]{0,20}\[[0-9]{1,10}\]: (.*)")
_DECISION = re.compile(r"action=(\S+) reason=(.+?) age=([0-9]{1,19}) client=(\S+) "
                       r"sender=(\S+) rcpt=(\S+)")
_SCREENED = re.compile(r"action=\S+ reason=\S+(?: \S+)?")
_DEFERS = ("DEFER", "DEFER_IF_PERMIT", "DEFER_IF_REJECT")


class ReportError(Exception):
    """A file that cannot be opened or read."""


class Seen(NamedTuple):
    """What is known of one deferred triple."""

    first: int
    last: int
    tries: int
    passed: bool
    client: str
    sender: str
    recipient: str


class Counter:
    """Counts of at most cap distinct keys."""

    def __init__(self, cap: int) -> None:
        self.counts: dict[str, int] = {}
        self.cap = cap
        self.full = False

    def add(self, key: str) -> None:
        if key in self.counts:
            self.counts[key] += 1
        elif len(self.counts) < self.cap:
            self.counts[key] = 1
        else:
            self.full = True

    def top(self, n: int) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda item: (-item[1], item[0]))[:n]


class Report:
    """The counts of the lines read so far (feed(), then write())."""

    def __init__(self, cfg: Config, delay_s: int, this_year: int, this_month: int,
                 cap: int | None = None) -> None:
        cap = MAX_KEYS if cap is None else cap
        self.cfg, self.delay_s, self.cap = cfg, delay_s, cap
        self.lines = self.decisions = self.screened = self.malformed = self.other = 0
        self.ours = 0
        self.days: dict[str, list[int]] = {}
        self.triples: dict[tuple[str, str, str], Seen] = {}
        self.triples_full = False
        self.clients = Counter(cap)
        self.senders = Counter(cap)
        self.end = None
        self._year, self._month = this_year, this_month
        self._last_syslog = None

    def feed(self, raw: bytes) -> None:
        """Count one line (without its newline; at most MAX_LINE bytes)."""
        self.lines += 1
        line = raw.decode("utf-8", "replace")
        stamp = _RFC3339.match(line) or _SYSLOG.match(line)
        tagged = _TAG.match(line, stamp.end()) if stamp is not None else None
        if tagged is None:
            self.other += 1
            return
        message = tagged.group(1)
        if not message.startswith("action="):
            self.other += 1
            return
        decision = _DECISION.fullmatch(message)
        if decision is None:
            if _SCREENED.fullmatch(message) and " client=" not in message:
                self.screened += 1
            else:
                self.malformed += 1
            return
        when = self._when(stamp)
        if when is None:
            self.malformed += 1
            return
        now, day = when
        action, reason, _, client, sender, recipient = decision.groups()
        try:
            address = client_address(client)
        except BadAddress:
            self.malformed += 1
            return
        self.decisions += 1
        self.end = now if self.end is None else max(self.end, now)
        word = action.upper()
        deferred = word in _DEFERS or (len(word) == 3 and word.startswith("4")
                                       and word.isdigit())
        column = 2 if reason == DATABASE_FAILURE else 0 if deferred else 1
        counts = self.days.get(day)
        if counts is None:
            if len(self.days) >= MAX_DAYS:
                return
            counts = self.days[day] = [0, 0, 0]
        counts[column] += 1
        if column == 2:
            return
        attrs = {"client_address": address, "sender": "" if sender == "<>" else sender,
                 "recipient": recipient}
        triple = triple_from_request(attrs, self.cfg, address)
        seen = self.triples.get(triple)
        if deferred:
            self.clients.add(address)
            self.senders.add(sender.casefold())
            if seen is None:
                if len(self.triples) >= self.cap:
                    self.triples_full = True
                    return
                self.triples[triple] = Seen(now, now, 1, False, address, sender, recipient)
            else:
                self.triples[triple] = seen._replace(last=max(seen.last, now),
                                                     tries=seen.tries + 1)
        elif seen is not None and not seen.passed:
            self.triples[triple] = seen._replace(passed=True)

    def _when(self, match: re.Match) -> tuple[int, str] | None:
        """The epoch seconds and the day of a line's time stamp (its match
        of _RFC3339 or _SYSLOG), or None."""
        try:
            if match.re is _RFC3339:
                year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
                stamp = calendar.timegm((year, month, day, hour, minute, second))
                zone = match.group(7)
                if zone and zone != "Z":
                    sign = -1 if zone[0] == "+" else 1
                    stamp += sign * (int(zone[1:3]) * 3600 + int(zone[-2:]) * 60)
                time.gmtime(stamp)
                return stamp, "%04d-%02d-%02d" % (year, month, day)
            if match.group(1) not in _MONTHS:
                return None
            month = _MONTHS[match.group(1)]
            day, hour, minute, second = (int(g) for g in match.groups()[1:])
            if self._last_syslog is None and month > self._month:
                self._year -= 1
            elif self._last_syslog is not None and month < self._last_syslog:
                self._year += 1
            self._last_syslog = month
            if not (1 <= day <= calendar.monthrange(self._year, month)[1]
                    and hour < 24 and minute < 60 and second < 61):
                return None
            stamp = calendar.timegm((self._year, month, day, hour, minute, second))
            return stamp, "%04d-%02d-%02d" % (self._year, month, day)
        except (ValueError, OverflowError):
            return None

    def write(self, out: IO[str], top: int) -> None:
        """Print the report."""
        print("report: %d lines: %d decisions, %d screened, %d malformed (skipped), "
              "%d other lines" % (self.lines, self.decisions, self.screened, self.malformed,
                                  self.other), file=out)
        print("%-10s %10s %10s %10s" % ("day", "deferred", "passed", "failures"), file=out)
        for day in sorted(self.days):
            print("%-10s %10d %10d %10d" % ((day,) + tuple(self.days[day])), file=out)
        if len(self.days) >= MAX_DAYS:
            print("(at most %d days are counted)" % MAX_DAYS, file=out)
        fatal, recent = [], 0
        for triple in self.triples.values():
            if triple.passed or triple.last - triple.first >= self.delay_s:
                continue
            if self.end is not None and self.end - triple.first < self.delay_s:
                recent += 1
                continue
            fatal.append(triple)
        print("triples deferred that never retried after %d s: %d (of %d deferred; "
              "%d too recent to tell)" % (self.delay_s, len(fatal), len(self.triples), recent),
              file=out)
        for triple in sorted(fatal, key=lambda t: (t.client, t.sender, t.recipient)):
            print("  %s %s %s tries=%d first=%s" % (
                triple.client, triple.sender, triple.recipient, triple.tries,
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(triple.first))), file=out)
        if self.triples_full:
            print("(only the first %d distinct triples are counted)" % self.cap, file=out)
        for label, counter in (("clients", self.clients), ("senders", self.senders)):
            print("top %d %s of deferred requests:" % (top, label), file=out)
            for key, count in counter.top(top):
                print("  %8d %s" % (count, key), file=out)
            if counter.full:
                print("  (only the first %d distinct %s are counted)" % (self.cap, label),
                      file=out)


def read(stream: IO[bytes], report: Report) -> None:
    """Feed every line of stream to report; overlong lines are skipped
    (counted as malformed) without reading them whole."""
    while True:
        line = stream.readline(MAX_LINE + 1)
        if not line:
            return
        if len(line) == MAX_LINE + 1 and not line.endswith(b"\n"):
            report.lines += 1
            report.malformed += 1
            while line and not line.endswith(b"\n"):
                line = stream.readline(MAX_LINE + 1)
            continue
        report.feed(line.rstrip(b"\r\n"))


def open_log(name: str) -> IO[bytes]:
    """A log file opened for reading, never through a symbolic link;
    gzip data is read uncompressed. ReportError if it cannot be opened."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ReportError("%s: %s%s" % (name, exc.strerror, " (a symbolic link?)"
                                        if os.path.islink(name) else "")) from None
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise ReportError("%s: %s" % (name, exc.strerror)) from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        os.close(fd)
        raise ReportError("%s: not a regular file" % name)
    stream = os.fdopen(fd, "rb")
    try:
        if stream.peek(2)[:2] == b"\x1f\x8b":
            import gzip
            return gzip.GzipFile(fileobj=stream, mode="rb")
    except OSError as exc:
        stream.close()
        raise ReportError("%s: %s" % (name, exc.strerror or exc)) from None
    return stream


def run(names: list[str], cfg: Config, delay: str | None, top: str | None,
        out: IO[str] | None = None, stdin: IO[bytes] | None = None,
        clock=time.time) -> int:
    """greylistctl report: read the files names (none: stdin), print the
    report to out (default: standard output as it is now); return the
    exit status (2 for a bad option)."""
    from greylist.config import ConfigError, _parse_count, _parse_time
    out = sys.stdout if out is None else out
    try:
        delay_s = cfg.delay_s if delay is None else _parse_time("--delay", delay)
        shown = 10 if top is None else _parse_count("--top", top)
    except ConfigError as exc:
        to_stderr("greylistctl: %s" % exc)
        return 2
    now = time.localtime(clock())
    report = Report(cfg, delay_s, now.tm_year, now.tm_mon)
    streams = []
    try:
        for name in names or ["-"]:
            streams.append((name, stdin or sys.stdin.buffer) if name == "-"
                           else (name, open_log(name)))
        for name, stream in streams:
            try:
                read(stream, report)
            except (OSError, EOFError, zlib.error) as exc:  # zlib: damaged gzip data
                raise ReportError("%s: %s" % (name, getattr(exc, "strerror", None) or exc)) \
                    from None
    except ReportError as exc:
        to_stderr("greylistctl: report: %s" % exc)
        return 1
    finally:
        for name, stream in streams:
            if name != "-":
                # A GzipFile leaves the file it reads open.
                raw = getattr(stream, "fileobj", None)
                stream.close()
                if raw is not None:
                    raw.close()
    report.write(out, shown)
    return 0
