"""The postscreen table: the policy service exports proven clients, cleanup
expires them, greylistctl whitelist keeps manual ones."""

import os

import pytest

from greylist.config import Config, resolve
from greylist.core.tables import MANUAL_PERMIT, permit_change, permit_expired
from greylist.stores.cleanup import Cleaner
from greylist.stores.lmdb import LmdbStore
from greylist.wiring import policy_service, stores
from tests.conftest import Clock, Recorder

T = 1_800_000_000
MAX_AGE = 35 * 86400
ALLOW_ROOT = "greylist_allow_root = yes\n" if os.geteuid() == 0 else ""


@pytest.fixture
def cfg(tmp_path):
    os.chmod(tmp_path, 0o755)
    return resolve(Config(database=str(tmp_path / "greylist"), delay_s=60,
                          client_awl_passes=2, sender_awl=False))


def rcpt(service, address, sender, recipient):
    return service.answer({"request": "smtpd_access_policy", "protocol_state": "RCPT",
                           "client_address": address, "sender": sender,
                           "recipient": recipient}, service.new_session())


def earn(service, clock: Clock, address: str) -> None:
    """Earn the client auto-whitelist for address's group: two senders,
    each greylisted once, an hour or more apart (two passes)."""
    for hour, sender in enumerate(("x@remote.test", "w@remote.test")):
        clock.now = T + hour * 7200
        assert rcpt(service, address, sender, "a@example.com").startswith("DEFER")
        clock.now += 61
        assert rcpt(service, address, sender, "a@example.com") == "DUNNO"


def test_a_client_that_earns_the_auto_whitelist_is_exported_by_address(cfg):
    clock = Clock(T)
    found = stores(cfg)
    service = policy_service(cfg, Recorder(), clock, cleanup=False, found=found)
    earn(service, clock, "192.0.2.10")
    assert dict(found.postscreen.items()) == {b"192.0.2.10": b"permit %d" % clock.now}
    # Another address of the group passes as awl-client: exported too.
    clock.now += 10
    assert rcpt(service, "192.0.2.11", "y@remote.test", "c@example.com") == "DUNNO"
    assert service.log.lines[-1].startswith("action=DUNNO reason=awl-client")
    assert dict(found.postscreen.items())[b"192.0.2.11"] == b"permit %d" % clock.now


def test_an_unproven_client_is_not_exported(cfg):
    found = stores(cfg)
    service = policy_service(cfg, Recorder(), Clock(T), cleanup=False, found=found)
    rcpt(service, "192.0.2.10", "x@remote.test", "a@example.com")
    assert list(found.postscreen.items()) == []


def test_privacy_mode_has_no_postscreen_table(cfg):
    assert resolve(cfg._replace(privacy=True, resolved=False)).postscreen_table == ""
    assert resolve(cfg._replace(postscreen_table="none", resolved=False)).postscreen_table == ""


