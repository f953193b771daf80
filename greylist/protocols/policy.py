"""SMTPD access policy delegation protocol: a push decoder and replies.

DESCRIPTION
    A request is a sequence of ``name=value`` lines ended by an empty line;
    a reply is ``action=...`` followed by an empty line (SMTPD_POLICY_README).

    Decoder is a push parser, independent of any stream, so that the same
    code serves a blocking pipe and an asyncio connection: feed() it the
    bytes as they arrive, take complete requests with next() until it
    returns None, and call eof() at end of input. Any way of cutting a
    byte stream into chunks gives the same requests and the same error.
    A request is a dict of str, decoded from UTF-8 with surrogateescape
    so no byte is lost. As the README allows, unknown names are kept but
    ignored by callers, the last of repeated attributes wins, and an
    empty value counts as missing.

    Requests arrive whole in the common case, so one search for the
    empty line finds a request and the caps are checked on the block;
    otherwise the buffer is scanned line by line, and a violation is
    reported as soon as it shows, so at most the caps plus one chunk
    are ever held.

DIAGNOSTICS
    ProtocolError for input that a correct Postfix never sends: a line
    without "=", an empty name, a NUL byte, a line longer than
    MAX_LINE_BYTES, more than MAX_ATTRIBUTES attributes, or end of input
    in the middle of a request. The caller must log it and disconnect
    without a reply (SMTPD_POLICY_README: "In case of trouble the policy
    server must not send a reply").
"""

# Postfix 3.7 sends about 30 attributes; values are bounded by smtpd's
# line_length_limit (2048) and certificate names. These caps bound memory.
MAX_LINE_BYTES = 8192
MAX_ATTRIBUTES = 100
# Bytes a transport asks for per read(2): more than a request (about 1 KB).
READ_SIZE = 65536


class ProtocolError(Exception):
    """Input that violates the policy protocol; disconnect without reply."""


class Decoder:
    """Cuts a byte stream into policy requests; see the module description."""

    __slots__ = ("max_line", "max_attributes", "_buf", "_line", "_count")

    def __init__(self, max_line: int = MAX_LINE_BYTES,
                 max_attributes: int = MAX_ATTRIBUTES) -> None:
        self.max_line = max_line
        self.max_attributes = max_attributes
        self._buf = b""
        self._line = 0    # Where the line being scanned begins, in _buf.
        self._count = 0   # Attribute lines of the request so far.

    def feed(self, data: bytes) -> None:
        """Add bytes received; take the requests they complete with next()."""
        self._buf = self._buf + data if self._buf else data

    def next(self) -> dict[str, str] | None:
        """Return the next complete request, or None until more bytes come.

        Raises ProtocolError as soon as the input is malformed.
        """
        buf = self._buf
        if not buf:
            return None
        if self._line == 0 and buf[0] != 10:
            end = buf.find(b"\n\n")
            # A block shorter than the line cap cannot hold a long line.
            if 0 <= end < self.max_line:
                self._buf = buf[end + 2:]
                return _parse(buf[:end + 1], self.max_attributes)
        return self._scan(buf)

    def _scan(self, buf: bytes) -> dict[str, str] | None:
        """Scan line by line from where the last call stopped."""
        start = self._line
        while True:
            newline = buf.find(b"\n", start)
            if newline < 0:
                self._line = start
                if len(buf) - start > self.max_line:
                    raise _too_long(buf[start:start + 101], self.max_line)
                return None
            if newline == start:
                self._buf, self._line, self._count = buf[start + 1:], 0, 0
                return _parse(buf[:start], self.max_attributes)
            if newline - start > self.max_line:
                raise _too_long(buf[start:newline], self.max_line)
            self._count += 1
            if self._count > self.max_attributes:
                raise ProtocolError("more than %d attributes in one request"
                                    % self.max_attributes)
            start = newline + 1

    def eof(self) -> None:
        """End of input: raise ProtocolError if a request is incomplete."""
        buf, start = self._buf, self._line
        if not buf:
            return
        self._buf, self._line, self._count = b"", 0, 0
        # Lines after _line were not scanned yet (the fast path looks at
        # the whole block): find the unfinished line.
        last = buf.rfind(b"\n")
        if last == len(buf) - 1:
            raise ProtocolError("premature end of input after %d attributes"
                                % buf.count(b"\n"))
        raise ProtocolError("premature end of input in line %s" % _show(buf[last + 1:]))


def _too_long(line: bytes, cap: int) -> ProtocolError:
    return ProtocolError("line longer than %d bytes: %s" % (cap, _show(line)))


def _parse(block: bytes, max_attributes: int) -> dict[str, str]:
    """The attributes of a block of lines, each ended by a newline, within
    the line cap."""
    if block.count(b"\n") > max_attributes:
        raise ProtocolError("more than %d attributes in one request" % max_attributes)
    if b"\0" in block:
        line = next(raw for raw in block.split(b"\n") if b"\0" in raw)
        raise ProtocolError("NUL byte in line %s" % _show(line))
    # A newline never occurs inside a UTF-8 sequence: splitting after
    # decoding gives the same lines.
    lines = block.decode("utf-8", "surrogateescape").split("\n")
    lines.pop()
    attrs: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition("=")
        if not sep or not name:
            raise ProtocolError("malformed line %s: expected name=value"
                                % _show(line.encode("utf-8", "surrogateescape")))
        if value:
            attrs[name] = value
        else:
            attrs.pop(name, None)
    return attrs


def format_reply(action: str) -> bytes:
    """Return the wire form of a reply with the given non-empty action."""
    # An empty action is a permit in smtpd (check_table_result), and a
    # newline would end the reply early: both are bugs in the caller.
    if not action or "\n" in action or "\0" in action:
        raise ValueError("invalid action %r" % action)
    return b"action=" + action.encode("utf-8", "surrogateescape") + b"\n\n"


def _show(raw: bytes) -> str:
    """Return a bounded printable form of raw input for logging."""
    return repr(raw[:100]) + ("..." if len(raw) > 100 else "")
