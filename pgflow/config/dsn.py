"""PostgreSQL connection strings: checked, shown without their password, and named.

A DSN is a secret (it may hold a password): what leaves this module is ``user@host:port/dbname``
(:func:`redact_dsn`) or the ``host:port`` an instance is named by (:func:`dsn_instance_name`).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import psycopg.conninfo


def redact_dsn(dsn: str) -> str:
    """Return ``user@host:port/dbname`` for a DSN (URL or key=value), never the password."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
    except Exception:
        return "<unparseable DSN>"
    user = parts.get("user") or ""
    host = parts.get("host") or parts.get("hostaddr") or "localhost"
    port = parts.get("port") or "5432"
    dbname = parts.get("dbname") or user or ""
    return f"{user + '@' if user else ''}{host}:{port}/{dbname}"


def dsn_host_port(dsn: str) -> tuple[str, int]:
    """The first server address a DSN points at (the scraper then labels by the host that answered)."""
    parts = psycopg.conninfo.conninfo_to_dict(dsn)
    host = str(parts.get("host") or parts.get("hostaddr") or "localhost").split(",")[0]
    if host.startswith("/"):
        host = "localhost"
    port = int(str(parts.get("port") or "5432").split(",")[0])
    return host, port


# Identity (issue 14) ---------------------------------------------------------------------


def dsn_instance_name(dsn: str) -> str:
    """The default instance name of a DSN: ``host:port``, every host of a multi-host DSN
    (``a:5432,b:5432``), so that a failover between them stays one instance."""
    parts = psycopg.conninfo.conninfo_to_dict(dsn)
    hosts = str(parts.get("host") or parts.get("hostaddr") or "localhost").split(",")
    ports = str(parts.get("port") or "5432").split(",")
    if len(ports) == 1:
        ports = ports * len(hosts)
    names = [f"{'localhost' if h.startswith('/') or not h else h}:{p or 5432}" for h, p in zip(hosts, ports)]
    return ",".join(names)


def is_local_address(address: str) -> bool:
    """True for ``localhost``, a loopback address or a Unix socket: such an address names no host."""
    if not address or address.startswith("/") or address.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _check_dsn(dsn: str) -> str:
    dsn = dsn.strip()
    if not dsn:
        raise ValueError("is empty; expected a PostgreSQL URL such as postgresql://user@host:5432/db")
    if "://" in dsn:
        scheme = urlsplit(dsn).scheme
        if scheme not in ("postgresql", "postgres"):
            raise ValueError(f"has scheme {scheme!r}; expected postgresql://user@host:5432/db")
    try:
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
    except Exception:
        raise ValueError("is not a valid PostgreSQL connection string; expected postgresql://user@host:5432/db") from None
    for port in str(parts.get("port") or "5432").split(","):
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("has an invalid port; expected a number from 1 to 65535")
    return dsn
