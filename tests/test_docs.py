"""The README is the front door: short, every page it links to exists, and the docs keep
up with the code where they list what the code decides."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_is_short_and_its_links_exist():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert links and all((REPO / link).exists() for link in links if "://" not in link), links


def test_the_docs_links_exist():
    for page in (REPO / "docs").glob("*.md"):
        for link in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if "://" not in link:
                assert (page.parent / link).exists() or (REPO / link).exists(), f"{page.name}: {link}"


def test_the_reliability_page_lists_every_field_an_extension_may_change():
    from latentflow.config import CONTINUABLE_FIELDS

    text = (REPO / "docs" / "reliability.md").read_text()
    for field in CONTINUABLE_FIELDS:
        assert f"`{field}`" in text or f"`{field.split('.')[1]}`" in text, field
