"""Captures: raw Snapshots recorded into DuckDB, and read back frame for frame.

Tables: ``scrapes`` (one row per snapshot: instance, scraped_at, server version,
stats_reset, dealloc, ...), one table per frame kind (``statements``, ``activity``, ``locks``,
``blocked``, ``databases``) keyed by ``scrape_id``, ``texts`` holding each statement's text
once per ``(instance, dbid, userid, queryid)`` with every literal replaced (pg_stat_statements
keeps utility statements verbatim, passwords included; a capture never holds them), and ``meta`` for free-form notes (the dataset
scripts record their workload's ground truth there). Each scrape is one transaction: an
interrupted capture keeps every committed scrape and the file stays readable. Opening an
existing file appends to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC
from pathlib import Path

import duckdb
import polars as pl

from pgflow.errors import CaptureError, PgflowError
from pgflow.ops.fingerprint import redact_text
from pgflow.schema import (
    ACTIVITY,
    BLOCKED,
    DATABASES,
    HEALTH_FRAMES,
    LOCKS,
    PLANS,
    QUERY_SAMPLES,
    SAMPLES,
    SESSION_STATS,
    STATEMENTS,
    TABLES,
    ServerIdentity,
    Snapshot,
    conform,
)

_SCALARS = {
    "scrape_id": "BIGINT",
    "instance": "VARCHAR",
    "scraped_at": "TIMESTAMPTZ",
    "server_version_num": "INTEGER",
    "stats_reset": "TIMESTAMPTZ",
    "dealloc": "BIGINT",
    "max_connections": "INTEGER",
    "oldest_xact_age_secs": "DOUBLE",
    "oldest_query_age_secs": "DOUBLE",
    "server_address": "VARCHAR",
    "server_port": "INTEGER",
    "hidden_statements": "INTEGER",
    # issue 14: the server's identity (ServerIdentity), added to older files by ALTER TABLE
    "system_identifier": "BIGINT",
    "timeline": "BIGINT",
    "postmaster_started_at": "TIMESTAMPTZ",
    "in_recovery": "BOOLEAN",
    "identity_address": "VARCHAR",
    "health_scraped": "VARCHAR",  # issue 13: comma-separated health groups read by the scrape
}
_IDENTITY_SCALARS = ("system_identifier", "timeline", "postmaster_started_at", "in_recovery", "identity_address")
_FRAMES = {
    "statements": STATEMENTS,
    "activity": ACTIVITY,
    "locks": LOCKS,
    "blocked": BLOCKED,
    "databases": DATABASES,
    "plans": PLANS,
    "samples": SAMPLES,
    "session_stats": SESSION_STATS,
    **HEALTH_FRAMES,
    "query_samples": QUERY_SAMPLES,  # issue 12: normalized texts only (the sampler never holds raw ones)
    "tables": TABLES,
}  # issue 13: per-table statistics (empty in a scrape they were not due)
assert set(_FRAMES) == set(Snapshot.FRAMES), "capture must store every frame of a Snapshot"
_TYPES = {pl.Int64: "BIGINT", pl.Float64: "DOUBLE", pl.String: "VARCHAR", pl.Boolean: "BOOLEAN"}


def _sql_type(dtype: pl.DataType) -> str:
    return "TIMESTAMPTZ" if isinstance(dtype, pl.Datetime) else _TYPES[dtype]  # type: ignore[index]


def _ddl() -> list[str]:
    out = [
        "CREATE TABLE IF NOT EXISTS scrapes (" + ", ".join(f'"{k}" {t}' for k, t in _SCALARS.items()) + ")",
        "CREATE TABLE IF NOT EXISTS texts (instance VARCHAR, dbid BIGINT, userid BIGINT, queryid BIGINT, query VARCHAR)",
        "CREATE TABLE IF NOT EXISTS meta (key VARCHAR, value VARCHAR)",
    ]
    out += [f'ALTER TABLE scrapes ADD COLUMN IF NOT EXISTS "{k}" {_SCALARS[k]}' for k in _IDENTITY_SCALARS]
    for name, schema in _FRAMES.items():
        cols = [(c, t) for c, t in schema.items() if not (name == "statements" and c == "query")]
        out.append(
            f"CREATE TABLE IF NOT EXISTS {name} (scrape_id BIGINT, ord INTEGER, "
            + ", ".join(f'"{c}" {_sql_type(t)}' for c, t in cols)
            + ")"
        )
        # A capture written by an older pgflow gains the columns added since (issue 13).
        out += [f'ALTER TABLE {name} ADD COLUMN IF NOT EXISTS "{c}" {_sql_type(t)}' for c, t in cols]
    out += [f'ALTER TABLE scrapes ADD COLUMN IF NOT EXISTS "{k}" {t}' for k, t in _SCALARS.items()]
    return out


_REDACTED = pl.col("query").map_elements(redact_text, return_dtype=pl.String, skip_nulls=True)


def as_stored(snapshot: Snapshot) -> Snapshot:
    """The snapshot as a capture holds it: statement texts with their literals replaced."""
    from dataclasses import replace

    return replace(snapshot, statements=snapshot.statements.with_columns(_REDACTED))


def _identity_values(identity: ServerIdentity | None) -> list[object]:
    if identity is None:
        return [None] * len(_IDENTITY_SCALARS)
    return [identity.system_identifier, identity.timeline, identity.started_at, identity.in_recovery, identity.address]


def _identity(row: dict) -> ServerIdentity | None:
    if row.get("identity_address") is None and row.get("postmaster_started_at") is None:
        return None  # a capture written before identities were recorded
    started = row.get("postmaster_started_at")
    return ServerIdentity(
        system_identifier=row.get("system_identifier"),
        timeline=row.get("timeline"),
        started_at=started.astimezone(UTC) if started else None,
        in_recovery=row.get("in_recovery"),
        address=row.get("identity_address") or "",
    )


def _utc(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.with_columns(pl.col(pl.Datetime).dt.convert_time_zone("UTC"))


class CaptureWriter:
    """Appends snapshots to a capture file; one transaction per snapshot."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._con = duckdb.connect(str(self.path))
            for statement in _ddl():
                self._con.execute(statement)
        except duckdb.Error as exc:
            raise CaptureError(
                f"cannot open capture {self.path} ({str(exc).splitlines()[0]})",
                "check the path, and that no other process has the file open",
            ) from None
        self._next_id = (self._con.execute("SELECT coalesce(max(scrape_id) + 1, 0) FROM scrapes").fetchone() or [0])[0]
        self.scrapes = 0
        self.rows = 0

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def note(self, key: str, value: object) -> None:
        """Record a fact about the capture (e.g. the workload's ground truth)."""
        self._con.execute("INSERT INTO meta VALUES (?, ?)", [key, str(value)])

    def write(self, snapshot: Snapshot) -> None:
        scrape_id = self._next_id
        con = self._con
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(
                f"INSERT INTO scrapes ({', '.join(_SCALARS)}) VALUES ({', '.join('?' * len(_SCALARS))})",
                [
                    scrape_id,
                    snapshot.instance,
                    snapshot.scraped_at,
                    snapshot.server_version_num,
                    snapshot.stats_reset,
                    snapshot.dealloc,
                    snapshot.max_connections,
                    snapshot.oldest_xact_age_secs,
                    snapshot.oldest_query_age_secs,
                    snapshot.server_address,
                    snapshot.server_port,
                    snapshot.hidden_statements,
                    *_identity_values(snapshot.identity),
                    ",".join(snapshot.health_scraped),
                ],
            )
            texts = (
                snapshot.statements.filter(pl.col("query").is_not_null())
                .select(pl.lit(snapshot.instance).alias("instance"), "dbid", "userid", "queryid", "query")
                .unique(subset=["dbid", "userid", "queryid"], keep="first", maintain_order=True)
            )
            texts = texts.with_columns(_REDACTED)
            con.register("new_texts", texts.to_arrow())
            con.execute(
                "INSERT INTO texts SELECT n.* FROM new_texts n ANTI JOIN texts t "
                "ON t.instance = n.instance AND t.dbid = n.dbid AND t.userid = n.userid AND t.queryid = n.queryid"
            )
            con.unregister("new_texts")
            for name in _FRAMES:
                frame = getattr(snapshot, name)
                if name == "statements":
                    frame = frame.drop("query")
                if frame.height:
                    rows = frame.with_row_index("ord").with_columns(pl.col("ord").cast(pl.Int32), pl.lit(scrape_id).alias("scrape_id"))
                    con.register("new_rows", rows.select("scrape_id", "ord", *frame.columns).to_arrow())
                    con.execute(f"INSERT INTO {name} BY NAME SELECT * FROM new_rows")
                    con.unregister("new_rows")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        self._next_id += 1
        self.scrapes += 1
        self.rows += snapshot.statements.height

    def close(self) -> None:
        self._con.execute("CHECKPOINT")
        self._con.close()


