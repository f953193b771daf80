"""Settings: Postfix-style settings files, time values, the frozen Config.

DESCRIPTION
    A settings file uses Postfix main.cf syntax: "name = value" lines;
    a line that starts with white space continues the previous one;
    empty lines and lines whose first non-blank character is "#" are
    ignored. Every setting has one name, used in the file, in the
    Config field table below and in greylist(8). Time values take the
    Postfix units s, m, h, d and w; a bare number means seconds.

    The names derived from greylist_database (the client table, the
    privacy secret, the cleanup state file) are resolved once, by
    resolve(), when load() returns the settings: every program and
    module then reads them from Config, none computes them.

DIAGNOSTICS
    ConfigError for an unknown name, a malformed line, an invalid
    value or a settings file that anyone can write (or, for a process
    running as root, anyone but root); callers log it as fatal.
"""

import os
import re
import stat
from typing import NamedTuple

from greylist.files import read_small

DEFAULT_DATABASE = "/var/lib/greylist/greylist"


class ConfigError(Exception):
    """An invalid setting, settings file or command-line value."""


class Config(NamedTuple):
    """Validated settings; see greylist(8) for each setting's meaning.

    A named tuple (immutable; _replace() for a changed copy): it costs
    less start-up time under spawn(8) than a dataclass.
    """

    database: str = DEFAULT_DATABASE
    # 180 s: below the 200-285 s first retry of many MTAs reported by
    # mail-in-a-box (PR #403), which otherwise wait hours for a second one.
    delay_s: int = 180
    # postgrey's defaults: --retry-window 2d, --max-age 35d.
    retry_window_s: int = 2 * 86400
    max_age_s: int = 35 * 86400
    # verify(8)'s address_verify_cache_cleanup_interval default.
    cleanup_interval_s: int = 12 * 3600
    # "" until resolve(): then the table's name, or "" for none.
    client_table: str = ""
    # Pools of big senders as one client; everyone else by prefix
    # (greylist(8), The triple; bench/RESULTS.md run L).
    client_match: str = "pool"
    pool_domains: tuple[str, ...] = ()
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    sender_delimiter: str = "+"
    # postgrey's --auto-whitelist-clients default.
    client_awl_passes: int = 5
    sender_awl: bool = True
    whitelist_clients: tuple[str, ...] = ()
    whitelist_recipients: tuple[str, ...] = ()
    whitelist_senders: tuple[str, ...] = ()
    # RFC 5321 4.5.1 (postmaster) and RFC 2142 (abuse) addresses.
    exempt_recipients: tuple[str, ...] = ("postmaster@", "abuse@")
    trusted_networks: tuple[str, ...] = ()
    defer_text: str = "Greylisted, please try again in $seconds_left seconds"
    header: bool = False
    # postgrey's --x-greylist-header default (core/evaluate.py HEADER_TEXT);
    # "" host: the system's host name.
    header_text: str = "X-Greylist: delayed %t seconds by greylist-%v at %h; %d"
    header_hostname: str = ""
    learn: bool = False
    privacy: bool = False
    # "" until resolve(): then the secret file's name.
    secret_file: str = ""
    null_sender: bool = True
    failure_action: str = "DUNNO"
    log: str = "syslog"
    # Postfix's myhostname, for file and postlog lines (log.py): "" for
    # the system's host name, which is myhostname's default.
    log_hostname: str = ""
    allow_root: bool = False
    # greylistd(8): listeners in Postfix's notation, and their details.
    policy_listen: tuple[str, ...] = ()
    metrics_listen: tuple[str, ...] = ()
    socket_mode: int = 0o660
    socket_group: str = ""
    user: str = ""
    # Longer than smtpd_policy_service_max_idle (300s): Postfix closes
    # first, as it expects to.
    idle_timeout_s: int = 600
    max_connections: int = 1000
    commit_batch: int = 256
    # Redis (greylist_database = redis...): a few hundred milliseconds at
    # most, so that a failing Redis is answered within smtpd's patience.
    redis_timeout_ms: int = 300
    redis_password_file: str = ""
    # The sentinels' own login (redis-sentinel://), when they require one.
    redis_sentinel_password_file: str = ""
    # rediss://: the CAs of the server's certificate ("": the system's),
    # and a client certificate and key ("": none).
    redis_tls_ca_file: str = ""
    redis_tls_cert_file: str = ""
    redis_tls_key_file: str = ""
    # The longest wait for a database lock (lmdb_table(5) locking), so
    # that a process holding one (even another user's shared lock) costs
    # a bounded delay and an answer of greylist_failure_action.
    lock_timeout_ms: int = 2000
    # Correspondents (greylist-socketmap(8), greylist --outbound): "" until
    # resolve(): then the address table's name, or "" for none.
    correspondent_table: str = ""
    # Replies come mostly within days (one in ten within 30 minutes), but
    # threads resume after holidays and monthly cycles: 60 days, refreshed
    # at half-life by each new message, so active correspondents never
    # expire (greylist(8), CORRESPONDENTS).
    correspondent_lifetime_s: int = 60 * 86400
    correspondent_check: bool = True
    local_domains: tuple[str, ...] = ()
    socketmap_sender_name: str = "sender"
    socketmap_recipient_name: str = "rcpt"
    socketmap_header_name: str = "header"
    outbound_require_sasl: bool = True
    # The postscreen callout (greylist-postscreen(8)): "" until resolve().
    postscreen_table: str = ""
    # postscreen's own postscreen_greet_ttl: a day.
    postscreen_ttl_s: int = 86400
    postscreen_drop_networks: tuple[str, ...] = ()
    postscreen_enforce_networks: tuple[str, ...] = ()
    postscreen_service_name: str = ""
    socketmap_postscreen_name: str = "postscreen"
    socketmap_clients_name: str = "clients"
    socketmap_correspondents_name: str = "correspondents"
    postscreen_listen: tuple[str, ...] = ()
    socketmap_listen: tuple[str, ...] = ()
    outbound_listen: tuple[str, ...] = ()
    verbose: int = 0
    # Derived by resolve(), not a setting: the cleanup state file.
    cleanup_state: str = ""
    # Whether resolve() ran.
    resolved: bool = False


