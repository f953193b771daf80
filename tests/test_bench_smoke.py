"""Smoke test of the benchmark harness in bench/ (issue 5).

Not a performance test: it runs a tiny seeded comparison of greylist and
the DUNNO responder through the real transport (pipes, one request in
flight per process) and checks that the harness works and that its
machine-readable report is well formed. No peer needs to be installed.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "bench", "run.py")

RUN_FIELDS = ("scenario", "processes", "program", "requests", "replies", "rate",
              "p50_ms", "p99_ms", "p999_ms", "max_ms", "peak_rss_kb", "passes",
              "defers", "other", "malformed", "wrong", "early_passes")


def test_bench_smoke_run_reports_well_formed_json(tmp_path):
    report_path = tmp_path / "report.json"
    argv = [sys.executable, RUN, "--scenario", "repeat,new,mixed", "--processes", "1,2",
            "--requests", "40", "--warm", "12", "--delay", "1", "--seed", "7",
            "--programs", "greylist,dunno", "--python", sys.executable,
            "--ours-path", ROOT, "--tmpdir", str(tmp_path), "--limit", "60",
            "--json", str(report_path), "--check"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "greylist's rate as a multiple" in done.stdout

    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["seed"] == 7 and report["delay_s"] == 1
    assert report["machine"]["nproc"] >= 1
    assert report["versions"]["greylist"]
    runs = report["runs"]
    assert {(r["scenario"], r["processes"], r["program"]) for r in runs} == {
        (s, k, p) for s in ("repeat", "new", "mixed") for k in (1, 2)
        for p in ("greylist", "dunno")}
    for run in runs:
        missing = [f for f in RUN_FIELDS if f not in run]
        assert not missing, (run, missing)
        assert run["available"] and not run.get("errors"), run
        assert run["requests"] == run["replies"] > 0
        assert run["passes"] + run["defers"] + run["other"] + run["malformed"] \
            == run["replies"]
        assert run["malformed"] == 0 and run["other"] == 0
        assert run["rate"] > 0 and run["peak_rss_kb"] > 0
        assert 0 < run["p50_ms"] <= run["p99_ms"] <= run["p999_ms"] <= run["max_ms"]
        if run["program"] == "dunno":
            assert run["passes"] == run["replies"] and run["wrong"] is None
            continue
        assert run["wrong"] == 0, run
        if run["scenario"] == "repeat":
            assert run["passes"] == run["replies"], run
        if run["scenario"] == "new":
            assert run["defers"] == run["replies"] and run["early_passes"] == 0, run
        if run["scenario"] == "mixed":
            assert run["defers"] > 0 and run["passes"] > 0, run

    ratios = {(r["scenario"], r["processes"]): r for r in report["ratios"]}
    assert set(ratios) == {(s, k) for s in ("repeat", "new", "mixed") for k in (1, 2)}
    assert all(r["dunno"] > 0 and r["postgrey"] is None for r in ratios.values())
    for target in report["targets"]:
        assert set(target) >= {"target", "measured", "goal", "met"}
        assert target["met"] in (True, False, None)


def test_storage_floor_measures_commits_and_flushes(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import storage
    finally:
        sys.path.pop(0)
    floor = storage.measure(sys.executable, ROOT, str(tmp_path), commits=20, prefill=200)
    assert floor.get("available", True), floor
    assert 0 < floor["commit_p50_us"] <= floor["commit_p99_us"]
    assert 0 < floor["fdatasync_p50_us"] <= floor["fdatasync_p99_us"]
    assert floor["commit_ceiling_per_s"] == round(1e6 / floor["commit_p50_us"])
    assert "durable commit into 200 keys" in storage.describe(floor)
    assert os.listdir(tmp_path) == []  # Its work directory is removed.


def test_bench_startup_runs_one_request_per_process(tmp_path):
    # bench/startup.py with two runs of each: greylist, the DUNNO responder
    # and the floor always; greylist.pl where it is installed.
    report_path, work = tmp_path / "startup.json", tmp_path / "work"
    work.mkdir()
    argv = [sys.executable, os.path.join(ROOT, "bench", "startup.py"), "--runs", "2",
            "--python", sys.executable, "--ours-path", ROOT, "--tmpdir", str(work),
            "--timeout", "5", "--limit", "30", "--json", str(report_path), "--check"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "greylist CPU <= 1.3x greylist.pl CPU" in done.stdout

    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["rounds"] == 2
    # The checkout's greylist, through PYTHONPATH, was the one measured.
    assert report["python"]["greylist"] == os.path.join(ROOT, "greylist")
    rows = {(r["kind"], r["program"]): r for r in report["rows"]}
    assert set(rows) == {(k, p) for k in ("known", "new")
                         for p in ("greylist", "greylist.pl", "dunno", "floor")}
    for (kind, program), row in rows.items():
        if program == "greylist.pl" and not row["available"]:
            continue  # No postfix-doc or DB_File: reported, never made up.
        assert row["available"] and row["runs"] == row["ok"] == 2, row
        assert row["failures"] == 0, row
        assert 0 < row["cpu_ms_median"] <= row["cpu_ms_p90"], row
        assert row["wall_ms_median"] > 0, row
        assert 0 < row["rss_mb_median"] <= row["rss_mb_max"], row
    assert rows["known", "greylist"]["reply"] == "action=DUNNO"
    assert rows["new", "greylist"]["reply"].startswith("action=DEFER_IF_PERMIT ")
    assert rows["known", "dunno"]["reply"] == "action=DUNNO"
    assert rows["known", "floor"]["reply"] == ""
    ratios = {r["kind"]: r for r in report["ratios"]}
    assert set(ratios) == {"known", "new"}
    assert all(r["cpu_x_floor"] > 0 and r["greylist_rss_mb_max"] > 0
               for r in ratios.values())
    assert len(report["targets"]) == 3  # CPU for each kind, peak RSS.
    assert all(t["met"] in (True, False, None) for t in report["targets"])
    assert os.listdir(work) == []  # Work directories removed.


def test_hotpath_stages_name_functions_that_exist():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import hotpath
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    resolved = dict(hotpath.resolve_stages())
    assert set(resolved) == {stage for stage, _ in hotpath.STAGES}
    assert all(resolved.values())
    # A stage whose function is gone is an error, not a silent 0.
    saved = hotpath.STAGES
    hotpath.STAGES = (("parse", ("greylist.transports.spawn:Reader.gone",)),)
    try:
        with pytest.raises(LookupError, match="Reader.gone"):
            hotpath.resolve_stages()
    finally:
        hotpath.STAGES = saved


def test_mapped_rss_finds_every_key_it_looks_up():
    # bench/mapped_rss.py on a small database: every lookup must find its
    # passed triple (keys as greylist stores them), in both readahead modes;
    # a wrong key form would measure misses and still print a figure.
    argv = [sys.executable, os.path.join(ROOT, "bench", "mapped_rss.py"),
            "--size", "10k", "--lookups", "300"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "lookups (" in line]
    assert [line.split()[1] for line in lines] == ["on", "off"]
    assert all("300 lookups (300 found)" in line for line in lines), proc.stdout


def test_bench_daemon_run_reports_group_commits_durability_and_rss(tmp_path):
    # greylistd (one daemon, K connections on a unix socket) and the DUNNO
    # responder, the durability audit under strace (where installed) and
    # the RSS run on a small database with 20 open connections.
    report_path = tmp_path / "daemon.json"
    argv = [sys.executable, RUN, "--programs", "greylistd,dunno", "--scenario", "new,mixed",
            "--processes", "4", "--requests", "60", "--warm", "12", "--delay", "1",
            "--seed", "7", "--python", sys.executable, "--ours-path", ROOT,
            "--tmpdir", str(tmp_path), "--limit", "30", "--durability",
            "--durability-requests", "40", "--durability-connections", "4",
            "--daemon-rss", "2000", "--daemon-rss-connections", "20",
            "--daemon-rss-rounds", "5", "--json", str(report_path), "--check"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "targets (issue 11, greylistd)" in done.stdout
    assert "group commit (greylistd's metrics" in done.stdout

    report = json.loads(report_path.read_text(encoding="utf-8"))
    runs = {(r["scenario"], r["program"]): r for r in report["runs"]}
    assert set(runs) == {(s, p) for s in ("new", "mixed") for p in ("greylistd", "dunno")}
    for (scenario, program), run in runs.items():
        missing = [f for f in RUN_FIELDS if f not in run]
        assert not missing, (run, missing)
        assert run["available"] and not run.get("errors"), run
        assert run["processes"] == 4 and run["requests"] == run["replies"] > 0, run
        assert run["malformed"] == 0 and run["other"] == 0, run
        assert 0 < run["p50_ms"] <= run["p99_ms"] <= run["max_ms"], run
        if program == "dunno":
            assert "commit_batch" not in run
            continue
        assert run["wrong"] == 0 and run["exit_codes"] == [0], run
        batch = run["commit_batch"]
        # Every plan that writes is in exactly one commit of the timed phase;
        # each commit holds 1 to K plans (one request in flight per connection).
        assert 1 <= batch["count"] <= batch["sum"] <= 4 * batch["count"], batch
        assert batch["buckets"]["+Inf"] == batch["count"], batch
        assert batch["buckets"]["4.0"] == batch["count"], batch
        assert run["commit_seconds"]["count"] == batch["count"], run
        if scenario == "new":
            assert batch["sum"] == run["defers"] == run["replies"], run
        else:
            assert run["defers"] > 0 and run["passes"] > 0, run
    ratios = {(r["scenario"], r["program"]): r for r in report["ratios"]}
    assert set(ratios) == {("new", "greylistd"), ("mixed", "greylistd")}
    assert all(r["dunno"] > 0 and r["postgrey"] is None for r in ratios.values())

    import shutil
    dur = {d["program"]: d for d in report["durability"]}
    assert set(dur) == {"greylistd"} and dur["greylistd"]["processes"] == 4
    d = dur["greylistd"]
    assert d["requests"] == d["defers"] == 40 and not d["errors"], d
    if shutil.which("strace"):
        assert d["defer_replies_traced"] == d["preceded_by_sync"] == 40, d
        assert 1 <= d["commits_traced"] == d["database_syncs"] == d["meta_writes"] <= 40, d
        assert d["commits_metrics"] == d["commits_traced"], d

    rss = report["daemon_rss"]
    assert rss["triples"] == rss["entries"] == 2000 and rss["connections"] == 20, rss
    assert not rss.get("errors") and rss["exit_codes"] == [0], rss
    assert rss["requests"] == 100 and rss["wrong"] == 0 and rss["malformed"] == 0, rss
    assert rss["passes"] == 80 and rss["defers"] == 20, rss
    assert rss["connections_gauge"] == 20 and rss["commit_batch"]["sum"] == 20, rss
    assert 0 < rss["rss_anon_kb"] <= rss["vmrss_kb"] <= rss["vmhwm_kb"], rss

    targets = [t for t in report["targets"] if t["issue"] == 11]
    names = [t["target"] for t in targets]
    assert "new, 16 connections: greylistd x postgrey" in names, names
    assert any(n.startswith("RSS of one greylistd, 2k triples, 20 connections")
               for n in names), names
    assert all(t["met"] in (True, False, None) for t in targets)
    wrong = next(t for t in targets if t["target"].startswith("greylistd: wrong answers"))
    assert wrong["met"] is True and wrong["measured"] == 0
    assert os.listdir(tmp_path) == ["daemon.json"]  # Work directories removed.


def test_bench_daemon_durability_audit_finds_a_reply_before_its_commit():
    # The audit of greylistd's trace must be able to fail: a reply written
    # before the commit's meta page write ended is not durable.
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import run as bench_run
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    fds = {9: "/w/greylist.lmdb", 11: "/w/greylist.lmdb", 13: "/w/greylist.log"}
    reply = 'sendto(15, "action=DEFER_IF_PERMIT Greylisted\\n\\n", 34, 0, NULL, 0) = 34\n'
    head = ['1 t recvfrom(15, "request=smtpd_access_policy\\n\\n", 262144, 0, NULL, NULL) = 29\n',
            '2 t pwrite64(9, "\\2\\0", 4096, 8192) = 4096\n',
            '2 t fdatasync(9)      = 0\n']
    good = head + ['2 t pwrite64(11, "\\0\\0", 120, 4128 <unfinished ...>\n',
                   '1 t write(13, "Dec  1 x: action=DEFER_IF_PERMIT reason=new\\n", 44) = 44\n',
                   '2 t <... pwrite64 resumed>) = 120\n', '1 t ' + reply]
    early = head + ['2 t pwrite64(11, "\\0\\0", 120, 4128 <unfinished ...>\n', '1 t ' + reply,
                    '2 t <... pwrite64 resumed>) = 120\n']
    stale = ['2 t fdatasync(9)      = 0\n', '2 t pwrite64(11, "\\0", 120, 4128) = 120\n',
             head[0], '1 t ' + reply]
    ok = bench_run._audit_daemon(good, fds)
    assert ok["defer_replies_traced"] == ok["preceded_by_sync"] == 1, ok
    assert ok["database_syncs"] == ok["meta_writes"] == ok["commits_traced"] == 1, ok
    assert ok["replies_traced"] == 1  # The log line is not a reply.
    for lines in (early, stale):
        bad = bench_run._audit_daemon(lines, fds)
        assert bad["defer_replies_traced"] == 1 and bad["preceded_by_sync"] == 0, bad


def test_bench_socketmap_quick_run_checks_known_lookups_write_nothing(tmp_path):
    # bench/socketmap.py --quick: greylist-socketmap (spawn form), greylistd
    # with 1 and 16 connections, and the NOTFOUND responder in both forms.
    report_path, work = tmp_path / "socketmap.json", tmp_path / "work"
    work.mkdir()
    argv = [sys.executable, os.path.join(ROOT, "bench", "socketmap.py"), "--quick",
            "--python", sys.executable, "--ours-path", ROOT, "--tmpdir", str(work),
            "--json", str(report_path), "--check"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no-write check" in done.stdout

    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["failures"] == []
    rows = {(r["kind"], r["program"], r["connections"]): r for r in report["rows"]}
    assert set(rows) == {(kind, p, k) for kind in ("known", "new") for p, k in (
        ("greylist-socketmap", 1), ("notfound", 1), ("greylistd", 1), ("greylistd", 16),
        ("notfound-asyncio", 1), ("notfound-asyncio", 16))}
    for (kind, program, k), row in rows.items():
        assert row["available"] and not row.get("errors"), row
        assert row["replies"] == row["lookups"] == row["rcpt_lookups"] + k, row
        assert row["malformed"] == 0 and row["rate"] > 0, row
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"], row
        assert row["exit_codes"] == [0], row
        if program.startswith("notfound"):
            continue
        if kind == "known":
            assert row["no_write"] is True and row["prelearned_all"] is True, row
            assert row["commits"] == {"database": 0, "table": 0}, row
        else:
            assert row["learned_all"] is True, row
            assert row["entries_added"] == {"database": row["rcpt_lookups"],
                                            "table": row["rcpt_lookups"]}, row
            # Two durable writes each; one connection cannot share commits.
            assert 0 < row["commits_per_lookup"] <= 2.0, row
            if k == 1:
                assert row["commits_per_lookup"] == 2.0, row
    assert os.listdir(work) == []  # Work directories removed.

    # The check can fail: a write during the known phase is reported.
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import socketmap
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    wrote = dict(rows["known", "greylistd", 16], no_write=False,
                 commits={"database": 1, "table": 0})
    assert socketmap.failures([wrote]) == [
        "round 1 known greylistd K=16: the known phase wrote (commits "
        "{'database': 1, 'table': 0})"]


def test_bench_postscreen_quick_run_checks_replies_and_no_write(tmp_path):
    # bench/postscreen.py --quick: greylist-postscreen (spawn form), greylistd
    # with 1 and 16 connections, and the ignore responder in both forms.
    report_path, work = tmp_path / "postscreen.json", tmp_path / "work"
    work.mkdir()
    argv = [sys.executable, os.path.join(ROOT, "bench", "postscreen.py"), "--quick",
            "--python", sys.executable, "--ours-path", ROOT, "--tmpdir", str(work),
            "--json", str(report_path), "--check"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no-write check" in done.stdout

    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["failures"] == []
    rows = {(r["kind"], r["program"], r["connections"]): r for r in report["rows"]}
    assert set(rows) == {(kind, p, k) for kind in ("known", "unknown") for p, k in (
        ("greylist-postscreen", 1), ("ignore", 1), ("greylistd", 1), ("greylistd", 16),
        ("ignore-asyncio", 1), ("ignore-asyncio", 16))}
    for (kind, program, k), row in rows.items():
        assert row["available"] and not row.get("errors"), row
        assert row["replies"] == row["requests"] > 0 and row["wrong"] == 0, row
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"], row
        assert row["exit_codes"] == [0], row
        if program.startswith("ignore"):
            continue
        assert row["no_write"] is True and row["changed"] == {}, row
        assert row["reasons_match"] is True, row
        logged = row["reasons_logged"]
        assert logged["manual-client"] > 0 and logged["awl-client"] > 0, row
        assert logged["unproven"] >= row["requests"], row
    assert {t["connections"] for t in report["targets"]} == {1, 16}
    assert os.listdir(work) == []  # Work directories removed.

    # The check can fail: a write, a wrong reply and wrong reasons are reported.
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import postscreen
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    row = rows["known", "greylistd", 16]
    before = {"greylist.lmdb": [2, 31]}
    wrote = dict(row, **postscreen.compare_state(before, {"greylist.lmdb": [3, 31]}))
    assert wrote["no_write"] is False
    assert postscreen.failures([wrote]) == [
        "round 1 known greylistd K=16: the database was written: changed "
        "{'greylist.lmdb': [[2, 31], [3, 31]]}, created {}"]
    created = postscreen.compare_state(before, {"greylist.lmdb": [2, 31], "x.lmdb": [1, 1],
                                                "greylist.cleanup": None})
    assert created["no_write"] is False and created["created"] == {
        "x.lmdb": [1, 1], "greylist.cleanup": None}
    assert postscreen.compare_state(before, {"greylist.lmdb": [2, 31],
                                             "y.lmdb": [0, 0]})["no_write"] is True
    bad = dict(row, wrong=2, wrong_examples=["x"], reasons_match=False)
    assert postscreen.failures([bad]) == [
        "round 1 known greylistd K=16: 2 wrong replies (x)",
        "round 1 known greylistd K=16: reasons logged %s, expected %s"
        % (row["reasons_logged"], row["reasons_expected"])]


SLOW_RESPONDER = """
import os, sys, time
buf = b""
while True:
    chunk = os.read(0, 4096)
    if not chunk:
        break
    buf += chunk
    while b"\\n\\n" in buf:
        _, buf = buf.split(b"\\n\\n", 1)
        time.sleep(float(sys.argv[1]))
        os.write(1, b"action=ignore\\n\\n")
