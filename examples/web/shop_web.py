"""The shop's web tier as an ASGI app (FastAPI): accept, then push or poll.

- ``POST /api/orders``: mark the order pending (owned by the caller's session), THEN submit
  it to order-service ``create_order`` under a correlation id from ``secrets`` (broker-
  confirmed, the reply goes to the collector queue), answer ``202 {"status": "accepted",
  "correlation_id"}`` with the session cookie. Never waits on a consumer. An order answered
  503 was not submitted (Redis down: nothing sent; nobody serves it: the broker returned it),
  so a customer who retries never pays twice; a submit whose broker confirm did not come in
  time answers 504 with the correlation id (it may still run: follow it as any other).
- ``WS /ws?cid=``: sends ``{"status": "done", "result"}`` or ``{"status": "failed", "error",
  "error_type"}`` the moment the collector stored the reply, then closes. After ``ws_wait``
  seconds without a reply it sends ``{"status": "pending"}`` and closes (the page opens a new
  one). Every socket of the process waits through ONE Redis pub/sub connection
  (:class:`reply_hub.ReplyHub`), however many are open.
- ``GET /api/status?cid=[&wait=S]``: the same answer by polling (``pending`` while it is
  to come); ``wait`` holds the request until the reply is stored or S seconds (long poll).
- ``GET /api/orders/{order_id}``: synchronous: awaits ``get_order`` through the shared
  :class:`amqprpc.AsyncRpcClient`, its timeout answered 504, an unavailable service 503.
- ``GET /``: the page (``static/index.html``): WebSocket first, polling when it fails.

Who may read an order: the session that placed it. ``POST /api/orders`` sets the cookie
``shop_session`` (a ``secrets`` token, HttpOnly, SameSite=Strict) and stores its SHA-256
beside the pending mark; the socket and the poll answer only a request carrying that
cookie, anyone else gets the 404 of an unknown order (a correlation id alone, guessed or
leaked, reads nothing).

Errors: an unknown or expired cid (or another session's) is 404 (the socket's upgrade is
refused with 404), a malformed one 400, a body over ``max_body`` bytes 413, the broker or
Redis down 503 with a one-line reason. A socket whose client goes away stops waiting at once.

The :class:`AsyncRpcClient`, the :class:`AsyncResponseStore` and the hub are opened in the
app's lifespan and shared by every request. ``server.py`` runs this app under uvicorn.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import pathlib
import re
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

import redis
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse

from amqprpc import AsyncResponseStore, AsyncRpcClient, CallTimeout, RemoteError, ServiceUnavailable, Topology, logs
from amqprpc.config import redact
from amqprpc.client.responses import DEFAULT_PENDING_TTL, STORED, UNKNOWN, Lookup

from reply_hub import ReplyHub

log = logs.get_logger("amqprpc.examples.web")

STATIC = pathlib.Path(__file__).resolve().parent / "static"
_CID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
SESSION_COOKIE = "shop_session"
_SESSION = re.compile(r"^[A-Za-z0-9_-]{32,128}$")


@dataclass
class Settings:
    """What the app talks to, and its limits (``server.py`` fills it from its options)."""
    service: str = "order-service"
    action: str = "create_order"
    read_action: str = "get_order"
    broker_url: Optional[str] = None
    redis_url: Optional[str] = None
    collector_queue: Optional[str] = None
    key_prefix: Optional[str] = None
    call_timeout: float = 5.0     # the synchronous endpoint's call, and submit's broker confirm
    ws_wait: float = 30.0         # longest a socket (or a long poll) waits before answering pending
    pending_ttl: float = DEFAULT_PENDING_TTL
    max_body: int = 64 * 1024     # bytes; an order is a few hundred


class Shop:
    """What the handlers share: one client, one store, one hub, the settings."""

    def __init__(self, client: AsyncRpcClient, store: AsyncResponseStore, hub: ReplyHub, settings: Settings):
        self.client, self.store, self.hub, self.settings = client, store, hub, settings

    def owner_key(self, cid: str) -> str:
        """Where the SHA-256 of the placing session's cookie is kept, beside the pending mark."""
        return f"{self.store.prefix}owner:{cid}"

    async def accept(self, cid: str, session: str) -> None:
        """Mark ``cid`` pending and owned by ``session``, in one round trip, before it is sent."""
        ttl_ms = max(1, int(self.settings.pending_ttl * 1000))
        async with self.store.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.store.pending_key(cid), b"1", px=ttl_ms)
            pipe.set(self.owner_key(cid), _digest(session), px=ttl_ms)
            await pipe.execute()

    async def forget(self, cid: str) -> None:
        """Undo :meth:`accept` for an order that was not sent after all."""
        await self.store.redis.delete(self.store.pending_key(cid), self.owner_key(cid))

    async def lookup(self, cid: str, session: str | None) -> Lookup:
        """As ``store.lookup``, but ``unknown`` to any session other than the one that placed it."""
        async with self.store.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.store.key(cid))
            pipe.get(self.store.pending_key(cid))
            pipe.get(self.owner_key(cid))
            raw, pending, owner = await pipe.execute()
        if session is None or owner is None or not hmac.compare_digest(owner, _digest(session)):
            return Lookup(UNKNOWN)
        return self.store._lookup(raw, pending)


