"""A throw-away real Postfix (Debian 12, Postfix 3.7) instance for integration tests.

Usage (as root)::

    reason = postfix_available()          # None, or why Postfix can't run here
    root = pathlib.Path(tempfile.mkdtemp())
    with PostfixInstance(root, ["/usr/bin/python3", "/abs/path/policy.py"]) as pf:
        r = pf.swaks("sender@example.org", "user@example.test")
        assert "450 4.7.1" in r.stdout    # "451 4.3.5" means the policy server broke
        pf.swaks("sender@example.org", "user@example.test")
        text = pf.wait_for_delivery("user")

API
---
``postfix_available() -> str | None``
    None if we are root and postfix, postconf, postmap (with ``lmdb`` in
    ``postconf -m``) and swaks are usable; otherwise a reason (for pytest.skip).

``PostfixInstance(root, policy_argv, policy_user="nobody", port=None, extra_main_cf=None,
extra_master_cf="")``
    ``policy_argv`` is the spawn(8) command: absolute argv[0], no whitespace in
    any element (master.cf splits on it), run without a shell, cwd = queue
    dir, as ``policy_user`` (neither root nor postfix: spawn refuses them).
    ``port`` defaults to a free port. ``extra_main_cf`` overrides/extends
    ``main_cf()``. ``extra_master_cf`` is appended to master.cf as is
    (more services: further smtpd listeners, spawn services, cleanups);
    ``free_port()`` gives ports for extra listeners.

    ``start(timeout=20)``     write config, ``postfix -c DIR check`` and ``start``,
                              wait for the smtpd "220" banner.
    ``stop(timeout=20)``      ``postfix -c DIR stop``, then wait until no process
                              has its cwd under root; idempotent; raises
                              RuntimeError if processes survive. Context manager:
                              ``__exit__`` always calls it.
    ``swaks(sender, recipient, extra_args=(), timeout=30, port=None)`` -> CompletedProcess;
                              ``.stdout`` holds swaks' stdout+stderr, ``.returncode``
                              is swaks' status (0 = sent, 24 = no RCPT accepted);
                              ``port`` (default ``self.port``) selects another
                              listener of ``extra_master_cf``.
    ``wait_for_delivery(recipient_localpart, timeout=20)`` -> str: the oldest
                              delivered message to that recipient not returned
                              before (full address also accepted).
    ``messages()``            all delivered message files, oldest first.
    ``log_text()``            contents of the maillog.
    ``processes()``           PIDs whose cwd is under root (daemons, spawn children).
    ``postfix_output``        messages of the last ``postfix check``/``start``.
    Attributes: ``root, port, config_dir, queue_dir, data_dir, mailbox_dir, maillog``.

Layout under ``root``::

    etc/            config_dir: main.cf, master.cf
    queue/          queue_directory (root 0755; subdirs made by post-install)
    data/           data_directory (made by post-install, owned by postfix)
    mail/Maildir/   mailbox_dir: every local recipient's mail, owned by nobody
    maillog         written by postlogd

Postfix facts this relies on (checked on Debian 12, Postfix 3.7.11):

* ``postfix -c DIR`` run by root needs no ``alternate_config_directories``
  or ``multi_instance_directories`` entry in /etc/postfix/main.cf (that check
  guards the set-gid postdrop/postqueue for non-root users; mail enters over
  SMTP here). /etc/postfix is neither read nor modified; the system instance
  is not started.
* ``postfix check``/``start`` run ``post-install create-missing``: it creates
  the queue subdirectories (owned by ``mail_owner``/``setgid_group``) and the
  data directory. We must NOT create data/ ourselves (a root-owned data dir
  makes master fail: "open lock file .../master.lock: Permission denied").
* The postfix command prints errors only when stderr is a tty (otherwise they
  go to postlogd, not running before start), hence the pseudo-terminal.
* There is no /dev/log: ``maillog_file`` plus ``maillog_file_prefixes``
  (whose default allows only /var and /dev/stdout) plus the ``postlog`` service.
* root and all its ancestors must be searchable by others: spawn children
  and virtual(8) use absolute paths under root after dropping privileges.
  start() chmods the directories it creates to 0755 (mkdtemp makes 0700)
  and refuses ancestors that aren't o+x (pytest's tmp_path is under the
  0700 /tmp/pytest-of-<user>; use tempfile.mkdtemp() instead).
* Delivery: ``mydestination = example.test, localhost`` with
  ``local_transport = virtual`` and ``virtual_mailbox_maps = static:Maildir/``:
  any localpart is accepted and virtual(8) stores it in one Maildir as
  nobody's uid/gid, adding ``Delivered-To:``. No Unix accounts or aliases are
  needed. (Per-recipient Maildirs via a regexp map are impossible: Postfix
  forbids $1 substitution in virtual_mailbox_maps.)
* Loopback only: smtpd listens on 127.0.0.1:port (``inet_interfaces =
  127.0.0.1``, ``inet_protocols = ipv4``); outbound mail (e.g. bounces to
  example.org) goes to the ``error`` transport; ``biff = no``; no chroot.
"""
from __future__ import annotations

