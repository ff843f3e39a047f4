"""OTLP export: encoding, transports (gRPC, HTTP), retries by the spec, and a local receiver."""

import os

# grpc core logs every failed TLS handshake at INFO on stderr; pgflow says it once, in its own log line.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
