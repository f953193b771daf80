"""Tests for greylist.core.decide: screening requests and greylisting decisions."""


import pytest
from hypothesis import given, strategies as st

from greylist.config import Config
from greylist.core.decide import (DUNNO, NO_RECORDS, SLOT_STATES, Decision, Records, decide,
                                  expired, screen)
from greylist.core.evaluate import fill
from greylist.core.record import CLIENT, MANUAL, PASSED, PENDING, SENDER, TRYING, Record

T = 1_700_000_000
DELAY = 300
CFG = Config(delay_s=DELAY, defer_text="Greylisted, please try again in $seconds_left seconds")


def deferred(seconds_left: int) -> str:
    return "DEFER_IF_PERMIT Greylisted, please try again in %d seconds" % seconds_left


def rcpt(**changes: str | None) -> dict[str, str]:
    """An RCPT request as Reader.read returns it; None removes an attribute."""
    attrs = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
             "client_address": "192.0.2.1", "sender": "alice@example.net",
             "recipient": "bob@example.org"}
    attrs.update(changes)
    return {name: value for name, value in attrs.items() if value is not None}


@pytest.mark.parametrize("state, reason", [
    pytest.param("CONNECT", "protocol_state=CONNECT", id="connect"),
    pytest.param("EHLO", "protocol_state=EHLO", id="ehlo"),
    pytest.param("HELO", "protocol_state=HELO", id="helo"),
    pytest.param("MAIL", "protocol_state=MAIL", id="mail"),
    pytest.param("DATA", "protocol_state=DATA", id="data"),
    pytest.param("END-OF-MESSAGE", "protocol_state=END-OF-MESSAGE", id="end-of-message"),
    pytest.param("VRFY", "protocol_state=VRFY", id="vrfy"),
    pytest.param("ETRN", "protocol_state=ETRN", id="etrn"),
    pytest.param("RCPTX", "protocol_state=RCPTX", id="rcpt-prefix"),
    pytest.param(None, "protocol_state=missing", id="missing"),
])
def test_screen_passes_other_stages(state, reason):
    # DATA and END-OF-MESSAGE requests may carry a recipient: still DUNNO.
    assert screen(rcpt(protocol_state=state), CFG) == Decision(DUNNO, reason)


@pytest.mark.parametrize("attrs, null_sender, expected", [
    pytest.param(rcpt(), True, None, id="rcpt"),
    pytest.param(rcpt(protocol_state="rcpt"), True, None, id="rcpt-lowercase"),
    pytest.param(rcpt(protocol_state="Rcpt"), True, None, id="rcpt-mixed-case"),
    pytest.param(rcpt(recipient=None), True, Decision(DUNNO, "no recipient"),
                 id="no-recipient"),
    pytest.param(rcpt(sender=None), True, None, id="null-sender-greylisted"),
    pytest.param(rcpt(sender=None), False, Decision(DUNNO, "null sender"),
                 id="null-sender-exempt"),
    pytest.param(rcpt(), False, None, id="sender-greylisted-when-null-exempt"),
])
def test_screen_rcpt(attrs, null_sender, expected):
    cfg = Config(delay_s=DELAY, null_sender=null_sender)
    assert screen(attrs, cfg) == expected


# Decisions on the triple alone: both auto-whitelists off.
TRIPLE_ONLY = CFG._replace(sender_awl=False, client_awl_passes=0)


def only(triple=None):
    return Records(triple=triple)


def noted(triple, now):
    """A deferring decision's writes: the triple, and the note that its
    (client group, sender) is trying since now (none was alive)."""
    return Records(triple=triple, sender=Record(now, now, 1, TRYING))