# Setting name -> (Config field, parser).
def _parse_time(name: str, value: str) -> int:
    match = re.fullmatch(r"([0-9]{1,9})([smhdw]?)", value.strip())
    if match is None:
        raise ConfigError("%s: invalid time value %r (use a number with an "
                          "optional unit s, m, h, d or w)" % (name, value))
    return int(match.group(1)) * _UNITS[match.group(2)]


_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _parse_bool(name: str, value: str) -> bool:
    word = value.strip().lower()
    if word not in ("yes", "no"):
        raise ConfigError("%s: expected yes or no, not %r" % (name, value))
    return word == "yes"


def _parse_database(name: str, value: str) -> str:
    value = value.strip()
    if not value:
        raise ConfigError("%s: empty database name" % name)
    if value.startswith("redis"):
        from greylist.stores.redisstore import FORMS, RedisError, is_redis, parse_url
        try:
            if not is_redis(value):
                raise RedisError("%s: %s" % (value, FORMS))
            parse_url(value)
        except RedisError as exc:
            raise ConfigError("%s: %s" % (name, exc)) from None
        return value
    # Postfix's notation (lmdb:PATH) too, and the data file's name:
    # Postfix's name has no ".lmdb" suffix.
    value = value.removeprefix("lmdb:")
    if not value:
        raise ConfigError("%s: empty database name" % name)
    return value[:-len(".lmdb")] if value.endswith(".lmdb") else value


def _parse_defer_text(name: str, value: str) -> str:
    import string
    value = value.strip()
    try:
        string.Template(value).substitute(seconds_left=0, recipient_domain="",
                                          client_address="")
    except (KeyError, ValueError) as exc:
        raise ConfigError("%s: bad placeholder in %r: %s (known: $seconds_left, "
                          "$recipient_domain, $client_address)" % (name, value, exc)) from None
    return value


def _parse_list(name: str, value: str) -> tuple[str, ...]:
    # Postfix lists: separated by white space or commas.
    return tuple(word for word in re.split(r"[\s,]+", value.strip()) if word)


def _parse_files(name: str, value: str) -> tuple[str, ...]:
    files = _parse_list(name, value)
    for path in files:
        if not path.startswith("/"):
            raise ConfigError("%s: %r is not an absolute file name" % (name, path))
    return files


def _parse_networks(name: str, value: str) -> tuple[str, ...]:
    import ipaddress
    networks = _parse_list(name, value)
    for network in networks:
        try:
            found = ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError("%s: %r is not an IP network" % (name, network)) from None
        try:
            ipaddress.ip_network(network)
        except ValueError:
            # Postfix's own words (cidr_match.c): mynetworks and cidr:
            # tables refuse such a pattern rather than widen it.
            raise ConfigError("%s: non-null host address bits in %r, perhaps you should "
                              "use %r instead" % (name, network, str(found))) from None
    return networks


