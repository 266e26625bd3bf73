"""Every metric name, declared once: code, dashboards, alert rules and tests share these.

Prometheus conventions: ``trackbuf_`` prefix, base units in the name (seconds, bytes),
``_total`` on counters (prometheus-client appends it to the names below).
"""

# ingest
INGEST_REQUESTS = "trackbuf_ingest_requests"  # counter {route, outcome}
INGEST_REQUEST_DURATION = "trackbuf_ingest_request_duration_seconds"  # histogram {route}
INGEST_EVENTS = "trackbuf_ingest_events"  # counter {kind, outcome=queued|spooled|lost}
INGEST_INVALID_TOKENS = "trackbuf_ingest_invalid_tokens"  # counter {route, reason}
INGEST_ENQUEUE_DURATION = "trackbuf_ingest_enqueue_duration_seconds"  # histogram
INGEST_JOB_EVENTS = "trackbuf_ingest_job_events"  # histogram: events per job put
INGEST_BEANSTALKD_UP = "trackbuf_ingest_beanstalkd_up"  # gauge {server}: one per pool member
INGEST_BEANSTALKD_SERVERS_UP = "trackbuf_ingest_beanstalkd_servers_up"  # gauge: pool members up
INGEST_JOBS_REPUT = "trackbuf_ingest_jobs_reput"  # counter {reason}: put again on another server
INGEST_SPOOL_BYTES = "trackbuf_ingest_spool_bytes"  # gauge: bytes waiting in the spool
INGEST_SPOOL_JOBS = "trackbuf_ingest_spool_jobs"  # gauge: jobs waiting in the spool
INGEST_SPOOL_REPLAYED = "trackbuf_ingest_spool_replayed_jobs"  # counter
INGEST_SPOOL_EVENTS = "trackbuf_ingest_spool_events"  # gauge: events waiting in the spool
# gauge {server}: what ingest estimates this beanstalkd server holds (stats + own puts)
INGEST_QUEUE_HELD_BYTES = "trackbuf_ingest_queue_held_bytes"
# gauge {server}: 1 while the server is above its high-water mark (events go to disk)
INGEST_QUEUE_FULL = "trackbuf_ingest_queue_full"
# gauge {server}: 1 while the server accepts connections but does not answer
INGEST_BEANSTALKD_HUNG = "trackbuf_ingest_beanstalkd_hung"
INGEST_BURIED_ON_PUT = "trackbuf_ingest_buried_on_put_jobs"  # counter
# counter {code}: answers with status >= 500, and 400 for requests aiohttp could not
# parse. Tracking answers are 200/302/404 even when an event is lost, so these are
# the failures a mail client actually sees (a broken image, a click that goes nowhere).
INGEST_HTTP_ERRORS = "trackbuf_ingest_http_errors"

# consumer
CONSUMER_EVENTS_WRITTEN = "trackbuf_consumer_events_written"  # counter
CONSUMER_DUPLICATES = "trackbuf_consumer_duplicate_events"  # counter
CONSUMER_BATCHES = "trackbuf_consumer_batches"  # counter {outcome}
CONSUMER_BATCH_EVENTS = "trackbuf_consumer_batch_events"  # histogram
CONSUMER_INSERT_DURATION = "trackbuf_consumer_insert_duration_seconds"  # histogram
CONSUMER_E2E_LATENCY = "trackbuf_consumer_end_to_end_latency_seconds"  # histogram
CONSUMER_DATABASE_UP = "trackbuf_consumer_database_up"  # gauge
CONSUMER_DEAD_EVENTS = "trackbuf_consumer_dead_events"  # counter {reason}
CONSUMER_KICKED_JOBS = "trackbuf_consumer_kicked_jobs"  # counter: buried jobs made ready
CONSUMER_BURIED_JOBS = "trackbuf_consumer_buried_jobs"  # counter: released, beanstalkd buried
# counters: reserve commands sent, and jobs they brought; their ratio is reserves per job
# (about 1 to 1.5 while the consumer waits in beanstalkd, far more if it polls)
CONSUMER_RESERVE_COMMANDS = "trackbuf_consumer_reserve_commands"
CONSUMER_JOBS_RESERVED = "trackbuf_consumer_jobs_reserved"

# queue (read from beanstalkd at scrape time by the consumer's /metrics). Every series
# carries server="host:port", one per server of the pool; there is no unlabeled total:
# sum over servers the max across consumer instances, sum(max by (server) (...)).
QUEUE_UP = "trackbuf_queue_up"  # gauge {server}: 1 if that server answered the scrape
QUEUE_HUNG = "trackbuf_queue_hung"  # gauge {server}: 1 if it took the connection, not the commands
QUEUE_JOBS = "trackbuf_queue_jobs"  # gauge {server, tube, state=ready|reserved|delayed|buried}
QUEUE_OLDEST_READY_AGE = "trackbuf_queue_oldest_ready_age_seconds"  # gauge {server, tube}
QUEUE_CONSUMERS = "trackbuf_queue_consumers"  # gauge {server, tube}: connections watching it
QUEUE_JOBS_PUT = "trackbuf_queue_jobs_put"  # counter {server, tube}: jobs ever put (since restart)
QUEUE_BINLOG_SPAN = "trackbuf_queue_binlog_span_files"  # gauge {server}: current - oldest index
