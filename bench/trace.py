#!/usr/bin/env python3
"""Trace-driven deliverability evaluation (issue 16): a simulated week of
inbound mail through the real greylisting programs at simulated time.

SYNOPSIS
    python bench/trace.py [--quick] [--seed N] [--programs LIST]
                          [--json FILE] [--markdown FILE] [--jobs N]
                          [--spawn] [--verify-spawn] [--check]

DESCRIPTION
    trace_model.py builds a seeded week of traffic (provider pools, single-
    host MTAs with their documented retry schedules, spam bots). This
    harness plays it against each program under test, in time order: each
    delivery attempt of a message is one SMTP session, one RCPT policy
    request per still-deferred recipient, with every attribute Postfix
    3.7's smtpd sends (tests/data/rcpt.txt) and a fresh instance per
    attempt; a deferred recipient is retried on the sender's schedule
    until it is accepted or the sender gives up.

    Simulated time: each program runs under libfaketime (Debian
    libfaketime 0.9.10) with LD_PRELOAD, FAKETIME_TIMESTAMP_FILE (the
    attempt's epoch second, FAKETIME_FMT=%s, an absolute and therefore
    frozen time), FAKETIME_NO_CACHE=1 (the file is read at every time
    call) and FAKETIME_DONT_FAKE_MONOTONIC=1 (timeouts stay real). The
    harness writes the file (rename, so no reader sees half a file)
    before the first request of each attempt; Python's time.time() and
    Perl's time() then return that second. The check at start-up asks
    each interpreter for the time under two settings of the file and
    refuses to run if it does not follow.

    Programs (--programs, default all five):
      greylist         python -m greylist -c SETTINGS: the defaults, plus
                       greylist_database and greylist_log in the work
                       directory (and greylist_allow_root as root).
      greylist-domain  the same with greylist_client_match = domain.
      postgrey         /usr/sbin/postgrey 1.37 as Debian ships it
                       (--delay=300, its /etc/postgrey whitelists).
      postgrey-nowl    the same with empty whitelist files.
      greylist.pl      Postfix's example as Debian ships it (60 s delay,
                       auto-whitelist after 10), only the database moved.
      greylist-prefix  (on request) greylist_client_match = prefix, the
                       /24 and /64 grouping that was the default before
                       pool grouping.
    greylist and greylist.pl are spawn(8) programs; by default each runs
    as ONE long process that serves every session in turn. That is
    faithful because neither keeps state between SMTP sessions other
    than in its database (greylist's per-connection state is keyed by
    the instance attribute, which is new for every attempt); --spawn
    runs one process per session instead, as spawn(8) does, and
    --verify-spawn runs both and compares every decision.

    Reported per sender class: messages, delivered (every recipient
    accepted), lost (a recipient still deferred when the sender gave up),
    median / p90 / max added delay (from the first attempt until the last
    recipient was accepted, over delivered messages), split messages (an
    attempt in which some recipients were accepted and others deferred),
    and for spam the share blocked (no recipient ever accepted). Then the
    targets of issue 16 for each program, as MET or MISSED.

    --quick plays 6 simulated hours at 1/25 of the volume (a smoke test,
    seconds); the default is the full week (about 9000 messages, some
    minutes with --jobs 2).

FILES
    Work directories under --tmpdir (default /dev/shm when it exists):
    one per program, deleted afterwards unless --keep.
"""

import argparse
import hashlib
import heapq
import json
import multiprocessing
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import peers                      # noqa: E402
import trace_model as model       # noqa: E402

LIBFAKETIME = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
               "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
               "/usr/lib/faketime/libfaketime.so.1",
               "/usr/local/lib/faketime/libfaketime.so.1")
PROGRAMS = ("greylist", "greylist-domain", "postgrey", "postgrey-nowl", "greylist.pl")
EXTRA_PROGRAMS = ("greylist-prefix",)     # greylist_client_match = prefix, on request
POSTGREY_DELAY = 300      # Debian's /etc/default/postgrey leaves postgrey's default
GREYLIST_PL_DELAY = 60    # as shipped

