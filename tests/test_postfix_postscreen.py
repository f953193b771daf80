"""End to end: the postscreen table and the postscreen socketmap map in a real postscreen(8).

greylist exports what greylisting has proven to postscreen(8) in two
forms that today's Postfix can use (greylist-postscreen(8)):

    the table    lmdb:DATABASE-postscreen, exact client addresses with
                 the values "permit manual" (greylistctl whitelist add)
                 and "permit STAMP" (the policy service), read by
                 postscreen_access_list as access lists: postscreen must
                 stop at "permit" and never evaluate the second word
    the map      the socketmap map "postscreen" of greylist-socketmap,
                 "OK permit" for a client the callout would pass (its
                 client group, the /24, is manual or auto-whitelisted)

One throw-away Postfix (tests/postfix_instance.py) serves every test of
this module, with:

    port         a plain smtpd, only for PostfixInstance's start-up probe
    screen       a postscreen with postscreen_access_list =
                 permit_mynetworks, lmdb:DATABASE-postscreen
    screen_map   a postscreen with postscreen_access_list =
                 permit_mynetworks, socketmap:unix:private/greylist-learn:
                 postscreen (spawning greylist-socketmap), and a cache
                 file of its own
    smtpd        the "pass" service both postscreens hand clients to; its
                 recipient restrictions ask greylist (spawned) as usual

mynetworks (192.0.2.0/24) holds none of the loopback clients; the
greet test (postscreen_greet_action = enforce, postscreen_greet_wait =
1s) makes a client that is not allowlisted visible: postscreen sends a
"220-" banner, waits, and logs "PASS NEW". Clients connect from their
own loopback addresses (swaks --local-interface): 127.0.0.2-4 for the
table, 127.0.5.x and 127.0.6.6 for the map, 127.0.7.x for the stale
entry test, so that client groups (/24) do not overlap between tests.
The table is written only by greylistctl, by greylist's own programs,
and (before Postfix starts) by LmdbStore, never by postmap.

Observed on Postfix 3.7.11 (the spelling is ALLOWLISTED since 3.6):
    postscreen[..]: CONNECT from [127.0.0.2]:PORT to [127.0.0.1]:PORT
    postscreen[..]: ALLOWLISTED [127.0.0.2]:PORT
and for a client not in the table:
    postscreen[..]: CONNECT from [127.0.0.4]:PORT to [127.0.0.1]:PORT
    postscreen[..]: PASS NEW [127.0.0.4]:PORT
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

from tests.conftest import as_owner, require
from tests.postfix_instance import PostfixInstance, free_port, install_runtime, \
    postfix_available

pytestmark = pytest.mark.postfix

USER = "nobody"
# A time stamp years ahead, as the policy service would write it.
STAMP = b"1796125609"
SENDER = "sender@remote.example"
RCPT = "user@example.test"


class Mx:
    """The running instance, its ports, settings and files."""

    def __init__(self, postfix: PostfixInstance, root: pathlib.Path, ports: dict,
                 ctl: list[str]):
        self.postfix = postfix
        self.root = root
        self.database = str(root / "db" / "greylist")
        self.table = self.database + "-postscreen"
        self.policy_log = root / "db" / "policy.log"
        self.map_log = root / "db" / "socketmap.log"
        self.ctl_argv = ctl
        self.__dict__.update(ports)

    def ctl(self, *args: str) -> str:
        """Run greylistctl as root (it switches to the database's owner)."""
        done = subprocess.run(self.ctl_argv + list(args), capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    def swaks(self, address: str, port: int, quit_after: str | None = "EHLO",
              sender: str = SENDER):
        """One SMTP session from the loopback address to port."""
        extra = ["--local-interface", address]
        if quit_after:
            extra += ["--quit-after", quit_after]
        return self.postfix.swaks(sender, RCPT, extra, port=port, timeout=20)

    def lookup(self, address: str) -> str | None:
        """The postscreen table's value for address, as Postfix reads it."""
        found = postmap("-q", address, "lmdb:" + self.table)
        assert found.returncode in (0, 1), found.stderr
        return found.stdout.strip() if found.returncode == 0 else None


def settings(root: pathlib.Path, name: str, log: pathlib.Path) -> pathlib.Path:
    path = root / name
    path.write_text("greylist_database = %s/db/greylist\ngreylist_log = %s\n"
                    # Long: nothing may pass by waiting during these tests.
                    "greylist_delay = 600s\n" % (root, log))
    return path


@pytest.fixture(scope="module")
def mx():
    require(postfix_available())
    root = pathlib.Path(tempfile.mkdtemp(prefix="greylist-screen-"))
    os.chmod(root, 0o755)
    try:
        database = root / "db"
        database.mkdir(mode=0o755)
        shutil.chown(database, USER)
        policy = settings(root, "policy.cf", database / "policy.log")
        learn = settings(root, "learn.cf", database / "socketmap.log")
        argv = install_runtime(root, USER)
        if isinstance(argv, str):
            require(argv)
        ctl = argv + ["-m", "greylist.cli.greylistctl", "-c", str(policy)]
        ports = {"screen": free_port(), "screen_map": free_port()}
        table = "%s/greylist-postscreen" % database

        # The table before Postfix starts: postscreen opens it at its start.
        # greylistctl (as root) switches to nobody, who owns the directory.
        added = subprocess.run(ctl + ["whitelist", "add", "127.0.0.2"], capture_output=True,
                               text=True, timeout=30)
        assert added.returncode == 0, (added.stdout, added.stderr)
        assert added.stdout == "added: 127.0.0\n", added.stdout
        assert os.stat(table + ".lmdb").st_uid == os.stat(database).st_uid
        from greylist.stores.lmdb import LmdbStore
        with as_owner(table):
            store = LmdbStore(table)
            try:
                store.put(b"127.0.0.3", b"permit " + STAMP)
            finally:
                store.close()

        master_cf = f"""\
127.0.0.1:{ports['screen']} inet n - n - 1 postscreen
127.0.0.1:{ports['screen_map']} inet n - n - 1 postscreen
  -o postscreen_access_list=permit_mynetworks,socketmap:unix:private/greylist-learn:postscreen
  -o postscreen_cache_map=btree:$data_directory/postscreen_cache_map
smtpd pass - - n - - smtpd
dnsblog unix - - n - 0 dnsblog
tlsproxy unix - - n - 0 tlsproxy
greylist-learn unix - n n - 0 spawn
  user={USER} argv={" ".join(argv)} -m greylist.cli.socketmap -c {learn}
"""
        main_cf = {
            "postscreen_access_list": "permit_mynetworks, lmdb:" + table,
            "postscreen_greet_action": "enforce",
            "postscreen_greet_wait": "1s",
        }
        with PostfixInstance(root, argv + ["-m", "greylist", "-c", str(policy)],
                             policy_user=USER, extra_main_cf=main_cf,
                             extra_master_cf=master_cf) as postfix:
            yield Mx(postfix, root, ports, ctl)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# Helpers ------------------------------------------------------------------

def postmap(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["postmap", *args], capture_output=True, text=True, timeout=15)


def read_from(path: pathlib.Path, offset: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def size(path: pathlib.Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def wait_for_log(path: pathlib.Path, offset: int, pattern: str, timeout: float = 10) -> str:
    """The text of path after offset once pattern (a regexp) occurs in it."""
    deadline = time.monotonic() + timeout
    while True:
        text = read_from(path, offset)
        if re.search(pattern, text):
            return text
        if time.monotonic() > deadline:
            raise TimeoutError("%r not seen in %s after %ss:\n%s"
                               % (pattern, path, timeout, text[-3000:]))
        time.sleep(0.1)


def screen_lines(text: str, address: str) -> list[str]:
    """postscreen's log lines about address, without the syslog prefix."""
    ip = re.escape("[%s]" % address)
    return re.findall(r"postscreen\[\d+\]: (.*%s.*)" % ip, text)


def greetings(result: subprocess.CompletedProcess) -> list[str]:
    """The 220 lines swaks received."""
    return [line[4:] for line in result.stdout.splitlines() if line.startswith("<-  220")]


def assert_allowlisted(mx: Mx, address: str, port: int, offset: int,
                       result: subprocess.CompletedProcess) -> str:
    """postscreen allowlisted address and handed it to smtpd at once."""
    ip = re.escape(address)
    text = wait_for_log(mx.postfix.maillog, offset,
                        r"smtpd\[\d+\]: connect from [^\s\[]*\[%s\]" % ip)
    lines = screen_lines(text, address)
    assert len(lines) == 2, text
    assert re.fullmatch(r"CONNECT from \[%s\]:\d+ to \[127\.0\.0\.1\]:%d" % (ip, port),
                        lines[0]), lines
    assert re.fullmatch(r"ALLOWLISTED \[%s\]:\d+" % ip, lines[1]), lines
    # No postscreen banner ("220-"): smtpd's own greeting, then EHLO answered.
    assert [g[:4] for g in greetings(result)] == ["220 "], result.stdout
    assert result.returncode == 0 and "<-  250 " in result.stdout, result.stdout
    return text


def assert_screened(mx: Mx, address: str, port: int, offset: int,
                    result: subprocess.CompletedProcess) -> str:
    """postscreen ran its tests on address (PASS NEW), and then let it in."""
    ip = re.escape(address)
    text = wait_for_log(mx.postfix.maillog, offset,
                        r"smtpd\[\d+\]: connect from [^\s\[]*\[%s\]" % ip)
    lines = screen_lines(text, address)
    assert len(lines) == 2, text
    assert re.fullmatch(r"CONNECT from \[%s\]:\d+ to \[127\.0\.0\.1\]:%d" % (ip, port),
                        lines[0]), lines
    assert re.fullmatch(r"PASS NEW \[%s\]:\d+" % ip, lines[1]), lines
    # postscreen's "220-" banner, the greet wait, then smtpd's "220 ".
    assert [g[:4] for g in greetings(result)] == ["220-", "220 "], result.stdout
    assert result.returncode == 0 and "<-  250 " in result.stdout, result.stdout
    return text


def assert_no_acl_trouble(text: str) -> None:
    """No access list complaint by postscreen, and nothing unusual at all."""
    assert "unknown command" not in text, text
    assert "ignoring the remainder" not in text, text
    assert "table lookup" not in text, text
    assert not re.search(r"postscreen\[\d+\]: (warning|error|fatal|panic):", text), text


# 1. The lmdb table ----------------------------------------------------------

def test_table_entries_are_allowlisted_by_postscreen_and_others_screened(mx):
    assert mx.lookup("127.0.0.2") == "permit manual"
    assert mx.lookup("127.0.0.3") == "permit " + STAMP.decode()
    assert mx.lookup("127.0.0.4") is None

    # "permit manual" (greylistctl whitelist add): allowlisted, then the whole
    # transaction through smtpd, whose greylist check passes the manual group.
    at = size(mx.postfix.maillog)
    sent = mx.swaks("127.0.0.2", mx.screen, quit_after=None)
    text = assert_allowlisted(mx, "127.0.0.2", mx.screen, at, sent)
    assert "<-  250 2.0.0 Ok: queued" in sent.stdout, sent.stdout
    assert "From: " + SENDER in mx.postfix.wait_for_delivery(RCPT)
    text = wait_for_log(mx.policy_log, 0, r"reason=manual-client .*client=127\.0\.0\.2 ")
    assert_no_acl_trouble(read_from(mx.postfix.maillog, at))

    # "permit STAMP" (the policy service's form): postscreen stops at permit too.
    at = size(mx.postfix.maillog)
    text = assert_allowlisted(mx, "127.0.0.3", mx.screen, at, mx.swaks("127.0.0.3", mx.screen))
    assert_no_acl_trouble(text)

    # Not in the table: the greet test runs (the /24 is whitelisted in the
    # database, but the table lists exact addresses only).
    at = size(mx.postfix.maillog)
    text = assert_screened(mx, "127.0.0.4", mx.screen, at, mx.swaks("127.0.0.4", mx.screen))
    assert_no_acl_trouble(text)
    assert "ALLOWLISTED [127.0.0.4]" not in mx.postfix.log_text()

    # Nobody rewrote the entries; the EHLO-only sessions asked no policy.
    assert mx.lookup("127.0.0.3") == "permit " + STAMP.decode()
    assert mx.lookup("127.0.0.4") is None
    assert_no_acl_trouble(mx.postfix.log_text())


# 2. The socketmap map "postscreen" ---------------------------------------------

def test_socketmap_map_allowlists_a_whitelisted_client_group_in_postscreen(mx):
    # Before greylistctl: the map answers NOTFOUND, postscreen screens.
    at, map_at = size(mx.postfix.maillog), size(mx.map_log)
    text = assert_screened(mx, "127.0.5.5", mx.screen_map, at,
                           mx.swaks("127.0.5.5", mx.screen_map))
    assert_no_acl_trouble(text)
    log = wait_for_log(mx.map_log, map_at, r"client=127\.0\.5\.5")
    assert "action=ignore reason=unproven client=127.0.5.5" in log, log

    # greylistctl while Postfix runs; the next connection is allowlisted
    # (postscreen's permanent allowlist comes before its cache of PASS NEW).
    assert mx.ctl("whitelist", "add", "127.0.5.5") == "added: 127.0.5\n"
    at, map_at = size(mx.postfix.maillog), size(mx.map_log)
    text = assert_allowlisted(mx, "127.0.5.5", mx.screen_map, at,
                              mx.swaks("127.0.5.5", mx.screen_map))
    assert_no_acl_trouble(text)
    log = wait_for_log(mx.map_log, map_at, r"client=127\.0\.5\.5")
    assert re.search(r"action=pass ttl=\d+ reason=manual-client client=127\.0\.5\.5", log), log

    # Unlike the table, the map answers for the client group: another
    # address of the /24, never listed by itself, is allowlisted too.
    assert mx.lookup("127.0.5.6") is None
    at = size(mx.postfix.maillog)
    assert_allowlisted(mx, "127.0.5.6", mx.screen_map, at, mx.swaks("127.0.5.6", mx.screen_map))

    # Another /24: screened.
    at, map_at = size(mx.postfix.maillog), size(mx.map_log)
    text = assert_screened(mx, "127.0.6.6", mx.screen_map, at,
                           mx.swaks("127.0.6.6", mx.screen_map))
    assert_no_acl_trouble(text)
    log = wait_for_log(mx.map_log, map_at, r"client=127\.0\.6\.6")
    assert "action=ignore reason=unproven client=127.0.6.6" in log, log
    assert "warning" not in read_from(mx.map_log, 0)


# 3. A whitelist removed ---------------------------------------------------------

def test_whitelist_remove_leaves_no_permanent_postscreen_entry_for_other_group_addresses(mx):
    """greylistctl whitelist add 127.0.7.1 whitelists the group 127.0.7;
    127.0.7.2 then sends mail, which greylist passes as manual-client,
    and the policy service writes 127.0.7.2 to the postscreen table.
    After greylistctl whitelist remove 127.0.7.1 (and a cleanup),
    greylisting vouches for no address of 127.0.7 any more, so neither
    may postscreen skip its tests for 127.0.7.2.

    Finding (commit 64662fe): the policy service writes the value
    "permit manual" for a manual-client pass (core/tables.py
    permit_change(manual=True)); whitelist remove deletes only the
    address given on its command line, and cleanup never expires
    "permit manual". The entry of 127.0.7.2 stays for ever, and
    postscreen allowlists that client for ever, while greylisting
    greylists its new triples and greylistctl postscreen (the callout,
    the socketmap map) answers ignore for it. Fixed: whitelist remove
    deletes the table entries of every address of the group.
    """
    assert mx.ctl("whitelist", "add", "127.0.7.1") == "added: 127.0.7\n"
    at = size(mx.postfix.maillog)
    sent = mx.swaks("127.0.7.2", mx.screen, quit_after=None)
    assert_screened(mx, "127.0.7.2", mx.screen, at, sent)
    assert "<-  250 2.0.0 Ok: queued" in sent.stdout, sent.stdout
    wait_for_log(mx.policy_log, 0, r"reason=manual-client .*client=127\.0\.7\.2 ")
    written = mx.lookup("127.0.7.2")
    assert written is not None and written.startswith("permit "), written

    assert mx.ctl("whitelist", "remove", "127.0.7.1") == "removed: 127.0.7\n"
    mx.ctl("cleanup")
    assert mx.lookup("127.0.7.1") is None
    # greylisting no longer vouches for 127.0.7.2: the callout (and the
    # socketmap map) would not pass it ...
    explained = mx.ctl("postscreen", "127.0.7.2")
    assert "callout answer: action=ignore\nreason: unproven" in explained, explained
    # ... and its next new triple is greylisted.
    at = size(mx.postfix.maillog)
    result = mx.swaks("127.0.7.2", mx.screen, quit_after="RCPT",
                      sender="other@remote.example")
    assert "<** 450 4.7.1 " in result.stdout, result.stdout
    text = wait_for_log(mx.postfix.maillog, at,
                        r"smtpd\[\d+\]: connect from [^\s\[]*\[127\.0\.7\.2\]")
    assert_no_acl_trouble(text)
    assert "ALLOWLISTED [127.0.7.2]" not in text, (
        "stale postscreen table entry %r for 127.0.7.2 after whitelist remove"
        % mx.lookup("127.0.7.2"))
    # Screened again (postscreen remembers its own earlier pass: PASS OLD).
    assert re.search(r"postscreen\[\d+\]: PASS (OLD|NEW) \[127\.0\.7\.2\]", text), text
    assert mx.lookup("127.0.7.2") is None


# 4. Postfix reads what greylistctl wrote ------------------------------------------

def test_postmap_reads_the_manual_entry_greylistctl_writes(postmap, tmp_path):
    database = tmp_path / "greylist"
    cfg = tmp_path / "greylist.cf"
    cfg.write_text("greylist_database = %s\ngreylist_log = %s/greylist.log\n%s"
                   % (database, tmp_path,
                      "greylist_allow_root = yes\n" if os.geteuid() == 0 else ""))
    if os.geteuid() == 0:
        # A root-owned directory: greylistctl stays root only because the
        # policy processes run as root (greylist_allow_root).
        assert os.stat(tmp_path).st_uid == 0
    added = subprocess.run(
        [sys.executable, "-m", "greylist.cli.greylistctl", "-c", str(cfg),
         "whitelist", "add", "127.0.0.2"], capture_output=True, text=True, timeout=30,
        cwd=pathlib.Path(__file__).resolve().parent.parent)
    assert added.returncode == 0, (added.stdout, added.stderr)
    table = "lmdb:%s-postscreen" % database
    found = subprocess.run([postmap, "-q", "127.0.0.2", table], capture_output=True,
                           text=True, timeout=15)
    assert (found.returncode, found.stdout, found.stderr) == (0, "permit manual\n", "")
    # Exact addresses only: another address of the whitelisted /24 is absent.
    other = subprocess.run([postmap, "-q", "127.0.0.4", table], capture_output=True,
                           text=True, timeout=15)
    assert (other.returncode, other.stdout) == (1, ""), other.stderr
