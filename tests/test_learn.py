"""The correspondent learners: what is learned, refreshed, refused; and the
inbound policy's use of it (reason correspondent)."""

import os
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st

from greylist.config import Config, resolve
from greylist.core import correspondents
from greylist.core.decide import CORRESPONDENT_PAIR, Records, decide
from greylist.core.record import CORRESPONDENT, PASSED, Record, decode, encode
from greylist.core.triple import pair_key
from greylist.handlers.learn import (SENDER_TTL_S, OutboundHandler, OutboundSession,
                                     SocketmapHandler, SocketmapSession)
from greylist.protocols.policy import ProtocolError
from greylist.stores.cleanup import Cleaner
from greylist.stores.lmdb import LmdbStore
from greylist.wiring import outbound_service, socketmap_service
from tests.conftest import Clock, Recorder

T = 1_800_000_000
LIFETIME = 60 * 86400
CFG = Config(local_domains=("example.com",))


def netstring(text: str) -> bytes:
    data = text.encode("utf-8", "surrogateescape")
    return b"%d:%s," % (len(data), data)


@pytest.fixture
def cfg(tmp_path):
    os.chmod(tmp_path, 0o755)
    return resolve(CFG._replace(database=str(tmp_path / "greylist"), log=str(tmp_path / "log"),
                                allow_root=True))


# What is learned, and under which keys.

@pytest.mark.parametrize("address, reason", [
    ("bob@remote.test", None),
    ("Bob+Tag@Remote.TEST", None),
    ("bob@remote.test.", None),
    ("", correspondents.NULL),
    ("<>", correspondents.NULL),
    ("bob", correspondents.IMPLAUSIBLE),
    ("@remote.test", correspondents.IMPLAUSIBLE),
    ("bob@localhost", correspondents.IMPLAUSIBLE),
    ("bob@[192.0.2.1]", correspondents.IMPLAUSIBLE),
    ("bo b@remote.test", correspondents.IMPLAUSIBLE),
    ("bob\n@remote.test", correspondents.IMPLAUSIBLE),
    ("b" * 250 + "@remote.test", correspondents.IMPLAUSIBLE),
    ("MAILER-DAEMON@remote.test", correspondents.AUTOMATIC_SENDER),
    ("double-bounce@remote.test", correspondents.AUTOMATIC_SENDER),
    ("carol@example.com", correspondents.LOCAL_DOMAIN),
    ("carol@Mail.Example.COM", correspondents.LOCAL_DOMAIN),
    ("carol@notexample.com", None),
])
def test_screen_refuses_what_must_never_be_learned(address, reason):
    assert correspondents.screen(address, CFG) == reason


def test_the_table_key_is_what_check_sender_access_finds():
    assert correspondents.table_key("Bob+Tag@Remote.TEST.", CFG) == b"bob@remote.test"


def test_a_reply_from_bob_finds_the_pair_learned_when_alice_x_wrote_to_bob_tag():
    assert correspondents.pair("Alice+x@Example.com", "Bob+Tag@Remote.TEST", CFG) \
        == pair_key("alice@example.com", "bob@remote.test", "+") \
        == b"@alice@example.com/bob@remote.test"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30), st.text(max_size=30), st.sampled_from(["", "+", "+-", "#", "-_"]))
def test_the_inbound_pair_key_is_the_learned_pair_key(recipient, sender, delimiters):
    from greylist.core.triple import Triple, keys
    sender = "x@y" if sender in ("", "<>") else sender
    triple = Triple("192.0.2", sender, recipient)
    assert keys(triple, delimiters).pair == pair_key(
        recipient.casefold(), sender.casefold(), delimiters)
    assert keys(triple).pair is None
    assert keys(Triple("192.0.2", "<>", recipient), delimiters).pair is None


