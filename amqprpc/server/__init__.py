"""The serving side: the :class:`~amqprpc.server.worker.Worker` (threads, acks, the loop)
and the event consumers (:mod:`.events`)."""
