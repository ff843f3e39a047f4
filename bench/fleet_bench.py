"""Fleet: the cost of one instance, and of each further one, at every default setting (issue 20).

One real PostgreSQL holds about ``statements`` distinct statements (nearly idle otherwise);
``pgflow run`` is started twice as a user would (a subprocess, default intervals: statements
every 30 s, sampling at 1 Hz, health every 60 s, tables every 300 s, export every 60 s), with
1 instance and with N instances (each instance is one database of the server: every one reads
the server's whole pg_stat_statements), exporting to a `pgflow receive` in its own process.
After ``warmup`` seconds, for ``duration`` seconds: CPU of the collector process (all its
threads: utime + stime from /proc/<pid>/stat), its resident memory (VmRSS, read every 2 s: the
mean is the figure, the end and the peak are printed beside it), and the connections it holds (pg_stat_activity, application_name = 'pgflow', sampled every 0.5 s).
Beside its logs: ``memory-<n>.txt`` (resident memory by mapping) and ``threads-<n>.txt`` (CPU by
thread over the measured period, named by ``py-spy dump`` when py-spy is on PATH).

The peer, measured in the same run the same way: bench/bare_reader.py, a Python process that only
reads what pgflow reads at the same rates (pgflow's sampling query every second and its statements
query every 30 s per instance, psycopg ``fetchall()``, nothing done with the rows), with 1 and N
instances; and the memory of the libraries alone (a process that imports what ``pgflow run``
imports and does nothing). The line before the last gives the peer's figures and pgflow's ratios
to them: the floor a Python collector reading the same data cannot go under, and how far above it
pgflow is.

Last line: cpu_pct_1=<f> cpu_pct_per_instance=<f> rss_mb_1=<f> rss_mb_per_instance=<f> connections_max=<n>
(cpu_pct: percent of one core; connections_max: the most one instance's run held at once).

Usage: python bench/fleet_bench.py [instances=5] [duration_secs=120] [warmup_secs=40] [statements=2000]
(a duration under 120 s is for trying the bench, not for a figure). PGFLOW_BENCH_PG_BINDIR picks
the PostgreSQL (the issue's figures: /usr/lib/postgresql/15/bin).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
import workload_shapes

from pgflow.pgserver import LocalPostgres, free_port
from pgflow.scrape.sampling_sql import sample_sql, with_known_idle
from pgflow.scrape.scraper import Scraper
from pgflow.scrape.statements import statements_sql

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def make_statements(pg: LocalPostgres, n: int) -> None:
    """``n`` distinct statements in pg_stat_statements, on every version (bench/workload_shapes.py)."""
    workload_shapes.make_statements(pg.dsn(), n)


def cpu_secs(pid: int) -> float:
    """utime + stime of every thread of ``pid`` (the process's own totals include its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


@dataclass(frozen=True)
class Resident:
    """VmRSS (MB) over a measured period, read every :data:`RSS_EVERY_SECS`. The mean is the figure:
    one reading moves by several MB with where the instances' window closes fall (a close's
    frames live for a moment), which is more than one instance costs."""

    mean: float
    end: float
    peak: float

    def __str__(self) -> str:
        return f"rss {self.mean:.1f} MB (end {self.end:.1f}, peak {self.peak:.1f})"


RSS_EVERY_SECS = 2.0


def resident_over(pid: int, duration: float) -> Resident:
    """Sleep ``duration`` seconds reading ``pid``'s resident memory every :data:`RSS_EVERY_SECS`."""
    end = time.monotonic() + duration
    readings = [rss_mb(pid)]
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(RSS_EVERY_SECS, left))
        readings.append(rss_mb(pid))
    return Resident(sum(readings) / len(readings), readings[-1], max(readings))


def thread_cpu(pid: int) -> dict[str, float]:
    """utime + stime per thread of ``pid``, by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended
            continue
        out[task.name] = (int(fields[11]) + int(fields[12])) / TICK
    return out


def thread_profile(pid: int, before: dict[str, float], seconds: float, out: Path) -> None:
    """Where the collector's CPU went, by thread (for the reader of the bench, not its figures).

    Threads named as Python names them when ``py-spy`` is on PATH (``py-spy dump``), else by
    their kernel name; a worker pool's threads are summed under their prefix."""
    after = thread_cpu(pid)
    names = {}
    for task in after:
        try:
            names[task] = (Path(f"/proc/{pid}/task/{task}/comm")).read_text().strip()
        except FileNotFoundError:
            names[task] = "?"
    try:
        dump = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30).stdout
        for line in dump.splitlines():
            if line.startswith("Thread ") and '"' in line:
                names[str(int(line.split()[1], 0))] = line.split('"')[1]
    except (OSError, subprocess.TimeoutExpired):
        pass
    spent: dict[str, float] = {}
    for task, cpu in after.items():
        name = re.sub(r"_\d+$", "_*", names[task])
        spent[name] = spent.get(name, 0.0) + cpu - before.get(task, 0.0)
    lines = [f"{100 * cpu / seconds:7.3f} %  {name}" for name, cpu in sorted(spent.items(), key=lambda kv: -kv[1])]
    out.write_text("CPU by thread, % of one core over the measured period\n" + "\n".join(lines) + "\n")


