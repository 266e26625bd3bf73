"""The ``trackbuf`` command line and the operator commands, above everything they call.

``main.py`` is the entry point (the ``trackbuf`` console script, ``python -m commands``)
and the only module here that imports the services, ``ingest`` and ``consumer``, to run
them in-process. Every other module uses the core (``trackbuf``) and the database side
(``store``) only.
"""
