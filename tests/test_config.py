"""Tests for greylist.config: time values, settings files and load()."""

import pytest

from greylist.config import Config, ConfigError, load, parse_setting, read_settings, resolve


@pytest.mark.parametrize("value, seconds", [
    pytest.param("60", 60, id="bare-number"),
    pytest.param("60s", 60, id="seconds"),
    pytest.param("5m", 300, id="minutes"),
    pytest.param("2h", 7200, id="hours"),
    pytest.param("1d", 86400, id="days"),
    pytest.param("1w", 604800, id="weeks"),
    pytest.param("0", 0, id="zero"),
    pytest.param("035d", 35 * 86400, id="leading-zero"),
    pytest.param("999999999", 999999999, id="nine-digits"),
    pytest.param("  5m\t", 300, id="stripped"),
])
def test_time_value(value, seconds):
    assert parse_setting("greylist_delay", value) == ("delay_s", seconds)


@pytest.mark.parametrize("value", [
    pytest.param("", id="empty"),
    pytest.param("   ", id="blank"),
    pytest.param("-1", id="negative"),
    pytest.param("+1", id="plus-sign"),
    pytest.param("1.5m", id="fraction"),
    pytest.param("5x", id="unknown-unit"),
    pytest.param("5M", id="uppercase-unit"),
    pytest.param("5mm", id="two-units"),
    pytest.param("m", id="unit-only"),
    pytest.param("1 m", id="space-before-unit"),
    pytest.param("1 0", id="space-inside-number"),
    pytest.param("1_000", id="underscore"),
    pytest.param("0x10", id="hex"),
    pytest.param("1e3", id="exponent"),
    pytest.param("1000000000", id="ten-digits"),
    pytest.param("5m # five minutes", id="trailing-comment"),
])
def test_time_value_rejects(value):
    with pytest.raises(ConfigError, match="greylist_delay: invalid time value"):
        parse_setting("greylist_delay", value)


def test_time_value_rejects_non_ascii_digits():
    # Regression: the pattern used \d, which in a str pattern also
    # matches digits of other scripts, and int() converts them, so
    # "\u0666\u0660" (Arabic-Indic 60) was accepted as 60 seconds.
    with pytest.raises(ConfigError):
        parse_setting("greylist_delay", "\u0666\u0660")


@pytest.mark.parametrize("text, expected", [
    pytest.param("", {}, id="empty"),
    pytest.param("# comment\n\n   \n\t# indented comment\ngreylist_delay = 5m\n",
                 {"delay_s": 300}, id="comments-and-blank-lines"),
    pytest.param("greylist_delay=5m", {"delay_s": 300}, id="no-spaces"),
    pytest.param("greylist_delay   =   5m   ", {"delay_s": 300}, id="spaces"),
    pytest.param("greylist_defer_text = Greylisted,\n  try again in\n\t$seconds_left seconds\n",
                 {"defer_text": "Greylisted, try again in $seconds_left seconds"},
                 id="continuation-lines"),
    pytest.param("greylist_defer_text = a=b", {"defer_text": "a=b"}, id="equals-in-value"),
    pytest.param("greylist_delay = 1m\ngreylist_delay = 2m\n", {"delay_s": 120},
                 id="last-wins"),
    pytest.param("greylist_database = /var/lib/greylist/greylist.lmdb\n"
                 "greylist_delay = 10m\n"
                 "greylist_defer_text = wait\n"
                 "greylist_null_sender = no\n"
                 "greylist_failure_action = DEFER_IF_PERMIT Try again later\n"
                 "greylist_log = postlog\n",
                 {"database": "/var/lib/greylist/greylist", "delay_s": 600,
                  "defer_text": "wait", "null_sender": False,
                  "failure_action": "DEFER_IF_PERMIT Try again later", "log": "postlog"},
                 id="every-setting"),
])
def test_read_settings(text, expected):
    assert read_settings(text) == expected


