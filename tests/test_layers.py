"""The package's layering (docs/ARCHITECTURE.md) is a contract that import-linter checks (pyproject.toml's
[tool.importlinter]): every module imports only from layers below its own, and no sibling modules import each
other. These tests run the real checker on the real package, show that it catches an upward import and a
cycle between siblings, and that every top-level module has a layer and ARCHITECTURE.md names them all."""
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def lint(src: Path, cwd: Path) -> subprocess.CompletedProcess:
    """lint-imports on the package under `src` with the project's contracts."""
    shutil.copy(ROOT / "pyproject.toml", cwd / "pyproject.toml")
    script = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", script, "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"}, timeout=120)


def layer_names() -> list[str]:
    contract = next(c for c in CONFIG["contracts"] if c["type"] == "layers")
    return [name.strip() for layer in contract["layers"] for name in layer.split("|")]


def test_the_package_keeps_its_contracts(tmp_path):
    done = lint(ROOT / "src", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("module,line,broken", [
    ("records.py", "from .training import trainer\n", "layers"),             # a low layer importing a high one
    ("training/guards.py", "from . import trainer\n", "no cycles between siblings"),  # trainer imports guards
])
def test_the_checker_catches_an_upward_import_and_a_sibling_cycle(tmp_path, module, line, broken):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "iat", src / "iat", ignore=shutil.ignore_patterns("__pycache__"))
    with open(src / "iat" / module, "a") as f:
        f.write(line)
    done = lint(src, tmp_path)
    assert done.returncode != 0
    assert re.search(rf"^{re.escape(broken)}.* BROKEN$", done.stdout, re.M), done.stdout


def test_every_top_level_module_has_a_layer_and_architecture_md_names_it():
    package = ROOT / "src" / "iat"
    top = {p.stem for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")}
    top |= {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert top == {name.removeprefix("iat.") for name in layer_names()}
    architecture = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for name in top:
        assert re.search(rf"`{re.escape(name)}(\.py|/)`", architecture), f"ARCHITECTURE.md does not place {name}"
