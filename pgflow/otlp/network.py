"""How pgflow reaches the OTLP endpoint: TLS files, proxies, and what a failure to connect means.

The settings follow the OpenTelemetry exporter specification: ``OTEL_EXPORTER_OTLP_CERTIFICATE``
(CA bundle to trust), ``..._CLIENT_CERTIFICATE`` / ``..._CLIENT_KEY`` (mTLS), ``..._INSECURE``,
``..._TIMEOUT`` (milliseconds), ``..._COMPRESSION`` (gzip | none), each also per signal
(``OTEL_EXPORTER_OTLP_METRICS_...``, ``OTEL_EXPORTER_OTLP_LOGS_...``), which wins over the general one.

Proxies: ``otlp_proxy`` when set (``none`` turns proxies off), else ``HTTPS_PROXY`` for an
https endpoint and ``HTTP_PROXY`` for an http one (lower-case forms first, as curl does), unless
``NO_PROXY`` covers the endpoint's host. Both transports tunnel with ``CONNECT``; the proxy
itself is spoken to in plain HTTP (``http://user:pass@host:port``). The credentials in a proxy
URL are never logged: :func:`redact_proxy` shows ``http://<redacted>@host:port``.

A connection that fails is classified into one *cause* (:data:`CAUSES`), each with one line
naming what to change: it labels ``pgflow_export_failures_total`` and the exporter's log line.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pgflow.errors import ConfigError

SIGNALS = ("metrics", "logs")
# setting -> the OTEL variable suffix (OTEL_EXPORTER_OTLP_[SIGNAL_]<suffix>)
OTEL_SUFFIX = {"otlp_certificate": "CERTIFICATE", "otlp_client_certificate": "CLIENT_CERTIFICATE",
               "otlp_client_key": "CLIENT_KEY", "otlp_insecure": "INSECURE", "otlp_timeout_ms": "TIMEOUT",
               "otlp_compression": "COMPRESSION"}

# Failure causes of a connection (not of an answer: those are gRPC codes / http_NNN).
TLS_UNTRUSTED = "tls_untrusted"
TLS_HOSTNAME = "tls_hostname"
TLS_EXPIRED = "tls_expired"
TLS_CLIENT_CERT = "tls_client_cert"
TLS_OTHER = "tls_handshake"
TLS_PLAINTEXT = "tls_not_offered"
PROXY_REFUSED = "proxy_refused"
PROXY_UNREACHABLE = "proxy_unreachable"
CONNECTION = "connection"
CAUSES = (TLS_UNTRUSTED, TLS_HOSTNAME, TLS_EXPIRED, TLS_CLIENT_CERT, TLS_OTHER, TLS_PLAINTEXT, PROXY_REFUSED,
          PROXY_UNREACHABLE, CONNECTION)


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
        certificate when one is set: what the HTTP transport uses and what probes use."""
        ctx = ssl.create_default_context(cafile=str(self.certificate) if self.certificate else None)
        if self.client_certificate and self.client_key:
            ctx.load_cert_chain(str(self.client_certificate), str(self.client_key))
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx


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
        raise ConfigError(f"invalid proxy URL in {setting} ({redact_proxy(url)})",
                          "expected http://[user:password@]host:port") from None
    if parts.scheme != "http":
        raise ConfigError(f"proxy in {setting} uses {parts.scheme}:// ({redact_proxy(url)})",
                          "pgflow speaks to proxies in plain HTTP and tunnels TLS with CONNECT: "
                          "use http://host:port") from None
    if not parts.hostname:
        raise ConfigError(f"invalid proxy URL in {setting} ({redact_proxy(url)})",
                          "expected http://[user:password@]host:port")
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


def proxy_parts(url: str) -> tuple[str, int, dict[str, str]]:
    """(host, port, headers for CONNECT) of a proxy URL; credentials become Proxy-Authorization."""
    parts = urlsplit(url)
    headers = {}
    if parts.username is not None:
        token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(token).decode()
    return parts.hostname or "localhost", parts.port or 80, headers


# Files ----------------------------------------------------------------------------------------