@pytest.mark.parametrize("text, message", [
    pytest.param("# comment\n\nbogus = 1\n", r"^test\.cf, line 3: unknown setting 'bogus'",
                 id="unknown-name"),
    pytest.param("= 5m\n", r"^test\.cf, line 1: unknown setting ''", id="empty-name"),
    pytest.param("greylist_delay = 5m\ngreylist_delay 5m\n",
                 r"^test\.cf, line 2: expected name = value", id="missing-equals"),
    pytest.param("  greylist_delay = 5m\n",
                 r"^test\.cf, line 1: continuation line without a setting",
                 id="continuation-first"),
    pytest.param("# comment\n\tgreylist_delay = 5m\n",
                 r"^test\.cf, line 2: continuation line without a setting",
                 id="continuation-after-comment"),
    pytest.param("\ngreylist_delay = soon\n",
                 r"^test\.cf, line 2: greylist_delay: invalid time value",
                 id="invalid-value"),
    pytest.param("greylist_null_sender = yes\n  no\n",
                 r"^test\.cf, line 1: greylist_null_sender: expected yes or no",
                 id="invalid-continued-value-names-first-line"),
])
def test_read_settings_rejects(text, message):
    with pytest.raises(ConfigError, match=message):
        read_settings(text, "test.cf")


@pytest.mark.parametrize("value", [
    pytest.param("a\nb", id="newline"),
    pytest.param("a\0b", id="nul"),
])
def test_parse_setting_rejects_newline_and_nul(value):
    with pytest.raises(ConfigError, match="newline or NUL"):
        parse_setting("greylist_defer_text", value)


def test_parse_setting_rejects_unknown_name():
    with pytest.raises(ConfigError, match="unknown setting 'greylist_bogus'"):
        parse_setting("greylist_bogus", "1")


@pytest.mark.parametrize("value, expected", [
    pytest.param("/var/lib/greylist/greylist", "/var/lib/greylist/greylist", id="plain"),
    pytest.param("/var/lib/greylist/greylist.lmdb", "/var/lib/greylist/greylist",
                 id="lmdb-suffix-stripped"),
    pytest.param(" /srv/grey.lmdb ", "/srv/grey", id="stripped"),
])
def test_database(value, expected):
    assert parse_setting("greylist_database", value) == ("database", expected)


def test_database_rejects_empty():
    with pytest.raises(ConfigError, match="empty database name"):
        parse_setting("greylist_database", "  ")


@pytest.mark.parametrize("value, expected", [
    pytest.param("Greylisted, please try again in $seconds_left seconds",
                 "Greylisted, please try again in $seconds_left seconds", id="placeholder"),
    pytest.param("try again in ${seconds_left}s", "try again in ${seconds_left}s",
                 id="braced-placeholder"),
    pytest.param("4.7.1 Greylisted", "4.7.1 Greylisted", id="no-placeholder"),
    pytest.param("costs $$5", "costs $$5", id="escaped-dollar"),
    pytest.param("", "", id="empty"),
])
def test_defer_text(value, expected):
    assert parse_setting("greylist_defer_text", value) == ("defer_text", expected)


@pytest.mark.parametrize("value", [
    pytest.param("retry in $seconds", id="unknown-placeholder"),
    pytest.param("retry in ${delay}", id="unknown-braced-placeholder"),
    pytest.param("retry at $", id="lone-dollar"),
    pytest.param("retry $1", id="invalid-placeholder"),
])
def test_defer_text_rejects(value):
    with pytest.raises(ConfigError, match="greylist_defer_text: bad placeholder"):
        parse_setting("greylist_defer_text", value)


@pytest.mark.parametrize("value, expected", [
    pytest.param("DUNNO", "DUNNO", id="dunno"),
    pytest.param("dunno", "dunno", id="dunno-lowercase"),
    pytest.param("DEFER_IF_PERMIT Service temporarily unavailable",
                 "DEFER_IF_PERMIT Service temporarily unavailable", id="defer-if-permit"),
    pytest.param("DEFER Try again later", "DEFER Try again later", id="defer"),
    pytest.param("451 4.3.0 Greylist database unavailable",
                 "451 4.3.0 Greylist database unavailable", id="4nn"),
    pytest.param("  DUNNO  ", "DUNNO", id="stripped"),
    # smtpd splits the action word at a space or a tab (check_table_result).
    pytest.param("DEFER_IF_PERMIT\tTry again later", "DEFER_IF_PERMIT\tTry again later",
                 id="tab-separated"),
    pytest.param("451\t4.3.0 Try again later", "451\t4.3.0 Try again later",
                 id="4nn-tab-separated"),
])
def test_failure_action(value, expected):
    assert parse_setting("greylist_failure_action", value) == ("failure_action", expected)


