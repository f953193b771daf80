"""Greylisting decisions as pure functions of request, records, time, settings.

DESCRIPTION
    screen() answers requests that need no database. Only the RCPT stage
    is greylisted: DEFER_IF_PERMIT defers one recipient there, while at
    CONNECT, HELO, MAIL, DATA and END-OF-MESSAGE there is no single
    recipient to defer (smtpd restores the defer_if_permit flag per
    recipient). It also exempts the null sender when greylist_null_sender
    is "no".

    decide() answers an RCPT request from the three records of its
    triple (see record.py), first dropping any that expired() or that
    is of the wrong kind for its place (reasons are the constants below):
        client whitelisted      DUNNO awl-client (manual-client)
        sender entry            DUNNO awl-sender (manual-sender)
        correspondent pair      DUNNO correspondent (the recipient wrote
                                to the sender: correspondents.py)
        triple passed           DUNNO known
        message accepted        DUNNO message (another recipient of this
                                message, same instance, was accepted;
                                after a correspondent pair only, with no
                                writes: a forged sender earns nothing)
        pool tried long enough  DUNNO sender-retry (the client group, a
                                sending pool (pools.py), has
                                had a triple of this sender pending for
                                at least greylist_delay: a retried message
                                with a new recipient is not split; the
                                "trying" note lives in the sender entry's
                                place until the sender passes)
        no triple               DEFER_IF_PERMIT new
        pending, age < delay    DEFER_IF_PERMIT early-retry
        pending, age >= delay   DUNNO delay-passed
    A recipient that would pass by one of these greylisting records
    (awl-client, awl-sender, known, delay-passed, message) after another recipient
    of the same message was deferred is deferred too, as "held:REASON",
    with the writes of its pass (the proof is kept, so the message passes
    whole at its retry): one message is accepted or deferred as a whole.
    Only the exemptions are not held: manual entries, correspondent pairs
    and the static exemptions of lists.py, which are accepted on their
    own. In learn mode nothing is held (nothing is deferred by greylisting
    there; a message can be "deferred" only by greylist_failure_action).
    On a pass the triple is stored as passed, a sender entry is made,
    and the client's pass count goes up (at most once per hour, as in
    postgrey, so one message with many recipients counts once). In learn
    mode every would-be defer is a pass, logged as "learn:REASON".

    Lifetimes, in verify(8)'s terms: a pending triple (negative entry)
    expires greylist_retry_window after it was first seen; passed
    triples, sender and client entries (positive entries) expire
    greylist_max_age after they were last seen, and are refreshed on use
    once that is more than half of greylist_max_age ago, so that the
    common path rarely writes. Manual entries never expire; correspondent
    pairs expire greylist_correspondent_lifetime after they were last
    learned (only learning refreshes them, never an inbound message). The age is
    now - first_seen: a clock that
    steps back makes it smaller, so a triple never passes early.

    A Decision says itself whether it proves the client (Decision.proven:
    a retry like a real MTA's), which lets the rest of the same message
    through (evaluate.py). This module is part of the pure core: no I/O,
    no clock reads, no logging.
"""

import functools
from typing import NamedTuple

from greylist.config import Config
from greylist.core.record import (CLIENT, CORRESPONDENT, MANUAL, PASSED, PENDING, SENDER,
                                  TRYING, Record, new)

DUNNO = "DUNNO"

