"""Settings: environment variables over a JSON file over defaults, validated and redacted.

Environment names keep the seed's: ``DATABASE_URL``, ``NEW_RELIC_API_KEY``, and
``PGFLOW_<FIELD>`` for everything else. The standard ``OTEL_EXPORTER_OTLP_*`` variables
are honoured as fallbacks. Bad settings raise :class:`ConfigError` with one line that
names the setting and what is expected, and never echoes a secret.
"""

from __future__ import annotations

import contextvars
import ipaddress
import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import psycopg.conninfo
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

from pgflow.errors import ConfigError

NEW_RELIC_ENDPOINTS = {
    "us": {"grpc": "https://otlp.nr-data.net:4317", "http": "https://otlp.nr-data.net:4318"},
    "eu": {"grpc": "https://otlp.eu01.nr-data.net:4317", "http": "https://otlp.eu01.nr-data.net:4318"},
}

_SECRET_FIELDS = {"database_url", "new_relic_api_key", "otlp_headers", "instances", "otlp_proxy"}
_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("pgflow_config_file", default=None)


def redact_dsn(dsn: str) -> str:
    """Return ``user@host:port/dbname`` for a DSN (URL or key=value), never the password."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
    except Exception:
        return "<unparseable DSN>"
    user = parts.get("user") or ""
    host = parts.get("host") or parts.get("hostaddr") or "localhost"
    port = parts.get("port") or "5432"
    dbname = parts.get("dbname") or user or ""
    return f"{user + '@' if user else ''}{host}:{port}/{dbname}"


def dsn_host_port(dsn: str) -> tuple[str, int]:
    """The first server address a DSN points at (the scraper then labels by the host that answered)."""
    parts = psycopg.conninfo.conninfo_to_dict(dsn)
    host = str(parts.get("host") or parts.get("hostaddr") or "localhost").split(",")[0]
    if host.startswith("/"):
        host = "localhost"
    port = int(str(parts.get("port") or "5432").split(",")[0])
    return host, port


# Identity (issue 14) ---------------------------------------------------------------------


def dsn_instance_name(dsn: str) -> str:
    """The default instance name of a DSN: ``host:port``, every host of a multi-host DSN
    (``a:5432,b:5432``), so that a failover between them stays one instance."""
    parts = psycopg.conninfo.conninfo_to_dict(dsn)
    hosts = str(parts.get("host") or parts.get("hostaddr") or "localhost").split(",")
    ports = str(parts.get("port") or "5432").split(",")
    if len(ports) == 1:
        ports = ports * len(hosts)
    names = [f"{'localhost' if h.startswith('/') or not h else h}:{p or 5432}" for h, p in zip(hosts, ports)]
    return ",".join(names)


def is_local_address(address: str) -> bool:
    """True for ``localhost``, a loopback address or a Unix socket: such an address names no host."""
    if not address or address.startswith("/") or address.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _check_dsn(dsn: str) -> str:
    dsn = dsn.strip()
    if not dsn:
        raise ValueError("is empty; expected a PostgreSQL URL such as postgresql://user@host:5432/db")
    if "://" in dsn:
        scheme = urlsplit(dsn).scheme
        if scheme not in ("postgresql", "postgres"):
            raise ValueError(f"has scheme {scheme!r}; expected postgresql://user@host:5432/db")
    try:
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
    except Exception:
        raise ValueError("is not a valid PostgreSQL connection string; expected postgresql://user@host:5432/db") from None
    for port in str(parts.get("port") or "5432").split(","):
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("has an invalid port; expected a number from 1 to 65535")
    return dsn


class InstanceConfig(BaseModel):
    """One PostgreSQL server to watch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    database_url: SecretStr
    database_url_file: Path | None = None  # issue 15: the DSN read from this file instead

    @model_validator(mode="before")
    @classmethod
    def _dsn_from_file(cls, data: Any) -> Any:
        return _instance_dsn_from_file(data)  # issue 15

    @field_validator("database_url")
    @classmethod
    def _valid_dsn(cls, value: SecretStr) -> SecretStr:
        return SecretStr(_check_dsn(value.get_secret_value()))

    @property
    def dsn(self) -> str:
        return self.database_url.get_secret_value()

    def __repr__(self) -> str:
        return f"InstanceConfig(name={self.name!r}, database_url={redact_dsn(self.dsn)!r})"


