"""docs/reliability.md states the sizes the suite really uses."""

import re

from tests.reliability import CI_SIZES, FULL_SIZES, ROOT


def test_reliability_document_states_the_suite_sizes():
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)` \| ([\d,]+) \| [\d,]+ \|", text, re.M))
    ci_rows = dict(re.findall(r"^\| `(\w+)` \| [\d,]+ \| ([\d,]+) \|", text, re.M))
    assert {k: int(v.replace(",", "")) for k, v in rows.items()} == FULL_SIZES
    assert {k: int(v.replace(",", "")) for k, v in ci_rows.items()} == CI_SIZES
    assert "tests/run-reliability" in text
