"""amqprpc: calls and events between microservices over RabbitMQ, built on kombu."""
from .breaker import CircuitBreaker
from .client import RpcClient, ServiceProxy
from .aio import AsyncRpcClient
from .context import CallContext, current_call
from .errors import (
    CallTimeout, CircuitOpen, ConnectionLost, ContractError, PidFileError, PublishRefused, RemoteError,
    RemoteValidationError, ReplyTooLarge, RpcError, ServiceNotFound, ServiceUnavailable, StartCancelled, StartupError, TopologyMismatch, ValidationError,
)
from .retry import Retry
from .responses import AsyncResponseStore, ResponseStore
from .service import Service
from . import shared_client  # noqa: F401 - provides Service.client
from .topology import Topology
from .worker import Worker

__all__ = [
    "Service", "RpcClient", "Retry", "CircuitBreaker", "ServiceProxy", "AsyncRpcClient", "ResponseStore",
    "AsyncResponseStore", "Worker", "Topology", "current_call", "CallContext",
    "RpcError", "RemoteError", "CallTimeout", "ServiceUnavailable", "ConnectionLost", "CircuitOpen", "PublishRefused",
    "ReplyTooLarge", "ServiceNotFound", "TopologyMismatch", "StartupError", "StartCancelled", "PidFileError",
    "ValidationError", "RemoteValidationError", "ContractError",
]
# The one place the version is written: amqprpc/version.py (setup.cfg reads it there).
from .version import __version__
