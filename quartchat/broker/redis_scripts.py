"""Redis key names and the Lua scripts of presence (each touches one hash slot).

Every per-room key carries the hash tag ``{P:room}`` (``P`` is
``QUARTCHAT_REDIS_PREFIX``), so a room's keys live in one slot of a Redis
Cluster and every script below touches exactly one slot:

- ``{P:room}:chan``    the room's pub/sub channel (in the slot too, so a move
                       to sharded pub/sub, SPUBLISH, changes no name)
- ``{P:room}:m``       zset: entry ``node\\0sender`` -> expiry (Redis ms)
- ``{P:room}:n``       hash: sender -> number of entries (live or not yet reaped)
- ``{P:room}:reaped``  zset: entry -> when it was reaped (so a node that comes
                       back announces its re-added members again; trimmed
                       after a day)
- ``{P}:rooms``        zset: room -> expiry (Redis ms): rooms with entries,
                       for ``rooms()`` only; its own slot, never in a script
                       with the room's keys

Time is Redis's (``TIME``), never a local clock. Scripts that change state
on behalf of a caller carry the caller's estimate of Redis time and refuse
(return -1) when they run more than ``ARGV stale`` ms later than that: a
command that sat in a socket buffer while Redis was frozen must not act on
the world as it is after the thaw (the caller retries with fresh state).

On a Redis Cluster the scripts announce with ``SPUBLISH`` (:func:`sharded`):
the channel is declared in KEYS, in the slot of the room's other keys.

:class:`Scripts` registers every script on one client; callers queue them in
pipelines of at most :data:`BATCH` calls (:func:`chunks`) and hand each
pipeline's results to :meth:`Scripts.loaded`, which loads the scripts on
every master of a cluster that answered NOSCRIPT (the call is retried).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from . import BrokerError

__all__ = [
    "BATCH",
    "ERRORS",
    "EXPIRED",
    "JOIN",
    "LEAVE",
    "LIVE_ROOMS",
    "MEMBERS",
    "REAP",
    "REFRESH",
    "STALE_MS",
    "TOUCH_ROOMS",
    "Keys",
    "Script",
    "Scripts",
    "chunks",
    "sharded",
]

BATCH = 500  # script calls (changes, or rooms) per pipeline
STALE_MS = 5000  # a change computed longer ago than this is refused and retried
# What a script call (or a pipeline of them) may raise.
ERRORS: tuple[type[BaseException], ...] = (
    RedisError,
    RedisClusterException,
    OSError,
    BrokerError,
    TimeoutError,
)

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_FRESH = """
if math.abs(now - tonumber(ARGV[1])) > tonumber(ARGV[2]) then return -1 end
"""


def sharded(script: str) -> str:
    """The script for a Redis Cluster: its announcements go out with SPUBLISH."""
    return script.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")


class Keys:
    """Key and channel names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._chan_head = f"{{{prefix}:".encode()
        self.rooms = f"{{{prefix}}}:rooms"

    def slot(self, room_id: str) -> str:
        return f"{{{self.prefix}:{room_id}}}"

    def channel(self, room_id: str) -> str:
        return f"{self.slot(room_id)}:chan"

    def room_of(self, channel: bytes) -> str | None:
        if channel.startswith(self._chan_head) and channel.endswith(b"}:chan"):
            return channel[len(self._chan_head) : -len(b"}:chan")].decode()
        return None

    def presence(self, room_id: str) -> list[str]:
        """KEYS of the presence scripts: members, counts, reaped, channel."""
        slot = self.slot(room_id)
        return [f"{slot}:m", f"{slot}:n", f"{slot}:reaped", f"{slot}:chan"]


# KEYS m, n, reaped, chan. ARGV: caller's Redis-time estimate, stale ms, node,
# sender, window ms, join payload. -> 1 first live entry anywhere (announced), 0 not,
# -1 stale.
JOIN = (
    _NOW
    + _FRESH
    + """
local e = ARGV[3] .. '\\0' .. ARGV[4]
local had = redis.call('ZSCORE', KEYS[1], e)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), e)
redis.call('ZREM', KEYS[3], e)
if had then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[4], 1) > 1 then
  -- Others hold the sender. If none of them is live (dead nodes not reaped
  -- yet), announce anyway: rooms that started meanwhile do not list her.
  local tail = '\0' .. ARGV[4]
  for _, x in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')) do
    if x ~= e and string.sub(x, -#tail) == tail then return 0 end
  end
end
redis.call('PUBLISH', KEYS[4], ARGV[6])
return 1
"""
)

# KEYS m, n, reaped, chan. ARGV: estimate, stale ms, node, sender, leave payload.
# -> 1 last anywhere (announced), 0 not (or already gone: reaped, announced then), -1 stale.
LEAVE = (
    _NOW
    + _FRESH
    + """
local e = ARGV[3] .. '\\0' .. ARGV[4]
redis.call('ZREM', KEYS[3], e)
if redis.call('ZREM', KEYS[1], e) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[2], ARGV[4], -1) <= 0 then
  redis.call('HDEL', KEYS[2], ARGV[4])
  redis.call('PUBLISH', KEYS[4], ARGV[5])
  return 1
end
return 0
"""
)

