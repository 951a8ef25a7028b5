"""The layout the folders promise, checked on the imports themselves (ast, nothing runs)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ingest", "workers", "sinks")
# The acceptor: what `ingest serve` runs. Workers and sinks never need it.
ACCEPTOR = ("ingest.acceptor",)
# The command line: it may import everything; only it and the tests import it.
COMMANDS = ("ingest.commands",)


def _imports(package: str) -> Iterator[tuple[str, str, list[str]]]:
    """(importing module, imported module, names) for every import in ``package``."""
    for path in sorted((ROOT / package).rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                yield module, node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    yield module, alias.name, []


def _top(module: str) -> str:
    return module.split(".")[0]


def test_workers_and_sinks_import_no_acceptor_code() -> None:
    found = [(m, target) for package in ("workers", "sinks") for m, target, _ in _imports(package)
             if target.startswith(ACCEPTOR)]
    assert not found, found


def test_no_private_name_is_imported_across_packages() -> None:
    found = [(m, target, name) for package in PACKAGES for m, target, names in _imports(package)
             for name in names
             if _top(target) in PACKAGES and _top(target) != _top(m) and name.startswith("_")]
    assert not found, found


def test_only_the_commands_import_the_commands() -> None:
    found = [(m, target) for package in PACKAGES for m, target, _ in _imports(package)
             if target.startswith(COMMANDS) and not m.startswith(COMMANDS)]
    assert not found, found


def test_the_acceptor_imports_the_core_only() -> None:
    found = [(m, target) for m, target, _ in _imports("ingest") if m.startswith(ACCEPTOR)
             and _top(target) in PACKAGES and target.startswith(("workers", "sinks", *COMMANDS))]
    assert not found, found


def test_the_core_imports_no_workers_or_sinks() -> None:
    # What plugins import (ingest's top-level modules and providers) must not pull in the
    # pipeline's workers or sinks.
    found = [(m, target) for m, target, _ in _imports("ingest")
             if not m.startswith((*ACCEPTOR, *COMMANDS)) and _top(target) in ("workers", "sinks")]
    assert not found, found


def test_the_folders_hold_what_the_package_docstring_says() -> None:
    # The acceptor's and the commands' modules live in their sub-packages, not beside the core.
    core = {p.stem for p in (ROOT / "ingest").glob("*.py")}
    assert not core & {"app", "durable", "enqueue", "spool", "http_limits"}, core
    assert not core & {"cli", "devserver", "replay", "send", "samples", "embedded", "erase",
                       "status", "retention"}, core
