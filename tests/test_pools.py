"""Pool-aware client grouping: providers' pools as one client, bots never."""

import pytest

from greylist.config import Config
from greylist.core.decide import Records, decide
from greylist.core.pools import POOL_DOMAINS, looks_dynamic, pool_of, pool_set
from greylist.core.triple import client_group

POOL = Config()          # the default: client_match = pool
DOMAIN = Config(client_match="domain")


@pytest.mark.parametrize("address, name, group", [
    ("40.107.22.70", "mail-am6eur05on2070.outbound.protection.outlook.com", "outlook.com"),
    ("52.100.7.1", "mail-dm6nam10on2101.outbound.protection.outlook.com", "outlook.com"),
    ("209.85.128.170", "mail-yw1-f170.google.com", "google.com"),
    ("54.240.8.30", "a8-30.smtp-out.amazonses.com", "amazonses.com"),
    ("198.2.128.7", "mail128-7.atl41.mcsv.net", "mcsv.net"),
    ("167.89.10.1", "o1.ptr1234.sendgrid.net", "sendgrid.net"),
    ("205.139.110.61", "us-smtp-delivery-61.mimecast.com", "mimecast.com"),
    ("41.74.196.1", "za-smtp-1.mimecast.co.za", "mimecast.co.za"),
    # One provider, one pool: Mailchimp's older rsgsv.net hosts.
    ("205.201.131.5", "mail5.atl11.rsgsv.net", "mcsv.net"),
    # A pool's published networks, whatever the name (white-label names of
    # dedicated addresses: o11.sgmail.github.com is 167.89.101.202).
    ("167.89.101.202", "o11.sgmail.github.com", "sendgrid.net"),
    ("149.72.154.232", "o1.em.shop.example", "sendgrid.net"),
    ("198.2.180.4", "unknown", "mcsv.net"),
    ("167.89.128.1", "o1.em.shop.example", "167.89.128"),     # past the /17
    # An access host (a dynamic-looking verified name) is one machine.
    ("100.65.220.132", "100-65-220-132.dyn.dsl1.example", "100.65.220.132"),
    ("100.81.43.137", "p64512b89.dip0.t-ip3.example", "100.81.43.137"),
    ("2001:db8:1:2::7", "dyn-7.isp.example", "2001:db8:1:2"),  # IPv6: the /64
    # The address's digits alone are no access label: mail farms name their
    # hosts so, and retry from neighbouring addresses (found in review).
    ("203.205.221.239", "out203-205-221-239.mail.qq.com", "203.205.221"),
    ("88.198.12.34", "static.88-198-12-34.clients.your-server.de", "88.198.12"),
    # Everyone else: the /24.
    ("192.0.2.7", "mx.example.org", "192.0.2"),
    ("192.0.2.7", "unknown", "192.0.2"),
    ("192.0.2.7", "notgoogle.com", "192.0.2"),
    ("192.0.2.7", "google.com.attacker.example", "192.0.2"),
    ("2001:db8:1:2::7", "mail-xyz.google.com", "google.com"),
])
def test_pool_mode_groups_providers_by_their_pool_domain_and_others_by_prefix(
        address, name, group):
    assert client_group(address, name, POOL) == group


def test_a_pool_domain_can_be_added():
    cfg = Config(pool_domains=("bigsender.example",))
    assert client_group("192.0.2.7", "out-7.MTA.BigSender.example.", cfg) == "bigsender.example"
    assert pool_of("a.bigsender.example", pool_set(cfg.pool_domains)) == "bigsender.example"


def test_every_pool_domain_is_a_registered_domain_spelled_in_lower_case():
    for domain in POOL_DOMAINS:
        assert domain == domain.casefold() and 2 <= domain.count(".") + 1 <= 3, domain


@pytest.mark.parametrize("name, address, dynamic", [
    ("100-65-220-132.dyn.dsl1.example", "100.65.220.132", True),
    ("host-132-220.isp.example", "100.65.220.132", True),
    ("pc065220.isp.example", "100.65.220.132", True),
    ("c0a80001.isp.example", "192.168.0.1", True),
    ("customer.isp.example", "192.0.2.7", True),
    ("ppp-7.isp.example", "192.0.2.7", True),
    ("mx.example.org", "192.0.2.7", False),
    ("mail-yw1-f170.google.com", "209.85.128.170", False),
    ("smtp7.example.org", "192.0.2.7", False),
])
def test_dynamic_looking_names(name, address, dynamic):
    assert looks_dynamic(name, address) is dynamic


def test_domain_mode_never_makes_an_access_isp_one_client():
    bots = [("100.65.%d.%d" % (a, b), "%d-%d-%d-%d.dyn.dsl1.isp.example" % (100, 65, a, b))
            for a, b in ((220, 132), (17, 9), (3, 250))]
    groups = {client_group(address, name, DOMAIN) for address, name in bots}
    assert groups == {"100.65.220", "100.65.17", "100.65.3"}
    assert client_group("192.0.2.7", "mx1.example.org", DOMAIN) == "example.org"


