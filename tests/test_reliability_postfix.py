"""Under a real Postfix: a broken database is no 451 for mail.

postgrey's failure mode: a policy process that dies or disconnects makes
smtpd answer "451 4.3.5 Server configuration problem" for every
recipient. With a corrupt database greylist must fail open: the mail is
accepted and delivered, and the maillog says why.
"""

import os
import pathlib
import shutil
import tempfile

import pytest

from tests.conftest import require
from tests.postfix_instance import PostfixInstance, install_runtime, postfix_available

pytestmark = pytest.mark.postfix

USER = "nobody"


def test_corrupt_database_under_spawn_accepts_mail_without_451():
    require(postfix_available())
    root = pathlib.Path(tempfile.mkdtemp(prefix="greylist-rel-e2e-"))
    os.chmod(root, 0o755)
    try:
        prefix = install_runtime(root, USER)
        if isinstance(prefix, str):
            require(prefix)
        database = root / "db"
        database.mkdir(mode=0o755)
        shutil.chown(database, USER)
        (database / "greylist.lmdb").write_bytes(b"this is not an LMDB file\n" * 400)
        os.chmod(database / "greylist.lmdb", 0o644)
        shutil.chown(database / "greylist.lmdb", USER)
        settings = root / "greylist.cf"
        settings.write_text("greylist_database = %s/greylist\n"
                            "greylist_log = postlog:%s/queue/public/postlog\n"
                            % (database, root))
        argv = prefix + ["-m", "greylist", "-c", str(settings)]
        with PostfixInstance(root, argv, policy_user=USER + ":postdrop") as postfix:
            for n in range(3):
                done = postfix.swaks("alice%d@example.org" % n, "bob%d@example.test" % n)
                replies = [line for line in done.stdout.splitlines() if line.startswith("<")]
                assert not [r for r in replies if r.startswith(("<** 4", "<** 5", "< 4"))], \
                    done.stdout
                assert done.returncode == 0, done.stdout
                postfix.wait_for_delivery("bob%d" % n)
            log = postfix.log_text()
        assert "451 4.3.5" not in log
        assert "not an LMDB 0.9 database" in log
        assert "reason=database-failure" in log
        assert "Traceback" not in log and "fatal:" not in log
    finally:
        shutil.rmtree(root, ignore_errors=True)
