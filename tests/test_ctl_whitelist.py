"""greylistctl whitelist add, remove and list, and show (issue 15).

- whitelist add keeps the automatic entry it displaces, with its pass
  count, in the database, the client table and the postscreen table
  (KEY/#auto), and remove gives it back as it was, unless it expired;
- whitelist add --host: one address, not its client group;
- whitelist list, on LMDB and on Redis;
- show names the whitelist file and line (or setting) that exempted the
  request, and when each record expires;
- the man page's postmap -q example finds the record the TESTING
  request makes.

The client and postscreen tables are read back with the real postmap.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from greylist.cli import greylistctl
from greylist.config import load
from greylist.core import record as records
from greylist.core.tables import MANUAL_PERMIT
from greylist.stores.lmdb import LmdbStore
from tests.test_ctl import ALLOW_ROOT, make_site

ROOT = pathlib.Path(__file__).resolve().parent.parent
DAY = 86400


@pytest.fixture
def site(tmp_path):
    return make_site(tmp_path)


def settings(site, extra=""):
    if extra:
        with open(site / "gl.cf", "a") as handle:
            handle.write(extra)
    return str(site / "gl.cf")


def run(site, capsys, *args, clock=time.time):
    """(status, stdout); for a usage error (status 2), its message, which
    goes to stderr, stdout then being empty. capsys may be capfd: a usage
    error is written to descriptor 2 itself (log.to_stderr())."""
    capsys.readouterr()
    status = greylistctl.main(["-c", str(site / "gl.cf"), *args], clock=clock)
    out, err = capsys.readouterr()
    if status == 2:
        assert out == "", out
        return status, err
    return status, out


def contents(site, name):
    store = LmdbStore(str(site / name))
    try:
        return dict(store.items())
    finally:
        store.close()


def plant(site, name, entries):
    store = LmdbStore(str(site / name))
    try:
        for key, value in entries.items():
            store.put(key, value)
    finally:
        store.close()


def postmap_q(postmap, key, table):
    done = subprocess.run([postmap, "-q", key, "lmdb:%s" % table], capture_output=True,
                          text=True, timeout=10)
    assert done.returncode in (0, 1), done.stderr
    return done.stdout.strip() if done.returncode == 0 else None


def automatic(now, count=7, age=DAY):
    """An automatic client entry, last seen age ago, and its table stamp."""
    return (records.encode(records.Record(now - 10 * DAY, now - age, count, records.CLIENT)),
            b"%d" % (now - age))


def test_whitelist_add_keeps_automatic_entry(site, capsys, postmap):
    """Issue 15: whitelist add overwrote a client's automatic entry and its
    pass count; remove then left nothing."""
    now = int(time.time())
    auto, stamp = automatic(now)
    plant(site, "gl", {b"192.0.2": auto})
    plant(site, "gl-clients", {b"192.0.2": stamp})
    plant(site, "gl-postscreen", {b"192.0.2.10": b"permit " + stamp,
                                  b"192.0.2.11": b"permit " + stamp})
    assert run(site, capsys, "whitelist", "add", "192.0.2.10") == (0, "added: 192.0.2\n")
    db = contents(site, "gl")
    assert records.decode(db[b"192.0.2"]).state == records.MANUAL
    assert db[b"192.0.2/#auto"] == auto
    assert postmap_q(postmap, "192.0.2", site / "gl-clients") == "OK manual"
    assert postmap_q(postmap, "192.0.2/#auto", site / "gl-clients") == stamp.decode()
    assert postmap_q(postmap, "192.0.2.10", site / "gl-postscreen") == "permit manual"
    # A second add changes nothing: the kept entry stays the automatic one.
    status, out = run(site, capsys, "whitelist", "add", "192.0.2.10")
    assert status == 0 and out.startswith("already listed: 192.0.2 (added ")
    assert contents(site, "gl")[b"192.0.2/#auto"] == auto
    assert run(site, capsys, "whitelist", "remove", "192.0.2.10") == (0, "removed: 192.0.2\n")
    assert contents(site, "gl") == {b"192.0.2": auto}
    assert postmap_q(postmap, "192.0.2", site / "gl-clients") == stamp.decode()
    assert postmap_q(postmap, "192.0.2/#auto", site / "gl-clients") is None
    # The automatic entry is a live auto-whitelisting: its postscreen
    # entries are its own again.
    assert contents(site, "gl-postscreen") == {b"192.0.2.10": b"permit " + stamp,
                                               b"192.0.2.11": b"permit " + stamp}


def test_whitelist_remove_drops_a_kept_entry_that_expired(site, capsys, postmap):
    now = int(time.time())
    auto, stamp = automatic(now, age=36 * DAY)   # past greylist_max_age (35d)
    plant(site, "gl", {b"192.0.2": auto})
    plant(site, "gl-clients", {b"192.0.2": stamp})
    plant(site, "gl-postscreen", {b"192.0.2.10": b"permit " + stamp})
    assert run(site, capsys, "whitelist", "add", "192.0.2.10")[0] == 0
    assert run(site, capsys, "whitelist", "remove", "192.0.2.10")[0] == 0
    assert contents(site, "gl") == {}
    assert postmap_q(postmap, "192.0.2", site / "gl-clients") is None
    assert contents(site, "gl-postscreen") == {}


def test_whitelist_remove_without_a_manual_entry_removes_the_automatic_one(site, capsys):
    now = int(time.time())
    auto, stamp = automatic(now)
    plant(site, "gl", {b"192.0.2": auto})
    plant(site, "gl-clients", {b"192.0.2": stamp})
    assert run(site, capsys, "whitelist", "remove", "192.0.2.1") == (0, "removed: 192.0.2\n")
    assert contents(site, "gl") == {} and contents(site, "gl-clients") == {}


def test_whitelist_add_sender_keeps_the_automatic_sender_entry(site, capsys):
    now = int(time.time())
    auto = records.encode(records.Record(now - DAY, now - DAY, 1, records.SENDER))
    plant(site, "gl", {b"192.0.2/news@example.com": auto})
    assert run(site, capsys, "whitelist", "add", "192.0.2.1", "news+1@example.com") == (
        0, "added: 192.0.2 news@example.com\n")
    assert contents(site, "gl")[b"192.0.2/news@example.com/#auto"] == auto
    assert run(site, capsys, "whitelist", "remove", "192.0.2.1", "news@example.com")[0] == 0
    assert contents(site, "gl") == {b"192.0.2/news@example.com": auto}


def test_whitelist_add_host_whitelists_one_address_not_its_group(site, capsys, postmap):
    now = int(time.time())
    auto, stamp = automatic(now, count=2)
    plant(site, "gl", {b"192.0.2": auto})
    plant(site, "gl-clients", {b"192.0.2": stamp})
    assert run(site, capsys, "whitelist", "add", "--host", "192.0.2.10") == (
        0, "added: host 192.0.2.10\n")
    db = contents(site, "gl")
    assert records.decode(db[b"192.0.2.10"]).state == records.MANUAL
    assert db[b"192.0.2"] == auto            # the group is untouched
    # check_client_access looks up the address before the group's "192.0.2".
    assert postmap_q(postmap, "192.0.2.10", site / "gl-clients") == "OK manual"
    assert postmap_q(postmap, "192.0.2", site / "gl-clients") == stamp.decode()
    assert postmap_q(postmap, "192.0.2.11", site / "gl-clients") is None
    assert postmap_q(postmap, "192.0.2.10", site / "gl-postscreen") == "permit manual"
    status, out = run(site, capsys, "show", "192.0.2.10", "a@example.org", "b@example.net")
    assert "host entry: 192.0.2.10\n  manual, first seen " in out and "never expires" in out
    status, out = run(site, capsys, "show", "192.0.2.11", "a@example.org", "b@example.net")
    assert "host entry" not in out
    assert run(site, capsys, "whitelist", "remove", "--host", "192.0.2.10") == (
        0, "removed: host 192.0.2.10\n")
    assert contents(site, "gl") == {b"192.0.2": auto}
    assert contents(site, "gl-clients") == {b"192.0.2": stamp}
    assert contents(site, "gl-postscreen") == {}


def test_whitelist_add_host_without_a_client_table_is_refused(site, capfd):
    settings(site, "greylist_client_table = none\n")
    status, out = run(site, capfd, "whitelist", "add", "--host", "192.0.2.10")
    assert status == 2 and out.startswith("greylistctl: --host needs the client table")
    assert "client groups (192.0.2)" in out
    assert contents(site, "gl") == {}


def test_whitelist_add_host_with_exact_grouping_is_the_client_entry(site, capsys):
    settings(site, "greylist_client_match = exact\n")
    assert run(site, capsys, "whitelist", "add", "--host", "192.0.2.10") == (
        0, "added: 192.0.2.10\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "greylist", "-c", str(site / "gl.cf")],
                          input=b"request=smtpd_access_policy\nprotocol_state=RCPT\n"
                          b"client_address=192.0.2.10\nsender=a@example.org\n"
                          b"recipient=b@example.net\n\n", capture_output=True, env=env,
                          timeout=30)
    assert done.stdout == b"action=DUNNO\n\n"
    assert "reason=manual-client" in (site / "log").read_text()


def test_whitelist_add_host_rejects_a_name(site, capfd):
    assert run(site, capfd, "whitelist", "add", "--host", "google.com") == (
        2, "greylistctl: google.com is not an IP address\n")


def test_whitelist_remove_of_a_group_keeps_a_host_entry_of_it(site, capsys):
    assert run(site, capsys, "whitelist", "add", "--host", "192.0.2.10")[0] == 0
    assert run(site, capsys, "whitelist", "add", "192.0.2.11")[0] == 0
    assert run(site, capsys, "whitelist", "remove", "192.0.2.11")[0] == 0
    assert contents(site, "gl-postscreen") == {b"192.0.2.10": MANUAL_PERMIT}
    assert contents(site, "gl-clients") == {b"192.0.2.10": b"OK manual"}


def test_whitelist_list(site, capsys):
    assert run(site, capsys, "whitelist", "list")[0] == 1   # no database yet, as stats
    assert run(site, capsys, "cleanup")[0] == 0
    assert run(site, capsys, "whitelist", "list") == (0, "no manual entries\n")
    now = int(time.time())
    plant(site, "gl", {b"198.51.100": automatic(now)[0]})
    assert run(site, capsys, "whitelist", "add", "198.51.100.7")[0] == 0
    assert run(site, capsys, "whitelist", "add", "--host", "192.0.2.10")[0] == 0
    assert run(site, capsys, "whitelist", "add", "203.0.113.1", "News@Example.com")[0] == 0
    status, out = run(site, capsys, "whitelist", "list")
    when = r"added \d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}"
    assert status == 0
    assert re.fullmatch("host 192.0.2.10 %s\n"
                        "client 198.51.100 %s; keeps the automatic client entry, count 7\n"
                        "sender 203.0.113 news@example.com %s\n" % (when, when, when), out), out


def test_show_names_the_whitelist_file_and_line(site, capsys):
    (site / "clients").write_text("# postgrey style\n192.0.2.0/24\n\n/^mx\\d+\\.example/\n"
                                  "example.com\n")
    (site / "recipients").write_text("abuse@\npostmaster@example.net\n")
    settings(site, "greylist_whitelist_clients = %s/clients\n"
             "greylist_whitelist_recipients = %s/recipients\n"
             "greylist_trusted_networks = 10.0.0.0/8\n" % (site, site))
    assert run(site, capsys, "cleanup")[0] == 0
    status, out = run(site, capsys, "show", "192.0.2.10", "a@example.org", "b@example.net",
                      "--client-name", "mx1.example.com")
    assert status == 0
    assert ("whitelist-client: %s/clients, line 2: 192.0.2.0/24\n"
            "whitelist-client: %s/clients, line 4: /^mx\\d+\\.example/\n"
            "whitelist-client: %s/clients, line 5: example.com\n" % (site, site, site)) in out
    assert out.endswith("decision now: DUNNO\nreason: whitelist-client\n")
    status, out = run(site, capsys, "show", "198.51.100.1", "a@example.org",
                      "postmaster@example.net")
    assert ("whitelist-recipient: greylist_exempt_recipients: postmaster@\n"
            "whitelist-recipient: %s/recipients, line 2: postmaster@example.net\n"
            % site) in out
    status, out = run(site, capsys, "show", "10.1.2.3", "a@example.org", "b@example.net")
    assert "trusted: greylist_trusted_networks: 10.0.0.0/8\n" in out
    # Nothing is named for a decision that no list made.
    status, out = run(site, capsys, "show", "198.51.100.1", "a@example.org", "b@example.net")
    assert "whitelist-" not in out and "reason: new" in out


def test_show_prints_when_each_record_expires(site, capsys):
    t = 1_800_000_000
    plant(site, "gl", {
        # greylist_retry_window (2d) after first seen: expired an hour ago.
        b"192.0.2/a@example.org/b@example.net": records.encode(
            records.Record(t - 2 * DAY - 3601, t - 2 * DAY - 3601, 1, records.PENDING)),
        # greylist_max_age (35d) after last seen.
        b"192.0.2/a@example.org": records.encode(
            records.Record(t - 5 * DAY, t - 5 * DAY - 90, 1, records.SENDER)),
        b"192.0.2": records.encode(records.Record(t - 9 * DAY, t - 9 * DAY, 1,
                                                  records.MANUAL)),
        b"192.0.2/#auto": records.encode(records.Record(t - 9 * DAY, t - 9 * DAY, 3,
                                                        records.CLIENT))})
    status, out = run(site, capsys, "show", "192.0.2.1", "a@example.org", "b@example.net",
                      clock=lambda: t)

    def at(stamp):
        return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(stamp))
    assert status == 0
    assert "count 1 (expired), expired %s (1h ago)\n" % at(t - 3600) in out
    assert "count 1 (live), expires %s (in 29d 23h)\n" % at(t - 5 * DAY - 90 + 35 * DAY + 1) \
        in out
    assert "client entry: 192.0.2\n  manual, first seen %s" % at(t - 9 * DAY) in out
    assert "count 1 (live), never expires\n  keeps the automatic entry 192.0.2/#auto\n" \
        "    client, first seen %s, last seen %s, count 3 (live), expires %s (in 26d)\n" % (
            at(t - 9 * DAY), at(t - 9 * DAY), at(t + 26 * DAY + 1)) in out


def test_man_page_postmap_example_matches_the_testing_request(site, postmap):
    """Issue 15: the man page's postmap -q example (192.0.2.10/alice...)
    never matched with the default /24 grouping."""
    page = (ROOT / "man" / "greylist.8").read_text()
    found = re.search(r"postmap \\-q (\S+) lmdb:/var/lib/greylist/greylist\n", page)
    assert found is not None
    request = re.search(r"printf '(request=smtpd_access_policy.*?)'", page).group(1)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "greylist", "-c", str(site / "gl.cf")],
                   input=request.replace("\\\\n", "\n").encode(), capture_output=True,
                   env=env, timeout=30, check=True)
    value = postmap_q(postmap, found.group(1).replace("\\-", "-"), site / "gl")
    assert value is not None and value.endswith(":pending")


# ----------------------------------------------------------------------
# Redis: the same store interface.

@pytest.fixture
def redis_site():
    from redis_server import start_server
    directory = pathlib.Path(tempfile.mkdtemp(prefix="gl-ctlwl-", dir="/tmp"))
    os.chmod(directory, 0o755)
    server = start_server(directory / "redis")
    try:
        (directory / "gl.cf").write_text(
            "greylist_database = %s\ngreylist_log = %s/log\ngreylist_redis_timeout = 300ms\n%s"
            % (server.unix_url, directory, ALLOW_ROOT))
        yield directory
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_whitelist_list_and_the_kept_entry_on_redis(redis_site, capsys):
    from greylist.wiring import redis_table
    cfg = load(str(redis_site / "gl.cf"), {})
    now = int(time.time())
    auto, stamp = automatic(now)
    db, clients = redis_table(cfg, "db"), redis_table(cfg, "clients")
    try:
        db.put(b"192.0.2", auto)
        clients.put(b"192.0.2", stamp)
        assert run(redis_site, capsys, "whitelist", "add", "192.0.2.10")[0] == 0
        assert run(redis_site, capsys, "whitelist", "add", "--host", "198.51.100.5")[0] == 0
        status, out = run(redis_site, capsys, "whitelist", "list")
        assert status == 0 and re.fullmatch(
            r"(client 192\.0\.2 added .*; keeps the automatic client entry, count 7\n"
            r"|host 198\.51\.100\.5 added [^;\n]*\n){2}", out), out
        assert db.get(b"192.0.2/#auto") == auto and clients.get(b"192.0.2") == b"OK manual"
        assert run(redis_site, capsys, "whitelist", "remove", "192.0.2.10")[0] == 0
        assert db.get(b"192.0.2") == auto and db.get(b"192.0.2/#auto") is None
        assert clients.get(b"192.0.2") == stamp
    finally:
        db.close()
        clients.close()


# ----------------------------------------------------------------------
# A real Postfix: smtpd's check_client_access on the client table accepts
# a host entry, not the rest of its /24.

@pytest.mark.postfix
def test_whitelist_add_host_is_accepted_by_smtpd_and_its_group_is_not():
    from tests.test_postfix import instance, rcpt_reply
    with instance("", {"smtpd_recipient_restrictions":
                       "reject_unauth_destination, check_client_access "
                       "lmdb:{db}/greylist-clients, check_policy_service unix:private/policy"}
                  ) as postfix:
        # greylistctl with the policy service's interpreter, packages and
        # settings; as root it acts as the owner of the database directory.
        argv = postfix.policy_argv[:3] + ["-m", "greylist.cli.greylistctl", "-c",
                                          postfix.policy_argv[-1]]

        def ctl(*args):
            done = subprocess.run(argv + list(args), capture_output=True, text=True,
                                  timeout=30)
            assert done.returncode == 0, (args, done.stdout, done.stderr)
            return done.stdout
        assert ctl("whitelist", "add", "--host", "198.51.100.30") == (
            "added: host 198.51.100.30\n")
        listed = postfix.swaks("ann@example.org", "bea@example.test",
                               ["--xclient-addr", "198.51.100.30"])
        assert rcpt_reply(listed).startswith("250 "), listed.stdout
        neighbour = postfix.swaks("ann@example.org", "bea@example.test",
                                  ["--xclient-addr", "198.51.100.31"])
        assert rcpt_reply(neighbour).startswith("450 4.7.1 "), neighbour.stdout
        assert ctl("whitelist", "list").startswith("host 198.51.100.30 added ")
        assert ctl("whitelist", "remove", "--host", "198.51.100.30") == (
            "removed: host 198.51.100.30\n")
        removed = postfix.swaks("cid@example.org", "bea@example.test",
                                ["--xclient-addr", "198.51.100.30"])
        assert rcpt_reply(removed).startswith("450 4.7.1 "), removed.stdout
        log = postfix.log_text()
        assert "sender=ann@example.org" in log and "client=198.51.100.31" in log
        assert "451 4.3.5" not in log


def test_whitelist_list_in_privacy_mode_shows_keyed_hashes(site, capsys):
    (site / "secret").write_text("0123456789abcdef" * 4 + "\n")
    os.chmod(site / "secret", 0o600)
    settings(site, "greylist_privacy = yes\ngreylist_secret_file = %s/secret\n" % site)
    assert run(site, capsys, "whitelist", "add", "192.0.2.1")[0] == 0
    status, out = run(site, capsys, "whitelist", "list")
    assert status == 0 and re.fullmatch(r"entry [0-9a-f]{64} added [^\n]+\n", out), out
    assert "192.0.2" not in out