def _parse_count(name: str, value: str) -> int:
    if not re.fullmatch("[0-9]{1,6}", value.strip()):
        raise ConfigError("%s: expected a whole number, not %r" % (name, value))
    return int(value)


def _parse_limit(name: str, value: str) -> int:
    # A limit of 0 would refuse every connection or commit nothing, not
    # lift the limit as 0 does in some Postfix settings: an error.
    count = _parse_count(name, value)
    if count == 0:
        raise ConfigError("%s: expected at least 1, not %r" % (name, value))
    return count


def _prefix_parser(bits: int, step: int):
    def parse(name: str, value: str) -> int:
        text = value.strip().lstrip("/")
        if not re.fullmatch("[0-9]{1,3}", text) or not 0 < int(text) <= bits \
                or int(text) % step:
            raise ConfigError("%s: expected a prefix length of %d to %d in steps of %d "
                              "(access(5) address forms), not %r"
                              % (name, step, bits, step, value))
        return int(text)
    return parse


def _parse_client_match(name: str, value: str) -> str:
    value = value.strip().lower()
    if value not in ("pool", "prefix", "exact", "domain"):
        raise ConfigError("%s: expected pool, prefix, exact or domain, not %r"
                          % (name, value))
    return value


def _parse_delimiter(name: str, value: str) -> str:
    value = value.strip()
    if any(c.isspace() or c.isalnum() or c in "@/%" for c in value):
        raise ConfigError("%s: %r: use punctuation characters only" % (name, value))
    return value


def _parse_table(name: str, value: str) -> str:
    value = value.strip()
    if value != "none":
        value = _parse_path(name, value)
    return value[:-len(".lmdb")] if value.endswith(".lmdb") else value


def _parse_path(name: str, value: str) -> str:
    value = value.strip()
    if value and not value.startswith("/"):
        raise ConfigError("%s: %r is not an absolute file name" % (name, value))
    return value


_FAILURE_WORDS = ("DUNNO", "DEFER_IF_PERMIT", "DEFER")


def _parse_failure_action(name: str, value: str) -> str:
    value = value.strip()
    # Postfix splits the action word at a space or a tab (check_table_result).
    word, _, text = value.replace("\t", " ").partition(" ")
    # An all-numeric action is OK to smtpd; 4NN rejects only with text
    # after it (check_table_result), so "451" alone would permit.
    if word.upper() not in _FAILURE_WORDS and not (re.fullmatch("4[0-9][0-9]", word)
                                                   and text.strip()):
        raise ConfigError("%s: %r is not DUNNO, DEFER_IF_PERMIT text, DEFER text "
                          "or 4NN text" % (name, value))
    return value


def _parse_listeners(name: str, value: str) -> tuple[str, ...]:
    listeners = _parse_list(name, value)
    for listener in listeners:
        parse_listener(name, listener)
    return listeners


def parse_listener(name: str, listener: str) -> tuple[str, object]:
    """Return ("unix", PATH) or ("inet", (HOST, PORT)) for a listener in
    Postfix's notation: unix:PATH (absolute), inet:HOST:PORT, inet:PORT
    (loopback), inet:[IPV6]:PORT."""
    kind, _, rest = listener.partition(":")
    if kind == "unix" and rest.startswith("/") and len(rest) < 100:
        return "unix", rest
    if kind == "inet" and rest:
        host, sep, port = rest.rpartition(":")
        if not sep:
            host, port = "127.0.0.1", rest
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if (re.fullmatch("[0-9]{1,5}", port) and 0 < int(port) < 65536
                and re.fullmatch("[A-Za-z0-9.:_-]{1,253}", host)):
            return "inet", (host, int(port))
    raise ConfigError("%s: %r is not unix:/PATH (under 100 bytes), inet:HOST:PORT "
                      "or inet:[IPV6]:PORT" % (name, listener))


def _parse_mode(name: str, value: str) -> int:
    if not re.fullmatch("0?[0-7]{3}", value.strip()) or int(value, 8) & 0o7007:
        raise ConfigError("%s: expected an octal mode like 0660 with no bits for "
                          "others, not %r" % (name, value))
    return int(value, 8)


