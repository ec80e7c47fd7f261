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
