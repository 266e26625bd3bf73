"""How `trackbuf up` knows its own ingest from any other server on the same port.

`up` gives the ingest it starts a random id in ``INSTANCE_ENV``; ingest repeats it in
the ``INSTANCE_HEADER`` header of ``/healthz``, and `up` prints its banner only once
that answer carries its own id.
"""

INSTANCE_ENV = "TRACKBUF_UP_INSTANCE"
INSTANCE_HEADER = "Trackbuf-Instance"
