"""The dashboard's FastAPI application: one page (static HTML and JS, updated by
server-sent events every second) and the JSON API under ``/api/`` it reads, for scripts too.

``GET /api/snapshot`` everything at once; ``/api/services``, ``/api/queues``,
``/api/actions``, ``/api/breakers``, ``/api/dead-letters`` its parts;
``/api/dead-letters/{service}`` browses a service's dead letters; ``/api/events`` is the
event stream (one ``snapshot`` event per refresh); ``/api/csrf`` gives a script its CSRF
token; ``POST /api/dead-letters/{service}/replay`` (JSON ``action_id``, optional
``message_id``) and ``/purge`` change things (see :mod:`~amqprpc.dashboard.auth` for
what they need); ``/api/recent-actions`` lists the last changes and who made them.
"""
from __future__ import annotations

import asyncio
import json
import pathlib
import urllib.parse
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from amqprpc import logs
from amqprpc.dashboard.auth import AUTH_COOKIE, CSRF_HEADER, SESSION_COOKIE, Auth
from amqprpc.dashboard.collect import Collector
from amqprpc.dashboard.deadletters import DuplicateAction, Operations, browse
from amqprpc.version import __version__

log = logs.get_logger("amqprpc.dashboard")
HERE = pathlib.Path(__file__).resolve().parent
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
SECTIONS = {"services": "services", "queues": "queues", "actions": "actions", "breakers": "breakers",
            "dead-letters": "dead_letters"}


def create_app(collector: Collector, operations: Operations, auth: Auth, *, broker_url: str,
               browse_limit: int = 50) -> FastAPI:
    """The application; ``collector`` is started and stopped by whoever runs it."""
    app = FastAPI(title="amqprpc dashboard", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    page = (HERE / "templates" / "index.html").read_text(encoding="utf-8")

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        client = request.client.host if request.client else "?"
        if not auth.host_allowed(request.headers.get("host", "")):
            return _refused(request, 403, "host not allowed", client)
        query_token = request.query_params.get("token")
        if query_token is not None and auth.mode == "token" and request.method == "GET":
            if not auth.token_matches(query_token):
                return _refused(request, 401, "authentication required", client, auth.challenge())
            # Take the token once, keep an HMAC of it in a cookie, and drop it from the address bar.
            query = urllib.parse.urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            answer: Response = RedirectResponse(request.url.path + (f"?{query}" if query else ""), status_code=303)
            answer.set_cookie(AUTH_COOKIE, auth.auth_cookie(), httponly=True, samesite="strict",
                              secure=request.url.scheme == "https")
            return answer
        who = auth.identify(request.headers, request.cookies, client)
        if who is None:
            return _refused(request, 401, "authentication required", client, auth.challenge())
        if request.method not in SAFE_METHODS:
            origin = request.headers.get("origin")
            if origin and urllib.parse.urlsplit(origin).netloc != request.headers.get("host"):
                return _refused(request, 403, "cross-origin request refused", client)
            if not auth.csrf_valid(request.cookies.get(SESSION_COOKIE), request.headers.get(CSRF_HEADER)):
                return _refused(request, 403, "missing or invalid CSRF token (reload the page)", client)
        request.state.who = who
        response = await call_next(request)
        if request.url.path != "/api/events":
            log.debug("dashboard request", method=request.method, path=request.url.path,
                      status=response.status_code, client=client)
        return response

    def with_session(request: Request, answer: Callable[[str], Response]) -> Response:
        """``answer(csrf_token)``, with a new session cookie when the browser has none."""
        session = request.cookies.get(SESSION_COOKIE) or ""
        fresh = not session
        if fresh:
            session = auth.new_session()
        response = answer(auth.csrf_token(session))
        if fresh:
            response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
        return response

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> Response:
        def render(token: str) -> Response:
            return HTMLResponse(page.replace("{{csrf}}", token).replace("{{version}}", __version__), headers={
                "cache-control": "no-store", "x-frame-options": "DENY", "content-security-policy":
                    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                    "frame-ancestors 'none'"})
        return with_session(request, render)

    @app.get("/api/csrf")
    def csrf(request: Request) -> Response:
        return with_session(request, lambda token: JSONResponse({"csrf": token}))

    @app.get("/api/snapshot")
    def snapshot() -> dict[str, Any]:
        return collector.snapshot()

    def part(key: str) -> Callable[[], Any]:
        def read() -> Any:
            return collector.snapshot().get(key)
        return read

    for path, key in SECTIONS.items():
        app.add_api_route(f"/api/{path}", part(key), methods=["GET"], name=key)

    @app.get("/api/dead-letters/{service}")
    def dead_letters(service: str, limit: int = 20) -> dict[str, Any]:
        try:
            return browse(service, max(0, min(limit, browse_limit)), broker_url)
        except Exception as exc:  # noqa: BLE001 - broker trouble: 503 with the reason (redacted)
            raise HTTPException(503, _reason(exc)) from None

    @app.get("/api/recent-actions")
    def recent_actions() -> list[dict[str, Any]]:
        return list(operations.recent)

    async def change(what: str, service: str, request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("action_id"), str):
            raise HTTPException(400, "send a JSON object with an action_id")
        parameters = {key: body[key] for key in ("message_id",) if isinstance(body.get(key), str)}
        try:
            result = await run_in_threadpool(operations.run, what, service, body["action_id"],
                                             request.state.who, parameters)
        except KeyError:
            raise HTTPException(404, f"no such action: {what}") from None
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        except DuplicateAction:
            raise HTTPException(409, "this action is already being carried out") from None
        await run_in_threadpool(collector.refresh)  # the page sees the change now, not at the next poll
        return JSONResponse(result, status_code=200 if result.get("ok") else 502)

    @app.post("/api/dead-letters/{service}/replay")
    async def replay(service: str, request: Request) -> JSONResponse:
        return await change("replay", service, request)

    @app.post("/api/dead-letters/{service}/purge")
    async def purge(service: str, request: Request) -> JSONResponse:
        return await change("purge", service, request)

    @app.post("/api/{what}/{service}")
    async def other_change(what: str, service: str, request: Request) -> JSONResponse:
        # Extension point: a feature registers operations.handlers[what] (e.g. "revoke").
        return await change(what, service, request)

    @app.get("/api/events")
    async def events(request: Request) -> StreamingResponse:
        async def stream() -> AsyncIterator[str]:
            version = -1
            idle = 0.0
            yield "retry: 1000\n\n"
            while not collector.stopping:
                current = collector.snapshot()
                if current["version"] != version:
                    version = current["version"]
                    idle = 0.0
                    yield f"event: snapshot\ndata: {json.dumps(current, separators=(',', ':'))}\n\n"
                elif idle >= 15.0:
                    idle = 0.0
                    yield ": keep-alive\n\n"
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.2)
                idle += 0.2

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    return app


def _refused(request: Request, status: int, why: str, client: str, headers: dict[str, str] | None = None) -> Response:
    log.info("dashboard request refused", method=request.method, path=request.url.path, status=status,
             client=client, reason=why)
    return JSONResponse({"detail": why}, status_code=status, headers=headers)


def _reason(exc: BaseException) -> str:
    from amqprpc.config import redact
    return redact(f"{type(exc).__name__}: {exc}")
