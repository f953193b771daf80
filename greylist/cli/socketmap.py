"""Command line of greylist-socketmap, the correspondent learner under spawn(8).

DESCRIPTION
    main() loads the settings, sets up logging, builds the socketmap
    learner (wiring.py, handlers/learn.py) and answers socketmap lookups
    on stdin and stdout, as spawn(8) connects them, until end of input
    (transports/spawn.py). Every well-formed lookup is answered
    "NOTFOUND ", also when the database is broken: cleanup defers a
    message whose bcc-map lookup fails. The command line is greylist's
    ("[-v...] -c FILE" read without docopt).

DIAGNOSTICS
    As greylist(8): usage and settings errors are logged as fatal and
    exit 2 and 1, and so is running as root; a framing error is logged
    and closes the connection (exit 1) without a reply.
"""

import os
import sys

from greylist.cli.greylist import _log_bug, _overrides, _silence_stderr, parse_args

USAGE = """\
Correspondent learner for Postfix: a socketmap server run by spawn(8).

Usage:
  greylist-socketmap [-v...] [-c FILE] [-d PATH]
  greylist-socketmap -h | --help
  greylist-socketmap --version

Options:
  -c FILE, --config FILE    Read settings from FILE (main.cf syntax), as
                            greylist does.
  -d PATH, --database PATH  Database lmdb:PATH (greylist_database).
  -v, --verbose             Log more; repeat for more detail.
  -h, --help                Show this help.
  --version                 Show the version.
"""
from greylist.config import ConfigError, load, log_target
from greylist.log import Log
from greylist.transports.spawn import serve
from greylist.wiring import DEFAULT, Tuning, socketmap_service


def main(argv: list[str] | None = None, tuning: Tuning = DEFAULT) -> int:
    """Run the socketmap learner; return the exit status."""
    if not os.isatty(2):
        _silence_stderr()
    args = parse_args(sys.argv[1:] if argv is None else argv, USAGE)
    args.setdefault("--delay", None)
    try:
        cfg = load(args["--config"], _overrides(args))
    except ConfigError as exc:
        Log("greylist-socketmap", log_target(args["--config"])).fatal(str(exc))
        return 1
    log = Log("greylist-socketmap", cfg.log, cfg.verbose)
    if os.geteuid() == 0 and not cfg.allow_root:
        log.fatal("refusing to run as root: run greylist-socketmap as the unprivileged "
                  "user of its spawn(8) service (greylist_allow_root = yes for tests)")
        return 1
    sys.excepthook = lambda kind, value, tb: _log_bug(log, kind, value, tb)
    # The postscreen map is answered here too, and postscreen waits for
    # it in its one process: every wait is bounded by the callout's budget
    # (a learning write that cannot get the lock is skipped, and logged).
    from greylist.callout import BUDGET_S
    if tuning is DEFAULT:
        tuning = DEFAULT._replace(lock_timeout_s=BUDGET_S)
    cfg = cfg._replace(redis_timeout_ms=min(cfg.redis_timeout_ms, int(BUDGET_S * 1000)))
    service = socketmap_service(cfg, log, tuning=tuning)
    service.open_store()
    try:
        return serve(sys.stdin.buffer, sys.stdout.buffer, service)
    except KeyboardInterrupt:
        return 1
    finally:
        log.close()


if __name__ == "__main__":
    sys.exit(main())
