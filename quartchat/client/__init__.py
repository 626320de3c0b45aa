"""The asyncio client for quartchat (the reliable client recipe): see :mod:`.core`."""

from __future__ import annotations

from .core import ChatClient
from .parts import Post, PostFailed, backoff_delay

__all__ = ["ChatClient", "Post", "PostFailed", "backoff_delay"]
