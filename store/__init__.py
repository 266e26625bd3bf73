"""The database side, shared by the consumer and the operator commands.

The schema and its migrations (``migrate.py``, ``migrations/``), the named queries
(``sql.py``, ``queries.sql``), a blocking connection for worker threads
(``database.py``), the monthly partitions and their pruning (``partitions.py``),
erasure (``forget.py``), the rollups' rebuild (``rebuild.py``) and the reports read
from them (``reports.py``), and the rounds of upkeep a consumer runs beside its
inserts (``upkeep.py``). Where a background loop and a command share SQL, both are
here as separate functions: the consumer runs the loop, ``commands`` the command.

Imports the core (``trackbuf``) and asyncpg; never ``ingest``, ``consumer`` or
``commands``.
"""
