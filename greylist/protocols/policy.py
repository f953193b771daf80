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

    An attribute line longer than MAX_LINE_BYTES, or one that would take
    the request past MAX_REQUEST_BYTES, is discarded as it arrives,
    never buffered; the rest of the request is read as usual, and at its
    empty line next() raises RequestTooLong, which the transport answers
    with the service's fail-open reply (DUNNO) without disconnecting.

DIAGNOSTICS
    ProtocolError for input that a correct Postfix never sends: a line
    without "=", an empty name, a NUL byte, more than MAX_ATTRIBUTES
    attributes, more than MAX_SKIP_BYTES discarded in one request, or
    end of input in the middle of a request. The caller must log it and
    disconnect without a reply (SMTPD_POLICY_README: "In case of trouble
    the policy server must not send a reply").

    RequestTooLong (a ProtocolError, so that a caller that does not know
    it still disconnects) for a whole request with over-long attributes:
    the decoder is then at the start of the next request.

BUGS/LIMITS
    smtpd takes sender, recipient, helo_name and etrn_domain from SMTP
    command lines, which it cuts at line_length_limit (smtpd_chat.c
    smtpd_chat_query_limit; default 2048, no upper bound in mail_params.c):
    an administrator who raises it above MAX_LINE_BYTES gets DUNNO and a
    warning for mail with longer addresses.
"""

# The longest attribute line kept: 32 times smtpd's default
# line_length_limit (mail_params.h DEF_LINE_LIMIT 2048), which bounds the
# values from SMTP commands; certificate names and fingerprints are
# shorter (smtpd_check.c check_policy_service).
MAX_LINE_BYTES = 65536
# The longest request kept: sender, recipient and helo_name at the line
# cap, plus the 27 other attributes of Postfix 3.7 (about 1 KB).
MAX_REQUEST_BYTES = 4 * MAX_LINE_BYTES
# Postfix 3.7 sends about 30 attributes: a framing cap.
MAX_ATTRIBUTES = 100
# The most input discarded in one request before it is a framing error,
# as in protocols/socketmap.py: a request never ends otherwise.
MAX_SKIP_BYTES = 10 * 1024 * 1024
# Bytes a transport asks for per read(2): more than a request (about 1 KB).
READ_SIZE = 65536


class ProtocolError(Exception):
    """Input that violates the policy protocol; disconnect without reply."""


class RequestTooLong(ProtocolError):
    """A whole request with attribute lines over the caps, discarded.

    dropped: (name, bytes) of each discarded line; attrs: the attributes
    kept, for the log line only (a request without its sender, say, must
    not be decided on).
    """

    def __init__(self, dropped: list[tuple[str, int]], attrs: dict[str, str],
                 max_line: int, max_request: int) -> None:
        self.dropped = dropped
        self.attrs = attrs
        super().__init__("request attribute too long: %s (caps: %d bytes per line, %d "
                         "per request)%s" % (
                             ", ".join("%s of %d bytes" % (_show_value(name), size)
                                       for name, size in dropped), max_line, max_request,
                             "".join(" %s=%s" % (name, _show_value(attrs[name]))
                                     for name in ("client_address", "instance")
                                     if name in attrs)))


class Decoder:
    """Cuts a byte stream into policy requests; see the module description."""

    __slots__ = ("max_line", "max_attributes", "max_request", "max_skip", "_buf", "_line",
                 "_count", "_dropped", "_dropping", "_skipped", "_kept")

    def __init__(self, max_line: int = MAX_LINE_BYTES,
                 max_attributes: int = MAX_ATTRIBUTES,
                 max_request: int = MAX_REQUEST_BYTES,
                 max_skip: int = MAX_SKIP_BYTES) -> None:
        self.max_line = max_line
        self.max_attributes = max_attributes
        self.max_request = max(max_request, max_line)
        self.max_skip = max_skip
        self._buf = b""
        self._line = 0    # Where the line being scanned begins, in _buf.
        self._count = 0   # Attribute lines of the request so far.
        # The lines of this request discarded so far, as (name, bytes);
        # whether the last of them is still arriving; their bytes.
        self._dropped: list[tuple[str, int]] = []
        self._dropping = False
        self._skipped = 0
        # While a line is discarded: the request's lines before it (_buf
        # then holds only what came after them).
        self._kept = b""

    def feed(self, data: bytes) -> None:
        """Add bytes received; take the requests they complete with next()."""
        self._buf = self._buf + data if self._buf else data

    def buffered(self) -> int:
        """How many bytes fed are not taken yet (flow control of a daemon)."""
        return len(self._buf) + len(self._kept)

    def in_request(self) -> bool:
        """Whether a request has begun and not ended: bytes buffered, or
        an over-long line being discarded, of which none are (a daemon's
        cut-off of requests that never end)."""
        return bool(self._buf or self._kept or self._dropped)

    def next(self) -> dict[str, str] | None:
        """Return the next complete request, or None until more bytes come.

        Raises ProtocolError as soon as the input is malformed, and
        RequestTooLong at the empty line of a request whose lines were
        discarded; the decoder is then ready for the next request.
        """
        buf = self._buf
        if not buf:
            return None
        if self._line == 0 and buf[0] != 10 and not self._dropped:
            end = buf.find(b"\n\n")
            # A block shorter than the line cap cannot hold a long line.
            if 0 <= end < self.max_line:
                self._buf = buf[end + 2:]
                return _parse(buf[:end + 1], self.max_attributes)
        return self._scan(buf)

    def _scan(self, buf: bytes) -> dict[str, str] | None:
        """Scan line by line from where the last call stopped."""
        start = self._line
        if self._dropping:
            buf = self._discard(buf)
            if self._dropping:
                return None
        while True:
            newline = buf.find(b"\n", start)
            if newline < 0:
                self._line = start
                if len(buf) - start > self.max_line:
                    # Discard the line as it arrives: only its name is kept.
                    # A NUL anywhere in it ends the connection, as in a
                    # line that arrives whole (the same for any chunking).
                    if b"\0" in buf[start:]:
                        raise ProtocolError("NUL byte in line %s" % _show(buf[start:]))
                    self._dropped.append((_name(buf[start:start + self.max_line],
                                                self.max_line), len(buf) - start))
                    self._dropping = True
                    self._kept, self._buf = buf[:start], b""
                    self._skip(len(buf) - start)
                else:
                    self._buf = buf
                return None
            if newline == start:
                dropped = self._dropped
                self._buf, self._line, self._count = buf[start + 1:], 0, 0
                attrs = _parse(buf[:start], self.max_attributes)
                if dropped:
                    self._dropped, self._skipped = [], 0
                    raise RequestTooLong(dropped, attrs, self.max_line, self.max_request)
                return attrs
            self._counted()
            if newline - start > self.max_line or newline >= self.max_request:
                # A whole line over a cap: cut it out. Only its own bytes
                # name it, and, being whole, it must have its "=" (a
                # malformed line past the request cap is still one).
                self._dropped.append((_name(buf[start:newline], self.max_line, whole=True),
                                      newline - start))
                self._skip(newline - start)
                buf = buf[:start] + buf[newline + 1:]
                continue
            # A whole line is checked at once: a malformed one must not
            # wait for an empty line that may never come.
            _check(buf[start:newline])
            start = newline + 1

    def _discard(self, buf: bytes) -> bytes:
        """Go on discarding the line that _buf continues; once it ends,
        return the request's kept lines and what follows the line."""
        name, size = self._dropped[-1]
        newline = buf.find(b"\n")
        end = len(buf) if newline < 0 else newline
        if b"\0" in buf[:end]:
            raise ProtocolError("NUL byte in line %s" % _show_value(name))
        self._dropped[-1] = (name, size + end)
        self._skip(end)
        if newline < 0:
            self._buf = b""
            return b""
        self._dropping = False
        self._counted()
        kept, self._kept = self._kept, b""
        return kept + buf[newline + 1:]

    def _counted(self) -> None:
        """Count one more line of the request."""
        self._count += 1
        if self._count > self.max_attributes:
            raise ProtocolError("more than %d attributes in one request"
                                % self.max_attributes)

    def _skip(self, size: int) -> None:
        """Count size bytes more discarded in this request."""
        self._skipped += size
        if self._skipped > self.max_skip:
            raise ProtocolError("more than %d bytes of over-long attributes in one "
                                "request" % self.max_skip)

    def eof(self) -> None:
        """End of input: raise ProtocolError if a request is incomplete."""
        buf, dropping, dropped = self._buf, self._dropping, self._dropped
        self._buf, self._line, self._count = b"", 0, 0
        self._dropping, self._dropped, self._skipped, self._kept = False, [], 0, b""
        if dropping:
            raise ProtocolError("premature end of input in over-long attribute %s"
                                % _show_value(dropped[-1][0]))
        if not buf and not dropped:
            return
        # Lines after _line were not scanned yet (the fast path looks at
        # the whole block): find the unfinished line.
        last = buf.rfind(b"\n")
        if last == len(buf) - 1:
            raise ProtocolError("premature end of input after %d attributes"
                                % (buf.count(b"\n") + len(dropped)))
        raise ProtocolError("premature end of input in line %s" % _show(buf[last + 1:]))


def _name(head: bytes, cap: int, whole: bool = False) -> str:
    """The name of an attribute line that is discarded, from its first
    bytes (whole: all of them); ProtocolError if it cannot be an
    attribute."""
    if whole and b"\0" in head:
        # As _parse() says of a line it keeps.
        raise ProtocolError("NUL byte in line %s" % _show(head))
    head = head[:cap]
    name, sep, _ = head.partition(b"=")
    if not name or (not sep and (whole or len(head) >= cap)) or b"\0" in name:
        raise ProtocolError("malformed line %s: expected name=value" % _show(head))
    return name.decode("utf-8", "surrogateescape")


def _show_value(value: str) -> str:
    """A bounded printable form of a decoded value, for logging."""
    return repr(value[:100])[1:-1] + ("..." if len(value) > 100 else "")


def _parse(block: bytes, max_attributes: int) -> dict[str, str]:
    """The attributes of a block of lines, each ended by a newline, within
    the line cap."""
    if block.count(b"\n") > max_attributes or b"\0" in block:
        _first_error(block, max_attributes)
    # A newline never occurs inside a UTF-8 sequence: splitting after
    # decoding gives the same lines.
    lines = block.decode("utf-8", "surrogateescape").split("\n")
    lines.pop()
    attrs: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition("=")
        if not sep or not name:
            _first_error(block, max_attributes)
        if value:
            attrs[name] = value
        else:
            attrs.pop(name, None)
    return attrs


def _check(line: bytes) -> None:
    """Raise ProtocolError for a line (without its newline) that is not
    name=value, or that holds a NUL."""
    if b"\0" in line:
        raise ProtocolError("NUL byte in line %s" % _show(line))
    name, sep, _ = line.partition(b"=")
    if not sep or not name:
        raise ProtocolError("malformed line %s: expected name=value" % _show(line))


def _first_error(block: bytes, max_attributes: int) -> None:
    """Raise the error of a block's first bad line, as Decoder._scan()
    meets it line by line (a line over the attribute cap first), so that
    a request that arrives whole fails as one that arrives in pieces."""
    for number, line in enumerate(block.split(b"\n")[:-1], 1):
        if number > max_attributes:
            raise ProtocolError("more than %d attributes in one request" % max_attributes)
        _check(line)
    raise AssertionError("no bad line in the block")


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
