"""The closed set of protocol error codes and WebSocket close codes.

Every error a client can see is a :class:`ChatError`; routes map it once to an
``error`` frame (WebSocket) or a JSON body with an HTTP status. An error that
answers a request carries that request's :class:`Echo` (its envelope:
``action``, ``room_id``, ``client_msg_id``), which the frame echoes.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final, Literal, get_args

import attrs

__all__ = [
    "ERROR_CODES",
    "NO_ECHO",
    "ChatError",
    "CloseCode",
    "ConfigError",
    "Echo",
    "ErrorCode",
]

# Every ``code`` of an ``error`` frame (PROTOCOL.md); mypy checks each ChatError's.
ErrorCode = Literal[
    "invalid_json",
    "unsupported_frame",
    "unknown_action",
    "invalid_field",
    "not_joined",
    "too_large",
    "rate_limited",
    "too_many_rooms",
    "forbidden",
    "unauthorized",
    "unavailable",
    "internal",
]
ERROR_CODES: Final[frozenset[str]] = frozenset(get_args(ErrorCode))


class CloseCode(IntEnum):
    """Every WebSocket close code quartchat uses or documents (PROTOCOL.md)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # drain: reconnect (to any server) and rejoin with since_seq
    POLICY = 1008  # hundreds of client errors in a few seconds
    TOO_BIG = 1009  # a frame over hypercorn's hard cap
    INTERNAL = 1011
    TOKEN_EXPIRED = 4001  # auth mode "jwt": exp + leeway passed without a refresh
    DISCONNECTED = 4003  # the server API disconnected the user: do not reconnect
    SLOW_CONSUMER = 4008  # the outbound queue overflowed: reconnect with since_seq


@attrs.frozen
class Echo:
    """The envelope of the request an error answers: what its ``error`` frame echoes.

    Made in three places only, each from what it knows well formed: a raw frame's
    (:mod:`.protocol`), a decoded request's (``Request.echo``) and a room
    command's (``Command.echo(room_id)``). :meth:`error` is the one way an
    echoing error is built.
    """

    action: str | None = None
    room_id: str | None = None
    client_msg_id: str | None = None

    def error(self, code: ErrorCode, message: str) -> ChatError:
        """The error ``code`` answering this request."""
        return ChatError(code, message, echo=self)


NO_ECHO: Final = Echo()


class ChatError(Exception):
    """A request that could not be served; becomes a protocol ``error`` frame."""

    def __init__(self, code: ErrorCode, message: str, *, echo: Echo = NO_ECHO) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.echo = echo

    @property
    def action(self) -> str | None:
        return self.echo.action

    @property
    def room_id(self) -> str | None:
        return self.echo.room_id

    @property
    def client_msg_id(self) -> str | None:
        return self.echo.client_msg_id

    def to_frame(self) -> dict[str, object]:
        """The ``error`` frame, echoing what the request carried well-formed."""
        frame: dict[str, object] = {"type": "error", "code": self.code, "message": self.message}
        echo = self.echo
        if echo.action is not None:
            frame["action"] = echo.action
        if echo.room_id is not None:
            frame["room_id"] = echo.room_id
        if echo.client_msg_id is not None:
            frame["client_msg_id"] = echo.client_msg_id
        return frame


class ConfigError(Exception):
    """A setting with a bad value; the message names the variable and the value."""
