"""How the export reaches its endpoint, as settings (issue 21): TLS files, proxy, timeout, compression.

The settings follow the OpenTelemetry exporter specification: ``OTEL_EXPORTER_OTLP_CERTIFICATE``
(CA bundle to trust), ``..._CLIENT_CERTIFICATE`` / ``..._CLIENT_KEY`` (mTLS), ``..._INSECURE``,
``..._TIMEOUT`` (milliseconds), ``..._COMPRESSION`` (gzip | none), each also per signal
(``OTEL_EXPORTER_OTLP_METRICS_...``, ``OTEL_EXPORTER_OTLP_LOGS_...``), which wins over the general one.

Proxies: ``otlp_proxy`` when set (``none`` turns proxies off), else ``HTTPS_PROXY`` for an
https endpoint and ``HTTP_PROXY`` for an http one (lower-case forms first, as curl does), unless
``NO_PROXY`` covers the endpoint's host. The credentials in a proxy URL are never logged:
:func:`redact_proxy` shows ``http://<redacted>@host:port``.

Everything here is resolved and checked when the settings load (a bad file or proxy stops pgflow
with one line, exit 2); connecting, probing and classifying failures is :mod:`pgflow.otlp.network`'s.
"""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from pgflow.errors import ConfigError

if TYPE_CHECKING:
    from pgflow.config.settings import Settings

SIGNALS = ("metrics", "logs")
# setting -> the OTEL variable suffix (OTEL_EXPORTER_OTLP_[SIGNAL_]<suffix>)
OTEL_SUFFIX = {
    "otlp_certificate": "CERTIFICATE",
    "otlp_client_certificate": "CLIENT_CERTIFICATE",
    "otlp_client_key": "CLIENT_KEY",
    "otlp_insecure": "INSECURE",
    "otlp_timeout_ms": "TIMEOUT",
    "otlp_compression": "COMPRESSION",
}


# TLS contexts shared by every connection of the process: (files' stamp, context) per (files, alpn).
_CONTEXTS: dict[tuple[Any, ...], tuple[tuple[Any, ...], ssl.SSLContext]] = {}
_CONTEXTS_LOCK = threading.Lock()


def files_stamp(files: tuple[str, ...]) -> tuple[Any, ...]:
    """What says a file changed: modification time, size and inode (a renewal that replaces the
    file by renaming a new one over it changes the inode even within the clock's resolution)."""
    out: list[Any] = []
    for path in files:
        try:
            st = os.stat(path)
            out.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append((path, None))
    return tuple(out)


@dataclass(frozen=True)
class Network:
    """Everything one signal's transport needs to connect: TLS files, proxy, timeout, compression.

    ``names`` holds, per setting, the name the user set it by (for messages saying what to change).
    """

    certificate: Path | None = None
    client_certificate: Path | None = None
    client_key: Path | None = None
    insecure: bool = False
    timeout: float = 10.0
    compression: str = "gzip"
    proxy: str | None = None  # the proxy URL in use for this endpoint, None: direct
    proxy_source: str = ""  # "otlp_proxy", "HTTPS_PROXY", ...
    names: tuple[tuple[str, str], ...] = ()

    def name(self, setting: str) -> str:
        return dict(self.names).get(setting, setting)

    def ssl_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        """A client context trusting the system's CAs, or only the configured bundle, with the client
        certificate when one is set: what the HTTP transport uses and what probes use.

        Built once and shared while the files it was read from stay the same (issue 20: reading
        the system's CA store costs ~20 ms of CPU, and a kept-alive connection the endpoint closed
        between windows is opened again every window); a renewed certificate, key or bundle is
        read at the next connection (compared by modification time, size and inode)."""
        files = self._tls_files()
        key = (self.certificate, self.client_certificate, self.client_key, tuple(alpn or ()))
        stamp = files_stamp(files)
        with _CONTEXTS_LOCK:
            cached = _CONTEXTS.get(key)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        ctx = ssl.create_default_context(cafile=str(self.certificate) if self.certificate else None)
        if self.client_certificate and self.client_key:
            ctx.load_cert_chain(str(self.client_certificate), str(self.client_key))
        if alpn:
            ctx.set_alpn_protocols(alpn)
        with _CONTEXTS_LOCK:
            _CONTEXTS[key] = (stamp, ctx)
        return ctx

    def configured_tls_files(self) -> tuple[str, ...]:
        """The TLS files the settings name (CA bundle, client certificate, key), those set."""
        return tuple(str(p) for p in (self.certificate, self.client_certificate, self.client_key) if p)

    def _tls_files(self) -> tuple[str, ...]:
        """The files a context is read from: the configured ones, or the system's CA bundle."""
        configured = self.configured_tls_files()
        if self.certificate:
            return configured
        defaults = ssl.get_default_verify_paths()
        return configured + tuple(p for p in (defaults.cafile, defaults.capath) if p)


