"""The calling side: :class:`RpcClient` (threads, :mod:`.rpc`), :class:`AsyncRpcClient`
(asyncio, :mod:`.aio`), the circuit breaker (:mod:`.breaker`) and the accept-then-poll
response store (:mod:`.responses`)."""
from amqprpc.client.proxy import ServiceProxy
from amqprpc.client.rpc import RpcClient

__all__ = ["RpcClient", "ServiceProxy"]
