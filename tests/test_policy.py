"""Tests for protocols/policy.py (the push decoder, replies) and the
spawn transport's Reader over it."""

import io
import operator

import pytest
from hypothesis import given, strategies as st

from greylist.protocols.policy import (MAX_ATTRIBUTES, MAX_LINE_BYTES, MAX_REQUEST_BYTES,
                                      READ_SIZE, Decoder, ProtocolError, RequestTooLong,
                                      format_reply)
from greylist.transports.spawn import Reader

# The attributes Postfix 3.7 sends, in wire order (interop doc 3.1,
# smtpd_check.c check_policy_service()), as for a first RCPT TO over TLS
# without SASL: unavailable values are sent empty.
POSTFIX_37_RCPT = [
    (b"request", b"smtpd_access_policy"),
    (b"protocol_state", b"RCPT"),
    (b"protocol_name", b"ESMTP"),
    (b"client_address", b"192.0.2.10"),
    (b"client_name", b"mail.example.net"),
    (b"client_port", b"49152"),
    (b"reverse_client_name", b"mail.example.net"),
    (b"server_address", b"198.51.100.25"),
    (b"server_port", b"25"),
    (b"helo_name", b"mail.example.net"),
    (b"sender", b"alice@example.net"),
    (b"recipient", b"bob@example.org"),
    (b"recipient_count", b"0"),
    (b"queue_id", b""),
    (b"instance", b"8f3e.65a1b2c3.d4e5f.0"),
    (b"size", b"2048"),
    (b"etrn_domain", b""),
    (b"stress", b""),
    (b"sasl_method", b""),
    (b"sasl_username", b""),
    (b"sasl_sender", b""),
    (b"ccert_subject", b""),
    (b"ccert_issuer", b""),
    (b"ccert_fingerprint", b""),
    (b"ccert_pubkey_fingerprint", b""),
    (b"encryption_protocol", b"TLSv1.3"),
    (b"encryption_cipher", b"TLS_AES_256_GCM_SHA384"),
    (b"encryption_keysize", b"256"),
    (b"policy_context", b""),
]


def wire(pairs) -> bytes:
    """Return one request as Postfix writes it (attr_print_plain.c)."""
    return b"".join(name + b"=" + value + b"\n" for name, value in pairs) + b"\n"


def line_of(length: int) -> bytes:
    """Return a name=value line of exactly length bytes, without newline."""
    return b"x=" + b"v" * (length - 2)


def parse(raw: bytes) -> dict[str, str] | None:
    return Reader(io.BytesIO(raw)).read()


@pytest.mark.parametrize("raw, expected", [
    pytest.param(wire(POSTFIX_37_RCPT), {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": "192.0.2.10",
        "client_name": "mail.example.net",
        "client_port": "49152",
        "reverse_client_name": "mail.example.net",
        "server_address": "198.51.100.25",
        "server_port": "25",
        "helo_name": "mail.example.net",
        "sender": "alice@example.net",
        "recipient": "bob@example.org",
        "recipient_count": "0",
        "instance": "8f3e.65a1b2c3.d4e5f.0",
        "size": "2048",
        "encryption_protocol": "TLSv1.3",
        "encryption_cipher": "TLS_AES_256_GCM_SHA384",
        "encryption_keysize": "256",
    }, id="postfix-3.7-rcpt"),
    pytest.param(b"request=smtpd_access_policy\nmail_version=3.8.0\n\n",
                 {"request": "smtpd_access_policy", "mail_version": "3.8.0"},
                 id="unknown-attribute-kept"),
    pytest.param(b"sender=a@example.net\nsender=b@example.net\n\n",
                 {"sender": "b@example.net"}, id="repeat-last-wins"),
    pytest.param(b"sender=\nrecipient=bob@example.org\n\n",
                 {"recipient": "bob@example.org"}, id="empty-value-is-missing"),
    pytest.param(b"sender=a@example.net\nsender=\n\n", {},
                 id="empty-repeat-removes-earlier-value"),
    pytest.param(b"sender=\nsender=a@example.net\n\n", {"sender": "a@example.net"},
                 id="value-after-empty-repeat"),
    pytest.param(b"ccert_subject=CN=mx,O=Example\n\n", {"ccert_subject": "CN=mx,O=Example"},
                 id="equals-sign-in-value"),
    pytest.param(b"helo_name= padded \n\n", {"helo_name": " padded "},
                 id="value-not-stripped"),
    pytest.param(b"sender=j\xc3\xb6rg@example.de\n\n", {"sender": "j\u00f6rg@example.de"},
                 id="utf-8-value"),
    pytest.param(b"sender=\xffa\xc3@example.de\n\n", {"sender": "\udcffa\udcc3@example.de"},
                 id="invalid-utf-8-value-surrogateescape"),
    pytest.param(b"na\xefme=v\n\n", {"na\udcefme": "v"},
                 id="invalid-utf-8-name-surrogateescape"),
    pytest.param(b"\n", {}, id="empty-request"),
    pytest.param(line_of(MAX_LINE_BYTES) + b"\n\n", {"x": "v" * (MAX_LINE_BYTES - 2)},
                 id="line-of-max-bytes"),
    pytest.param(b"".join(b"a%d=v\n" % i for i in range(MAX_ATTRIBUTES)) + b"\n",
                 {"a%d" % i: "v" for i in range(MAX_ATTRIBUTES)},
                 id="max-attributes"),
])
def test_read_request(raw, expected):
    assert parse(raw) == expected


