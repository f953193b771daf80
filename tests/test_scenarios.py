"""Greylisting scenarios through Policy with a real store and a fake clock."""

import io
import os
import re

import pytest

from greylist.config import Config
from greylist.core.message import Session
from greylist.transports.spawn import serve
from greylist.stores.lmdb import LmdbStore
from tests.conftest import Clock, Recorder, policy_service

T = 1_700_000_000
CFG = Config(delay_s=300)


class Site:
    """A policy process with its own database, asked request by request."""

    def __init__(self, directory, cfg=CFG):
        os.chmod(directory, 0o755)
        self.store = LmdbStore(str(directory / "greylist"))
        self.session = Session()
        self.policy = policy_service(self.store, cfg._replace(database=str(directory / "greylist")),
                             Recorder(), Clock(T))

    def ask(self, client="192.0.2.10", sender="alice@example.org", rcpt="bob@example.net",
            instance=None, **extra):
        attrs = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
                 "client_address": client, "client_name": "unknown", "sender": sender,
                 "recipient": rcpt, "instance": instance or "i%d" % self.policy.clock.now}
        attrs.update(extra)
        data = "".join("%s=%s\n" % item for item in attrs.items() if item[1] is not None)
        out = io.BytesIO()
        assert serve(io.BytesIO(data.encode() + b"\n"), out, self.policy, self.session) == 0
        return out.getvalue().decode()[len("action="):].strip()

    def reason(self):
        """The reason of the last decision logged (cleanup lines may follow)."""
        decisions = [line for line in self.policy.log.lines if "reason=" in line]
        return re.search(r"reason=(\S+)", decisions[-1]).group(1)

    def later(self, seconds):
        self.policy.clock.now += seconds


@pytest.fixture
def site(tmp_path):
    site = Site(tmp_path)
    yield site
    site.store.close()


def passes_after_delay(site, **request):
    assert site.ask(**request).startswith("DEFER_IF_PERMIT")
    site.later(300)
    assert site.ask(**request) == "DUNNO"


def test_new_cc_recipient_of_a_proven_sender_is_not_delayed(site):
    # postgrey #93: a new CC recipient inside an otherwise accepted message.
    passes_after_delay(site)
    site.later(86400)
    assert site.ask(rcpt="bob@example.net", instance="m2") == "DUNNO"
    assert site.ask(rcpt="carol@example.net", instance="m2") == "DUNNO"
    assert site.reason() == "awl-sender"


def test_one_message_is_never_split_even_without_the_sender_whitelist(tmp_path):
    site = Site(tmp_path, CFG._replace(sender_awl=False))
    passes_after_delay(site)
    assert site.ask(rcpt="bob@example.net", instance="m2") == "DUNNO"
    assert site.ask(rcpt="carol@example.net", instance="m2") == "DUNNO"
    assert site.reason() == "message"
    # A whitelisted recipient proves nothing about the client (another
    # sender, which this client has not tried before).
    assert site.ask(rcpt="postmaster@example.net", instance="m3",
                    sender="other@example.org") == "DUNNO"
    assert site.ask(rcpt="dave@example.net", instance="m3",
                    sender="other@example.org").startswith("DEFER_IF_PERMIT")


def test_recipients_of_one_message_sent_slowly_are_all_deferred(tmp_path):
    site = Site(tmp_path, CFG._replace(sender_awl=False))
    assert site.ask(rcpt="dave@example.net", instance="m1").startswith("DEFER_IF_PERMIT")
    site.later(CFG.delay_s + 60)
    assert site.ask(rcpt="heidi@example.net", instance="m1").startswith("DEFER_IF_PERMIT")


def test_a_retried_message_with_a_new_first_recipient_is_not_split(tmp_path):
    """Issue 16's trace: dave deferred; hours later the same sender from
    the same client group sends a new message, heidi first: both pass."""
    site = Site(tmp_path, CFG._replace(sender_awl=False))
    pool = dict(client="52.103.7.77",
                client_name="mail-am6eur05on2070.outbound.protection.outlook.com")
    assert site.ask(rcpt="dave@example.net", instance="m1", **pool).startswith(
        "DEFER_IF_PERMIT")
    site.later(15405)
    pool.update(client="52.103.9.52")
    assert site.ask(rcpt="heidi@example.net", instance="m2", **pool) == "DUNNO"
    assert site.reason() == "sender-retry"
    assert site.ask(rcpt="dave@example.net", instance="m2", **pool) == "DUNNO"


