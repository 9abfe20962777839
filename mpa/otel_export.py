"""Switch the OpenTelemetry audit export on from configuration: OTLP over gRPC.

``start_otlp_audit_export(settings)`` builds an SDK ``LoggerProvider`` and ``TracerProvider`` of
their own (the process's global providers are left alone), each with a batch processor and the
SDK's OTLP gRPC exporter pointed at ``settings.endpoint``, and returns the
:class:`mpa.audit.OpenTelemetryExporter` that writes through them plus a ``close()`` that
flushes and shuts both down. The audit shipper then exports every event (at least once) as one
log record and one span.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from .audit import OpenTelemetryExporter
from .config import OtelSettings


@dataclasses.dataclass
class OtlpAuditExport:
    exporter: OpenTelemetryExporter
    logger_provider: Any
    tracer_provider: Any

    def export(self, events: Any) -> None:
        self.exporter.export(events)

    def close(self) -> None:
        """Send what is batched, then stop (bounded by the exporter's timeout)."""
        for provider in (self.logger_provider, self.tracer_provider):
            provider.force_flush()
            provider.shutdown()


#: How to restore opentelemetry-proto's generated code when another package overwrote it.
OTEL_PROTO_FIX = "pip install --force-reinstall --no-deps opentelemetry-proto==<its installed version>"


def otel_proto_problem(common_pb2: Any = None) -> str | None:
    """Why the OTLP exporter cannot work with the installed OpenTelemetry protos, or None.

    ``xds-protos`` (Envoy's API types) ships its own, older copy of
    ``opentelemetry/proto/common/v1/common_pb2.py`` in the same place as ``opentelemetry-proto``;
    whichever pip installs last wins, and the old one lacks ``InstrumentationScope``, which the
    OTLP exporter imports. ``.ci/run`` reinstalls opentelemetry-proto after the install."""
    if common_pb2 is None:
        from opentelemetry.proto.common.v1 import common_pb2
    if hasattr(common_pb2, "InstrumentationScope"):
        return None
    return (f"the installed {getattr(common_pb2, '__file__', 'common_pb2')} is an old OpenTelemetry proto "
            "(without InstrumentationScope), most likely xds-protos' copy installed over opentelemetry-proto's; "
            f"the OTLP audit export needs the real one: {OTEL_PROTO_FIX}")


def start_otlp_audit_export(settings: OtelSettings) -> OtlpAuditExport:
    """Start the OTLP log and span export; raises ``RuntimeError`` naming the fix when the
    installed OpenTelemetry protos are not the exporter's (see ``otel_proto_problem``)."""
    problem = otel_proto_problem()
    if problem is not None:
        raise RuntimeError(problem)
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": settings.service_name})
    headers = dict(settings.headers) or None
    lp = LoggerProvider(resource=resource)
    lp.add_log_record_processor(BatchLogRecordProcessor(OTLPLogExporter(
        endpoint=settings.endpoint, insecure=settings.insecure, headers=headers,
        timeout=settings.timeout_seconds), schedule_delay_millis=settings.batch_delay_ms))
    tp = TracerProvider(resource=resource)
    tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
        endpoint=settings.endpoint, insecure=settings.insecure, headers=headers,
        timeout=settings.timeout_seconds), schedule_delay_millis=settings.batch_delay_ms))
    return OtlpAuditExport(OpenTelemetryExporter(tp, lp), lp, tp)


__all__ = ["OTEL_PROTO_FIX", "OtlpAuditExport", "otel_proto_problem", "start_otlp_audit_export"]
