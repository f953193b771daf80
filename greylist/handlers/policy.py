"""The SMTPD policy handler: a request and a session in, a reply out.

DESCRIPTION
    PolicyHandler turns one decoded policy request, with the Session of
    its connection (core/message.py), into an Answer, in two steps so
    that it never touches a store or a stream:

    prepare()   checks the request (request type, client_address), runs
                precheck() (core/evaluate.py). A request it can answer
                alone gets an Answer; any other gets a Pending, a plan
                that names the three records of the triple (triple,
                sender entry, client entry; keys in plaintext) and a
                pure change function.
    complete()  renders the Outcome of the plan (or a store failure)
                into the Answer: the action, the log line, warnings, and
                the client-table entry to write, if any.

    Running a plan is the transport's job (stores/base.py run_plan):
    read the records in one snapshot and decide; only when the decision
    changes a record, read and decide again inside one write transaction
    under the exclusive lock, so concurrent writers never both "see" a
    new triple, while the common path never blocks readers. Changed
    records are committed durably before the reply is sent. change()
    may thus run twice; it is pure, and returns its warnings (a record
    that does not parse) as data, so they are logged once.

    A client that earns, or refreshes, its client auto-whitelisting is
    also written to the client table, a Postfix lmdb table with numeric
    time stamps as values, for check_client_access before
    check_policy_service. The address of a proven client (one that
    earns it, or passes as awl-client or manual-client) gets a plan for
    the postscreen table (core/tables.py), for postscreen_access_list.

    explain() is greylistctl show: the same steps on a snapshot, with
    nothing written.

DIAGNOSTICS
    ProtocolError for a request that is not smtpd_access_policy or whose
    client_address is not an address: the transport logs it and closes
    the connection without a reply. One info line per RCPT decision:
    action, reason, age, client, sender, rcpt; a debug line for requests
    that screen() answers.
"""

from typing import Callable, NamedTuple, Sequence

from greylist.config import Config
from greylist.core.decide import (AWL_CLIENT, DATABASE_FAILURE, MANUAL_CLIENT, NO_RECORDS,
                                  Decision, Records, decide, whitelisted_client)
from greylist.core.pools import pool_set
from greylist.core.record import TRYING, decode, encode, new
from greylist.core.evaluate import precheck, render
from greylist.core.lists import Exemptions
from greylist.core.message import Session
from greylist.core.tables import screen_denied
from greylist.core.triple import (UNKNOWN_CLIENT, BadAddress, Triple, auto_table_key,
                                  escape, keys, triple_from_request)
from greylist.protocols.policy import ProtocolError
from greylist.stores.base import NO_WRITES

REQUEST = "smtpd_access_policy"

Values = list[bytes | None]


class Outcome(NamedTuple):
    """The result of a plan's change: the decision and its warnings."""

    decision: Decision
    warnings: tuple[str, ...] = ()
    records: Records = Records()


# States at which smtpd asks only when the service sits before the
# recipient restrictions with smtpd_delay_reject = no (with the default,
# client, helo and sender restrictions are evaluated at RCPT).
EARLY_STATES = ("CONNECT", "EHLO", "HELO", "MAIL")


class Answer(NamedTuple):
    """What to send and log for one request."""

    action: str
    decision: Decision
    line: str                      # the log line
    debug: bool = False            # log it only with -v
    warnings: tuple[str, ...] = ()
    # A plan (key, change) for the client table (core/tables.py).
    table_write: tuple[bytes, Callable] | None = None
    # A plan (key, change) for the postscreen table (core/tables.py).
    postscreen: tuple[bytes, Callable] | None = None


class Pending(NamedTuple):
    """A request waiting for its plan's outcome. The plan: the records to
    read (keys) and a pure change, values -> (new values, Outcome); a new
    value of None means no write, a None key is never read or written."""

    attrs: dict[str, str]
    address: str
    triple: Triple
    now: int
    keys: Sequence[bytes | None]
    change: Callable[[Values], tuple[Values, Outcome]]