@pytest.mark.parametrize("value", [
    pytest.param("", id="empty"),
    pytest.param("   ", id="blank"),
    pytest.param("OK", id="ok"),
    pytest.param("REJECT", id="reject"),
    pytest.param("REJECT Go away", id="reject-text"),
    pytest.param("PERMIT", id="permit"),
    pytest.param("DEFER_IF_REJECT Try again", id="defer-if-reject"),
    pytest.param("550 5.7.1 Go away", id="5nn"),
    pytest.param("4.3.0 Try again", id="enhanced-code-only"),
    pytest.param("45 Try again", id="two-digit-code"),
    pytest.param("4510 Try again", id="four-digit-code"),
    pytest.param("451 ", id="4nn-trailing-space"),
    pytest.param("451\t", id="4nn-trailing-tab"),
])
def test_failure_action_rejects(value):
    with pytest.raises(ConfigError, match="greylist_failure_action"):
        parse_setting("greylist_failure_action", value)


def test_failure_action_rejects_bare_4nn_code():
    # Regression: "451" alone passed the 4NN check, but Postfix's
    # check_table_result() treats an all-numeric action as OK (a permit,
    # smtpd_check.c "All-numeric result probably means OK"), and takes
    # 4NN as a reject only when text follows. A database failure would
    # then permit the recipient and skip the later restrictions.
    with pytest.raises(ConfigError, match="greylist_failure_action"):
        parse_setting("greylist_failure_action", "451")


@pytest.mark.parametrize("value, expected", [
    pytest.param("yes", True, id="yes"),
    pytest.param("no", False, id="no"),
    pytest.param("YES", True, id="yes-uppercase"),
    pytest.param(" no ", False, id="stripped"),
])
def test_null_sender(value, expected):
    assert parse_setting("greylist_null_sender", value) == ("null_sender", expected)


@pytest.mark.parametrize("value", ["", "true", "false", "1", "0", "on", "y"])
def test_null_sender_rejects(value):
    with pytest.raises(ConfigError, match="greylist_null_sender: expected yes or no"):
        parse_setting("greylist_null_sender", value)


@pytest.mark.parametrize("value, expected", [
    pytest.param("syslog", "syslog", id="syslog"),
    pytest.param("postlog", "postlog", id="postlog"),
    pytest.param("postlog:/var/spool/postfix/public/postlog",
                 "postlog:/var/spool/postfix/public/postlog", id="postlog-socket"),
    pytest.param("/var/log/greylist.log", "/var/log/greylist.log", id="absolute-file"),
    pytest.param(" syslog ", "syslog", id="stripped"),
])
def test_log(value, expected):
    assert parse_setting("greylist_log", value) == ("log", expected)


@pytest.mark.parametrize("value", [
    pytest.param("", id="empty"),
    pytest.param("stderr", id="stderr"),
    pytest.param("Syslog", id="syslog-capitalised"),
    pytest.param("greylist.log", id="relative-file"),
    pytest.param("log/greylist.log", id="relative-path"),
])
def test_log_rejects(value):
    with pytest.raises(ConfigError, match="greylist_log: expected syslog"):
        parse_setting("greylist_log", value)


@pytest.mark.parametrize("value", [
    pytest.param("postlogger", id="postlog-prefix-word"),
    pytest.param("postlog/var/spool/postfix/public/postlog", id="postlog-missing-colon"),
])
def test_log_rejects_words_that_only_start_with_postlog(value):
    # Regression: _parse_log accepted any value starting with "postlog",
    # and Log() then logs such a value silently to the default postlog
    # socket; only "postlog" and "postlog:SOCKET" are documented.
    with pytest.raises(ConfigError, match="greylist_log"):
        parse_setting("greylist_log", value)


def test_load_defaults():
    assert load(None, {}) == resolve(Config())


def test_derived_names_are_resolved_once_at_load(tmp_path):
    cfg = load(None, {"database": "/srv/gl/db"})
    assert (cfg.client_table, cfg.secret_file, cfg.cleanup_state) == (
        "/srv/gl/db-clients", "/srv/gl/db.secret", "/srv/gl/db.cleanup")
    assert resolve(cfg) is cfg
    assert load(None, {"database": "/srv/gl/db", "client_table": "none"}).client_table == ""
    assert load(None, {"database": "/srv/gl/db", "privacy": True}).client_table == ""
    assert load(None, {"client_table": "/t/c"}).client_table == "/t/c"


def test_load_precedence(tmp_path):
    settings = tmp_path / "greylist.cf"
    settings.write_text("greylist_delay = 10m\ngreylist_null_sender = no\n", encoding="utf-8")
    cfg = load(str(settings), {"delay_s": 60, "verbose": 2})
    # Overrides beat the file, the file beats the defaults.
    assert cfg == resolve(Config(delay_s=60, null_sender=False, verbose=2))


