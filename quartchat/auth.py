"""Auth mode "jwt": verifying tokens, the room claims they grant, and credentials on requests.

The application's backend issues short-lived JSON Web Tokens; this module
only verifies them (PyJWT, with ``cryptography`` for RS256 / ES256 / EdDSA).
The accepted algorithms are fixed by configuration and never include
``none``; an HMAC algorithm is never accepted when a public key is
configured (algorithm confusion). A verified token becomes a :class:`Grant`:
the sender id and the rooms it may read and post to.

Nothing here logs, or puts into an exception message, a token or a key.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .errors import ConfigError
from .protocol import format_sent_at, valid_sender_id
from .validate import SENDER_ID_PATTERN

if TYPE_CHECKING:
    from .config import Settings

__all__ = [
    "HMAC_ALGORITHMS",
    "KEY_ALGORITHMS",
    "AuthError",
    "Grant",
    "Session",
    "TokenVerifier",
    "allows",
    "api_key_matches",
    "bearer",
    "format_expiry",
    "mint_token",
]

HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
# Public-key algorithm -> the key types it verifies with.
KEY_ALGORITHMS: Final[Mapping[str, tuple[type[Any], ...]]] = {
    "RS256": (rsa.RSAPublicKey,),
    "RS384": (rsa.RSAPublicKey,),
    "RS512": (rsa.RSAPublicKey,),
    "PS256": (rsa.RSAPublicKey,),
    "ES256": (ec.EllipticCurvePublicKey,),
    "ES384": (ec.EllipticCurvePublicKey,),
    "EdDSA": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}
_EC_CURVES: Final = {"ES256": "secp256r1", "ES384": "secp384r1"}
_HMAC_MIN_BYTES: Final = {"HS256": 32, "HS384": 48, "HS512": 64}
MIN_SECRET_BYTES: Final = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash
MAX_TOKEN_BYTES: Final = 8192  # longer is refused before any decoding


class AuthError(Exception):
    """A token that cannot be accepted; the message is safe to show (no token in it)."""


def _patterns(value: object, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
        raise AuthError(f"the {name} claim must be a list of non-empty strings")
    return tuple(value)


def allows(patterns: tuple[str, ...] | None, room_id: str) -> bool:
    """True when a pattern list admits the room: an exact id, or a prefix ending in ``*``.

    ``None`` (claim absent) admits every room; an empty list admits none.
    """
    if patterns is None:
        return True
    for pattern in patterns:
        if pattern.endswith("*"):
            if room_id.startswith(pattern[:-1]):
                return True
        elif pattern == room_id:
            return True
    return False


@attrs.frozen
class Grant:
    """What one verified token allows."""

    sender_id: str
    exp: int
    rooms: tuple[str, ...] | None = None  # None: every room
    publish: tuple[str, ...] | None = None  # None: every room

    def may_read(self, room_id: str) -> bool:
        """Join the room and read its history."""
        return allows(self.rooms, room_id)

    def may_post(self, room_id: str) -> bool:
        """Post to the room."""
        return allows(self.publish, room_id)

    @property
    def expires_at(self) -> str:
        """``exp`` as RFC 3339 UTC with milliseconds (without the leeway)."""
        return format_expiry(self.exp)


def format_expiry(exp: int) -> str:
    """A token expiry (seconds since the epoch) in the protocol's time format."""
    return format_sent_at(exp * 1000)


def _load_public_key(path: str) -> Any:
    var = "QUARTCHAT_JWT_PUBLIC_KEY"
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{var}={path!r}: cannot read the key file ({exc.strerror})") from None
    if b"PRIVATE KEY" in data:
        raise ConfigError(
            f"{var}={path!r}: this is a private key; give the PEM public key "
            "(the server only verifies tokens)"
        )
    try:
        return load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ConfigError(f"{var}={path!r}: not a PEM public key (RSA, EC or Ed25519)") from None


def _check_algorithms(algorithms: tuple[str, ...], key: Any) -> None:
    var = "QUARTCHAT_JWT_ALGORITHMS"
    for alg in algorithms:
        if key is None:
            if alg not in HMAC_ALGORITHMS:
                raise ConfigError(
                    f"{var}: {alg} needs QUARTCHAT_JWT_PUBLIC_KEY; with "
                    f"QUARTCHAT_JWT_SECRET use one of {sorted(HMAC_ALGORITHMS)}"
                )
            continue
        if alg in HMAC_ALGORITHMS:
            raise ConfigError(
                f"{var}: {alg} is an HMAC algorithm and a public key is "
                "configured (algorithm confusion); use "
                f"{sorted(KEY_ALGORITHMS)}"
            )
        if not isinstance(key, KEY_ALGORITHMS[alg]):
            raise ConfigError(f"{var}: {alg} does not fit the key in QUARTCHAT_JWT_PUBLIC_KEY")
        curve = _EC_CURVES.get(alg)
        if curve is not None and key.curve.name != curve:
            raise ConfigError(f"{var}: {alg} needs a {curve} key in QUARTCHAT_JWT_PUBLIC_KEY")


