"""trackbuf's shared core: events, wire codec, link tokens, settings.

Standard library and orjson only; it imports neither ``ingest`` nor ``consumer``.
"""

__version__ = "0.1.0"
