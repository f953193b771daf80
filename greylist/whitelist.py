"""Whitelist files, read at start and again when they change.

DESCRIPTION
    A List notes its files' modification times and sizes and reads them
    again when one changed (core/lists.py parses them). Whitelists holds
    the lists of the settings and has them look at most once per
    check_interval_s (CHECK_INTERVAL_S by default), so that long-lived
    processes see edits without a restart; exemptions() returns the
    core Exemptions in force, which the policy handler matches.

    Whitelists.provenance() names the setting, or the file and line,
    whose entries exempt a request (greylistctl show): it reads the
    files anew, so the per-request matching keeps no line numbers.

DIAGNOSTICS
    A warning for a file that cannot be read (its entries are then
    missing until it can) and for each line that does not parse.
"""

import os

from greylist.config import Config
from greylist.core.lists import (TRUSTED, WHITELIST_CLIENT, WHITELIST_RECIPIENT,
                                 WHITELIST_SENDER, Entries, Exemptions, Warn, empty, locate,
                                 match_address, match_client, merge, parse)
from greylist.files import read_small

CHECK_INTERVAL_S = 10.0
# The largest whitelist file read (postgrey's own are about 10 KB).
MAX_FILE_BYTES = 16 << 20


class List:
    """The entries of some files (and inline entries), reloaded on change."""

    def __init__(self, files: tuple[str, ...], kind: str, warn: Warn,
                 inline: tuple[str, ...] = (), inline_origin: str = "settings",
                 note: Warn | None = None) -> None:
        self.files = files
        self.kind = kind
        self.inline = inline
        self.inline_origin = inline_origin
        self._warn = warn
        self._note = note
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
        self.entries = merge([parse(text, self.kind, origin or "settings", self._warn,
                                    self._note)
                              for origin, text in self._texts(self._warn)])
        return True

    def _texts(self, warn: Warn):
        """Yield (None, text) of the inline entries, then (path, text)
        of each file that can be read."""
        yield None, "\n".join(self.inline)
        for path in self.files:
            try:
                text = read_small(path, MAX_FILE_BYTES)[0].decode("utf-8", "replace")
            except OSError as exc:
                warn("whitelist %s: %s" % (path, exc.strerror))
                continue
            yield path, text

    def locate(self, matches) -> list[str]:
        """"ORIGIN, line N: ENTRY" for each entry that matches alone
        (lists.locate()), the files read anew; inline entries are named
        by their setting."""
        found = []
        for origin, text in self._texts(lambda message: None):
            for number, entry in locate(text, self.kind, matches):
                found.append("%s: %s" % (self.inline_origin, entry) if origin is None
                             else "%s, line %d: %s" % (origin, number, entry))
        return found

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
                 check_interval_s: float = CHECK_INTERVAL_S, note: Warn | None = None) -> None:
        trusted = ()
        if cfg.trusted_networks:
            import ipaddress
            trusted = tuple(ipaddress.ip_network(n, strict=False)
                            for n in cfg.trusted_networks)
        self.check_interval_s = check_interval_s
        self._lists = (List(cfg.whitelist_clients, "client", warn, note=note),
                       List(cfg.whitelist_recipients, "address", warn,
                            inline=cfg.exempt_recipients,
                            inline_origin="greylist_exempt_recipients"),
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

    def provenance(self, reason: str, attrs: dict[str, str], address: str) -> list[str]:
        """Where the entries are that exempt a request (attrs, canonical
        client address) for reason (an Exemptions reason): a line per
        matching network of greylist_trusted_networks, entry of
        greylist_exempt_recipients or file line ("FILE, line N: ENTRY");
        empty for other reasons. For greylistctl show only: it reads
        the files again."""
        if reason == TRUSTED:
            import ipaddress
            ip = ipaddress.ip_address(address)
            return ["greylist_trusted_networks: %s" % network
                    for network in self._trusted if ip in network]
        delimiter = self._delimiter
        if reason == WHITELIST_CLIENT:
            return self._lists[0].locate(lambda entries: match_client(
                entries, address, attrs.get("client_name")))
        if reason == WHITELIST_RECIPIENT:
            return self._lists[1].locate(lambda entries: match_address(
                entries, attrs["recipient"], delimiter))
        if reason == WHITELIST_SENDER:
            return self._lists[2].locate(lambda entries: match_address(
                entries, attrs["sender"], delimiter))
        return []

    def _build(self) -> Exemptions:
        clients, recipients, senders = (each.current() for each in self._lists)
        return Exemptions(self._trusted, clients, recipients, senders, self._delimiter)
