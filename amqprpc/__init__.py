"""amqprpc: calls and events between microservices over RabbitMQ, built on kombu."""
from .breaker import CircuitBreaker
from .client import RpcClient, ServiceProxy
from .aio import AsyncRpcClient
from .errors import CallTimeout, CircuitOpen, PublishRefused, RemoteError, RpcError, ServiceUnavailable
from .retry import Retry
from .responses import AsyncResponseStore, ResponseStore
from .service import Service
from .topology import Topology
from .worker import Worker

__all__ = [
    "Service", "RpcClient", "Retry", "CircuitBreaker", "ServiceProxy", "AsyncRpcClient", "ResponseStore",
    "AsyncResponseStore", "Worker", "Topology",
    "RpcError", "RemoteError", "CallTimeout", "ServiceUnavailable", "CircuitOpen", "PublishRefused",
]
__version__ = "0.1.0"
