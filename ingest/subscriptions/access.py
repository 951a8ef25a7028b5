"""The settings of ``ingest subscriptions`` and the workers' subscription check: read from
:class:`ingest.config.Settings` (never from the environment directly), validated here, every
credential wrapped in :class:`ingest.config.Secret` so it never prints.

- ``INGEST_PUBLIC_URL``: where providers reach this deployment; each subscription points at
  ``<INGEST_PUBLIC_URL>/webhooks/<provider>``.
- ``INGEST_SUBSCRIPTIONS_CHECK_EVERY``: how often a worker checks the subscriptions (``15m``
  by default; ``off``).
- ``<P>_API_URL``: the provider's API (its public one by default; tests point it at a fake).
- ``OUTREACH_API_TOKEN``, ``SALESLOFT_API_KEY``: a bearer token or key, used as it is.
- ``<P>_OAUTH_CLIENT_ID``, ``<P>_OAUTH_CLIENT_SECRET``, ``<P>_OAUTH_REFRESH_TOKEN`` (and
  ``<P>_OAUTH_TOKEN_URL``, ``OUTREACH_OAUTH_REDIRECT_URI``): an OAuth app and the refresh token
  of its grant; access tokens are refreshed as they expire (ingest.subscriptions.tokens).
- ``<P>_SUBSCRIPTION_EVENTS``: globs of the provider's event names to subscribe to;
  ``!glob`` leaves some out.

``<P>`` is the provider's setting prefix (``OUTREACH``, ``SALESLOFT``). A provider with neither
a token nor a complete OAuth grant has no API access: ``plan`` says so and the check skips it.
A malformed value raises :class:`ConfigError` naming the variable (exit status 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from ingest.config import Secret, Settings, parse_http_url, parse_list
from ingest.exceptions import ConfigError

__all__ = ["ApiAccess", "ApiDefaults", "OAuthGrant", "api_access", "check_every",
           "public_url", "require_public_url", "select_topics", "webhook_url"]

# How often workers check the subscriptions unless INGEST_SUBSCRIPTIONS_CHECK_EVERY says.
DEFAULT_CHECK_EVERY = 15 * 60
# Shortest check interval accepted: each check costs API calls against the provider's limit.
MIN_CHECK_EVERY = 60
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class ApiDefaults:
    """What a provider's adapter says about its API: the setting prefix, the public API and
    token endpoint, the name of its static-token setting, and whether its token endpoint
    wants ``redirect_uri`` on a refresh."""

    prefix: str
    api_url: str
    token_url: str
    static_setting: str
    redirect_uri: bool = False


@dataclass(frozen=True)
class OAuthGrant:
    """An OAuth app and the refresh token of the grant a user (an admin) gave it."""

    token_url: str
    client_id: str
    client_secret: Secret
    refresh_token: Secret
    redirect_uri: str | None = None


@dataclass(frozen=True)
class ApiAccess:
    """How to reach one provider's API: its base URL and one of a static token or a grant."""

    provider: str
    api_url: str
    token: Secret | None = None
    oauth: OAuthGrant | None = None
    events: tuple[str, ...] = ("*",)

    def credentials(self) -> list[str]:
        """Every credential value, to mask wherever the API's own text is shown."""
        out = [self.token.reveal()] if self.token is not None else []
        if self.oauth is not None:
            out += [self.oauth.client_secret.reveal(), self.oauth.refresh_token.reveal()]
        return out


def _url(variable: str, value: str) -> str:
    """``value`` when it is an http(s) base URL with a host (trailing slash removed); else a
    ConfigError that does not repeat the value."""
    return parse_http_url(variable, value, plain=True)


def public_url(settings: Settings) -> str | None:
    """``INGEST_PUBLIC_URL``, validated, without a trailing slash; None when unset."""
    value = settings.raw.get("INGEST_PUBLIC_URL") or ""
    return _url("INGEST_PUBLIC_URL", value.strip()) if value.strip() else None


