"""Requests per second through one greylist process's stdin/stdout loop.

Usage: python bench/stdio_rate.py [N] [DIR]

One request in flight at a time, as smtpd sends them. Three passes over
N distinct triples on a fresh database with greylist_delay 0:
  new     every triple unseen: a durable write transaction each (fsync)
  passed  second sight: marked passed, a write transaction each
  known   third sight: a read under a shared lock only
"""

import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def requests(n: int) -> list[bytes]:
    return [(b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
             b"client_address=198.51.%d.%d\nclient_name=unknown\nhelo_name=h%d.example\n"
             b"sender=s%d@example.org\nrecipient=r%d@example.net\n"
             b"instance=%x.0\n\n") % (i // 250 % 250, i % 250, i, i, i, i) for i in range(n)]


def run_pass(database: str, batch: list[bytes]) -> tuple[float, dict[str, int]]:
    env = dict(os.environ, PYTHONPATH=ROOT)
    settings = database + ".cf"
    with open(settings, "w", encoding="utf-8") as handle:
        handle.write("greylist_log = %s.log\n" % database)
        if os.geteuid() == 0:
            handle.write("greylist_allow_root = yes\n")
    proc = subprocess.Popen([sys.executable, "-m", "greylist", "-c", settings, "-d",
                             database, "--delay", "0"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)
    actions: dict[str, int] = {}
    start = time.perf_counter()
    for request in batch:
        proc.stdin.write(request)
        proc.stdin.flush()
        reply = proc.stdout.readline()
        proc.stdout.readline()
        word = reply.split(b"=", 1)[1].split()[0].decode()
        actions[word] = actions.get(word, 0) + 1
    elapsed = time.perf_counter() - start
    proc.stdin.close()
    proc.wait(timeout=30)
    return len(batch) / elapsed, actions


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    directory = sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(dir=ROOT)
    os.chmod(directory, 0o755)
    database = os.path.join(directory, "bench")
    batch = requests(n)
    for name in ("new", "passed", "known"):
        rate, actions = run_pass(database, batch)
        print("%-7s %6d requests  %8.0f requests/s  %s" % (name, n, rate, actions))
    for suffix in (".lmdb", ".cf", ".log"):
        os.unlink(database + suffix)


if __name__ == "__main__":
    main()
