"""Import every provider's suite, so a suite can find another provider's (for the "other
provider's valid credential" test) and the registry meta-test sees them all, even when pytest
is asked to run a single test file."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

for _module in pkgutil.iter_modules([str(Path(__file__).parent)]):
    if _module.name.startswith("test_"):
        importlib.import_module(f"{__package__}.{_module.name}")
