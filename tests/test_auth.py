"""Auth mode "jwt" through Quart's test client: handshake attacks, room claims, refresh and
expiry, the HTTP read guards, and the auth settings that stop the start."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from quart import Quart
from quart.testing.connections import WebsocketDisconnectError, WebsocketResponseError

from quartchat.app import create_app
from quartchat.auth import TokenVerifier, allows
from quartchat.config import Settings
from quartchat.errors import ConfigError

from .test_websocket import WS

SECRET = "s3cret-for-tests-only-0123456789abcdef"
API_KEY = "api-key-for-tests-0123456789"


def token(
    sub: Any = "alice", ttl: float = 60, *, secret: str = SECRET, alg: str = "HS256", **claims: Any
) -> str:
    now = int(time.time())
    body: dict[str, Any] = {"sub": sub, "iat": now, "exp": int(now + ttl), **claims}
    for name in [k for k, v in body.items() if v is None]:
        del body[name]
    return jwt.encode(body, secret, algorithm=alg)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A token built by hand (what an attacker sends), HMAC-signed with ``key`` or unsigned."""
    signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    sig = _b64(hmac.new(key, signing.encode(), hashlib.sha256).digest()) if key else ""
    return f"{signing}.{sig}"


@pytest.fixture
def jwt_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "auth": "jwt",
            "jwt_secret": SECRET,
            "api_key": API_KEY,
            "rate_per_s": 0,
            "jwt_leeway_s": 0.5,
        }
        return make_settings(**{**base, **overrides})

    return make


@pytest.fixture
async def app(jwt_settings: Callable[..., Settings]) -> AsyncIterator[Quart]:
    application = create_app(jwt_settings())
    async with application.test_app():
        yield application


async def refused(app: Quart, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    with pytest.raises(WebsocketResponseError) as info:
        async with app.test_client().websocket(path, headers=headers) as ws:
            await ws.receive()
    response = info.value.response
    return response.status_code, orjson.loads(await response.get_data())


def chat(app: Quart, tok: str, **kw: Any) -> Any:
    return app.test_client().websocket(f"/chat?token={tok}", **kw)


# ---- handshake ------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(public: Any) -> bytes:
    return bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


HANDSHAKE_ATTACKS: dict[str, Callable[[], str]] = {
    "malformed": lambda: "not.a.jwt",
    "garbage": lambda: "%%%",
    "bad signature": lambda: token(secret="another-secret-of-sufficient-length-000"),
    "expired": lambda: token(ttl=-30),
    "not yet valid (nbf)": lambda: token(nbf=int(time.time()) + 60),
    "issued in the future (iat)": lambda: token(iat=int(time.time()) + 60),
    "aud without a configured audience": lambda: token(aud="chat"),
    "alg none": lambda: forged(
        {"alg": "none", "typ": "JWT"}, {"sub": "alice", "exp": int(time.time()) + 60}, None
    ),
    "alg none, no signature part": lambda: forged(
        {"alg": "none"}, {"sub": "alice", "exp": int(time.time()) + 60}, None
    ).rstrip("."),
    "sub outside the pattern": lambda: token(sub="bad id!"),
    "sub not a string": lambda: token(sub=42),
    "no sub": lambda: token(sub=None),
    "no exp": lambda: jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),
    "exp not a number": lambda: jwt.encode(
        {"sub": "alice", "exp": "soon"}, SECRET, algorithm="HS256"
    ),
    "rooms not a list": lambda: token(rooms="team-1:*"),
    "rooms not strings": lambda: token(rooms=[1, 2]),
    "publish not a list": lambda: token(publish={"a": 1}),
    "HS384 not configured": lambda: token(alg="HS384", secret=SECRET * 2),
    "too long": lambda: token(pad="x" * 9000),
}


@pytest.mark.parametrize("attack", sorted(HANDSHAKE_ATTACKS))
async def test_handshake_attacks_get_401_json_and_no_upgrade(app: Quart, attack: str) -> None:
    tok = HANDSHAKE_ATTACKS[attack]()
    status, body = await refused(app, f"/chat?token={tok}")
    assert status == 401, attack
    assert body["error"] == "unauthorized" and body["message"], body
    text = orjson.dumps(body).decode()
    assert SECRET not in text
    assert all(part not in text for part in tok.split(".") if len(part) > 8), "token echoed"


