"""Transports: OTLP/gRPC and OTLP/HTTP (binary protobuf), gzip, one channel/connection reused.

A transport sends one serialized ExportMetricsServiceRequest and reports an :class:`Attempt`;
it never retries (the exporter does) and never raises for a network or server failure.
Issue 21: both take a :class:`~pgflow.otlp.network.Network` (CA bundle, client certificate,
proxy, timeout, compression); a connection that fails for a TLS or proxy reason reports that
cause (``tls_untrusted``, ``proxy_refused``...) as not retryable: it does not fix itself.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

from pgflow.config.network import files_stamp
from pgflow.logs import kv
from pgflow.otlp import network as netmod
from pgflow.otlp.network import Network
from pgflow.otlp.retry import Attempt, grpc_retryable, http_retryable, parse_retry_after

if TYPE_CHECKING:
    import grpc

log = logging.getLogger("pgflow.export")

EXPORT_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"


def _split(endpoint: str, default_port: int, insecure: bool = False) -> tuple[bool, str, int, str]:
    """(tls, host, port, path) of an endpoint; ``http://`` means no TLS, anything else TLS."""
    return netmod.split_endpoint(endpoint, default_port, insecure)


def _read(path: Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _network_failure(cause: str, detail: str) -> Attempt:
    """A TLS or proxy failure: not retryable (the same certificate and proxy answer the same)."""
    return Attempt(ok=False, cause=cause, retryable=cause in (netmod.CONNECTION, netmod.PROXY_UNREACHABLE), detail=detail[:200])


def _partial(response: ExportMetricsServiceResponse) -> tuple[int, str]:
    if response.HasField("partial_success"):
        return int(response.partial_success.rejected_data_points), response.partial_success.error_message
    return 0, ""


class GrpcTransport:
    """OTLP/gRPC with gzip; the channel is created once and reused for every request, and created
    again when a TLS file it was read from changed (a renewed client certificate or CA bundle is
    used from the next request on, as over HTTP; compared by modification time, size and inode).

    grpc is imported here, not with the module (issue 20): it costs about 20 MB of memory and
    five threads, which a collector exporting over HTTP never needs.
    """

    method = EXPORT_METHOD  # the RPC (the logs transport: LogsService/Export) and its response reader
    read_response = staticmethod(ExportMetricsServiceResponse.FromString)

    def __init__(self, endpoint: str, headers: dict[str, str], timeout: float, net: Network | None = None) -> None:
        import grpc

        self.net = net or Network(timeout=timeout)
        self.endpoint = endpoint
        self._tls, host, port, _ = _split(endpoint, 4317, self.net.insecure)
        self._target = f"{host}:{port}"
        self._options: list[tuple[str, object]] = [("grpc.max_send_message_length", 16 * 1024 * 1024)]
        # The proxy is pgflow's decision (otlp_proxy, HTTPS_PROXY / NO_PROXY as the HTTP transport
        # reads them): grpc core's own environment handling (grpc_proxy, no_grpc_proxy...) is off.
        self._options.append(("grpc.http_proxy", self.net.proxy) if self.net.proxy else ("grpc.enable_http_proxy", 0))
        self._files = self.net.configured_tls_files() if self._tls else ()
        self._open()
        self._metadata = tuple((k.lower(), v) for k, v in headers.items())
        self.timeout = self.net.timeout
        self._compression = grpc.Compression.Gzip if self.net.compression == "gzip" else grpc.Compression.NoCompression

    def _open(self) -> None:
        """The channel, with the TLS files as they are now."""
        import grpc

        stamp = files_stamp(self._files)  # before reading: a change made meanwhile is seen next time
        if self._tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(self.net.certificate),
                private_key=_read(self.net.client_key),
                certificate_chain=_read(self.net.client_certificate),
            )
            self._channel = grpc.secure_channel(self._target, creds, options=self._options)
        else:
            self._channel = grpc.insecure_channel(self._target, options=self._options)
        self._export = self._channel.unary_unary(self.method, request_serializer=None, response_deserializer=self.read_response)
        self._stamp = stamp  # only once made: files not readable yet are tried again at the next request

    def _renewed(self) -> None:
        """A TLS file changed since the channel was made: make it again (the old one is closed)."""
        if self._files and files_stamp(self._files) != self._stamp:
            old = self._channel
            try:
                self._open()
            except OSError as exc:  # a file replaced but not yet there: keep the channel, try at the next request
                log.debug("renewed TLS files not readable yet; the channel is kept", extra=kv(error=type(exc).__name__))
                return
            old.close()

    def send(self, payload: bytes) -> Attempt:
        import grpc

        self._renewed()
        try:
            response = self._export(payload, timeout=self.timeout, metadata=self._metadata, compression=self._compression)
        except grpc.RpcError as exc:
            attempt = _grpc_failure(exc)
            if attempt.cause in ("UNAVAILABLE", "UNKNOWN", "DEADLINE_EXCEEDED"):
                cause = self._connection_cause(attempt.detail)
                if cause is not None:
                    return _network_failure(cause, attempt.detail)
            return attempt
        rejected, message = _partial(response)
        return Attempt(ok=True, rejected_points=rejected, detail=message)

    def _connection_cause(self, detail: str) -> str | None:
        """The TLS or proxy cause behind an UNAVAILABLE, or None for any other (a down endpoint:
        retryable as before). grpc's message names some causes; a probe with the same settings
        names the rest (which certificate check failed)."""
        if netmod.speaks_http1(detail):
            return netmod.SPEAKS_HTTP1
        named = netmod.classify_text(detail)
        if named in (None, netmod.TLS_OTHER, netmod.CONNECTION) and not _connect_failure(detail):
            return None
        if named not in (None, netmod.TLS_OTHER, netmod.CONNECTION):
            return named
        found = netmod.probe(self.endpoint, self.net, 4317, alpn=["h2"])
        return found if found not in (None, netmod.CONNECTION) else None

    def close(self) -> None:
        self._channel.close()


