"""The provider side: see and repair a provider's webhook subscriptions through its API.

Everything watched elsewhere starts at "a request arrived"; this package looks at the other
end. For each provider that offers it (the optional provider capability
:class:`ingest.providers.base.SubscriptionSource`: Outreach and Salesloft built in), it reads
the subscriptions the provider has, compares them with those this deployment wants (one per
event name the provider's kind table maps, pointing at ``INGEST_PUBLIC_URL/webhooks/<p>``,
signed with the first configured secret), and creates, re-enables, updates or re-creates what
is missing or wrong.

- ``model``: :class:`Remote` (a subscription as the API shows it), the
  :class:`SubscriptionAPI` protocol adapters satisfy, the errors.
- ``access``: the settings (API URL, a token or an OAuth grant, ``INGEST_PUBLIC_URL``).
- ``http``: the API client (a total deadline per call, bounded answers, 429 waited out, a
  refused token refreshed once, no credential in errors).
- ``tokens``: static tokens, and OAuth access tokens refreshed and kept sealed in Redis.
- ``adapter``, ``outreach``, ``salesloft``: the providers' APIs.
- ``plan``: wanted against present, the plan's items, and carrying them out.
- ``state``: the Redis records (what was created here, the last check's health), the
  ``ingest_subscription_healthy`` gauge and the lines of ``ingest status``.
- ``run``: one provider checked or repaired end to end.

The command is ``ingest subscriptions plan|apply`` (ingest.commands.subscriptions); the
periodic check is workers.subscriptions. The core and the acceptor import ``state`` only.
"""