@pytest.mark.parametrize("record, now, expected", [
    pytest.param(None, T,
                 Decision(deferred(DELAY), "new", 0, noted(Record(T, T, 1, PENDING), T)),
                 id="new"),
    pytest.param(Record(T, T, 1, PENDING), T + 60,
                 Decision(deferred(DELAY - 60), "early-retry", 60,
                          noted(Record(T, T + 60, 2, PENDING), T + 60)), id="early-retry"),
    pytest.param(Record(T, T, 1, PENDING), T + DELAY - 1,
                 Decision(deferred(1), "early-retry", DELAY - 1,
                          noted(Record(T, T + DELAY - 1, 2, PENDING), T + DELAY - 1)),
                 id="one-second-early"),
    pytest.param(Record(T, T, 1, PENDING), T + DELAY,
                 Decision(DUNNO, "delay-passed", DELAY, only(Record(T, T + DELAY, 2, PASSED)),
                          True), id="exactly-delay"),
    pytest.param(Record(T, T + DELAY, 2, PASSED), T + 86400,
                 Decision(DUNNO, "known", 86400, NO_RECORDS, True), id="known-no-write"),
    # A first sight in the future (the clock was set back): counted from
    # now, so the full delay applies from now, not from the future.
    pytest.param(Record(T, T + 100, 3, PENDING), T - 500,
                 Decision(deferred(DELAY), "early-retry", 0,
                          noted(Record(T - 500, T + 100, 4, PENDING), T - 500)),
                 id="clock-back-pending"),
    # Less than CLOCK_SLACK_S ahead: another process read its clock a
    # moment later and wrote first; the first sight stays.
    pytest.param(Record(T, T, 1, PENDING), T - 1,
                 Decision(deferred(DELAY + 1), "early-retry", -1,
                          noted(Record(T, T, 2, PENDING), T - 1)),
                 id="raced-by-one-second"),
    pytest.param(Record(T, T + DELAY, 2, PASSED), T - 50,
                 Decision(DUNNO, "known", -50, NO_RECORDS, True), id="clock-back-passed"),
])
def test_decide_triple(record, now, expected):
    assert decide(only(record), now, TRIPLE_ONLY) == expected


@pytest.mark.parametrize("since, triple, reason", [
    (T - DELAY, None, "sender-retry"),
    (T - DELAY + 1, None, "new"),
    (T - DELAY, Record(T - 10, T - 10, 1, PENDING), "sender-retry"),
    (T - 2 * 86400 - 1, None, "new"),     # the note expired with the retry window
    (T + 50, None, "new"),                # a note from the future proves nothing
])
def test_a_new_recipient_passes_once_the_client_tried_the_sender_for_the_delay(
        since, triple, reason):
    decision = decide(Records(triple=triple, sender=Record(since, since, 1, TRYING)), T,
                      TRIPLE_ONLY, pooled=True)
    assert decision.reason == reason
    if reason == "sender-retry":
        assert decision.proven and decision.writes.triple.state == PASSED
    else:
        # The live note is kept (its first_seen is the earliest); a dead
        # one is replaced.
        alive = 0 <= T - since <= 2 * 86400
        assert decision.writes.sender == (None if alive else Record(T, T, 1, TRYING))


def test_the_issue_16_trace_is_not_split():
    """+0 dave new; +15405 a new instance, heidi first, then dave."""
    first = decide(Records(), T, TRIPLE_ONLY)
    dave, note = first.writes.triple, first.writes.sender
    heidi = decide(Records(sender=note), T + 15405, TRIPLE_ONLY, pooled=True)
    assert (heidi.action, heidi.reason, heidi.proven) == (DUNNO, "sender-retry", True)
    again = decide(Records(triple=dave, sender=note), T + 15405, TRIPLE_ONLY, True,
                   pooled=True)
    assert (again.action, again.reason) == (DUNNO, "delay-passed")


@pytest.mark.parametrize("records, learn, reason, proven", [
    (Records(client=Record(T, T, 5, CLIENT)), False, "awl-client", True),
    (Records(client=Record(T, T, 1, MANUAL)), False, "manual-client", False),
    (Records(sender=Record(T, T, 1, SENDER)), False, "awl-sender", True),
    (Records(sender=Record(T, T, 1, MANUAL)), False, "manual-sender", False),
    (only(Record(T, T, 2, PASSED)), False, "known", True),
    (only(Record(T - DELAY, T - DELAY, 1, PENDING)), False, "delay-passed", True),
    (NO_RECORDS, False, "new", False),
    (only(Record(T, T, 1, PENDING)), False, "early-retry", False),
    (NO_RECORDS, True, "learn:new", False),
])
def test_a_decision_says_whether_it_proves_the_client(records, learn, reason, proven):
    decision = decide(records, T, CFG._replace(learn=learn))
    assert (decision.reason, decision.proven) == (reason, proven)


