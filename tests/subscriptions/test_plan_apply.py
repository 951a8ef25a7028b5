"""`ingest subscriptions plan` and `apply` against the fake Outreach and Salesloft APIs."""

from __future__ import annotations

from collections.abc import Callable

import orjson

from tests.helpers import SECRETS
from tests.subscriptions.conftest import OUTREACH_TOKEN, PUBLIC_URL, SALESLOFT_KEY, wanted
from tests.subscriptions.fake_apis import FakeOutreach, FakeSalesloft

Run = Callable[..., tuple[int, str, str]]
OUTREACH_HOOK = f"{PUBLIC_URL}/webhooks/outreach"
SALESLOFT_HOOK = f"{PUBLIC_URL}/webhooks/salesloft"


def flat(text: str) -> str:
    """Output as one line: the table folds long details over several."""
    return " ".join(text.split())


def _topics(fake: FakeOutreach) -> list[str]:
    return sorted(f"{w['resource']}.{w['action']}" for w in fake.webhooks.values())


def test_a_fresh_deployment_plans_every_subscription_and_apply_creates_exactly_those(
        run: Run, sub_env: Callable[..., dict[str, str]], outreach_api: FakeOutreach,
        salesloft_api: tuple[FakeSalesloft, str]) -> None:
    salesloft, _ = salesloft_api
    env = sub_env()
    code, out, err = run(env, "subscriptions", "plan", "--json")
    assert code == 1, err
    plans = {p["provider"]: p for p in orjson.loads(out)["providers"]}
    for name in ("outreach", "salesloft"):
        plan = plans[name]
        assert plan["wanted"] == len(wanted(name)) and plan["ok"] == 0
        assert sorted(i["topic"] for i in plan["items"]) == wanted(name)
        assert {(i["state"], i["action"]) for i in plan["items"]} == {("missing", "create")}
    assert not outreach_api.webhooks and not salesloft.subscriptions  # plan changed nothing

    code, out, err = run(env, "subscriptions", "apply", "--yes")
    assert code == 0, out + err
    for credential in (OUTREACH_TOKEN, SALESLOFT_KEY, *SECRETS["outreach"],
                       *SECRETS["salesloft"]):
        assert credential not in out + err
    assert _topics(outreach_api) == wanted("outreach")
    assert all(w["url"] == OUTREACH_HOOK and w["secret"] == SECRETS["outreach"][0]
               and w["active"] and w["payloadVersion"] == 2
               for w in outreach_api.webhooks.values())
    assert sorted(s["event_type"] for s in salesloft.subscriptions.values()) == \
        wanted("salesloft")
    assert all(s["callback_url"] == SALESLOFT_HOOK
               and s["callback_token"] == SECRETS["salesloft"][0]
               for s in salesloft.subscriptions.values())
    assert "nothing" not in out and "after apply" in out

    # Idempotent: a second run has nothing to change and creates nothing.
    creates = outreach_api.count("POST", "/api/v2/webhooks")
    code, out, err = run(env, "subscriptions", "apply", "--yes")
    assert code == 0, out + err
    assert "nothing to change" in out
    assert outreach_api.count("POST", "/api/v2/webhooks") == creates
    code, out, _ = run(env, "subscriptions", "plan")
    assert code == 0, out


def test_a_deactivated_outreach_webhook_shows_why_and_apply_re_enables_it(
        run: Run, sub_env: Callable[..., dict[str, str]], outreach_api: FakeOutreach) -> None:
    env = sub_env(SALESLOFT_API_KEY="")
    assert run(env, "subscriptions", "apply", "--yes")[0] == 0
    (wid,) = outreach_api.find("prospect", "updated")
    outreach_api.deactivate(wid, "Deactivated after failing for 7 days (HTTP 503)",
                            "2026-03-01T08:30:00.000Z")

    code, out, _ = run(env, "subscriptions", "plan", "--provider", "outreach")
    assert max(len(line) for line in out.splitlines()) <= 80
    out = flat(out)
    assert code == 1
    assert "re-enable" in out and "prospect.updated" in out
    assert "since 2026-03-01 08:30Z" in out and "Deactivated after failing for 7 days" in out
    creates = outreach_api.count("POST", "/api/v2/webhooks")

    code, out, err = run(env, "subscriptions", "apply", "--yes", "--provider", "outreach")
    assert code == 0, out + err
    assert f"re-enabled prospect.updated (outreach {wid})" in out
    webhook = outreach_api.webhooks[wid]
    assert webhook["active"] is True and webhook["disabledReason"] is None
    assert webhook["secret"] == SECRETS["outreach"][0]
    assert outreach_api.count("POST", "/api/v2/webhooks") == creates  # the same webhook


