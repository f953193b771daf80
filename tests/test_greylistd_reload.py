"""greylistd's SIGHUP, found in review (2026-12-02): what a reload must
also change, and a SIGHUP before greylistd serves.

Real greylistd processes (tests/daemon.py), a real redis-server
(tests/redis_server.py); every wait is bounded; only processes started
here are stopped, by PID.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

from tests import daemon as daemons
from tests.redis_server import RedisServer
from tests.reliability import request

WAIT_S = 10.0


def wait_for(predicate, timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def has_open(pid: int, path: pathlib.Path) -> bool:
    """Whether process pid has the file path open (/proc/PID/fd)."""
    try:
        names = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, name)) == str(path):
                return True
        except OSError:
            continue
    return False


def short_site(prefix: str) -> pathlib.Path:
    site = pathlib.Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(site, 0o755)
    return site


def reload(daemon, old: str, new: str) -> None:
    text = daemon.settings_path.read_text()
    assert old in text
    daemon.settings_path.write_text(text.replace(old, new))
    done = daemon.log().count("reload: settings and whitelists read again")
    os.kill(daemon.pid, signal.SIGHUP)
    assert wait_for(lambda: daemon.log().count("reload: settings and whitelists read again")
                    > done), daemon.log()[-2000:]


def ask(daemon, client: str, sender: str, **attrs) -> bytes:
    with daemon.connect() as sock:
        sock.sendall(request(client, sender, "b@example.net", **attrs))
        sock.shutdown(socket.SHUT_WR)
        return daemons.receive_all(sock, WAIT_S)


def test_a_reload_gives_redis_the_new_lifetimes(tmp_path):
    # The expiry of each Redis write was built at start from the settings
    # then: a longer retry window reached the policy, not Redis's TTLs.
    site = short_site("grr")
    with RedisServer(site / "redis") as redis:
        redis.start()
        client = redis.client()
        try:
            extra = "greylist_database = %s\ngreylist_retry_window = 1h\n" % redis.unix_url
            with daemons.start(site, extra) as daemon:
                assert ask(daemon, "192.0.2.1", "a1@example.org").startswith(
                    b"action=DEFER_IF_PERMIT")
                reload(daemon, "greylist_retry_window = 1h", "greylist_retry_window = 5h")
                assert ask(daemon, "192.0.2.2", "a2@example.org").startswith(
                    b"action=DEFER_IF_PERMIT")
                ttls = {key: client.ttl(key) for key in client.scan_iter(match=b"*/b@example.net")}
                first = [t for k, t in ttls.items() if b"a1@example.org" in k]
                second = [t for k, t in ttls.items() if b"a2@example.org" in k]
                assert len(first) == len(second) == 1, ttls
                # expire_at: the first second at which cleanup would drop it (+1).
                assert 3500 <= first[0] <= 3601 and 17900 <= second[0] <= 18001, ttls
                assert daemon.stop() == 0
        finally:
            client.close()


def test_a_reload_into_domain_mode_works_after_the_privilege_drop():
    # greylistd imports after the drop only what it loaded before it: an
    # installation root alone can read (a Python under /root) made every
    # request with a client name fail once a reload turned domain mode on.
    site = short_site("grd")
    os.chown(site, 65534, 65534)
    with daemons.start(site, "greylist_client_match = pool\n", user="nobody") as daemon:
        reload(daemon, "greylist_client_match = pool", "greylist_client_match = domain")
        for i, name in enumerate(("mail.example.com", "mx.bücher.example", "unknown")):
            reply = ask(daemon, "192.0.2.%d" % (i + 1), "a@example.org", client_name=name)
            assert reply.startswith(b"action=DEFER_IF_PERMIT"), (name, reply)
        assert "internal error" not in daemon.log()
        assert daemon.stop() == 0


def test_a_shorter_cleanup_interval_takes_effect_at_the_reload():
    site = short_site("grc")
    # A new state file starts the interval: the first pass is a day away,
    # and the next check was set for then.
    with daemons.start(site, "greylist_cleanup_interval = 1d\n") as daemon:
        assert wait_for(lambda: (site / "db.cleanup").exists())
        time.sleep(1.5)  # greylistd's cleanup timer ticks once a second
        assert "cleanup: full" not in daemon.log()
        reload(daemon, "greylist_cleanup_interval = 1d", "greylist_cleanup_interval = 1s")
        assert wait_for(lambda: "cleanup: full" in daemon.log()), daemon.log()[-1500:]
        assert daemon.stop() == 0


def test_a_sighup_while_greylistd_starts_is_a_reload_not_its_end():
    # Its start held up by another process's lock on the database (the
    # trial commit waits greylist_lock_timeout, then fails open): a
    # SIGHUP then (a logrotate, say) killed it.
    site = short_site("grh")
    settings = daemons.write_settings(site, daemons.free_port(),
                                      "greylist_lock_timeout = 3s\n")
    from greylist.stores.lmdb import LmdbStore
    store = LmdbStore(str(site / "db"))
    store.open()
    store.close()
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'r+b'); "
            "fcntl.lockf(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(4)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(site / "db.lmdb")],
                              stdout=subprocess.PIPE)
    proc = None
    try:
        assert holder.stdout.readline() == b"held\n"
        proc = subprocess.Popen(daemons.command(settings), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=daemons.environment(), cwd=str(site))
        # Once greylistd has the database open, while the lock holds its
        # start up.
        assert wait_for(lambda: has_open(proc.pid, site / "db.lmdb")), proc.poll()
        log = site / "log"
        assert not (log.exists() and "serving" in log.read_text())
        os.kill(proc.pid, signal.SIGHUP)
        assert wait_for(lambda: log.exists() and "serving" in log.read_text()), proc.poll()
        assert proc.poll() is None
        assert wait_for(lambda: "reload: settings and whitelists read again" in log.read_text())
    finally:
        if proc is not None:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        holder.wait(timeout=10)
        holder.stdout.close()


def test_a_reload_gives_the_postscreen_callout_the_new_whitelist():
    # The administrator adds a client to greylist_whitelist_clients and
    # sends SIGHUP: the callout (not only the policy service) passes it.
    site = short_site("grw")
    whitelist = site / "whitelist_clients"
    whitelist.write_text("192.0.2.250\n")
    extra = ("greylist_postscreen_listen = unix:%s\ngreylist_whitelist_clients = %s\n"
             % (site / "postscreen", whitelist))

    def callout(client: str) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(WAIT_S)
            sock.connect(str(site / "postscreen"))
            sock.sendall(b"client_address=%s\nserver_address=192.0.2.25\n"
                         b"client_port=49152\nserver_port=25\n\n" % client.encode())
            sock.shutdown(socket.SHUT_WR)
            return daemons.receive_all(sock, WAIT_S)

    with daemons.start(site, extra) as daemon:
        assert callout("198.51.100.77") == b"action=ignore\n\n"
        whitelist.write_text("192.0.2.250\n198.51.100.77\n")
        reload(daemon, "greylist_delay = 2s", "greylist_delay = 3s")
        assert callout("198.51.100.77").startswith(b"action=pass\n")
        assert "reason=whitelist-client client=198.51.100.77" in daemon.log()
        assert daemon.stop() == 0
