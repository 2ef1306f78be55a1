# examples/frameworks/fastapi_app.py  (run: uvicorn --app-dir examples/frameworks fastapi_app:app)
import secrets
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, WebSocket

from amqprpc import AsyncResponseStore, AsyncRpcClient, CallTimeout, RemoteError, ServiceUnavailable


@asynccontextmanager
async def lifespan(app: FastAPI):
    # One client (one AMQP connection) and one reply store for every request of the process.
    async with AsyncRpcClient(source="web") as client:     # broker from AMQPRPC_BROKER_URL
        app.state.rpc, app.state.replies = client, AsyncResponseStore()   # AMQPRPC_REDIS_URL
        yield
        await app.state.replies.close()


app = FastAPI(lifespan=lifespan)


@app.get("/users/{user_id}")
async def get_user(user_id: str):
    try:
        return await app.state.rpc.call("user-service", "get_user", {"user_id": user_id}, timeout=5.0)
    except CallTimeout as exc:
        raise HTTPException(504, str(exc))
    except ServiceUnavailable as exc:          # nobody serves it, no broker, or circuit open
        raise HTTPException(503, str(exc))
    except RemoteError as exc:                 # the handler said no
        raise HTTPException(404 if exc.error_type == "UserNotFound" else 502, exc.message)


@app.post("/orders", status_code=202)
async def create_order(order: dict):
    cid = secrets.token_hex(16)                  # unguessable, and known before anything is sent
    await app.state.replies.mark_pending(cid)    # first: with Redis down this fails and nothing runs
    await app.state.rpc.submit("order-service", "create_order", order, correlation_id=cid)  # broker-confirmed
    return {"status": "accepted", "correlation_id": cid}


@app.websocket("/orders/ws")
async def order_result(websocket: WebSocket, cid: str):
    await websocket.accept()
    reply = await app.state.replies.wait(cid, timeout=30.0)   # the moment `amqprpc collector` stores it
    await websocket.send_json(reply or {"status": "pending"})
    await websocket.close()