def test_a_rotated_secret_is_pushed_to_each_provider_by_apply(
        run: Run, sub_env: Callable[..., dict[str, str]], outreach_api: FakeOutreach,
        salesloft_api: tuple[FakeSalesloft, str]) -> None:
    from ingest.config import Settings
    from ingest.providers import load_providers

    salesloft, _ = salesloft_api
    assert run(sub_env(), "subscriptions", "apply", "--yes")[0] == 0
    before_ids = set(salesloft.subscriptions)
    fresh = {"outreach": "outreach-secret-rotated-0003", "salesloft": "salesloft-token-rotated-0003"}
    rotated = sub_env(OUTREACH_WEBHOOK_SECRETS=f"{fresh['outreach']},{SECRETS['outreach'][0]}",
                      SALESLOFT_WEBHOOK_SECRETS=f"{fresh['salesloft']},{SECRETS['salesloft'][0]}")

    code, out, _ = run(rotated, "subscriptions", "plan", "--json")
    assert code == 1
    plans = {p["provider"]: p for p in orjson.loads(out)["providers"]}
    # Outreach never shows a secret: the fingerprint of the one pushed from here tells.
    assert {(i["state"], i["action"]) for i in plans["outreach"]["items"]} == {
        ("old_secret", "update")}
    # Salesloft shows its token, and cannot change it in place: re-created.
    assert {(i["state"], i["action"]) for i in plans["salesloft"]["items"]} == {
        ("old_secret", "recreate")}

    code, out, err = run(rotated, "subscriptions", "apply", "--yes")
    assert code == 0, out + err
    assert {w["secret"] for w in outreach_api.webhooks.values()} == {fresh["outreach"]}
    assert {s["callback_token"] for s in salesloft.subscriptions.values()} == {fresh["salesloft"]}
    assert sorted(s["event_type"] for s in salesloft.subscriptions.values()) == \
        wanted("salesloft")
    assert not before_ids & set(salesloft.subscriptions)  # the old ones went: created here
    assert run(rotated, "subscriptions", "plan")[0] == 0

    # What the provider now signs with is what this deployment verifies first.
    import hashlib
    import hmac

    settings = Settings.from_env(rotated)
    body = b'{"data": {"type": "prospect", "id": 1}, "meta": {"eventName": "prospect.created"}}'
    secret = next(iter(outreach_api.webhooks.values()))["secret"]
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    load_providers()["outreach"].verify({"outreach-webhook-signature": signature}, body,
                                        settings.secrets_for("outreach"), {})


def test_apply_never_deletes_what_it_did_not_create_unless_asked(
        run: Run, sub_env: Callable[..., dict[str, str]], outreach_api: FakeOutreach,
        salesloft_api: tuple[FakeSalesloft, str]) -> None:
    salesloft, _ = salesloft_api
    env = sub_env()
    # Made by hand: one to this deployment for events nothing maps, one elsewhere, and a
    # Salesloft subscription here signed with a token this deployment does not know.
    extra = outreach_api.add("widget", "*", OUTREACH_HOOK, "hand-made-secret-0001")
    elsewhere = outreach_api.add("prospect", "created", "https://old.example.test/webhooks/outreach")
    foreign = salesloft.add("person_updated", SALESLOFT_HOOK, "someone-elses-token-0001")

    code, out, _ = run(env, "subscriptions", "plan")
    out = flat(out)
    assert code == 1
    assert "widget.*" in out and "kept (--delete-extra deletes it)" in out
    assert "https://old.example.test, not here: left alone" in out

    code, out, err = run(env, "subscriptions", "apply", "--yes")
    assert code == 0, out + err
    assert extra in outreach_api.webhooks and elsewhere in outreach_api.webhooks
    # The foreign subscription holds a wrong token: a right one is created beside it, and
    # the foreign one is left (it was not created here).
    assert foreign in salesloft.subscriptions
    assert "was not created here: left" in flat(out)
    persons = [salesloft.subscriptions[i] for i in salesloft.find("person_updated")]
    assert sorted(p["callback_token"] for p in persons) == sorted(
        [SECRETS["salesloft"][0], "someone-elses-token-0001"])

    code, out, err = run(env, "subscriptions", "apply", "--yes", "--delete-extra")
    assert code == 0, out + err
    assert extra not in outreach_api.webhooks and foreign not in salesloft.subscriptions
    assert elsewhere in outreach_api.webhooks  # not ours, whatever the flag


def test_plan_reads_every_page_of_both_apis(
        run: Run, sub_env: Callable[..., dict[str, str]], outreach_api: FakeOutreach,
        salesloft_api: tuple[FakeSalesloft, str]) -> None:
    salesloft, _ = salesloft_api
    env = sub_env()
    assert run(env, "subscriptions", "apply", "--yes")[0] == 0
    outreach_api.max_page = 5  # 42 webhooks: 9 pages through links.next
    salesloft.paged, salesloft.max_page = True, 10  # 37 subscriptions: 4 pages
    outreach_api.requests.clear()
    salesloft.requests.clear()
    code, out, _ = run(env, "subscriptions", "plan", "--json")
    assert code == 0, out
    plans = {p["provider"]: p for p in orjson.loads(out)["providers"]}
    assert plans["outreach"]["ok"] == len(wanted("outreach"))
    assert plans["salesloft"]["ok"] == len(wanted("salesloft"))
    assert outreach_api.count("GET", "/api/v2/webhooks") == 9
    assert salesloft.count("GET", "/v2/webhook_subscriptions") == 4


