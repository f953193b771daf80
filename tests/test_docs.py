"""The man page, CHANGES and master.cf example agree with the code."""

import pathlib
import re

import pytest

from greylist import __version__
from greylist.cli.greylist import USAGE
from greylist.cli.greylistctl import USAGE as CTL_USAGE
from greylist.cli.greylistd import SERVICES, USAGE as DAEMON_USAGE
from greylist.cli.postscreen import USAGE as POSTSCREEN_USAGE
from greylist.cli.socketmap import USAGE as SOCKETMAP_USAGE
from greylist.config import SETTINGS, Config

ROOT = pathlib.Path(__file__).parent.parent
MAN = (ROOT / "man" / "greylist.8").read_text()


def plain(roff: str) -> str:
    """The man page text without font escapes and with plain hyphens."""
    return re.sub(r"\\f[BIRP]", "", roff).replace("\\-", "-")


PAGES = [(USAGE, MAN), (CTL_USAGE, (ROOT / "man" / "greylistctl.8").read_text()),
         (DAEMON_USAGE, (ROOT / "man" / "greylistd.8").read_text()),
         (SOCKETMAP_USAGE, (ROOT / "man" / "greylist-socketmap.8").read_text()),
         (POSTSCREEN_USAGE, (ROOT / "man" / "greylist-postscreen.8").read_text())]
IDS = ["greylist", "greylistctl", "greylistd", "greylist-socketmap", "greylist-postscreen"]


@pytest.mark.parametrize("usage, page", PAGES, ids=IDS)
def test_every_option_of_the_usage_is_in_the_man_page(usage, page):
    options = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", usage))
    assert options >= {"-c", "--config"}
    # As whole words: "-c" is not found inside "--check".
    text = plain(page)
    missing = [option for option in options
               if not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(option), text)]
    assert missing == []


@pytest.mark.parametrize("usage, page", PAGES, ids=IDS)
def test_synopsis_is_the_usage(usage, page):
    lines = [line.strip() for line in usage.split("Usage:")[1].split("Options:")[0]
             .splitlines() if line.strip()]
    synopsis = plain(page.split(".SH SYNOPSIS")[1].split(".SH")[0])
    shown = [line.strip() for line in synopsis.splitlines()
             if line.strip() and not line.startswith(".")]
    assert shown == lines


