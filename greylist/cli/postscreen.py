"""Command line of greylist-postscreen, the postscreen policy callout under spawn(8).

DESCRIPTION
    main() loads the settings, sets up logging, builds the callout
    (wiring.py, callout.py) and answers callout requests on stdin and
    stdout, as spawn(8) connects them, until end of input
    (transports/spawn.py). The command line is greylist's ("[-v...] -c
    FILE" read without docopt).

DIAGNOSTICS
    As greylist(8): usage and settings errors are logged as fatal and
    exit 2 and 1, and so is running as root; a malformed request is
    logged and closes the connection (exit 1) without a reply.
"""

import os
import sys

from greylist.cli.greylist import _log_bug, _overrides, _silence_stderr, parse_args
from greylist.config import ConfigError, load, log_target
from greylist.log import Log
from greylist.transports.spawn import serve
from greylist.wiring import DEFAULT, Tuning, postscreen_service

USAGE = """\
Postscreen policy callout for Postfix, run by spawn(8).

Usage:
  greylist-postscreen [-v...] [-c FILE] [-d PATH]
  greylist-postscreen -h | --help
  greylist-postscreen --version

Options:
  -c FILE, --config FILE    Read settings from FILE (main.cf syntax), as
                            greylist does.
  -d PATH, --database PATH  Database lmdb:PATH (greylist_database).
  -v, --verbose             Log more; repeat for more detail.
  -h, --help                Show this help.
  --version                 Show the version.
"""


def main(argv: list[str] | None = None, tuning: Tuning | None = None) -> int:
    """Run the callout; return the exit status."""
    from greylist.callout import BUDGET_S
    if not os.isatty(2):
        _silence_stderr()
    args = parse_args(sys.argv[1:] if argv is None else argv, USAGE)
    args.setdefault("--delay", None)
    try:
        cfg = load(args["--config"], _overrides(args))
    except ConfigError as exc:
        Log("greylist-postscreen", log_target(args["--config"])).fatal(str(exc))
        return 1
    log = Log("greylist-postscreen", cfg.log, cfg.verbose)
    if os.geteuid() == 0 and not cfg.allow_root:
        log.fatal("refusing to run as root: run greylist-postscreen as the unprivileged "
                  "user of its spawn(8) service (greylist_allow_root = yes for tests)")
        return 1
    sys.excepthook = lambda kind, value, tb: _log_bug(log, kind, value, tb)
    # A Redis call waits at most the budget too (found in review).
    cfg = cfg._replace(redis_timeout_ms=min(cfg.redis_timeout_ms, int(BUDGET_S * 1000)))
    service = postscreen_service(cfg, log, tuning=tuning or DEFAULT._replace(
        lock_timeout_s=BUDGET_S))
    service.open_store()
    try:
        return serve(sys.stdin.buffer, sys.stdout.buffer, service)
    except KeyboardInterrupt:
        return 1
    finally:
        log.close()


if __name__ == "__main__":
    sys.exit(main())
