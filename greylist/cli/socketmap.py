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

import sys

from greylist.cli.greylist import run

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
from greylist.wiring import DEFAULT, Tuning, socketmap_service


def main(argv: list[str] | None = None, tuning: Tuning = DEFAULT) -> int:
    """Run the socketmap learner; return the exit status."""
    def build(cfg, log, args):
        # The postscreen map is answered here too, and postscreen waits
        # for it in its one process: every wait is bounded by the
        # callout's budget (a learning write that cannot get the lock is
        # skipped, and logged).
        from greylist.callout import within_budget
        cfg, budgeted = within_budget(cfg, tuning)
        return socketmap_service(cfg, log, tuning=budgeted if tuning is DEFAULT else tuning)
    return run("greylist-socketmap", argv, USAGE, build)


if __name__ == "__main__":
    sys.exit(main())
