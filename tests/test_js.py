"""Runs the JS module's unit tests (tests/js/*.test.mjs) with node's test runner."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_quartchat_js_unit_tests_pass_under_node() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is missing: run `bash ops/ensure-services.sh` (apt-get install nodejs)")
    result = subprocess.run(
        [node, "--test", *sorted(str(p) for p in (ROOT / "tests" / "js").glob("*.test.mjs"))],
        cwd=ROOT,
        capture_output=True,
        check=False,
        text=True,
        timeout=100,
    )
    summary = [
        line
        for line in result.stdout.splitlines()
        if line.startswith(("# pass", "# fail", "# tests"))
    ]
    print("\n".join(summary))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "# fail 0" in summary