async def test_missing_token_is_401_and_sender_id_does_not_help(app: Quart) -> None:
    for path in ("/chat", "/chat?sender_id=alice"):
        status, body = await refused(app, path)
        assert (status, body["error"]) == (401, "unauthorized") and body["message"]
    basic = "YWxpY2U6eA=="  # alice:x
    status, body = await refused(app, "/chat", headers={"Authorization": f"Basic {basic}"})
    assert status == 401 and set(body) == {"error", "message"}, body
    assert body["error"] == "unauthorized" and isinstance(body["message"], str) and body["message"]
    assert basic not in body["message"]


async def test_audience_and_issuer_when_configured(jwt_settings: Callable[..., Settings]) -> None:
    app = create_app(jwt_settings(jwt_audience="chat", jwt_issuer="https://backend"))
    async with app.test_app():
        for bad in (
            token(iss="https://backend"),
            token(aud="chat"),
            token(aud="other", iss="https://backend"),
            token(aud="chat", iss="https://evil"),
        ):
            status, body = await refused(app, f"/chat?token={bad}")
            assert (status, body["error"]) == (401, "unauthorized")
        async with chat(app, token(aud="chat", iss="https://backend")) as raw:
            assert (await WS(raw).expect("welcome"))["sender_id"] == "alice"
        async with chat(app, token(aud=["x", "chat"], iss="https://backend")) as raw:
            await WS(raw).expect("welcome")


async def test_algorithm_confusion_hs256_against_an_rs256_key(
    jwt_settings: Callable[..., Settings],
    tmp_path: Path,
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    key_file = tmp_path / "pub.pem"
    public_pem = pem(rsa_key.public_key())
    key_file.write_bytes(public_pem)
    app = create_app(jwt_settings(jwt_secret=None, jwt_public_key=str(key_file)))
    claims = {"sub": "alice", "exp": int(time.time()) + 60}
    async with app.test_app():
        # The classic attack: HMAC-sign with the public key's PEM text as the secret.
        attacks = [
            forged({"alg": "HS256", "typ": "JWT"}, claims, public_pem),
            forged({"alg": "HS256", "typ": "JWT"}, claims, SECRET.encode()),
            forged({"alg": "none"}, claims, None),
            jwt.encode(
                claims, rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"
            ),
        ]
        for attack in attacks:
            status, body = await refused(app, f"/chat?token={attack}")
            assert (status, body["error"]) == (401, "unauthorized"), attack
        good = jwt.encode(claims, rsa_key, algorithm="RS256")
        async with chat(app, good) as raw:
            assert (await WS(raw).expect("welcome"))["sender_id"] == "alice"


@pytest.mark.parametrize("kind", ["ES256", "EdDSA"])
async def test_ec_and_eddsa_keys(
    jwt_settings: Callable[..., Settings], tmp_path: Path, kind: str
) -> None:
    private: Any = (
        ec.generate_private_key(ec.SECP256R1())
        if kind == "ES256"
        else ed25519.Ed25519PrivateKey.generate()
    )
    (tmp_path / "k.pem").write_bytes(pem(private.public_key()))
    app = create_app(jwt_settings(jwt_secret=None, jwt_public_key=str(tmp_path / "k.pem")))
    claims = {"sub": "bob", "exp": int(time.time()) + 60}
    async with app.test_app():
        async with chat(app, jwt.encode(claims, private, algorithm=kind)) as raw:
            assert (await WS(raw).expect("welcome"))["sender_id"] == "bob"
        status, _ = await refused(app, f"/chat?token={token(sub='bob')}")  # an HS256 token
        assert status == 401


async def test_header_token_and_query_wins(app: Quart) -> None:
    good, bad = token("alice"), token("alice", secret="wrong-secret-but-long-enough-0000000")
    async with app.test_client().websocket(
        "/chat", headers={"Authorization": f"Bearer {good}"}
    ) as raw:
        welcome = await WS(raw).expect("welcome")
        assert welcome["sender_id"] == "alice"
        assert welcome["expires_at"].endswith("Z") and len(welcome["expires_at"]) == 24
    status, _ = await refused(
        app, f"/chat?token={bad}", headers={"Authorization": f"Bearer {good}"}
    )
    assert status == 401, "the query parameter is used when both are present"
    async with app.test_client().websocket(
        f"/chat?token={good}&sender_id=mallory", headers={"Authorization": f"Bearer {bad}"}
    ) as raw:
        assert (await WS(raw).expect("welcome"))["sender_id"] == "alice"


async def test_welcome_expires_at_is_exp_without_leeway(app: Quart) -> None:
    exp = int(time.time()) + 120
    tok = jwt.encode({"sub": "alice", "exp": exp}, SECRET, algorithm="HS256")
    async with chat(app, tok) as raw:
        welcome = await WS(raw).expect("welcome")
    assert welcome["expires_at"] == time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(exp))


