"""One request per process: what a spawn(8) child costs from start to exit.

Usage: python bench/startup.py [--runs N] [--kinds known,new]
                               [--programs greylist,greylist.pl,dunno,floor]
                               [--python PATH] [--ours-path DIR | --installed]
                               [--importtime N] [--json FILE] [--check]

DESCRIPTION
    Under Postfix's spawn(8) every smtpd connection to the policy
    service starts a new process, which reads one (or a few) requests
    on stdin, answers on stdout and exits at end of input. So the whole
    process matters: interpreter start, imports, opening the database,
    one RCPT request, exit. This runs, N times each:

      greylist     PYTHON -m greylist -c SETTINGS (with --installed,
                   the console script beside PYTHON, as master.cf runs
                   it), the bytecode compiled first, the settings of
                   peers.Ours (database and log in a work directory,
                   greylist_delay = 300s, as root greylist_allow_root);
      greylist.pl  Postfix's example, a temporary copy as peers.py
                   prepares it ($database_name, $greylist_delay);
      dunno        bench/dunno.py on the same python;
      floor        PYTHON -c pass: the interpreter's own start and exit.

    Request kinds (each program has its own fresh database per kind):

      known  the same triple every run, passed beforehand: greylist is
             warmed with a second settings file (greylist_delay = 0s,
             same database), so that its second sight passes; the runs
             then use the 300s settings and see a passed triple (with
             the default greylist_sender_awl, logged as awl-sender).
             greylist.pl keeps only the first-sight time and compares
             it with its delay on every request, so it runs with
             $greylist_delay = 0 and is warmed by one sight, 1.1 s, and
             12 passes: past its auto-whitelist threshold (a count > 10),
             as a known client is in steady state; otherwise its first
             11 runs would each also write the count;
      new    a fresh triple each run (bench/streams.py, scenario new),
             deferred: every run commits.

    The request is written into the stdin pipe before the program
    starts (it fits in the pipe buffer), so the figures do not include
    the harness's own scheduling. Runs are interleaved: in each round
    every program runs once for every kind, the starting point rotated
    each round, so that noise on this shared machine hits all alike.

    Figures, per program and kind: CPU time (user + system of the
    child, from wait4(2)'s rusage) median and p90, wall time median
    (fork to reap), peak RSS (ru_maxrss) median and maximum, and the
    reply. Then greylist's CPU as a multiple of greylist.pl's and the
    targets: greylist CPU <= 1.3 x greylist.pl CPU (each kind) and
    greylist peak RSS <= 15 MB.

    Why a C helper: Linux carries a process's high-water RSS across
    execve() (the old address space's peak goes into the rusage
    maximum), and a child made by vfork() or fork() starts from its
    parent's. Started from this Python harness, even /bin/true reports
    the harness's peak RSS (14 MB or more). So each program is
    started by a small helper, compiled with cc into the work directory,
    that forks, execs and wait4()s it and reports the rusage; the child
    of a 1 MB process reports its own peak. Without a C compiler the
    harness spawns and os.wait4()s the programs itself: CPU and wall
    are still right, but RSS is then at least the harness's own peak,
    and the RSS target is reported n/a.

    How greylist is imported matters by several ms: an editable install
    (pip install -e) imports an __editable__ finder at every start of
    that python, for every program on it. Use a normal install
    (--installed: the greylist in PYTHON's site-packages) or, by
    default, PYTHONPATH = --ours-path (this checkout); the work
    directory is the current directory, so no other tree shadows it.
    The report says which python, which greylist, and whether an
    editable finder was loaded. dunno and floor get the same
    environment as greylist.

    --importtime N adds the N heaviest imports of greylist on a known
    request (PYTHON -X importtime, third of three runs, so that byte
    code is cached), by cumulative time.

LIMITS
    Every run has a timeout (--timeout, default 10 s), after which the
    helper kills the program it started; rounds stop at --limit seconds
    (default 600). Only processes this script started are signalled.
    Work directories are removed afterwards.

DIAGNOSTICS
    A run fails if the program exits non-zero, times out, or its reply
    is not the expected one (a pass for known, a defer for new, DUNNO
    from dunno, nothing from floor); failures are counted and the
    first error shown. A program that is not installed is reported as
    not available. Exit status 0, or 1 with --check if greylist had a
    failed run or no run at all.
"""

