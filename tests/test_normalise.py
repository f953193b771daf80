"""Tables for every normalisation of the triple."""

import pytest

from greylist.config import Config
from greylist.core.triple import client_group, normalise_sender

CFG = Config()


@pytest.mark.parametrize("sender, expected", [
    ("", "<>"),
    (None, "<>"),
    ("Alice@Example.ORG", "alice@example.org"),
    ("Straße@Example.DE", "strasse@example.de"),
    ("alice+news@example.org", "alice@example.org"),
    ("alice+a+b@example.org", "alice@example.org"),
    ("+alice@example.org", "+alice@example.org"),
    ("prvs=1234abcdef=alice@example.org", "alice@example.org"),
    ("PRVS=0123ABCD=Alice@Example.org", "alice@example.org"),
    ("msprvs1=17xyz0=alice@example.org", "alice@example.org"),
    ("SRS0=HHH=TT=orig.example=alice@forwarder.example", "alice@orig.example"),
    ("SRS0+HHH=TT=orig.example=alice@forwarder.example", "alice@orig.example"),
    ("SRS1=XXX=fwd1.example==HHH=TT=orig.example=alice@fwd2.example", "alice@orig.example"),
    ("srs0=hhh=tt=orig.example=alice+tag@forwarder.example", "alice@orig.example"),
    # Review: the original local part's own "=" (BATV, VERP) made the
    # last two fields the domain and local part: each day's tag a new
    # sender, and two senders of different domains one.
    ("SRS0=h=TT=example.org=prvs=1234abcdef=alice@fwd.example", "alice@example.org"),
    ("SRS0=h=TT=example.org=prvs=1235bcdefa=alice@fwd.example", "alice@example.org"),
    ("SRS0=x=TT=a.example=foo=bar@fwd.example", "foo=bar@a.example"),
    ("SRS0=y=TT=b.example=foo=bar@fwd.example", "foo=bar@b.example"),
    ("SRS1=XXX=fwd1.example=+HHH=TT=orig.example=a=b@fwd2.example", "a=b@orig.example"),
    ("prvs=alice=1234abcdef@example.org", "alice@example.org"),
    ("bounce-12345-6789@lists.example", "bounce-#-#@lists.example"),
    ("list-owner.2024.17@lists.example", "list-owner.#.#@lists.example"),
    ("user42@example.org", "user42@example.org"),
    ("12345@example.org", "#@example.org"),
    ("no-at-sign", "no-at-sign"),
])
def test_sender_normalisation(sender, expected):
    assert normalise_sender(sender, CFG) == expected
    assert normalise_sender(expected, CFG) == expected  # idempotent


@pytest.mark.parametrize("delimiter, sender, expected", [
    ("", "alice+news@example.org", "alice+news@example.org"),
    ("-", "alice-news@example.org", "alice@example.org"),
    ("+-", "alice-news+x@example.org", "alice@example.org"),
])
def test_sender_delimiter_setting(delimiter, sender, expected):
    assert normalise_sender(sender, Config(sender_delimiter=delimiter)) == expected


@pytest.mark.parametrize("address, v4, v6, expected", [
    ("192.0.2.10", 24, 64, "192.0.2"),
    ("192.0.2.10", 16, 64, "192.0"),
    ("192.0.2.10", 8, 64, "192"),
    ("192.0.2.10", 32, 64, "192.0.2.10"),
    ("2001:db8:1:2::5", 24, 64, "2001:db8:1:2"),
    ("2001:db8::5", 24, 64, "2001:db8:0:0"),
    ("2001:0db8:00a0:0002::5", 24, 48, "2001:db8:a0"),
    ("2001:db8::5", 24, 128, "2001:db8::5"),
    ("unknown", 24, 64, "unknown"),
    # NAT64 (RFC 6052): an IPv4 host behind a translator is cut as IPv4,
    # never as the one /64 that holds every IPv4 host.
    ("64:ff9b::c000:20a", 24, 64, "192.0.2"),
    ("64:ff9b::c000:20a", 32, 128, "192.0.2.10"),
    ("64:ff9b::1:0:0:1", 24, 64, "64:ff9b:0:0"),
    ("64:ff9b::1:0:1", 24, 64, "64:ff9b:0:0"),
])
def test_client_grouping(address, v4, v6, expected):
    cfg = Config(ipv4_prefix=v4, ipv6_prefix=v6)
    assert client_group(address, None, cfg) == expected


@pytest.mark.parametrize("address, name, expected", [
    ("209.85.128.10", "mail-wm1-f10.google.com", "google.com"),
    ("192.0.2.10", "mx1.mail.example.co.uk", "example.co.uk"),
    ("192.0.2.10", "unknown", "192.0.2"),
    ("192.0.2.10", None, "192.0.2"),
    ("192.0.2.10", "localhost", "192.0.2"),
    ("192.0.2.10", "10.2.0.192", "192.0.2"),
    ("192.0.2.10", "ec2-192-0-2-10.compute-1.amazonaws.com", "192.0.2"),
    ("192.0.2.10", "bad name!", "192.0.2"),
])
def test_pool_aware_grouping_by_registered_domain(address, name, expected):
    assert client_group(address, name, Config(client_match="domain")) == expected


def test_nat64_clients_are_apart_in_pool_mode():
    # Two IPv4 hosts of different networks behind one translator: apart;
    # an access-network host alone, as its IPv4 form would be.
    cfg = Config(client_match="pool")
    one = client_group("64:ff9b::c000:20a", "mx.example.net", cfg)
    other = client_group("64:ff9b::c633:640a", "mx.example.org", cfg)
    assert (one, other) == ("192.0.2", "198.51.100")
    assert client_group("64:ff9b::c000:20a", "dsl-192-0-2-10.isp.example", cfg) == \
        "64:ff9b::c000:20a"


def test_exact_grouping_ignores_prefixes():
    assert client_group("192.0.2.10", "x.google.com", Config(client_match="exact")) == \
        "192.0.2.10"
