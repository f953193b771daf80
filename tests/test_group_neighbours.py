"""A group's proof is not its neighbours' (found in review, 2026-12-01).

greylist_client_match = pool (the default) keys an access-network host
(dsl-192-0-2-11.isp.test) by its own address, apart from the mail servers
of its /24, and domain mode keys such hosts by prefix, apart from their
domain's mail servers. The policy service keeps them apart, because it
knows the client's name. Postfix's readers do not: check_client_access
matches a table key "192.0.2" or "shop.test" for every host of the
prefix or domain, the socketmap clients map and the postscreen callout
get an address and nothing else. Before this fix, all three let the
access host through on its neighbour's record. Real LMDB tables, read
back with Postfix's postmap; the policy, socketmap and callout services
as the programs build them.
"""

import os
import subprocess

import pytest

from greylist.config import Config, resolve
from greylist.wiring import policy_service, postscreen_service, socketmap_service, stores
from tests.conftest import Clock, Recorder

T = 1_800_000_000
MAIL_SERVER = ("192.0.2.10", "mx.shop.test")
ACCESS_HOST = ("192.0.2.11", "dsl-192-0-2-11.isp.test")


def settings(tmp_path, match: str):
    os.chmod(tmp_path, 0o755)
    return resolve(Config(database=str(tmp_path / "greylist"), delay_s=60,
                          client_awl_passes=2, sender_awl=False, client_match=match))


def rcpt(service, client, sender, recipient="a@example.com") -> str:
    address, name = client
    return service.answer({"request": "smtpd_access_policy", "protocol_state": "RCPT",
                           "client_address": address, "client_name": name,
                           "reverse_client_name": name, "sender": sender,
                           "recipient": recipient}, service.new_session())


def earn(service, clock, client) -> None:
    """Two senders, each greylisted once, two hours apart: two passes, the
    client auto-whitelist (client_awl_passes = 2)."""
    for hour, sender in enumerate(("x@remote.test", "w@remote.test")):
        clock.now = T + hour * 7200
        assert rcpt(service, client, sender).startswith("DEFER")
        clock.now += 61
        assert rcpt(service, client, sender) == "DUNNO"


def postmap_query(postmap, table: str, key: str) -> str | None:
    result = subprocess.run([postmap, "-q", key, "lmdb:" + table], capture_output=True,
                            text=True, timeout=10)
    assert result.returncode in (0, 1), result
    return result.stdout.strip() if result.returncode == 0 else None


@pytest.mark.parametrize("match", ["pool", "domain"])
def test_an_access_host_does_not_pass_on_its_neighbours_record(tmp_path, postmap, match):
    cfg = settings(tmp_path, match)
    clock = Clock(T)
    found = stores(cfg)
    service = policy_service(cfg, Recorder(), clock, cleanup=False, found=found)
    earn(service, clock, MAIL_SERVER)
    neighbour = ("198.51.100.7", "dsl-198-51-100-7.shop.test")
    # The policy service itself greylists the access hosts.
    assert rcpt(service, ACCESS_HOST, "y@remote.test").startswith("DEFER")
    assert rcpt(service, neighbour, "y@remote.test").startswith("DEFER")
    service.close()
    for store in (found.raw, found.clients, found.postscreen):
        store.close()

    # The client table: the mail server's own address, no key of its /24
    # or its domain, which check_client_access would match for the others.
    assert postmap_query(postmap, cfg.client_table, "192.0.2.10") == "%d" % (T + 7261)
    for key in ("192.0.2", "shop.test", "192.0.2.11"):
        assert postmap_query(postmap, cfg.client_table, key) is None, key

    # The socketmap clients map (how Postfix reads the table from Redis).
    learner = socketmap_service(cfg, Recorder(), Clock(T + 7300), cleanup=False)
    assert learner.table_reply("clients", "192.0.2.10") == b"13:OK %d," % (T + 7261)
    for key in ("192.0.2.11", "198.51.100.7", "dsl-198-51-100-7.shop.test",
                "mx.shop.test"):
        assert learner.table_reply("clients", key) == b"9:NOTFOUND ,", key
    learner.close()

    # The postscreen callout: the mail server passes, its neighbour is
    # postscreen's to test.
    log = Recorder()
    callout = postscreen_service(cfg, log, Clock(T + 7300))
    # (Domain mode: the mail server's group is its domain, which the
    # records cannot find from an address; the table lists it.)
    assert callout.verdict("192.0.2.10")[:3] == ("pass", Config().postscreen_ttl_s,
                                                 "awl-client")
    reason = {"pool": "unproven-host", "domain": "unproven"}[match]
    assert callout.verdict("192.0.2.11")[:3] == ("ignore", None, reason)
    assert log.lines[-1] == "action=ignore reason=%s client=192.0.2.11" % reason


