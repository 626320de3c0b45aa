"""The closed set of protocol error codes and WebSocket close codes.

Every error a client can see is a :class:`ChatError`; routes map it once to an
``error`` frame (WebSocket) or a JSON body with an HTTP status.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CLOSE_DISCONNECTED",
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_SLOW_CONSUMER",
    "CLOSE_TOKEN_EXPIRED",
    "CLOSE_TOO_BIG",
    "ERROR_CODES",
    "ChatError",
    "ConfigError",
]

ERROR_CODES: Final = frozenset(
    {
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
    }
)

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL: Final = 1011
CLOSE_SLOW_CONSUMER: Final = 4008
CLOSE_TOKEN_EXPIRED: Final = 4001  # auth mode "jwt": exp + leeway passed without a refresh
CLOSE_DISCONNECTED: Final = 4003  # the server API disconnected the user: do not reconnect

# Codes a client should retry later rather than treat as its own mistake.
_TEMPORARY: Final = frozenset({"unavailable", "rate_limited", "internal"})


class ChatError(Exception):
    """A request that could not be served; becomes a protocol ``error`` frame."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        action: str | None = None,
        room_id: str | None = None,
        client_msg_id: str | None = None,
    ) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.action = action
        self.room_id = room_id
        self.client_msg_id = client_msg_id

    @property
    def temporary(self) -> bool:
        """True when retrying the same request later may succeed."""
        return self.code in _TEMPORARY

    def echo(
        self, action: str, room_id: str | None = None, client_msg_id: str | None = None
    ) -> ChatError:
        """Echo the request this error answers: fill the envelope fields not set yet."""
        if self.action is None:
            self.action = action
        if self.room_id is None:
            self.room_id = room_id
        if self.client_msg_id is None:
            self.client_msg_id = client_msg_id
        return self

    def to_frame(self) -> dict[str, object]:
        """The ``error`` frame, echoing what the request carried well-formed."""
        frame: dict[str, object] = {"type": "error", "code": self.code, "message": self.message}
        if self.action is not None:
            frame["action"] = self.action
        if self.room_id is not None:
            frame["room_id"] = self.room_id
        if self.client_msg_id is not None:
            frame["client_msg_id"] = self.client_msg_id
        return frame


class ConfigError(Exception):
    """A setting with a bad value; the message names the variable and the value."""
