"""The push decoder gives the same requests and error however its input is cut.

protocols/policy.py promises that feeding a byte stream in any chunks
gives exactly the requests, and the error, of feeding it whole: a
transport may receive a request in pieces (a socket, a slow pipe) or
many requests in one read(2). These properties check that promise for
streams of valid requests optionally followed by one malformed piece,
and that the decoder's memory stays bounded on input without an empty
line.
"""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from greylist.protocols.policy import (MAX_ATTRIBUTES, MAX_LINE_BYTES, READ_SIZE, Decoder,
                                      ProtocolError)

HYPOTHESIS = dict(max_examples=200, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Names and values from a safe alphabet: no newline, NUL or (in names) "=".
_NAME_ALPHABET = "abcdefghijklmnopqrstuvwxyz_"
_VALUE_ALPHABET = _NAME_ALPHABET + "ABCXYZ0123456789@.-+:/=<> "
_names = st.one_of(
    # A small pool, so that repeated names are common.
    st.sampled_from(["request", "sender", "recipient", "instance", "a"]),
    st.text(_NAME_ALPHABET, min_size=1, max_size=12))
_values = st.one_of(st.just(""), st.text(_VALUE_ALPHABET, max_size=40))
# "long=" plus a value: lines of MAX_LINE_BYTES - 2 .. MAX_LINE_BYTES bytes,
# the longest allowed, so that whole blocks exceed the line cap.
_long_pairs = st.integers(0, 2).map(lambda d: ("long", "v" * (MAX_LINE_BYTES - 5 - d)))
_pairs = st.lists(st.one_of(st.tuples(_names, _values), _long_pairs), max_size=8)
_requests = st.one_of(
    _pairs,
    # Exactly the attribute cap: still valid.
    st.just([("k", "v")] * MAX_ATTRIBUTES))


def wire(pairs) -> bytes:
    """The wire form of one request."""
    return b"".join(("%s=%s\n" % pair).encode() for pair in pairs) + b"\n"


def expected(pairs) -> dict[str, str]:
    """SMTPD_POLICY_README's rules: the last value wins, empty is missing."""
    attrs: dict[str, str] = {}
    for name, value in pairs:
        if value:
            attrs[name] = value
        else:
            attrs.pop(name, None)
    return attrs


def _bad_line(prefix, line):
    return wire(prefix)[:-1] + line + b"\n\n"


# One malformed piece: (bytes, the words its error starts with). The
# prefix is a valid start of the bad request.
_malformed = st.one_of(
    st.builds(lambda p, line: (_bad_line(p, line), "malformed line"),
              _pairs, st.sampled_from([b"no equals sign", b"=value", b"\xff\xfe"])),
    st.builds(lambda p, line: (_bad_line(p, line), "NUL byte"),
              _pairs, st.sampled_from([b"a=b\0c", b"\0", b"x=\0"])),
    st.builds(lambda p, n: (_bad_line(p, b"x=" + b"y" * (n - 2)), "line longer than"),
              _pairs, st.integers(MAX_LINE_BYTES + 1, MAX_LINE_BYTES + 3)),
    st.builds(lambda n, end: (b"k=v\n" * n + end, "more than"),
              st.integers(MAX_ATTRIBUTES + 1, MAX_ATTRIBUTES + 3), st.sampled_from([b"", b"\n"])),
)
# A truncated final request: anything short of its empty line.
_truncated = st.builds(lambda p, cut: wire(p)[:-1][:cut] if cut is not None else wire(p)[:-1],
                       st.lists(st.tuples(_names, _values), min_size=1, max_size=5),
                       st.one_of(st.none(), st.integers(1, 60)))


@st.composite
def streams(draw):
    """(stream, the requests it holds, the start of its error or None)."""
    requests = draw(st.lists(_requests, max_size=4))
    data = b"".join(wire(pairs) for pairs in requests)
    kind = draw(st.sampled_from(["none", "malformed", "truncated"]))
    error = None
    if kind == "malformed":
        piece, error = draw(_malformed)
        # What follows a malformed piece must not matter.
        data += piece + draw(st.sampled_from([b"", wire([("request", "x")])]))
    elif kind == "truncated":
        data += draw(_truncated)
        error = "premature end of input"
    return data, [expected(pairs) for pairs in requests], error


@st.composite
def cuts(draw, data: bytes):
    """data cut into non-empty chunks at drawn points."""
    points = sorted(draw(st.sets(st.integers(1, max(1, len(data) - 1)), max_size=20)))
    points = [p for p in points if p < len(data)]
    edges = [0] + points + [len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]


def decode(chunks) -> tuple[list[dict[str, str]], str | None]:
    """Feed chunks one by one, taking requests after each; then eof().

    Returns the requests and str() of the ProtocolError, or None.
    """
    decoder = Decoder()
    requests = []
    # Each request consumes at least its empty line: at most this many.
    bound = sum(map(len, chunks)) + 1
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            for _ in range(bound + 1):
                attrs = decoder.next()
                if attrs is None:
                    break
                requests.append(attrs)
            else:
                pytest.fail("next() never returned None")
        decoder.eof()
    except ProtocolError as exc:
        return requests, str(exc)
    return requests, None


@settings(**HYPOTHESIS)
@given(st.data())
def test_any_chunking_gives_the_requests_and_error_of_the_whole_stream(data):
    stream, requests, error = data.draw(streams())
    chunks = data.draw(cuts(stream))
    assert b"".join(chunks) == stream
    whole = decode([stream])
    assert decode(chunks) == whole
    # And the whole stream's result is the right one.
    got, message = whole
    assert got == requests
    if error is None:
        assert message is None
    else:
        assert message is not None and message.startswith(error)


@settings(**dict(HYPOTHESIS, max_examples=50))
@given(streams())
def test_byte_at_a_time_gives_the_requests_and_error_of_the_whole_stream(drawn):
    # One byte per feed, the extreme cutting. A prefix of a stream is a
    # stream too; cut long ones to a little over a line cap (one feed and
    # next() per byte is slow) so that a line just over the cap still fits.
    stream = drawn[0][:MAX_LINE_BYTES + 2048]
    assert decode([stream[i:i + 1] for i in range(len(stream))]) == decode([stream])


def test_one_chunk_with_many_requests_yields_them_one_by_one_in_order():
    pairs = [[("request", "smtpd_access_policy"), ("recipient", "r%d@example.net" % i)]
             for i in range(50)]
    decoder = Decoder()
    decoder.feed(b"".join(wire(p) for p in pairs))
    for p in pairs:
        before = len(decoder._buf)
        assert decoder.next() == expected(p)
        # Exactly this request's bytes were consumed.
        assert before - len(decoder._buf) == len(wire(p))
    assert decoder.next() is None
    decoder.eof()


def test_a_request_split_anywhere_is_returned_only_when_complete():
    data = wire([("request", "smtpd_access_policy"), ("sender", ""), ("sender", "a@b")])
    for cut in range(1, len(data)):
        decoder = Decoder()
        decoder.feed(data[:cut])
        assert decoder.next() is None
        decoder.feed(data[cut:])
        assert decoder.next() == {"request": "smtpd_access_policy", "sender": "a@b"}
        assert decoder.next() is None


# The most the decoder may hold: the caps (every line of a request at the
# line cap, plus one line too many) and one chunk.
CAPS = (MAX_ATTRIBUTES + 1) * (MAX_LINE_BYTES + 1)


@pytest.mark.parametrize("line, error", [
    (b"k=" + b"v" * (MAX_LINE_BYTES - 2) + b"\n", "more than"),    # longest lines
    (b"k=v\n", "more than"),                                       # short lines
    (b"v" * 1024, "line longer than"),                             # one endless line
], ids=["longest-lines", "short-lines", "endless-line"])
@pytest.mark.parametrize("chunk", [1000, 4096, READ_SIZE])
def test_input_without_an_empty_line_is_refused_within_the_caps_plus_one_chunk(line, error,
                                                                               chunk):
    decoder = Decoder()
    endless = line * (chunk // len(line) + 2)
    fed = 0
    # Enough feeds to exceed the bound; the decoder must refuse before.
    for _ in range((CAPS + chunk) // chunk + 2):
        piece = endless[fed % len(line):][:chunk]
        fed += len(piece)
        decoder.feed(piece)
        try:
            assert decoder.next() is None
        except ProtocolError as exc:
            assert str(exc).startswith(error)
            break
        finally:
            assert len(decoder._buf) <= CAPS + chunk
    else:
        pytest.fail("no ProtocolError after %d bytes" % fed)
    assert fed <= CAPS + chunk