def read(path: str | Path, instance: str | None = None) -> Iterator[Snapshot]:
    """The captured snapshots in order (by time, then capture order), equal frame for frame."""
    path = Path(path)
    if not path.exists():
        raise CaptureError(f"no capture at {path}", "give the path of a file written by pgflow capture")
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        raise CaptureError(
            f"cannot open capture {path} ({str(exc).splitlines()[0]})",
            "is it a DuckDB file written by pgflow capture, and not open in another process?",
        ) from None
    with con:
        where = "WHERE instance = ?" if instance else ""
        scrapes = _utc(
            con.sql(f"SELECT * FROM scrapes {where} ORDER BY scraped_at, scrape_id", params=[instance] if instance else None).pl()
        )
        texts = con.sql("SELECT * FROM texts").pl()
        # A capture written before a frame kind existed has no table for it: empty frames.
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        frames = {
            name: _utc(con.sql(f"SELECT * FROM {name} ORDER BY scrape_id, ord").pl()).partition_by(
                "scrape_id", as_dict=True, maintain_order=True
            )
            for name in _FRAMES
            if name in tables
        }
    texts_by_instance = texts.partition_by("instance", as_dict=True)
    for row in scrapes.iter_rows(named=True):
        sid = row["scrape_id"]
        parts: dict[str, pl.DataFrame] = {}
        for name, schema in _FRAMES.items():
            frame = frames[name].get((sid,)) if name in frames else None  # older captures lack newer frames
            frame = frame.drop("scrape_id", "ord") if frame is not None else pl.DataFrame(schema=schema)
            if name == "statements":
                known = texts_by_instance.get(
                    (row["instance"],),
                    pl.DataFrame(
                        schema={"instance": pl.String, "dbid": pl.Int64, "userid": pl.Int64, "queryid": pl.Int64, "query": pl.String}
                    ),
                )
                frame = frame.join(known.drop("instance"), on=["dbid", "userid", "queryid"], how="left", maintain_order="left")
            parts[name] = conform(frame, schema)  # columns an older capture lacks are null
        yield Snapshot(
            instance=row["instance"],
            scraped_at=row["scraped_at"].astimezone(UTC),
            server_version_num=row["server_version_num"],
            stats_reset=row["stats_reset"].astimezone(UTC) if row["stats_reset"] else None,
            dealloc=row["dealloc"],
            max_connections=row["max_connections"],
            oldest_xact_age_secs=row["oldest_xact_age_secs"],
            oldest_query_age_secs=row["oldest_query_age_secs"],
            server_address=row["server_address"] or "",
            server_port=row["server_port"] or 0,
            hidden_statements=row["hidden_statements"] or 0,
            identity=_identity(row),
            health_scraped=tuple(filter(None, (row.get("health_scraped") or "").split(","))),
            **parts,
        )


