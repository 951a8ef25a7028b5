"""A sink whose import fails, as when a plugin's own dependency is missing."""

import webhook_ingest_broken_missing_dependency  # noqa: F401  (does not exist, on purpose)


class BrokenSink:
    name = "broken"
