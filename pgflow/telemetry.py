"""The collector's own metrics (Prometheus text at /metrics) and /healthz."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry()

scrape_duration = Histogram(
    "pgflow_scrape_duration_seconds",
    "Time one scrape took",
    ["instance"],
    registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
scrape_errors = Counter("pgflow_scrape_errors_total", "Failed scrapes", ["instance", "cause"], registry=REGISTRY)
rows_scraped = Counter("pgflow_rows_scraped_total", "pg_stat_statements rows read", ["instance"], registry=REGISTRY)
text_fetches = Counter("pgflow_text_fetches_total", "Round trips that fetched query text", ["instance"], registry=REGISTRY)
text_cache_hits = Counter(
    "pgflow_text_cache_hits_total", "Query texts reused from the previous scrape (none transferred)", ["instance"], registry=REGISTRY
)
fingerprint_cache = Counter("pgflow_fingerprint_cache_total", "Fingerprint cache lookups", ["result"], registry=REGISTRY)
series_tracked = Gauge("pgflow_series_tracked", "Fingerprints tracked as their own series", ["instance"], registry=REGISTRY)
series_evicted = Counter("pgflow_series_evicted_total", "Fingerprints evicted from the LRU", ["instance"], registry=REGISTRY)
points_exported = Counter("pgflow_points_exported_total", "Data points acknowledged by the endpoint", registry=REGISTRY)
export_duration = Histogram("pgflow_export_duration_seconds", "Time one batch took to send, retries included", registry=REGISTRY)
export_retries = Counter("pgflow_export_retries_total", "Export retries", ["cause"], registry=REGISTRY)
export_failures = Counter("pgflow_export_failures_total", "Batches not acknowledged", ["cause"], registry=REGISTRY)
points_dropped = Counter("pgflow_points_dropped_total", "Points given up", ["reason"], registry=REGISTRY)
queue_depth = Gauge("pgflow_queue_depth", "Windows waiting for acknowledgement", ["instance"], registry=REGISTRY)
last_scrape = Gauge("pgflow_last_successful_scrape_timestamp_seconds", "Last successful scrape", ["instance"], registry=REGISTRY)
# issue 14: statements the monitoring role may not see; text fetches that failed (encodings).
hidden_statements = Gauge(
    "pgflow_hidden_statements",
    "pg_stat_statements rows of other roles hidden without pg_read_all_stats (not exported)",
    ["instance"],
    registry=REGISTRY,
)
text_failures = Counter(
    "pgflow_text_fetch_failures_total",
    "Statement text fetches that failed (an unreadable text); counters went on",
    ["instance"],
    registry=REGISTRY,
)

# issue 13: instance health groups read, per group (each is one read-only query under the scrape's timeouts).
health_queries = Counter("pgflow_health_queries_total", "Health group queries run", ["instance", "group"], registry=REGISTRY)
health_groups_supported = Gauge(
    "pgflow_health_group_supported", "1 if the server has the health group, else 0", ["instance", "group"], registry=REGISTRY
)
last_export = Gauge("pgflow_last_successful_export_timestamp_seconds", "Last acknowledged export", registry=REGISTRY)

# issue 11: the active-session sampler (pgflow/scrape/sampler.py)
activity_samples = Counter(
    "pgflow_activity_samples_total",
    "Active-session samples by outcome (taken, failed, skipped)",
    ["instance", "outcome"],
    registry=REGISTRY,
)
activity_sample_duration = Histogram(
    "pgflow_activity_sample_duration_seconds",
    "Time one active-session sample took",
    ["instance"],
    registry=REGISTRY,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)


# Issue 12: explain plans (and query samples).
explains_taken = Counter("pgflow_explains_total", "Plans explained", ["instance"], registry=REGISTRY)
explains_skipped = Counter(
    "pgflow_explains_skipped_total",
    "Explain candidates skipped, by reason (budget, ttl, error_cached, not_explainable, own)",
    ["instance", "reason"],
    registry=REGISTRY,
)
explains_failed = Counter(
    "pgflow_explain_failures_total",
    "Explains that failed, by cause (lock_timeout, statement_timeout, permission, undefined_object, syntax, ...)",
    ["instance", "cause"],
    registry=REGISTRY,
)
# Issue 12: events through the ledger and the shipper (pgflow/stream/logic.py, shipper.py).
events_exported = Counter("pgflow_events_exported_total", "Events (plans, query samples) acknowledged by the endpoint", registry=REGISTRY)
events_dropped = Counter(
    "pgflow_events_dropped_total",
    "Events given up, by reason (backlog: the oldest, past the bound of waiting events; rejected_by_endpoint)",
    ["reason"],
    registry=REGISTRY,
)
events_queued = Gauge("pgflow_events_queued", "Events waiting for acknowledgement", ["instance"], registry=REGISTRY)

# Issue 12: query samples. The sampler counts what it does not read (budget: too many pending,
# ended: finished before its text was read, failed: the text query failed) and the texts it
# reads; the limiter's decisions (taken; skipped as short, seen, window, fingerprint) are counted
# by the caller of pgflow.ops.query_samples.query_sample_events with count_query_samples.
query_sample_texts = Counter(
    "pgflow_query_sample_texts_read_total",
    "Statement texts the sampler read (each normalized as it was read)",
    ["instance"],
    registry=REGISTRY,
)
query_samples_taken = Counter(
    "pgflow_query_samples_total", "Query samples sent as db.server.query_sample events", ["instance"], registry=REGISTRY
)
query_samples_skipped = Counter(
    "pgflow_query_samples_skipped_total",
    "Query sample candidates skipped, by reason (budget, ended, failed, short, seen, window, fingerprint)",
    ["instance", "reason"],
    registry=REGISTRY,
)


def count_query_samples(instance: str, taken: int, skipped: dict[str, int]) -> None:
    """Publish the limiter's decisions (``SampleLimits.counts_since``: new state vs the one passed)."""
    if taken:
        query_samples_taken.labels(instance).inc(taken)
    for reason, n in skipped.items():
        if n > 0:
            query_samples_skipped.labels(instance, reason).inc(n)


