"""Events to an OTLP endpoint: gRPC ``LogsService/Export`` and HTTP ``/v1/logs``.

The metrics transports and exporter do the work (gzip, api-key header, one reused
channel/connection, the spec's retries, refusals given up with one line); only the method,
the path, the response type and the encoder differ, so they are subclasses that change just those.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsPartialSuccess, ExportMetricsServiceResponse

from pgflow.config import Settings
from pgflow.otlp.encode import Batch
from pgflow.otlp.exporter import Exporter, SendResult
from pgflow.otlp.logs import LogEncoder
from pgflow.otlp.network import Network
from pgflow.otlp.transport import GrpcTransport, HttpTransport

LOGS_METHOD = "/opentelemetry.proto.collector.logs.v1.LogsService/Export"


def _as_metrics_response(data: bytes) -> ExportMetricsServiceResponse:
    """A logs response in the shape the metrics transports read (rejected records → rejected points)."""
    logs = ExportLogsServiceResponse.FromString(data)
    if not logs.HasField("partial_success"):
        return ExportMetricsServiceResponse()
    return ExportMetricsServiceResponse(
        partial_success=ExportMetricsPartialSuccess(
            rejected_data_points=logs.partial_success.rejected_log_records, error_message=logs.partial_success.error_message
        )
    )


class LogsGrpcTransport(GrpcTransport):
    """OTLP/gRPC LogsService, gzip, on its own channel."""

    method = LOGS_METHOD
    read_response = staticmethod(_as_metrics_response)


class LogsHttpTransport(HttpTransport):
    """OTLP/HTTP ``POST {endpoint}/v1/logs``. The partial-success part of a logs response has the
    same field numbers and types as the metrics one, so the metrics transport reads it as is."""

    def __init__(self, endpoint: str, headers: dict[str, str], timeout: float, net: Network | None = None) -> None:
        super().__init__(endpoint, headers, timeout, net)
        self.path = self.path.removesuffix("/v1/metrics") + "/v1/logs"


class LogsExporter(Exporter):
    """Sends events frames with the settings' endpoint, headers, batch size and retry policy."""

    def __init__(self, settings: Settings, *, sleep: Callable[[float], None] | None = None) -> None:
        # Without ``sleep`` the metrics exporter's own default applies (its pause between retries).
        super().__init__(settings, **({"sleep": sleep} if sleep is not None else {}), signal="logs")
        self.transport.close()
        transport_cls = LogsGrpcTransport if settings.otlp_protocol == "grpc" else LogsHttpTransport
        self.transport = transport_cls(self.endpoint, settings.export_headers, self.net.timeout, self.net)
        self.encoder = LogEncoder(service_name=settings.service_name, batch_size=settings.batch_size)  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"LogsExporter(endpoint={self.endpoint!r})"

    def export(self, events: pl.DataFrame) -> list[tuple[Batch, SendResult]]:
        """Encode and send every event; returns each batch with its result, in order."""
        return [(batch, self.send(batch)) for batch in self.encoder.batches(events)]
