"""greylistctl report, on log lines that greylist itself wrote.

The lines come from a real greylist process (its greylist_log file) and,
marked postfix, from a real Postfix whose maillog holds greylist's lines
(greylist_log = postlog) among its own.
"""

import gzip
import io
import os
import re
import subprocess
import sys
import time

import pytest

from greylist.config import Config
from greylist.report import MAX_LINE, Report, run
from tests.test_ctl import ALLOW_ROOT, ROOT, Live, make_site, request


@pytest.fixture
def site(tmp_path):
    return make_site(tmp_path, "1s")


@pytest.fixture
def logged(site):
    """A greylist log: a triple deferred then passed after the delay, one
    deferred twice within the delay and never again, one deferred once,
    and a whitelisted pass of its own."""
    live = Live(site)
    try:
        assert live.ask(request()).startswith("action=DEFER_IF_PERMIT")
        # The bot's two tries must fall in one second of the log's time
        # stamps (a second apart they would count as a retry after the
        # 1 s delay): begin them just after a second begins.
        time.sleep(1.02 - time.time() % 1)
        assert live.ask(request(client="198.51.100.7", sender="bot@spam.example",
                                rcpt="x@example.net")).startswith("action=DEFER_IF_PERMIT")
        assert live.ask(request(client="198.51.100.7", sender="bot@spam.example",
                                rcpt="x@example.net")).startswith("action=DEFER_IF_PERMIT")
        assert live.ask(request(client="198.51.100.8", sender="bot2@spam.example",
                                rcpt="y@example.net")).startswith("action=DEFER_IF_PERMIT")
        time.sleep(2.1)
        # From another host of the same /24: the same triple.
        assert live.ask(request(client="192.0.2.11")) == "action=DUNNO"
        # Past the delay: its sender entry passes it.
        assert live.ask(request(rcpt="other@example.net")) == "action=DUNNO"
    finally:
        live.close()
    return site / "log"


