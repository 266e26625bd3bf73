"""Real servers for tests; shared with the benchmarks in loadtest/."""

from loadtest.servers import Beanstalkd, Postgres, free_port, rss_bytes, wait_port

__all__ = ["Beanstalkd", "Postgres", "free_port", "rss_bytes", "wait_port"]
