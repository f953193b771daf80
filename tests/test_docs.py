"""The man page, CHANGES and master.cf example agree with the code."""

import pathlib
import re

from greylist import __version__
from greylist.cli import USAGE
from greylist.config import SETTINGS, Config

ROOT = pathlib.Path(__file__).parent.parent
MAN = (ROOT / "man" / "greylist.8").read_text()


def plain(roff: str) -> str:
    """The man page text without font escapes and with plain hyphens."""
    return re.sub(r"\\f[BIRP]", "", roff).replace("\\-", "-")


def test_every_option_of_the_usage_is_in_the_man_page():
    options = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", USAGE))
    assert options >= {"-v", "-c", "-d", "--delay", "--config", "--database"}
    missing = [option for option in options if option not in plain(MAN)]
    assert missing == []


def test_synopsis_is_the_usage():
    usage = [line.strip() for line in USAGE.split("Usage:")[1].split("Options:")[0]
             .splitlines() if line.strip()]
    synopsis = plain(MAN.split(".SH SYNOPSIS")[1].split(".SH")[0])
    lines = [line.strip() for line in synopsis.splitlines()
             if line.strip() and not line.startswith(".")]
    assert lines == usage


def shown(field: str, default) -> str:
    """A default as the man page writes it."""
    if field == "secret_file":
        return "the database name plus .secret"
    if field.endswith("_s"):
        return "%dd" % (default // 86400) if default % 86400 == 0 else "%ds" % default
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


def test_changes_starts_with_the_current_version():
    first = re.search(r"^--- (\S+) \((\d{4}-\d\d-\d\d)\)$", (ROOT / "CHANGES").read_text(),
                      re.MULTILINE)
    assert first is not None
    assert __version__.startswith(first.group(1))
    assert '"greylist %s"' % __version__ in MAN


def test_master_cf_example_has_the_spawn_service_and_main_cf_lines():
    text = (ROOT / "master.cf.example").read_text()
    service = re.search(r"^policy\s+unix\s+-\s+n\s+n\s+-\s+0\s+spawn\n\s+user=\S+ argv=/\S+",
                        text, re.MULTILINE)
    assert service is not None
    assert "policy_time_limit = 3600" in text
    assert "check_policy_service unix:private/policy" in text
