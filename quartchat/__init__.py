"""quartchat: a horizontally scalable WebSocket chat-room server on Quart and hypercorn."""

__version__ = "0.1.0"
__all__ = ["__version__"]
