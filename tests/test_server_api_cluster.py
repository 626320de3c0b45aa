"""Auth mode "jwt" and the server API on two real `quartchat serve` processes sharing
Redis (own prefix) and MariaDB (own database): publish with its retry key across
servers, disconnect and kick reaching sockets on both servers within 2 s, and a
check that no token, secret or API key reaches the logs, the /metrics scrape or an
HTTP error body."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from quartchat.auth import mint_token

from .cluster import Cluster
from .servers import ChatClient, ServerProcess

SECRET = "cluster-secret-for-tests-0123456789abcdef"
API_KEY = "cluster-api-key-0123456789abcdef"


class TokenClient(ChatClient):
    """A ChatClient that connects with ``?token=`` (jwt mode)."""

    def __init__(self, url: str, sender: str, token: str | None = None, **claims: Any) -> None:
        super().__init__(url, sender)
        self.token = token or mint_token(SECRET, sender, ttl_s=300, **claims)
        self.url = f"{url}?token={self.token}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(
        tmp_path_factory.mktemp("api-cluster"),
        extra_env={
            "QUARTCHAT_AUTH": "jwt",
            "QUARTCHAT_JWT_SECRET": SECRET,
            "QUARTCHAT_API_KEY": API_KEY,
            "QUARTCHAT_LOG_LEVEL": "debug",
        },
    )
    try:
        c.start(2, workers=1)
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()


def call(
    server: ServerProcess,
    method: str,
    path: str,
    body: Any = None,
    credential: str | None = API_KEY,
) -> tuple[int, Any]:
    data = orjson.dumps(body) if body is not None else None
    request = urllib.request.Request(server.http + path, data=data, method=method)
    if credential is not None:
        request.add_header("Authorization", f"Bearer {credential}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def scrape(server: ServerProcess) -> str:
    with urllib.request.urlopen(server.http + "/metrics", timeout=10) as r:
        return str(r.read().decode())


async def acall(*args: Any, **kw: Any) -> tuple[int, Any]:
    return await asyncio.to_thread(call, *args, **kw)


@pytest.mark.timeout(90)
async def test_publish_across_servers_is_stored_once_and_in_order(cluster: Cluster) -> None:
    s0, s1 = cluster.servers
    room = "api-publish"
    c0 = await TokenClient(s0.url, "c0").connect()
    c1 = await TokenClient(s1.url, "c1").connect()
    try:
        for c in (c0, c1):
            await c.join(room)
        await c0.send({"action": "message", "room_id": room, "content": "socket 1"})
        await c0.wait_for(lambda: len(c0.of("ack")) == 1)
        status, first = await acall(
            s1,
            "POST",
            f"/api/rooms/{room}/messages",
            {"sender_id": "backend", "content": "api 1", "client_msg_id": "k1"},
        )
        assert status == 201 and first["seq"] == 2
        # The retry, sent to the *other* server, answers 200 with the original.
        status, again = await acall(
            s0,
            "POST",
            f"/api/rooms/{room}/messages",
            {"sender_id": "backend", "content": "api 1", "client_msg_id": "k1"},
        )
        assert status == 200 and again == first
        await c1.send({"action": "message", "room_id": room, "content": "socket 2"})
        await c1.wait_for(lambda: len(c1.of("ack")) == 1)
        status, second = await acall(
            s0, "POST", f"/api/rooms/{room}/messages", {"sender_id": "backend", "content": "api 2"}
        )
        assert status == 201 and second["seq"] == 4
        for c in (c0, c1):
            await c.wait_for(lambda c=c: len(c.of("message", room)) >= 4)
        await asyncio.sleep(0.3)  # a late duplicate would arrive now (asserting absence)
        for c in (c0, c1):
            seen = [(f["seq"], f["content"]) for f in c.of("message", room)]
            assert seen == [(1, "socket 1"), (2, "api 1"), (3, "socket 2"), (4, "api 2")], seen
        assert sorted(cluster.stored(room)) == [1, 2, 3, 4]
    finally:
        await c0.close()
        await c1.close()


@pytest.mark.timeout(90)
async def test_disconnect_reaches_sockets_on_both_servers_with_4003(cluster: Cluster) -> None:
    s0, s1 = cluster.servers
    alice = [await TokenClient(s.url, "alice-d").connect() for s in (s0, s1)]
    bob = await TokenClient(s0.url, "bob-d").connect()
    try:
        started = time.monotonic()
        status, body = await acall(s1, "POST", "/api/users/alice-d/disconnect")
        assert (status, body) == (202, {"status": "accepted"})
        async with asyncio.timeout(2.0):
            while not all(a.closed for a in alice):
                await asyncio.sleep(0.01)
        took = time.monotonic() - started
        print(f"disconnect reached both servers in {took:.3f}s")
        assert [a.close_code for a in alice] == [4003, 4003]
        await bob.send({"action": "ping"})
        await bob.wait_for(lambda: bool(bob.of("pong")))
    finally:
        for c in (*alice, bob):
            await c.close()


@pytest.mark.timeout(90)
async def test_kick_reaches_both_servers_with_left_and_presence(cluster: Cluster) -> None:
    s0, s1 = cluster.servers
    room = "api-kick"
    others = [
        await TokenClient(s0.url, "bob-k").connect(),
        await TokenClient(s1.url, "carol-k").connect(),
    ]
    alice = [await TokenClient(s.url, "alice-k").connect() for s in (s0, s1)]
    try:
        for c in (*others, *alice):
            await c.join(room)
        for o in others:
            await o.wait_for(
                lambda o=o: any(f.get("sender_id") == "alice-k" for f in o.of("presence", room))
            )
        started = time.monotonic()
        status, body = await acall(s0, "POST", f"/api/rooms/{room}/kick", {"sender_id": "alice-k"})
        assert (status, body) == (202, {"status": "accepted"})
        for a in alice:
            await a.wait_for(lambda a=a: bool(a.of("left", room)), timeout=2.0)
            assert a.of("left", room) == [{"type": "left", "room_id": room, "reason": "kicked"}]
        for o in others:
            await o.wait_for(
                lambda o=o: any(
                    f["event"] == "leave" and f["sender_id"] == "alice-k"
                    for f in o.of("presence", room)
                ),
                timeout=2.0,
            )
        print(f"kick reached both servers in {time.monotonic() - started:.3f}s")
        status, members = await acall(s1, "GET", f"/api/rooms/{room}/members")
        assert status == 200 and members["members"] == ["bob-k", "carol-k"]
        assert not any(a.closed for a in alice), "a kick is not a disconnect"
        joined = await alice[1].join(room)  # and not a ban
        assert "alice-k" in joined["members"]
    finally:
        for c in (*others, *alice):
            await c.close()


@pytest.mark.timeout(90)
def test_wrong_key_is_401_and_no_key_is_404(cluster: Cluster) -> None:
    s0 = cluster.servers[0]
    for credential in (None, "wrong", mint_token(SECRET, "alice")):
        status, body = call(s0, "POST", "/api/users/x/disconnect", credential=credential)
        assert (status, body["error"]) == (401, "unauthorized")
    unkeyed = ServerProcess(
        cluster.workdir, {**cluster.env(), "QUARTCHAT_API_KEY": ""}, name="nokey"
    )
    try:
        unkeyed.start()
        for path, body in (
            ("/api/users/x/disconnect", None),
            ("/api/rooms/r/kick", {"sender_id": "x"}),
            ("/api/rooms/r/messages", {"sender_id": "x", "content": "hi"}),
        ):
            status, answer = call(unkeyed, "POST", path, body)
            assert status == 404 and answer["error"], path
        # jwt mode without an API key: GET /api/rooms is always 401.
        assert call(unkeyed, "GET", "/api/rooms")[0] == 401
    finally:
        unkeyed.stop()


@pytest.mark.timeout(90)
async def test_logs_metrics_and_error_bodies_hold_no_token_secret_or_api_key(
    cluster: Cluster,
) -> None:
    s0, s1 = cluster.servers
    room = "team-9:logs"
    secrets_used = [SECRET, API_KEY]
    alice = TokenClient(s0.url, "alice-l", rooms=["team-9:*"])
    secrets_used.append(alice.token)
    await alice.connect()
    bob_token = mint_token(SECRET, "bob-l", ttl_s=300)
    secrets_used.append(bob_token)
    carol = TokenClient(s1.url, "carol-l", rooms=["team-9:*"])
    secrets_used.append(carol.token)
    await carol.connect()
    import websockets

    bob_ws = await websockets.connect(
        s1.url, additional_headers={"Authorization": f"Bearer {bob_token}"}, ping_interval=None
    )
    refusals: list[bytes] = []  # every HTTP error body a bad token or key got

    def refused_call(status: int, *args: Any, **kw: Any) -> None:
        got, body = call(*args, **kw)
        assert got == status, (got, body)
        refusals.append(orjson.dumps(body))

    try:
        await alice.join(room)
        await carol.join(room)
        await alice.send(
            {"action": "message", "room_id": room, "content": "hi", "client_msg_id": "l1"}
        )
        await alice.wait_for(lambda: bool(alice.of("ack")))
        fresh = mint_token(SECRET, "alice-l", ttl_s=600, rooms=["team-9:*"])
        wrong = mint_token(SECRET, "mallory", ttl_s=600)
        forged_ = mint_token("not-the-secret-but-long-enough-000000", "alice-l")
        expired = mint_token(SECRET, "alice-l", ttl_s=-60)
        secrets_used += [fresh, wrong, forged_, expired]
        await alice.send({"action": "refresh", "token": fresh})
        await alice.wait_for(lambda: bool(alice.of("refreshed")))
        for bad in (wrong, expired):
            await alice.send({"action": "refresh", "token": bad})
        await alice.wait_for(
            lambda: len([f for f in alice.of("error") if f.get("code") == "unauthorized"]) == 2
        )
        await alice.send({"action": "join", "room_id": "other"})
        await alice.wait_for(lambda: any(f.get("code") == "forbidden" for f in alice.of("error")))
        # Refused handshakes with a forged and an expired token, HTTP reads, API calls.
        for bad in (forged_, expired):
            with pytest.raises(websockets.InvalidStatus) as refused:
                await TokenClient(s1.url, "alice-l", token=bad).connect()
            assert refused.value.response.status_code == 401
            refusals.append(refused.value.response.body)
        assert call(s0, "GET", f"/api/rooms/{room}/messages", credential=alice.token)[0] == 200
        refused_call(403, s0, "GET", "/api/rooms/other/messages", credential=alice.token)
        refused_call(401, s0, "GET", f"/api/rooms/{room}/messages", credential=expired)
        refused_call(401, s1, "GET", "/api/rooms", credential=forged_)
        refused_call(401, s1, "GET", f"/api/rooms?token={forged_}", credential=None)
        assert (
            call(
                s1, "POST", f"/api/rooms/{room}/messages", {"sender_id": "backend", "content": "x"}
            )[0]
            == 201
        )
        for path, body in (
            (f"/api/rooms/{room}/messages", {"sender_id": "backend", "content": "x"}),
            ("/api/users/nobody/disconnect", None),
            (f"/api/rooms/{room}/kick", {"sender_id": "carol-l"}),
        ):
            refused_call(401, s1, "POST", path, body, credential=API_KEY + "x")
            refused_call(401, s0, "POST", path, body, credential=fresh)
        assert call(s0, "POST", f"/api/rooms/{room}/kick", {"sender_id": "carol-l"})[0] == 202
        await carol.wait_for(lambda: bool(carol.of("left", room)), timeout=3)
        assert call(s0, "POST", "/api/users/bob-l/disconnect")[0] == 202
        async with asyncio.timeout(3):
            await bob_ws.wait_closed()
        assert bob_ws.close_code == 4003
    finally:
        await alice.close()
        await carol.close()
        await bob_ws.close()
    await asyncio.sleep(0.3)  # let the servers write their last access-log lines
    logs = "\n".join(s.log_path.read_text(errors="replace") for s in (s0, s1))
    assert '"GET /chat' in logs, "the access log saw the handshakes"
    scrapes = {i: await asyncio.to_thread(scrape, s) for i, s in enumerate((s0, s1))}
    for name, text in scrapes.items():
        assert "quartchat_handshakes_refused" in text, name  # a real scrape, not an error page
    assert len(refusals) == 12 and all(b'"error"' in body for body in refusals)
    places = {"logs": logs, **{f"/metrics of server {n}": t for n, t in scrapes.items()}}
    places |= {f"error body {i}": body.decode() for i, body in enumerate(refusals)}
    for secret in secrets_used:
        for part in {secret, *secret.split(".")[1:]}:  # payload and signature parts too
            for place, text in places.items():
                assert part not in text, f"a secret ({len(part)} chars) reached {place}"