def _connect_failure(detail: str) -> bool:
    t = detail.lower()
    return any(
        w in t
        for w in (
            "failed to connect",
            "handshake",
            "ssl",
            "tls",
            "certificate",
            "proxy",
            "connection reset",
            "socket closed",
            "end of tcp stream",
            "connect",
        )
    )


def _grpc_failure(exc: grpc.RpcError) -> Attempt:
    import grpc

    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    name = code.name if code is not None else "UNKNOWN"
    delay = None
    for key, value in (exc.trailing_metadata() or ()) if hasattr(exc, "trailing_metadata") else ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    details = exc.details() if hasattr(exc, "details") else ""
    return Attempt(ok=False, cause=name, retryable=grpc_retryable(name, delay is not None), delay=delay, detail=str(details or "")[:200])


# A kept-alive connection the endpoint had closed (while idle, as servers and load balancers do).
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class HttpTransport:
    """OTLP/HTTP binary protobuf with gzip: ``POST {endpoint}/v1/metrics`` on one kept-alive connection."""

    def __init__(self, endpoint: str, headers: dict[str, str], timeout: float, net: Network | None = None) -> None:
        self.net = net or Network(timeout=timeout)
        self.endpoint = endpoint
        self.tls, self.host, self.port, path = _split(endpoint, 4318, self.net.insecure)
        self.path = path if path.endswith("/v1/metrics") else f"{path}/v1/metrics"
        self.gzip = self.net.compression == "gzip"
        self.headers = {"Content-Type": "application/x-protobuf", **({"Content-Encoding": "gzip"} if self.gzip else {}), **headers}
        self.timeout = self.net.timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            tunnel_headers: dict[str, str] = {}
            host, port = self.host, self.port
            if self.net.proxy:  # CONNECT through the proxy, for https and http endpoints alike
                host, port, tunnel_headers = netmod.proxy_parts(self.net.proxy)
            if self.tls:
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    host, port, timeout=self.timeout, context=self.net.ssl_context()
                )
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
            if self.net.proxy:
                conn.set_tunnel(self.host, self.port, headers=tunnel_headers)
            self._conn = conn
        return self._conn

    def _post(self, body: bytes) -> tuple[http.client.HTTPResponse, bytes]:
        conn = self._connection()
        conn.request("POST", self.path, body=body, headers=self.headers)
        response = conn.getresponse()
        return response, response.read()

    def send(self, payload: bytes) -> Attempt:
        body = gzip.compress(payload, compresslevel=6) if self.gzip else payload
        try:
            reused = self._conn is not None
            try:
                response, data = self._post(body)
            except _STALE as exc:
                if not reused:
                    raise
                # The kept-alive connection was closed while idle (load balancers and servers
                # close idle connections; windows are a minute apart): send again at once on a
                # new one, as HTTP clients do, not as a failed attempt after a backoff.
                log.debug("kept-alive connection closed by the endpoint; sending on a new one", extra=kv(error=type(exc).__name__))
                self.close()
                response, data = self._post(body)
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            self.close()
            if isinstance(exc, http.client.BadStatusLine) and netmod.http2_frame(str(getattr(exc, "line", ""))):
                return _network_failure(netmod.SPEAKS_GRPC, "the answer was an HTTP/2 SETTINGS frame")
            cause = netmod.classify_exception(exc)
            if (
                cause == netmod.CONNECTION and self.net.proxy and not isinstance(exc, socket.timeout)
            ) or cause == netmod.TLS_OTHER:  # the probe names which check failed
                cause = netmod.probe(self.endpoint, self.net, 4318) or cause
            if cause != netmod.CONNECTION:
                return _network_failure(cause, f"{type(exc).__name__}: {exc}")
            return Attempt(ok=False, cause="connection", retryable=True, detail=type(exc).__name__)
        status = response.status
        if 200 <= status < 300:
            parsed = ExportMetricsServiceResponse()
            try:
                parsed.ParseFromString(data)
            except Exception:
                pass
            rejected, message = _partial(parsed)
            return Attempt(ok=True, rejected_points=rejected, detail=message)
        if response.getheader("Connection", "").lower() == "close":
            self.close()
        return Attempt(
            ok=False,
            cause=f"http_{status}",
            retryable=http_retryable(status),
            delay=parse_retry_after(response.getheader("Retry-After")),
            detail=data[:200].decode("utf-8", "replace"),
        )

    def close(self) -> None:
        """Close the connection; a read blocked in another thread returns at once."""
        conn, self._conn = self._conn, None
        if conn is not None:
            if conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            conn.close()
