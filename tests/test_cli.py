"""The greylist program as a process: stdin/stdout, exit status, logging."""

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import pytest

RCPT = (pathlib.Path(__file__).parent / "data" / "rcpt.txt").read_bytes()
ROOT = pathlib.Path(__file__).parent.parent
# The suite may run as root (CI does); greylist refuses root without this.
ALLOW_ROOT = "greylist_allow_root = yes\n" if os.geteuid() == 0 else ""


@pytest.fixture
def home(tmp_path):
    """A private directory with a settings file that logs to a file there."""
    os.chmod(tmp_path, 0o755)
    (tmp_path / "greylist.cf").write_text(
        "# test settings\ngreylist_log = %s\ngreylist_database =\n    %s\n%s"
        % (tmp_path / "log", tmp_path / "db", ALLOW_ROOT))
    return tmp_path


def greylist(home, data, *args, timeout=30):
    """Run the program with the given stdin; return (status, stdout, stderr, log)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "greylist", "-c", str(home / "greylist.cf"),
                           *args], input=data, capture_output=True, timeout=timeout, env=env)
    log = (home / "log").read_text() if (home / "log").exists() else ""
    return done.returncode, done.stdout, done.stderr, log


def test_defer_then_pass_through_the_real_process(home):
    status, out, err, log = greylist(home, RCPT, "--delay", "0")
    assert (status, out, err) == (0, b"action=DEFER_IF_PERMIT Greylisted, please try again "
                                     b"in 0 seconds\n\n", b"")
    status, out, err, log = greylist(home, RCPT + RCPT, "--delay", "0")
    assert (status, out, err) == (0, b"action=DUNNO\n\n" * 2, b"")
    lines = log.splitlines()
    assert len(lines) == 3
    assert re.fullmatch(r"\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ greylist\[\d+\]: "
                        r"action=DEFER_IF_PERMIT reason=new age=0 client=192\.0\.2\.10 "
                        r"sender=alice@example\.org rcpt=bob@example\.net", lines[0])
    # The second process may start in the next second: any small age.
    assert re.search(r"action=DUNNO reason=delay-passed age=[01] client=192\.0\.2\.10 "
                     r"sender=alice@example\.org rcpt=bob@example\.net$", lines[1])
    assert (home / "db.lmdb").exists()


def test_database_option_overrides_the_settings_file(home):
    status, out, _, _ = greylist(home, RCPT, "-d", str(home / "other.lmdb"))
    assert status == 0 and out.startswith(b"action=DEFER_IF_PERMIT")
    assert (home / "other.lmdb").exists() and not (home / "db.lmdb").exists()


def test_verbose_logs_non_rcpt_decisions(home):
    data = RCPT.replace(b"protocol_state=RCPT", b"protocol_state=DATA")
    _, out, _, quiet = greylist(home, data)
    _, out, _, verbose = greylist(home, data, "-v")
    assert out == b"action=DUNNO\n\n"
    assert "protocol_state=DATA" not in quiet
    assert "action=DUNNO reason=protocol_state=DATA" in verbose


BAD_INPUTS = {
    "no-equals": b"request=smtpd_access_policy\nno equals sign here\n\n",
    "overlong-no-equals": b"sender" + b"a" * 100000 + b"\n\n",
    "binary": bytes(range(256)) * 4 + b"\n\n",
    "bad-client": RCPT.replace(b"client_address=192.0.2.10", b"client_address=999.1.1.1"),
    "unknown-request": RCPT.replace(b"request=smtpd_access_policy", b"request=other"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_logged_and_disconnected_without_traceback(home, name):
    status, out, err, log = greylist(home, RCPT + BAD_INPUTS[name] + RCPT)
    assert status == 1
    assert out == b"action=DEFER_IF_PERMIT Greylisted, please try again in 180 seconds\n\n"
    assert err == b""
    assert "warning: " in log and log.rstrip().endswith("disconnecting without a reply")
    assert "Traceback" not in log and "internal error" not in log


def test_store_failure_answers_dunno_and_keeps_serving(home):
    # The database, not the log, in a world-writable directory: a log
    # there is refused too (log.py).
    shared = home / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    status, out, err, log = greylist(home, RCPT * 3, "-d", str(shared / "db"))
    assert (status, out, err) == (0, b"action=DUNNO\n\n" * 3, b"")
    assert log.count("warning:") == 1 and "world-writable" in log
    assert log.count("reason=database-failure") == 3


def test_settings_error_is_fatal_with_status_1_on_stderr_unless_it_is_the_spawn_socket(home):
    # Found in an install walkthrough: with stderr a file or a pipe (not a
    # terminal), the fatal line went nowhere but the log. Only spawn(8)'s
    # socket (stdin, stdout and stderr in one) is kept silent.
    (home / "greylist.cf").write_text("greylist_log = %s\ngreylist_dealy = 60\n%s"
                                      % (home / "log", ALLOW_ROOT))
    status, out, err, log = greylist(home, RCPT)
    assert (status, out) == (1, b"")
    assert err.startswith(b"greylist: fatal: ") and b"unknown setting 'greylist_dealy'" in err
    assert "unknown setting 'greylist_dealy'" in log
    ours, theirs = socket.socketpair()
    with ours, theirs:
        done = subprocess.run([sys.executable, "-m", "greylist", "-c", str(home / "greylist.cf")],
                              stdin=theirs, stdout=theirs, stderr=theirs, timeout=30,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        theirs.close()
        ours.settimeout(10)
        assert done.returncode == 1
        assert ours.recv(4096) == b""


def test_usage_error_exits_2_and_says_why_on_stderr_only(home):
    # stderr is a pipe here, not spawn(8)'s socket: Log.fatal writes there.
    status, out, err, log = greylist(home, RCPT, "--no-such-option")
    assert (status, out) == (2, b"")
    assert err.startswith(b"greylist: fatal: usage: ") and err.count(b"\n") == 1
    # The settings file named on the command line says where to log.
    assert "fatal: usage: " in log


def test_postlog_target_sends_postfix_style_datagrams(home):
    path = str(home / "postlog")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(10)
        (home / "greylist.cf").write_text("greylist_log = postlog:%s\ngreylist_database = "
                                          "%s\n%s" % (path, home / "db", ALLOW_ROOT))
        status, out, err, _ = greylist(home, RCPT)
        assert (status, err) == (0, b"")
        record = server.recv(4096).decode()
    assert re.fullmatch(r"\w{3} [ \d]\d \d\d:\d\d:\d\d \S+ greylist\[\d+\]: "
                        r"action=DEFER_IF_PERMIT reason=new .*", record)


def test_missing_postlog_socket_does_not_fail_the_service(home):
    (home / "greylist.cf").write_text("greylist_log = postlog:%s\ngreylist_database = %s\n%s"
                                      % (home / "nowhere", home / "db", ALLOW_ROOT))
    status, out, err, _ = greylist(home, RCPT)
    assert (status, err) == (0, b"") and out.startswith(b"action=DEFER_IF_PERMIT")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as root")
def test_running_as_root_is_refused_without_greylist_allow_root(home):
    (home / "greylist.cf").write_text("greylist_log = %s\ngreylist_database = %s\n"
                                      % (home / "log", home / "db"))
    status, out, err, log = greylist(home, RCPT)
    assert (status, out) == (1, b"")
    assert err.startswith(b"greylist: fatal: refusing to run as root")  # stderr: a pipe
    assert "fatal: refusing to run as root" in log
    assert not (home / "db.lmdb").exists()


@pytest.mark.parametrize("argv", [
    ["-c", "/etc/greylist/greylist.cf"], ["--config", "/x.cf"], ["-v", "-c", "f"],
    ["-vv", "-c", "f"], ["-v", "-vvv", "--config", "f"], ["-c", "-v"], ["-c", ""],
    ["-vx", "-c", "f"], ["-c", "f", "-v"], ["-d", "/db", "-c", "f"], ["--delay", "5s"], [],
])
def test_the_spawn_form_is_read_as_docopt_reads_it(argv):
    from docopt import DocoptExit, docopt
    from greylist.cli.greylist import USAGE, parse_args
    try:
        expected = docopt(USAGE, argv=argv)
    except DocoptExit:
        with pytest.raises(SystemExit):
            parse_args(argv)
        return
    assert parse_args(argv) == expected


@pytest.mark.parametrize("module", ["greylist", "greylist.cli.socketmap",
                                    "greylist.cli.postscreen"])
def test_a_misspelled_setting_is_logged_where_greylist_log_says_and_shown_on_a_terminal(
        tmp_path, module):
    """Issue 15: with no syslog socket a settings error vanished, even when
    the same file set greylist_log; by hand it said nothing at all."""
    settings = tmp_path / "bad.cf"
    settings.write_text("greylist_dealy = 10s\ngreylist_log = %s/log\n" % tmp_path)
    status, out, shown = on_a_terminal(["-c", str(settings)], module=module)
    assert status == 1 and out == b""
    assert b"fatal: " in shown and b"unknown setting 'greylist_dealy'" in shown
    assert "fatal: %s, line 1: unknown setting 'greylist_dealy'" % settings in \
        (tmp_path / "log").read_text()


def on_a_terminal(argv: list[str], cwd=None, module: str = "greylist"
                  ) -> tuple[int, bytes, bytes]:
    """Run module (greylist) with stderr on a pseudo-terminal, as by hand;
    return (status, stdout, what the terminal showed)."""
    import pty
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    master, slave = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", module, *argv],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                              env=env, timeout=30, cwd=cwd)
        os.close(slave)
        slave = -1
        shown = b""
        for _ in range(1000):
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return done.returncode, done.stdout, shown


# issue 15: the four ways greylist exited 1 without a word.
FATAL = {
    "misspelled-setting": ("greylist_dealy = 10s\n", [], 1,
                           "line 2: unknown setting 'greylist_dealy'"),
    "bad-delay-option": ("", ["--delay", "10sec"], 1,
                         "--delay 10sec: greylist_delay: invalid time value '10sec'"),
    "database-option-without-value": ("", ["-d"], 2, "usage: -d requires argument"),
    "root": (None, [], 1, "refusing to run as root"),
}


@pytest.mark.parametrize("case", FATAL)
def test_a_fatal_error_is_shown_on_a_terminal_and_written_to_greylist_log(tmp_path, case):
    settings, options, status, reason = FATAL[case]
    if settings is None:
        if os.geteuid() != 0:
            pytest.skip("needs root to run as root")
        settings = ""
    else:
        settings += ALLOW_ROOT
    cf = tmp_path / "greylist.cf"
    cf.write_text("greylist_log = %s/log\n%sgreylist_database = %s/db\n"
                  % (tmp_path, settings, tmp_path))
    done, out, shown = on_a_terminal(["-c", str(cf), *options])
    assert (done, out) == (status, b"")
    assert shown.startswith(b"greylist: fatal: ") and reason.encode() in shown, shown
    logged = (tmp_path / "log").read_text()
    assert logged.count("\n") == 1 and "greylist[" in logged
    assert ": fatal: " in logged and reason in logged
    assert not (tmp_path / "db.lmdb").exists()


@pytest.fixture
def checked(tmp_path):
    """A settings file with a whitelist, a log file and a database directory."""
    os.chmod(tmp_path, 0o755)
    (tmp_path / "db").mkdir(mode=0o755)
    (tmp_path / "clients").write_text("192.0.2.1\n")
    cf = tmp_path / "greylist.cf"
    cf.write_text("greylist_log = %s/log\ngreylist_database = %s/db/greylist\n"
                  "greylist_whitelist_clients = %s/clients\n%s"
                  % (tmp_path, tmp_path, tmp_path, ALLOW_ROOT))
    return tmp_path


def check(home, *options):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "greylist", "--check", "-c",
                           str(home / "greylist.cf"), *options], capture_output=True,
                          timeout=30, env=env, stdin=subprocess.DEVNULL)


def test_check_says_ok_and_writes_and_creates_nothing(checked):
    done = check(checked)
    assert (done.returncode, done.stdout, done.stderr) == (
        0, b"%s/greylist.cf: ok\n" % bytes(checked), b"")
    assert sorted(os.listdir(checked)) == ["clients", "db", "greylist.cf"]
    assert os.listdir(checked / "db") == []


def test_check_notes_a_setting_given_twice(checked):
    # Found in review: silent, where postconf warns "overriding earlier
    # entry". The last one counts, as in main.cf; a continuation line and
    # a commented-out line neither hide nor make a repeat.
    with open(checked / "greylist.cf", "a") as handle:
        handle.write("greylist_delay = 60\n# greylist_delay = 1\ngreylist_delay =\n  120\n")
    done = check(checked)
    assert (done.returncode, done.stderr) == (0, b"")
    name = b"%s/greylist.cf" % bytes(checked)
    first = 4 + bool(ALLOW_ROOT)
    assert done.stdout == (b"%s: note: line %d: greylist_delay overrides line %d (the last "
                           b"one counts)\n%s: ok\n" % (name, first + 2, first, name))


def test_check_notes_a_widened_client_network_and_passes(checked):
    # Kept and matched as the whole network: a note, not a problem.
    (checked / "clients").write_text("192.0.2.1/24\n")
    done = check(checked)
    name = b"%s/greylist.cf" % bytes(checked)
    assert (done.returncode, done.stderr) == (0, b""), done
    assert done.stdout == (b"%s: note: %s/clients, line 1: '192.0.2.1/24': host address bits "
                           b"set: it matches all of 192.0.2.0/24\n%s: ok\n"
                           % (name, bytes(checked), name))


def test_check_accepts_an_existing_database(checked):
    from greylist.stores.lmdb import LmdbStore
    store = LmdbStore(str(checked / "db" / "greylist"))
    store.put(b"k", b"v")
    store.close()
    before = (checked / "db" / "greylist.lmdb").read_bytes()
    assert check(checked).returncode == 0
    assert (checked / "db" / "greylist.lmdb").read_bytes() == before


def _world_writable(home):
    os.chmod(home / "db", 0o777)


def _lmdb_1_0_file(home):
    import struct
    (home / "db" / "greylist.lmdb").write_bytes(bytes(24) + struct.pack("=II", 0xBEEFC0DE, 3)
                                               + bytes(4096))


CHECKS = {
    "misspelled": ("greylist_dealy = 10s\n", (), None, "unknown setting 'greylist_dealy'"),
    "bad-value": ("greylist_delay = 10sec\n", (), None, "invalid time value '10sec'"),
    "bad-option": ("", ("--delay", "10sec"), None, "--delay 10sec: greylist_delay"),
    "missing-whitelist": ("greylist_whitelist_senders = /nonexistent/senders\n", (), None,
                          "whitelist /nonexistent/senders: No such file or directory"),
    "bad-whitelist-line": ("", (), lambda home: (home / "clients").write_text("300.1.1.1/99\n"),
                           "clients"),
    "world-writable-database-directory": ("", (), _world_writable, "world-writable"),
    "missing-database-directory": ("", ("-d", "/nonexistent/dir/greylist"), None,
                                   "database directory /nonexistent/dir: No such file"),
    "lmdb-1.0-file": ("", (), _lmdb_1_0_file, "LMDB data format v3"),
    "missing-postlog-socket": ("greylist_log = postlog:/nonexistent/postlog\n", (), None,
                               "postlog socket /nonexistent/postlog"),
    "missing-log-directory": ("greylist_log = /nonexistent/greylist.log\n", (), None,
                              "greylist_log: directory /nonexistent does not exist"),
}


@pytest.mark.parametrize("case", CHECKS)
def test_check_names_each_problem_on_stderr_and_exits_1(checked, case):
    settings, options, prepare, problem = CHECKS[case]
    with open(checked / "greylist.cf", "a") as handle:
        handle.write(settings)
    if prepare is not None:
        prepare(checked)
    files = sorted(os.listdir(checked))
    done = check(checked, *options)
    name = b"%s/greylist.cf: " % bytes(checked)
    assert done.returncode == 1 and b": ok" not in done.stdout
    lines = done.stderr.decode().splitlines()
    assert lines and all(line.startswith(name.decode()) for line in lines), lines
    assert any(problem in line for line in lines), lines
    assert "Traceback" not in done.stderr.decode()
    assert sorted(os.listdir(checked)) == files
    os.chmod(checked / "db", 0o755)


def test_greylistd_check_reads_the_same_file_and_binds_nothing(checked):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cf = checked / "greylist.cf"
    with cf.open("a") as handle:
        handle.write("greylist_policy_listen = unix:%s/policy\n" % checked)
    done = subprocess.run([sys.executable, "-m", "greylist.cli.greylistd", "--check", "-c",
                           str(cf)], capture_output=True, timeout=30, env=env,
                          stdin=subprocess.DEVNULL)
    assert (done.returncode, done.stdout) == (0, b"%s: ok\n" % bytes(cf)), done
    assert sorted(os.listdir(checked)) == ["clients", "db", "greylist.cf"]
    with cf.open("a") as handle:
        handle.write("greylist_policy_listen = tcp:127.0.0.1:1\n")
    done = subprocess.run([sys.executable, "-m", "greylist.cli.greylistd", "--check", "-c",
                           str(cf)], capture_output=True, timeout=30, env=env,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and b"greylist_policy_listen" in done.stderr, done


def test_greylistd_check_notes_an_idle_timeout_below_smtpds(checked):
    # A connection that greylistd closes before smtpd does costs smtpd a
    # new connection (0 would close every one after its request).
    cf = checked / "greylist.cf"
    with cf.open("a") as handle:
        handle.write("greylist_policy_listen = unix:%s/policy\ngreylist_idle_timeout = 60s\n"
                     % checked)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "greylist.cli.greylistd", "--check", "-c",
                           str(cf)], capture_output=True, timeout=30, env=env,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done
    assert done.stdout.startswith(b"%s: note: greylist_idle_timeout = 60s is shorter than "
                                  b"smtpd's smtpd_policy_service_max_idle" % bytes(cf)), done
    # The spawn programs hold no connection of their own: no note.
    assert b"idle_timeout" not in check(checked).stdout


def test_check_writes_nothing_into_a_spawn_socket(checked):
    # As spawn(8) connects it, stdin, stdout and stderr are one socket:
    # nothing of --check may reach Postfix there, not even "ok".
    import socket
    ours, theirs = socket.socketpair()
    with ours, theirs:
        (checked / "greylist.cf").write_text("greylist_dealy = 10s\n")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        done = subprocess.run([sys.executable, "-m", "greylist", "--check", "-c",
                               str(checked / "greylist.cf")], stdin=theirs, stdout=theirs,
                              stderr=theirs, timeout=30, env=env)
        theirs.close()
        ours.settimeout(10)
        assert done.returncode == 1
        assert ours.recv(4096) == b""


@pytest.mark.parametrize("module, request_bytes", [
    ("greylist", b"request=smtpd_access_policy\nprotocol_state=RCPT\n"
                 b"client_address=192.0.2.9\nsender=a@example.org\nrecipient=b@example.net\n\n"),
    ("greylist.cli.socketmap", b"24:sender alice@example.org,"),
])
def test_a_client_that_resets_the_spawn_socket_ends_the_process_quietly(home, module,
                                                                       request_bytes):
    # smtpd or cleanup killed (postfix stop) with our last reply unread:
    # the read of spawn(8)'s socket fails with ECONNRESET, which is the
    # end of the connection, not an internal error with a traceback.
    import select
    ours, theirs = socket.socketpair()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", module, "-v", "-c",
                             str(home / "greylist.cf")],
                            stdin=theirs, stdout=theirs, stderr=theirs, env=env)
    theirs.close()
    try:
        ours.sendall(request_bytes)
        assert select.select([ours], [], [], 20)[0], "no reply"
        time.sleep(0.2)       # the whole reply is in; it stays unread
        ours.close()          # unread data: the server's next read gets ECONNRESET
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    log = (home / "log").read_text()
    assert "client went away" in log, log
    assert "internal error" not in log and "Traceback" not in log, log


@pytest.mark.parametrize("module", ["greylist.cli.greylistd", "greylist.cli.greylistctl"])
def test_greylistd_and_greylistctl_log_a_usage_error_where_the_settings_say(home, module):
    # Review: CHANGES promised it for every program; greylistd and
    # greylistctl logged usage errors to syslog whatever the settings said.
    cf = home / "greylist.cf"
    done = subprocess.run([sys.executable, "-m", module, "--no-such-option", "-c", str(cf)],
                          capture_output=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 2 and b"fatal: usage: " in done.stderr
    assert "fatal: usage: " in (home / "log").read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to check as another user")
def test_check_as_root_checks_as_greylist_user(public_tmp):
    # Found in an install walkthrough: as root, --check refused the
    # README's database directory (owned by the policy user, 2750) with
    # root's own rules, and greylistd --check noted that "a run as root is
    # refused", though greylistd starts as root by design.
    import pwd
    nobody = pwd.getpwnam("nobody")
    for name in ("db", "logs"):
        (public_tmp / name).mkdir()
        os.chown(public_tmp / name, nobody.pw_uid, nobody.pw_gid)
        os.chmod(public_tmp / name, 0o2750)
    cf = public_tmp / "greylist.cf"
    base = ("greylist_log = %s/logs/log\ngreylist_database = %s/db/greylist\n"
            "greylist_policy_listen = unix:%s/policy\n" % (public_tmp, public_tmp, public_tmp))
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def run_check(module):
        return subprocess.run([sys.executable, "-m", module, "--check", "-c", str(cf)],
                              capture_output=True, timeout=30, env=env,
                              stdin=subprocess.DEVNULL)
    cf.write_text(base + "greylist_user = nobody\n")
    for module in ("greylist", "greylist.cli.greylistd"):
        done = run_check(module)
        assert (done.returncode, done.stdout, done.stderr) == (
            0, b"%s: ok\n" % bytes(cf), b""), (module, done)
    assert sorted(os.listdir(public_tmp / "db")) == []
    # A problem that only the user meets is found: it cannot write there.
    os.chmod(public_tmp / "db", 0o2555)
    done = run_check("greylist")
    assert done.returncode == 1 and b"db" in done.stderr, done
    os.chmod(public_tmp / "db", 0o2750)
    # Without greylist_user: greylistd would refuse to start as root.
    cf.write_text(base)
    done = run_check("greylist.cli.greylistd")
    assert done.returncode == 1 and b"without greylist_user" in done.stderr, done