def test_invalid_utf_8_bytes_survive_a_round_trip():
    value = parse(b"sender=\xff\xfe@\xc3(\n\n")["sender"]
    assert value.encode("utf-8", "surrogateescape") == b"\xff\xfe@\xc3("


@pytest.mark.parametrize("raw, message", [
    pytest.param(b"=value\n\n", "malformed line", id="empty-name"),
    pytest.param(b"=\n\n", "malformed line", id="empty-name-and-value"),
    pytest.param(b"request\n\n", "malformed line", id="no-equals"),
    pytest.param(b"request=smtpd_access_policy\nbogus\n\n", "malformed line",
                 id="no-equals-after-attribute"),
    pytest.param(b" \n\n", "malformed line", id="blank-but-not-empty-line"),
    pytest.param(b"sender=a\0b@example.net\n\n", "NUL byte", id="nul-in-value"),
    pytest.param(b"sen\0der=a@example.net\n\n", "NUL byte", id="nul-in-name"),
    pytest.param(b"\0\n\n", "NUL byte", id="nul-line"),
    pytest.param(b"v" * (MAX_LINE_BYTES + 1) + b"\n\n", "malformed line",
                 id="over-long-line-without-equals"),
    pytest.param(b"=" + b"v" * MAX_LINE_BYTES + b"\n\n", "malformed line",
                 id="over-long-line-with-empty-name"),
    pytest.param(b"request=x\n" + line_of(MAX_LINE_BYTES + 1) + b"\n", "premature end",
                 id="eof-after-over-long-line"),
    pytest.param(b"request=x\n" + line_of(2 * MAX_LINE_BYTES), "premature end of input in "
                 "over-long attribute x", id="eof-inside-over-long-line"),
    pytest.param(b"".join(b"a%d=v\n" % i for i in range(MAX_ATTRIBUTES + 1)) + b"\n",
                 "more than", id="one-attribute-over"),
    pytest.param(b"sender=a\n" * (MAX_ATTRIBUTES + 1) + b"\n", "more than",
                 id="repeated-attribute-over"),
    pytest.param(b"a=b\n" * (MAX_ATTRIBUTES + 1) + b"c=\0\n\n", "more than",
                 id="attribute-count-before-nul"),
    pytest.param(b"request=smtpd_access_policy\nprotocol_state=RCPT\n", "premature end",
                 id="eof-after-lines"),
    pytest.param(b"sender=\n", "premature end", id="eof-after-empty-value"),
    pytest.param(b"request=smtpd_access_policy\nprotocol_st", "premature end",
                 id="eof-mid-line"),
    pytest.param(b"request=smtpd", "premature end", id="eof-mid-first-line"),
    pytest.param(line_of(MAX_LINE_BYTES), "premature end", id="eof-after-max-bytes-no-newline"),
])
def test_read_request_rejects(raw, message):
    with pytest.raises(ProtocolError, match=message):
        parse(raw)


