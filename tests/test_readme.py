"""The README and the docs pages it points to are executable documentation: every Python block in them
runs as written (the pages are tests/doc_pages.py's PAGES)."""
import pytest

from doc_pages import PAGES, python_blocks

BLOCKS = [(page, index, block) for page in PAGES for index, block in enumerate(python_blocks(page))]


def test_the_readme_has_python_blocks():
    assert python_blocks("README.md")


@pytest.mark.parametrize("page, index, block", BLOCKS, ids=[f"{page}:{index + 1}" for page, index, _ in BLOCKS])
def test_readme_python_block_runs(page, index, block):
    exec(compile(block, f"{page} python block {index + 1}", "exec"), {})
