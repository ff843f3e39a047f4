"""TLS export: CPU per window when the endpoint closed the kept-alive connection (issue 20).

New Relic's endpoint is verified against the system's CA store, and endpoints and load balancers
close idle connections: a window a minute apart often goes out on a new TLS connection. This
times, on the sending thread (``time.thread_time``), one window of a few points sent on a new
connection each time, over OTLP/HTTP with TLS to a local ``pgflow receive`` (its certificate's CA
added to a copy of the system's bundle through ``SSL_CERT_FILE``, so the client reads the whole
system store, as it does for New Relic):

- pgflow: its HTTP transport (``pgflow.otlp.transport.HttpTransport.send``), the connection closed
  after each window;
- the floor, measured in the same run: ``http.client.HTTPSConnection`` with one SSL context built
  once, the same payload gzipped and posted, the connection closed after each window (a
  handshake, the request and nothing else).

Last line: ms_per_window=<f> ms_per_window_floor=<f> ratio_floor=<f>
Usage: python bench/tls_bench.py [windows=40]
"""

from __future__ import annotations

import gzip
import http.client
import os
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from certs import make_certs  # noqa: E402

from pgflow.config import Settings  # noqa: E402
from pgflow.otlp.encode import Encoder  # noqa: E402
from pgflow.otlp.exporter import Exporter  # noqa: E402
from pgflow.otlp.receiver import Receiver  # noqa: E402


def median_ms(fn, n: int) -> float:
    out = []
    for _ in range(n):
        c = time.thread_time()
        fn()
        out.append((time.thread_time() - c) * 1e3)
    return statistics.median(out[2:])


def main() -> None:
    windows = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    work = Path(tempfile.mkdtemp(prefix="pgflow-tls-bench-"))
    try:
        run(work, windows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(work: Path, windows: int) -> None:
    certs = make_certs(work / "certs")
    system = ssl.get_default_verify_paths().cafile or ssl.get_default_verify_paths().openssl_cafile
    bundle = work / "bundle.pem"
    bundle.write_bytes(Path(system).read_bytes() + b"\n" + certs.ca.read_bytes())
    os.environ["SSL_CERT_FILE"] = str(bundle)  # before any context reads the defaults
    print(f"system bundle: {system} + the test CA ({ssl.create_default_context().cert_store_stats()['x509_ca']} CAs)")
    from test_otlp import make_points

    with Receiver(tls_cert=certs.server_cert, tls_key=certs.server_key, grpc_port=None) as receiver:
        endpoint = f"https://localhost:{receiver.http_port}"
        exporter = Exporter(Settings.load(otlp_endpoint=endpoint, otlp_protocol="http"))
        batch = next(Encoder().batches(make_points(8)))
        payload = bytes(batch.payload)
        transport = exporter.transport

        def pgflow_window() -> None:
            assert transport.send(payload).ok
            transport.close()  # the endpoint closed the idle connection before the next window

        ctx = ssl.create_default_context()
        headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"}

        def floor_window() -> None:
            conn = http.client.HTTPSConnection("localhost", receiver.http_port, context=ctx, timeout=10)
            conn.request("POST", "/v1/metrics", body=gzip.compress(payload, compresslevel=6), headers=headers)
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            conn.close()

        pgflow_ms = median_ms(pgflow_window, windows)
        floor_ms = median_ms(floor_window, windows)
        exporter.close()
    print(f"pgflow: {pgflow_ms:.2f} ms of CPU per window on a new TLS connection; floor: {floor_ms:.2f} ms")
    print(f"ms_per_window={pgflow_ms:.3f} ms_per_window_floor={floor_ms:.3f} ratio_floor={pgflow_ms / floor_ms:.2f}")


if __name__ == "__main__":
    main()
