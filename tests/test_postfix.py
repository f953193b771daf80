"""End to end: a real Postfix smtpd and spawn(8) run greylist; swaks is the client.

The spawn child runs as nobody, who cannot read this checkout's virtual
environment when it lives under /root. The fixture copies the package and
its dependencies into a directory nobody can read, and runs them with an
interpreter of the same Python version that nobody can execute.
"""

import contextlib
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import time

import pytest

from greylist.stores.lmdb import LmdbStore
from tests.conftest import require
from tests.postfix_instance import PostfixInstance, install_runtime, postfix_available

pytestmark = pytest.mark.postfix

USER = "nobody"
DELAY_S = 4
WHITELISTED = "198.51.100.55"


def runtime(root: pathlib.Path) -> list[str]:
    """Install greylist for the spawn user under root; return the argv prefix."""
    argv = install_runtime(root, USER)
    if isinstance(argv, str):
        require(argv)
    return argv


@contextlib.contextmanager
def instance(settings: str = "", main_cf: dict | None = None):
    """A throw-away Postfix whose spawn service runs greylist as nobody.

    settings are added to greylist's settings file; main_cf to Postfix's,
    with {db} standing for the database directory.
    """
    require(postfix_available())
    root = pathlib.Path(tempfile.mkdtemp(prefix="greylist-e2e-"))
    os.chmod(root, 0o755)
    try:
        database = root / "db"
        database.mkdir(mode=0o755)
        # smtpd opens its lmdb tables at start: make the client table first
        # (as root, while the directory is root's: root never opens a file
        # in a directory another user owns), owned by the policy user who
        # writes it.
        table = LmdbStore(str(database / "greylist-clients"))
        table.open()
        table.close()
        shutil.chown(str(database / "greylist-clients.lmdb"), USER)
        shutil.chown(database, USER)
        whitelist = root / "whitelist_clients"
        whitelist.write_text("# postgrey syntax\n%s\n" % WHITELISTED)
        config = root / "greylist.cf"
        config.write_text("greylist_database = %s/greylist\ngreylist_delay = %ds\n"
                          "greylist_log = postlog:%s/queue/public/postlog\n"
                          "greylist_header = yes\ngreylist_whitelist_clients = %s\n%s"
                          % (database, DELAY_S, root, whitelist, settings))
        python = runtime(root)
        argv = python + ["-m", "greylist", "-c", str(config)]
        # Group postdrop reaches queue/public/postlog (mode 0710), see greylist(8).
        # XCLIENT from 127.0.0.1 lets swaks present other client addresses.
        extra = {"smtpd_authorized_xclient_hosts": "127.0.0.1"} | {
            name: value.format(db=database) for name, value in (main_cf or {}).items()}
        with PostfixInstance(root, argv, policy_user=USER + ":postdrop",
                             extra_main_cf=extra) as postfix:
            postfix.database = str(database / "greylist")
            postfix.settings = str(config)
            postfix.python = python
            yield postfix
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def postfix():
    with instance() as postfix:
        yield postfix


def client_table_instance(match: str):
    """Clients whitelisted after one pass, grouped by greylist_client_match
    = match, and smtpd reading the client table."""
    return instance("greylist_client_awl_passes = 1\ngreylist_client_match = %s\n" % match, {
        "smtpd_recipient_restrictions":
            "reject_unauth_destination, check_client_access lmdb:{db}/greylist-clients, "
            "check_policy_service unix:private/policy"})


@pytest.fixture(scope="module")
def postfix_with_client_table():
    with client_table_instance("prefix") as postfix:
        yield postfix


@pytest.fixture(scope="module")
def postfix_with_pool_client_table():
    with client_table_instance("pool") as postfix:
        yield postfix


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
    assert message.count("X-Greylist: delayed ") == 1

    log = postfix.wait_for_log("action=PREPEND reason=delay-passed")
    assert "451 4.3.5" not in log and "warning: premature end-of-input" not in log
    assert "action=DEFER_IF_PERMIT reason=new age=0 client=127.0.0.1 " \
           "sender=alice@example.org rcpt=bob@example.test" in log
    assert "action=PREPEND reason=delay-passed" in log
    assert "reason=early-retry" in log and "reason=delay-passed" in log
    listed = subprocess.run(["postmap", "-s", "lmdb:" + postfix.database],
                            capture_output=True, text=True, timeout=10)
    assert listed.returncode == 0
    entries = dict(line.split("\t") for line in listed.stdout.splitlines())
    triple = entries["127.0.0/alice@example.org/bob@example.test"]
    assert triple.startswith("1:") and triple.endswith(":3:passed")
    assert entries["127.0.0/alice@example.org"].endswith(":1:sender")
    # Postfix never reads the database: private to the policy user.
    assert os.stat(postfix.database + ".lmdb").st_mode & 0o777 == 0o600