import email
import os
import pathlib
import pwd
import select
import shutil
import socket
import subprocess
import sys
import time

SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
MAILBOX_USER = "nobody"
_used_ports: set[int] = set()

MASTER_CF = """\
# service type  private unpriv chroot wakeup maxproc command + args
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
policy    unix  -       n       n       -       0       spawn
  user={user} argv={argv}
"""


def _tool(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH + ":" + os.environ.get("PATH", ""))


def postfix_available() -> str | None:
    """Return None if a test Postfix can run here, else the reason why not."""
    if os.geteuid() != 0:
        return "running Postfix requires root"
    for name in ("postfix", "postconf", "postmap", "swaks"):
        if _tool(name) is None:
            return f"{name} not found"
    try:
        pwd.getpwnam("postfix")
        pwd.getpwnam(MAILBOX_USER)
        maps = subprocess.run([_tool("postconf"), "-m"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.split()
    except (KeyError, OSError, subprocess.SubprocessError) as exc:
        return f"postfix not usable: {exc}"
    return None if "lmdb" in maps else "postconf -m lacks lmdb (install postfix-lmdb)"


def _free_port() -> int:
    """A currently free TCP port on 127.0.0.1, never handed out twice per process."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _used_ports:
            _used_ports.add(port)
            return port
    raise RuntimeError("no free port found")


# For the listeners of extra_master_cf.
free_port = _free_port


class PostfixInstance:
    """A Postfix instance living entirely under ``root``; see the module docstring."""

    def __init__(self, root: pathlib.Path, policy_argv: list[str], policy_user: str = "nobody",
                 port: int | None = None, extra_main_cf: dict[str, str] | None = None,
                 extra_master_cf: str = ""):
        if not policy_argv or not os.path.isabs(policy_argv[0]):
            raise ValueError("policy_argv[0] must be an absolute path")
        if any(not a or any(c.isspace() for c in a) for a in policy_argv):
            raise ValueError("policy_argv elements must be non-empty without whitespace")
        if policy_user in ("root", "postfix"):
            raise ValueError("spawn(8) refuses to run commands as root or postfix")
        self.root = pathlib.Path(root).resolve()
        self.policy_argv = list(policy_argv)
        self.policy_user = policy_user
        self.port = port if port is not None else _free_port()
        self.extra_main_cf = dict(extra_main_cf or {})
        self.extra_master_cf = extra_master_cf
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.mailbox_dir = self.root / "mail" / "Maildir"
        self.maillog = self.root / "maillog"
        self.postfix_output = ""
        self._started = False
        self._seen: set[str] = set()

    def main_cf(self) -> dict[str, str]:
        """The main.cf settings before ``extra_main_cf`` is applied."""
        mbox = pwd.getpwnam(MAILBOX_USER)
        no_outbound = "error:outbound mail disabled in tests"
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.root),
            "myhostname": "mx.example.test",
            "mydomain": "example.test",
            "myorigin": "example.test",
            "mydestination": "example.test, localhost",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "192.0.2.0/24",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "smtpd_recipient_restrictions":
                "reject_unauth_destination, check_policy_service unix:private/policy",
            "policy_time_limit": "3600",
            "biff": "no",
            "alias_maps": "",
            "alias_database": "",
            "local_transport": "virtual",
            "local_recipient_maps": "$virtual_mailbox_maps",
            "virtual_mailbox_domains": "",
            "virtual_mailbox_base": str(self.mailbox_dir.parent),
            "virtual_mailbox_maps": f"static:{self.mailbox_dir.name}/",
            "virtual_uid_maps": f"static:{mbox.pw_uid}",
            "virtual_gid_maps": f"static:{mbox.pw_gid}",
            "default_transport": no_outbound,
            "relay_transport": no_outbound,
        }

    def _write_config(self) -> None:
        for d in (self.root, self.config_dir, self.queue_dir, self.mailbox_dir.parent):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
        for anc in self.root.parents:
            if not os.stat(anc).st_mode & 0o001:
                raise RuntimeError(f"{anc} is not searchable by other users (needs o+x); "
                                   "use a root like tempfile.mkdtemp()")
        mbox = pwd.getpwnam(MAILBOX_USER)
        os.chown(self.mailbox_dir.parent, mbox.pw_uid, mbox.pw_gid)
        settings = self.main_cf() | self.extra_main_cf
        (self.config_dir / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        master = MASTER_CF.format(listen=f"127.0.0.1:{self.port}", user=self.policy_user,
                                  argv=" ".join(self.policy_argv))
        (self.config_dir / "master.cf").write_text(master + self.extra_master_cf)

    def _postfix(self, *args: str, timeout: float = 60) -> tuple[int, str]:
        """Run ``postfix -c DIR *args`` on a pseudo-terminal; return (status, output)."""
        cmd = [_tool("postfix") or "/usr/sbin/postfix", "-c", str(self.config_dir), *args]
        master, slave = os.openpty()
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                                    env={"PATH": SBIN_PATH, "LANG": "C"})
        finally:
            os.close(slave)
        out, deadline = bytearray(), time.monotonic() + timeout
        with os.fdopen(master, "rb", buffering=0) as tty:
            while True:
                if select.select([tty], [], [], 0.1)[0]:
                    try:
                        chunk = tty.read(4096)
                    except OSError:  # EIO: no process has the tty open any more
                        chunk = b""
                    out += chunk
                    if chunk:
                        continue
                    time.sleep(0.05)
                if proc.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    raise TimeoutError(f"{cmd} took more than {timeout}s")
        return proc.returncode, out.decode(errors="replace").replace("\r\n", "\n")

    def start(self, timeout: float = 20) -> None:
        """Write the configuration, check and start Postfix, wait for the smtpd banner."""
        self._write_config()
        self._started = True  # from here on, stop() has something to clean up
        self.postfix_output = ""
        for action in ("check", "start"):
            rc, out = self._postfix(action)
            self.postfix_output += out
            if rc != 0:
                raise RuntimeError(f"postfix {action} failed ({rc}):\n{out}\n{self.log_text()[-3000:]}")
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    last = s.recv(512)
                    if last.startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError as exc:
                last = exc
            time.sleep(0.2)
        raise RuntimeError(f"smtpd on 127.0.0.1:{self.port} not ready: {last!r}\n"
                           f"{self.log_text()[-3000:]}")

    def processes(self) -> list[int]:
        """PIDs of processes whose cwd is under root (Postfix daemons, spawn children)."""
        pids = []
        for entry in pathlib.Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cwd = pathlib.Path(os.readlink(entry / "cwd"))
                except OSError:
                    continue
                if cwd == self.root or self.root in cwd.parents:
                    pids.append(int(entry.name))
        return pids

    def stop(self, timeout: float = 20) -> None:
        """``postfix -c DIR stop``, then wait (bounded) until our processes are gone.

        Safe to call twice and after a failed start(). Raises RuntimeError if
        processes of this instance are still there after ``timeout`` seconds.
        """
        if not self._started:
            return
        self._started = False
        if (self.queue_dir / "pid" / "master.pid").exists():
            self._postfix("stop", timeout=timeout)  # fails harmlessly if not running
        deadline = time.monotonic() + timeout
        while left := self.processes():
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of the Postfix under {self.root} still running: {left}")
            time.sleep(0.2)

    def __enter__(self) -> PostfixInstance:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def swaks(self, sender: str, recipient: str, extra_args: list[str] = (),
              timeout: float = 30, port: int | None = None) -> subprocess.CompletedProcess:
        """One SMTP transaction with swaks against 127.0.0.1:port (output in ``.stdout``)."""
        port = self.port if port is None else port
        cmd = [_tool("swaks") or "swaks", "--server", "127.0.0.1", "--port", str(port),
               "--from", sender, "--to", recipient, "--helo", "client.example.org",
               "--timeout", str(max(1, int(timeout))), *extra_args]
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True, timeout=timeout + 5)

    def messages(self) -> list[pathlib.Path]:
        """Delivered message files (all recipients), oldest first."""
        new = self.mailbox_dir / "new"
        files = list(new.iterdir()) if new.is_dir() else []
        return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))

    def wait_for_delivery(self, recipient_localpart: str, timeout: float = 20) -> str:
        """Return the oldest message delivered to the recipient and not returned before.

        Matches virtual(8)'s ``Delivered-To:`` header by localpart (or by full
        address if the argument contains "@"), case-insensitively; polls every
        0.2 s for at most ``timeout`` seconds, then raises TimeoutError.
        """
        want, deadline = recipient_localpart.lower(), time.monotonic() + timeout
        while True:
            for path in self.messages():
                if path.name in self._seen:
                    continue
                text = path.read_text(errors="replace")
                rcpt = email.message_from_string(text).get("Delivered-To", "").strip().lower()
                if want == (rcpt if "@" in want else rcpt.partition("@")[0]):
                    self._seen.add(path.name)
                    return text
            if time.monotonic() > deadline:
                raise TimeoutError(f"no new mail for {recipient_localpart} after {timeout}s\n"
                                   f"{self.log_text()[-3000:]}")
            time.sleep(0.2)

    def log_text(self) -> str:
        """The instance's maillog ('' before anything was logged)."""
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, text: str, timeout: float = 10) -> str:
        """The maillog once it holds text (postlogd writes it after the
        SMTP reply that the client already has), polled every 0.05 s for
        at most timeout seconds; then the maillog as it is."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log_text()
            if text in log or time.monotonic() >= deadline:
                return log
            time.sleep(0.05)


def install_runtime(root: pathlib.Path, user: str = "nobody") -> list[str] | str:
    """Make this checkout's greylist runnable by user under root.

    Copies the packages greylist needs into root/lib (the test's virtual
    environment may live where user cannot read, such as /root) and finds
    an interpreter of the same Python version that user can run. Returns
    the argv prefix ("/usr/bin/env PYTHONPATH=... python"), or a reason
    string if there is none.
    """
    import docopt
    import lmdb
    import publicsuffixlist
    import greylist
    lib = root / "lib"
    for package in (greylist, lmdb, docopt, publicsuffixlist):
        source = pathlib.Path(package.__file__).parent
        shutil.copytree(source, lib / source.name, ignore=shutil.ignore_patterns("__pycache__"))
    version = "python%d.%d" % sys.version_info[:2]
    reason = "no %s that user %s can run" % (version, user)
    for python in (os.path.realpath(sys.executable), "/usr/bin/" + version):
        argv = ["/usr/bin/env", "PYTHONPATH=%s" % lib, python]
        probe = subprocess.run(["runuser", "-u", user, "--", *argv, "-c",
                                "import greylist, lmdb, docopt, publicsuffixlist"],
                               capture_output=True, text=True, timeout=30)
        if probe.returncode == 0:
            return argv
        reason += ": " + probe.stderr[-200:]
    return reason
