"""End to end: correspondents learned from a real Postfix, and used by greylist.

One throw-away Postfix (tests/postfix_instance.py) serves every test of
this module, with:

    port         the greylisting smtpd: check_policy_service
                 unix:private/policy spawning greylist (inbound)
    submit       a submission-style smtpd whose mail goes through the
                 cleanup service cleanup-out, which looks the envelope
                 sender up in sender_bcc_maps and each recipient in
                 recipient_bcc_maps, both socketmap:unix:private/
                 greylist-learn (spawning greylist-socketmap -vv)
    out          a submission-style smtpd asking greylist --outbound
                 (unix:private/greylist-out) at RCPT and END-OF-MESSAGE
    out_reject   the same, but DATA is rejected (smtpd_data_restrictions
                 = reject), so END-OF-MESSAGE is never reached

Relaying from 127.0.0.1 is permitted on the three submission ports only,
by -o overrides (mynetworks = 127.0.0.0/8 and permit_mynetworks there;
the main.cf mynetworks keeps 127.0.0.1 out, as the greylisting smtpd
needs). Mail to remote.test leaves by the discard transport
(default_transport), so nothing bounces. All three programs share one database; each learner
logs to its own file, so every test can tell which learner learned what.
Each test uses its own addresses, so the tests do not depend on their
order.
"""

import os
import pathlib
import re
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from tests.conftest import require
from tests.postfix_instance import PostfixInstance, free_port, install_runtime, \
    postfix_available

pytestmark = pytest.mark.postfix

USER = "nobody"
LOCAL = "example.test"
# Long: nothing may pass the inbound check by waiting during these tests.
DELAY_S = 600
POLICY_OUT = "check_policy_service { unix:private/greylist-out, default_action=DUNNO }"


class Mx:
    """The running instance, its ports and its files."""

    def __init__(self, postfix: PostfixInstance, database: pathlib.Path, ports: dict):
        self.postfix = postfix
        self.database = str(database / "greylist")
        self.learn_log = database / "learn.log"
        self.out_log = database / "out.log"
        self.socket = str(postfix.queue_dir / "private" / "greylist-learn")
        self.__dict__.update(ports)

    def swaks(self, sender, recipients, port=None, extra=()):
        return self.postfix.swaks(sender, recipients, list(extra), port=port, timeout=20)


@pytest.fixture(scope="module")
def mx():
    require(postfix_available())
    root = pathlib.Path(tempfile.mkdtemp(prefix="greylist-corr-"))
    os.chmod(root, 0o755)
    try:
        database = root / "db"
        database.mkdir(mode=0o755)
        shutil.chown(database, USER)
        common = ("greylist_database = %s/greylist\ngreylist_delay = %ds\n"
                  "greylist_local_domains = %s\n" % (database, DELAY_S, LOCAL))
        inbound, learn, out = root / "inbound.cf", root / "learn.cf", root / "out.cf"
        inbound.write_text(common + "greylist_log = postlog:%s/queue/public/postlog\n" % root)
        learn.write_text(common + "greylist_log = %s/learn.log\n" % database)
        out.write_text(common + "greylist_log = %s/out.log\n"
                       "greylist_outbound_require_sasl = no\n" % database)
        argv = install_runtime(root, USER)
        if isinstance(argv, str):
            require(argv)
        python = " ".join(argv)
        ports = {"submit": free_port(), "out": free_port(), "out_reject": free_port()}
        master_cf = f"""\
127.0.0.1:{ports['submit']} inet n - n - - smtpd
  -o cleanup_service_name=cleanup-out
  -o mynetworks=127.0.0.0/8
  -o smtpd_relay_restrictions=permit_mynetworks,reject
  -o smtpd_recipient_restrictions=permit
cleanup-out unix n - n - 0 cleanup
  -o recipient_bcc_maps=socketmap:unix:private/greylist-learn:rcpt
  -o sender_bcc_maps=socketmap:unix:private/greylist-learn:sender
  -o header_checks=socketmap:unix:private/greylist-learn:header
greylist-learn unix - n n - 0 spawn
  user={USER} argv={python} -m greylist.cli.socketmap -vv -c {learn}
127.0.0.1:{ports['out']} inet n - n - - smtpd
  -o mynetworks=127.0.0.0/8
  -o smtpd_relay_restrictions=permit_mynetworks,reject
  -o smtpd_recipient_restrictions=$out_recipient_restrictions
  -o smtpd_end_of_data_restrictions=$out_end_of_data_restrictions
127.0.0.1:{ports['out_reject']} inet n - n - - smtpd
  -o mynetworks=127.0.0.0/8
  -o smtpd_relay_restrictions=permit_mynetworks,reject
  -o smtpd_recipient_restrictions=$out_recipient_restrictions
  -o smtpd_data_restrictions=reject
  -o smtpd_end_of_data_restrictions=$out_end_of_data_restrictions
greylist-out unix - n n - 0 spawn
  user={USER} argv={python} -m greylist -vv --outbound -c {out}
"""
        main_cf = {
            "default_transport": "discard:tests",
            "relay_transport": "discard:tests",
            # The policy check first: no permit before it can skip it.
            "out_recipient_restrictions": POLICY_OUT + ", permit",
            "out_end_of_data_restrictions": POLICY_OUT,
        }
        # Group postdrop reaches queue/public/postlog (mode 0710), see greylist(8).
        with PostfixInstance(root, argv + ["-m", "greylist", "-c", str(inbound)],
                             policy_user=USER + ":postdrop", extra_main_cf=main_cf,
                             extra_master_cf=master_cf) as postfix:
            for port in ports.values():
                banner(postfix, port)
            yield Mx(postfix, database, ports)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# Helpers ------------------------------------------------------------------

