"""A service's contract as an AsyncAPI 3.0 document: what a peer in any language (the PHP
services) needs to call it, and to read what comes back.

One document per service (``amqprpc asyncapi SERVICE``):

- ``servers``: the broker, from the broker URL (host, port, vhost; never the credentials);
- channel ``request``: ``service.exchange`` (direct) with routing key ``request.{svc}``,
  into the durable queue ``service.{svc}.request`` that the service's workers share;
- one ``receive`` operation per action, its message the request envelope with the action's
  payload schema (from the handler's annotations; ``{"type": "object"}`` for a dict
  handler), and its **reply** (AsyncAPI 3's Operation Reply, which FastStream cannot
  document): sent to the queue named by the request's ``reply_to`` property, a success
  envelope with the result's schema, or the error envelope;
- one ``receive`` operation per event subscription, on ``event.exchange`` (topic) with the
  handler's pattern;
- one ``send`` operation per event the service publishes (:meth:`Service.publishes`), on
  ``event.exchange`` with the event's name as routing key, its message the event envelope
  with the declared payload model (any object when none was declared);
- ``components.schemas``: the wire envelope (request, success and error replies) and the
  payload models.

Every name comes from :class:`~amqprpc.wire.topology.Topology`, so a namespaced or renamed
layout documents itself. JSON by default; YAML when PyYAML is installed.
"""
from __future__ import annotations

import copy
import inspect
import json
import sys
from typing import Any
from urllib.parse import unquote, urlsplit

from amqprpc.version import __version__
from amqprpc.contracts import Contract, contract_of_handler, event_contract, unwrap
from amqprpc.service import Service
from amqprpc.wire.topology import DEFAULT_TOPOLOGY, Topology

ASYNCAPI_VERSION = "3.0.0"
AMQP_BINDING = "0.3.0"
_SCHEMAS = "#/components/schemas/"

# Error types the worker itself answers with (a handler's own exceptions add their class names).
WORKER_ERROR_TYPES = {
    "ValidationError": "the payload does not fit the action's schema; the message names each failing field, "
                       "the errors list has them one by one",
    "UnknownAction": "the service has no such action",
    "BadMessage": "the request is not a valid envelope (not JSON, no action, payload not an object, ...)",
    "CallTimeout": "the request's deadline passed further down the chain",
    "ReplyTooLarge": "the result is larger than the worker's max_reply_bytes",
    "Revoked": "the request was revoked (amqprpc revoke) before it ran, or its handler stopped when it saw that",
}