class HttpError(Exception):
    def __init__(self, status: int, error: str, status_word: str = "error"):
        super().__init__(error)
        self.status, self.error, self.status_word = status, error, status_word


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        topology = Topology(collector_queue=settings.collector_queue) if settings.collector_queue else None
        client = AsyncRpcClient("shop-web", broker_url=settings.broker_url,
                                **({"topology": topology} if topology else {}))
        try:
            await client.connect()
        except ServiceUnavailable as exc:  # the app does not start; server.py says why in one line
            app.state.startup_error = _one_line(exc)
            raise
        store = AsyncResponseStore(settings.redis_url, prefix=settings.key_prefix)
        hub = ReplyHub(store)
        hub.start()
        app.state.shop = Shop(client, store, hub, settings)
        try:
            yield
        finally:
            await hub.close()
            await store.close()
            await client.close()

    app = FastAPI(title="amqprpc shop", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.middleware("http")(_log_request)

    @app.exception_handler(HttpError)
    async def http_error(_request: Request, exc: HttpError) -> JSONResponse:
        return _error(exc.status, exc.error, exc.status_word)

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        return _unavailable(request.url.path, "Redis", exc)

    @app.exception_handler(ServiceUnavailable)
    async def service_unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
        return _unavailable(request.url.path, None, exc)  # nobody serves it, or no broker: the text says which

    @app.exception_handler(CallTimeout)
    async def timed_out(_request: Request, exc: CallTimeout) -> JSONResponse:
        return _error(504, _one_line(exc), "timeout")

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.post("/api/orders", status_code=202)
    async def create_order(request: Request) -> JSONResponse:
        shop: Shop = request.app.state.shop
        order = _json_object(await _read_body(request, settings.max_body))
        session = _session(request.cookies.get(SESSION_COOKIE)) or secrets.token_urlsafe(32)
        cid = secrets.token_hex(16)  # unguessable: amqprpc's own ids are unique, not secret
        await shop.accept(cid, session)  # Redis down: 503 here, and nothing was sent
        try:
            await shop.client.submit(settings.service, settings.action, order, timeout=settings.call_timeout,
                                     correlation_id=cid)
        except CallTimeout as exc:  # sent, not confirmed: it may still run, so it stays followable
            log.warning("order not confirmed in time", correlation_id=cid, error=_one_line(exc))
            return _with_session(JSONResponse({"status": "timeout", "correlation_id": cid,
                                               "error": f"not confirmed in time, it may still run: {_one_line(exc)}"},
                                              status_code=504), session, request)
        except Exception:  # refused or never sent: it will not run, so it was never accepted
            await asyncio.shield(shop.forget(cid))
            raise
        log.info("order accepted", correlation_id=cid, service=settings.service, action=settings.action)
        return _with_session(JSONResponse({"status": "accepted", "correlation_id": cid}, status_code=202),
                             session, request)

    @app.get("/api/status")
    async def status(request: Request, cid: str = "", wait: float = 0.0) -> dict:
        shop: Shop = request.app.state.shop
        found = await shop.lookup(_valid_cid(cid), _session(request.cookies.get(SESSION_COOKIE)))
        if found.state == UNKNOWN:
            raise HttpError(404, "unknown or expired correlation id")
        reply = found.reply
        if found.state != STORED and wait > 0:
            reply = await shop.hub.wait(cid, min(wait, settings.ws_wait))
        return _status_doc(cid, reply)

    @app.get("/api/orders/{order_id}")
    async def get_order(request: Request, order_id: str) -> Any:
        shop: Shop = request.app.state.shop
        try:
            return await shop.client.call(settings.service, settings.read_action, {"order_id": order_id},
                                          timeout=settings.call_timeout)
        except RemoteError as exc:
            status = 404 if exc.error_type == "OrderNotFound" else 502
            return JSONResponse({"status": "failed", "error": exc.message, "error_type": exc.error_type},
                                status_code=status)

    @app.websocket("/ws")
    async def push(websocket: WebSocket, cid: str = "") -> None:
        shop: Shop = websocket.app.state.shop
        try:
            found = await shop.lookup(_valid_cid(cid), _session(websocket.cookies.get(SESSION_COOKIE)))
            if found.state == UNKNOWN:
                raise HttpError(404, "unknown or expired correlation id")
        except HttpError as exc:
            log.info("websocket refused", correlation_id=cid, status=exc.status, error=exc.error)
            return await websocket.send_denial_response(_error(exc.status, exc.error, exc.status_word))
        except redis.RedisError as exc:
            return await websocket.send_denial_response(_unavailable("/ws", "Redis", exc))
        await websocket.accept()
        log.info("websocket open", correlation_id=cid, state=found.state)
        reply = found.reply
        if found.state != STORED:
            try:
                reply = await _wait_unless_gone(websocket, shop.hub.wait(cid, settings.ws_wait))
            except WebSocketDisconnect:
                log.info("websocket gone while waiting", correlation_id=cid)
                return
            except redis.RedisError as exc:
                await websocket.send_json({"status": "unavailable", "error": f"Redis: {_one_line(exc)}"})
                return await websocket.close(1011)
        await websocket.send_json(_status_doc(cid, reply))
        await websocket.close()

    return app


async def _wait_unless_gone(websocket: WebSocket, wait: Any) -> Any:
    """Await ``wait``, unless the client goes away first: then cancel it (releasing its
    subscription) and raise WebSocketDisconnect. The client never sends anything; whatever
    it does send is ignored."""
    waiting = asyncio.ensure_future(wait)
    try:
        while True:
            receiving = asyncio.ensure_future(websocket.receive())
            done, _ = await asyncio.wait({waiting, receiving}, return_when=asyncio.FIRST_COMPLETED)
            if waiting in done:
                receiving.cancel()
                return waiting.result()
            if receiving.result()["type"] == "websocket.disconnect":
                raise WebSocketDisconnect()
    finally:
        if not waiting.done():
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)


