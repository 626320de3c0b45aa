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
        [
            sys.executable,
            str(ROOT / "ops/bench/bench.py"),
            "smoke",
            "--results",
            str(results),
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
    )
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    by_name = {line["scenario"]: line["result"] for line in lines}
    assert set(by_name) == {"pingpong", "store", "fanout", "bigroom", "connections", "maxrate"}
    for name in ("fanout", "bigroom"):
        r = by_name[name]
        assert (
            r["delivered"] > 0
            and r["loss"] == 0
            and r["duplicates"] == 0
            and r["out_of_order"] == 0
        )
    assert by_name["store"]["stored_in_db"] == by_name["store"]["messages"] == 200
    assert (
        by_name["connections"]["connected"] == 50
        and by_name["connections"]["connect_failures"] == 0
    )
    assert by_name["pingpong"]["p50_ms"] > 0
    assert by_name["maxrate"]["last_passing"] is not None
    assert "| scenario | target | result |" in run.stdout


def test_bench_token_secret_mints_a_token_per_connection(monkeypatch: object) -> None:
    """--token-secret: each connection URL carries an HS256 token for its sender, and the
    servers the tool starts run in auth mode jwt with that secret."""
    import argparse
    import importlib.util
    import os

    import jwt

    spec = importlib.util.spec_from_file_location("bench", ROOT / "ops/bench/bench.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    secret = "bench-secret-0123456789abcdef0123456789"
    old = os.environ.pop(bench.TOKEN_SECRET_ENV, None)
    try:
        assert bench._chat_url("ws://h/chat", "m1") == "ws://h/chat?sender_id=m1"
        os.environ[bench.TOKEN_SECRET_ENV] = secret
        url = bench._chat_url("ws://h/chat", "m1")
        assert url.startswith("ws://h/chat?token=") and "sender_id" not in url
        claims = jwt.decode(url.split("token=", 1)[1], secret, algorithms=["HS256"])
        assert claims["sub"] == "m1" and claims["exp"] > claims["iat"]
    finally:
        os.environ.pop(bench.TOKEN_SECRET_ENV, None)
        if old is not None:
            os.environ[bench.TOKEN_SECRET_ENV] = old
    env = bench._server_env(argparse.Namespace(token_secret=secret, server_env=None))
    assert env == {"QUARTCHAT_AUTH": "jwt", "QUARTCHAT_JWT_SECRET": secret}
