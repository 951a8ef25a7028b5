"""``ingest subscriptions plan|apply``: the providers' side of the webhooks.

Example::

    INGEST_PUBLIC_URL=https://hooks.example.com OUTREACH_API_TOKEN=... ingest subscriptions plan
    ingest subscriptions apply --yes        # from a deploy script: idempotent

``plan`` lists, per provider with API access, the subscriptions this deployment wants against
those the provider has (missing, deactivated or suspended with the provider's reason and
since when, pointing elsewhere, holding an old or unknown secret, extra) and what ``apply``
would change; it changes nothing and exits 1 when something needs attention. ``apply`` shows
the same plan, asks (unless ``--yes``), makes the changes one by one with a line each, then
reads the provider again and prints what is left. It never deletes a subscription it did not
create, unless ``--delete-extra``. Exit statuses as every command's (ingest.commands.errors):
2 also when a provider's API refuses our credentials.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

import orjson

from ingest.config import Settings

__all__ = ["add_command"]

# What the action column says apply does (or would do).
_ACTIONS = {"create": "create", "enable": "re-enable", "update": "update",
            "recreate": "re-create", "delete": "delete", None: "-"}


def _setup_logging(settings: Settings, credentials: list[str]) -> None:
    from ingest.logs import log_level, setup_logging

    secrets = [s.reveal() for group in settings.provider_secrets.values() for s in group]
    setup_logging("text", secrets + credentials, log_level(settings))
    # httpx says every request at info; the command prints what it does itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _credentials(settings: Settings, names: list[str]) -> list[str]:
    from ingest.providers import load_providers
    from ingest.subscriptions.adapter import ApiAdapter

    out: list[str] = []
    for name in names:
        api = load_providers()[name].subscriptions(settings, None)  # type: ignore[attr-defined]
        if isinstance(api, ApiAdapter):
            out += api.access.credentials()
    return out


def _print_plan(console: Any, plan: Any) -> None:
    from rich.table import Table

    console.print(f"[bold]{plan.provider}[/]  {plan.url}", highlight=False)
    if plan.note:
        console.print(f"  {plan.note}", markup=False, highlight=False)
        return
    if plan.error:
        console.print(f"  could not read its subscriptions: {plan.error}", markup=False,
                      highlight=False)
        return
    changes = [i for i in plan.items if i.action]
    console.print(f"  {len(plan.wanted)} wanted, {plan.ok_topics} ok, {len(plan.problems)} "
                  f"need attention, {len(changes)} to change", highlight=False)
    shown = [i for i in plan.items if i.state != "ok"]
    if not shown:
        return
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("action", no_wrap=True)
    table.add_column("subscription", overflow="fold", max_width=34)
    table.add_column("detail", overflow="fold", ratio=1)
    for item in shown:
        table.add_row("  " + _ACTIONS.get(item.action, str(item.action)), item.topic,
                      f"{item.state.replace('_', ' ')}: {item.detail}")
    console.print(table)


def _status(plans: list[Any], failed: bool = False) -> int:
    from ingest.commands.errors import ATTENTION, OK, USAGE

    if any(p.refused for p in plans):
        return USAGE
    return ATTENTION if failed or any(p.needs_attention for p in plans) else OK


def cmd_subscriptions(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ingest.commands.errors import USAGE
    from ingest.redis_conn import worker_redis
    from ingest.subscriptions.access import require_public_url
    from ingest.subscriptions.run import apply_provider, check_provider, managed_providers

    settings = Settings.from_env()
    require_public_url(settings)
    managed = sorted(managed_providers())
    if args.provider is not None and args.provider not in managed:
        print(f"ingest subscriptions: no provider {args.provider!r} with a subscriptions API "
              f"(have: {', '.join(managed)})", file=sys.stderr)
        return USAGE
    names = [args.provider] if args.provider else managed
    _setup_logging(settings, _credentials(settings, names))
    console = Console()
    redis = worker_redis(settings.require_redis())
    try:
        plans = [check_provider(settings, redis, name, args.delete_extra) for name in names]
        checked = [p for p in plans if not p.note]
        if not checked:
            for plan in plans:
                console.print(f"{plan.provider}: {plan.note}", markup=False, highlight=False)
            print("ingest subscriptions: no provider has API access configured: set "
                  "OUTREACH_API_TOKEN or OUTREACH_OAUTH_*, SALESLOFT_API_KEY or "
                  "SALESLOFT_OAUTH_* (docs/operations.md, \"Provider subscriptions\")",
                  file=sys.stderr)
            return USAGE
        if args.action == "plan":
            if args.json:
                sys.stdout.write(orjson.dumps({"providers": [p.to_json() for p in plans]},
                                              option=orjson.OPT_INDENT_2).decode() + "\n")
            else:
                for plan in plans:
                    _print_plan(console, plan)
            return _status(plans)
        return _apply(args, settings, redis, console, plans, apply_provider)
    finally:
        redis.close()


def _apply(args: argparse.Namespace, settings: Settings, redis: Any, console: Any,
           plans: list[Any], apply_provider: Callable[..., Any]) -> int:
    from ingest.commands.errors import USAGE

    pending = [p for p in plans if not p.note and not p.error and any(i.action for i in p.items)]
    if not args.json:
        for plan in plans:
            _print_plan(console, plan)
    if not pending:
        if not args.json:
            console.print("nothing to change", highlight=False)
        else:
            sys.stdout.write(orjson.dumps({"providers": [p.to_json() for p in plans],
                                           "done": []}, option=orjson.OPT_INDENT_2).decode()
                             + "\n")
        return _status(plans)
    if not args.yes:
        if not sys.stdin.isatty():
            print("ingest subscriptions: apply changes nothing without --yes when not run "
                  "from a terminal (from a script: `ingest subscriptions apply --yes`)",
                  file=sys.stderr)
            return USAGE
        answer = input(f"change {', '.join(p.provider for p in pending)}'s subscriptions as "
                       "shown? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing changed")
            return _status(plans)

    def show(outcome: Any) -> None:
        if not args.json:
            console.print(("  " if outcome.done else "  FAILED: ") + outcome.line,
                          markup=False, highlight=False)

    results: list[tuple[Any, list[Any], Any]] = []
    for plan in plans:
        if plan not in pending:
            results.append((plan, [], plan))
            continue
        if not args.json:
            console.print(f"[bold]{plan.provider}[/]: applying", highlight=False)
        applied = apply_provider(settings, redis, plan.provider, args.delete_extra, show)
        results.append((applied.before, applied.outcomes, applied.after))
    after = [a for _, _, a in results]
    failed = any(not o.done for _, outcomes, _ in results for o in outcomes) or any(
        b.error for b, _, _ in results)
    if args.json:
        sys.stdout.write(orjson.dumps({
            "providers": [a.to_json() for a in after],
            "done": [o.line for _, outcomes, _ in results for o in outcomes if o.done],
            "failed": [o.line for _, outcomes, _ in results for o in outcomes if not o.done]
            + [b.error for b, _, _ in results if b.error],
        }, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        console.print("after apply:", highlight=False)
        for plan in after:
            _print_plan(console, plan)
    if any(b.refused for b, _, _ in results):
        return USAGE
    return _status(after, failed)


def add_command(add: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``ingest subscriptions`` (called by ingest.commands.cli)."""
    p = add("subscriptions", cmd_subscriptions,
            "see (plan) and repair (apply) the providers' webhook subscriptions through "
            "their APIs; plan exits 1 when something needs attention")
    p.add_argument("action", choices=("plan", "apply"))
    p.add_argument("--provider", metavar="NAME", help="only this provider; default: all")
    p.add_argument("--yes", action="store_true", help="apply without asking")
    p.add_argument("--delete-extra", action="store_true",
                   help="also delete subscriptions to this deployment that no event needs, "
                        "and old ones a re-create replaced that were not created here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