# ---- room claims -----------------------------------------------------------------


def test_room_patterns() -> None:
    assert allows(None, "anything")
    assert not allows((), "anything")
    assert allows(("team-7:*",), "team-7:general") and allows(("team-7:*",), "team-7:")
    assert not allows(("team-7:*",), "team-70:x") or allows(("team-7*",), "team-70:x")
    assert not allows(("team-7:*",), "team-8:general")
    assert allows(("lobby",), "lobby") and not allows(("lobby",), "lobby2")
    assert allows(("*",), "x")


async def test_claims_forbid_join_history_and_post_and_store_nothing(app: Quart) -> None:
    hub = app.extensions["quartchat"]
    async with chat(app, token(rooms=["team-1:*", "lobby"], publish=["team-1:*"])) as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        for frame in (
            {"action": "join", "room_id": "other"},
            {"action": "history", "room_id": "other"},
            {"action": "message", "room_id": "other", "content": "hi", "client_msg_id": "m1"},
        ):
            await ws.send(frame)
            err = await ws.expect("error")
            assert err["code"] == "forbidden" and err["action"] == frame["action"], err
            assert err["room_id"] == "other"
        assert err["client_msg_id"] == "m1"
        await ws.send({"action": "join", "room_id": "team-1:general"})
        assert (await ws.expect("joined"))["members"] == ["alice"]
        await ws.send({"action": "join", "room_id": "lobby"})
        await ws.expect("joined")
        # Order of checks: field errors, then forbidden, then not_joined.
        await ws.send({"action": "message", "room_id": "other", "content": "x" * 5000})
        assert (await ws.expect("error"))["code"] == "too_large"
        await ws.send({"action": "message", "room_id": "lobby", "content": "hi"})
        assert (await ws.expect("error"))["code"] == "forbidden"  # joined, but read-only here
        await ws.send({"action": "message", "room_id": "team-1:other", "content": "hi"})
        assert (await ws.expect("error"))["code"] == "not_joined"
        await ws.send({"action": "message", "room_id": "team-1:general", "content": "hi"})
        got = {(await ws.recv())["type"], (await ws.recv())["type"]}
        assert got == {"ack", "message"}
    assert (await hub.store.page("other", None, 10))[0] == []
    assert (await hub.store.page("lobby", None, 10))[0] == []
    assert len((await hub.store.page("team-1:general", None, 10))[0]) == 1


async def test_read_only_token(app: Quart) -> None:
    async with chat(app, token(rooms=["news"], publish=[])) as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        await ws.send({"action": "join", "room_id": "news", "history": 5})
        await ws.expect("joined")
        await ws.send({"action": "history", "room_id": "news"})
        assert (await ws.expect("history"))["messages"] == []
        await ws.send({"action": "message", "room_id": "news", "content": "hi"})
        err = await ws.expect("error")
        assert (err["code"], err["action"], err["room_id"]) == ("forbidden", "message", "news")


async def test_no_rooms_claim_means_every_room(app: Quart) -> None:
    async with chat(app, token()) as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        await ws.send({"action": "join", "room_id": "anything"})
        await ws.expect("joined")
        await ws.send({"action": "message", "room_id": "anything", "content": "hi"})
        assert {(await ws.recv())["type"], (await ws.recv())["type"]} == {"ack", "message"}


