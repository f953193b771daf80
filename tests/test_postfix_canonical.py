"""End to end: README's installation and canonical snippet, pasted into a
real Postfix, greylist mail; and mail flows when the policy process dies.

The programs are README's: a wheel of this checkout installed into a
virtual environment of /usr/bin/python3 (tests/test_docs_install.py),
the database directory made by README's install -d line, and the sample
settings file copied as README copies it. Paths move into a temporary
directory and the policy user greylist becomes nobody; nothing else in
the snippet changes. smtpd's first RCPT gets 450, the retry after the
delay 250. With argv naming a settings file that does not exist, every
policy process exits at once: the snippet's default_action=DUNNO lets
the mail in, where the same check without it answers 451 4.3.5.
"""

import os
import pathlib
import shutil
import subprocess
import tempfile
import time

import pytest

from tests.conftest import require
from tests.postfix_instance import PostfixInstance, free_port, postfix_available
from tests.test_docs_install import install, readme_command
from tests.test_docs_snippets import canonical_readme, paste
from tests.test_postfix import rcpt_reply

pytestmark = pytest.mark.postfix

USER = "nobody"
DELAY_S = 4


class Pasted(PostfixInstance):
    """A Postfix instance with snippets pasted into its configuration."""

    def __init__(self, root: pathlib.Path, master: str, main: str, **kwargs) -> None:
        super().__init__(root, ["/bin/true"], **kwargs)
        self.pasted = master, main

    def _write_config(self) -> None:
        super()._write_config()
        paste(self, *self.pasted)


@pytest.fixture(scope="module")
def site():
    """README's installation under a temporary prefix; yields (prefix,
    moved) where moved(text) moves README's paths under the prefix."""
    require(postfix_available())
    prefix = pathlib.Path(tempfile.mkdtemp(prefix="greylist-canonical-"))
    try:
        install(prefix)

        def moved(text: str) -> str:
            for path in ("/opt/greylist", "/etc/greylist", "/var/lib/greylist"):
                text = text.replace(path, str(prefix) + path)
            return text
        (prefix / "var" / "lib").mkdir(parents=True)
        # README's commands, with the policy user nobody.
        for command in ("install -d -o greylist -g postfix -m 2750 /var/lib/greylist",
                        "install -d -m 0755 /etc/greylist",
                        "install -m 0644 /opt/greylist/share/doc/greylist/"
                        "greylist.cf.example /etc/greylist/greylist.cf"):
            line = moved(readme_command(command)).replace("-o greylist ", "-o %s " % USER)
            subprocess.run(["sh", "-c", line], check=True, timeout=30)
        yield prefix, moved
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def settings_file(prefix: pathlib.Path, moved, postfix_root: pathlib.Path) -> pathlib.Path:
    """The installed sample, edited as the site's administrator would:
    the database moved, a short delay, and greylist_log = postlog (there
    is no syslog here) at this instance's socket."""
    path = prefix / "etc" / "greylist" / "greylist.cf"
    text = moved(path.read_text())
    assert "\ngreylist_database = %s/var/lib/greylist/greylist\n" % prefix in text
    path.write_text(text + "greylist_delay = %ds\ngreylist_log = postlog:%s/queue/public/postlog\n"
                    % (DELAY_S, postfix_root))
    return path


def test_the_pasted_snippet_greylists_as_an_unprivileged_user(site):
    prefix, moved = site
    snippet = canonical_readme()
    root = prefix / "postfix"
    config = settings_file(prefix, moved, root)
    # Where there is no syslog: user=greylist:postdrop (README).
    master = moved(snippet["master.cf"]).replace("user=greylist ", "user=%s:postdrop " % USER)
    assert "argv=%s/opt/greylist/bin/greylist -c %s" % (prefix, config) in master
    with Pasted(root, master, snippet["main.cf"]) as postfix:
        first = rcpt_reply(postfix.swaks("alice@example.org", "bob@example.test"))
        started = time.monotonic()
        assert first.startswith("450 4.7.1 <bob@example.test>: Recipient address rejected: "
                                "Greylisted, please try again in %d seconds" % DELAY_S), first
        time.sleep(max(0.0, DELAY_S + 0.5 - (time.monotonic() - started)))
        retry = postfix.swaks("alice@example.org", "bob@example.test",
                              ["--header", "Subject: canonical"])
        assert rcpt_reply(retry).startswith("250 "), retry.stdout
        assert "Subject: canonical" in postfix.wait_for_delivery("bob")
        log = postfix.log_text()
        assert "action=DEFER_IF_PERMIT reason=new age=0 client=127.0.0.1 " \
               "sender=alice@example.org rcpt=bob@example.test" in log
        assert "reason=delay-passed" in log and "451 4.3.5" not in log
    # The database belongs to the policy user, with the directory's group.
    database = prefix / "var" / "lib" / "greylist" / "greylist.lmdb"
    info = database.stat()
    # 0600: Postfix never reads the database (issue 15).
    assert (info.st_uid, info.st_mode & 0o777) == (int(_id("-u", USER)), 0o600)
    assert info.st_gid == int(_id("-g", "postfix"))
    # README's command for the live database.
    dump = subprocess.run([str(prefix / "opt" / "greylist" / "bin" / "greylistctl"),
                           "-c", str(config), "dump"], capture_output=True, text=True,
                          timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert "127.0.0/alice@example.org/bob@example.test\t1:" in dump.stdout


def _id(flag: str, name: str) -> str:
    return subprocess.run(["id", flag, name], capture_output=True, text=True, check=True,
                          timeout=10).stdout.strip()


def test_mail_flows_when_the_policy_process_dies_at_once(site):
    prefix, moved = site
    snippet = canonical_readme()
    master = moved(snippet["master.cf"]).replace("user=greylist ", "user=%s " % USER)
    missing = str(prefix / "etc" / "greylist" / "missing.cf")
    master = master.replace(str(prefix / "etc" / "greylist" / "greylist.cf"), missing)
    assert not os.path.exists(missing)
    # A second smtpd: the same check without default_action=DUNNO.
    control = free_port()
    extra = ("127.0.0.1:%d inet n - n - - smtpd\n  -o { smtpd_recipient_restrictions = "
             "reject_unauth_destination, check_policy_service unix:private/policy }\n"
             % control)
    with Pasted(prefix / "postfix-dead", master, snippet["main.cf"],
                extra_master_cf=extra) as postfix:
        accepted = postfix.swaks("carol@example.org", "dave@example.test",
                                 ["--header", "Subject: fail open"])
        assert rcpt_reply(accepted).startswith("250 "), accepted.stdout
        assert "Subject: fail open" in postfix.wait_for_delivery("dave")
        refused = rcpt_reply(postfix.swaks("carol@example.org", "erin@example.test",
                                           port=control))
        assert refused.startswith("451 4.3.5 "), refused
        log = postfix.log_text()
        # The policy process really died: spawn saw its exit status.
        program = prefix / "opt" / "greylist" / "bin" / "greylist"
        assert "spawn[" in log and "command %s exit status 1" % program in log, log[-3000:]
        assert "problem talking to server private/policy" in log