class _JsonFileSource(PydanticBaseSettingsSource):
    """Settings from the JSON file given by ``--config`` or ``PGFLOW_CONFIG``."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get() or (Path(os.environ["PGFLOW_CONFIG"]) if os.environ.get("PGFLOW_CONFIG") else None)
        if path is None:
            return {}
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path} ({exc.strerror})", "check the path given to --config or PGFLOW_CONFIG") from None
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            where = f"line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "encoding"
            raise ConfigError(f"config file {path} is not valid JSON ({where})", "fix the file; it must hold one JSON object") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} holds a JSON {type(data).__name__}", "it must hold one JSON object of settings")
        unknown = sorted(set(data) - set(Settings.model_fields))
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r} in config file {path}", _nearest(unknown[0]))
        _file_keys.set((Path(path), frozenset(data)))
        return data


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    """Everything pgflow can be told. Field names are the JSON file's keys."""

    model_config = SettingsConfigDict(
        env_prefix="PGFLOW_",
        extra="forbid",
        populate_by_name=True,
        validate_default=True,
        case_sensitive=False,
    )

    # Where to scrape.
    database_url: SecretStr | None = Field(None, validation_alias=_env("database_url", "DATABASE_URL", "PGFLOW_DATABASE_URL"))
    instances: list[InstanceConfig] = Field(default_factory=list)
    # issue 15: secrets from files (the container and Kubernetes convention)
    database_url_file: Path | None = Field(
        None, validation_alias=_env("database_url_file", "DATABASE_URL_FILE", "PGFLOW_DATABASE_URL_FILE"))
    new_relic_api_key_file: Path | None = Field(
        None, validation_alias=_env("new_relic_api_key_file", "NEW_RELIC_API_KEY_FILE", "PGFLOW_NEW_RELIC_API_KEY_FILE"))
    collection_interval_secs: float = Field(30.0, gt=0, le=86400)
    statement_timeout_ms: int = Field(5000, gt=0)
    connect_timeout_secs: int = Field(5, gt=0, le=600)
    text_cache_size: int = Field(50_000, gt=0)
    max_scrapes: int | None = Field(None, gt=0)
    # issue 11: active-session sampling of pg_stat_activity every N seconds on its own connection; 0 = off
    activity_sample_interval_secs: float = Field(1.0, ge=0, le=3600)

    # What to keep.
    fingerprint_cache_size: int = Field(50_000, gt=0)
    max_queries_tracked: int = Field(1000, gt=0)
    max_users_tracked: int = Field(100, gt=0)
    max_databases_tracked: int = Field(100, gt=0)
    slow_query_threshold_ms: float = Field(0.0, ge=0)
    export_interval_secs: float = Field(60.0, gt=0, le=86400)

    # --- issue 13: instance health groups (schema.HEALTH_GROUPS), each on its own interval ---
    health_interval_secs: float = Field(60.0, gt=0, le=86400)
    db_size_interval_secs: float = Field(300.0, gt=0, le=86400)
    health_group_intervals: dict[str, Annotated[float, Field(gt=0, le=86400)]] = Field(default_factory=dict)
    health_groups_disabled: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # --- end issue 13 ---
    # Per-table statistics (issue 13): each database's own catalog, on their own interval, bounded.
    table_stats_interval_secs: float = Field(300.0, gt=0, le=86400)
    max_tables_tracked: int = Field(300, gt=0)
    table_stats_databases: list[str] = Field(default_factory=list)  # names or globs; empty: every database
    table_stats_exclude_databases: list[str] = Field(default_factory=list)  # names or globs
    table_stats_enabled: bool = True
    table_stats_lock_timeout_ms: int = Field(1000, gt=0)  # never wait on a table's lock longer than this
    # Issue 20: gentle on the server. Never more than this many connections per instance at any
    # moment (the scrape, the sampler, one for per-database work), and optional work waits while
    # fewer than reserved_connections_headroom connections are free for others.
    max_connections_per_instance: int = Field(3, ge=2, le=100)
    reserved_connections_headroom: int = Field(5, ge=0, le=10_000)

    # Where to send.
    new_relic_api_key: SecretStr | None = Field(
        None, validation_alias=_env("new_relic_api_key", "NEW_RELIC_API_KEY", "PGFLOW_NEW_RELIC_API_KEY")
    )
    new_relic_region: Literal["us", "eu"] = "us"
    otlp_endpoint: str | None = Field(
        None, validation_alias=_env("otlp_endpoint", "PGFLOW_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    otlp_protocol: Literal["grpc", "http"] = Field(
        "grpc", validation_alias=_env("otlp_protocol", "PGFLOW_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
    )
    otlp_headers: Annotated[dict[str, SecretStr], NoDecode] = Field(
        default_factory=dict, validation_alias=_env("otlp_headers", "PGFLOW_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
    )
    # Issue 21: TLS, mTLS, proxies, timeout and compression of the export, as the OTel exporters
    # read them (per-signal OTEL_EXPORTER_OTLP_METRICS_* / _LOGS_* variables win: see network()).
    otlp_certificate: Path | None = Field(None, validation_alias=_env(
        "otlp_certificate", "PGFLOW_OTLP_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE"))
    otlp_client_certificate: Path | None = Field(None, validation_alias=_env(
        "otlp_client_certificate", "PGFLOW_OTLP_CLIENT_CERTIFICATE", "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"))
    otlp_client_key: Path | None = Field(None, validation_alias=_env(
        "otlp_client_key", "PGFLOW_OTLP_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY"))
    otlp_insecure: bool = Field(False, validation_alias=_env(
        "otlp_insecure", "PGFLOW_OTLP_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE"))
    otlp_timeout_ms: int | None = Field(None, gt=0, le=3_600_000, validation_alias=_env(
        "otlp_timeout_ms", "PGFLOW_OTLP_TIMEOUT_MS", "OTEL_EXPORTER_OTLP_TIMEOUT"))  # else export_timeout_secs
    otlp_compression: Literal["gzip", "none"] = Field("gzip", validation_alias=_env(
        "otlp_compression", "PGFLOW_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"))
    otlp_proxy: SecretStr | None = Field(None, validation_alias=_env("otlp_proxy", "PGFLOW_OTLP_PROXY"))
    _signal_env: dict[str, dict[str, tuple[str, str]]] = PrivateAttr(default_factory=dict)
    batch_size: int = Field(1000, gt=0, le=100_000)
    batch_timeout_secs: float = Field(10.0, gt=0)
    export_timeout_secs: float = Field(10.0, gt=0)
    retry_initial_delay_secs: float = Field(1.0, gt=0)
    retry_max_delay_secs: float = Field(30.0, gt=0)
    retry_max_attempts: int = Field(5, gt=0, le=100)
    service_name: str = "pgflow"

    # Issue 12: query samples and explain plans.
    sample_min_duration_ms: float = Field(100.0, gt=0)
    samples_per_fingerprint_per_hour: int = Field(15, gt=0)
    max_samples_per_window: int = Field(100, gt=0)
    explains_per_window: int = Field(5, ge=0, le=1000)  # 0: no plans
    explain_ttl_secs: float = Field(3600.0, gt=0)

    # Running.
    metrics_addr: str = "127.0.0.1:9187"
    state_dir: Path = Field(default_factory=lambda: _default_state_dir())
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["kv", "json"] = "kv"

    # Issue 14 (stream): shutdown bound and refused exports.
    shutdown_timeout_secs: float = Field(20.0, gt=0, le=3600)
    refused_retry_secs: float = Field(60.0, gt=0, le=86400)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _JsonFileSource(settings_cls))

    @field_validator("database_url")
    @classmethod
    def _valid_dsn(cls, value: SecretStr | None) -> SecretStr | None:
        return None if value is None else SecretStr(_check_dsn(value.get_secret_value()))

    @field_validator("activity_sample_interval_secs")
    @classmethod
    def _sample_interval(cls, value: float) -> float:  # issue 11
        if 0 < value < 0.1:
            raise ValueError("expected 0 (sampling off) or at least 0.1 seconds")
        return value

    @field_validator("otlp_protocol", mode="before")
    @classmethod
    def _protocol(cls, value: Any) -> Any:
        # OTEL_EXPORTER_OTLP_PROTOCOL says "http/protobuf"; JSON encoding is not supported.
        return "http" if value == "http/protobuf" else value

    @field_validator("otlp_headers", mode="before")
    @classmethod
    def _headers(cls, value: Any) -> Any:
        if isinstance(value, str):  # the OTEL form: "k1=v1,k2=v2", values URL-encoded
            headers = {}
            for item in filter(None, (part.strip() for part in value.split(","))):
                key, sep, val = item.partition("=")
                if not sep or not key.strip():
                    raise ValueError("expected comma-separated key=value pairs, e.g. api-key=XYZ")
                headers[key.strip().lower()] = unquote(val.strip())
            return headers
        return value

    @field_validator("otlp_compression", mode="before")
    @classmethod
    def _compression(cls, value: Any) -> Any:  # issue 21: the OTel values are lower-case words
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _otlp_network(self) -> Settings:
        """Issue 21: read the per-signal OTEL variables once and check every TLS file and proxy at start."""
        from pgflow.otlp.network import OTEL_SUFFIX, SIGNALS

        self._signal_env = {sig: {setting: (os.environ[name], name) for setting, suffix in OTEL_SUFFIX.items()
                                  if (name := f"OTEL_EXPORTER_OTLP_{sig.upper()}_{suffix}") in os.environ
                                  and os.environ[name].strip()} for sig in SIGNALS}
        for sig in SIGNALS:
            self.network(sig)  # raises ConfigError naming the file or the proxy variable
        return self

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        if not re.match(r"^(https?://)?[A-Za-z0-9.\-\[\]:]+(:\d+)?(/.*)?$", value):
            raise ValueError("expected an endpoint such as https://otlp.nr-data.net:4317 or http://127.0.0.1:4317")
        return value

    # issue 13: health group names are checked against the groups pgflow knows.
    @field_validator("health_groups_disabled", mode="before")
    @classmethod
    def _groups_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # env: a JSON list or "io,wal"
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [v.strip() for v in text.split(",") if v.strip()]
        return value

    @field_validator("health_groups_disabled", "health_group_intervals")
    @classmethod
    def _known_groups(cls, value: Any) -> Any:
        from pgflow.schema import HEALTH_GROUPS

        unknown = sorted(set(value) - set(HEALTH_GROUPS))
        if unknown:
            raise ValueError(f"unknown health group {unknown[0]!r}; known: {', '.join(HEALTH_GROUPS)}")
        return value

    @field_validator("metrics_addr")
    @classmethod
    def _addr(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected host:port, e.g. 127.0.0.1:9187")
        return value

    @model_validator(mode="after")
    def _secrets_from_files(self) -> Settings:
        return _settings_secrets_from_files(self)  # issue 15

    @model_validator(mode="after")
    def _names_unique(self) -> Settings:
        names = [i.name for i in self.instances]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"instance name {dupes[0]!r} is used twice; each instance needs its own name")
        return self

    # Derived values -------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The OTLP endpoint in use: explicit, else New Relic's for the region and protocol."""
        return self.otlp_endpoint or NEW_RELIC_ENDPOINTS[self.new_relic_region][self.otlp_protocol]

    @property
    def export_headers(self) -> dict[str, str]:
        headers = {k: v.get_secret_value() for k, v in self.otlp_headers.items()}
        if self.new_relic_api_key is not None:
            headers["api-key"] = self.new_relic_api_key.get_secret_value()
        return headers

    def network(self, signal: str = "metrics"):  # type: ignore[no-untyped-def]
        """Issue 21: the export's TLS files, proxy, timeout and compression for one signal (a
        :class:`pgflow.otlp.network.Network`); per-signal OTEL variables win over the general ones.
        Raises ConfigError (exit 2, one line naming it) for an unreadable or invalid file or proxy."""
        from pgflow.otlp.network import Network, check_client_pair, check_pem, proxy_for

        env = getattr(self, "_signal_env", {}).get(signal, {})
        names = {s: f"{s} (OTEL_EXPORTER_OTLP_{suffix})" for s, suffix in
                 (("otlp_certificate", "CERTIFICATE"), ("otlp_client_certificate", "CLIENT_CERTIFICATE"),
                  ("otlp_client_key", "CLIENT_KEY"))}

        def pick(setting: str, general: Any) -> Any:
            if setting in env:
                value, name = env[setting]
                names[setting] = name
                return value.strip()
            return general

        def as_bool(setting: str, general: bool) -> bool:
            value = pick(setting, general)
            if isinstance(value, str):
                if value.lower() not in ("true", "false"):
                    raise ConfigError(f"invalid setting {names.get(setting, setting)}: expected true or false, "
                                      f"got {value[:20]!r}")
                return value.lower() == "true"
            return bool(value)

        ca, cert, key = (pick(s, getattr(self, s)) for s in ("otlp_certificate", "otlp_client_certificate",
                                                            "otlp_client_key"))
        ca, cert, key = (Path(v) if v else None for v in (ca, cert, key))
        timeout_ms = pick("otlp_timeout_ms", self.otlp_timeout_ms)
        try:
            timeout = int(timeout_ms) / 1000 if timeout_ms else self.export_timeout_secs
            if timeout <= 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"invalid setting {names.get('otlp_timeout_ms', 'OTEL_EXPORTER_OTLP_TIMEOUT')}: "
                              f"expected milliseconds, got {str(timeout_ms)[:20]!r}") from None
        compression = str(pick("otlp_compression", self.otlp_compression)).lower()
        if compression not in ("gzip", "none"):
            raise ConfigError(f"invalid compression {compression[:20]!r} for the {signal} export", "expected gzip or none")
        insecure = as_bool("otlp_insecure", self.otlp_insecure)
        if ca is not None:
            check_pem(ca, names["otlp_certificate"], "ca")
        check_client_pair(cert, key, names["otlp_client_certificate"], names["otlp_client_key"])
        explicit = self.otlp_proxy.get_secret_value() if self.otlp_proxy is not None else None
        proxy, source = proxy_for(self.endpoint, explicit, insecure)
        return Network(certificate=ca, client_certificate=cert, client_key=key, insecure=insecure, timeout=timeout,
                       compression=compression, proxy=proxy, proxy_source=source, names=tuple(names.items()))

    def targets(self) -> list[InstanceConfig]:
        """The instances to scrape; raises ConfigError when none is configured."""
        if self.instances:
            return list(self.instances)
        if self.database_url is None:
            raise ConfigError(
                "DATABASE_URL is not set",
                "set DATABASE_URL=postgresql://user@host:5432/db or list instances in the config file",
            )
        dsn = self.database_url.get_secret_value()
        return [InstanceConfig(name=dsn_instance_name(dsn), database_url=dsn)]

    def redacted(self) -> dict[str, Any]:
        """The effective configuration with every secret replaced, for the start log line."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name == "database_url":
                value = redact_dsn(value.get_secret_value()) if value else None
            elif name == "instances":
                value = [{"name": i.name, "database_url": redact_dsn(i.dsn),
                          **({"database_url_file": str(i.database_url_file)} if i.database_url_file else {})}
                         for i in value]
            elif name == "new_relic_api_key":
                value = "<set>" if value else None
            elif name == "otlp_proxy":  # issue 21: a proxy URL may carry credentials
                from pgflow.otlp.network import redact_proxy

                value = redact_proxy(value.get_secret_value()) if value is not None else None
            elif name == "otlp_headers":
                value = {k: "<redacted>" for k in value}
            elif isinstance(value, Path):
                value = str(value)
            out[name] = value
        out["endpoint"] = self.endpoint
        return out

    def __repr__(self) -> str:
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in self.redacted().items())})"

    __str__ = __repr__

    # Loading -------------------------------------------------------------------

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Build settings from overrides > environment > JSON file > defaults.

        Raises ConfigError (one line, no secret) instead of pydantic's multi-line report.
        """
        _unknown_env()  # issue 19: a misspelled PGFLOW_ variable is an error, as in the file
        token = _config_file.set(Path(config_file) if config_file else None)
        keys = _file_keys.set(None)
        over = _overrides.set(frozenset(overrides))
        try:
            settings = cls(**overrides)
            _say_which_wins(settings)
            return settings
        except ValidationError as exc:
            raise _config_error(exc) from None
        except SettingsError as exc:
            field = re.search(r'field "(\w+)"', str(exc))
            name = field.group(1) if field else "settings"
            raise ConfigError(f"invalid setting {name} ({_source(name)})", "expected a JSON value of the right type") from None
        finally:
            _config_file.reset(token)
            _file_keys.reset(keys)
            _overrides.reset(over)


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "pgflow"


_ENV_NAMES = {"database_url": "DATABASE_URL", "new_relic_api_key": "NEW_RELIC_API_KEY",
              "database_url_file": "DATABASE_URL_FILE", "new_relic_api_key_file": "NEW_RELIC_API_KEY_FILE"}


def _config_error(exc: ValidationError) -> ConfigError:
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err.get("loc", ())]
    field = loc[0] if loc else "settings"
    field = {v: k for k, v in _ENV_NAMES.items()}.get(field, field).lower()
    if field.startswith("pgflow_"):
        field = field[len("pgflow_"):]
    where = ".".join([field, *loc[1:]])
    env = _ENV_NAMES.get(field, f"PGFLOW_{field.upper()}")
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value"))
    if kind == "extra_forbidden":
        return ConfigError(f"unknown setting {where!r}", _nearest(field))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if not loc:  # a rule across settings (unique instance names): named by the setting it is about
        about = "instances" if "instance" in msg else ""
        return ConfigError(f"invalid setting instances ({_source('instances')}): {msg}" if about
                           else f"invalid configuration: {msg}")
    shown = ""
    if field not in _SECRET_FIELDS and "input" in err and not isinstance(err["input"], (dict, list)):
        shown = f", got {str(err['input'])[:80]!r}"
    del env
    return ConfigError(f"invalid setting {where} ({_source(field)}): {msg}{shown}")


