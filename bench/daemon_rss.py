"""Memory of one greylistd: a large database and many open connections.

Usage (through run.py):
  python bench/run.py --programs greylistd --scenario new --processes 1 \
                      --daemon-rss 1M [--daemon-rss-connections 200]

DESCRIPTION
    measure() builds a database of SIZE triples with greylist's own API
    (bench/scale.py: build()), starts ONE greylistd on it (peers.Daemon,
    unix socket, metrics on loopback) and opens CONNECTIONS connections
    from this process, all kept open. Then ROUNDS rounds: a request is
    written on every connection before any reply is read, so every
    connection has a request in flight at once (a burst of CONNECTIONS
    concurrent requests, as many smtpd processes would send); then every
    reply is read. Each round's requests are for recent, passed triples
    of the database (they must pass) except every fifth round, whose
    requests are new triples from streams.py (they must be deferred, and
    are committed in groups). With all the connections still open it
    reads greylistd's /proc/PID/status (VmRSS, VmHWM, RssAnon, RssFile)
    and its connections gauge; then closes them, reads VmRSS again and
    stops the daemon by its PID. VmHWM is the peak of the whole life of
    the process; RssFile counts the pages of the mapped database that
    the lookups touched (shared page cache, not the process's own).

DIAGNOSTICS
    errors lists connections that failed or replies that did not come;
    wrong counts known triples deferred and new ones passed; malformed
    counts replies that are not "action=...\\n\\n". connect_eagain counts
    the non-blocking connects that the daemon's listen queue refused
    (EAGAIN, which smtpd would take as a failed policy lookup); the
    harness then connects again, blocking.
"""

import os
import shutil
import socket
import tempfile
import time

import driver
import peers
import scale
import streams

NEW_EVERY = 5          # every fifth round sends new triples


def parse_size(text: str) -> int:
    text = text.strip().lower()
    mult = {"k": 1000, "m": 1000000}.get(text[-1:], 1)
    return int(float(text.rstrip("km")) * mult)


def size_name(n: int) -> str:
    return scale._size(n) if n >= 1000 else str(n)


def measure(args, top: str, out) -> dict:
    size = parse_size(args.daemon_rss)
    n, rounds = args.daemon_rss_connections, max(1, args.daemon_rss_rounds)
    res: dict = {"triples": size, "connections": n, "rounds": rounds}
    prog = peers.Daemon(args.python, args.ours_path, commit_batch=args.commit_batch)
    ok, why = prog.available()
    if not ok:
        res.update(available=False, reason=why)
        return res
    workdir = tempfile.mkdtemp(prefix="daemon-rss-", dir=top)
    os.chmod(workdir, 0o755)
    socks: list = []
    try:
        out.write("daemon RSS: building %d triples\n" % size)
        out.flush()
        api = scale._Api(args.ours_path)
        name = os.path.join(workdir, "greylist")
        facts = scale.build(api, name, size, args.seed, out if size >= 1000000 else None)
        fresh = facts.pop("fresh")
        res.update(entries=facts["entries"], file_bytes=facts["file_bytes"],
                   build_s=round(facts["generate_s"] + facts["load_s"], 1))
        prog.existing_database = name
        prog.start(workdir, 0, args.delay)
        pid = prog.pids()[0]
        time.sleep(0.5)
        res["started"] = _status(pid)
        plan = _plan(fresh, n, rounds, args.seed)
        # Connect as smtpd does, without blocking; a connection the
        # listen queue refuses (EAGAIN) is counted, then made blocking.
        res["connect_eagain"] = 0
        for _ in range(n):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setblocking(False)
            try:
                sock.connect(prog.socket_path)
            except BlockingIOError:
                res["connect_eagain"] += 1
                sock.setblocking(True)
                sock.connect(prog.socket_path)
            sock.settimeout(args.limit)
        counts = {"requests": 0, "passes": 0, "defers": 0, "wrong": 0, "malformed": 0}
        errors: list = []
        t0 = time.monotonic()
        for kind, requests in plan:
            for sock, request in zip(socks, requests):
                sock.sendall(request)
            for sock in socks:
                try:
                    reply = _reply(sock)
                except OSError as exc:
                    errors.append("%s: %s" % (type(exc).__name__, exc))
                    continue
                code, _ = driver.classify(reply)
                counts["requests"] += 1
                if code == driver.MALFORMED or code == driver.OTHER:
                    counts["malformed"] += 1
                elif code == driver.PASS:
                    counts["passes"] += 1
                    counts["wrong"] += kind == "new"
                else:
                    counts["defers"] += 1
                    counts["wrong"] += kind == "known"
        res["serve_s"] = round(time.monotonic() - t0, 2)
        res.update(counts)
        status = _status(pid)
        res.update(vmrss_kb=status.get("VmRSS", 0), vmhwm_kb=status.get("VmHWM", 0),
                   rss_anon_kb=status.get("RssAnon", 0), rss_file_kb=status.get("RssFile", 0))
        metrics = prog.scrape()
        if metrics is not None:
            res["commit_batch"] = metrics["batch"]
            res["commit_seconds"] = metrics["seconds"]
        try:
            text = peers.http_get("127.0.0.1", prog.metrics_port, "/metrics")
            res["connections_gauge"] = peers.parse_counter(text, "greylist_connections")
        except OSError as exc:
            errors.append("metrics: %s" % exc)
        for sock in socks:
            sock.close()
        socks = []
        time.sleep(0.5)
        res["after_close"] = _status(pid)
        res["exit_codes"] = prog.stop()
        if any(res["exit_codes"]):
            errors.append("greylistd exited with %s" % res["exit_codes"])
        if res.get("connections_gauge") not in (None, float(n)):
            errors.append("greylistd counted %s open connections, not %d"
                          % (res["connections_gauge"], n))
        if errors:
            res["errors"] = sorted(set(errors))[:5]
    except Exception as exc:  # Reported, not fatal, as a peer's failure is.
        res.setdefault("errors", []).append("%s: %s" % (type(exc).__name__, exc))
    finally:
        for sock in socks:
            sock.close()
        prog.kill()
        prog.procs = []
        shutil.rmtree(workdir, ignore_errors=True)
    return res


