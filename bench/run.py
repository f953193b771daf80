"""Benchmark greylist against postgrey, greylist.pl and a DUNNO responder.

Usage:
  python bench/run.py --all [--json FILE] [--scale SIZES]
  python bench/run.py [--scenario S,...] [--processes K,...] [--requests N]
                      [--seed N] [--programs P,...] [--json FILE] ...

See bench/README.md. --all runs the four comparisons of issue 5 (repeat,
mixed and new with one process, repeat with four), the durability audit,
the start-up comparison (bench/startup.py, also --startup) and, with
--scale 1M,10M, the scale runs. --daemon runs the comparison of issue 11:
greylistd (one daemon, K connections) against postgrey and the DUNNO
responder, new, repeat and mixed with 1, 4, 16 and 64 connections, the
durability audit of greylistd with 16 connections, the storage floor and
the RSS of one greylistd on 1M triples with 200 connections
(bench/daemon_rss.py, also --daemon-rss). Every peer runs in the same
invocation on a fresh database; a missing peer is reported as not
available. Exit status 0 unless the harness itself failed (a missed
target is reported, not an error); --check makes a wrong answer or a
malformed reply from greylist exit 1 (the CI smoke test uses it).
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import daemon_rss  # noqa: E402
import driver  # noqa: E402
import peers  # noqa: E402
import startup  # noqa: E402
import storage  # noqa: E402
import streams  # noqa: E402

NS = 1_000_000_000
ALL_RUNS = (("repeat", 1), ("mixed", 1), ("new", 1), ("repeat", 4))
PROGRAMS = ("greylist", "dunno", "greylist.pl", "postgrey")
KNOWN_PROGRAMS = PROGRAMS + ("greylistd",)
DAEMON_PROGRAMS = ("greylistd", "dunno", "postgrey")
DAEMON_SCENARIOS = ("new", "repeat", "mixed")
DAEMON_CONNECTIONS = (1, 4, 16, 64)
# The programs whose answers --check judges, and whose rates are compared.
OURS = ("greylist", "greylistd")


# Running one program on one plan.

def run_program(prog: peers.Program, plan: streams.Plan, delay_s: int,
                top: str, limit_s: float, strace: bool = False) -> dict:
    """Run warm-up and timed phases of plan against prog; return a result dict."""
    row = {"scenario": plan.scenario, "processes": plan.processes,
           "program": prog.name, "requests": plan.timed_requests(),
           "available": True}
    ok, why = prog.available()
    if not ok:
        row.update(available=False, reason=why)
        return row
    workdir = tempfile.mkdtemp(prefix="%s-%s-%d-" % (prog.name, plan.scenario,
                                                     plan.processes), dir=top)
    os.chmod(workdir, 0o755)
    tracers = []
    try:
        endpoints = prog.start(workdir, plan.processes, delay_s)
        if strace:
            tracers = _attach_strace(prog.pids(), workdir, daemon=not prog.pipes
                                     and isinstance(prog, peers.Daemon))
        phases = []
        started = time.monotonic()
        if any(plan.warm_a):
            phases.append(("warm-a", _phase(prog, endpoints, plan.warm_a, limit_s)))
            # Let the delay pass for every warm-up triple: each was stamped
            # before phase A ended, so D seconds later its age in whole
            # seconds is at least D.
            time.sleep(delay_s + 0.25)
            if any(plan.warm_b):
                phases.append(("warm-b", _phase(prog, endpoints, plan.warm_b, limit_s)))
        before = {pid: peers.read_proc(pid) for pid in prog.pids()}
        counters0 = prog.scrape()
        store0 = prog.store_stats()
        timed = _phase(prog, endpoints, plan.timed, limit_s)
        store1 = prog.store_stats()
        after = {pid: peers.read_proc(pid) for pid in prog.pids()}
        counters1 = prog.scrape()
        phases.append(("timed", timed))
        if counters1 is not None:
            # greylistd's group commits during the timed phase.
            row["commit_batch"] = peers.histogram_delta(
                (counters0 or {}).get("batch"), counters1["batch"])
            row["commit_seconds"] = peers.histogram_delta(
                (counters0 or {}).get("seconds"), counters1["seconds"])
        if tracers:
            row["durability"] = _stop_strace(tracers)
            if row.get("commit_batch") is not None:
                row["durability"]["commits_metrics"] = int(row["commit_batch"]["count"])
        codes = prog.stop()
        row["exit_codes"] = codes
        row.update(_summarise(plan, phases, delay_s))
        if getattr(prog, "store", None):
            row["store"] = prog.store
            # Answers of greylist_failure_action (a store that failed or
            # timed out), from its decision lines over all phases.
            row["store_failures"] = _count_lines(os.path.join(workdir, "greylist.log"),
                                                 " reason=database-failure ")
        if store0 is not None:
            # The Redis commands and round trips of the timed phase.
            row["redis"] = peers.redis_delta(store0, store1, row["replies"])
            row["redis"]["log_warnings"] = peers.redis_warnings(
                os.path.join(workdir, "redis", "redis.log"))
        if prog.name == "dunno":
            # Answers DUNNO to everything by design: nothing to judge.
            row.update(wrong=None, early_passes=None, wrong_redeferred=None,
                       wrong_lost=None, wrong_timed=None, judged=0)
        row["peak_rss_kb"] = max((a.get("VmHWM", 0) for a in after.values()), default=0)
        row["anon_rss_kb"] = max((a.get("RssAnon", 0) for a in after.values()), default=0)
        cpu = sum(after[p].get("cpu_s", 0) - before[p].get("cpu_s", 0)
                  for p in after if p in before)
        row["server_cpu_us_per_req"] = round(cpu / max(1, row["replies"]) * 1e6, 1)
        row["harness_cpu_us_per_req"] = round(
            sum(r.cpu_s for r in timed) / max(1, row["replies"]) * 1e6, 1)
        row["elapsed_s_with_warmup"] = round(time.monotonic() - started, 1)
        errors = [r.error for _, res in phases for r in res if r.error]
        if errors:
            row["errors"] = sorted(set(errors))[:5]
        db = _database_size(workdir)
        if db:
            row["database_bytes"] = db
    except Exception as exc:  # A peer that fails to start is reported, not fatal.
        row["errors"] = ["%s: %s" % (type(exc).__name__, exc)]
        prog.kill()
    finally:
        for tracer in tracers:
            if tracer.poll() is None:
                tracer.kill()
        prog.kill()
        prog.procs = []
        shutil.rmtree(workdir, ignore_errors=True)
    return row


def _phase(prog, endpoints, conns, limit_s) -> list:
    return driver.run_phase(endpoints, [[b for _, b in c] for c in conns], limit_s,
                            on_timeout=prog.kill)


def _count_lines(path: str, text: str) -> int:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return sum(1 for line in handle if text in line)
    except OSError:
        return 0


def _database_size(workdir: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(workdir):
        for name in files:
            if name.endswith((".lmdb", ".db")) or name.startswith(("log.", "__db")):
                total += os.path.getsize(os.path.join(dirpath, name))
    return total


def _summarise(plan: streams.Plan, phases: list, delay_s: int) -> dict:
    """Merge driver results, run the oracle, compute rate and latencies."""
    events = []          # (send, recv, code, triple id, phase)
    for name, results in phases:
        conns = {"warm-a": plan.warm_a, "warm-b": plan.warm_b, "timed": plan.timed}[name]
        for conn, res in zip(conns, results):
            for j in range(len(res.codes)):
                events.append((res.send[j], res.recv[j], res.codes[j], conn[j][0], name))
    timed = [r for name, res in phases if name == "timed" for r in res]
    lat = sorted(r.recv[j] - r.send[j] for r in timed for j in range(len(r.codes)))
    n = len(lat)
    out: dict = {"replies": n}
    if n:
        first = min(r.send[0] for r in timed if len(r.codes))
        last = max(r.recv[len(r.codes) - 1] for r in timed if len(r.codes))
        out["rate"] = round(n / ((last - first) / NS), 1)
        out["p50_ms"] = round(_pct(lat, 50) / 1e6, 3)
        out["p99_ms"] = round(_pct(lat, 99) / 1e6, 3)
        out["p999_ms"] = round(_pct(lat, 99.9) / 1e6, 3)
        out["max_ms"] = round(lat[-1] / 1e6, 3)
    counts = [0, 0, 0, 0]
    words: dict = {}
    for r in timed:
        for c in r.codes:
            counts[c] += 1
        for w, k in r.words.items():
            words[w.decode("ascii", "replace") or "?"] = words.get(
                w.decode("ascii", "replace") or "?", 0) + k
    out.update(passes=counts[driver.PASS], defers=counts[driver.DEFER],
               other=counts[driver.OTHER], malformed=counts[driver.MALFORMED],
               actions=words)
    examples = [m.decode("utf-8", "replace") for r in timed for m in r.malformed][:3]
    if examples:
        out["malformed_examples"] = examples
    if any(r.malformed for _, res in phases for r in res):
        out["malformed_all_phases"] = sum(
            1 for _, res in phases for r in res for c in r.codes if c == driver.MALFORMED)
    out.update(oracle(events, delay_s))
    return out


def _pct(sorted_values: list, p: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, int(round(p / 100 * len(sorted_values))) - 1))
    return sorted_values[i]


def oracle(events: list, delay_s: int) -> dict:
    """Count answers that are certainly wrong, and early passes.

    Per triple (exact client address, sender, recipient, lower-cased),
    in send order across all connections and phases:
      expected DEFER  the triple was never sent before, or the reply came
                      less than delay - 1 s after the first send (the age
                      in whole seconds is then below the delay);
      expected PASS   an earlier request for it got a pass reply before
                      this send, or this send is at least delay seconds
                      after the first reply (the server stored its first
                      sight before that reply);
      otherwise       not judged.
    A DEFER where PASS is expected is a wrong answer ("re-deferred" when
    the triple had already passed, "lost" otherwise). A PASS where DEFER
    is expected is an early pass: wrong for an exact-triple greylister,
    but the intended effect of a peer's coarser key (postgrey's /24 and
    sender normalisation) or auto-whitelist, so it is reported apart.
    """
    events.sort()
    first_send: dict = {}
    first_reply: dict = {}
    passed_at: dict = {}
    delay_ns = delay_s * NS
    res = {"wrong": 0, "wrong_redeferred": 0, "wrong_lost": 0, "early_passes": 0,
           "wrong_timed": 0, "judged": 0}
    for send, recv, code, tid, phase in events:
        expect = None
        if tid not in first_send:
            expect = driver.DEFER
        elif tid in passed_at and passed_at[tid] < send:
            expect = driver.PASS
        elif send - first_reply[tid] >= delay_ns:
            expect = driver.PASS
        elif recv - first_send[tid] < delay_ns - NS:
            expect = driver.DEFER
        if expect is not None and code in (driver.PASS, driver.DEFER):
            res["judged"] += 1
            if expect == driver.PASS and code == driver.DEFER:
                res["wrong"] += 1
                res["wrong_timed"] += phase == "timed"
                if tid in passed_at and passed_at[tid] < send:
                    res["wrong_redeferred"] += 1
                else:
                    res["wrong_lost"] += 1
            elif expect == driver.DEFER and code == driver.PASS:
                res["early_passes"] += 1
        if tid not in first_send:
            first_send[tid] = send
            first_reply[tid] = recv
        if code == driver.PASS and tid not in passed_at:
            passed_at[tid] = recv
    return res


# Durability audit: strace the servers during a "new" run.

SYNC_CALLS = ("fsync", "fdatasync", "msync", "sync_file_range")


def _attach_strace(pids: list, workdir: str, daemon: bool = False) -> list:
    """Trace each pid (-f: all its threads). daemon: also the reads of
    requests and the database's pwrite64 calls, for _audit_daemon()."""
    if shutil.which("strace") is None:
        return []
    calls = "fsync,fdatasync,msync,sync_file_range,write,writev,sendto,sendmsg"
    if daemon:
        calls += ",pwrite64,read,recvfrom"
    tracers = []
    for pid in pids:
        out = os.path.join(workdir, "strace.%d" % pid)
        tracers.append(subprocess.Popen(
            ["strace", "-f", "-tt", "-qq", "-o", out, "-p", str(pid), "-e",
             "trace=" + calls, "-e", "signal=none", "-s", "512"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        tracers[-1].output = out
        tracers[-1].daemon = daemon
        # What each descriptor is (the database's were opened at start).
        tracers[-1].fds = _fd_targets(pid)
        tracers[-1].pid_traced = pid
    time.sleep(1.0)  # Attaching is asynchronous.
    return tracers


def _fd_targets(pid: int) -> dict:
    out = {}
    try:
        for name in os.listdir("/proc/%d/fd" % pid):
            try:
                out[int(name)] = os.readlink("/proc/%d/fd/%s" % (pid, name))
            except (OSError, ValueError):
                pass
    except OSError:
        pass
    return out


def _stop_strace(tracers: list) -> dict:
    """Stop the tracers; check a sync call precedes each deferring reply."""
    replies = synced = syncs = 0
    for tracer in tracers:
        tracer.send_signal(signal.SIGINT)
        try:
            tracer.wait(10)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait(5)
        if getattr(tracer, "daemon", False):
            tracer.fds = {**_fd_targets(tracer.pid_traced), **tracer.fds}
            try:
                with open(tracer.output, encoding="utf-8", errors="replace") as handle:
                    return _audit_daemon(handle, tracer.fds)
            except OSError as exc:
                return {"error": str(exc)}
        pending: dict = {}
        try:
            with open(tracer.output, encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    parts = line.split(None, 2)
                    if len(parts) < 3:
                        continue
                    pid, call = parts[0], parts[2]
                    if call.startswith(("fsync(", "fdatasync(", "msync(",
                                        "sync_file_range(")):
                        pending[pid] = pending.get(pid, 0) + 1
                        syncs += 1
                    elif '"action=' in call and '\\n\\n"' in call:
                        # A reply (log lines end in a single newline).
                        if '"action=DEFER' in call or '"action=defer' in call:
                            replies += 1
                            synced += pending.get(pid, 0) > 0
                        pending[pid] = 0
        except OSError:
            pass
    return {"defer_replies_traced": replies, "preceded_by_sync": synced,
            "sync_calls": syncs}


def _audit_daemon(lines, fds: dict) -> dict:
    """Check, for one multi-threaded daemon, that each deferring reply
    leaves after a durable commit that began after its request was read.

    strace -f writes one event per line in the order they happened; a
    call that another thread interrupts is split into "<unfinished ...>"
    and "<... resumed>". Per connection descriptor, the end of the last
    read of a request (recvfrom/read returning data) is remembered. A
    commit is a sync call on the database file (fds: descriptor -> path,
    taken when the trace began) and the first pwrite64 to the database
    after it, LMDB's meta page (written through its O_DSYNC descriptor):
    the commit has ended when that write has. A deferring reply (a
    write of "action=DEFER...\\n\\n" to a connection) counts as
    durable if some commit began after its request's read and ended
    before the reply's write began.
    """
    database = {fd for fd, path in fds.items() if path.endswith(".lmdb")}
    unfinished: dict = {}     # thread -> (call, fd, text of the first part)
    last_read: dict = {}      # connection fd -> event position
    commits: list = []        # [sync start, sync end, meta write end]
    other_syncs: dict = {}
    res = {"defer_replies_traced": 0, "preceded_by_sync": 0, "sync_calls": 0,
           "database_syncs": 0, "meta_writes": 0, "replies_traced": 0}
    metas = [False]

    def begin(call, fd, text, pos):
        if call in SYNC_CALLS:
            res["sync_calls"] += 1
            if fd in database:
                res["database_syncs"] += 1
                commits.append([pos, None, None])
            else:
                path = fds.get(fd, "fd %s" % fd)
                other_syncs[path] = other_syncs.get(path, 0) + 1
        elif call in ("sendto", "write", "writev", "sendmsg") and fd not in database \
                and '"action=' in text and '\\n\\n"' in text:
            res["replies_traced"] += 1
            if '"action=DEFER' in text or '"action=defer' in text:
                res["defer_replies_traced"] += 1
                read = last_read.get(fd, -1)
                for start, _, meta in commits:
                    if start > read and meta is not None and meta < pos:
                        res["preceded_by_sync"] += 1
                        break

    def end(call, fd, result, pos):
        if call in ("recvfrom", "read") and fd not in database and result > 0:
            last_read[fd] = pos
        elif call in SYNC_CALLS and fd in database and commits:
            commits[-1][1] = pos
        elif call == "pwrite64" and fd in database and result > 0 and commits \
                and commits[-1][1] is not None and commits[-1][2] is None:
            commits[-1][2] = pos
            res["meta_writes"] += 1
            metas[0] = True

    for pos, line in enumerate(lines):
        parts = line.split(None, 2)
        if len(parts) < 3:
            continue
        thread, text = parts[0], parts[2].rstrip("\n")
        if text.startswith("<... "):
            started = unfinished.pop(thread, None)
            if started is not None:
                end(started[0], started[1], _result(text), pos)
            continue
        call = text.split("(", 1)[0]
        try:
            fd = int(text[len(call) + 1:].split(",", 1)[0].split(None, 1)[0].rstrip(")"))
        except (ValueError, IndexError):
            fd = None
        begin(call, fd, text, pos)
        if text.endswith("<unfinished ...>"):
            unfinished[thread] = (call, fd)
        else:
            end(call, fd, _result(text), pos)
    if not metas[0]:
        res["note"] = "no meta page write seen after a sync: check the audit"
    res["commits_traced"] = len(commits)
    if other_syncs:
        res["other_syncs"] = other_syncs
    return res


_RESULT = re.compile(r"\)\s+=\s+(-?[0-9]+)")


def _result(text: str) -> int:
    """The return value of a traced call ("... ) = N"), -1 if none."""
    found = _RESULT.findall(text)
    return int(found[-1]) if found else -1


def durability(progs: list, args, top: str) -> list:
    """Run a small 'new' stream under strace for each program: 1 process,
    greylistd with --durability-connections connections."""
    rows = []
    for prog in progs:
        if prog.name == "dunno":
            continue
        k = args.durability_connections if isinstance(prog, peers.Daemon) else 1
        plan = streams.build_plan("new", args.durability_requests, args.seed, k)
        row = run_program(prog, plan, args.delay, top, args.limit, strace=True)
        rows.append({"program": prog.name, "processes": k,
                     "available": row.get("available"),
                     "reason": row.get("reason", ""), "requests": row["requests"],
                     "defers": row.get("defers", 0), **row.get("durability", {}),
                     "errors": row.get("errors", [])})
    return rows


# Reporting.

def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            model = next((l.split(":", 1)[1].strip() for l in handle
                          if l.startswith("model name")), "")
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            mem = "%.1f GiB" % (int(handle.readline().split()[1]) / 2 ** 20)
    except (OSError, ValueError, IndexError):
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "memory": mem,
            "kernel": platform.release(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def versions(progs: list, python: str) -> dict:
    out = {"python": peers.run_text([python, "-c", "import sys; print(sys.version.split()[0])"]),
           "lmdb": peers.run_text([python, "-c", "import lmdb; print(lmdb.__version__, "
                                   "'(liblmdb %d.%d.%d)' % lmdb.version())"]),
           "harness_python": sys.version.split()[0]}
    for prog in progs:
        if prog.available()[0]:
            out[prog.name] = prog.version()
        else:
            out[prog.name] = "not available: " + prog.available()[1]
    return out


def ratios(rows: list) -> list:
    out = []
    keyed = {(r["scenario"], r["processes"], r["program"]): r for r in rows}
    for (scenario, k, program), r in keyed.items():
        if program not in OURS or not r.get("rate"):
            continue
        entry = {"scenario": scenario, "processes": k, "program": program,
                 "greylist_rate": r["rate"]}
        for peer in ("postgrey", "greylist.pl", "dunno"):
            p = keyed.get((scenario, k, peer))
            entry[peer] = round(r["rate"] / p["rate"], 2) if p and p.get("rate") else None
        out.append(entry)
    return out


def targets(rows: list, scale: dict | None, dur: list | None,
            floor: dict | None = None, rss: dict | None = None) -> list:
    """The targets of issue 5 (when greylist ran) and issue 11 (greylistd)."""
    out = []
    if any(r["program"] == "greylist" for r in rows) or scale:
        out += [dict(t, issue=5) for t in spawn_targets(rows, scale, dur, floor)]
    if any(r["program"] == "greylistd" for r in rows) or rss:
        out += [dict(t, issue=11) for t in daemon_targets(rows, dur, floor, rss)]
    return out


def daemon_targets(rows: list, dur: list | None, floor: dict | None,
                   rss: dict | None, k: int = 16) -> list:
    """Issue 11: greylistd against postgrey with k connections, and its RSS."""
    keyed = {(r["scenario"], r["processes"], r["program"]): r for r in rows}
    out = []

    def get(s, p, field):
        r = keyed.get((s, k, p))
        return r.get(field) if r else None

    def add(name, value, goal, met, note=""):
        out.append({"target": name, "measured": value, "goal": goal,
                    "met": met, "note": note})

    def bound(s):
        """What two cores and the disk allow, as multiples of postgrey."""
        theirs = get(s, "postgrey", "rate")
        server = get(s, "greylistd", "server_cpu_us_per_req")
        harness = get(s, "greylistd", "harness_cpu_us_per_req")
        notes = []
        if server and harness and theirs:
            cap = 2e6 / (server + harness)
            notes.append("2-core bound: greylistd %.0f us + drivers %.0f us of CPU a "
                         "request, at most %.0f/s = %.2f x postgrey; one interpreter "
                         "(GIL) at %.0f us a request: at most %.0f/s = %.2f x postgrey"
                         % (server, harness, cap, cap / theirs, server, 1e6 / server,
                            1e6 / server / theirs))
        batch = get(s, "greylistd", "commit_batch")
        if batch and batch.get("count") and floor and floor.get("commit_p50_us"):
            mean = batch["sum"] / batch["count"]
            secs = get(s, "greylistd", "commit_seconds") or {}
            commit_us = (secs["sum"] / secs["count"] * 1e6 if secs.get("count")
                         else floor["commit_p50_us"])
            notes.append("group commit: %d commits of %.1f plans on average, "
                         "%.0f us each (storage floor %.0f us)"
                         % (batch["count"], mean, commit_us, floor["commit_p50_us"]))
        return "; ".join(notes)

    def ratio(name, s, goal):
        a, b = get(s, "greylistd", "rate"), get(s, "postgrey", "rate")
        r = a / b if a and b else None
        add(name, None if r is None else "%.2f (%.0f vs %.0f req/s)" % (r, a, b),
            ">= %s" % goal, None if r is None else r >= goal, bound(s))

    ratio("new, %d connections: greylistd x postgrey" % k, "new", 5)
    d = next((x for x in dur or [] if x["program"] == "greylistd"), None)
    if d is not None:
        traced = d.get("defer_replies_traced")
        add("new, %d connections: each triple durable before its reply"
            % d.get("processes", k),
            "%d/%d (%d database syncs, %d commits, %d defers)"
            % (d.get("preceded_by_sync", 0), traced or 0, d.get("database_syncs", 0),
               d.get("commits_traced", 0), d.get("defers", 0))
            if traced else None, "all",
            None if not traced else d["preceded_by_sync"] == traced == d["defers"],
            "strace -f of the daemon: a sync of the database file and LMDB's meta "
            "page write, begun after the request was read, ended before the reply")
    ratio("repeat, %d connections: greylistd x postgrey" % k, "repeat", 10)
    for s in ("mixed", "new", "repeat"):
        ours, theirs = get(s, "greylistd", "p99_ms"), get(s, "postgrey", "p50_ms")
        add("%s, %d connections: greylistd p99 < postgrey p50 (ms)" % (s, k),
            None if ours is None or theirs is None else "%s < %s" % (ours, theirs),
            "p99 < p50", None if ours is None or theirs is None else ours < theirs)
    wrong = [r for r in rows if r["program"] == "greylistd" and r.get("rate")]
    add("greylistd: wrong answers and malformed replies, all runs",
        sum((r.get("wrong") or 0) + r.get("malformed", 0) for r in wrong) if wrong else None,
        "0", None if not wrong else all(not r.get("wrong") and not r.get("malformed")
                                        for r in wrong))
    if rss:
        if rss.get("vmhwm_kb"):
            add("RSS of one greylistd, %s triples, %d connections (MB): VmHWM"
                % (daemon_rss.size_name(rss["triples"]), rss["connections"]),
                "%.1f (VmRSS %.1f, anonymous %.1f, file %.1f)"
                % (rss["vmhwm_kb"] / 1024, rss["vmrss_kb"] / 1024,
                   rss["rss_anon_kb"] / 1024, rss["rss_file_kb"] / 1024),
                "<= 40", rss["vmhwm_kb"] <= 40 * 1024 and not rss.get("errors"),
                "file: pages of the mapped database that lookups touched (shared page "
                "cache); %d requests, %d wrong, %d malformed"
                % (rss.get("requests", 0), rss.get("wrong", 0), rss.get("malformed", 0)))
        else:
            add("RSS of one greylistd (MB)", None, "<= 40", None,
                "; ".join(rss.get("errors", [])) or rss.get("reason", ""))
    return out


def spawn_targets(rows: list, scale: dict | None, dur: list | None,
                  floor: dict | None = None) -> list:
    keyed = {(r["scenario"], r["processes"], r["program"]): r for r in rows}

    def get(s, k, p, field):
        r = keyed.get((s, k, p))
        return r.get(field) if r else None

    def ratio(s, k, peer):
        a, b = get(s, k, "greylist", "rate"), get(s, k, peer, "rate")
        return a / b if a and b else None

    out = []

    def add(name, value, goal, met, note=""):
        out.append({"target": name, "measured": value, "goal": goal,
                    "met": met, "note": note})

    def cmp_ratio(name, s, k, peer, goal, note=""):
        r = ratio(s, k, peer)
        add(name, None if r is None else round(r, 2), ">= %s" % goal,
            None if r is None else r >= goal, note)

    def ceiling(s):
        """The storage floor's bound on our rate, as a multiple of postgrey's."""
        theirs = get(s, 1, "postgrey", "rate")
        counts = get(s, 1, "greylist", "plan_counts") or {}
        if not floor or not floor.get("commit_p50_us") or not theirs or not counts:
            return ""
        # Every request but a known triple's commits: first attempts, and
        # retries (a pending record's update, or a pass and its entries).
        share = 1 - counts.get("known", 0) / sum(counts.values())
        if share <= 0:
            return ""
        rate = 1e6 / (share * floor["commit_p50_us"])
        return ("storage floor: %.0f%% of requests commit at p50 %.0f us each, so at most "
                "%.0f/s = %.2f x postgrey" % (100 * share, floor["commit_p50_us"], rate,
                                                rate / theirs))

    cmp_ratio("repeat, 1 process: x postgrey", "repeat", 1, "postgrey", 4)
    cmp_ratio("repeat, 1 process: x DUNNO responder", "repeat", 1, "dunno", 0.70)
    cmp_ratio("mixed, 1 process: x postgrey", "mixed", 1, "postgrey", 3, ceiling("mixed"))
    ours, theirs = get("mixed", 1, "greylist", "p99_ms"), get("mixed", 1, "postgrey", "p50_ms")
    add("mixed, 1 process: our p99 < postgrey p50 (ms)",
        None if ours is None or theirs is None else "%s < %s" % (ours, theirs),
        "p99 < p50", None if ours is None or theirs is None else ours < theirs,
        "storage floor: a durable commit alone takes p50 %.3f ms, p99 %.3f ms"
        % (floor["commit_p50_us"] / 1000, floor["commit_p99_us"] / 1000)
        if floor and floor.get("commit_p50_us") else "")
    cmp_ratio("new, 1 process: x postgrey", "new", 1, "postgrey", 2, ceiling("new"))
    if dur:
        d = next((x for x in dur if x["program"] == "greylist"), None)
        if d and d.get("defer_replies_traced"):
            add("new: every new triple committed (sync) before its reply",
                "%d/%d" % (d["preceded_by_sync"], d["defer_replies_traced"]), "all",
                d["preceded_by_sync"] == d["defer_replies_traced"] == d["defers"])
    cmp_ratio("repeat, 4 processes: x postgrey (4 connections)", "repeat", 4,
              "postgrey", 10)
    w = get("repeat", 4, "greylist", "wrong")
    m = get("repeat", 4, "greylist", "malformed")
    add("repeat, 4 processes: wrong answers", w, "0",
        None if w is None else (w == 0 and not m))
    rss = [r.get("peak_rss_kb") for r in rows if r["program"] == "greylist"
           and r.get("peak_rss_kb")]
    add("peak RSS per policy process (MB), comparison runs",
        round(max(rss) / 1024, 1) if rss else None, "< 40",
        max(rss) < 40 * 1024 if rss else None)
    if scale:
        for s in scale.get("sizes", []):
            if s.get("peak_rss_kb"):
                add("peak RSS, %d triples (MB): VmHWM / anonymous" % s["triples"],
                    "%.1f / %.1f" % (s["peak_rss_kb"] / 1024, s.get("anon_rss_kb", 0) / 1024),
                    "< 40", s.get("anon_rss_kb", 0) < 40 * 1024,
                    "VmHWM counts the pages of the mapped database file that "
                    "lookups touched (shared page cache); the goal is judged on "
                    "anonymous memory")
    if scale:
        for t in scale.get("targets", []):
            out.append(t)
    return out


def print_table(report: dict, stream) -> None:
    w = stream.write
    m, v = report["machine"], report["versions"]
    w("greylist benchmark  %s\n" % m["date"])
    w("machine: %s CPUs, %s, %s RAM, Linux %s\n" % (m["nproc"], m["cpu"], m["memory"],
                                                    m["kernel"]))
    for key in ("greylist", "greylistd", "candidate", "python", "lmdb", "postgrey",
                "greylist.pl", "dunno"):
        if key in v:
            w("  %-12s %s\n" % (key, v[key]))
    w("command: %s\n" % report["command"])
    w("delay %ds, seed %d\n\n" % (report["delay_s"], report["seed"]))
    head = ("%-7s %2s %-12s %9s %8s %8s %8s %8s %7s %7s %7s %7s %5s %5s %6s\n"
            % ("scenario", "K", "program", "req/s", "p50 ms", "p99 ms", "p99.9ms",
               "max ms", "RSS MB", "cpu us", "passes", "defers", "malf", "wrong",
               "early"))
    w(head)
    w("-" * (len(head) - 1) + "\n")
    for r in report["runs"]:
        if not r.get("available", True):
            w("%-7s %2d %-12s not available: %s\n" % (r["scenario"], r["processes"],
                                                      r["program"], r.get("reason", "")))
            continue
        if "rate" not in r:
            w("%-7s %2d %-12s failed: %s\n" % (r["scenario"], r["processes"], r["program"],
                                               "; ".join(r.get("errors", []))))
            continue
        w("%-7s %2d %-12s %9.0f %8.3f %8.3f %8.3f %8.2f %7.1f %7.0f %7d %7d %5d %5s %6s\n"
          % (r["scenario"], r["processes"], r["program"], r["rate"], r["p50_ms"],
             r["p99_ms"], r["p999_ms"], r["max_ms"], r.get("peak_rss_kb", 0) / 1024,
             r.get("server_cpu_us_per_req", 0), r["passes"], r["defers"],
             r["malformed"] + r["other"], _dash(r["wrong"]), _dash(r["early_passes"])))
        if r.get("errors"):
            w("%29s errors: %s\n" % ("", "; ".join(r["errors"])))
    w("\nRSS MB: peak RSS (VmHWM) of the largest server process; cpu us: server CPU\n"
      "time per request; malf: malformed or unknown replies; wrong: answers that\n"
      "are certainly wrong (all phases, incl. warm-up); early: passes of triples\n"
      "that an exact-triple greylister must defer (coarser keys, auto-whitelists).\n")
    if report.get("ratios"):
        w("\ngreylist's rate as a multiple of each peer's (same scenario, same K):\n")
        w("%-7s %2s %-10s %9s %10s %12s %8s\n" % ("scenario", "K", "program", "req/s",
                                                 "x postgrey", "x greylist.pl", "x dunno"))
        for r in report["ratios"]:
            f = lambda x: "n/a" if x is None else "%.2f" % x  # noqa: E731
            w("%-7s %2d %-10s %9.0f %10s %12s %8s\n"
              % (r["scenario"], r["processes"], r.get("program", "greylist"),
                 r["greylist_rate"], f(r["postgrey"]), f(r["greylist.pl"]), f(r["dunno"])))
    stored = [r for r in report["runs"] if r.get("redis")]
    if stored:
        w("\nRedis (timed phase): round trips per request (the server's reply writes),\n"
          "commands per request, and the server's CPU per request:\n")
        for r in stored:
            w("  %s\n" % describe_redis(r))
    commits = [r for r in report["runs"] if r.get("commit_batch")]
    if commits:
        w("\ngroup commit (greylistd's metrics, timed phase): commits, plans per commit\n"
          "(mean), commit duration (mean, ms), and the batch size histogram\n"
          "(commits with at most N plans, not cumulative):\n")
        for r in commits:
            w("  %-7s %2d  %s\n" % (r["scenario"], r["processes"],
                                    describe_batches(r["commit_batch"], r.get("commit_seconds"))))
    if report.get("durability"):
        w("\ndurability audit (strace, 'new' stream, 1 process): deferring replies\n"
          "preceded by an fsync/fdatasync/msync since the previous reply; greylistd\n"
          "(K connections): preceded by a commit (database sync and meta page\n"
          "write) begun after the request was read:\n")
        for d in report["durability"]:
            if not d.get("available", True):
                w("  %-12s not available: %s\n" % (d["program"], d.get("reason")))
            elif "database_syncs" in d:
                w("  %-12s K=%d %d/%d (%d sync calls, %d of the database, %d commits "
                  "traced, %s by the metrics, for %d defers)%s%s\n"
                  % (d["program"], d["processes"], d.get("preceded_by_sync", 0),
                     d.get("defer_replies_traced", 0), d.get("sync_calls", 0),
                     d.get("database_syncs", 0), d.get("commits_traced", 0),
                     d.get("commits_metrics", "?"), d.get("defers", 0),
                     "  " + d["note"] if d.get("note") else "",
                     "  errors: " + "; ".join(d["errors"]) if d.get("errors") else ""))
            else:
                w("  %-12s %d/%d (%d sync calls for %d defers)%s\n"
                  % (d["program"], d.get("preceded_by_sync", 0),
                     d.get("defer_replies_traced", 0), d.get("sync_calls", 0),
                     d.get("defers", 0),
                     "  errors: " + "; ".join(d["errors"]) if d.get("errors") else ""))
    if report.get("storage"):
        w("\n" + storage.describe(report["storage"]))
    if report.get("startup"):
        w("\n")
        startup.print_report(report["startup"], stream)
    if report.get("scale"):
        import scale as scale_mod
        scale_mod.print_scale(report["scale"], stream)
    if report.get("daemon_rss"):
        w("\n" + daemon_rss.describe(report["daemon_rss"]))
    issues = []
    for t in report.get("targets", []):
        if t.get("issue", 5) not in issues:
            issues.append(t.get("issue", 5))
    for issue in issues:
        w("\ntargets (issue %d%s):\n" % (issue, ", greylistd" if issue == 11 else ""))
        for t in report["targets"]:
            if t.get("issue", 5) != issue:
                continue
            met = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
            w("  %-6s %-58s %s (goal %s)%s\n" % (met, t["target"], t["measured"], t["goal"],
                                                ("  " + t["note"]) if t.get("note") else ""))


def describe_batches(batch: dict, seconds: dict | None) -> str:
    """One line: commits, mean plans per commit, mean duration, histogram."""
    count = batch.get("count", 0)
    if not count:
        return "no commits"
    mean_ms = (seconds["sum"] / seconds["count"] * 1000
               if seconds and seconds.get("count") else None)
    buckets, previous, parts = batch.get("buckets", {}), 0.0, []
    for le in sorted(buckets, key=lambda x: float("inf") if x == "+Inf" else float(x)):
        n = buckets[le] - previous
        previous = buckets[le]
        if n:
            parts.append("<=%s: %d" % (le.replace(".0", "") if le != "+Inf" else "inf", n))
    return "%6d commits, %6.2f plans/commit, %s ms/commit  [%s]" % (
        count, batch["sum"] / count, "?" if mean_ms is None else "%.3f" % mean_ms,
        ", ".join(parts))


def describe_redis(row: dict) -> str:
    """One line: a run's Redis round trips and commands per request."""
    r = row["redis"]
    calls = ", ".join("%s %.2f" % (name, n) for name, n in
                      sorted(r["calls_per_request"].items(), key=lambda x: -x[1]))
    return ("%-7s %2d %-10s %-9s %5.2f round trips, %5.2f commands (%s), %4.0f us "
            "redis CPU" % (row["scenario"], row["processes"], row["program"],
                           row.get("store", ""), r["round_trips_per_request"],
                           r["commands_per_request"], calls, r["redis_cpu_us_per_request"]))


def _dash(value) -> str:
    return "-" if value is None else str(value)


def make_programs(names: list, args) -> list:
    out = []
    for name in names:
        if name == "greylist":
            out.append(peers.Ours(args.python, args.ours_path, store=args.store,
                                  redis_fsync=args.redis_fsync))
        elif name == "dunno":
            out.append(peers.Dunno(args.python))
        elif name == "greylist.pl":
            out.append(peers.GreylistPl())
        elif name == "postgrey":
            out.append(peers.Postgrey(whitelists=not args.postgrey_no_whitelists))
        elif name == "greylistd":
            out.append(peers.Daemon(args.python, args.ours_path,
                                    commit_batch=args.commit_batch, store=args.store,
                                    redis_fsync=args.redis_fsync))
        else:
            raise SystemExit("unknown program %r (known: %s)"
                             % (name, ", ".join(KNOWN_PROGRAMS)))
    if args.candidate:
        cand = peers.Ours(args.python, os.path.abspath(args.candidate))
        cand.name = "candidate"
        out.insert(1, cand)
    return out


def parse_args(argv: list | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--all", action="store_true",
                   help="run the issue-5 comparison: repeat/mixed/new with 1 process, "
                        "repeat with 4, and the durability audit")
    p.add_argument("--daemon", action="store_true",
                   help="run the issue-11 comparison: greylistd, postgrey and the DUNNO "
                        "responder (unless --programs), new/repeat/mixed with 1, 4, 16 "
                        "and 64 connections (unless --scenario/--processes), the "
                        "durability audit, the storage floor and --daemon-rss 1M")
    p.add_argument("--scenario", default="repeat",
                   help="comma-separated scenarios: new, repeat, mixed (default repeat)")
    p.add_argument("--processes", default="1",
                   help="comma-separated K values: concurrent processes/connections")
    p.add_argument("--requests", type=int, default=20000, help="timed requests per run")
    p.add_argument("--warm", type=int, default=None,
                   help="known triples in the warm-up (default: min(5000, N) for repeat, "
                        "min(3000, N/4) for mixed)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--delay", type=int, default=2,
                   help="greylist delay in seconds for all programs (default 2)")
    p.add_argument("--programs", default=None,
                   help="comma-separated: " + ", ".join(KNOWN_PROGRAMS) + " (default: "
                        + ",".join(PROGRAMS) + "; with --daemon " + ",".join(DAEMON_PROGRAMS)
                        + ")")
    p.add_argument("--store", default="lmdb", choices=peers.STORES,
                   help="greylist's and greylistd's database: lmdb (default), redis (a "
                        "redis-server of their own on a unix socket, fresh for each run) "
                        "or redis-tcp (the same on 127.0.0.1); bench/redis_bench.py runs "
                        "the Redis comparison")
    p.add_argument("--redis-fsync", default="everysec",
                   choices=("always", "everysec", "no", "off"),
                   help="the Redis server's appendfsync (off: no append-only file)")
    p.add_argument("--commit-batch", type=int, default=None,
                   help="greylist_commit_batch for greylistd (default: its own, 256)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat each run; report the run with the median rate")
    p.add_argument("--durability", action="store_true",
                   help="strace audit: is each new triple synced before its reply")
    p.add_argument("--durability-requests", type=int, default=300)
    p.add_argument("--durability-connections", type=int, default=16,
                   help="connections to greylistd in the durability audit (default 16)")
    p.add_argument("--daemon-rss", default="", metavar="SIZE",
                   help="RSS of one greylistd on a database of SIZE triples (e.g. 1M) "
                        "with --daemon-rss-connections open (bench/daemon_rss.py)")
    p.add_argument("--daemon-rss-connections", type=int, default=200)
    p.add_argument("--daemon-rss-rounds", type=int, default=10,
                   help="requests per connection in the RSS run (one in flight on each)")
    p.add_argument("--startup", action="store_true",
                   help="one request per process: start-up CPU and RSS (bench/startup.py)")
    p.add_argument("--startup-runs", type=int, default=40,
                   help="runs of each program and kind for --startup")
    p.add_argument("--scale", default="",
                   help="comma-separated database sizes, e.g. 1M,10M (10k is the baseline)")
    p.add_argument("--scale-lookups", type=int, default=20000,
                   help="requests per scale lookup run")
    p.add_argument("--cleanup-args", default="-c {settings} cleanup",
                   help="arguments of greylistctl for a full cleanup; {settings} and "
                        "{database} are replaced (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON (- for stdout)")
    p.add_argument("--python", default=peers.python_default(),
                   help="python that runs greylist and the DUNNO responder")
    p.add_argument("--ours-path", default=peers.ROOT,
                   help="directory holding the greylist package to test (default: this "
                        "checkout)")
    p.add_argument("--candidate", metavar="DIR",
                   help="also run the greylist package in DIR as program 'candidate' "
                        "(a tuning prototype, side by side with this checkout)")
    p.add_argument("--postgrey-no-whitelists", action="store_true",
                   help="run postgrey with empty whitelists instead of Debian's")
    p.add_argument("--tmpdir", default=None, help="where work directories go")
    p.add_argument("--limit", type=float, default=600,
                   help="time limit in seconds for each phase of each run")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if greylist gave a malformed reply or a wrong answer")
    return p.parse_args(argv)


def main(argv: list | None = None) -> int:
    args = parse_args(argv)
    args.ours_path = os.path.abspath(args.ours_path)
    if os.sep in args.python:  # the programs run in their work directories
        args.python = os.path.abspath(args.python)
    given = argv if argv is not None else sys.argv[1:]
    if args.programs is None:
        args.programs = ",".join(DAEMON_PROGRAMS if args.daemon else PROGRAMS)
    names = [n for n in args.programs.split(",") if n]
    progs = make_programs(names, args)
    if args.all:
        combos = list(ALL_RUNS)
        args.durability = True
        args.startup = True
    elif args.daemon:
        scenarios = (args.scenario.split(",") if "--scenario" in given
                     else DAEMON_SCENARIOS)
        ks = ([int(k) for k in args.processes.split(",") if k] if "--processes" in given
              else DAEMON_CONNECTIONS)
        combos = [(s, k) for s in scenarios if s for k in ks]
        args.durability = True
        args.daemon_rss = args.daemon_rss or "1M"
    else:
        combos = [(s, int(k)) for s in args.scenario.split(",") if s
                  for k in args.processes.split(",") if k]
    out = sys.stderr if args.json == "-" else sys.stdout
    top = tempfile.mkdtemp(prefix="greylist-bench-", dir=args.tmpdir)
    os.chmod(top, 0o755)
    report = {"command": " ".join(["python", "bench/run.py"] + (argv if argv is not None
                                                                 else sys.argv[1:])),
              "machine": machine(), "versions": versions(progs, args.python),
              "seed": args.seed, "delay_s": args.delay, "requests": args.requests,
              "runs": []}
    try:
        for scenario, k in combos:
            plan = streams.build_plan(scenario, args.requests, args.seed, k, args.warm)
            out.write("%s, K=%d: %d timed requests, %d warm-up; %s\n" % (
                scenario, k, plan.timed_requests(),
                sum(map(len, plan.warm_a)) + sum(map(len, plan.warm_b)), plan.counts))
            for prog in progs:
                trials = [run_program(prog, plan, args.delay, top, args.limit)
                          for _ in range(max(1, args.rounds))]
                rated = [t for t in trials if t.get("rate")]
                if rated:
                    median = statistics.median_low([t["rate"] for t in rated])
                    row = next(t for t in rated if t["rate"] == median)
                    if len(trials) > 1:
                        row["rates_all_rounds"] = [t.get("rate") for t in trials]
                else:
                    row = trials[0]
                row["plan_counts"] = plan.counts
                report["runs"].append(row)
                out.write("  %-12s %s\n" % (prog.name, _brief(row)))
                out.flush()
        if args.durability:
            report["durability"] = durability(progs, args, top)
            report["storage"] = storage.measure(args.python, args.ours_path, top)
        if args.startup:
            report["startup"] = startup.measure(args.python, args.ours_path, top,
                                                runs=args.startup_runs, seed=args.seed,
                                                limit_s=args.limit, out=out)
        if args.scale:
            import scale
            report["scale"] = scale.run_scale(args, top, out)
        if args.daemon_rss:
            report["daemon_rss"] = daemon_rss.measure(args, top, out)
        report["ratios"] = ratios(report["runs"])
        report["targets"] = targets(report["runs"], report.get("scale"),
                                    report.get("durability"), report.get("storage"),
                                    report.get("daemon_rss"))
    finally:
        shutil.rmtree(top, ignore_errors=True)
    out.write("\n")
    print_table(report, out)
    if args.json:
        text = json.dumps(report, indent=1, sort_keys=True, default=str)
        if args.json == "-":
            sys.stdout.write(text + "\n")
        else:
            with open(args.json, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
    if args.check:
        bad = [r for r in report["runs"] if r["program"] in OURS
               and (not r.get("rate") or r.get("malformed") or r.get("wrong")
                    or r.get("errors") or any(r.get("exit_codes") or [])
                    or r.get("store_failures"))]
        bad += [d for d in report.get("durability") or [] if d["program"] in OURS
                and (d.get("errors") or ("defer_replies_traced" in d and not
                                         d["preceded_by_sync"] == d["defer_replies_traced"]
                                         == d["defers"]))]
        rss = report.get("daemon_rss")
        if rss and (rss.get("errors") or rss.get("wrong") or rss.get("malformed")):
            bad.append(rss)
        if bad:
            return 1
    return 0


def _brief(row: dict) -> str:
    if not row.get("available", True):
        return "not available: " + row.get("reason", "")
    if "rate" not in row:
        return "failed: " + "; ".join(row.get("errors", []))
    return ("%.0f req/s, p99 %.2f ms, %d pass, %d defer, %s wrong, %s early, rss %.1f MB%s"
            % (row["rate"], row["p99_ms"], row["passes"], row["defers"], _dash(row["wrong"]),
               _dash(row["early_passes"]), row.get("peak_rss_kb", 0) / 1024,
               ("  errors: " + "; ".join(row["errors"])) if row.get("errors") else ""))


if __name__ == "__main__":
    sys.exit(main())