# --- issue 19: the user's mistakes, said once and clearly --------------------------------------

_file_keys: contextvars.ContextVar[tuple[Path, frozenset[str]] | None] = contextvars.ContextVar(
    "pgflow_config_file_keys", default=None)
_overrides: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("pgflow_overrides", default=frozenset())
# PGFLOW_ variables that are not settings: the config file's path, and the test and bench tools'.
_OTHER_ENV = ("PGFLOW_CONFIG",)
_OTHER_ENV_PREFIXES = ("PGFLOW_TEST_", "PGFLOW_BENCH_", "PGFLOW_PYTHON")
_said_which_wins = False


def _env_names(field: str) -> list[str]:
    """Every environment name a setting is read from, the documented one first."""
    info = Settings.model_fields[field]
    names = [f"PGFLOW_{field.upper()}"]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        names = [str(c).upper() for c in alias.choices if str(c).upper() != field.upper()] + names
    out: list[str] = []
    for n in names:
        if n not in out:
            out.append(n)
    return out


def _source(field: str) -> str:
    """Where the value of ``field`` came from, as a person would look for it."""
    if field in _overrides.get():  # given by the program (a command-line option): named by its env name
        return f"env {_ENV_NAMES.get(field, 'PGFLOW_' + field.upper())}"
    env = {k.upper() for k in os.environ}
    if field in Settings.model_fields:
        for name in _env_names(field):
            if name in env:
                return f"env {name}"
    keys = _file_keys.get()
    if keys is not None and field in keys[1]:
        return f"config file {keys[0]}"
    return f"env {_ENV_NAMES.get(field, 'PGFLOW_' + field.upper())}"