def _plan(fresh: list, n: int, rounds: int, seed: int) -> list:
    """[(kind, [request bytes per connection])] for each round."""
    new_rounds = [r for r in range(rounds) if r % NEW_EVERY == NEW_EVERY - 1]
    news = iter([b for _, b in streams.build_plan(
        "new", max(1, len(new_rounds)) * n, seed + 12, 1).timed[0]])
    plan = []
    for r in range(rounds):
        if r in new_rounds:
            plan.append(("new", [next(news) for _ in range(n)]))
        else:
            plan.append(("known", [b for _, b in scale._requests(fresh, n, seed + 13 + r)]))
    return plan


def _reply(sock: socket.socket) -> bytes:
    reply = sock.recv(65536)
    while reply[-2:] != b"\n\n":
        chunk = sock.recv(65536)
        if not chunk:
            break
        reply += chunk
    return reply


def _status(pid: int) -> dict:
    out = {}
    try:
        with open("/proc/%d/status" % pid, encoding="ascii") as handle:
            for line in handle:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                    out[key] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return out


def describe(res: dict) -> str:
    if not res.get("available", True):
        return "daemon RSS: not available: %s\n" % res.get("reason", "")
    if not res.get("vmhwm_kb"):
        return "daemon RSS: failed: %s\n" % "; ".join(res.get("errors", []))
    start, after = res.get("started", {}), res.get("after_close", {})
    batch = res.get("commit_batch") or {}
    text = ("daemon RSS: one greylistd, %d triples (%.1f MB file), %d connections open, "
            "%d rounds (%d requests: %d passes, %d defers, %d wrong, %d malformed, %.1f s); "
            "%d of %d non-blocking connects refused (EAGAIN)\n"
            "  with the connections open: VmRSS %.1f MB, VmHWM %.1f MB, anonymous %.1f MB, "
            "file %.1f MB\n"
            "  after start: VmRSS %.1f MB (anonymous %.1f); after closing them: VmRSS %.1f MB"
            " (anonymous %.1f)\n"
            % (res["triples"], res.get("file_bytes", 0) / 2 ** 20, res["connections"],
               res["rounds"], res.get("requests", 0), res.get("passes", 0),
               res.get("defers", 0), res.get("wrong", 0), res.get("malformed", 0),
               res.get("serve_s", 0), res.get("connect_eagain", 0), res["connections"],
               res["vmrss_kb"] / 1024, res["vmhwm_kb"] / 1024,
               res["rss_anon_kb"] / 1024, res["rss_file_kb"] / 1024,
               start.get("VmRSS", 0) / 1024, start.get("RssAnon", 0) / 1024,
               after.get("VmRSS", 0) / 1024, after.get("RssAnon", 0) / 1024))
    if batch.get("count"):
        text += "  group commits: %d, %.1f plans each on average\n" % (
            batch["count"], batch["sum"] / batch["count"])
    if res.get("errors"):
        text += "  errors: %s\n" % "; ".join(res["errors"])
    return text
