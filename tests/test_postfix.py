"""End to end: a real Postfix smtpd and spawn(8) run greylist; swaks is the client.

The spawn child runs as nobody, who cannot read this checkout's virtual
environment when it lives under /root. The fixture copies the package and
its dependencies into a directory nobody can read, and runs them with an
interpreter of the same Python version that nobody can execute.
"""

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import docopt
import lmdb
import pytest

import greylist
from tests.conftest import require
from tests.postfix_instance import PostfixInstance, postfix_available

pytestmark = pytest.mark.postfix

USER = "nobody"
DELAY_S = 4


def as_user(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", USER, "--", *argv], capture_output=True,
                          text=True, timeout=30)


def runtime(root: pathlib.Path) -> list[str]:
    """Install greylist for the spawn user under root; return the argv prefix."""
    lib = root / "lib"
    for package in (greylist, lmdb, docopt):
        source = pathlib.Path(package.__file__).parent
        shutil.copytree(source, lib / source.name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    version = "python%d.%d" % sys.version_info[:2]
    for python in (os.path.realpath(sys.executable), "/usr/bin/" + version):
        argv = ["/usr/bin/env", "PYTHONPATH=%s" % lib, python]
        probe = as_user(*argv, "-c", "import greylist, lmdb, docopt")
        if probe.returncode == 0:
            return argv
    require("no %s that user %s can run: %s" % (version, USER, probe.stderr[-300:]))


@pytest.fixture(scope="module")
def postfix():
    require(postfix_available())
    root = pathlib.Path(tempfile.mkdtemp(prefix="greylist-e2e-"))
    os.chmod(root, 0o755)
    try:
        database = root / "db"
        database.mkdir(mode=0o755)
        shutil.chown(database, USER)
        settings = root / "greylist.cf"
        settings.write_text("greylist_database = %s/greylist\ngreylist_delay = %ds\n"
                            "greylist_log = postlog:%s/queue/public/postlog\n"
                            % (database, DELAY_S, root))
        argv = runtime(root) + ["-m", "greylist", "-c", str(settings)]
        # Group postdrop reaches queue/public/postlog (mode 0710), see greylist(8).
        with PostfixInstance(root, argv, policy_user=USER + ":postdrop") as instance:
            instance.database = str(database / "greylist")
            yield instance
    finally:
        shutil.rmtree(root, ignore_errors=True)


def rcpt_reply(result: subprocess.CompletedProcess) -> str:
    """The server's reply to RCPT TO in swaks output."""
    lines = result.stdout.splitlines()
    for index, line in enumerate(lines):
        if line.startswith(" -> RCPT TO:"):
            return lines[index + 1][4:] if index + 1 < len(lines) else ""
    raise AssertionError("no RCPT TO in swaks output:\n" + result.stdout)


def test_first_attempt_and_early_retry_get_450_and_retry_after_delay_is_delivered(postfix):
    sender, rcpt = "alice@example.org", "bob@example.test"
    first = rcpt_reply(postfix.swaks(sender, rcpt))
    started = time.monotonic()
    assert first.startswith("450 4.7.1 <bob@example.test>: Recipient address rejected: "
                            "Greylisted, please try again in %d seconds" % DELAY_S), first
    early = rcpt_reply(postfix.swaks(sender, rcpt))
    assert early.startswith("450 4.7.1 ") and "Greylisted" in early, early
    time.sleep(max(0.0, DELAY_S + 0.5 - (time.monotonic() - started)))
    accepted = postfix.swaks(sender, rcpt, ["--header", "Subject: greylist e2e"])
    assert rcpt_reply(accepted).startswith("250 "), accepted.stdout
    assert accepted.returncode == 0
    message = postfix.wait_for_delivery("bob")
    assert "Subject: greylist e2e" in message and "Return-Path: <alice@example.org>" in message

    log = postfix.log_text()
    assert "451 4.3.5" not in log and "warning: premature end-of-input" not in log
    assert "action=DEFER_IF_PERMIT reason=new age=0 client=127.0.0.1 " \
           "sender=alice@example.org rcpt=bob@example.test" in log
    assert "reason=early-retry" in log and "reason=delay-passed" in log
    listed = subprocess.run(["postmap", "-s", "lmdb:" + postfix.database],
                            capture_output=True, text=True, timeout=10)
    assert listed.returncode == 0
    key, value = listed.stdout.splitlines()[0].split("\t")
    assert key == "127.0.0.1/alice@example.org/bob@example.test"
    assert value.startswith("1:") and value.endswith(":3:passed")
    assert os.stat(postfix.database + ".lmdb").st_mode & 0o777 == 0o644


def test_each_recipient_of_one_message_is_greylisted_on_its_own(postfix):
    result = postfix.swaks("carol@example.org", "dave@example.test,erin@example.test")
    rejected = [line for line in result.stdout.splitlines() if line.startswith("<** 450 4.7.1")]
    assert len(rejected) == 2, result.stdout


def test_policy_processes_log_through_postlog_and_never_on_the_smtp_session(postfix):
    # Anything written to stderr under spawn(8) would reach smtpd as a
    # malformed reply, which Postfix logs and answers with 451 4.3.5.
    result = postfix.swaks("frank@example.org", "grace@example.test")
    assert rcpt_reply(result).startswith("450 4.7.1 ")
    log = postfix.log_text()
    assert "greylist[" in log and "fatal:" not in log
    assert "malformed" not in log and "451 4.3.5" not in log
