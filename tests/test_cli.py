"""The greylist program as a process: stdin/stdout, exit status, logging."""

import os
import pathlib
import re
import socket
import subprocess
import sys

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
    "overlong": b"sender=" + b"a" * 100000 + b"\n\n",
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
    os.chmod(home, 0o777)
    try:
        status, out, err, log = greylist(home, RCPT * 3)
    finally:
        os.chmod(home, 0o755)
    assert (status, out, err) == (0, b"action=DUNNO\n\n" * 3, b"")
    assert log.count("warning:") == 1 and "world-writable" in log
    assert log.count("reason=database-failure") == 3


def test_settings_error_is_fatal_with_status_1(home):
    (home / "greylist.cf").write_text("greylist_log = %s\ngreylist_dealy = 60\n%s"
                                      % (home / "log", ALLOW_ROOT))
    status, out, err, _ = greylist(home, RCPT)
    assert (status, out, err) == (1, b"", b"")


def test_usage_error_exits_2_and_writes_nothing(home):
    status, out, err, _ = greylist(home, RCPT, "--no-such-option")
    assert (status, out, err) == (2, b"", b"")


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
    assert (status, out, err) == (1, b"", b"")
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
    import os
    import pty
    import subprocess
    import sys
    settings = tmp_path / "bad.cf"
    settings.write_text("greylist_dealy = 10s\ngreylist_log = %s/log\n" % tmp_path)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    master, slave = pty.openpty()
    try:
        done = subprocess.run([sys.executable, "-m", module, "-c", str(settings)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                              env=env, timeout=30)
        os.close(slave)
        slave = -1
        shown = b""
        while True:
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
    assert done.returncode == 1 and done.stdout == b""
    assert b"fatal: " in shown and b"unknown setting 'greylist_dealy'" in shown
    assert "fatal: %s, line 1: unknown setting 'greylist_dealy'" % settings in \
        (tmp_path / "log").read_text()
