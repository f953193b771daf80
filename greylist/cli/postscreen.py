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

import sys

from greylist.cli.greylist import run
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


def main(argv: list[str] | None = None, tuning: Tuning = DEFAULT) -> int:
    """Run the callout; return the exit status."""
    def build(cfg, log, args):
        # postscreen gives up after postscreen_policy_timeout: every wait
        # (a lock, a Redis call) is bounded by the budget.
        from greylist.callout import within_budget
        cfg, budgeted = within_budget(cfg, tuning)
        return postscreen_service(cfg, log, tuning=budgeted if tuning is DEFAULT else tuning)
    return run("greylist-postscreen", argv, USAGE, build)


if __name__ == "__main__":
    sys.exit(main())