def memory_profile(pid: int, out: Path) -> None:
    """Where the collector's resident memory is (for the reader of the bench, not its figures).

    smaps summed by mapping (file name, ``[heap]``, or anonymous), largest first, and the
    threads by name: each thread may own a glibc malloc arena and a stack.
    """
    by_mapping: dict[str, int] = {}
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head[0]):
            name = head[5] if len(head) > 5 else "[anon]"
        elif head and head[0] == "Rss:":
            by_mapping[name] = by_mapping.get(name, 0) + int(head[1])
    threads = sorted(Path(f"/proc/{pid}/task/{t}/comm").read_text().strip() for t in os.listdir(f"/proc/{pid}/task"))
    lines = [f"{kb / 1024:8.1f} MB  {name}" for name, kb in sorted(by_mapping.items(), key=lambda kv: -kv[1])]
    out.write_text(Path(f"/proc/{pid}/smaps_rollup").read_text() + "\n" + "\n".join(lines) + f"\n\nthreads ({len(threads)}): {threads}\n")


class Connections:
    """The most connections pgflow held at once, sampled from the server's pg_stat_activity."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True, application_name="fleet-bench")
        self.most = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            n = self.conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgflow'").fetchone()[0]
            self.most = max(self.most, n)

    def close(self) -> int:
        self.stop.set()
        self.thread.join(timeout=5)
        self.conn.close()
        return self.most


def run_collector(
    pg: LocalPostgres, databases: list[str], endpoint: str, work: Path, duration: float, warmup: float
) -> tuple[float, Resident, int]:
    """(CPU % of one core, resident memory, most connections held) of one ``pgflow run`` over ``databases``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGFLOW_", "OTEL_"))}
    env.pop("DATABASE_URL", None)
    state = Path(tempfile.mkdtemp(prefix="state-", dir=work))
    env |= {
        "PGFLOW_INSTANCES": json.dumps([{"name": d, "database_url": pg.dsn(d)} for d in databases]),
        "PGFLOW_OTLP_ENDPOINT": endpoint,
        "PGFLOW_STATE_DIR": str(state),
        "PGFLOW_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        "PYTHONPATH": str(ROOT),
    }
    log = open(work / f"collector-{len(databases)}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "pgflow", "run"], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    watch = Connections(pg.dsn())
    try:
        time.sleep(warmup)
        if proc.poll() is not None:
            raise SystemExit(f"pgflow run exited ({proc.returncode}): see {work}")
        cpu0, t0, threads0 = cpu_secs(proc.pid), time.monotonic(), thread_cpu(proc.pid)
        rss = resident_over(proc.pid, duration)
        cpu1, t1 = cpu_secs(proc.pid), time.monotonic()
        thread_profile(proc.pid, threads0, t1 - t0, work / f"threads-{len(databases)}.txt")
        memory_profile(proc.pid, work / f"memory-{len(databases)}.txt")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
        most = watch.close()
    return 100 * (cpu1 - cpu0) / (t1 - t0), rss, most


def peer_queries(pg: LocalPostgres) -> dict[str, str]:
    """pgflow's own sampling and statements SQL texts for this server (what the peer sends)."""
    with Scraper(pg.dsn(), instance="peer-setup") as scraper, psycopg.connect(pg.dsn()) as conn:
        scraper.scrape()  # connects and discovers the extension's schema and columns
        assert scraper.server is not None
        statements = statements_sql(scraper.server.extension_schema, set(scraper.server.columns)).as_string(conn)
        sampling = with_known_idle(sample_sql(conn.info.server_version), {})
    return {"sample_sql": sampling, "statements_sql": statements}


def run_peer(pg: LocalPostgres, databases: list[str], queries: dict[str, str], duration: float, warmup: float) -> tuple[float, Resident]:
    """(CPU % of one core, resident memory) of bench/bare_reader.py over ``databases``, measured as a collector is."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "bare_reader.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        proc.stdin.write(json.dumps({"dsns": [pg.dsn(d) for d in databases], **queries}))  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
        if proc.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
            raise SystemExit(f"bench/bare_reader.py did not start ({proc.wait()})")
        time.sleep(warmup)
        cpu0, t0 = cpu_secs(proc.pid), time.monotonic()
        rss = resident_over(proc.pid, duration)
        cpu1, t1 = cpu_secs(proc.pid), time.monotonic()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return 100 * (cpu1 - cpu0) / (t1 - t0), rss


LIBRARIES = "import pgflow.cli, pgflow.stream.flow, pgflow.otlp.transport, http.client, gzip"  # what `pgflow run` imports (OTLP/HTTP, the default: no grpc)


def libraries_rss() -> float:
    """Resident memory (MB) of a process that only imports what ``pgflow run`` imports."""
    code = f"{LIBRARIES}; import sys, time; print('ready', flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        proc.stdout.readline()  # type: ignore[union-attr]
        return rss_mb(proc.pid)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def main() -> None:
    args = [int(a) for a in sys.argv[1:]]
    instances, duration, warmup, statements = (args + [5, 120, 40, 2000][len(args) :])[:4]
    work = Path(tempfile.mkdtemp(prefix="pgflow-fleet-"))
    bindir = os.environ.get("PGFLOW_BENCH_PG_BINDIR") or None
    with LocalPostgres(bindir, settings={"pg_stat_statements.max": str(statements + 1000)}) as pg:
        pg.execute("CREATE EXTENSION pg_stat_statements", dbname="template1")
        pg.execute("CREATE EXTENSION pg_stat_statements")
        databases = [f"fleet_{i:03d}" for i in range(instances)]
        for name in databases:
            pg.execute(f"CREATE DATABASE {name}")
        make_statements(pg, statements)
        receiver = subprocess.Popen(
            [sys.executable, "-m", "pgflow", "receive", "--grpc-port", "0", "--http-port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        try:
            http_port = int(re.findall(r"127\.0\.0\.1:(\d+)", receiver.stdout.readline())[1])  # type: ignore[union-attr]
            endpoint = f"http://127.0.0.1:{http_port}"
            cpu_1, rss_1, conns_1 = run_collector(pg, databases[:1], endpoint, work, duration, warmup)
            print(f"1 instance: cpu {cpu_1:.3f}% {rss_1} connections {conns_1}", flush=True)
            cpu_n, rss_n, conns_n = run_collector(pg, databases, endpoint, work, duration, warmup)
            print(f"{instances} instances: cpu {cpu_n:.3f}% {rss_n} connections {conns_n}", flush=True)
            queries = peer_queries(pg)
            peer_warmup = min(warmup, 10.0)  # the peer has nothing to warm up (no texts to parse)
            peer_cpu_1, peer_rss_1 = run_peer(pg, databases[:1], queries, duration, peer_warmup)
            peer_cpu_n, peer_rss_n = run_peer(pg, databases, queries, duration, peer_warmup)
            print(f"peer, 1 instance: cpu {peer_cpu_1:.3f}% {peer_rss_1}; {instances}: cpu {peer_cpu_n:.3f}% {peer_rss_n}", flush=True)
            libraries = libraries_rss()
        finally:
            receiver.terminate()
            receiver.wait(timeout=30)
    extra = max(1, instances - 1)
    print(f"profiles (memory, CPU by thread): {work}/memory-*.txt, {work}/threads-*.txt; load average {os.getloadavg()}", flush=True)
    peer_per_instance = (peer_cpu_n - peer_cpu_1) / extra
    print(
        f"peer (bench/bare_reader.py: the same reads, nothing else): peer_cpu_pct_1={peer_cpu_1:.3f} "
        f"peer_cpu_pct_per_instance={peer_per_instance:.3f} peer_rss_mb_1={peer_rss_1.mean:.1f} "
        f"peer_rss_mb_per_instance={(peer_rss_n.mean - peer_rss_1.mean) / extra:.2f} libraries_rss_mb={libraries:.1f}; "
        f"ratios to the peer: cpu_1={cpu_1 / max(peer_cpu_1, 1e-9):.2f} "
        f"cpu_per_instance={(cpu_n - cpu_1) / extra / max(peer_per_instance, 1e-9):.2f} rss_1={rss_1.mean / max(peer_rss_1.mean, 1e-9):.2f}"
    )
    print(
        f"cpu_pct_1={cpu_1:.3f} cpu_pct_per_instance={(cpu_n - cpu_1) / extra:.3f} rss_mb_1={rss_1.mean:.1f} "
        f"rss_mb_per_instance={(rss_n.mean - rss_1.mean) / extra:.2f} connections_max={conns_1}"
    )


if __name__ == "__main__":
    main()
