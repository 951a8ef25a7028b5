"""Configuration: read once at start-up, cast and validated here, and nowhere else.

Sources, strongest first: the process environment, then the TOML file named by
``INGEST_CONFIG``. Top-level TOML keys are the environment variable names; a sink plugin's
settings may also live in a ``[sinks.<name>]`` table. A malformed value stops start-up with a
:class:`ConfigError` naming the variable: the service never runs half-configured.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ingest import constants
from ingest.exceptions import ConfigError

__all__ = ["Secret", "Settings", "parse_bool", "parse_http_url", "parse_list",
           "parse_silence_after"]


class Secret:
    """A secret value that never prints: ``repr``, ``str`` and f-strings show a mask."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def masked(self) -> str:
        return f"****({len(self._value)} chars)"

    def __repr__(self) -> str:
        return f"Secret({self.masked()!r})"

    __str__ = masked

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def parse_list(raw: str | None) -> tuple[str, ...]:
    """A comma-separated setting as a tuple, blanks dropped."""
    if not raw:
        return ()
    return tuple(item.strip() for item in raw.split(",") if item.strip())


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_bool(raw: str | None, variable: str, default: bool) -> bool:
    """A yes/no setting (true/false, yes/no, on/off, 1/0, any case); unset is ``default``."""
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(variable, f"must be true or false, got {raw!r}")


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_silence_after(raw: str | None) -> dict[str, float | None]:
    """``INGEST_SILENCE_AFTER`` (``outreach=6h,salesloft=6h,*=24h``) as seconds per provider;
    ``*`` is every other provider (24 h unless given), and ``off`` (None) stops watching."""
    if raw is None:
        return {"*": float(constants.DEFAULT_SILENCE_AFTER)}
    out: dict[str, float | None] = {}
    for item in parse_list(raw):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name or not value:
            raise ConfigError("INGEST_SILENCE_AFTER",
                              f"{item!r} is not provider=duration (e.g. outreach=6h,*=24h)")
        if name in out:
            raise ConfigError("INGEST_SILENCE_AFTER", f"names {name!r} twice")
        if value.lower() == "off":
            out[name] = None
            continue
        unit = _DURATION_UNITS.get(value[-1:].lower())
        number = value[:-1]
        if unit is None or not number.replace(".", "", 1).isdigit() or float(number) <= 0:
            raise ConfigError("INGEST_SILENCE_AFTER",
                              f"{value!r} for {name!r} is not a positive duration with a unit "
                              "s, m, h or d (e.g. 90m), or off")
        out[name] = float(number) * unit
    out.setdefault("*", float(constants.DEFAULT_SILENCE_AFTER))
    return out