def test_prefix_mode_keeps_one_client_per_prefix(tmp_path, postmap):
    # greylist_client_match = prefix: the /24 is one client by design.
    cfg = settings(tmp_path, "prefix")
    clock = Clock(T)
    found = stores(cfg)
    service = policy_service(cfg, Recorder(), clock, cleanup=False, found=found)
    earn(service, clock, MAIL_SERVER)
    assert rcpt(service, ACCESS_HOST, "y@remote.test") == "DUNNO"
    service.close()
    for store in (found.raw, found.clients, found.postscreen):
        store.close()
    assert postmap_query(postmap, cfg.client_table, "192.0.2") == "%d" % (T + 7261)
    callout = postscreen_service(cfg, Recorder(), Clock(T + 7300))
    assert callout.verdict("192.0.2.99")[:3] == ("pass", Config().postscreen_ttl_s,
                                                 "awl-client")


def test_a_host_seen_proven_passes_no_longer_than_its_entries_live(tmp_path):
    cfg = settings(tmp_path, "pool")
    clock = Clock(T)
    found = stores(cfg)
    service = policy_service(cfg, Recorder(), clock, cleanup=False, found=found)
    earn(service, clock, MAIL_SERVER)
    service.close()
    # The table entry an hour older than the group's entry, then newer.
    found.postscreen.put(b"192.0.2.10", b"permit %d" % (T + 7261 - 3600))
    found.postscreen.put(b"192.0.2.12", b"permit %d" % (T + 7261 + 3600))
    for store in (found.raw, found.clients, found.postscreen):
        store.close()
    at = T + 7261 + cfg.max_age_s - 5000
    callout = postscreen_service(cfg, Recorder(), Clock(at))
    assert callout.verdict("192.0.2.10")[:3] == ("pass", 1400, "awl-client")
    assert callout.verdict("192.0.2.12")[:3] == ("pass", 5000, "awl-client")
    callout = postscreen_service(cfg, Recorder(), Clock(T + 7261 + cfg.max_age_s - 3600))
    assert callout.verdict("192.0.2.10")[:3] == ("ignore", None, "unproven-host")


@pytest.mark.parametrize("match, gone", [
    ("pool", [b"192.0.2"]),
    ("domain", [b"192.0.2", b"shop.test", b"outlook.com"]),  # domains are hosts' groups
    ("prefix", []),
])
def test_cleanup_removes_the_group_entries_that_older_versions_wrote(tmp_path, match, gone):
    from greylist.stores.cleanup import Cleaner
    from greylist.stores.lmdb import LmdbStore
    cfg = settings(tmp_path, match)
    database, table = LmdbStore(cfg.database), LmdbStore(cfg.client_table)
    entries = {b"192.0.2": b"%d" % T, b"shop.test": b"%d" % T, b"outlook.com": b"%d" % T,
               b"192.0.2.10": b"%d" % T, b"2001:db8::1": b"%d" % T,
               b"198.51.100": b"OK manual"}
    for key, value in entries.items():
        table.put(key, value)
    log = Recorder()
    cleaner = Cleaner(database, table, cfg, log, Clock(T + 60))
    state = cleaner.step(start=True)
    for _ in range(10):
        if state.position is None:
            break
        state = cleaner.step(start=True)
    assert log.lines[-1] == "cleanup: full retained=%d dropped=%d" % (
        len(entries) - len(gone), len(gone))
    assert dict(table.items()) == {k: v for k, v in entries.items() if k not in gone}
    cleaner.close()
    table.close()


