"""The lock files in requirements/ against pyproject.toml, and who installs from them.

`bash .ci/lock` writes them with pip-tools; these tests catch a lock that no longer matches
pyproject.toml (a dependency added or a range moved without `bash .ci/lock`), which an install
from the lock would not: it installs this repository with --no-deps.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from importlib.metadata import PackageNotFoundError, distribution

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
# Each lock file and the extras it holds (runtime: the Docker image; dev: `ingest dev`).
LOCKS = {"runtime": [], "dev": ["embedded"], "test": ["test"], "bench": ["test", "bench"]}


def pins(lock: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of every requirement in ``requirements/<lock>.txt``."""
    text = (ROOT / "requirements" / f"{lock}.txt").read_text()
    entries = re.sub(r"\\\n\s*", " ", text)  # continuation lines joined
    out: dict[str, tuple[str, list[str]]] = {}
    for line in entries.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        requirement, *options = line.split(" --hash=")
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", requirement.strip())
        assert match, f"requirements/{lock}.txt: not an exact pin: {line[:120]}"
        out[canonicalize_name(match.group(1))] = (match.group(2), options)
    return out


def declared(extras: list[str]) -> list[Requirement]:
    """pyproject.toml's requirements for ``extras``, self-references followed."""
    found = [Requirement(r) for r in PROJECT["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for raw in PROJECT["optional-dependencies"][extra]:
            req = Requirement(raw)
            if canonicalize_name(req.name) == canonicalize_name(PROJECT["name"]):
                todo.extend(req.extras)
            else:
                found.append(req)
    return found


@pytest.mark.parametrize("lock", LOCKS)
def test_every_lock_pins_exact_versions_with_hashes(lock: str) -> None:
    locked = pins(lock)
    assert locked
    for name, (_, hashes) in locked.items():
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h.strip()) for h in hashes), \
            f"requirements/{lock}.txt: {name} has no sha256 hash"
    assert "webhook-ingest" not in locked
    # This repository is installed with --no-build-isolation: built with what the lock holds.
    for raw in PYPROJECT["build-system"]["requires"]:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        assert name in locked and req.specifier.contains(locked[name][0]), \
            f"requirements/{lock}.txt: {req} (build-system.requires) not locked within its range"


@pytest.mark.parametrize("lock", LOCKS)
def test_every_declared_dependency_is_locked_within_its_range(lock: str) -> None:
    locked = pins(lock)
    environment = default_environment()
    for req in declared(LOCKS[lock]):
        if req.marker is not None and not req.marker.evaluate({**environment, "extra": ""}):
            continue
        name = canonicalize_name(req.name)
        assert name in locked, f"{req} is declared but not in requirements/{lock}.txt: " \
                               f"run `bash .ci/lock --upgrade-package {req.name}`"
        assert req.specifier.contains(locked[name][0], prereleases=True), \
            f"requirements/{lock}.txt pins {name}=={locked[name][0]}, outside {req}"


# The interpreters the README's "Python 3.11+" covers, on Linux. pip-compile evaluates markers
# for the one it runs on only; requirements/additions.in adds what the others need.
INTERPRETERS = ["3.11.0", "3.11.2", "3.11.7", "3.12.0", "3.13.0", "3.14.0"]


def test_what_a_locked_package_needs_on_any_supported_interpreter_is_locked() -> None:
    """Read from the installed packages' metadata, where their versions are the lock's (a run on
    other versions, .ci/run-latest's, checks what it can)."""
    locked = pins("bench")
    extras: dict[str, set[str]] = {}
    for req in declared(list(PROJECT["optional-dependencies"])):
        extras.setdefault(canonicalize_name(req.name), set()).update(req.extras)
    missing = set()
    checked = 0
    for name, (version, _) in locked.items():
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        if dist.version != version:
            continue
        checked += 1
        for raw in dist.requires or []:
            req = Requirement(raw)
            for python in INTERPRETERS:
                environment = {**default_environment(), "python_full_version": python,
                               "python_version": ".".join(python.split(".")[:2]),
                               "sys_platform": "linux", "platform_system": "Linux"}
                wanted = req.marker is None or any(
                    req.marker.evaluate({**environment, "extra": extra})
                    for extra in {"", *extras.get(name, ())})
                if wanted and canonicalize_name(req.name) not in locked:
                    missing.add(f"{name}=={version} needs {req} on CPython {python}")
    assert checked, "no locked package is installed at its locked version"
    assert not missing, "add to requirements/additions.in, then bash .ci/lock --upgrade-package " \
                        f"NAME: {sorted(missing)}"


def test_a_package_has_the_same_version_in_every_lock() -> None:
    versions: dict[str, set[str]] = {}
    for lock in LOCKS:
        for name, (version, _) in pins(lock).items():
            versions.setdefault(name, set()).add(version)
    assert {n: v for n, v in versions.items() if len(v) > 1} == {}


def readme_command(after: str) -> str:
    """The one-line command in the code block that follows the line ``after`` in README.md."""
    text = (ROOT / "README.md").read_text()
    block = re.search(re.escape(after) + r"[^\n]*\n\n```sh\n(.+?)\n```", text)
    assert block, f"README.md: no command after {after!r}"
    return block.group(1)


def test_ci_runs_the_readmes_test_command_from_the_lock() -> None:
    test = readme_command("Run the full test suite")
    dev = readme_command("Run the whole pipeline")
    assert "--require-hashes -r requirements/test.txt" in test
    assert "--require-hashes -r requirements/dev.txt" in dev
    assert test.endswith("&& .venv/bin/pytest") and dev.endswith("&& .venv/bin/ingest dev")
    ci = [ln for ln in (ROOT / ".ci/run").read_text().splitlines() if ln.startswith("python3 ")]
    assert [ln.replace(" -q ", " ") for ln in ci] == [test]
