"""The README is true: its list of tested families is the list tests/families.py tests, and its Python code blocks
run as written, in order, in one namespace (as a reader pastes them)."""

import re
from pathlib import Path

import pytest
from PIL import Image

import hae_fx
from hae_fx.viz import FIGURE_PIXELS
from tests.families import FAMILIES

README = Path(__file__).parents[1] / "README.md"


def test_readme_lists_exactly_the_tested_families():
    readme = README.read_text()
    block = readme.split("<!-- families:", 1)[1].split("<!-- /families -->", 1)[0].split("-->", 1)[1]
    listed = [name.strip() for name in block.replace("\n", " ").split(",")]
    assert listed == [family.name for family in FAMILIES]


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """Every ```python block, on the eager-compiler path (the README's code as written; the rewritten graphs run on
    the ops' reference implementations instead of Inductor, whose compiled path the other tests cover)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 3
    transform = hae_fx.transform

    def eager_transform(model, config=None, **kwargs):
        kwargs.setdefault("options", {"hae.compiler": "eager"})
        return transform(model, config, **kwargs)

    monkeypatch.setattr(hae_fx, "transform", eager_transform)
    monkeypatch.chdir(tmp_path)  # the blocks write pictures into the current folder
    namespace: dict = {}
    for number, block in enumerate(blocks, 1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as error:
            pytest.fail(f"README python block {number} raised {type(error).__name__}: {error}\n{block}")
    assert (tmp_path / "kept.png").stat().st_size > 0
    assert Image.open(tmp_path / "kept_states.png").size == FIGURE_PIXELS
    assert isinstance(namespace["out"].past_key_values, hae_fx.HAECache)
