"""OAuth access to the providers' APIs: refreshed when refused, kept sealed in Redis across
restarts (Salesloft revokes a refresh token once used), never printed."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from redis import Redis

from ingest.config import Settings
from ingest.subscriptions.tokens import seal, unseal
from tests.helpers import redis_values
from tests.subscriptions.fake_apis import FakeOutreach, FakeSalesloft

Run = Callable[..., tuple[int, str, str]]


def _oauth_env(sub_env: Callable[..., dict[str, str]], prefix: str, base: str,
               refresh_token: str, client_id: str, client_secret: str) -> dict[str, str]:
    static = {"OUTREACH": "OUTREACH_API_TOKEN", "SALESLOFT": "SALESLOFT_API_KEY"}
    other = "SALESLOFT" if prefix == "OUTREACH" else "OUTREACH"
    return sub_env(**{static[prefix]: "", static[other]: "",
                      f"{prefix}_OAUTH_CLIENT_ID": client_id,
                      f"{prefix}_OAUTH_CLIENT_SECRET": client_secret,
                      f"{prefix}_OAUTH_REFRESH_TOKEN": refresh_token,
                      f"{prefix}_OAUTH_TOKEN_URL": f"{base}/oauth/token"})


def test_salesloft_rotating_refresh_tokens_survive_a_restart_sealed_in_redis(
        run: Run, sub_env: Callable[..., dict[str, str]],
        salesloft_api: tuple[FakeSalesloft, str], redis_server: str, namespace: str) -> None:
    fake, base = salesloft_api
    first = fake.tokens.new_refresh_token()
    t = fake.tokens
    env = _oauth_env(sub_env, "SALESLOFT", base, first, t.client_id, t.client_secret)

    code, out, err = run(env, "subscriptions", "apply", "--yes")
    assert code == 0, out + err
    assert t.grants == 1 and first not in t.refresh_tokens  # spent, and revoked
    # Each run is a new process's worth of objects: the stored access token is reused.
    assert run(env, "subscriptions", "plan")[0] == 0
    assert t.grants == 1

    # Every access token expires: the API answers 401, the newest refresh token (kept in
    # Redis, not the configured one, which is revoked) gets a new one, the call is repeated.
    t.expire_all()
    code, out, err = run(env, "subscriptions", "plan")
    assert code == 0, out + err
    assert t.grants == 2

    # Nothing readable in Redis, in any output, in any key.
    issued = [*t.access_tokens, *t.refresh_tokens, first]
    redis = Redis.from_url(redis_server)
    try:
        for key, values in redis_values(redis, namespace):
            for value in values:
                assert not any(token.encode() in value for token in issued), key
    finally:
        redis.close()
    for text in (out, err):
        assert not any(token in text for token in issued)


def test_outreach_oauth_refresh_and_a_reauthorized_grant(
        run: Run, sub_env: Callable[..., dict[str, str]], outreach_api: FakeOutreach) -> None:
    t = outreach_api.tokens
    granted = t.new_refresh_token()
    env = _oauth_env(sub_env, "OUTREACH", outreach_api.base, granted, t.client_id,
                     t.client_secret)
    assert run(env, "subscriptions", "plan")[0] == 1  # nothing subscribed yet
    assert t.grants == 1
    tokens_used = {token for _, path, token in outreach_api.requests if path != "/oauth/token"}
    assert tokens_used and tokens_used <= set(t.access_tokens)

    # An operator authorizes again (a new refresh token): the new grant is used, not the
    # chain stored from the old one.
    again = t.new_refresh_token()
    t.refresh_tokens.discard(granted)
    assert run(dict(env, OUTREACH_OAUTH_REFRESH_TOKEN=again), "subscriptions", "plan")[0] == 1
    assert t.grants == 2

    # A refresh token the provider refuses: one line, status 2, what to do.
    t.refresh_tokens.clear()
    t.expire_all()
    code, out, err = run(dict(env, OUTREACH_OAUTH_REFRESH_TOKEN=again), "subscriptions", "plan")
    assert code == 2
    assert "invalid_grant" in out and "OUTREACH_OAUTH_REFRESH_TOKEN" in out
    assert again not in out + err and t.client_secret not in out + err


def test_sealed_state_opens_only_with_its_keys_and_unchanged() -> None:
    sealed = seal(b'{"access_token": "at-1"}', "client-secret-1", "outreach")
    assert b"at-1" not in sealed
    assert unseal(sealed, "client-secret-1", "outreach") == b'{"access_token": "at-1"}'
    assert unseal(sealed, "client-secret-2", "outreach") is None
    assert unseal(sealed, "client-secret-1", "salesloft") is None
    tampered = sealed[:-40] + bytes([sealed[-40] ^ 1]) + sealed[-39:]
    assert unseal(tampered, "client-secret-1", "outreach") is None
    assert seal(b"same", "k", "p") != seal(b"same", "k", "p")  # a fresh nonce each time


@pytest.mark.parametrize("given", [
    {"OUTREACH_OAUTH_CLIENT_ID": "app"},
    {"OUTREACH_OAUTH_CLIENT_ID": "app", "OUTREACH_OAUTH_CLIENT_SECRET": "s" * 20},
])
def test_an_incomplete_grant_names_what_is_missing(
        make_env: Callable[..., dict[str, str]], given: dict[str, str]) -> None:
    from ingest.exceptions import ConfigError
    from ingest.subscriptions.outreach import OutreachSubscriptions

    settings = Settings.from_env(make_env(**given))
    with pytest.raises(ConfigError) as caught:
        OutreachSubscriptions.from_settings(settings, None)
    assert caught.value.variable.startswith("OUTREACH_OAUTH_")
    assert caught.value.variable not in given
