"""The limits the docs state are the ones the code enforces."""

from __future__ import annotations

import re
from pathlib import Path

from ingest import constants

ROOT = Path(__file__).resolve().parents[1]


def test_the_nesting_limit_in_the_docs_is_the_acceptors() -> None:
    for page in ("README.md", "docs/operations.md"):
        text = (ROOT / page).read_text()
        stated = {int(n.replace(",", "")) for n in re.findall(
            r"nested deeper than (?:orjson's limit \()?([\d,]+) levels", text)}
        assert stated == {constants.MAX_JSON_DEPTH}, (page, stated)
