"""Store failures: the program keeps answering, fails open, logs once, recovers.

A read-only file system, permission denied (as user nobody), a full disk
(a small tmpfs), an injected commit failure, a corrupt, truncated or
foreign-format file, and a database deleted or replaced while running.
Each gets one clear warning and greylist_failure_action (DUNNO unless
configured) for every request, never a disconnect: under spawn(8) a
disconnect or a crash makes Postfix answer 451 4.3.5 for all mail.
"""

import contextlib
import os
import pathlib
import random
import shutil
import subprocess
import sys
import tempfile
import time

import lmdb
import pytest

from greylist.stores.base import StoreError
from greylist.stores.lmdb import LmdbStore
from tests.postfix_instance import install_runtime
from tests.reliability import (SEED, SIZES, Client, command, decisions, environment,
                               fast_reopen_command, home, postmap_list, read_log,
                               record_figures, run, settings, split_replies,
                               triple_request, warnings)

FAILURE_TAIL = "answering DUNNO (greylist_failure_action) until the database works again"


def requests(first: int, count: int) -> bytes:
    return b"".join(triple_request(n) for n in range(first, first + count))


def assert_fails_open(done, directory, count, *words, log="log"):
    """count DUNNO replies, status 0, nothing on stderr, one warning with words."""
    assert (done.returncode, done.stderr) == (0, b""), (done.returncode, done.stderr)
    assert split_replies(done.stdout) == ["DUNNO"] * count
    text = read_log(directory / log)
    found = warnings(text)
    assert len(found) == 1, text
    assert found[0].endswith(FAILURE_TAIL), found
    for word in words:
        assert word in found[0], (word, found[0])
    assert [d[2] for d in decisions(text)] == ["database-failure"] * count
    return found[0]