def meta(path: str | Path) -> dict[str, str]:
    with duckdb.connect(str(path), read_only=True) as con:
        return dict(con.execute("SELECT key, value FROM meta").fetchall())


def record(snapshots: Iterable[Snapshot], path: str | Path) -> int:
    """Write ``snapshots`` to a capture (used by tests and notebooks); returns how many."""
    with CaptureWriter(path) as writer:
        for snapshot in snapshots:
            writer.write(snapshot)
        return writer.scrapes


def capture_live(
    scrapers: list,
    path: str | Path,
    *,
    scrapes: int | None,
    interval: float,
    progress: Callable[[CaptureWriter], None] | None = None,
    on_error: Callable[[str, PgflowError], None] | None = None,
    stop: Callable[[], bool] = lambda: False,
    samplers: dict | None = None,
    tables: dict | None = None,
    table_interval: float = 300.0,
    plans: dict | None = None,
) -> CaptureWriter:
    """Scrape every instance each ``interval`` seconds into ``path`` until ``scrapes`` or ``stop()``.

    A failed scrape is reported through ``on_error`` and skipped; the capture goes on.
    ``samplers`` (instance name -> running Sampler, issue 11): each snapshot carries the
    active-session samples taken since the previous one. ``tables`` (instance name ->
    TableScraper, issue 13): per-table statistics ride on a snapshot every ``table_interval``
    seconds, as in the collector. ``plans`` (instance name -> WindowPlans, issue 12): the
    plans of each export window that closed ride on the next snapshot, as in ``pgflow run``.
    """
    from dataclasses import replace

    from pgflow.scrape.sampler import with_samples

    tables_due: dict[str, float] = {}

    writer = CaptureWriter(path)
    try:
        n = 0
        next_at = time.monotonic()
        while (scrapes is None or n < scrapes) and not stop():
            for scraper in scrapers:
                try:
                    snapshot = scraper.scrape()
                except PgflowError as exc:
                    if on_error:
                        on_error(scraper.instance, exc)
                    continue
                table_scraper = (tables or {}).get(scraper.instance)
                if table_scraper is not None and time.monotonic() >= tables_due.get(scraper.instance, 0.0):
                    tables_due[scraper.instance] = time.monotonic() + table_interval
                    try:
                        snapshot = replace(snapshot, tables=table_scraper.scrape())
                    except PgflowError as exc:
                        if on_error:
                            on_error(scraper.instance, exc)
                window_plans = (plans or {}).get(scraper.instance)
                if window_plans is not None:
                    snapshot = window_plans.attach(snapshot)
                writer.write(with_samples(snapshot, (samplers or {}).get(scraper.instance)))
            n += 1
            if progress:
                progress(writer)
            next_at += interval
            while time.monotonic() < next_at and not stop():
                time.sleep(min(0.1, max(0.0, next_at - time.monotonic())))
    finally:
        writer.close()
    return writer
