"""greylistctl against a live database, beside a running greylist process."""

import os
import pathlib
import pwd
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
ALLOW_ROOT = "greylist_allow_root = yes\n" if os.geteuid() == 0 else ""


def request(client="192.0.2.10", sender="alice@example.org", rcpt="bob@example.net"):
    return ("request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=%s\n"
            "sender=%s\nrecipient=%s\n\n" % (client, sender, rcpt)).encode()


def make_site(directory, delay="1h"):
    """A directory with gl.cf: the database gl and the log file log in it."""
    os.chmod(directory, 0o755)
    (directory / "gl.cf").write_text("greylist_database = %s/gl\ngreylist_log = %s/log\n"
                                     "greylist_delay = %s\n%s"
                                     % (directory, directory, delay, ALLOW_ROOT))
    return directory


@pytest.fixture
def site(tmp_path):
    return make_site(tmp_path)


class Live:
    """A running greylist process, asked one request at a time."""

    def __init__(self, site):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "greylist", "-c",
                                      str(site / "gl.cf")], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def ask(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        assert self.proc.stdout.readline() == b"\n"
        return reply.decode().strip()

    def close(self):
        self.proc.stdin.close()
        assert self.proc.wait(timeout=10) == 0
        self.proc.stdout.close()


@pytest.fixture
def live(site):
    process = Live(site)
    yield process
    process.close()


def ctl(site, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "greylist.cli.greylistctl", "-c", str(site / "gl.cf"),
                           *args], capture_output=True, text=True, timeout=60, env=env)
    return done.returncode, done.stdout