@pytest.mark.parametrize("old, manual, new", [
    (None, False, b"permit %d" % T),
    (b"permit %d" % (T - MAX_AGE // 2), False, None),
    (b"permit %d" % (T - MAX_AGE // 2 - 1), False, b"permit %d" % T),
    (b"permit garbage", False, b"permit %d" % T),
    (MANUAL_PERMIT, False, None),
    (None, True, MANUAL_PERMIT),
    (b"permit %d" % T, True, MANUAL_PERMIT),
    (MANUAL_PERMIT, True, None),
])
def test_an_entry_is_written_only_when_missing_stale_or_not_yet_manual(old, manual, new):
    assert permit_change(T, manual, MAX_AGE)([old])[0] == [new]


@pytest.mark.parametrize("value, gone", [
    (b"permit %d" % (T - MAX_AGE), False),
    (b"permit %d" % (T - MAX_AGE - 1), True),
    (MANUAL_PERMIT, False),
    (b"reject", False),
])
def test_cleanup_expires_stamped_entries_only(value, gone):
    assert permit_expired(value, T, MAX_AGE) == gone


def test_a_cleanup_pass_walks_the_postscreen_table(cfg):
    database, table = LmdbStore(cfg.database), LmdbStore(cfg.postscreen_table)
    table.put(b"192.0.2.1", b"permit %d" % T)
    table.put(b"192.0.2.2", b"permit %d" % (T + MAX_AGE))
    table.put(b"192.0.2.3", MANUAL_PERMIT)
    log = Recorder()
    cleaner = Cleaner(database, None, cfg, log, Clock(T + MAX_AGE + 1), postscreen=table)
    state = cleaner.step(start=True)
    while state.position is not None:
        state = cleaner.step(start=True)
    assert log.lines[-1] == "cleanup: full retained=2 dropped=1"
    assert [k for k, _ in table.items()] == [b"192.0.2.2", b"192.0.2.3"]
    cleaner.close()


DENIED = {"postscreen_drop_networks": ("192.0.2.0/25",),
          "postscreen_enforce_networks": ("2001:db8:dead::/48",)}


def test_the_table_never_permits_what_the_callout_drops_or_enforces(cfg, tmp_path, capsys):
    # Found in review: a client of greylist_postscreen_drop_networks that
    # earned the client auto-whitelist was exported "permit", and postscreen
    # let it through while the callout answered drop.
    cfg = resolve(cfg._replace(resolved=False, **DENIED))
    clock = Clock(T)
    found = stores(cfg)
    service = policy_service(cfg, Recorder(), clock, cleanup=False, found=found)
    earn(service, clock, "192.0.2.10")
    # The group 192.0.2 is proven; only its address outside the /25 is exported.
    for address in ("192.0.2.11", "192.0.2.200"):
        assert rcpt(service, address, "y@remote.test", "c@example.com") == "DUNNO"
        assert service.log.lines[-1].startswith("action=DUNNO reason=awl-client")
    assert [k for k, _ in found.postscreen.items()] == [b"192.0.2.200"]
    # Entries written before the networks were listed: cleanup removes them.
    table = found.postscreen
    for key in (b"192.0.2.1", b"2001:db8:dead::1", b"2001:db8:beef::1"):
        table.put(key, b"permit %d" % T)
    table.put(b"192.0.2.2", MANUAL_PERMIT)
    log = Recorder()
    cleaner = Cleaner(found.raw, None, cfg, log, Clock(T + 10), postscreen=table)
    state = cleaner.step(start=True)
    while state.position is not None:
        state = cleaner.step(start=True)
    assert sorted(k for k, _ in table.items()) == [b"192.0.2.200", b"2001:db8:beef::1"]
    cleaner.close()
    for store in found:
        if store is not None:
            store.close()
    # greylistctl whitelist add writes the manual entry, not the permit.
    from greylist.cli import greylistctl
    settings = tmp_path / "denied.cf"
    settings.write_text("greylist_database = %s\n%sgreylist_postscreen_drop_networks = "
                        "192.0.2.0/25\n" % (cfg.database, ALLOW_ROOT))
    capsys.readouterr()
    done = greylistctl.main(["-c", str(settings), "whitelist", "add", "192.0.2.3"])
    shown = capsys.readouterr()
    assert done == 0, shown
    assert "not in the postscreen table: 192.0.2.3" in shown.out
    assert b"192.0.2.3" not in dict(LmdbStore(cfg.postscreen_table).items())


def test_greylistctl_whitelist_add_and_remove_keep_the_manual_entry(cfg, tmp_path, postmap):
    import subprocess
    from greylist.cli import greylistctl
    settings = tmp_path / "greylist.cf"
    # As root in a root-owned directory: the policy processes run as root.
    settings.write_text("greylist_database = %s\n%s" % (cfg.database, ALLOW_ROOT))
    assert greylistctl.main(["-c", str(settings), "whitelist", "add", "198.51.100.7"]) == 0
    result = subprocess.run([postmap, "-q", "198.51.100.7", "lmdb:" + cfg.postscreen_table],
                            capture_output=True, text=True, timeout=10)
    assert result.stdout.strip() == "permit manual"
    assert greylistctl.main(["-c", str(settings), "whitelist", "remove", "198.51.100.7"]) == 0
    assert list(LmdbStore(cfg.postscreen_table).items()) == []


def test_whitelist_remove_of_a_pool_group_leaves_no_permanent_postscreen_entry(cfg, tmp_path):
    """Found in review: after whitelist add/remove of a pool domain, the
    addresses its manual-client passes wrote stayed 'permit manual'."""
    from greylist.cli import greylistctl
    settings = tmp_path / "greylist.cf"
    # As root in a root-owned directory: the policy processes run as root.
    settings.write_text("greylist_database = %s\n%s" % (cfg.database, ALLOW_ROOT))
    assert greylistctl.main(["-c", str(settings), "whitelist", "add", "198.51.100.7"]) == 0
    assert greylistctl.main(["-c", str(settings), "whitelist", "add", "google.com"]) == 0
    table = LmdbStore(cfg.postscreen_table)
    table.put(b"209.85.128.170", MANUAL_PERMIT)   # written by a manual-client pass
    table.close()
    assert greylistctl.main(["-c", str(settings), "whitelist", "remove", "google.com"]) == 0
    table = LmdbStore(cfg.postscreen_table)
    assert dict(table.items()) == {b"198.51.100.7": MANUAL_PERMIT}  # still covered
    table.close()


def test_a_manual_client_pass_exports_its_address_as_a_manual_entry(cfg, tmp_path):
    """A host of a manually whitelisted group (greylistctl whitelist add of
    a domain: no address to write then) is exported when it passes as
    manual-client, as a manual entry that cleanup keeps."""
    from greylist.cli import greylistctl
    settings = tmp_path / "greylist.cf"
    settings.write_text("greylist_database = %s\n%s" % (cfg.database, ALLOW_ROOT))
    assert greylistctl.main(["-c", str(settings), "whitelist", "add", "google.com"]) == 0
    assert list(LmdbStore(cfg.postscreen_table).items()) == []
    found = stores(cfg)
    service = policy_service(cfg, Recorder(), Clock(T), cleanup=False, found=found)
    reply = service.answer({"request": "smtpd_access_policy", "protocol_state": "RCPT",
                            "client_address": "209.85.128.170",
                            "client_name": "mail-yw1-f170.google.com",
                            "sender": "x@gmail.com", "recipient": "a@example.com"},
                           service.new_session())
    assert reply == "DUNNO"
    assert service.log.lines[-1].startswith("action=DUNNO reason=manual-client")
    assert dict(found.postscreen.items()) == {b"209.85.128.170": MANUAL_PERMIT}
