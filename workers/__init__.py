"""The shop's ready services (the seed article's user, order, payment, inventory and
notification services). Each module exposes ``service``; ``amqprpc worker <name>`` finds it."""
