"""Deploying pgflow as operators do: secrets from files, libpq's password sources, the installed
package (marker ``package``, run by ``scripts/test-package``), the systemd unit, the Kubernetes
manifests. The dashboard's test is ``tests/test_dashboard.py``."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from pgflow.config import Settings
from pgflow.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SECRET = "s3cr3t-Dep10y"
ROLE = "deploy_mon"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("PGFLOW_", "OTEL_EXPORTER_OTLP_", "PG")) or name in (
            "DATABASE_URL",
            "NEW_RELIC_API_KEY",
            "DATABASE_URL_FILE",
            "NEW_RELIC_API_KEY_FILE",
        ):
            monkeypatch.delenv(name)


def _secret_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def _cli_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PGFLOW_", "OTEL_", "PG")) and k not in ("DATABASE_URL", "NEW_RELIC_API_KEY")
    }
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def _pgflow(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgflow", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


# Secrets from files -----------------------------------------------------------------------


def test_secret_files_fill_the_dsn_and_the_api_key(tmp_path, monkeypatch):
    dsn = _secret_file(tmp_path / "dsn", f"postgresql://mon:{SECRET}@db.example:6543/app\n")
    key = _secret_file(tmp_path / "key", "NRAK-FROM-FILE\n\n")  # a mounted Secret often ends in a newline
    monkeypatch.setenv("DATABASE_URL_FILE", str(dsn))
    monkeypatch.setenv("NEW_RELIC_API_KEY_FILE", str(key))
    s = Settings.load()
    assert s.export_headers == {"api-key": "NRAK-FROM-FILE"}
    [target] = s.targets()
    assert target.dsn == f"postgresql://mon:{SECRET}@db.example:6543/app" and target.name == "db.example:6543"
    shown = repr(s) + str(s.redacted()) + repr(target)
    assert SECRET not in shown and "NRAK-FROM-FILE" not in shown
    assert s.redacted()["database_url_file"] == str(dsn) and s.redacted()["database_url"] == "mon@db.example:6543/app"


def test_instance_database_url_file_in_the_json_config(tmp_path):
    dsn = _secret_file(tmp_path / "main.dsn", f"host=db1 port=5433 user=mon password={SECRET} dbname=app\n")
    config = tmp_path / "pgflow.json"
    config.write_text(
        json.dumps(
            {"instances": [{"name": "main", "database_url_file": str(dsn)}, {"name": "other", "database_url": "postgresql://mon@db2/app"}]}
        )
    )
    s = Settings.load(config)
    main, other = s.targets()
    assert (main.name, main.dsn) == ("main", dsn.read_text().strip())
    assert other.dsn == "postgresql://mon@db2/app"
    assert SECRET not in repr(s) + str(s.redacted())
    assert s.redacted()["instances"][0] == {"name": "main", "database_url": "mon@db1:5433/app", "database_url_file": str(dsn)}


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing DATABASE_URL_FILE", "cannot read DATABASE_URL_FILE"),
        ("empty DATABASE_URL_FILE", "DATABASE_URL_FILE .* is empty"),
        ("directory NEW_RELIC_API_KEY_FILE", "cannot read NEW_RELIC_API_KEY_FILE"),
        ("empty NEW_RELIC_API_KEY_FILE", "NEW_RELIC_API_KEY_FILE .* is empty"),
        ("bad DSN in DATABASE_URL_FILE", "the DSN in DATABASE_URL_FILE .* has scheme 'mysql'"),
        ("both DATABASE_URL and DATABASE_URL_FILE", "both DATABASE_URL and DATABASE_URL_FILE are set"),
        ("missing instance file", "cannot read database_url_file of instance 'main'"),
        ("empty instance file", "database_url_file of instance 'main' .* is empty"),
        ("instance with both", "instance 'main' sets both database_url and database_url_file"),
    ],
)
def test_a_bad_secret_file_is_one_line_exit_2(tmp_path, monkeypatch, case, expected):
    empty = _secret_file(tmp_path / "empty", " \n")
    bad = _secret_file(tmp_path / "bad", f"mysql://u:{SECRET}@h/db")
    good = _secret_file(tmp_path / "good", f"postgresql://u:{SECRET}@h/db")
    overrides: dict = {}
    if case == "missing DATABASE_URL_FILE":
        monkeypatch.setenv("DATABASE_URL_FILE", str(tmp_path / "nope"))
    elif case == "empty DATABASE_URL_FILE":
        monkeypatch.setenv("DATABASE_URL_FILE", str(empty))
    elif case == "directory NEW_RELIC_API_KEY_FILE":
        monkeypatch.setenv("NEW_RELIC_API_KEY_FILE", str(tmp_path))
    elif case == "empty NEW_RELIC_API_KEY_FILE":
        monkeypatch.setenv("NEW_RELIC_API_KEY_FILE", str(empty))
    elif case == "bad DSN in DATABASE_URL_FILE":
        monkeypatch.setenv("DATABASE_URL_FILE", str(bad))
    elif case == "both DATABASE_URL and DATABASE_URL_FILE":
        monkeypatch.setenv("DATABASE_URL_FILE", str(good))
        monkeypatch.setenv("DATABASE_URL", f"postgresql://u:{SECRET}@h/db")
    elif case == "missing instance file":
        overrides = {"instances": [{"name": "main", "database_url_file": str(tmp_path / "nope")}]}
    elif case == "empty instance file":
        overrides = {"instances": [{"name": "main", "database_url_file": str(empty)}]}
    elif case == "instance with both":
        overrides = {"instances": [{"name": "main", "database_url_file": str(good), "database_url": "postgresql://h/db"}]}
    with pytest.raises(ConfigError) as info:
        Settings.load(**overrides)
    message = str(info.value)
    assert re.search(expected, message), message
    assert info.value.exit_code == 2 and "\n" not in message and SECRET not in message


def test_a_missing_secret_file_from_the_cli_exits_2_in_one_line(tmp_path):
    proc = _pgflow("check", env=_cli_env(DATABASE_URL_FILE=str(tmp_path / "absent")))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert f"cannot read DATABASE_URL_FILE {tmp_path / 'absent'} (No such file or directory)" in proc.stderr


@pytest.mark.parametrize(
    "mode, warns",
    [(0o600, False), (0o400, False), (0o640, False), (0o440, False), (0o644, True), (0o604, True), (0o620, True), (0o666, True)],
)
def test_a_secret_file_others_may_read_or_change_is_warned_once(tmp_path, monkeypatch, caplog, mode, warns):
    key = _secret_file(tmp_path / f"key-{mode:o}", "NRAK-MODE", mode)
    monkeypatch.setenv("NEW_RELIC_API_KEY_FILE", str(key))
    with caplog.at_level(logging.WARNING, logger="pgflow.config"):
        Settings.load()
        Settings.load()  # loaded twice (the flow module loads again): still one line
    lines = [r.getMessage() for r in caplog.records if r.name == "pgflow.config"]
    assert len(lines) == (1 if warns else 0), lines
    if warns:
        assert f"NEW_RELIC_API_KEY_FILE {key} has mode {mode:04o}" in lines[0] and "NRAK-MODE" not in lines[0]
        assert "\n" not in lines[0]


def test_a_world_readable_secret_file_warns_on_stderr_and_still_runs(tmp_path, pg):
    dsn = _secret_file(tmp_path / "dsn", pg.dsn() + "\n", 0o644)
    proc = _pgflow("check", env=_cli_env(DATABASE_URL_FILE=str(dsn)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [line] = [text for text in proc.stderr.splitlines() if "DATABASE_URL_FILE" in text]
    assert "has mode 0644: other users may read it" in line


# libpq's own password sources, against a real server with a scram role ---------------------


@pytest.fixture()
def monitoring_role(pg):
    pg.execute(f"DROP ROLE IF EXISTS {ROLE}", f"CREATE ROLE {ROLE} LOGIN PASSWORD '{SECRET}'", f"GRANT pg_monitor TO {ROLE}")
    return pg


@pytest.mark.parametrize("source", ["PGPASSFILE", "PGPASSWORD", "PGSERVICEFILE", "DATABASE_URL_FILE"])
def test_libpq_password_sources_keep_the_password_out_of_the_dsn(monitoring_role, tmp_path, source):
    pg = monitoring_role
    dsn = f"postgresql://{ROLE}@{pg.host}:{pg.port}/postgres"  # no password in it
    refused = _pgflow("check", env=_cli_env(DATABASE_URL=dsn))
    assert refused.returncode == 1 and "password" in refused.stdout.lower(), refused.stdout + refused.stderr
    env = _cli_env(DATABASE_URL=dsn)
    if source == "PGPASSFILE":
        env["PGPASSFILE"] = str(_secret_file(tmp_path / "pgpass", f"{pg.host}:{pg.port}:*:{ROLE}:{SECRET}\n"))
    elif source == "PGPASSWORD":
        env["PGPASSWORD"] = SECRET
    elif source == "PGSERVICEFILE":
        env["PGSERVICEFILE"] = str(
            _secret_file(
                tmp_path / "pg_service.conf",
                (f"[pgflow]\nhost={pg.host}\nport={pg.port}\ndbname=postgres\nuser={ROLE}\npassword={SECRET}\n"),
            )
        )
        env["DATABASE_URL"] = "service=pgflow"
    else:
        del env["DATABASE_URL"]
        env["DATABASE_URL_FILE"] = str(_secret_file(tmp_path / "dsn", f"{pg.dsn(user=ROLE, password=SECRET)}\n"))
    proc = _pgflow("check", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "=> usable" in proc.stdout and SECRET not in proc.stdout + proc.stderr
    # the server saw the monitoring role run pgflow's diagnostics (the role is new in each test)
    [(ran,)] = pg.execute(
        "SELECT count(*) FROM pg_stat_statements s JOIN pg_roles r ON r.oid = s.userid "
        f"WHERE r.rolname = '{ROLE}' AND s.query LIKE '%pg_stat_statements%'"
    )
    assert ran > 0


# The installable package --------------------------------------------------------------------


@pytest.mark.package
def test_a_wheel_installs_and_runs_in_a_fresh_venv(pg, tmp_path):
    """A wheel built from a copy of the tree, installed with its dependencies into a fresh virtual
    environment (no system site-packages, no PYTHONPATH, run from a directory outside the
    checkout): ``pgflow --help``, ``pgflow check`` and ``pgflow run`` against a real server work,
    the code runs from the venv, and every ``pgflow/sql/*.sql`` ships."""
    from pgflow.otlp.receiver import Receiver

    tree = tmp_path / "tree"  # exactly what deploy/container/Dockerfile copies into its build stage
    copied = re.findall(r"^COPY (?!--)(.+) \S+$", (DEPLOY / "container" / "Dockerfile").read_text(), re.M)
    sources = [part for line in copied for part in line.split()]
    assert sorted(sources) == ["README.md", "pgflow", "pyproject.toml"]
    files = (
        subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z", *sources], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    sql_dir = tree / "pgflow" / "sql"
    if not list(sql_dir.glob("*.sql")):  # none in the tree yet: prove the packaging rule with a probe
        sql_dir.mkdir(parents=True, exist_ok=True)
        (sql_dir / "packaging_probe.sql").write_text("SELECT 1;\n")
    shipped_sql = sorted(p.name for p in sql_dir.glob("*.sql"))

    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), "."],
        cwd=tree,
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = dist.glob("pgflow-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True, timeout=120)  # type: ignore[attr-defined]
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True, timeout=900
    )
    assert install.returncode == 0, install.stderr[-2000:]

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PGFLOW_", "OTEL_", "PYTHON", "VIRTUAL_ENV", "PG")) and k != "DATABASE_URL"
    }
    pgflow = str(venv / "bin" / "pgflow")

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([pgflow, *args], capture_output=True, text=True, cwd=outside, env={**env, **extra}, timeout=180)

    helped = run("--help")
    assert helped.returncode == 0 and "check" in helped.stdout and "run" in helped.stdout
    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import pgflow, pathlib; p = pathlib.Path(pgflow.__file__).parent; "
            "print(p); print(' '.join(sorted(x.name for x in (p / 'sql').glob('*.sql'))))",
        ],
        capture_output=True,
        text=True,
        cwd=outside,
        env=env,
        check=True,
    )
    package_dir, installed_sql = where.stdout.splitlines()
    assert Path(package_dir).is_relative_to(venv) and installed_sql.split() == shipped_sql

    checked = run("check", DATABASE_URL=pg.dsn())
    assert checked.returncode == 0 and "=> usable" in checked.stdout, checked.stdout + checked.stderr

    # A workload while it runs: pgflow's own statements are never exported (issue 19), so without
    # one there is nothing to count.
    workload = threading.Thread(target=pg.pgbench, args=("-n", "-S", "-c", "1", "-T", "6"))
    workload.start()
    with Receiver() as receiver:
        ran = run(
            "run",
            "--scrapes",
            "8",
            DATABASE_URL=pg.dsn(),
            PGFLOW_OTLP_ENDPOINT=receiver.http_endpoint,
            PGFLOW_COLLECTION_INTERVAL_SECS="0.5",
            PGFLOW_EXPORT_INTERVAL_SECS="1",
            PGFLOW_STATE_DIR=str(tmp_path / "state"),
            PGFLOW_METRICS_ADDR="127.0.0.1:0",
        )
        workload.join()
        assert ran.returncode == 0, ran.stderr[-2000:]
        metrics = set(receiver.points()["metric"].to_list())
    assert {"postgresql.query.calls", "postgresql.connection.max"} <= metrics
    assert list((tmp_path / "state").glob("instances/*/state.pkl"))  # the ledger was written

    # `pip install .` from the copy builds through the same backend (dependencies already there)
    again = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", "."],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert run("check", DATABASE_URL=pg.dsn()).returncode == 0