# The heartbeat of one node in one room. KEYS m, n, reaped. ARGV: estimate,
# stale ms, node, window ms, sender... Extends every entry; re-adds missing ones
# (Redis restarted empty, or a reaper took them). -> senders that must be
# announced again: re-added from nothing after a reaper announced their leave;
# or -1 if stale.
REFRESH = (
    _NOW
    + _FRESH
    + """
local exp = now + tonumber(ARGV[4])
local back = {}
for i = 5, #ARGV do
  local e = ARGV[3] .. '\\0' .. ARGV[i]
  if redis.call('ZADD', KEYS[1], exp, e) == 1 then
    local reaped = redis.call('ZSCORE', KEYS[3], e)
    if reaped then redis.call('ZREM', KEYS[3], e) end
    if redis.call('HINCRBY', KEYS[2], ARGV[i], 1) == 1 and reaped then
      table.insert(back, ARGV[i])
    end
  end
end
return back
"""
)

# KEYS m. ARGV: limit. -> {now, entry, entry, ...}: entries past their expiry.
EXPIRED = (
    _NOW
    + """
local out = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
table.insert(out, 1, tostring(now))
return out
"""
)

# KEYS m, n, reaped, chan. ARGV: the EXPIRED call's now, stale ms, then pairs of
# entry, leave payload of its sender. Removes each entry that is still expired;
# announces a leave for each sender that is now nowhere. -> entries removed, or -1.
REAP = (
    _NOW
    + _FRESH
    + """
local gone = 0
for i = 3, #ARGV, 2 do
  local e = ARGV[i]
  local exp = redis.call('ZSCORE', KEYS[1], e)
  if exp and tonumber(exp) <= now then
    redis.call('ZREM', KEYS[1], e)
    redis.call('ZADD', KEYS[3], now, e)
    gone = gone + 1
    local sender = string.sub(e, string.find(e, '\\0', 1, true) + 1)
    if redis.call('HINCRBY', KEYS[2], sender, -1) <= 0 then
      redis.call('HDEL', KEYS[2], sender)
      redis.call('PUBLISH', KEYS[4], ARGV[i + 1])
    end
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - 86400000)
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('PEXPIRE', KEYS[3], 86400000) end
return gone
"""
)

# KEYS m. -> {now, live entry, ...}
MEMBERS = (
    _NOW
    + """
local out = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
table.insert(out, 1, tostring(now))
return out
"""
)

# KEYS rooms. ARGV: window ms, room... Marks rooms as having entries; trims old ones.
TOUCH_ROOMS = (
    _NOW
    + """
local exp = now + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], exp, ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return 0
"""
)

# KEYS rooms. -> {now, room, ...} rooms that may have live entries.
LIVE_ROOMS = (
    _NOW
    + """
local out = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
table.insert(out, 1, tostring(now))
return out
"""
)


def chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Script:
    """A registered script. On a cluster, queued in a pipeline as a plain EVALSHA:
    redis-py refuses script calls on a ClusterPipeline (RedisClusterException)."""

    def __init__(self, script: AsyncScript, sharded: bool) -> None:
        self.script = script
        self.sharded = sharded

    async def __call__(self, keys: list[str], args: Iterable[Any] = (), client: Any = None) -> Any:
        if self.sharded and client is not None:
            client.execute_command("EVALSHA", self.script.sha, len(keys), *keys, *args)
            return None
        return await self.script(keys=keys, args=list(args), client=client)


class Scripts:
    """Every presence script, registered on one client (by name: ``scripts["JOIN"]``)."""

    def __init__(self, client: Any, *, cluster: bool) -> None:
        # Any: redis-py types a script's client= as Redis | RedisCluster, and a
        # ClusterPipeline is neither (it works: scripts queue as EVALSHA).
        self._r = client
        texts = {
            "JOIN": JOIN,
            "LEAVE": LEAVE,
            "REFRESH": REFRESH,
            "EXPIRED": EXPIRED,
            "REAP": REAP,
            "MEMBERS": MEMBERS,
            "TOUCH_ROOMS": TOUCH_ROOMS,
            "LIVE_ROOMS": LIVE_ROOMS,
        }
        self._by_name = {
            name: Script(client.register_script(sharded(text) if cluster else text), cluster)
            for name, text in texts.items()
        }

    def __getitem__(self, name: str) -> Script:
        return self._by_name[name]

    async def loaded(self, results: Iterable[Any]) -> None:
        """Load every script on every master if a pipeline met NOSCRIPT (cluster only:
        a plain Redis pipeline loads its scripts itself)."""
        if any(isinstance(r, NoScriptError) for r in results):
            await self.load()

    async def load(self) -> None:
        """Load every script (on a cluster: on every master)."""
        for script in self._by_name.values():
            await self._r.script_load(script.script.script)
