"""The Redis store against postgrey: known and new triples, 1 and 16 connections.

Usage:
  python bench/redis_bench.py [--quick] [--stores redis,redis-tcp,lmdb]
                              [--requests N] [--warm W] [--rounds R] [--seed N]
                              [--delay S] [--redis-fsync MODE] [--python PATH]
                              [--ours-path DIR] [--tmpdir DIR] [--limit S]
                              [--json FILE] [--check]

DESCRIPTION
    Run J of bench/RESULTS.md, with bench/run.py's machinery (run_program,
    the drivers, the oracle) and bench/peers.py's programs. For each
    scenario, repeat (known, passed triples) and new (first attempts),
    each program on a fresh database in the same invocation, the rounds
    interleaved (every program once per round, in this order):

      K=1   greylist, the spawn form (one process on pipes), on each
            store of --stores; postgrey with one connection
      K=16  greylistd, one daemon with 16 connections, on each store;
            postgrey with 16 connections

    Stores: redis (a redis-server of the program's own, on a unix socket
    in the work directory), redis-tcp (the same, greylist connecting to
    127.0.0.1:PORT), lmdb (the default store, for reference). Each Redis
    server is started empty with the program and stopped with it: no
    RDB snapshots, the append-only file with --redis-fsync (default
    everysec, Redis's recommended setting; "always" for an fsync per
    write, "off" for no append-only file). greylist runs with its
    default greylist_redis_timeout (300 ms).

    Reported per run (the round with the median rate): requests per
    second, latency p50 and p99, server CPU per request (greylist's
    processes, and the Redis server apart), the ratio to postgrey in the
    same scenario with the same K (the median of the rounds' own
    ratios), and from
    the Redis server's INFO before and after the timed phase: round
    trips per request (total_writes_processed: one reply write per
    round trip, the pipelines of greylistd's store thread included) and
    the commands per request (commandstats, by command). Also the
    answers of greylist_failure_action (reason=database-failure in
    greylist's log: a Redis call that failed or took longer than the
    timeout) and the Redis server's log warnings (a slow AOF fsync).

    Targets (the Redis issue): known triples at least 3x postgrey with
    one process (greylist, K=1), and at least 5x postgrey with greylistd
    and 16 connections; judged per Redis store, reported, never faked.

    --quick: 300 timed requests, 100 warm-up, delay 1 s, the redis store
    only (the smoke test, tests/test_bench_smoke.py). A full run with the
    defaults (5000 timed requests, 2000 warm-up, redis and redis-tcp)
    takes about 2 to 3 minutes.

DIAGNOSTICS
    A program that is not available (postgrey, redis-server, redis-py in
    PYTHON) is reported so. Exit status 1 with --check when greylist or
    greylistd gave a wrong answer, a malformed reply, an error, a
    non-zero exit or a failure-action answer; 2 when the harness failed.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import peers  # noqa: E402
import run as bench  # noqa: E402
import streams  # noqa: E402

SCENARIOS = ("repeat", "new")
# (form, K, our program): the spawn form with one process, greylistd with 16.
FORMS = (("spawn", 1, "greylist"), ("daemon", 16, "greylistd"))
# Known triples: greylist (one process) and greylistd (16 connections)
# against postgrey with as many connections.
TARGETS = {"greylist": 3.0, "greylistd": 5.0}
KIND = {"repeat": "known", "new": "new"}


def default_python() -> str:
    """The benchmark's python if it has redis-py, else the test venv's."""
    first = peers.python_default()
    for python in (first, os.path.join(peers.ROOT, ".venv-test", "bin", "python")):
        if os.path.exists(python) and peers.run_text([python, "-c", "import redis"]) == "":
            return python
    return first


def parse_args(argv: list | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a tiny run for the smoke test (300 requests, delay 1 s, redis only)")
    p.add_argument("--stores", default=None,
                   help="comma-separated: redis, redis-tcp, lmdb (default redis,redis-tcp)")
    p.add_argument("--scenario", default=",".join(SCENARIOS),
                   help="comma-separated: repeat (known triples), new")
    p.add_argument("--requests", type=int, default=None, help="timed requests per run (5000)")
    p.add_argument("--warm", type=int, default=None,
                   help="known triples in repeat's warm-up (default 2000)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat each run; report the run with the median rate")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--delay", type=int, default=None, help="greylist delay in seconds (2)")
    p.add_argument("--connections", type=int, default=16,
                   help="greylistd's (and postgrey's) connections in the daemon form")
    p.add_argument("--redis-fsync", default="everysec",
                   choices=("always", "everysec", "no", "off"))
    p.add_argument("--no-postgrey", action="store_true", help="leave postgrey out")
    p.add_argument("--postgrey-no-whitelists", action="store_true")
    p.add_argument("--python", default=None,
                   help="python that runs greylist (default: .venv's if it has redis-py, "
                        "else .venv-test's)")
    p.add_argument("--ours-path", default=peers.ROOT)
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--limit", type=float, default=300, help="time limit per phase (s)")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    quick = args.quick
    args.stores = [s for s in (args.stores or ("redis" if quick else "redis,redis-tcp"))
                   .split(",") if s]
    for store in args.stores:
        if store not in peers.STORES:
            p.error("--stores: %r is not one of %s" % (store, ", ".join(peers.STORES)))
    args.requests = args.requests or (300 if quick else 5000)
    args.warm = args.warm if args.warm is not None else (100 if quick else 2000)
    args.delay = args.delay or (1 if quick else 2)
    args.python = os.path.abspath(args.python) if args.python else default_python()
    args.ours_path = os.path.abspath(args.ours_path)
    return args


def programs(args, form: str) -> list:
    out = []
    for store in args.stores:
        if form == "spawn":
            out.append(peers.Ours(args.python, args.ours_path, store=store,
                                  redis_fsync=args.redis_fsync))
        else:
            out.append(peers.Daemon(args.python, args.ours_path, store=store,
                                    redis_fsync=args.redis_fsync))
    if not args.no_postgrey:
        out.append(peers.Postgrey(whitelists=not args.postgrey_no_whitelists))
    return out


def measure(args, out) -> dict:
    top = tempfile.mkdtemp(prefix="greylist-redis-bench-", dir=args.tmpdir)
    os.chmod(top, 0o755)
    report = {"command": " ".join(["python", "bench/redis_bench.py"] + args.argv),
              "machine": bench.machine(), "load_before": os.getloadavg(),
              "seed": args.seed, "delay_s": args.delay, "requests": args.requests,
              "warm": args.warm, "stores": args.stores, "redis_fsync": args.redis_fsync,
              "rows": []}
    started = time.monotonic()
    versions = {}
    try:
        for scenario in args.scenario.split(","):
            for form, k, _ in FORMS:
                k = args.connections if form == "daemon" else k
                plan = streams.build_plan(scenario, args.requests, args.seed, k, args.warm)
                out.write("%s (%s triples), %s form, K=%d: %d timed requests, %d warm-up\n"
                          % (scenario, KIND[scenario], form, k, plan.timed_requests(),
                             sum(map(len, plan.warm_a)) + sum(map(len, plan.warm_b))))
                progs = programs(args, form)
                for prog in progs:
                    label = "%s/%s" % (prog.name, getattr(prog, "store", "-"))
                    if label not in versions:
                        ok, why = prog.available()
                        versions[label] = prog.version() if ok else "not available: " + why
                # Rounds interleaved (each program once per round), so that
                # each ratio to postgrey is taken within a round.
                trials: list = [[] for _ in progs]
                for _ in range(max(1, args.rounds)):
                    for prog, mine in zip(progs, trials):
                        mine.append(bench.run_program(prog, plan, args.delay, top, args.limit))
                        out.write("  %-10s %-9s %s%s\n" % (
                            prog.name, mine[-1].get("store", ""), bench._brief(mine[-1]),
                            "" if not mine[-1].get("redis") else
                            ", %.2f round trips/request"
                            % mine[-1]["redis"]["round_trips_per_request"]))
                        out.flush()
                theirs = next((t for p, t in zip(progs, trials) if p.name == "postgrey"), None)
                for prog, mine in zip(progs, trials):
                    rated = [t for t in mine if t.get("rate")]
                    if rated:
                        median = statistics.median_low([t["rate"] for t in rated])
                        row = next(t for t in rated if t["rate"] == median)
                    else:
                        row = mine[0]
                    row["rates_all_rounds"] = [t.get("rate") for t in mine]
                    if theirs is not None and prog.name != "postgrey":
                        each = [a["rate"] / b["rate"] for a, b in zip(mine, theirs)
                                if a.get("rate") and b.get("rate")]
                        row["x_postgrey_all_rounds"] = [round(x, 2) for x in each]
                        row["x_postgrey"] = (round(statistics.median(each), 2) if each
                                             else None)
                    row["form"] = form
                    row["kind"] = KIND[scenario]
                    report["rows"].append(row)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    report["versions"] = dict(versions, python=peers.run_text(
        [args.python, "-c", "import sys; print(sys.version.split()[0])"]),
        python_path=args.python)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["load_after"] = os.getloadavg()
    report["ratios"] = ratios(report["rows"])
    report["targets"] = targets(report["rows"])
    return report


def ratios(rows: list) -> list:
    """Each of our rows against postgrey's, same scenario and K: the
    median of the rounds' own ratios."""
    theirs = {(r["scenario"], r["processes"]): r for r in rows
              if r["program"] == "postgrey" and r.get("rate")}
    out = []
    for r in rows:
        if r["program"] not in bench.OURS or not r.get("rate"):
            continue
        p = theirs.get((r["scenario"], r["processes"]))
        out.append({"scenario": r["scenario"], "processes": r["processes"],
                    "program": r["program"], "store": r.get("store"), "rate": r["rate"],
                    "postgrey_rate": p["rate"] if p else None,
                    "x_postgrey": r.get("x_postgrey"),
                    "x_postgrey_all_rounds": r.get("x_postgrey_all_rounds")})
    return out


