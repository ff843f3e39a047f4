"""OTLP export: encoding, transports (gRPC, HTTP), retries by the spec, and a local receiver."""

import os

# grpc core logs every failed TLS handshake (INFO) and proxy refusal (ERROR, with a source trace) on
# stderr, per attempt; pgflow says each once, in its own log line. GRPC_VERBOSITY set by the user wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
