"""Every quartchat metric, defined in one place.

Namespace ``quartchat``; no per-room or per-user labels (unbounded
cardinality). Label values come from small closed sets: actions, error codes,
close codes, HTTP statuses, store operations.

They live in :data:`REGISTRY`, which :mod:`quartchat.exposition` owns with
the multiprocess mode (several workers on one host) and the rendering of a
scrape. Gauges say how workers combine (``multiprocess_mode``): ``livesum`` for
counts (connections, rooms, queued frames), ``livemax``/``livemin`` for
worst-case readings; ``live*`` modes drop a dead worker's value when the
launcher calls ``mark_process_dead``.

Queue depths cost no more than a counter on the message path: the room inbox
is observed once per command the actor takes, and the sockets' outbound
queues are sampled every second (:func:`quartchat.server.sample_queues`).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from .errors import ERROR_CODES, CloseCode
from .exposition import REGISTRY

__all__ = [
    "ACTIVE_ROOMS",
    "ASYNCIO_TASKS",
    "BROKER_DROPPED",
    "BROKER_NODE_RECONNECTS",
    "BROKER_NODE_RESUBSCRIBES",
    "BROKER_NODE_UP",
    "BROKER_RECONNECTS",
    "BROKER_RESUBSCRIBES",
    "BROKER_UP",
    "CONNECTIONS_CLOSED",
    "CONNECTIONS_OPEN",
    "CONNECTIONS_OPENED",
    "DELIVERY_LATENCY",
    "DRAIN_SECONDS",
    "ERRORS_SENT",
    "FRAMES_RECEIVED",
    "GAP_FILLS",
    "HANDSHAKES_REFUSED",
    "HUB_CONNECTIONS",
    "HUB_ROOMS",
    "INBOX_DEPTH",
    "MESSAGES_DELIVERED",
    "MESSAGES_PUBLISHED",
    "MESSAGES_STORED",
    "OUTBOUND_QUEUED",
    "OUTBOUND_QUEUE_MAX",
    "RATE_LIMITED",
    "REGISTRY",
    "REGISTRY_SAMPLES",
    "REORDER_HOLDS",
    "REPLAYED_MESSAGES",
    "RETIRING_ROOMS",
    "SKIPPED_SEQS",
    "SLOW_CONSUMER_CLOSES",
    "STORE_BATCH_SIZE",
    "STORE_ERRORS",
    "STORE_WRITE_LATENCY",
    "THREADS",
]

NS = "quartchat"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# ---- connections -------------------------------------------------------------

CONNECTIONS_OPEN = Gauge(
    "connections_open",
    "Open WebSocket connections",
    namespace=NS,
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
CONNECTIONS_OPENED = Counter(
    "connections_opened", "WebSocket connections accepted", namespace=NS, registry=REGISTRY
)
CONNECTIONS_CLOSED = Counter(
    "connections_closed",
    "WebSocket connections closed, by close code (1000 when the client closed or went away)",
    ["code"],
    namespace=NS,
    registry=REGISTRY,
)
HANDSHAKES_REFUSED = Counter(
    "handshakes_refused",
    "WebSocket handshakes refused, by HTTP status",
    ["status"],
    namespace=NS,
    registry=REGISTRY,
)

# ---- frames --------------------------------------------------------------------

FRAMES_RECEIVED = Counter(
    "frames_received",
    "Well-formed client frames received, by action",
    ["action"],
    namespace=NS,
    registry=REGISTRY,
)
ERRORS_SENT = Counter(
    "errors_sent", "Error frames sent, by code", ["code"], namespace=NS, registry=REGISTRY
)
RATE_LIMITED = Counter(
    "rate_limited_frames",
    "Frames refused by the per-connection rate limit",
    namespace=NS,
    registry=REGISTRY,
)

# ---- messages ------------------------------------------------------------------

MESSAGES_STORED = Counter(
    "messages_stored", "Messages committed to the store", namespace=NS, registry=REGISTRY
)
MESSAGES_PUBLISHED = Counter(
    "messages_published", "Messages published to the broker", namespace=NS, registry=REGISTRY
)
MESSAGES_DELIVERED = Counter(
    "messages_delivered", "Message frames queued to local sockets", namespace=NS, registry=REGISTRY
)
FRAMES_WRITTEN = Counter(
    "frames_written",
    "Frames to local sockets, by path: direct (prepared bytes straight to the socket's"
    " transport) or queued (through the socket's writer task)",
    ["path"],
    namespace=NS,
    registry=REGISTRY,
)
FRAMES_DIRECT = FRAMES_WRITTEN.labels(path="direct")
FRAMES_QUEUED = FRAMES_WRITTEN.labels(path="queued")
DELIVERY_LATENCY = Histogram(
    "delivery_latency_seconds",
    "From taking the seq (just before the store write) to queueing "
    "on this process's sockets, once per message",
    namespace=NS,
    registry=REGISTRY,
    buckets=_LATENCY_BUCKETS,
)

# ---- store ---------------------------------------------------------------------

STORE_WRITE_LATENCY = Histogram(
    "store_write_seconds",
    "Duration of one batched store write",
    namespace=NS,
    registry=REGISTRY,
    buckets=_LATENCY_BUCKETS,
)
STORE_BATCH_SIZE = Histogram(
    "store_batch_size",
    "Messages per store write",
    namespace=NS,
    registry=REGISTRY,
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
STORE_ERRORS = Counter(
    "store_errors",
    "Failed store operations, by operation",
    ["op"],
    namespace=NS,
    registry=REGISTRY,
)

# ---- broker --------------------------------------------------------------------

BROKER_UP = Gauge(
    "broker_up",
    "1 while the broker's pub/sub connection is up (always 1 for memory://); "
    "a host reports its worst worker",
    namespace=NS,
    registry=REGISTRY,
    multiprocess_mode="livemin",
)
BROKER_RECONNECTS = Counter(
    "broker_reconnects", "Broker connections re-established", namespace=NS, registry=REGISTRY
)
BROKER_RESUBSCRIBES = Counter(
    "broker_resubscribes",
    "Room channels resubscribed after a reconnect",
    namespace=NS,
    registry=REGISTRY,
)
# redis+cluster:// only, labelled by master ("host:port", the cluster's own few nodes).
BROKER_NODE_UP = Gauge(
    "broker_node_up",
    "1 while the sharded pub/sub connection to a cluster master is up",
    ["node"],
    namespace=NS,
    registry=REGISTRY,
    multiprocess_mode="livemin",
)
BROKER_NODE_RECONNECTS = Counter(
    "broker_node_reconnects",
    "Sharded pub/sub connections (re-)established to a cluster master",
    ["node"],
    namespace=NS,
    registry=REGISTRY,
)
BROKER_NODE_RESUBSCRIBES = Counter(
    "broker_node_resubscribes",
    "Room channels resubscribed on a cluster master after a loss, failover or slot move",
    ["node"],
    namespace=NS,
    registry=REGISTRY,
)
BROKER_DROPPED = Counter(
    "broker_events_dropped",
    "Broker payloads dropped at a full room inbox (recovered from the store)",
    namespace=NS,
    registry=REGISTRY,
)

# ---- delivery order ------------------------------------------------------------

REORDER_HOLDS = Counter(
    "reorder_holds",
    "Messages held because they arrived ahead of the expected seq",
    namespace=NS,
    registry=REGISTRY,
)
GAP_FILLS = Counter(
    "gap_fills",
    "Messages read from the store to fill a delivery gap",
    namespace=NS,
    registry=REGISTRY,
)
SKIPPED_SEQS = Counter(
    "skipped_seqs",
    "Seqs passed over because a complete store read found no row for them",
    namespace=NS,
    registry=REGISTRY,
)
REPLAYED_MESSAGES = Counter(
    "replayed_messages",
    "Messages replayed on joins with since_seq or history",
    namespace=NS,
    registry=REGISTRY,
)
SLOW_CONSUMER_CLOSES = Counter(
    "slow_consumer_closes",
    "Sockets closed with 4008 because their queue overflowed",
    namespace=NS,
    registry=REGISTRY,
)

# ---- rooms and queues ----------------------------------------------------------

ACTIVE_ROOMS = Gauge(
    "active_rooms",
    "Room actors running",
    namespace=NS,
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
INBOX_DEPTH = Histogram(
    "inbox_depth",
    "Room inbox depth seen by the actor at each command it takes",
    namespace=NS,
    registry=REGISTRY,
    buckets=(0, 1, 10, 100, 1000, 10000),
)
OUTBOUND_QUEUED = Gauge(
    "outbound_queued_frames",
    "Frames waiting in sockets' outbound queues (sampled every second)",
    namespace=NS,
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
OUTBOUND_QUEUE_MAX = Gauge(
    "outbound_queue_max",
    "Longest outbound queue of any one socket (sampled every second)",
    namespace=NS,
    registry=REGISTRY,
    multiprocess_mode="livemax",
)

# ---- per-process object counts (leak checks) ------------------------------------
# Sampled every second with the queue gauges (quartchat.server.sample_registry):
# after a churn of connections they must come back to their idle values.

ASYNCIO_TASKS = Gauge(
    "asyncio_tasks",
    "asyncio tasks alive in the process (sampled every second)",
    namespace=NS,
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
THREADS = Gauge(
    "threads",
    "Python threads alive in the process, SQLite connections' included (sampled every second)",
    namespace=NS,
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
HUB_CONNECTIONS = Gauge(
    "hub_connections",
    "Connections registered in the hub (sampled every second)",
    namespace=NS,
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
HUB_ROOMS = Gauge(
    "hub_rooms",
    "Room actors registered in the hub (sampled every second)",
    namespace=NS,
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
RETIRING_ROOMS = Gauge(
    "retiring_rooms",
    "Retired room actors whose task is still finishing (sampled every second)",
    namespace=NS,
    registry=REGISTRY,
    multiprocess_mode="livesum",
)
REGISTRY_SAMPLES = Counter(
    "registry_samples",
    "Samples taken of the object counts above (a reader waiting for a fresh "
    "one waits for this to grow)",
    namespace=NS,
    registry=REGISTRY,
)

# ---- shutdown ------------------------------------------------------------------

DRAIN_SECONDS = Histogram(
    "drain_seconds",
    "Duration of a graceful drain",
    namespace=NS,
    registry=REGISTRY,
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


# Every label value is known in advance: start each series at 0, so a rate() or
# a dashboard panel has data before the first error of its kind.
for _code in sorted(ERROR_CODES):
    ERRORS_SENT.labels(code=_code)
for _action in ("join", "leave", "message", "history", "ping"):
    FRAMES_RECEIVED.labels(action=_action)
for _close in (
    CloseCode.NORMAL,
    CloseCode.GOING_AWAY,
    CloseCode.POLICY,
    CloseCode.TOO_BIG,
    CloseCode.INTERNAL,
    CloseCode.SLOW_CONSUMER,
):
    CONNECTIONS_CLOSED.labels(code=str(_close))
for _status in (400, 403, 503):
    HANDSHAKES_REFUSED.labels(status=str(_status))
for _op in ("insert", "max_seq", "fill", "replay", "history", "clients"):
    STORE_ERRORS.labels(op=_op)
