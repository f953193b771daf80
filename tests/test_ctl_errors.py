"""greylistctl on input it cannot use: a clear line and an exit status,
never a traceback (found in review, 2026-12-02)."""

import os

from greylist.cli import greylistctl

ALLOW_ROOT = "greylist_allow_root = yes\n" if os.geteuid() == 0 else ""


def settings(tmp_path):
    os.chmod(tmp_path, 0o755)
    path = tmp_path / "greylist.cf"
    path.write_text("greylist_database = %s/db\ngreylist_log = %s/log\n%s"
                    % (tmp_path, tmp_path, ALLOW_ROOT))
    return str(path)


def test_show_without_a_recipient_says_so(tmp_path, capfd):
    conf = settings(tmp_path)
    for recipient in ("", "<>"):
        assert greylistctl.main(["-c", conf, "show", "192.0.2.1", "a@example.org",
                                 recipient]) == 2
        # A usage error: on stderr, as the others (CHANGES), written to
        # descriptor 2 by log.to_stderr(): capfd, not capsys.
        assert capfd.readouterr() == ("", (
            "greylistctl: show needs a RECIPIENT (the policy service answers DUNNO "
            "without one)\n"))


def test_report_on_a_directory_says_so(tmp_path, capfd):
    conf = settings(tmp_path)
    assert greylistctl.main(["-c", conf, "report", str(tmp_path)]) == 1
    captured = capfd.readouterr()
    assert "%s: not a regular file" % tmp_path in captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err


def test_check_of_a_database_that_does_not_exist_fails(tmp_path, capsys):
    conf = settings(tmp_path)
    assert greylistctl.main(["-c", conf, "check"]) == 1
    assert capsys.readouterr().out == "check: %s/db.lmdb: no such database\n" % tmp_path
    assert not (tmp_path / "db.lmdb").exists()


def test_postscreen_names_the_database_error(tmp_path, capfd):
    # It said "unavailable after an earlier error", the callout's own
    # failure having gone to its quiet log.
    conf = settings(tmp_path)
    assert greylistctl.main(["-c", conf, "postscreen", "192.0.2.1"]) == 1
    assert capfd.readouterr() == ("", "greylistctl: %s/db.lmdb: no such database\n" % tmp_path)


def test_a_read_only_command_on_an_empty_database_file_says_so(tmp_path, capfd):
    # Found in review: "Bad file descriptor" (a crash between creating the
    # file and LMDB's first write leaves one).
    conf = settings(tmp_path)
    (tmp_path / "db.lmdb").write_bytes(b"")
    os.chmod(tmp_path / "db.lmdb", 0o600)
    for command in (["stats"], ["dump"]):
        assert greylistctl.main(["-c", conf] + command) == 1, command
        assert capfd.readouterr() == ("", (
            "greylistctl: %s/db.lmdb: an empty file, no database yet (greylist initialises "
            "it at its first write)\n" % tmp_path)), command