def test_a_new_first_recipient_holds_the_rest_of_its_message(tmp_path):
    """The trace's split (Exim, seed 1): eva deferred in one message; a
    second message from the same host, sven first (new, deferred), then
    eva (past the delay) and noah (sender entry made by eva's pass).
    Accepting eva and noah split it: they are held, the proof is kept,
    and at the retry the whole message passes."""
    site = Site(tmp_path)
    assert site.ask(rcpt="eva@example.net", instance="a1").startswith("DEFER_IF_PERMIT")
    site.later(582)
    assert site.ask(rcpt="sven@example.net", instance="b1").startswith("DEFER_IF_PERMIT")
    assert site.reason() == "new"
    assert site.ask(rcpt="eva@example.net", instance="b1") == \
        "DEFER_IF_PERMIT Greylisted, please try again in 300 seconds"
    assert site.reason() == "held:delay-passed"
    assert site.ask(rcpt="noah@example.net", instance="b1").startswith("DEFER_IF_PERMIT")
    assert site.reason() == "held:awl-sender"
    # The pass was recorded: eva's triple passed, the sender entry made.
    assert site.store.get(b"192.0.2/alice@example.org/eva@example.net").endswith(b":passed")
    assert site.store.get(b"192.0.2/alice@example.org").endswith(b":sender")
    # The retry of the second message (sven first again): all pass.
    site.later(60)
    for rcpt in ("sven", "eva", "noah"):
        assert site.ask(rcpt=rcpt + "@example.net", instance="b2") == "DUNNO", rcpt
    assert site.reason() == "awl-sender"


def test_exempt_recipients_are_not_held(tmp_path):
    """postmaster@ (a static exemption) and a manual sender entry pass on
    their own even after a deferred recipient of the same message."""
    site = Site(tmp_path)
    assert site.ask(rcpt="dave@example.net", instance="m1").startswith("DEFER_IF_PERMIT")
    assert site.ask(rcpt="postmaster@example.net", instance="m1") == "DUNNO"
    assert site.ask(rcpt="dave@example.net", instance="m2",
                    sender="friend@example.org").startswith("DEFER_IF_PERMIT")
    site.store.put(b"192.0.2/friend@example.org", b"1:%d:%d:0:manual" % (T, T))
    assert site.ask(rcpt="heidi@example.net", instance="m2",
                    sender="friend@example.org") == "DUNNO"
    assert site.reason() == "manual-sender"


def test_a_rotating_bot_in_one_access_slash_24_is_not_let_through(site):
    """bench/trace.py's rotating bots: each retry from another host of the
    ISP; two in one /24 the delay apart passed as one client. A verified
    name that looks dynamic is one machine: grouped by its address."""
    def bot(n):
        return dict(client="100.65.220.%d" % n, client_name="100-65-220-%d.dyn.dsl1.example" % n)
    assert site.ask(**bot(132)).startswith("DEFER_IF_PERMIT")
    site.later(1200)
    assert site.ask(**bot(77)).startswith("DEFER_IF_PERMIT")
    assert site.reason() == "new"
    # The same machine retrying (a home server on a dynamic address) passes.
    assert site.ask(instance="r2", **bot(132)) == "DUNNO"
    # A named MTA still counts by its /24 (two hosts of one farm).
    farm = dict(client_name="mx1.example.org", sender="bob@example.org")
    assert site.ask(client="192.0.2.20", **farm).startswith("DEFER_IF_PERMIT")
    site.later(300)
    assert site.ask(client="192.0.2.21", **farm) == "DUNNO"


def test_a_dedicated_sendgrid_address_is_in_the_sendgrid_pool(site):
    """Dedicated addresses carry their customer's white-label name and lie
    in different /24s of SendGrid's networks: one pool all the same."""
    name = dict(client_name="o1.em.shop.example", sender="bounces+123-ab-x=y@em1.shop.example")
    assert site.ask(client="167.89.101.202", **name).startswith("DEFER_IF_PERMIT")
    site.later(900)
    assert site.ask(client="149.72.154.232", **name) == "DUNNO"
    assert site.reason() == "delay-passed"


def test_a_bot_sending_new_messages_from_one_network_is_never_let_through(tmp_path):
    """Found in review: one sender, one /24, a new message every minute,
    no retry at all: every one is deferred."""
    site = Site(tmp_path)
    for n in range(12):
        assert site.ask(client="198.51.100.%d" % (10 + n % 5), sender="promo@spam.example",
                        rcpt="user%s@example.net" % chr(97 + n),
                        instance="b%d" % n).startswith("DEFER_IF_PERMIT"), n
        site.later(60)


