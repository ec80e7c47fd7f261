"""The README's examples run as a user would run them."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_trains_and_resumes() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--epochs", "4"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    assert "checkpoint saved and restored" in out
    final = float(re.search(r"final test accuracy ([0-9.]+)", out).group(1))
    assert final > 0.7  # 4 balanced classes: chance is 0.25


def test_readme_quick_start_runs_without_numpy() -> None:
    """The library needs PyTorch alone, as the install pages say: the README's quick start runs
    with NumPy unimportable, and torch's warning about it is all it prints on stderr."""
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1]
    code = re.search(r"^```python\n(.*?)^```", quick_start, re.DOTALL | re.MULTILINE).group(1)
    result = subprocess.run(
        [sys.executable, "-c", "import sys\nsys.modules['numpy'] = None\n" + code],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert all("Failed to initialize NumPy" in line or line.startswith("  ") for line in lines)