WINDOW, MAX_AGE = CFG.retry_window_s, CFG.max_age_s


@pytest.mark.parametrize("record, now, is_expired", [
    pytest.param(Record(T, T, 1, PENDING), T + WINDOW, False, id="pending-at-window"),
    pytest.param(Record(T, T, 1, PENDING), T + WINDOW + 1, True, id="pending-after-window"),
    pytest.param(Record(T, T + 10, 2, PENDING), T + WINDOW + 1, True,
                 id="window-counts-from-first-seen"),
    pytest.param(Record(T, T, 2, PASSED), T + MAX_AGE, False, id="passed-at-max-age"),
    pytest.param(Record(T, T, 2, PASSED), T + MAX_AGE + 1, True, id="passed-after-max-age"),
    pytest.param(Record(0, T, 2, PASSED), T + MAX_AGE, False, id="max-age-from-last-seen"),
    pytest.param(Record(T, T, 1, SENDER), T + MAX_AGE + 1, True, id="sender-entry"),
    pytest.param(Record(T, T, 9, CLIENT), T + MAX_AGE + 1, True, id="client-entry"),
    pytest.param(Record(T, T, 1, PENDING), T - 10**6, False, id="clock-back"),
])
def test_expired_at_each_lifetime_boundary(record, now, is_expired):
    assert expired(record, now, CFG) is is_expired


def test_retry_after_the_retry_window_counts_as_new():
    decision = decide(only(Record(T, T + 60, 2, PENDING)), T + WINDOW + 1, TRIPLE_ONLY)
    assert decision.reason == "new"
    assert decision.writes.triple == Record(T + WINDOW + 1, T + WINDOW + 1, 1, PENDING)


@pytest.mark.parametrize("records, now, reason", [
    pytest.param(only(Record(T, T + 60, 2, PENDING)), T + WINDOW, "delay-passed",
                 id="pending-at-window"),
    pytest.param(only(Record(T, T, 2, PASSED)), T + MAX_AGE, "known", id="passed-at-max-age"),
    pytest.param(Records(sender=Record(T, T, 1, SENDER)), T + MAX_AGE, "awl-sender",
                 id="sender-at-max-age"),
    pytest.param(Records(client=Record(T, T, 9, CLIENT)), T + MAX_AGE, "awl-client",
                 id="client-at-max-age"),
])
def test_a_record_at_the_end_of_its_lifetime_is_still_used(records, now, reason):
    # decide() reads the lifetimes inline (_live): it must agree with
    # expired() at the boundary, where the record is still alive.
    assert not any(expired(r, now, CFG) for r in records if r is not None)
    assert decide(records, now, CFG).reason == reason


def test_passed_triple_expires_after_max_age_and_is_greylisted_again():
    decision = decide(only(Record(T, T, 2, PASSED)), T + MAX_AGE + 1, TRIPLE_ONLY)
    assert decision.action.startswith("DEFER_IF_PERMIT") and decision.reason == "new"