# Reasons, as logged ("reason=") and shown by greylistctl show.
AWL_CLIENT = "awl-client"
MANUAL_CLIENT = "manual-client"
AWL_SENDER = "awl-sender"
MANUAL_SENDER = "manual-sender"
KNOWN = "known"
CORRESPONDENT_PAIR = "correspondent"
DELAY_PASSED = "delay-passed"
MESSAGE = "message"
SENDER_RETRY = "sender-retry"
NEW = "new"
EARLY_RETRY = "early-retry"
LEARN = "learn:"          # prefix of the would-be defer's reason
HELD = "held:"            # prefix of a pass held with its message's defer
NULL_SENDER = "null sender"
NO_RECIPIENT = "no recipient"
PROTOCOL_STATE = "protocol_state="   # followed by the state
DATABASE_FAILURE = "database-failure"
# Reasons that prove the client and let the rest of the same message
# through (postgrey #93): the client retries like a real MTA. A
# correspondent pair lets the rest through too, but proves nothing
# (evaluate.render): its later recipients pass without writes.
PROVING = frozenset((AWL_CLIENT, AWL_SENDER, KNOWN, DELAY_PASSED, MESSAGE, SENDER_RETRY))
# Passes that are held (deferred) when a recipient of the same message
# was deferred before: all but the exemptions (manual entries, pairs).
HOLDABLE = frozenset((AWL_CLIENT, AWL_SENDER, KNOWN, DELAY_PASSED, MESSAGE))
# At most one pass an hour counts toward the client auto-whitelist.
CLIENT_COUNT_INTERVAL_S = 3600
# A first sight later than now by more than this is a clock that ran
# ahead; less is two processes that read the clock a moment apart (one
# read it before the other wrote the record; soak test), and must not
# move the first sight.
CLOCK_SLACK_S = 60


# The states a record may have in each slot of Records; a record of
# another kind (a damaged or hand-edited database) is treated as absent.
TRIPLE_STATES = (PENDING, PASSED)
SENDER_STATES = (SENDER, MANUAL)
CLIENT_STATES = (CLIENT, MANUAL)
PAIR_STATES = (CORRESPONDENT,)
SLOT_STATES = (TRIPLE_STATES, SENDER_STATES + (TRYING,), CLIENT_STATES, PAIR_STATES)


class Records(NamedTuple):
    """The records of a triple: None where absent (or, in writes, unchanged)."""

    triple: Record | None = None
    sender: Record | None = None
    client: Record | None = None
    pair: Record | None = None


NO_RECORDS = Records()


class Decision(NamedTuple):
    """An action and its reason; writes are the records to store.

    action is DUNNO or DEFER_IF_PERMIT with text whose request
    placeholders ($recipient_domain, $client_address) are still to be
    filled in (evaluate.render). proven: the decision proves the client.
    """

    action: str
    reason: str
    age: int = 0
    writes: Records = NO_RECORDS
    proven: bool = False


def expired(record: Record, now: int, cfg: Config) -> bool:
    """Whether a record is past its lifetime and must be treated as absent."""
    if record.state in (PENDING, TRYING):
        return now - record.first_seen > cfg.retry_window_s
    if record.state == MANUAL:
        return False
    if record.state == CORRESPONDENT:
        return now - record.last_seen > cfg.correspondent_lifetime_s
    return now - record.last_seen > cfg.max_age_s


def expire_at(record: Record, cfg: Config) -> int | None:
    """The first second at which expired() holds for record, for stores
    that expire records themselves (Redis); None for a manual entry."""
    if record.state in (PENDING, TRYING):
        return record.first_seen + cfg.retry_window_s + 1
    if record.state == MANUAL:
        return None
    if record.state == CORRESPONDENT:
        return record.last_seen + cfg.correspondent_lifetime_s + 1
    return record.last_seen + cfg.max_age_s + 1


def whitelisted_client(record: Record | None, cfg: Config) -> bool:
    """Whether a client record has earned the client auto-whitelist."""
    return record is not None and (record.state == MANUAL or (
        cfg.client_awl_passes > 0 and record.count >= cfg.client_awl_passes))


def screen(attrs: dict[str, str], cfg: Config) -> Decision | None:
    """Return the decision for a request that needs no lookup, else None."""
    state = attrs.get("protocol_state", "")
    if state.upper() != "RCPT":
        return Decision(DUNNO, PROTOCOL_STATE + (state[:20] or "missing"))
    if "recipient" not in attrs:
        return Decision(DUNNO, NO_RECIPIENT)
    if not cfg.null_sender and not attrs.get("sender"):
        return Decision(DUNNO, NULL_SENDER)
    return None