PROVIDERS = ("Gmail", "Microsoft 365", "Amazon SES", "Mimecast", "Mailchimp", "SendGrid")
MTAS = ("Postfix", "Exim", "Sendmail", "Exchange")
SPAM = ("one-shot spam", "early-retry spam", "rotating spam")
TARGET_P90 = 15 * 60
TARGET_MAX = 4 * 3600
TARGET_BLOCKED = 0.99


# --------------------------------------------------------------------------
# Simulated time

def find_libfaketime() -> str | None:
    for path in LIBFAKETIME:
        if os.path.exists(path):
            return path
    listing = peers.run_text(["dpkg", "-L", "libfaketime"]).split("\n")
    return next((p for p in listing if p.endswith("/libfaketime.so.1")), None)


class FakeClock:
    """The timestamp file that libfaketime reads at every time call."""

    def __init__(self, directory: str, lib: str) -> None:
        self.path = os.path.join(directory, "faketime")
        self.lib = lib
        self.now = None
        self.set(model.START)

    def set(self, t: int) -> None:
        if t == self.now:
            return
        tmp = self.path + ".new"
        with open(tmp, "w") as handle:
            handle.write("%d\n" % t)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.path)
        self.now = t

    def env(self) -> dict:
        preload = os.environ.get("LD_PRELOAD")
        return {"LD_PRELOAD": self.lib + (":" + preload if preload else ""),
                "FAKETIME_TIMESTAMP_FILE": self.path, "FAKETIME_NO_CACHE": "1",
                "FAKETIME_FMT": "%s", "FAKETIME_DONT_FAKE_MONOTONIC": "1", "TZ": "UTC"}


def check_faketime(lib: str, python: str, directory: str) -> dict:
    """Ask python and perl for the time under two clock settings."""
    clock = FakeClock(directory, lib)
    env = dict(os.environ, **clock.env())
    probes = {"python": [python, "-c", "import time; print(int(time.time()))"],
              "perl": ["perl", "-e", "print time(), qq(\\n)"]}
    out = {}
    for t in (model.START, model.START + 123456):
        clock.set(t)
        for name, argv in probes.items():
            got = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=20)
            value = got.stdout.strip()
            if value != str(t):
                raise RuntimeError("libfaketime does not drive %s: wanted %d, got %r (%s)"
                                   % (name, t, value, got.stderr.strip()[:200]))
            out[name] = "ok"
    return out


# --------------------------------------------------------------------------
# The programs, reusing peers.py's classes (same start, same stop)

class TraceGreylist(peers.Ours):
    """greylist with its defaults plus the given settings, under the clock."""

    def __init__(self, name: str, python: str, source: str, clock: FakeClock,
                 settings: dict) -> None:
        super().__init__(python, source)
        self.name = name
        self.clock = clock
        self.extra = settings

    def prepare(self, workdir: str, delay_s: int) -> None:
        self.database = os.path.join(workdir, "greylist")
        self.settings = os.path.join(workdir, "greylist.cf")
        with open(self.settings, "w", encoding="utf-8") as handle:
            handle.write("greylist_database = %s\n" % self.database)
            handle.write("greylist_log = %s\n" % os.path.join(workdir, "greylist.log"))
            if os.geteuid() == 0:
                handle.write("greylist_allow_root = yes\n")
            for key, value in self.extra.items():
                handle.write("%s = %s\n" % (key, value))

    def env(self) -> dict:
        return dict(super().env(), **self.clock.env())


class TraceGreylistPl(peers.GreylistPl):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock

    def prepare(self, workdir: str, delay_s: int) -> None:
        import gzip
        opener = gzip.open if self.source.endswith(".gz") else open
        with opener(self.source, "rt", encoding="utf-8") as handle:
            text = handle.read()
        self.script = os.path.join(workdir, "greylist.pl")
        with open(self.script, "w", encoding="utf-8") as handle:
            handle.write(peers.patch_greylist_pl(text, os.path.join(workdir, "greylist.db"),
                                                 GREYLIST_PL_DELAY))

    def env(self) -> dict:
        return dict(os.environ, **self.clock.env())