@pytest.mark.parametrize("last_seen_ago, refreshed", [
    pytest.param(MAX_AGE // 2, False, id="at-half-life"),
    pytest.param(MAX_AGE // 2 + 1, True, id="past-half-life"),
    pytest.param(MAX_AGE, True, id="at-max-age"),
])
def test_known_triple_is_refreshed_only_past_half_its_lifetime(last_seen_ago, refreshed):
    now = T + 10**7
    record = Record(T, now - last_seen_ago, 2, PASSED)
    writes = decide(only(record), now, TRIPLE_ONLY).writes
    assert writes == (only(Record(T, now, 2, PASSED)) if refreshed else NO_RECORDS)


def test_pass_makes_a_sender_entry_and_counts_the_client():
    decision = decide(only(Record(T, T, 1, PENDING)), T + DELAY, CFG)
    assert decision.writes == Records(Record(T, T + DELAY, 2, PASSED),
                                      Record(T + DELAY, T + DELAY, 1, SENDER),
                                      Record(T + DELAY, T + DELAY, 1, CLIENT))


def test_sender_entry_passes_a_new_recipient_of_a_proven_sender():
    # postgrey #93: a new CC recipient of a sender that already retried.
    sender = Record(T, T, 1, SENDER)
    decision = decide(Records(sender=sender), T + 3600, CFG)
    assert (decision.action, decision.reason, decision.writes) == (DUNNO, "awl-sender",
                                                                   NO_RECORDS)


@pytest.mark.parametrize("count, passes", [(4, False), (5, True)])
def test_client_is_whitelisted_after_five_counted_passes(count, passes):
    decision = decide(Records(client=Record(T, T, count, CLIENT)), T + 10, CFG)
    assert (decision.reason == "awl-client") is passes
    assert decision.action.startswith("DEFER_IF_PERMIT") is not passes


def test_client_auto_whitelist_can_be_disabled():
    cfg = CFG._replace(client_awl_passes=0)
    decision = decide(Records(client=Record(T, T, 99, CLIENT)), T + 10, cfg)
    assert decision.reason == "new"


@pytest.mark.parametrize("since_last, counted", [(3599, False), (3600, True)])
def test_at_most_one_pass_an_hour_counts_for_the_client(since_last, counted):
    client = Record(T, T, 2, CLIENT)
    now = T + since_last
    decision = decide(Records(triple=Record(now - DELAY, now - DELAY, 1, PENDING),
                              client=client), now, CFG)
    assert decision.reason == "delay-passed"
    assert decision.writes.client == (Record(T, now, 3, CLIENT) if counted else None)


def test_other_recipient_of_an_accepted_message_passes_and_is_recorded():
    decision = decide(NO_RECORDS, T, CFG, message_accepted=True)
    assert (decision.action, decision.reason) == (DUNNO, "message")
    assert decision.writes.triple == Record(T, T, 1, PASSED)


@pytest.mark.parametrize("record, reason", [
    pytest.param(None, "learn:new", id="new"),
    pytest.param(Record(T, T, 1, PENDING), "learn:early-retry", id="early-retry"),
])
def test_learn_mode_passes_and_records_what_would_be_deferred(record, reason):
    decision = decide(only(record), T + 10, CFG._replace(learn=True))
    assert (decision.action, decision.reason) == (DUNNO, reason)
    assert decision.writes.triple.state == PASSED
    assert decision.writes.sender == Record(T + 10, T + 10, 1, SENDER)


@pytest.mark.parametrize("text, expected", [
    pytest.param("Retry in $seconds_left s", "DEFER_IF_PERMIT Retry in 300 s", id="seconds"),
    pytest.param("$recipient_domain: $client_address", "DEFER_IF_PERMIT example.org: 192.0.2.1",
                 id="request-placeholders"),
    pytest.param("Cost $$5", "DEFER_IF_PERMIT Cost $5", id="escaped-dollar"),
    # Review: unescaped twice, "$$$$5" was sent as "$5", and a literal
    # "$$client_address" as the client's address.
    pytest.param("Cost $$$$5, $$client_address, $${seconds_left}",
                 "DEFER_IF_PERMIT Cost $$5, $client_address, ${seconds_left}",
                 id="escaped-twice"),
    pytest.param("in ${seconds_left}s", "DEFER_IF_PERMIT in 300s", id="braced"),
    pytest.param("", "DEFER_IF_PERMIT", id="empty"),
])
def test_defer_text_placeholders(text, expected):
    decision = decide(NO_RECORDS, T, CFG._replace(defer_text=text))
    assert fill(decision.action, "example.org", "192.0.2.1") == expected


_times = st.integers(min_value=0, max_value=4 * 10**9)
_states = st.sampled_from((PENDING, PASSED, SENDER, CLIENT, MANUAL))
_records = st.one_of(st.none(), st.builds(Record, _times, _times,
                                          st.integers(0, 10), _states))


@given(_records, _times)
def test_a_pending_triple_never_passes_before_the_delay(record, now):
    decision = decide(only(record), now, TRIPLE_ONLY)
    if decision.action == DUNNO:
        assert record is not None and not expired(record, now, TRIPLE_ONLY)
        assert record.state != PENDING or now - record.first_seen >= DELAY


@given(_records, _records, _records, _times, st.booleans())
def test_decide_never_raises_and_writes_only_valid_records(t, s, c, now, accepted):
    decision = decide(Records(t, s, c), now, CFG, accepted)
    assert decision.action
    writes = (decision.writes.triple, decision.writes.sender, decision.writes.client)
    for record, kinds in zip(writes, SLOT_STATES):
        assert record is None or record.state in kinds


@given(_records, _times)
def test_expired_records_are_treated_as_absent(record, now):
    if record is not None and expired(record, now, TRIPLE_ONLY):
        assert decide(only(record), now, TRIPLE_ONLY) == decide(NO_RECORDS, now, TRIPLE_ONLY)


@pytest.mark.parametrize("records", [
    Records(triple=Record(T, T, 1, SENDER)),
    Records(sender=Record(T, T, 9, CLIENT)),
    Records(client=Record(T, T, 9, PASSED)),
], ids=["sender-as-triple", "client-as-sender", "triple-as-client"])
def test_a_record_of_the_wrong_kind_is_treated_as_absent(records):
    assert decide(records, T + 10, CFG).reason == "new"


def test_a_client_stalling_inside_one_message_is_no_retry():
    """The note was left by a deferral in this same message: a later RCPT
    of it, after the delay, is not a retry (a bot that stalls between
    RCPTs), so it is deferred like the first."""
    note = Record(T, T, 1, TRYING)
    stalled = decide(Records(sender=note), T + DELAY + 60, TRIPLE_ONLY, False, True, True)
    assert stalled.reason == "new" and stalled.action.startswith("DEFER_IF_PERMIT")
    assert decide(Records(sender=note), T + DELAY + 60, TRIPLE_ONLY,
                  pooled=True).reason == "sender-retry"


def test_a_bot_that_never_retries_gets_no_sender_retry():
    """Found in review: a new message after another, one sender, one /24,
    never a retry, passed from the second message on. Only a sending
    pool's note counts, and a sender-retry pass proves nothing more."""
    note = Record(T, T, 1, TRYING)
    later = decide(Records(sender=note), T + DELAY + 60, CFG)
    assert later.reason == "new" and later.action.startswith("DEFER_IF_PERMIT")
    pooled = decide(Records(sender=note), T + DELAY + 60, CFG, pooled=True)
    assert pooled.reason == "sender-retry"
    assert pooled.writes.sender is None and pooled.writes.client is None


@given(_records, _records, _records, _times, st.booleans(), st.booleans())
def test_after_a_deferred_recipient_only_an_exemption_passes(t, s, c, now, accepted, pooled):
    """One message is accepted or deferred as a whole: once a recipient
    was deferred, a pass by the greylisting records is held (deferred,
    its writes kept), and only manual entries and pairs pass."""
    records = Records(triple=t, sender=s, client=c)
    alone = decide(records, now, CFG, accepted, False, pooled)
    held = decide(records, now, CFG, accepted, True, pooled)
    if held.action == "DUNNO":
        assert held.reason in ("manual-client", "manual-sender", "correspondent"), held
        assert held == alone
    elif alone.action == "DUNNO" and alone.reason != "sender-retry":
        assert held.reason == "held:" + alone.reason and not held.proven
        assert held.writes == alone.writes and held.action == deferred(DELAY)


def test_nothing_is_held_in_learn_mode():
    """Found in review: with greylist_failure_action = DEFER_IF_PERMIT a
    database failure marks the message deferred; learn mode must not then
    defer the rest of it."""
    learn = CFG._replace(learn=True)
    known = Records(triple=Record(T, T, 1, PASSED))
    assert decide(known, T + 100, learn, False, True).reason == "known"
    assert decide(known, T + 100, CFG, False, True).reason == "held:known"