def decide(records: Records, now: int, cfg: Config,
           message_accepted: bool = False, message_deferred: bool = False,
           pooled: bool = False, message_exempt: bool = False) -> Decision:
    """Return the decision for a triple whose stored records are records.

    message_deferred: a recipient of the same message (instance) was
    deferred; then a pass by the greylisting records is held (see
    DESCRIPTION), and the client's trying note is no retry, only the
    same SMTP transaction going on (a client that stalls between RCPTs
    for greylist_delay must not pass its later ones). pooled: the client
    group is a sending pool (pools.py); only a pool's trying note lets a
    new recipient pass (sender-retry): for any other client a bot that
    sends one new message after another with one sender, and never
    retries, would pass them all. message_exempt: the message was
    accepted by a correspondent pair, not by a recipient that proved the
    client; the rest of it passes without writes.
    """
    decision = _decide(records, now, cfg, message_accepted, message_deferred, pooled,
                       message_exempt)
    if message_deferred and decision.reason in HOLDABLE and not cfg.learn:
        # Deferred with the message; its writes keep the proof.
        return new(Decision, (_defer(cfg.delay_s, cfg), HELD + decision.reason,
                              decision.age, decision.writes, False))
    return decision


def _decide(records: Records, now: int, cfg: Config, message_accepted: bool,
            message_deferred: bool, pooled: bool, message_exempt: bool) -> Decision:
    triple = _live(records.triple, TRIPLE_STATES, now, cfg)
    sender = _live(records.sender, SENDER_STATES, now, cfg)
    client = _live(records.client, CLIENT_STATES, now, cfg)
    if whitelisted_client(client, cfg):
        manual = client.state == MANUAL
        return new(Decision, (DUNNO, MANUAL_CLIENT if manual else AWL_CLIENT,
                              now - client.first_seen,
                              new(Records, (None, None, _refreshed(client, now, cfg), None)),
                              not manual))
    if sender is not None and (cfg.sender_awl or sender.state == MANUAL):
        manual = sender.state == MANUAL
        return new(Decision, (DUNNO, MANUAL_SENDER if manual else AWL_SENDER,
                              now - sender.first_seen,
                              new(Records, (None, _refreshed(sender, now, cfg), None, None)),
                              not manual))
    if records.pair is not None and _live(records.pair, PAIR_STATES, now, cfg) is not None:
        # No writes: only learning refreshes a pair, so a forged sender
        # never keeps one alive. It accepts the rest of the message
        # (evaluate.render) but proves nothing: a forged sender names it.
        return new(Decision, (DUNNO, CORRESPONDENT_PAIR, now - records.pair.first_seen,
                              NO_RECORDS, False))
    if triple is not None and triple.state == PASSED:
        return new(Decision, (DUNNO, KNOWN, now - triple.first_seen, new(
            Records, (_refreshed(triple, now, cfg), None, None, None)), True))
    if triple is not None and triple.first_seen > now + CLOCK_SLACK_S:
        # First seen in the future: the clock ran ahead and was set back.
        # Counting from now keeps the delay, and the triple is not
        # deferred until the clock catches up with the error.
        triple = Record(now, triple.last_seen, triple.count, PENDING)
    age = 0 if triple is None else now - triple.first_seen
    if triple is not None and age >= cfg.delay_s:
        return _pass(DELAY_PASSED, triple, client, now, cfg)
    if message_accepted:
        if message_exempt:
            # Accepted by a correspondent pair only: the rest of the
            # message passes, but records nothing (no passed triple, no
            # sender entry, no client count) that a forged sender could
            # earn for the next message.
            return new(Decision, (DUNNO, MESSAGE, age, NO_RECORDS, False))
        return _pass(MESSAGE, triple, client, now, cfg)
    # The trying note of this (client group, sender), kept where its
    # sender entry will be: no record of its own to read.
    trying = records.sender
    alive = (trying is not None and trying.state == TRYING
             and 0 <= now - trying.first_seen <= cfg.retry_window_s)
    if pooled and alive and now - trying.first_seen >= cfg.delay_s and not message_deferred:
        return _pass(SENDER_RETRY, triple, None, now, cfg)._replace(
            writes=Records(triple=Record(now if triple is None else triple.first_seen,
                                         now, 1 if triple is None else triple.count + 1,
                                         PASSED)))
    reason = NEW if triple is None else EARLY_RETRY
    if cfg.learn:
        return _pass(LEARN + reason, triple, client, now, cfg)
    # Note when this (client group, sender) began trying, unless a live
    # note says so already (its first_seen is the earliest); never over
    # a live sender entry (with greylist_sender_awl = no, say).
    began = None
    if not alive and sender is None:
        began = Record(now, now, 1, TRYING)
    if triple is None:
        return Decision(_defer(cfg.delay_s, cfg), reason, 0,
                        Records(triple=Record(now, now, 1, PENDING), sender=began))
    seen = Record(triple.first_seen, max(triple.last_seen, now), triple.count + 1, PENDING)
    return Decision(_defer(cfg.delay_s - age, cfg), reason, age,
                    Records(triple=seen, sender=began))


