"""benchmarks/gpu_check.sh runs every test that needs CUDA: its ``pytest -k`` expression
selects each test that skips here for want of CUDA.

Checked on a machine without CUDA, where those tests are the ones whose ``skipif`` condition
holds and whose reason names CUDA or a GPU; the collection runs in a subprocess with a small
plugin that records them, and the tests that the script's expression leaves selected.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

PLUGIN = """
import json
import os

import pytest

needs_cuda = []


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        for mark in item.iter_markers("skipif"):
            reason = str(mark.kwargs.get("reason", "")).lower()
            if True in mark.args and ("cuda" in reason or "gpu" in reason):
                needs_cuda.append(item.nodeid)


def pytest_collection_finish(session):
    selected = [item.nodeid for item in session.items]
    with open(os.environ["GPU_CHECK_SELECTION"], "w") as f:
        json.dump({"needs_cuda": needs_cuda, "selected": selected}, f)
"""


def pytest_k_expression() -> str:
    """The ``-k`` expression of the script's pytest part."""
    found = re.findall(r'-m pytest [^\n]*-k "([^"]+)"', SCRIPT.read_text())
    assert len(found) == 1, found
    return found[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA tests do not skip here")
def test_the_pytest_part_selects_every_test_that_needs_cuda(tmp_path: Path) -> None:
    (tmp_path / "gpu_check_selection.py").write_text(PLUGIN)
    out = tmp_path / "selection.json"
    paths = [str(tmp_path), os.environ.get("PYTHONPATH", "")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "GPU_CHECK_SELECTION": str(out),
    }
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "gpu_check_selection",
            "-k",
            pytest_k_expression(),
            "tests",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    found = json.loads(out.read_text())
    needs_cuda, selected = set(found["needs_cuda"]), set(found["selected"])
    assert len(needs_cuda) >= 20  # the suite's CUDA tests were found
    assert sorted(needs_cuda - selected) == []
