"""greylistd's correspondent learners: the socketmap as postmap speaks it,
the outbound policy, many connections at once, and bad input."""

import socket
import subprocess
import threading
import time

import pytest

from greylist.stores.lmdb import LmdbStore
from tests import daemon


def netstring(text: str) -> bytes:
    data = text.encode()
    return b"%d:%s," % (len(data), data)


@pytest.fixture
def learner(tmp_path):
    extra = ("greylist_socketmap_listen = unix:%s\ngreylist_outbound_listen = unix:%s\n"
             "greylist_local_domains = example.com\ngreylist_outbound_require_sasl = no\n"
             % (tmp_path / "learn", tmp_path / "out"))
    with daemon.start(tmp_path, extra) as running:
        yield running


def connect(path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(daemon.IO_TIMEOUT_S)
    sock.connect(str(path))
    return sock


def receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    for _ in range(1000):
        if len(data) >= size:
            break
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def wait_for_log(learner, text: str, timeout: float = 10) -> bool:
    """Whether text is in the learner's log within timeout (its lines
    follow the reply: the write is committed first)."""
    deadline = time.monotonic() + timeout
    while text not in learner.log():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_postmap_queries_the_daemon_and_then_reads_what_it_learned(learner, tmp_path, postmap):
    # Each postmap -q is a connection of its own: a recipient with no
    # sender looked up before it (as for the null sender) teaches nothing.
    result = subprocess.run([postmap, "-q", "Bob+Tag@Remote.TEST",
                             "socketmap:unix:%s:rcpt" % (tmp_path / "learn")],
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (1, "")
    table = "lmdb:%s-correspondents" % learner.database
    result = subprocess.run([postmap, "-q", "bob@remote.test", table],
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (1, "")
    # A sender, then the recipient, on one connection: learned, and
    # postmap reads the table.
    with connect(tmp_path / "learn") as sock:
        for lookup in ("sender alice@example.com", "rcpt Bob+Tag@Remote.TEST"):
            sock.sendall(netstring(lookup))
            assert receive(sock, 12) == b"9:NOTFOUND ,"
    assert wait_for_log(learner, "learn: correspondent=Bob+Tag@Remote.TEST new")
    result = subprocess.run([postmap, "-q", "bob@remote.test", table],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip().isdigit()


def test_a_framing_error_closes_only_its_own_connection(learner, tmp_path):
    good = connect(tmp_path / "learn")
    bad = connect(tmp_path / "learn")
    try:
        good.sendall(netstring("sender alice@example.com"))
        assert receive(good, 12) == b"9:NOTFOUND ,"
        bad.sendall(b"12:rcpt x@y.test;")
        assert bad.recv(100) == b""
        good.sendall(netstring("rcpt bob@remote.test"))
        assert receive(good, 12) == b"9:NOTFOUND ,"
    finally:
        good.close()
        bad.close()
    assert "terminating comma; disconnecting without a reply" in learner.log()
    pairs = dict(LmdbStore(str(learner.database)).items())
    assert b"@alice@example.com/bob@remote.test" in pairs


def test_50_connections_learn_their_own_pairs(learner, tmp_path):
    errors = []

    def one(n: int) -> None:
        try:
            sock = connect(tmp_path / "learn")
            try:
                for request in ("sender user%d@example.com" % n,
                                "rcpt peer%d@remote.test" % n, "rcpt common@remote.test"):
                    sock.sendall(netstring(request))
                    if receive(sock, 12) != b"9:NOTFOUND ,":
                        errors.append(n)
            finally:
                sock.close()
        except OSError as exc:
            errors.append(exc)
    threads = [threading.Thread(target=one, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    pairs = {k for k, _ in LmdbStore(str(learner.database)).items()}
    for n in range(50):
        assert b"@user%d@example.com/peer%d@remote.test" % (n, n) in pairs
        assert b"@user%d@example.com/common@remote.test" % n in pairs
    table = {k for k, _ in LmdbStore(str(learner.database) + "-correspondents").items()}
    assert len(table) == 51


def test_the_outbound_policy_learns_at_end_of_message(learner, tmp_path):
    base = ("request=smtpd_access_policy\ninstance=7\nsender=alice@example.com\n"
            "client_address=127.0.0.1\n")
    sock = connect(tmp_path / "out")
    try:
        for tail in ("protocol_state=RCPT\nrecipient=x1@r.test\n",
                     "protocol_state=RCPT\nrecipient=x2@r.test\n",
                     "protocol_state=END-OF-MESSAGE\nrecipient=\nrecipient_count=2\n"):
            sock.sendall((base + tail + "\n").encode())
            assert receive(sock, 14) == b"action=DUNNO\n\n"
    finally:
        sock.close()
    pairs = {k for k, _ in LmdbStore(str(learner.database)).items()}
    assert {b"@alice@example.com/x1@r.test", b"@alice@example.com/x2@r.test"} <= pairs
    # And the inbound policy of the same daemon passes the reply.
    reply = learner.ask(b"request=smtpd_access_policy\nprotocol_state=RCPT\n"
                        b"client_address=192.0.2.1\nsender=x2@r.test\n"
                        b"recipient=alice@example.com\n\n")
    assert reply == b"action=DUNNO\n\n"
    assert "reason=correspondent" in learner.log()
