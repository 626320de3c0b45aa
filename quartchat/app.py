"""The Quart application factory: blueprints, start and stop hooks, error handlers.

:func:`create_app` wires one hub (rooms, connections, drain) to the HTTP read
routes (:mod:`quartchat.routes`), the server API (:mod:`quartchat.api`), the
web client's files (:mod:`quartchat.webclient`) and the ``/chat`` socket
(:mod:`quartchat.session`). It starts the hub (after the migrations) before
serving and drains it after; every ``ChatError`` an HTTP route raises, and
every unknown route or method, gets the one JSON error body.
"""

from __future__ import annotations

import logging
from typing import Any

from quart import Quart, Response
from quart.sessions import NullSession, SecureCookieSessionInterface

from . import leansocket, tcpfree, wsping
from .api import api_blueprint
from .asgi_ws import InlineWebsocketConnection
from .auth import TokenVerifier
from .config import Settings
from .control import Control
from .errors import ChatError
from .hub import Hub
from .routes import error_response, routes_blueprint
from .session import chat_blueprint
from .webclient import load_static

__all__ = ["create_app"]

log = logging.getLogger(__name__)


class _NoSessions(SecureCookieSessionInterface):
    """quartchat keeps no Quart sessions (it sets no secret key): every request and
    socket shares one ``NullSession``, which refuses writes, instead of making its own
    (about 560 bytes per open socket, for as long as it is open)."""

    _null = NullSession()

    async def make_null_session(self, app: Quart) -> NullSession:
        return self._null


def create_app(
    settings: Settings | None = None,
    *,
    hub: Hub | None = None,
    migrate_on_start: bool = True,
) -> Quart:
    """Build the app; the hub starts in ``before_serving`` and stops in ``after_serving``."""
    settings = settings if settings is not None else Settings.from_env()
    wsping.install()  # also when hypercorn serves this app directly (idempotent)
    tcpfree.install()
    leansocket.install()
    hub = hub if hub is not None else Hub(settings)
    app = Quart(__name__, static_folder=None)  # our own /static: from memory, not disk
    app.asgi_websocket_class = InlineWebsocketConnection  # the route in the ASGI task
    app.session_interface = _NoSessions()
    app.config["QUARTCHAT_SETTINGS"] = settings
    app.extensions["quartchat"] = hub
    verifier = TokenVerifier.from_settings(settings) if settings.auth == "jwt" else None
    control = Control(hub)
    static = load_static()
    app.register_blueprint(static.blueprint())
    app.register_blueprint(api_blueprint(hub, settings, control))
    app.register_blueprint(routes_blueprint(hub, settings, verifier, static))
    app.register_blueprint(chat_blueprint(hub, settings, verifier))

    @app.before_serving
    async def _start() -> None:
        if migrate_on_start:
            from .migrate import upgrade_async

            await upgrade_async(settings)
        await hub.start()
        await control.start()
        log.info(
            "quartchat serving as %s (store %s, broker %s)",
            settings.server_id,
            settings.database_url.split("://", 1)[0],
            settings.broker_url.split("://", 1)[0],
        )

    @app.after_serving
    async def _stop() -> None:
        await hub.drain()
        await control.stop()
        await hub.stop()

    @app.errorhandler(ChatError)
    async def chat_error(error: ChatError) -> Response:
        status = 503 if error.code == "unavailable" else 400
        return error_response(status, error.code, error.message)

    @app.errorhandler(404)
    async def not_found(_: Any) -> Response:
        return error_response(404, "not_found", "no such route")

    @app.errorhandler(405)
    async def not_allowed(_: Any) -> Response:
        return error_response(405, "method_not_allowed", "method not allowed")

    return app
