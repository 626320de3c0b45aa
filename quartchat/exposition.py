"""The metrics registry and its exposition: one process or several, and rendering a scrape.

Several worker processes on one host (``quartchat serve --workers N``) use
prometheus-client's multiprocess mode: each process writes its values to
``*_<pid>.db`` files in ``PROMETHEUS_MULTIPROC_DIR`` and :func:`render`, on
whichever worker the scrape reaches, sums them for the whole host. The mode is
chosen once, when prometheus-client is first imported, from that environment
variable: the launcher sets it (and empties the directory) before it starts
any worker, and never imports this module or :mod:`quartchat.metrics` itself
(its metrics would leave files of their own). A single process without the
variable keeps the plain in-process :data:`REGISTRY`.

A scrape is rendered off the event loop (:func:`render_async`, one render
at a time in a thread of its own): in multiprocess mode it reads and sums
every worker's files, which would otherwise stall every socket of the worker
the scrape reached. It is rendered afresh for each scrape (no cache), so a
value is visible in the next scrape after it changed.

The metrics themselves are defined in :mod:`quartchat.metrics`.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import values as _values

__all__ = ["CONTENT_TYPE_LATEST", "MULTIPROCESS", "REGISTRY", "render", "render_async"]

REGISTRY = CollectorRegistry(auto_describe=True)
# True when values live in PROMETHEUS_MULTIPROC_DIR (decided by prometheus-client
# at its import, which is what counts, not the environment now).
MULTIPROCESS: bool = bool(getattr(_values.ValueClass, "_multiprocess", False))
if MULTIPROCESS:
    # Each metric defined in quartchat.metrics opens its file there at once: the
    # directory must exist.
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)


def render() -> tuple[bytes, str]:
    """The exposition text for this host (every worker's values in multiprocess mode)."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# One thread renders, so scrapes (however many at once) never stall the event
# loop and never read the multiprocess files concurrently. Its thread starts
# at the first scrape.
_RENDERER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-render")


async def render_async() -> tuple[bytes, str]:
    """:func:`render`, run in the renderer thread (for the ``/metrics`` route)."""
    return await asyncio.get_running_loop().run_in_executor(_RENDERER, render)
