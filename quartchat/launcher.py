"""Several server processes on one listening socket, supervised.

hypercorn's own multi-worker mode stops every worker when one crashes and
exits 0, and its workers die at once on a SIGTERM to the process group. This
launcher binds the sockets once, starts ``workers`` processes that each run
:func:`quartchat.server.run_worker` (with our graceful drain), forwards
SIGTERM/SIGINT to them, and restarts a worker that dies while serving.

Metrics: every worker writes prometheus-client's multiprocess files into one
``PROMETHEUS_MULTIPROC_DIR``, so ``/metrics`` on any worker reports the whole
host. The directory is the user's (emptied at start) or a fresh temporary one
(removed at exit; one left behind by a launcher killed with SIGKILL is removed
by the next launcher), exported before the first worker starts: a spawned worker
imports prometheus-client afresh and reads the variable then. This process
defines no metric (it would leave files of its own there); it only marks
dead workers, so that their live gauges stop counting.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from .config import Settings
from .server import hypercorn_config, reset_metrics_dir, run_worker

__all__ = ["run_workers"]

log = logging.getLogger(__name__)

_RESPAWN_BACKOFF_S = 1.0
_TMP_PREFIX = "quartchat-metrics-"
# Held (flock) by the launcher that owns a temporary metrics directory, for as
# long as it runs: the kernel releases it however the launcher dies.
_LOCK_NAME = ".owner.lock"


def _worker_main(settings: Settings, sockets: Any) -> None:
    from .logs import setup_logging

    setup_logging(settings.log_level, settings.log_json)
    run_worker(settings, sockets, fresh_metrics=False)


def _metrics_dir() -> tuple[str, int | None]:
    """The workers' PROMETHEUS_MULTIPROC_DIR, emptied; with the owner lock's fd if we made it."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        reset_metrics_dir(path)
        return path, None
    _sweep_orphaned_dirs()
    path = tempfile.mkdtemp(prefix=_TMP_PREFIX)
    # Lock under another name, then rename: a sweeper never sees an unlocked lock file.
    fd = os.open(os.path.join(path, _LOCK_NAME + ".new"), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(os.path.join(path, _LOCK_NAME + ".new"), os.path.join(path, _LOCK_NAME))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path  # inherited by every spawned worker
    return path, fd


def _sweep_orphaned_dirs() -> None:
    """Remove temporary metrics directories whose launcher is gone (killed with SIGKILL)."""
    for entry in Path(tempfile.gettempdir()).glob(_TMP_PREFIX + "*"):
        try:
            fd = os.open(entry / _LOCK_NAME, os.O_RDWR)
        except OSError:
            continue  # no lock file: not one of ours, or not ready yet
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its launcher is alive
        finally:
            os.close(fd)
        shutil.rmtree(entry, ignore_errors=True)


def run_workers(settings: Settings) -> int:
    """Run ``settings.workers`` processes until SIGTERM/SIGINT; returns the exit code."""
    config = hypercorn_config(settings)
    sockets = config.create_sockets()
    metrics_dir, owner_lock = _metrics_dir()
    log.debug("worker metrics in %s", metrics_dir)
    ctx = multiprocessing.get_context("spawn")
    stopping = False

    def _stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signum)
        # Our copies of the listening sockets must go now: once the workers have
        # closed theirs, the port refuses new connections at once, instead of
        # queueing them in a backlog nobody accepts from until we exit.
        _close_sockets()

    def _close_sockets() -> None:
        for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
            sock.close()

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
        _close_sockets()
        if owner_lock is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            os.close(owner_lock)
    return 0


def _mark_dead(pid: int | None) -> None:
    """Drop a dead worker's live gauges (its counters keep counting, as they should)."""
    if pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