def banner(postfix: PostfixInstance, port: int, timeout: float = 10) -> None:
    """Wait until the smtpd on port greets; fail with the maillog if it does not."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                last = conn.recv(512)
                if last.startswith(b"220"):
                    conn.sendall(b"QUIT\r\n")
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError("smtpd on port %d not ready: %r\n%s"
                       % (port, last, postfix.log_text()[-3000:]))


def postmap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["postmap", *args], capture_output=True, text=True, timeout=15)


def table_stamp(mx: Mx, address: str) -> str | None:
    """The correspondent table's value for address, as Postfix reads it."""
    found = postmap("-q", address, "lmdb:%s-correspondents" % mx.database)
    assert found.returncode in (0, 1), found.stderr
    return found.stdout.strip() if found.returncode == 0 else None


def database(mx: Mx) -> dict[str, str]:
    """Every entry of the main database, as Postfix reads it."""
    listed = postmap("-s", "lmdb:" + mx.database)
    assert listed.returncode == 0, listed.stderr
    return dict(line.split("\t", 1) for line in listed.stdout.splitlines())


def pairs(mx: Mx) -> dict[str, str]:
    """The correspondent pairs in the database: key -> value."""
    return {k: v for k, v in database(mx).items() if k.startswith("@")}


def assert_pair(entries: dict, local: str, correspondent: str) -> None:
    value = entries.get("@%s/%s" % (local, correspondent))
    assert value is not None, entries
    assert re.fullmatch(r"1:\d+:\d+:\d+:correspondent", value), value


