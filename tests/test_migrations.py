"""Migrations: `quartchat migrate` on a fresh database, and several processes at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from quartchat.migrate import current_revision, head_revision

from .mysql import create_database, drop_database
from .redis_util import REDIS_URL, check_shared_redis, drop_prefix, unique_prefix

ROOT = Path(__file__).resolve().parent.parent


def test_migrate_command_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/nested/dir/chat.db"
    env = {**os.environ, "QUARTCHAT_DATABASE_URL": url}
    run = subprocess.run(
        [sys.executable, "-m", "quartchat", "migrate"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert current_revision(url) == head_revision()
    again = subprocess.run(
        [sys.executable, "-m", "quartchat", "migrate"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and "migrating" not in again.stderr, "a second run changes nothing"


def test_bad_setting_stops_the_start_naming_the_variable(tmp_path: Path) -> None:
    env = {**os.environ, "QUARTCHAT_MAX_CONTENT": "lots"}
    run = subprocess.run(
        [sys.executable, "-m", "quartchat", "serve"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "QUARTCHAT_MAX_CONTENT" in run.stderr and "'lots'" in run.stderr
    env = {**os.environ, "QUARTCHAT_WORKERS": "3"}
    run = subprocess.run(
        [sys.executable, "-m", "quartchat", "serve"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "memory://" in run.stderr


def test_concurrent_starts_migrate_once_under_the_redis_lock(tmp_path: Path) -> None:
    check_shared_redis()
    database = create_database()
    prefix = unique_prefix()
    try:
        env = {
            **os.environ,
            "QUARTCHAT_DATABASE_URL": database,
            "QUARTCHAT_BROKER_URL": REDIS_URL,
            "QUARTCHAT_REDIS_PREFIX": prefix,
        }
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "quartchat", "migrate"],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for _ in range(4)
        ]
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
        ran = [o for o in outputs if "migrating" in o]
        assert len(ran) == 1, f"expected exactly one process to migrate, got {len(ran)}"
        assert current_revision(database) == head_revision()
    finally:
        drop_database(database)
        drop_prefix(prefix)
