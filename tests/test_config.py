"""Settings: defaults run the embedded mode; bad values name the variable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from quartchat.config import SETTINGS_DOC, Settings
from quartchat.errors import ConfigError


def test_defaults_are_the_embedded_mode() -> None:
    s = Settings.from_env({}, env_file=None)
    assert s.database_url == "sqlite+aiosqlite:///./quartchat.db"
    assert s.broker_url == "memory://"
    assert s.bind == "127.0.0.1:8080"
    assert (s.max_content, s.max_rooms, s.rate_per_s, s.rate_burst, s.outbound_queue) == (
        4096,
        100,
        20.0,
        40,
        1000,
    )
    assert s.server_id


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("QUARTCHAT_DATABASE_URL", "postgres://x"),
        ("QUARTCHAT_DATABASE_URL", "mysql://root@localhost/db"),
        ("QUARTCHAT_BROKER_URL", "kafka://x"),
        ("QUARTCHAT_BIND", "8080"),
        ("QUARTCHAT_BIND", "host:99999"),
        ("QUARTCHAT_MAX_CONTENT", "big"),
        ("QUARTCHAT_MAX_CONTENT", "0"),
        ("QUARTCHAT_RATE_PER_S", "-1"),
        ("QUARTCHAT_WORKERS", "0"),
        ("QUARTCHAT_SERVER_ID", "has space"),
        ("QUARTCHAT_LOG_JSON", "maybe"),
        ("QUARTCHAT_HISTORY_MAX", "101"),
    ],
)
def test_bad_values_name_the_variable_and_value(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value}, env_file=None)
    assert var in str(info.value) and repr(value) in str(info.value)


def test_memory_broker_with_several_workers_is_refused() -> None:
    with pytest.raises(ConfigError, match="QUARTCHAT_WORKERS=2.*memory://"):
        Settings.from_env({"QUARTCHAT_WORKERS": "2"}, env_file=None)
    s = Settings.from_env(
        {"QUARTCHAT_WORKERS": "2", "QUARTCHAT_BROKER_URL": "redis://h:6379/0"}, env_file=None
    )
    assert s.workers == 2


def test_env_file_is_read_and_environment_wins(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text('# comment\nQUARTCHAT_MAX_ROOMS=7\nexport QUARTCHAT_BIND="0.0.0.0:9000"\n')
    s = Settings.from_env({"QUARTCHAT_MAX_ROOMS": "9"}, env_file=env)
    assert s.max_rooms == 9 and s.bind == "0.0.0.0:9000"
    env.write_text("garbage line\n")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        Settings.from_env({}, env_file=env)


def test_env_example_lists_every_setting() -> None:
    example = (Path(__file__).parent.parent / ".env.example").read_text()
    for var, default, _doc in SETTINGS_DOC:
        assert f"{var}=" in example, var


@pytest.mark.parametrize("workers", ["0", "65", "two"])
def test_workers_on_the_command_line_are_checked_like_the_setting(
    workers: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`serve --workers N` is refused outside QUARTCHAT_WORKERS's 1..64, before anything starts
    (it used to accept any N >= 1, and an int() of the text)."""
    from quartchat.cli import main

    monkeypatch.chdir(tmp_path)  # no .env
    for var in [v for v in os.environ if v.startswith("QUARTCHAT_")]:
        monkeypatch.delenv(var)
    assert main(["serve", "--workers", workers]) == 2
    err = capsys.readouterr().err
    assert f"--workers={workers!r}" in err, err
    assert ("must be 1..64" if workers.isdigit() else "must be an integer") in err, err


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("QUARTCHAT_BROKER_URL", "rediss+bogus://alice:hunter2secret@h:6379/0"),
        ("QUARTCHAT_DATABASE_URL", "mysql://root:hunter2secret@127.0.0.1/db"),
        ("QUARTCHAT_DATABASE_URL", "postgres://root:hunter2secret@127.0.0.1/db"),
    ],
)
def test_a_refused_url_is_named_without_its_password(var: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value}, env_file=None)
    message = str(info.value)
    assert var in message and "hunter2secret" not in message and "[redacted]@" in message


def test_the_broker_factory_names_an_unknown_url_without_its_password() -> None:
    from quartchat.broker import create_broker

    settings = Settings.from_env({}, env_file=None)
    object.__setattr__(settings, "broker_url", "nats://u:hunter2secret@h:4222")
    with pytest.raises(ValueError) as info:
        create_broker(settings)
    assert "hunter2secret" not in str(info.value)
