"""The one order of checks for an SMTPD policy request, and its reply text.

DESCRIPTION
    greylist(8) and greylistctl show both decide a request in this
    order, through these functions and no others:

    1. precheck(): screen() (only RCPT requests with a recipient are
       greylisted; the null sender may be exempt), then the client
       address is checked, then the static exemptions (SASL, trusted
       networks, whitelist files). A Decision here needs no database.
    2. decide() (decide.py) on the triple's three records, with the
       message state of the connection (message.py).
    3. render(): the action as it is sent: a deferring action with the
       request placeholders $recipient_domain and $client_address filled
       in; with greylist_header, the first recipient of a message that
       passed after its delay gets PREPEND X-Greylist instead of DUNNO.
       It updates the message state: a proving decision accepts the rest
       of the message, and the header is sent once per message.

    This module is part of the pure core: no I/O, no clock reads (the
    time is passed in), no logging.
"""

import re
import time

from greylist import __version__
from greylist.config import Config
from greylist.core.decide import CORRESPONDENT_PAIR, DELAY_PASSED, DUNNO, Decision, screen
from greylist.core.lists import Exemptions
from greylist.core.message import Session
from greylist.core.triple import client_address, escape


def precheck(attrs: dict[str, str], cfg: Config,
             exemptions: Exemptions) -> tuple[Decision | None, str | None]:
    """Return (decision, canonical client address) for a request.

    The decision is None when the request needs its records; the address
    is None when screen() answered, before the address was looked at.
    Raises BadAddress for a client_address that is not an address.
    """
    decision = screen(attrs, cfg)
    if decision is not None:
        return decision, None
    address = client_address(attrs.get("client_address"))
    reason = exemptions.reason(attrs, address)
    return (None if reason is None else Decision(DUNNO, reason)), address


def render(decision: Decision, attrs: dict[str, str], address: str, session: Session,
           now: int, cfg: Config, host: str) -> str:
    """Return the action sent for a decision of decide(); update session."""
    if decision.proven:
        session.accepted = session.proven = True
    elif decision.reason == CORRESPONDENT_PAIR:
        session.accepted = True
    if decision.action != DUNNO:
        session.deferred = True
        return fill(decision.action, attrs["recipient"].rpartition("@")[2], address)
    if cfg.header and decision.reason == DELAY_PASSED and not session.header_sent:
        session.header_sent = True
        return header(decision.age, cfg.header_hostname or host, now, cfg.header_text)
    return decision.action


def fill(action: str, recipient_domain: str, client_address: str) -> str:
    """Fill in the request placeholders of a deferring action.

    The values come from the request: white space, controls and bytes
    that are not UTF-8 are written as %xx, because smtpd answers a reply
    that is not valid UTF-8 with its default action.
    """
    if "$" not in action:
        return action
    import string
    return string.Template(action).safe_substitute(
        recipient_domain=escape(recipient_domain), client_address=escape(client_address))


# postgrey's --x-greylist-header default, with this program's name.
HEADER_TEXT = "X-Greylist: delayed %t seconds by greylist-%v at %h; %d"
# RFC 5322 2.1.1: a line is at most 998 characters.
MAX_HEADER = 998


def header(age: int, host: str, now: int, text: str = HEADER_TEXT) -> str:
    """The PREPEND action of the X-Greylist header: text (greylist_header_text,
    checked by config.py) with postgrey's %t (the delay in seconds), %v
    (the version), %h (host), %d (now, local time, RFC 5322 date form)
    and %% filled in. No request value reaches it; host is cut to its
    safe characters and the header to MAX_HEADER characters."""
    host = "".join(c for c in host[:253] if c.isascii() and (c.isalnum() or c in ".-_"))
    values = {"t": "%d" % age, "v": __version__, "h": host or "localhost", "%": "%"}
    if "%d" in text:
        values["d"] = rfc5322_date(now)
    filled = re.sub("%([tvhd%])", lambda m: values[m.group(1)], text)
    return "PREPEND " + filled[:MAX_HEADER]


def rfc5322_date(now: int) -> str:
    """Return now as an RFC 5322 date-time in local time."""
    # The C locale's English names, as RFC 5322 3.3 requires: Python does
    # not set LC_TIME from the environment.
    return time.strftime("%a, %d %b %Y %H:%M:%S %z", time.localtime(now))
