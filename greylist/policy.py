"""SMTPD access policy delegation protocol: read requests, format replies.

DESCRIPTION
    A request is a sequence of ``name=value`` lines ended by an empty line;
    a reply is ``action=...`` followed by an empty line (SMTPD_POLICY_README).
    read_request() returns the attributes of one request as a dict of str,
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


class ProtocolError(Exception):
    """Input that violates the policy protocol; disconnect without reply."""


def read_request(stream: BinaryIO) -> dict[str, str] | None:
    """Read one request from a binary stream.

    Returns the attributes, or None at end of input before the first
    line of a request. Raises ProtocolError on malformed input.
    """
    # Collect the raw lines, then decode and split them in one go: per-line
    # work in Python is what this function costs.
    lines = []
    readline = stream.readline
    while True:
        line = readline(MAX_LINE_BYTES + 1)
        if line == b"\n":
            break
        if line[-1:] != b"\n":
            if not line:
                if not lines:
                    return None
                raise ProtocolError("premature end of input after %d attributes"
                                    % len(lines))
            if len(line) > MAX_LINE_BYTES:
                raise ProtocolError("line longer than %d bytes: %s"
                                    % (MAX_LINE_BYTES, _show(line)))
            raise ProtocolError("premature end of input in line %s" % _show(line))
        lines.append(line)
        if len(lines) > MAX_ATTRIBUTES:
            raise ProtocolError("more than %d attributes in one request" % MAX_ATTRIBUTES)
    block = b"".join(lines)
    if b"\0" in block:
        raise ProtocolError("NUL byte in line %s"
                            % _show(next(raw for raw in lines if b"\0" in raw)[:-1]))
    attrs: dict[str, str] = {}
    # A newline never occurs inside a UTF-8 sequence: splitting after
    # decoding gives the same lines.
    for raw, text in zip(lines, block.decode("utf-8", "surrogateescape").split("\n")):
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise ProtocolError("malformed line %s: expected name=value" % _show(raw[:-1]))
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
