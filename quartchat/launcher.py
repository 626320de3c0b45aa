"""Several server processes on one listening socket, supervised.

hypercorn's own multi-worker mode stops every worker when one crashes and
exits 0, and its workers die at once on a SIGTERM to the process group. This
launcher binds the sockets once, starts ``workers`` processes that each run
:func:`quartchat.server.run_worker` (with our graceful drain), forwards
SIGTERM/SIGINT to them, and restarts a worker that dies while serving.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from multiprocessing.process import BaseProcess
from typing import Any

from .config import Settings
from .server import hypercorn_config, run_worker

__all__ = ["run_workers"]

log = logging.getLogger(__name__)

_RESPAWN_BACKOFF_S = 1.0


def _worker_main(settings: Settings, sockets: Any) -> None:
    from .logs import setup_logging

    setup_logging(settings.log_level, settings.log_json)
    run_worker(settings, sockets)


def run_workers(settings: Settings) -> int:
    """Run ``settings.workers`` processes until SIGTERM/SIGINT; returns the exit code."""
    config = hypercorn_config(settings)
    sockets = config.create_sockets()
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signum)

    def _start() -> BaseProcess:
        proc = ctx.Process(target=_worker_main, args=(settings, sockets), daemon=False)
        proc.start()
        return proc

    procs: list[BaseProcess] = []
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    procs.extend(_start() for _ in range(settings.workers))
    log.info("serving on http://%s with %d workers", settings.bind, settings.workers)
    try:
        while True:
            time.sleep(0.2)
            if stopping:
                break
            for i, proc in enumerate(procs):
                if not proc.is_alive():
                    log.error("worker %s exited with %s; restarting", proc.pid, proc.exitcode)
                    _mark_dead(proc.pid)
                    time.sleep(_RESPAWN_BACKOFF_S)
                    if not stopping:
                        procs[i] = _start()
        for proc in procs:
            proc.join()
            _mark_dead(proc.pid)
    finally:
        for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
            sock.close()
    return 0


def _mark_dead(pid: int | None) -> None:
    if pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