class TracePostgrey(peers.Postgrey):
    """peers.Postgrey's start, with the clock in its environment."""

    def __init__(self, clock: FakeClock, whitelists: bool) -> None:
        super().__init__(whitelists)
        self.clock = clock
        self.name = "postgrey" if whitelists else "postgrey-nowl"

    def start(self, workdir: str, k: int, delay_s: int) -> list:
        real_popen = subprocess.Popen
        env = dict(os.environ, **self.clock.env())

        def popen(*args, **kwargs):
            kwargs["env"] = env
            return real_popen(*args, **kwargs)
        subprocess.Popen = popen
        try:
            return super().start(workdir, k, delay_s)
        finally:
            subprocess.Popen = real_popen


def make_program(name: str, args, clock: FakeClock) -> peers.Program:
    if name == "greylist":
        return TraceGreylist(name, args.python, args.ours_path, clock, {})
    if name == "greylist-domain":
        return TraceGreylist(name, args.python, args.ours_path, clock,
                             {"greylist_client_match": "domain"})
    if name == "greylist-prefix":
        return TraceGreylist(name, args.python, args.ours_path, clock,
                             {"greylist_client_match": "prefix"})
    if name in ("postgrey", "postgrey-nowl"):
        return TracePostgrey(clock, whitelists=(name == "postgrey"))
    if name == "greylist.pl":
        return TraceGreylistPl(clock)
    raise SystemExit("unknown program %r (known: %s)" % (name, ", ".join(PROGRAMS)))


class Endpoint:
    """One policy connection: a pipe pair or a unix socket."""

    def __init__(self, spec: tuple) -> None:
        self.sock = None
        if spec[0] == "pipe":
            self.wfd, self.rfd = spec[1], spec[2]
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(spec[1])
            self.wfd = self.rfd = self.sock.fileno()
        self.buffer = b""

    def ask(self, request: bytes) -> str:
        view = memoryview(request)
        while view:
            n = os.write(self.wfd, view)
            view = view[n:]
        while b"\n\n" not in self.buffer:
            chunk = os.read(self.rfd, 65536)
            if not chunk:
                raise EOFError("the policy server closed the connection")
            self.buffer += chunk
        reply, _, self.buffer = self.buffer.partition(b"\n\n")
        text = reply.decode("utf-8", "replace")
        if not text.startswith("action="):
            raise ValueError("malformed reply %r" % text[:200])
        return text[len("action="):]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


class Runner:
    """Sessions against one program: one long process (or daemon), or a new
    process per session (--spawn) for the spawn programs."""

    def __init__(self, prog: peers.Program, workdir: str, spawn: bool) -> None:
        self.prog = prog
        self.workdir = workdir
        self.spawn = spawn and prog.pipes
        self.endpoint = None
        self.exit_codes: list = []
        self.sessions = 0
        if not self.spawn:
            self.endpoint = Endpoint(prog.start(workdir, 1, POSTGREY_DELAY)[0])

    def session(self, requests: list) -> list:
        self.sessions += 1
        if not self.spawn:
            return [self.endpoint.ask(r) for r in requests]
        endpoint = Endpoint(self.prog.start(self.workdir, 1, POSTGREY_DELAY)[0])
        try:
            return [endpoint.ask(r) for r in requests]
        finally:
            self.exit_codes += self.prog.stop()

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
        self.exit_codes += self.prog.stop()


# --------------------------------------------------------------------------
# The simulation

def policy_request(m: model.Message, host: model.Host, rcpt: str, instance: str,
                   port: int) -> bytes:
    if m.tls:
        proto, cipher, bits = "TLSv1.3", "TLS_AES_256_GCM_SHA384", "256"
    else:
        proto, cipher, bits = "", "", "0"
    attrs = (
        ("request", "smtpd_access_policy"), ("protocol_state", "RCPT"),
        ("protocol_name", "ESMTP"), ("client_address", host.address),
        ("client_name", host.name), ("client_port", str(port)),
        ("reverse_client_name", host.reverse), ("server_address", "192.0.2.25"),
        ("server_port", "25"), ("helo_name", host.helo), ("sender", m.sender),
        ("recipient", rcpt), ("recipient_count", "0"), ("queue_id", ""),
        ("instance", instance), ("size", str(m.size)), ("etrn_domain", ""),
        ("stress", ""), ("sasl_method", ""), ("sasl_username", ""), ("sasl_sender", ""),
        ("ccert_subject", ""), ("ccert_issuer", ""), ("ccert_fingerprint", ""),
        ("ccert_pubkey_fingerprint", ""), ("encryption_protocol", proto),
        ("encryption_cipher", cipher), ("encryption_keysize", bits), ("policy_context", ""))
    return ("\n".join("%s=%s" % kv for kv in attrs) + "\n\n").encode("utf-8")


