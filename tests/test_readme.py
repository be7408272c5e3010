"""The README's library examples run as written."""

import pathlib
import re

import pytest

SECTIONS = ["## Compose into your own research code", "### Speech recognition and translation: the library parts"]


@pytest.mark.parametrize("heading", SECTIONS)
def test_readme_example_runs(heading):
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    section = text.split(heading, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