# Endpoint -----------------------------------------------------------------------------------


def split_endpoint(endpoint: str, default_port: int, insecure: bool = False) -> tuple[bool, str, int, str]:
    """(tls, host, port, path) of an endpoint: ``http://`` means no TLS, ``https://`` TLS, and an
    endpoint without a scheme is TLS unless ``insecure`` (the OTel rule for gRPC)."""
    if "://" not in endpoint:
        endpoint = ("http://" if insecure else "https://") + endpoint
    parts = urlsplit(endpoint)
    return parts.scheme != "http", parts.hostname or "localhost", parts.port or default_port, parts.path.rstrip("/")


# Proxies ------------------------------------------------------------------------------------


def redact_proxy(url: str | None) -> str | None:
    """A proxy URL without its credentials: ``http://<redacted>@host:port``."""
    if not url:
        return url
    try:
        parts = urlsplit(url if "://" in url else "http://" + url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable proxy URL>"
    cred = "<redacted>@" if parts.username or parts.password else ""
    return f"{parts.scheme}://{cred}{host}{port}"


def check_proxy(url: str, setting: str) -> str:
    """The proxy URL with a scheme; ConfigError (never echoing credentials) when it is not usable."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        raise ConfigError(f"invalid proxy URL in {setting} ({redact_proxy(url)})", "expected http://[user:password@]host:port") from None
    if parts.scheme != "http":
        raise ConfigError(
            f"proxy in {setting} uses {parts.scheme}:// ({redact_proxy(url)})",
            "pgflow speaks to proxies in plain HTTP and tunnels TLS with CONNECT: use http://host:port",
        ) from None
    if not parts.hostname:
        raise ConfigError(f"invalid proxy URL in {setting} ({redact_proxy(url)})", "expected http://[user:password@]host:port")
    return text


def _env(*names: str) -> tuple[str | None, str]:
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip():
            return value.strip(), name
    return None, ""


def no_proxy_covers(host: str, port: int, no_proxy: str) -> bool:
    """Whether a NO_PROXY list covers ``host:port``: ``*``, a host, a domain (``.example.com``
    or ``example.com``, subdomains too), an IP address, a CIDR range, each optionally ``:port``."""
    host = host.lower().strip("[]")
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry_port = None
        if entry.count(":") == 1 or (entry.startswith("[") and "]:" in entry):
            entry, _, p = entry.rpartition(":")
            entry_port = int(p) if p.isdigit() else None
        entry = entry.strip("[]")
        if entry_port is not None and entry_port != port:
            continue
        try:
            if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                return True
            continue
        except ValueError:
            pass
        domain = entry.lstrip(".")
        if host == domain or host.endswith("." + domain):
            return True
    return False


def proxy_for(endpoint: str, explicit: str | None, insecure: bool = False) -> tuple[str | None, str]:
    """(proxy URL or None, where it came from) for an endpoint: ``otlp_proxy`` overrides the
    environment (``none`` or empty: no proxy); else HTTPS_PROXY / HTTP_PROXY by the endpoint's
    scheme, unless NO_PROXY covers it."""
    if explicit is not None:
        if explicit.strip().lower() in ("", "none", "direct"):
            return None, "otlp_proxy"
        return check_proxy(explicit, "otlp_proxy"), "otlp_proxy"
    tls, host, port, _ = split_endpoint(endpoint, 4317, insecure)
    names = ("https_proxy", "HTTPS_PROXY") if tls else ("http_proxy", "HTTP_PROXY")
    url, name = _env(*names)
    if url is None:
        return None, ""
    no_proxy, _ = _env("no_proxy", "NO_PROXY")
    if no_proxy and no_proxy_covers(host, port, no_proxy):
        return None, "NO_PROXY"
    return check_proxy(url, name), name


# Files ----------------------------------------------------------------------------------------


def check_pem(path: Path, name: str, kind: str) -> None:
    """Stop at start (exit 2, one line naming the file) when a PEM file is unreadable or not what it should be."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read {name} {path} ({exc.strerror})", "check the path and that the user pgflow runs as may read it"
        ) from None
    marker = b"PRIVATE KEY-----" if kind == "key" else b"-----BEGIN CERTIFICATE-----"
    if marker not in text:
        what = "PEM private key" if kind == "key" else "PEM certificate"
        raise ConfigError(f"{name} {path} holds no {what}", f"point {name} at a PEM file")
    if kind == "ca":
        try:
            ssl.create_default_context(cafile=str(path))
        except ssl.SSLError as exc:
            raise ConfigError(
                f"{name} {path} is not a valid PEM certificate bundle ({exc.reason or exc})",
                "point it at the CA certificate(s) in PEM form",
            ) from None


