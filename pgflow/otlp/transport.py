"""Transports: OTLP/gRPC and OTLP/HTTP (binary protobuf), gzip, one channel/connection reused.

A transport sends one serialized ExportMetricsServiceRequest and reports an :class:`Attempt`;
it never retries (the exporter does) and never raises for a network or server failure.
"""

from __future__ import annotations

import gzip
import http.client
import socket
import ssl
from urllib.parse import urlsplit

import grpc
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

from pgflow.otlp.retry import Attempt, grpc_retryable, http_retryable, parse_retry_after

EXPORT_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"


def _split(endpoint: str, default_port: int) -> tuple[bool, str, int, str]:
    """(tls, host, port, path) of an endpoint; ``http://`` means no TLS, anything else TLS."""
    if "://" not in endpoint:
        endpoint = "https://" + endpoint
    parts = urlsplit(endpoint)
    return parts.scheme != "http", parts.hostname or "localhost", parts.port or default_port, parts.path.rstrip("/")


def _partial(response: ExportMetricsServiceResponse) -> tuple[int, str]:
    if response.HasField("partial_success"):
        return int(response.partial_success.rejected_data_points), response.partial_success.error_message
    return 0, ""


class GrpcTransport:
    """OTLP/gRPC with gzip; the channel is created once and reused for every request."""

    def __init__(self, endpoint: str, headers: dict[str, str], timeout: float) -> None:
        tls, host, port, _ = _split(endpoint, 4317)
        target = f"{host}:{port}"
        options = [("grpc.max_send_message_length", 16 * 1024 * 1024)]
        self._channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(), options=options)
                         if tls else grpc.insecure_channel(target, options=options))
        self._export = self._channel.unary_unary(
            EXPORT_METHOD, request_serializer=None, response_deserializer=ExportMetricsServiceResponse.FromString
        )
        self._metadata = tuple((k.lower(), v) for k, v in headers.items())
        self.timeout = timeout

    def send(self, payload: bytes) -> Attempt:
        try:
            response = self._export(payload, timeout=self.timeout, metadata=self._metadata,
                                    compression=grpc.Compression.Gzip)
        except grpc.RpcError as exc:
            return _grpc_failure(exc)
        rejected, message = _partial(response)
        return Attempt(ok=True, rejected_points=rejected, detail=message)

    def close(self) -> None:
        self._channel.close()


def _grpc_failure(exc: grpc.RpcError) -> Attempt:
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
    return Attempt(ok=False, cause=name, retryable=grpc_retryable(name, delay is not None), delay=delay,
                   detail=str(details or "")[:200])


class HttpTransport:
    """OTLP/HTTP binary protobuf with gzip: ``POST {endpoint}/v1/metrics`` on one kept-alive connection."""

    def __init__(self, endpoint: str, headers: dict[str, str], timeout: float) -> None:
        self.tls, self.host, self.port, path = _split(endpoint, 4318)
        self.path = path if path.endswith("/v1/metrics") else f"{path}/v1/metrics"
        self.headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip", **headers}
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.tls:
                self._conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                                         context=ssl.create_default_context())
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        return self._conn

    def send(self, payload: bytes) -> Attempt:
        body = gzip.compress(payload, compresslevel=6)
        try:
            conn = self._connection()
            conn.request("POST", self.path, body=body, headers=self.headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException, socket.timeout) as exc:
            self.close()
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
        return Attempt(ok=False, cause=f"http_{status}", retryable=http_retryable(status),
                       delay=parse_retry_after(response.getheader("Retry-After")),
                       detail=data[:200].decode("utf-8", "replace"))

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
