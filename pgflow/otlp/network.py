"""How pgflow reaches the OTLP endpoint: proxy tunnels, connection probes, and what a failure to connect means.

What to connect with (the TLS files, proxy, timeout and compression, from pgflow's settings and the
OpenTelemetry exporter variables, per signal) is resolved and checked when the settings load, by
:mod:`pgflow.config.network`; its names (:class:`Network`, :func:`proxy_for`, :func:`redact_proxy`, ...)
stay importable from here. Both transports tunnel through a proxy with ``CONNECT``; the proxy itself
is spoken to in plain HTTP (``http://user:pass@host:port``), and its credentials are never logged.

A connection that fails is classified into one *cause* (:data:`CAUSES`), each with one line
naming what to change: it labels ``pgflow_export_failures_total`` and the exporter's log line.
"""

from __future__ import annotations

import base64
import socket
import ssl
from urllib.parse import unquote, urlsplit

# The settings' side lives on the configuration's floor (pgflow.config may not import pgflow.otlp).
from pgflow.config.network import OTEL_SUFFIX as OTEL_SUFFIX
from pgflow.config.network import SIGNALS as SIGNALS
from pgflow.config.network import Network as Network
from pgflow.config.network import check_client_pair as check_client_pair
from pgflow.config.network import check_pem as check_pem
from pgflow.config.network import check_proxy as check_proxy
from pgflow.config.network import no_proxy_covers as no_proxy_covers
from pgflow.config.network import proxy_for as proxy_for
from pgflow.config.network import redact_proxy as redact_proxy
from pgflow.config.network import split_endpoint as split_endpoint

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
# Issue 20: the endpoint speaks the other OTLP transport (OTLP/HTTP became the default).
SPEAKS_GRPC = "endpoint_speaks_grpc"
SPEAKS_HTTP1 = "endpoint_speaks_http1"
CAUSES = (
    TLS_UNTRUSTED,
    TLS_HOSTNAME,
    TLS_EXPIRED,
    TLS_CLIENT_CERT,
    TLS_OTHER,
    TLS_PLAINTEXT,
    PROXY_REFUSED,
    PROXY_UNREACHABLE,
    SPEAKS_GRPC,
    SPEAKS_HTTP1,
    CONNECTION,
)


# Proxies ------------------------------------------------------------------------------------


def proxy_parts(url: str) -> tuple[str, int, dict[str, str]]:
    """(host, port, headers for CONNECT) of a proxy URL; credentials become Proxy-Authorization."""
    parts = urlsplit(url)
    headers = {}
    if parts.username is not None:
        token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Proxy-Authorization"] = "Basic " + base64.b64encode(token).decode()
    return parts.hostname or "localhost", parts.port or 80, headers


# Failures -------------------------------------------------------------------------------------

_VERIFY_CAUSES = {
    10: TLS_EXPIRED,
    9: TLS_OTHER,
    62: TLS_HOSTNAME,
    18: TLS_UNTRUSTED,
    19: TLS_UNTRUSTED,
    20: TLS_UNTRUSTED,
    21: TLS_UNTRUSTED,
    2: TLS_UNTRUSTED,
}


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


def http2_frame(line: str) -> bool:
    """True when an HTTP/1.1 status line is the start of an HTTP/2 SETTINGS frame: a gRPC server
    answering an OTLP/HTTP request (3 bytes of length, then frame type 4)."""
    return len(line) >= 4 and line[:2] == "\x00\x00" and line[3] == "\x04"


def speaks_http1(grpc_detail: str) -> bool:
    """True when gRPC's failure says the server answered HTTP/1.x (an OTLP/HTTP port)."""
    t = grpc_detail.lower()
    return "failed parsing http/2" in t or "expected settings frame" in t