def test_several_requests_on_one_stream_then_eof():
    first = [(b"request", b"smtpd_access_policy"), (b"protocol_state", b"RCPT"),
             (b"recipient", b"one@example.org")]
    second = [(b"request", b"smtpd_access_policy"), (b"protocol_state", b"RCPT"),
              (b"recipient", b"two@example.org")]
    reader = Reader(io.BytesIO(wire(first) + wire(second)))
    assert reader.read()["recipient"] == "one@example.org"
    assert reader.read()["recipient"] == "two@example.org"
    assert reader.read() is None
    assert reader.read() is None


def test_eof_before_a_request_is_none():
    assert parse(b"") is None


@pytest.mark.parametrize("action, expected", [
    pytest.param("DUNNO", b"action=DUNNO\n\n", id="dunno"),
    pytest.param("DEFER_IF_PERMIT Greylisted, please try again in 180 seconds",
                 b"action=DEFER_IF_PERMIT Greylisted, please try again in 180 seconds\n\n",
                 id="defer-if-permit"),
    pytest.param("451 4.3.0 Try again later", b"action=451 4.3.0 Try again later\n\n",
                 id="4nn"),
    pytest.param("DEFER_IF_PERMIT Gr\u00fc\u00dfe", b"action=DEFER_IF_PERMIT Gr\xc3\xbc\xc3\x9fe\n\n",
                 id="utf-8"),
])
def test_format_reply(action, expected):
    assert format_reply(action) == expected


@pytest.mark.parametrize("action", [
    pytest.param("", id="empty"),
    pytest.param("\n", id="newline"),
    pytest.param("DUNNO\n", id="trailing-newline"),
    pytest.param("DEFER_IF_PERMIT one\naction=OK", id="embedded-newline"),
])
def test_format_reply_rejects(action):
    with pytest.raises(ValueError):
        format_reply(action)


# Names and values as raw bytes, within the protocol's rules: a name is
# non-empty without "=", neither holds NUL or newline (SMTPD_POLICY_README).
# A few fixed names make repeats likely.
_names = st.one_of(
    st.sampled_from([b"sender", b"recipient", b"client_address"]),
    st.binary(min_size=1, max_size=30).filter(
        lambda b: not set(b) & set(b"=\n\0")),
)
_values = st.one_of(
    st.just(b""),
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"").replace(b"\0", b"")),
)
_requests = st.lists(st.tuples(_names, _values), max_size=MAX_ATTRIBUTES)


def _expected(pairs) -> dict[str, str]:
    """The README's rules: the last value wins, an empty value is missing."""
    attrs: dict[str, str] = {}
    for name, value in pairs:
        name_s = name.decode("utf-8", "surrogateescape")
        if value:
            attrs[name_s] = value.decode("utf-8", "surrogateescape")
        else:
            attrs.pop(name_s, None)
    return attrs


@given(st.lists(_requests, min_size=1, max_size=3))
def test_parse_round_trip(requests):
    reader = Reader(io.BytesIO(b"".join(wire(pairs) for pairs in requests)))
    for pairs in requests:
        assert reader.read() == _expected(pairs)
    assert reader.read() is None


@given(st.text(min_size=1).filter(lambda s: "\n" not in s and "\0" not in s))
def test_format_reply_parses_back(action):
    assert parse(format_reply(action)) == {"action": action}


_pieces = st.one_of(
    st.binary(max_size=20),
    st.sampled_from([b"\n", b"=", b"\0", b"a=b\n", b"a=\n", b"=x\n", b"\xff\xfe"]),
    st.integers(MAX_LINE_BYTES - 3, MAX_LINE_BYTES + 2).map(lambda n: line_of(n) + b"\n"),
    st.builds(operator.mul, st.sampled_from([b"a=b\n", b"a=\n"]),
              st.integers(MAX_ATTRIBUTES - 2, MAX_ATTRIBUTES + 2)),
)


@given(st.lists(_pieces, max_size=12).map(b"".join))
def test_arbitrary_bytes_give_requests_or_protocol_error(raw):
    reader = Reader(io.BytesIO(raw))
    # Each call consumes at least one byte or returns None, so this ends.
    for _ in range(len(raw) + 1):
        try:
            attrs = reader.read()
        except ProtocolError:
            return
        if attrs is None:
            return
        assert len(attrs) <= MAX_ATTRIBUTES
        assert all(name and value for name, value in attrs.items())
    pytest.fail("Reader.read did not reach the end of input")