def test_load_file_over_defaults(tmp_path):
    settings = tmp_path / "greylist.cf"
    settings.write_text("greylist_database = /srv/greylist/db.lmdb\n"
                        "greylist_defer_text = Come back in $seconds_left s\n",
                        encoding="utf-8")
    assert load(str(settings), {}) == resolve(Config(
        database="/srv/greylist/db", defer_text="Come back in $seconds_left s"))


def test_load_names_the_file_and_line(tmp_path):
    settings = tmp_path / "greylist.cf"
    settings.write_text("greylist_delay = 5m\ngreylist_dealy = 5m\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"greylist\.cf, line 2: unknown setting"):
        load(str(settings), {})


@pytest.mark.parametrize("content", [
    pytest.param(None, id="missing-file"),
    pytest.param(b"greylist_defer_text = \xff\n", id="not-utf-8"),
])
def test_load_unreadable_file(tmp_path, content):
    settings = tmp_path / "greylist.cf"
    if content is not None:
        settings.write_bytes(content)
    with pytest.raises(ConfigError, match="cannot read settings file"):
        load(str(settings), {})


@pytest.mark.parametrize("log, expected", [
    pytest.param("syslog", "syslog", id="syslog"),
    pytest.param("postlog", "postlog", id="postlog"),
    pytest.param("postlog:/run/postlog", "postlog:/run/postlog", id="postlog-socket"),
    pytest.param("/var/log/../log/greylist.log", "/var/log/greylist.log", id="normalised"),
])
def test_load_log_from_file(tmp_path, log, expected):
    settings = tmp_path / "greylist.cf"
    settings.write_text("greylist_log = %s\n" % log, encoding="utf-8")
    assert load(str(settings), {}).log == expected


def test_load_makes_a_relative_log_override_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load(None, {"log": "greylist.log"}).log == str(tmp_path / "greylist.log")


def test_a_table_path_with_a_redis_database_is_an_error_not_ignored():
    cfg = Config(database="redis:unix:/run/redis.sock", client_table="/var/lib/x-clients")
    with pytest.raises(ConfigError, match="namespaces of the same server"):
        resolve(cfg)
    off = resolve(Config(database="redis:unix:/run/redis.sock", client_table="none"))
    assert off.client_table == "" and off.correspondent_table == "correspondents"


def test_a_retry_window_no_longer_than_the_delay_is_an_error(tmp_path):
    # Review: greylist_delay = 30m with greylist_retry_window = 20m was
    # accepted (--check: ok), and every new triple expired before it
    # could pass: its mail was deferred for ever.
    cf = tmp_path / "greylist.cf"
    for window in ("20m", "30m"):
        cf.write_text("greylist_delay = 30m\ngreylist_retry_window = %s\n" % window)
        with pytest.raises(ConfigError, match="greylist_retry_window .* must be longer than "
                                              "greylist_delay"):
            load(str(cf), {})
    cf.write_text("greylist_delay = 30m\ngreylist_retry_window = 31m\n")
    assert load(str(cf), {}).retry_window_s == 1860


def test_the_database_may_be_named_as_postfix_names_it():
    # Review: greylist(8) says "-d lmdb:PATH"; the prefix was taken for a
    # relative directory name.
    assert parse_setting("greylist_database", "lmdb:/var/lib/greylist/greylist") == (
        "database", "/var/lib/greylist/greylist")
    assert parse_setting("greylist_database", "lmdb:/var/lib/greylist/greylist.lmdb") == (
        "database", "/var/lib/greylist/greylist")
    with pytest.raises(ConfigError, match="empty database name"):
        parse_setting("greylist_database", "lmdb:")


@pytest.mark.parametrize("name", ["greylist_max_connections", "greylist_commit_batch"])
def test_a_zero_connection_or_commit_limit_is_an_error_not_a_daemon_that_refuses_all(name):
    # greylist_max_connections = 0 started a greylistd that closed every
    # connection at once (one warning, --check said ok).
    with pytest.raises(ConfigError, match="%s: expected at least 1" % name):
        parse_setting(name, "0")
    assert parse_setting(name, "1")[1] == 1


@pytest.mark.parametrize("name", ["greylist_trusted_networks",
                                  "greylist_postscreen_drop_networks",
                                  "greylist_postscreen_enforce_networks"])
def test_a_network_with_host_bits_is_an_error_not_widened(name):
    # "10.1.2.3/8" trusted all of 10.0.0.0/8 silently; Postfix refuses
    # such a pattern in mynetworks and cidr: tables.
    for value, suggestion in (("192.0.2.0/24, 10.1.2.3/8", "10.0.0.0/8"),
                              ("2001:db8::1/32", "2001:db8::/32")):
        with pytest.raises(ConfigError, match="non-null host address bits in .*"
                           "perhaps you should use '%s' instead" % suggestion):
            parse_setting(name, value)
    assert parse_setting(name, "10.0.0.0/8 192.0.2.1 2001:db8::/32")[1] == (
        "10.0.0.0/8", "192.0.2.1", "2001:db8::/32")


def test_a_comment_that_is_not_utf_8_is_ignored_and_a_bad_value_names_its_line(tmp_path):
    # A Latin-1 comment ("# Verz\xf6gerung") made the whole file fatal,
    # with a byte offset ("position 20") for a line number.
    settings = tmp_path / "greylist.cf"
    settings.write_bytes(b"# Verz\xf6gerung\ngreylist_delay = 5m\n")
    assert load(str(settings), {}).delay_s == 300
    settings.write_bytes(b"# ok\ngreylist_delay = 5m\ngreylist_defer_text = gr\xfc\xdf\n")
    with pytest.raises(ConfigError, match=r"greylist.cf, line 3: not valid UTF-8$"):
        load(str(settings), {})


def test_an_error_after_a_form_feed_line_names_the_line_an_editor_shows():
    # "^L" on its own line (an old page break) counted as two lines.
    with pytest.raises(ConfigError, match="^f, line 3: unknown setting"):
        read_settings("greylist_delay = 60\n\x0c\ngreylist_bogus = 1\n", "f")
    for control in ("\x0b", "\x1c", "\x1b", "\x85", "\r"):
        with pytest.raises(ConfigError, match="^f, line 1: .*control character"):
            read_settings("greylist_defer_text = a%sb\n" % control, "f")
    assert read_settings("greylist_delay = 60\r\n\x0c\r\n", "f") == {"delay_s": 60}


def test_a_fatal_settings_error_reaches_a_greylist_log_on_a_continuation_line(tmp_path):
    # "greylist_log =" with the file on the next line: the fatal error of
    # a bad setting went to syslog, not to that file.
    from greylist.config import log_target
    settings = tmp_path / "greylist.cf"
    settings.write_text("greylist_log =\n    /var/log/greylist.log\n# c\n"
                        "greylist_bogus = 1\n", encoding="utf-8")
    assert log_target(str(settings)) == "/var/log/greylist.log"


@pytest.mark.parametrize("name, value, expected", [
    pytest.param("greylist_ipv4_prefix", "24", 24, id="v4"),
    pytest.param("greylist_ipv4_prefix", "/16", 16, id="v4-slash"),
    pytest.param("greylist_ipv4_prefix", "32", 32, id="v4-host"),
    pytest.param("greylist_ipv6_prefix", "64", 64, id="v6"),
    pytest.param("greylist_ipv6_prefix", "/48", 48, id="v6-slash"),
    pytest.param("greylist_ipv6_prefix", "128", 128, id="v6-host"),
])
def test_prefix_lengths(name, value, expected):
    assert parse_setting(name, value)[1] == expected


@pytest.mark.parametrize("name, value", [
    pytest.param("greylist_ipv4_prefix", "0", id="v4-zero-is-one-client-for-all"),
    pytest.param("greylist_ipv4_prefix", "33", id="v4-too-long"),
    pytest.param("greylist_ipv4_prefix", "20", id="v4-not-an-octet"),
    pytest.param("greylist_ipv6_prefix", "0", id="v6-zero"),
    pytest.param("greylist_ipv6_prefix", "129", id="v6-too-long"),
    pytest.param("greylist_ipv6_prefix", "56", id="v6-not-a-16-bit-group"),
    pytest.param("greylist_ipv6_prefix", "-64", id="v6-negative"),
])
def test_prefix_lengths_rejected(name, value):
    # access(5) address forms: octets of IPv4, 16-bit groups of IPv6.
    with pytest.raises(ConfigError, match="%s: expected a prefix length" % name):
        parse_setting(name, value)


@pytest.mark.parametrize("name, field", [("greylist_redis_timeout", "redis_timeout_ms"),
                                         ("greylist_lock_timeout", "lock_timeout_ms")])
def test_millisecond_values(name, field):
    assert parse_setting(name, "300ms") == (field, 300)
    assert parse_setting(name, "2s") == (field, 2000)
    for value in ("0ms", "0s", "300", "1m", "1.5s", ""):
        # 0 would fail every request at once; a bare number is ambiguous.
        with pytest.raises(ConfigError, match="%s: expected a time like 300ms" % name):
            parse_setting(name, value)
