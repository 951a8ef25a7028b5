"""Bearer credentials for the providers' APIs: a static token, or OAuth access tokens
refreshed from a grant, shared by every process through Redis, sealed.

**Why Redis.** Both providers' access tokens live two hours. Salesloft rotates the refresh
token on every refresh and revokes the old one; Outreach mints at most one access token per
minute per user and app. So the newest tokens must outlive a restart and be shared: the
configured ``<P>_OAUTH_REFRESH_TOKEN`` only starts the chain. The state (access token, its
expiry, the newest refresh token) is one Redis key, ``subscriptions:oauth:<provider>``, and a
refresh happens under a short Redis lock, re-reading the state first, so two processes never
spend the same refresh token.

**Sealed.** The state is stored encrypted and authenticated with keys derived (HMAC-SHA256)
from the OAuth client secret, which only the deployment's own settings hold: someone who can
read Redis but not the settings cannot use the tokens. The construction is the standard
library's only: a keystream of HMAC-SHA256 over a random 16-byte nonce and a counter (a PRF in
counter mode), then HMAC-SHA256 over nonce and ciphertext (encrypt-then-MAC), compared in
constant time. A state that does not open (another client secret, tampering) is ignored and
the chain starts again from the configured refresh token. When the operator authorizes again
and sets a new refresh token, its fingerprint differs from the one the stored chain started
from, and the new one is used.

No token is ever logged or printed: refreshed values are added to the log redaction as they
appear, and errors quote the token endpoint through the same masking as the API's.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
import uuid
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson
from redis import Redis
from redis.exceptions import RedisError

from ingest.config import Secret
from ingest.constants import Names
from ingest.subscriptions.access import OAuthGrant
from ingest.subscriptions.http import exchange, quote_answer, retry_after
from ingest.subscriptions.model import ApiError, ApiUnreachable, CredentialsRefused, RateLimited

__all__ = ["OAuthTokens", "StaticToken", "fingerprint", "seal", "unseal"]

log = logging.getLogger("ingest.subscriptions")

# Seconds before its expiry an access token is refreshed rather than used.
EXPIRY_MARGIN = 120
# Seconds a refresh may hold the lock (a crashed holder releases it after this).
LOCK_SECONDS = 30
# Access-token lifetime assumed when the token endpoint gives none (both document 7200 s).
DEFAULT_EXPIRES_IN = 7200
_VERSION = b"s1"


def fingerprint(value: str, purpose: str = "secret") -> str:
    """A short digest standing for a secret in Redis (never the secret itself)."""
    return hashlib.sha256(f"webhook-ingest {purpose}\0{value}".encode()).hexdigest()[:16]


def _keys(key_material: str, provider: str) -> tuple[bytes, bytes]:
    root = hmac.new(key_material.encode(), b"webhook-ingest oauth state|" + provider.encode(),
                    hashlib.sha256).digest()
    return (hmac.new(root, b"encrypt", hashlib.sha256).digest(),
            hmac.new(root, b"authenticate", hashlib.sha256).digest())


def _stream(key: bytes, nonce: bytes, length: int) -> bytes:
    blocks = (length + 31) // 32
    return b"".join(hmac.new(key, nonce + i.to_bytes(8, "big"), hashlib.sha256).digest()
                    for i in range(blocks))[:length]


def seal(plain: bytes, key_material: str, provider: str) -> bytes:
    """``plain`` encrypted and authenticated under keys derived from ``key_material``."""
    enc, mac = _keys(key_material, provider)
    nonce = os.urandom(16)
    cipher = bytes(a ^ b for a, b in zip(plain, _stream(enc, nonce, len(plain))))
    tag = hmac.new(mac, _VERSION + nonce + cipher, hashlib.sha256).digest()
    return _VERSION + nonce + cipher + tag


def unseal(sealed: bytes, key_material: str, provider: str) -> bytes | None:
    """What :func:`seal` sealed, or None when it was sealed under other keys or changed."""
    if len(sealed) < 2 + 16 + 32 or not sealed.startswith(_VERSION):
        return None
    enc, mac = _keys(key_material, provider)
    nonce, cipher, tag = sealed[2:18], sealed[18:-32], sealed[-32:]
    if not hmac.compare_digest(tag, hmac.new(mac, _VERSION + nonce + cipher,
                                             hashlib.sha256).digest()):
        return None
    return bytes(a ^ b for a, b in zip(cipher, _stream(enc, nonce, len(cipher))))


def mask_in_logs(*values: str) -> None:
    """Add ``values`` to the redaction of every configured log handler (ingest.logs)."""
    from ingest.logs import RedactFilter

    for handler in logging.getLogger().handlers:
        for f in handler.filters:
            if isinstance(f, RedactFilter):
                f.secrets = sorted({*f.secrets, *(v for v in values if len(v) >= 8)},
                                   key=len, reverse=True)


class StaticToken:
    """A token or API key used as it is: nothing to refresh."""

    def __init__(self, token: Secret) -> None:
        self._token = token

    def token(self, ends: float) -> str:
        return self._token.reveal()

    def refresh(self, stale: str, ends: float) -> bool:
        return False

    def secrets(self) -> list[str]:
        return [self._token.reveal()]


class OAuthTokens:
    """Access tokens from an OAuth grant, refreshed when they expire or are refused, kept
    sealed in Redis (see the module docstring). ``refreshes`` counts the refreshes this
    object made."""

    def __init__(self, provider: str, grant: OAuthGrant, redis: Redis | None, names: Names,
                 setting_prefix: str) -> None:
        self.provider = provider
        self.grant = grant
        self.redis = redis
        self.key = names.key(f"subscriptions:oauth:{provider}")
        self.lock_key = names.key(f"subscriptions:oauth-lock:{provider}")
        self.prefix = setting_prefix
        self.origin = fingerprint(grant.refresh_token.reveal(), "refresh")
        self._state: dict[str, Any] | None = None
        self.refreshes = 0

    # -- state ------------------------------------------------------------------------------

    def _load(self) -> dict[str, Any] | None:
        if self.redis is None:
            return self._state
        try:
            raw = self.redis.get(self.key)
        except RedisError as exc:
            log.warning("could not read %s's stored OAuth tokens from Redis: %s",
                        self.provider, type(exc).__name__)
            return self._state
        if raw is None:
            return None
        plain = unseal(raw if isinstance(raw, bytes) else str(raw).encode(), self.grant.client_secret.reveal(), self.provider)
        if plain is None:
            log.warning("%s's stored OAuth tokens do not open with this OAUTH_CLIENT_SECRET "
                        "(another app, or changed): starting again from %s_OAUTH_REFRESH_TOKEN",
                        self.provider, self.prefix)
            return None
        try:
            state = orjson.loads(plain)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(state, dict) or state.get("origin") != self.origin:
            return None  # a chain started from a refresh token no longer configured
        mask_in_logs(str(state.get("access_token", "")), str(state.get("refresh_token", "")))
        return state

    def _store(self, state: dict[str, Any]) -> None:
        self._state = state
        mask_in_logs(str(state["access_token"]), str(state["refresh_token"]))
        if self.redis is None:
            return
        try:
            self.redis.set(self.key, seal(orjson.dumps(state), self.grant.client_secret.reveal(),
                                          self.provider))
        except RedisError as exc:
            # This process keeps using them; a restart starts again from the configured
            # refresh token, which a rotating provider (Salesloft) has revoked by now.
            log.error("could not store %s's refreshed OAuth tokens in Redis (%s): after a "
                      "restart, %s_OAUTH_REFRESH_TOKEN may need a new authorization",
                      self.provider, type(exc).__name__, self.prefix)

    @staticmethod
    def _usable(state: dict[str, Any] | None) -> bool:
        return bool(state and state.get("access_token")
                    and float(state.get("expires_at", 0)) - EXPIRY_MARGIN > time.time())

    # -- TokenSource ------------------------------------------------------------------------

    def token(self, ends: float) -> str:
        if self._usable(self._state):
            return str(self._state["access_token"])  # type: ignore[index]
        state = self._load()
        if self._usable(state):
            self._state = state
            return str(state["access_token"])  # type: ignore[index]
        return self._refresh(None, ends)

    def refresh(self, stale: str, ends: float) -> bool:
        self._refresh(stale, ends)
        return True

    def secrets(self) -> list[str]:
        out = [self.grant.client_secret.reveal(), self.grant.refresh_token.reveal()]
        if self._state:
            out += [str(self._state.get("access_token", "")),
                    str(self._state.get("refresh_token", ""))]
        return [s for s in out if s]

    # -- refreshing -------------------------------------------------------------------------

    def _refresh(self, stale: str | None, ends: float) -> str:
        """A fresh access token: another process's if it refreshed meanwhile (``stale``: the
        one the API refused), else one this call gets, under the lock."""
        owner = uuid.uuid4().hex
        locked = False
        try:
            while self.redis is not None and not locked:
                locked = bool(self.redis.set(self.lock_key, owner, nx=True, px=LOCK_SECONDS * 1000))
                if not locked:
                    if time.monotonic() > ends:
                        raise ApiUnreachable(f"another process holds {self.provider}'s token "
                                             "refresh; try again shortly")
                    time.sleep(0.1)
            state = self._load()
            if self._usable(state) and state and state.get("access_token") != stale:
                self._state = state
                return str(state["access_token"])
            refresh_token = (str(state["refresh_token"]) if state and state.get("refresh_token")
                             else self.grant.refresh_token.reveal())
            fresh = self._grant(refresh_token, ends)
            self._store({
                "access_token": fresh["access_token"],
                "refresh_token": fresh.get("refresh_token") or refresh_token,
                "expires_at": time.time() + fresh["expires_in"],
                "origin": self.origin,
                "at": time.time(),
            })
            self.refreshes += 1
            log.info("refreshed %s's API access token (valid %d s)", self.provider,
                     fresh["expires_in"], extra={"provider": self.provider})
            return str(fresh["access_token"])
        finally:
            if locked and self.redis is not None:
                try:
                    self.redis.eval("if redis.call('get', KEYS[1]) == ARGV[1] then "
                                    "return redis.call('del', KEYS[1]) end return 0",
                                    1, self.lock_key, owner)
                except RedisError:
                    pass  # it expires by itself

    def _grant(self, refresh_token: str, ends: float) -> dict[str, Any]:
        """POST the refresh grant to the token endpoint; its tokens, checked."""
        grant = self.grant
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token,
                "client_id": grant.client_id, "client_secret": grant.client_secret.reveal()}
        if grant.redirect_uri:
            form["redirect_uri"] = grant.redirect_uri
        secrets = [grant.client_secret.reveal(), refresh_token, grant.refresh_token.reveal()]
        attempt = 0
        while True:
            attempt += 1
            try:
                answer = exchange("POST", grant.token_url,
                                  {"Content-Type": "application/x-www-form-urlencoded",
                                   "Accept": "application/json"},
                                  urlencode(form).encode(), ends)
            except (httpx.TransportError, TimeoutError) as exc:
                raise ApiUnreachable(f"{self.provider}'s token endpoint did not answer "
                                     f"({type(exc).__name__}): check {self.prefix}_OAUTH_TOKEN_URL "
                                     "and this host's network") from None
            if answer.status == 429 and attempt < 5:
                wait = retry_after(answer.headers) or 1.0
                if time.monotonic() + wait < ends:
                    time.sleep(wait)
                    continue
                raise RateLimited(f"{self.provider}'s token endpoint kept answering 429", 429)
            if answer.status in (400, 401, 403):
                raise CredentialsRefused(
                    f"{self.provider}'s token endpoint refused the refresh "
                    f"({answer.status}: {quote_answer(answer, secrets)}): authorize the app "
                    f"again and set {self.prefix}_OAUTH_REFRESH_TOKEN to the new refresh token",
                    answer.status)
            if answer.status != 200:
                raise ApiError(f"{self.provider}'s token endpoint answered {answer.status}: "
                               f"{quote_answer(answer, secrets)}", answer.status)
            try:
                doc = orjson.loads(answer.body)
            except orjson.JSONDecodeError:
                doc = None
            token = doc.get("access_token") if isinstance(doc, dict) else None
            if not isinstance(token, str) or not token:
                raise ApiError(f"{self.provider}'s token endpoint answered without an "
                               "access_token", answer.status)
            assert isinstance(doc, dict)
            expires = doc.get("expires_in")
            new_refresh = doc.get("refresh_token")
            return {"access_token": token,
                    "refresh_token": new_refresh if isinstance(new_refresh, str) else None,
                    "expires_in": int(expires) if isinstance(expires, (int, float))
                    and expires > 0 else DEFAULT_EXPIRES_IN}