def test_a_manual_host_entry_is_not_overwritten_by_the_hosts_automatic_one(tmp_path):
    # Host entries share their key with the automatic entries of pool and
    # domain modes (and of IPv6): the policy service leaves "OK manual".
    from greylist.cli import greylistctl
    cfg = settings(tmp_path, "pool")
    conf = tmp_path / "greylist.cf"
    conf.write_text("greylist_database = %s\n%s" % (
        cfg.database, "greylist_allow_root = yes\n" if os.geteuid() == 0 else ""))
    assert greylistctl.main(["-c", str(conf), "whitelist", "add", "--host",
                             "192.0.2.10"]) == 0
    assert greylistctl.main(["-c", str(conf), "whitelist", "add", "--host",
                             "2001:db8::10"]) == 0
    clock = Clock(T)
    found = stores(cfg)
    service = policy_service(cfg, Recorder(), clock, cleanup=False, found=found)
    # The hosts earn their groups' auto-whitelist themselves: the policy
    # service matches client groups, not the host entries.
    earn(service, clock, MAIL_SERVER)
    earn(service, clock, ("2001:db8::10", "mx6.shop.test"))
    service.close()
    table = dict(found.clients.items())
    assert table[b"192.0.2.10"] == b"OK manual"
    assert table[b"2001:db8::10"] == b"OK manual"
    assert set(table) == {b"192.0.2.10", b"2001:db8::10"}
    for store in (found.raw, found.clients, found.postscreen):
        store.close()


def test_greylistctl_postscreen_says_why_a_proven_prefixs_other_host_is_ignored(
        tmp_path, capsys):
    import time
    from greylist.cli import greylistctl
    from greylist.stores.lmdb import LmdbStore
    cfg = settings(tmp_path, "pool")
    now = int(time.time())
    store = LmdbStore(cfg.database)
    store.put(b"192.0.2", b"1:%d:%d:2:client" % (now - 7200, now - 60))
    store.close()
    table = LmdbStore(cfg.postscreen_table)
    table.put(b"192.0.2.10", b"permit %d" % (now - 60))
    table.close()
    conf = tmp_path / "greylist.cf"
    conf.write_text("greylist_database = %s\ngreylist_client_awl_passes = 2\n%s" % (
        cfg.database, "greylist_allow_root = yes\n" if os.geteuid() == 0 else ""))
    assert greylistctl.main(["-c", str(conf), "postscreen", "192.0.2.10"]) == 0
    assert "callout answer: action=pass ttl=86400\nreason: awl-client\n" \
        in capsys.readouterr().out
    assert greylistctl.main(["-c", str(conf), "postscreen", "192.0.2.11"]) == 0
    out = capsys.readouterr().out
    assert "postscreen table: absent\ncallout answer: action=ignore\nreason: unproven-host\n" \
        in out, out
    assert "greylist_client_match = pool keeps access-network hosts apart" in out


def test_whitelist_remove_of_a_group_takes_its_hosts_out_of_the_client_table(tmp_path,
                                                                             postmap):
    # Found in review: remove deleted the group's key, which pool mode no
    # longer writes, and left the hosts' entries for check_client_access.
    from greylist.cli import greylistctl
    cfg = settings(tmp_path, "pool")
    clock = Clock(int(__import__("time").time()) - 7300)
    start = clock.now
    found = stores(cfg)
    service = policy_service(cfg, Recorder(), clock, cleanup=False, found=found)
    for hour, sender in enumerate(("x@remote.test", "w@remote.test")):
        clock.now = start + hour * 3600
        assert rcpt(service, MAIL_SERVER, sender).startswith("DEFER")
        clock.now += 61
        assert rcpt(service, MAIL_SERVER, sender) == "DUNNO"
    service.close()
    found.clients.put(b"192.0.2.20", b"OK manual")   # a manual host entry stays
    for store in (found.raw, found.clients, found.postscreen):
        store.close()
    assert postmap_query(postmap, cfg.client_table, "192.0.2.10") is not None
    conf = tmp_path / "greylist.cf"
    conf.write_text("greylist_database = %s\ngreylist_client_awl_passes = 2\n%s" % (
        cfg.database, "greylist_allow_root = yes\n" if os.geteuid() == 0 else ""))
    assert greylistctl.main(["-c", str(conf), "whitelist", "remove", "192.0.2.10"]) == 0
    assert postmap_query(postmap, cfg.client_table, "192.0.2.10") is None
    assert postmap_query(postmap, cfg.client_table, "192.0.2.20") == "OK manual"


