"""What became of one consumed message, and of one message a client sent: typed, decided once.

The worker decides a delivery's :class:`Outcome` in one place; its stats, its log lines,
the metrics and every middleware's ``after_handle`` read that one value (no second parse of
the body, no guessing success from the reply's bytes). The client does the same for what
it sent with :class:`CallOutcome` (``after_settle``).
"""
from __future__ import annotations

from enum import Enum
from typing import NamedTuple


class OutcomeKind(str, Enum):
    """What the worker did with a delivery. The values are the metric labels."""

    REPLIED = "replied"            # a call's handler returned; the result went back
    FAILED = "failed"              # an error reply (handler raised, unknown action, reply too large)
    RETRIED = "retried"            # the handler raised; a copy waits in a delay queue for another attempt
    DEAD_LETTERED = "dead_lettered"  # given up on: final failure nobody waits for, poison message, worker error
    REFUSED = "refused"            # not a valid message (bad JSON, too large, undecodable): answered or dead-lettered
    EXPIRED = "expired"            # its deadline had passed: dropped unrun (or answered with the last retry's error)
    RECOUNTED = "recounted"        # redelivered from a classic queue: re-published with its delivery count, runs later
    DONE = "done"                  # an event (or a cast's) handler returned
    REVOKED = "revoked"            # revoked (client.revoke): acked unrun, a call answered with a Revoked error
    DELAYED = "delayed"            # came before its ETA (another clock): back to wait in the broker, unrun
    RATE_LIMITED = "rate_limited"  # over its handler's rate limit: waits in the broker for its reserved slot
    DEDUPLICATED = "deduplicated"  # already ran (its idempotency key, or a periodic tick published twice): acked unrun
    SKIPPED = "skipped"            # acked unrun: a workflow step's second copy, or a step of a failed/revoked workflow


class Outcome(NamedTuple):
    """``kind``; ``error_type`` the exception class name (or BadMessage, UnknownAction, ...)
    when it failed; ``duration`` seconds from taking the delivery to deciding;
    ``dead_lettered`` whether a copy went to the service's dead-letter queue (also true for
    a refused message nobody could be answered about)."""

    kind: OutcomeKind
    error_type: str | None = None
    duration: float = 0.0
    dead_lettered: bool = False

    # A NamedTuple (not a frozen dataclass): one is made per delivery, on the hot path.
    @property
    def ok(self) -> bool:
        return self.kind is OutcomeKind.REPLIED or self.kind is OutcomeKind.DONE


# CallOutcome kinds (client side); plain strings, they are labels too.
OK = "ok"
ERROR = "error"                # the handler failed (RemoteError), or the request could not be encoded
TIMEOUT = "timeout"            # no answer (or no broker confirm) in time
UNAVAILABLE = "unavailable"    # no queue bound for it, or no broker / connection lost
CIRCUIT_OPEN = "circuit_open"  # the breaker refused (nothing was published; after_settle only, no before_publish)
REFUSED = "refused"            # the broker nacked the publish


class CallOutcome(NamedTuple):
    """How a call settled (answered, failed, timed out), or a cast/event/submit was
    confirmed or refused: ``kind`` one of ``ok``, ``error``, ``timeout``, ``unavailable``,
    ``circuit_open``, ``refused``; ``error_type`` the exception's class name (for a
    RemoteError: the remote error type); ``duration`` seconds since ``Outgoing.started``."""

    kind: str
    error_type: str | None = None
    duration: float = 0.0
