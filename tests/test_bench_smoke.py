"""A seconds-long run of every benchmark scenario: the tool works and reports sane numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    run = subprocess.run(
        [sys.executable, str(ROOT / "ops/bench/bench.py"), "smoke", "--results", str(results),
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300,
    )
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    by_name = {line["scenario"]: line["result"] for line in lines}
    assert set(by_name) == {"pingpong", "store", "fanout", "bigroom", "connections", "maxrate"}
    for name in ("fanout", "bigroom"):
        r = by_name[name]
        assert r["delivered"] > 0 and r["loss"] == 0 and r["duplicates"] == 0 and r["out_of_order"] == 0
    assert by_name["store"]["stored_in_db"] == by_name["store"]["messages"] == 200
    assert by_name["connections"]["connected"] == 50 and by_name["connections"]["connect_failures"] == 0
    assert by_name["pingpong"]["p50_ms"] > 0
    assert by_name["maxrate"]["last_passing"] is not None
    assert "| scenario | target | result |" in run.stdout
