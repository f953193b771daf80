"""Tests for greylist.decide: screening requests and greylisting decisions."""

import pytest
from hypothesis import given, strategies as st

from greylist.config import Config
from greylist.decide import DUNNO, Decision, decide, screen
from greylist.record import Record

T = 1_700_000_000
DELAY = 300
CFG = Config(delay_s=DELAY, defer_text="Greylisted, please try again in $seconds_left seconds")


def deferred(seconds_left: int) -> str:
    return "DEFER_IF_PERMIT Greylisted, please try again in %d seconds" % seconds_left


def rcpt(**changes: str | None) -> dict[str, str]:
    """An RCPT request as read_request returns it; None removes an attribute."""
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


@pytest.mark.parametrize("record, now, expected", [
    pytest.param(None, T,
                 Decision(deferred(DELAY), "new", 0, Record(T, T, 1, False)),
                 id="new"),
    pytest.param(Record(T, T, 1, False), T + 60,
                 Decision(deferred(DELAY - 60), "early-retry", 60, Record(T, T + 60, 2, False)),
                 id="early-retry"),
    pytest.param(Record(T, T + 60, 2, False), T + 60,
                 Decision(deferred(DELAY - 60), "early-retry", 60, Record(T, T + 60, 3, False)),
                 id="retry-same-second"),
    pytest.param(Record(T, T, 1, False), T + DELAY - 1,
                 Decision(deferred(1), "early-retry", DELAY - 1,
                          Record(T, T + DELAY - 1, 2, False)),
                 id="one-second-early"),
    pytest.param(Record(T, T, 1, False), T + DELAY,
                 Decision(DUNNO, "delay-passed", DELAY, Record(T, T + DELAY, 2, True)),
                 id="exactly-delay"),
    pytest.param(Record(T, T + 100, 5, False), T + 86400,
                 Decision(DUNNO, "delay-passed", 86400, Record(T, T + 86400, 6, True)),
                 id="long-after"),
    pytest.param(Record(T, T + DELAY, 2, True), T + 86400,
                 Decision(DUNNO, "known", 86400, None), id="passed-known-no-write"),
    pytest.param(Record(T, T + DELAY, 2, True), T - 50,
                 Decision(DUNNO, "known", -50, None), id="passed-clock-back"),
])
def test_decide(record, now, expected):
    assert decide(record, now, CFG) == expected


@pytest.mark.parametrize("record, now, expected", [
    pytest.param(Record(T, T + 100, 3, False), T - 50,
                 Decision(deferred(DELAY + 50), "early-retry", -50,
                          Record(T, T + 100, 4, False)),
                 id="before-first-seen"),
    pytest.param(Record(T, T + 100, 3, False), T + 20,
                 Decision(deferred(DELAY - 20), "early-retry", 20,
                          Record(T, T + 100, 4, False)),
                 id="between-first-and-last-seen"),
    pytest.param(Record(T, T + 10 * DELAY, 3, False), T + DELAY - 1,
                 Decision(deferred(1), "early-retry", DELAY - 1,
                          Record(T, T + 10 * DELAY, 4, False)),
                 id="last-seen-after-delay-does-not-pass"),
])
def test_decide_clock_stepping_back(record, now, expected):
    # seconds_left = first_seen + delay - now; last_seen never decreases.
    assert decide(record, now, CFG) == expected


@pytest.mark.parametrize("defer_text, record, action", [
    pytest.param("Retry in $seconds_left s", None,
                 "DEFER_IF_PERMIT Retry in 300 s", id="new"),
    pytest.param("Retry in $seconds_left s", Record(T - 100, T - 100, 1, False),
                 "DEFER_IF_PERMIT Retry in 200 s", id="early-retry"),
    pytest.param("Retry in ${seconds_left}s", None,
                 "DEFER_IF_PERMIT Retry in 300s", id="braces"),
    pytest.param("4.7.1 Greylisted", None,
                 "DEFER_IF_PERMIT 4.7.1 Greylisted", id="no-placeholder"),
    pytest.param("Costs $$5, $seconds_left", None,
                 "DEFER_IF_PERMIT Costs $5, 300", id="escaped-dollar"),
    pytest.param("", None, "DEFER_IF_PERMIT", id="empty-new"),
    pytest.param("", Record(T - 100, T - 100, 1, False), "DEFER_IF_PERMIT",
                 id="empty-early-retry"),
])
def test_defer_text(defer_text, record, action):
    cfg = Config(delay_s=DELAY, defer_text=defer_text)
    assert decide(record, T, cfg).action == action


_times = st.integers(min_value=0, max_value=2**40)
_delays = st.integers(min_value=0, max_value=10**8)
_records = st.builds(Record, _times, _times, st.integers(0, 10**9), st.booleans())


@given(_records, _times, _delays)
def test_decide_on_any_record(record, now, delay):
    d = decide(record, now, Config(delay_s=delay))
    age = now - record.first_seen
    assert d.age == age
    if record.passed:
        assert d == Decision(DUNNO, "known", age, None)
        return
    assert d.record == Record(record.first_seen, max(record.last_seen, now),
                              record.count + 1, age >= delay)
    if age >= delay:
        assert (d.action, d.reason) == (DUNNO, "delay-passed")
    else:
        assert d.reason == "early-retry"
        assert d.action.startswith("DEFER_IF_PERMIT")
        assert " %d seconds" % (record.first_seen + delay - now) in d.action


@given(st.lists(_times, min_size=1, max_size=20), _delays)
def test_history_never_passes_a_triple_early(attempts, delay):
    # Attempts at arbitrary times, the clock stepping back and forth.
    cfg = Config(delay_s=delay)
    first = attempts[0]
    record = None
    for now in attempts:
        d = decide(record, now, cfg)
        if record is None:
            assert d.reason == "new" and d.action.startswith("DEFER_IF_PERMIT")
        elif not record.passed:
            assert (d.action == DUNNO) == (now - first >= delay)
        if d.record is not None:
            assert d.record.first_seen == first
            assert d.record.last_seen >= (record.last_seen if record else now)
            record = d.record
