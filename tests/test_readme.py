"""The README's list of tested families is the list tests/families.py tests."""

from pathlib import Path

from tests.families import FAMILIES


def test_readme_lists_exactly_the_tested_families():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("<!-- families:", 1)[1].split("<!-- /families -->", 1)[0].split("-->", 1)[1]
    listed = [name.strip() for name in block.replace("\n", " ").split(",")]
    assert listed == [family.name for family in FAMILIES]