"""


def _paced_phase(pace, server_s, n):
    """bench/postscreen.py's drivers at a pace against a responder that
    takes server_s a reply, after one request that waits for its start-up:
    (latencies in seconds, elapsed seconds)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import postscreen
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RESPONDER, str(server_s)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
    try:
        request = postscreen.request("192.0.2.7", 4000)
        endpoint = ("pipe", proc.stdin.fileno(), proc.stdout.fileno())
        postscreen.run_phase([endpoint], [([request], [postscreen.IGNORE])], 30, proc.kill)
        (res,) = postscreen.run_phase([endpoint], [([request] * n, [postscreen.IGNORE] * n)],
                                      30, proc.kill, pace=pace)
    finally:
        proc.stdin.close()
        proc.wait(10)
        proc.stdout.close()
    assert not res["error"] and res["wrong"] == 0 and len(res["recv"]) == n, res
    lat = [(b - a) / 1e9 for a, b in zip(res["send"], res["recv"])]
    return lat, (res["recv"][-1] - res["send"][0]) / 1e9


def test_bench_postscreen_pace_keeps_the_schedule_and_charges_a_late_server():
    # --pace: requests leave on a fixed schedule (not faster), latency is
    # counted from the write when the server kept up...
    lat, elapsed = _paced_phase(pace=200, server_s=0, n=21)
    assert elapsed >= 20 / 200 * 0.95, elapsed
    assert sorted(lat)[len(lat) // 2] < 0.004, lat
    # ...and from the due time when a slow reply held the next request
    # back: a server taking 20 ms against a 5 ms schedule falls 15 ms
    # further behind with each request, and the latencies show it (a
    # closed loop would report 20 ms each).
    lat, _ = _paced_phase(pace=200, server_s=0.02, n=11)
    assert lat[0] < 0.04 and lat[-1] > 0.02 + 9 * 0.015 * 0.8, lat


def test_bench_redis_quick_run_counts_round_trips(tmp_path):
    # bench/redis_bench.py --quick: greylist (spawn form, 1 process) and
    # greylistd (16 connections) on a redis-server of their own, known and
    # new triples, with the Redis commands and round trips of each.
    import shutil
    if shutil.which("redis-server") is None:
        from tests.conftest import require
        require("redis-server is not installed (Debian: redis-server)")
    report_path, work = tmp_path / "redis.json", tmp_path / "work"
    work.mkdir()
    argv = [sys.executable, os.path.join(ROOT, "bench", "redis_bench.py"), "--quick",
            "--no-postgrey", "--python", sys.executable, "--ours-path", ROOT,
            "--tmpdir", str(work), "--json", str(report_path), "--check"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Redis commands per request" in done.stdout

    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["failures"] == [] and report["stores"] == ["redis"]
    rows = {(r["kind"], r["program"], r["processes"]): r for r in report["rows"]}
    assert set(rows) == {(kind, p, k) for kind in ("known", "new")
                         for p, k in (("greylist", 1), ("greylistd", 16))}
    for (kind, program, k), row in rows.items():
        missing = [f for f in RUN_FIELDS if f not in row]
        assert not missing, (row, missing)
        assert row["available"] and not row.get("errors"), row
        assert row["store"] == "redis" and row["store_failures"] == 0, row
        assert row["wrong"] == 0 and row["malformed"] == 0 and row["exit_codes"] == [0] * (
            1 if program == "greylistd" else k), row
        redis = row["redis"]
        n = row["replies"]
        assert redis["requests"] == n == 300, row
        if kind == "known":
            # A known triple is one MGET and writes nothing.
            assert row["passes"] == n and redis["calls"] == {"mget": n}, redis
            if program == "greylist":
                assert redis["round_trips"] == n, redis
            else:
                # The store thread pipelines a turn's reads.
                assert 0 < redis["round_trips"] <= n, redis
        else:
            # New triples are deferred; a later recipient of a message whose
            # recipients came more than the delay apart (a loaded machine)
            # may pass as sender-retry, by design, which the oracle allows.
            assert set(row["actions"]) <= {"DEFER_IF_PERMIT", "DUNNO"}, row
            assert row["defers"] + row["passes"] == n and row["defers"] >= n * 0.8, row
            calls = redis["calls"]
            # No WATCH: the writes are one compare-and-set script each
            # (loaded once by EVAL on this new server).
            assert "watch" not in calls and "exec" not in calls, calls
            if program == "greylist":
                # Read; then the script for each request that writes, every
                # defer among them; and the set-up of the process's one
                # connection (HELLO, CLIENT SETINFO), the script's loading.
                assert row["defers"] <= calls["evalsha"] <= n, calls
                assert 2 * row["defers"] <= redis["round_trips"] <= 2 * n + 8, redis
            else:
                assert 0 < calls["evalsha"] <= n and redis["round_trips"] <= 2 * n, redis
        assert redis["round_trips_from_commands_per_request"] >= \
            redis["round_trips_per_request"] - 0.02, redis
    assert os.listdir(work) == []  # Work directories removed, servers stopped.
