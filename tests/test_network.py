"""Issue 21: OTLP over TLS and mTLS, through a real HTTPS proxy, against `pgflow receive` with
certificates the tests make. pgbench is the ground truth of every exact run."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from certs import Certs, make_certs, renewed_client
from conftest import PGBENCH_STATEMENTS
from e2e import ROOT, calls_by_summary, collector_env, settle, start_collector, wait_for_baseline
from test_otlp import make_points

from pgflow.config import Settings
from pgflow.errors import ConfigError
from pgflow.otlp import network
from pgflow.otlp.exporter import Exporter
from pgflow.otlp.receiver import Receiver
from pgflow.pgserver import free_port

pytestmark = pytest.mark.slow

PGBENCH = tuple(PGBENCH_STATEMENTS)
UNTRUSTED = "presented an untrusted certificate"
PROXY_AUTH = ("pgflow", "s3cret-pw")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


def assert_pgbench_exact(calls: dict[str, float], expected: int) -> None:
    assert {s: calls.get(s) for s in PGBENCH} == {s: expected for s in PGBENCH}


def endpoint(receiver: Receiver, protocol: str) -> str:
    return receiver.grpc_endpoint if protocol == "grpc" else receiver.http_endpoint


def run_pgbench_through(pg, receiver: Receiver, protocol: str, tmp_path: Path, transactions: int = 50, **env: str) -> str:
    """Run the collector against ``receiver``, pgbench once, stop: returns the collector's log."""
    state = tmp_path / "state"
    e = collector_env(pg.dsn(), endpoint(receiver, protocol), state, PGFLOW_OTLP_PROTOCOL=protocol, **env)
    proc = start_collector(e, log=tmp_path / "log")
    wait_for_baseline(state)
    pg.pgbench("-n", "-c", "2", "-t", str(transactions))
    settle(state_dir=state)
    assert stop(proc) == 0, (tmp_path / "log").read_text()[-3000:]
    return (tmp_path / "log").read_text()


def metrics_text(addr: str) -> str:
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as response:
        return response.read().decode()


# TLS and mTLS: pgbench exact ---------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_pgbench_exact_over_tls_trusting_the_test_ca(fresh_stats, certs, tmp_path, protocol):
    with Receiver(tls_cert=certs.server_cert, tls_key=certs.server_key) as receiver:
        assert endpoint(receiver, protocol).startswith("https://")
        log = run_pgbench_through(fresh_stats, receiver, protocol, tmp_path, OTEL_EXPORTER_OTLP_CERTIFICATE=str(certs.ca))
        assert_pgbench_exact(calls_by_summary(receiver.points()), 100)  # 2 clients x 50
    assert "Traceback" not in log and "cause=tls_" not in log


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_pgbench_exact_with_mtls_required(fresh_stats, certs, tmp_path, protocol):
    with Receiver(tls_cert=certs.server_cert, tls_key=certs.server_key, client_ca=certs.ca) as receiver:
        run_pgbench_through(
            fresh_stats,
            receiver,
            protocol,
            tmp_path,
            OTEL_EXPORTER_OTLP_CERTIFICATE=str(certs.ca),
            OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE=str(certs.client_cert),
            OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY=str(certs.client_key),
            OTEL_EXPORTER_OTLP_LOGS_CLIENT_CERTIFICATE=str(certs.client_cert),
            OTEL_EXPORTER_OTLP_LOGS_CLIENT_KEY=str(certs.client_key),
        )
        assert_pgbench_exact(calls_by_summary(receiver.points()), 100)  # 2 clients x 50


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_renewed_client_certificate_is_presented_from_the_next_connection(certs, tmp_path, protocol):
    """Issue 20: over HTTP every connection shares one TLS context (reading the system's CA store
    costs ~20 ms of CPU, and an endpoint that closes idle connections makes every window connect
    anew), over gRPC one channel serves every request; a certificate renewed in place, as
    cert-manager or a sidecar does it, is still presented from the next request on, without a
    restart."""
    live_cert, live_key = tmp_path / "client.pem", tmp_path / "client.key"
    shutil.copyfile(certs.client_cert, live_cert)
    shutil.copyfile(certs.client_key, live_key)
    renewed_cert, renewed_key = renewed_client(certs, "renewed", "pgflow_renewed")
    with Receiver(tls_cert=certs.server_cert, tls_key=certs.server_key, client_ca=certs.ca) as receiver:
        settings = Settings.load(
            otlp_endpoint=endpoint(receiver, protocol),
            otlp_protocol=protocol,
            otlp_certificate=str(certs.ca),
            otlp_client_certificate=str(live_cert),
            otlp_client_key=str(live_key),
        )
        exporter = Exporter(settings)
        contexts = []
        for renew in (False, False, True, False):
            if renew:  # written beside, then renamed over the old files, as renewals do
                for new, live in ((renewed_cert, live_cert), (renewed_key, live_key)):
                    beside = live.with_name(live.name + ".new")
                    shutil.copyfile(new, beside)
                    os.replace(beside, live)
            assert all(r.acknowledged for _, r in exporter.export(make_points(2)))
            if protocol == "http":
                contexts.append(exporter.transport._conn._context)  # type: ignore[union-attr]
                exporter.transport.close()  # the endpoint closed the idle connection: the next window connects anew
        exporter.close()
        assert receiver.clients == ["pgflow_cert", "pgflow_cert", "pgflow_renewed", "pgflow_renewed"]
        assert receiver.points().height == 4 * 3
        if protocol == "http":
            assert contexts[0] is contexts[1] and contexts[2] is contexts[3] and contexts[1] is not contexts[2]