def report(site, *args, stdin=None, errors=False):
    """greylistctl report's status and output (with errors=True, its
    standard error too)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "greylist.cli.greylistctl", "-c",
                           str(site / "gl.cf"), "report", *args], input=stdin,
                          capture_output=True, timeout=60, env=env)
    if errors:
        return done.returncode, done.stdout.decode(), done.stderr.decode()
    return done.returncode, done.stdout.decode()


def test_report_of_greylists_own_log(site, logged):
    status, out = report(site, "--delay", "1", str(logged))
    assert status == 0, out
    lines = out.splitlines()
    assert lines[0] == "report: 6 lines: 6 decisions, 0 screened, 0 malformed (skipped), " \
        "0 other lines"
    assert lines[1].split() == ["day", "deferred", "passed", "failures"]
    assert lines[2].split()[1:] == ["4", "2", "0"]
    assert lines[3] == "triples deferred that never retried after 1 s: 2 (of 3 deferred; " \
        "0 too recent to tell)"
    assert lines[4].startswith("  198.51.100.7 bot@spam.example x@example.net tries=2 first=")
    assert lines[5].startswith("  198.51.100.8 bot2@spam.example y@example.net tries=1 first=")
    assert lines[6:] == [
        "top 10 clients of deferred requests:",
        "         2 198.51.100.7",
        "         1 192.0.2.10",
        "         1 198.51.100.8",
        "top 10 senders of deferred requests:",
        "         2 bot@spam.example",
        "         1 alice@example.org",
        "         1 bot2@spam.example"]


def test_a_long_delay_leaves_recent_triples_out(site, logged):
    status, out = report(site, "--delay", "1h", "--top", "1", str(logged))
    assert "triples deferred that never retried after 3600 s: 0 (of 3 deferred; " \
        "2 too recent to tell)\n" in out
    assert "top 1 clients of deferred requests:\n         2 198.51.100.7\ntop 1 senders" in out


def test_mixed_malformed_and_overlong_lines_from_stdin(site, logged):
    ours = logged.read_bytes().splitlines(keepends=True)
    host = ours[0].split()[3]
    mixed = b"".join([
        b"Dec  1 10:00:00 " + host + b" postfix/smtpd[99]: connect from unknown[192.0.2.10]\n",
        ours[0],
        b"Dec  1 10:00:01 " + host + b" greylist[12]: action=DEFER_IF_PERMIT reason=new age=0"
        b" client=192.0.2.10\n",                              # cut short
        b"Dec  1 10:00:01 " + host + b" greylist[12]: action=DUNNO reason=known age=0"
        b" client=not-an-address sender=a@b rcpt=c@d\n",      # bad address
        b"Dec 41 10:00:01 " + host + b" greylist[12]: action=DUNNO reason=known age=0"
        b" client=192.0.2.1 sender=a@b rcpt=c@d\n",           # bad time stamp
        b"Dec  1 10:00:02 " + host + b" greylist[12]: warning: ignoring malformed record\n",
        b"Dec  1 10:00:02 " + host + b" greylist[12]: action=DUNNO reason=protocol_state=MAIL\n",
        b"Dec  1 10:00:03 " + host + b" greylist[12]: action=" + b"x" * (2 * MAX_LINE) + b"\n",
        b"\xff\xfe binary \x00 junk\n",
    ] + ours[1:])
    status, out = report(site, "--delay", "1", stdin=mixed)
    assert status == 0, out
    assert out.splitlines()[0] == ("report: 14 lines: 6 decisions, 1 screened, 4 malformed "
                                   "(skipped), 3 other lines")
    assert "never retried after 1 s: 2 (of 3 deferred" in out


def test_gzip_files_and_several_files(site, logged, tmp_path):
    packed = tmp_path / "log.1.gz"
    packed.write_bytes(gzip.compress(logged.read_bytes()))
    status, out = report(site, "--delay", "1", str(packed), str(logged))
    assert status == 0 and out.startswith("report: 12 lines: 12 decisions")


def test_unreadable_files_and_bad_options(site, logged, tmp_path):
    # Errors go to stderr, never into the report's output (report > FILE).
    assert report(site, str(tmp_path / "absent"), errors=True) == (
        1, "", "greylistctl: report: %s: No such file or directory\n" % (tmp_path / "absent"))
    os.symlink(logged, tmp_path / "link")
    status, out, err = report(site, str(tmp_path / "link"), errors=True)
    assert (status, out) == (1, "") and err.endswith("(a symbolic link?)\n")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"not gzip at all")
    status, out, err = report(site, str(tmp_path / "bad.gz"), errors=True)
    assert (status, out) == (1, "")
    assert err.startswith("greylistctl: report: %s: " % (tmp_path / "bad.gz"))
    status, out, err = report(site, "--top", "many", errors=True)
    assert (status, out) == (2, "") and err.startswith("greylistctl: --top")


def test_damaged_gzip_data_is_an_unreadable_file_not_a_traceback(tmp_path, capfd):
    # Found in review: zlib.error (not an OSError) escaped as a traceback.
    packed = bytearray(gzip.compress(b"Dec  1 10:00:00 mx postfix/smtpd[1]: x\n" * 100))
    for offset in range(12, len(packed) - 8):
        packed[offset] ^= 0x55
    (tmp_path / "log.1.gz").write_bytes(bytes(packed))
    out = io.StringIO()
    assert run([str(tmp_path / "log.1.gz")], Config(), None, None, out) == 1
    assert out.getvalue() == ""
    assert capfd.readouterr().err.startswith("greylistctl: report: %s: "
                                              % (tmp_path / "log.1.gz"))


def test_distinct_keys_are_capped(monkeypatch):
    from greylist import report as module
    monkeypatch.setattr(module, "MAX_KEYS", 3)
    lines = b"".join(
        b"2026-12-01T10:00:%02d+00:00 mx greylist[1]: action=DEFER_IF_PERMIT reason=new age=0 "
        b"client=192.0.%d.1 sender=s%d@example.org rcpt=r@example.net\n" % (i, i, i)
        for i in range(10))
    out = io.StringIO()
    assert run([], Config(), "1", None, out, io.BytesIO(lines), clock=lambda: 1.8e9) == 0
    text = out.getvalue()
    assert "\n2026-12-01 %10d %10d %10d\n" % (10, 0, 0) in text
    assert "(only the first 3 distinct triples are counted)\n" in text
    assert "  (only the first 3 distinct clients are counted)\n" in text
    assert text.count("tries=1") == 3


def test_syslog_years_are_inferred_across_new_year():
    lines = b"".join(
        b"%s mx greylist[1]: action=DEFER_IF_PERMIT reason=new age=0 "
        b"client=192.0.2.1 sender=a@example.org rcpt=r@example.net\n" % stamp
        for stamp in (b"Dec 31 23:59:00", b"Jan  1 00:01:00"))
    out = io.StringIO()
    # Run in February 2027: December is last year's.
    assert run([], Config(), "60", None, out, io.BytesIO(lines),
               clock=lambda: 1801000000) == 0
    assert "\n2026-12-31 %10d" % 1 in out.getvalue()
    assert "\n2027-01-01 %10d" % 1 in out.getvalue()
    # Two tries two minutes apart: it retried after the 60 s.
    assert "never retried after 60 s: 0 (of 1 deferred" in out.getvalue()


# What any SMTP client can make Postfix write into its log, verbatim (up
# to 100 characters): "warning: non-SMTP command from HOST[ADDR]: LINE".
FORGED = (b"GET greylist[1]: action=DEFER reason=new age=0 client=192.0.2.66 "
          b"sender=ceo@v.example rcpt=u@e.test")


def test_greylist_tag_inside_another_programs_line_is_not_a_decision():
    report = Report(Config(), 60, 2026, 12)
    report.feed(b"Dec  1 10:00:00 mx postfix/smtpd[42]: warning: non-SMTP command from "
                b"unknown[203.0.113.9]: " + FORGED)
    report.feed(b"2026-12-01T10:00:00+00:00 mx postfix/smtpd[42]: warning: non-SMTP "
                b"command from unknown[203.0.113.9]: " + FORGED)
    report.feed(b"Dec  1 10:00:01 mx greylist[7]: action=DEFER_IF_PERMIT reason=new age=0 "
                b"client=192.0.2.1 sender=a@b.example rcpt=c@d.example")
    # BusyBox's syslogd: the facility and level before the tag.
    report.feed(b"Dec  1 10:00:02 mx mail.info greylist[7]: action=DUNNO reason=passed "
                b"age=70 client=192.0.2.1 sender=a@b.example rcpt=c@d.example")
    assert (report.lines, report.decisions, report.other) == (4, 2, 2)
    assert list(report.senders.counts) == ["a@b.example"]


@pytest.mark.postfix
def test_forged_decision_in_a_real_postfix_maillog_is_not_counted():
    import socket
    from tests.test_postfix import instance
    with instance() as postfix:
        with socket.create_connection(("127.0.0.1", postfix.port), timeout=30) as client:
            reply = client.makefile("rb")
            assert reply.readline().startswith(b"220")
            client.sendall(FORGED + b"\r\n")
            assert reply.readline().startswith(b"221")
        deadline = time.monotonic() + 10
        while FORGED not in postfix.maillog.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert FORGED in postfix.maillog.read_bytes()
        out = io.StringIO()
        assert run([str(postfix.maillog)], Config(), "60", None, out) == 0
    text = out.getvalue()
    assert re.match(r"report: \d+ lines: 0 decisions, ", text), text
    assert "ceo@v.example" not in text and "192.0.2.66" not in text, text


@pytest.mark.postfix
def test_report_of_a_real_postfix_maillog():
    from tests.test_postfix import DELAY_S, instance, rcpt_reply
    with instance() as postfix:
        assert rcpt_reply(postfix.swaks("alice@example.org", "user@example.test")).startswith(
            "450 4.7.1")
        assert rcpt_reply(postfix.swaks("bot@spam.example", "user@example.test")).startswith(
            "450 4.7.1")
        time.sleep(DELAY_S + 1)
        assert rcpt_reply(postfix.swaks("alice@example.org", "user@example.test")).startswith(
            "250")
        postfix.wait_for_delivery("user")
        maillog = postfix.maillog
        out = io.StringIO()
        cfg = Config()
        assert run([str(maillog)], cfg, str(DELAY_S), None, out) == 0
    text = out.getvalue()
    counts = re.fullmatch(r"report: (\d+) lines: (\d+) decisions, 0 screened, 0 malformed "
                          r"\(skipped\), (\d+) other lines", text.splitlines()[0])
    # Postfix's own lines are counted and skipped.
    assert counts is not None and counts.group(2) == "3" and int(counts.group(3)) > 10, text
    assert "never retried after %d s: 1 (of 2 deferred" % DELAY_S in text
    assert " bot@spam.example user@example.test tries=1 " in text


def test_a_retry_exactly_delay_later_is_a_retry_and_the_key_cap_is_exact():
    import io
    from greylist.config import Config
    from greylist.report import Counter, Report, Seen
    report = Report(Config(), 300, 2026, 12)
    report.triples[("a", "b", "c")] = Seen(1000, 1300, 2, False, "a", "b", "c")
    report.triples[("d", "e", "f")] = Seen(1000, 1299, 2, False, "d", "e", "f")
    report.end = 100000
    out = io.StringIO()
    report.write(out, 10)
    assert "never retried after 300 s: 1 (of 2 deferred" in out.getvalue()
    assert "  d e f tries=2" in out.getvalue() and "  a b c" not in out.getvalue()
    counter = Counter(2)
    for key in ("x", "y", "z", "x"):
        counter.add(key)
    assert counter.counts == {"x": 2, "y": 1} and counter.full