def ctl_error(site, *args):
    """A greylistctl command that fails: its status and standard error;
    nothing may go to its standard output (dump > FILE)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "greylist.cli.greylistctl", "-c", str(site / "gl.cf"),
                           *args], capture_output=True, text=True, timeout=60, env=env)
    assert done.stdout == "", (args, done.stdout)
    return done.returncode, done.stderr


def test_stats_show_and_dump_read_the_live_database(site, live, postmap):
    assert live.ask(request()).startswith("action=DEFER_IF_PERMIT")
    status, out = ctl(site, "stats")
    # The triple, and its (client group, sender) trying note.
    assert status == 0 and "entries: 2\n  pending: 1\n  trying: 1\n" in out
    status, out = ctl(site, "show", "192.0.2.99", "Alice+News@Example.ORG", "bob@example.net")
    assert status == 0
    assert "client group: 192.0.2\nsender: alice@example.org\n" in out
    assert "triple: 192.0.2/alice@example.org/bob@example.net\n  pending, first seen" in out
    # 3600 seconds, or 3599 when the clock ticked over a second since the request.
    assert re.search(r"decision now: DEFER_IF_PERMIT Greylisted, please try again in "
                     r"(3600|3599) seconds\nreason: early-retry\n\Z", out), out
    status, out = ctl(site, "dump")
    listed = subprocess.run([postmap, "-s", "lmdb:%s/gl" % site], capture_output=True,
                            text=True, timeout=10)
    assert status == 0 and out == listed.stdout and out.count("\n") == 2


def test_manual_whitelist_takes_effect_in_the_running_process(site, live):
    status, out = ctl(site, "whitelist", "add", "198.51.100.7")
    assert (status, out) == (0, "added: 198.51.100\n")
    assert live.ask(request(client="198.51.100.9")) == "action=DUNNO"
    assert "reason=manual-client" in (site / "log").read_text()
    table = subprocess.run(["postmap", "-q", "198.51.100", "lmdb:%s/gl-clients" % site],
                           capture_output=True, text=True, timeout=10)
    # "OK manual": Postfix reads OK (issue 15: a time stamp there expired
    # after greylist_max_age although the manual entry does not).
    assert table.returncode == 0 and table.stdout.strip() == "OK manual"
    status, out = ctl(site, "cleanup")
    table = subprocess.run(["postmap", "-q", "198.51.100", "lmdb:%s/gl-clients" % site],
                           capture_output=True, text=True, timeout=10)
    assert table.stdout.strip() == "OK manual"
    status, out = ctl(site, "whitelist", "remove", "198.51.100.7")
    assert (status, out) == (0, "removed: 198.51.100\n")
    assert live.ask(request(client="198.51.100.9", rcpt="x@example.net")).startswith(
        "action=DEFER_IF_PERMIT")


def test_manual_sender_entry(site, live):
    assert ctl(site, "whitelist", "add", "192.0.2.1", "news+123@example.com")[0] == 0
    assert live.ask(request(sender="news+456@example.com")) == "action=DUNNO"
    assert "reason=manual-sender" in (site / "log").read_text()


def test_cleanup_prints_and_logs_its_counts(site, live):
    live.ask(request())  # a pending triple and its trying note
    status, out = ctl(site, "cleanup", "--dry-run")
    assert (status, out) == (0, "cleanup: dry run retained=2 dropped=0 (nothing changed)\n")
    status, out = ctl(site, "cleanup")
    assert status == 0
    counts, timing = out.splitlines()
    assert counts == "cleanup: full retained=2 dropped=0"
    assert re.fullmatch(r"cleanup: \d+\.\d s, longest write lock \d+\.\d ms", timing)
    assert "greylistctl[" in (site / "log").read_text()
    assert "cleanup: full retained=2 dropped=0" in (site / "log").read_text()
    assert live.ask(request()).startswith("action=DEFER_IF_PERMIT")  # still there


@pytest.mark.parametrize("args, status", [
    (["stats"], 1),                    # no database yet
    (["frobnicate"], 2),               # usage
    (["whitelist", "add", "not-an-ip"], 2),
])
def test_exit_status(site, args, status):
    assert ctl(site, *args)[0] == status


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_as_root_it_acts_as_the_owner_of_the_database_directory(tmp_path):
    site = pathlib.Path(os.path.join("/tmp", "greylistctl-owner-%d" % os.getpid()))
    site.mkdir(mode=0o755)
    try:
        shutil.chown(site, "nobody")
        (site / "gl.cf").write_text("greylist_database = %s/gl\ngreylist_log = %s/log\n"
                                    % (site, site))
        done = subprocess.run([sys.executable, "-m", "greylist.cli.greylistctl", "-c", str(site / "gl.cf"),
                               "whitelist", "add", "192.0.2.1"], capture_output=True,
                              text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if done.returncode != 0 and "Permission denied" in done.stdout + done.stderr:
            pytest.skip("the interpreter is not usable by nobody: %s" % done.stderr[-200:])
        assert done.returncode == 0, done.stdout + done.stderr
        nobody = pwd.getpwnam("nobody").pw_uid
        # The database private; the table that smtpd reads as Postfix
        # makes its own (the directory is not set-group-ID).
        for name, mode in (("gl.lmdb", 0o600), ("gl-clients.lmdb", 0o644)):
            st = (site / name).stat()
            assert (st.st_uid, st.st_mode & 0o777) == (nobody, mode), name
    finally:
        shutil.rmtree(site)


def test_damaged_database_fails_open_with_one_line_naming_the_recovery(site):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    data = request() * 3
    subprocess.run([sys.executable, "-m", "greylist", "-c", str(site / "gl.cf")], input=data,
                   capture_output=True, env=env, timeout=30, check=True)
    path = site / "gl.lmdb"
    damaged = bytearray(path.read_bytes())
    for offset in range(2 * 4096, len(damaged), 4096):
        damaged[offset:offset + 64] = b"\xa5" * 64
    path.write_bytes(bytes(damaged))
    (site / "log").unlink()
    done = subprocess.run([sys.executable, "-m", "greylist", "-c", str(site / "gl.cf")],
                          input=data, capture_output=True, env=env, timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"action=DUNNO\n\n" * 3, b"")
    warnings = [line for line in (site / "log").read_text().splitlines() if "warning:" in line]
    assert len(warnings) == 1
    assert "is damaged" in warnings[0] and "move the file aside (do not truncate it)" \
        in warnings[0]
    assert path.read_bytes() == bytes(damaged)  # never truncated or rewritten


def test_cleanup_creates_a_missing_database_and_client_table(site, postmap):
    status, out = ctl(site, "cleanup")
    assert (status, out.splitlines()[0]) == (0, "cleanup: full retained=0 dropped=0")
    for name, mode in (("gl", 0o600), ("gl-clients", 0o644)):
        assert (site / (name + ".lmdb")).stat().st_mode & 0o777 == mode
        listed = subprocess.run([postmap, "-s", "lmdb:%s/%s" % (site, name)],
                                capture_output=True, text=True, timeout=10)
        assert (listed.returncode, listed.stdout) == (0, "")


@pytest.mark.parametrize("setting", ["greylist_client_table = none", "greylist_privacy = yes"])
def test_dump_table_without_a_client_table_says_so(site, setting):
    # 0.3.1 printed ".lmdb: no such database" for greylist_client_table = none.
    with open(site / "gl.cf", "a") as handle:
        handle.write(setting + "\n")
    status, out = ctl_error(site, "dump", "--table")
    assert status == 1
    assert out == ("greylistctl: no client table (greylist_client_table = none, "
                   "or greylist_privacy = yes)\n")


def test_a_settings_error_goes_to_stderr_and_the_log_quoted_without_blanks(tmp_path):
    """Issue 15: greylistctl wrote settings errors to stdout, with the
    value's blanks (' 5x')."""
    settings = tmp_path / "bad.cf"
    settings.write_text("greylist_log = %s/log\ngreylist_delay =  5x\n" % tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "greylist.cli.greylistctl", "-c",
                           str(settings), "stats"], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert "greylist_delay: invalid time value '5x'" in done.stderr
    assert "fatal: %s, line 2: greylist_delay: invalid time value '5x'" % settings in \
        (tmp_path / "log").read_text()