class Trickle:
    """A stream whose read1() returns at most size bytes, as a socket may."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data, self.size, self.offset, self.reads = data, size, 0, 0

    def read1(self, n: int) -> bytes:
        self.reads += 1
        chunk = self.data[self.offset:self.offset + min(n, self.size)]
        self.offset += len(chunk)
        return chunk


@pytest.mark.parametrize("size", [1, 2, 7, 4096])
def test_requests_that_arrive_in_pieces(size):
    requests = [POSTFIX_37_RCPT, [(b"request", b"smtpd_access_policy")], []]
    reader = Reader(Trickle(b"".join(wire(pairs) for pairs in requests), size))
    assert reader.read()["instance"] == "8f3e.65a1b2c3.d4e5f.0"
    assert reader.read() == {"request": "smtpd_access_policy"}
    assert reader.read() == {}
    assert reader.read() is None


@pytest.mark.parametrize("lines, dropped", [
    pytest.param([line_of(MAX_LINE_BYTES + 1)], [("x", MAX_LINE_BYTES + 1)],
                 id="line-one-byte-over"),
    pytest.param([b"sender=" + b"s" * (4 * MAX_LINE_BYTES)], [("sender", 4 * MAX_LINE_BYTES + 7)],
                 id="line-far-over"),
    pytest.param([b"recipient=" + b"r" * MAX_LINE_BYTES, b"helo_name=" + b"h" * MAX_LINE_BYTES],
                 [("recipient", MAX_LINE_BYTES + 10), ("helo_name", MAX_LINE_BYTES + 10)],
                 id="two-lines-over"),
    # Five lines at the line cap: the fourth would take the request past
    # the request cap, and so would the fifth.
    pytest.param([b"a%d=" % i + b"v" * (MAX_LINE_BYTES - 3) for i in range(5)],
                 [("a3", MAX_LINE_BYTES), ("a4", MAX_LINE_BYTES)], id="request-cap"),
])
def test_a_request_with_over_long_lines_is_reported_whole_and_the_next_is_read(lines, dropped):
    request = (b"request=smtpd_access_policy\nclient_address=192.0.2.1\n"
               + b"".join(line + b"\n" for line in lines) + b"instance=1.2\n\n")
    after = wire(POSTFIX_37_RCPT)
    for size in (1000, READ_SIZE, len(request) + len(after)):
        reader = Reader(Trickle(request + after, size))
        with pytest.raises(RequestTooLong) as raised:
            reader.read()
        assert raised.value.dropped == dropped
        kept = raised.value.attrs
        assert kept["client_address"] == "192.0.2.1" and kept["instance"] == "1.2"
        assert len(b"".join(lines)) - sum(n for _, n in dropped) + 200 > sum(
            len(k) + len(v) for k, v in kept.items())
        assert str(raised.value).startswith("request attribute too long: %s of %d bytes"
                                            % dropped[0])
        assert "client_address=192.0.2.1 instance=1.2" in str(raised.value)
        assert reader.read()["instance"] == "8f3e.65a1b2c3.d4e5f.0"
        assert reader.read() is None


def test_a_long_line_is_discarded_as_it_arrives():
    decoder = Decoder()
    decoder.feed(b"request=smtpd_access_policy\nsender=")
    for _ in range(100):
        decoder.feed(b"v" * 1000)
        assert decoder.next() is None
        # Never more than the cap and a chunk of the line.
        assert len(decoder._buf) + len(decoder._kept) <= MAX_LINE_BYTES + 1000
    decoder.feed(b"\nrecipient=bob@example.org\n\n")
    with pytest.raises(RequestTooLong) as raised:
        decoder.next()
    assert raised.value.dropped == [("sender", 100007)]   # the whole line
    assert raised.value.attrs == {"request": "smtpd_access_policy",
                                  "recipient": "bob@example.org"}
    decoder.eof()


def test_the_longest_request_kept_is_decoded():
    # Three lines at the line cap (sender, recipient, helo_name at the
    # largest line_length_limit kept) and Postfix's other attributes.
    long = {name: name[:1] * (MAX_LINE_BYTES - len(name) - 1)
            for name in (b"sender", b"recipient", b"helo_name")}
    pairs = [(name, long.get(name, value)) for name, value in POSTFIX_37_RCPT]
    assert len(wire(pairs)) < MAX_REQUEST_BYTES
    attrs = parse(wire(pairs))
    assert attrs["sender"] == "s" * (MAX_LINE_BYTES - 7) and attrs["instance"]


@pytest.mark.parametrize("size, kept", [
    pytest.param(MAX_REQUEST_BYTES, True, id="at-request-cap"),
    pytest.param(MAX_REQUEST_BYTES + 1, False, id="one-byte-over"),
])
def test_a_line_that_takes_the_request_past_its_cap_is_dropped(size, kept):
    # Lines (newlines included) of size bytes in all, the last of them
    # ending exactly there; the empty line that ends the request is not
    # counted.
    head = b"request=smtpd_access_policy\n"
    fillers = [b"f%d=" % i + b"v" * (MAX_LINE_BYTES - 10) + b"\n" for i in range(3)]
    rest = size - len(head) - sum(map(len, fillers))
    assert 10 < rest <= MAX_LINE_BYTES
    last = b"z=" + b"v" * (rest - 3) + b"\n"
    raw = head + b"".join(fillers) + last + b"\n"
    assert len(raw) == size + 1
    if kept:
        assert parse(raw)["z"] == "v" * (rest - 3)
    else:
        with pytest.raises(RequestTooLong) as raised:
            parse(raw)
        assert raised.value.dropped == [("z", rest - 1)]


@pytest.mark.parametrize("lines, ends", [
    pytest.param(MAX_ATTRIBUTES, False, id="at-cap"),
    pytest.param(MAX_ATTRIBUTES + 1, True, id="one-over"),
])
def test_the_attribute_cap_ends_a_request_before_its_empty_line(lines, ends):
    # A client that sends line after line and never ends the request is
    # cut off at the line over the cap, not when the request ends.
    decoder = Decoder()
    decoder.feed(b"a=b\n" * lines)
    if ends:
        with pytest.raises(ProtocolError, match="more than %d attributes" % MAX_ATTRIBUTES):
            decoder.next()
    else:
        assert decoder.next() is None


def test_a_request_in_the_buffer_is_answered_without_another_read():
    stream = Trickle(wire(POSTFIX_37_RCPT) * 2, READ_SIZE)
    reader = Reader(stream)
    reader.read()
    reader.read()
    assert stream.reads == 1


@pytest.mark.parametrize("cut", [None, 20, 40, 66000, 70030, 70041])
def test_a_nul_byte_in_an_over_long_line_ends_the_connection_however_it_arrives(cut):
    # Found in review: past the line cap, a NUL was discarded with the
    # rest of the line when the line came in pieces (RequestTooLong,
    # answered), and was a ProtocolError when it came whole.
    request = (b"request=smtpd_access_policy\nccert_subject=" + b"A" * 70000 + b"\0"
               + b"B" * 10 + b"\nrecipient=x@example.org\n\n")
    decoder = Decoder()
    with pytest.raises(ProtocolError, match="NUL byte in line") as raised:
        for chunk in ([request] if cut is None else [request[:cut], request[cut:]]):
            decoder.feed(chunk)
            assert decoder.next() is None
    assert not isinstance(raised.value, RequestTooLong)


def test_a_service_asked_before_rcpt_warns_once_that_it_greylists_nothing(tmp_path):
    # Review: in client, helo or sender restrictions with
    # smtpd_delay_reject = no every request got DUNNO and greylisting was
    # off with nothing in the log at the default verbosity.
    from greylist.config import Config
    from greylist.wiring import policy_service
    from tests.conftest import Clock, Recorder
    log = Recorder()
    policy = policy_service(Config(database=str(tmp_path / "db")), log, Clock(10 ** 9),
                            cleanup=False)
    for state in ("MAIL", "CONNECT", "MAIL"):
        assert policy.answer({"request": "smtpd_access_policy", "protocol_state": state,
                              "client_address": "192.0.2.1", "sender": "a@example.org"},
                             policy.new_session()) == "DUNNO"
    assert policy.answer({"request": "smtpd_access_policy", "protocol_state": "DATA",
                          "client_address": "192.0.2.1"}, policy.new_session()) == "DUNNO"
    warned = [line for line in log.lines if "greylisting is done at RCPT only" in line]
    assert len(warned) == 1 and "protocol_state=MAIL" in warned[0], log.lines
