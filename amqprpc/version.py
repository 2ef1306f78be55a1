"""The version of amqprpc, in one place (the package, its metadata and the registry read it)."""
__version__ = "0.1.0"
