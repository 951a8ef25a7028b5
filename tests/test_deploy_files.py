"""docker-compose.yml, the Procfile, .env.example and the Dockerfile: parsed and checked.

No Docker engine runs here, so these files are kept correct by reading them: every command
they run is parsed by the real ``ingest`` argument parser, the Procfile and docker-compose run
the same commands, and the production settings that guard deliveries (Redis persistence and
no eviction, a readiness healthcheck, scalable workers) are where they must be.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import yaml

from ingest.commands.cli import _parser, _queue_name
from ingest.config import Settings
from ingest.constants import JOB_TIMEOUT, SINK_ENTRY_POINT_GROUP
from ingest.exceptions import ConfigError
from ingest.providers import load_providers

ROOT = Path(__file__).resolve().parents[1]
# ${NAME}, ${NAME:-default}, ${NAME:?message} or $NAME, as compose and sh read them.
_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}?")


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


# The one image every app service runs (its entrypoint is `ingest`).
APP_IMAGE = "webhook-ingest:local"


def app_services() -> dict[str, dict[str, Any]]:
    """Services running our image."""
    return {name: s for name, s in services().items() if s.get("image") == APP_IMAGE}


def seconds(duration: str | int | float) -> float:
    """A compose duration ("315s", "1m30s", "2h", or a number of seconds) in seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    unit = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 0.000001}
    return sum(float(n) * unit[u] for n, u in parts)


def procfile() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_-]+):\s*(.+)", line.strip())
        if match:
            assert match.group(1) not in out, f"Procfile names {match.group(1)} twice"
            out[match.group(1)] = match.group(2)
    return out


def expand(command: str, env: dict[str, str]) -> list[str]:
    """A Procfile command as the platform's shell would run it, split into words."""
    def value(m: re.Match[str]) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        if name in env:
            return env[name]
        if op == ":-":
            return default
        raise AssertionError(f"Procfile uses ${name}, which no platform sets")
    return shlex.split(_VARIABLE.sub(value, command))


def procfile_commands() -> dict[str, list[str]]:
    """Each Procfile line as `ingest` arguments, with $PORT as docker-compose publishes it."""
    out = {}
    for name, command in procfile().items():
        words = expand(command, {"PORT": "8000"})
        assert words[0] == "ingest", f"Procfile {name}: runs {words[0]!r}, not ingest"
        out[name] = words[1:]
    return out


def parse(args: list[str], where: str) -> argparse.Namespace:
    try:
        return _parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: `ingest {' '.join(args)}` is not a valid ingest command")


def builtin_sinks() -> set[str]:
    """Sinks shipped in this distribution (the sinks package), registered as entry points."""
    return {ep.name for ep in entry_points(group=SINK_ENTRY_POINT_GROUP)
            if ep.value.startswith("sinks.")}


def queues_of(args: argparse.Namespace) -> list[str]:
    return list(args.queue or [])


def env_example_names() -> dict[str, str]:
    """Every NAME in .env.example, set (NAME=value) or shown commented (# NAME=default)."""
    out = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            out[match.group(1)] = match.group(2) if not line.startswith("#") else ""
    return out


# -- commands ---------------------------------------------------------------------------------


def test_every_command_is_a_real_ingest_command_with_valid_arguments() -> None:
    valid_queues = {"ingest"} | {f"sink-{name}" for name in builtin_sinks()}
    commands = {f"docker-compose service {name}": s["command"] for name, s in
                app_services().items()}
    commands.update({f"Procfile {name}": args for name, args in procfile_commands().items()})
    assert commands
    for where, args in commands.items():
        assert isinstance(args, list) and all(isinstance(a, str) for a in args), where
        parsed = parse(args, where)
        if parsed.command == "worker":
            assert queues_of(parsed), f"{where}: a deployed worker names its queue"
            for queue in queues_of(parsed):
                assert queue in valid_queues, f"{where}: no queue {queue!r}"
            assert not parsed.burst, f"{where}: a deployed worker must not exit when idle"


