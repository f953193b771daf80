"""Tests for greylist.core.triple: canonical triples and their database keys."""

import hashlib
import re

import pytest
from hypothesis import given, strategies as st


from greylist.config import Config
from greylist.core.triple import BadAddress, MAX_KEY_BYTES, Triple, client_address, key, triple_from_request

# Exact client addresses, no sender extension: the triple as sent.
EXACT = Config(client_match="exact", sender_delimiter="")

CLIENT = "192.0.2.1"
RCPT = "bob@example.org"


@pytest.mark.parametrize("value, expected", [
    pytest.param("192.0.2.1", "192.0.2.1", id="ipv4"),
    pytest.param("2001:db8::1", "2001:db8::1", id="ipv6"),
    pytest.param("2001:DB8:0:0::1", "2001:db8::1", id="ipv6-compressed-lowercased"),
    pytest.param("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1", id="ipv6-full-form"),
    pytest.param("::ffff:192.0.2.1", "192.0.2.1", id="ipv4-mapped"),
    pytest.param("::FFFF:C000:0201", "192.0.2.1", id="ipv4-mapped-hex"),
    pytest.param("::192.0.2.1", "::c000:201", id="ipv4-compatible-stays-ipv6"),
    pytest.param("::1", "::1", id="ipv6-loopback"),
    pytest.param("unknown", "unknown", id="unknown"),
    pytest.param(None, "unknown", id="missing"),
    pytest.param("", "unknown", id="empty"),
])
def test_client_address(value, expected):
    assert client_address(value) == expected


@pytest.mark.parametrize("value", [
    pytest.param("not-an-ip", id="word"),
    pytest.param("mail.example.net", id="hostname"),
    pytest.param("192.0.2.256", id="octet-out-of-range"),
    pytest.param("192.0.2", id="three-octets"),
    pytest.param("192.0.2.1 ", id="trailing-space"),
    pytest.param(" 192.0.2.1", id="leading-space"),
    pytest.param("[192.0.2.1]", id="address-literal"),
    pytest.param("IPv6:2001:db8::1", id="ipv6-address-literal-tag"),
    pytest.param("192.0.2.0/24", id="network"),
    pytest.param("2001:db8::1::2", id="two-double-colons"),
    pytest.param("UNKNOWN", id="unknown-uppercase"),
])
def test_client_address_rejects(value):
    with pytest.raises(BadAddress, match="client_address"):
        client_address(value)


@pytest.mark.parametrize("attrs, expected", [
    pytest.param({"client_address": CLIENT, "sender": "alice@example.net", "recipient": RCPT},
                 Triple(CLIENT, "alice@example.net", RCPT), id="plain"),
    pytest.param({"client_address": CLIENT, "recipient": RCPT},
                 Triple(CLIENT, "<>", RCPT), id="null-sender-missing"),
    pytest.param({"client_address": CLIENT, "sender": "", "recipient": RCPT},
                 Triple(CLIENT, "<>", RCPT), id="null-sender-empty"),
    pytest.param({"sender": "alice@example.net", "recipient": RCPT},
                 Triple("unknown", "alice@example.net", RCPT), id="client-missing"),
    pytest.param({"client_address": "::ffff:192.0.2.1", "sender": "a@example.net",
                  "recipient": RCPT},
                 Triple(CLIENT, "a@example.net", RCPT), id="client-canonical"),
    pytest.param({"client_address": CLIENT, "sender": "Alice@Example.NET",
                  "recipient": "Bob@Example.ORG"},
                 Triple(CLIENT, "alice@example.net", "bob@example.org"),
                 id="case-folded-in-triple"),
])
def test_triple_from_request(attrs, expected):
    assert triple_from_request(attrs, EXACT) == expected


def test_triple_from_request_rejects_bad_client():
    with pytest.raises(BadAddress):
        triple_from_request({"client_address": "not-an-ip", "recipient": RCPT}, EXACT)