# systemd ------------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "pgflow.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "pgflow.env.example"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def shutdown_bound(settings: Settings) -> float:
    """How long pgflow may take to stop after SIGTERM, as the collector itself computes it."""
    from types import SimpleNamespace

    from pgflow.stream.runtime import Runtime

    return float(Runtime.shutdown_timeout.fget(SimpleNamespace(settings=settings)))  # type: ignore[attr-defined]


def unit_directives(path: Path) -> dict[str, list[str]]:
    """``key -> values`` of a unit file (keys repeat in units, so configparser will not do)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def _verifiable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at an executable that exists here (verify checks it)."""
    exe = tmp_path / "bin" / "pgflow"
    exe.parent.mkdir()
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} -m pgflow "$@"\n')
    exe.chmod(0o755)
    [start] = unit_directives(UNIT)["ExecStart"]
    unit = tmp_path / "pgflow.service"
    unit.write_text(UNIT.read_text().replace(start.split()[0], str(exe)))
    return unit


def _need_systemd_analyze() -> None:
    if not os.access(SYSTEMD_ANALYZE, os.X_OK):
        pytest.skip("systemd-analyze is not installed on this machine")


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    _need_systemd_analyze()
    unit = _verifiable_unit(tmp_path)
    proc = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys but warns: any output is a defect of the unit
    assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stderr
    bad = tmp_path / "typo" / "pgflow.service"
    bad.parent.mkdir()
    bad.write_text(unit.read_text().replace("TimeoutStopSec=", "TimeoutStopSecs="))
    typo = subprocess.run([SYSTEMD_ANALYZE, "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "Unknown key 'TimeoutStopSecs'" in typo.stderr  # the check above can fail


def test_the_systemd_unit_is_hardened(tmp_path):
    _need_systemd_analyze()
    unit = _verifiable_unit(tmp_path)
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=20", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout[-3000:]  # exposure at most 2.0 ("OK") of 10
    assert "Overall exposure level for pgflow.service" in proc.stdout


def test_the_systemd_unit_fits_what_pgflow_does(pg, tmp_path, monkeypatch):
    d = unit_directives(UNIT)
    assert d["DynamicUser"] == ["yes"] and d["Restart"] == ["on-failure"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # SIGHUP is logged and ignored (README)
    assert d["RestartPreventExitStatus"] == [str(ConfigError.exit_code)]  # a bad setting is not retried
    environment = dict(v.split("=", 1) for v in d["Environment"])
    assert d["StateDirectory"] == ["pgflow"] and environment["PGFLOW_STATE_DIR"] == "%S/pgflow"
    credentials = dict(v.split(":", 1) for v in d["LoadCredential"])
    assert {environment["DATABASE_URL_FILE"], environment["NEW_RELIC_API_KEY_FILE"]} == {f"%d/{name}" for name in credentials}
    assert d["EnvironmentFile"] == ["/etc/pgflow/pgflow.env"]

    # What systemd would hand pgflow: the example environment, the unit's Environment= lines
    # with %S and %d expanded, credentials as 0400 files. pgflow must accept all of it.
    state, creds = tmp_path / "state", tmp_path / "credentials"
    creds.mkdir()
    secrets = {"database_url": pg.dsn(), "new_relic_api_key": "NRAK-SYSTEMD"}
    for name in credentials:
        _secret_file(creds / name, secrets[name] + "\n", 0o400)
    env = {**env_file(ENV_EXAMPLE), **{k: v.replace("%S", str(state)).replace("%d", str(creds)) for k, v in environment.items()}}
    assert not {k for k in env if not k.startswith(("PGFLOW_", "PG", "DATABASE_URL", "NEW_RELIC"))}
    proc = _pgflow("check", env=_cli_env(**env), cwd=tmp_path)
    assert proc.returncode == 0 and "=> usable" in proc.stdout and proc.stderr == "", proc.stdout + proc.stderr

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings.load()
    assert settings.state_dir == state / "pgflow" and settings.export_headers["api-key"] == "NRAK-SYSTEMD"
    unknown = {k for k in env if k.startswith("PGFLOW_") and k[7:].lower() not in Settings.model_fields}
    assert not unknown, f"the example sets settings pgflow does not have: {unknown}"
    timeout_stop = float(d["TimeoutStopSec"][0].rstrip("s"))
    assert timeout_stop >= shutdown_bound(settings) + 10, "TimeoutStopSec must leave room above the shutdown bound"


# Kubernetes ---------------------------------------------------------------------------------

K8S = DEPLOY / "kubernetes"


def manifests() -> list[dict]:
    docs = []
    for path in sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append({**doc, "_file": path.name})
    return docs


def _by_kind(docs: list[dict], kind: str, file: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (file is None or d["_file"] == file)]


def _pgflow_pods() -> list[tuple[str, dict, dict]]:
    """(file, pod spec, pgflow container) of every workload that runs pgflow, with its file."""
    out = []
    for doc in manifests():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            spec = doc["spec"]["template"]["spec"]
            out += [(doc["_file"], doc, c) for c in spec["containers"] if c["image"].startswith("pgflow:")]
    return out


def _container_env(container: dict) -> dict[str, str]:
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for name, value in env.items():  # Kubernetes expands $(VAR) of variables defined before
        env[name] = re.sub(r"\$\((\w+)\)", lambda m: {"POD_NAME": "postgres-0"}.get(m.group(1), m.group(0)), value)
    return env


def test_every_manifest_parses_and_names_its_kind():
    docs = manifests()
    assert {d["_file"] for d in docs} >= {"secret.yaml", "pvc.yaml", "deployment.yaml", "sidecar.yaml"}
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc["_file"]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {"secret.yaml", "pvc.yaml", "deployment.yaml"}
    kubectl = shutil.which("kubectl")
    if kubectl:  # kustomize builds offline; no cluster needed
        built = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
        assert built.returncode == 0, built.stderr
        assert [d["kind"] for d in yaml.safe_load_all(built.stdout)] == ["Secret", "PersistentVolumeClaim", "Deployment"]


def test_the_deployment_is_one_replica_on_a_volume_that_outlives_the_pod():
    [deployment] = _by_kind(manifests(), "Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    [(_, _, container)] = [p for p in _pgflow_pods() if p[0] == "deployment.yaml"]
    spec = deployment["spec"]["template"]["spec"]
    env = _container_env(container)
    [state] = [m for m in container["volumeMounts"] if m["mountPath"] == env["PGFLOW_STATE_DIR"]]
    [volume] = [v for v in spec["volumes"] if v["name"] == state["name"]]
    [pvc] = _by_kind(manifests(), "PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    [(_, statefulset, sidecar)] = [p for p in _pgflow_pods() if p[0] == "sidecar.yaml"]
    [mount] = [m for m in sidecar["volumeMounts"] if m["mountPath"] == _container_env(sidecar)["PGFLOW_STATE_DIR"]]
    assert mount["name"] in {t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]}


@pytest.mark.parametrize("file", ["deployment.yaml", "sidecar.yaml"])
def test_pgflow_pods_probe_the_real_port_and_path_and_outlast_the_shutdown_bound(file, tmp_path, monkeypatch):
    from pgflow import telemetry

    [(_, workload, container)] = [p for p in _pgflow_pods() if p[0] == file]
    pod = workload["spec"]["template"]["spec"]
    env = _container_env(container)
    files = {}
    for name, value in env.items():  # the secret files exist in the pod; here, stand-ins
        if name.endswith("_FILE") or "database_url_file" in value:
            path = value if name.endswith("_FILE") else json.loads(value)[0]["database_url_file"]
            files[path] = tmp_path / Path(path).name
    for key, value in env.items():
        for real, local in files.items():
            value = value.replace(real, str(local))
        monkeypatch.setenv(key, value)
    for local in files.values():
        _secret_file(local, "postgresql://pgflow@127.0.0.1:5432/postgres\n" if "database" in local.name else "k\n")
    settings = Settings.load()

    host, _, port = settings.metrics_addr.rpartition(":")
    assert host == "0.0.0.0", "in a pod /healthz must listen beyond loopback"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert ports.get(get["port"], get["port"]) == int(port) and get["path"] == "/healthz", probe
    server = telemetry.serve("127.0.0.1:0", telemetry.Health(settings.collection_interval_secs))
    try:  # the path the probes ask for is one pgflow answers (and a wrong one is not)
        import urllib.error
        import urllib.request

        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(base + container["livenessProbe"]["httpGet"]["path"], timeout=10) as reply:
            assert reply.status == 200
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base + "/health", timeout=10)
    finally:
        server.shutdown()
        server.server_close()

    assert pod["terminationGracePeriodSeconds"] >= shutdown_bound(settings) + 10
    security = {**pod.get("securityContext", {}), **container["securityContext"]}
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {str(settings.state_dir), "/tmp"}  # all pgflow writes, on a read-only root
    memory = container["resources"]["requests"]["memory"]
    assert int(memory.rstrip("Mi")) >= 256  # BENCHMARKS.md: ~230 MB resident with full caches


@pytest.mark.parametrize("file", ["deployment.yaml", "sidecar.yaml"])
def test_the_secret_keys_are_the_files_pgflow_reads(file, tmp_path, monkeypatch):
    docs = manifests()
    [(_, workload, container)] = [p for p in _pgflow_pods() if p[0] == file]
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    env = _container_env(container)
    wanted = {name: value for name, value in env.items() if name.endswith("_FILE")}
    if "PGFLOW_INSTANCES" in env:
        wanted.update({f"instance {i['name']}": i["database_url_file"] for i in json.loads(env["PGFLOW_INSTANCES"])})
    assert {"NEW_RELIC_API_KEY_FILE"} <= set(wanted) and any("database_url" in v for v in wanted.values())
    mounted: dict[str, Path] = {}
    for setting, path in wanted.items():
        [mount] = [m for m in container["volumeMounts"] if Path(path).parent == Path(m["mountPath"])]
        secret_volume = volumes[mount["name"]]["secret"]
        [secret] = [d for d in _by_kind(docs, "Secret") if d["metadata"]["name"] == secret_volume["secretName"]]
        key = Path(path).name
        assert key in secret["stringData"], f"{setting} reads {path}, but the Secret has no key {key!r}"
        assert secret_volume["defaultMode"] == 0o440  # owner and fsGroup read, nobody else: no warning
        mounted[path] = _secret_file(tmp_path / key, secret["stringData"][key] + "\n", secret_volume["defaultMode"])
    for name, value in env.items():
        for real, local in mounted.items():
            value = value.replace(real, str(local))
        monkeypatch.setenv(name, value)
    settings = Settings.load()  # the Secret's example values are what pgflow accepts
    [target] = settings.targets()
    assert target.dsn.startswith("postgresql://pgflow:CHANGE-ME@") and settings.export_headers["api-key"]
    if file == "sidecar.yaml":
        assert target.name == "postgres-0"  # named after the pod, not localhost:5432


def test_the_image_runs_as_the_user_the_pods_expect():
    dockerfile = (DEPLOY / "container" / "Dockerfile").read_text()
    [user] = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    for _, workload, container in _pgflow_pods():
        security = {**workload["spec"]["template"]["spec"].get("securityContext", {}), **container["securityContext"]}
        assert str(security["runAsUser"]) == user[0]
    bases = re.findall(r"^FROM python:(3\.\d+)", dockerfile, re.M)
    assert bases and all(b in ("3.11", "3.12") for b in bases)  # bytewax 0.21.1: wheels up to 3.12
    assert 'ENTRYPOINT ["pgflow"]' in dockerfile
