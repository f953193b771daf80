"""Profile greylist's per-request path (parse, key, lookup, decide, reply).

Usage: python bench/hotpath.py [--scenario repeat,new] [--requests N]
                               [--ours-path DIR] [--top N]

Runs greylist.cli.greylist.main() in this process on a seeded stream
(stdin and stdout replaced by in-memory buffers, the database and log in
a temporary directory), under cProfile, exactly as spawn(8) would run it
but without the pipes. For "repeat" the warm-up (first sight, then a
retry after the delay) runs unprofiled first. Prints the wall time per
request without the profiler, the top functions by own time, and the
time per request of each stage, from cumulative times (STAGES):

  parse    protocols.policy Decoder.next and feed (serve() inlines the
           read loop of transports.spawn Reader.read)
  key      core.triple: triple_from_request, keys
  lookup   stores.lmdb LmdbStore.get_many
  write    stores.lmdb LmdbStore.update_many (decide again, commit, fsync)
  decide   core.evaluate: precheck, render; core.decide: decide
  log      log Log.info/debug/warning (the per-decision line)
  reply    protocols.policy format_reply + the write and flush
  other    the rest: serve()'s own loop, the service and handler glue,
           the formatting of debug lines that are not logged

Stages name the functions themselves (module and qualified name), and
resolve_stages() finds their code objects: a stage whose function no
longer exists is an error, never a silent 0 (tests/test_bench_smoke.py).
"""

import argparse
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import streams  # noqa: E402

STAGES = (
    ("parse", ("greylist.protocols.policy:Decoder.next",
               "greylist.protocols.policy:Decoder.feed")),
    ("key", ("greylist.core.triple:triple_from_request", "greylist.core.triple:keys")),
    ("lookup", ("greylist.stores.lmdb:LmdbStore.get_many",)),
    ("write", ("greylist.stores.lmdb:LmdbStore.update_many",)),
    ("decide", ("greylist.core.evaluate:precheck", "greylist.core.decide:decide",
                "greylist.core.evaluate:render")),
    ("log", ("greylist.log:Log.info", "greylist.log:Log.debug", "greylist.log:Log.warning")),
    ("reply", ("greylist.protocols.policy:format_reply",
               "~:<method 'write' of '_io.BytesIO' objects>",
               "~:<method 'flush' of '_io.BytesIO' objects>")),
)


def resolve_stages() -> list[tuple[str, set]]:
    """Return each stage with the pstats keys (file, line, name) of its
    functions; raise LookupError if a function no longer exists."""
    import importlib
    resolved = []
    for stage, names in STAGES:
        keys = set()
        for name in names:
            module, _, qualname = name.partition(":")
            if module == "~":
                keys.add(("~", 0, qualname))  # a builtin, as pstats names it
                continue
            try:
                target = importlib.import_module(module)
                for part in qualname.split("."):
                    target = getattr(target, part)
                code = target.__code__
            except (ImportError, AttributeError) as exc:
                raise LookupError("stage %s: %s: %s" % (stage, name, exc)) from None
            keys.add((code.co_filename, code.co_firstlineno, code.co_name))
        resolved.append((stage, keys))
    return resolved


def run_main(stream: bytes, settings: str) -> bytes:
    """Run greylist.cli.greylist.main on stream; return what it wrote to stdout."""
    from greylist.cli import greylist as cli
    saved = sys.stdin, sys.stdout, sys.excepthook
    saved_fd2 = os.dup(2)
    out = io.BytesIO()
    sys.stdin = io.TextIOWrapper(io.BytesIO(stream))
    sys.stdout = io.TextIOWrapper(out, write_through=True)
    try:
        cli.main(["-c", settings])
    finally:
        sys.stdout.flush()
        value = out.getvalue()
        sys.stdin, sys.stdout, sys.excepthook = saved
        os.dup2(saved_fd2, 2)
        os.close(saved_fd2)
    return value


