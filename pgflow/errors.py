"""One error hierarchy. Every message says what failed and what to do, in one line.

The CLI prints ``str(error)`` and exits with ``error.exit_code``; no traceback is shown
for these expected failures. Messages never carry secrets: callers pass redacted DSNs.
"""

from __future__ import annotations


class PgflowError(Exception):
    """Base of every expected failure; ``str()`` is the line a person reads."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message}: {hint}" if hint else message)


class ConfigError(PgflowError):
    """A setting is missing or invalid."""

    exit_code = 2


class ScrapeError(PgflowError):
    """A scrape failed as a whole; no partial snapshot is ever returned."""


class ServerUnreachable(ScrapeError):
    """The server did not accept a connection (down, wrong host/port, firewall)."""


class AuthenticationFailed(ScrapeError):
    """The server refused the credentials."""


class DatabaseMissing(ScrapeError):
    """The database named in the DSN does not exist."""


class ExtensionMissing(ScrapeError):
    """pg_stat_statements is not installed in the connected database."""


class ExtensionNotLoaded(ScrapeError):
    """pg_stat_statements is installed but not in shared_preload_libraries."""


class InsufficientPrivilege(ScrapeError):
    """The monitoring role lacks a privilege it needs."""


class SslRefused(ScrapeError):
    """The connection failed over SSL: the server offers none, demands it, or the handshake failed."""


class PoolerRefused(ScrapeError):
    """A connection pooler (PgBouncer in statement pooling) refused pgflow's transaction."""


class TextUnreadable(ScrapeError):
    """pg_stat_statements holds a statement text this connection cannot decode (encodings)."""


class ScrapeTimeout(ScrapeError):
    """A scrape query ran past statement_timeout."""


class ExportError(PgflowError):
    """An OTLP export failed."""


class CaptureError(PgflowError):
    """A capture file could not be read or written."""
