"""Whitelist entries (core/lists.py): regular expressions that would take
exponential time on a crafted address are refused at load, with a
warning (found in review: /^([a-z0-9]+[._-]?)+@example\\.com$/ took 12 s
for a 26-character local part, doubling with each character more)."""

import time

import pytest

from greylist.core.lists import match_address, match_client, parse


@pytest.mark.parametrize("pattern", [r"^([a-z0-9]+[._-]?)+@example\.com$", r"(x+)+y",
                                     r"^(\w*){2,}@", r"(a*b?)*c"])
def test_a_nested_repetition_is_refused_with_a_warning(pattern):
    warned = []
    entries = parse("/%s/\n" % pattern, "address", "wl", warned.append)
    assert entries.regexes == []
    assert len(warned) == 1 and "exponential time" in warned[0] and "wl, line 1" in warned[0]
    # And the crafted address is answered at once.
    began = time.monotonic()
    assert not match_address(entries, "a" * 40 + "!@example.com", "+")
    assert time.monotonic() - began < 0.1


@pytest.mark.parametrize("pattern, address", [
    (r"^mail\d+\.example\.com$", "mail7.example.com"),
    (r"(a|b)+@example\.org$", "abba@example.org"),
    (r"^(\d{1,3}\.){3}\d{1,3}$", "192.0.2.1"),
    (r"(foo)+bar@", "foofoobar@example.org"),
])
def test_ordinary_patterns_are_kept(pattern, address):
    warned = []
    entries = parse("/%s/\n" % pattern, "address", "wl", warned.append)
    assert warned == [] and match_address(entries, address, "+")


def test_a_leading_dot_domain_is_refused_and_a_trailing_dot_address_matches():
    # Review: ".example.com" (access(5)'s form) was taken silently and
    # matched nothing; "bob@example.com." escaped a domain entry.
    warned = []
    entries = parse(".example.com\nexample.org\ncarol@example.net\n", "address", "wl",
                    warned.append)
    assert len(warned) == 1 and "without the leading dot" in warned[0]
    assert match_address(entries, "bob@sub.example.org.", "+")
    assert match_address(entries, "Carol+x@Example.NET.", "+")
    assert not match_address(entries, "bob@sub.example.com", "+")


def test_a_whitelisted_sender_signed_with_batv_or_forwarded_with_srs_is_exempt():
    # Review: alice@example.org whitelisted, prvs=1234abcdef=alice@example.org
    # was deferred as new.
    from greylist.core.lists import Exemptions
    senders = parse("alice@example.org\n", "address", "wl", print)
    exemptions = Exemptions(senders=senders, delimiter="+")
    for sender in ("alice@example.org", "prvs=1234abcdef=alice@example.org",
                   "SRS0=h=TT=example.org=alice@fwd.example"):
        assert exemptions.reason({"recipient": "bob@example.net", "sender": sender},
                                 "192.0.2.1") == "whitelist-sender", sender
    assert exemptions.reason({"recipient": "bob@example.net",
                              "sender": "prvs=1234abcdef=eve@example.org"}, "192.0.2.1") is None


def test_a_client_network_with_host_bits_is_kept_widened_with_a_warning():
    # As postgrey (kept, widened), but no longer silently: Postfix's cidr
    # tables skip "192.0.2.1/24" with a warning.
    warned = []
    entries = parse("192.0.2.1/24\n198.51.100.0/24\n2001:0db8::/32\n2001:db8::1/32\n",
                    "client", "wl", warned.append)
    assert warned == ["wl, line 1: '192.0.2.1/24': host address bits set: it matches all "
                      "of 192.0.2.0/24",
                      "wl, line 4: '2001:db8::1/32': host address bits set: it matches all "
                      "of 2001:db8::/32"]
    assert match_client(entries, "192.0.2.200", None)
    assert [str(n) for n in entries.networks] == ["192.0.2.0/24", "198.51.100.0/24",
                                                  "2001:db8::/32", "2001:db8::/32"]


def test_an_address_line_with_an_action_or_an_at_domain_is_warned_of_not_kept():
    # "bob@example.net OK" and "@example.net" (access(5) forms) were kept
    # silently as entries that match no address; postgrey warns of the
    # first ("doesn't look like an address").
    warned = []
    entries = parse("bob@example.net OK\nexample.org DUNNO\n@example.net\ncarol@\n",
                    "address", "wl", warned.append)
    assert [w.split(":")[0] for w in warned] == ["wl, line 1", "wl, line 2", "wl, line 3"]
    assert "white space" in warned[0] and "without the \"@\"" in warned[2]
    assert not entries.addresses and not entries.names and entries.locals == {"carol"}


def test_client_entries_match_as_postgrey_matches_them():
    # postgrey searches a regex case-insensitively anywhere in the
    # client name; a name entry matches the name and its subdomains, a
    # trailing dot of the name aside.
    warned = []
    entries = parse("/Tiscali\\.IT$/\n/\\.google\\./\nsouthwest.com\n", "client", "wl",
                    warned.append)
    assert warned == []
    assert match_client(entries, "198.51.100.1", "smtp7.tiscali.it")
    assert match_client(entries, "198.51.100.1", "MAIL-yw1.google.com")
    assert match_client(entries, "198.51.100.1", "mx.southwest.com.")
    assert not match_client(entries, "198.51.100.1", "southwest.com.example")


def test_an_unknown_client_matches_no_address_and_no_name_entry():
    # client_address and client_name "unknown" (no address, no reverse
    # name) are Postfix's placeholders, not an address or a name: a
    # network entry must not choke on them, nor a name entry or a
    # pattern that happens to fit the word exempt every unnamed client.
    from greylist.core.lists import Exemptions
    entries = parse("192.0.2.0/24\n/^unknown$/\n/nk/\nunknown\n", "client", "wl", print)
    assert not match_client(entries, "unknown", None)
    assert not match_client(entries, "unknown", "unknown")
    assert not match_client(entries, "198.51.100.1", "unknown")
    assert match_client(entries, "192.0.2.1", "unknown")
    exemptions = Exemptions(clients=entries)
    assert exemptions.reason({"recipient": "bob@example.net", "sender": ""}, "unknown") is None
    assert exemptions.client_reason("unknown") is None