@pytest.mark.parametrize("first, retry, passes", [
    ("192.0.2.10", "192.0.2.200", True),
    ("192.0.2.10", "192.0.3.10", False),
    ("2001:db8:1:2::10", "2001:db8:1:2:ffff::9", True),
    ("2001:db8:1:2::10", "2001:db8:1:3::10", False),
    ("::ffff:192.0.2.10", "192.0.2.11", True),
], ids=["same-24", "other-24", "same-64", "other-64", "mapped-ipv4"])
def test_retry_from_another_address_of_the_same_network(site, first, retry, passes):
    assert site.ask(client=first).startswith("DEFER_IF_PERMIT")
    site.later(300)
    assert (site.ask(client=retry) == "DUNNO") is passes


def test_exact_client_match_keys_the_whole_address(tmp_path):
    site = Site(tmp_path, CFG._replace(client_match="exact"))
    site.ask(client="192.0.2.10")
    site.later(300)
    assert site.ask(client="192.0.2.11").startswith("DEFER_IF_PERMIT")


def test_retry_after_the_retry_window_starts_over(site):
    assert site.ask().startswith("DEFER_IF_PERMIT")
    site.later(CFG.retry_window_s + 1)
    assert site.ask().startswith("DEFER_IF_PERMIT") and site.reason() == "new"
    site.later(300)
    assert site.ask() == "DUNNO"


def test_passed_records_expire_after_the_maximum_age(site):
    passes_after_delay(site)
    site.later(CFG.max_age_s)
    assert site.ask() == "DUNNO"  # still known, and refreshed
    site.later(CFG.max_age_s + 1)
    assert site.ask().startswith("DEFER_IF_PERMIT") and site.reason() == "new"


def test_use_keeps_an_entry_alive_beyond_its_first_lifetime(site):
    passes_after_delay(site)
    for _ in range(4):  # seen every 20 days: refreshed past half of 35 days
        site.later(20 * 86400)
        assert site.ask() == "DUNNO"


def test_client_is_auto_whitelisted_after_five_passes_an_hour_apart(site):
    for n in range(5):
        passes_after_delay(site, sender="s%d@example.org" % n)
        site.later(3600)
    assert site.ask(client="192.0.2.99", sender="new@example.com") == "DUNNO"
    assert site.reason() == "awl-client"


def test_many_recipients_of_one_message_count_once_for_the_client(site):
    for n in range(5):
        site.ask(rcpt="r%d@example.net" % n, instance="m1")
    site.later(300)
    for n in range(5):
        assert site.ask(rcpt="r%d@example.net" % n, instance="m2") == "DUNNO"
    assert site.ask(sender="other@example.com").startswith("DEFER_IF_PERMIT")


def test_unknown_clients_never_earn_the_client_whitelist(site):
    for n in range(6):
        passes_after_delay(site, client="unknown", sender="s%d@example.org" % n)
        site.later(3600)
    assert site.ask(client="unknown", sender="x@example.com").startswith("DEFER_IF_PERMIT")


@pytest.mark.parametrize("first, retry", [
    ("alice+news@example.org", "alice+other@example.org"),
    ("prvs=1234abcd=alice@example.org", "prvs=9876fedc=alice@example.org"),
    ("SRS0=HHH=TT=example.org=alice@fwd.example", "SRS0=GGG=UU=example.org=alice@fwd2.example"),
    ("bounce-123-456@lists.example", "bounce-789-12@lists.example"),
], ids=["extension", "batv", "srs", "verp"])
def test_sender_variants_share_one_triple(site, first, retry):
    assert site.ask(sender=first).startswith("DEFER_IF_PERMIT")
    site.later(300)
    assert site.ask(sender=retry) == "DUNNO"


def test_changed_whitelist_file_is_reloaded_without_restart(tmp_path):
    listed = tmp_path / "clients"
    listed.write_text("# nothing yet\n")
    site = Site(tmp_path, CFG._replace(whitelist_clients=(str(listed),)))
    assert site.ask().startswith("DEFER_IF_PERMIT")
    listed.write_text("# now listed\n192.0.2.0/24\n")
    site.later(11)
    assert site.ask(rcpt="carol@example.net") == "DUNNO"
    assert site.reason() == "whitelist-client"


POSTGREY_CLIENTS = """\
# postgrey whitelist for mail client hostnames
# --------------------------------------------
# put this file in /etc/postgrey or specify its path
# with --whitelist-clients=xxx
#
# postgrey version: 1.37, build date: 2016-09-22

# greylisting.org: Southwest Airlines (unique sender, no retry)
southwest.com
# greylisting.org: isp.tiscali.it
/^smtp\\d+\\.tiscali\\.it$/
# Google
/^mail-.*\\.google\\.com$/
# IP ranges
192.0.2
2001:db8:5::/48
"""