# Per-table statistics (issue 13).
table_scrapes = Counter(
    "pgflow_table_scrapes_total",
    "Per-database table statistics scrapes by outcome (ok, lock_timeout, timeout, error, connect_failed)",
    ["instance", "outcome"],
    registry=REGISTRY,
)
table_scrape_duration = Histogram(
    "pgflow_table_scrape_duration_seconds",
    "Time one table statistics scrape took (every database of the instance)",
    ["instance"],
    registry=REGISTRY,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
table_rows_fetched = Counter(
    "pgflow_table_rows_fetched_total", "Table rows read by the table statistics scrape", ["instance"], registry=REGISTRY
)
tables_seen = Gauge("pgflow_tables_seen", "Tables (partitions rolled up) in the databases scraped", ["instance"], registry=REGISTRY)
tables_rolled_up = Gauge(
    "pgflow_tables_rolled_up", "Tables rolled into db.collection.name=other in the last window", ["instance"], registry=REGISTRY
)

# Issue 20: the connection budget (pgflow/scrape/budget.py) and the server's headroom.
optional_connections_open = Gauge(
    "pgflow_optional_connections_open",
    "Per-database connections open now (within max_connections_per_instance minus the scrape's and the sampler's)",
    ["instance"],
    registry=REGISTRY,
)
optional_connections_deferred = Counter(
    "pgflow_optional_connections_deferred_total",
    "Per-database connections not "
    "opened when wanted, by reason (headroom: too few free on the server; busy: "
    "every slot in use; no_slot: the budget leaves none)",
    ["instance", "reason"],
    registry=REGISTRY,
)
optional_work_waiting = Gauge(
    "pgflow_optional_work_waiting",
    "1 while per-database work waits for the server's headroom (reserved_connections_headroom)",
    ["instance"],
    registry=REGISTRY,
)
server_free_connections = Gauge(
    "pgflow_server_free_connections",
    "Connections left free for ordinary roles when last read (max_connections - reserved - in use)",
    ["instance"],
    registry=REGISTRY,
)
table_rounds_late = Counter(
    "pgflow_table_stats_rounds_late_total",
    "Table statistics rounds that did not visit every database within table_stats_interval_secs",
    ["instance"],
    registry=REGISTRY,
)
table_databases_late = Counter(
    "pgflow_table_stats_databases_late_total",
    "Databases whose table statistics were read after their interval had passed (a round too long for the interval)",
    ["instance"],
    registry=REGISTRY,
)


class Health:
    """Healthy while some instance was scraped successfully within the last three intervals."""

    def __init__(self, interval_secs: float) -> None:
        self.interval = interval_secs
        self.started = time.time()
        self.last_success: float | None = None

    def scraped(self) -> None:
        self.last_success = time.time()

    def ok(self) -> bool:
        reference = self.last_success or self.started
        return time.time() - reference <= 3 * self.interval + 1


POLL_FOREVER_SECS = 3600.0  # the /metrics loop wakes for requests (and a shutdown: _QuietServer), not on a timer


def serve(addr: str, health: Health) -> ThreadingHTTPServer:
    """Start the /metrics and /healthz server on ``host:port`` in a daemon thread."""
    host, _, port = addr.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            if self.path.startswith("/metrics"):
                body, status, ctype = generate_latest(REGISTRY), 200, CONTENT_TYPE_LATEST
            elif self.path.startswith("/healthz"):
                healthy = health.ok()
                body = b"ok\n" if healthy else b"no successful scrape in the last three intervals\n"
                status, ctype = (200 if healthy else 503), "text/plain"
            else:
                body, status, ctype = b"not found\n", 404, "text/plain"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = _QuietServer((host or "127.0.0.1", int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": POLL_FOREVER_SECS}, name="pgflow-metrics", daemon=True).start()
    return server


class _QuietServer(ThreadingHTTPServer):
    """Waits for a request, not in polls: serve_forever's default 0.5 s poll woke the thread twice
    a second for nothing (issue 20). A request is answered when it arrives either way; a
    ``shutdown()`` (the process's server is never shut down, a test's is) wakes the loop itself by
    connecting until the loop has seen it."""

    def shutdown(self) -> None:
        done = threading.Event()

        def wake() -> None:
            while not done.wait(0.05):
                try:
                    socket.create_connection(self.server_address[:2], timeout=1).close()
                except OSError:
                    return

        threading.Thread(target=wake, name="pgflow-metrics-stop", daemon=True).start()
        try:
            super().shutdown()
        finally:
            done.set()