def check_pem(path: Path, name: str, kind: str) -> None:
    """Stop at start (exit 2, one line naming the file) when a PEM file is unreadable or not what it should be."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {name} {path} ({exc.strerror})",
                          "check the path and that the user pgflow runs as may read it") from None
    marker = b"PRIVATE KEY-----" if kind == "key" else b"-----BEGIN CERTIFICATE-----"
    if marker not in text:
        what = "PEM private key" if kind == "key" else "PEM certificate"
        raise ConfigError(f"{name} {path} holds no {what}", f"point {name} at a PEM file")
    if kind == "ca":
        try:
            ssl.create_default_context(cafile=str(path))
        except ssl.SSLError as exc:
            raise ConfigError(f"{name} {path} is not a valid PEM certificate bundle ({exc.reason or exc})",
                              "point it at the CA certificate(s) in PEM form") from None


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
        raise ConfigError(f"{cert_name} {cert} and {key_name} {key} do not make a usable pair "
                          f"({exc.reason or exc})", "the key must be the certificate's own, unencrypted") from None


# Failures -------------------------------------------------------------------------------------

_VERIFY_CAUSES = {10: TLS_EXPIRED, 9: TLS_OTHER, 62: TLS_HOSTNAME, 18: TLS_UNTRUSTED, 19: TLS_UNTRUSTED,
                  20: TLS_UNTRUSTED, 21: TLS_UNTRUSTED, 2: TLS_UNTRUSTED}


def classify_exception(exc: BaseException) -> str:
    """The cause of a failed connection from the exception Python's ssl / http.client raised."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = getattr(exc, "verify_code", None)
        if code in _VERIFY_CAUSES:
            return _VERIFY_CAUSES[code]
        return classify_text(str(exc)) or TLS_OTHER
    if isinstance(exc, ssl.SSLError):
        return classify_text(f"{exc.reason} {exc}") or TLS_OTHER
    if isinstance(exc, ProxyError):
        return exc.cause
    text = str(exc)
    if text.startswith("Tunnel connection failed"):
        return PROXY_REFUSED
    return classify_text(text) or CONNECTION


def classify_text(text: str) -> str | None:
    """The cause named in an error message (gRPC's details, OpenSSL's reasons), or None."""
    t = text.lower()
    if "tunnel connection failed" in t or "http proxy returned response code" in t:
        return PROXY_REFUSED
    if "hostname mismatch" in t or "not in peer certificate" in t or "ip address mismatch" in t \
            or "doesn't match" in t or "hostname" in t and "match" in t:
        return TLS_HOSTNAME
    if "expired" in t:
        return TLS_EXPIRED
    if "certificate required" in t or "certificate_required" in t or "bad certificate" in t \
            or "bad_certificate" in t or "alert unknown ca" in t or "alert_unknown_ca" in t \
            or "peer did not return a certificate" in t:
        return TLS_CLIENT_CERT
    if "unable to get local issuer" in t or "self-signed" in t or "self signed" in t \
            or "unknown ca" in t or "unable to get issuer" in t:
        return TLS_UNTRUSTED
    if "wrong version number" in t or "record layer failure" in t or "wrong_version_number" in t \
            or "packet length too long" in t:
        return TLS_PLAINTEXT
    if "certificate_verify_failed" in t or "certificate verify failed" in t or "handshake" in t \
            or "ssl" in t or "tls" in t:
        return TLS_OTHER
    return None


def describe(cause: str, endpoint: str, net: Network) -> str:
    """One line: what failed and the setting to change."""
    ca = net.name("otlp_certificate")
    via = f" through proxy {redact_proxy(net.proxy)}" if net.proxy else ""
    if cause == TLS_UNTRUSTED:
        return (f"the OTLP endpoint {endpoint} presented an untrusted certificate (unknown certificate authority): "
                f"set {ca} to the CA bundle that signed it")
    if cause == TLS_HOSTNAME:
        return (f"the OTLP endpoint {endpoint} presented a certificate for another name (hostname mismatch): "
                f"use the host name the certificate names in the endpoint, or have the gateway's certificate "
                f"include this name")
    if cause == TLS_EXPIRED:
        return (f"the OTLP endpoint {endpoint} presented an expired certificate (or one not yet valid): "
                f"renew the gateway's certificate (and check this host's clock)")
    if cause == TLS_CLIENT_CERT:
        cert = net.name("otlp_client_certificate")
        if net.client_certificate:
            return (f"the OTLP endpoint {endpoint} refused pgflow's client certificate {net.client_certificate}: "
                    f"set {cert} and {net.name('otlp_client_key')} to a certificate the gateway trusts")
        return (f"the OTLP endpoint {endpoint} requires a client certificate (mTLS): "
                f"set {cert} and {net.name('otlp_client_key')}")
    if cause == TLS_PLAINTEXT:
        return (f"the OTLP endpoint {endpoint} does not speak TLS: use http:// in the endpoint if the network is "
                f"trusted, or the gateway's TLS port")
    if cause == TLS_OTHER:
        return f"the TLS handshake with the OTLP endpoint {endpoint} failed: check {ca} and the gateway's TLS setup"
    if cause == PROXY_REFUSED:
        return (f"proxy {redact_proxy(net.proxy)} refused to CONNECT to {endpoint}: allow the endpoint's host and "
                f"port in the proxy, or set NO_PROXY / otlp_proxy (from {net.proxy_source or 'otlp_proxy'})")
    if cause == PROXY_UNREACHABLE:
        return (f"cannot reach proxy {redact_proxy(net.proxy)} (from {net.proxy_source}): check the proxy setting "
                f"or set NO_PROXY for {endpoint}")
    return f"cannot connect to the OTLP endpoint {endpoint}{via}: check the endpoint and the network"


