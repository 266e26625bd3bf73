"""Load generation and benchmarks for trackbuf (run with ``python -m loadtest``)."""
