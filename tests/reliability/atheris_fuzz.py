"""Coverage-guided fuzzing of the whole request loop with atheris (libFuzzer).

Usage: python tests/reliability/atheris_fuzz.py [libFuzzer options] [CORPUS...]
       e.g. -runs=150000 -seed=1 -max_len=20000 CORPUS

Every input is one connection: serve() reads it, with the shipped default
settings (greylist_delay 1 s) and a real LMDB store
(on /dev/shm where it exists) and must return 0 or 1 with well-formed
UTF-8 replies only; anything else, or any exception, is a crash that
libFuzzer reports with the input that caused it.
"""

import dataclasses
import io
import os
import re
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

with atheris.instrument_imports():
    from greylist.config import Config
    from greylist.transports.spawn import serve
    from greylist.log import Log
    from greylist.stores.lmdb import LmdbStore

REPLY = re.compile(rb"(?:action=(?:DUNNO|DEFER_IF_PERMIT|PREPEND)[^\n\0]*\n\n)*")


def main() -> None:
    # The caller names (and removes) the directory: libFuzzer ends the
    # process with exit(), so no cleanup of ours would run.
    directory = os.environ.get("GREYLIST_ATHERIS_DIR") or tempfile.mkdtemp(
        prefix="greylist-atheris-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    os.chmod(directory, 0o755)
    cfg = Config()._replace(database=os.path.join(directory, "db"),
                              log="/dev/null", delay_s=1)
    store = LmdbStore(cfg.database)
    # One Policy for all inputs, as one process serves one connection
    # after another in its lifetime; it opens its files once.
    policy = policy_service(store, cfg, Log("greylist", cfg.log, 0))

    def one_input(data: bytes) -> None:
        out = io.BytesIO()
        status = serve(io.BytesIO(data), out, policy)
        if status not in (0, 1):
            raise AssertionError("status %r" % status)
        replies = out.getvalue()
        if REPLY.fullmatch(replies) is None:
            raise AssertionError("malformed replies %r" % replies[:300])
        replies.decode("utf-8")  # smtpd answers 451 to a reply that is not UTF-8

    atheris.Setup(sys.argv, one_input)
    try:
        atheris.Fuzz()
    finally:
        store.close()


if __name__ == "__main__":
    main()
