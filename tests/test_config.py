"""Configuration is read once, validated, and never prints a secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from ingest.config import Secret, Settings
from ingest.exceptions import ConfigError


def test_secret_lists_are_comma_separated_for_rotation() -> None:
    settings = Settings.from_env({"OUTREACH_WEBHOOK_SECRETS": " old-secret-0000001 , new-secret-0000002 ,"})
    assert settings.secrets_for("outreach") == ("old-secret-0000001", "new-secret-0000002")
    assert settings.secrets_for("outcaller") == ()  # not configured: disabled


def test_secrets_never_print() -> None:
    settings = Settings.from_env({"OUTREACH_WEBHOOK_SECRETS": "very-secret-value"})
    assert "very-secret-value" not in repr(settings)
    assert "very-secret-value" not in str(settings.provider_secrets)
    assert "very-secret-value" not in f"{Secret('very-secret-value')}"


@pytest.mark.parametrize(("env", "variable"), [
    ({"INGEST_MAX_BODY_BYTES": "lots"}, "INGEST_MAX_BODY_BYTES"),
    ({"INGEST_MAX_BODY_BYTES": "0"}, "INGEST_MAX_BODY_BYTES"),
    ({"INGEST_DEDUP_TTL": "5"}, "INGEST_DEDUP_TTL"),
    ({"INGEST_BODY_TIMEOUT": "-1"}, "INGEST_BODY_TIMEOUT"),
    ({"INGEST_HEAD_TIMEOUT": "0"}, "INGEST_HEAD_TIMEOUT"),
    ({"INGEST_MAX_CONNECTIONS": "8"}, "INGEST_MAX_CONNECTIONS"),
    ({"INGEST_STARTUP_WAIT": "soon"}, "INGEST_STARTUP_WAIT"),
    ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
    ({"REDIS_URL": "redis+sentinel://s1:26379,s2:26379"}, "REDIS_URL"),  # no service
    ({"REDIS_URL": "redis+sentinel://s1:port/mymaster/0"}, "REDIS_URL"),
    ({"REDIS_URL": "redis+sentinel://s1:26379/mymaster/zero"}, "REDIS_URL"),
    ({"INGEST_REDIS_MIN_REPLICAS": "-1"}, "INGEST_REDIS_MIN_REPLICAS"),
    ({"INGEST_REDIS_WAIT_MS": "0"}, "INGEST_REDIS_WAIT_MS"),
    ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
    ({"INGEST_NAMESPACE": "has space"}, "INGEST_NAMESPACE"),
    ({"INGEST_SINKS": "postgres,postgres"}, "INGEST_SINKS"),
    ({"INGEST_LOG_FORMAT": "xml"}, "INGEST_LOG_FORMAT"),
    ({"INGEST_CONFIG": "/nonexistent/ingest.toml"}, "INGEST_CONFIG"),
])
def test_a_malformed_setting_names_its_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert info.value.variable == variable
    assert str(info.value).startswith(variable)


def test_toml_file_with_environment_winning(tmp_path: Path) -> None:
    path = tmp_path / "ingest.toml"
    path.write_text(
        'REDIS_URL = "redis://from-file:6379/0"\n'
        'INGEST_MAX_BODY_BYTES = 2048\n'
        '[sinks.crm]\nwebhook_url = "http://crm.local/hook"\nevents = "email.*"\n'
    )
    settings = Settings.from_env({"INGEST_CONFIG": str(path),
                                  "REDIS_URL": "redis://from-env:6379/0",
                                  "CRM_EVENTS": "meeting.*"})
    assert settings.redis_url == "redis://from-env:6379/0"
    assert settings.max_body_bytes == 2048
    assert settings.section("crm") == {"WEBHOOK_URL": "http://crm.local/hook", "EVENTS": "meeting.*"}


def test_broken_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("REDIS_URL = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Settings.from_env({"INGEST_CONFIG": str(path)})


def test_unknown_sink_fails_naming_what_is_installed() -> None:
    from sinks.registry import build_sinks

    settings = Settings.from_env({"INGEST_SINKS": "postgres,nosuch",
                                  "DATABASE_URL": "postgresql://x@127.0.0.1/db"})
    with pytest.raises(ConfigError, match="no sink named 'nosuch'.*installed: .*postgres"):
        build_sinks(settings)


def test_postgres_sink_requires_database_url() -> None:
    from sinks.registry import build_sinks

    with pytest.raises(ConfigError) as info:
        build_sinks(Settings.from_env({"INGEST_SINKS": "postgres"}))
    assert info.value.variable == "DATABASE_URL"


def test_a_short_secret_stops_start_up_naming_its_variable() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"OUTREACH_WEBHOOK_SECRETS": "long-enough-secret-01,short-1"})
    assert "OUTREACH_WEBHOOK_SECRETS" in str(info.value) and "16" in str(info.value)
    assert "short-1" not in str(info.value)


def test_a_sentinel_url_names_its_sentinels_service_db_and_credentials() -> None:
    from ingest.redis_conn import parse_sentinel_url
    from ingest.startup import server_address

    url = ("redis+sentinel://ingest:pa%40ss@s1:26379,s2,[::1]:26380/mymaster/3"
           "?sentinel_password=sp&ssl_ca_certs=/ca.pem")
    settings = Settings.from_env({"REDIS_URL": url, "INGEST_REDIS_MIN_REPLICAS": "1"})
    assert settings.redis_min_replicas == 1 and settings.redis_wait_ms == 200
    target = parse_sentinel_url(url)
    assert target.sentinels == [("s1", 26379), ("s2", 26379), ("::1", 26380)]
    assert target.service == "mymaster"
    assert target.options["db"] == 3 and target.options["username"] == "ingest"
    assert target.options["password"] == "pa@ss" and target.options["ssl_ca_certs"] == "/ca.pem"
    assert target.sentinel_options == {"password": "sp"}
    assert server_address(url) == "s1:26379,s2,[::1]:26380"  # never the credentials


def test_a_bad_sentinel_url_never_echoes_its_password() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"REDIS_URL": "redis+sentinel://:hunter2-secret@s1:x/svc"})
    assert "hunter2-secret" not in str(info.value)
