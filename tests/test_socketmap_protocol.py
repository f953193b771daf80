"""The socketmap codec: netstring framing as Postfix's netstring.c reads it."""

import pytest
from hypothesis import given, settings, strategies as st

from greylist.protocols.policy import ProtocolError
from greylist.protocols.socketmap import (MAX_REQUEST_BYTES, MAX_SKIP_BYTES, NOTFOUND,
                                          OVERSIZED, Decoder, format_reply)


def netstring(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def decode_all(data: bytes) -> list[tuple[str, str]]:
    decoder = Decoder()
    decoder.feed(data)
    found = []
    while (request := decoder.next()) is not None:
        found.append(request)
    decoder.eof()
    return found


def test_requests_are_map_name_and_key_in_original_case():
    data = netstring(b"rcpt Bob+Tag@Remote.TEST") + netstring(b"sender alice@example.com")
    assert decode_all(data) == [("rcpt", "Bob+Tag@Remote.TEST"),
                                ("sender", "alice@example.com")]


def test_a_key_may_hold_spaces_and_any_byte():
    assert decode_all(netstring(b"rcpt a b\xff,c")) == [("rcpt", "a b\udcff,c")]


def test_an_empty_key_is_well_formed():
    assert decode_all(netstring(b"rcpt ")) == [("rcpt", "")]


@pytest.mark.parametrize("data, message", [
    (b"x:rcpt a,", "bad netstring length"),
    (b"-5:rcpt a,", "bad netstring length"),
    (b" 6:rcpt a,", "bad netstring length"),
    (b":rcpt a,", "bad netstring length"),
    (b"6:rcpt ab", "terminating comma"),
    (b"4:rcpt;", "terminating comma"),
    (b"4:rcpt,", "NAME KEY"),
    (b"5: rcpt,", "NAME KEY"),
    (b"%d:" % (MAX_SKIP_BYTES + 1), "limit"),
    (b"9" * 9, "digits"),
    (b"GET / HTTP/1.0\r\n\r\n", "bad netstring length"),
])
def test_framing_errors_are_protocol_errors(data, message):
    decoder = Decoder()
    decoder.feed(data)
    with pytest.raises(ProtocolError, match=message):
        decoder.next()


def test_an_oversized_length_is_refused_before_its_data_arrives():
    decoder = Decoder()
    decoder.feed(b"99999999:")
    with pytest.raises(ProtocolError):
        decoder.next()


def test_a_long_header_line_is_discarded_unbuffered_and_answered():
    """Found in review: a header_checks lookup of a long To: or References:
    line (up to header_size_limit) closed the connection, and cleanup
    deferred the user's message."""
    data = b"header To: " + b"x" * 60000
    decoder = Decoder()
    decoder.feed(b"%d:" % len(data) + data[:30000])
    assert decoder.next() is None
    assert len(decoder._buffer) - decoder._start < 1000
    decoder.feed(data[30000:] + b"," + netstring(b"rcpt a@b.test"))
    assert decoder.next() == OVERSIZED
    assert decoder.next() == ("rcpt", "a@b.test")
    decoder.eof()
    bad = Decoder()
    bad.feed(b"%d:" % len(data) + data + b";")
    with pytest.raises(ProtocolError, match="comma"):
        bad.next()


def test_a_request_at_the_skip_limit_is_discarded_not_refused():
    # MAX_SKIP_BYTES is the largest request discarded and answered; one
    # byte more is a framing error (test_framing_errors_are_protocol_errors).
    decoder = Decoder()
    decoder.feed(b"%d:" % MAX_SKIP_BYTES + b"header X: " + b"x" * 1000)
    assert decoder.next() is None
    assert decoder.in_request()


def test_the_largest_request_is_accepted():
    key = b"k" * (MAX_REQUEST_BYTES - len(b"rcpt "))
    assert decode_all(netstring(b"rcpt " + key)) == [("rcpt", key.decode())]


def test_input_ending_inside_a_request_is_an_error():
    decoder = Decoder()
    decoder.feed(b"6:rcpt")
    assert decoder.next() is None
    with pytest.raises(ProtocolError, match="inside a request"):
        decoder.eof()


def test_replies_are_netstrings():
    assert NOTFOUND == b"9:NOTFOUND ,"
    assert format_reply("NOTFOUND") == NOTFOUND
    assert format_reply("OK", "permit") == b"9:OK permit,"


requests = st.lists(st.tuples(st.sampled_from(["rcpt", "sender", "x"]),
                              st.text(max_size=40)), max_size=8)


@settings(max_examples=200, deadline=None)
@given(requests, st.data())
def test_any_cut_gives_the_same_requests(found, data):
    stream = b"".join(netstring(("%s %s" % pair).encode("utf-8", "surrogateescape"))
                      for pair in found)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    decoder = Decoder()
    got = []
    last = 0
    for cut in cuts + [len(stream)]:
        decoder.feed(stream[last:cut])
        last = cut
        while (request := decoder.next()) is not None:
            got.append(request)
    decoder.eof()
    assert got == found


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.data())
def test_garbage_gives_requests_or_a_protocol_error_never_anything_else(garbage, data):
    cut = data.draw(st.integers(0, len(garbage)))
    decoder = Decoder()
    try:
        decoder.feed(garbage[:cut])
        while decoder.next() is not None:
            pass
        decoder.feed(garbage[cut:])
        while decoder.next() is not None:
            pass
        decoder.eof()
    except ProtocolError:
        pass
