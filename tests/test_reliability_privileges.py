"""Privileges and files: directory and file modes, root, secrets, no shell or eval."""

import ast
import os
import pathlib
import stat

import pytest

import greylist
from greylist import config
from tests.reliability import (command, environment, home, read_log, run, settings,
                               split_replies, triple_request, warnings)

PACKAGE = pathlib.Path(greylist.__file__).parent


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o757], ids=oct)
def test_world_writable_database_directory_is_refused(tmp_path, mode):
    conf = home(tmp_path / "conf")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    cf = settings(conf, database=str(shared / "db"))
    done = run(command(cf), triple_request(1) * 2)
    assert (done.returncode, done.stderr) == (0, b"")
    assert split_replies(done.stdout) == ["DUNNO", "DUNNO"]
    found = warnings(read_log(conf / "log"))
    assert len(found) == 1 and "world-writable" in found[0]
    assert not (shared / "db.lmdb").exists()


def test_no_state_file_is_created_in_a_refused_world_writable_directory(tmp_path):
    # Anyone may plant a symlink in a world-writable directory: a file
    # written there by the policy user can be redirected elsewhere.
    conf = home(tmp_path / "conf")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    cf = settings(conf, database=str(shared / "db"))
    done = run(command(cf), triple_request(1))
    assert split_replies(done.stdout) == ["DUNNO"]
    assert sorted(p.name for p in shared.iterdir()) == []


def test_world_writable_database_file_is_refused(tmp_path):
    directory = home(tmp_path / "file")
    cf = settings(directory)
    assert run(command(cf), triple_request(1)).returncode == 0
    os.chmod(directory / "db.lmdb", 0o666)
    (directory / "log").unlink()
    done = run(command(cf), triple_request(2))
    assert split_replies(done.stdout) == ["DUNNO"]
    assert "world-writable" in warnings(read_log(directory / "log"))[0]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as root")
def test_running_as_root_is_refused(tmp_path):
    directory = home(tmp_path / "root")
    (directory / "greylist.cf").write_text("greylist_log = %s/log\n" % directory)
    done = run(command(directory / "greylist.cf", "-d", str(directory / "db")),
               triple_request(1))
    assert (done.returncode, done.stdout) == (1, b"")
    assert b"fatal: refusing to run as root" in done.stderr  # a pipe, not spawn's socket
    assert "fatal: refusing to run as root" in read_log(directory / "log")
    assert not (directory / "db.lmdb").exists()


def created_files(directory: pathlib.Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()
            if p.is_file() and not p.name.endswith(".cf")}


def run_with_umask(mask: int, argv, data: bytes):
    old = os.umask(mask)
    try:
        return run(argv, data)
    finally:
        os.umask(old)


def test_database_file_is_created_0600_whatever_the_umask(tmp_path):
    # Postfix never reads the database (issue 15: any local user could read
    # every correspondent pair, and block its writers with a shared lock);
    # the tables smtpd reads: test_store.py.
    for mask in (0o000, 0o022, 0o077):
        directory = home(tmp_path / ("m%03o" % mask))
        cf = settings(directory)
        assert run_with_umask(mask, command(cf), triple_request(1)).returncode == 0
        assert stat.S_IMODE((directory / "db.lmdb").stat().st_mode) == 0o600


def test_log_file_is_created_0644_or_stricter_under_umask_000(tmp_path):
    # spawn(8) children inherit the umask of the Postfix master; a log
    # file that others may write lets them forge or erase log lines.
    directory = home(tmp_path / "umask0")
    cf = settings(directory)
    assert run_with_umask(0, command(cf), triple_request(1)).returncode == 0
    modes = created_files(directory)
    assert modes["db.lmdb"] == 0o600
    loose = {name: oct(mode) for name, mode in modes.items() if mode & 0o133}
    assert loose == {}, "files created looser than 0644: %r" % loose


def secret_setting() -> str | None:
    names = [name for name in config.SETTINGS if "secret" in name]
    return names[0] if names else None


@pytest.mark.skipif(secret_setting() is None,
                    reason="no secret file setting yet (privacy mode, issue 3)")