@pytest.mark.parametrize("client, name, listed", [
    ("198.51.100.1", "mx.southwest.com", True),
    ("198.51.100.1", "smtp7.tiscali.it", True),
    ("198.51.100.1", "mail-yw1-f170.google.com", True),
    ("192.0.2.77", "unknown", True),
    ("2001:db8:5:9::1", "unknown", True),
    ("198.51.100.1", "notsouthwest.com", False),
    ("198.51.100.1", "unknown", False),
])
def test_postgrey_whitelist_clients_file_is_read_unchanged(tmp_path, client, name, listed):
    path = tmp_path / "whitelist_clients"
    path.write_text(POSTGREY_CLIENTS)
    site = Site(tmp_path, CFG._replace(whitelist_clients=(str(path),)))
    assert (site.ask(client=client, client_name=name) == "DUNNO") is listed
    assert not [line for line in site.policy.log.lines if line.startswith("warning")]


def test_postgrey_whitelist_recipients_and_our_sender_list(tmp_path):
    recipients = tmp_path / "whitelist_recipients"
    recipients.write_text("# postgrey recipients\npostmaster@\nspam-lovers@example.net\n"
                          "greylist-free.example\n")
    senders = tmp_path / "senders"
    senders.write_text("newsletter@example.com\npartner.example\n")
    site = Site(tmp_path, CFG._replace(whitelist_recipients=(str(recipients),),
                                  whitelist_senders=(str(senders),)))
    assert site.ask(rcpt="Spam-Lovers+tag@example.net") == "DUNNO"
    assert site.ask(rcpt="user@sub.greylist-free.example") == "DUNNO"
    assert site.ask(sender="newsletter@example.com") == "DUNNO"
    assert site.reason() == "whitelist-sender"
    assert site.ask(sender="anyone@mail.partner.example") == "DUNNO"
    assert site.ask(sender="someone@example.com").startswith("DEFER_IF_PERMIT")


@pytest.mark.parametrize("extra, reason", [
    ({"sasl_username": "alice"}, "sasl"),
    ({"rcpt": "postmaster@example.net"}, "whitelist-recipient"),
    ({"rcpt": "abuse+x@example.net"}, "whitelist-recipient"),
    ({"client": "198.51.100.7"}, "trusted"),
])
def test_exemptions_need_no_retry(tmp_path, extra, reason):
    site = Site(tmp_path, CFG._replace(trusted_networks=("198.51.100.0/24",)))
    assert site.ask(**extra) == "DUNNO"
    assert site.reason() == reason


@pytest.mark.parametrize("client, trusted", [
    ("127.0.0.1", True), ("::1", True), ("198.51.100.7", True), ("198.51.101.7", False),
])
def test_each_trusted_network_is_trusted_on_its_own(tmp_path, client, trusted):
    # Several networks, as mynetworks lists them: any one of them exempts.
    site = Site(tmp_path, CFG._replace(
        trusted_networks=("127.0.0.0/8", "::1/128", "198.51.100.0/24")))
    answer = site.ask(client=client)
    if trusted:
        assert (answer, site.reason()) == ("DUNNO", "trusted")
    else:
        assert answer.startswith("DEFER_IF_PERMIT")


def test_learn_mode_never_defers_and_fills_the_database(tmp_path):
    learning = Site(tmp_path, CFG._replace(learn=True))
    assert learning.ask() == "DUNNO"
    assert learning.reason() == "learn:new"
    learning.store.close()
    enforcing = Site(tmp_path, CFG)
    assert enforcing.ask() == "DUNNO"
    assert enforcing.ask(rcpt="carol@example.net") == "DUNNO"  # the sender was learned
    enforcing.store.close()


def test_privacy_mode_stores_only_keyed_hashes(tmp_path):
    site = Site(tmp_path, CFG._replace(privacy=True))
    passes_after_delay(site)
    secret = tmp_path / "greylist.secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    keys = [k for k, _ in site.store.items()]
    # The triple, the sender entry (the trying note before), the client entry.
    assert len(keys) == 3 and all(re.fullmatch(rb"[0-9a-f]{64}", k) for k in keys)
    site.store.close()
    raw = (tmp_path / "greylist.lmdb").read_bytes()
    assert b"alice" not in raw and b"example" not in raw and b"192.0.2" not in raw


def test_privacy_mode_fails_open_with_an_unsafe_secret_file(tmp_path):
    secret = tmp_path / "greylist.secret"
    secret.write_text("00" * 32 + "\n")
    os.chmod(secret, 0o644)
    site = Site(tmp_path, CFG._replace(privacy=True))
    assert site.ask() == "DUNNO"
    assert "accessible by group or others" in site.policy.log.lines[0]


