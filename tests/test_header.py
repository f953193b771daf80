"""The X-Greylist header: postgrey's --x-greylist-header text and placeholders."""

import pytest

from greylist import __version__
from greylist.config import Config, ConfigError, parse_setting
from greylist.core.evaluate import HEADER_TEXT, MAX_HEADER, header, rfc5322_date

NOW = 1_733_062_170


def test_the_default_is_postgreys_with_this_programs_name():
    assert Config().header_text == HEADER_TEXT
    assert header(300, "mx.example.test", NOW) == (
        "PREPEND X-Greylist: delayed 300 seconds by greylist-%s at mx.example.test; %s"
        % (__version__, rfc5322_date(NOW)))


@pytest.mark.parametrize("text, expected", [
    ("X-Greylist: %t s", "X-Greylist: 300 s"),
    ("X-Spam-Delay: %h %v %% %t%t", "X-Spam-Delay: mx.example.test %s %% 300300" % __version__),
    ("X-Greylist: no placeholders", "X-Greylist: no placeholders"),
])
def test_placeholders_are_filled(text, expected):
    _, value = parse_setting("greylist_header_text", text)
    assert header(300, "mx.example.test", NOW, value) == "PREPEND " + expected


@pytest.mark.parametrize("text", ["no colon", "X Greylist: space in name", ": no name",
                                  "X-Greylist: bell\x07", "X-Greylist: %q unknown",
                                  "X-Greylist: trailing %", "X-Greylist: " + "x" * 900])
def test_a_header_text_that_is_not_one_safe_field_is_refused(text):
    with pytest.raises(ConfigError, match="greylist_header_text"):
        parse_setting("greylist_header_text", text)


def test_the_host_cannot_break_the_header_and_the_length_is_capped():
    value = header(300, "mx\r\nBcc: victim@example.org\x00", NOW, "X-G: %h %h %h %h %h")
    assert "\r" not in value and "\n" not in value and "\0" not in value
    assert value.startswith("PREPEND X-G: mxBcc")
    long = header(300, "h" * 300, NOW, "X-G: " + "%h" * 100)
    assert len(long) == len("PREPEND ") + MAX_HEADER


def test_the_header_hostname_setting_replaces_the_system_host_name(tmp_path):
    from greylist.core.decide import DELAY_PASSED, Decision
    from greylist.core.evaluate import render
    from greylist.core.message import Session
    cfg = Config(header=True)
    _, host = parse_setting("greylist_header_hostname", "relay.example.test")
    action = render(Decision("DUNNO", DELAY_PASSED, 300), {"recipient": "a@b"}, "192.0.2.1",
                    Session(), NOW, cfg._replace(header_hostname=host), "system")
    assert " at relay.example.test; " in action
    action = render(Decision("DUNNO", DELAY_PASSED, 300), {"recipient": "a@b"}, "192.0.2.1",
                    Session(), NOW, cfg, "system")
    assert " at system; " in action
    with pytest.raises(ConfigError):
        parse_setting("greylist_header_hostname", "bad host\n")
