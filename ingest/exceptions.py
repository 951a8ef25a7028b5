"""Every exception webhook-ingest raises on purpose, and what each one means to the caller.

::

    IngestError
    ├── ConfigError            start-up refuses to run; the message names the variable
    ├── PluginError            a provider or sink plugin failed to load; names the plugin
    ├── StartupError           Redis or Postgres did not answer a starting process in time
    │                          (INGEST_STARTUP_WAIT), or refused it; says what to check
    ├── SignatureError         acceptor answers 401; nothing is enqueued
    ├── PayloadError           acceptor answers 400 (body is not a JSON object)
    ├── NormalizationError     worker: this one delivery fails alone (no dedup key could be
    │                          formed); it lands in the failed registry with the reason and
    │                          the rest of its batch is stored
    └── SinkError              raised by Sink.send
        ├── TransientSinkError retried with exponential backoff and jitter (network errors,
        │                      5xx, 408, 429, a database that is restarting)
        └── PermanentSinkError never retried: the job goes to the failed registry with the
                               reason, where `ingest dlq retry` can re-run it after a fix

Why a bad signature is 401 and not a dropped connection: every provider here treats any
answer as final, so the status code only matters to humans reading the provider's delivery
log; 401 tells them exactly what to fix. Dropping the connection is reserved for "we could
not make it durable", the one case where Outreach's retry is what we want.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "IngestError",
    "NormalizationError",
    "PayloadError",
    "PermanentSinkError",
    "PluginError",
    "SignatureError",
    "SinkError",
    "StartupError",
    "TransientSinkError",
]


class IngestError(Exception):
    """Base class of every error webhook-ingest raises on purpose."""


class ConfigError(IngestError):
    """A setting is missing or malformed. ``variable`` names it."""

    def __init__(self, variable: str, message: str) -> None:
        self.variable = variable
        super().__init__(f"{variable}: {message}")


class PluginError(IngestError):
    """A plugin (entry point) could not be loaded or does not satisfy its protocol."""

    def __init__(self, plugin: str, message: str) -> None:
        self.plugin = plugin
        super().__init__(f"plugin {plugin!r}: {message}")


class StartupError(IngestError):
    """A server a starting process needs did not answer in time, or refused it. The message
    names the server and the setting to check; the command exits with status 1."""


class SignatureError(IngestError):
    """The delivery's signature or token is missing or wrong (HTTP 401).

    ``reason`` says which, for the refusal counts operators read: ``signature`` (an HMAC that
    matches no secret), ``token`` (a token that matches none) or ``missing_credential``.
    """

    REASONS = ("signature", "token", "missing_credential")

    def __init__(self, message: str, reason: str = "signature") -> None:
        if reason not in self.REASONS:
            raise ValueError(f"SignatureError reason {reason!r} is not one of {self.REASONS}")
        self.reason = reason
        super().__init__(message)


class PayloadError(IngestError):
    """The body is not a JSON object (HTTP 400)."""


class NormalizationError(IngestError):
    """No dedup key can be formed from this delivery; it fails alone, with this reason."""


class SinkError(IngestError):
    """A sink could not deliver. Subclasses say whether retrying can help."""


class TransientSinkError(SinkError):
    """Retrying later may succeed. ``retry_after`` (seconds) is the receiver's own hint."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class PermanentSinkError(SinkError):
    """Retrying cannot succeed until someone fixes something (a 4xx answer, bad data).

    ``event_ids`` names the events that failed when only some of a batch did; the others are
    taken as delivered. Without it, the whole batch failed.
    """

    def __init__(self, message: str, event_ids: list[str] | None = None) -> None:
        self.event_ids = event_ids
        super().__init__(message)
