"""Serving with hypercorn, with our own graceful shutdown.

hypercorn's own SIGTERM handling cancels open websockets (clients see 1011)
or, with a signal to the process group, lets workers die (1006). We install
our own handlers and pass hypercorn a ``shutdown_trigger`` that first drains
the hub: pending writes committed and acked, every socket closed with 1001,
then releases hypercorn's lingering ping tasks (:mod:`quartchat.wsping`)
so the exit does not wait ``graceful_timeout`` for connections already closed.

It also owns hypercorn's settings: the production values are the package's
defaults (:data:`HYPERCORN_DEFAULTS`), the same wherever ``quartchat serve``
starts; ``hypercorn.toml`` in the working directory, or the file named by
``QUARTCHAT_HYPERCORN_CONFIG``, only overrides them.

This module must not import prometheus-client at import time (the app and
the hub are imported when a worker starts serving): the launcher imports it
in the parent process, which sets up ``PROMETHEUS_MULTIPROC_DIR`` for its
workers, and a single process empties that directory before its first metric
exists (see :mod:`quartchat.exposition`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hypercorn.asyncio.run import worker_serve
from hypercorn.config import Config as HypercornConfig
from hypercorn.logging import Logger as HypercornLogger
from hypercorn.utils import wrap_app

from .config import Settings, load_env_file
from .errors import ConfigError
from .wsping import cancel_ping_tasks

if TYPE_CHECKING:
    from .hub import Hub

__all__ = [
    "HYPERCORN_DEFAULTS",
    "QUEUE_SAMPLE_S",
    "hypercorn_config",
    "hypercorn_settings_file",
    "reset_metrics_dir",
    "run_worker",
    "sample_queues",
    "sample_registry",
    "serve_worker",
]

log = logging.getLogger(__name__)

# How often the queue-depth gauges are refreshed (one pass over this process's sockets).
QUEUE_SAMPLE_S = 1.0


# The production hypercorn settings: the package's defaults, wherever
# `quartchat serve` is started. A settings file (``hypercorn.toml`` in the
# working directory, or the one QUARTCHAT_HYPERCORN_CONFIG names) only
# overrides them; the repository's hypercorn.toml documents each of them.
HYPERCORN_DEFAULTS: dict[str, Any] = {
    "bind": ["127.0.0.1:8080"],  # replaced by QUARTCHAT_BIND / --bind
    "backlog": 4096,  # connect bursts overflow hypercorn's 100
    # hypercorn waits this long for open requests after our drain has
    # committed pending writes and closed every socket with 1001 (hypercorn: 10).
    "graceful_timeout": 3.0,
    "websocket_ping_interval": 20.0,  # notice half-open clients (hypercorn: none)
    # hard cap hypercorn buffers per message; raised to 16 x our frame limit below
    "websocket_max_message_size": 1048576,
    "keep_alive_timeout": 60.0,
    "accesslog": "-",  # access log lines for HTTP requests and handshakes
}

CONFIG_ENV = "QUARTCHAT_HYPERCORN_CONFIG"
LOCAL_CONFIG = "hypercorn.toml"


def hypercorn_settings_file(
    path: str | None = None, env: Mapping[str, str] | None = None
) -> Path | None:
    """The hypercorn settings file that overrides the defaults, if any.

    ``path`` (or QUARTCHAT_HYPERCORN_CONFIG, from the environment or a
    ``.env`` file in the working directory, like every setting) names a file
    that must exist; without either, ``hypercorn.toml`` in the working
    directory is used when present.
    """
    if env is None:
        env = {**load_env_file(".env"), **os.environ}
    named = path or env.get(CONFIG_ENV, "").strip()
    if named:
        if not Path(named).is_file():
            raise ConfigError(
                f"{CONFIG_ENV}={named}: no such file (unset it to use the "
                f"built-in hypercorn settings)"
            )
        return Path(named)
    local = Path(LOCAL_CONFIG)
    return local if local.is_file() else None


class AccessLogger(HypercornLogger):
    """hypercorn's logger, gathering an access line's fields only when the line is logged.

    hypercorn builds every field of the access log (headers, environment,
    timings: 5 % of a handshake's CPU) before the logger's level is looked at.
    """

    async def access(self, request: Any, response: Any, request_time: float) -> None:
        access = self.access_logger
        if access is not None and access.isEnabledFor(logging.INFO):
            await super().access(request, response, request_time)


def hypercorn_config(settings: Settings, path: str | None = None) -> HypercornConfig:
    """hypercorn settings: our defaults, a settings file's overrides, our bind and limits."""
    mapping = dict(HYPERCORN_DEFAULTS)
    source = hypercorn_settings_file(path)
    if source is not None:
        try:
            mapping.update(tomllib.loads(source.read_text()))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{CONFIG_ENV}: cannot read {source}: {exc}") from exc
    config = HypercornConfig.from_mapping(mapping)
    config.bind = [settings.bind]
    config.workers = 1  # each process serves one; our launcher runs several
    # Two limits. Our own frame limit (settings.frame_limit, above max_content
    # plus its JSON) is enforced by the app: a larger frame gets a `too_large`
    # error and the socket stays open. hypercorn's limit is only the hard cap
    # on what it buffers per message; past it hypercorn sends close 1009 but
    # (hypercorn 0.18) may then stop reading the client's close answer, so the
    # cap sits well above anything a client should send.
    config.websocket_max_message_size = max(
        int(config.websocket_max_message_size or 0), 16 * settings.frame_limit
    )
    # Route hypercorn's logs through our handlers (JSON or text), once.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = logging.getLogger("hypercorn.access") if config.accesslog else None
    if config.statsd_host is None:  # hypercorn swaps in its StatsdLogger only for its own
        config.logger_class = AccessLogger
    return config


def reset_metrics_dir(path: str, *, keep_pid: int | None = None) -> None:
    """Empty a ``PROMETHEUS_MULTIPROC_DIR`` (create it if missing) before a start.

    Files of earlier runs (``*_<pid>.db``) would otherwise be summed into this
    run's values forever. ``keep_pid``'s files are kept: the calling process's
    own, when it already defined its metrics there.
    """
    os.makedirs(path, exist_ok=True)
    for entry in Path(path).glob("*.db"):
        if keep_pid is not None and entry.stem.rsplit("_", 1)[-1] == str(keep_pid):
            continue
        entry.unlink(missing_ok=True)


def tune_gc(threshold: tuple[int, int, int] | None) -> None:
    """The cyclic garbage collector of a server process (``QUARTCHAT_GC_THRESHOLD``).

    What the app built at start-up is frozen out of every collection
    (``gc.freeze``), after one collection of the start-up garbage. Every open
    socket keeps objects the collector tracks (tasks, coroutines, futures,
    queues: most of them hypercorn's and Quart's). With Python's thresholds a
    process that gains sockets quickly runs a full collection each time its
    tracked objects grow by a quarter, each one a pause over all of them (0.3 s
    at 5,000 sockets when each held 260 objects): 10,000 connects cost two
    servers 40 % of their CPU in the collector. Larger thresholds consider a
    full collection after more allocations, so bursts of connects run faster
    (10000,10,10, the default: 1,147 -> 1,438 connects/s). What they delay is
    the freeing of cyclic garbage, and a closed socket no longer leaves any
    (:mod:`.tcpfree`).
    """
    gc.collect()
    gc.freeze()
    if threshold is not None:
        gc.set_threshold(*threshold)


def sample_queues(hub: Hub) -> None:
    """Refresh the outbound-queue gauges from this process's open sockets."""
    from . import metrics

    depths = [conn.queued for conn in hub.connections]
    metrics.OUTBOUND_QUEUED.set(sum(depths))
    metrics.OUTBOUND_QUEUE_MAX.set(max(depths, default=0))


def sample_registry(hub: Hub) -> None:
    """Refresh the object-count gauges: tasks, threads, the hub's connections and rooms."""
    import threading

    from . import metrics

    metrics.ASYNCIO_TASKS.set(len(asyncio.all_tasks()))
    metrics.THREADS.set(threading.active_count())
    metrics.HUB_CONNECTIONS.set(len(hub.connections))
    metrics.HUB_ROOMS.set(len(hub.actors))
    metrics.RETIRING_ROOMS.set(hub.retiring)
    metrics.REGISTRY_SAMPLES.inc()


async def _sample_loop(hub: Hub) -> None:
    while True:
        sample_queues(hub)
        sample_registry(hub)
        await asyncio.sleep(QUEUE_SAMPLE_S)


async def serve_worker(settings: Settings, sockets: Any = None) -> None:
    """Serve one process until SIGTERM/SIGINT, then drain and exit."""
    from . import leansocket, tcpfree, wsping
    from .app import create_app
    from .hub import Hub

    # Closed sockets must not wait out hypercorn's ping interval in memory,
    # nor a full collection.
    wsping.install()
    tcpfree.install()
    leansocket.install()
    config = hypercorn_config(settings)
    hub = Hub(settings)
    app = create_app(settings, hub=hub, migrate_on_start=False)
    tune_gc(settings.gc_threshold)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def shutdown_trigger() -> None:
        await stop.wait()
        log.info("signal received: draining")
        await hub.drain()
        # Every socket is closed now; hypercorn's ping tasks would still hold
        # their connections (and the exit) for up to graceful_timeout.
        cancel_ping_tasks()

    sampler = asyncio.create_task(_sample_loop(hub), name="queue-sampler")
    try:
        await worker_serve(
            wrap_app(app, config.wsgi_max_body_size, "asgi"),
            config,
            sockets=sockets,
            shutdown_trigger=shutdown_trigger,
        )
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)


def run_worker(settings: Settings, sockets: Any = None, *, fresh_metrics: bool = True) -> None:
    """Entry point of one server process.

    ``fresh_metrics``: a lone process empties ``PROMETHEUS_MULTIPROC_DIR`` (when
    set) before its metrics exist; the launcher's workers pass False, their
    parent has done it once for all of them.
    """
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if fresh_metrics and path:
        # If prometheus-client is already loaded here, this process may have
        # written its own files: keep those.
        loaded = "prometheus_client" in sys.modules
        reset_metrics_dir(path, keep_pid=os.getpid() if loaded else None)
    if settings.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass  # "auto" without uvloop installed
        else:
            # uvloop's transports cut the per-frame cost of every socket write.
            uvloop.run(serve_worker(settings, sockets))
            return
    asyncio.run(serve_worker(settings, sockets))