# ---- refresh and expiry ----------------------------------------------------------


async def test_no_refresh_closes_4001_at_exp_plus_leeway(app: Quart) -> None:
    exp = int(time.time()) + 2
    tok = jwt.encode({"sub": "alice", "exp": exp}, SECRET, algorithm="HS256")
    async with chat(app, tok) as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        await ws.send({"action": "ping"})
        await ws.expect("pong")
        with pytest.raises(WebsocketDisconnectError) as info:
            await ws.recv(timeout=6)
        closed_at = time.time()
    assert info.value.args[0] == 4001
    assert closed_at >= exp + 0.5 - 0.05, (closed_at, exp)  # leeway 0.5 s
    assert closed_at < exp + 0.5 + 1.5


async def test_refresh_extends_the_life(app: Quart) -> None:
    exp = int(time.time()) + 2
    tok = jwt.encode({"sub": "alice", "exp": exp}, SECRET, algorithm="HS256")
    async with chat(app, tok) as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        await ws.send({"action": "refresh", "token": token(ttl=60)})
        refreshed = await ws.expect("refreshed")
        assert set(refreshed) == {"type", "expires_at"} and refreshed["expires_at"].endswith("Z")
        # Past the first exp + leeway, the socket still answers.
        await ws.silent(timeout=max(0.1, exp + 1.2 - time.time()))
        await ws.send({"action": "ping"})
        await ws.expect("pong")


async def test_bad_refresh_is_unauthorized_and_changes_nothing(app: Quart) -> None:
    exp = int(time.time()) + 3
    tok = jwt.encode({"sub": "alice", "exp": exp, "rooms": ["a"]}, SECRET, algorithm="HS256")
    async with chat(app, tok) as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        await ws.send({"action": "join", "room_id": "a"})
        await ws.expect("joined")
        for bad in (
            token("bob", ttl=60),
            token(ttl=-60),
            "garbage",
            token(ttl=60, secret="not-the-secret-but-long-enough-00000"),
            forged({"alg": "none"}, {"sub": "alice", "exp": exp + 60}, None),
        ):
            await ws.send({"action": "refresh", "token": bad})
            err = await ws.expect("error")
            assert (err["code"], err["action"]) == ("unauthorized", "refresh"), err
            assert bad not in err["message"]
        for frame in ({"action": "refresh"}, {"action": "refresh", "token": 5}):
            await ws.send(frame)
            err = await ws.expect("error")
            assert (err["code"], err["action"]) == ("invalid_field", "refresh")
        # Still joined to "a", still bound to the old token's rooms and exp.
        await ws.send({"action": "join", "room_id": "b"})
        assert (await ws.expect("error"))["code"] == "forbidden"
        await ws.send({"action": "message", "room_id": "a", "content": "still here"})
        assert {(await ws.recv())["type"], (await ws.recv())["type"]} == {"ack", "message"}
        with pytest.raises(WebsocketDisconnectError) as info:
            await ws.recv(timeout=6)
        assert info.value.args[0] == 4001


async def test_refresh_that_narrows_rooms_leaves_them(app: Quart) -> None:
    async with chat(app, token(rooms=["a", "b", "c:*"])) as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        for room in ("a", "b", "c:1"):
            await ws.send({"action": "join", "room_id": room})
            await ws.expect("joined")
        await ws.send({"action": "refresh", "token": token(rooms=["a"], ttl=120)})
        await ws.expect("refreshed")
        left = [await ws.expect("left"), await ws.expect("left")]
        assert sorted(f["room_id"] for f in left) == ["b", "c:1"]
        assert all(f["reason"] == "forbidden" for f in left)
        await ws.send({"action": "message", "room_id": "b", "content": "hi"})
        assert (await ws.expect("error"))["code"] == "forbidden"
        await ws.send({"action": "join", "room_id": "b"})
        assert (await ws.expect("error"))["code"] == "forbidden"
        await ws.send({"action": "message", "room_id": "a", "content": "hi"})
        assert {(await ws.recv())["type"], (await ws.recv())["type"]} == {"ack", "message"}