class PolicyHandler:
    """Answers SMTPD policy requests with the settings of one program."""

    def __init__(self, cfg: Config, host: str) -> None:
        self.cfg = cfg
        self.host = host
        self._misplaced = False   # warned of a request before RCPT

    def prepare(self, attrs: dict[str, str], session: Session, now: int,
                exemptions: Exemptions) -> "Answer | Pending":
        """First step; raises ProtocolError for a malformed request."""
        request = attrs.get("request")
        if request != REQUEST:
            raise ProtocolError("unknown request type: %s" % repr(request)[:100])
        try:
            decision, address = precheck(attrs, self.cfg, exemptions)
        except BadAddress as exc:
            raise ProtocolError(str(exc)) from None
        if address is None:
            warnings = ()
            if not self._misplaced and attrs.get("protocol_state", "").upper() in EARLY_STATES:
                # smtpd_delay_reject = no with the service in client, helo or
                # sender restrictions: nothing is ever greylisted. Once.
                self._misplaced = True
                warnings = ("asked at protocol_state=%s: greylisting is done at RCPT only "
                            "(check_policy_service belongs in smtpd_recipient_restrictions); "
                            "answering DUNNO" % attrs["protocol_state"][:20],)
            return Answer(decision.action, decision, "action=%s reason=%s"
                          % (decision.action, decision.reason), debug=True,
                          warnings=warnings)
        instance = attrs.get("instance")
        if instance != session.instance:
            session.begin(instance)
        if decision is not None:
            return Answer(decision.action, decision, _line(decision.action, decision,
                                                           attrs, address))
        cfg = self.cfg
        triple = triple_from_request(attrs, cfg, address)
        # With the (recipient, sender) correspondent pair, unless turned off.
        found = keys(triple, cfg.sender_delimiter if cfg.correspondent_check else None)
        message = session.instance is not None
        return new(Pending, (attrs, address, triple, now, found, self.change(
            found, now, message and session.accepted, message and session.deferred,
            triple.client, message and session.accepted and not session.proven)))

    def change(self, found: Sequence[bytes | None], now: int, accepted: bool,
               deferred: bool = False, group: str | None = None, exempt: bool = False
               ) -> Callable[[Values], tuple[Values, Outcome]]:
        """The pure change that decides the triple of keys found at now."""
        cfg = self.cfg

        def change(values: Values) -> tuple[Values, Outcome]:
            parsed, warnings = parse_records(values, found)
            # Whether the client group is a sending pool matters only to a
            # trying note: asked only then, off the common path.
            pooled = (group is not None and parsed.sender is not None
                      and parsed.sender.state == TRYING and cfg.client_match == "pool"
                      and group in pool_set(cfg.pool_domains))
            decision = decide(parsed, now, cfg, accepted, deferred, pooled, exempt)
            writes = decision.writes
            if writes == NO_RECORDS:
                return NO_WRITES, new(Outcome, (decision, warnings, parsed))
            return ([None if r is None else encode(r) for r in writes],
                    new(Outcome, (decision, warnings, parsed)))
        return change

    def complete(self, pending: Pending, outcome: Outcome | None,
                 session: Session) -> Answer:
        """Second step: the answer for the plan's outcome, None for a
        store failure (answered with greylist_failure_action)."""
        if outcome is None:
            outcome = Outcome(Decision(self.cfg.failure_action, DATABASE_FAILURE))
        decision = outcome.decision
        attrs, address = pending.attrs, pending.address
        action = render(decision, attrs, address, session, pending.now, self.cfg, self.host)
        cfg = self.cfg
        client = decision.writes.client
        table = screened = None
        earned = client is not None and whitelisted_client(client, cfg)
        if cfg.client_table and earned:
            from greylist.core.tables import stamp_change
            table = (auto_table_key(address, pending.triple.client, cfg.client_match),
                     stamp_change(pending.now))
        if cfg.postscreen_table and (earned or decision.reason in (AWL_CLIENT, MANUAL_CLIENT)) \
                and address != UNKNOWN_CLIENT and not screen_denied(
                    address, cfg.postscreen_drop_networks, cfg.postscreen_enforce_networks):
            # A proven client: postscreen may let this address through.
            from greylist.core.tables import permit_change
            screened = (address.encode("ascii"), permit_change(
                pending.now, decision.reason == MANUAL_CLIENT, cfg.max_age_s))
        return new(Answer, (action, decision, _line(action, decision, attrs, address),
                            False, outcome.warnings, table, screened))

    def explain(self, attrs: dict[str, str], session: Session, now: int,
                exemptions: Exemptions, read: Callable[[list[bytes | None]], Values]
                ) -> tuple["Answer", "Pending | None", "Outcome | None"]:
        """What prepare() and complete() answer on the records read() returns
        now, without writing anything (greylistctl show)."""
        step = self.prepare(attrs, session, now, exemptions)
        if isinstance(step, Answer):
            return step, None, None
        _, outcome = step.change(read(step.keys))
        return self.complete(step, outcome, session), step, outcome


def _line(action: str, decision: Decision, attrs: dict[str, str], address: str) -> str:
    """The log line of a decision."""
    # The addresses come from the client: white space and controls are
    # written %xx, as in keys, so a quoted local part cannot fake a field
    # (issue 15).
    sender = attrs.get("sender") or "<>"
    recipient = attrs["recipient"]
    if not (sender.isprintable() and " " not in sender):
        sender = escape(sender)
    if not (recipient.isprintable() and " " not in recipient):
        recipient = escape(recipient)
    return ("action=%s reason=%s age=%d client=%s sender=%s rcpt=%s"
            % (action.split(None, 1)[0], decision.reason, decision.age, address,
               sender, recipient))


def parse_records(values: Values, found: Sequence[bytes | None]
                  ) -> tuple[Records, tuple[str, ...]]:
    """The records stored as values (keys found), and a warning for each
    value that does not parse (treated as absent)."""
    triple, sender, client, pair = [None if value is None else decode(value)
                                    for value in values]
    if (triple is None and values[0] is not None or sender is None and values[1] is not None
            or client is None and values[2] is not None
            or pair is None and values[3] is not None):
        return new(Records, (triple, sender, client, pair)), tuple(
            "ignoring malformed record for %s: %s"
            % (k.decode("utf-8", "replace"), repr(value)[:100])
            for value, k in zip(values, found) if value is not None and decode(value) is None)
    return new(Records, (triple, sender, client, pair)), ()