@contextlib.contextmanager
def tmpfs(path: pathlib.Path, size_kib: int):
    """Mount a small tmpfs at path; unmount it afterwards."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%dk,mode=0755" % size_kib,
                           "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (%s); the injected-fault test covers "
                    "commit failures" % done.stderr.strip())
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_read_only_file_system_fails_open_with_one_warning(tmp_path):
    directory = home(tmp_path / "conf")
    with tmpfs(tmp_path / "ro", 1024) as fs:
        cf = settings(directory, database=str(fs / "db"))
        assert run(command(cf), requests(0, 1)).stdout.startswith(b"action=DEFER")
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        (directory / "log").unlink()
        done = run(command(cf), requests(1, 5))
        assert_fails_open(done, directory, 5, str(fs / "db.lmdb"), "Read-only file system")


def test_full_disk_fails_open_keeps_the_database_and_recovers(tmp_path, postmap):
    directory = home(tmp_path / "conf")
    with tmpfs(tmp_path / "small", 256) as fs:
        cf = settings(directory, database=str(fs / "db"))
        assert run(command(cf), requests(0, 50)).returncode == 0
        before = postmap_list(postmap, str(fs / "db"))
        # Fill the file system to the last block.
        fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):
                for _ in range(256 * 1024 // 4096 + 1):  # the tmpfs's size, bounded
                    os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
        (directory / "log").unlink()
        client = Client(fast_reopen_command(cf, 0.5))
        try:
            actions = [client.ask(triple_request(n)) for n in range(100, 400)]
            full = actions.index("DUNNO")
            assert all(a.startswith("DEFER_IF_PERMIT") for a in actions[:full])
            assert set(actions[full:]) == {"DUNNO"}
            # The database is intact and keeps everything committed.
            after = postmap_list(postmap, str(fs / "db"))
            assert set(before) <= set(after) and len(after) >= len(before) + full
            os.unlink(fs / "filler")
            time.sleep(0.6)
            assert client.ask(triple_request(1000)).startswith("DEFER_IF_PERMIT")
        finally:
            status, err = client.close()
    assert (status, err) == (0, b"")
    text = read_log(directory / "log")
    assert len(warnings(text)) == 1 and warnings(text)[0].endswith(FAILURE_TAIL)
    # LMDB says "Input/output error" for a short write (issue 15: a full
    # disk was reported as that alone).
    assert "(the file system is full)" in warnings(text)[0]
    record_figures("full-disk", tmpfs_kib=256, accepted_before_full=full,
                   failed_open=300 - full, recovered=True, warning=warnings(text)[0][-160:])


def test_injected_commit_failure_fails_open_then_recovers(tmp_path):
    directory = home(tmp_path / "inject")
    cf = settings(directory)
    argv = [sys.executable, "-m", "tests.reliability.faults", "ENOSPC", "5", "1", "0.3",
            "--", "-c", str(cf)]
    client = Client(argv)
    try:
        actions = [client.ask(triple_request(n)) for n in range(8)]
        time.sleep(0.4)
        actions += [client.ask(triple_request(n)) for n in range(8, 10)]
    finally:
        status, err = client.close()
    assert (status, err) == (0, b"")
    # 5 commits, 1 failure, 2 answers while the store waits to reopen,
    # then (reopened after 0.3 s) commits again.
    assert [a.split()[0] for a in actions] == ["DEFER_IF_PERMIT"] * 5 + ["DUNNO"] * 3 \
        + ["DEFER_IF_PERMIT"] * 2
    found = warnings(read_log(directory / "log"))
    assert len(found) == 1 and "No space left on device" in found[0] \
        and found[0].endswith(FAILURE_TAIL)


# Permission denied: root passes every permission check, so run as nobody.
USER = "nobody"


@pytest.fixture(scope="module")
def as_nobody():
    """argv prefix that runs this checkout's greylist as user nobody."""
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser to run as %s" % USER)
    root = pathlib.Path(tempfile.mkdtemp(prefix="greylist-nobody-"))
    os.chmod(root, 0o755)
    try:
        prefix = install_runtime(root, USER)
        if isinstance(prefix, str):
            pytest.skip(prefix)
        yield root, ["runuser", "-u", USER, "--", *prefix, "-m", "greylist"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("case", ["cannot-create", "cannot-write"])
def test_permission_denied_fails_open_with_one_warning(as_nobody, case):
    root, argv = as_nobody
    directory = pathlib.Path(tempfile.mkdtemp(dir=root))
    os.chmod(directory, 0o755)
    logs = directory / "logs"
    logs.mkdir()
    shutil.chown(logs, USER)
    database = directory / "db"
    if case == "cannot-write":
        store = LmdbStore(str(database))
        store.put(b"k", b"1:1:1:1:pending")
        store.close()
    cf = directory / "greylist.cf"
    cf.write_text("greylist_log = %s/log\ngreylist_database = %s\n" % (logs, database))
    os.chmod(cf, 0o644)
    done = subprocess.run(argv + ["-c", str(cf)], input=requests(0, 3), capture_output=True,
                          timeout=60)
    assert_fails_open(done, logs, 3, "Permission denied", str(database) + ".lmdb")
    assert os.path.exists(str(database) + ".lmdb") == (case == "cannot-write")


def write_v3(path: str) -> None:
    env = lmdb.open(path, subdir=False, lock=False, lib_version=1)
    with env.begin(write=True) as txn:
        txn.put(b"k\0", b"v\0")
    env.close()


def build_database(name: str, entries: int = 3000) -> bytes:
    store = LmdbStore(name)
    for start in range(0, entries, 500):
        store.put_many([(b"10.%d.%d/from-t%06d@example.org/rcpt-%06d@example.net"
                         % (i // 256 % 256, i % 256, i, i), b"1:1700000000:1700000000:1:pending")
                        for i in range(start, min(entries, start + 500))])
    store.close()
    with open(name + ".lmdb", "rb") as handle:
        return handle.read()


@pytest.mark.parametrize("kind", ["garbage", "format-v3", "empty-meta"])
def test_corrupt_or_foreign_file_fails_open_and_is_left_untouched(tmp_path, kind):
    directory = home(tmp_path / kind)
    cf = settings(directory)
    path = str(directory / "db.lmdb")
    if kind == "garbage":
        pathlib.Path(path).write_bytes(bytes(range(256)) * 64)
        words = ["not an LMDB 0.9 database"]
    elif kind == "format-v3":
        if int(lmdb.__version__.split(".")[0]) < 3:
            pytest.skip("py-lmdb < 3 cannot write LMDB format v3")
        write_v3(path)
        words = ["format v3", "move the file aside"]
    else:
        pathlib.Path(path).write_bytes(b"\0" * 8192)
        words = ["not an LMDB 0.9 database"]
    content = pathlib.Path(path).read_bytes()
    done = run(command(cf), requests(0, 4))
    assert_fails_open(done, directory, 4, path, *words)
    assert pathlib.Path(path).read_bytes() == content


def test_failure_action_is_configurable(tmp_path):
    directory = home(tmp_path / "action")
    cf = settings(directory, failure_action="DEFER_IF_PERMIT 4.3.0 Greylisting database "
                                            "trouble, please try again later")
    (directory / "db.lmdb").write_bytes(b"not a database" * 100)
    done = run(command(cf), requests(0, 3))
    assert (done.returncode, done.stderr) == (0, b"")
    assert split_replies(done.stdout) == ["DEFER_IF_PERMIT 4.3.0 Greylisting database "
                                          "trouble, please try again later"] * 3
    assert len(warnings(read_log(directory / "log"))) == 1


def test_truncated_database_fails_open_instead_of_dying_of_sigbus(tmp_path):
    # A database cut short (a copy interrupted, a full disk during a
    # restore) still has valid meta pages that point past the end of the
    # file. LMDB maps 16 MiB and reads there: SIGBUS kills the process
    # without a reply or a log line, so under spawn Postfix answers 451.
    directory = home(tmp_path / "truncated")
    cf = settings(directory)
    data = build_database(str(directory / "db"))
    (directory / "db.lmdb").write_bytes(data[:len(data) // 2])
    done = run(command(cf), requests(0, 3))
    assert done.returncode >= 0, "killed by signal %d" % -done.returncode
    assert_fails_open(done, directory, 3, str(directory / "db.lmdb"))


@pytest.mark.parametrize("kind", ["first-page", "zeros"])
def test_a_database_whose_creation_was_cut_short_is_started_afresh(tmp_path, postmap, kind):
    # Review: a full disk during LMDB's first write left 4096 bytes (one
    # of its two meta pages), and greylist refused the file for ever ("not
    # an LMDB file", fail-open) after the space came back. Shorter than
    # two pages it holds no entry: it is emptied under the lock, with a
    # warning, and used.
    directory = home(tmp_path / kind)
    cf = settings(directory)
    whole = build_database(str(directory / "whole"), entries=1)
    (directory / "db.lmdb").write_bytes(whole[:4096] if kind == "first-page" else b"\0" * 4096)
    os.chmod(directory / "db.lmdb", 0o600)
    done = run(command(cf), requests(0, 2))
    assert done.returncode == 0 and done.stderr == b"", done
    replies = split_replies(done.stdout)
    assert len(replies) == 2 and all(r.startswith("DEFER_IF_PERMIT") for r in replies), done
    found = warnings(read_log(directory / "log"))
    assert len(found) == 1 and "starting it afresh" in found[0], found
    keys = [k for k, _ in postmap_list(postmap, str(directory / "db"))]
    assert any("rcpt-000001@" in k for k in keys)


def test_a_short_foreign_file_is_never_emptied(tmp_path):
    directory = home(tmp_path / "foreign")
    cf = settings(directory)
    (directory / "db.lmdb").write_bytes(b"not a database, someone's notes\n")
    os.chmod(directory / "db.lmdb", 0o600)
    done = run(command(cf), requests(0, 1))
    assert split_replies(done.stdout) == ["DUNNO"]
    assert (directory / "db.lmdb").read_bytes() == b"not a database, someone's notes\n"


def corrupt_variants(data: bytes, count: int):
    """Seeded copies of data with bytes of one non-meta page overwritten."""
    rng = random.Random(SEED)
    pages = len(data) // 4096
    for _ in range(count):
        damaged = bytearray(data)
        page = rng.randrange(2, pages)
        for _ in range(rng.choice([1, 8, 64])):
            damaged[page * 4096 + rng.randrange(4096)] = rng.randrange(256)
        yield page, bytes(damaged)


def test_database_with_corrupt_pages_never_kills_or_hangs_the_program(tmp_path):
    directory = home(tmp_path / "pages")
    cf = settings(directory)
    data = build_database(str(directory / "base"))
    outcomes, problems = {}, []
    for number, (page, damaged) in enumerate(corrupt_variants(data, SIZES["corrupt_variants"])):
        (directory / "db.lmdb").write_bytes(damaged)
        probe = requests(0, 2) + b"".join(triple_request(n) for n in (5, 777, 2999))
        try:
            done = run(command(cf), probe, timeout=20)
        except subprocess.TimeoutExpired:
            problems.append("variant %d (page %d): no answer in 20 s" % (number, page))
            continue
        if done.returncode < 0:
            problems.append("variant %d (page %d): killed by signal %d"
                            % (number, page, -done.returncode))
            outcomes["signal"] = outcomes.get("signal", 0) + 1
            continue
        replies = split_replies(done.stdout)
        assert done.returncode == 0 and done.stderr == b"" and len(replies) == 5, done
        outcome = "failed-open" if "DUNNO" in replies else "answered"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    record_figures("corrupt-pages", variants=SIZES["corrupt_variants"], outcomes=outcomes,
                   problems=problems[:20])
    assert not problems, problems


@pytest.mark.parametrize("how", ["truncated", "copied-over"])
def test_database_cut_or_copied_over_in_place_while_running_is_no_sigbus(tmp_path, postmap,
                                                                          how):
    # Review: the open file truncated, or an older copy written over it
    # with cp (the same inode, so no "replaced"), while the program runs:
    # LMDB read the pages that were gone through its map, and the process
    # died of SIGBUS, without a reply or a log line. Under the lock the
    # file is now seen to be shorter, and opened (and checked) again.
    directory = home(tmp_path / how)
    cf = settings(directory)
    client = Client(command(cf))
    try:
        assert client.ask(triple_request(1)).startswith("DEFER_IF_PERMIT")
        backup = (directory / "db.lmdb").read_bytes()
        for n in range(2, 400):
            assert client.ask(triple_request(n)).startswith("DEFER_IF_PERMIT")
        size = os.path.getsize(directory / "db.lmdb")
        assert size > len(backup)
        if how == "truncated":
            os.truncate(directory / "db.lmdb", size // 2)
        else:
            with open(directory / "db.lmdb", "r+b") as handle:  # as cp does
                handle.truncate(0)
                handle.write(backup)
        for n in (1, 399, 400):
            action = client.ask(triple_request(n))
            assert action.startswith(("DEFER_IF_PERMIT", "DUNNO")), action
    finally:
        status, err = client.close()
    assert (status, err) == (0, b""), "killed by signal %d" % -status if status < 0 else err
    text = read_log(directory / "log")
    if how == "truncated":
        # Damaged: failing open, with the recovery named.
        assert "is truncated" in text and FAILURE_TAIL in text, text
    else:
        # An older but whole copy: opened again and used.
        assert "was truncated or rewritten in place; opening it again" in text, text
        keys = [k for k, _ in postmap_list(postmap, str(directory / "db"))]
        assert any("rcpt-000400@" in k for k in keys)


def test_garbage_written_over_a_live_database_is_named_as_damage(tmp_path):
    # Review: the warning was LMDB's "mdb_env_set_mapsize: Cannot allocate
    # memory" (a map size read from the garbage), naming neither the damage
    # nor the recovery.
    directory = home(tmp_path / "garbage")
    cf = settings(directory)
    client = Client(command(cf))
    try:
        for n in range(50):
            assert client.ask(triple_request(n)).startswith("DEFER_IF_PERMIT")
        size = os.path.getsize(directory / "db.lmdb")
        with open(directory / "db.lmdb", "r+b") as handle:
            handle.write(random.Random(SEED).randbytes(size))
        assert client.ask(triple_request(99)).startswith("DUNNO")
    finally:
        status, err = client.close()
    assert (status, err) == (0, b""), status
    found = warnings(read_log(directory / "log"))
    assert found and "is not an LMDB 0.9 database" in found[0] \
        and "move the file aside" in found[0], found


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_database_deleted_or_replaced_while_running_is_reopened_with_one_log_line(
        tmp_path, postmap, how):
    directory = home(tmp_path / how)
    cf = settings(directory)
    other = settings(directory, "other.cf", log="other.log", database=str(directory / "new"),
                     delay="0")
    # In the replacement, triple 7 has passed already.
    assert run(command(other), requests(7, 1) * 2).returncode == 0
    client = Client(command(cf))
    try:
        assert client.ask(triple_request(1)).startswith("DEFER_IF_PERMIT")
        if how == "deleted":
            os.unlink(directory / "db.lmdb")
        else:
            os.rename(directory / "new.lmdb", directory / "db.lmdb")
        action = client.ask(triple_request(7))
        assert action.startswith("DEFER_IF_PERMIT" if how == "deleted" else "DUNNO")
        assert client.ask(triple_request(8)).startswith("DEFER_IF_PERMIT")
    finally:
        status, err = client.close()
    assert (status, err) == (0, b"")
    keys = [k for k, _ in postmap_list(postmap, str(directory / "db"))]
    assert any("rcpt-000008@" in k for k in keys)  # written to the file at the path
    assert not any("rcpt-000001@" in k for k in keys)
    text = read_log(directory / "log")
    # The administrator learns that the process switched files: one line
    # that names the database, besides the decision lines.
    notes = [line for line in text.splitlines()
             if "action=" not in line and str(directory / "db.lmdb") in line]
    assert len(notes) == 1, text


SCAN = """
import sys
from greylist.stores.base import StoreError
from greylist.stores.base import StoreError
from greylist.stores.lmdb import LmdbStore
store = LmdbStore(sys.argv[1], readonly=True)
try:
    print(sum(1 for _ in store.items()))
except StoreError as exc:
    print("StoreError", exc)
"""


def test_scan_of_a_database_with_corrupt_pages_ends(tmp_path):
    # Cleanup walks the database with Store.scan() under a shared lock: a
    # walk that never ends holds that lock forever and blocks every writer.
    directory = home(tmp_path / "scan")
    data = build_database(str(directory / "base"))
    problems = []
    for number, (page, damaged) in enumerate(corrupt_variants(data, SIZES["corrupt_variants"])):
        (directory / "db.lmdb").write_bytes(damaged)
        try:
            done = subprocess.run([sys.executable, "-c", SCAN, str(directory / "db")],
                                  capture_output=True, text=True, timeout=20,
                                  env=environment())
        except subprocess.TimeoutExpired:
            problems.append("variant %d (page %d): scan still running after 20 s"
                            % (number, page))
            continue
        if done.returncode != 0:
            problems.append("variant %d (page %d): status %d %s"
                            % (number, page, done.returncode, done.stderr[-200:]))
    # LMDB 0.9 trusts its pages: some damage to interior pages makes it
    # fail an assertion and abort (greylist(8) BUGS; the documented
    # safeguard is smtpd_policy_service_default_action = DUNNO).
    aborts = [p for p in problems if "status -6" in p and "Assertion" in p]
    others = [p for p in problems if p not in aborts]
    assert not others, others
    if aborts:
        pytest.xfail("known limitation, LMDB assertion abort: %s" % aborts)


def test_an_error_within_the_reopen_delay_still_names_its_cause(tmp_path):
    # Review: within the reopen delay (10 s) every request failed with
    # "unavailable after an earlier error; retrying in at most 10 s", and
    # the warning repeated once a minute was that text nearly always: after
    # the first minute of an outage the log no longer said what was wrong.
    directory = home(tmp_path / "data")
    store = LmdbStore(str(directory / "db"), reopen_delay_s=60, same_file_interval_s=0)
    store.put(b"k", b"1:1:1:1:pending")
    shutil.rmtree(directory)
    errors = []
    for _ in range(2):
        with pytest.raises(StoreError) as caught:
            store.get(b"k")
        errors.append(str(caught.value))
    store.close()
    cause = "database directory %s: No such file or directory" % directory
    assert errors[0] == cause
    assert "unavailable after an earlier error" in errors[1] and cause in errors[1], errors