def profile(scenario: str, requests: int, seed: int, delay_s: int, top: int,
            workdir: str) -> None:
    settings = os.path.join(workdir, "greylist.cf")
    with open(settings, "w", encoding="utf-8") as handle:
        handle.write("greylist_database = %s/greylist\n" % workdir)
        handle.write("greylist_delay = %ds\n" % delay_s)
        handle.write("greylist_log = %s/greylist.log\n" % workdir)
        if os.geteuid() == 0:
            handle.write("greylist_allow_root = yes\n")
    plan = streams.build_plan(scenario, requests, seed, 1)
    if plan.warm_a and plan.warm_a[0]:
        run_main(b"".join(b for _, b in plan.warm_a[0]), settings)
        time.sleep(delay_s + 1)
        run_main(b"".join(b for _, b in plan.warm_b[0]), settings)
    stream = b"".join(b for _, b in plan.timed[0])
    n = len(plan.timed[0])
    # Unprofiled, on a copy of the warmed database, for the real cost.
    for name in os.listdir(workdir):
        if name.startswith("greylist.lmdb"):
            shutil.copy(os.path.join(workdir, name), os.path.join(workdir, "copy-" + name))
    t0 = time.perf_counter()
    replies = run_main(stream, settings)
    wall = time.perf_counter() - t0
    for name in os.listdir(workdir):
        if name.startswith("copy-"):
            os.replace(os.path.join(workdir, name), os.path.join(workdir, name[5:]))
    prof = cProfile.Profile()
    prof.enable()
    run_main(stream, settings)
    prof.disable()
    print("\n=== %s: %d requests, %d replies; %.1f us/request unprofiled (%.0f req/s "
          "in-process, no pipes) ===" % (scenario, n, replies.count(b"action="),
                                         wall / n * 1e6, n / wall))
    stats = pstats.Stats(prof)
    total = stats.total_tt
    print("profiled: %.1f us/request\n" % (total / n * 1e6))
    print("stage     us/request  share  calls  (cumulative, profiled)")
    staged = 0.0
    for stage, keys in resolve_stages():
        cum = sum(ct for key, (cc, nc, tt, ct, callers) in stats.stats.items() if key in keys)
        calls = sum(nc for key, (cc, nc, tt, ct, callers) in stats.stats.items() if key in keys)
        staged += cum
        # A stage of functions that exist but were never called shows
        # "not called", never a silent 0 (a stage that names an inlined
        # function measured nothing).
        print("%-8s %10.1f %5.0f%%  %s" % (stage, cum / n * 1e6, 100 * cum / total,
                                          calls or "not called"))
    print("%-8s %10.1f %5.0f%%  (serve's own work: loop, debug formatting)"
          % ("other", (total - staged) / n * 1e6, 100 * (total - staged) / total))
    print("\ntop %d by own time:" % top)
    stream_out = io.StringIO()
    pstats.Stats(prof, stream=stream_out).sort_stats("tottime").print_stats(top)
    print(_trim(stream_out.getvalue()))
    print("top %d by cumulative time:" % top)
    stream_out = io.StringIO()
    pstats.Stats(prof, stream=stream_out).sort_stats("cumulative").print_stats(top)
    print(_trim(stream_out.getvalue()))


def _trim(text: str) -> str:
    lines = text.split("\n")
    start = next((i for i, l in enumerate(lines) if "ncalls" in l), 0)
    return "\n".join(l.replace(os.path.dirname(HERE) + "/", "")
                     for l in lines[start:] if l.strip())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", default="repeat,new")
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--delay", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--ours-path", default=os.path.dirname(HERE))
    args = p.parse_args()
    sys.path.insert(0, os.path.abspath(args.ours_path))
    import greylist
    print("greylist from %s" % os.path.dirname(greylist.__file__))
    for scenario in args.scenario.split(","):
        workdir = tempfile.mkdtemp(prefix="greylist-profile-")
        os.chmod(workdir, 0o755)
        try:
            profile(scenario, args.requests, args.seed, args.delay, args.top, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
