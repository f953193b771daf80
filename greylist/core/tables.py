"""The values of the Postfix tables greylist exports for postscreen(8).

DESCRIPTION
    The postscreen table (greylist_postscreen_table) lists client
    addresses that greylisting has proven, for postscreen_access_list,
    which looks up the exact client address and reads the value as an
    access list. A value is "permit STAMP" (a client that earned the
    client auto-whitelist; STAMP is when it was last seen so) or "permit
    manual" (greylistctl whitelist add): postscreen stops at "permit"
    and never reads the second word, which cleanup uses for expiry.

    permit_change() refreshes an entry only once past half of
    greylist_max_age, so a proven client's requests rarely write.

    The table never permits what the callout would drop or enforce:
    screen_denied() says whether an address lies in
    greylist_postscreen_drop_networks or greylist_postscreen_enforce_networks;
    such an address gets no entry, and cleanup removes one it has (an
    entry written before the network was listed).

    This module is part of the pure core: no I/O, no clock, no logging.
"""

import functools

MANUAL_PERMIT = b"permit manual"
# The client table's value of a manual entry (greylistctl whitelist add).
MANUAL_OK = b"OK manual"


def stamp_change(now: int):
    """The change of a client table entry for a client that earned (or
    refreshed) the auto-whitelist: the time stamp, unless the entry is a
    manual one, which stays (its automatic value is kept aside by
    greylistctl and is not refreshed while the manual entry stands)."""
    def change(values: list[bytes | None]) -> tuple[list[bytes | None], bool]:
        if values[0] == MANUAL_OK:
            return [None], False
        return [b"%d" % now], True
    return change


def permit_change(now: int, manual: bool, max_age_s: int):
    """The change of a postscreen table entry for a proven client; its
    result is True when it writes."""
    def change(values: list[bytes | None]) -> tuple[list[bytes | None], bool]:
        old = values[0]
        if manual:
            return ([None], False) if old == MANUAL_PERMIT else ([MANUAL_PERMIT], True)
        if old == MANUAL_PERMIT:
            return [None], False
        stamp = permit_stamp(old)
        if stamp is not None and 0 <= now - stamp <= max_age_s // 2:
            return [None], False
        return [b"permit %d" % now], True
    return change


def permit_stamp(value: bytes | None) -> int | None:
    """The time stamp of a "permit STAMP" value, else None."""
    if value is None or not value.startswith(b"permit "):
        return None
    stamp = value[len(b"permit "):]
    return int(stamp) if stamp.isdigit() and len(stamp) <= 19 else None


def permit_expired(value: bytes, now: int, max_age_s: int) -> bool:
    """Whether cleanup removes a postscreen table entry: a "permit STAMP"
    more than max_age_s old. Manual and unknown values stay."""
    stamp = permit_stamp(value)
    return stamp is not None and now - stamp > max_age_s


def stamp_expire_at(value: bytes, lifetime_s: int) -> int | None:
    """For stores that expire entries themselves (Redis): the first second
    at which cleanup would remove a table value, a numeric time stamp or
    "permit STAMP"; None for values it keeps ("permit manual")."""
    stamp = permit_stamp(value)
    if stamp is None and value.isdigit() and len(value) <= 19:
        stamp = int(value)
    return None if stamp is None else stamp + lifetime_s + 1


def screen_denied(address: str, drop: tuple[str, ...], enforce: tuple[str, ...]) -> bool:
    """Whether a canonical address lies in one of the networks that the
    callout answers drop or enforce (the settings' tuples)."""
    return in_networks(address, drop) or in_networks(address, enforce)


def in_networks(address: str, specs: tuple[str, ...]) -> bool:
    """Whether a canonical address lies in one of the networks of specs
    (a setting's tuple, parsed once); False for anything that is no
    address."""
    if not specs:
        return False
    import ipaddress
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in _networks(specs))


@functools.lru_cache(maxsize=8)
def _networks(specs: tuple[str, ...]) -> tuple:
    import ipaddress
    return tuple(ipaddress.ip_network(spec, strict=False) for spec in specs)
