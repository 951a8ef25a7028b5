"""The layers the folders promise, checked on the source itself (ast, nothing runs).

    core (ingest's own modules) <- providers (ingest.providers) <- acceptor (ingest.acceptor),
    workers, sinks <- commands (ingest.commands)

A module imports only from its own layer and those below it: the core reaches the providers
only through the registry's door (``ingest.providers``: load_providers, Provider), never one
provider's module; among the middle layer, the workers call the sinks (that is their job),
nothing else crosses. Only the commands (the CLI) import workers and sinks from ``ingest``, and
nothing imports the commands. A dotted module name in a string (``importlib``, a list of
command modules) counts as an import; the names of RQ job functions (stored inside jobs in
Redis, run by the workers) are data, listed below. And what the sinks store is theirs: SQL on
the ``webhook_*`` tables and the Slack outbox's keys appear nowhere else."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

from ingest import constants

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ingest", "workers", "sinks")
CORE, PROVIDERS, ACCEPTOR, WORKERS, SINKS, COMMANDS = (
    "core", "providers", "acceptor", "workers", "sinks", "commands")
RANK = {CORE: 0, PROVIDERS: 1, ACCEPTOR: 2, WORKERS: 2, SINKS: 2, COMMANDS: 3}
# Within the middle layer, who may import whom.
ACROSS = {(WORKERS, SINKS)}
# RQ job functions named in jobs (ingest.constants, ingest.rq_jobs): data, not imports.
JOB_FUNCTIONS = {constants.PROCESS_BATCH, constants.DELIVER, "workers.retention.run_slice",
                 "ingest.retention.run_slice"}
_DOTTED = re.compile(r"(?:ingest|workers|sinks)(?:\.[A-Za-z_]\w*)+")


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "workers":
        return WORKERS
    if parts[0] == "sinks":
        return SINKS
    sub = parts[1] if len(parts) > 1 else ""
    return {"providers": PROVIDERS, "acceptor": ACCEPTOR, "commands": COMMANDS}.get(sub, CORE)


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(*packages: str) -> Iterator[tuple[str, Path, ast.Module]]:
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield _module_of(path), path, ast.parse(path.read_text(), str(path))


def _is_module(name: str, attribute: bool = True) -> bool:
    """True when ``name`` (or, with ``attribute``, its parent: module.attribute) is one of
    our modules."""
    for candidate in (name, name.rpartition(".")[0]) if attribute else (name,):
        path = ROOT.joinpath(*candidate.split("."))
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return True
    return False


def _imports(*packages: str) -> Iterator[tuple[str, str]]:
    """(importing module, imported module) for every import in ``packages``, and every
    string naming one of our modules (string imports)."""
    for module, _, tree in _sources(*packages):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                yield module, node.module
                for alias in node.names:  # from workers import dedup
                    if _is_module(f"{node.module}.{alias.name}", attribute=False):
                        yield module, f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    yield module, alias.name
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                for name in _DOTTED.findall(node.value):
                    if name not in JOB_FUNCTIONS and name.split(".")[0] in PACKAGES \
                            and _is_module(name) and node.value.strip() == name:
                        yield module, name


def _ours(target: str) -> bool:
    return target.split(".")[0] in PACKAGES


def _allowed(module: str, target: str) -> bool:
    source, dest = layer(module), layer(target)
    if source == dest:
        return True
    if source == CORE and dest == PROVIDERS:
        return target == "ingest.providers"  # the registry's door, never a provider's module
    if RANK[dest] < RANK[source]:
        return True
    return (source, dest) in ACROSS


def test_every_import_goes_down_the_layers() -> None:
    found = [(m, t) for m, t in _imports(*PACKAGES) if _ours(t) and not _allowed(m, t)]
    assert not found, found


def test_the_layers_are_told_apart() -> None:
    # The classification the rule above stands on, and an upward import it must catch.
    assert [layer(m) for m in ("ingest.config", "ingest.subjects", "ingest.providers.outreach",
                               "ingest.acceptor.app", "workers.jobs", "sinks.postgres",
                               "ingest.commands.dlq")] == [
        CORE, CORE, PROVIDERS, ACCEPTOR, WORKERS, SINKS, COMMANDS]
    assert not _allowed("ingest.config", "workers.jobs")
    assert not _allowed("ingest.config", "ingest.providers.outreach")
    assert not _allowed("sinks.postgres", "workers.runtime")
    assert not _allowed("ingest.acceptor.app", "sinks.registry")
    assert not _allowed("workers.jobs", "ingest.commands.cli")
    assert _allowed("workers.jobs", "sinks.registry")
    assert _allowed("ingest.commands.cli", "workers.processes")


def test_string_imports_count() -> None:
    # The CLI loads its command modules by name: each must be a module the rule can check.
    cli = next(tree for m, _, tree in _sources("ingest") if m == "ingest.commands.cli")
    named = [n.value for n in ast.walk(cli) if isinstance(n, ast.Constant)
             and isinstance(n.value, str) and _DOTTED.fullmatch(n.value) and _is_module(n.value)]
    assert "ingest.commands.dlq" in named and all(layer(n) == COMMANDS for n in named
                                                  if n.startswith("ingest.commands.")), named
    assert ("ingest.commands.cli", "ingest.commands.dlq") in set(_imports("ingest"))


def test_no_private_name_is_imported_across_packages() -> None:
    found = [(m, node.module, alias.name)
             for m, _, tree in _sources(*PACKAGES) for node in ast.walk(tree)
             if isinstance(node, ast.ImportFrom) and node.module and not node.level
             and _ours(node.module) and node.module.split(".")[0] != m.split(".")[0]
             for alias in node.names if alias.name.startswith("_")]
    assert not found, found


def test_the_job_functions_named_in_jobs_exist() -> None:
    # The names stored inside jobs: each must import, so jobs already queued keep running.
    import importlib

    for name in JOB_FUNCTIONS - {"ingest.retention.run_slice"}:  # repaired: workers.retention
        module, _, func = name.rpartition(".")
        assert callable(getattr(importlib.import_module(module), func)), name


# -- what the sinks store is theirs -------------------------------------------------------------

_TABLES = re.compile(r"\bwebhook_(?:deliveries|events|records|erasures|sink_outcomes)\b")
_SQL = re.compile(r"\b(?:SELECT|INSERT|UPDATE|DELETE|FROM|JOIN|INTO|TABLE)\b", re.IGNORECASE)
_OUTBOX_KEY = re.compile(r"slack:[^\s\"']*:")


def _strings(*packages: str) -> Iterator[tuple[str, str]]:
    """(module, text) of every string in ``packages`` but docstrings and comments; f-strings
    as their literal parts joined."""
    for module, _, tree in _sources(*packages):
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                        ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr)
                      and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                yield module, " ".join(v.value for v in node.values
                                       if isinstance(v, ast.Constant) and isinstance(v.value, str))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and id(node) not in docstrings:
                yield module, node.value


def _storage_outside_sinks(strings: Iterator[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(m, text[:80]) for m, text in strings
            if layer(m) != SINKS and ((_TABLES.search(text) and _SQL.search(text))
                                      or _OUTBOX_KEY.search(text))]


def test_sql_on_the_sinks_tables_and_outbox_keys_stay_in_sinks() -> None:
    found = _storage_outside_sinks(_strings(*PACKAGES))
    assert not found, found


def test_the_storage_check_catches_sql_and_keys() -> None:
    samples = [("ingest.commands.erase", "DELETE FROM webhook_events WHERE id = %s"),
               ("workers.retention", "SELECT 1 FROM webhook_deliveries d LIMIT 1"),
               ("ingest.commands.erase", "slack:*:items"),
               ("sinks.postgres", "DELETE FROM webhook_events"),
               ("ingest.commands.replay", "not in webhook_events yet")]
    assert _storage_outside_sinks(iter(samples)) == [(m, t) for m, t in samples[:3]]


def test_the_folders_hold_what_the_package_docstring_says() -> None:
    # The acceptor's and the commands' modules live in their sub-packages, not beside the core;
    # what the CLI alone uses lives in the commands, not in workers.
    core = {p.stem for p in (ROOT / "ingest").glob("*.py")}
    assert not core & {"app", "durable", "enqueue", "spool", "http_limits"}, core
    assert not core & {"cli", "devserver", "replay", "send", "samples", "embedded", "erase",
                       "status", "retention", "dlq", "metrics_server"}, core
    workers = {p.stem for p in (ROOT / "workers").glob("*.py")}
    assert not workers & {"dlq", "exposition", "metrics_server", "records", "runner"}, workers
