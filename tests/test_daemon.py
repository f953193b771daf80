"""The request loop over byte streams, with a real store and a fake clock."""

import io
import os
import pathlib

import pytest

from greylist.config import Config
from greylist.transports.spawn import serve
from greylist.stores.lmdb import LmdbStore
from tests.conftest import Clock, Recorder, policy_service

RCPT = (pathlib.Path(__file__).parent / "data" / "rcpt.txt").read_bytes()


@pytest.fixture
def policy(tmp_path):
    os.chmod(tmp_path, 0o755)
    store = LmdbStore(str(tmp_path / "greylist"))
    yield policy_service(store, Config(delay_s=300), Recorder(), Clock(1_700_000_000))
    store.close()


def run(policy, data):
    out = io.BytesIO()
    status = serve(io.BytesIO(data), out, policy)
    return status, out.getvalue()


def request(**changes):
    """The sample RCPT request with some attributes replaced (None: dropped)."""
    lines = []
    for line in RCPT.decode().splitlines():
        name = line.partition("=")[0]
        if name in changes:
            if changes[name] is not None:
                lines.append("%s=%s" % (name, changes.pop(name)))
        elif line:
            lines.append(line)
    lines += ["%s=%s" % item for item in changes.items() if item[1] is not None]
    return ("\n".join(lines) + "\n\n").encode()


DEFER_300 = b"action=DEFER_IF_PERMIT Greylisted, please try again in 300 seconds\n\n"


def test_first_attempt_deferred_early_retry_deferred_then_passed(policy):
    assert run(policy, RCPT) == (0, DEFER_300)
    policy.clock.now += 299
    assert run(policy, RCPT) == (
        0, b"action=DEFER_IF_PERMIT Greylisted, please try again in 1 seconds\n\n")
    policy.clock.now += 1
    assert run(policy, RCPT + RCPT) == (0, b"action=DUNNO\n\n" * 2)
    assert policy.store.get(b"192.0.2/alice@example.org/bob@example.net") == \
        b"1:1700000000:1700000300:3:passed"
    assert policy.log.lines[-2:] == [
        "action=DUNNO reason=delay-passed age=300 client=192.0.2.10 "
        "sender=alice@example.org rcpt=bob@example.net",
        "action=DUNNO reason=awl-sender age=0 client=192.0.2.10 "
        "sender=alice@example.org rcpt=bob@example.net"]


def test_many_requests_in_one_stream_each_get_exactly_one_reply(policy):
    data = b"".join(request(recipient="r%d@example.net" % i) for i in range(50))
    status, out = run(policy, data)
    assert status == 0 and out == DEFER_300 * 50


def test_triple_is_case_folded_like_postfix_lookup_keys(policy):
    run(policy, request(sender="Alice@Example.ORG", recipient="BOB@example.NET"))
    policy.clock.now += 300
    assert run(policy, RCPT) == (0, b"action=DUNNO\n\n")


@pytest.mark.parametrize("state", ["CONNECT", "EHLO", "MAIL", "DATA", "END-OF-MESSAGE"])
def test_other_protocol_states_are_not_greylisted(policy, state):
    assert run(policy, request(protocol_state=state)) == (0, b"action=DUNNO\n\n")
    assert policy.store.get(b"192.0.2/alice@example.org/bob@example.net") is None


def test_null_sender_is_greylisted_by_default_as_angle_brackets(policy):
    assert run(policy, request(sender=None)) == (0, DEFER_300)
    assert policy.store.get(b"192.0.2/<>/bob@example.net") is not None


def test_null_sender_passes_when_greylist_null_sender_is_no(tmp_path):
    os.chmod(tmp_path, 0o755)
    store = LmdbStore(str(tmp_path / "g"))
    policy = policy_service(store, Config(null_sender=False), Recorder(), Clock(1))
    assert run(policy, request(sender="")) == (0, b"action=DUNNO\n\n")
    assert run(policy, RCPT) == (0, b"action=DEFER_IF_PERMIT Greylisted, please try "
                                     b"again in 180 seconds\n\n")
    store.close()


def test_client_address_unknown_is_valid_and_greylisted(policy):
    assert run(policy, request(client_address="unknown")) == (0, DEFER_300)
    assert policy.store.get(b"unknown/alice@example.org/bob@example.net") is not None


def test_ipv4_mapped_ipv6_client_shares_the_ipv4_triple(policy):
    run(policy, request(client_address="::ffff:192.0.2.10"))
    policy.clock.now += 300
    assert run(policy, RCPT) == (0, b"action=DUNNO\n\n")


@pytest.mark.parametrize("data, warning", [
    (b"request=smtpd_access_policy\nthis line has no equals sign\n\n", "malformed line"),
    (b"request" + b"x" * 70000 + b"\n\n", "malformed line"),
    (b"\x00\xff\xfe garbage \x13\x37\n\n", "NUL byte"),
    (b"\xff\xfe\x80\x81garbage\n\n", "malformed line"),
    (None, "client_address is not an IP address: 'not-an-ip'"),
    (b"request=junk\nprotocol_state=RCPT\n\n", "unknown request type: 'junk'"),
    (b"protocol_state=RCPT\n\n", "unknown request type: None"),
    (b"request=smtpd_access_policy\nprotocol_state=RCPT", "premature end of input"),
], ids=["no-equals", "overlong", "binary-nul", "binary", "bad-client", "unknown-request",
        "no-request", "truncated"])
