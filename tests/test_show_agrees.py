"""greylistctl show and greylist's reply agree for the same request and database.

show promises "what greylist would answer now, with the reason": the
policy handler's own evaluation on the records as they are. Here both
run in this process on one database and one clock: before each policy
request, show is asked about the same triple, and its "decision now"
line must be exactly the action the policy service then sends, and its
"reason" the reason the service logs. The triple goes through all its
states (new, early retry, delay passed, known), with the default reply
text, a custom reply text with placeholders, and the X-Greylist header.
"""

import io
import os
import re

import pytest

from greylist.cli.greylistctl import main as greylistctl
from greylist.config import load
from greylist.core.message import Session
from greylist.stores.lmdb import LmdbStore
from greylist.transports.spawn import serve
from tests.conftest import Clock, Recorder, policy_service

CLIENT, SENDER, RCPT = "192.0.2.10", "alice@example.org", "bob@example.net"
START = 1_700_000_000
DELAY = 300
CUSTOM = ("Greylisted for $recipient_domain from $client_address, "
          "retry in $seconds_left s")

CASES = {
    "defaults": "",
    "custom-text": "greylist_defer_text = %s\n" % CUSTOM,
    "header": "greylist_header = yes\n",
}

# Seconds after the first attempt, and the state of the triple then:
# (reason, the start of the action).
STEPS = [
    (0, "new", "DEFER_IF_PERMIT"),
    (120, "early-retry", "DEFER_IF_PERMIT"),
    (DELAY, "delay-passed", None),        # DUNNO, or the header with header = yes
    (DELAY + 60, None, "DUNNO"),          # known: whichever whitelisting applies
]


class Site:
    """A settings file, its database, and the policy service on it."""

    def __init__(self, directory, extra: str) -> None:
        self.settings = str(directory / "greylist.cf")
        with open(self.settings, "w") as handle:
            handle.write("greylist_database = %s/greylist\ngreylist_log = %s/greylist.log\n"
                         "greylist_delay = %ds\ngreylist_allow_root = yes\n%s"
                         % (directory, directory, DELAY, extra))
        self.cfg = load(self.settings, {})
        self.clock = Clock(START)
        self.store = LmdbStore(self.cfg.database)
        # show opens the database read-only and so needs the file: create
        # it, as the first policy process would.
        self.store.open()
        self.log = Recorder()
        self.service = policy_service(self.store, self.cfg, self.log, self.clock)
        # The one connection of the policy service. show evaluates each
        # request with a fresh Session; so that the message state (a
        # recipient accepted, the header sent) cannot differ between the
        # two, every request here is a message of its own: a new instance.
        self.session = Session()
        self.messages = 0

    def show(self, capsys) -> tuple[str, str]:
        """greylistctl show's decision and reason for the triple, now."""
        # greylistctl is another process in real life; in this one, py-lmdb
        # refuses to open an environment that is open already. The policy
        # service's store reopens on its next use.
        self.store.close()
        capsys.readouterr()
        status = greylistctl(["-c", self.settings, "show", CLIENT, SENDER, RCPT],
                             clock=self.clock)
        out = capsys.readouterr().out
        assert status == 0, out
        decision = re.findall(r"^decision now: (.*)$", out, re.M)
        reason = re.findall(r"^reason: (.*)$", out, re.M)
        assert len(decision) == len(reason) == 1, out
        return decision[0], reason[0]

    def ask(self) -> tuple[str, str]:
        """The policy service's action and logged reason for the triple, now."""
        self.messages += 1
        data = ("request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=%s\n"
                "sender=%s\nrecipient=%s\ninstance=message.%d\n\n"
                % (CLIENT, SENDER, RCPT, self.messages)).encode()
        out = io.BytesIO()
        assert serve(io.BytesIO(data), out, self.service, self.session) == 0
        reply = out.getvalue().decode()
        assert reply.startswith("action=") and reply.endswith("\n\n")
        assert reply.count("\n") == 2, reply
        logged = [line for line in self.log.lines if " reason=" in line]
        assert logged and not logged[-1].startswith("warning:")
        reason = re.search(r" reason=(\S+) age=", logged[-1])
        assert reason is not None, logged[-1]
        return reply[len("action="):-2], reason.group(1)

    def close(self) -> None:
        self.service.close()
        self.store.close()


@pytest.fixture(params=list(CASES))
def site(request, tmp_path):
    os.chmod(tmp_path, 0o755)  # the database directory must not be world-writable
    # greylistctl run as root switches to the owner of the database
    # directory unless that is root: it must not switch this process.
    assert os.geteuid() != 0 or os.stat(tmp_path).st_uid == 0
    made = Site(tmp_path, CASES[request.param])
    made.case = request.param
    yield made
    made.close()


def test_show_decision_and_reason_equal_the_reply_and_logged_reason_in_every_state(
        site, capsys):
    for offset, reason, action in STEPS:
        site.clock.now = START + offset
        shown = site.show(capsys)
        answered = site.ask()
        assert shown == answered, "at +%d s" % offset
        decision, why = answered
        # The triple really went through the intended states.
        if reason is not None:
            assert why == reason, "at +%d s" % offset
        if action is not None:
            assert decision.split()[0] == action, "at +%d s" % offset
    # Nothing else was logged as a warning (a store failure would make
    # both answer DUNNO and agree for the wrong reason).
    assert not [line for line in site.log.lines if line.startswith("warning:")]


def test_deferring_replies_count_down_the_seconds_left(site, capsys):
    expected = {
        "defaults": "DEFER_IF_PERMIT Greylisted, please try again in %d seconds",
        "custom-text": "DEFER_IF_PERMIT Greylisted for example.net from 192.0.2.10, "
                       "retry in %d s",
        "header": "DEFER_IF_PERMIT Greylisted, please try again in %d seconds",
    }[site.case]
    for offset in (0, 120, DELAY - 1):
        site.clock.now = START + offset
        decision, _ = site.show(capsys)
        assert decision == expected % (DELAY - offset)
        assert site.ask()[0] == decision


def test_show_fills_in_the_placeholders_of_a_custom_reply_text(tmp_path, capsys):
    os.chmod(tmp_path, 0o755)
    site = Site(tmp_path, CASES["custom-text"])
    try:
        decision, reason = site.show(capsys)
        assert "$" not in decision
        assert decision == ("DEFER_IF_PERMIT Greylisted for example.net from 192.0.2.10, "
                            "retry in 300 s")
        assert (decision, reason) == site.ask()
    finally:
        site.close()


def test_with_the_header_a_passed_delay_gets_the_same_x_greylist_prepend(tmp_path, capsys):
    os.chmod(tmp_path, 0o755)
    site = Site(tmp_path, CASES["header"])
    try:
        site.ask()
        site.clock.now = START + DELAY + 7
        decision, reason = site.show(capsys)
        assert reason == "delay-passed"
        assert decision.startswith("PREPEND X-Greylist: delayed %d seconds by greylist-"
                                   % (DELAY + 7))
        # Date and host included: the very same header line.
        assert site.ask() == (decision, reason)
        # Known from now on: no header, in both.
        site.clock.now += 1
        decision, reason = site.show(capsys)
        assert decision == "DUNNO" and (decision, reason) == site.ask()
    finally:
        site.close()
