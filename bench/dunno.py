"""A policy server that answers every request DUNNO: the harness's ceiling.

It reads requests the way a Python policy server must (line by line until
the empty line) and writes one flushed reply each, so its rate is what the
pipes, the drivers and a minimal Python request loop allow on this machine.
"""

import sys


def main() -> None:
    readline = sys.stdin.buffer.readline
    out = sys.stdout.buffer
    reply = b"action=DUNNO\n\n"
    while True:
        line = readline()
        if not line:
            return
        while line != b"\n":
            line = readline()
            if not line:
                return
        out.write(reply)
        out.flush()


if __name__ == "__main__":
    main()