def test_bad_input_gets_a_warning_no_reply_and_a_disconnect(policy, data, warning):
    if data is None:
        data = request(client_address="not-an-ip")
    # A good request first: its reply is sent; the bad one ends the loop.
    # (Nothing can follow a truncated request: it ends the input.)
    after = b"" if data.endswith(b"RCPT") else RCPT
    status, out = run(policy, RCPT + data + after)
    assert (status, out) == (1, DEFER_300)
    assert warning in policy.log.lines[-1]
    assert policy.log.lines[-1].startswith("warning: ")
    assert policy.log.lines[-1].endswith("disconnecting without a reply")


def test_malformed_record_is_logged_and_treated_as_absent(policy):
    policy.store.put(b"192.0.2/alice@example.org/bob@example.net", b"garbage")
    assert run(policy, RCPT) == (0, DEFER_300)
    assert policy.log.lines[0].startswith("warning: ignoring malformed record for "
                                          "192.0.2/alice@example.org/bob@example.net")
    # Read twice (snapshot, then under the write lock), warned about once.
    assert sum(line.startswith("warning:") for line in policy.log.lines) == 1
    assert policy.store.get(b"192.0.2/alice@example.org/bob@example.net") == \
        b"1:1700000000:1700000000:1:pending"


def test_store_failure_fails_open_with_one_warning(tmp_path):
    os.chmod(tmp_path, 0o777)  # refused: world-writable
    policy = policy_service(LmdbStore(str(tmp_path / "g")), Config(), Recorder(), Clock(1))
    assert run(policy, RCPT * 3) == (0, b"action=DUNNO\n\n" * 3)
    warnings = [line for line in policy.log.lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "world-writable" in warnings[0]
    assert "answering DUNNO (greylist_failure_action)" in warnings[0]
    assert policy.log.lines[-1].startswith("action=DUNNO reason=database-failure")


def test_failure_action_is_configurable(tmp_path):
    os.chmod(tmp_path, 0o777)
    cfg = Config(failure_action="DEFER_IF_PERMIT 4.3.0 try later")
    policy = policy_service(LmdbStore(str(tmp_path / "g")), cfg, Recorder(), Clock(1))
    assert run(policy, RCPT) == (0, b"action=DEFER_IF_PERMIT 4.3.0 try later\n\n")


def test_concurrent_decisions_write_first_seen_exactly_once(tmp_path):
    # Another process stored the triple after our shared-lock read found
    # nothing: the exclusive-lock re-read must see it and not reset it.
    os.chmod(tmp_path, 0o755)
    store = LmdbStore(str(tmp_path / "g"))
    policy = policy_service(store, Config(delay_s=300), Recorder(), Clock(2000))
    real_get_many = store.get_many
    k = b"192.0.2/alice@example.org/bob@example.net"

    def racing_get_many(keys):
        values = real_get_many(keys)
        store.put(k, b"1:1000:1000:1:pending")  # the other process's write
        return values

    store.get_many = racing_get_many
    assert run(policy, RCPT) == (0, b"action=DUNNO\n\n")
    assert store.get(k) == b"1:1000:2000:2:passed"
    store.close()


def test_overlong_addresses_get_a_bounded_key_instead_of_a_store_failure(policy):
    # LMDB refuses keys over 511 bytes; that must not disable greylisting.
    long_sender = "s" * 300 + "@example.org"
    data = request(sender=long_sender, recipient="r" * 300 + "@example.net")
    assert run(policy, data) == (0, DEFER_300)
    policy.clock.now += 300
    assert run(policy, data) == (0, b"action=DUNNO\n\n")
    assert not any(line.startswith("warning:") for line in policy.log.lines)


def test_an_over_long_sender_is_answered_dunno_and_the_connection_goes_on(policy):
    # issue 15: longer than any line kept (line_length_limit raised
    # past the cap): discarded as it arrives, answered DUNNO, logged.
    long = request(sender="a" * 70000 + "@example.org")
    status, out = run(policy, RCPT + long + RCPT)
    assert (status, out) == (0, DEFER_300 + b"action=DUNNO\n\n" + b"action=DEFER_IF_PERMIT "
                             b"Greylisted, please try again in 300 seconds\n\n")
    warnings = [line for line in policy.log.lines if line.startswith("warning: ")]
    assert warnings == ["warning: request attribute too long: sender of 70019 bytes (caps: "
                        "65536 bytes per line, 262144 per request) client_address=192.0.2.10 "
                        "instance=%s; answering DUNNO" % _instance()]
    assert not [line for line in policy.log.lines if "a" * 100 in line]


def test_a_sender_of_60000_bytes_is_greylisted(policy):
    sender = "b" * 60000 + "@example.org"
    assert run(policy, request(sender=sender)) == (0, DEFER_300)
    policy.clock.now += 300
    assert run(policy, request(sender=sender)) == (0, b"action=DUNNO\n\n")


def _instance() -> str:
    for line in RCPT.decode().splitlines():
        if line.startswith("instance="):
            return line.partition("=")[2]
    return ""
