"""The push decoder gives the same requests and error however its input is cut.

protocols/policy.py promises that feeding a byte stream in any chunks
gives exactly the requests, and the error, of feeding it whole: a
transport may receive a request in pieces (a socket, a slow pipe) or
many requests in one read(2). These properties check that promise for
streams of valid requests (some with lines over the caps, which the
decoder discards and reports as RequestTooLong at the request's end)
optionally followed by one malformed piece, and that the decoder's
memory stays bounded on input without an empty line. The properties use
a decoder with small caps (LINE, REQUEST, SKIP), so that examples stay
small; the last test uses the real ones.
"""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from greylist.protocols.policy import (MAX_ATTRIBUTES, MAX_LINE_BYTES, MAX_REQUEST_BYTES,
                                      MAX_SKIP_BYTES, READ_SIZE, Decoder, ProtocolError,
                                      RequestTooLong)

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
# The caps of the decoder the properties use.
LINE, REQUEST, SKIP = 512, 2048, 16384


def small_decoder() -> Decoder:
    return Decoder(LINE, MAX_ATTRIBUTES, REQUEST, SKIP)


# "long=" plus a value: lines of LINE - 2 .. LINE bytes, the longest
# kept, so that whole blocks exceed the line cap and five of them the
# request cap; and lines just over the line cap, or far over it.
_long_pairs = st.integers(0, 2).map(lambda d: ("long", "v" * (LINE - 5 - d)))
_over_pairs = st.one_of(st.integers(1, 3), st.just(3 * LINE)).map(
    lambda d: ("over", "w" * (LINE - 5 + d)))
_pairs = st.lists(st.one_of(st.tuples(_names, _values), _long_pairs, _over_pairs),
                  max_size=8)
_requests = st.one_of(
    _pairs,
    # Exactly the attribute cap: still valid.
    st.just([("k", "v")] * MAX_ATTRIBUTES))


def wire(pairs) -> bytes:
    """The wire form of one request."""
    return b"".join(("%s=%s\n" % pair).encode() for pair in pairs) + b"\n"


def attributes(pairs) -> dict[str, str]:
    """SMTPD_POLICY_README's rules: the last value wins, empty is missing."""
    attrs: dict[str, str] = {}
    for name, value in pairs:
        if value:
            attrs[name] = value
        else:
            attrs.pop(name, None)
    return attrs


def expected(pairs):
    """What the decoder gives for a request: its attributes, or, when a
    line is over LINE or would take the request past REQUEST, ("too
    long", the discarded (name, length)s, the attributes kept)."""
    kept, dropped, size = [], [], 0
    for name, value in pairs:
        length = len(name) + 1 + len(value)
        if length > LINE or size + length + 1 > REQUEST:
            dropped.append((name, length))
        else:
            kept.append((name, value))
            size += length + 1
    return ("too long", dropped, attributes(kept)) if dropped else attributes(pairs)


def _bad_line(prefix, line):
    return wire(prefix)[:-1] + line + b"\n\n"