def targets(rows: list) -> list:
    """The issue's targets on known triples, per Redis store, and no wrong answer."""
    out = []
    for program, goal in TARGETS.items():
        for r in rows:
            if r["program"] != program or r["scenario"] != "repeat" \
                    or not (r.get("store") or "").startswith("redis"):
                continue
            k = r["processes"]
            theirs = next((p for p in rows if p["program"] == "postgrey"
                           and p["scenario"] == "repeat" and p["processes"] == k), None)
            name = "known triples, %s, %d %s, %s: x postgrey" % (
                program, k, "process" if program == "greylist" else "connections",
                r["store"])
            ratio = r.get("x_postgrey")
            out.append({"target": name, "goal": ">= %s" % goal,
                        "measured": None if ratio is None else "%.2f (%.0f vs %.0f req/s%s)"
                        % (ratio, r["rate"], theirs["rate"],
                           "; rounds %s" % ", ".join("%.2f" % x for x in
                                                     r["x_postgrey_all_rounds"])
                           if len(r.get("x_postgrey_all_rounds") or ()) > 1 else ""),
                        "met": None if ratio is None else ratio >= goal,
                        "note": bound(r, theirs)})
    wrong = [r for r in rows if r["program"] in bench.OURS and r.get("rate")]
    out.append({"target": "greylist and greylistd: wrong, malformed and failure-action "
                          "answers, all runs",
                "goal": "0",
                "measured": sum((r.get("wrong") or 0) + r.get("malformed", 0)
                                + (r.get("store_failures") or 0) for r in wrong)
                if wrong else None,
                "met": None if not wrong else all(
                    not r.get("wrong") and not r.get("malformed")
                    and not r.get("store_failures") for r in wrong),
                "note": ""})
    return out