def _nearest(name: str) -> str:
    """The hint for an unknown setting: the nearest known one, else the list."""
    import difflib

    known = sorted(Settings.model_fields)
    close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"known settings: {', '.join(known)}"


def _unknown_env() -> None:
    """A ``PGFLOW_`` variable that names no setting exits 2, naming the nearest one: a typo must
    not leave the default silently in place (the JSON file already refuses unknown keys)."""
    known = {n for f in Settings.model_fields for n in _env_names(f)}
    for name in sorted(os.environ):
        upper = name.upper()
        if not upper.startswith("PGFLOW_") or upper in known or upper in _OTHER_ENV \
                or upper.startswith(_OTHER_ENV_PREFIXES):
            continue
        import difflib

        fields = sorted(Settings.model_fields)
        close = difflib.get_close_matches(upper[len("PGFLOW_"):].lower(), fields, n=1, cutoff=0.6)
        hint = f"did you mean PGFLOW_{close[0].upper()}?" if close else \
            f"known settings: {', '.join(fields)} (as PGFLOW_<SETTING>)"
        raise ConfigError(f"unknown environment variable {name}", hint)


def _say_which_wins(settings: Settings) -> None:
    """DATABASE_URL and ``instances`` both set: the instances are scraped; said once per process."""
    global _said_which_wins
    if settings.instances and settings.database_url is not None and not _said_which_wins:
        _said_which_wins = True
        import logging

        logging.getLogger("pgflow.config").warning(
            f"DATABASE_URL ({_source('database_url')}) is ignored: the {len(settings.instances)} instance(s) listed "
            "in instances are scraped; unset DATABASE_URL, or add it to instances")


