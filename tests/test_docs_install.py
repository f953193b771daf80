"""README's installation works: a wheel built from the checkout carries
the man pages and the sample settings file, installs into a virtual
environment made from Debian's /usr/bin/python3, whose programs a user
other than root can run, and man finds and renders the pages.

The commands run are README's, with /opt/greylist and /usr/local/share/man
moved into a temporary directory.
"""

import os
import pathlib
import shutil
import subprocess
import tempfile
import zipfile

import pytest

from greylist import __version__
from tests.conftest import require

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
MAN_PAGES = sorted(path.name for path in (ROOT / "man").glob("*.8"))
SAMPLES = ["greylist.cf.example", "master.cf.example"]
SYSTEM_PYTHON = "/usr/bin/python3"
WHEEL = "greylist-%s-py3-none-any.whl" % __version__
# What the build leaves out of the copy of the checkout.
IGNORE = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "build", "dist",
                                "*.egg-info", ".pytest_cache", ".hypothesis", "out",
                                "*.lmdb", "*.lmdb-lock")


def readme_command(start: str) -> str:
    """The README command line that starts with start (exactly one)."""
    found = [line.strip() for line in README.splitlines() if line.strip().startswith(start)]
    assert len(found) == 1, (start, found)
    return found[0]


def run(command: str, prefix: pathlib.Path, cwd: pathlib.Path,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a README command with /opt/greylist and /usr/local under prefix."""
    moved = (command.replace("/opt/greylist", str(prefix / "opt" / "greylist"))
             .replace("/usr/local/", str(prefix / "usr" / "local") + "/"))
    done = subprocess.run(["sh", "-c", moved], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, (moved, done.stdout[-2000:], done.stderr[-2000:])
    return done


def install(prefix: pathlib.Path) -> pathlib.Path:
    """README's installation under prefix: a wheel built from a copy of
    the checkout (the build writes into its source directory), installed
    with its dependencies into prefix/opt/greylist, a virtual environment
    made from /usr/bin/python3; return the environment's directory."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        require("%s is missing (Debian: python3)" % SYSTEM_PYTHON)
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import ensurepip, venv"],
                           capture_output=True, timeout=30)
    require(None if probe.returncode == 0 else "%s has no venv (Debian: python3-venv)"
            % SYSTEM_PYTHON)
    os.chmod(prefix, 0o755)
    source = prefix / "src"
    shutil.copytree(ROOT, source, ignore=IGNORE)
    run(readme_command("/usr/bin/python3 -m venv /opt/greylist"), prefix, prefix)
    # README: ".venv/bin/pip wheel --no-deps -w dist ." in the checkout;
    # here the new environment's pip builds it.
    assert ".venv/bin/pip wheel --no-deps -w dist ." in README
    run("/opt/greylist/bin/pip wheel -q --no-deps -w dist .", prefix, source)
    assert (source / "dist" / WHEEL).is_file()
    # The wheel's form of README's "pip install .".
    assert readme_command("/opt/greylist/bin/pip install .") == \
        "/opt/greylist/bin/pip install ."
    assert "`/opt/greylist/bin/pip install\ngreylist-%s-py3-none-any.whl`" % __version__ \
        in README
    run("/opt/greylist/bin/pip install -q " + WHEEL, prefix, source / "dist")
    return prefix / "opt" / "greylist"


@pytest.fixture(scope="module")
def installed():
    prefix = pathlib.Path(tempfile.mkdtemp(prefix="greylist-install-"))
    try:
        yield install(prefix)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def test_the_wheel_carries_every_man_page_and_the_samples(installed):
    wheel = installed.parent.parent / "src" / "dist" / WHEEL
    names = set(zipfile.ZipFile(wheel).namelist())
    data = "greylist-%s.data/data/share/" % __version__
    assert MAN_PAGES and {data + "man/man8/" + page for page in MAN_PAGES} <= names
    assert {data + "doc/greylist/" + sample for sample in SAMPLES} <= names