def test_secret_file_is_created_0600_and_a_readable_one_is_refused(tmp_path):
    directory = home(tmp_path / "secret")
    name = secret_setting()[len("greylist_"):]
    extra = {name: str(directory / "hmac.secret")}
    if "greylist_privacy" in config.SETTINGS:
        extra["privacy"] = "yes"
    cf = settings(directory, **extra)
    done = run_with_umask(0, command(cf), triple_request(1))
    assert (done.returncode, done.stderr) == (0, b"")
    assert split_replies(done.stdout)[0].startswith("DEFER_IF_PERMIT")
    mode = stat.S_IMODE((directory / "hmac.secret").stat().st_mode)
    assert mode & 0o077 == 0, oct(mode)
    assert warnings(read_log(directory / "log")) == []
    # A secret that others can read is not used silently.
    os.chmod(directory / "hmac.secret", 0o644)
    (directory / "log").unlink()
    done = run(command(cf), triple_request(2))
    assert (done.returncode, done.stderr) == (0, b"")
    log = read_log(directory / "log")
    assert any(str(directory / "hmac.secret") in line for line in log.splitlines()
               if "warning:" in line or "fatal:" in line), log


# Calls that would hand data to a shell, an interpreter or a deserialiser.
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "execfile", "input"}
FORBIDDEN_ATTRIBUTES = {
    ("os", "system"), ("os", "popen"), ("os", "execl"), ("os", "execlp"),
    ("os", "execv"), ("os", "execvp"), ("os", "execve"), ("os", "spawnl"),
    ("os", "spawnv"), ("os", "posix_spawn"), ("os", "posix_spawnp"),
    ("pickle", "load"), ("pickle", "loads"), ("marshal", "loads"), ("yaml", "load"),
    ("importlib", "import_module"), ("subprocess", "getoutput"),
    ("subprocess", "getstatusoutput")}
FORBIDDEN_MODULES = {"pickle", "shelve", "marshal", "dbm", "yaml", "commands", "pty"}


def scan(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        where = "%s:%d" % (path.name, getattr(node, "lineno", 0))
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) \
                else [node.module or ""]
            found += ["%s: imports %s" % (where, n) for n in names
                      if n.split(".")[0] in FORBIDDEN_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
            found.append("%s: calls %s()" % (where, func.id))
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                and (func.value.id, func.attr) in FORBIDDEN_ATTRIBUTES:
            found.append("%s: calls %s.%s()" % (where, func.value.id, func.attr))
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant)
                                               and keyword.value.value is False):
                found.append("%s: shell=..." % where)
        # subprocess with a command line built as a string.
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                and func.value.id == "subprocess" and node.args \
                and isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)):
            found.append("%s: subprocess.%s() without an argument list" % (where, func.attr))
    return found


def test_no_input_reaches_a_shell_eval_or_deserialiser():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 10
    found = [problem for path in files for problem in scan(path)]
    assert found == []


def test_the_scanner_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os, pickle, subprocess\neval(x)\nos.system(c)\n"
                   "subprocess.run(c, shell=True)\nsubprocess.call('ls ' + x)\n")
    assert len(scan(bad)) == 5


def test_shell_metacharacters_in_requests_run_nothing(tmp_path):
    directory = home(tmp_path / "meta")
    cf = settings(directory)
    canary = directory / "pwned"
    hostile = ["$(touch %s)" % canary, "`touch %s`" % canary, "; touch %s" % canary,
               "| touch %s" % canary, "__import__('os').system('touch %s')" % canary,
               "{0.__class__}", "%s%n%x", "${seconds_left}"]
    data = b""
    for n, text in enumerate(hostile):
        for field in ("sender", "recipient", "helo_name", "client_name", "instance"):
            data += (b"request=smtpd_access_policy\nprotocol_state=RCPT\n"
                     b"client_address=192.0.2.%d\nsender=a@b\nrecipient=c@d\n%s=%s\n\n"
                     % (n, field.encode(), text.encode()))
    done = run(command(cf), data, env=environment())
    assert (done.returncode, done.stderr) == (0, b"")
    assert len(split_replies(done.stdout)) == len(hostile) * 5
    assert not canary.exists()
    assert "Traceback" not in read_log(directory / "log")
