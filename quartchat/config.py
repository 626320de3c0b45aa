"""Settings: read once from the environment (and a ``.env`` file), frozen, failing fast.

Every setting is a ``QUARTCHAT_*`` variable with a default that runs the
embedded mode (SQLite in the working directory, the in-process broker). A bad
value raises :class:`ConfigError` naming the variable and the value. Tests
pass a mapping to :meth:`Settings.from_env` instead of patching ``os.environ``.
This module owns the :class:`Settings` object, the ``.env`` reader and the
checks across settings; what each variable is lives in
:mod:`quartchat.config_table`, how each kind of value is parsed in
:mod:`quartchat.config_values`.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from .config_table import EMPTY_IS_DEFAULT, SPEC
from .errors import ConfigError
from .validate import is_memory_url

__all__ = ["SETTINGS_DOC", "Settings", "load_env_file"]


def _default_server_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname())[:40] or "server"
    return f"{host}-{uuid.uuid4().hex[:8]}"


SETTINGS_DOC: list[tuple[str, str, str]] = [(var, default, doc) for _, var, default, _, doc in SPEC]


def load_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a ``.env`` file: ``KEY=VALUE`` lines, ``#`` comments, optional quotes."""
    values: dict[str, str] = {}
    file = Path(path)
    if not file.is_file():
        return values
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{file}:{number}: expected KEY=VALUE, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


@attrs.frozen
class Settings:
    """Every quartchat setting, validated."""

    database_url: str = "sqlite+aiosqlite:///./quartchat.db"
    broker_url: str = "memory://"
    bind: str = "127.0.0.1:8080"
    server_id: str = attrs.field(factory=_default_server_id)
    workers: int = 1
    redis_prefix: str = "quartchat"
    redis_pool_size: int = 32
    redis_timeout_s: float = 5.0
    max_content: int = 4096
    max_rooms: int = 100
    rate_per_s: float = 20.0
    rate_burst: int = 40
    outbound_queue: int = 1000
    room_inbox: int = 10000
    history_max: int = 100
    room_idle_s: float = 30.0
    batch_max: int = 500
    db_timeout_s: float = 5.0
    gap_timeout_s: float = 0.2
    position_check_s: float = 2.0
    drain_timeout_s: float = 10.0
    allowed_origins: tuple[str, ...] = ("*",)
    fast_writes: bool = True
    ws_compression: bool = False
    event_loop: str = "auto"
    gc_threshold: tuple[int, int, int] | None = (10_000, 10, 10)  # None: Python's own
    auth: str = "none"
    # Secrets never appear in repr (logs, tracebacks).
    jwt_secret: str | None = attrs.field(default=None, repr=False)
    jwt_public_key: str | None = None
    jwt_algorithms: tuple[str, ...] = ()
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: float = 10.0
    api_key: str | None = attrs.field(default=None, repr=False)
    log_level: str = "INFO"
    log_json: bool = False

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        env_file: str | os.PathLike[str] | None = ".env",
    ) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``) over a ``.env`` file."""
        merged: dict[str, str] = dict(load_env_file(env_file)) if env_file else {}
        merged.update(os.environ if environ is None else environ)
        kwargs: dict[str, Any] = {}
        for field, var, _default, parse, _doc in SPEC:
            raw = merged.get(var)
            if raw is None or (field in EMPTY_IS_DEFAULT and not raw.strip()):
                continue
            kwargs[field] = parse(var, raw)
        settings = cls(**kwargs)
        settings.check()
        return settings

    def check(self) -> None:
        """Reject combinations that cannot work, naming the variables."""
        if self.workers > 1 and is_memory_url(self.broker_url):
            raise ConfigError(
                f"QUARTCHAT_WORKERS={self.workers} with QUARTCHAT_BROKER_URL=memory://: the "
                "in-process broker cannot fan out across processes; use one worker or a "
                "redis:// broker"
            )
        if self.auth == "jwt":
            from .auth import TokenVerifier

            TokenVerifier.from_settings(self)  # reads the key; names what is wrong
        elif self.jwt_secret is not None or self.jwt_public_key is not None:
            raise ConfigError(
                "QUARTCHAT_JWT_SECRET / QUARTCHAT_JWT_PUBLIC_KEY are set but QUARTCHAT_AUTH="
                f"{self.auth}: set QUARTCHAT_AUTH=jwt, or remove the key"
            )

    @property
    def frame_limit(self) -> int:
        """Largest WebSocket frame accepted: room for max_content fully JSON-escaped."""
        return max(65536, self.max_content * 6 + 4096)
