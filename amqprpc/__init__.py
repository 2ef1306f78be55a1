"""amqprpc: calls and events between microservices over RabbitMQ, built on kombu."""
from amqprpc.caller import AsyncCaller, Caller
from amqprpc.client.breaker import CircuitBreaker
from amqprpc.client.proxy import ServiceProxy
from amqprpc.client.rpc import RpcClient
from amqprpc.client.aio import AsyncRpcClient
from amqprpc.context import CallContext, current_call
from amqprpc.errors import (
    AccessRefused, CallTimeout, CircuitOpen, ConnectionLost, ContractError, MessageTooLarge, PidFileError,
    PublishRefused, RemoteError,
    RemoteValidationError, ReplyTooLarge, Revoked, RpcError, ServiceNotFound, ServiceUnavailable, StartCancelled,
    StartupError, TimeLimitExceeded, TopologyMismatch, ValidationError, WorkflowFailed,
)
from amqprpc.workflow.canvas import chain, chord, group, task
from amqprpc.retry import Retry
from amqprpc.client.responses import AsyncResponseStore, ResponseStore
from amqprpc.service import Service
from amqprpc.middleware import shared_client  # noqa: F401 - provides Service.client
from amqprpc.wire.topology import Topology
from amqprpc.server.worker import Worker

__all__ = [
    "Service", "RpcClient", "Retry", "CircuitBreaker", "ServiceProxy", "AsyncRpcClient", "ResponseStore",
    "AsyncResponseStore", "Worker", "Topology", "current_call", "CallContext",
    "RpcError", "RemoteError", "CallTimeout", "ServiceUnavailable", "ConnectionLost", "CircuitOpen", "PublishRefused",
    "ReplyTooLarge", "ServiceNotFound", "TopologyMismatch", "StartupError", "StartCancelled", "PidFileError",
    "ValidationError", "RemoteValidationError", "ContractError", "Caller", "AsyncCaller", "Revoked", "WorkflowFailed",
    "task", "chain", "group", "chord", "AccessRefused", "MessageTooLarge", "TimeLimitExceeded",
]
# The one place the version is written: amqprpc/version.py (setup.cfg reads it there).
from amqprpc.version import __version__ as __version__