def test_the_environment_has_the_man_pages_and_samples_as_in_the_checkout(installed):
    pages = installed / "share" / "man" / "man8"
    assert sorted(path.name for path in pages.iterdir()) == MAN_PAGES
    for page in MAN_PAGES:
        assert (pages / page).read_bytes() == (ROOT / "man" / page).read_bytes()
    docs = installed / "share" / "doc" / "greylist"
    assert (docs / "greylist.cf.example").read_bytes() == \
        (ROOT / "docs" / "greylist.cf.example").read_bytes()
    assert (docs / "master.cf.example").read_bytes() == \
        (ROOT / "master.cf.example").read_bytes()
    # The systemd units that README and greylistd(8) say to copy (found in
    # an install walkthrough: they were only in the checkout).
    for unit in ("greylist.service", "greylist.socket", "greylist-learn.socket",
                 "greylist-outbound.socket"):
        assert (docs / "systemd" / unit).read_bytes() == \
            (ROOT / "docs" / "systemd" / unit).read_bytes()
    # README copies the sample from there.
    assert readme_command("install -m 0644 /opt/greylist/share/doc/greylist/"
                          "greylist.cf.example /etc/greylist/greylist.cf")


def man(*args: str, path: str = "/usr/bin:/bin", **env: str) -> subprocess.CompletedProcess:
    man_program = shutil.which("man", path="/usr/bin:/bin")
    require(None if man_program else "man is not installed (Debian: man-db)")
    return subprocess.run([man_program, *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": path, "LANG": "C.UTF-8", "MANWIDTH": "80",
                               "MAN_KEEP_FORMATTING": "", **env},
                          stdin=subprocess.DEVNULL)


def test_man_finds_the_pages_beside_the_programs_in_path(installed):
    found = man("-w", "greylist", path="%s/bin:/usr/bin:/bin" % installed)
    assert (found.returncode, found.stdout.strip()) == \
        (0, str(installed / "share" / "man" / "man8" / "greylist.8")), found.stderr


def test_readmes_copy_command_makes_man_find_every_page(installed):
    prefix = installed.parent.parent
    run(readme_command("install -D -m 0644 -t /usr/local/share/man/man8"), prefix, prefix)
    manpath = prefix / "usr" / "local" / "share" / "man"
    for page in MAN_PAGES:
        name = page[:-len(".8")]
        found = man("-w", "8", name, MANPATH=str(manpath))
        assert (found.returncode, found.stdout.strip()) == \
            (0, str(manpath / "man8" / page)), found.stderr
        assert (manpath / "man8" / page).stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("page", MAN_PAGES)
def test_an_installed_man_page_renders_without_a_warning(installed, page):
    path = installed / "share" / "man" / "man8" / page
    groff = shutil.which("groff", path="/usr/bin:/bin")
    require(None if groff else "groff is not installed (Debian: groff-base)")
    linted = subprocess.run([groff, "-ww", "-man", "-z", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert (linted.returncode, linted.stderr) == (0, "")
    shown = man("--warnings=all", "-l", str(path))
    assert (shown.returncode, shown.stderr) == (0, "")
    assert shown.stdout.splitlines()[0].split()[0] == page[:-len(".8")].upper() + "(8)"


def test_the_programs_run_as_a_user_who_cannot_read_root_files(installed):
    python = installed / "bin" / "python"
    # The environment's interpreter is Debian's, outside /root.
    assert os.path.realpath(python).startswith("/usr/bin/python3")
    require(None if os.geteuid() == 0 and shutil.which("runuser")
            else "needs root and runuser to run the programs as nobody")
    for program in ("greylist", "greylistctl", "greylistd", "greylist-socketmap",
                    "greylist-postscreen"):
        done = subprocess.run(["runuser", "-u", "nobody", "--", str(installed / "bin" / program),
                               "--version"], capture_output=True, text=True, timeout=60,
                              cwd="/")
        assert (done.returncode, done.stdout.strip(), done.stderr) == (0, __version__, ""), \
            program
