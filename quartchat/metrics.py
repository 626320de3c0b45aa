"""Every quartchat metric, defined in one place.

Namespace ``quartchat``; no per-room or per-user labels (unbounded
cardinality). When ``PROMETHEUS_MULTIPROC_DIR`` is set, prometheus-client's
multiprocess mode aggregates every worker of the host in :func:`render`.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

__all__ = [
    "REGISTRY",
    "CONTENT_TYPE_LATEST",
    "render",
    "CONNECTIONS_OPEN",
    "CONNECTIONS_OPENED",
    "CONNECTIONS_CLOSED",
    "HANDSHAKES_REFUSED",
    "FRAMES_RECEIVED",
    "ERRORS_SENT",
    "RATE_LIMITED",
    "MESSAGES_STORED",
    "MESSAGES_PUBLISHED",
    "MESSAGES_DELIVERED",
    "DELIVERY_LATENCY",
    "STORE_WRITE_LATENCY",
    "STORE_BATCH_SIZE",
    "STORE_ERRORS",
    "BROKER_RECONNECTS",
    "BROKER_RESUBSCRIBES",
    "REORDER_HOLDS",
    "GAP_FILLS",
    "SKIPPED_SEQS",
    "REPLAYED_MESSAGES",
    "SLOW_CONSUMER_CLOSES",
    "ACTIVE_ROOMS",
    "INBOX_DEPTH",
    "BROKER_DROPPED",
    "DRAIN_SECONDS",
]

NS = "quartchat"
REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

CONNECTIONS_OPEN = Gauge(
    "connections_open", "Open WebSocket connections", namespace=NS, registry=REGISTRY,
    multiprocess_mode="livesum",
)
CONNECTIONS_OPENED = Counter(
    "connections_opened", "WebSocket connections accepted", namespace=NS, registry=REGISTRY
)
CONNECTIONS_CLOSED = Counter(
    "connections_closed", "WebSocket connections closed, by close code", ["code"],
    namespace=NS, registry=REGISTRY,
)
HANDSHAKES_REFUSED = Counter(
    "handshakes_refused", "WebSocket handshakes refused, by HTTP status", ["status"],
    namespace=NS, registry=REGISTRY,
)
FRAMES_RECEIVED = Counter(
    "frames_received", "Client frames received, by action", ["action"], namespace=NS, registry=REGISTRY
)
ERRORS_SENT = Counter(
    "errors_sent", "Error frames sent, by code", ["code"], namespace=NS, registry=REGISTRY
)
RATE_LIMITED = Counter(
    "rate_limited_frames", "Frames refused by the per-connection rate limit", namespace=NS,
    registry=REGISTRY,
)
MESSAGES_STORED = Counter(
    "messages_stored", "Messages committed to the store", namespace=NS, registry=REGISTRY
)
MESSAGES_PUBLISHED = Counter(
    "messages_published", "Messages published to the broker", namespace=NS, registry=REGISTRY
)
MESSAGES_DELIVERED = Counter(
    "messages_delivered", "Message frames queued to local sockets", namespace=NS, registry=REGISTRY
)
DELIVERY_LATENCY = Histogram(
    "delivery_latency_seconds", "From the stored timestamp to queueing on the local sockets",
    namespace=NS, registry=REGISTRY, buckets=_LATENCY_BUCKETS,
)
STORE_WRITE_LATENCY = Histogram(
    "store_write_seconds", "Duration of one batched store write", namespace=NS, registry=REGISTRY,
    buckets=_LATENCY_BUCKETS,
)
STORE_BATCH_SIZE = Histogram(
    "store_batch_size", "Messages per store write", namespace=NS, registry=REGISTRY,
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
STORE_ERRORS = Counter(
    "store_errors", "Failed store operations", ["op"], namespace=NS, registry=REGISTRY
)
BROKER_RECONNECTS = Counter(
    "broker_reconnects", "Broker connections re-established", namespace=NS, registry=REGISTRY
)
BROKER_RESUBSCRIBES = Counter(
    "broker_resubscribes", "Room channels resubscribed after a reconnect", namespace=NS,
    registry=REGISTRY,
)
BROKER_DROPPED = Counter(
    "broker_events_dropped", "Broker payloads dropped at a full room inbox (recovered from the store)",
    namespace=NS, registry=REGISTRY,
)
REORDER_HOLDS = Counter(
    "reorder_holds", "Messages held because they arrived ahead of the expected seq", namespace=NS,
    registry=REGISTRY,
)
GAP_FILLS = Counter(
    "gap_fills", "Messages read from the store to fill a delivery gap", namespace=NS,
    registry=REGISTRY,
)
SKIPPED_SEQS = Counter(
    "skipped_seqs", "Seqs given up on because they never reached the store", namespace=NS,
    registry=REGISTRY,
)
REPLAYED_MESSAGES = Counter(
    "replayed_messages", "Messages replayed on joins with since_seq or history", namespace=NS,
    registry=REGISTRY,
)
SLOW_CONSUMER_CLOSES = Counter(
    "slow_consumer_closes", "Sockets closed with 4008 because their queue overflowed",
    namespace=NS, registry=REGISTRY,
)
ACTIVE_ROOMS = Gauge(
    "active_rooms", "Room actors running", namespace=NS, registry=REGISTRY,
    multiprocess_mode="livesum",
)
INBOX_DEPTH = Histogram(
    "inbox_depth", "Room inbox depth seen by the actor at each command", namespace=NS,
    registry=REGISTRY, buckets=(0, 1, 10, 100, 1000, 10000),
)
DRAIN_SECONDS = Histogram(
    "drain_seconds", "Duration of a graceful drain", namespace=NS, registry=REGISTRY,
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def render() -> tuple[bytes, str]:
    """The exposition text for this host (all workers in multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
