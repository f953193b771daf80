"""Hostile policy input: generators and the oracle that judges the answers.

DESCRIPTION
    stream() makes a seeded stream of requests that mixes what Postfix
    sends with what it never sends: odd and overlong values, shell and
    format metacharacters, invalid UTF-8, NUL and CR bytes, lines without
    "=", too many attributes, truncation. check_answer() states what any
    input must get: status 0 or 1, well-formed UTF-8 replies only, and a
    protocol violation only as one warning that ends in "disconnecting
    without a reply".
"""

import random

from tests.reliability import split_replies

NAMES = ["request", "protocol_state", "protocol_name", "client_address", "client_name",
         "reverse_client_name", "helo_name", "sender", "recipient", "recipient_count",
         "queue_id", "instance", "size", "sasl_method", "sasl_username", "sasl_sender",
         "ccert_subject", "encryption_protocol", "policy_context", "stress"]
ODD_VALUES = [
    "", "RCPT", "rcpt", "DATA", "END-OF-MESSAGE", "CONNECT", "smtpd_access_policy",
    "unknown", "<>", "192.0.2.1", "::1", "::ffff:192.0.2.1", "2001:db8::1%eth0",
    "999.1.1.1", "1.2.3", "0.0.0.0", "255.255.255.255", "fe80::1%25lo", "[192.0.2.1]",
    "$(touch /tmp/greylist-pwned)", "`touch /tmp/greylist-pwned`", "; rm -rf /",
    "%s%s%s%n", "{0.__class__}", "${seconds_left}", "$recipient_domain", "\\x00",
    "a" * 600, "é" * 300, "Straße@EXAMPLE.de", "user@[IPv6:::1]", "a/b%2f#c@d",
    "\u2028", "\u202e", "\r", "x\ry", "\t", " ", "=", "==", "a=b", "\x7f", "\x1b[31m",
    "\udcff", "prvs=1234=foo@example.org", "SRS0=a=b=example.org=user@fw.example",
]


def value(rng: random.Random) -> bytes:
    choice = rng.random()
    if choice < 0.45:
        text = rng.choice(ODD_VALUES)
        return text.encode("utf-8", "surrogateescape")
    if choice < 0.7:
        return bytes(rng.randrange(1, 256) for _ in range(rng.randrange(0, 40))
                     ).replace(b"\n", b"")
    if choice < 0.8:
        return b"x" * rng.choice([100, 2047, 8185, 8186, 8192, 8193, 20000])
    return ("".join(rng.choice("abc.@+-_=%/#:ÄΩ中\x01 ") for _ in range(rng.randrange(30)))
            ).encode()


def good_request(rng: random.Random) -> list[bytes]:
    """A request Postfix could send (values may still be odd)."""
    n = rng.randrange(1 << 20)
    lines = [b"request=smtpd_access_policy", b"protocol_state=RCPT",
             b"client_address=10.%d.%d.%d" % (n >> 16 & 255, n >> 8 & 255, n & 255),
             b"sender=s%d@example.org" % n, b"recipient=r%d@example.net" % n]
    for _ in range(rng.randrange(0, 6)):
        lines.append(rng.choice(NAMES).encode() + b"=" + value(rng))
    rng.shuffle(lines)
    return lines


def bad_line(rng: random.Random) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return b"no equals sign"
    if kind == 1:
        return b"=value without a name"
    if kind == 2:
        return b"name=with\0nul"
    if kind == 3:
        return b"x=" + b"y" * 9000
    if kind == 4:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60))).replace(
            b"\n", b"")
    return b"request=something_else"


def stream(rng: random.Random) -> tuple[bytes, bool]:
    """A stream of requests; returns (data, clean) where clean means every
    request is complete and has only name=value lines of bounded size."""
    parts, clean = [], True
    for _ in range(rng.randrange(1, 5)):
        lines = good_request(rng)
        if rng.random() < 0.3:
            lines.insert(rng.randrange(len(lines) + 1), bad_line(rng))
            clean = False
        if rng.random() < 0.05:
            lines += [b"a%d=b" % i for i in range(101)]
            clean = False
        parts.append(b"".join(line + b"\n" for line in lines) + b"\n")
    data = b"".join(parts)
    if rng.random() < 0.15:
        data = data[:rng.randrange(len(data))]
        clean = False
    return data, clean


def check_answer(status: int, out: bytes, log_lines: list[str], requests: int | None):
    """Assert what every input must get; requests is the number of
    requests when the input is clean, else None."""
    assert status in (0, 1), status
    actions = split_replies(out)
    assert actions is not None, "malformed output %r" % out[:300]
    for action in actions:
        word = action.split(None, 1)[0]
        assert word in ("DUNNO", "DEFER_IF_PERMIT", "PREPEND"), action
    # smtpd rejects a reply that is not UTF-8 with its default_action (451).
    out.decode("utf-8")
    text = "\n".join(log_lines)
    assert "Traceback" not in text and "internal error" not in text, text[-2000:]
    if status == 1:
        assert log_lines and log_lines[-1].endswith("disconnecting without a reply"), \
            log_lines[-3:]
        assert ": warning: " in log_lines[-1]
    elif requests is not None:
        assert len(actions) == requests, (len(actions), requests)
