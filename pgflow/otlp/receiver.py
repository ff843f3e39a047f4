"""`pgflow receive`: a small OTLP metrics and logs receiver (gRPC and HTTP/protobuf) storing into DuckDB.

Built on the official service definitions of opentelemetry-proto. It answers like a real
server (gzip accepted, partial_success, RetryInfo, Retry-After) and can be told to answer a
scripted sequence first, e.g. ``UNAVAILABLE,UNAVAILABLE,OK`` or ``429:1,OK`` (status 429
with ``Retry-After: 1``) or ``PARTIAL:3`` (accept, report 3 points rejected). Script items
are gRPC code names or HTTP statuses; each is translated for the protocol that receives it.

Issue 21: with ``tls_cert`` and ``tls_key`` both ports speak TLS; with ``client_ca`` as well they
require a client certificate signed by that CA (mTLS): a local TLS gateway, and the tests' TLS peer.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import ssl
import threading
from collections import deque
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import polars as pl
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsPartialSuccess,
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsPartialSuccess,
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from pgflow.errors import ConfigError
from pgflow.otlp.store import PointStore

log = logging.getLogger("pgflow.receive")

_HTTP_FOR_GRPC = {
    "UNAVAILABLE": 503,
    "RESOURCE_EXHAUSTED": 429,
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "DEADLINE_EXCEEDED": 504,
    "INTERNAL": 500,
    "UNIMPLEMENTED": 501,
    "ABORTED": 503,
    "CANCELLED": 503,
    "OUT_OF_RANGE": 400,
    "DATA_LOSS": 500,
}
_GRPC_FOR_HTTP = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "UNIMPLEMENTED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


@dataclass(frozen=True)
class Reply:
    """One scripted answer: OK, PARTIAL (with rejected points), a gRPC code or an HTTP status."""

    kind: str  # "OK" | "PARTIAL" | "GRPC" | "HTTP"
    code: str = ""  # gRPC code name, or HTTP status as text
    delay: float | None = None  # Retry-After / RetryInfo seconds
    rejected: int = 0

    @classmethod
    def parse(cls, item: str) -> Reply:
        name, _, arg = item.strip().partition(":")
        name = name.upper()
        try:
            number = float(arg) if arg else None
        except ValueError:
            raise ConfigError(f"invalid script item {item!r}", "use e.g. OK, UNAVAILABLE, 503, 429:1, PARTIAL:3") from None
        if name == "OK":
            return cls("OK")
        if name == "PARTIAL":
            return cls("PARTIAL", rejected=int(number or 1))
        if name.isdigit() and 400 <= int(name) <= 599:
            return cls("HTTP", name, number)
        if name in grpc.StatusCode.__members__ and name != "OK":
            return cls("GRPC", name, number)
        raise ConfigError(f"invalid script item {item!r}", "use e.g. OK, UNAVAILABLE, 503, 429:1, PARTIAL:3")

    def http_status(self) -> int:
        return int(self.code) if self.kind == "HTTP" else _HTTP_FOR_GRPC.get(self.code, 500)

    def grpc_code(self) -> str:
        return self.code if self.kind == "GRPC" else _GRPC_FOR_HTTP.get(int(self.code), "UNKNOWN")


STOPPING = Reply("GRPC", "UNAVAILABLE")  # a request that arrives while the receiver stops: retried elsewhere, never stored
HANDLER_WAIT_SECS = 30.0  # how long stop() waits for the requests being handled


def parse_script(text: str | None) -> list[Reply]:
    return [Reply.parse(item) for item in (text or "").split(",") if item.strip()]


def _key_hash(value: str | None) -> str | None:
    return hashlib.sha256(value.encode()).hexdigest()[:16] if value else None


class Receiver:
    """Serves OTLP/gRPC and OTLP/HTTP on localhost and stores what it accepts."""

    def __init__(
        self,
        out: str | Path | None = None,
        *,
        grpc_port: int | None = 0,
        http_port: int | None = 0,
        host: str = "127.0.0.1",
        script: list[Reply] | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        client_ca: str | Path | None = None,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together", "give both, or neither for plaintext")
        if client_ca is not None and tls_cert is None:
            raise ConfigError("--client-ca needs --tls-cert and --tls-key", "client certificates need TLS")
        self.tls_files = (Path(tls_cert), Path(tls_key)) if tls_cert and tls_key else None
        self.client_ca = Path(client_ca) if client_ca else None
        for path in (*(self.tls_files or ()), *((self.client_ca,) if self.client_ca else ())):
            if not path.is_file():
                raise ConfigError(f"cannot read {path}", "give the PEM files of the receiver's certificate and key")
        self.store = PointStore(out)
        self.host = host
        self.script: deque[Reply] = deque(script or [])
        self._lock = threading.Lock()
        self.attempts: list[tuple[str, str]] = []  # (protocol, outcome) of every request, in order
        self.clients: list[str] = []  # over mTLS: the common name of the client certificate of each request
        self._grpc_port, self._http_port = grpc_port, http_port
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None
        self.grpc_port = self.http_port = 0
        # Requests being handled: stop() waits for them before it closes the store, so no
        # handler thread is still inside polars or DuckDB when the process exits (a daemon
        # thread in native code at interpreter exit aborts the process).
        self._handlers = threading.Condition()
        self._active = 0
        self._stopping = False

    # Decisions shared by both protocols -------------------------------------------------

    def _next(self, protocol: str) -> Reply:
        with self._lock:
            reply = self.script.popleft() if self.script else Reply("OK")
        return reply

    @contextmanager
    def _request(self) -> Iterator[bool]:
        """One request being handled; False: the receiver is stopping (answer without the store)."""
        with self._handlers:
            stopping = self._stopping
            if not stopping:
                self._active += 1
        if stopping:
            yield False
            return
        try:
            yield True
        finally:
            with self._handlers:
                self._active -= 1
                self._handlers.notify_all()

    def _handle(self, request: ExportMetricsServiceRequest, protocol: str, api_key: str | None) -> Reply:
        with self._request() as open_:
            return self._handle_open(request, protocol, api_key) if open_ else STOPPING

    def _handle_open(self, request: ExportMetricsServiceRequest, protocol: str, api_key: str | None) -> Reply:
        reply = self._next(protocol)
        outcome = reply.kind if reply.kind in ("OK", "PARTIAL") else (str(reply.http_status()) if protocol == "http" else reply.grpc_code())
        self.store.add(request, protocol, outcome, _key_hash(api_key), store=reply.kind in ("OK", "PARTIAL"))
        with self._lock:
            self.attempts.append((protocol, outcome))
        return reply

    def _handle_logs(self, request: ExportLogsServiceRequest, protocol: str, api_key: str | None) -> Reply:
        """The same scripted answers as for metrics (one script for both signals); records go to ``logs``."""
        with self._request() as open_:
            return self._handle_logs_open(request, protocol, api_key) if open_ else STOPPING

    def _handle_logs_open(self, request: ExportLogsServiceRequest, protocol: str, api_key: str | None) -> Reply:
        reply = self._next(protocol)
        outcome = reply.kind if reply.kind in ("OK", "PARTIAL") else (str(reply.http_status()) if protocol == "http" else reply.grpc_code())
        self.store.add_logs(request, protocol, outcome, _key_hash(api_key), store=reply.kind in ("OK", "PARTIAL"))
        with self._lock:
            self.attempts.append((f"{protocol}/logs", outcome))
        return reply

    def _client(self, name: str) -> None:
        """Note the client certificate a request came with (mTLS only)."""
        if self.client_ca is not None:
            with self._lock:
                self.clients.append(name)

    def set_script(self, replies: list[Reply]) -> None:
        with self._lock:
            self.script = deque(replies)

    # Servers ------------------------------------------------------------------------------

    def start(self) -> Receiver:
        if self._grpc_port is not None:
            self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
            # The generated grpc modules carry no annotations.
            metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
                _GrpcService(self), self._grpc
            )
            logs_service_pb2_grpc.add_LogsServiceServicer_to_server(  # type: ignore[no-untyped-call]
                _GrpcLogsService(self), self._grpc
            )
            address = f"{self.host}:{self._grpc_port}"
            if self.tls_files is not None:
                cert, key = (p.read_bytes() for p in self.tls_files)
                creds = grpc.ssl_server_credentials(
                    [(key, cert)],
                    root_certificates=self.client_ca.read_bytes() if self.client_ca else None,
                    require_client_auth=self.client_ca is not None,
                )
                self.grpc_port = self._grpc.add_secure_port(address, creds)
            else:
                self.grpc_port = self._grpc.add_insecure_port(address)
            self._grpc.start()
        if self._http_port is not None:
            self._http = _QuietHTTPServer((self.host, self._http_port), _http_handler(self))
            self._http.daemon_threads = True
            if self.tls_files is not None:  # the handshake happens in the request's thread, not in accept()
                self._http.socket = self._server_context().wrap_socket(self._http.socket, server_side=True, do_handshake_on_connect=False)
            self.http_port = self._http.server_address[1]
            threading.Thread(target=self._http.serve_forever, name="otlp-http", daemon=True).start()
        return self

    def _server_context(self) -> ssl.SSLContext:
        assert self.tls_files is not None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.tls_files[0]), str(self.tls_files[1]))
        if self.client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(str(self.client_ca))
        return ctx

    @property
    def scheme(self) -> str:
        return "https" if self.tls_files is not None else "http"

    @property
    def grpc_endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        return f"{self.scheme}://{self.host}:{self.http_port}"

    def stop(self) -> None:
        """Stop serving, let the requests being handled finish (``HANDLER_WAIT_SECS`` at most), close the store."""
        if self._grpc is not None:
            self._grpc.stop(grace=2).wait()  # after the grace, gRPC cancels the calls but not their handlers' threads
            self._grpc = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        with self._handlers:
            self._stopping = True
            if not self._handlers.wait_for(lambda: self._active == 0, timeout=HANDLER_WAIT_SECS):
                log.warning("receiver stopping with requests still being handled", extra={"requests": self._active})
        self.store.close()

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def points(self) -> pl.DataFrame:
        return self.store.points()

    def logs(self) -> pl.DataFrame:
        return self.store.logs()


class _QuietHTTPServer(ThreadingHTTPServer):
    """A refused TLS handshake (untrusted or missing client certificate) is a debug line, not a traceback."""

    def handle_error(self, request: object, client_address: object) -> None:
        import sys

        log.debug("request failed", extra={"client": str(client_address), "error": repr(sys.exc_info()[1])[:200]})


class _GrpcService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(self, request: ExportMetricsServiceRequest, context: grpc.ServicerContext) -> ExportMetricsServiceResponse:  # noqa: N802
        self.receiver._client(_grpc_common_name(context))
        api_key = dict(context.invocation_metadata()).get("api-key")
        reply = self.receiver._handle(request, "grpc", api_key)
        if reply.kind == "OK":
            return ExportMetricsServiceResponse()
        if reply.kind == "PARTIAL":
            return ExportMetricsServiceResponse(
                partial_success=ExportMetricsPartialSuccess(rejected_data_points=reply.rejected, error_message="scripted partial success")
            )
        _grpc_refuse(reply, context)
        return ExportMetricsServiceResponse()


def _grpc_refuse(reply: Reply, context: grpc.ServicerContext) -> None:
    """Answer a scripted refusal on gRPC: the code, and RetryInfo when the script gives a delay."""
    name = reply.grpc_code()
    code = grpc.StatusCode[name]
    if reply.delay is not None:
        info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(reply.delay), nanos=int((reply.delay % 1) * 1e9)))
        status = status_pb2.Status(code=getattr(code_pb2, name), message=f"scripted {name}")
        status.details.add().Pack(info)
        context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
    context.set_code(code)
    context.set_details(f"scripted {name}")


def _logs_response(reply: Reply) -> ExportLogsServiceResponse:
    if reply.kind == "PARTIAL":
        return ExportLogsServiceResponse(
            partial_success=ExportLogsPartialSuccess(rejected_log_records=reply.rejected, error_message="scripted partial success")
        )
    return ExportLogsServiceResponse()


class _GrpcLogsService(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def Export(self, request: ExportLogsServiceRequest, context: grpc.ServicerContext) -> ExportLogsServiceResponse:  # noqa: N802
        self.receiver._client(_grpc_common_name(context))
        reply = self.receiver._handle_logs(request, "grpc", dict(context.invocation_metadata()).get("api-key"))
        if reply.kind not in ("OK", "PARTIAL"):
            _grpc_refuse(reply, context)
        return _logs_response(reply)


def _grpc_common_name(context: grpc.ServicerContext) -> str:
    """The common name of the certificate a gRPC client presented ("" without one)."""
    names = context.auth_context().get("x509_common_name") or [b""]
    return str(names[0].decode())


def _common_name(connection: object) -> str:
    """The common name of the certificate a TLS client presented ("" without one)."""
    try:
        cert = connection.getpeercert()  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return ""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""


def _http_handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            log.debug(format % args)

        def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802
            receiver._client(_common_name(self.connection))
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if self.path.rstrip("/") == "/v1/logs":
                self._post_logs(body)
                return
            if self.path.rstrip("/") != "/v1/metrics":
                self._answer(404, status_pb2.Status(code=code_pb2.NOT_FOUND, message="only /v1/metrics and /v1/logs").SerializeToString())
                return
            try:
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    body = gzip.decompress(body)
                request = ExportMetricsServiceRequest.FromString(body)
            except Exception:
                self._answer(
                    400,
                    status_pb2.Status(
                        code=code_pb2.INVALID_ARGUMENT, message="body is not a gzip/protobuf ExportMetricsServiceRequest"
                    ).SerializeToString(),
                )
                return
            reply = receiver._handle(request, "http", self.headers.get("api-key"))
            if reply.kind == "OK":
                self._answer(200, ExportMetricsServiceResponse().SerializeToString())
            elif reply.kind == "PARTIAL":
                self._answer(
                    200,
                    ExportMetricsServiceResponse(
                        partial_success=ExportMetricsPartialSuccess(
                            rejected_data_points=reply.rejected, error_message="scripted partial success"
                        )
                    ).SerializeToString(),
                )
            else:
                status = reply.http_status()
                headers = {"Retry-After": str(int(reply.delay))} if reply.delay is not None else {}
                self._answer(status, status_pb2.Status(message=f"scripted {status}").SerializeToString(), headers)

        def _post_logs(self, body: bytes) -> None:
            try:
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    body = gzip.decompress(body)
                request = ExportLogsServiceRequest.FromString(body)
            except Exception:
                self._answer(
                    400,
                    status_pb2.Status(
                        code=code_pb2.INVALID_ARGUMENT, message="body is not a gzip/protobuf ExportLogsServiceRequest"
                    ).SerializeToString(),
                )
                return
            reply = receiver._handle_logs(request, "http", self.headers.get("api-key"))
            if reply.kind in ("OK", "PARTIAL"):
                self._answer(200, _logs_response(reply).SerializeToString())
            else:
                status = reply.http_status()
                headers = {"Retry-After": str(int(reply.delay))} if reply.delay is not None else {}
                self._answer(status, status_pb2.Status(message=f"scripted {status}").SerializeToString(), headers)

    return Handler
