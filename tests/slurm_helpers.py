"""The one check that a real SLURM is up for the tests marked `slurm` (scripts/slurm-local.sh starts one)."""
import os
import shutil
import subprocess

import pytest


def slurm_node_or_skip() -> None:
    """Skip, with the reason, where no SLURM node is up; a busy node (alloc, comp) is fine, as its jobs queue.
    Where .ci/run brought SLURM up it sets IAT_REQUIRE_SLURM=1, and a node that is not up fails the test instead:
    CI must run these tests, not skip them."""
    reason = None
    if shutil.which("sinfo") is None:
        reason = "sinfo is not on PATH: no SLURM here (bash scripts/slurm-local.sh starts a one-node one)"
    else:
        done = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
        states = {state.rstrip("*~#!%$@^-") for state in done.stdout.split()}
        if done.returncode != 0 or not {"idle", "mix", "alloc", "comp"} & states:
            seen = " ".join((done.stdout or done.stderr).split()) or "nothing"
            reason = f"no SLURM node up (sinfo: {seen}); bash scripts/slurm-local.sh starts one"
    if reason and os.environ.get("IAT_REQUIRE_SLURM") == "1":
        pytest.fail(f"IAT_REQUIRE_SLURM=1 (.ci/run started SLURM) but {reason}")
    if reason:
        pytest.skip(reason)
