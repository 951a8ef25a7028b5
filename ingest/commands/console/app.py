"""The console's Starlette app: server-rendered pages (Jinja2, autoescaped, no script) and the
JSON API under ``/api`` (DESIGN.md, "Added in the third round"; docs/console.md).

Pages: ``/`` overview, ``/events`` search (a POSTed form, so what is searched for never sits
in a URL), ``/events/{id}`` one event (POST ``/events/{id}/replay``: to one sink),
``/records/{provider}/{resource_type}/{resource_id}`` one record's timeline,
``/dead-letters`` (POST ``/dead-letters/retry`` and ``/discard``), ``/refused``, and
``/login`` / ``/logout``. Access, cookies, CSRF and headers: :mod:`.security`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import orjson
import psycopg
from jinja2 import Environment, FileSystemLoader, select_autoescape
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import ImmutableMultiDict
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ingest.commands.console.data import BadInput, Console, SearchForm
from ingest.commands.console.security import (
    CSRF_FIELD,
    HEADERS,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Guard,
    SecurityHeaders,
)
from ingest.commands.errors import explain
from ingest.config import Settings

__all__ = ["create_console"]

log = logging.getLogger("ingest.console")

HERE = Path(__file__).resolve().parent
# The largest form the console reads (a dead-letter selection of many ids included).
_MAX_FORM_BYTES = 256 * 1024


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=str)


def _when(value: object) -> str:
    """A time as ``2026-12-06 18:09:03Z`` (UTC), whatever form it came in."""
    if value is None or value == "":
        return "-"
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value, timezone.utc)
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return str(value)
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc)
        return value.strftime("%Y-%m-%d %H:%M:%S") + "Z"
    return str(value)


def _pretty(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2, default=str).decode()


def _record_path(event: Mapping[str, Any]) -> str | None:
    parts = [event.get("provider"), event.get("resource_type"), event.get("resource_id")]
    if not all(parts):
        return None
    return "/records/" + "/".join(quote(str(p), safe="") for p in parts)


def create_console(settings: Settings, redis: Any = None) -> Starlette:
    """The console app. ``redis``: a client to use (default: one for ``REDIS_URL``)."""
    if redis is None:
        from ingest.redis_conn import worker_redis

        redis = worker_redis(settings.require_redis())
    token = settings.console_token.reveal() if settings.console_token is not None else None
    guard = Guard(token)
    console = Console(settings, redis)
    env = Environment(loader=FileSystemLoader(HERE / "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["when"] = _when
    env.filters["pretty"] = _pretty
    env.globals["record_path"] = _record_path

    # -- helpers --------------------------------------------------------------------------

    def session_of(request: Request) -> str | None:
        return guard.session_nonce(request.cookies.get(SESSION_COOKIE))

    def set_session(response: Response, request: Request, value: str) -> None:
        response.set_cookie(SESSION_COOKIE, value, max_age=None if guard.open else
                            _session_ttl(), httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https")

    def page(request: Request, template: str, nonce: str, status: int = 200,
             **context: Any) -> HTMLResponse:
        html = env.get_template(template).render(
            csrf=guard.csrf_token(nonce), csrf_field=CSRF_FIELD, open=guard.open,
            path=request.url.path, sinks=list(settings.sinks), **context)
        return HTMLResponse(html, status_code=status)

    Handler = Callable[[Request, str], Awaitable[Response]]

    def html_page(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """A page for people: a session (or, without a token, one made on the spot), and for
        a POST its CSRF token; a bad input is a 400 page, not a traceback."""
        async def endpoint(request: Request) -> Response:
            nonce = session_of(request)
            fresh = None
            if nonce is None:
                if not guard.open or request.method != "GET":
                    if request.method != "GET":
                        return HTMLResponse("Your session ended: reload the page (and log in) "
                                            "and try again.\n", status_code=403)
                    return RedirectResponse("/login", status_code=303)
                fresh = guard.new_session()
                nonce = guard.session_nonce(fresh)
                assert nonce is not None
            try:
                if request.method == "POST":
                    form = await _form(request)
                    if not guard.csrf_ok(nonce, form.get(CSRF_FIELD)):
                        return HTMLResponse("This form has expired or did not come from this "
                                            "console: reload the page and try again.\n",
                                            status_code=403)
                    request.state.form = form
                response = await handler(request, nonce)
            except BadInput as exc:
                response = page(request, "error.html", nonce, status=400, message=str(exc))
            if fresh is not None:
                set_session(response, request, fresh)
            return response
        return endpoint

    Api = Callable[[Request], Awaitable[Any]]

    def api(handler: Api) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if not guard.bearer_ok(request.headers.get("authorization")):
                return JSON({"error": "send Authorization: Bearer <INGEST_CONSOLE_TOKEN>"},
                            status_code=401, headers={"www-authenticate": "Bearer"})
            if request.method == "POST":
                kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
                if kind != "application/json":
                    return JSON({"error": "send a JSON body (Content-Type: application/json)"},
                                status_code=415)
            try:
                result = await handler(request)
            except BadInput as exc:
                return JSON({"error": str(exc)}, status_code=400)
            if isinstance(result, Response):
                return result
            return JSON(result)
        return endpoint

    async def json_body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > _MAX_FORM_BYTES:
            raise BadInput("the body is too large")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BadInput("the body is not JSON") from None
        if not isinstance(body, dict):
            raise BadInput("the body must be a JSON object")
        return body

    # -- login ----------------------------------------------------------------------------

    async def login_form(request: Request) -> Response:
        if guard.open or session_of(request) is not None:
            return RedirectResponse("/", status_code=303)
        return _login_page(request, None)

    def _login_page(request: Request, error: str | None, status: int = 200) -> Response:
        cookie = guard.new_login()
        nonce = guard.login_nonce(cookie)
        assert nonce is not None
        html = env.get_template("login.html").render(
            csrf=guard.csrf_token("login:" + nonce), csrf_field=CSRF_FIELD, error=error,
            open=False, path="/login")
        response = HTMLResponse(html, status_code=status)
        response.set_cookie(LOGIN_COOKIE, cookie, max_age=3600, httponly=True,
                            samesite="strict", path="/login",
                            secure=request.url.scheme == "https")
        return response

    async def login(request: Request) -> Response:
        if guard.open:
            return RedirectResponse("/", status_code=303)
        form = await _form(request)
        nonce = guard.login_nonce(request.cookies.get(LOGIN_COOKIE))
        if nonce is None or not guard.csrf_ok("login:" + nonce, form.get(CSRF_FIELD)):
            return _login_page(request, "The form expired: try again.", status=403)
        if not guard.token_ok(str(form.get("token") or "")):
            log.warning("console login refused: wrong token", extra={"route": "/login"})
            return _login_page(request, "That is not the console's token.", status=401)
        response = RedirectResponse("/", status_code=303)
        set_session(response, request, guard.new_session())
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    async def logout(request: Request, nonce: str) -> Response:
        response = RedirectResponse("/login" if not guard.open else "/", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # -- pages ----------------------------------------------------------------------------

    async def overview(request: Request, nonce: str) -> Response:
        status = await run_in_threadpool(console.overview)
        return page(request, "overview.html", nonce, status=200, overview=status,
                    title="Overview")

    async def events(request: Request, nonce: str) -> Response:
        if request.method == "GET":
            return page(request, "events.html", nonce, form=SearchForm().fields(), events=None,
                        cursor=None, title="Events")
        raw = {k: v for k, v in request.state.form.items() if k != CSRF_FIELD}
        try:
            form = SearchForm.parse(raw)
        except BadInput as exc:
            return page(request, "events.html", nonce, status=400, error=str(exc),
                        form={k: str(raw.get(k) or "") for k in SearchForm().fields()},
                        events=None, cursor=None, title="Events")
        found, cursor = await run_in_threadpool(console.search, form)
        return page(request, "events.html", nonce, form=form.fields(), events=found,
                    cursor=cursor, older=bool(form.after), title="Events")

    async def event(request: Request, nonce: str) -> Response:
        found = await run_in_threadpool(console.event, request.path_params["event_id"])
        if found is None:
            return page(request, "error.html", nonce, status=404,
                        message="No stored event has this id.")
        # sinks.browse gives the delivery's body as text, its headers without credentials.
        return page(request, "event.html", nonce, event=found, delivery=found["delivery"],
                    message=None, title=f"Event {found['id']}")

    async def replay(request: Request, nonce: str) -> Response:
        found = await run_in_threadpool(console.event, request.path_params["event_id"])
        if found is None:
            return page(request, "error.html", nonce, status=404,
                        message="No stored event has this id.")
        sink = str(request.state.form.get("sink") or "")
        outcome = await run_in_threadpool(console.replay, found, sink)
        return page(request, "event.html", nonce, event=(await run_in_threadpool(
            console.event, found["id"])) or found, delivery=found["delivery"],
            message=outcome, title=f"Event {found['id']}")

    async def record(request: Request, nonce: str) -> Response:
        p = request.path_params
        row, timeline = await run_in_threadpool(console.record, p["provider"],
                                                p["resource_type"], p["resource_id"])
        if row is None and not timeline:
            return page(request, "error.html", nonce, status=404,
                        message="No stored record or event is about this resource.")
        return page(request, "record.html", nonce, record=row, events=timeline,
                    provider=p["provider"], resource_type=p["resource_type"],
                    resource_id=p["resource_id"], title="Record")

    async def dead_letters(request: Request, nonce: str) -> Response:
        sink = request.query_params.get("sink") or None
        letters = await run_in_threadpool(console.dead_letters, sink)
        labels = await run_in_threadpool(console.sink_labels)
        return page(request, "dead_letters.html", nonce, letters=letters, sink=sink,
                    labels=labels, message=None, title="Dead letters")

    def dead_letter_action(action: str) -> Handler:
        async def act(request: Request, nonce: str) -> Response:
            form = request.state.form
            sink = str(form.get("sink") or "")
            ids = [str(i) for i in form.getlist("event_id")] if hasattr(form, "getlist") else []
            body: dict[str, Any] = {"sink": sink}
            if form.get("all") == "true":
                body["all"] = True
            else:
                body["event_ids"] = ids
            count = await run_in_threadpool(console.act_on_dead_letters, action, body)
            letters = await run_in_threadpool(console.dead_letters, sink or None)
            labels = await run_in_threadpool(console.sink_labels)
            verb = "re-queued" if action == "retry" else "discarded"
            return page(request, "dead_letters.html", nonce, letters=letters, sink=sink or None,
                        labels=labels, message=f"{verb} {count} on {sink}",
                        title="Dead letters")
        return act

    async def refused(request: Request, nonce: str) -> Response:
        records = await run_in_threadpool(console.refused)
        return page(request, "refused.html", nonce, records=records, title="Refused requests")

    # -- API ------------------------------------------------------------------------------

    async def api_overview(request: Request) -> Any:
        return await run_in_threadpool(console.overview)

    async def api_events(request: Request) -> Any:
        form = SearchForm.parse(dict(request.query_params))
        found, cursor = await run_in_threadpool(console.search, form)
        return {"events": [Console.api_event(e) for e in found], "next": cursor}

    async def api_event(request: Request) -> Any:
        found = await run_in_threadpool(console.event, request.path_params["event_id"])
        if found is None:
            return JSON({"error": "no stored event has this id"}, status_code=404)
        out = Console.api_event(found)
        delivery = found["delivery"]
        out["delivery"] = None if delivery is None else {
            key: delivery[key] for key in ("id", "received_at", "headers", "body")}
        return out

    async def api_record(request: Request) -> Any:
        p = request.path_params
        row, timeline = await run_in_threadpool(console.record, p["provider"],
                                                p["resource_type"], p["resource_id"])
        return {"record": row, "events": [Console.api_event(e) for e in timeline]}

    async def api_replay(request: Request) -> Any:
        body = await json_body(request)
        found = await run_in_threadpool(console.event, request.path_params["event_id"])
        if found is None:
            return JSON({"error": "no stored event has this id"}, status_code=404)
        outcome = await run_in_threadpool(console.replay, found, str(body.get("sink") or ""))
        return {"result": outcome}

    async def api_dead_letters(request: Request) -> Any:
        sink = request.query_params.get("sink") or None
        return {"dead_letters": await run_in_threadpool(console.dead_letters, sink)}

    def api_dead_letter_action(action: str) -> Api:
        async def act(request: Request) -> Any:
            body = await json_body(request)
            count = await run_in_threadpool(console.act_on_dead_letters, action, body)
            return {"retried" if action == "retry" else "discarded": count}
        return act

    async def api_refused(request: Request) -> Any:
        return {"refused": await run_in_threadpool(console.refused)}

    async def healthz(request: Request) -> Response:
        return JSON({"status": "ok"})

    routes = [
        Route("/", html_page(overview)),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", html_page(logout), methods=["POST"]),
        Route("/events", html_page(events), methods=["GET", "POST"]),
        Route("/events/{event_id}", html_page(event)),
        Route("/events/{event_id}/replay", html_page(replay), methods=["POST"]),
        Route("/records/{provider}/{resource_type}/{resource_id:path}", html_page(record)),
        Route("/dead-letters", html_page(dead_letters)),
        Route("/dead-letters/retry", html_page(dead_letter_action("retry")), methods=["POST"]),
        Route("/dead-letters/discard", html_page(dead_letter_action("discard")),
              methods=["POST"]),
        Route("/refused", html_page(refused)),
        Route("/healthz", healthz),
        Route("/api/overview", api(api_overview)),
        Route("/api/events", api(api_events)),
        Route("/api/events/{event_id}", api(api_event)),
        Route("/api/events/{event_id}/replay", api(api_replay), methods=["POST"]),
        Route("/api/records/{provider}/{resource_type}/{resource_id:path}", api(api_record)),
        Route("/api/dead-letters", api(api_dead_letters)),
        Route("/api/dead-letters/retry", api(api_dead_letter_action("retry")),
              methods=["POST"]),
        Route("/api/dead-letters/discard", api(api_dead_letter_action("discard")),
              methods=["POST"]),
        Route("/api/refused", api(api_refused)),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        if request.url.path.startswith("/api/"):
            return JSON({"error": "no such route"}, status_code=404)
        return HTMLResponse("Not found.\n", status_code=404)

    async def unavailable(request: Request, exc: Exception) -> Response:
        """Redis or Postgres away, refusing, or not migrated: the CLI's one line, which says
        what to fix (ingest.commands.errors), as a 503. Anything else is a defect (500)."""
        known = explain(exc)
        if known is None:
            raise exc
        line = known[0]
        log.warning("console request failed: %s", line,
                    extra={"route": getattr(request.scope.get("route"), "path", None)})
        if request.url.path.startswith("/api/"):
            return JSON({"error": line}, status_code=503)
        return HTMLResponse(env.get_template("error.html").render(
            message=line, open=guard.open, path=request.url.path, csrf="",
            csrf_field=CSRF_FIELD, sinks=list(settings.sinks)), status_code=503)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("console request failed: %s", type(exc).__name__,
                  extra={"route": getattr(request.scope.get("route"), "path", None)})
        # This handler runs outside SecurityHeaders: the headers come along here.
        if request.url.path.startswith("/api/"):
            return JSON({"error": "the console failed to answer; see its log"}, status_code=500,
                        headers=HEADERS)
        return HTMLResponse("The console failed to answer; see its log.\n", status_code=500,
                            headers=HEADERS)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            console.close()

    app = Starlette(routes=routes, middleware=[Middleware(SecurityHeaders, guard=guard)],
                    exception_handlers={404: not_found, 500: server_error,
                                        psycopg.Error: unavailable, RedisError: unavailable},
                    lifespan=lifespan)
    app.state.console = console
    app.state.guard = guard
    return app


def _session_ttl() -> int:
    from ingest.constants import CONSOLE_SESSION_TTL

    return CONSOLE_SESSION_TTL


async def _form(request: Request) -> ImmutableMultiDict[str, str]:
    """The POSTed form (the console's forms are all urlencoded: no file uploads, so no
    multipart parser), bounded."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            raise BadInput("the form is too large")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if body and kind != "application/x-www-form-urlencoded":
        raise BadInput("send the form as application/x-www-form-urlencoded")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=2000,
                          strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise BadInput("the form could not be read") from None
    return ImmutableMultiDict(pairs)