def _parse_name(name: str, value: str) -> str:
    value = value.strip()
    if value and not re.fullmatch("[a-z_][a-z0-9_.-]{0,31}", value):
        raise ConfigError("%s: %r is not a user or group name" % (name, value))
    return value


def _parse_domains(name: str, value: str) -> tuple[str, ...]:
    domains = tuple(word.casefold().strip(".") for word in _parse_list(name, value))
    for domain in domains:
        if not re.fullmatch(r"[^\s@/]{1,253}", domain):
            raise ConfigError("%s: %r is not a domain name" % (name, domain))
    return domains


def _parse_map_name(name: str, value: str) -> str:
    value = value.strip()
    # Postfix takes the name after the last ":" of socketmap:...:NAME.
    if not re.fullmatch("[A-Za-z0-9_.-]{1,64}", value):
        raise ConfigError("%s: %r is not a socketmap name (letters, digits, "
                          "\"_\", \".\", \"-\")" % (name, value))
    return value


def _parse_service_name(name: str, value: str) -> str:
    value = value.strip()
    if value and not re.fullmatch("[A-Za-z0-9_.-]{1,64}", value):
        raise ConfigError("%s: %r is not a master.cf service name" % (name, value))
    return value


def _parse_milliseconds(name: str, value: str) -> int:
    match = re.fullmatch(r"([0-9]{1,6})(ms|s)", value.strip())
    if match is None or int(match.group(1)) == 0:
        raise ConfigError("%s: expected a time like 300ms or 1s, not %r" % (name, value))
    return int(match.group(1)) * (1 if match.group(2) == "ms" else 1000)


def _parse_log(name: str, value: str) -> str:
    value = value.strip()
    if value in ("syslog", "postlog") or value.startswith("/") \
            or (value.startswith("postlog:/") and len(value) > len("postlog:/")):
        return value
    raise ConfigError("%s: expected syslog, postlog, postlog:/SOCKET or an "
                      "absolute file name, not %r" % (name, value))


def _parse_header_text(name: str, value: str) -> str:
    value = value.strip()
    field, colon, _ = value.partition(":")
    # RFC 5322 2.2 and 3.6.8: a field name of printable ASCII but ":",
    # then ":"; the whole within one line, without control characters.
    if not colon or not re.fullmatch("[!-9;-~]{1,76}", field) or len(value) > 900 \
            or not all(c.isprintable() for c in value) or "%" in re.sub("%[tvhd%]", "", value):
        raise ConfigError("%s: %r is not \"Name: text\" (printable, at most 900 "
                          "characters; placeholders %%t, %%v, %%h, %%d, %%%%)" % (name, value))
    return value