# --- issue 15: secrets from files ---------------------------------------------------------
# DATABASE_URL_FILE, NEW_RELIC_API_KEY_FILE and an instance's "database_url_file" name a file
# holding the secret (a Kubernetes Secret or Docker secret mount, a systemd credential). A file
# that is missing or empty stops pgflow (one line, exit 2); one that other users may read or
# anyone but its owner may write is used, with one warning line per file.

_config_log = logging.getLogger("pgflow.config")
_warned_files: set[tuple[str, int]] = set()


def read_secret_file(path: Path, setting: str) -> str:
    """The secret in ``path``, stripped of surrounding whitespace (a mounted Secret often ends
    in a newline). Raises ConfigError for a missing, unreadable or empty file; warns once
    when its permissions let other users read it or others than its owner change it."""
    try:
        st = os.stat(path)
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {setting} {path} ({exc.strerror})",
                          "check the path and that the user pgflow runs as may read it") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{setting} {path} is not UTF-8 text", "the file must hold only the secret") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o026 and (str(path), mode) not in _warned_files:
        _warned_files.add((str(path), mode))
        who = "other users may read it" if mode & 0o004 else "others than its owner may change it"
        _config_log.warning(f"{setting} {path} has mode {mode:04o}: {who}; chmod 600 it "
                            f"(or 640 / 440 for the group the service runs in)")
    secret = text.strip()
    if not secret:
        raise ConfigError(f"{setting} {path} is empty", "write the secret into the file (one line)")
    return secret


