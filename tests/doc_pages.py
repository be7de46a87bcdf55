"""The documentation pages whose Python blocks and commands the tests run, and how their parts are read.

PAGES is also the order in which tests/test_readme_commands.py runs the pages' commands, in one scratch
folder: docs/gpu.md trains the run (runs/c10-r18-iat) that docs/cli.md resumes and reports on, and
docs/evaluation.md extends an evaluation of the README's run (runs/x).
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/gpu.md", "docs/cli.md", "docs/evaluation.md", "docs/reproduce.md", "docs/library.md",
         "docs/development.md")
# Pages under docs/ whose blocks are not run, and why (every other page with a python block or an iat command
# must be in PAGES).
NOT_RUN_PAGES = {
    "docs/cluster.md": "needs a SLURM cluster: tests/test_reproduce_slurm.py runs `--executor slurm` (dry run, "
                       "submit, rerun, --wait) and tests/test_slurm_srun.py the sbatch script and srun, on the "
                       "one-node SLURM that .ci/run starts",
    "docs/results.md": "generated tables; its bash block lists the paper-scale GPU tables, whose plan "
                       "(`--dry-run`) docs/reproduce.md's `iat reproduce paper-cifar10-resnet18` already runs",
}
COMMAND = re.compile(r"(iat|torchrun|tensorboard)\b")


def text(page: str) -> str:
    return (ROOT / page).read_text()


def python_blocks(page: str) -> list[str]:
    """The page's ```python blocks, in order."""
    return re.findall(r"```python\n(.*?)```", text(page), re.S)


def command_lines(page: str) -> list[str]:
    """The command lines of the page's bash blocks, comments stripped, in order."""
    lines, fence = [], None
    for line in text(page).splitlines():
        if line.startswith("```"):
            fence = None if fence is not None else line[3:].strip()
            continue
        if fence == "bash" and COMMAND.match(line):
            lines.append(re.sub(r"\s+#.*$", "", line).strip())
    return lines


def prose_lines(page: str) -> list[tuple[int, str]]:
    """(line number, line) of the page outside fenced blocks."""
    out, fenced = [], False
    for number, line in enumerate(text(page).splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def headings(page: str) -> list[tuple[int, int, str]]:
    """(line number, level, text) of the page's ATX headings, outside fenced blocks."""
    return [(n, len(m.group(1)), m.group(2).strip()) for n, line in prose_lines(page)
            if (m := re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line))]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, links reduced to their text, punctuation other than
    '-' and '_' dropped, spaces as '-'."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: str) -> list[str]:
    """The anchors of the page's headings, in order; a repeated anchor gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = []
    for _, _, heading in headings(page):
        base = github_anchor(heading)
        out.append(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return out


def links(page: str) -> list[tuple[int, str]]:
    """(line number, target) of the page's Markdown links outside fenced blocks and inline code."""
    prose = "\n".join(line for _, line in prose_lines(page))
    prose = re.sub(r"`[^`]*`", lambda code: "\n" * code.group(0).count("\n"), prose)  # keeps line count
    numbers = [n for n, _ in prose_lines(page)]
    return [(numbers[prose.count("\n", 0, m.start())], m.group(1))
            for m in re.finditer(r"\[[^\]]*\]\(([^)\s]+)\)", prose)]