def bound(row: dict, theirs: dict | None) -> str:
    """What two cores allow: greylist's, Redis's and the drivers' CPU per request."""
    server = row.get("server_cpu_us_per_req")
    harness = row.get("harness_cpu_us_per_req")
    store = (row.get("redis") or {}).get("redis_cpu_us_per_request")
    if not (server and harness and store is not None and theirs and theirs.get("rate")):
        return ""
    total = server + harness + store
    note = ("CPU a request: %s %.0f us + redis-server %.0f us + drivers %.0f us; two cores: "
            "at most %.0f/s = %.2f x postgrey" % (row["program"], server, store, harness,
                                                  2e6 / total, 2e6 / total / theirs["rate"]))
    if row["processes"] == 1 or row["program"] == "greylistd":
        # One process: its own CPU bounds it (and it waits for each reply).
        note += "; %s alone (one process): at most %.0f/s = %.2f x postgrey" % (
            row["program"], 1e6 / server, 1e6 / server / theirs["rate"])
    return note


def print_report(report: dict, stream) -> None:
    w = stream.write
    m, v = report["machine"], report["versions"]
    w("\ngreylist on Redis against postgrey  %s\n" % m["date"])
    w("machine: %s CPUs, %s, %s RAM, Linux %s; load average %s before, %s after\n"
      % (m["nproc"], m["cpu"], m["memory"], m["kernel"],
         "/".join("%.2f" % x for x in report["load_before"]),
         "/".join("%.2f" % x for x in report["load_after"])))
    for key in sorted(v):
        w("  %-20s %s\n" % (key, v[key]))
    w("command: %s\n" % report["command"])
    w("delay %ds, seed %d, %d timed requests, %d warm-up (repeat), Redis appendfsync %s; "
      "%.0f s\n\n" % (report["delay_s"], report["seed"], report["requests"], report["warm"],
                      report["redis_fsync"], report["elapsed_s"]))
    head = ("%-6s %-6s %2s %-10s %-9s %8s %7s %7s %7s %7s %9s %7s %7s %5s %5s\n"
            % ("kind", "form", "K", "program", "store", "req/s", "p50 ms", "p99 ms",
               "cpu us", "redis us", "x postgr", "RT/req", "cmd/req", "fail", "wrong"))
    w(head)
    w("-" * (len(head) - 1) + "\n")
    for r in report["rows"]:
        lead = "%-6s %-6s %2d %-10s %-9s" % (r["kind"], r["form"], r["processes"],
                                             r["program"], r.get("store", "-"))
        if not r.get("available", True):
            w("%s not available: %s\n" % (lead, r.get("reason", "")))
            continue
        if "rate" not in r:
            w("%s failed: %s\n" % (lead, "; ".join(r.get("errors", []))))
            continue
        redis = r.get("redis") or {}
        ratio = "-" if r.get("x_postgrey") is None else "%.2f" % r["x_postgrey"]
        w("%s %8.0f %7.3f %7.3f %7.0f %7s %9s %7s %7s %5s %5s\n"
          % (lead, r["rate"], r["p50_ms"], r["p99_ms"], r.get("server_cpu_us_per_req", 0),
             "%.0f" % redis["redis_cpu_us_per_request"] if redis else "-", ratio,
             "%.2f" % redis["round_trips_per_request"] if redis else "-",
             "%.2f" % redis["commands_per_request"] if redis else "-",
             bench._dash(r.get("store_failures")), bench._dash(r.get("wrong"))))
        if r.get("errors"):
            w("%40s errors: %s\n" % ("", "; ".join(r["errors"])))
    w("\nreq/s, latency and CPU: the round with the median rate; x postgr: the median\n"
      "of the rounds' own ratios to postgrey (same scenario, same K, same round);\n"
      "cpu us: greylist's (or postgrey's) CPU per request; redis us: the Redis\n"
      "server's; RT/req: Redis round trips per request (the server's reply writes,\n"
      "INFO total_writes_processed); cmd/req: Redis commands per request\n"
      "(commandstats); fail: answers of greylist_failure_action (a Redis call that\n"
      "failed or took longer than greylist_redis_timeout); wrong: the oracle's.\n")
    stored = [r for r in report["rows"] if r.get("redis")]
    if stored:
        w("\nRedis commands per request (timed phase):\n")
        for r in stored:
            w("  %s\n" % bench.describe_redis(r))
            warned = r["redis"].get("log_warnings") or {}
            if warned.get("count"):
                w("    redis-server log: %d warnings, e.g. %s\n"
                  % (warned["count"], "; ".join(warned["examples"])))
    w("\ntargets:\n")
    for t in report["targets"]:
        met = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
        w("  %-6s %-64s %s (goal %s)\n" % (met, t["target"], t["measured"], t["goal"]))
        if t.get("note"):
            w("         %s\n" % t["note"])