_REQUEST_ENVELOPE = {
    "type": "object",
    "description": "The request envelope (requests, casts and events alike). Extra fields are ignored.",
    "required": ["action", "payload"],
    "properties": {
        "message_id": {"type": "string", "description": "Unique id of this message (32 hex characters)."},
        "source_service": {"type": "string", "description": "The sender's name."},
        "target_service": {"type": ["string", "null"], "description": "The service called (null for events)."},
        "action": {"type": "string", "description": "The action called, or the event's name."},
        "timestamp": {"type": "integer", "description": "When it was sent, epoch seconds."},
        "correlation_id": {"type": "string", "description": "Echoed in the reply; equals message_id."},
        "reply_to": {"type": ["string", "null"],
                     "description": "The caller's reply queue; null for casts and events (no reply)."},
        "headers": {
            "type": "object",
            "description": "Call context carried from hop to hop.",
            "properties": {
                "trace_id": {"type": "string", "description": "Shared by every hop of one request."},
                "parent_id": {"type": "string", "description": "correlation_id of the request that made this one."},
                "deadline": {"type": "number",
                             "description": "Epoch seconds (sender's clock) after which nobody waits: the request "
                                            "is dropped unrun. Read only when timeout_ms is absent."},
                "timeout_ms": {"type": "integer",
                               "description": "Milliseconds the sender had left when it sent the request; the "
                                              "receiver counts them from arrival on its own clock."},
                "idempotency_key": {"type": "string",
                                    "description": "The handler runs at most once per key and service within its "
                                                   "dedup window (24 h); a repeat gets the first run's reply."},
            },
        },
        "payload": {"type": "object", "description": "The action's input: see each operation's message."},
    },
}
_SUCCESS_ENVELOPE = {
    "type": "object",
    "description": "A successful reply. data is what the handler returned.",
    "required": ["success", "data"],
    "properties": {
        "success": {"const": True},
        "data": {"description": "The action's result: see each operation's reply message."},
        "message_id": {"type": ["string", "null"], "description": "The request's message_id."},
    },
}
_ERROR_ENVELOPE = {
    "type": "object",
    "description": "A failed call: no traceback travels, only the error's text and type.",
    "required": ["success", "error", "error_type"],
    "properties": {
        "success": {"const": False},
        "error": {"type": "string", "description": "What went wrong, for people (a ValidationError lists "
                                                   "each failing field as 'path: reason')."},
        "error_type": {"type": "string", "description": "The error's class name. The worker's own: " + "; ".join(
            f"{name} ({why})" for name, why in WORKER_ERROR_TYPES.items()) + ". Others are the handler's exceptions."},
        "message_id": {"type": ["string", "null"], "description": "The request's message_id."},
        "errors": {
            "type": "array", "maxItems": 50,
            "description": "Optional; with a ValidationError: each failing field (at most 50; the error text "
                           "counts them all).",
            "items": {"type": "object", "properties": {
                "loc": {"type": "string", "maxLength": 300, "description": "Path of the field: items.0.quantity."},
                "msg": {"type": "string", "maxLength": 300, "description": "Why it does not fit."},
                "type": {"type": "string", "maxLength": 300, "description": "The check that failed: greater_than."},
            }},
        },
    },
}
# AMQP basic properties (not application headers), as a peer sets and reads them.
_REQUEST_PROPERTIES = {
    "type": "object",
    "description": "AMQP basic properties of the request (not application headers).",
    "properties": {
        "content_type": {"const": "application/json"},
        "message_id": {"type": "string"},
        "correlation_id": {"type": "string", "description": "Echoed as the reply's correlation_id."},
        "reply_to": {"type": "string", "description": "The queue the reply is published to (through the default "
                                                      "exchange); absent for casts: no reply is sent."},
        "delivery_mode": {"const": 2},
        "expiration": {"type": "string", "description": "The call's timeout in ms: an unanswered request "
                                                        "expires from the queue."},
    },
}
_REPLY_PROPERTIES = {
    "type": "object",
    "description": "AMQP basic properties of the reply.",
    "properties": {
        "content_type": {"const": "application/json"},
        "correlation_id": {"type": "string", "description": "The request's correlation_id."},
        "delivery_mode": {"const": 2},
    },
}


class Schemas:
    """``components.schemas`` being built: pydantic's ``$defs`` moved in, a name taken twice
    for different schemas renamed (``Name2``) along with the references to it."""

    def __init__(self) -> None:
        self.found: dict[str, Any] = {}

    def add(self, schema: dict[str, Any]) -> dict[str, Any]:
        """``schema`` (refs as ``#/components/schemas/{model}``) with its ``$defs`` moved
        here; a model's own schema (it has a title) is referenced rather than inlined."""
        schema = copy.deepcopy(schema)
        defs = schema.pop("$defs", {})
        renames: dict[str, str] = {}
        for name, definition in defs.items():
            renames[name] = self._place(name, definition)
        if renames:
            schema = _rename_refs(schema, renames)
            for new in renames.values():
                self.found[new] = _rename_refs(self.found[new], renames)
        title = schema.get("title")
        if schema.get("type") == "object" and isinstance(title, str) and title.isidentifier():
            return {"$ref": _SCHEMAS + self._place(title, schema)}
        return schema

    def _place(self, name: str, schema: Any) -> str:
        candidate, n = name, 1
        while candidate in self.found and self.found[candidate] != schema:
            n += 1
            candidate = f"{name}{n}"
        self.found[candidate] = schema
        return candidate