import argparse
import json
import math
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import driver  # noqa: E402
import peers  # noqa: E402
import streams  # noqa: E402

PROGRAMS = ("greylist", "greylist.pl", "dunno", "floor")
PYTHONS = ("greylist", "dunno")     # Compared with the floor.
KINDS = ("known", "new")
DELAY_S = 300
CPU_RATIO_GOAL = 1.3
RSS_GOAL_MB = 15

# The helper: fork, exec, wait4, report. It must not be Python (see the
# module description: a child inherits its parent's peak RSS).
HELPER_C = r"""
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static pid_t child;

static void expire(int sig)
{
    (void) sig;
    if (child > 0)
        kill(child, SIGKILL);
}

/* spawn REPORT_FD TIMEOUT_S PROGRAM [ARG...] */
int main(int argc, char **argv)
{
    struct timespec t0, t1;
    struct rusage ru;
    int status, fd;

    if (argc < 4)
        return 2;
    fd = atoi(argv[1]);
    signal(SIGALRM, expire);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if ((child = fork()) < 0)
        return 3;
    if (child == 0) {
        close(fd);
        execvp(argv[3], argv + 3);
        _exit(127);
    }
    alarm(atoi(argv[2]));
    /* The harness reads the reply to end of file: only the child may
       hold the pipes. */
    close(0);
    close(1);
    while (wait4(child, &status, 0, &ru) < 0)
        if (errno != EINTR)
            return 4;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    dprintf(fd, "%d %ld %ld %ld %lld\n", status,
            (long) ru.ru_utime.tv_sec * 1000000L + ru.ru_utime.tv_usec,
            (long) ru.ru_stime.tv_sec * 1000000L + ru.ru_stime.tv_usec,
            ru.ru_maxrss,
            (long long) (t1.tv_sec - t0.tv_sec) * 1000000000LL
            + (t1.tv_nsec - t0.tv_nsec));
    return 0;
}
"""

# What the import probe prints, run with greylist's environment.
PROBE = r"""
import glob, json, os, site, sys
out = {"version": sys.version.split()[0], "executable": sys.executable,
       "base": os.path.realpath(sys._base_executable),
       "editable_modules": sorted(m for m in sys.modules if "__editable__" in m),
       "editable_pth": sorted(os.path.basename(p) for d in site.getsitepackages()
                              for p in glob.glob(os.path.join(d, "__editable__*.pth")))}
try:
    import greylist
    out["greylist"] = os.path.dirname(greylist.__file__)
    out["greylist_version"] = getattr(greylist, "__version__", "?")
except Exception as exc:
    out["greylist_error"] = "%s: %s" % (type(exc).__name__, exc)
print(json.dumps(out))
"""


class Cell:
    """One program on one kind of request: its files, argv and results."""

    def __init__(self, program: str, kind: str, workdir: str) -> None:
        self.program, self.kind, self.workdir = program, kind, workdir
        self.argv: list = []
        self.env: dict | None = None
        self.expect = ""           # "pass", "defer", "dunno" or "none"
        self.results: list = []    # dicts of one run each
        self.reason = ""           # why not available
        self.failed = ""           # why the warm-up failed
        self.settings = ""