def require_public_url(settings: Settings) -> str:
    found = public_url(settings)
    if found is None:
        raise ConfigError("INGEST_PUBLIC_URL", "is not set: the base URL providers reach this "
                                               "deployment at, e.g. https://hooks.example.com")
    return found


def webhook_url(public: str, provider: str) -> str:
    """The URL a provider's subscriptions point at."""
    return f"{public}/webhooks/{provider}"


def check_every(settings: Settings) -> float | None:
    """Seconds between two subscription checks (``INGEST_SUBSCRIPTIONS_CHECK_EVERY``); None
    when ``off``."""
    name = "INGEST_SUBSCRIPTIONS_CHECK_EVERY"
    raw = (settings.raw.get(name) or "").strip()
    if not raw:
        return float(DEFAULT_CHECK_EVERY)
    if raw.lower() == "off":
        return None
    unit = _UNITS.get(raw[-1:].lower())
    number = raw[:-1] if unit else raw
    if not number.replace(".", "", 1).isdigit():
        raise ConfigError(name, f"{raw!r} is not a duration (e.g. 15m, 1h, 900) or off")
    seconds = float(number) * (unit or 1)
    if seconds < MIN_CHECK_EVERY:
        raise ConfigError(name, f"must be at least {MIN_CHECK_EVERY} s, got {raw!r}")
    return seconds


def api_access(settings: Settings, provider: str, defaults: ApiDefaults) -> ApiAccess | None:
    """The provider's API access as configured, or None when it has none."""
    prefix = defaults.prefix
    own = settings.section(prefix)

    def get(suffix: str) -> str | None:
        value = own.get(suffix, "").strip()
        return value or None

    token = get(defaults.static_setting)
    oauth_names = ("OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "OAUTH_REFRESH_TOKEN")
    oauth_values = {n: get(n) for n in oauth_names}
    given = [n for n, v in oauth_values.items() if v]
    if token and given:
        raise ConfigError(f"{prefix}_{defaults.static_setting}",
                          f"set either it or {prefix}_OAUTH_*, not both")
    if given and len(given) < len(oauth_names):
        missing = next(n for n in oauth_names if n not in given)
        raise ConfigError(f"{prefix}_{missing}",
                          f"is not set, but {prefix}_{given[0]} is: an OAuth grant needs "
                          f"{', '.join(prefix + '_' + n for n in oauth_names)}")
    if not token and not given:
        return None
    api_url = _url(f"{prefix}_API_URL", get("API_URL") or defaults.api_url)
    oauth = None
    if given:
        redirect = get("OAUTH_REDIRECT_URI") if defaults.redirect_uri else None
        oauth = OAuthGrant(
            token_url=_url(f"{prefix}_OAUTH_TOKEN_URL",
                           get("OAUTH_TOKEN_URL") or defaults.token_url),
            client_id=str(oauth_values["OAUTH_CLIENT_ID"]),
            client_secret=Secret(str(oauth_values["OAUTH_CLIENT_SECRET"])),
            refresh_token=Secret(str(oauth_values["OAUTH_REFRESH_TOKEN"])),
            redirect_uri=redirect)
    events = parse_list(get("SUBSCRIPTION_EVENTS")) or ("*",)
    if all(glob.startswith("!") for glob in events):
        events = ("*", *events)
    return ApiAccess(provider=provider, api_url=api_url,
                     token=Secret(token) if token else None, oauth=oauth, events=events)


def select_topics(topics: list[str], globs: tuple[str, ...]) -> list[str]:
    """The topics some glob includes and no ``!glob`` leaves out."""
    include = [g for g in globs if not g.startswith("!")]
    exclude = [g[1:] for g in globs if g.startswith("!")]
    return [t for t in topics if any(fnmatchcase(t, g) for g in include)
            and not any(fnmatchcase(t, g) for g in exclude)]
