# examples/frameworks/flask_app.py  (run: flask --app examples/frameworks/flask_app.py run --with-threads)
import atexit
import threading

from flask import Flask, jsonify, request

from amqprpc import CallTimeout, RemoteError, RpcClient, ServiceUnavailable

app = Flask(__name__)
_client = None
_client_lock = threading.Lock()


def rpc() -> RpcClient:
    """The process's one RpcClient, shared by all request threads (it is thread-safe).
    Created on first use, so that a forking server (gunicorn) makes one per worker process."""
    global _client
    with _client_lock:
        if _client is None:
            _client = RpcClient(source="flask-web")   # broker from AMQPRPC_BROKER_URL
            atexit.register(_client.close)
        return _client


@app.get("/users/<user_id>")
def get_user(user_id):
    try:
        return rpc().call("user-service", "get_user", {"user_id": user_id}, timeout=5.0)
    except CallTimeout as exc:
        return {"error": str(exc)}, 504
    except ServiceUnavailable as exc:
        return {"error": str(exc)}, 503
    except RemoteError as exc:
        return {"error": exc.message, "error_type": exc.error_type}, 404 if exc.error_type == "UserNotFound" else 502


@app.post("/orders")
def create_order():
    cid = rpc().submit("order-service", "create_order", request.get_json(force=True))
    return jsonify(status="accepted", correlation_id=cid), 202