@pytest.mark.parametrize("triple, expected", [
    pytest.param(Triple(CLIENT, "alice@example.net", RCPT),
                 b"192.0.2.1/alice@example.net/bob@example.org", id="plain"),
    pytest.param(Triple("2001:db8::1", "<>", RCPT),
                 b"2001:db8::1/<>/bob@example.org", id="ipv6-null-sender"),
    pytest.param(Triple("unknown", "a@example.net", RCPT),
                 b"unknown/a@example.net/bob@example.org", id="unknown-client"),
    pytest.param(Triple(CLIENT, "Alice@Example.NET", "BOB@EXAMPLE.ORG"),
                 b"192.0.2.1/alice@example.net/bob@example.org", id="ascii-case-folded"),
    pytest.param(Triple(CLIENT, "a@example.net", "Stra\u00dfe@Example.DE"),
                 b"192.0.2.1/a@example.net/strasse@example.de", id="casefold-sharp-s"),
    pytest.param(Triple(CLIENT, "J\u00d6RG@example.de", RCPT),
                 "192.0.2.1/j\u00f6rg@example.de/bob@example.org".encode(),
                 id="non-ascii-kept-as-utf-8"),
    pytest.param(Triple(CLIENT, "100%@example.net", RCPT),
                 b"192.0.2.1/100%25@example.net/bob@example.org", id="percent"),
    pytest.param(Triple(CLIENT, "a/b@example.net", "c/d@example.org"),
                 b"192.0.2.1/a%2fb@example.net/c%2fd@example.org", id="slash"),
    pytest.param(Triple(CLIENT, "\"a b\"@example.net", RCPT),
                 b"192.0.2.1/\"a%20b\"@example.net/bob@example.org", id="space"),
    pytest.param(Triple(CLIENT, "a\tb", "c\nd\re"),
                 b"192.0.2.1/a%09b/c%0ad%0de", id="tab-newline-cr"),
    pytest.param(Triple(CLIENT, "\x00\x01\x1f", "\x7f"),
                 b"192.0.2.1/%00%01%1f/%7f", id="controls-and-del"),
    pytest.param(Triple(CLIENT, "\udcffa@example.net", "\udc80@example.org"),
                 b"192.0.2.1/%ffa@example.net/%80@example.org", id="non-utf-8-bytes"),
    pytest.param(Triple(CLIENT, "\u00ff@example.net", RCPT),
                 "192.0.2.1/\u00ff@example.net/bob@example.org".encode(),
                 id="valid-u+00ff-not-escaped"),
])
def test_key(triple, expected):
    assert key(triple) == expected


# Pairs of triples that must (True) or must not (False) share a key.
@pytest.mark.parametrize("one, other, same", [
    pytest.param(Triple(CLIENT, "a/b", "c"), Triple(CLIENT, "a", "b/c"), False,
                 id="slash-moves-between-fields"),
    pytest.param(Triple(CLIENT, "/", "x"), Triple(CLIENT, "%2f", "x"), False,
                 id="slash-vs-its-escape"),
    pytest.param(Triple(CLIENT, "\udcff", "x"), Triple(CLIENT, "%ff", "x"), False,
                 id="bad-byte-vs-its-escape"),
    pytest.param(Triple(CLIENT, "\udcff", "x"), Triple(CLIENT, "\u00ff", "x"), False,
                 id="bad-byte-vs-valid-u+00ff"),
    pytest.param(Triple(CLIENT, "<>", "x"), Triple(CLIENT, "%3c%3e", "x"), False,
                 id="null-sender-vs-lookalike"),
    pytest.param(Triple(CLIENT, "a", "x"), Triple("192.0.2.2", "a", "x"), False,
                 id="other-client"),
    pytest.param(Triple(CLIENT, "STRASSE", "x"), Triple(CLIENT, "stra\u00dfe", "x"), True,
                 id="equal-after-casefold"),
])
def test_key_distinguishes(one, other, same):
    assert (key(one) == key(other)) is same


@pytest.mark.parametrize("value", [
    pytest.param("fe80::1%a b", id="space-in-scope"),
    pytest.param("fe80::1%\t", id="tab-in-scope"),
    pytest.param("fe80::1%\x01", id="control-in-scope"),
    pytest.param("fe80::1%\udcff", id="non-utf-8-in-scope"),
])
def test_ipv6_scope_id_cannot_put_white_space_or_bad_bytes_in_key(value):
    # Regression: ipaddress accepts a scope ID ("%zone") after an IPv6
    # address, and client_address kept it, so white space, controls and
    # undecodable bytes from client_address reached key() unescaped: the
    # key held white space, or key() raised UnicodeEncodeError instead of
    # the BadAddress the policy handler turns into a protocol error. Either rejecting the value or
    # dropping the zone (as Postfix does, smtpd_peer.c) is fine.
    try:
        client = client_address(value)
    except BadAddress:
        return
    k = key(Triple(client, "a@example.net", RCPT))
    k.decode("utf-8")
    assert re.search(rb"[\x00-\x20\x7f]", k) is None


def _full(triple: Triple) -> bytes:
    """The escaped key of a triple with only [a-z@.] in sender and recipient."""
    return ("%s/%s/%s" % (triple.client, triple.sender, triple.recipient)).encode()


@pytest.mark.parametrize("triple", [
    pytest.param(Triple(CLIENT, "a@example.net", "b" * (MAX_KEY_BYTES - 36) + "@example.org"),
                 id="max-bytes"),
    pytest.param(Triple(CLIENT, "a@example.net", "b" * (MAX_KEY_BYTES - 60) + "@example.org"),
                 id="below-max-bytes"),
])
def test_key_up_to_max_bytes_is_kept_whole(triple):
    assert len(_full(triple)) <= MAX_KEY_BYTES
    assert key(triple) == _full(triple)