@pytest.mark.parametrize("old, result", [
    (None, "new"),
    (b"%d" % T, None),
    (b"%d" % (T - LIFETIME // 2), None),
    (b"%d" % (T - LIFETIME // 2 - 1), "refreshed"),
    (b"garbage", "refreshed"),
])
def test_a_time_stamp_is_rewritten_only_past_half_its_lifetime(old, result):
    news, got = correspondents.stamp_change(T, CFG)([old])
    assert got == result
    assert news == ([None] if result is None else [b"%d" % T])


def test_a_pair_is_refreshed_past_half_its_lifetime_and_renewed_after_it():
    change = correspondents.pair_change(T, CFG)
    assert change([None]) == ([encode(Record(T, T, 1, CORRESPONDENT))], "new")
    fresh = encode(Record(T - 10, T - 10, 3, CORRESPONDENT))
    assert change([fresh]) == ([None], None)
    half = encode(Record(T - LIFETIME, T - LIFETIME // 2 - 1, 3, CORRESPONDENT))
    assert change([half]) == ([encode(Record(T - LIFETIME, T, 4, CORRESPONDENT))],
                              "refreshed")
    gone = encode(Record(T - 3 * LIFETIME, T - LIFETIME - 1, 3, CORRESPONDENT))
    assert change([gone]) == ([encode(Record(T, T, 1, CORRESPONDENT))], "new")
    future = encode(Record(T + 999, T + 999, 1, CORRESPONDENT))
    assert change([future])[1] == "refreshed"


# The socketmap handler: cleanup's order of lookups.

def test_each_recipient_is_paired_with_the_sender_looked_up_before_it():
    handler, session = SocketmapHandler(CFG), SocketmapSession()
    assert handler.lookup("sender", "alice@example.com", session, T)[0] == []
    found, _ = handler.lookup("rcpt", "bob@remote.test", session, T)
    assert [(plan.store, plan.key) for plan in found] == [
        ("database", b"@alice@example.com/bob@remote.test")]
    handler.lookup("sender", "dave@example.com", session, T)
    found, _ = handler.lookup("rcpt", "bob@remote.test", session, T)
    assert found[0].key == b"@dave@example.com/bob@remote.test"


def test_the_table_is_learned_when_there_is_one(cfg):
    handler, session = SocketmapHandler(cfg), SocketmapSession()
    handler.lookup("sender", "alice@example.com", session, T)
    found, _ = handler.lookup("rcpt", "Bob@Remote.test", session, T)
    assert [(plan.store, plan.key) for plan in found] == [
        ("table", b"bob@remote.test"), ("database", b"@alice@example.com/bob@remote.test")]


def test_a_null_sender_message_teaches_nothing_not_even_the_table(cfg):
    # A vacation reply (Sieve, through pickup and cleanup-out) to spam goes
    # to the spam's envelope sender: learned into the correspondent table,
    # that address would skip greylisting for every local user. And a
    # reply to a colleague would teach a local address that spam forges.
    handler = SocketmapHandler(cfg._replace(local_domains=()))   # the default
    session = SocketmapSession()
    handler.lookup("sender", "alice@example.com", session, T)
    handler.lookup("rcpt", "bob@remote.test", session, T)
    handler.lookup("header", "Subject: hello", session, T)
    for address in ("spammer@spam.test", "carol@example.com"):
        assert handler.lookup("rcpt", address, session, T) == (
            [], "not learning %s: no sender lookup for this message (the null sender, "
                "or a recipient from its headers)" % address)
    # A lookup without any sender before it, as on a fresh connection.
    assert handler.lookup("rcpt", "spammer@spam.test", SocketmapSession(), T)[0] == []


def test_an_automatic_or_implausible_sender_teaches_nothing_not_even_the_table(cfg):
    # cleanup looks up a MAILER-DAEMON sender of another domain than
    # $myorigin (only MAILER-DAEMON@$myorigin becomes the null sender,
    # cleanup_addr.c): an auto-reply or bounce from a local program is sent
    # to whatever return path came in, which the correspondent table must
    # not learn (found in review: the pair was refused, the table written).
    handler = SocketmapHandler(cfg)
    for sender in ("MAILER-DAEMON@lists.example.org", "double-bounce@example.org",
                   "<>", "no address"):
        session = SocketmapSession()
        handler.lookup("sender", sender, session, T)
        assert handler.lookup("rcpt", "victim@forged.test", session, T)[0] == [], sender
    outbound = OutboundHandler(cfg._replace(outbound_require_sasl=False))
    session = OutboundSession()
    for state in ("RCPT", "END-OF-MESSAGE"):
        found, _ = outbound.request({"request": "smtpd_access_policy", "protocol_state": state,
                                     "instance": "1", "recipient_count": "1",
                                     "sender": "MAILER-DAEMON@lists.example.org",
                                     "recipient": "victim@forged.test"}, session, T)
        assert found == []


def test_a_null_sender_lookup_forgets_the_sender_of_an_aborted_message():
    # smtpd aborted the message after RCPT (QUIT, RSET): no header lookup
    # ended its envelope. sender_canonical_maps looks up the next message's
    # null sender as '""' (found in review with Postfix 3.7: without it the
    # next null-sender message's recipients were paired with alice).
    handler, session = SocketmapHandler(CFG), SocketmapSession()
    handler.lookup("sender", "alice@example.com", session, T)
    assert handler.lookup("rcpt", "carol@remote.test", session, T)[0]
    for null in ('""', "", "<>"):
        assert handler.lookup("sender", null, session, T + 1) == (
            [], "sender <> (the null sender)")
        assert session.sender is None
        assert handler.lookup("rcpt", "spammer@spam.test", session, T + 1)[0] == []


def test_a_sender_is_forgotten_after_its_time():
    handler, session = SocketmapHandler(CFG), SocketmapSession()
    handler.lookup("sender", "alice@example.com", session, T)
    assert handler.lookup("rcpt", "bob@remote.test", session, T + SENDER_TTL_S)[0]
    assert handler.lookup("rcpt", "bob@remote.test", session, T + SENDER_TTL_S + 1)[0] == []
    assert session.sender is None


def test_a_sender_looked_up_before_the_clock_stepped_back_is_forgotten():
    # Its age is unknown then: a recipient an hour "earlier" may be the
    # null sender's, not alice's.
    handler, session = SocketmapHandler(CFG), SocketmapSession()
    handler.lookup("sender", "alice@example.com", session, T)
    assert handler.lookup("rcpt", "bob@remote.test", session, T - 3600)[0] == []
    assert session.sender is None


def test_the_first_header_lookup_ends_the_envelope():
    handler, session = SocketmapHandler(CFG), SocketmapSession()
    handler.lookup("sender", "alice@example.com", session, T)
    assert handler.lookup("rcpt", "bob@remote.test", session, T)[0]
    assert handler.lookup("header", "Subject: hello", session, T) == ([], None)
    # A null-sender message next: its recipient is not alice's.
    assert handler.lookup("rcpt", "dave@remote.test", session, T)[0] == []


def test_local_and_automatic_recipients_are_not_learned_and_say_why():
    handler, session = SocketmapHandler(CFG), SocketmapSession()
    handler.lookup("sender", "alice@example.com", session, T)
    assert handler.lookup("rcpt", "carol@example.com", session, T) == (
        [], "not learning carol@example.com: local domain")
    assert handler.lookup("rcpt", "MAILER-DAEMON@x.test", session, T)[0] == []


def test_an_automatic_sender_teaches_no_pair():
    handler, session = SocketmapHandler(CFG), SocketmapSession()
    handler.lookup("sender", "MAILER-DAEMON@example.com", session, T)
    assert handler.lookup("rcpt", "bob@remote.test", session, T)[0] == []


def test_an_unknown_map_name_is_answered_with_one_warning():
    handler, session = SocketmapHandler(CFG), SocketmapSession()
    assert handler.lookup("recipient", "bob@remote.test", session, T)[1].startswith(
        "warning: socketmap lookup in unknown map recipient")
    assert handler.lookup("recipient", "bob@remote.test", session, T) == ([], None)


# The outbound policy handler: collected at RCPT, learned at END-OF-MESSAGE.

def request(state, **attrs):
    base = {"request": "smtpd_access_policy", "protocol_state": state, "instance": "1a",
            "sender": "alice@example.com", "sasl_username": "alice"}
    base.update(attrs)
    return {name: value for name, value in base.items() if value is not None}


def outbound(requests, cfg=CFG):
    handler, session = OutboundHandler(cfg), OutboundSession()
    found = []
    for attrs in requests:
        found.extend(plan.key for plan in handler.request(attrs, session, T)[0])
    return found


def test_every_recipient_of_a_message_is_learned_at_end_of_message():
    assert outbound([request("RCPT", recipient="bob@remote.test"),
                     request("RCPT", recipient="carol@other.test"),
                     request("RCPT", recipient="bob@remote.test"),
                     request("DATA", recipient_count="3"),
                     request("END-OF-MESSAGE", recipient="", recipient_count="3")]) == [
        b"@alice@example.com/bob@remote.test", b"@alice@example.com/carol@other.test"]


def test_an_over_long_recipient_is_counted_but_not_kept():
    # Review: one connection to greylistd sent 10000 RCPTs of 64 KB each
    # for one message, and the daemon held 640 MB until END-OF-MESSAGE.
    handler, session = OutboundHandler(CFG), OutboundSession()
    long = "x" * 65000 + "@remote.test"
    for recipient in ("bob@remote.test", long):
        handler.request(request("RCPT", recipient=recipient), session, T)
    assert session.recipients == ["bob@remote.test", ""]
    found, line = handler.request(request("END-OF-MESSAGE", recipient="",
                                          recipient_count="2"), session, T)
    assert [plan.key for plan in found] == [b"@alice@example.com/bob@remote.test"]
    assert line == "not learning a recipient (longer than 320 characters)"


def test_nothing_is_learned_before_end_of_message():
    assert outbound([request("RCPT", recipient="bob@remote.test"),
                     request("DATA", recipient_count="1")]) == []


def test_a_recipient_rejected_after_the_policy_check_teaches_nothing():
    # Two recipients collected, one accepted: which one is unknown.
    assert outbound([request("RCPT", recipient="bob@remote.test"),
                     request("RCPT", recipient="carol@other.test"),
                     request("END-OF-MESSAGE", recipient="bob@remote.test",
                             recipient_count="1")]) == []


def test_a_new_message_starts_a_new_collection():
    assert outbound([request("RCPT", recipient="bob@remote.test"),
                     request("RCPT", instance="2b", recipient="carol@other.test"),
                     request("END-OF-MESSAGE", instance="2b", recipient="carol@other.test",
                             recipient_count="1")]) == [
        b"@alice@example.com/carol@other.test"]


def test_unauthenticated_mail_teaches_nothing_unless_allowed():
    messages = [request("RCPT", recipient="bob@remote.test", sasl_username=None),
                request("END-OF-MESSAGE", recipient="bob@remote.test", recipient_count="1",
                        sasl_username=None)]
    assert outbound(messages) == []
    assert outbound(messages, CFG._replace(outbound_require_sasl=False)) == [
        b"@alice@example.com/bob@remote.test"]


def test_an_outbound_message_with_the_null_sender_teaches_nothing(cfg):
    # An authenticated client's MAIL FROM:<> (an auto-reply it sends).
    handler, session = OutboundHandler(cfg), OutboundSession()
    assert handler.request(request("RCPT", sender="", recipient="spammer@spam.test"),
                           session, T) == ([], None)
    assert handler.request(request("END-OF-MESSAGE", sender="", recipient="spammer@spam.test",
                                   recipient_count="1"), session, T) == (
        [], "not learning message 1a: the null sender")


def test_an_outbound_request_of_another_kind_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        OutboundHandler(CFG).request({"request": "junk"}, OutboundSession(), T)


# The services on real LMDB files.

def txnid(store) -> int:
    """The last committed transaction of a store's file."""
    from greylist.stores.lock import SHARED
    return store.env.run(SHARED, lambda env: env.info()["last_txnid"])


def read(path) -> str:
    with open(path) as handle:
        return handle.read()


def test_a_known_fresh_address_costs_no_write(cfg):
    log, clock = Recorder(), Clock(T)
    service = socketmap_service(cfg, log, clock, cleanup=False)
    session = service.new_session()
    assert service.reply(("sender", "alice@example.com"), session) == b"9:NOTFOUND ,"
    service.reply(("rcpt", "bob@remote.test"), session)
    before = (txnid(service.store), txnid(service.table))
    clock.now = T + LIFETIME // 2
    for _ in range(5):
        service.reply(("sender", "alice@example.com"), session)
        service.reply(("rcpt", "Bob@Remote.test"), session)
    assert (txnid(service.store), txnid(service.table)) == before
    clock.now = T + LIFETIME // 2 + 1
    service.reply(("sender", "alice@example.com"), session)
    service.reply(("rcpt", "bob@remote.test"), session)
    assert (txnid(service.store), txnid(service.table)) == (before[0] + 1, before[1] + 1)
    assert log.lines == [
        "learn: correspondent=bob@remote.test new",
        "learn: pair sender=alice@example.com correspondent=bob@remote.test new",
        "learn: correspondent=bob@remote.test refreshed",
        "learn: pair sender=alice@example.com correspondent=bob@remote.test refreshed"]


def test_the_inbound_policy_passes_a_learned_correspondent_and_no_one_else(cfg):
    from greylist.wiring import policy_service, stores
    log, found = Recorder(), stores(cfg)
    learner = outbound_service(cfg, log, Clock(T), cleanup=False, found=found)
    session = learner.new_session()
    learner.reply(request("RCPT", recipient="Bob+x@Remote.test"), session)
    learner.reply(request("END-OF-MESSAGE", recipient="Bob+x@Remote.test",
                          recipient_count="1"), session)
    policy = policy_service(cfg, Recorder(), Clock(T + 60), cleanup=False, found=found)

    def action(sender, recipient):
        return policy.answer({"request": "smtpd_access_policy", "protocol_state": "RCPT",
                              "client_address": "192.0.2.7", "sender": sender,
                              "recipient": recipient}, policy.new_session())
    assert action("bob@remote.test", "Alice+lists@example.com") == "DUNNO"
    assert policy.log.lines[-1].startswith("action=DUNNO reason=correspondent age=60 ")
    assert action("bob@remote.test", "carol@example.com").startswith("DEFER_IF_PERMIT")
    assert action("eve@remote.test", "alice@example.com").startswith("DEFER_IF_PERMIT")
    assert action("", "alice@example.com").startswith("DEFER_IF_PERMIT")


def test_a_forged_correspondent_sender_earns_no_whitelisting_for_its_next_message(cfg):
    # Review: a message with the forged sender bob@remote.test to alice (a
    # learned pair) and to victim0 passed victim0 as "message" and wrote
    # a passed triple, a sender entry and a client count: every later
    # message from that /24 with that sender passed as awl-sender.
    from greylist.wiring import policy_service, stores
    found = stores(cfg)
    learner = outbound_service(cfg, Recorder(), Clock(T), cleanup=False, found=found)
    session = learner.new_session()
    learner.reply(request("RCPT", recipient="bob@remote.test"), session)
    learner.reply(request("END-OF-MESSAGE", recipient="bob@remote.test",
                          recipient_count="1"), session)
    log, clock = Recorder(), Clock(T + 60)
    policy = policy_service(cfg, log, clock, cleanup=False, found=found)

    def action(session, recipient, instance):
        return policy.answer({"request": "smtpd_access_policy", "protocol_state": "RCPT",
                              "client_address": "203.0.113.5", "instance": instance,
                              "sender": "bob@remote.test", "recipient": recipient}, session)
    forged = policy.new_session()
    assert action(forged, "alice@example.com", "s0") == "DUNNO"
    assert action(forged, "victim0@example.com", "s0") == "DUNNO"
    assert log.lines[-1].startswith("action=DUNNO reason=message ")
    # Nothing was recorded for the client or the sender: the next
    # message, hours later, to a new recipient is greylisted.
    clock.now = T + 5 * 3600
    assert action(policy.new_session(), "victim1@example.com", "s1").startswith(
        "DEFER_IF_PERMIT")
    assert " reason=new " in log.lines[-1]
    # victim0 itself was not recorded as passed either.
    assert action(policy.new_session(), "victim0@example.com", "s2").startswith(
        "DEFER_IF_PERMIT")


def test_correspondent_check_no_ignores_learned_pairs(cfg):
    store = LmdbStore(cfg.database)
    store.put(b"@alice@example.com/bob@remote.test",
              encode(Record(T, T, 1, CORRESPONDENT)))
    store.close()
    from greylist.wiring import policy_service
    policy = policy_service(cfg._replace(correspondent_check=False), Recorder(), Clock(T),
                            cleanup=False)
    assert policy.answer({"request": "smtpd_access_policy", "protocol_state": "RCPT",
                          "client_address": "192.0.2.7", "sender": "bob@remote.test",
                          "recipient": "alice@example.com"},
                         policy.new_session()).startswith("DEFER_IF_PERMIT")


def test_decide_passes_a_live_pair_without_writing_and_lets_the_message_through():
    live = Record(T, T, 1, CORRESPONDENT)
    decision = decide(Records(pair=live), T + LIFETIME, CFG)
    # Not proven: a forged sender can name the pair (see the next test).
    assert (decision.action, decision.reason, decision.proven) == (
        "DUNNO", CORRESPONDENT_PAIR, False)
    assert decision.writes == Records()
    # The rest of the message passes, with no writes.
    rest = decide(Records(), T, CFG, message_accepted=True, message_exempt=True)
    assert (rest.action, rest.reason, rest.writes, rest.proven) == (
        "DUNNO", "message", Records(), False)
    assert decide(Records(pair=live), T + LIFETIME + 1, CFG).reason == "new"
    # A record of another kind in the pair's place is no pair.
    assert decide(Records(pair=Record(T, T, 1, PASSED)), T, CFG).reason == "new"


def test_cleanup_drops_expired_correspondents_and_pairs(cfg):
    database, table = LmdbStore(cfg.database), LmdbStore(cfg.correspondent_table)
    database.put(b"@a@example.com/old@remote.test",
                 encode(Record(T, T, 1, CORRESPONDENT)))
    database.put(b"@a@example.com/new@remote.test",
                 encode(Record(T, T + LIFETIME, 1, CORRESPONDENT)))
    table.put(b"old@remote.test", b"%d" % T)
    table.put(b"new@remote.test", b"%d" % (T + LIFETIME))
    log = Recorder()
    cleaner = Cleaner(database, None, cfg, log, Clock(T + LIFETIME + 1),
                      correspondents=table)
    state = cleaner.step(start=True)
    while state.position is not None:
        state = cleaner.step(start=True)
    assert log.lines[-1] == "cleanup: full retained=2 dropped=2"
    assert [k for k, _ in database.items()] == [b"@a@example.com/new@remote.test"]
    assert [k for k, _ in table.items()] == [b"new@remote.test"]
    cleaner.close()


# greylist-socketmap as a process: bad input and broken stores.

def learner(cfg_path, data: bytes, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "greylist.cli.socketmap", "-c", cfg_path],
                          input=data, capture_output=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))


@pytest.fixture
def settings(tmp_path, cfg):
    path = tmp_path / "greylist.cf"
    path.write_text("greylist_database = %s\ngreylist_log = %s\ngreylist_allow_root = yes\n"
                    "greylist_local_domains = example.com\n" % (cfg.database, cfg.log))
    return str(path)


@pytest.mark.parametrize("bad, logged", [
    (b"x5:rcpt a,", "bad netstring length"),
    (b"6:rcpt abX", "terminating comma"),
    (b"99999999:", "limit"),
    (b"11:rcpt a", "inside a request"),
    (b"\x00\xff\xfe garbage\n", "bad netstring length"),
])
def test_a_framing_error_closes_the_connection_with_a_log_line_and_nothing_else(
        settings, cfg, bad, logged):
    result = learner(settings, netstring("rcpt bob@remote.test") + bad)
    assert result.stdout == b"9:NOTFOUND ,"
    assert result.stderr == b""
    assert result.returncode == 1
    text = read(cfg.log)
    assert logged in text and "disconnecting without a reply" in text


def test_a_slow_drip_is_answered_when_complete(settings, cfg):
    proc = subprocess.Popen([sys.executable, "-m", "greylist.cli.socketmap", "-c", settings],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        for byte in netstring("rcpt drip@remote.test"):
            proc.stdin.write(bytes([byte]))
            proc.stdin.flush()
            time.sleep(0.005)
        proc.stdin.close()
        assert proc.stdout.read() == b"9:NOTFOUND ,"
        assert proc.wait(timeout=10) == 0
        assert proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def lookups() -> bytes:
    return netstring("sender alice@example.com") + netstring("rcpt bob@remote.test") * 3


@pytest.mark.parametrize("damage", ["corrupt", "unreadable", "directory"])
def test_a_broken_table_still_gets_notfound_and_one_warning(settings, cfg, damage):
    if damage == "unreadable" and os.geteuid() == 0:
        # root reads anything: make it unreadable by being a directory.
        damage = "directory"
    table = cfg.correspondent_table + ".lmdb"
    if damage == "corrupt":
        with open(table, "wb") as handle:
            handle.write(b"\x00garbage" * 4096)
    elif damage == "unreadable":
        open(table, "wb").close()
        os.chmod(table, 0)
    else:
        os.mkdir(table)
    result = learner(settings, lookups())
    assert (result.stdout, result.stderr, result.returncode) == (
        b"9:NOTFOUND ," * 4, b"", 0)
    warnings = [line for line in read(cfg.log).splitlines() if "warning:" in line]
    assert 1 <= len(warnings) <= 2 and "learning nothing" in warnings[0], warnings
    # The pair in the database was still learned.
    assert b"@alice@example.com/bob@remote.test" in dict(LmdbStore(cfg.database).items())


def test_a_broken_database_still_gets_notfound(settings, cfg):
    with open(cfg.database + ".lmdb", "wb") as handle:
        handle.write(b"not an lmdb file" * 1000)
    result = learner(settings, lookups())
    assert (result.stdout, result.stderr, result.returncode) == (
        b"9:NOTFOUND ," * 4, b"", 0)
    assert "learning nothing" in read(cfg.log)


def test_memory_stays_bounded_under_a_stream_of_lookups(settings, cfg):
    data = netstring("sender alice@example.com") + b"".join(
        netstring("rcpt user%d@remote%d.test" % (n, n % 7)) for n in range(3000))
    code = ("import resource, subprocess, sys\n"
            "p = subprocess.run([sys.executable, '-m', 'greylist.cli.socketmap', '-c', %r],"
            " input=sys.stdin.buffer.read(), capture_output=True)\n"
            "print(p.returncode, len(p.stdout),"
            " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)" % settings)
    result = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True,
                            timeout=120, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    status, length, rss_kb = result.stdout.split()
    assert (int(status), int(length)) == (0, 3001 * 12)
    assert int(rss_kb) < 60 * 1024
    assert LmdbStore(cfg.correspondent_table).info()["entries"] == 3000


def test_postmap_reads_the_learned_table(settings, cfg, postmap):
    learner(settings, lookups())
    result = subprocess.run([postmap, "-q", "bob@remote.test",
                             "lmdb:" + cfg.correspondent_table],
                            capture_output=True, text=True, timeout=10)
    assert result.returncode == 0 and result.stdout.strip().isdigit()
    value = dict(LmdbStore(cfg.database).items())[b"@alice@example.com/bob@remote.test"]
    assert decode(value).state == CORRESPONDENT


def test_a_read_only_table_still_gets_notfound(public_tmp):
    """The learner as an unprivileged user, with a table it may only read."""
    from tests.conftest import require
    from tests.postfix_instance import install_runtime
    import pwd
    require(None if os.geteuid() == 0 else "needs root to run the learner as nobody")
    tmp_path = public_tmp
    argv = install_runtime(tmp_path)
    require(argv if isinstance(argv, str) else None)
    nobody = pwd.getpwnam("nobody")
    home = tmp_path / "db"
    home.mkdir(mode=0o755)
    table = LmdbStore(str(home / "greylist-correspondents"))
    table.put(b"old@remote.test", b"1")
    table.close()  # root's file, mode 0644: nobody may read it only
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    (tmp_path / "greylist.cf").write_text(
        "greylist_database = %s/greylist\ngreylist_log = %s/log\n" % (home, home))
    result = subprocess.run(["runuser", "-u", "nobody", "--", *argv, "-m",
                             "greylist.cli.socketmap", "-c", str(tmp_path / "greylist.cf")],
                            input=lookups(), capture_output=True, timeout=30)
    assert (result.stdout, result.stderr, result.returncode) == (
        b"9:NOTFOUND ," * 4, b"", 0)
    text = read(home / "log")
    assert "Permission denied" in text and "learning nothing" in text
    assert "learn: pair sender=alice@example.com correspondent=bob@remote.test new" in text


def test_mail_within_the_senders_own_domain_is_never_learned():
    """Found in review: with greylist_local_domains empty (the default),
    alice@corp writing to bob@corp taught a pair that passed a forged
    bob@corp."""
    handler, session = SocketmapHandler(Config()), SocketmapSession()
    handler.lookup("sender", "alice@corp.example", session, T)
    assert handler.lookup("rcpt", "bob@Corp.Example", session, T)[0] == []
    assert handler.lookup("rcpt", "bob@remote.test", session, T)[0]


def test_the_clients_map_answers_a_live_stamp_a_manual_entry_and_nothing_else():
    # greylist_database in Redis: smtpd's check_client_access reads the
    # clients map. A stamp lives max_age_s (the first second past it is
    # cleanup's, expire_at); in pool mode the group's key counts only
    # with a manual entry (its automatic entries are the hosts').
    from greylist.config import Config
    from greylist.core.tables import MANUAL_OK
    from greylist.handlers.learn import table_lookup
    from greylist.learning import live_entry
    from greylist.protocols.socketmap import NOTFOUND
    now = 1_700_000_000
    exact = Config(client_match="exact", max_age_s=1000)
    which, keys, lifetimes = table_lookup("clients", "192.0.2.1", exact)
    assert keys == [b"192.0.2.1"]
    stamp = b"%d" % (now - 1000)
    assert live_entry([stamp], lifetimes, now) == b"13:OK %s," % stamp
    assert live_entry([stamp], lifetimes, now + 1) == NOTFOUND
    assert live_entry([MANUAL_OK], lifetimes, now) == b"12:OK OK manual,"
    pool = Config(client_match="pool", max_age_s=1000)
    which, keys, lifetimes = table_lookup("clients", "192.0.2.1", pool)
    assert keys == [b"192.0.2.1", b"192.0.2"]
    assert live_entry([None, b"%d" % now], lifetimes, now) == NOTFOUND
    assert live_entry([None, MANUAL_OK], lifetimes, now) == b"12:OK OK manual,"