# One malformed piece: (bytes, the words its error starts with). The
# prefix is a valid start of the bad request.
_malformed = st.one_of(
    st.builds(lambda p, line: (_bad_line(p, line), "malformed line"),
              _pairs, st.sampled_from([b"no equals sign", b"=value", b"\xff\xfe"])),
    st.builds(lambda p, line: (_bad_line(p, line), "NUL byte"),
              _pairs, st.sampled_from([b"a=b\0c", b"\0", b"x=\0"])),
    # Over the line cap without "=" in it: no attribute, a framing error.
    st.builds(lambda p, n: (_bad_line(p, b"y" * n), "malformed line"),
              _pairs, st.integers(LINE + 1, LINE + 3)),
    # More discarded than SKIP in one request.
    st.builds(lambda p, n: (_bad_line(p, b"x=" + b"y" * n), "more than %d bytes" % SKIP),
              _pairs, st.integers(SKIP, SKIP + 2)),
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
    decoder = small_decoder()
    requests = []
    # Each request consumes at least its empty line: at most this many.
    bound = sum(map(len, chunks)) + 1
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            for _ in range(bound + 1):
                try:
                    attrs = decoder.next()
                except RequestTooLong as exc:
                    requests.append(("too long", exc.dropped, exc.attrs))
                    continue
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
    # stream too; cut long ones to a little over the skip cap (one feed
    # and next() per byte is slow) so that a line just over it still fits.
    stream = drawn[0][:SKIP + 2 * REQUEST]
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


# The most the decoder may hold: a request at the request cap and a line
# at the line cap being scanned, plus one chunk.
HELD = MAX_REQUEST_BYTES + MAX_LINE_BYTES


@pytest.mark.parametrize("line, error", [
    (b"k=" + b"v" * (MAX_LINE_BYTES - 2) + b"\n", "more than 100 attributes"),  # longest lines
    (b"k=v\n", "more than 100 attributes"),                                   # short lines
    (b"k=" + b"v" * (4 * MAX_LINE_BYTES) + b"\n",                             # over the cap
     "more than %d bytes" % MAX_SKIP_BYTES),
    (b"v" * 1024, "malformed line"),                                 # one endless line, no "="
], ids=["longest-lines", "short-lines", "over-long-lines", "endless-line"])
@pytest.mark.parametrize("chunk", [1000, 4096, READ_SIZE])
def test_input_without_an_empty_line_is_refused_within_the_caps_plus_one_chunk(line, error,
                                                                               chunk):
    decoder = Decoder()
    endless = line * (chunk // len(line) + 2)
    fed = 0
    # Enough feeds to exceed the bound; the decoder must refuse before.
    limit = (MAX_ATTRIBUTES + 1) * len(line) + HELD + chunk
    for _ in range(limit // chunk + 2):
        piece = endless[fed % len(line):][:chunk]
        fed += len(piece)
        decoder.feed(piece)
        try:
            assert decoder.next() is None
        except ProtocolError as exc:
            assert str(exc).startswith(error)
            break
        finally:
            assert len(decoder._buf) + len(decoder._kept) <= HELD + chunk
    else:
        pytest.fail("no ProtocolError after %d bytes" % fed)
    assert fed <= limit


def test_an_endless_attribute_is_discarded_up_to_the_skip_cap_holding_one_chunk():
    decoder = Decoder()
    decoder.feed(b"request=smtpd_access_policy\nsender=")
    chunk = b"v" * READ_SIZE
    fed = 0
    for _ in range(MAX_SKIP_BYTES // READ_SIZE + 2):
        decoder.feed(chunk)
        fed += len(chunk)
        try:
            assert decoder.next() is None
        except ProtocolError as exc:
            assert str(exc).startswith("more than %d bytes" % MAX_SKIP_BYTES)
            break
        assert len(decoder._buf) + len(decoder._kept) <= READ_SIZE + 100
    else:
        pytest.fail("no ProtocolError after %d bytes" % fed)
    assert MAX_SKIP_BYTES - READ_SIZE <= fed <= MAX_SKIP_BYTES + READ_SIZE


def test_a_malformed_line_past_the_request_cap_is_malformed_in_any_chunking():
    # Found by CI: a short line without "=" after the request cap was cut
    # out as "too long" (named with the bytes after it), not malformed.
    long_line = b"long=" + b"v" * (LINE - 5) + b"\n"
    stream = long_line * 4 + b"no equals sign\n\n"
    assert len(long_line * 4) > REQUEST
    for chunks in ([stream], [stream[:-1], stream[-1:]], [stream[:len(stream) // 2],
                                                          stream[len(stream) // 2:]]):
        requests, error = decode(chunks)
        assert requests == [] and error is not None and "malformed line" in error, (
            chunks, requests, error)


@pytest.mark.parametrize("line, error", [
    (b"GET / HTTP/1.1\r", "malformed line"),     # an HTTP probe: no empty line follows
    (b"=value", "malformed line"),
    (b"sender=a\0b", "NUL byte"),
])
def test_a_bad_line_is_refused_as_soon_as_it_ends(line, error):
    """Found in review: a line without "=" (or with a NUL) was refused only
    at its request's empty line, so a client that sent one and waited
    (an HTTP probe) held its connection until the cut-off, and at end of
    input it was logged as "premature end of input"."""
    decoder = Decoder()
    decoder.feed(b"request=smtpd_access_policy\n" + line + b"\n")
    with pytest.raises(ProtocolError, match=error):
        decoder.next()
    # A whole request fails on the same line as one in pieces would.
    whole = Decoder()
    whole.feed(b"request=smtpd_access_policy\n" + line + b"\nx\nc=\0\n\n")
    with pytest.raises(ProtocolError, match=error):
        whole.next()