class ProxyError(OSError):
    """The proxy refused the tunnel or could not be reached."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause


def open_socket(host: str, port: int, net: Network, timeout: float) -> socket.socket:
    """A TCP connection to ``host:port``, through the proxy's CONNECT tunnel when one is in use."""
    if not net.proxy:
        return socket.create_connection((host, port), timeout=timeout)
    phost, pport, headers = proxy_parts(net.proxy)
    try:
        sock = socket.create_connection((phost, pport), timeout=timeout)
    except OSError as exc:
        raise ProxyError(PROXY_UNREACHABLE, f"proxy unreachable ({exc.strerror or exc})") from None
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}", *(f"{k}: {v}" for k, v in headers.items())]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
        if len(answer) > 65536:
            break
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[1].startswith("2"):
        sock.close()
        raise ProxyError(PROXY_REFUSED, f"proxy answered {status_line.strip()[:80] or 'nothing'}")
    return sock


def probe(endpoint: str, net: Network, default_port: int, alpn: list[str] | None = None) -> str | None:
    """Connect to the endpoint as the transports do (proxy, TLS, client certificate) and return the
    cause of a failure, or None when the connection (and its TLS handshake) works."""
    tls, host, port, _ = split_endpoint(endpoint, default_port, net.insecure)
    timeout = max(1.0, min(net.timeout, 5.0))
    try:
        sock = open_socket(host, port, net, timeout)
    except OSError as exc:
        return classify_exception(exc)
    try:
        if not tls:
            return None
        ctx = net.ssl_context(alpn)
        with ctx.wrap_socket(sock, server_hostname=host) as tls_sock:
            # TLS 1.3: a refused client certificate arrives as an alert after the handshake.
            # A gateway that closes the connection right after the handshake (no alert: grpc's
            # BoringSSL) refused the client certificate too: a healthy one waits or sends SETTINGS.
            tls_sock.settimeout(min(timeout, 1.0))
            try:
                if tls_sock.recv(1) == b"":
                    return TLS_CLIENT_CERT
            except (socket.timeout, TimeoutError):
                pass
            except (ssl.SSLEOFError, ConnectionResetError):
                return TLS_CLIENT_CERT
            except ssl.SSLError as exc:
                return classify_exception(exc)
            except OSError:
                pass
        return None
    except (ssl.SSLError, OSError) as exc:
        return classify_exception(exc)
    finally:
        sock.close()


def check_export(endpoint: str, net: Network, protocol: str) -> tuple[str, str]:
    """``pgflow check``'s export finding: (level, detail). A TLS or proxy problem fails the check;
    an endpoint that cannot be reached at all is a warning (it may be down for a while)."""
    default_port = 4317 if protocol == "grpc" else 4318
    tls = split_endpoint(endpoint, default_port, net.insecure)[0]
    cause = probe(endpoint, net, default_port, alpn=["h2"] if protocol == "grpc" else None)
    via = f" through proxy {redact_proxy(net.proxy)} ({net.proxy_source})" if net.proxy else ""
    if cause is None:
        return "ok", f"connected to {endpoint}{via} ({'TLS verified' if tls else 'plaintext'})"
    line = describe(cause, endpoint, net)
    return ("warn" if cause == CONNECTION else "fail"), f"{line} [{cause}]"
