"""``amqprpc dashboard``: a live operations page (and a JSON API) for services, queues,
actions, circuit breakers and dead letters.

Modules: :mod:`~amqprpc.dashboard.collect` reads the registry, the broker and Redis into one
snapshot; :mod:`~amqprpc.dashboard.queues` asks RabbitMQ for queue depths (management API or
passive declares); :mod:`~amqprpc.dashboard.deadletters` browses and acts on dead letters;
:mod:`~amqprpc.dashboard.auth` keeps the page private (bind check, Basic or Bearer auth,
CSRF); :mod:`~amqprpc.dashboard.app` is the FastAPI application; :mod:`~amqprpc.dashboard.server`
runs it as a daemon. Needs the ``dashboard`` extra (FastAPI, uvicorn); nothing here is
imported by ``import amqprpc``.
"""
