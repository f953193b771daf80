"""End to end: a real Postfix smtpd asks a running greylistd; swaks is the client.

greylistd starts as root, binds a unix socket (group postfix, mode 0660)
and an inet listener on 127.0.0.1, drops to nobody, and serves smtpd's
check_policy_service over each, in turn. The package is installed for
nobody as for the spawn tests (tests/postfix_instance.install_runtime):
the daemon imports some modules after it drops privileges.
"""

import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from tests.conftest import require
from tests.postfix_instance import PostfixInstance, install_runtime, postfix_available
from tests.test_postfix import rcpt_reply

pytestmark = pytest.mark.postfix

USER = "nobody"
DELAY_S = 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", params=["unix", "inet"])
def site(request):
    """greylistd and a Postfix whose smtpd asks it over unix: or inet:."""
    require(postfix_available())
    root = pathlib.Path(tempfile.mkdtemp(prefix="greylistd-e2e-"))
    os.chmod(root, 0o755)
    daemon = None
    try:
        argv = install_runtime(root, USER)
        if isinstance(argv, str):
            require(argv)
        database = root / "db"
        database.mkdir(mode=0o755)
        shutil.chown(database, USER)
        run = root / "run"
        run.mkdir(mode=0o755)
        port = free_port()
        config = root / "greylist.cf"
        config.write_text(
            "greylist_database = %s/greylist\ngreylist_delay = %ds\n"
            "greylist_log = %s/greylistd.log\ngreylist_header = yes\n"
            "greylist_policy_listen = unix:%s/policy inet:127.0.0.1:%d\n"
            "greylist_socket_group = postfix\ngreylist_socket_mode = 0660\n"
            "greylist_user = %s\n" % (database, DELAY_S, database, run, port, USER))
        daemon = subprocess.Popen(argv + ["-m", "greylist.cli.greylistd", "-c", str(config)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while not (run / "policy").exists() or not _answers(port):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("greylistd did not start: %r"
                                     % daemon.stderr.read()[-2000:])
            time.sleep(0.1)
        policy = ("unix:%s/policy" % run if request.param == "unix"
                  else "inet:127.0.0.1:%d" % port)
        # The spawn service of the instance stays unused: smtpd asks greylistd.
        extra = {"smtpd_recipient_restrictions":
                 "reject_unauth_destination, check_policy_service { %s, default_action=DUNNO }"
                 % policy}
        with PostfixInstance(root, argv + ["-m", "greylist", "-c", str(config)],
                             policy_user=USER, extra_main_cf=extra) as postfix:
            postfix.daemon, postfix.daemon_log = daemon, database / "greylistd.log"
            postfix.run_dir = run
            yield postfix
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(timeout=5)
        if daemon is not None:
            daemon.stderr.close()
        shutil.rmtree(root, ignore_errors=True)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_smtpd_gets_450_then_250_from_greylistd_and_the_mail_is_delivered(site):
    sender, rcpt = "carol@example.org", "dave@example.test"
    first = rcpt_reply(site.swaks(sender, rcpt))
    started = time.monotonic()
    assert first.startswith("450 4.7.1 <dave@example.test>: Recipient address rejected: "
                            "Greylisted, please try again in %d seconds" % DELAY_S), first
    time.sleep(max(0.0, DELAY_S + 0.5 - (time.monotonic() - started)))
    accepted = site.swaks(sender, rcpt, ["--header", "Subject: greylistd e2e"])
    assert rcpt_reply(accepted).startswith("250 "), accepted.stdout
    message = site.wait_for_delivery("dave")
    assert "Subject: greylistd e2e" in message and message.count("X-Greylist: delayed ") == 1
    log = site.daemon_log.read_text()
    assert "reason=new" in log and "reason=delay-passed" in log
    assert "451 4.3.5" not in site.log_text()


def test_greylistd_serves_as_nobody_on_a_postfix_group_socket(site):
    status = pathlib.Path("/proc/%d/status" % site.daemon.pid).read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    groups = next(line for line in status.splitlines() if line.startswith("Groups:")).split()[1:]
    assert set(uids) == {str(__import__("pwd").getpwnam(USER).pw_uid)} and groups == []
    st = os.stat(site.run_dir / "policy")
    assert (st.st_mode & 0o777, st.st_gid) == (0o660, __import__("grp").getgrnam("postfix").gr_gid)