def _dsn_from(path: Path, setting: str) -> str:
    try:
        return _check_dsn(read_secret_file(path, setting))
    except ValueError as exc:  # never echo the file's content: it holds a password
        raise ConfigError(f"the DSN in {setting} {path} {exc}") from None


def _instance_dsn_from_file(data: Any) -> Any:
    """Fill an instance's ``database_url`` from its ``database_url_file`` (before validation)."""
    if not isinstance(data, dict) or data.get("database_url_file") in (None, ""):
        return data
    name = data.get("name", "?")
    if data.get("database_url") is not None:
        raise ConfigError(f"instance {name!r} sets both database_url and database_url_file", "keep one of them")
    path = Path(data["database_url_file"])
    return {**data, "database_url": _dsn_from(path, f"database_url_file of instance {name!r}")}


def _settings_secrets_from_files(settings: Settings) -> Settings:
    """Fill ``database_url`` and ``new_relic_api_key`` from their ``*_FILE`` settings."""
    if settings.database_url_file is not None:
        if settings.database_url is not None:
            raise ConfigError("both DATABASE_URL and DATABASE_URL_FILE are set", "keep one of them")
        settings.database_url = SecretStr(_dsn_from(settings.database_url_file, "DATABASE_URL_FILE"))
    if settings.new_relic_api_key_file is not None:
        if settings.new_relic_api_key is not None:
            raise ConfigError("both NEW_RELIC_API_KEY and NEW_RELIC_API_KEY_FILE are set", "keep one of them")
        settings.new_relic_api_key = SecretStr(read_secret_file(settings.new_relic_api_key_file,
                                                                "NEW_RELIC_API_KEY_FILE"))
    return settings