def test_a_reader_that_goes_away_ends_the_output_without_a_traceback(site):
    # Found in an install walkthrough: greylistctl stats | head -1 printed
    # a BrokenPipeError traceback.
    from greylist.stores.lmdb import LmdbStore
    store = LmdbStore(str(site / "gl"))
    store.put_many([(b"192.0.2.%d/sender%d@example.org/bob@example.net" % (n % 250, n),
                     b"1800000000:1800000000:1:trying") for n in range(5000)])
    store.close()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "greylist.cli.greylistctl", "-c",
                             str(site / "gl.cf"), "dump"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline()
        proc.stdout.close()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 1 and b"Traceback" not in err and err == b"", err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_show_as_root_in_a_root_owned_directory_makes_no_root_owned_secret(tmp_path, capfd):
    # Found in review: show (a read) made the missing privacy secret as
    # root, 0600; the policy processes, which could not read it, then
    # answered DUNNO to all mail.
    from greylist.cli.greylistctl import main
    from greylist.stores.lmdb import LmdbStore
    os.chmod(tmp_path, 0o755)
    LmdbStore(str(tmp_path / "gl")).put_many([(b"x", b"y")])
    (tmp_path / "gl.cf").write_text("greylist_database = %s/gl\ngreylist_log = %s/log\n"
                                    "greylist_privacy = yes\n" % (tmp_path, tmp_path))
    status = main(["-c", str(tmp_path / "gl.cf"), "show", "192.0.2.1", "a@example.org",
                   "b@example.net"])
    assert status == 1
    assert "refusing to create the privacy secret %s/gl.secret as root" % tmp_path \
        in capfd.readouterr().err
    assert not (tmp_path / "gl.secret").exists()


def test_an_interrupted_report_exits_130_without_a_traceback(site, monkeypatch, capfd):
    # Found in review: ^C while report read its input printed a traceback
    # (only the commands that open the database caught it).
    import greylist.report
    from greylist.cli.greylistctl import main

    def interrupted(stream, report):
        raise KeyboardInterrupt
    monkeypatch.setattr(greylist.report, "read", interrupted)
    (site / "mail.log").write_bytes(b"")
    assert main(["-c", str(site / "gl.cf"), "report", str(site / "mail.log")]) == 130
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_stats_opens_the_tables_read_only():
    # Found in review: stats opened the tables read-write, so a user who
    # may read them (the files are 0644) got "Permission denied", exit 1.
    site = pathlib.Path(os.path.join("/tmp", "greylistctl-stats-%d" % os.getpid()))
    site.mkdir(mode=0o755)
    try:
        _stats_as_nobody(make_site(site))
    finally:
        shutil.rmtree(site)