def _live(record: Record | None, kinds: tuple[str, ...], now: int,
          cfg: Config) -> Record | None:
    """The record, unless absent, of a kind its slot does not hold, or expired."""
    # expired(), inline: this runs three times per request.
    if record is None:
        return None
    state = record.state
    if state not in kinds:
        return None
    if state == PENDING:
        return None if now - record.first_seen > cfg.retry_window_s else record
    if state == MANUAL:
        return record
    if state == CORRESPONDENT:
        return None if now - record.last_seen > cfg.correspondent_lifetime_s else record
    return None if now - record.last_seen > cfg.max_age_s else record


def _pass(reason: str, triple: Record | None, client: Record | None, now: int,
          cfg: Config) -> Decision:
    first, count = (now, 1) if triple is None else (triple.first_seen, triple.count + 1)
    if client is None:
        counted = Record(now, now, 1, CLIENT)
    elif now - client.last_seen >= CLIENT_COUNT_INTERVAL_S:
        counted = Record(client.first_seen, now, client.count + 1, CLIENT)
    else:
        counted = None
    return Decision(DUNNO, reason, now - first, Records(
        triple=Record(first, max(now, first), count, PASSED),
        sender=Record(now, now, 1, SENDER) if cfg.sender_awl else None,
        client=counted if cfg.client_awl_passes else None), reason in PROVING)


def _refreshed(record: Record, now: int, cfg: Config) -> Record | None:
    """The record with last_seen now, if past half its lifetime; else None."""
    if record.state == MANUAL or now - record.last_seen <= cfg.max_age_s // 2:
        return None
    return Record(record.first_seen, now, record.count, record.state)


@functools.lru_cache(maxsize=1024)
def _defer_action(template: str, seconds_left: int) -> str:
    if "$" in template:
        # $seconds_left only: "$$" stays for evaluate.fill(), which reads
        # the text once more as a template (a Template here would turn
        # "$$" into "$", and fill() "$$$$5" into "$5").
        import re
        template = re.sub(r"\$\$|\$\{seconds_left\}|\$seconds_left(?![A-Za-z0-9_])",
                          lambda m: "$$" if m.group() == "$$" else str(seconds_left),
                          template)
    return ("DEFER_IF_PERMIT " + template) if template else "DEFER_IF_PERMIT"


def _defer(seconds_left: int, cfg: Config) -> str:
    # $recipient_domain and $client_address are filled in by evaluate.render().
    return _defer_action(cfg.defer_text, seconds_left)
