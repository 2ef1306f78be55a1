"""Private: the connection loop that clients, workers and the collector hold.

One thread owns a connection (:mod:`.ioloop`): it reads frames (:mod:`.framereader`,
:mod:`.framehandler`), writes them (:mod:`.framewriter`), keeps the link alive
(:mod:`.link`, :mod:`.deadlines`), consumes (:mod:`.consumer`, :mod:`.inbox`) and carries
out forwards into delay and dead-letter queues (:mod:`.redelivery`). Nothing here is a
stable interface: import from :mod:`amqprpc` instead."""