def test_procfile_and_compose_run_the_same_commands() -> None:
    compose_commands = sorted(tuple(s["command"]) for name, s in app_services().items()
                              if name != "migrate")
    assert compose_commands == sorted(tuple(a) for a in procfile_commands().values())
    assert parse(procfile_commands()["web"], "Procfile web").command == "serve"
    assert parse(procfile_commands()["worker"], "Procfile worker").command == "worker"
    assert "$PORT" in procfile()["web"], "the platform's port must reach the acceptor"


def test_the_schema_is_migrated_once_before_anything_starts() -> None:
    migrate = services()["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, service in app_services().items():
        if name != "migrate":
            assert service["depends_on"]["migrate"]["condition"] == \
                "service_completed_successfully", name
            assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_every_builtin_sink_queue_has_its_own_worker_service_and_procfile_line() -> None:
    def sink_queues(commands: list[list[str]]) -> set[str]:
        out = set()
        for args in commands:
            parsed = parse(args, "sink worker")
            if parsed.command == "worker":
                out |= {q for q in queues_of(parsed) if q.startswith("sink-")}
        return out

    expected = {f"sink-{name}" for name in builtin_sinks()}
    assert "sink-postgres" in expected
    assert sink_queues([s["command"] for s in app_services().values()]) == expected
    assert sink_queues(list(procfile_commands().values())) == expected
    worker = parse(services()["worker"]["command"], "worker")
    assert queues_of(worker) == ["ingest"]


# -- production settings ----------------------------------------------------------------------


def test_redis_persists_every_accepted_delivery_and_never_evicts() -> None:
    redis = services()["redis"]
    command = redis["command"]
    assert command[0] == "redis-server"
    options = dict(zip(command[1::2], command[2::2]))
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"
    assert any(v.endswith(":/data") for v in redis["volumes"]), "the AOF must be on a volume"


def test_profile_ha_runs_a_persistent_replica_and_three_sentinels_of_the_primary() -> None:
    ha = {name: s for name, s in services().items() if s.get("profiles") == ["ha"]}
    assert set(ha) == {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    replica = ha["redis-replica"]["command"]
    def option(name: str) -> str:
        return str(replica[replica.index(name) + 1])

    assert replica[replica.index("--replicaof") + 1:][:2] == ["redis", "6379"]
    assert option("--appendonly") == "yes" and option("--maxmemory-policy") == "noeviction"
    assert any(v.endswith(":/data") for v in ha["redis-replica"]["volumes"])
    script = ha["sentinel-1"]["command"][-1]
    assert "sentinel monitor ingest redis 6379 2" in script  # two of three must agree
    assert all(ha[f"sentinel-{i}"]["command"] == ha["sentinel-1"]["command"] for i in (2, 3))
    # The URL .env.example gives for the profile names these Sentinels and that service.
    example = (ROOT / ".env.example").read_text()
    url = re.search(r"^# REDIS_URL=(redis\+sentinel://\S+)$", example, re.M)
    assert url, ".env.example shows no Sentinel REDIS_URL"
    target = Settings.from_env({"REDIS_URL": url.group(1)})
    from ingest.redis_conn import parse_sentinel_url

    parsed = parse_sentinel_url(target.require_redis())
    assert parsed.service == "ingest"
    assert {h for h, _ in parsed.sentinels} == {"sentinel-1", "sentinel-2", "sentinel-3"}
    # Every app service takes REDIS_URL from .env when it is set there.
    for name, service in app_services().items():
        assert service["environment"]["REDIS_URL"] == "${REDIS_URL:-redis://redis:6379/0}", name


def test_postgres_keeps_its_data_and_reports_health_over_tcp() -> None:
    postgres = services()["postgres"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    check = " ".join(postgres["healthcheck"]["test"])
    assert "pg_isready" in check
    # The image's first start runs a socket-only server while it creates the database: only a
    # check over TCP tells when the others can connect.
    assert re.search(r"-h\s+127\.0\.0\.1\b", check), check
    assert "-U ingest" in check and "-d ingest" in check
    env = postgres["environment"]
    assert env["POSTGRES_USER"] == "ingest" and env["POSTGRES_DB"] == "ingest"
    assert "--encoding=UTF8" in env["POSTGRES_INITDB_ARGS"], "ingest migrate needs UTF8"
    url = services()["migrate"]["environment"]["DATABASE_URL"]
    assert url.startswith("postgresql://ingest:") and url.endswith("@postgres:5432/ingest")


def test_postgres_gets_shared_buffers_for_a_large_archive() -> None:
    """Postgres's default 128 MB of shared buffers holds a 10-million-event table's hot
    indexes no longer (bench --lifecycle): compose raises it, and .env.example says how."""
    command = services()["postgres"]["command"]
    assert command[0] == "postgres"
    settings = dict(command[i + 1].split("=", 1) for i, arg in enumerate(command)
                    if arg == "-c")
    assert settings["shared_buffers"] == "${POSTGRES_SHARED_BUFFERS:-1GB}"
    assert "# POSTGRES_SHARED_BUFFERS=1GB" in (ROOT / ".env.example").read_text()


def test_acceptor_healthcheck_is_readiness_and_its_spool_is_a_volume() -> None:
    acceptor = services()["acceptor"]
    assert parse(acceptor["command"], "acceptor").command == "serve"
    assert "/readyz" in " ".join(acceptor["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/ingest/spool") for v in acceptor["volumes"])
    assert "INGEST_SPOOL_DIR=/var/lib/ingest/spool" in (ROOT / "Dockerfile").read_text()


def test_workers_scale_nothing_ties_them_to_one_instance() -> None:
    workers = {name: s for name, s in app_services().items()
               if parse(s["command"], name).command == "worker"}
    assert {"worker", "sink-postgres"} <= workers.keys()
    for name, service in workers.items():
        for key in ("container_name", "ports", "hostname"):
            assert key not in service, f"{name} has {key}: `--scale {name}=4` would clash"
        assert service["environment"]["INGEST_METRICS_PORT"], f"{name} serves no metrics"


def test_one_image_is_built_once_and_every_app_service_runs_it() -> None:
    apps = app_services()
    assert {"migrate", "acceptor", "worker", "sink-postgres"} <= apps.keys()
    builders = [name for name, s in apps.items() if "build" in s]
    assert builders == ["migrate"], f"exactly one service builds {APP_IMAGE}: {builders}"
    assert services()["migrate"]["build"] == "."
    # Every other app service waits for migrate, so any `up` builds the image first.
    for name, service in apps.items():
        if name != "migrate":
            assert "migrate" in service["depends_on"], name
    for name, service in services().items():
        if "build" in service and name != "migrate":
            assert service["image"] != APP_IMAGE, name


def test_every_image_is_pinned_to_a_version() -> None:
    built_here = {s["image"] for s in services().values() if "build" in s}
    for name, service in services().items():
        image = str(service["image"])
        repo, _, tag = image.rpartition(":")
        assert repo and tag, f"{name}: image {image!r} has no tag"
        if image in built_here:
            assert tag != "latest", f"{name}: a built image gets a tag of its own"
            continue
        assert tag != "latest" and re.match(r"v?\d", tag), \
            f"{name}: {image!r} is not pinned to a version"
    froms = re.findall(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    froms += re.findall(r"^FROM\s+(\S+)", (ROOT / "deploy/rq-dashboard/Dockerfile").read_text(),
                        re.M)
    for image in froms:
        assert re.search(r":\d", image), f"FROM {image}: not pinned to a version"


def test_dashboard_packages_are_pinned_and_match_the_workers_rq() -> None:
    import tomllib

    from packaging.requirements import Requirement

    lines = [ln.split("#")[0].strip()
             for ln in (ROOT / "deploy/rq-dashboard/requirements.txt").read_text().splitlines()]
    pins = {}
    for line in filter(None, lines):
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{line}: not an exact version"
        pins[req.name.lower()] = spec.version
    assert "rq-dashboard" in pins
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ours = next(Requirement(d) for d in project["dependencies"] if Requirement(d).name == "rq")
    assert pins["rq"] in ours.specifier, "the dashboard must read what our workers write"


def test_every_healthcheck_has_a_start_period() -> None:
    checked = {name: s["healthcheck"] for name, s in services().items() if "healthcheck" in s}
    assert {"redis", "postgres", "acceptor", "worker", "sink-postgres", "rq-dashboard"} <= \
        checked.keys()
    for name, check in checked.items():
        assert seconds(check["start_period"]) > 0, name
        # The first check runs one interval after start: that is the earliest "healthy".
        assert seconds(check["interval"]) <= 10, name


def test_a_stopping_worker_has_time_to_finish_its_job() -> None:
    for name, service in app_services().items():
        assert service.get("init") is True, f"{name}: PID 1 would ignore SIGTERM while waiting"
        if parse(service["command"], name).command == "worker":
            grace = seconds(service["stop_grace_period"])
            assert grace > JOB_TIMEOUT, f"{name}: a job may run {JOB_TIMEOUT} s, grace {grace} s"


def test_dashboard_is_optional_and_local_only() -> None:
    dashboard = services()["rq-dashboard"]
    assert dashboard["profiles"] == ["dashboard"]
    assert all(str(p).startswith("127.0.0.1:") for p in dashboard["ports"])


def test_the_console_is_its_own_service_on_the_network_only() -> None:
    """The console runs the Procfile's command, listens on the compose network (so it needs
    its token, and refuses to start without one rather than run open), and is published on
    no host port unless the operator uncomments the line that does it."""
    console = services()["console"]
    assert console["image"] == APP_IMAGE and console["profiles"] == ["console"]
    assert parse(console["command"], "console").command == "console"
    assert parse(procfile_commands()["console"], "Procfile console").command == "console"
    assert "ports" not in console, "the console must not be published on the host by default"
    assert console["environment"]["INGEST_CONSOLE_HOST"] == "0.0.0.0"
    port = console["environment"]["INGEST_CONSOLE_PORT"]
    assert console["expose"] == [port]
    assert f"127.0.0.1:{port}/healthz" in " ".join(console["healthcheck"]["test"])
    text = (ROOT / "docker-compose.yml").read_text()
    assert re.search(rf'^\s+# ports: \["127\.0\.0\.1:{port}:{port}"\]$', text, re.M), \
        "a comment shows how to publish the console on this host only"
    from ingest.commands.console import check_access

    inside = Settings.from_env({k: v for k, v in console["environment"].items()
                                if k.startswith("INGEST_")})
    with pytest.raises(ConfigError, match="INGEST_CONSOLE_TOKEN"):
        check_access(inside, inside.console_host)


# -- secrets and settings ---------------------------------------------------------------------


def test_env_example_names_every_variable_compose_and_the_code_read() -> None:
    names = env_example_names()
    referenced = {m.group(1) for m in _VARIABLE.finditer((ROOT / "docker-compose.yml").read_text())}
    assert referenced, "docker-compose.yml takes its secrets from .env"
    assert referenced <= names.keys(), f"missing from .env.example: {referenced - names.keys()}"
    # Every setting the code reads by name, and every provider's secret setting.
    source = "\n".join(p.read_text() for package in ("ingest", "workers", "sinks")
                       for p in (ROOT / package).rglob("*.py"))
    prefixes = "|".join(["INGEST", "PROMETHEUS", *(s.upper() for s in builtin_sinks())])
    read = set(re.findall(rf'"((?:{prefixes})_[A-Z_]+|REDIS_URL|DATABASE_URL)"', source))
    read |= {p.secret_setting for p in load_providers().values()}
    read |= {f"{sink.upper()}_EVENTS" for sink in builtin_sinks() - {"postgres"}}
    assert read <= names.keys(), f"missing from .env.example: {read - names.keys()}"


def test_env_example_holds_no_secret_values() -> None:
    for name, value in env_example_names().items():
        if re.search(r"(SECRET|TOKEN|PASSWORD|HEADERS)S?$", name) or name.endswith("_URL"):
            assert value == "", f".env.example ships a value for {name}"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_compose_reads_secrets_from_the_env_file() -> None:
    for name, service in app_services().items():
        assert service["env_file"] == ".env", name
    text = (ROOT / "docker-compose.yml").read_text()
    assert "POSTGRES_PASSWORD:?" in text, "compose must refuse to start without a password"


# -- image ------------------------------------------------------------------------------------


def test_dockerfile_builds_a_small_non_root_image_with_a_cached_dependency_layer() -> None:
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))  # continuation lines into one
    instructions = [ln.split(None, 1) for ln in joined.splitlines()]
    froms = [arg for op, arg in instructions if op == "FROM"]
    assert froms == ["python:3.11-slim"]
    ops = [op for op, _ in instructions]
    copies = [(i, arg.split()) for i, (op, arg) in enumerate(instructions) if op == "COPY"]
    # Dependencies from the runtime lock, with their hashes, before the source; then the
    # application alone, built with the locked setuptools.
    deps_copy = next(i for i, args in copies if args[0] == "requirements/runtime.txt")
    deps_install = next(i for i, (op, arg) in enumerate(instructions)
                        if op == "RUN" and "pip install --require-hashes -r" in arg)
    source_copy = min(i for i, args in copies if args[0] in ("ingest", "workers", "sinks"))
    assert deps_copy < deps_install < source_copy, "dependencies must install before the source"
    app_install = next(arg for op, arg in instructions if op == "RUN" and "--no-deps" in arg)
    assert "--no-build-isolation" in app_install, "building must fetch nothing outside the lock"
    assert {args[0] for _, args in copies} >= {"ingest", "workers", "sinks"}
    for _, args in copies:
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: no such file in the repository"
    user = [arg for op, arg in instructions if op == "USER"]
    assert user and user[-1] not in ("root", "0"), "the image must not run as root"
    assert ops.index("USER") < ops.index("ENTRYPOINT")
    assert dict(instructions)["ENTRYPOINT"] == '["ingest"]'
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "*" in ignored and {"!ingest/", "!workers/", "!sinks/", "!pyproject.toml",
                               "!requirements/runtime.txt"} <= set(ignored)


# -- queue names as the files write them --------------------------------------------------------


def test_queue_names_in_the_files_map_into_the_deployments_namespace() -> None:
    plain = Settings.from_env({})
    spaced = Settings.from_env({"INGEST_NAMESPACE": "blue"})
    assert _queue_name(plain, "ingest") == "ingest"
    assert _queue_name(plain, "sink-postgres") == "sink-postgres"
    assert _queue_name(spaced, "ingest") == "blue-ingest"
    assert _queue_name(spaced, "sink-postgres") == "blue-sink-postgres"
    # What `ingest worker` passes to its children is already in the namespace.
    assert _queue_name(spaced, "blue-sink-postgres") == "blue-sink-postgres"
    for bad in ("ingets", "sink-", "postgres"):
        with pytest.raises(ValueError, match="no queue"):
            _queue_name(spaced, bad)


def test_a_worker_for_a_queue_no_deployment_has_stops_at_once() -> None:
    result = subprocess.run([sys.executable, "-m", "ingest.commands.cli",
                             "worker", "--queue", "ingets"],
                            env={"PATH": os.environ.get("PATH", "")}, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "no queue 'ingets'" in result.stderr


def test_plugins_named_in_deploy_plugins_are_baked_into_the_image(tmp_path: Path) -> None:
    """docs/sinks.md's recipe: a plugin folder under deploy/plugins/, named in its
    requirements.txt, is installed by the image build (after the application, from that
    folder); as shipped the file names nothing."""
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    copy = lines.index("COPY deploy/plugins /plugins")
    install = next(i for i, ln in enumerate(lines)
                   if ln.startswith("RUN cd /plugins") and "pip install -r requirements.txt" in ln)
    app = next(i for i, ln in enumerate(lines) if ln.startswith("RUN pip install --no-deps"))
    assert app < copy < install < lines.index(next(ln for ln in lines if ln.startswith("USER")))
    assert "!deploy/plugins/" in (ROOT / ".dockerignore").read_text().split()
    shipped = (ROOT / "deploy/plugins/requirements.txt").read_text().splitlines()
    assert all(not ln.strip() or ln.startswith("#") for ln in shipped)

    # The recipe itself, as the build runs it (pip, from the folder, paths relative to it).
    folder = tmp_path / "plugins"
    shutil.copytree(ROOT / "tests/plugins/example_sink", folder / "webhook-ingest-jsonl")
    (folder / "requirements.txt").write_text("\n".join([*shipped, "./webhook-ingest-jsonl", ""]))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index",
         "--no-build-isolation", "--report", "-", "-q", "-r", "requirements.txt"],
        cwd=folder, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [item["metadata"]["name"] for item in report["install"]] == ["webhook-ingest-jsonl"]
