"""Instructions per known request, counted by valgrind: an A/B of two trees.

Usage: python bench/instructions.py [--ours-path DIR] [--candidate DIR]
                                    [--python PATH] [--small N] [--large N]

DESCRIPTION
    Wall-clock figures on this shared machine move by 20% between runs;
    instruction counts do not. For each tree (the checkout, and with
    --candidate another greylist tree, such as a git worktree of an
    earlier commit) this runs the real program, PYTHON -m greylist, on
    a fresh database in a work directory, with the tree on PYTHONPATH
    and its bytecode compiled first:

      1. warm-up, twice, unmeasured: a stream of requests for 50
         triples, with greylist_delay = 0s, so that every triple has
         passed and has its sender entry;
      2. under valgrind --tool=cachegrind --cache-sim=no, the same kind
         of stream of --small and then of --large requests (all known
         triples: the answer is DUNNO, reason awl-sender);

    and prints (I refs(large) - I refs(small)) / (large - small): the
    instructions one known request costs, start-up and exit cancelled
    out, and I refs(small) as a measure of start-up.

DIAGNOSTICS
    Exits 1 if valgrind is missing or a run does not answer every
    request with DUNNO.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def stream(n: int) -> bytes:
    """n RCPT requests as Postfix 3.7 sends them, for 50 triples."""
    out = []
    for i in range(n):
        out.append(b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
                   b"client_address=192.0.2.%d\nclient_name=mail%d.example.org\n"
                   b"helo_name=mail.example.org\nsender=alice%d@example.org\n"
                   b"recipient=bob@example.net\ninstance=%x.1\nqueue_id=\nsize=0\n"
                   b"ccert_subject=\nccert_issuer=\nccert_fingerprint=\n"
                   b"encryption_protocol=TLSv1.3\nencryption_cipher=TLS_AES_256_GCM_SHA384\n"
                   b"encryption_keysize=256\netrn_domain=\nstress=\nsasl_method=\n"
                   b"sasl_username=\nsasl_sender=\nreverse_client_name=mail.example.org\n\n"
                   % (i % 50, i % 50, i % 50, i))
    return b"".join(out)


def count(python: str, tree: str, small: int, large: int) -> tuple[int, int]:
    """Return (instructions per known request, I refs of the small run)."""
    work = tempfile.mkdtemp(prefix="greylist-instructions-")
    os.chmod(work, 0o755)
    try:
        settings = os.path.join(work, "greylist.cf")
        with open(settings, "w", encoding="utf-8") as handle:
            handle.write("greylist_database = %s/db\ngreylist_log = %s/log\n"
                         "greylist_delay = 0s\ngreylist_cleanup_interval = 0\n" % (work, work))
            if os.geteuid() == 0:
                handle.write("greylist_allow_root = yes\n")
        env = dict(os.environ, PYTHONPATH=tree, PYTHONDONTWRITEBYTECODE="")
        subprocess.run([python, "-m", "compileall", "-q", os.path.join(tree, "greylist")],
                       env=env, stdout=subprocess.DEVNULL, timeout=120, check=False)
        argv = [python, "-m", "greylist", "-c", settings]
        for _ in range(2):
            subprocess.run(argv, input=stream(200), capture_output=True, env=env, cwd=work,
                           timeout=60, check=True)
        refs = []
        for n in (small, large):
            done = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no",
                                   "--cachegrind-out-file=/dev/null"] + argv,
                                  input=stream(n), capture_output=True, env=env, cwd=work,
                                  timeout=900)
            if done.stdout != b"action=DUNNO\n\n" * n:
                raise SystemExit("%s: not every request was answered DUNNO" % tree)
            found = re.search(rb"I\s+refs:\s+([0-9,]+)", done.stderr)
            if found is None:
                raise SystemExit("valgrind printed no I refs: %r" % done.stderr[-300:])
            refs.append(int(found.group(1).replace(b",", b"")))
        return (refs[1] - refs[0]) // (large - small), refs[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ours-path", default=ROOT)
    p.add_argument("--candidate", default=None)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--small", type=int, default=200)
    p.add_argument("--large", type=int, default=2200)
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: valgrind)")
        return 1
    trees = [("greylist", args.ours_path)] + (
        [("candidate", args.candidate)] if args.candidate else [])
    print("python %s; %d and %d known requests per run" % (args.python, args.small, args.large))
    for name, tree in trees:
        per_request, start = count(args.python, os.path.abspath(tree), args.small, args.large)
        print("%-10s %s: %d instructions per known request; start-up and %d requests: %d"
              % (name, tree, per_request, args.small, start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
