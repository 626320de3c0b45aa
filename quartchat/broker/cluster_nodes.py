"""The masters of a Redis Cluster as sharded pub/sub sees them: the slot map, and a link to each.

:class:`SlotMap` knows which master owns each of the 16384 hash slots and
how to reach it. It is read with ``CLUSTER SLOTS`` on a short-lived
connection to the first node that answers: the nodes of live links first,
then every known master in random order, then the startup nodes of the URL.
A master is named ``host:port`` as the cluster reports it.

A :class:`Link` is the subscription connection to one master: a raw RESP2
connection (the ``ssubscribe`` / ``sunsubscribe`` pushes then come as
replies) that never reconnects by itself, so a loss is seen, never hidden.
It remembers the rooms subscribed through it; what the link hears is read
and acted on by :class:`quartchat.broker.cluster_pubsub.ShardedSubscriber`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterable
from typing import Any

from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisError

from . import BrokerError

__all__ = ["Address", "Link", "SlotMap"]

_SLOTS = 16384
_SUBSCRIBE_BATCH = 500  # SSUBSCRIBE commands written at once to one node
_ERRORS = (RedisError, OSError, RuntimeError, TimeoutError, BrokerError)

Address = tuple[str, int]


def _name(addr: Address) -> str:
    return f"{addr[0]}:{addr[1]}"


class SlotMap:
    """Slot -> master name, and master name -> address (``CLUSTER SLOTS``)."""

    def __init__(
        self,
        startup: list[Address],
        *,
        username: str | None,
        password: str | None,
        timeout_s: float,
    ) -> None:
        self._startup = startup
        self._username, self._password = username, password
        self.timeout_s = timeout_s
        self._slots: list[str] = [""] * _SLOTS  # slot -> master name ("" uncovered)
        self.addrs: dict[str, Address] = {}  # master name -> address

    def owner(self, channel: bytes) -> str:
        """The master that owns ``channel``'s slot ("" while no master covers it)."""
        return self._slots[key_slot(channel)]

    async def refresh(self, live: Iterable[str]) -> None:
        """Read CLUSTER SLOTS from the first node that answers (``live`` masters first)."""
        seen: list[Address] = []
        for addr in [
            *(self.addrs[n] for n in live if n in self.addrs),
            *random.sample(list(self.addrs.values()), len(self.addrs)),
            *self._startup,
        ]:
            if addr not in seen:
                seen.append(addr)
        errors = []
        for addr in seen:
            try:
                async with asyncio.timeout(self.timeout_s):
                    raw = await self._cluster_slots(addr)
            except _ERRORS as exc:
                errors.append(f"{_name(addr)}: {type(exc).__name__}: {exc}")
                continue
            slots = [""] * _SLOTS
            addrs: dict[str, Address] = {}
            for entry in raw:
                start, end, master = int(entry[0]), int(entry[1]), entry[2]
                host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
                name = _name((host, int(master[1])))
                addrs[name] = (host, int(master[1]))
                slots[start : end + 1] = [name] * (end - start + 1)
            self._slots, self.addrs = slots, addrs
            return
        raise BrokerError("redis cluster: no node answered CLUSTER SLOTS: " + "; ".join(errors))

    async def _cluster_slots(self, addr: Address) -> Any:
        conn = self.connection(addr)
        try:
            await conn.connect()  # type: ignore[no-untyped-call]
            await conn.send_command("CLUSTER", "SLOTS", check_health=False)
            return await conn.read_response()
        finally:
            await conn.disconnect(nowait=True)

    def connection(self, addr: Address) -> Connection:
        """A new (not yet connected) RESP2 connection to ``addr`` that never retries."""
        return Connection(
            host=addr[0],
            port=addr[1],
            protocol=2,  # the pushes (ssubscribe, sunsubscribe) then come as replies
            socket_connect_timeout=2,
            socket_timeout=self.timeout_s,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), retries=0),  # a reconnect must be seen, not hidden
            username=self._username,
            password=self._password,
        )


class Link:
    """The subscription connection to one master, and the rooms subscribed through it."""

    def __init__(self, name: str, conn: Connection) -> None:
        self.name = name
        self.conn = conn
        self.rooms: set[str] = set()  # SSUBSCRIBE sent here (confirmed or not yet)
        self.leaving: set[bytes] = set()  # SUNSUBSCRIBE sent by us, reply not yet seen
        self.task: asyncio.Task[None] | None = None
        self.alive = True
        self.last_heard = self.last_ping = time.monotonic()

    async def send(self, commands: list[tuple[Any, ...]]) -> None:
        for start in range(0, len(commands), _SUBSCRIBE_BATCH):
            chunk = commands[start : start + _SUBSCRIBE_BATCH]
            await self.conn.send_packed_command(self.conn.pack_commands(chunk), check_health=False)

    def abort(self) -> None:
        """Close at once: a black-holed socket never finishes a graceful close."""
        self.alive = False
        writer = self.conn._writer  # redis-py offers no abort
        if writer is not None:
            writer.transport.abort()
        self.conn._close()  # type: ignore[no-untyped-call]