def _stats_as_nobody(site):
    assert ctl(site, "whitelist", "add", "192.0.2.1")[0] == 0
    for name in ("gl.lmdb", "gl-clients.lmdb", "gl-postscreen.lmdb"):
        os.chmod(site / name, 0o644)
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("no setpriv(1)")
    nobody = pwd.getpwnam("nobody")
    done = subprocess.run([setpriv, "--reuid=%d" % nobody.pw_uid, "--regid=%d" % nobody.pw_gid,
                           "--clear-groups", sys.executable, "-m", "greylist.cli.greylistctl",
                           "-c", str(site / "gl.cf"), "stats"], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if done.returncode != 0 and "Permission denied" in done.stderr:
        pytest.skip("the interpreter is not usable by nobody: %s" % done.stderr[-200:])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "client table: %s/gl-clients.lmdb, 1 entries" % site in done.stdout
    assert "postscreen table: %s/gl-postscreen.lmdb, 1 entries" % site in done.stdout


def test_show_writes_an_address_with_a_newline_on_one_line(site):
    # Found in review: show printed the sender as given, so a newline in
    # it made a line of its own ("decision now: DUNNO") before greylist's.
    assert ctl(site, "cleanup")[0] == 0
    status, out = ctl(site, "show", "192.0.2.1", "evil@example.org\ndecision now: DUNNO",
                      "bob@example.net")
    assert status == 0, out
    assert [line for line in out.splitlines() if line.startswith("decision now:")] == [
        "decision now: DEFER_IF_PERMIT Greylisted, please try again in 3600 seconds"], out
    assert "sender: evil@example.org%0adecision%20now:%20dunno\n" in out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.parametrize("command", [["dump"], ["stats"], ["check"], ["whitelist", "list"]])
def test_reads_as_root_that_hash_no_key_are_not_refused_for_a_missing_secret(tmp_path, capfd,
                                                                             command):
    # Found in review: the refusal that keeps show from making a
    # root-owned privacy secret refused dump, stats, check and whitelist
    # list too, which never read or make it (0.4 ran them).
    from greylist.cli.greylistctl import main
    from greylist.stores.lmdb import LmdbStore
    os.chmod(tmp_path, 0o755)
    LmdbStore(str(tmp_path / "gl")).put_many([(b"x", b"y")])
    (tmp_path / "gl.cf").write_text("greylist_database = %s/gl\ngreylist_log = %s/log\n"
                                    "greylist_privacy = yes\n" % (tmp_path, tmp_path))
    status = main(["-c", str(tmp_path / "gl.cf"), *command])
    out, err = capfd.readouterr()
    assert (status, err) == (0, ""), (out, err)
    assert not (tmp_path / "gl.secret").exists()


def test_stats_names_the_oldest_first_seen_and_the_newest_last_seen(site, capsys):
    import time
    from greylist.cli.greylistctl import main
    from greylist.core.record import Record, encode
    from greylist.stores.lmdb import LmdbStore
    now = int(time.time())
    store = LmdbStore(str(site / "gl"))
    # Keys in an order that is neither the first seen's nor the last seen's.
    for key, first, last in ((b"b/x@example.org/y@example.net", now - 1000, now - 10),
                             (b"a/x@example.org/y@example.net", now - 2000, now - 50),
                             (b"c/x@example.org/y@example.net", now - 4000, now - 3000)):
        store.put(key, encode(Record(first, last, 1, "pending")))
    store.close()
    capsys.readouterr()
    assert main(["-c", str(site / "gl.cf"), "stats"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^oldest first seen: .* c/x@example\.org/y@example\.net$", out, re.M), out
    assert re.search(r"^newest last seen: .* b/x@example\.org/y@example\.net$", out, re.M), out


def test_cleanup_exits_75_when_another_process_holds_the_pass(site, monkeypatch, capfd):
    # EX_TEMPFAIL, so that a cron job or a timer tries again later.
    from greylist.cli import greylistctl
    assert greylistctl.main(["-c", str(site / "gl.cf"), "cleanup"]) == 0
    monkeypatch.setattr(greylistctl, "BUSY_WAIT_S", 0.2)
    monkeypatch.setattr(greylistctl.Cleaner, "step", lambda self, **kw: None)
    capfd.readouterr()
    assert greylistctl.main(["-c", str(site / "gl.cf"), "cleanup"]) == 75
    assert "another process held the cleanup state" in capfd.readouterr().err


def test_cleanup_dry_run_creates_no_table_and_no_state(site, capsys):
    # "nothing changed": a real run creates the missing tables (smtpd
    # needs them), a dry run leaves the directory as it found it.
    from greylist.cli.greylistctl import main
    from greylist.stores.lmdb import LmdbStore
    store = LmdbStore(str(site / "gl"))
    store.put(b"192.0.2/a@example.org/b@example.net", b"1:1:1:1:pending")
    store.close()
    before = sorted(os.listdir(site))
    assert main(["-c", str(site / "gl.cf"), "cleanup", "--dry-run"]) == 0
    assert "cleanup: dry run retained=" in capsys.readouterr().out
    assert sorted(os.listdir(site)) == before
