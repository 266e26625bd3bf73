"""trackbuf ingest: the HTTP server that answers pixels and clicks and enqueues events."""