def _parse_hostname(name: str, value: str) -> str:
    value = value.strip()
    if value and not re.fullmatch(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?", value) \
            or len(value) > 253:
        raise ConfigError("%s: %r is not a host name" % (name, value))
    return value


SETTINGS = {
    "greylist_database": ("database", _parse_database),
    "greylist_delay": ("delay_s", _parse_time),
    "greylist_retry_window": ("retry_window_s", _parse_time),
    "greylist_max_age": ("max_age_s", _parse_time),
    "greylist_cleanup_interval": ("cleanup_interval_s", _parse_time),
    "greylist_client_table": ("client_table", _parse_table),
    "greylist_client_match": ("client_match", _parse_client_match),
    "greylist_pool_domains": ("pool_domains", _parse_domains),
    "greylist_ipv4_prefix": ("ipv4_prefix", _prefix_parser(32, 8)),
    "greylist_ipv6_prefix": ("ipv6_prefix", _prefix_parser(128, 16)),
    "greylist_sender_delimiter": ("sender_delimiter", _parse_delimiter),
    "greylist_client_awl_passes": ("client_awl_passes", _parse_count),
    "greylist_sender_awl": ("sender_awl", _parse_bool),
    "greylist_whitelist_clients": ("whitelist_clients", _parse_files),
    "greylist_whitelist_recipients": ("whitelist_recipients", _parse_files),
    "greylist_whitelist_senders": ("whitelist_senders", _parse_files),
    "greylist_exempt_recipients": ("exempt_recipients", _parse_list),
    "greylist_trusted_networks": ("trusted_networks", _parse_networks),
    "greylist_defer_text": ("defer_text", _parse_defer_text),
    "greylist_header": ("header", _parse_bool),
    "greylist_header_text": ("header_text", _parse_header_text),
    "greylist_header_hostname": ("header_hostname", _parse_hostname),
    "greylist_learn": ("learn", _parse_bool),
    "greylist_privacy": ("privacy", _parse_bool),
    "greylist_secret_file": ("secret_file", _parse_path),
    "greylist_null_sender": ("null_sender", _parse_bool),
    "greylist_failure_action": ("failure_action", _parse_failure_action),
    "greylist_log": ("log", _parse_log),
    "greylist_log_hostname": ("log_hostname", _parse_hostname),
    "greylist_allow_root": ("allow_root", _parse_bool),
    "greylist_policy_listen": ("policy_listen", _parse_listeners),
    "greylist_metrics_listen": ("metrics_listen", _parse_listeners),
    "greylist_socket_mode": ("socket_mode", _parse_mode),
    "greylist_socket_group": ("socket_group", _parse_name),
    "greylist_user": ("user", _parse_name),
    "greylist_idle_timeout": ("idle_timeout_s", _parse_time),
    "greylist_max_connections": ("max_connections", _parse_limit),
    "greylist_commit_batch": ("commit_batch", _parse_limit),
    "greylist_redis_timeout": ("redis_timeout_ms", _parse_milliseconds),
    "greylist_redis_password_file": ("redis_password_file", _parse_path),
    "greylist_redis_sentinel_password_file": ("redis_sentinel_password_file", _parse_path),
    "greylist_redis_tls_ca_file": ("redis_tls_ca_file", _parse_path),
    "greylist_redis_tls_cert_file": ("redis_tls_cert_file", _parse_path),
    "greylist_redis_tls_key_file": ("redis_tls_key_file", _parse_path),
    "greylist_lock_timeout": ("lock_timeout_ms", _parse_milliseconds),
    "greylist_correspondent_table": ("correspondent_table", _parse_table),
    "greylist_correspondent_lifetime": ("correspondent_lifetime_s", _parse_time),
    "greylist_correspondent_check": ("correspondent_check", _parse_bool),
    "greylist_local_domains": ("local_domains", _parse_domains),
    "greylist_socketmap_sender_name": ("socketmap_sender_name", _parse_map_name),
    "greylist_socketmap_recipient_name": ("socketmap_recipient_name", _parse_map_name),
    "greylist_socketmap_header_name": ("socketmap_header_name", _parse_map_name),
    "greylist_outbound_require_sasl": ("outbound_require_sasl", _parse_bool),
    "greylist_socketmap_listen": ("socketmap_listen", _parse_listeners),
    "greylist_postscreen_table": ("postscreen_table", _parse_table),
    "greylist_postscreen_ttl": ("postscreen_ttl_s", _parse_time),
    "greylist_postscreen_drop_networks": ("postscreen_drop_networks", _parse_networks),
    "greylist_postscreen_enforce_networks": ("postscreen_enforce_networks", _parse_networks),
    "greylist_postscreen_service_name": ("postscreen_service_name", _parse_service_name),
    "greylist_socketmap_postscreen_name": ("socketmap_postscreen_name", _parse_map_name),
    "greylist_socketmap_clients_name": ("socketmap_clients_name", _parse_map_name),
    "greylist_socketmap_correspondents_name": ("socketmap_correspondents_name",
                                               _parse_map_name),
    "greylist_postscreen_listen": ("postscreen_listen", _parse_listeners),
    "greylist_outbound_listen": ("outbound_listen", _parse_listeners),
}
assert {f for f, _ in SETTINGS.values()} == set(Config._fields) - {
    "verbose", "cleanup_state", "resolved"}


def parse_setting(name: str, value: str) -> tuple[str, object]:
    """Return (Config field, parsed value) for one setting."""
    if name not in SETTINGS:
        raise ConfigError("unknown setting %r" % name)
    if re.search("[\0-\x08\n-\x1f\x7f-\x9f]", value):
        raise ConfigError("%s: value contains a newline or NUL, or another control "
                          "character" % name)
    field, parser = SETTINGS[name]
    # Errors quote the value as written, without the blanks around it.
    return field, parser(name, value.strip())


def _logical_lines(text: str, origin: str, strict: bool = True) -> list[tuple[int, str]]:
    """The settings of a file's text as (first line number, line), with
    continuation lines joined and comments dropped. A continuation line
    without a setting is an error when strict, else ignored."""
    logical: list[tuple[int, str]] = []
    # Lines end at "\n" only, as Postfix's: str.splitlines() also ends
    # them at a form feed and other characters, which shifted the line
    # numbers of errors.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            if not logical:
                if not strict:
                    continue
                raise ConfigError("%s, line %d: continuation line without a "
                                  "setting" % (origin, number))
            start, previous = logical[-1]
            logical[-1] = (start, previous + " " + line.strip())
        else:
            logical.append((number, line.strip()))
    return logical


def read_settings(text: str, origin: str = "settings") -> dict[str, object]:
    """Parse settings-file text; return {Config field: value}."""
    logical = _logical_lines(text, origin)
    values: dict[str, object] = {}
    for number, line in logical:
        # Bytes that are not UTF-8 (load() keeps them as surrogates) are
        # an error in a setting only: Postfix reads any comment.
        if re.search("[\udc80-\udcff]", line):
            raise ConfigError("cannot read settings file %s, line %d: not valid UTF-8"
                              % (origin, number))
        name, sep, value = line.partition("=")
        if not sep:
            raise ConfigError("%s, line %d: expected name = value" % (origin, number))
        try:
            field, parsed = parse_setting(name.strip(), value)
        except ConfigError as exc:
            raise ConfigError("%s, line %d: %s" % (origin, number, exc)) from None
        values[field] = parsed
    return values


def repeated_settings(path: str) -> list[str]:
    """Where a settings file sets a name again, as notes (the last one
    counts, as in main.cf, where postconf(1) warns of it too)."""
    try:
        text = read_small(path, MAX_SETTINGS_BYTES)[0].decode("utf-8", "replace")
    except OSError:
        return []
    first: dict[str, int] = {}
    notes = []
    for number, line in _logical_lines(text, path, strict=False):
        name = line.partition("=")[0].strip()
        if name in first:
            notes.append("line %d: %s overrides line %d (the last one counts)"
                         % (number, name, first[name]))
        first[name] = number
    return notes


def load(path: str | None, overrides: dict[str, object]) -> Config:
    """Return the Config: defaults, then the settings file, then overrides."""
    values: dict[str, object] = {}
    if path is not None:
        try:
            data, st = read_small(path, MAX_SETTINGS_BYTES)
        except OSError as exc:
            raise ConfigError("cannot read settings file %s: %s" % (path, exc.strerror)) \
                from None
        unsafe = _unsafe_settings(st)
        if unsafe:
            raise ConfigError("refusing settings file %s: %s" % (path, unsafe))
        values.update(read_settings(data.decode("utf-8", "surrogateescape"), path))
    values.update(overrides)
    return resolve(Config(**values))


# A settings file is a few KB; more is not one.
MAX_SETTINGS_BYTES = 1 << 20
CLIENT_TABLE_SUFFIX = "-clients"
CORRESPONDENT_TABLE_SUFFIX = "-correspondents"
POSTSCREEN_TABLE_SUFFIX = "-postscreen"
SECRET_SUFFIX = ".secret"
CLEANUP_SUFFIX = ".cleanup"


def resolve(cfg: Config) -> Config:
    """Return cfg with its derived names resolved (see DESCRIPTION).

    client_table: the setting, or the database's name plus "-clients";
    "" for none (greylist_client_table = none, and always in privacy
    mode, as the table names clients in plaintext). correspondent_table
    and postscreen_table likewise, with "-correspondents" and
    "-postscreen". secret_file: the
    setting, or the database's name plus ".secret". cleanup_state: the
    database's name plus ".cleanup". The log file is made absolute.
    Idempotent.
    """
    if cfg.resolved:
        return cfg
    if cfg.retry_window_s <= cfg.delay_s:
        # A pending triple would expire before it may pass: every retry
        # would be new again, and the mail deferred for ever (review).
        raise ConfigError("greylist_retry_window (%d s) must be longer than greylist_delay "
                          "(%d s), or no retry ever passes" % (cfg.retry_window_s, cfg.delay_s))
    if cfg.database.startswith("redis"):
        return _resolve_redis(cfg)
    database = os.path.abspath(cfg.database)
    table = cfg.client_table or database + CLIENT_TABLE_SUFFIX
    if table == "none" or cfg.privacy:
        table = ""
    learned = cfg.correspondent_table or database + CORRESPONDENT_TABLE_SUFFIX
    if learned == "none" or cfg.privacy:
        learned = ""
    screened = cfg.postscreen_table or database + POSTSCREEN_TABLE_SUFFIX
    if screened == "none" or cfg.privacy:
        screened = ""
    log = cfg.log
    if not log.startswith("postlog") and log != "syslog":
        log = os.path.abspath(log)
    return cfg._replace(client_table=table, correspondent_table=learned,
                        postscreen_table=screened,
                        secret_file=cfg.secret_file or database + SECRET_SUFFIX,
                        cleanup_state=cfg.database + CLEANUP_SUFFIX,
                        log=log, resolved=True)


def _resolve_redis(cfg: Config) -> Config:
    """resolve() for a Redis database: the tables are namespaces of the
    same server ("" for none), there is no cleanup state (Redis expires
    entries), and privacy mode needs an explicit greylist_secret_file."""
    def table(value: str, default: str) -> str:
        if value not in ("", "none"):
            raise ConfigError("a table setting names an LMDB table (%s); with a Redis "
                              "database the tables are namespaces of the same server: "
                              "leave the setting out, or set it to none" % value)
        return "" if value == "none" or cfg.privacy else default
    tls = [name for name, value in (("greylist_redis_tls_ca_file", cfg.redis_tls_ca_file),
                                    ("greylist_redis_tls_cert_file", cfg.redis_tls_cert_file),
                                    ("greylist_redis_tls_key_file", cfg.redis_tls_key_file))
           if value]
    if tls and not cfg.database.startswith(("rediss://", "rediss-sentinel://")):
        # Else redis://, a unix socket or redis-sentinel:// (no TLS) would
        # send the password and the records in clear, where TLS was asked
        # for.
        raise ConfigError("%s: only with a rediss:// or rediss-sentinel:// database (TLS); "
                          "greylist_database is %s" % (", ".join(tls), cfg.database))
    if bool(cfg.redis_tls_cert_file) != bool(cfg.redis_tls_key_file):
        raise ConfigError("greylist_redis_tls_cert_file and greylist_redis_tls_key_file: "
                          "set both (a client certificate and its key) or neither")
    if cfg.privacy and not cfg.secret_file:
        raise ConfigError("greylist_privacy with a Redis database: set "
                          "greylist_secret_file (the same file on every host)")
    log = cfg.log
    if not log.startswith("postlog") and log != "syslog":
        log = os.path.abspath(log)
    return cfg._replace(client_table=table(cfg.client_table, "clients"),
                        correspondent_table=table(cfg.correspondent_table, "correspondents"),
                        postscreen_table=table(cfg.postscreen_table, "postscreen"),
                        cleanup_state="", log=log, resolved=True)


def is_redis(cfg: Config) -> bool:
    """Whether the settings name a Redis database."""
    return cfg.database.startswith("redis")


def _unsafe_settings(st: os.stat_result) -> str | None:
    """Why a settings file of these attributes is refused, or None.

    Whoever can write it could set greylist_allow_root or the files that
    are opened: never anyone; and for a process running as root (greylistd
    before it drops privileges, root's greylistctl) nobody but root, as
    Postfix wants main.cf (postfix check).
    """
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        return "anyone can write it (mode %04o); chmod o-w it" % mode
    if os.geteuid() == 0:
        if st.st_uid != 0:
            return ("greylist runs as root, and the file belongs to uid %d; "
                    "chown root it" % st.st_uid)
        if mode & stat.S_IWGRP and st.st_gid != 0:
            return ("greylist runs as root, and group %d can write it (mode %04o); "
                    "chmod g-w it" % (st.st_gid, mode))
    return None


def log_target(path: str | None) -> str:
    """The greylist_log of a settings file that does not load, as far as
    it can be read (a fatal settings error then still reaches the log the
    administrator set); "syslog" otherwise."""
    if path is None:
        return "syslog"
    try:
        data, st = read_small(path, MAX_SETTINGS_BYTES)
    except OSError:
        return "syslog"
    if _unsafe_settings(st):
        return "syslog"  # Refused (load()): its greylist_log is another's choice.
    text = data.decode("utf-8", "replace")
    found = "syslog"
    for _, line in _logical_lines(text, path, strict=False):
        name, sep, value = line.partition("=")
        if sep and name.strip() == "greylist_log":
            try:
                found = _parse_log(name, value)
            except ConfigError:
                pass
    if not found.startswith("postlog") and found != "syslog":
        found = os.path.abspath(found)
    return found