def document(service: Service, *, broker_url: str | None = None,
             topology: Topology = DEFAULT_TOPOLOGY) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``service`` (a dict, ready for ``json.dumps``).
    Raises ContractError for annotations that cannot be described (as the worker would)."""
    service.check()
    svc = service.name
    schemas = Schemas()
    servers, vhost = _servers(broker_url)
    exchange = {"name": topology.service_exchange, "type": "direct", "durable": True, "autoDelete": False,
                "vhost": vhost}
    request_queue = topology.request_queue_format.format(service=svc)
    channels: dict[str, Any] = {
        "request": {
            "address": topology.request_key(svc),
            "title": f"Requests to {svc}",
            "description": (f"Publish to the exchange '{topology.service_exchange}' (direct) with routing key "
                            f"'{topology.request_key(svc)}'; it lands in the durable queue '{request_queue}' "
                            f"that every worker of {svc} consumes. Publish with mandatory set: a request nobody "
                            "can take comes back at once instead of being dropped."),
            "messages": {},
            "bindings": {"amqp": {"is": "routingKey", "exchange": exchange, "bindingVersion": AMQP_BINDING}},
            "x-amqprpc-queue": {"name": request_queue, "durable": True},
        },
        "reply": {
            "address": None,
            "title": "Replies",
            "description": ("The caller's own reply queue, named by the request's reply_to property: the worker "
                            "publishes the reply to it through the default exchange, with the request's "
                            "correlation_id."),
            "messages": {"error": {"$ref": "#/components/messages/error"}},
            "bindings": {"amqp": {"is": "routingKey", "exchange": {"name": "", "type": "default", "vhost": vhost},
                                  "bindingVersion": AMQP_BINDING}},
        },
    }
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {"error": {
        "name": "error", "title": "Error reply", "contentType": "application/json",
        "summary": "The call failed: the handler raised, or the request was refused.",
        "headers": _REPLY_PROPERTIES, "correlationId": {"location": "$message.header#/correlation_id"},
        "payload": {"$ref": _SCHEMAS + "ErrorReply"}}}
    schemas.found.update({"RequestEnvelope": _REQUEST_ENVELOPE, "SuccessReply": _SUCCESS_ENVELOPE,
                          "ErrorReply": _ERROR_ENVELOPE})

    for action, handler in sorted(service.handlers.items()):
        contract = contract_of_handler(handler, f"{svc}: handler {action!r}")
        summary, description = _doc(handler)
        request_id, reply_id = f"{action}.request", f"{action}.reply"
        messages[request_id] = {
            "name": request_id, "title": f"{action} request", "contentType": "application/json",
            "headers": _REQUEST_PROPERTIES, "correlationId": {"location": "$message.header#/correlation_id"},
            "payload": _envelope(action, _payload_schema(contract, schemas)),
            "bindings": {"amqp": {"messageType": action, "bindingVersion": AMQP_BINDING}},
        }
        messages[reply_id] = {
            "name": reply_id, "title": f"{action} result", "contentType": "application/json",
            "headers": _REPLY_PROPERTIES, "correlationId": {"location": "$message.header#/correlation_id"},
            "payload": {"allOf": [{"$ref": _SCHEMAS + "SuccessReply"},
                                  {"type": "object", "properties": {"data": _returns_schema(contract, schemas)}}]},
        }
        channels["request"]["messages"][request_id] = {"$ref": f"#/components/messages/{request_id}"}
        channels["reply"]["messages"][reply_id] = {"$ref": f"#/components/messages/{reply_id}"}
        operation = {
            "action": "receive",
            "channel": {"$ref": "#/channels/request"},
            "title": action,
            "messages": [{"$ref": f"#/channels/request/messages/{request_id}"}],
            "reply": {
                "address": {"location": "$message.header#/reply_to",
                            "description": "The request's reply_to property: the caller's reply queue."},
                "channel": {"$ref": "#/channels/reply"},
                "messages": [{"$ref": f"#/channels/reply/messages/{reply_id}"},
                             {"$ref": "#/channels/reply/messages/error"}],
            },
            "bindings": {"amqp": {"ack": True, "deliveryMode": 2, "mandatory": True, "bindingVersion": AMQP_BINDING}},
        }
        if summary:
            operation["summary"] = summary
        operation["description"] = ((description + "\n\n") if description else "") + (
            "Sent without reply_to it is a cast: no reply, and a failure is dead-lettered to "
            f"'{topology.dead_queue_name(svc)}' (a ValidationError at once, never retried).")
        operations[action] = operation

    for name, subscription in sorted(service.events.items()):
        contract = contract_of_handler(subscription.function, f"{svc}: event handler {name!r}")
        summary, description = _doc(subscription.function)
        channel_id, message_id = f"event.{name}", f"{name}.event"
        queue = (topology.broadcast_queue_format.format(service=svc, handler=name, instance="{instance}")
                 if subscription.broadcast else topology.event_queue_format.format(service=svc, handler=name))
        messages[message_id] = {
            "name": message_id, "title": f"Event matching {subscription.pattern}", "contentType": "application/json",
            "payload": _envelope(None, _payload_schema(contract, schemas), event=subscription.pattern),
        }
        channels[channel_id] = {
            **_event_channel(subscription.pattern, (
                f"Events published to the exchange '{topology.event_exchange}' (topic) whose routing key "
                f"(the event's name) matches '{subscription.pattern}'; {svc} receives them in "
                + (f"one exclusive queue per running instance ('{queue}'): every instance gets every "
                   "event." if subscription.broadcast else
                   f"the durable queue '{queue}', shared by its instances.")),
                {message_id: {"$ref": f"#/components/messages/{message_id}"}}, topology, vhost),
            "x-amqprpc-queue": {"name": queue, "durable": not subscription.broadcast,
                                "exclusive": subscription.broadcast},
        }
        operation = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "title": name,
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{message_id}"}],
            "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING}},
        }
        if summary:
            operation["summary"] = summary
        operation["description"] = ((description + "\n\n") if description else "") + (
            "No reply. A payload that does not fit is dead-lettered at once to "
            f"'{topology.dead_queue_name(svc)}'" + ("; other failures are retried with backoff, then dead-lettered."
                                                   if subscription.retry else "; so is any other failure."))
        operations[f"event.{name}"] = operation

    # The events it publishes: a send operation each, on the channel of a subscription to
    # exactly that routing key if it has one (publishing to itself), else on a channel of its own.
    exact = {subscription.pattern: f"event.{name}" for name, subscription in sorted(service.events.items())}
    for name, published in sorted(service.published.items()):
        contract = event_contract(published.model, f"{svc}: published event {name!r}")
        summary, _, description = inspect.cleandoc(published.description).partition("\n")
        message_id = f"{name}.published"
        messages[message_id] = {
            "name": message_id, "title": f"Event {name}", "contentType": "application/json",
            "payload": _envelope(name, _payload_schema(contract, schemas), event=name),
            "bindings": {"amqp": {"messageType": name, "bindingVersion": AMQP_BINDING}},
        }
        channel_id = exact.get(name) or f"published.{name}"
        if channel_id in channels:
            channels[channel_id]["description"] += f" {svc} publishes this event too."
        else:
            channels[channel_id] = _event_channel(name, (
                f"Events {svc} publishes to the exchange '{topology.event_exchange}' (topic) with routing "
                f"key '{name}'. To receive them, bind a queue of your own to that exchange with this key, "
                f"or a pattern matching it ('{name.split('.')[0]}.#'); every bound queue gets its copy."),
                {}, topology, vhost)
        channels[channel_id]["messages"][message_id] = {"$ref": f"#/components/messages/{message_id}"}
        operation = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{channel_id}"},
            "title": name,
            "messages": [{"$ref": f"#/channels/{channel_id}/messages/{message_id}"}],
            "bindings": {"amqp": {"deliveryMode": 2, "mandatory": False, "bindingVersion": AMQP_BINDING}},
        }
        if summary.strip():
            operation["summary"] = summary.strip()
        operation["description"] = ((description.strip() + "\n\n") if description.strip() else "") + (
            f"Published by {svc} as a persistent message (delivery mode 2, publisher-confirmed), routing key "
            f"'{name}'; no reply. Delivery is at-least-once: a consumer may see an event twice.")
        operations[f"publish.{name}"] = operation

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": svc,
            "version": __version__,
            "description": _service_description(service, topology),
        },
        "defaultContentType": "application/json",
        "servers": servers,
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": dict(sorted(schemas.found.items())),
            "messages": messages,
            "securitySchemes": {"userPassword": {"type": "userPassword",
                                                 "description": "The broker's user name and password (AMQP PLAIN)."}},
        },
    }


def dumps(doc: dict[str, Any], fmt: str = "json") -> str:
    """The document as JSON (stable: two-space indent, keys as built) or YAML (needs PyYAML:
    ImportError otherwise)."""
    if fmt == "yaml":
        import yaml

        text: str = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=120)
        return text
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


# --- parts -------------------------------------------------------------------------------
def _servers(broker_url: str | None) -> tuple[dict[str, Any], str]:
    """The servers of the broker URL(s) (``amqp://h1;amqp://h2``), without credentials, and
    the vhost of the first."""
    from amqprpc.config import broker_url as configured

    servers: dict[str, Any] = {}
    vhost = "/"
    for index, url in enumerate(part for part in configured(broker_url).split(";") if part.strip()):
        parts = urlsplit(url.strip())
        tls = parts.scheme == "amqps"
        port = parts.port or (5671 if tls else 5672)
        host = parts.hostname or "localhost"
        path = unquote(parts.path[1:]) if parts.path else ""
        this_vhost = path or "/"
        if index == 0:
            vhost = this_vhost
        servers["rabbitmq" if index == 0 else f"rabbitmq{index + 1}"] = {
            "host": f"{host}:{port}",
            "protocol": "amqps" if tls else "amqp",
            "protocolVersion": "0.9.1",
            "description": f"RabbitMQ, vhost '{this_vhost}'" + (" (TLS)" if tls else ""),
            "security": [{"$ref": "#/components/securitySchemes/userPassword"}],
        }
    return servers, vhost


def _envelope(action: str | None, payload: dict[str, Any], event: str | None = None) -> dict[str, Any]:
    """The request envelope with ``payload``: of a request for ``action``, or of an event
    matching ``event`` (its name is ``action`` when given: an event the service publishes)."""
    properties: dict[str, Any] = {"payload": payload}
    if action is not None:
        properties["action"] = {"const": action}
    else:
        properties["action"] = {"type": "string", "description": f"The event's name, matching '{event}'."}
    if event is not None:
        properties["reply_to"] = {"type": "null"}
    return {"allOf": [{"$ref": _SCHEMAS + "RequestEnvelope"}, {"type": "object", "properties": properties}]}


def _event_channel(address: str, description: str, messages: dict[str, Any], topology: Topology,
                   vhost: str) -> dict[str, Any]:
    """A channel on the event exchange (topic) with routing key or pattern ``address``."""
    return {
        "address": address,
        "title": f"Events {address}",
        "description": description,
        "messages": messages,
        "bindings": {"amqp": {"is": "routingKey", "exchange": {
            "name": topology.event_exchange, "type": "topic", "durable": True, "autoDelete": False,
            "vhost": vhost}, "bindingVersion": AMQP_BINDING}},
    }


def _payload_schema(contract: Contract, schemas: Schemas) -> dict[str, Any]:
    return schemas.add(_asyncapi_schema(contract.payload_schema(ref_template=_SCHEMAS + "{model}")))


def _returns_schema(contract: Contract, schemas: Schemas) -> dict[str, Any]:
    return schemas.add(_asyncapi_schema(contract.returns_schema(ref_template=_SCHEMAS + "{model}")))


def _asyncapi_schema(schema: Any) -> Any:
    """pydantic's JSON schema (2020-12) as an AsyncAPI schema (draft-07 and a bit more):
    an OpenAPI-style ``discriminator`` object becomes AsyncAPI's property name."""
    if isinstance(schema, dict):
        out = {key: _asyncapi_schema(value) for key, value in schema.items()}
        if isinstance(out.get("discriminator"), dict):
            out["discriminator"] = out["discriminator"].get("propertyName", "")
        if "prefixItems" in out:  # tuples: draft-07 spells them as an items list
            out["items"] = out.pop("prefixItems")
        return out
    if isinstance(schema, list):
        return [_asyncapi_schema(item) for item in schema]
    return schema


def _rename_refs(schema: Any, renames: dict[str, str]) -> Any:
    if isinstance(schema, dict):
        out = {}
        for key, value in schema.items():
            if key == "$ref" and isinstance(value, str) and value.startswith(_SCHEMAS):
                name = value[len(_SCHEMAS):]
                value = _SCHEMAS + renames.get(name, name)
            out[key] = _rename_refs(value, renames)
        return out
    if isinstance(schema, list):
        return [_rename_refs(item, renames) for item in schema]
    return schema


def _doc(function: Any) -> tuple[str, str]:
    """(first line, the rest) of a handler's docstring."""
    text = inspect.getdoc(unwrap(function)) or ""
    first, _, rest = text.partition("\n")
    return first.strip(), rest.strip()


def _service_description(service: Service, topology: Topology) -> str:
    svc = service.name
    about = ""
    functions = list(service.handlers.values()) + [sub.function for sub in service.events.values()]
    if functions:
        module = sys.modules.get(getattr(unwrap(functions[0]), "__module__", ""))
        about = (inspect.getdoc(module) or "").split("\n\n")[0].replace("\n", " ").strip() if module else ""
    how = (f"Call an action: publish a request envelope (JSON) to '{topology.service_exchange}' with routing key "
           f"'{topology.request_key(svc)}', properties content_type application/json, a correlation_id, reply_to "
           "= your own reply queue and expiration = your timeout in ms; the reply (success or error envelope) "
           "arrives in that queue with the same correlation_id. Without reply_to the request is a cast: no reply. "
           "A payload that does not fit the action's schema gets an error reply with error_type ValidationError.")
    return (about + "\n\n" + how) if about else how
