"""docs/results.md's generated tables are what the committed run directories say: each block between the
`iat reproduce` markers is rebuilt from docs/results/runs/TABLE (the copy that `scripts/results.sh` keeps)
and must match byte for byte, so no number in them can be typed by hand or left behind by a re-run whose
runs were not exported."""
import re
from pathlib import Path

import pytest

from iat.reproduce import spec as specs
from iat.reproduce.render_table import BEGIN, END, to_markdown
from iat.reproduce.table import build_table

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "results.md"
BLOCK = re.compile(re.escape(BEGIN.format("@")).replace("@", "(?P<name>[\\w.-]+)") + "\n(?P<body>.*?)"
                   + re.escape(END.format("@")).replace("@", "(?P=name)"), re.S)


def blocks() -> list[tuple[str, str]]:
    return [(m["name"], m["body"]) for m in BLOCK.finditer(DOC.read_text())]


def test_the_document_has_the_anchor_tables():
    names = [name for name, _ in blocks()]
    assert "anchor-fashion-mnist" in names and len(names) == len(set(names)), names


@pytest.mark.parametrize("name,body", blocks(), ids=[name for name, _ in blocks()])
def test_each_generated_table_rebuilds_from_the_committed_runs(name, body):
    runs = ROOT / "docs" / "results" / "runs" / name
    assert runs.is_dir(), f"{name}: no committed run directories in {runs}"
    command = re.search(r"^Regenerate: `(.*)`$", body, re.M)
    images = re.findall(r"^!\[(.*)\]\((.*)\)$", body, re.M)
    assert command, name
    for _, image in images:
        assert (DOC.parent / image).is_file(), f"{name}: {image} is linked but not committed"
    table = build_table(specs.load_spec(name), runs)
    assert to_markdown(table, images, command[1]) == body
