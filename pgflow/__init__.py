"""pgflow: PostgreSQL query statistics as exact OTLP metrics."""

__version__ = "0.1.0"
