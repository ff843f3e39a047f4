"""`pgflow run | check | capture | replay | receive | demo`: one clear line on failure, no traceback.

Exit codes of ``run`` and ``replay`` say whether the work was done:
0 done (every window acknowledged); 1 an error; 2 bad configuration;
3 stopped with windows not acknowledged (``run``: kept in the ledger and sent on the next
start; ``replay``: not delivered); 4 an instance was never scraped successfully.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pgflow import __version__
from pgflow.config import Settings
from pgflow.errors import ConfigError, PgflowError

EXIT_UNACKNOWLEDGED = 3
EXIT_NOT_SCRAPED = 4


def require_export_key(settings: Settings) -> None:
    """New Relic as the endpoint needs a key: without one every export is refused (exit 2)."""
    if settings.otlp_endpoint is None and "api-key" not in {k.lower() for k in settings.export_headers}:
        raise ConfigError(
            f"NEW_RELIC_API_KEY is not set and the endpoint is New Relic's ({settings.endpoint})",
            "set NEW_RELIC_API_KEY, or PGFLOW_OTLP_ENDPOINT for another OTLP endpoint",
        )


def require_tls_for_key(settings: Settings) -> None:
    """Issue 21: the API key goes only over TLS, or to this host, or where the user said
    ``OTEL_EXPORTER_OTLP_INSECURE=true`` (exit 2 otherwise)."""
    from pgflow.config import is_local_address
    from pgflow.otlp.network import split_endpoint

    if "api-key" not in {k.lower() for k in settings.export_headers} or settings.otlp_insecure:
        return
    tls, host, _, _ = split_endpoint(settings.endpoint, 4317)
    if not tls and not is_local_address(host):
        raise ConfigError(
            f"the API key would be sent in plaintext to {settings.endpoint}",
            "use https:// in the endpoint, or set OTEL_EXPORTER_OTLP_INSECURE=true if this network is trusted",
        )


def load_settings_or_exit(config: str | None = None, **overrides: object) -> Settings:
    """Settings for entry points outside ``main`` (the bytewax flow module): one line and exit 2 on error."""
    try:
        settings = Settings.load(config, **overrides)
        settings.targets()
        require_export_key(settings)
        require_tls_for_key(settings)
        return settings
    except PgflowError as exc:
        print(f"pgflow: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None


# glibc's mallopt parameter for the number of malloc arenas (malloc.h: M_ARENA_MAX)
_M_ARENA_MAX = -8


def lean_allocator(arenas: int = 2) -> bool:
    """Issue 20: at most ``arenas`` glibc malloc arenas for the threads started from now on.

    glibc gives threads their own arenas (up to 8 per core), each keeping what it freed: a
    collector's threads (a scrape and a table thread per instance, the shipper, bytewax's) are
    mostly waiting under the GIL, so sharing two costs nothing and keeps the freed memory in
    fewer places (measured: -2 MB for one instance, -3.3 MB for five; BENCHMARKS.md). A
    ``MALLOC_ARENA_MAX`` the user set wins (glibc read it at start). True when applied.
    """
    import os

    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL(None).mallopt(_M_ARENA_MAX, arenas) == 1)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        return False


def one_polars_thread() -> None:
    """Issue 20: polars computes on one thread in the collector, unless ``POLARS_MAX_THREADS`` is set.

    The collector's frames are small (one scrape's rows): splitting them over a pool of threads
    costs more CPU than it saves, and the pool's threads cost memory. A bytewax cluster is how
    the collector uses more cores. Must run before polars is imported.
    """
    import os

    os.environ.setdefault("POLARS_MAX_THREADS", "1")


def no_polars_thread_caches() -> bool:
    """Issue 20: polars' allocator (jemalloc) keeps no per-thread cache of freed blocks in the collector.

    Every thread that touched a frame (the flow's, each scrape thread, the table threads) kept
    its own cache of freed blocks; the collector's frames are small and its threads mostly
    wait, so the caches were memory held for nothing (measured: 4 to 7 MB less resident with 1,
    5 or 10 instances, CPU within 3%; BENCHMARKS.md). A ``tcache`` the user
    chose in ``_RJEM_MALLOC_CONF`` wins. Must run before polars is imported (jemalloc reads its
    configuration once); True when applied.
    """
    import os

    if "polars" in sys.modules:
        return False
    chosen = os.environ.get("_RJEM_MALLOC_CONF", "")
    if "tcache" in chosen:
        return False
    os.environ["_RJEM_MALLOC_CONF"] = f"{chosen},tcache:false" if chosen else "tcache:false"
    return True


def _cmd_run(args: argparse.Namespace) -> int:
    lean_allocator()  # before the libraries and the flow's threads
    one_polars_thread()
    no_polars_thread_caches()
    import logging

    from bytewax._bytewax import cli_main

    from pgflow.logs import kv, setup
    from pgflow.stream.flow import build_flow
    from pgflow.stream.runtime import install_signal_handlers, runtime

    overrides = {"max_scrapes": args.scrapes} if args.scrapes else {}
    settings = Settings.load(args.config, **overrides)
    settings.targets()
    require_export_key(settings)
    require_tls_for_key(settings)
    setup(settings.log_level, settings.log_format)
    log = logging.getLogger("pgflow.run")
    rt = runtime(settings, require_metrics=True)  # a taken metrics_addr or an unwritable state_dir: exit 2
    for instance in settings.targets():  # this process runs every instance: claim the ledgers up front
        rt.ledger(instance.name)
    log.info("starting", extra=kv(**{k: v for k, v in settings.redacted().items() if v not in (None, [], {})}))
    for name in settings.without_effect():
        log.warning("this setting no longer has an effect; remove it from the configuration", extra=kv(setting=name))
    install_signal_handlers()
    recorder = None
    if args.capture:
        from pgflow.stream.source import SnapshotRecorder

        recorder = SnapshotRecorder(args.capture)
    flow = build_flow(settings, recorder=recorder)
    try:
        cli_main(flow, workers_per_process=args.workers)
    finally:
        if recorder is not None:
            recorder.close()
    rt.shipper.close(deadline=rt.shutdown_deadline())
    code = run_outcome(rt, [i.name for i in settings.targets()], log)
    log.info("stopped", extra=kv(exit_code=code))
    return code


def run_outcome(rt, instances: list[str], log) -> int:  # type: ignore[no-untyped-def]
    """The exit code of a finished run (see the module docstring), with one line per reason."""
    from pgflow.logs import kv

    left = {name: n for name, n in rt.unacknowledged.items() if n}
    never = [name for name in instances if name not in rt.scraped]
    for name in never:
        log.error("no successful scrape of this instance", extra=kv(instance=name))
    if left:
        return EXIT_UNACKNOWLEDGED
    return EXIT_NOT_SCRAPED if never else 0


def _cmd_capture(args: argparse.Namespace) -> int:
    import signal
    import threading

    from pgflow.capture import capture_live
    from pgflow.scrape import Scraper
    from pgflow.scrape.health import HealthSchedule

    settings = Settings.load(args.config)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    scrapers = [
        Scraper(
            i.dsn,
            instance=i.name,
            statement_timeout_ms=settings.statement_timeout_ms,
            connect_timeout_secs=settings.connect_timeout_secs,
            health=HealthSchedule.from_settings(settings),
        )  # issue 13
        for i in settings.targets()
    ]
    interval = args.interval if args.interval is not None else settings.collection_interval_secs
    from pgflow.scrape.sampler import sampler_for  # issue 11: captures hold active-session samples

    samplers = {i.name: s.start() for i in settings.targets() if (s := sampler_for(i.dsn, i.name, settings))}
    from pgflow.scrape.budget import ConnectionBudget, free_of, read_free  # issue 20: within each budget
    from pgflow.scrape.tables import TableScraper  # issue 13: and per-table statistics

    budgets = {
        i.name: ConnectionBudget.from_settings(
            i, settings, sampler=i.name in samplers, probe=lambda s=s: free_of(read_free(s._connection()))
        )
        for i, s in zip(settings.targets(), scrapers)
    }
    tables = (
        {i.name: TableScraper.for_instance(i, settings, budgets[i.name]) for i in settings.targets()}
        if settings.table_stats_enabled
        else {}
    )
    from pgflow.scrape.explain import WindowPlans  # issue 12: and the plans of each closed export window

    shared = WindowPlans.shared(settings)
    plans = {i.name: p for i in settings.targets() if (p := WindowPlans.for_instance(i.dsn, i.name, settings, budgets[i.name], shared))}

    def progress(writer) -> None:  # type: ignore[no-untyped-def]
        print(f"\rcaptured {writer.scrapes} snapshots, {writer.rows} statement rows", end="", flush=True)

    def on_error(instance: str, exc: PgflowError) -> None:
        print(f"\nscrape of {instance} failed: {exc}", file=sys.stderr, flush=True)

    try:
        writer = capture_live(
            scrapers,
            args.out,
            scrapes=args.scrapes,
            interval=interval,
            progress=progress,
            on_error=on_error,
            stop=stop.is_set,
            samplers=samplers,
            tables=tables,
            table_interval=settings.table_stats_interval_secs,
            plans=plans,
        )
    finally:
        for scraper in [*scrapers, *tables.values(), *budgets.values()]:
            scraper.close()
        for sampler in samplers.values():
            sampler.stop()
    print(f"\n{args.out}: {writer.scrapes} snapshots written")
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    import logging

    from pgflow.logs import kv, setup
    from pgflow.replay import replay_flow

    settings = Settings.load(args.config)
    if not args.out:
        require_export_key(settings)
        require_tls_for_key(settings)
    setup(settings.log_level, settings.log_format)
    log = logging.getLogger("pgflow.replay")
    stored, unacknowledged = replay_flow(args.capture, settings, out=args.out, report=True)
    if unacknowledged:
        log.error(
            "replay not delivered: windows were not acknowledged",
            extra=kv(capture=args.capture, endpoint=settings.endpoint, windows=unacknowledged),
        )
        return EXIT_UNACKNOWLEDGED
    if args.out:
        log.info("replayed", extra=kv(capture=args.capture, out=args.out, points=stored))
    else:
        log.info("replayed", extra=kv(capture=args.capture, endpoint=settings.endpoint))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from pgflow.scrape.diagnose import check

    settings = Settings.load(args.config)
    usable = True
    for instance in settings.targets():
        report = check(
            instance,
            connect_timeout=settings.connect_timeout_secs,
            sample_interval_secs=settings.activity_sample_interval_secs,
            settings=settings,
        )
        print(report.render())
        usable &= report.usable
    usable &= _check_export(settings)  # issue 21
    return 0 if usable else 1


def _check_export(settings: Settings) -> bool:
    """Connect to the OTLP endpoint as the exporter would (TLS files, proxy): TLS and proxy problems fail."""
    from pgflow.otlp.network import check_export

    level, detail = check_export(settings.endpoint, settings.network("metrics"), settings.otlp_protocol)
    mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}[level]
    print(f"export ({settings.otlp_protocol})\n  {mark} connect: {detail}")
    return level != "fail"


def _cmd_demo(args: argparse.Namespace) -> int:
    from pgflow.demo import run_demo

    return run_demo(bindir=args.pg_bindir, clients=args.clients, seconds=args.seconds, out=args.out)


def _cmd_receive(args: argparse.Namespace) -> int:
    import signal
    import threading

    from pgflow.otlp.receiver import Receiver, parse_script

    script = parse_script(args.script)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    receiver = Receiver(
        args.out,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        host=args.host,
        script=script,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        client_ca=args.client_ca,
    ).start()  # issue 21: TLS and mTLS
    print(
        f"pgflow receive: grpc on {receiver.grpc_endpoint}, http on {receiver.http_endpoint}, storing into {args.out or 'memory'}",
        flush=True,
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        receiver.stop()
    print(f"pgflow receive: stopped after {len(receiver.attempts)} requests", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgflow", description="PostgreSQL query statistics as OTLP metrics.")
    parser.add_argument("--version", action="version", version=f"pgflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the collector (the bytewax dataflow) in this process")
    run.add_argument("--config", help="JSON settings file (or PGFLOW_CONFIG)")
    run.add_argument("--scrapes", type=int, help="stop after N scrapes per instance, flush and exit (0: all sent)")
    run.add_argument("--workers", type=int, default=1, help="bytewax worker threads in this process")
    run.add_argument("--capture", help="also record every scrape into this capture file (DuckDB)")
    run.set_defaults(func=_cmd_run)

    capture = sub.add_parser("capture", help="record raw snapshots of every configured instance into DuckDB")
    capture.add_argument("--out", required=True, help="capture file (appended to if it exists)")
    capture.add_argument("--scrapes", type=int, help="stop after N scrape rounds (default: until Ctrl-C)")
    capture.add_argument("--interval", type=float, help="seconds between rounds (default: collection_interval_secs)")
    capture.add_argument("--config", help="JSON settings file (or PGFLOW_CONFIG)")
    capture.set_defaults(func=_cmd_capture)

    replay = sub.add_parser("replay", help="run a capture through the collector flow (bytewax)")
    replay.add_argument("capture", help="a capture file")
    replay.add_argument("--out", help="store the points in this DuckDB file instead of exporting them")
    replay.add_argument("--config", help="JSON settings file (or PGFLOW_CONFIG)")
    replay.set_defaults(func=_cmd_replay)

    check = sub.add_parser("check", help="diagnose every configured instance; exit 1 if one is not usable")
    check.add_argument("--config", help="JSON settings file (or PGFLOW_CONFIG)")
    check.set_defaults(func=_cmd_check)

    receive = sub.add_parser("receive", help="a local OTLP metrics receiver that stores points in DuckDB")
    receive.add_argument("--out", help="DuckDB file for the points (default: memory only)")
    receive.add_argument("--grpc-port", type=int, default=4317, help="0 picks a free port")
    receive.add_argument("--http-port", type=int, default=4318, help="0 picks a free port")
    receive.add_argument("--host", default="127.0.0.1")
    receive.add_argument("--script", help="answers to give first, e.g. UNAVAILABLE,UNAVAILABLE,OK or 429:1,OK")
    receive.add_argument("--tls-cert", help="PEM certificate: serve both ports over TLS (with --tls-key)")
    receive.add_argument("--tls-key", help="PEM private key of --tls-cert")
    receive.add_argument("--client-ca", help="PEM CA bundle: require client certificates it signed (mTLS)")
    receive.set_defaults(func=_cmd_receive)

    demo = sub.add_parser("demo", help="pgflow end to end: embedded PostgreSQL, pgbench, the collector, a local receiver")
    demo.add_argument("--pg-bindir", help="bin directory of another PostgreSQL install")
    demo.add_argument("--clients", type=int, default=4, help="pgbench clients")
    demo.add_argument("--seconds", type=int, default=10, help="how long pgbench runs")
    demo.add_argument("--out", help="DuckDB file for the received points (default: a temp dir)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except PgflowError as exc:
        print(f"pgflow: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("pgflow: interrupted", file=sys.stderr)
        return 130
