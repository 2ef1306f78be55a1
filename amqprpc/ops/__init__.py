"""Operations: running a worker as a daemon (:mod:`.daemon`, :mod:`.pidfile`,
:mod:`.sdnotify`), the service registry (:mod:`.registry`), the response collector
(:mod:`.collector`), dead letters (:mod:`.dlq`), finding a service (:mod:`.loading`) and
the demo (:mod:`.demo`)."""
