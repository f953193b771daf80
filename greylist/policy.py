"""SMTPD access policy delegation protocol: read requests, format replies.

DESCRIPTION
    A request is a sequence of ``name=value`` lines ended by an empty line;
    a reply is ``action=...`` followed by an empty line (SMTPD_POLICY_README).
    Reader.read() returns the attributes of one request as a dict of str,
    decoded from UTF-8 with surrogateescape so no byte is lost. As the
    README allows, unknown names are kept but ignored by callers, the last
    of repeated attributes wins, and an empty value counts as missing.

DIAGNOSTICS
    ProtocolError for input that a correct Postfix never sends: a line
    without "=", an empty name, a NUL byte, a line longer than
    MAX_LINE_BYTES, more than MAX_ATTRIBUTES attributes, or end of input
    in the middle of a request. The caller must log it and disconnect
    without a reply (SMTPD_POLICY_README: "In case of trouble the policy
    server must not send a reply").
"""

from typing import BinaryIO

# Postfix 3.7 sends about 30 attributes; values are bounded by smtpd's
# line_length_limit (2048) and certificate names. These caps bound memory.
MAX_LINE_BYTES = 8192
MAX_ATTRIBUTES = 100
# Bytes asked for per read(2): more than a request, which is about 1 KB.
READ_SIZE = 65536


class ProtocolError(Exception):
    """Input that violates the policy protocol; disconnect without reply."""


class Reader:
    """Reads requests from one binary stream through a buffer.

    The stream must have read1() (a BufferedReader such as
    sys.stdin.buffer, or a BytesIO). Requests arrive whole in the common
    case, so one read(2) and one search for the empty line find a
    request; the caps are then checked on the block. Otherwise the
    buffer is scanned line by line as bytes arrive, and a violation is
    reported as soon as it shows, so at most the caps plus one read are
    ever held.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._read1 = stream.read1
        self._buf = b""

    def read(self) -> dict[str, str] | None:
        """Return the attributes of the next request, or None at end of
        input before its first byte. Raises ProtocolError on malformed input.
        """
        buf = self._buf or self._read1(READ_SIZE)
        if not buf:
            return None
        if buf[0] != 10:
            end = buf.find(b"\n\n")
            # A block shorter than the line cap cannot hold a long line.
            if 0 <= end < MAX_LINE_BYTES:
                self._buf = buf[end + 2:]
                return _parse(buf[:end + 1])
        return self._read_lines(bytearray(buf))

    def _read_lines(self, buf: bytearray) -> dict[str, str]:
        start = 0  # Where the line being read begins.
        count = 0
        while True:
            newline = buf.find(b"\n", start)
            if newline < 0:
                if len(buf) - start > MAX_LINE_BYTES:
                    raise _too_long(bytes(buf[start:start + 101]))
                data = self._read1(READ_SIZE)
                if data:
                    buf += data
                    continue
                self._buf = b""
                if start == len(buf):
                    raise ProtocolError("premature end of input after %d attributes" % count)
                raise ProtocolError("premature end of input in line %s"
                                    % _show(bytes(buf[start:])))
            if newline == start:
                self._buf = bytes(buf[start + 1:])
                return _parse(bytes(buf[:start]))
            if newline - start > MAX_LINE_BYTES:
                raise _too_long(bytes(buf[start:newline]))
            count += 1
            if count > MAX_ATTRIBUTES:
                raise ProtocolError("more than %d attributes in one request" % MAX_ATTRIBUTES)
            start = newline + 1


def _too_long(line: bytes) -> ProtocolError:
    return ProtocolError("line longer than %d bytes: %s" % (MAX_LINE_BYTES, _show(line)))


def _parse(block: bytes) -> dict[str, str]:
    """The attributes of a block of lines, each ended by a newline, within
    the line cap."""
    if block.count(b"\n") > MAX_ATTRIBUTES:
        raise ProtocolError("more than %d attributes in one request" % MAX_ATTRIBUTES)
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
