"""Whitelist files, read at start and again when they change.

DESCRIPTION
    A List notes its files' modification times and sizes and reads them
    again when one changed (core/lists.py parses them). Whitelists holds
    the lists of the settings and has them look at most once per
    check_interval_s (CHECK_INTERVAL_S by default), so that long-lived
    processes see edits without a restart; exemptions() returns the
    core Exemptions in force, which the policy handler matches.

DIAGNOSTICS
    A warning for a file that cannot be read (its entries are then
    missing until it can) and for each line that does not parse.
"""

import os

from greylist.config import Config
from greylist.core.lists import Entries, Exemptions, Warn, empty, merge, parse

CHECK_INTERVAL_S = 10.0


class List:
    """The entries of some files (and inline entries), reloaded on change."""

    def __init__(self, files: tuple[str, ...], kind: str, warn: Warn,
                 inline: tuple[str, ...] = ()) -> None:
        self.files = files
        self.kind = kind
        self.inline = inline
        self._warn = warn
        self._stamps: list[tuple[int, int] | None] | None = None
        self.entries = Entries()
        self.empty = not files and not inline
        self.refresh()

    def refresh(self) -> bool:
        """Reload the files if one changed since the last look; return
        whether the entries changed."""
        if self.empty:
            return False
        stamps = [_stamp(path) for path in self.files]
        if stamps == self._stamps:
            return False
        self._stamps = stamps
        parts = [parse("\n".join(self.inline), self.kind, "settings", self._warn)]
        for path in self.files:
            try:
                with open(path, encoding="utf-8", errors="replace") as handle:
                    text = handle.read()
            except OSError as exc:
                self._warn("whitelist %s: %s" % (path, exc.strerror))
                continue
            parts.append(parse(text, self.kind, path, self._warn))
        self.entries = merge(parts)
        return True

    def current(self) -> Entries | None:
        """The entries, or None when there are none."""
        return None if self.empty or empty(self.entries) else self.entries


def _stamp(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class Whitelists:
    """The lists of the settings, and the exemptions they make."""

    def __init__(self, cfg: Config, warn: Warn,
                 check_interval_s: float = CHECK_INTERVAL_S) -> None:
        trusted = ()
        if cfg.trusted_networks:
            import ipaddress
            trusted = tuple(ipaddress.ip_network(n, strict=False)
                            for n in cfg.trusted_networks)
        self.check_interval_s = check_interval_s
        self._lists = (List(cfg.whitelist_clients, "client", warn),
                       List(cfg.whitelist_recipients, "address", warn,
                            inline=cfg.exempt_recipients),
                       List(cfg.whitelist_senders, "address", warn))
        self._trusted = trusted
        self._delimiter = cfg.sender_delimiter
        self._exemptions = self._build()
        self._refreshed_at = 0.0  # The lists loaded just now, at time 0.

    def exemptions(self, now: float) -> Exemptions:
        """The exemptions in force at now; the files are looked at when
        check_interval_s has passed since the last look (or the clock
        stepped back)."""
        if not 0 <= now - self._refreshed_at < self.check_interval_s:
            self._refreshed_at = now
            if any([each.refresh() for each in self._lists]):
                self._exemptions = self._build()
        return self._exemptions

    def _build(self) -> Exemptions:
        clients, recipients, senders = (each.current() for each in self._lists)
        return Exemptions(self._trusted, clients, recipients, senders, self._delimiter)
