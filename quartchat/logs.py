"""Logging set-up: plain text for people, one JSON object per line for machines.

Log calls pass ids as ``extra={"conn_id": ..., "sender_id": ..., "room_id": ...}``;
both formats print them. Message content and credentials are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time

import orjson

__all__ = [
    "EscapeControl",
    "JsonFormatter",
    "RedactSecrets",
    "TextFormatter",
    "escape_control",
    "redact",
    "setup_logging",
]

_FIELDS = ("conn_id", "sender_id", "room_id", "server_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the id fields when present."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in _FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                data[field] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data).decode()


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = " ".join(f"{f}={getattr(record, f)}" for f in _FIELDS if getattr(record, f, None))
        return f"{text} {ids}" if ids else text


# A token in a query string (hypercorn's access log prints the request line,
# `GET /chat?token=...`) or in an Authorization header value.
# And the password of a URL's user info (``redis://:secret@host``, ``mysql+aiomysql://u:p@h``).
_SECRET_RE = re.compile(
    r"((?:[?&]|\b)(?:token|access_token|api_key)=)[^&\s\"']+|"
    r"(\b[Bb]earer\s+)[^\s\"',]+|"
    r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@\"']*:)[^@\s/\"']+(?=@)"
)


def redact(text: str) -> str:
    """``text`` with query-string tokens, bearer credentials and URL passwords
    replaced by ``[redacted]``."""
    return _SECRET_RE.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + "[redacted]", text)


class RedactSecrets(logging.Filter):
    """A handler filter: no record leaves with a token or a bearer credential in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


# Characters that end a line (or hide in one) for some reader: C0 controls, DEL,
# C1 controls (NEL among them) and the Unicode line and paragraph separators.
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_control(text: str) -> str:
    """``text`` with every control character written as a visible escape (``\\x0d``)."""
    return _CONTROL_RE.sub(
        lambda m: (
            f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}"
        ),
        text,
    )


class EscapeControl(logging.Filter):
    """A handler filter: a record's message is one line, whatever it quotes.

    hypercorn's access log prints the request path percent-decoded, so a path
    with ``%0D%0A`` or ``%00`` would otherwise write a forged second line or a
    NUL. A traceback (``exc_info``) is formatted after this and keeps its lines.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _CONTROL_RE.search(message) is not None:
            record.msg, record.args = escape_control(message), None
        return True


class _DropHypercornCancellations(logging.Filter):
    """hypercorn leaves a closed WebSocket's ping task running for up to one ping
    interval; at shutdown it cancels it and asyncio logs the cancellation as an
    error. It is noise, not a failure: drop exactly those records."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            return "connection_made" not in record.getMessage()
        return True


def setup_logging(level: str = "INFO", json: bool = False) -> None:
    """Configure the root logger once for this process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler.addFilter(RedactSecrets())
    handler.addFilter(EscapeControl())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("hypercorn.error", "hypercorn.access", "quart.app", "quart.serving"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("asyncio").addFilter(_DropHypercornCancellations())
    # alembic announces every plugin it loads at INFO.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    logging.getLogger("databases").setLevel(logging.WARNING)