def read_from(path: pathlib.Path, offset: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def size(path: pathlib.Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def wait_for_log(path: pathlib.Path, offset: int, pattern: str, count: int = 1,
                 timeout: float = 15) -> str:
    """The text of path after offset once pattern (a regexp) occurs count times."""
    deadline = time.monotonic() + timeout
    while True:
        text = read_from(path, offset)
        if len(re.findall(pattern, text)) >= count:
            return text
        if time.monotonic() > deadline:
            raise TimeoutError("%r not seen %d times in %s after %ss:\n%s"
                               % (pattern, count, path, timeout, text[-3000:]))
        time.sleep(0.1)


def discarded(mx: Mx, offset: int, recipient: str) -> str:
    """Wait until the maillog (after offset) shows recipient discarded."""
    text = wait_for_log(mx.postfix.maillog, offset,
                        r"to=<%s>.* status=sent \(tests\)" % re.escape(recipient))
    assert "status=bounced" not in text and "status=deferred" not in text, text
    return text


def learner_lines(text: str) -> list[tuple[str, str]]:
    """(pid, message) of greylist-socketmap's lines in text, in order."""
    return re.findall(r"greylist-socketmap\[(\d+)\]: (.*)", text)


def replies(result: subprocess.CompletedProcess, command: str) -> list[str]:
    """The server's replies to each SMTP command starting with command."""
    lines, found = result.stdout.splitlines(), []
    for index, line in enumerate(lines):
        if line.startswith(" -> " + command) and index + 1 < len(lines):
            found.append(lines[index + 1][4:])
    assert found, "no %s in swaks output:\n%s" % (command, result.stdout)
    return found


def assert_sent(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout
    assert replies(result, ".")[-1].startswith("250 "), result.stdout


# 1. The socketmap under a real spawn(8) service -----------------------------

def test_postmap_lookup_through_spawn_learns_the_correspondent_and_finds_nothing(mx):
    # rob@remote.test: an address no other test uses, so nothing learned it before.
    rcpt_map, sender_map = ("socketmap:unix:%s:%s" % (mx.socket, name)
                            for name in ("rcpt", "sender"))
    assert table_stamp(mx, "rob@remote.test") is None
    log_at = size(mx.learn_log)
    found = postmap("-q", "Rob+Tag@Remote.Test", rcpt_map)
    assert (found.returncode, found.stdout, found.stderr) == (1, "", "")
    # Each postmap is a connection of its own: no sender was looked up
    # before this recipient, as for a message with the null sender, and
    # such a recipient teaches nothing (test 3).
    assert table_stamp(mx, "rob@remote.test") is None
    # A sender lookup is answered not found too, and learns nothing by itself.
    found = postmap("-q", "Alice@Example.Test", sender_map)
    assert (found.returncode, found.stdout, found.stderr) == (1, "", "")

    # An address in greylist_local_domains, or a subdomain of one, is never learned.
    for local in ("carol@example.test", "Dan@Sub.Example.Test"):
        found = postmap("-q", local, rcpt_map)
        assert (found.returncode, found.stdout) == (1, ""), found.stderr
        assert table_stamp(mx, local) is None
    log = read_from(mx.learn_log, log_at)
    # postmap sends the key as given (socketmap keys are not folded).
    assert "request: rcpt Rob+Tag@Remote.Test" in log
    assert "not learning Rob+Tag@Remote.Test: no sender lookup for this message" in log
    assert "learn: correspondent=" not in log
    assert "request: sender Alice@Example.Test" in log
    assert "not learning carol@example.test: local domain" in log
    assert "not learning Dan@Sub.Example.Test: local domain" in log
    # Each postmap is a connection (a process) of its own, and none looked
    # up a sender before its recipient: no pair.
    assert "learn: pair" not in log
    assert "warning" not in log and "fatal" not in log
    assert not [key for key in pairs(mx) if "rob" in key]


# 2. Outbound mail through cleanup-out teaches the reply its way in ------------

def test_reply_to_mail_sent_through_the_submission_cleanup_passes_at_its_first_attempt(mx):
    log_at, mail_at = size(mx.learn_log), size(mx.postfix.maillog)
    sent = mx.swaks("alice@example.test", "bob+tag@remote.test", mx.submit,
                    ["--header", "Subject: to bob"])
    assert_sent(sent)
    discarded(mx, mail_at, "bob+tag@remote.test")
    text = wait_for_log(mx.learn_log, log_at, r"learn: pair sender=alice@example.test "
                        r"correspondent=bob\+tag@remote.test")

    # What cleanup asked, in order, on one connection: the sender, then the
    # recipient, then (header_checks) each header line.
    text = wait_for_log(mx.learn_log, log_at, r"request: header Subject: to bob")
    lines = learner_lines(text)
    requests = [(pid, line) for pid, line in lines if line.startswith("request: ")]
    envelope = [line for _, line in requests if not line.startswith("request: header ")]
    assert envelope == [
        "request: sender alice@example.test", "request: rcpt bob+tag@remote.test"], text
    assert requests[2][1].startswith("request: header "), text
    assert len({pid for pid, _ in requests}) == 1
    # The table entry of bob@remote.test is "known" if the first test ran before.
    messages = [re.sub(r"(correspondent=\S+) known$", r"\1 new", line)
                for pid, line in lines if pid == requests[0][0]
                and not line.startswith(("request: ", "reply: ", "end of input"))]
    assert messages == [
        "sender alice@example.test",
        "learn: correspondent=bob+tag@remote.test new",
        "learn: pair sender=alice@example.test correspondent=bob+tag@remote.test new",
    ], text
    assert text.count("reply: 9:NOTFOUND ,") == len(requests)
    assert_pair(pairs(mx), "alice@example.test", "bob@remote.test")
    assert table_stamp(mx, "bob@remote.test").isdigit()

    # The reply: accepted at its first attempt, for its pair.
    mail_at = size(mx.postfix.maillog)
    reply = mx.swaks("bob@remote.test", "alice@example.test", None,
                     ["--header", "Subject: Re: to bob"])
    assert replies(reply, "RCPT TO")[0].startswith("250 "), reply.stdout
    assert_sent(reply)
    assert "Subject: Re: to bob" in mx.postfix.wait_for_delivery("alice@example.test")
    log = read_from(mx.postfix.maillog, mail_at)
    assert re.search(r"greylist\[\d+\]: action=DUNNO reason=correspondent .*"
                     r"sender=bob@remote.test rcpt=alice@example.test", log), log

    # The same sender to another local user, another sender to alice: greylisted.
    for sender, rcpt in (("bob@remote.test", "carol@example.test"),
                         ("eve@remote.test", "alice@example.test")):
        other = mx.swaks(sender, rcpt)
        assert replies(other, "RCPT TO")[0].startswith("450 4.7.1 "), other.stdout
    log = read_from(mx.postfix.maillog, mail_at)
    assert "reason=new age=0 client=127.0.0.1 sender=bob@remote.test " \
           "rcpt=carol@example.test" in log
    assert "reason=new age=0 client=127.0.0.1 sender=eve@remote.test " \
           "rcpt=alice@example.test" in log
    assert "451 4.3.5" not in log and "warning: premature end-of-input" not in log


# 3. The null sender ----------------------------------------------------------

def test_null_sender_message_is_not_paired_with_the_previous_senders_message(mx):
    """A message with the null sender right after a normal one from the
    same client, both through cleanup-out.

    Finding (Postfix 3.7.11): cleanup makes NO sender_bcc_maps lookup for
    the null sender (cleanup_addr_sender() skips an empty address, and
    maps_find() never looks up an empty key). Observed on one learner
    connection (one idle cleanup process takes the next message), in
    this order:
        sender nora@example.test    (message 1, MAIL FROM:<nora@...>)
        rcpt bob@remote.test        (message 1)
        rcpt dave@remote.test       (message 2, MAIL FROM:<>)
    greylist-socketmap (commit 747175c) kept the last sender for
    SENDER_TTL_S = 300 s, so it learned "pair sender=nora@example.test
    correspondent=dave@remote.test new". Fixed: the header_checks lookups
    (map "header") that cleanup makes after each message's envelope
    end it, and the learner forgets the sender at the first one. The sender is remembered per
    learner connection, that is per cleanup process, not per client or
    user: a null-sender message from anyone, right after nora's message,
    is paired with nora.

    Correct behaviour, asserted here: no pair (nora, dave). The
    null-sender message (a bounce, read receipt or vacation reply made by
    software) is not mail that nora wrote to dave, and the pair would let
    anything with envelope sender dave@remote.test into nora's mailbox
    without greylisting.

    Nor is dave@remote.test learned into the correspondent table: the
    header lookups mark the end of the envelope before it, so it has no
    sender, and a recipient without one teaches nothing. An auto-reply
    (a Sieve vacation reply, through pickup and cleanup-out) to spam goes
    to the spam's envelope sender; learned, that address would skip
    greylisting for every local user (found in review).
    """
    log_at, mail_at = size(mx.learn_log), size(mx.postfix.maillog)
    assert_sent(mx.swaks("nora@example.test", "bob@remote.test", mx.submit))
    assert_sent(mx.swaks("<>", "dave@remote.test", mx.submit,
                         ["--header", "Subject: Read: your message"]))
    discarded(mx, mail_at, "bob@remote.test")
    log = discarded(mx, mail_at, "dave@remote.test")
    assert re.search(r"from=<>, size=", log), log
    wait_for_log(mx.learn_log, log_at, r"request: rcpt dave@remote.test")
    time.sleep(0.3)  # the learn lines after the last request
    text = read_from(mx.learn_log, log_at)
    lines = learner_lines(text)
    requests = [(pid, line) for pid, line in lines if line.startswith("request: ")]
    # The lookups of both messages, as observed: none for the null sender;
    # message 1's header lookups (header_checks) end its envelope.
    envelope = [line for _, line in requests if not line.startswith("request: header ")]
    assert envelope == [
        "request: sender nora@example.test", "request: rcpt bob@remote.test",
        "request: rcpt dave@remote.test"], text
    order = [line for _, line in requests]
    between = order[2:order.index("request: rcpt dave@remote.test")]
    assert between and all(line.startswith("request: header ") for line in between), text
    # The precondition of the hazard: both messages on one learner connection.
    assert len({pid for pid, _ in requests}) == 1, text

    assert "@nora@example.test/bob@remote.test" in pairs(mx)
    assert "@nora@example.test/dave@remote.test" not in pairs(mx), (
        "the null-sender message's recipient was paired with the sender of the "
        "message before it:\n" + text)
    assert "pair sender=nora@example.test correspondent=dave@remote.test" not in text
    assert table_stamp(mx, "dave@remote.test") is None
    assert "not learning dave@remote.test: no sender lookup for this message" in text


# 4. greylist --outbound on a real submission smtpd ---------------------------

def test_outbound_policy_learns_every_recipient_of_a_message_it_sees_end(mx):
    log_at, mail_at = size(mx.out_log), size(mx.postfix.maillog)
    sent = mx.swaks("alice2@example.test", "bob2@remote.test,carol2@remote.test", mx.out)
    assert [r[:4] for r in replies(sent, "RCPT TO")] == ["250 ", "250 "], sent.stdout
    assert_sent(sent)
    discarded(mx, mail_at, "bob2@remote.test")
    discarded(mx, mail_at, "carol2@remote.test")
    text = wait_for_log(mx.out_log, log_at, r"learn: pair sender=alice2@example.test", 2)
    assert "learn: pair sender=alice2@example.test correspondent=bob2@remote.test new" in text
    assert "learn: pair sender=alice2@example.test correspondent=carol2@remote.test new" in text
    # Asked at both RCPTs and at END-OF-MESSAGE (which has no recipient, two of them).
    assert len(re.findall(r"request: request=smtpd_access_policy protocol_state=RCPT ", text)) == 2
    end = re.findall(r"request: .*protocol_state=END-OF-MESSAGE .*", text)
    assert len(end) == 1 and "recipient_count=2 " in end[0], text
    assert not re.search(r" recipient=\S", end[0]), end
    entries = pairs(mx)
    assert_pair(entries, "alice2@example.test", "bob2@remote.test")
    assert_pair(entries, "alice2@example.test", "carol2@remote.test")
    assert table_stamp(mx, "bob2@remote.test").isdigit()
    assert table_stamp(mx, "carol2@remote.test").isdigit()
    # The socketmap learner never saw this mail (it went through the main cleanup).
    assert "bob2@remote.test" not in read_from(mx.learn_log, 0)

    # The reply of one of them passes at its first attempt.
    reply = mx.swaks("carol2@remote.test", "alice2@example.test")
    assert replies(reply, "RCPT TO")[0].startswith("250 "), reply.stdout
    assert_sent(reply)
    log = read_from(mx.postfix.maillog, mail_at)
    assert re.search(r"action=DUNNO reason=correspondent .*sender=carol2@remote.test "
                     r"rcpt=alice2@example.test", log), log


def test_outbound_policy_learns_nothing_from_a_message_rejected_after_rcpt(mx):
    log_at = size(mx.out_log)
    rejected = mx.swaks("alice3@example.test", "bob3@remote.test", mx.out_reject)
    assert replies(rejected, "RCPT TO")[0].startswith("250 "), rejected.stdout
    assert replies(rejected, "DATA")[0].startswith("554 5.7.1 "), rejected.stdout
    # The policy was asked at RCPT (so the recipient was collected), never after.
    text = wait_for_log(mx.out_log, log_at, r"protocol_state=RCPT .*recipient=bob3@remote.test")
    time.sleep(0.3)
    text = read_from(mx.out_log, log_at)
    assert "END-OF-MESSAGE" not in text
    assert "learn:" not in text
    assert "@alice3@example.test/bob3@remote.test" not in pairs(mx)
    assert table_stamp(mx, "bob3@remote.test") is None
    assert "warning" not in read_from(mx.out_log, 0)