def _session(value: str | None) -> str | None:
    """The session cookie's value when it is one this app could have made, else None."""
    return value if value is not None and _SESSION.match(value) else None


def _digest(session: str) -> bytes:
    return hashlib.sha256(session.encode()).hexdigest().encode()


def _with_session(response: JSONResponse, session: str, request: Request) -> JSONResponse:
    response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="strict", path="/",
                        secure=request.url.scheme == "https")
    return response


def _status_doc(cid: str, reply: Any) -> dict:
    if reply is None:
        return {"status": "pending", "correlation_id": cid}
    if reply.get("success"):
        return {"status": "done", "correlation_id": cid, "result": reply.get("data")}
    return {"status": "failed", "correlation_id": cid, "error": reply.get("error"),
            "error_type": reply.get("error_type")}


def _valid_cid(cid: str) -> str:
    if not _CID.match(cid):
        raise HttpError(400, "cid is missing or malformed")
    return cid


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` bytes without reading the rest (whether
    the client declared its length or streams it chunked)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"the body is over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HttpError(413, f"the body is over {limit} bytes")
    return bytes(body)


def _json_object(body: bytes) -> dict:
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise HttpError(400, "the body must be a JSON object")
    return doc


def _one_line(exc: BaseException) -> str:
    text = redact(str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _error(status: int, error: str, status_word: str = "error") -> JSONResponse:
    return JSONResponse({"status": status_word, "error": error}, status_code=status)


def _unavailable(path: str, what: str | None, exc: BaseException) -> JSONResponse:
    reason = f"{what}: {_one_line(exc)}" if what else _one_line(exc)
    log.warning("dependency unavailable", path=path, error=reason)
    return _error(503, reason, "unavailable")


async def _log_request(request: Request, call_next: Any) -> Any:
    """One log line per HTTP request (WebSockets log their own): the request log."""
    response = await call_next(request)
    log.info("http request", method=request.method, path=request.url.path, query=request.url.query,
             status=response.status_code)
    return response