def classify_text(text: str) -> str | None:
    """The cause named in an error message (gRPC's details, OpenSSL's reasons), or None."""
    t = text.lower()
    if "tunnel connection failed" in t or "http proxy returned response code" in t:
        return PROXY_REFUSED
    if (
        "hostname mismatch" in t
        or "not in peer certificate" in t
        or "ip address mismatch" in t
        or "doesn't match" in t
        or "hostname" in t
        and "match" in t
    ):
        return TLS_HOSTNAME
    if "expired" in t:
        return TLS_EXPIRED
    if (
        "certificate required" in t
        or "certificate_required" in t
        or "bad certificate" in t
        or "bad_certificate" in t
        or "alert unknown ca" in t
        or "alert_unknown_ca" in t
        or "peer did not return a certificate" in t
    ):
        return TLS_CLIENT_CERT
    if "unable to get local issuer" in t or "self-signed" in t or "self signed" in t or "unknown ca" in t or "unable to get issuer" in t:
        return TLS_UNTRUSTED
    if "wrong version number" in t or "record layer failure" in t or "wrong_version_number" in t or "packet length too long" in t:
        return TLS_PLAINTEXT
    if "certificate_verify_failed" in t or "certificate verify failed" in t or "handshake" in t or "ssl" in t or "tls" in t:
        return TLS_OTHER
    return None


def describe(cause: str, endpoint: str, net: Network) -> str:
    """One line: what failed and the setting to change."""
    ca = net.name("otlp_certificate")
    via = f" through proxy {redact_proxy(net.proxy)}" if net.proxy else ""
    if cause == TLS_UNTRUSTED:
        return (
            f"the OTLP endpoint {endpoint} presented an untrusted certificate (unknown certificate authority): "
            f"set {ca} to the CA bundle that signed it"
        )
    if cause == TLS_HOSTNAME:
        return (
            f"the OTLP endpoint {endpoint} presented a certificate for another name (hostname mismatch): "
            f"use the host name the certificate names in the endpoint, or have the gateway's certificate "
            f"include this name"
        )
    if cause == TLS_EXPIRED:
        return (
            f"the OTLP endpoint {endpoint} presented an expired certificate (or one not yet valid): "
            f"renew the gateway's certificate (and check this host's clock)"
        )
    if cause == TLS_CLIENT_CERT:
        cert = net.name("otlp_client_certificate")
        if net.client_certificate:
            return (
                f"the OTLP endpoint {endpoint} refused pgflow's client certificate {net.client_certificate}: "
                f"set {cert} and {net.name('otlp_client_key')} to a certificate the gateway trusts"
            )
        return f"the OTLP endpoint {endpoint} requires a client certificate (mTLS): set {cert} and {net.name('otlp_client_key')}"
    if cause == TLS_PLAINTEXT:
        return (
            f"the OTLP endpoint {endpoint} does not speak TLS: use http:// in the endpoint if the network is "
            f"trusted, or the gateway's TLS port"
        )
    if cause == TLS_OTHER:
        return f"the TLS handshake with the OTLP endpoint {endpoint} failed: check {ca} and the gateway's TLS setup"
    if cause == PROXY_REFUSED:
        return (
            f"proxy {redact_proxy(net.proxy)} refused to CONNECT to {endpoint}: allow the endpoint's host and "
            f"port in the proxy, or set NO_PROXY / otlp_proxy (from {net.proxy_source or 'otlp_proxy'})"
        )
    if cause == SPEAKS_GRPC:
        return (
            f"the OTLP endpoint {endpoint} answered as an OTLP/gRPC server (HTTP/2 only), not OTLP/HTTP: "
            f"set PGFLOW_OTLP_PROTOCOL=grpc, or use the endpoint's OTLP/HTTP port (4318 by convention)"
        )
    if cause == SPEAKS_HTTP1:
        return (
            f"the OTLP endpoint {endpoint} answered HTTP/1.x, not gRPC: set PGFLOW_OTLP_PROTOCOL=http, "
            f"or use the endpoint's OTLP/gRPC port (4317 by convention)"
        )
    if cause == PROXY_UNREACHABLE:
        return (
            f"cannot reach proxy {redact_proxy(net.proxy)} (from {net.proxy_source}): check the proxy setting "
            f"or set NO_PROXY for {endpoint}"
        )
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
            except TimeoutError:
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
