"""trackbuf's shared core: events, wire codec, link tokens, settings, the beanstalkd
protocol and a blocking client.

Standard library and orjson only; it imports none of the packages above it
(``store``, ``ingest``, ``consumer``, ``commands``).
"""

__version__ = "0.1.0"
