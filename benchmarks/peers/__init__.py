"""One module per library for benchmarks/peers.py.

Each module holds the library's two tasks (``incr(n)``, which increments the shared counter, and
``echo(x)``) where its worker can import them, and a `base.Peer` subclass, ``PEER``, that the
driver uses on the producer side: enqueue, round trips, purging its queues. The modules read
their broker from the environment at import, because that is the only way a library's own
worker command can be told where to connect.
"""
