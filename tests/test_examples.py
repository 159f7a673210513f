"""The examples run as documented, so they never rot."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_pool_quickstart():
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "pool_quickstart.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert "primary  (sk-a...0000) -> 429: fail over" in out
    assert "backup   (sk-a...1111) -> 401: fail over" in out
    assert "answer 429 with Retry-After 5" in out
    assert "5 s later the next request gets spare" in out
    assert "sk-ant-demo" not in out