def test_multi_recipient_message_is_delivered_with_one_header_after_the_delay(postfix):
    sender, rcpts = "carol@example.org", "dave@example.test,erin@example.test"
    first = postfix.swaks(sender, rcpts)
    started = time.monotonic()
    rejected = [line for line in first.stdout.splitlines() if line.startswith("<** 450 4.7.1")]
    assert len(rejected) == 2, first.stdout
    time.sleep(max(0.0, DELAY_S + 0.5 - (time.monotonic() - started)))
    retry = postfix.swaks(sender, rcpts, ["--header", "Subject: two recipients"])
    assert retry.returncode == 0, retry.stdout
    for rcpt in ("dave", "erin"):
        message = postfix.wait_for_delivery(rcpt)
        assert "Subject: two recipients" in message
        assert message.count("X-Greylist: delayed ") == 1


def test_a_message_is_not_split_when_its_new_recipient_comes_first(postfix):
    """Issue 16 in real Postfix: pam's triple is past the delay from an
    earlier message; a new message lists quinn (new) first, then pam.
    Both get 450 (pam held, her pass recorded), and at the retry both
    are accepted and delivered: the message is never split."""
    sender = "sue@example.org"
    assert rcpt_reply(postfix.swaks(sender, "pam@example.test")).startswith("450 ")
    started = time.monotonic()
    time.sleep(max(0.0, DELAY_S + 0.5 - (time.monotonic() - started)))
    first = postfix.swaks(sender, "quinn@example.test,pam@example.test")
    rejected = [line for line in first.stdout.splitlines() if line.startswith("<** 450 4.7.1")]
    assert len(rejected) == 2, first.stdout
    assert not [line for line in first.stdout.splitlines() if line.startswith("<-  250 2.1.5")]
    log = postfix.wait_for_log("rcpt=pam@example.test")
    assert "reason=held:delay-passed age=" in log and "rcpt=pam@example.test" in log, log
    retry = postfix.swaks(sender, "quinn@example.test,pam@example.test",
                          ["--header", "Subject: not split"])
    assert retry.returncode == 0, retry.stdout
    for rcpt in ("quinn", "pam"):
        assert "Subject: not split" in postfix.wait_for_delivery(rcpt)


def test_whitelisted_client_is_accepted_at_its_first_attempt(postfix):
    result = postfix.swaks("gina@example.org", "henry@example.test",
                           ["--xclient-addr", WHITELISTED, "--header", "Subject: listed"])
    assert rcpt_reply(result).startswith("250 "), result.stdout
    assert "X-Greylist" not in postfix.wait_for_delivery("henry")
    listed = "reason=whitelist-client age=0 client=%s" % WHITELISTED
    assert listed in postfix.wait_for_log(listed)


def test_unavailable_client_address_is_greylisted_not_an_error(postfix):
    # XCLIENT ADDR=[UNAVAILABLE] makes Postfix send client_address=unknown.
    result = postfix.swaks("ivan@example.org", "judy@example.test",
                           ["--xclient-addr", "[UNAVAILABLE]"])
    assert rcpt_reply(result).startswith("450 4.7.1 "), result.stdout
    logged = "reason=new age=0 client=unknown sender=ivan@example.org"
    assert logged in postfix.wait_for_log(logged)