@pytest.mark.parametrize("triple", [
    pytest.param(Triple(CLIENT, "a@example.net", "b" * (MAX_KEY_BYTES - 35) + "@example.org"),
                 id="one-byte-over"),
    pytest.param(Triple(CLIENT, "a@example.net", "b" * 2000 + "@example.org"), id="far-over"),
    pytest.param(Triple(CLIENT, "s" * 600 + "@example.net", "b@example.org"),
                 id="long-sender"),
])
def test_long_key_keeps_a_prefix_and_the_sha256(triple):
    full = _full(triple)
    assert len(full) > MAX_KEY_BYTES
    k = key(triple)
    digest = hashlib.sha256(full).hexdigest().encode()
    assert len(k) <= MAX_KEY_BYTES
    assert k == full[:len(k) - len(digest) - 1] + b"#" + digest


def test_long_key_is_cut_on_a_character_boundary():
    # Two-byte characters: any cut position falls inside one of them half the time.
    for extra in range(4):
        triple = Triple(CLIENT, "a" * extra, "\u00e9" * MAX_KEY_BYTES)
        k = key(triple)
        assert len(k) <= MAX_KEY_BYTES
        k.decode("utf-8")


def test_short_key_cannot_equal_a_shortened_long_key():
    # Regression: "#" was not escaped, so the shortened key of a long
    # triple, read literally as a triple, was also a short triple's key:
    # two triples shared one record.
    long_triple = Triple(CLIENT, "a@example.net", "b" * 600 + "@example.org")
    client, sender, recipient = key(long_triple).decode("utf-8").split("/", 2)
    forged = Triple(client, sender, recipient)
    assert key(forged) != key(long_triple)


# Fields as Reader.read() produces them (any bytes, decoded with
# surrogateescape), plus arbitrary text; clients in canonical form.
# Short fields give keys below MAX_KEY_BYTES: a character casefolds to
# at most 3 characters of at most 4 bytes each, a byte escapes to 3.
def _fields(max_size: int | None = None):
    return st.one_of(
        st.text(max_size=max_size),
        st.binary(max_size=max_size).map(lambda b: b.decode("utf-8", "surrogateescape")),
    )


_clients = st.one_of(
    st.just("unknown"),
    st.ip_addresses().map(lambda a: client_address(str(a))),
)
_short_triples = st.builds(Triple, _clients, _fields(19), _fields(19))
_triples = st.one_of(
    _short_triples,
    st.builds(Triple, _clients, _fields(), _fields()),
    st.builds(Triple, _clients, _fields(), _fields(400)),
)


def _unescape(field: str) -> str:
    """Invert the %xx escaping: each %xx is one byte of the field's UTF-8
    form, and bytes that are not UTF-8 come back as surrogates, exactly as
    Reader.read() decodes them."""
    raw = re.sub(rb"%([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]),
                 field.encode("utf-8"))
    return raw.decode("utf-8", "surrogateescape")


@given(_triples)
def test_key_is_short_valid_utf_8_without_white_space(triple):
    k = key(triple)
    assert len(k) <= MAX_KEY_BYTES
    k.decode("utf-8")
    assert re.search(rb"[\x00-\x20\x7f]", k) is None


@given(_triples)
def test_key_is_deterministic_and_folding_is_idempotent(triple):
    again = Triple(triple.client, triple.sender, triple.recipient)
    folded = Triple(triple.client, triple.sender.casefold(), triple.recipient.casefold())
    assert key(again) == key(triple)
    assert key(folded) == key(triple)


@given(_short_triples)
def test_key_is_injective(triple):
    # The casefolded triple can be read back from a key that was not
    # shortened, so two triples that differ after casefolding never share
    # a key; the key has exactly two "/" separators.
    client, sender, recipient = key(triple).decode("utf-8").split("/")
    assert (client, _unescape(sender), _unescape(recipient)) == (
        triple.client, triple.sender.casefold(), triple.recipient.casefold())


@given(st.text())
def test_client_address_raises_only_bad_address(value):
    try:
        client = client_address(value)
    except BadAddress:
        return
    assert client_address(client) == client


def test_the_escape_fast_path_never_skips_a_character_that_needs_escaping():
    # _plain() spares most fields the regular expression; it may send a
    # field to the slow path needlessly, never the other way round.
    import re
    from greylist.core.triple import _ESCAPE, _plain
    unsafe = [hex(c) for c in range(0x110000)
              if _plain(chr(c)) and re.search(_ESCAPE, chr(c)) is not None]
    assert unsafe == []
