"""The small files an administrator names (settings, whitelists, the
privacy secret, the Redis password): a FIFO or a device in their place,
or a huge file, is an error at once, never a hang or a read without end
(found in review: root's greylistd hung in open(2) at a SIGHUP, with
every connection, and greylistd -c /dev/zero died of MemoryError).

Each case runs in a child with a time limit, so that the old hang is a
failure of this test, not of the suite.
"""

import os
import subprocess
import sys

import pytest

from tests.reliability import ROOT

CASES = {
    "settings": "from greylist.config import load, ConfigError\n"
                "try:\n    load(PATH, {})\nexcept ConfigError as exc:\n    print(exc)\n",
    "log_target": "from greylist.config import log_target\nprint(log_target(PATH))\n",
    "whitelist": "from greylist.whitelist import List\n"
                 "List((PATH,), 'client', print)\n",
    "secret": "from greylist.stores.privacy import load_secret, SecretError\n"
              "try:\n    load_secret(PATH)\nexcept SecretError as exc:\n    print(exc)\n",
    "password": "from greylist.stores.redisstore import read_password_file\n"
                "from greylist.stores.base import StoreError\n"
                "try:\n    read_password_file(PATH)\nexcept Exception as exc:\n    print(exc)\n",
}


def run(case: str, path: str) -> str:
    done = subprocess.run([sys.executable, "-c", "PATH = %r\n" % path + CASES[case]],
                          capture_output=True, text=True, timeout=10,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0 and done.stderr == "", done
    return done.stdout


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_fifo_in_the_files_place_is_refused_at_once(tmp_path, case):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    out = run(case, str(fifo))
    if case == "log_target":
        assert out == "syslog\n"
    else:
        assert "not a regular file" in out, out


@pytest.mark.parametrize("case", ["settings", "whitelist"])
def test_a_device_or_a_huge_file_is_not_read_whole(tmp_path, case):
    assert "not a regular file" in run(case, "/dev/zero")
    huge = tmp_path / "huge"
    with open(huge, "wb") as handle:
        handle.truncate(64 << 20)  # sparse: 64 MiB of NULs
    assert "larger than" in run(case, str(huge))