def shown(field: str, default) -> str:
    """A default as the man page writes it."""
    if field == "secret_file":
        return "the database name plus .secret"
    if field == "client_table":
        return "the database name plus -clients"
    if field == "correspondent_table":
        return "the database name plus -correspondents"
    if field == "postscreen_table":
        return "the database name plus -postscreen"
    if field.endswith("_s"):
        for unit, size in (("d", 86400), ("h", 3600)):
            if default % size == 0:
                return "%d%s" % (default // size, unit)
        return "%ds" % default
    if field.endswith("_ms"):
        return "%dms" % default
    if field == "socket_mode":
        return "0%o" % default
    if default == "":
        return "empty"
    if isinstance(default, bool):
        return "yes" if default else "no"
    if isinstance(default, tuple):
        return " ".join(default) or "empty"
    return str(default)


def test_every_setting_is_documented_with_its_default():
    text = plain(MAN)
    missing = ["%s (default: %s)" % (name, shown(field, getattr(Config(), field)))
               for name, (field, _) in SETTINGS.items()]
    assert [entry for entry in missing if entry not in text] == []


def test_every_redis_setting_needs_a_restart_of_greylistd_as_its_page_says():
    # Found in review: the TLS files were restart-only, but greylistd(8)
    # named only "the Redis timeout and password files".
    from greylist.cli.greylistd import RESTART_ONLY
    redis = [field for name, (field, _) in SETTINGS.items()
             if name.startswith("greylist_redis_")]
    assert len(redis) >= 6 and set(redis) <= set(RESTART_ONLY), redis
    page = plain((ROOT / "man" / "greylistd.8").read_text())
    assert "every greylist_redis_* setting" in " ".join(page.split())


def test_changes_starts_with_the_current_version():
    first = re.search(r"^--- (\S+) \((\d{4}-\d\d-\d\d)\)$", (ROOT / "CHANGES").read_text(),
                      re.MULTILINE)
    assert first is not None
    assert __version__.startswith(first.group(1))
    for name in ("greylist.8", "greylistctl.8", "greylistd.8", "greylist-socketmap.8",
                 "greylist-postscreen.8"):
        assert '"greylist %s"' % __version__ in (ROOT / "man" / name).read_text()


def test_master_cf_example_has_the_spawn_service_and_main_cf_lines():
    text = (ROOT / "master.cf.example").read_text()
    service = re.search(r"^policy\s+unix\s+-\s+n\s+n\s+-\s+0\s+spawn\n\s+user=\S+ argv=/\S+",
                        text, re.MULTILINE)
    assert service is not None
    assert "policy_time_limit = 3600" in text
    assert "check_policy_service { unix:private/policy, default_action=DUNNO }" in text
    assert "argv=/opt/greylist/bin/greylist -c /etc/greylist/greylist.cf" in text


def test_systemd_units_match_the_daemon_and_the_main_cf_line():
    socket_unit = (ROOT / "docs" / "systemd" / "greylist.socket").read_text()
    service_unit = (ROOT / "docs" / "systemd" / "greylist.service").read_text()
    listen = re.search(r"^ListenStream=(/\S+)$", socket_unit, re.MULTILINE).group(1)
    # smtpd's name for it is relative to Postfix's queue directory.
    assert listen.startswith("/var/spool/postfix/")
    relative = listen[len("/var/spool/postfix/"):]
    for text in (socket_unit, (ROOT / "README.md").read_text(),
                 plain((ROOT / "man" / "greylistd.8").read_text())):
        assert "check_policy_service { unix:%s, default_action=DUNNO }" % relative in text
    # greylistd serves the policy protocol on any socket not named metrics.
    assert "FileDescriptorName=policy" in socket_unit
    assert re.search(r"^Type=notify$", service_unit, re.MULTILINE)
    assert re.search(r"^ExecStart=/\S+/greylistd -c /\S+$", service_unit, re.MULTILINE)
    assert re.search(r"^SocketGroup=postfix$", socket_unit, re.MULTILINE)
    # StateDirectory= would chown the tables to greylist:greylist at each
    # start, and smtpd (group postfix) could not read the client table.
    assert not re.search(r"^StateDirectory", service_unit, re.MULTILINE)
    # The learners' sockets: each names the service greylistd serves on it
    # (greylist/cli/greylistd.py SERVICES), goes to greylist.service, and
    # is the socket that greylist-socketmap(8) points Postfix at.
    learner_page = plain((ROOT / "man" / "greylist-socketmap.8").read_text())
    for unit, name, relative in (("greylist-learn.socket", "socketmap", "greylist/learn"),
                                 ("greylist-outbound.socket", "outbound", "greylist/out")):
        text = (ROOT / "docs" / "systemd" / unit).read_text()
        assert name in dict(SERVICES)
        assert re.search(r"^FileDescriptorName=%s$" % name, text, re.MULTILINE), unit
        assert re.search(r"^Service=greylist.service$", text, re.MULTILINE), unit
        assert re.search(r"^ListenStream=/var/spool/postfix/%s$" % relative, text,
                         re.MULTILINE), unit
        assert re.search(r"^SocketGroup=postfix$", text, re.MULTILINE), unit
        assert "unix:%s" % relative in learner_page


DOCUMENTS = ["README.md", "master.cf.example", "docs/greylist.cf.example"] + [
    "man/%s.8" % name for name in IDS]


@pytest.mark.parametrize("name", DOCUMENTS)
def test_no_setting_line_of_the_documents_has_a_comment_after_its_value(name):
    # As in main.cf, "#" starts a comment only at the start of a line:
    # "greylist_x = /path   # mode 0600" names the file "/path   # mode 0600".
    lines = [line for line in plain((ROOT / name).read_text()).splitlines()
             if re.match(r"\s*#?\s*greylist_\w+\s*=.*\s#", line)]
    assert lines == []


def test_systemd_units_pass_systemd_analyze_verify(tmp_path):
    import shutil
    import subprocess
    import sys
    from tests.conftest import require
    analyze = shutil.which("systemd-analyze")
    require(None if analyze else "systemd-analyze is not installed (Debian: systemd)")
    daemon = pathlib.Path(sys.executable).parent / "greylistd"
    require(None if daemon.exists() else "no greylistd console script beside %s" % sys.executable)
    names = ("greylist.socket", "greylist.service", "greylist-learn.socket",
             "greylist-outbound.socket")
    for name in names:
        text = (ROOT / "docs" / "systemd" / name).read_text()
        # Where this test's installation is, instead of /opt/greylist.
        (tmp_path / name).write_text(text.replace("/opt/greylist/bin/greylistd", str(daemon)))
    done = subprocess.run([analyze, "verify", "--man=no", *(str(tmp_path / n) for n in names)],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")


SAMPLE = ROOT / "docs" / "greylist.cf.example"
SETTING_LINE = re.compile(r"^(#?)(greylist_[a-z0-9_]+) =(.*)$", re.MULTILINE)


def test_the_sample_settings_file_has_every_setting_once_with_a_meaning():
    text = SAMPLE.read_text()
    named = [match.group(2) for match in SETTING_LINE.finditer(text)]
    assert sorted(named) == sorted(SETTINGS)
    # Each block of settings starts with a comment that says what they mean.
    for block in text.split("\n\n"):
        lines = block.strip().splitlines()
        if any(SETTING_LINE.match(line) for line in lines):
            assert lines[0].startswith("# ") and not SETTING_LINE.match(lines[0]), block


def test_the_sample_settings_file_loads_and_its_commented_values_are_the_defaults(tmp_path):
    from greylist.config import load
    text = SAMPLE.read_text()
    active = {match.group(2) for match in SETTING_LINE.finditer(text) if not match.group(1)}
    assert active == {"greylist_database", "greylist_whitelist_clients",
                      "greylist_whitelist_recipients"}
    as_is = load(str(SAMPLE), {})
    uncommented = tmp_path / "greylist.cf"
    uncommented.write_text(SETTING_LINE.sub(r"\2 =\3", text))
    assert not re.search(r"^#greylist_", uncommented.read_text(), re.MULTILINE)
    # Uncommenting every default changes nothing, and the defaults are
    # config.py's (the active lines aside).
    assert load(str(uncommented), {}) == as_is
    defaults = load(None, {})
    changed = {field for field in Config._fields
               if getattr(as_is, field) != getattr(defaults, field)}
    assert changed == {"whitelist_clients", "whitelist_recipients"}
    assert as_is.database == "/var/lib/greylist/greylist"


def test_the_sample_settings_file_reads_debians_postgrey_whitelists_without_a_warning():
    from greylist.config import load
    from greylist.whitelist import Whitelists
    cfg = load(str(SAMPLE), {})
    files = cfg.whitelist_clients + cfg.whitelist_recipients
    absent = [path for path in files if not pathlib.Path(path).is_file()]
    if absent:
        pytest.skip("postgrey's whitelists are not installed (Debian: postgrey): %s"
                    % " ".join(absent))
    warnings = []
    lists = Whitelists(cfg, warnings.append)
    assert warnings == []
    exemptions = lists.exemptions(0.0)
    assert exemptions.clients is not None and exemptions.recipients is not None


def test_exempt_recipients_replaces_its_default_as_the_man_page_says():
    from greylist.config import read_settings
    assert Config().exempt_recipients == ("postmaster@", "abuse@")
    assert read_settings("greylist_exempt_recipients = hostmaster@\n") == {
        "exempt_recipients": ("hostmaster@",)}
    assert read_settings("greylist_exempt_recipients = postmaster@, abuse@\n"
                         "  hostmaster@\n") == {
        "exempt_recipients": ("postmaster@", "abuse@", "hostmaster@")}
    text = " ".join(plain(MAN).split())
    assert "A value replaces the default: greylist_exempt_recipients = hostmaster@ " \
           "no longer exempts postmaster@ and abuse@" in text
    assert "separated by white space or commas. A setting replaces its default" in text
    assert "takes effect at postfix reload" in text


def test_the_readmes_code_blocks_are_not_cut_by_a_short_indent():
    # A master.cf continuation line indented by fewer than four spaces ends
    # Markdown's indented code block: the rendered page lost the lines after
    # it (the greylist-learn service among them).
    text = (ROOT / "README.md").read_text()
    assert [line for line in text.splitlines() if re.match(r" {1,3}-o ", line)] == []
