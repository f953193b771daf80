"""Command line of the greylist policy server.

DESCRIPTION
    main() parses the command line with docopt, loads the settings,
    sets up logging, builds the policy service (wiring.py) and serves
    policy requests on stdin and stdout, as spawn(8) connects them,
    until end of input (transports/spawn.py). It imports only what that
    path needs: under spawn(8) every smtpd connection starts a process.
    docopt defines the command line; the one form that master.cf uses,
    "[-v...] -c FILE", is read without loading it (parse_args), which
    saves a sixth of a spawned process's CPU time, and a test checks
    that the result is docopt's own for that form.

    --check loads the settings the same way and checks what a run
    needs at start (check.py) instead of serving.

DIAGNOSTICS
    Usage and settings errors are logged as fatal (to the greylist_log
    of the settings file, as far as it can be read, and to a terminal's
    stderr) and exit with status 2 and 1, and so is running as root (status 1) unless
    greylist_allow_root is set. A bug is logged by an exception hook, never printed: under
    spawn(8) stderr is the Postfix socket, so main() points descriptor 2
    at /dev/null unless it is a terminal.
"""

import os
import sys

from greylist import __version__
from greylist.config import ConfigError, load, log_target, parse_setting
from greylist.log import Log, stderr_is_a_client
from greylist.transports.spawn import serve
from greylist.wiring import DEFAULT, Tuning, policy_service

USAGE = """\
Greylisting policy server for Postfix, run by spawn(8).

Usage:
  greylist [-v...] [--outbound] [-c FILE] [-d PATH] [--delay TIME]
  greylist --check [-v...] [--outbound] [-c FILE] [-d PATH] [--delay TIME]
  greylist -h | --help
  greylist --version

Options:
  --check                   Check the settings as a run would, print
                            "FILE: ok" or each problem, and exit (status
                            0 or 1); nothing is written or created.
  -c FILE, --config FILE    Read settings from FILE (main.cf syntax).
  -d PATH, --database PATH  Database lmdb:PATH, the file PATH.lmdb
                            (greylist_database).
  --delay TIME              Greylisting delay, with unit s, m, h, d or w
                            (greylist_delay).
  --outbound                Serve the submission smtpd: learn the
                            correspondents of local users; always DUNNO.
  -v, --verbose             Log more; repeat for more detail.
  -h, --help                Show this help.
  --version                 Show the version.
"""


def main(argv: list[str] | None = None, tuning: Tuning = DEFAULT) -> int:
    """Run the policy server; return the exit status.

    tuning changes the stores' tunables (tests only).
    """
    def build(cfg, log, args):
        if args["--outbound"]:
            from greylist.wiring import outbound_service
            return outbound_service(cfg, log, tuning=tuning)
        log.debug(1, "database %s, greylist_delay %ds" % (cfg.database, cfg.delay_s))
        return policy_service(cfg, log, tuning=tuning)
    return run("greylist", argv, USAGE, build)


def run(ident: str, argv: list[str] | None, usage: str, build) -> int:
    """The main() of a spawn(8) program (greylist, greylist-socketmap,
    greylist-postscreen): parse argv, load the settings, refuse root, set
    up logging and the bug hook, build the service (build(cfg, log,
    args)), open its store and serve stdin and stdout until end of input.
    Returns the exit status."""
    # Before stderr is silenced: --check prints there (a usage error
    # is written by Log.fatal, which never writes to spawn(8)'s socket).
    args = parse_args(sys.argv[1:] if argv is None else argv, usage)
    if args.get("--check"):
        from greylist.check import check
        return check(args["--config"], lambda: load(args["--config"], _overrides(args)))
    if stderr_is_a_client():
        _silence_stderr()
    args.setdefault("--delay", None)
    args.setdefault("--outbound", False)
    try:
        cfg = load(args["--config"], _overrides(args))
    except ConfigError as exc:
        Log(ident, log_target(args["--config"])).fatal(str(exc))
        return 1
    log = Log(ident, cfg.log, cfg.verbose, host=cfg.log_hostname)
    if os.geteuid() == 0 and not cfg.allow_root:
        # spawn(8) never runs us as root; a root-owned database would
        # also lock out the policy user later.
        log.fatal("refusing to run as root: run %s as the unprivileged user "
                  "of its spawn(8) service (greylist_allow_root = yes for tests)" % ident)
        return 1
    sys.excepthook = lambda kind, value, tb: _log_bug(log, kind, value, tb)
    service = build(cfg, log, args)
    service.open_store()
    try:
        return serve(sys.stdin.buffer, sys.stdout.buffer, service)
    except KeyboardInterrupt:
        return 1
    finally:
        log.close()


def parse_args(argv: list[str], usage: str = USAGE) -> dict:
    """Return docopt's parse of argv; exit 2 after a usage error.

    "[-v...] [--outbound] -c FILE" (each -v word of v's only, FILE not
    starting with "-") gets the dict docopt returns for it, built here:
    docopt and its regular expressions cost about 6 ms per process.
    """
    if len(argv) >= 2 and argv[-2] in ("-c", "--config") and argv[-1][:1] not in ("-", ""):
        flags = argv[:-2]
        outbound = flags[-1:] == ["--outbound"]
        if outbound:
            flags = flags[:-1]
        if all(len(flag) >= 2 and flag[0] == "-" and flag[1:] == "v" * (len(flag) - 1)
               for flag in flags) and (not outbound or "--outbound" in usage):
            return {"--config": argv[-1], "--database": None, "--delay": None,
                    "--help": False, "--verbose": sum(len(flag) - 1 for flag in flags),
                    "--version": False, "--outbound": outbound, "--check": False}
    from docopt import DocoptExit, docopt
    try:
        return docopt(usage, argv=argv, version=__version__)
    except DocoptExit as exc:
        usage_error(exc, argv)
        raise SystemExit(2) from None


def usage_error(exc: Exception, argv: list[str], ident: str = "greylist") -> None:
    """Report docopt's usage error as fatal (stderr unless spawn's socket)
    to the settings file's greylist_log, if argv names one: the line then
    reaches the log the administrator reads. For every program."""
    Log(ident, log_target(_config_word(argv))).fatal("usage: %s"
                                                     % str(exc).replace("\n", " "))


def _config_word(argv: list[str]) -> str | None:
    """The FILE of "-c FILE" or "--config FILE" in argv that docopt could
    not parse, as far as it shows; None otherwise."""
    for index, word in enumerate(argv[:-1]):
        if word in ("-c", "--config") and argv[index + 1][:1] not in ("-", ""):
            return argv[index + 1]
    return None


def _overrides(args: dict) -> dict[str, object]:
    values: dict[str, object] = {"verbose": args["--verbose"]}
    for option, name in (("--database", "greylist_database"),
                         ("--delay", "greylist_delay")):
        if args[option] is not None:
            try:
                field, value = parse_setting(name, args[option])
            except ConfigError as exc:
                raise ConfigError("%s %s: %s" % (option, args[option], exc)) from None
            values[field] = value
    return values


def _silence_stderr() -> None:
    """Point descriptor 2 at /dev/null: under spawn(8) it is the socket."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)


def _log_bug(log: Log, kind, value, tb) -> None:
    import traceback
    log.fatal("internal error: %s: %s" % (kind.__name__, value))
    for line in "".join(traceback.format_tb(tb)).splitlines():
        log.fatal("  " + line)
