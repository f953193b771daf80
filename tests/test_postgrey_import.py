"""greylistctl import-postgrey: a real postgrey's database, imported.

A real postgrey (Debian's /usr/sbin/postgrey) runs on 127.0.0.1 with its
--dbdir in a temporary directory; policy_test_time, an attribute
postgrey reads in place of its clock (for its own policy-test script),
lets it see retries hours apart at once. Its database is then imported
with greylistctl, which runs the real db_recover and db_dump (Debian's
db-util), and a greylist process answers from the result. Without
postgrey or db-util these tests skip; under CI they fail.
"""

import io
import os
import pathlib
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from greylist import migrate
from greylist.config import Config
from greylist.core.record import Record
from tests.conftest import require
from tests.test_ctl import ALLOW_ROOT, ROOT, Live, ctl, ctl_error, request

POSTGREY = "/usr/sbin/postgrey"
NOW = int(time.time())


def tools_reason() -> str | None:
    if not os.path.exists(POSTGREY):
        return "postgrey is not installed (Debian: postgrey)"
    for names in (migrate.DUMP_TOOLS, migrate.RECOVER_TOOLS, migrate.PRINTLOG_TOOLS):
        try:
            migrate.find_tool(names)
        except migrate.MigrateError as exc:
            return str(exc)
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Postgrey:
    """A real postgrey on 127.0.0.1 with its database in dbdir."""

    def __init__(self, dbdir: str, *options: str) -> None:
        require(tools_reason())
        user = "postgrey" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        entry = pwd.getpwnam(user)
        os.chown(dbdir, entry.pw_uid, entry.pw_gid)
        self.port = free_port()
        self.log = open(os.path.join(os.path.dirname(dbdir), "postgrey.out"), "wb")
        self.proc = subprocess.Popen(
            [POSTGREY, "--inet=127.0.0.1:%d" % self.port, "--dbdir=" + dbdir,
             "--user=" + user, "--group=" + _group(entry.pw_gid), *options],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail("postgrey did not start: %s" % open(self.log.name).read())
                time.sleep(0.1)

    def ask(self, client: str, sender: str, recipient: str, at: int) -> str:
        """postgrey's action for one request, as if at epoch second at."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as conn:
            conn.sendall(("request=smtpd_access_policy\nprotocol_state=RCPT\n"
                          "client_name=unknown\nclient_address=%s\nsender=%s\n"
                          "recipient=%s\npolicy_test_time=%d\n\n"
                          % (client, sender, recipient, at)).encode())
            reply = b""
            while not reply.endswith(b"\n\n") and len(reply) < 4096:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.decode().strip()

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            (self.proc.kill if kill else self.proc.terminate)()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                # Now and then (a few stops in a hundred here) postgrey ignores a
                # SIGTERM; its last changes are then in its log only, which
                # import-postgrey recovers (db_recover), as after kill -9.
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


def _group(gid: int) -> str:
    import grp
    return grp.getgrgid(gid).gr_name


@pytest.fixture
def site(tmp_path):
    os.chmod(tmp_path, 0o755)
    (tmp_path / "gl.cf").write_text(
        "greylist_database = %s/gl\ngreylist_log = %s/log\ngreylist_delay = 1h\n"
        "greylist_client_awl_passes = 2\n%s" % (tmp_path, tmp_path, ALLOW_ROOT))
    return tmp_path


@pytest.fixture
def pgdir():
    """postgrey's --dbdir, where its user can reach it (not under tmp_path,
    whose parents are 0700)."""
    top = pathlib.Path(tempfile.mkdtemp(prefix="greylist-test-postgrey-"))
    os.chmod(top, 0o755)
    (top / "db").mkdir()
    yield top / "db"
    shutil.rmtree(top, ignore_errors=True)


def feed(postgrey: Postgrey) -> None:
    """The history the tests import: a passed triple, a pending one, and
    a client with two passes an hour apart (client auto-whitelist)."""
    # 192.0.2.10 tried 2 h ago and retried 1 h ago: passed (--delay 300).
    assert postgrey.ask("192.0.2.10", "Alice+News@Example.ORG", "bob@example.net",
                        NOW - 7200).startswith("action=DEFER_IF_PERMIT")
    assert postgrey.ask("192.0.2.10", "Alice+News@Example.ORG", "bob@example.net",
                        NOW - 3600).startswith("action=PREPEND X-Greylist")
    # Tried once, 10 minutes ago.
    assert postgrey.ask("203.0.113.5", "carol@example.com", "bob@example.net",
                        NOW - 600).startswith("action=DEFER_IF_PERMIT")
    # Two passes of 198.51.100.7, hours apart: count 2.
    for hours, rcpt in ((5, "a@example.net"), (3, "b@example.net")):
        assert postgrey.ask("198.51.100.7", "list-%d@lists.example" % hours, rcpt,
                            NOW - hours * 3600 - 400).startswith("action=DEFER")
        assert postgrey.ask("198.51.100.7", "list-%d@lists.example" % hours, rcpt,
                            NOW - hours * 3600).startswith("action=PREPEND")


def test_real_postgrey_database_is_imported_and_answered_from(site, pgdir):
    postgrey = Postgrey(str(pgdir))
    try:
        feed(postgrey)
    finally:
        postgrey.stop()
    # greylist already has its own record of one of postgrey's triples.
    live = Live(site)
    try:
        assert live.ask(request(client="203.0.113.9", sender="carol@example.com")).startswith(
            "action=DEFER_IF_PERMIT")
    finally:
        live.close()

    status, out = ctl(site, "import-postgrey", str(pgdir), "--dry-run")
    assert status == 0, out
    assert ("import-postgrey: postgrey.db: 4 records, 5 entries to import, 1 existing left "
            "alone, 0 unmappable, 0 malformed, 0 expired\n") in out
    # A dry run writes nothing.
    assert ctl(site, "show", "192.0.2.10", "alice@example.org", "bob@example.net")[1].endswith(
        "reason: new\n")

    status, out = ctl(site, "import-postgrey", str(pgdir))
    assert status == 0, out
    # 3 triples and 2 sender entries (list-5 and list-3 share one); the pending triple
    # greylist had already is left alone.
    assert ("import-postgrey: postgrey.db: 4 records, 5 entries imported, 1 existing left "
            "alone, 0 unmappable, 0 malformed, 0 expired\n") in out
    assert ("import-postgrey: postgrey_clients.db: 2 records, 2 entries imported, 0 existing "
            "left alone, 0 unmappable, 0 malformed, 0 expired, 1 client-table entries\n") in out
    assert "import-postgrey from %s: postgrey.db: 4 records" % (pgdir) in (
        site / "log").read_text()
    assert not [name for name in os.listdir(tempfile.gettempdir())
                if name.startswith("greylistctl-postgrey-") and
                os.stat(os.path.join(tempfile.gettempdir(), name)).st_mtime > NOW - 5]

    status, out = ctl(site, "show", "192.0.2.77", "alice+other@example.org", "bob@example.net")
    assert "triple: 192.0.2/alice@example.org/bob@example.net\n  passed, first seen" in out
    assert "decision now: DUNNO" in out

    live = Live(site)
    try:
        # The triple postgrey passed passes at its first request (from
        # another host of the same /24: postgrey's and greylist's group).
        # Its sender entry is checked first: awl-sender.
        assert live.ask(request(client="192.0.2.99", sender="alice+x@example.org")) == \
            "action=DUNNO"
        # The client postgrey auto-whitelisted (count 2) is whitelisted.
        assert live.ask(request(client="198.51.100.7", sender="new@example.org",
                                rcpt="c@example.net")) == "action=DUNNO"
        # greylist's own pending triple stays as it was: first seen now.
        assert live.ask(request(client="203.0.113.9", sender="carol@example.com")).startswith(
            "action=DEFER_IF_PERMIT Greylisted, please try again in 3")
    finally:
        live.close()
    lines = (site / "log").read_text()
    assert "reason=awl-sender" in lines and "reason=awl-client" in lines
    # The host's address (greylist_client_match = pool: not its /24).
    table = subprocess.run(["postmap", "-q", "198.51.100.7", "lmdb:%s/gl-clients" % site],
                           capture_output=True, text=True, timeout=10)
    assert table.returncode == 0 and table.stdout.strip() == str(NOW - 3 * 3600)

    # Again: nothing is overwritten.
    status, out = ctl(site, "import-postgrey", str(pgdir))
    assert ", 0 entries imported, 6 existing left alone" in out


def test_pending_triple_keeps_its_first_seen(site, pgdir):
    # The time now, not NOW (the module's import): a whole suite runs first.
    now = int(time.time())
    postgrey = Postgrey(str(pgdir))
    try:
        assert postgrey.ask("203.0.113.5", "carol@example.com", "bob@example.net",
                            now - 3000).startswith("action=DEFER_IF_PERMIT")
    finally:
        postgrey.stop()
    assert ctl(site, "import-postgrey", str(pgdir))[0] == 0
    live = Live(site)
    try:
        reply = live.ask(request(client="203.0.113.200", sender="carol@example.com"))
    finally:
        live.close()
    # greylist_delay 1h, first seen 3000 s ago at postgrey: about 600 s left.
    left = int(reply.split("try again in ")[1].split()[0])
    assert 500 < left <= 600 - (int(time.time()) - now), reply


def test_killed_postgreys_last_changes_are_recovered_from_its_log(site, pgdir):
    """A postgrey that was killed has its last changes in its transaction
    log only: db_dump of postgrey.db alone finds none of them."""
    postgrey = Postgrey(str(pgdir), "--lookup-by-host")
    try:
        postgrey.ask("192.0.2.10", "alice@example.org", "bob@example.net", NOW - 7200)
        postgrey.ask("192.0.2.10", "alice@example.org", "bob@example.net", NOW - 3600)
    finally:
        postgrey.stop(kill=True)
    raw = subprocess.run([migrate.find_tool(migrate.DUMP_TOOLS),
                          str(pgdir / "postgrey.db")],
                         capture_output=True, timeout=60)
    assert raw.stdout.count(b"\n ") == 0  # nothing in the file itself
    status, out = ctl(site, "import-postgrey", str(pgdir), "--lookup-by-host")
    assert status == 0, out
    assert "postgrey.db: 1 records, 2 entries imported" in out
    status, out = ctl(site, "show", "192.0.2.1", "alice@example.org", "bob@example.net")
    assert "triple: 192.0.2/alice@example.org/bob@example.net\n  passed" in out


def test_coarser_postgrey_groups_are_counted_unmappable(site, pgdir):
    (site / "gl.cf").write_text((site / "gl.cf").read_text() + "greylist_client_match = exact\n")
    postgrey = Postgrey(str(pgdir))
    try:
        feed(postgrey)
    finally:
        postgrey.stop()
    status, out = ctl(site, "import-postgrey", str(pgdir))
    assert status == 0, out
    assert "postgrey.db: 4 records, 0 entries imported, 0 existing left alone, " \
        "4 unmappable" in out
    assert "  4 unmappable: postgrey's /24 is coarser than greylist's /32\n" in out
    # Its clients are whole addresses: they map.
    assert "postgrey_clients.db: 2 records, 2 entries imported" in out


def test_missing_db_tools_are_an_error_and_nothing_is_written(site, pgdir, tmp_path):
    (pgdir / "postgrey.db").write_bytes(b"not read")
    empty = tmp_path / "bin"
    empty.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=str(empty))
    done = subprocess.run([sys.executable, "-m", "greylist.cli.greylistctl", "-c",
                           str(site / "gl.cf"), "import-postgrey", str(pgdir)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == ("greylistctl: import-postgrey: db_recover not found on PATH "
                           "(Debian: apt-get install db-util)\n")
    assert "warning: import-postgrey from" in (site / "log").read_text()
    assert not (site / "gl.lmdb").exists()


@pytest.fixture
def tools():
    """A directory for fake Berkeley DB tools that any user can run (not
    under tmp_path, whose parents are 0700: greylistctl as root runs the
    tools as nobody)."""
    top = pathlib.Path(tempfile.mkdtemp(prefix="greylist-test-tools-"))
    os.chmod(top, 0o755)
    yield top
    shutil.rmtree(top)


def with_tools(site, pgdir, tools, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=str(tools))
    return subprocess.run([sys.executable, "-m", "greylist.cli.greylistctl", "-c",
                           str(site / "gl.cf"), "import-postgrey", str(pgdir), *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_missing_db_dump_after_db_recover(site, pgdir, tools):
    (pgdir / "postgrey.db").write_bytes(b"not read")
    (tools / "db_recover").write_text("#!/bin/sh\nexit 0\n")
    (tools / "db_recover").chmod(0o755)
    done = with_tools(site, pgdir, tools)
    assert (done.returncode, done.stderr) == (1, "greylistctl: import-postgrey: db_dump not "
                                              "found on PATH (Debian: apt-get install db-util)\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="greylistctl stays root only when run as root")
def test_greylistctl_staying_root_runs_the_db_tools_as_nobody(site, pgdir, tools):
    # Found in review: a dry run as root (and greylist_allow_root) ran
    # db_printlog, db_recover and db_dump as root on files that postgrey's
    # account controls.
    (pgdir / "postgrey.db").write_bytes(b"not read")
    (tools / "db_recover").write_text(
        "#!/bin/sh\necho uid=$(/usr/bin/id -u) groups=\"$(/usr/bin/id -G)\" >&2\nexit 1\n")
    (tools / "db_recover").chmod(0o755)
    nobody = pwd.getpwnam("nobody")
    for args in (("--dry-run",), ()):
        done = with_tools(site, pgdir, tools, *args)
        assert (done.returncode, done.stderr) == (
            1, "greylistctl: import-postgrey: db_recover failed (exit status 1): uid=%d "
            "groups=%d\n" % (nobody.pw_uid, nobody.pw_gid)), args
    # greylist_user = root: greylistctl "becomes" root, the tools do not.
    cf = site / "gl.cf"
    cf.write_text(cf.read_text().replace("greylist_allow_root = yes\n", "")
                  + "greylist_user = root\n")
    done = with_tools(site, pgdir, tools)
    assert (done.returncode, done.stderr) == (
        1, "greylistctl: import-postgrey: db_recover failed (exit status 1): uid=%d "
        "groups=%d\n" % (nobody.pw_uid, nobody.pw_gid))


def test_symbolic_links_and_missing_files_are_refused(site, pgdir, tmp_path):
    assert ctl_error(site, "import-postgrey", str(tmp_path / "nowhere")) == (
        1, "greylistctl: import-postgrey: %s: No such file or directory\n"
        % (tmp_path / "nowhere"))
    os.symlink(pgdir, tmp_path / "link")
    status, out = ctl_error(site, "import-postgrey", str(tmp_path / "link"))
    assert status == 1 and "(a symbolic link?)" in out
    assert ctl_error(site, "import-postgrey", str(pgdir)) == (
        1, "greylistctl: import-postgrey: %s: no postgrey.db there (postgrey's --dbdir?)\n"
        % (pgdir))
    (tmp_path / "elsewhere.db").write_bytes(b"")
    os.symlink(tmp_path / "elsewhere.db", pgdir / "postgrey.db")
    status, out = ctl_error(site, "import-postgrey", str(pgdir))
    assert status == 1 and "postgrey.db: Too many levels of symbolic links" in out


def test_a_fifo_in_place_of_postgrey_db_is_refused_as_not_a_regular_file(site, pgdir):
    # Opened without blocking, a FIFO reads as empty: it must be named as
    # what it is, not staged and left to db_dump to fail on.
    os.mkfifo(pgdir / "postgrey.db")
    assert ctl_error(site, "import-postgrey", str(pgdir)) == (
        1, "greylistctl: import-postgrey: %s/postgrey.db: not a regular file\n" % pgdir)


def test_bad_option_values_are_usage_errors(site, pgdir):
    done = subprocess.run([sys.executable, "-m", "greylist.cli.greylistctl", "-c",
                           str(site / "gl.cf"), "import-postgrey", str(pgdir),
                           "--retry-window", "2x"], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert (done.returncode, done.stdout, done.stderr) == (
        2, "", "greylistctl: import-postgrey: --retry-window: expected a number with an "
        "optional unit s, m, h, d or w, not '2x'\n")
    assert ctl(site, "import-postgrey", str(pgdir), "--ipv4cidr", "33")[0] == 2


def test_postgrey_option_values():
    assert migrate.options() == migrate.Postgrey(300, 35 * 86400, 2 * 86400, 24, 64, False)
    pg = migrate.options("600", "10", "6h", "32", "128", True)
    assert pg == migrate.Postgrey(600, 10 * 86400, 6 * 3600, 32, 128, True)


# Keys and values as the real postgrey 1.37 wrote them (see migrate.py).
CFG = Config()
PG = migrate.Postgrey()


@pytest.mark.parametrize("key, value, pg, cfg, outcome, why, entries", [
    (b"192.0.2.0/alice@example.org/bob@example.net", b"%d,%d" % (NOW - 900, NOW - 100),
     PG, CFG, "ok", "", {b"192.0.2/alice@example.org/bob@example.net": "passed",
                         b"192.0.2/alice@example.org": "sender"}),
    (b"192.0.2.0/alice@example.org/bob@example.net", b"%d,%d" % (NOW - 900, NOW - 100),
     PG, CFG._replace(sender_awl=False), "ok", "",
     {b"192.0.2/alice@example.org/bob@example.net": "passed"}),
    (b"192.0.2.0//bob@example.net", b"%d,%d" % (NOW - 10, NOW - 10), PG, CFG, "ok", "",
     {b"192.0.2/<>/bob@example.net": "pending"}),
    (b"2001:db8:1:2:0:0:0:0/list-#@lists.example/bob@example.net", b"%d,%d,host"
     % (NOW - 10, NOW - 10), PG, CFG, "ok", "",
     {b"2001:db8:1:2/list-%23@lists.example/bob@example.net": "pending"}),
    (b"192.0.2.10/32/a@b.example/c@d.example", b"%d,%d" % (NOW, NOW),
     PG._replace(lookup_by_host=True), CFG, "ok", "", {b"192.0.2/a@b.example/c@d.example":
                                                       "pending"}),
    (b"2001:db8:0:0:0:0:0:5/128/a@b.example/c@d.example", b"%d,%d" % (NOW, NOW),
     PG, CFG._replace(client_match="exact"), "ok", "",
     {b"2001:db8::5/a@b.example/c@d.example": "pending"}),
    (b"10.1.0.0/a@b.example/c@d.example", b"%d,%d" % (NOW, NOW), PG._replace(ipv4cidr=16),
     CFG, "unmappable", "postgrey's /16 is coarser than greylist's /24", {}),
    (b"10.1.2.0/a@b.example/c@d.example", b"%d,%d" % (NOW, NOW), PG, CFG._replace(
        ipv4_prefix=16), "ok", "", {b"10.1/a@b.example/c@d.example": "pending"}),
    (b"a9993e364706816aba3e25717850c26c9cd0d89d", b"%d,%d" % (NOW, NOW), PG, CFG,
     "unmappable", "hashed key (postgrey --privacy)", {}),
    (b"192.0.2.0/a/b@c.example/d@e.example", b"%d,%d" % (NOW, NOW), PG, CFG,
     "unmappable", "more than three fields", {}),
    (b"192.0.2.0/@c.example/d@e.example", b"%d,%d" % (NOW, NOW), PG, CFG,
     "unmappable", "sender's local part removed by postgrey", {}),
    (b"192.0.2.0/" + b"a" * 300 + b"@c.example/d@e.example", b"%d,%d" % (NOW, NOW), PG, CFG,
     "unmappable", "longer than an address (cut by postgrey?)", {}),
    (b"192.0.2.0/a@c.example/d@e.example", b"-1,2", PG, CFG, "malformed",
     "value is not FIRST,LAST", {}),
    (b"host/a@c.example/d@e.example", b"%d,%d" % (NOW, NOW), PG, CFG, "malformed",
     "client net is not an address", {}),
    (b"192.0.2.0/a@c.example/", b"%d,%d" % (NOW, NOW), PG, CFG, "malformed",
     "empty recipient", {}),
    # Expired: a pending triple past postgrey's retry window, or past
    # greylist's; a passed one past --max-age.
    (b"192.0.2.0/a@c.example/d@e.example", b"%d,%d" % (NOW - 3 * 86400, NOW - 3 * 86400),
     PG, CFG, "expired", "", {}),
    (b"192.0.2.0/a@c.example/d@e.example", b"%d,%d" % (NOW - 7200, NOW - 7200),
     PG, CFG._replace(retry_window_s=3600), "expired", "", {}),
    (b"192.0.2.0/a@c.example/d@e.example", b"%d,%d" % (NOW - 40 * 86400, NOW - 36 * 86400),
     PG, CFG, "expired", "", {}),
])
def test_map_triple(key, value, pg, cfg, outcome, why, entries):
    mapped = migrate.map_triple(key, value, pg, cfg, NOW)
    assert (mapped.outcome, mapped.why) == (outcome, why)
    assert {k: r.state for k, r in mapped.entries} == entries


def test_map_triple_keeps_postgreys_times():
    mapped = migrate.map_triple(b"192.0.2.0/a@c.example/d@e.example",
                                b"%d,%d" % (NOW - 900, NOW - 100), PG, CFG, NOW)
    assert mapped.entries == ((b"192.0.2/a@c.example/d@e.example",
                               Record(NOW - 900, NOW - 100, 2, "passed")),
                              (b"192.0.2/a@c.example", Record(NOW - 100, NOW - 100, 1, "sender")))
    mapped = migrate.map_triple(b"192.0.2.0/a@c.example/d@e.example",
                                b"%d,%d" % (NOW - 200, NOW - 100), PG, CFG, NOW)
    assert mapped.entries == ((b"192.0.2/a@c.example/d@e.example",
                               Record(NOW - 200, NOW - 100, 1, "pending")),)


@pytest.mark.parametrize("key, value, outcome, entries, table", [
    (b"192.0.2.11", b"5,%d" % NOW, "ok", ((b"192.0.2", Record(NOW, NOW, 5, "client")),),
     (b"192.0.2.11", b"%d" % NOW)),   # pool mode: the host's own table entry
    (b"192.0.2.11", b"1,%d" % NOW, "ok", ((b"192.0.2", Record(NOW, NOW, 1, "client")),), None),
    (b"2001:db8:1:2:0:0:0:5", b"5,%d" % NOW, "ok",
     ((b"2001:db8:1:2", Record(NOW, NOW, 5, "client")),), (b"2001:db8:1:2::5", b"%d" % NOW)),
    (b"192.0.2.11", b"5,%d" % (NOW - 36 * 86400), "expired", (), None),
    (b"a9993e364706816aba3e25717850c26c9cd0d89d", b"5,1", "unmappable", (), None),
    (b"nonsense", b"5,1", "malformed", (), None),
    (b"192.0.2.11", b"5", "malformed", (), None),
])
def test_map_client(key, value, outcome, entries, table):
    mapped = migrate.map_client(key, value, PG, CFG, NOW)
    assert (mapped.outcome, mapped.entries, mapped.table) == (outcome, entries, table)


def test_merge_prefers_passed_and_widens_the_times():
    pending, passed = Record(10, 20, 1, "pending"), Record(30, 40, 2, "passed")
    assert migrate.merge(pending, passed) == passed
    assert migrate.merge(passed, pending) == passed
    assert migrate.merge(Record(5, 50, 1, "pending"), pending) == Record(5, 50, 1, "pending")
    assert migrate.merge(None, pending) == pending


GOOD = (b"VERSION=3\nformat=bytevalue\ntype=btree\ndb_pagesize=4096\nHEADER=END\n"
        b" 6b6579\n 76616c7565\nDATA=END\n")


@pytest.mark.parametrize("text, pairs", [
    (GOOD, [(b"key", b"value")]),
    (b"VERSION=3\nformat=print\ntype=btree\nHEADER=END\n a\\\\b\\0a\n 1,2\nDATA=END\n",
     [(b"a\\b\n", b"1,2")]),
    (b"VERSION=3\nformat=bytevalue\ntype=btree\nHEADER=END\nDATA=END\n", []),
])
def test_parse_dump(text, pairs):
    assert list(migrate.parse_dump(io.BytesIO(text))) == pairs


@pytest.mark.parametrize("text, error", [
    (b"", "dump line 1: ends before HEADER=END"),
    (b"hello world\n", "dump line 1: not a db_dump header line: b'hello world'"),
    (b"VERSION=2\n", "dump line 1: db_dump format version b'2', expected 3"),
    (b"VERSION=3\nHEADER=END\n", "dump line 2: no format= line in the header"),
    (b"format=bytevalue\ntype=queue\n", "dump line 2: database type b'queue', expected btree"),
    (b"format=bytevalue\nHEADER=END\n 6b6579\n", "dump line 4: ends before DATA=END"),
    (b"format=bytevalue\nHEADER=END\n 6b6579\nDATA=END\n", "dump line 4: a key without a value"),
    (b"format=bytevalue\nHEADER=END\n 6b657\n", "dump line 3: bad bytevalue data"),
    (b"format=bytevalue\nHEADER=END\n zz\n", "dump line 3: bad bytevalue data"),
    (b"format=print\nHEADER=END\n a\\q\n", "dump line 3: bad print data"),
    (b"format=bytevalue\nHEADER=END\nkey\n", "dump line 3: not a data line: b'key'"),
    (b"format=bytevalue\nHEADER=END\n " + b"00" * 5000 + b"\n", "dump line 3: line too long"),
    (b"format=bytevalue\nHEADER=END\n 00", "dump line 3: no newline"),
])
def test_bad_dump_input_is_a_dump_error(text, error):
    with pytest.raises(migrate.DumpError) as caught:
        list(migrate.parse_dump(io.BytesIO(text)))
    assert str(caught.value) == error


def test_a_bad_dump_is_refused_before_anything_is_written(tmp_path):
    from greylist.stores.memory import MemoryStore
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_bytes(GOOD.replace(b" 6b6579\n 76616c7565\n",
                                  b" %s\n %s\n" % (b"192.0.2.0/a@b.example/c@d.example".hex()
                                                   .encode(), (b"%d,%d" % (NOW, NOW)).hex()
                                                   .encode())))
    bad.write_bytes(GOOD[:-len(b"DATA=END\n")])
    store = MemoryStore()
    with pytest.raises(migrate.DumpError):
        migrate.import_postgrey(store, None, str(good), str(bad), PG, CFG, NOW)
    assert list(store.items()) == []
    tallies = migrate.import_postgrey(store, None, str(good), None, PG, CFG, NOW)
    assert tallies[0].imported == 1 and len(list(store.items())) == 1


def fake_tool(tmp_path, body: str) -> str:
    path = tmp_path / "tool"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_a_tool_that_runs_too_long_is_stopped(tmp_path):
    tool = fake_tool(tmp_path, "echo $$ > %s/pid; exec sleep 30" % tmp_path)
    began = time.monotonic()
    with pytest.raises(migrate.MigrateError) as caught:
        migrate.run_tool([tool], str(tmp_path / "out"), timeout_s=0.5)
    assert str(caught.value) == "tool ran for more than 0.5 s; stopped"
    assert time.monotonic() - began < 10
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_a_tool_that_writes_too_much_is_stopped(tmp_path):
    tool = fake_tool(tmp_path, "exec yes")
    with pytest.raises(migrate.MigrateError) as caught:
        migrate.run_tool([tool], str(tmp_path / "out"), timeout_s=20, max_bytes=100_000)
    assert str(caught.value) == "tool wrote more than 100000 bytes; stopped"
    assert os.path.getsize(tmp_path / "out") <= 100_000


def test_a_failing_tool_is_reported_with_its_message(tmp_path):
    tool = fake_tool(tmp_path, "echo 'db_dump: open: No such file' >&2; exit 1")
    with pytest.raises(migrate.MigrateError) as caught:
        migrate.run_tool([tool], None)
    assert str(caught.value) == "tool failed (exit status 1): db_dump: open: No such file"
    with pytest.raises(migrate.MigrateError) as caught:
        migrate.run_tool([str(tmp_path / "absent")], None)
    assert str(caught.value) == "absent: No such file or directory"


def test_a_tool_never_writes_through_a_symlink(tmp_path):
    os.symlink(tmp_path / "target", tmp_path / "out")
    with pytest.raises(migrate.MigrateError):
        migrate.run_tool([fake_tool(tmp_path, "echo hi")], str(tmp_path / "out"))
    assert not (tmp_path / "target").exists()


def test_import_as_root_switches_to_the_database_owner(pgdir):
    """postgrey's files are 0600 postgrey's: greylistctl copies them as
    root, then works as the owner of greylist's database directory."""
    if os.geteuid() != 0:
        pytest.skip("greylistctl switches users only as root")
    postgrey = Postgrey(str(pgdir))
    try:
        feed(postgrey)
    finally:
        postgrey.stop()
    top = pathlib.Path(tempfile.mkdtemp(prefix="greylist-test-owner-"))
    try:
        os.chmod(top, 0o755)
        (top / "gl").mkdir()
        shutil.chown(top / "gl", "nobody")
        (top / "gl.cf").write_text("greylist_database = %s/gl/gl\ngreylist_log = %s/gl/log\n"
                                   % (top, top))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        done = subprocess.run([sys.executable, "-m", "greylist.cli.greylistctl", "-c",
                               str(top / "gl.cf"), "import-postgrey", str(pgdir)],
                              capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "postgrey.db: 4 records, 6 entries imported" in done.stdout
        assert os.stat(top / "gl" / "gl.lmdb").st_uid == pwd.getpwnam("nobody").pw_uid
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_import_into_a_redis_database(pgdir):
    from tests.redis_server import start_server
    top = pathlib.Path(tempfile.mkdtemp(prefix="gl-pg-redis-", dir="/tmp"))
    server = None
    try:
        server = start_server(str(top))
        postgrey = Postgrey(str(pgdir))
        try:
            feed(postgrey)
        finally:
            postgrey.stop()
        (top / "gl.cf").write_text("greylist_database = %s\ngreylist_log = %s/log\n"
                                   "greylist_client_awl_passes = 2\n%s"
                                   % (server.unix_url, top, ALLOW_ROOT))
        status, out = ctl(top, "import-postgrey", str(pgdir))
        assert status == 0, out
        assert "postgrey.db: 4 records, 6 entries imported, 0 existing" in out
        assert "postgrey_clients.db: 2 records, 2 entries imported" in out
        status, out = ctl(top, "show", "192.0.2.1", "alice@example.org", "bob@example.net")
        assert "triple: 192.0.2/alice@example.org/bob@example.net\n  passed" in out
        # Each entry expires when greylist would drop it: the passed triple
        # greylist_max_age after postgrey last saw it.
        client = server.client()
        try:
            names = [name for name in client.scan_iter(count=100)
                     if name.endswith(b"192.0.2/alice@example.org/bob@example.net")]
            assert len(names) == 1
            assert abs(client.expiretime(names[0]) - (NOW - 3600 + 35 * 86400)) <= 2
        finally:
            client.close()
        assert ctl(top, "import-postgrey", str(pgdir))[1].count("0 entries imported") == 2
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(top, ignore_errors=True)


# A transactional environment like postgrey's, with one more database at
# an absolute name, its changes in the log only (the process ends without
# closing it, as when postgrey is killed).
FORGED_LOG = r"""
use strict;
use BerkeleyDB;
my ($home, $target) = @ARGV;
my $env = BerkeleyDB::Env->new(-Home => $home, -Flags => DB_CREATE | DB_INIT_TXN
    | DB_INIT_LOG | DB_INIT_LOCK | DB_INIT_MPOOL) or die "env: $BerkeleyDB::Error";
my $db = BerkeleyDB::Btree->new(-Filename => "postgrey.db", -Env => $env,
    -Flags => DB_CREATE | DB_AUTO_COMMIT) or die "db: $BerkeleyDB::Error";
my $evil = BerkeleyDB::Btree->new(-Filename => $target, -Env => $env,
    -Flags => DB_CREATE | DB_AUTO_COMMIT) or die "evil: $BerkeleyDB::Error";
$evil->db_put("x", "\n* * * * * root touch /tmp/owned\n") == 0 or die "put";
$db->db_put("192.0.2.0/a\@example.org/b\@example.net", "1,2") == 0 or die "put";
$env->txn_checkpoint(0, 0, 0) if 0;
POSIX::_exit(0);
"""


def test_a_log_that_names_files_outside_postgreys_directory_is_not_replayed(site, pgdir):
    # Found in review: db_recover replays the files a log names, absolute
    # names too; whoever controls postgrey's directory could have
    # greylistctl (root, for a dry run) create files anywhere.
    require(tools_reason())
    outside = pgdir.parent / "outside"
    outside.mkdir()
    done = subprocess.run(["perl", "-MPOSIX", "-e", FORGED_LOG, str(pgdir),
                           str(outside / "evil.db")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert (outside / "evil.db").exists()
    (outside / "evil.db").unlink()      # a replay would create it again
    status, out = ctl_error(site, "import-postgrey", str(pgdir), "--dry-run")
    assert status == 1, out
    assert "postgrey's transaction log names files that are not postgrey's" in out, out
    assert str(outside / "evil.db") in out, out
    assert os.listdir(outside) == []
    assert "import-postgrey from" in (site / "log").read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root gives the staged copy away")
def test_the_owner_of_the_staged_copy_cannot_make_root_chown_another_file(tmp_path):
    # Review: stage() gave the staged directory to the policy user first,
    # then chowned ENV/NAME by path. The new owner could move ENV away
    # and put a link in its place: root then chowned the file the link
    # named (any file: /etc/passwd). The attacker's swap is made here at
    # the moment the staged directory becomes theirs.
    nobody = pwd.getpwnam("nobody")
    source = tmp_path / "pg"
    source.mkdir()
    (source / "postgrey.db").write_bytes(b"\0" * 4096)
    victim = tmp_path / "victim"
    victim.write_text("secret\n")
    os.chmod(victim, 0o600)
    lure = tmp_path / "lure"
    lure.mkdir()
    os.symlink(victim, lure / "postgrey.db")
    real_chown = os.chown
    swapped = []

    def chown(path, uid, gid, *args, **kwargs):
        real_chown(path, uid, gid, *args, **kwargs)
        if isinstance(path, str) and os.path.basename(path).startswith(
                "greylistctl-postgrey-") and not swapped:
            env = os.path.join(path, migrate.ENV)
            os.rename(env, env + ".moved")
            os.symlink(lure, env)
            swapped.append(path)

    os.chown = chown
    try:
        staged = migrate.stage(str(source), owner=(nobody.pw_uid, nobody.pw_gid))
    finally:
        os.chown = real_chown
    try:
        assert swapped == [staged]
        assert os.stat(victim).st_uid == 0 and os.stat(victim).st_gid == 0
        # The copy itself is the owner's.
        copied = os.path.join(staged, migrate.ENV + ".moved", "postgrey.db")
        assert os.stat(copied).st_uid == nobody.pw_uid
    finally:
        migrate.unstage(staged)