def failures(report: dict) -> list:
    bad = []
    for r in report["rows"]:
        if r["program"] not in bench.OURS:
            continue
        what = "%s %s K=%d %s" % (r["scenario"], r["program"], r["processes"],
                                  r.get("store"))
        if not r.get("available", True):
            bad.append("%s: not available: %s" % (what, r.get("reason")))
        elif not r.get("rate") or r.get("errors"):
            bad.append("%s: failed: %s" % (what, r.get("errors")))
        elif r.get("wrong") or r.get("malformed") or any(r.get("exit_codes") or []) \
                or r.get("store_failures"):
            bad.append("%s: %s wrong, %s malformed, exits %s, %s failure-action answers"
                       % (what, r.get("wrong"), r.get("malformed"), r.get("exit_codes"),
                          r.get("store_failures")))
    return bad


def main(argv: list | None = None) -> int:
    args = parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    out = sys.stderr if args.json == "-" else sys.stdout
    report = measure(args, out)
    report["failures"] = failures(report)
    print_report(report, out)
    if args.json:
        text = json.dumps(report, indent=1, sort_keys=True, default=str)
        if args.json == "-":
            sys.stdout.write(text + "\n")
        else:
            with open(args.json, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
    if report["failures"]:
        out.write("\nfailures:\n" + "".join("  %s\n" % f for f in report["failures"]))
        if args.check:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
