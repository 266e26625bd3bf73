"""trackbuf consumer: drains beanstalkd into PostgreSQL in batched, idempotent inserts."""
