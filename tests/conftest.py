"""Shared fixtures: Postfix tools, which skip locally but fail under CI."""

import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Iterator

import pytest

CI = os.environ.get("CI") == "true"


def require(reason: str | None) -> None:
    """Skip (or, under CI, fail) a test whose prerequisite is missing."""
    if reason is None:
        return
    if CI:
        pytest.fail("required under CI: " + reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postmap() -> str:
    """The path of a postmap that supports lmdb tables."""
    path = shutil.which("postmap") or "/usr/sbin/postmap"
    if not os.path.exists(path):
        require("postmap is not installed (Debian: postfix, postfix-lmdb)")
    types = subprocess.run([path.replace("postmap", "postconf"), "-m"],
                           capture_output=True, text=True).stdout.split()
    require(None if "lmdb" in types else "Postfix has no lmdb support (postfix-lmdb)")
    return path


@pytest.fixture
def public_tmp() -> Iterator[pathlib.Path]:
    """A directory that the user nobody can reach (pytest's is root's, 0700)."""
    path = tempfile.mkdtemp(prefix="greylist-test-")
    os.chmod(path, 0o755)
    yield pathlib.Path(path)
    shutil.rmtree(path)


@contextlib.contextmanager
def as_owner(path) -> Iterator[None]:
    """Act (effective IDs) as the owner of path's directory: greylist run
    as root refuses a directory another user owns (lmdbfile.py), so the
    tests act as that user, as greylistctl does."""
    st = os.stat(os.path.dirname(os.path.abspath(path)))
    if os.geteuid() != 0 or st.st_uid == 0:
        yield
        return
    os.setegid(st.st_gid)
    os.seteuid(st.st_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def run_python(code: str, *args: str, timeout: float = 30,
               **kwargs) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter with this checkout importable."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    env.update(kwargs.pop("env", {}))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                          timeout=timeout, env=env, **kwargs)


def policy_service(store, cfg, log, clock=None):
    """The spawn program's policy service on a given store (its name is
    the database of cfg)."""
    from greylist.config import resolve
    from greylist.wiring import policy_service as build
    import time
    return build(resolve(cfg._replace(database=store.name)), log, clock or time.time,
                 store=store)


class Recorder:
    """A Log stand-in that keeps its lines ("warning: " marks warnings)."""

    def __init__(self):
        self.lines = []
        self.verbose = 0

    def info(self, message):
        self.lines.append(message)

    def warning(self, message):
        self.lines.append("warning: " + message)

    def debug(self, level, message):
        pass


class Clock:
    """An injected clock: call it for the time, set .now to move it."""

    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now