async def test_refresh_is_unknown_in_auth_mode_none(make_settings: Callable[..., Settings]) -> None:
    app = create_app(make_settings())
    async with app.test_app(), app.test_client().websocket("/chat?sender_id=alice") as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        await ws.send({"action": "refresh", "token": token()})
        err = await ws.expect("error")
        assert (err["code"], err["action"]) == ("unknown_action", "refresh")


async def test_one_timer_per_connection(app: Quart) -> None:
    """Each connection arms one loop timer and refresh moves it; nothing scans."""
    import asyncio

    loop = asyncio.get_running_loop()
    async with chat(app, token(ttl=300)) as raw:
        ws = WS(raw)
        await ws.expect("welcome")
        armed = len([h for h in loop._scheduled if not h.cancelled()])  # type: ignore[attr-defined]
        for _ in range(3):
            await ws.send({"action": "refresh", "token": token(ttl=600)})
            await ws.expect("refreshed")
        after = len([h for h in loop._scheduled if not h.cancelled()])  # type: ignore[attr-defined]
        assert after <= armed, "a refresh replaces the timer"


# ---- HTTP read routes ------------------------------------------------------------


async def test_http_read_routes_need_credentials_in_jwt_mode(app: Quart) -> None:
    client = app.test_client()

    async def get(path: str, credential: str | None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        response = await client.get(path, headers=headers)
        body = await response.get_json()
        if response.status_code >= 400 and credential:
            # A refusal never echoes the credential it refused (or one part of it).
            text = orjson.dumps(body).decode()
            assert all(p not in text for p in credential.split(".") if len(p) > 8), body
        return response.status_code, body

    allowed = token(rooms=["team-1:*"])
    for path in ("/api/rooms/team-1:a/messages", "/api/rooms/team-1:a/members"):
        assert (await get(path, None))[0] == 401
        assert (await get(path, "garbage"))[0] == 401
        assert (await get(path, token(ttl=-60, rooms=["team-1:*"])))[0] == 401
        assert (await get(path, allowed))[0] == 200
        assert (await get(path, API_KEY))[0] == 200
        status, body = await get(path.replace("team-1:a", "other"), allowed)
        assert (status, body["error"]) == (403, "forbidden")
        assert (await get(path.replace("team-1:a", "other"), API_KEY))[0] == 200
    status, body = await get("/api/rooms/bad%20id/messages", allowed)
    assert status == 400
    assert (await get("/api/rooms", None))[0] == 401
    assert (await get("/api/rooms", allowed))[0] == 401
    status, body = await get("/api/rooms", API_KEY)
    assert status == 200 and body == {"rooms": []}


async def test_api_rooms_is_401_in_jwt_mode_without_an_api_key(
    jwt_settings: Callable[..., Settings],
) -> None:
    app = create_app(jwt_settings(api_key=None))
    async with app.test_app():
        client = app.test_client()
        for credential in (None, token(), "anything"):
            headers = {"Authorization": f"Bearer {credential}"} if credential else {}
            assert (await client.get("/api/rooms", headers=headers)).status_code == 401
        ok = await client.get(
            "/api/rooms/x/members", headers={"Authorization": f"Bearer {token()}"}
        )
        assert ok.status_code == 200


# ---- settings --------------------------------------------------------------------


def env(**values: str) -> dict[str, str]:
    return {"QUARTCHAT_AUTH": "jwt", **{f"QUARTCHAT_{k.upper()}": v for k, v in values.items()}}


def test_bad_auth_settings_stop_the_start(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    public = tmp_path / "pub.pem"
    public.write_bytes(pem(rsa_key.public_key()))
    private = tmp_path / "key.pem"
    private.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "junk.pem").write_text("hello")
    cases: list[tuple[dict[str, str], str]] = [
        (env(), "QUARTCHAT_JWT_SECRET"),
        (env(jwt_secret=SECRET, jwt_public_key=str(public)), "both"),
        (env(jwt_public_key=str(tmp_path / "missing.pem")), "QUARTCHAT_JWT_PUBLIC_KEY"),
        (env(jwt_public_key=str(tmp_path / "junk.pem")), "QUARTCHAT_JWT_PUBLIC_KEY"),
        (env(jwt_public_key=str(private)), "private key"),
        (env(jwt_secret=SECRET, jwt_algorithms="XS999"), "QUARTCHAT_JWT_ALGORITHMS"),
        (env(jwt_secret=SECRET, jwt_algorithms="none"), "QUARTCHAT_JWT_ALGORITHMS"),
        (env(jwt_secret=SECRET, jwt_algorithms="RS256"), "QUARTCHAT_JWT_ALGORITHMS"),
        (env(jwt_public_key=str(public), jwt_algorithms="HS256"), "algorithm confusion"),
        (env(jwt_public_key=str(public), jwt_algorithms="ES256"), "QUARTCHAT_JWT_ALGORITHMS"),
        (env(jwt_secret="sh0rtXYZ"), "QUARTCHAT_JWT_SECRET"),
        (env(jwt_secret=SECRET, jwt_algorithms="HS512"), "QUARTCHAT_JWT_SECRET"),
        (env(jwt_secret=SECRET, jwt_leeway_s="-1"), "QUARTCHAT_JWT_LEEWAY_S"),
        ({"QUARTCHAT_AUTH": "maybe"}, "QUARTCHAT_AUTH"),
        ({"QUARTCHAT_JWT_SECRET": SECRET}, "QUARTCHAT_AUTH=jwt"),
        ({"QUARTCHAT_API_KEY": "sh0rtXYZ"}, "QUARTCHAT_API_KEY"),
    ]
    for values, needle in cases:
        with pytest.raises(ConfigError) as info:
            Settings.from_env(values, env_file=None)
        assert needle in str(info.value), (values, str(info.value))
        assert SECRET not in str(info.value) and "sh0rtXYZ" not in str(info.value)
    ok = Settings.from_env(env(jwt_public_key=str(public)), env_file=None)
    assert TokenVerifier.from_settings(ok).algorithms == ["RS256"]
    ok = Settings.from_env(env(jwt_secret=SECRET, api_key=API_KEY), env_file=None)
    assert SECRET not in repr(ok) and API_KEY not in repr(ok)
    # The embedded default still needs nothing.
    assert Settings.from_env({}, env_file=None).auth == "none"


def test_quartchat_token_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from quartchat.cli import main

    monkeypatch.chdir(Path(__file__).parent)  # no .env here
    monkeypatch.setenv("QUARTCHAT_JWT_SECRET", SECRET)
    assert main(["token", "alice", "--rooms", "team-1:*", "--ttl", "600"]) == 0
    tok = capsys.readouterr().out.strip()
    claims = jwt.decode(tok, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["rooms"] == ["team-1:*"]
    assert 590 <= claims["exp"] - time.time() <= 601 and "publish" not in claims
    assert main(["token", "bob", "--rooms", "news", "--publish", ""]) == 0
    assert (
        jwt.decode(capsys.readouterr().out.strip(), SECRET, algorithms=["HS256"])["publish"] == []
    )
    assert main(["token", "bad id"]) == 2
    monkeypatch.delenv("QUARTCHAT_JWT_SECRET")
    assert main(["token", "alice"]) == 2
    assert "QUARTCHAT_JWT_SECRET" in capsys.readouterr().err


def test_log_filter_redacts_query_tokens_and_bearer_credentials() -> None:
    """Whatever a log line is built from (hypercorn's access log with a %(q)s or
    {authorization}i atom, a library's debug line), tokens leave as [redacted]."""
    import logging

    from quartchat.logs import RedactSecrets, TextFormatter

    tok = token()
    record = logging.LogRecord(
        "hypercorn.access",
        logging.INFO,
        __file__,
        1,
        '%s "GET %s" auth=%s',
        ("127.0.0.1", f"/chat?token={tok}&x=1", f"Bearer {API_KEY}"),
        None,
    )
    assert RedactSecrets().filter(record)
    line = TextFormatter().format(record)
    assert tok not in line and API_KEY not in line
    assert "/chat?token=[redacted]&x=1" in line and "Bearer [redacted]" in line
