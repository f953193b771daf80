"""The Postfix snippets of the man pages work when pasted: a real Postfix's
postconf and postfix check accept them without a warning."""

import pathlib
import re
import shutil
import subprocess
import tempfile

import pytest

from tests.conftest import require
from tests.postfix_instance import PostfixInstance, postfix_available

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.postfix


def plain(roff: str) -> str:
    return re.sub(r"\\f[BIRP]", "", roff).replace("\\-", "-").replace("\\e", "\\")


def snippets(page: str) -> dict[str, str]:
    """{"master.cf": text, "main.cf": text} of a page's POSTFIX
    INTEGRATION blocks headed /etc/postfix/master.cf: and main.cf:."""
    section = page.split(".SH POSTFIX INTEGRATION")[1].split("\n.SH ")[0]
    found = {"master.cf": "", "main.cf": ""}
    for block in re.findall(r"\n\.nf\n(.*?)\n\.fi", section, re.S):
        current = None
        for line in plain(block).splitlines():
            header = re.fullmatch(r"/etc/postfix/(master\.cf|main\.cf)(?: \(.*\))?:", line)
            if header:
                current = header.group(1)
                continue
            if current and line.startswith("    "):
                found[current] += line[4:] + "\n"
            elif not line.strip():
                continue
            else:
                current = None
    return found


def services(master: str) -> set[tuple[str, str]]:
    return {tuple(line.split()[:2]) for line in master.splitlines()
            if line and not line[0].isspace() and not line.startswith("#")}


@pytest.fixture
def instance():
    require(postfix_available())
    root = pathlib.Path(tempfile.mkdtemp(prefix="greylist-snippets-"))
    root.chmod(0o755)
    pf = PostfixInstance(root, ["/bin/true"])
    pf._write_config()
    yield pf
    shutil.rmtree(root)


def check(pf: PostfixInstance, master: str, main: str) -> str:
    """Paste the snippets into the instance's configuration, as an
    administrator would (a pasted service replaces the one of the same
    name), and return what postconf and postfix check say."""
    base = (pf.config_dir / "master.cf").read_text()
    pasted = services(master)
    kept, skipping = [], False
    for line in base.splitlines():
        if line and not line[0].isspace():
            skipping = tuple(line.split()[:2]) in pasted
        if not skipping:
            kept.append(line)
    (pf.config_dir / "master.cf").write_text("\n".join(kept) + "\n" + master)
    # A pasted setting replaces the one of the same name.
    names = {line.split("=")[0].strip() for line in main.splitlines()
             if line and not line[0].isspace() and "=" in line}
    base_main = [line for line in (pf.config_dir / "main.cf").read_text().splitlines()
                 if line.split("=")[0].strip() not in names]
    (pf.config_dir / "main.cf").write_text("\n".join(base_main) + "\n" + main)
    said = ""
    for command in (["postconf", "-c", str(pf.config_dir), "-n"],
                    ["postconf", "-c", str(pf.config_dir), "-M"]):
        said += subprocess.run(command, capture_output=True, text=True, timeout=30).stderr
    status, out = pf._postfix("check")
    assert status == 0, out
    return said + out


@pytest.mark.parametrize("page", ["greylist-socketmap.8", "greylist-postscreen.8",
                                  "greylist.8"])
def test_a_man_page_snippet_is_accepted_as_pasted(instance, page):
    found = snippets((ROOT / "man" / page).read_text())
    if page == "greylist-postscreen.8":
        # The callout's parameters are the design's: no Postfix knows them yet.
        found["main.cf"] = "".join(
            line + "\n" for line in found["main.cf"].splitlines()
            if not line.startswith("postscreen_policy_"))
    assert found["master.cf"] or found["main.cf"], page
    said = check(instance, found["master.cf"], found["main.cf"])
    assert "warning" not in said and "fatal" not in said, said


def test_the_snippets_are_found():
    found = snippets((ROOT / "man" / "greylist-socketmap.8").read_text())
    assert ("cleanup-out", "unix") in services(found["master.cf"])
    assert "submission_end_of_data_restrictions = $greylist_outbound" in found["main.cf"]
