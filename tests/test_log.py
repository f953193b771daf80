"""Tests for greylist.log: the file target's format, modes and rotation."""

import os
import stat
import time

import pytest

from greylist import log as log_module
from greylist.log import MAX_MESSAGE, Log


@pytest.fixture
def clock():
    """The log's injected clock, set by the test (epoch seconds in [0])."""
    return Clock()


class Clock(list):
    def __init__(self):
        super().__init__([1_700_000_000.0])

    def __call__(self):
        return self[0]


def lines(path) -> list[str]:
    return path.read_bytes().decode("utf-8").splitlines()


def test_file_lines_have_a_stamp_host_ident_and_pid(tmp_path, clock):
    path = tmp_path / "greylist.log"
    log = Log("greylist", str(path), clock=clock)
    log.info("action=DUNNO reason=known")
    log.warning("something odd")
    log.close()
    first, second = lines(path)
    assert first.endswith(" greylist[%d]: action=DUNNO reason=known" % os.getpid())
    assert second.endswith(": warning: something odd")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_one_record_per_message_and_surrogates_escaped(tmp_path, clock):
    path = tmp_path / "greylist.log"
    log = Log("greylist", str(path), clock=clock)
    log.info("a\nb sender=\udcff@example.org " + "x" * (2 * MAX_MESSAGE))
    log.close()
    (line,) = lines(path)
    assert ": a b sender=\\udcff@example.org x" in line
    assert len(line.partition(": ")[2]) == MAX_MESSAGE + 5  # "\\udcff" is 6 characters


def test_debug_lines_need_their_verbose_level(tmp_path, clock):
    path = tmp_path / "greylist.log"
    log = Log("greylist", str(path), verbose=1, clock=clock)
    log.debug(1, "level one")
    log.debug(2, "level two")
    log.close()
    assert [line.rpartition(": ")[2] for line in lines(path)] == ["level one"]


def test_a_rotated_file_is_replaced_within_a_second(tmp_path, clock):
    path = tmp_path / "greylist.log"
    log = Log("greylist", str(path), clock=clock)
    log.info("before")
    os.rename(path, tmp_path / "greylist.log.1")
    log.info("same second")  # The path is looked at once a second.
    clock[0] += 1
    log.info("after")
    log.close()
    assert [line.rpartition(": ")[2] for line in lines(tmp_path / "greylist.log.1")] == [
        "before", "same second"]
    assert [line.rpartition(": ")[2] for line in lines(path)] == ["after"]


@pytest.mark.parametrize("mask", [0o000, 0o077], ids=oct)
def test_the_log_file_is_created_0640_whatever_the_umask(tmp_path, clock, mask):
    # Found in review: under umask 077 the file was made 0600, not 0640
    # as log.py documents.
    path = tmp_path / "greylist.log"
    old = os.umask(mask)
    try:
        Log("greylist", str(path), clock=clock).info("a line")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_a_removed_file_is_created_again(tmp_path, clock):
    path = tmp_path / "greylist.log"
    log = Log("greylist", str(path), clock=clock)
    log.info("one")
    path.unlink()
    clock[0] += 1
    log.info("two")
    log.close()
    assert [line.rpartition(": ")[2] for line in lines(path)] == ["two"]


def test_an_unwritable_log_never_fails_the_caller(tmp_path, clock):
    log = Log("greylist", str(tmp_path / "missing-directory" / "greylist.log"), clock=clock)
    log.info("lost")  # No exception.
    log.warning("lost too")
    log.close()


def test_stamp_and_host_are_those_of_postfix_msg_logger(tmp_path, monkeypatch):
    # msg_logger.c: strftime "%b %d %H:%M:%S " (a zero-padded day), then
    # the first label of myhostname (issue 15).
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        path = tmp_path / "greylist.log"
        log = Log("greylist", str(path), clock=lambda: 1_733_062_170.0,  # 2024-12-01 14:09:30
                  host="mx.example.test")
        log.info("hello")
        log.close()
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert lines(path) == ["Dec 01 14:09:30 mx greylist[%d]: hello" % os.getpid()]


@pytest.mark.parametrize("host, shown", [("", os.uname().nodename.split(".")[0]),
                                         ("relay", "relay"), ("mx.example.test.", "mx")])
def test_host_is_the_setting_or_the_system_host_name(tmp_path, clock, host, shown):
    path = tmp_path / "greylist.log"
    log = Log("greylist", str(path), clock=clock, host=host)
    log.info("x")
    log.close()
    assert lines(path)[0].split(" ")[3] == shown


def test_a_file_that_logrotate_created_at_the_name_takes_the_lines(tmp_path, clock):
    # logrotate's "create": the old file renamed, a new one made at the
    # name at once; the lines go to the new one from the next second on.
    path = tmp_path / "greylist.log"
    log = Log("greylist", str(path), clock=clock)
    log.info("before")
    os.rename(path, tmp_path / "greylist.log.1")
    path.write_text("")
    clock[0] += 1
    log.info("after")
    log.close()
    assert [line.rpartition(": ")[2] for line in lines(tmp_path / "greylist.log.1")] == [
        "before"]
    assert [line.rpartition(": ")[2] for line in lines(path)] == ["after"]
