"""Greylisting decisions as pure functions of request, record, time, settings.

DESCRIPTION
    screen() answers requests that need no database: only the RCPT stage
    is greylisted, because DEFER_IF_PERMIT defers one recipient there,
    while at CONNECT, HELO, MAIL, DATA and END-OF-MESSAGE there is no
    single recipient to defer (smtpd restores the defer_if_permit flag
    per recipient). It also exempts the null sender when the
    greylist_null_sender setting is "no".

    decide() answers an RCPT request from the stored record of its
    triple:
        no record               DEFER_IF_PERMIT, store a pending record
        pending, age < delay    DEFER_IF_PERMIT, count the early retry
        pending, age >= delay   DUNNO, store the record as passed
        passed                  DUNNO, no write
    The age is now - first_seen. A clock that steps back makes the age
    smaller, never larger, so it never passes a triple early.
"""

import string
from dataclasses import dataclass

from greylist.config import Config
from greylist.record import Record

DUNNO = "DUNNO"


@dataclass(frozen=True, slots=True)
class Decision:
    """An action with its reason; record is what to store (None: no write)."""

    action: str
    reason: str
    age: int = 0
    record: Record | None = None


def screen(attrs: dict[str, str], cfg: Config) -> Decision | None:
    """Return the decision for a request that needs no lookup, else None."""
    state = attrs.get("protocol_state", "")
    if state.upper() != "RCPT":
        return Decision(DUNNO, "protocol_state=" + (state[:20] or "missing"))
    if "recipient" not in attrs:
        return Decision(DUNNO, "no recipient")
    if not cfg.null_sender and not attrs.get("sender"):
        return Decision(DUNNO, "null sender")
    return None


def decide(record: Record | None, now: int, cfg: Config) -> Decision:
    """Return the decision for a triple whose stored record is record."""
    if record is None:
        return Decision(_defer(cfg, cfg.delay_s), "new", 0,
                        Record(now, now, 1, passed=False))
    age = now - record.first_seen
    if record.passed:
        return Decision(DUNNO, "known", age)
    seen = Record(record.first_seen, max(record.last_seen, now), record.count + 1,
                  passed=age >= cfg.delay_s)
    if seen.passed:
        return Decision(DUNNO, "delay-passed", age, seen)
    return Decision(_defer(cfg, cfg.delay_s - age), "early-retry", age, seen)


def _defer(cfg: Config, seconds_left: int) -> str:
    text = string.Template(cfg.defer_text).safe_substitute(seconds_left=seconds_left)
    return ("DEFER_IF_PERMIT " + text) if text else "DEFER_IF_PERMIT"
