"""Quick-start demonstration: python -m greylist.demo.

DESCRIPTION
    Runs the real greylist program twice on an embedded sample RCPT
    request, with the database demo-greylist.lmdb and the log file
    demo-greylist.log in the current directory and a 2-second delay: the
    first attempt is deferred, the retry after the delay passes. Prints
    each exchange and the log lines. Exits 0 if both answers are right.
"""

import os
import subprocess
import sys
import time

SAMPLE = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
          b"client_address=192.0.2.10\nclient_name=mail.example.org\n"
          b"helo_name=mail.example.org\nsender=alice@example.org\n"
          b"recipient=bob@example.net\ninstance=3f2a.6571b0d4.9c1e2.0\n\n")
DELAY_S = 2


def main() -> int:
    """Run the demonstration; return the exit status."""
    base = os.path.abspath("demo-greylist")
    for leftover in (base + ".lmdb", base + ".log"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    with open(base + ".cf", "w", encoding="utf-8") as handle:
        handle.write("greylist_database = %s\ngreylist_log = %s.log\n" % (base, base))
        if os.geteuid() == 0:
            # greylist refuses root unless told otherwise: fine for a demo.
            print("running as root: the demo sets greylist_allow_root = yes\n")
            handle.write("greylist_allow_root = yes\n")
    command = [sys.executable, "-m", "greylist", "-c", base + ".cf", "--delay",
               "%ds" % DELAY_S]
    print("request (stdin of %s):\n%s" % (" ".join(command[1:]), SAMPLE.decode()))
    first = _ask(command)
    print("waiting %d seconds (greylist_delay)...\n" % DELAY_S)
    time.sleep(DELAY_S + 0.2)
    second = _ask(command)
    with open(base + ".log", encoding="utf-8") as handle:
        print("log (%s.log):\n%s" % (base, handle.read()))
    ok = first.startswith("action=DEFER_IF_PERMIT") and second == "action=DUNNO"
    # greylistctl dump, as README says for a live database; postmap -s
    # reads this one safely only because no process writes it any more.
    print("database: %s.lmdb (list it with: %s -m greylist.cli.greylistctl -c %s.cf dump; "
          "Postfix reads it too: postmap -s lmdb:%s)" % (base, sys.executable, base, base))
    print("demo %s" % ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def _ask(command: list[str]) -> str:
    done = subprocess.run(command, input=SAMPLE, capture_output=True, timeout=30)
    reply = done.stdout.decode().strip()
    print("reply: %s\n" % reply)
    return reply


if __name__ == "__main__":
    sys.exit(main())
