"""Serving with hypercorn, with our own graceful shutdown.

hypercorn's own SIGTERM handling cancels open websockets (clients see 1011)
or, with a signal to the process group, lets workers die (1006). We install
our own handlers and pass hypercorn a ``shutdown_trigger`` that first drains
the hub: pending writes committed and acked, every socket closed with 1001.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.utils import wrap_app

from .app import create_app
from .config import Settings
from .hub import Hub

__all__ = ["hypercorn_config", "serve_worker", "run_worker"]

log = logging.getLogger(__name__)


def hypercorn_config(settings: Settings, path: str | None = None) -> HypercornConfig:
    """hypercorn settings from ``hypercorn.toml`` (if present), with our bind and limits."""
    path = path or os.environ.get("QUARTCHAT_HYPERCORN_CONFIG", "hypercorn.toml")
    if Path(path).is_file():
        config = HypercornConfig.from_toml(path)
    else:
        config = HypercornConfig()
        config.backlog = 4096
        config.graceful_timeout = 10
        config.websocket_ping_interval = 20
    config.bind = [settings.bind]
    config.workers = 1  # each process serves one; our launcher runs several
    # The frame limit must exceed max_content plus the JSON around it (protocol).
    config.websocket_max_message_size = max(
        int(config.websocket_max_message_size or 0) if config.websocket_max_message_size
        and config.websocket_max_message_size < 16 * 1024 * 1024 else 0,
        settings.frame_limit,
    )
    # Route hypercorn's logs through our handlers (JSON or text), once.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = logging.getLogger("hypercorn.access") if config.accesslog else None
    return config


async def serve_worker(settings: Settings, sockets: Any = None) -> None:
    """Serve one process until SIGTERM/SIGINT, then drain and exit."""
    config = hypercorn_config(settings)
    hub = Hub(settings)
    app = create_app(settings, hub=hub, migrate_on_start=False)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def shutdown_trigger() -> None:
        await stop.wait()
        log.info("signal received: draining")
        await hub.drain()

    await worker_serve(
        wrap_app(app, config.wsgi_max_body_size, "asgi"),
        config,
        sockets=sockets,
        shutdown_trigger=shutdown_trigger,
    )


def run_worker(settings: Settings, sockets: Any = None) -> None:
    """Entry point of one server process."""
    asyncio.run(serve_worker(settings, sockets))