# Refusals: one line per cause, nothing lost -------------------------------------------------------


def test_untrusted_certificate_exits_3_then_the_ca_delivers_every_window_once(fresh_stats, certs, tmp_path):
    state = tmp_path / "state"
    with Receiver(tls_cert=certs.server_cert, tls_key=certs.server_key) as receiver:
        metrics_addr = f"127.0.0.1:{free_port()}"
        env = collector_env(
            fresh_stats.dsn(),
            receiver.grpc_endpoint,
            state,
            PGFLOW_SHUTDOWN_TIMEOUT_SECS="3",
            PGFLOW_METRICS_ADDR=metrics_addr,
            PGFLOW_OTLP_PROTOCOL="grpc",
        )
        proc = start_collector(env, log=tmp_path / "log1")
        wait_for_baseline(state)
        fresh_stats.pgbench("-n", "-c", "2", "-t", "40")
        settle(3, state_dir=state)
        failures = metrics_text(metrics_addr)
        assert stop(proc) == 3  # windows kept in the ledger, not acknowledged
        log1 = (tmp_path / "log1").read_text()
        assert receiver.points().height == 0
        lines = [ln for ln in log1.splitlines() if UNTRUSTED in ln and "signal=metrics" in ln]
        assert len(lines) == 1, log1[-3000:]  # once per state change, not per window or retry
        assert "OTEL_EXPORTER_OTLP_CERTIFICATE" in lines[0] and "cause=tls_untrusted" in lines[0]
        assert re.search(r'pgflow_export_failures_total\{cause="tls_untrusted"\} [1-9]', failures)

        # Restart with the CA: everything kept goes out, exactly once.
        env["OTEL_EXPORTER_OTLP_CERTIFICATE"] = str(certs.ca)
        env["PGFLOW_METRICS_ADDR"] = f"127.0.0.1:{free_port()}"
        proc = start_collector(env, log=tmp_path / "log2")
        settle(state_dir=state)
        assert stop(proc) == 0, (tmp_path / "log2").read_text()[-3000:]
        assert_pgbench_exact(calls_by_summary(receiver.points()), 80)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize(
    "which,cause,words",
    [
        ("wrong_name", "tls_hostname", "certificate for another name (hostname mismatch)"),
        ("expired", "tls_expired", "presented an expired certificate"),
        ("untrusted", "tls_untrusted", UNTRUSTED),
        ("no_client_cert", "tls_client_cert", "requires a client certificate (mTLS): set otlp_client_certificate"),
    ],
)
def test_each_tls_refusal_has_its_own_line(certs, caplog, protocol, which, cause, words):
    cert, key = {"wrong_name": (certs.wrong_name_cert, certs.wrong_name_key), "expired": (certs.expired_cert, certs.expired_key)}.get(
        which, (certs.server_cert, certs.server_key)
    )
    client_ca = certs.ca if which == "no_client_cert" else None
    ca = {} if which == "untrusted" else {"otlp_certificate": certs.ca}
    with Receiver(tls_cert=cert, tls_key=key, client_ca=client_ca) as receiver:
        settings = Settings.load(otlp_endpoint=endpoint(receiver, protocol), otlp_protocol=protocol, retry_max_attempts=2, **ca)
        exporter = Exporter(settings, sleep=lambda _: None)
        with caplog.at_level(logging.INFO, logger="pgflow.export"):
            for _ in range(3):  # three windows: one line
                [(_, result)] = exporter.export(make_points(2))
                assert not result.acknowledged and result.cause == cause
        exporter.close()
        assert receiver.points().height == 0
    lines = [r.getMessage() for r in caplog.records if words in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert exporter.stats.failures[cause] == 3


def test_check_reports_the_untrusted_certificate(pg, certs, tmp_path):
    with Receiver(tls_cert=certs.server_cert, tls_key=certs.server_key) as receiver:
        env = collector_env(pg.dsn(), receiver.grpc_endpoint, tmp_path, PGFLOW_OTLP_PROTOCOL="grpc")
        bad = subprocess.run([sys.executable, "-m", "pgflow", "check"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
        env["OTEL_EXPORTER_OTLP_CERTIFICATE"] = str(certs.ca)
        good = subprocess.run([sys.executable, "-m", "pgflow", "check"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 1 and "FAIL connect: " in bad.stdout and UNTRUSTED in bad.stdout
    assert "OTEL_EXPORTER_OTLP_CERTIFICATE" in bad.stdout
    assert good.returncode == 0, good.stdout + good.stderr
    assert "ok   connect: connected to https://127.0.0.1" in good.stdout and "TLS verified" in good.stdout


# Settings checked at start -----------------------------------------------------------------------


def test_unreadable_or_invalid_tls_files_exit_2_naming_them(pg, certs, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(tmp_path / "missing.pem"), "OTEL_EXPORTER_OTLP_LOGS_CERTIFICATE": str(junk)}
    for name, value in cases.items():
        env = collector_env(pg.dsn(), "https://127.0.0.1:1", tmp_path / "state", **{name: value})
        proc = subprocess.run([sys.executable, "-m", "pgflow", "run"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and value in lines[0], lines
    config = tmp_path / "pgflow.json"  # the JSON file's settings are checked the same way
    config.write_text(f'{{"otlp_client_certificate": "{certs.client_cert}", "otlp_client_key": "{junk}"}}')
    env = collector_env(pg.dsn(), "https://127.0.0.1:1", tmp_path / "state", PGFLOW_CONFIG=str(config))
    proc = subprocess.run([sys.executable, "-m", "pgflow", "run"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"otlp_client_key (OTEL_EXPORTER_OTLP_CLIENT_KEY) {junk} holds no PEM private key" in proc.stderr
    with pytest.raises(ConfigError, match="otlp_client_certificate .* is set but otlp_client_key"):
        Settings.load(otlp_endpoint="https://127.0.0.1:1", otlp_client_certificate=certs.client_cert)
    with pytest.raises(ConfigError, match="do not make a usable pair"):
        Settings.load(otlp_endpoint="https://127.0.0.1:1", otlp_client_certificate=certs.client_cert, otlp_client_key=certs.server_key)


def test_timeout_is_milliseconds_and_per_signal_wins(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2500")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_TIMEOUT", "700")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_LOGS_COMPRESSION", "none")
    settings = Settings.load(otlp_endpoint="https://127.0.0.1:1")
    assert settings.network("metrics").timeout == 2.5 and settings.network("logs").timeout == 0.7
    assert settings.network("metrics").compression == "gzip" and settings.network("logs").compression == "none"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_uncompressed_export_is_received(protocol, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "none")
    with Receiver() as receiver:
        exporter = Exporter(Settings.load(otlp_endpoint=endpoint(receiver, protocol), otlp_protocol=protocol))
        assert all(r.acknowledged for _, r in exporter.export(make_points(4)))
        exporter.close()
        assert receiver.points().height == 5


def test_api_key_over_plaintext_to_another_host_is_refused(pg, tmp_path):
    env = collector_env(pg.dsn(), "http://10.255.0.1:4317", tmp_path / "state", NEW_RELIC_API_KEY="NRAK-SECRET-1")
    proc = subprocess.run([sys.executable, "-m", "pgflow", "run"], env=env, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert (
        proc.stderr.count("\n") == 1
        and "plaintext" in proc.stderr
        and "OTEL_EXPORTER_OTLP_INSECURE=true" in proc.stderr
        and "NRAK-SECRET-1" not in proc.stderr
    )
    from pgflow.cli import require_tls_for_key

    for allowed in (
        dict(otlp_endpoint="http://10.255.0.1:4317", otlp_insecure=True),  # said explicitly
        dict(otlp_endpoint="http://127.0.0.1:4317"),  # this host
        dict(otlp_endpoint="https://10.255.0.1:4317"),
    ):
        require_tls_for_key(Settings.load(new_relic_api_key="NRAK-SECRET-1", **allowed))


# Proxies -------------------------------------------------------------------------------------------


class Tinyproxy:
    """Debian's tinyproxy on a loopback port; ``connect_ports`` limits CONNECT (403 otherwise)."""

    def __init__(self, connect_ports: tuple[int, ...] = (), auth: tuple[str, str] | None = None) -> None:
        binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
        if not os.path.exists(binary):
            pytest.fail("tinyproxy is not installed: apt-get install tinyproxy (scripts/test does as root)")
        # tinyproxy drops root for nobody: its log lives where nobody may write (pytest's dirs are 0700)
        self.root = root = Path(tempfile.mkdtemp(prefix="pgflow-tinyproxy-"))
        root.chmod(0o777)
        self.port = free_port()
        self.log = root / "tinyproxy.log"
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 60",
            f'LogFile "{self.log}"',
            "LogLevel Connect",
            "MaxClients 50",
            "Allow 127.0.0.1",
            *(f"ConnectPort {p}" for p in connect_ports),
            *([f"BasicAuth {auth[0]} {auth[1]}"] if auth else []),
        ]
        self.auth = auth
        if os.geteuid() == 0:
            lines[:0] = ["User nobody", "Group nogroup"]
        conf = root / "tinyproxy.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with __import__("socket").create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        pytest.fail("tinyproxy did not start")

    @property
    def url(self) -> str:
        cred = f"{self.auth[0]}:{self.auth[1]}@" if self.auth else ""
        return f"http://{cred}127.0.0.1:{self.port}"

    def connects(self, port: int) -> int:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return len(re.findall(rf"CONNECT 127\.0\.0\.1:{port} ", text))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def proxy():
    p = Tinyproxy(auth=PROXY_AUTH)  # it admits only pgflow with this password
    yield p
    p.stop()


@pytest.fixture(scope="module")
def refusing_proxy():
    p = Tinyproxy(connect_ports=(443,))
    yield p
    p.stop()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_pgbench_exact_through_an_https_proxy(fresh_stats, certs, proxy, tmp_path, protocol):
    with Receiver(tls_cert=certs.server_cert, tls_key=certs.server_key) as receiver:
        port = receiver.grpc_port if protocol == "grpc" else receiver.http_port
        log = run_pgbench_through(
            fresh_stats, receiver, protocol, tmp_path, HTTPS_PROXY=proxy.url, OTEL_EXPORTER_OTLP_CERTIFICATE=str(certs.ca)
        )
        assert_pgbench_exact(calls_by_summary(receiver.points()), 100)  # 2 clients x 50
    assert proxy.connects(port) >= 1  # the tunnel went through the proxy, which checked the password
    assert "Traceback" not in log and PROXY_AUTH[1] not in log


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_no_proxy_covering_the_endpoint_bypasses_the_proxy(certs, proxy, monkeypatch, protocol):
    monkeypatch.setenv("https_proxy", proxy.url)
    monkeypatch.setenv("NO_PROXY", "example.com,127.0.0.0/8")
    with Receiver(tls_cert=certs.server_cert, tls_key=certs.server_key) as receiver:
        settings = Settings.load(otlp_endpoint=endpoint(receiver, protocol), otlp_protocol=protocol, otlp_certificate=certs.ca)
        assert settings.network().proxy is None
        exporter = Exporter(settings)
        assert all(r.acknowledged for _, r in exporter.export(make_points(2)))
        exporter.close()
        port = receiver.grpc_port if protocol == "grpc" else receiver.http_port
    assert proxy.connects(port) == 0


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_otlp_proxy_overrides_the_environment_and_hides_credentials(certs, proxy, monkeypatch, caplog, protocol):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens there
    with Receiver(tls_cert=certs.server_cert, tls_key=certs.server_key) as receiver:
        settings = Settings.load(
            otlp_endpoint=endpoint(receiver, protocol), otlp_protocol=protocol, otlp_certificate=certs.ca, otlp_proxy=proxy.url
        )
        assert "s3cret-pw" not in repr(settings) and "<redacted>@127.0.0.1" in repr(settings)
        exporter = Exporter(settings)
        assert all(r.acknowledged for _, r in exporter.export(make_points(2)))
        exporter.close()
        port = receiver.grpc_port if protocol == "grpc" else receiver.http_port
    assert proxy.connects(port) == 1


def test_proxy_refusing_connect_gives_its_line_and_loses_nothing(fresh_stats, certs, refusing_proxy, proxy, tmp_path):
    state = tmp_path / "state"
    with Receiver(tls_cert=certs.server_cert, tls_key=certs.server_key) as receiver:
        env = collector_env(
            fresh_stats.dsn(),
            receiver.http_endpoint,
            state,
            PGFLOW_OTLP_PROTOCOL="http",
            PGFLOW_SHUTDOWN_TIMEOUT_SECS="3",
            HTTPS_PROXY=refusing_proxy.url,
            OTEL_EXPORTER_OTLP_CERTIFICATE=str(certs.ca),
        )
        proc = start_collector(env, log=tmp_path / "log1")
        wait_for_baseline(state)
        fresh_stats.pgbench("-n", "-c", "2", "-t", "30")
        settle(3, state_dir=state)
        assert stop(proc) == 3
        log1 = (tmp_path / "log1").read_text()
        lines = [ln for ln in log1.splitlines() if "refused to CONNECT" in ln and "signal=metrics" in ln]
        assert len(lines) == 1 and "cause=proxy_refused" in lines[0] and "HTTPS_PROXY" in lines[0], log1[-3000:]
        assert receiver.points().height == 0 and refusing_proxy.connects(receiver.http_port) >= 1
        # The proxy fixed (here: another proxy): every window kept goes out once.
        env["HTTPS_PROXY"] = proxy.url
        env["PGFLOW_METRICS_ADDR"] = f"127.0.0.1:{free_port()}"
        proc = start_collector(env, log=tmp_path / "log2")
        settle(state_dir=state)
        assert stop(proc) == 0
        assert_pgbench_exact(calls_by_summary(receiver.points()), 60)


def test_grpc_proxy_refusal_is_named(certs, refusing_proxy, caplog):
    with Receiver(tls_cert=certs.server_cert, tls_key=certs.server_key) as receiver:
        settings = Settings.load(
            otlp_endpoint=receiver.grpc_endpoint,
            otlp_protocol="grpc",
            otlp_certificate=certs.ca,
            otlp_proxy=refusing_proxy.url,
            retry_max_attempts=1,
        )
        exporter = Exporter(settings, sleep=lambda _: None)
        with caplog.at_level(logging.ERROR, logger="pgflow.export"):
            [(_, result)] = exporter.export(make_points(2))
        exporter.close()
    assert result.cause == network.PROXY_REFUSED
    assert any("refused to CONNECT" in r.getMessage() for r in caplog.records)


def test_proxy_from_the_environment_by_scheme(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://secure-proxy:3128")
    monkeypatch.setenv("http_proxy", "plain-proxy:8080")
    assert network.proxy_for("https://gw.example:4317", None) == ("http://secure-proxy:3128", "HTTPS_PROXY")
    assert network.proxy_for("gw.example:4317", None)[1] == "HTTPS_PROXY"  # no scheme: TLS
    assert network.proxy_for("http://gw.example:4317", None) == ("http://plain-proxy:8080", "http_proxy")
    assert network.proxy_for("https://gw.example:4317", "none") == (None, "otlp_proxy")
    monkeypatch.setenv("no_proxy", ".example")
    assert network.proxy_for("https://gw.example:4317", None) == (None, "NO_PROXY")
    assert network.proxy_for("https://gw.example:4317", "http://p:1")[0] == "http://p:1"  # the setting wins
    monkeypatch.setenv("HTTPS_PROXY", "https://u:pw@secure-proxy:3128")
    monkeypatch.delenv("no_proxy")
    with pytest.raises(ConfigError) as info:
        Settings.load(otlp_endpoint="https://gw.example:4317")
    assert "HTTPS_PROXY" in str(info.value) and "pw" not in str(info.value).replace("https://", "")


def test_no_proxy_matching():
    assert network.no_proxy_covers("otlp.example.com", 4317, ".example.com")
    assert network.no_proxy_covers("example.com", 4317, "example.com")
    assert network.no_proxy_covers("10.1.2.3", 4317, "localhost, 10.0.0.0/8")
    assert network.no_proxy_covers("gw", 4317, "gw:4317") and not network.no_proxy_covers("gw", 4318, "gw:4317")
    assert network.no_proxy_covers("anything", 1, "*")
    assert not network.no_proxy_covers("notexample.com", 4317, "example.com")


def test_receive_cli_serves_both_ports_over_mtls(certs, tmp_path):
    out = tmp_path / "points.duckdb"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pgflow",
            "receive",
            "--out",
            str(out),
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--tls-cert",
            str(certs.server_cert),
            "--tls-key",
            str(certs.server_key),
            "--client-ca",
            str(certs.ca),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()
        assert line.count("https://127.0.0.1:") == 2, line
        grpc_port, http_port = map(int, re.findall(r"127\.0\.0\.1:(\d+)", line))
        for protocol, port in [("grpc", grpc_port), ("http", http_port)]:
            url = f"https://127.0.0.1:{port}"
            refused = Exporter(
                Settings.load(otlp_endpoint=url, otlp_protocol=protocol, otlp_certificate=certs.ca, retry_max_attempts=1),
                sleep=lambda _: None,
            )
            [(_, result)] = refused.export(make_points(3))
            assert result.cause == network.TLS_CLIENT_CERT
            refused.close()
            exporter = Exporter(
                Settings.load(
                    otlp_endpoint=url,
                    otlp_protocol=protocol,
                    otlp_certificate=certs.ca,
                    otlp_client_certificate=certs.client_cert,
                    otlp_client_key=certs.client_key,
                )
            )
            assert all(r.acknowledged for _, r in exporter.export(make_points(3)))
            exporter.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err
    from pgflow.otlp.store import read_points

    assert read_points(out).height == 8


def test_grpc_cores_own_proxy_variables_are_not_used(monkeypatch):
    """grpc core alone would read grpc_proxy / https_proxy / http_proxy (lower case only, whatever
    the target's scheme) and no_grpc_proxy: pgflow decides for both transports, by one rule."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("grpc_proxy", "http://127.0.0.1:9")  # nothing listens there
    with Receiver() as receiver:
        exporter = Exporter(Settings.load(otlp_endpoint=receiver.grpc_endpoint, otlp_protocol="grpc", retry_max_attempts=1))
        assert all(r.acknowledged for _, r in exporter.export(make_points(2)))
        exporter.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_http_proxy_carries_a_plaintext_endpoint(proxy, monkeypatch, protocol):
    for name in ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    with Receiver() as receiver:
        settings = Settings.load(otlp_endpoint=endpoint(receiver, protocol), otlp_protocol=protocol)
        assert settings.network().proxy_source == "HTTP_PROXY"
        exporter = Exporter(settings)
        assert all(r.acknowledged for _, r in exporter.export(make_points(2)))
        exporter.close()
        port = receiver.grpc_port if protocol == "grpc" else receiver.http_port
    assert proxy.connects(port) == 1


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_other_transports_port_is_named_once_and_nothing_is_acknowledged(protocol, caplog):
    """Issue 20 made OTLP/HTTP the default: an endpoint that speaks the other transport gets one
    line naming PGFLOW_OTLP_PROTOCOL, not an endless "cannot connect"; the window is not
    acknowledged (the shipper keeps it for later)."""
    with Receiver() as receiver:
        wrong = receiver.grpc_endpoint if protocol == "http" else receiver.http_endpoint
        exporter = Exporter(Settings.load(otlp_endpoint=wrong, otlp_protocol=protocol, retry_max_attempts=1), sleep=lambda _: None)
        with caplog.at_level(logging.ERROR, logger="pgflow.export"):
            results = [r for _ in range(3) for _, r in exporter.export(make_points(2))]
        exporter.close()
        assert receiver.points().height == 0
    expected = "PGFLOW_OTLP_PROTOCOL=grpc" if protocol == "http" else "PGFLOW_OTLP_PROTOCOL=http"
    lines = [r.getMessage() for r in caplog.records if expected in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert wrong in lines[0]
    assert all(not r.acknowledged for r in results)
    assert {r.cause for r in results} == {network.SPEAKS_GRPC if protocol == "http" else network.SPEAKS_HTTP1}


def test_check_names_the_refusing_proxy(certs, refusing_proxy, proxy):
    with Receiver(tls_cert=certs.server_cert, tls_key=certs.server_key) as receiver:
        for via, expected in ((refusing_proxy, "fail"), (proxy, "ok")):
            settings = Settings.load(
                otlp_endpoint=receiver.grpc_endpoint, otlp_protocol="grpc", otlp_certificate=certs.ca, otlp_proxy=via.url
            )
            level, detail = network.check_export(settings.endpoint, settings.network(), "grpc")
            assert level == expected, detail
        assert (
            "refused to CONNECT"
            in network.check_export(
                receiver.grpc_endpoint,
                Settings.load(
                    otlp_endpoint=receiver.grpc_endpoint, otlp_protocol="grpc", otlp_certificate=certs.ca, otlp_proxy=refusing_proxy.url
                ).network(),
                "grpc",
            )[1]
        )
        assert PROXY_AUTH[1] not in detail and "through proxy http://<redacted>@127.0.0.1" in detail