def deferred(action: str) -> bool:
    word = action.split(None, 1)[0].upper() if action.strip() else ""
    return word in ("DEFER_IF_PERMIT", "DEFER", "DEFER_IF_REJECT") or word[:1] == "4"


class Outcome:
    __slots__ = ("pending", "accepted", "prev", "ms", "split", "attempts", "end", "log")

    def __init__(self, m: model.Message) -> None:
        self.pending = list(m.rcpts)
        self.accepted: dict = {}
        self.prev = None
        self.ms: dict = {}
        self.split = False
        self.attempts = 0
        self.end = ""          # delivered, lost, unresolved
        self.log: list = []    # (offset s, address, client_name, accepted, deferred)


def simulate(trace: model.Trace, runner: Runner, clock: FakeClock) -> tuple:
    """Play the trace; return (outcomes by message id, counters, digest)."""
    outcomes = [Outcome(m) for m in trace.messages]
    heap = [(trace.start + m.t0, m.id, 0) for m in trace.messages]
    heapq.heapify(heap)
    horizon = trace.start + trace.horizon
    digest = hashlib.sha256()
    requests = replies_odd = 0
    while heap:
        t, mid, k = heapq.heappop(heap)
        m, o = trace.messages[mid], outcomes[mid]
        rng = model.rng_for(trace.seed, "attempt", mid, k)
        host = m.hostrule(k, o.prev, rng)
        o.prev = host
        o.attempts += 1
        clock.set(t)
        instance = "%x.%x.%x.0" % (0x3f2a + mid % 4096, t, mid * 64 + k)
        port = rng.randrange(1024, 65536)
        reqs = [policy_request(m, host, r, instance, port) for r in o.pending]
        actions = runner.session(reqs)
        requests += len(reqs)
        still = []
        for rcpt, action in zip(o.pending, actions):
            if deferred(action):
                still.append(rcpt)
            else:
                o.accepted[rcpt] = t - trace.start - m.t0
                word = action.split(None, 1)[0].upper()
                if word not in ("DUNNO", "PREPEND", "OK"):
                    replies_odd += 1
            digest.update(b"%d %d %d %d %s\n" % (t, mid, k, 0 if deferred(action) else 1,
                                                 rcpt.encode()))
        if still and len(still) < len(o.pending):
            o.split = True
        o.log.append((t - trace.start - m.t0, host.address, host.name,
                      len(o.pending) - len(still), len(still)))
        o.pending = still
        if not still:
            o.end = "delivered"
            continue
        nxt = m.schedule.next_attempt(trace.start + m.t0, t, k + 1, o.ms, m.hs, rng)
        if nxt is None or nxt - (trace.start + m.t0) > m.schedule.giveup:
            o.end = "lost"
        elif nxt > horizon:
            o.end = "unresolved"
        else:
            heapq.heappush(heap, (max(nxt, t), mid, k + 1))
    return outcomes, {"requests": requests, "odd_replies": replies_odd,
                      "sessions": runner.sessions}, digest.hexdigest()


# --------------------------------------------------------------------------
# Figures