def check_client_pair(cert: Path | None, key: Path | None, cert_name: str, key_name: str) -> None:
    """A client certificate needs its key and the two must match (exit 2 otherwise)."""
    if (cert is None) != (key is None):
        missing, given = (key_name, cert_name) if key is None else (cert_name, key_name)
        raise ConfigError(f"{given} is set but {missing} is not", "mTLS needs both the client certificate and its key")
    if cert is None or key is None:
        return
    check_pem(cert, cert_name, "cert")
    check_pem(key, key_name, "key")
    try:
        ssl.create_default_context().load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{cert_name} {cert} and {key_name} {key} do not make a usable pair ({exc.reason or exc})",
            "the key must be the certificate's own, unencrypted",
        ) from None


# The settings, per signal -------------------------------------------------------------------


def signal_env() -> dict[str, dict[str, tuple[str, str]]]:
    """The per-signal OTEL variables that are set: signal -> setting -> (value, variable name)."""
    return {
        sig: {
            setting: (os.environ[name], name)
            for setting, suffix in OTEL_SUFFIX.items()
            if (name := f"OTEL_EXPORTER_OTLP_{sig.upper()}_{suffix}") in os.environ and os.environ[name].strip()
        }
        for sig in SIGNALS
    }


def resolve_network(settings: Settings, signal: str = "metrics") -> Network:
    """The export's TLS files, proxy, timeout and compression for one signal (``Settings.network``);
    per-signal OTEL variables win over the general ones. Raises ConfigError (exit 2, one line
    naming it) for an unreadable or invalid file or proxy."""
    env = getattr(settings, "_signal_env", {}).get(signal, {})
    names = {
        s: f"{s} (OTEL_EXPORTER_OTLP_{suffix})"
        for s, suffix in (
            ("otlp_certificate", "CERTIFICATE"),
            ("otlp_client_certificate", "CLIENT_CERTIFICATE"),
            ("otlp_client_key", "CLIENT_KEY"),
        )
    }

    def pick(setting: str, general: Any) -> Any:
        if setting in env:
            value, name = env[setting]
            names[setting] = name
            return value.strip()
        return general

    def as_bool(setting: str, general: bool) -> bool:
        value = pick(setting, general)
        if isinstance(value, str):
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"invalid setting {names.get(setting, setting)}: expected true or false, got {value[:20]!r}")
            return value.lower() == "true"
        return bool(value)

    ca, cert, key = (pick(s, getattr(settings, s)) for s in ("otlp_certificate", "otlp_client_certificate", "otlp_client_key"))
    ca, cert, key = (Path(v) if v else None for v in (ca, cert, key))
    timeout_ms = pick("otlp_timeout_ms", settings.otlp_timeout_ms)
    try:
        timeout = int(timeout_ms) / 1000 if timeout_ms else settings.export_timeout_secs
        if timeout <= 0:
            raise ValueError
    except ValueError:
        raise ConfigError(
            f"invalid setting {names.get('otlp_timeout_ms', 'OTEL_EXPORTER_OTLP_TIMEOUT')}: "
            f"expected milliseconds, got {str(timeout_ms)[:20]!r}"
        ) from None
    compression = str(pick("otlp_compression", settings.otlp_compression)).lower()
    if compression not in ("gzip", "none"):
        raise ConfigError(f"invalid compression {compression[:20]!r} for the {signal} export", "expected gzip or none")
    insecure = as_bool("otlp_insecure", settings.otlp_insecure)
    if ca is not None:
        check_pem(ca, names["otlp_certificate"], "ca")
    check_client_pair(cert, key, names["otlp_client_certificate"], names["otlp_client_key"])
    explicit = settings.otlp_proxy.get_secret_value() if settings.otlp_proxy is not None else None
    proxy, source = proxy_for(settings.endpoint, explicit, insecure)
    return Network(
        certificate=ca,
        client_certificate=cert,
        client_key=key,
        insecure=insecure,
        timeout=timeout,
        compression=compression,
        proxy=proxy,
        proxy_source=source,
        names=tuple(names.items()),
    )


def otel_headers(value: str) -> dict[str, str]:
    """Headers in the OTEL form ``k1=v1,k2=v2`` (values URL-encoded; keys lower-cased)."""
    headers = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError("expected comma-separated key=value pairs, e.g. api-key=XYZ")
        headers[key.strip().lower()] = unquote(val.strip())
    return headers


def checked_endpoint(value: str) -> str:
    """An OTLP endpoint as given (trailing slash dropped), or a ValueError saying what one looks like."""
    value = value.strip().rstrip("/")
    if not re.match(r"^(https?://)?[A-Za-z0-9.\-\[\]:]+(:\d+)?(/.*)?$", value):
        raise ValueError("expected an endpoint such as https://otlp.nr-data.net:4318 or http://127.0.0.1:4318")
    return value