@pytest.mark.parametrize("key, match, stale", [
    (b"192.0.2/#auto", "pool", True),        # kept beside a manual group entry
    (b"192.0.2.10/#auto", "pool", False),
    (b"192.0.2.10/#auto", "domain", False),
    (b"shop.test/#auto", "domain", True),
    (b"outlook.com/#auto", "pool", False),
    (b"2001:db8::1/#auto", "domain", False),
    (b"192.0.2/#auto", "prefix", False),
])
def test_a_kept_automatic_value_is_judged_by_its_own_key(key, match, stale):
    from greylist.core.triple import stale_group_key
    assert stale_group_key(key, match) is stale


def test_a_cleanup_dry_run_counts_the_stale_group_entries(tmp_path):
    from greylist.stores.cleanup import Cleaner
    from greylist.stores.lmdb import LmdbStore
    cfg = settings(tmp_path, "pool")
    database, table = LmdbStore(cfg.database), LmdbStore(cfg.client_table)
    table.put(b"192.0.2", b"%d" % T)
    table.put(b"192.0.2.10", b"%d" % T)
    cleaner = Cleaner(database, table, cfg, Recorder(), Clock(T + 60))
    assert cleaner.count(T + 60) == (1, 1)
    cleaner.close()
    table.close()


def test_the_socketmap_clients_map_takes_only_a_manual_entry_at_a_pool_modes_prefix():
    # An automatic stamp at "192.0.2" (older versions', or copied into
    # Redis) would let the access host through the map.
    from greylist.handlers.learn import table_lookup
    from greylist.learning import live_entry
    for match, found in (("pool", b"9:NOTFOUND ,"), ("domain", b"9:NOTFOUND ,"),
                         ("prefix", b"13:OK %d," % T)):
        cfg = Config(client_match=match)
        _, keys, lifetimes = table_lookup("clients", "192.0.2.11", cfg)
        assert keys == [b"192.0.2.11", b"192.0.2"]
        assert live_entry([None, b"%d" % T], lifetimes, T + 60) == found, match
        assert live_entry([None, b"OK manual"], lifetimes, T + 60) == b"12:OK OK manual,"


def test_a_nat64_access_host_does_not_pass_on_its_neighbours_record(tmp_path):
    # Behind a NAT64 translator (64:ff9b::/96) every IPv4 client has an
    # IPv6 address, and pool mode groups it as the IPv4 address it carries
    # (core/triple.py): the mail server proves the embedded /24, and the
    # access host is keyed apart, as for native IPv4. The callout must ask
    # the postscreen table for such a host too (found in review: it passed
    # every NAT64 address of the /24 as "an IPv6 prefix").
    cfg = settings(tmp_path, "pool")
    clock = Clock(T)
    found = stores(cfg)
    service = policy_service(cfg, Recorder(), clock, cleanup=False, found=found)
    mail_server = ("64:ff9b::c000:20a", "mx.shop.test")
    earn(service, clock, mail_server)
    assert rcpt(service, ("64:ff9b::c000:20b", "dsl-192-0-2-11.isp.test"),
                "y@remote.test").startswith("DEFER")
    service.close()
    for store in (found.raw, found.clients, found.postscreen):
        store.close()
    callout = postscreen_service(cfg, Recorder(), Clock(T + 7300))
    assert callout.verdict("64:ff9b::c000:20a")[:3] == ("pass", Config().postscreen_ttl_s,
                                                        "awl-client")
    for neighbour in ("64:ff9b::c000:20b", "64:ff9b::c000:263"):
        assert callout.verdict(neighbour)[:3] == ("ignore", None, "unproven-host"), neighbour
    for store in (callout.store, callout.table):
        store.close()
    # The socketmap postscreen map answers as the callout does.
    learner = socketmap_service(cfg, Recorder(), Clock(T + 7300), cleanup=False)
    assert learner.reply(("postscreen", "64:ff9b::c000:20b"), None) == b"9:NOTFOUND ,"
    assert learner.reply(("postscreen", "64:ff9b::c000:20a"), None) == b"9:OK permit,"
    learner.close()
