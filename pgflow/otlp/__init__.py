"""OTLP export: encoding, transports (gRPC, HTTP), retries by the spec, and a local receiver."""