def test_a_pool_retry_from_another_network_passes_after_the_delay():
    """Microsoft 365 retries from another /16: in pool mode it is one
    client, and the retry passes; in prefix mode it would be new."""
    from greylist.core.triple import keys, triple_from_request
    first = {"client_address": "40.107.22.70", "sender": "a@contoso.example",
             "recipient": "b@example.net",
             "client_name": "mail-am6eur05on2070.outbound.protection.outlook.com"}
    retry = dict(first, client_address="52.100.7.1",
                 client_name="mail-dm6nam10on2101.outbound.protection.outlook.com")
    t1, t2 = triple_from_request(first, POOL), triple_from_request(retry, POOL)
    assert keys(t1) == keys(t2)
    stored = decide(Records(), 1000, POOL).writes.triple
    assert decide(Records(triple=stored), 1000 + POOL.delay_s, POOL).reason == "delay-passed"
    assert triple_from_request(first, Config(client_match="prefix")).client != \
        triple_from_request(retry, Config(client_match="prefix")).client


def test_a_pools_bounce_addresses_share_one_sender_key():
    """Mailchimp gives each message its own bounce address and host part:
    from the pool, they are one sender (so one retry proves them all)."""
    from greylist.core.triple import triple_from_request
    def sender(address, name="mail130-7.atl41.mcsv.net", client="198.2.130.7"):
        return triple_from_request({"client_address": client, "client_name": name,
                                    "sender": address, "recipient": "x@example.net"},
                                   POOL).sender
    a = sender("bounce-mc.us5_1234567.987654-0a1b2c3d4e@mail12.atl91.mcsv.net")
    b = sender("bounce-mc.us5_1234567.987655-0f0000000a@mail99.atl3.mcsv.net")
    assert a == b == "bounce-mc.us5_#.#-#@mcsv.net"
    # Not from a pool, or not under a pool domain: left alone.
    assert sender("bounce-0a1b2c3d4e@mail12.atl91.mcsv.net", "mx.example.org",
                  "192.0.2.7") == \
        "bounce-0a1b2c3d4e@mail12.atl91.mcsv.net"
    assert sender("alice.0a1b2c3d4e@example.org") == "alice.0a1b2c3d4e@example.org"
    # Short hex-looking words stay: only IDs of ten or more.
    assert sender("cafe2bad@outlook.com") == "cafe2bad@outlook.com"


def test_domain_mode_does_not_take_pool_hosts_for_dynamic_ones():
    """Found by the simulated week: Microsoft's and SES's host names carry
    their addresses, and domain mode grouped them by prefix."""
    assert client_group("40.92.66.48", "mail-oln040092066048.outbound.protection.outlook.com",
                        DOMAIN) == "outlook.com"
    assert client_group("54.240.10.219", "a10-219.smtp-out.amazonses.com",
                        DOMAIN) == "amazonses.com"


def test_pool_network_agrees_with_ipaddress_at_every_edge():
    """The /16-indexed lookup against ipaddress, at each network's first
    and last address and one past each end, and at random addresses."""
    import ipaddress
    import random
    from greylist.core.pools import POOL_NETWORKS, pool_network
    networks = [(ipaddress.ip_network(n), pool) for pool, ns in POOL_NETWORKS for n in ns]

    def expected(address):
        found = [pool for net, pool in networks if ipaddress.ip_address(address) in net]
        return found[0] if found else None
    probes = []
    for net, _ in networks:
        first, last = int(net.network_address), int(net.broadcast_address)
        probes += [first, last, first - 1, last + 1]
    rng = random.Random(16)
    probes += [rng.randrange(1 << 32) for _ in range(2000)]
    for number in probes:
        address = str(ipaddress.IPv4Address(number % (1 << 32)))
        assert pool_network(address) == expected(address), address


@pytest.mark.parametrize("address, group", [
    ("167.89.10.1", "167.89.10"), ("205.201.131.5", "205.201.131"),
    ("100.65.220.132", "100.65.220"), ("2001:db8:1:2::7", "2001:db8:1:2")])
def test_without_a_client_name_the_group_is_the_prefix(address, group):
    """greylistctl whitelist add ADDRESS and the postscreen callout know no
    name: one address of SendGrid's networks must never stand for the
    whole pool (found in review: whitelisting one address whitelisted
    sendgrid.net, in the database and in the client table)."""
    assert client_group(address, None, POOL) == group


def test_looks_dynamic_counts_ascii_digits_only():
    """Non-ASCII characters separate numbers, as the old [0-9] classes did
    (found in review: x100-65\u00e9 was no longer dynamic)."""
    assert looks_dynamic("x100-65\u00e9.example", "100.65.220.132")
    assert not looks_dynamic("x\u0661\u0660\u0660-65.example", "1.65.220.132")