def test_a_429_is_waited_out_and_the_request_made_again(
        run: Run, sub_env: Callable[..., dict[str, str]], outreach_api: FakeOutreach,
        salesloft_api: tuple[FakeSalesloft, str]) -> None:
    import time

    salesloft, _ = salesloft_api
    env = sub_env()
    outreach_api.script.append((429, {
        "Retry-After": "1", "X-RateLimit-Limit": "10000", "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str(int(time.time()) + 1)}))
    salesloft.script.append((429, {"Retry-After": "1", "x-ratelimit-remaining-minute": "0",
                                   "x-ratelimit-endpoint-cost": "1"}))
    code, out, err = run(env, "subscriptions", "apply", "--yes")
    assert code == 0, out + err
    assert outreach_api.answered == {429: 1} and salesloft.answered == {429: 1}
    # The refused list was asked again, and everything was created once.
    assert outreach_api.requests[0][:2] == outreach_api.requests[1][:2] == (
        "GET", "/api/v2/webhooks")
    assert _topics(outreach_api) == wanted("outreach")
    assert len(salesloft.subscriptions) == len(wanted("salesloft"))


def test_settings_and_refusals_end_in_one_line_and_status_2(
        run: Run, sub_env: Callable[..., dict[str, str]], outreach_api: FakeOutreach) -> None:
    code, _, err = run(sub_env(INGEST_PUBLIC_URL=""), "subscriptions", "plan")
    assert code == 2 and "INGEST_PUBLIC_URL" in err
    code, _, err = run(sub_env(OUTREACH_OAUTH_CLIENT_ID="an-app"), "subscriptions", "plan")
    assert code == 2 and "OUTREACH_API_TOKEN" in err and "not both" in err
    code, _, err = run(sub_env(OUTREACH_API_TOKEN="", OUTREACH_OAUTH_CLIENT_ID="an-app"),
                       "subscriptions", "plan")
    assert code == 2 and "OUTREACH_OAUTH_CLIENT_SECRET" in err
    code, _, err = run(sub_env(OUTREACH_API_URL="ftp://x"), "subscriptions", "plan")
    assert code == 2 and "OUTREACH_API_URL" in err
    code, _, err = run(sub_env(OUTREACH_API_TOKEN="", SALESLOFT_API_KEY=""),
                       "subscriptions", "plan")
    assert code == 2 and "no provider has API access configured" in err
    code, _, err = run(sub_env(), "subscriptions", "plan", "--provider", "outcaller")
    assert code == 2 and "no provider 'outcaller' with a subscriptions API" in err

    # A token the API refuses (and quotes back): status 2, and the token nowhere.
    outreach_api.echo_credentials = True
    wrong = "outreach-api-token-revoked-77aa"
    code, out, err = run(sub_env(OUTREACH_API_TOKEN=wrong, SALESLOFT_API_KEY=""),
                         "subscriptions", "plan")
    assert code == 2
    assert "refused our credentials (401)" in out
    assert wrong not in out + err
    assert any(token == wrong for _, _, token in outreach_api.requests)  # it was sent, once


def test_apply_asks_and_changes_nothing_without_yes_outside_a_terminal(
        run: Run, sub_env: Callable[..., dict[str, str]], outreach_api: FakeOutreach) -> None:
    code, _, err = run(sub_env(), "subscriptions", "apply")
    assert code == 2 and "--yes" in err
    assert not outreach_api.webhooks


def test_a_webhook_deleted_between_plan_and_apply_is_created_again(
        run: Run, sub_env: Callable[..., dict[str, str]], outreach_api: FakeOutreach) -> None:
    from ingest.config import Settings
    from ingest.redis_conn import worker_redis
    from ingest.subscriptions.outreach import OutreachSubscriptions
    from ingest.subscriptions.plan import execute
    from ingest.subscriptions.run import check_provider
    from ingest.subscriptions.state import Records

    env = sub_env(SALESLOFT_API_KEY="")
    assert run(env, "subscriptions", "apply", "--yes")[0] == 0
    (wid,) = outreach_api.find("task", "completed")
    outreach_api.deactivate(wid, "failing", "2026-03-01T08:30:00.000Z")
    settings = Settings.from_env(env)
    redis = worker_redis(settings.require_redis())
    api = OutreachSubscriptions.from_settings(settings, redis)
    assert api is not None
    try:
        plan = check_provider(settings, redis, "outreach")
        assert [(i.state, i.action) for i in plan.problems] == [("inactive", "enable")]
        del outreach_api.webhooks[wid]  # by hand, in Outreach's UI, meanwhile
        (outcome,) = execute(api, plan.items, f"{PUBLIC_URL}/webhooks/outreach",
                             SECRETS["outreach"][0], Records(redis, settings.names, "outreach"))
    finally:
        api.close()
        redis.close()
    assert outcome.done, outcome.line
    assert "re-created task.completed" in outcome.line
    (new,) = outreach_api.find("task", "completed")
    assert new != wid and outreach_api.webhooks[new]["active"]
