"""A provider plugin that cannot be imported: it needs an SDK that is not installed."""

import acme_sdk_that_is_not_installed  # noqa: F401

class BrokenProvider:
    name = "broken"