def test_policy_processes_log_through_postlog_and_never_on_the_smtp_session(postfix):
    # Anything written to stderr under spawn(8) would reach smtpd as a
    # malformed reply, which Postfix logs and answers with 451 4.3.5.
    result = postfix.swaks("frank@example.org", "grace@example.test")
    assert rcpt_reply(result).startswith("450 4.7.1 ")
    log = postfix.wait_for_log("sender=frank@example.org")
    assert "greylist[" in log and "fatal:" not in log
    assert "malformed" not in log and "451 4.3.5" not in log


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_greylistctl_as_root_logs_through_postlog_after_becoming_the_policy_user(postfix):
    # issue 15: greylistctl could not log through postlog after dropping
    # to the policy user, though greylistctl(8) says its actions are logged.
    for action in ("add", "remove"):
        # The Python the policy user can run (greylistctl imports after it
        # becomes that user).
        done = subprocess.run(postfix.python + ["-m", "greylist.cli.greylistctl", "-c",
                                                postfix.settings, "whitelist", action,
                                                "192.0.2.77"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "whitelist: removed" not in postfix.log_text():
        time.sleep(0.1)
    log = postfix.log_text()
    assert re.search(r"greylistctl\[\d+\]: whitelist: added 192\.0\.2$", log, re.M), \
        log[-2000:]
    assert "whitelist: removed" in log


def test_auto_whitelisted_client_is_accepted_by_smtpd_from_the_client_table(
        postfix_with_client_table):
    postfix = postfix_with_client_table
    first = rcpt_reply(postfix.swaks("kim@example.org", "lee@example.test",
                                     ["--xclient-addr", "198.51.100.20"]))
    started = time.monotonic()
    assert first.startswith("450 4.7.1 "), first
    time.sleep(max(0.0, DELAY_S + 0.5 - (time.monotonic() - started)))
    retry = postfix.swaks("kim@example.org", "lee@example.test",
                          ["--xclient-addr", "198.51.100.20"])
    assert rcpt_reply(retry).startswith("250 "), retry.stdout
    table = postfix.database + "-clients"
    queried = subprocess.run(["postmap", "-q", "198.51.100", "lmdb:" + table],
                             capture_output=True, text=True, timeout=10)
    assert queried.returncode == 0 and queried.stdout.strip().isdigit()
    # A new triple from another address of the group: smtpd's
    # check_client_access finds "198.51.100" and never asks the policy.
    fresh = postfix.swaks("new@example.net", "other@example.test",
                          ["--xclient-addr", "198.51.100.99", "--header", "Subject: awl"])
    assert rcpt_reply(fresh).startswith("250 "), fresh.stdout
    assert "Subject: awl" in postfix.wait_for_delivery("other")
    assert "sender=new@example.net" not in postfix.log_text()


def test_in_pool_mode_the_client_table_accepts_the_host_and_not_its_access_neighbour(
        postfix_with_pool_client_table):
    # Found in review: the table's "198.51.100" let smtpd accept an
    # access-network host of the /24, which pool mode greylists apart.
    postfix = postfix_with_pool_client_table
    server = ["--xclient-addr", "198.51.100.20", "--xclient-name", "mx.shop.test"]
    first = rcpt_reply(postfix.swaks("kim@example.org", "lee@example.test", server))
    started = time.monotonic()
    assert first.startswith("450 4.7.1 "), first
    time.sleep(max(0.0, DELAY_S + 0.5 - (time.monotonic() - started)))
    retry = postfix.swaks("kim@example.org", "lee@example.test", server)
    assert rcpt_reply(retry).startswith("250 "), retry.stdout
    table = "lmdb:" + postfix.database + "-clients"
    for key, found in (("198.51.100.20", True), ("198.51.100", False)):
        queried = subprocess.run(["postmap", "-q", key, table], capture_output=True,
                                 text=True, timeout=10)
        assert (queried.returncode == 0 and queried.stdout.strip().isdigit()) == found, key
    # The access host is greylisted: smtpd found no table entry, the
    # policy service keys it by its address.
    access = postfix.swaks("bot@example.net", "lee@example.test",
                           ["--xclient-addr", "198.51.100.7",
                            "--xclient-name", "dsl-198-51-100-7.isp.test"])
    assert rcpt_reply(access).startswith("450 4.7.1 "), access.stdout
    # Another mail server of the /24: the policy service accepts it on
    # the group's entry.
    other = postfix.swaks("new@example.net", "other@example.test",
                          ["--xclient-addr", "198.51.100.99", "--xclient-name", "mx2.shop.test",
                           "--header", "Subject: pool awl"])
    assert rcpt_reply(other).startswith("250 "), other.stdout
    assert "Subject: pool awl" in postfix.wait_for_delivery("other")
    assert re.search(r"action=DUNNO reason=awl-client .*client=198\.51\.100\.99 "
                     r"sender=new@example\.net", postfix.wait_for_log("client=198.51.100.99"))


@pytest.fixture(scope="module")
def postfix_long_lines():
    """smtpd with line_length_limit raised far above its 2048 default."""
    with instance(main_cf={"line_length_limit": "200000"}) as postfix:
        yield postfix


def test_sender_longer_than_8192_bytes_is_greylisted_regression_issue_15(postfix_long_lines):
    # The old 8192-byte line cap closed the connection: smtpd said 451.
    postfix = postfix_long_lines
    sender = "l" * 10000 + "@example.org"
    first = rcpt_reply(postfix.swaks(sender, "long@example.test"))
    started = time.monotonic()
    assert first.startswith("450 4.7.1 ") and "Greylisted" in first, first
    time.sleep(max(0.0, DELAY_S + 0.5 - (time.monotonic() - started)))
    accepted = postfix.swaks(sender, "long@example.test")
    assert rcpt_reply(accepted).startswith("250 "), accepted.stdout
    assert accepted.returncode == 0
    log = postfix.wait_for_log("reason=delay-passed")
    assert "451 4.3.5" not in log and "request attribute too long" not in log
    # (The log line is cut at log.MAX_MESSAGE characters.)
    assert "action=DEFER_IF_PERMIT reason=new age=0 client=127.0.0.1 sender=%s" % sender[:1000] \
        in log
    assert "reason=delay-passed" in log


def test_sender_over_the_line_cap_is_answered_dunno_with_a_warning(postfix_long_lines):
    # Longer than MAX_LINE_BYTES: discarded, DUNNO (fail open), logged;
    # the policy connection goes on.
    postfix = postfix_long_lines
    sender = "m" * 100000 + "@example.org"
    result = postfix.swaks(sender, "huge@example.test")
    assert rcpt_reply(result).startswith("250 "), result.stdout[-2000:]
    assert result.returncode == 0
    deadline = time.monotonic() + 10
    while "request attribute too long" not in postfix.log_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = postfix.log_text()
    warnings = [line for line in log.splitlines() if "request attribute too long" in line]
    assert len(warnings) == 1, warnings
    assert "warning: request attribute too long: sender of 100019 bytes" in warnings[0]
    assert warnings[0].endswith("; answering DUNNO") and "client_address=127.0.0.1" in warnings[0]
    assert "451 4.3.5" not in log and "disconnecting" not in log
    # Greylisting goes on for ordinary mail.
    assert rcpt_reply(postfix.swaks("n@example.org", "huge@example.test")).startswith("450 ")


def test_policy_log_lines_look_like_postfix_own_in_maillog_file(tmp_path):
    # issue 15: the same time stamp format and host (myhostname's first
    # label, greylist_log_hostname) as smtpd's and postlog(1)'s lines.
    import re
    with instance("greylist_log_hostname = mx.example.test\n",
                  {"myhostname": "mx.example.test"}) as postfix:
        assert rcpt_reply(postfix.swaks("p@example.org", "q@example.test")).startswith("450 ")
        subprocess.run(["postlog", "-c", str(postfix.config_dir), "-t", "postfix/postlog",
                        "hello from postlog"], check=True, timeout=10,
                       stdin=subprocess.DEVNULL, capture_output=True)
        deadline = time.monotonic() + 10
        while "hello from postlog" not in postfix.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = postfix.log_text().splitlines()
    shape = re.compile(r"(\w{3} \d\d \d\d:\d\d:\d\d) (\S+) ([a-z/]+)\[\d+\]: (.*)")
    ours = [shape.fullmatch(line) for line in lines if " greylist[" in line]
    smtpd = [shape.fullmatch(line) for line in lines if " postfix/smtpd[" in line]
    postlog = [shape.fullmatch(line) for line in lines if "hello from postlog" in line]
    assert ours and smtpd and postlog
    assert all(ours) and all(smtpd) and all(postlog), lines
    hosts = {match.group(2) for match in ours + smtpd + postlog}
    assert hosts == {"mx"}
    assert any("reason=new" in match.group(4) for match in ours)
