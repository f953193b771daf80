"""The files of a unix listener: the socket directory, the lock file.

Found in review (2026-12-01): greylistd, started as root, took a sticky
world-writable directory (/tmp) for its socket, opened an existing lock
file whoever owned it and however many names it had, and then fchown()ed
it to greylist_user: a hard link planted there as the lock file made root
give the link's target (any file of the same file system) to that user.
listener.bind() is called as greylistd calls it before the privilege drop.
"""

import os
import pwd
import stat

import pytest

from greylist.transports.listener import ListenerError, bind

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
NOBODY = pwd.getpwnam("nobody")


def bound(directory, uid=-1, gid=-1, mode=0o660):
    listeners = bind(("unix:%s/policy" % directory,), mode, uid, gid)
    for listener in listeners:
        listener.sock.close()
        os.close(listener.lock_fd)
    return listeners


@pytest.fixture
def directory(tmp_path):
    path = tmp_path / "sockets"
    path.mkdir()
    os.chmod(path, 0o755)
    return path


@pytest.mark.parametrize("mode, who", [(0o1777, "anyone"), (0o777, "anyone"),
                                       (0o775, "its group")], ids=["1777", "777", "775"])
def test_a_directory_that_others_can_write_is_refused(directory, mode, who):
    os.chmod(directory, mode)
    with pytest.raises(ListenerError, match="refusing socket directory .*: %s can write it"
                       % who):
        bound(directory)
    assert list(directory.iterdir()) == []


@ROOT_ONLY
def test_a_directory_of_another_user_is_refused_unless_it_is_greylistds(directory):
    os.chown(directory, NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(ListenerError, match="belongs to uid %d" % NOBODY.pw_uid):
        bound(directory)
    assert list(directory.iterdir()) == []
    # The user greylistd drops to (greylist_user): the documented setup.
    bound(directory, NOBODY.pw_uid, NOBODY.pw_gid)
    st = os.lstat(directory / "policy")
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    lock = os.lstat(directory / "policy.lock")
    assert (lock.st_uid, stat.S_IMODE(lock.st_mode)) == (NOBODY.pw_uid, 0o600)


@ROOT_ONLY
def test_a_hard_link_as_the_lock_file_is_refused_and_its_target_untouched(directory):
    victim = directory.parent / "victim"
    victim.write_text("root's\n")
    os.chmod(victim, 0o600)
    os.link(victim, directory / "policy.lock")
    with pytest.raises(ListenerError, match="refusing lock file .*2 links"):
        bound(directory, NOBODY.pw_uid, NOBODY.pw_gid)
    st = os.stat(victim)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert not (directory / "policy").exists()


@ROOT_ONLY
def test_a_lock_file_of_another_user_is_refused(directory):
    lock = directory / "policy.lock"
    lock.write_text("")
    os.chown(lock, NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(ListenerError, match="refusing lock file .*owner uid %d"
                       % NOBODY.pw_uid):
        bound(directory)
    # Its owner is the user greylistd drops to: a lock file of its own,
    # from an earlier start.
    bound(directory, NOBODY.pw_uid, NOBODY.pw_gid)


def test_a_symbolic_link_fifo_or_directory_as_the_lock_file_is_refused(directory):
    target = directory.parent / "elsewhere"
    (directory / "policy.lock").symlink_to(target)
    with pytest.raises(ListenerError, match="cannot open .*symbolic link"):
        bound(directory)
    assert not target.exists()
    (directory / "policy.lock").unlink()
    os.mkfifo(directory / "policy.lock", 0o600)
    with pytest.raises(ListenerError, match="refusing lock file"):
        bound(directory)
    (directory / "policy.lock").unlink()
    (directory / "policy.lock").mkdir()
    with pytest.raises(ListenerError, match="policy.lock"):
        bound(directory)


def test_a_fresh_start_and_a_restart_in_a_safe_directory_work(directory):
    bound(directory, mode=0o600)
    st = os.lstat(directory / "policy")
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(directory / "policy.lock").st_mode) == 0o600
    bound(directory, mode=0o660)  # the old socket is replaced
    assert stat.S_IMODE(os.lstat(directory / "policy").st_mode) == 0o660


def test_the_socket_is_never_wider_than_its_mode_even_as_it_is_bound(directory, monkeypatch):
    # Bound under umask 0 it would be 0777 until the chmod: any local
    # user could connect in between and keep the connection.
    import socket
    from greylist.transports import listener
    seen = []

    class Watched(socket.socket):
        def bind(self, address):
            super().bind(address)
            seen.append(stat.S_IMODE(os.lstat(address).st_mode))

    monkeypatch.setattr(listener.socket, "socket", Watched)
    old = os.umask(0)
    try:
        bound(directory)
    finally:
        os.umask(old)
    assert seen == [0]
    assert stat.S_IMODE(os.lstat(directory / "policy").st_mode) == 0o660


def test_the_default_socket_mode_lets_only_owner_and_group_connect():
    # Postfix connects as its own user and group (greylist_socket_group).
    from greylist.config import Config
    assert Config().socket_mode == 0o660


def test_systemd_sockets_of_another_process_are_not_taken_and_ours_clear_the_variables():
    # LISTEN_PID names the process the sockets are for (sd_listen_fds(3)):
    # a child that inherited the variables must not take descriptor 3.
    import os
    from greylist.transports.listener import inherited
    theirs = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "policy"}
    assert inherited(theirs) == []
    ours = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0", "LISTEN_FDNAMES": "",
            "PATH": "/bin"}
    assert inherited(ours) == [] and ours == {"PATH": "/bin"}


def test_sd_notify_reaches_a_socket_in_the_abstract_namespace(monkeypatch):
    # systemd may set NOTIFY_SOCKET=@NAME: "@" stands for the leading NUL.
    import os
    import socket
    from greylist.cli.greylistd import _notify_socket
    name = "greylist-test-notify-%d" % os.getpid()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        server.bind("\0" + name)
        server.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        sock = _notify_socket()
        assert sock is not None and "NOTIFY_SOCKET" not in os.environ
        sock.send(b"READY=1")
        assert server.recv(100) == b"READY=1"
        sock.close()
    finally:
        server.close()