def test_pool_aware_matching_passes_a_retry_from_another_pool_address(tmp_path):
    site = Site(tmp_path, CFG._replace(client_match="domain"))
    site.ask(client="209.85.128.10", client_name="mail-wm1-f10.google.com")
    site.later(300)
    assert site.ask(client="74.125.82.9", client_name="mail-ot1-f9.google.com") == "DUNNO"
    # Without a verified name the address prefix is used.
    site.ask(client="198.51.100.10", client_name="unknown", sender="x@example.com")
    site.later(300)
    assert site.ask(client="198.51.101.10", client_name="unknown",
                    sender="x@example.com").startswith("DEFER_IF_PERMIT")


def test_header_is_prepended_once_per_delayed_message(tmp_path):
    site = Site(tmp_path, CFG._replace(header=True))
    site.ask(rcpt="bob@example.net", instance="m1")
    site.ask(rcpt="carol@example.net", instance="m1")
    site.later(300)
    first = site.ask(rcpt="bob@example.net", instance="m2")
    assert re.fullmatch(r"PREPEND X-Greylist: delayed 300 seconds by greylist-\S+ at \S+; "
                        r".+", first)
    assert site.ask(rcpt="carol@example.net", instance="m2") == "DUNNO"
    assert site.ask(rcpt="bob@example.net", instance="m3") == "DUNNO"


def test_one_header_per_message_when_each_recipient_passes_its_delay(tmp_path):
    # Without the sender auto-whitelist, each recipient of the retried
    # message passes by its own delay: the header is still added once.
    site = Site(tmp_path, CFG._replace(header=True, sender_awl=False, client_awl_passes=0))
    for rcpt in ("bob@example.net", "carol@example.net", "dave@example.net"):
        site.ask(rcpt=rcpt, instance="m1")
    site.later(300)
    answers = [site.ask(rcpt=rcpt, instance="m2")
               for rcpt in ("bob@example.net", "carol@example.net", "dave@example.net")]
    assert answers[0].startswith("PREPEND X-Greylist: delayed 300 seconds")
    assert answers[1:] == ["DUNNO", "DUNNO"]
    assert site.reason() == "delay-passed"


def test_defer_text_tells_recipient_domain_and_client(tmp_path):
    site = Site(tmp_path, CFG._replace(defer_text="4.7.1 $client_address to "
                                                  "$recipient_domain: wait $seconds_left s"))
    assert site.ask() == "DEFER_IF_PERMIT 4.7.1 192.0.2.10 to example.net: wait 300 s"


def test_a_quoted_local_part_with_spaces_cannot_fake_log_fields(tmp_path):
    """Issue 15: log fields were not quoted, so a sender like
    '"x rcpt=postmaster@example.net"@spam.example' added a second rcpt=."""
    site = Site(tmp_path)
    site.ask(sender='"x rcpt=postmaster@example.net"@spam.example')
    line = [line for line in site.policy.log.lines if "reason=" in line][-1]
    assert line.count(" rcpt=") == 1 and line.endswith(" rcpt=bob@example.net")
    assert 'sender="x%20rcpt=postmaster@example.net"@spam.example ' in line


def test_whitelist_files_are_looked_at_once_an_interval_all_of_them_and_after_a_clock_step(
        tmp_path):
    from greylist.whitelist import Whitelists
    clients, senders = tmp_path / "clients", tmp_path / "senders"
    clients.write_text("# none\n")
    senders.write_text("# none\n")
    cfg = CFG._replace(whitelist_clients=(str(clients),), whitelist_senders=(str(senders),))
    lists = Whitelists(cfg, print, check_interval_s=10.0)
    request = {"recipient": "bob@example.net", "sender": "alice@example.org"}
    assert lists.exemptions(T).reason(request, "192.0.2.1") is None
    clients.write_text("192.0.2.0/24\n")
    senders.write_text("example.org\n")
    assert lists.exemptions(T + 5).reason(request, "192.0.2.1") is None  # not yet looked at
    # Both files changed: both are read at the same look.
    exemptions = lists.exemptions(T + 11)
    assert exemptions.reason(request, "192.0.2.1") == "whitelist-client"
    assert exemptions.reason(request, "198.51.100.1") == "whitelist-sender"
    # A clock stepped back looks at once, rather than after the step.
    clients.write_text("# none again\n")
    assert lists.exemptions(T - 3600).reason(request, "192.0.2.1") == "whitelist-sender"