def _default_algorithm(key: Any) -> str:
    if key is None:
        return "HS256"
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ES384" if key.curve.name == "secp384r1" else "ES256"
    return "EdDSA"


class TokenVerifier:
    """Verifies tokens against the configured key, algorithms, audience, issuer and leeway."""

    def __init__(
        self,
        *,
        secret: str | None,
        public_key_path: str | None,
        algorithms: tuple[str, ...],
        audience: str | None,
        issuer: str | None,
        leeway_s: float,
    ) -> None:
        if (secret is None) == (public_key_path is None):
            raise ConfigError(
                "QUARTCHAT_AUTH=jwt needs exactly one key: set QUARTCHAT_JWT_SECRET (HS256) "
                "or QUARTCHAT_JWT_PUBLIC_KEY (a PEM file); "
                + ("both are set" if secret is not None else "neither is set")
            )
        if secret is not None and len(secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(
                f"QUARTCHAT_JWT_SECRET: at least {MIN_SECRET_BYTES} bytes (RFC 7518 3.2)"
            )
        self._key: Any = secret if secret is not None else _load_public_key(str(public_key_path))
        public = None if secret is not None else self._key
        algs = algorithms or (_default_algorithm(public),)
        _check_algorithms(algs, public)
        if secret is not None:
            need = max(_HMAC_MIN_BYTES[a] for a in algs)
            if len(secret.encode()) < need:
                raise ConfigError(
                    f"QUARTCHAT_JWT_SECRET: at least {need} bytes for "
                    f"{', '.join(algs)} (RFC 7518 3.2)"
                )
        self.algorithms = list(algs)
        self.audience = audience
        self.issuer = issuer
        self.leeway_s = leeway_s

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        """The verifier for jwt mode; raises ConfigError naming a bad setting."""
        return cls(
            secret=settings.jwt_secret,
            public_key_path=settings.jwt_public_key,
            algorithms=settings.jwt_algorithms,
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway_s=settings.jwt_leeway_s,
        )

    def verify(self, token: str) -> Grant:
        """The grant of a valid token, or :class:`AuthError` saying why not."""
        if not token or len(token) > MAX_TOKEN_BYTES:
            raise AuthError("malformed token")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "sub"], "verify_signature": True},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid (nbf or iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the {exc.claim} claim") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("token algorithm not accepted") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad token signature") from None
        except (jwt.InvalidTokenError, jwt.InvalidKeyError, ValueError, TypeError):
            raise AuthError("malformed token") from None
        # RFC 7519 4.1.3: a token naming an audience is refused by a server that has none.
        if self.audience is None and "aud" in claims:
            raise AuthError("token audience not accepted")
        sub = claims.get("sub")
        if not valid_sender_id(sub):
            raise AuthError(f"token sub must match ^{SENDER_ID_PATTERN}$")
        exp = claims["exp"]
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise AuthError("token exp must be an integer")
        rooms = _patterns(claims.get("rooms"), "rooms")
        publish = _patterns(claims["publish"], "publish") if "publish" in claims else rooms
        return Grant(sender_id=str(sub), exp=exp, rooms=rooms, publish=publish)

    def seconds_left(self, grant: Grant) -> float:
        """Seconds until the token runs out, leeway included."""
        return grant.exp + self.leeway_s - time.time()


class HeadersLike(Protocol):
    """Request headers (Quart's, werkzeug's, a dict)."""

    def get(self, key: str) -> str | None: ...


def bearer(headers: HeadersLike) -> str | None:
    """The credential of an ``Authorization: Bearer X`` header, or None."""
    value = headers.get("Authorization")
    if not value:
        return None
    scheme, _, credential = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return None
    return credential.strip()


def api_key_matches(configured: str | None, given: str | None) -> bool:
    """Constant-time comparison of a presented API key with the configured one."""
    if configured is None or given is None:
        return False
    return hmac.compare_digest(configured.encode(), given.encode())


def mint_token(
    secret: str,
    sub: str,
    *,
    ttl_s: int = 3600,
    rooms: list[str] | None = None,
    publish: list[str] | None = None,
    algorithm: str = "HS256",
    audience: str | None = None,
    issuer: str | None = None,
    now: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """An HMAC-signed token (``quartchat token``, the load tool, tests)."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"sub": sub, "iat": issued, "exp": issued + ttl_s}
    if rooms is not None:
        claims["rooms"] = rooms
    if publish is not None:
        claims["publish"] = publish
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    claims.update(extra or {})
    return jwt.encode(claims, secret, algorithm=algorithm)


class Session:
    """A jwt connection's current grant and its one expiry timer (not a scan)."""

    def __init__(
        self, verifier: TokenVerifier, grant: Grant, on_expire: Callable[[], None]
    ) -> None:
        self._verifier = verifier
        self._on_expire = on_expire
        self.grant = grant
        self._timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, self._verifier.seconds_left(self.grant))
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_expire)

    def replace(self, grant: Grant) -> None:
        """A successful refresh: the new grant, and the timer moved to its exp."""
        self.grant = grant
        self._arm()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