def percentile(values: list, q: float):
    """Nearest-rank percentile of sorted values (None when empty)."""
    if not values:
        return None
    rank = max(1, -(-int(q * 1000) * len(values) // 1000))
    return values[min(len(values), rank) - 1]


def summarise(trace: model.Trace, outcomes: list) -> dict:
    classes: dict = {}
    for m, o in zip(trace.messages, outcomes):
        c = classes.setdefault(m.cls, {"kind": m.kind, "messages": 0, "delivered": 0,
                                       "lost": 0, "unresolved": 0, "split": 0,
                                       "blocked": 0, "partly_accepted": 0,
                                       "attempts": 0, "recipients": 0,
                                       "recipients_accepted": 0, "delays": [],
                                       "later": []})
        c["messages"] += 1
        c["attempts"] += o.attempts
        c["recipients"] += len(m.rcpts)
        c["recipients_accepted"] += len(o.accepted)
        c["split"] += o.split
        if o.end == "delivered":
            c["delivered"] += 1
            c["delays"].append(max(o.accepted.values()))
            if m.t0 >= model.DAY:
                c["later"].append(max(o.accepted.values()))
        elif o.end == "unresolved":
            c["unresolved"] += 1
        else:
            c["lost"] += 1
        if not o.accepted:
            c["blocked"] += 1
        elif o.end != "delivered":
            c["partly_accepted"] += 1
    worst: dict = {}
    for m, o in zip(trace.messages, outcomes):
        if m.kind == "spam":
            continue
        late = o.end == "delivered" and max(o.accepted.values()) > TARGET_MAX
        if o.end == "lost" or late or o.split:
            why = "lost" if o.end == "lost" else ("split" if o.split and not late else "late")
            worst.setdefault(m.cls, []).append((why, m, o))
    for cls, items in worst.items():
        items.sort(key=lambda x: ({"lost": 0, "late": 1, "split": 2}[x[0]],
                                  -max(x[2].accepted.values(), default=0)))
        classes[cls]["examples"] = [{
            "why": why, "message": m.id, "sender": m.sender, "recipients": m.rcpts,
            "first_attempt": m.t0, "attempts": [
                {"at_s": a[0], "client_address": a[1], "client_name": a[2],
                 "accepted": a[3], "deferred": a[4]} for a in o.log[:24]],
            "attempts_total": len(o.log)}
            for why, m, o in items[:3]]
    for c in classes.values():
        d = sorted(c.pop("delays"))
        later = sorted(c.pop("later"))
        # Messages first tried after the first simulated day (a warm database).
        c["after_day1"] = {"delivered": len(later), "delay_median_s": percentile(later, 0.5),
                           "delay_p90_s": percentile(later, 0.9),
                           "delay_max_s": later[-1] if later else None}
        c["delay_median_s"] = percentile(d, 0.5)
        c["delay_p90_s"] = percentile(d, 0.9)
        c["delay_max_s"] = d[-1] if d else None
        c["delayed"] = sum(1 for x in d if x > 0)
        c["blocked_share"] = c["blocked"] / c["messages"] if c["messages"] else None
    order = list(PROVIDERS + MTAS + SPAM)
    ordered = {k: classes[k] for k in order if k in classes}
    legit = [(m, o) for m, o in zip(trace.messages, outcomes) if m.kind != "spam"]
    all_d = sorted(max(o.accepted.values()) for m, o in legit if o.end == "delivered")
    later = sorted(max(o.accepted.values()) for m, o in legit
                   if o.end == "delivered" and m.t0 >= model.DAY)
    ordered["all legitimate"] = {
        "kind": "total", "messages": len(legit),
        "delivered": sum(o.end == "delivered" for _, o in legit),
        "lost": sum(o.end == "lost" for _, o in legit),
        "unresolved": sum(o.end == "unresolved" for _, o in legit),
        "split": sum(o.split for _, o in legit),
        "delay_median_s": percentile(all_d, 0.5), "delay_p90_s": percentile(all_d, 0.9),
        "delay_max_s": all_d[-1] if all_d else None,
        "delayed": sum(1 for x in all_d if x > 0), "blocked": 0, "blocked_share": None,
        "after_day1": {"delivered": len(later), "delay_median_s": percentile(later, 0.5),
                       "delay_p90_s": percentile(later, 0.9),
                       "delay_max_s": later[-1] if later else None}}
    return ordered


def targets(classes: dict) -> dict:
    """Issue 16's targets, each MET or MISSED with the figure behind it."""
    out = {}
    total = classes.get("all legitimate", {})
    out["0 legitimate messages lost"] = _verdict(total.get("lost", 0) == 0,
                                                 "%d lost" % total.get("lost", 0))
    out["0 split messages"] = _verdict(total.get("split", 0) == 0,
                                       "%d split" % total.get("split", 0))
    bad_median, bad_p90, bad_max = [], [], []
    for cls in PROVIDERS:
        c = classes.get(cls)
        if not c or c["delivered"] == 0:
            continue
        if c["delay_median_s"]:
            bad_median.append("%s %s" % (cls, fmt_delay(c["delay_median_s"])))
        if c["delay_p90_s"] > TARGET_P90:
            bad_p90.append("%s %s" % (cls, fmt_delay(c["delay_p90_s"])))
        if c["delay_max_s"] > TARGET_MAX:
            bad_max.append("%s %s" % (cls, fmt_delay(c["delay_max_s"])))
    out["provider classes: median 0"] = _verdict(not bad_median, ", ".join(bad_median))
    out["provider classes: p90 <= 15 min"] = _verdict(not bad_p90, ", ".join(bad_p90))
    out["provider classes: max <= 4 h"] = _verdict(not bad_max, ", ".join(bad_max))
    for cls in SPAM:
        c = classes.get(cls)
        if c:
            out[">= 99%% of %s blocked" % cls] = _verdict(
                c["blocked_share"] >= TARGET_BLOCKED, "%.1f%%" % (100 * c["blocked_share"]))
    return out


def _verdict(ok: bool, detail: str) -> dict:
    return {"met": bool(ok), "detail": detail}


def fmt_delay(s) -> str:
    if s is None:
        return "-"
    if s == 0:
        return "0"
    if s < 60:
        return "%d s" % s
    if s < 3600:
        return "%d min" % round(s / 60)
    return "%.1f h" % (s / 3600)


def markdown(result: dict, detail: bool = True) -> str:
    lines = []
    progs = [p for p in result["programs"] if result["programs"][p].get("available")]
    for p in result["programs"]:
        r = result["programs"][p]
        if not r.get("available"):
            lines.append("%s: not available (%s)\n" % (p, r.get("reason")))
    # The side-by-side table.
    head = "| sender class | msgs | " + " | ".join(progs) + " | target |"
    lines += [head, "|" + "---|" * (len(progs) + 3)]
    any_classes = result["programs"][progs[0]]["classes"] if progs else {}
    for cls, c0 in any_classes.items():
        cells = []
        for p in progs:
            c = result["programs"][p]["classes"][cls]
            if c["kind"] == "spam":
                cells.append("%.1f%% blocked" % (100 * c["blocked_share"]))
            else:
                cell = "%s / %s / %s" % (fmt_delay(c["delay_median_s"]),
                                         fmt_delay(c["delay_p90_s"]), fmt_delay(c["delay_max_s"]))
                extra = []
                if c["lost"]:
                    extra.append("%d lost" % c["lost"])
                if c["split"]:
                    extra.append("%d split" % c["split"])
                if c.get("unresolved"):
                    extra.append("%d unresolved" % c["unresolved"])
                if extra:
                    cell += " (" + ", ".join(extra) + ")"
                cells.append(cell)
        if c0["kind"] == "spam":
            target = ">= 99% blocked"
        elif cls in PROVIDERS:
            target = "0 / <= 15 min / <= 4 h, 0 lost, 0 split"
        else:
            target = "0 lost, 0 split"
        name = "**%s**" % cls if cls == "all legitimate" else cls
        lines.append("| %s | %d | %s | %s |" % (name, c0["messages"], " | ".join(cells), target))
    lines.append("")
    lines.append("Cells: median / p90 / max added delay of delivered messages (first attempt "
                 "to last recipient accepted); spam: share of messages with no recipient "
                 "accepted.")
    lines.append("")
    # Targets.
    if progs:
        names = list(result["programs"][progs[0]]["targets"])
        lines.append("| target (issue 16) | " + " | ".join(progs) + " |")
        lines.append("|" + "---|" * (len(progs) + 1))
        for t in names:
            cells = []
            for p in progs:
                v = result["programs"][p]["targets"][t]
                cells.append(("MET" if v["met"] else "MISSED") +
                             (" (%s)" % v["detail"] if v["detail"] and not v["met"] else ""))
            lines.append("| %s | %s |" % (t, " | ".join(cells)))
        lines.append("")
    # Per-program detail.
    for p in progs:
        r = result["programs"][p]
        lines.append("%s (%s): %d sessions, %d requests, %.0f s wall%s" % (
            p, r.get("version", ""), r["counters"]["sessions"], r["counters"]["requests"],
            r["wall_s"], ", one process per session" if r.get("spawn") else ""))
        if not detail:
            continue
        lines.append("")
        lines.append("| %s: class | messages | accepted | lost | unresolved | median | p90 | max "
                     "| delayed | split | blocked | after day 1: median / p90 / max |" % p)
        lines.append("|" + "---|" * 12)
        for cls, c in r["classes"].items():
            blocked = ("%d (%.1f%%)" % (c["blocked"], 100 * c["blocked_share"])
                       if c["kind"] == "spam" else "")
            a = c.get("after_day1")
            later = ("%s / %s / %s" % (fmt_delay(a["delay_median_s"]), fmt_delay(a["delay_p90_s"]),
                                       fmt_delay(a["delay_max_s"]))
                     if a and a["delivered"] else "")
            lines.append("| %s | %d | %d | %d | %d | %s | %s | %s | %d | %d | %s | %s |" % (
                cls, c["messages"], c["delivered"], c["lost"], c["unresolved"],
                fmt_delay(c["delay_median_s"]), fmt_delay(c["delay_p90_s"]),
                fmt_delay(c["delay_max_s"]), c["delayed"], c["split"], blocked, later))
        lines.append("")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Running

def run_program(name: str, args_dict: dict) -> dict:
    args = argparse.Namespace(**args_dict)
    trace = model.build(args.seed, args.quick)
    workdir = tempfile.mkdtemp(prefix="trace-%s-" % name.replace(".", ""), dir=args.top)
    os.chmod(workdir, 0o755)
    clock = FakeClock(workdir, args.libfaketime)
    prog = make_program(name, args, clock)
    row = {"program": name, "available": True, "spawn": bool(args.spawn and prog.pipes)}
    ok, why = prog.available()
    if not ok:
        row.update(available=False, reason=why)
        return row
    row["version"] = prog.version()
    began = time.monotonic()
    runner = None
    try:
        runner = Runner(prog, workdir, args.spawn)
        outcomes, counters, digest = simulate(trace, runner, clock)
    except Exception as exc:                      # reported, not hidden
        row.update(available=True, error="%s: %s" % (type(exc).__name__, exc))
        if runner is not None:
            try:
                prog.kill()
            except Exception:
                pass
        row["stderr"] = _tail(os.path.join(workdir, "stderr"))
        return row
    finally:
        if runner is not None and "error" not in row:
            runner.close()
        row["wall_s"] = time.monotonic() - began
    row["exit_codes"] = sorted(set(runner.exit_codes))
    row["counters"] = counters
    row["digest"] = digest
    row["classes"] = summarise(trace, outcomes)
    row["targets"] = targets(row["classes"])
    row["stderr"] = _tail(os.path.join(workdir, "stderr"))
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        row["workdir"] = workdir
    return row


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        return data[-n:].decode("utf-8", "replace")
    except OSError:
        return ""


def _run_one(job: tuple) -> tuple:
    name, args_dict = job
    return name, run_program(name, args_dict)


def describe_model(trace: model.Trace) -> dict:
    counts: dict = {}
    for m in trace.messages:
        counts[m.cls] = counts.get(m.cls, 0) + 1
    return {"seed": trace.seed, "quick": trace.quick, "start": trace.start,
            "arrival_span_s": trace.arrival_span, "horizon_s": trace.horizon,
            "messages": len(trace.messages), "counts": counts,
            "classes": [{"class": c, "kind": k, "schedule": s, "addresses": a, "p_same": p}
                        for c, k, s, a, p in trace.classes]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="6 simulated hours, 1/25 of the volume")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--programs", default=",".join(PROGRAMS))
    p.add_argument("--json", help="write the report as JSON (- for stdout)")
    p.add_argument("--markdown", help="also write the markdown tables to FILE")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="programs run at once (each on its own clock)")
    p.add_argument("--spawn", action="store_true",
                   help="one greylist / greylist.pl process per SMTP session")
    p.add_argument("--verify-spawn", action="store_true",
                   help="also run greylist and greylist.pl one process per session and "
                        "compare every decision")
    p.add_argument("--python", default=peers.python_default())
    p.add_argument("--ours-path", default=peers.ROOT, help="the greylist tree to test")
    p.add_argument("--tmpdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    p.add_argument("--keep", action="store_true", help="keep the work directories")
    p.add_argument("--brief", action="store_true", help="no per-program tables")
    p.add_argument("--check", action="store_true",
                   help="exit 1 on an error, a malformed reply or a non-zero exit")
    args = p.parse_args(argv)

    lib = find_libfaketime()
    if lib is None:
        print("libfaketime not found: apt-get install faketime libfaketime", file=sys.stderr)
        return 2
    top = tempfile.mkdtemp(prefix="greylist-trace-", dir=args.tmpdir)
    os.chmod(top, 0o755)
    try:
        faketime = check_faketime(lib, args.python, top)
        names = [n.strip() for n in args.programs.split(",") if n.strip()]
        for n in names:
            if n not in PROGRAMS + EXTRA_PROGRAMS:
                raise SystemExit("unknown program %r (known: %s)"
                                 % (n, ", ".join(PROGRAMS + EXTRA_PROGRAMS)))
        base = dict(vars(args), top=top, libfaketime=lib)
        jobs = [(n, dict(base)) for n in names]
        if args.verify_spawn:
            for n in names:
                if n.startswith("greylist"):
                    jobs.append((n + "@spawn", dict(base, spawn=True)))
        for name, d in jobs:
            d["name"] = name
        began = time.monotonic()
        results = {}
        work = [(n.split("@")[0], d) for n, d in jobs]
        if args.jobs > 1 and len(work) > 1:
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(min(args.jobs, len(work))) as pool:
                done = pool.map(_run_one, work, chunksize=1)
        else:
            done = [_run_one(w) for w in work]
        for (label, _), (_, row) in zip(jobs, done):
            results[label] = row
        wall = time.monotonic() - began
    finally:
        if not args.keep:
            shutil.rmtree(top, ignore_errors=True)

    trace = model.build(args.seed, args.quick)
    programs = {k: v for k, v in results.items() if "@" not in k}
    verify = {}
    for k, v in results.items():
        if "@" in k:
            base_name = k.split("@")[0]
            same = v.get("digest") is not None and v.get("digest") == programs[base_name].get("digest")
            verify[base_name] = {"identical_decisions": same, "spawn_digest": v.get("digest"),
                                 "long_digest": programs[base_name].get("digest"),
                                 "spawn_wall_s": v.get("wall_s"), "spawn_error": v.get("error")}
    report = {"benchmark": "trace", "issue": 16, "wall_s": wall,
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                       "python": peers.run_text([args.python, "-V"]),
                       "libfaketime": peers.dpkg_version("libfaketime"),
                       "faketime_check": faketime},
              "greylist_source": peers.describe_source(args.ours_path),
              "model": describe_model(trace), "programs": programs}
    if verify:
        report["verify_spawn"] = verify
    errors = [k for k, v in results.items() if v.get("error")]
    ok_rows = {k: v for k, v in programs.items() if v.get("available") and not v.get("error")}
    shown = dict(report, programs=ok_rows)
    text = markdown(shown, not args.brief) if ok_rows else ""
    for k in errors:
        text += "\n%s: ERROR %s\n%s\n" % (k, results[k]["error"], results[k].get("stderr", ""))
    for k, v in programs.items():
        if not v.get("available"):
            text += "%s: not available (%s)\n" % (k, v.get("reason"))
    for k, v in verify.items():
        text += "%s one process per session: %s\n" % (
            k, "identical decisions" if v["identical_decisions"] else
            "DIFFERENT decisions (%s)" % (v["spawn_error"] or "see digests"))
    text += "model: seed %d, %s, %d messages; total wall %.0f s\n" % (
        args.seed, "quick (6 h)" if args.quick else "full week", len(trace.messages), wall)
    print(text, end="")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(text)
    if args.json:
        data = json.dumps(report, separators=(",", ":")) + "\n"
        if args.json == "-":
            sys.stdout.write(data)
        else:
            with open(args.json, "w", encoding="utf-8") as handle:
                handle.write(data)
    if args.check:
        # postgrey's and greylist.pl's exit codes are reported, not judged.
        bad = errors or [k for k, v in ok_rows.items()
                         if v["counters"]["odd_replies"] or
                         (k.startswith("greylist") and k != "greylist.pl"
                          and any(v.get("exit_codes") or []))]
        bad += [k for k, v in verify.items() if not v["identical_decisions"]]
        if bad:
            print("check failed: %s" % ", ".join(bad), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
