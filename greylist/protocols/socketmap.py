"""The socketmap protocol of socketmap_table(5): a push netstring decoder.

DESCRIPTION
    Postfix's socketmap client sends one request and waits for one reply,
    each one netstring: "LEN:DATA," where LEN is the decimal length of
    DATA (src/util/netstring.c: digits only, no sign, no white space).
    A request's DATA is "NAME KEY": the map name, one space, the lookup
    key, in its original case (postfix-interop.md section 4).

    Decoder is a push decoder like protocols/policy.py's: feed() takes
    bytes as they arrive, next() returns the next complete request as
    (name, key) (str, decoded as UTF-8 with surrogateescape), and eof()
    says whether the input ended between requests. The length is checked
    as soon as its digits are read, so an oversized request is refused
    before its data arrives, and nothing more than MAX_REQUEST_BYTES plus
    one read is ever buffered.

    format_reply() frames a reply: "NOTFOUND " (with the space), or
    "OK DATA".

DIAGNOSTICS
    ProtocolError (the policy protocol's) for a framing error: a length
    that is not digits, too many digits, a length over MAX_REQUEST_BYTES,
    a missing ",", data without "NAME KEY" form, and input that ends
    inside a request. A request over MAX_REQUEST_BYTES (up to
    MAX_SKIP_BYTES) is discarded as it arrives and next() returns
    OVERSIZED, answered "NOTFOUND ". For a ProtocolError the transport
    logs it and closes the connection without a reply; Postfix's client
    retries once on a new connection (dict_sockmap.c).
"""

from greylist.protocols.policy import ProtocolError

# The 3.12 client's socketmap_max_query_size default (10000) for the key,
# plus room for the map name and the space.
MAX_KEY_BYTES = 10000
MAX_REQUEST_BYTES = MAX_KEY_BYTES + 100
# Longer requests are read and discarded, not kept: a header line may be
# as long as header_size_limit (102400 by default), and cleanup defers a
# message whose header_checks lookup fails. Beyond this, a framing error.
MAX_SKIP_BYTES = 10 * 1024 * 1024
_MAX_LENGTH_DIGITS = len(str(MAX_SKIP_BYTES))
# What next() returns for a request it discarded.
OVERSIZED = ("", "")
READ_SIZE = 16384

NOTFOUND = b"9:NOTFOUND ,"
# The postscreen map's answer for a proven client (postscreen_access_list).
PERMIT = b"9:OK permit,"


class Decoder:
    """Socketmap requests from bytes pushed in any pieces."""

    __slots__ = ("_buffer", "_start", "_skip")

    def __init__(self) -> None:
        self._buffer = b""
        self._start = 0
        # Bytes still to discard of an oversized request (its data and
        # its comma), or 0.
        self._skip = 0

    def feed(self, data: bytes) -> None:
        """Add bytes read from the connection."""
        if self._start:
            self._buffer = self._buffer[self._start:] + data
            self._start = 0
        else:
            self._buffer += data

    def buffered(self) -> int:
        """How many bytes fed are not taken yet (flow control of a daemon)."""
        return len(self._buffer) - self._start

    def in_request(self) -> bool:
        """Whether a request has begun and not ended: bytes buffered, or
        an oversized one being discarded, of which none are (a daemon's
        cut-off of requests that never end)."""
        return bool(self._skip) or len(self._buffer) > self._start

    def next(self) -> tuple[str, str] | None:
        """Return the next complete request as (name, key), or None if
        more input is needed. Raises ProtocolError (see DIAGNOSTICS)."""
        if self._skip:
            buffer, start = self._buffer, self._start
            take = min(self._skip, len(buffer) - start)
            self._skip -= take
            start += take
            if self._skip:
                self._buffer, self._start = b"", 0  # all of it discarded
                return None
            # The last byte discarded must be the comma.
            if buffer[start - 1:start] != b",":
                raise ProtocolError("socketmap: netstring without its terminating comma")
            self._buffer, self._start = buffer[start:], 0
            return OVERSIZED
        buffer, start = self._buffer, self._start
        colon = buffer.find(b":", start, start + _MAX_LENGTH_DIGITS + 1)
        if colon < 0:
            pending = buffer[start:start + _MAX_LENGTH_DIGITS + 1]
            if not pending.isdigit() and pending:
                raise ProtocolError("socketmap: bad netstring length %s"
                                    % repr(pending[:20])[:100])
            if len(pending) > _MAX_LENGTH_DIGITS:
                raise ProtocolError("socketmap: netstring length of over %d digits"
                                    % _MAX_LENGTH_DIGITS)
            return None
        digits = buffer[start:colon]
        if not digits.isdigit() or not digits.isascii():
            raise ProtocolError("socketmap: bad netstring length %s" % repr(digits[:20])[:100])
        length = int(digits)
        if length > MAX_REQUEST_BYTES:
            if length > MAX_SKIP_BYTES:
                raise ProtocolError("socketmap: request of %d bytes, over the %d-byte limit"
                                    % (length, MAX_SKIP_BYTES))
            # A long header line (header_checks) or address: discarded as
            # it arrives, never buffered, and answered NOTFOUND.
            self._buffer, self._start, self._skip = buffer, colon + 1, length + 1
            return self.next()
        end = colon + 1 + length
        if len(buffer) <= end:
            return None
        if buffer[end:end + 1] != b",":
            raise ProtocolError("socketmap: netstring without its terminating comma")
        data = buffer[colon + 1:end]
        self._start = end + 1
        if self._start == len(buffer):
            self._buffer, self._start = b"", 0
        name, space, key = data.partition(b" ")
        if not space or not name:
            raise ProtocolError("socketmap: request is not \"NAME KEY\": %s"
                                % repr(data[:60])[:100])
        return (name.decode("utf-8", "surrogateescape"),
                key.decode("utf-8", "surrogateescape"))

    def eof(self) -> None:
        """The input ended: raise ProtocolError if inside a request."""
        if self._skip or len(self._buffer) > self._start:
            raise ProtocolError("socketmap: connection closed inside a request")


def format_reply(status: str, data: str = "") -> bytes:
    """Return a reply netstring: "NOTFOUND " or "OK DATA"."""
    if status == "NOTFOUND":
        return NOTFOUND
    body = ("%s %s" % (status, data)).encode("utf-8", "surrogateescape")
    return b"%d:%s," % (len(body), body)
