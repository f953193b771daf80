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
    """Paste the snippets into the instance's configuration, and return
    what postconf and postfix check say."""
    paste(pf, master, main)
    said = ""
    for command in (["postconf", "-c", str(pf.config_dir), "-n"],
                    ["postconf", "-c", str(pf.config_dir), "-M"]):
        said += subprocess.run(command, capture_output=True, text=True, timeout=30).stderr
    status, out = pf._postfix("check")
    assert status == 0, out
    return said + out


def paste(pf: PostfixInstance, master: str, main: str) -> None:
    """Paste the snippets into the instance's configuration, as an
    administrator would: a pasted service replaces the one of the same
    name, a pasted setting the one of the same name."""
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


# The canonical snippet: README's "Using it with Postfix", master.cf.example
# and greylist(8)'s POSTFIX INTEGRATION show the same lines.
HEADER = re.compile(r"^/etc/(postfix/master\.cf|postfix/main\.cf|greylist/greylist\.cf)"
                    r"(?: \(.*\))?:?$")
FILES = {"postfix/master.cf": "master.cf", "postfix/main.cf": "main.cf",
         "greylist/greylist.cf": "greylist.cf"}


def canonical_readme() -> dict[str, str]:
    """{"master.cf", "main.cf", "greylist.cf": lines} of README's code
    block that starts with "# /etc/postfix/master.cf"."""
    text = (ROOT / "README.md").read_text()
    block = text.split("\n    # /etc/postfix/master.cf\n")
    assert len(block) == 2, "README: one block starts with # /etc/postfix/master.cf"
    found, current = {name: "" for name in FILES.values()}, "master.cf"
    for line in block[1].splitlines():
        if line and not line.startswith("    "):
            break
        header = HEADER.match(line[len("    # "):]) if line.startswith("    # ") else None
        if header:
            current = FILES[header.group(1)]
        elif line.strip():
            found[current] += line[4:] + "\n"
    return found


def canonical_example() -> dict[str, str]:
    """The same lines of master.cf.example: its first service, the
    main.cf lines right after the "# /etc/postfix/main.cf" comment, and
    the settings line of its installation comment."""
    lines = (ROOT / "master.cf.example").read_text().splitlines()
    first = next(index for index, line in enumerate(lines)
                 if line and not line.startswith("#"))
    master = lines[first] + "\n"
    for line in lines[first + 1:]:
        if not line[:1].isspace():
            break
        master += line + "\n"
    start = next(index for index, line in enumerate(lines)
                 if line.startswith("# /etc/postfix/main.cf"))
    main, seen = "", False
    for line in lines[start:]:
        if line.startswith("#   "):
            main, seen = main + line[len("#   "):] + "\n", True
        elif seen:
            break
    settings = [line[len("#     "):] for line in lines
                if line.startswith("#     greylist_database = ")]
    return {"master.cf": master, "main.cf": main, "greylist.cf": "\n".join(settings) + "\n"}


def canonical_man() -> dict[str, str]:
    """The same lines of greylist(8)'s first POSTFIX INTEGRATION block."""
    page = (ROOT / "man" / "greylist.8").read_text()
    section = page.split(".SH POSTFIX INTEGRATION")[1].split("\n.SH ")[0]
    block = plain(re.search(r"\n\.nf\n(.*?)\n\.fi", section, re.S).group(1))
    found, current = {name: "" for name in FILES.values()}, None
    for line in block.splitlines():
        header = HEADER.match(line)
        if header:
            current = FILES[header.group(1)]
        elif line.strip():
            assert current and line.startswith("    "), line
            found[current] += line[4:] + "\n"
    return found


def test_readme_master_cf_example_and_the_man_page_show_one_canonical_snippet():
    readme = canonical_readme()
    assert readme == canonical_example() == canonical_man()
    # What the snippet must say (README.md, Installation; issue 15).
    assert services(readme["master.cf"]) == {("policy", "unix")}
    assert "user=greylist argv=/opt/greylist/bin/greylist -c /etc/greylist/greylist.cf" \
        in readme["master.cf"]
    assert "policy_time_limit = 3600\n" in readme["main.cf"]
    assert readme["main.cf"].rstrip().endswith(
        "check_policy_service { unix:private/policy, default_action=DUNNO }")
    assert readme["greylist.cf"] == "greylist_database = /var/lib/greylist/greylist\n"
    from greylist.config import read_settings
    assert read_settings(readme["greylist.cf"]) == {"database": "/var/lib/greylist/greylist"}


def test_the_canonical_snippet_is_accepted_as_pasted(instance):
    found = canonical_readme()
    said = check(instance, found["master.cf"], found["main.cf"])
    assert "warning" not in said and "fatal" not in said, said
    # And so is its form for hosts without syslog.
    said = check(instance, found["master.cf"].replace("user=greylist ",
                                                      "user=greylist:postdrop "),
                 found["main.cf"])
    assert "warning" not in said and "fatal" not in said, said


def test_no_page_recommends_postmap_s_for_the_live_database():
    # postmap -s stops early, without an error, while a cleanup deletes
    # (postfix-interop.md 2.3.8): greylistctl dump instead, and
    # postmap -s appears only beside it (greylistctl(8): dump is "like
    # postmap -s").
    for path in [ROOT / "README.md", ROOT / "master.cf.example",
                 *sorted((ROOT / "man").glob("*.8"))]:
        text = plain(path.read_text())
        for match in re.finditer(r"postmap -s", text):
            around = text[max(0, match.start() - 300):match.end() + 100]
            assert "dump" in around, (path.name, around)
