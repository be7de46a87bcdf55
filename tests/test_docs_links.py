"""The README stays a five-minute read: at most 220 lines, a table of contents near the top whose links
reach its sections; every relative link in it and in the docs pages names a file (and a heading) that exists."""
import re
from urllib.parse import unquote

import pytest

from doc_pages import PAGES, ROOT, anchors, github_anchor, headings, links, text

LINKED = sorted({*PAGES, *(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")), "benchmarks/README.md"})


def test_github_anchors():
    assert github_anchor("Quick start (two commands)") == "quick-start-two-commands"
    assert github_anchor("Reproduce the paper's tables") == "reproduce-the-papers-tables"
    assert github_anchor("More examples: `--extend`") == "more-examples---extend"
    assert github_anchor("`iat.evaluate`: evaluating your own model") == "iatevaluate-evaluating-your-own-model"
    assert github_anchor("Table specs, `extends` and `drop_cells`") == "table-specs-extends-and-drop_cells"


def test_the_readme_is_short():
    lines = text("README.md").splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; move detail to a page under docs/"


def test_the_readme_has_a_table_of_contents_of_its_sections():
    sections = [(n, h) for n, level, h in headings("README.md") if level == 2]
    assert sections and sections[0][1] == "Contents" and sections[0][0] <= 30, sections[:1]
    lines = text("README.md").splitlines()
    start = sections[0][0]
    end = sections[1][0] if len(sections) > 1 else len(lines)
    toc = re.findall(r"\]\(#([^)]+)\)", "\n".join(lines[start:end - 1]))
    real = anchors("README.md")
    assert toc and all(a in real for a in toc), [a for a in toc if a not in real]
    # every other section is listed, in order
    listed = [a for a in toc if a in {github_anchor(h) for _, h in sections}]
    assert listed == [github_anchor(h) for _, h in sections[1:]]


def test_sections_named_in_messages_exist():
    """Error messages point users at a section ("README.md, section Data"): it must still be there."""
    named = set()
    for source in (ROOT / "src").rglob("*.py"):
        named |= set(re.findall(r"((?:README|docs/[\w-]+)\.md), section ([A-Z][\w ]*\w)", source.read_text()))
    for page, section in named:
        assert section in [h for _, _, h in headings(page)], f"{page} has no section {section!r}"


@pytest.mark.parametrize("page", LINKED)
def test_relative_links_resolve(page):
    bad = []
    for number, target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / page).parent / unquote(path) if path else ROOT / page
        if not file.exists():
            bad.append(f"{page}:{number}: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(str(file.resolve().relative_to(ROOT))):
            bad.append(f"{page}:{number}: {target} (no such heading)")
    assert not bad, "\n".join(bad)