def build_helper(top: str) -> str | None:
    """Compile the helper into top; None if there is no working compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    source, binary = os.path.join(top, "spawn.c"), os.path.join(top, "spawn")
    with open(source, "w", encoding="ascii") as handle:
        handle.write(HELPER_C)
    try:
        done = subprocess.run([cc, "-O2", "-o", binary, source], capture_output=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return binary if done.returncode == 0 and os.access(binary, os.X_OK) else None


def run_once(cell: Cell, request: bytes, helper: str | None, timeout_s: float) -> dict:
    """Run cell's program on one request; return its figures or an error."""
    rin, win = os.pipe()
    os.write(win, request)     # A few hundred bytes: fits in the pipe buffer.
    os.close(win)
    rout, wout = os.pipe()
    errpath = os.path.join(cell.workdir, "stderr")
    deadline = time.monotonic() + timeout_s + 5
    report_r = report_w = -1
    try:
        with open(errpath, "ab") as err:
            if helper:
                report_r, report_w = os.pipe()
                argv = [helper, str(report_w), str(math.ceil(timeout_s))] + cell.argv
                pass_fds = (report_w,)
            else:
                argv, pass_fds = cell.argv, ()
            t0 = time.perf_counter_ns()
            try:
                proc = subprocess.Popen(argv, stdin=rin, stdout=wout, stderr=err,
                                        pass_fds=pass_fds, env=cell.env, cwd=cell.workdir)
            except OSError as exc:
                return {"error": "cannot start %s: %s" % (argv[0], exc)}
        for fd in (rin, wout, report_w):
            if fd >= 0:
                os.close(fd)
        rin = wout = report_w = -1
        reply, timed_out = _read_all(rout, deadline)
        if helper:
            text, late = _read_all(report_r, deadline)
            timed_out = timed_out or late
            _reap(proc, deadline)
            fields = text.split()
            if len(fields) != 5:
                return {"error": "helper: no report (exit %s)" % proc.returncode}
            status, utime, stime, maxrss, wall = map(int, fields)
        else:
            status, usage = _wait4(proc, deadline)
            wall = time.perf_counter_ns() - t0
            utime = round(usage.ru_utime * 1e6) if usage else 0
            stime = round(usage.ru_stime * 1e6) if usage else 0
            maxrss = usage.ru_maxrss if usage else 0
    finally:
        for fd in (rin, wout, rout, report_r, report_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
    row = {"cpu_ms": (utime + stime) / 1000, "user_ms": utime / 1000,
           "sys_ms": stime / 1000, "wall_ms": wall / 1e6, "rss_kb": maxrss,
           "reply": reply.decode("utf-8", "replace")}
    code = os.waitstatus_to_exitcode(status) if status >= 0 else None
    if timed_out or code == -signal.SIGKILL:
        row["error"] = "timed out after %ss" % timeout_s
    elif code != 0:
        row["error"] = "exit status %s%s" % (code, _stderr_tail(errpath))
    else:
        problem = _judge(cell.expect, reply)
        if problem:
            row["error"] = problem
    return row


def _read_all(fd: int, deadline: float) -> tuple:
    """Read fd to end of file or the deadline; return (data, timed out)."""
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, True
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return data, False
            data += chunk


def _reap(proc: subprocess.Popen, deadline: float) -> None:
    try:
        proc.wait(max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        # The helper kills its child at the timeout; if it hangs itself,
        # stop it (ours, by PID).
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)


def _wait4(proc: subprocess.Popen, deadline: float) -> tuple:
    """Reap proc with os.wait4 (its rusage); kill it at the deadline."""
    # Polled, not blocking: a program may close stdout and still hang.
    # Only without the helper, whose wall time does not include this.
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return status, usage
        if time.monotonic() > deadline:
            os.kill(proc.pid, signal.SIGKILL)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return status, usage
        time.sleep(0.0005)


def _stderr_tail(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().strip().split("\n")
    except OSError:
        return ""
    return (": " + lines[-1][:200]) if lines and lines[-1] else ""


def _judge(expect: str, reply: bytes) -> str:
    """Return what is wrong with a reply, or ""."""
    if expect == "none":
        return "" if not reply else "unexpected output %r" % reply[:80]
    code, word = driver.classify(reply)
    if code == driver.MALFORMED:
        return "malformed reply %r" % reply[:80]
    want = {"pass": driver.PASS, "dunno": driver.PASS, "defer": driver.DEFER}[expect]
    if code != want or (expect == "dunno" and word != b"DUNNO"):
        return "expected %s, got %r" % (expect, reply[:80])
    return ""


# Setting up each program on each kind.

def make_cells(programs: list, kinds: list, python: str, source: str,
               installed: bool, top: str) -> list:
    env = python_env(source, installed)
    cells = []
    for kind in kinds:
        for program in programs:
            cell = Cell(program, kind, tempfile.mkdtemp(prefix="%s-%s-" % (program, kind),
                                                        dir=top))
            cell.env = env
            if program == "greylist":
                ours = peers.Ours(python, source)
                if kind == "known":
                    # Same database, delay 0: warm-up only.
                    ours.prepare(cell.workdir, 0)
                    cell.warm_settings = os.path.join(cell.workdir, "warm.cf")
                    os.rename(ours.settings, cell.warm_settings)
                ours.prepare(cell.workdir, DELAY_S)
                cell.settings = ours.settings
                script = os.path.join(os.path.dirname(python), "greylist")
                if installed and os.path.exists(script):
                    # What master.cf runs: the console script, no runpy.
                    cell.argv = [script, "-c", ours.settings]
                else:
                    cell.argv = [python, "-m", "greylist", "-c", ours.settings]
                cell.expect = "pass" if kind == "known" else "defer"
                if not installed:
                    ok, why = ours.available()
                    cell.reason = "" if ok else why
            elif program == "greylist.pl":
                pl = peers.GreylistPl()
                ok, why = pl.available()
                if not ok:
                    cell.reason = why
                else:
                    # prepare() gives greylist.pl D - 1: 0 for known.
                    pl.prepare(cell.workdir, 1 if kind == "known" else DELAY_S)
                    cell.argv = ["perl", pl.script]
                cell.env = None
                cell.expect = "pass" if kind == "known" else "defer"
            elif program == "dunno":
                cell.argv = [python, os.path.join(HERE, "dunno.py")]
                cell.expect = "dunno"
            elif program == "floor":
                cell.argv = [python, "-c", "pass"]
                cell.expect = "none"
            else:
                raise SystemExit("unknown program %r (known: %s)"
                                 % (program, ", ".join(PROGRAMS)))
            cells.append(cell)
    return cells


def python_env(source: str, installed: bool) -> dict:
    """The environment of the python programs: which greylist they import."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if not installed:
        env["PYTHONPATH"] = source
    return env


def compile_source(python: str, source: str) -> None:
    """Write the bytecode of source's greylist, as pip does at install:
    with PYTHONDONTWRITEBYTECODE set (as on these machines) every run
    would otherwise compile every module (about 25 ms)."""
    subprocess.run([python, "-m", "compileall", "-q", os.path.join(source, "greylist")],
                   check=False, timeout=120, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, PYTHONDONTWRITEBYTECODE=""))


def warm(cell: Cell, request: bytes, helper: str | None, timeout_s: float) -> str:
    """Make the known triple pass in cell's database; return an error or ""."""
    if cell.program == "greylist":
        warm_cell = Cell(cell.program, cell.kind, cell.workdir)
        warm_cell.env = cell.env
        warm_cell.argv = cell.argv[:-1] + [cell.warm_settings]
        replies = []
        for expect in ("defer", "pass"):
            warm_cell.expect = expect
            replies.append(run_once(warm_cell, request, helper, timeout_s))
    elif cell.program == "greylist.pl":
        cell.expect = "defer"
        replies = [run_once(cell, request, helper, timeout_s)]
        time.sleep(1.1)   # It passes when the age in whole seconds exceeds 0.
        cell.expect = "pass"
        replies += [run_once(cell, request, helper, timeout_s) for _ in range(12)]
    else:
        return ""
    errors = [r["error"] for r in replies if r.get("error")]
    return ("warm-up: " + errors[0]) if errors else ""


# The measurement.

def measure(python: str, source: str, top: str, runs: int = 40,
            kinds: list | tuple = KINDS, programs: list | tuple = PROGRAMS,
            installed: bool = False, timeout_s: float = 10, limit_s: float = 600,
            seed: int = 1, importtime: int = 0, out=None) -> dict:
    """Run the start-up comparison; return the report (see print_report)."""
    out = out or sys.stdout
    kinds, programs = list(kinds), list(programs)
    work = tempfile.mkdtemp(prefix="startup-", dir=top)
    report = {"runs": runs, "kinds": kinds, "programs": programs,
              "delay_s": DELAY_S, "seed": seed, "timeout_s": timeout_s,
              "python_path": python, "installed": installed,
              "ours_path": None if installed else source}
    try:
        helper = build_helper(work)
        report["method"] = "helper" if helper else "direct"
        report["harness_rss_kb"] = _self_rss_kb()
        report["python"] = probe(python, python_env(source, installed))
        if "greylist_error" not in report["python"]:
            report["greylist_version"] = (describe_installed(report["python"]) if installed
                                          else peers.describe_source(source))
        if not installed:
            compile_source(python, source)
        cells = make_cells(programs, kinds, python, source, installed, work)
        plan = streams.build_plan("new", runs + 1, seed, 1)
        requests = [b for _, b in plan.timed[0]]
        for cell in cells:
            if not cell.reason and cell.kind == "known":
                cell.failed = warm(cell, requests[0], helper, timeout_s)
        live = [c for c in cells if not c.reason and not c.failed]
        out.write("start-up: %d runs of %s on %s, %s\n" % (
            runs, ", ".join(c.program for c in cells if c.kind == kinds[0]),
            ", ".join(kinds), "interleaved"))
        out.flush()
        started = time.monotonic()
        rounds = 0
        for r in range(runs):
            if time.monotonic() - started > limit_s:
                report["stopped"] = "time limit %ss after %d rounds" % (limit_s, rounds)
                break
            shift = r % max(1, len(live))
            for cell in live[shift:] + live[:shift]:
                request = requests[0] if cell.kind == "known" else requests[1 + r]
                cell.results.append(run_once(cell, request, helper, timeout_s))
            rounds += 1
        report["rounds"] = rounds
        report["elapsed_s"] = round(time.monotonic() - started, 1)
        report["rows"] = [summarise(c) for c in cells]
        report["ratios"] = ratios(report["rows"])
        report["targets"] = targets(report, report["rows"])
        if importtime:
            known = next((c for c in live if c.program == "greylist"
                          and c.kind == "known"), None)
            if known:
                report["importtime"] = import_times(known, requests[0], importtime)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _self_rss_kb() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def probe(python: str, env: dict) -> dict:
    """Which python and greylist the programs get (run in a neutral cwd)."""
    try:
        done = subprocess.run([python, "-c", PROBE], capture_output=True, text=True,
                              env=env, cwd="/", timeout=30)
        info = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return {"greylist_error": "probe failed: %s" % exc}
    path = shutil.which(python) or python
    try:
        with open(path, "rb") as handle:
            if handle.read(2) == b"#!":
                # A wrapper script (a pyenv shim): its own start is measured too.
                info["wrapper_script"] = path
    except OSError:
        pass
    return info


def describe_installed(info: dict) -> str:
    return "version %s" % info.get("greylist_version", "?")


def summarise(cell: Cell) -> dict:
    row = {"program": cell.program, "kind": cell.kind}
    if cell.reason:
        row.update(available=False, reason=cell.reason)
        return row
    if cell.failed:
        row.update(available=True, runs=0, ok=0, failures=1, errors=[cell.failed])
        return row
    good = [r for r in cell.results if not r.get("error")]
    errors = [r["error"] for r in cell.results if r.get("error")]
    row.update(available=True, runs=len(cell.results), ok=len(good),
               failures=len(errors))
    if errors:
        row["errors"] = sorted(set(errors))[:3]
    if good:
        cpu = sorted(r["cpu_ms"] for r in good)
        rss = sorted(r["rss_kb"] for r in good)
        row.update(cpu_ms_median=round(statistics.median(cpu), 2),
                   cpu_ms_p90=round(_pct(cpu, 90), 2),
                   user_ms_median=round(statistics.median(r["user_ms"] for r in good), 2),
                   sys_ms_median=round(statistics.median(r["sys_ms"] for r in good), 2),
                   wall_ms_median=round(statistics.median(r["wall_ms"] for r in good), 2),
                   rss_mb_median=round(statistics.median(rss) / 1024, 1),
                   rss_mb_max=round(rss[-1] / 1024, 1),
                   reply=good[0]["reply"].split("\n")[0])
    return row


def _pct(sorted_values: list, p: float) -> float:
    """Nearest-rank percentile, as run.py's."""
    i = min(len(sorted_values) - 1, max(0, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[i]


def ratios(rows: list) -> list:
    keyed = {(r["kind"], r["program"]): r for r in rows}
    out = []
    for kind in dict.fromkeys(r["kind"] for r in rows):
        ours = keyed.get((kind, "greylist"), {})
        if not ours.get("cpu_ms_median"):
            continue
        entry = {"kind": kind, "greylist_cpu_ms": ours["cpu_ms_median"],
                 "greylist_rss_mb_max": ours["rss_mb_max"]}
        for peer in ("greylist.pl", "dunno", "floor"):
            p = keyed.get((kind, peer), {})
            entry["cpu_x_" + peer] = (round(ours["cpu_ms_median"] / p["cpu_ms_median"], 2)
                                      if p.get("cpu_ms_median") else None)
            entry["wall_x_" + peer] = (round(ours["wall_ms_median"] / p["wall_ms_median"], 2)
                                       if p.get("wall_ms_median") else None)
        floor = keyed.get((kind, "floor"), {})
        entry["cpu_ms_over_floor"] = (round(ours["cpu_ms_median"] - floor["cpu_ms_median"], 2)
                                      if floor.get("cpu_ms_median") else None)
        out.append(entry)
    return out


def targets(report: dict, rows: list) -> list:
    out = []
    by_kind = {r["kind"]: r for r in report["ratios"]}
    for kind in report["kinds"]:
        ratio = by_kind.get(kind, {}).get("cpu_x_greylist.pl")
        out.append({"target": "%s: greylist CPU <= %.1fx greylist.pl CPU (median)"
                    % (kind, CPU_RATIO_GOAL),
                    "measured": None if ratio is None else "%.2fx" % ratio,
                    "goal": "<= %.1fx" % CPU_RATIO_GOAL,
                    "met": None if ratio is None else ratio <= CPU_RATIO_GOAL})
    peaks = [r["rss_mb_max"] for r in rows if r["program"] == "greylist"
             and r.get("rss_mb_max")]
    clean = report.get("method") == "helper"
    out.append({"target": "greylist peak RSS <= %d MB (max of all runs)" % RSS_GOAL_MB,
                "measured": "%.1f MB" % max(peaks) if peaks else None,
                "goal": "<= %d MB" % RSS_GOAL_MB,
                "met": max(peaks) <= RSS_GOAL_MB if peaks and clean else None,
                "note": "" if clean else "no C compiler: ru_maxrss includes the "
                        "harness's own peak (%.1f MB)" % (report["harness_rss_kb"] / 1024)})
    return out


def import_times(cell: Cell, request: bytes, top_n: int) -> list:
    """The heaviest imports of greylist on one request, by cumulative time."""
    text = ""
    for _ in range(3):     # Keep the last: byte code and page cache warm.
        try:
            done = subprocess.run([cell.argv[0], "-X", "importtime"] + cell.argv[1:],
                                  input=request, capture_output=True, env=cell.env,
                                  cwd=cell.workdir, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return []
        text = done.stderr.decode("utf-8", "replace")
    rows = []
    for line in text.split("\n"):
        if not line.startswith("import time:") or "|" not in line:
            continue
        fields = line[len("import time:"):].split("|")
        try:
            rows.append({"self_us": int(fields[0]), "cumulative_us": int(fields[1]),
                         "module": fields[2].rstrip()})
        except (ValueError, IndexError):
            continue    # The header line.
    rows.sort(key=lambda r: -r["cumulative_us"])
    return rows[:top_n]


# Reporting.

def print_report(report: dict, stream) -> None:
    w = stream.write
    info = report.get("python", {})
    w("start-up (one request per process, as under spawn(8)): %d rounds of %d, "
      "interleaved\n" % (report.get("rounds", 0), report["runs"]))
    w("  python       %s: %s (%s)\n" % (report["python_path"], info.get("version", "?"),
                                        info.get("base", "?")))
    if info.get("wrapper_script"):
        w("  WARNING      %s is a script: its own start-up is measured too\n"
          % info["wrapper_script"])
    how = ("the python's own install (no PYTHONPATH)"
           if report["installed"] else "PYTHONPATH=%s" % report["ours_path"])
    if info.get("greylist_error"):
        w("  greylist     cannot be imported (%s): %s\n" % (how, info["greylist_error"]))
    else:
        w("  greylist     %s, imported from %s, %s\n" % (
            report.get("greylist_version", "?"), info.get("greylist", "?"), how))
    if info.get("editable_modules") or info.get("editable_pth"):
        w("  WARNING      editable install: %s loaded at every start; figures of all "
          "python programs are inflated\n" % ", ".join(
              info.get("editable_modules") or info.get("editable_pth")))
    else:
        w("  editable     no __editable__ finder loaded\n")
    w("  measured by  %s\n" % (
        "a C helper's wait4(2) (fork, exec, reap): CPU user+sys, ru_maxrss"
        if report.get("method") == "helper" else
        "os.wait4 in the harness: RSS includes the harness's peak %.1f MB (no cc)"
        % (report.get("harness_rss_kb", 0) / 1024)))
    w("  delays       greylist_delay = %ds; greylist.pl $greylist_delay = %d (new), "
      "0 (known, warmed)\n" % (report["delay_s"], report["delay_s"] - 1))
    if report.get("stopped"):
        w("  stopped      %s\n" % report["stopped"])
    head = "%-6s %-12s %4s %4s %8s %8s %8s %8s %8s %8s  %s\n" % (
        "kind", "program", "runs", "fail", "cpu p50", "cpu p90", "wall p50",
        "RSS p50", "RSS max", "-floor", "reply")
    w("\n" + head)
    w("-" * (len(head) + 10) + "\n")
    floors = {r["kind"]: r.get("cpu_ms_median") for r in report.get("rows", [])
              if r["program"] == "floor"}
    for r in report.get("rows", []):
        if not r.get("available"):
            w("%-6s %-12s not available: %s\n" % (r["kind"], r["program"], r.get("reason")))
            continue
        if not r.get("ok"):
            w("%-6s %-12s %4d %4d failed: %s\n" % (r["kind"], r["program"], r["runs"],
                                                    r["failures"], "; ".join(r["errors"])))
            continue
        floor = floors.get(r["kind"])
        w("%-6s %-12s %4d %4d %8.2f %8.2f %8.2f %8.1f %8.1f %8s  %s\n" % (
            r["kind"], r["program"], r["runs"], r["failures"], r["cpu_ms_median"],
            r["cpu_ms_p90"], r["wall_ms_median"], r["rss_mb_median"], r["rss_mb_max"],
            # The floor is python's: meaningless for perl.
            "%.2f" % (r["cpu_ms_median"] - floor) if floor and r["program"] in PYTHONS
            else "-", r["reply"][:40]))
        if r.get("errors"):
            w("%20s errors: %s\n" % ("", "; ".join(r["errors"])))
    w("\ncpu: user+sys of the process in ms; wall: fork to reap, ms; RSS: ru_maxrss, MB;\n"
      "-floor: cpu p50 minus that of PYTHON -c pass (python programs).\n")
    if report.get("ratios"):
        w("\ngreylist as a multiple of each (median CPU; wall in brackets):\n")
        for r in report["ratios"]:
            f = lambda k: "n/a" if r[k] is None else "%.2fx" % r[k]  # noqa: E731
            w("  %-6s x greylist.pl %s (%s), x dunno %s (%s), x floor %s (%s); "
              "peak RSS %.1f MB\n" % (r["kind"], f("cpu_x_greylist.pl"),
                                      f("wall_x_greylist.pl"), f("cpu_x_dunno"),
                                      f("wall_x_dunno"), f("cpu_x_floor"),
                                      f("wall_x_floor"), r["greylist_rss_mb_max"]))
    w("\ntargets (start-up):\n")
    for t in report.get("targets", []):
        met = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
        w("  %-6s %-52s %s%s\n" % (met, t["target"], t["measured"] or "not measured",
                                   ("  " + t["note"]) if t.get("note") else ""))
    if report.get("importtime"):
        w("\nheaviest imports of greylist (known request, -X importtime, by cumulative):\n")
        w("  %10s %10s  %s\n" % ("cumul. us", "self us", "module"))
        for r in report["importtime"]:
            w("  %10d %10d  %s\n" % (r["cumulative_us"], r["self_us"], r["module"]))


def parse_args(argv: list | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=40, help="runs of each program and kind")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: known, new")
    p.add_argument("--programs", default=",".join(PROGRAMS),
                   help="comma-separated: " + ", ".join(PROGRAMS))
    p.add_argument("--python", default=peers.python_default(),
                   help="python that runs greylist, the DUNNO responder and the floor")
    p.add_argument("--ours-path", default=peers.ROOT,
                   help="directory holding the greylist package (PYTHONPATH; default: "
                        "this checkout)")
    p.add_argument("--installed", action="store_true",
                   help="import the greylist installed in PYTHON instead (no PYTHONPATH)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=10, help="seconds per run")
    p.add_argument("--limit", type=float, default=600, help="seconds for all rounds")
    p.add_argument("--importtime", type=int, default=0, metavar="N",
                   help="also list greylist's N heaviest imports")
    p.add_argument("--tmpdir", default=None, help="where work directories go")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON (- for stdout)")
    p.add_argument("--check", action="store_true",
                   help="exit 1 if a greylist run failed or none ran")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    for kind in args.kinds.split(","):
        if kind not in KINDS:
            p.error("unknown kind %r (known: %s)" % (kind, ", ".join(KINDS)))
    return args


def main(argv: list | None = None) -> int:
    args = parse_args(argv)
    out = sys.stderr if args.json == "-" else sys.stdout
    top = tempfile.mkdtemp(prefix="greylist-startup-", dir=args.tmpdir)
    try:
        report = measure(args.python, os.path.abspath(args.ours_path), top,
                         runs=args.runs, kinds=[k for k in args.kinds.split(",") if k],
                         programs=[p for p in args.programs.split(",") if p],
                         installed=args.installed, timeout_s=args.timeout,
                         limit_s=args.limit, seed=args.seed,
                         importtime=args.importtime, out=out)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    import run   # Its machine description; not at the top: run imports this module.
    report["command"] = " ".join(["python", "bench/startup.py"] + (
        argv if argv is not None else sys.argv[1:]))
    report["machine"] = run.machine()
    m = report["machine"]
    out.write("%s\nmachine: %s CPUs, %s, %s RAM, Linux %s\ncommand: %s\n" % (
        m["date"], m["nproc"], m["cpu"], m["memory"], m["kernel"], report["command"]))
    print_report(report, out)
    if args.json:
        text = json.dumps(report, indent=1, sort_keys=True)
        if args.json == "-":
            sys.stdout.write(text + "\n")
        else:
            with open(args.json, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
    if args.check:
        ours = [r for r in report.get("rows", []) if r["program"] == "greylist"]
        if not ours or any(not r.get("ok") or r.get("failures") for r in ours):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