def parse_http_url(variable: str, value: str | None, *, plain: bool = False) -> str:
    """``value`` when it is a usable http(s) URL with a host, else a :class:`ConfigError`
    naming ``variable`` (the message never repeats the value: it may hold a secret).
    ``plain``: also refuse a query string or fragment, and drop a trailing slash (a base URL
    that paths are appended to)."""
    if not value:
        raise ConfigError(variable, "is not set")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        raise ConfigError(variable, "is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(variable, "must be an http:// or https:// URL with a host")
    if not plain:
        return value
    if parts.query or parts.fragment:
        raise ConfigError(variable, "must not have a query string or fragment")
    return value.rstrip("/")


def _load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("INGEST_CONFIG", f"file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("INGEST_CONFIG", f"{path} is not valid TOML: {exc}") from None


def _days(integer: Any, get: Any, name: str) -> int | None:
    """A retention in whole days (at least 1); unset keeps forever."""
    return integer(name, 0, minimum=1) if get(name) is not None else None


@dataclass(frozen=True)
class Settings:
    """Every setting the product reads. Build it with :meth:`from_env`."""

    redis_url: str | None = None
    # Replicas that must acknowledge every write a 200 or a finished job stands on (WAIT),
    # and how long to wait for them (INGEST_REDIS_MIN_REPLICAS, INGEST_REDIS_WAIT_MS).
    redis_min_replicas: int = 0
    redis_wait_ms: int = constants.DEFAULT_REDIS_WAIT_MS
    database_url: str | None = None
    namespace: str = ""
    provider_secrets: Mapping[str, tuple[Secret, ...]] = field(default_factory=dict)
    sinks: tuple[str, ...] = ("postgres",)
    max_body_bytes: int = constants.DEFAULT_MAX_BODY_BYTES
    body_timeout: float = constants.DEFAULT_BODY_TIMEOUT
    head_timeout: float = constants.DEFAULT_HEAD_TIMEOUT
    max_connections: int = constants.DEFAULT_MAX_CONNECTIONS
    spool_dir: Path = Path(constants.DEFAULT_SPOOL_DIR)
    dedup_ttl: int = constants.DEFAULT_DEDUP_TTL
    abandoned_after: int = constants.DEFAULT_ABANDONED_AFTER
    startup_wait: float = constants.DEFAULT_STARTUP_WAIT
    log_format: str = "json"
    # Days kept, by received_at, of webhook_deliveries and of webhook_events; None: forever.
    retention_days: int | None = None
    events_retention_days: int | None = None
    # Whether workers keep what each sink did with each event (webhook_sink_outcomes; needs
    # DATABASE_URL). INGEST_SINK_OUTCOMES, on unless set to a false value.
    sink_outcomes: bool = True
    # Seconds without an accepted delivery after which a provider counts as silent, by
    # provider name or "*"; None: not watched (INGEST_SILENCE_AFTER).
    silence_after: Mapping[str, float | None] = field(
        default_factory=lambda: {"*": float(constants.DEFAULT_SILENCE_AFTER)})
    # `ingest console`: where it listens, and the token people and API clients present
    # (INGEST_CONSOLE_HOST, INGEST_CONSOLE_PORT, INGEST_CONSOLE_TOKEN); None: no token, which
    # `ingest console` accepts only on a loopback address.
    console_host: str = constants.DEFAULT_CONSOLE_HOST
    console_port: int = constants.DEFAULT_CONSOLE_PORT
    console_token: Secret | None = None
    # Every raw value, for sink plugins that read their own prefix (see section()).
    raw: Mapping[str, str] = field(default_factory=dict, repr=False)
    sink_tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        file_values: dict[str, Any] = {}
        if env.get("INGEST_CONFIG"):
            file_values = _load_toml(env["INGEST_CONFIG"])
        sink_tables = file_values.pop("sinks", {}) if isinstance(file_values.get("sinks"), dict) else {}
        raw: dict[str, str] = {k.upper(): str(v) for k, v in file_values.items()}
        raw.update(env)  # the environment wins

        def get(name: str) -> str | None:
            value = raw.get(name)
            return value if value not in (None, "") else None

        def integer(name: str, default: int, minimum: int = 1) -> int:
            value = get(name)
            if value is None:
                return default
            try:
                out = int(value)
            except ValueError:
                raise ConfigError(name, f"must be a whole number, got {value!r}") from None
            if out < minimum:
                raise ConfigError(name, f"must be at least {minimum}, got {out}")
            return out

        def number(name: str, default: float) -> float:
            value = get(name)
            if value is None:
                return default
            try:
                out = float(value)
            except ValueError:
                raise ConfigError(name, f"must be a number of seconds, got {value!r}") from None
            if out <= 0:
                raise ConfigError(name, f"must be positive, got {out}")
            return out

        from ingest.redis_conn import SENTINEL_SCHEME, parse_sentinel_url

        for name in ("REDIS_URL", "DATABASE_URL"):
            value = get(name)
            schemes = ("redis://", "rediss://", "unix://", SENTINEL_SCHEME) \
                if name == "REDIS_URL" else ("postgresql://", "postgres://")
            if value is not None and not value.startswith(schemes):
                raise ConfigError(name, f"must start with one of {', '.join(schemes)}")
            if value is not None and value.startswith(SENTINEL_SCHEME):
                try:
                    parse_sentinel_url(value)
                except ValueError as exc:
                    raise ConfigError(name, f"{exc} (form: {SENTINEL_SCHEME}[[user]:password@]"
                                            "host:port[,host:port...]/service/db)") from None

        namespace = get("INGEST_NAMESPACE") or ""
        if not constants.NAMESPACE_PATTERN.fullmatch(namespace):
            raise ConfigError("INGEST_NAMESPACE", "may hold only letters, digits, _ and - (40 max)")

        from ingest.providers import load_providers  # plugins may read nothing else at import

        secrets: dict[str, tuple[Secret, ...]] = {}
        for pname, provider in load_providers().items():
            values = parse_list(get(provider.secret_setting))
            for value in values:
                if len(value) < constants.MIN_SECRET_CHARS:
                    # A short secret is guessable and too short to be masked in logs.
                    raise ConfigError(provider.secret_setting,
                                      f"each secret must be at least {constants.MIN_SECRET_CHARS}"
                                      f" characters long; one has {len(value)}")
            if values:
                secrets[pname] = tuple(Secret(v) for v in values)

        sinks = parse_list(get("INGEST_SINKS")) if get("INGEST_SINKS") is not None else ("postgres",)
        for sink in sinks:
            if not sink.replace("_", "").replace("-", "").isalnum():
                raise ConfigError("INGEST_SINKS", f"{sink!r} is not a sink name")
        if len(set(sinks)) != len(sinks):
            raise ConfigError("INGEST_SINKS", "names a sink twice")

        log_format = (get("INGEST_LOG_FORMAT") or "json").lower()
        if log_format not in ("json", "text"):
            raise ConfigError("INGEST_LOG_FORMAT", "must be json or text")

        silence_after = parse_silence_after(get("INGEST_SILENCE_AFTER"))
        known = set(load_providers())
        for sname in silence_after:
            if sname != "*" and sname not in known:
                raise ConfigError("INGEST_SILENCE_AFTER",
                                  f"no provider {sname!r} (have: {', '.join(sorted(known))})")

        console_token = get("INGEST_CONSOLE_TOKEN")
        if console_token is not None and len(console_token) < constants.MIN_SECRET_CHARS:
            raise ConfigError("INGEST_CONSOLE_TOKEN",
                              f"must be at least {constants.MIN_SECRET_CHARS} characters long; "
                              f"it has {len(console_token)}")
        console_port = integer("INGEST_CONSOLE_PORT", constants.DEFAULT_CONSOLE_PORT)
        if console_port > 65535:
            raise ConfigError("INGEST_CONSOLE_PORT", f"must be a port (1 to 65535), got {console_port}")

        return cls(
            redis_url=get("REDIS_URL"),
            redis_min_replicas=integer("INGEST_REDIS_MIN_REPLICAS", 0, minimum=0),
            redis_wait_ms=integer("INGEST_REDIS_WAIT_MS", constants.DEFAULT_REDIS_WAIT_MS,
                                  minimum=1),
            database_url=get("DATABASE_URL"),
            namespace=namespace,
            provider_secrets=secrets,
            sinks=sinks,
            max_body_bytes=integer("INGEST_MAX_BODY_BYTES", constants.DEFAULT_MAX_BODY_BYTES),
            body_timeout=number("INGEST_BODY_TIMEOUT", constants.DEFAULT_BODY_TIMEOUT),
            head_timeout=number("INGEST_HEAD_TIMEOUT", constants.DEFAULT_HEAD_TIMEOUT),
            max_connections=integer("INGEST_MAX_CONNECTIONS", constants.DEFAULT_MAX_CONNECTIONS,
                                    minimum=16),
            spool_dir=Path(get("INGEST_SPOOL_DIR") or constants.DEFAULT_SPOOL_DIR),
            dedup_ttl=integer("INGEST_DEDUP_TTL", constants.DEFAULT_DEDUP_TTL, minimum=60),
            abandoned_after=integer("INGEST_ABANDONED_AFTER",
                                    constants.DEFAULT_ABANDONED_AFTER, minimum=3),
            startup_wait=number("INGEST_STARTUP_WAIT", constants.DEFAULT_STARTUP_WAIT),
            log_format=log_format,
            retention_days=_days(integer, get, "INGEST_RETENTION_DAYS"),
            events_retention_days=_days(integer, get, "INGEST_EVENTS_RETENTION_DAYS"),
            sink_outcomes=parse_bool(get("INGEST_SINK_OUTCOMES"), "INGEST_SINK_OUTCOMES", True),
            silence_after=silence_after,
            console_host=get("INGEST_CONSOLE_HOST") or constants.DEFAULT_CONSOLE_HOST,
            console_port=console_port,
            console_token=Secret(console_token) if console_token is not None else None,
            raw=raw,
            sink_tables={str(k): v for k, v in sink_tables.items() if isinstance(v, dict)},
        )

    # -- derived ---------------------------------------------------------------------------

    @property
    def names(self) -> constants.Names:
        return constants.Names(self.namespace)

    def secrets_for(self, provider: str) -> tuple[str, ...]:
        return tuple(s.reveal() for s in self.provider_secrets.get(provider, ()))

    def silence_threshold(self, provider: str) -> float | None:
        """Seconds of no accepted delivery after which ``provider`` is silent; None: never."""
        if provider in self.silence_after:
            return self.silence_after[provider]
        return self.silence_after.get("*")

    def require_redis(self) -> str:
        if not self.redis_url:
            raise ConfigError("REDIS_URL", "is not set (or run `ingest dev` for an embedded one)")
        return self.redis_url

    def require_database(self) -> str:
        if not self.database_url:
            raise ConfigError("DATABASE_URL", "is not set (or run `ingest dev` for an embedded one)")
        return self.database_url

    def section(self, prefix: str) -> dict[str, str]:
        """A sink plugin's own settings: ``<PREFIX>_*`` variables with the prefix removed,
        over the ``[sinks.<prefix lower>]`` TOML table. ``section("CRM")["WEBHOOK_URL"]``."""
        prefix = prefix.upper().replace("-", "_")
        table = self.sink_tables.get(prefix.lower(), {})
        out = {str(k).upper(): str(v) for k, v in table.items()}
        start = prefix + "_"
        for key, value in self.raw.items():
            if key.startswith(start) and value != "":
                out[key[len(start):]] = value
        return out
