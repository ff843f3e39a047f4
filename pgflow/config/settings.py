"""Everything pgflow can be told: the fields of :class:`Settings`, each with its default, bounds,
environment names and the one-line description ``docs/configuration.md`` is generated from.

Environment names keep the seed's: ``DATABASE_URL``, ``NEW_RELIC_API_KEY``, and
``PGFLOW_<FIELD>`` for everything else. The standard ``OTEL_EXPORTER_OTLP_*`` variables
are honoured as fallbacks. Loading and its error messages are :mod:`pgflow.config.loading`'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic.json_schema import JsonDict
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from pgflow.config import loading
from pgflow.config.dsn import _check_dsn, dsn_instance_name
from pgflow.config.instance import InstanceConfig
from pgflow.config.network import SIGNALS, Network, checked_endpoint, otel_headers, resolve_network, signal_env, split_endpoint
from pgflow.config.secrets import _settings_secrets_from_files, redacted_settings
from pgflow.errors import ConfigError

NEW_RELIC_ENDPOINTS = {
    "us": {"grpc": "https://otlp.nr-data.net:4317", "http": "https://otlp.nr-data.net:4318"},
    "eu": {"grpc": "https://otlp.eu01.nr-data.net:4317", "http": "https://otlp.eu01.nr-data.net:4318"},
}

# The sections of docs/configuration.md (a field joins its group's table; groups in order of first use).
SERVERS: JsonDict = {"group": "Servers and secrets"}
SCRAPE: JsonDict = {"group": "Scraping"}
KEEP: JsonDict = {"group": "What to keep"}
HEALTH: JsonDict = {"group": "Instance health"}
TABLES: JsonDict = {"group": "Per-table statistics"}
GENTLE: JsonDict = {"group": "Connections to the server"}
SEND: JsonDict = {"group": "Where to send"}
NETWORK: JsonDict = {"group": "The export's TLS, proxy, timeout and compression"}
BATCHES: JsonDict = {"group": "Export batches and retries"}
SAMPLES: JsonDict = {"group": "Query samples and plans"}
RUNNING: JsonDict = {"group": "Running"}


def _env(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Settings(BaseSettings):
    """Everything pgflow can be told. Field names are the JSON file's keys."""

    model_config = SettingsConfigDict(
        env_prefix="PGFLOW_", extra="forbid", populate_by_name=True, validate_default=True, case_sensitive=False
    )

    # Where to scrape.
    database_url: SecretStr | None = Field(
        None,
        validation_alias=_env("database_url", "DATABASE_URL", "PGFLOW_DATABASE_URL"),
        json_schema_extra=SERVERS,
        description="One PostgreSQL server to watch (a URL or key=value DSN); use `instances` for several.",
    )
    instances: list[InstanceConfig] = Field(
        default_factory=list,
        json_schema_extra=SERVERS,
        description='Several servers: `[{"name": "main", "database_url": "postgresql://..."}]`.',
    )
    # issue 15: secrets from files (the container and Kubernetes convention)
    database_url_file: Path | None = Field(
        None,
        validation_alias=_env("database_url_file", "DATABASE_URL_FILE", "PGFLOW_DATABASE_URL_FILE"),
        json_schema_extra=SERVERS,
        description="Read `database_url` from this file (a mounted Secret, a systemd credential).",
    )
    new_relic_api_key_file: Path | None = Field(
        None,
        validation_alias=_env("new_relic_api_key_file", "NEW_RELIC_API_KEY_FILE", "PGFLOW_NEW_RELIC_API_KEY_FILE"),
        json_schema_extra=SERVERS,
        description="Read `new_relic_api_key` from this file.",
    )
    collection_interval_secs: float = Field(30.0, gt=0, le=86400, json_schema_extra=SCRAPE, description="Time between scrapes.")
    statement_timeout_ms: int = Field(5000, gt=0, json_schema_extra=SCRAPE, description="Limit on every statement pgflow runs on a server.")
    connect_timeout_secs: int = Field(5, gt=0, le=600, json_schema_extra=SCRAPE, description="Limit on connecting.")
    text_cache_size: int = Field(
        50_000,
        gt=0,
        json_schema_extra=SCRAPE,
        description="No effect, accepted so configurations that set it still load: each statement's text is "
        "read once and held while the server holds the statement, so steady-state scrapes transfer none.",
    )
    max_scrapes: int | None = Field(
        None, gt=0, json_schema_extra=SCRAPE, description="Stop after this many scrapes per instance and flush (`pgflow run --scrapes`)."
    )
    # issue 11: active-session sampling of pg_stat_activity every N seconds on its own connection; 0 = off
    activity_sample_interval_secs: float = Field(
        1.0,
        ge=0,
        le=3600,
        json_schema_extra=SCRAPE,
        description="Active-session sampling period, on its own connection (0: off; else at least 0.1).",
    )

    # What to keep.
    fingerprint_cache_size: int = Field(50_000, gt=0, json_schema_extra=KEEP, description="Fingerprints kept.")
    max_queries_tracked: int = Field(
        1000,
        gt=0,
        json_schema_extra=KEEP,
        description="Fingerprints exported as their own series, per instance; the rest roll into `other`.",
    )
    max_users_tracked: int = Field(
        100,
        gt=0,
        json_schema_extra=KEEP,
        description="Users named in the query and active-session series; the rest are `other` (gauges, health and events name every role).",
    )
    max_databases_tracked: int = Field(
        100,
        gt=0,
        json_schema_extra=KEEP,
        description="Databases named in the query and active-session series, the rest `other`; also the most databases table statistics visit (the rest are not read). Gauges, health and events name every database.",
    )
    slow_query_threshold_ms: float = Field(
        0.0, ge=0, json_schema_extra=KEEP, description="Series under this mean time per call roll into `other` (0: off)."
    )
    export_interval_secs: float = Field(
        60.0, gt=0, le=86400, json_schema_extra=KEEP, description="Length of the export windows, aligned to the clock."
    )

    # --- issue 13: instance health groups (schema.HEALTH_GROUPS), each on its own interval ---
    health_interval_secs: float = Field(
        60.0, gt=0, le=86400, json_schema_extra=HEALTH, description="How often each instance health group is read."
    )
    db_size_interval_secs: float = Field(
        300.0,
        gt=0,
        le=86400,
        json_schema_extra=HEALTH,
        description="How often `pg_database_size` is read (it walks every file of every database).",
    )
    health_group_intervals: dict[str, Annotated[float, Field(gt=0, le=86400)]] = Field(
        default_factory=dict,
        json_schema_extra=HEALTH,
        description='Per-group intervals overriding the two above, e.g. `{"io": 300, "replication": 15}`.',
    )
    health_groups_disabled: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        json_schema_extra=HEALTH,
        description='Health groups never read, e.g. `["io", "db_size"]` (env: a JSON list or `io,db_size`).',
    )
    # --- end issue 13 ---
    # Per-table statistics (issue 13): each database's own catalog, on their own interval, bounded.
    table_stats_interval_secs: float = Field(
        300.0, gt=0, le=86400, json_schema_extra=TABLES, description="Time between per-table statistics scrapes."
    )
    max_tables_tracked: int = Field(
        300,
        gt=0,
        json_schema_extra=TABLES,
        description="Tables exported under their own name, per instance; the rest roll into `other` per database.",
    )
    table_stats_databases: list[str] = Field(
        default_factory=list,
        json_schema_extra=TABLES,
        description="Databases whose tables are scraped (names or globs); empty: every database.",
    )
    table_stats_exclude_databases: list[str] = Field(
        default_factory=list, json_schema_extra=TABLES, description="Databases whose tables are never scraped (names or globs)."
    )
    table_stats_enabled: bool = Field(True, json_schema_extra=TABLES, description="`false` turns the table scrape off.")
    table_stats_lock_timeout_ms: int = Field(
        1000, gt=0, json_schema_extra=TABLES, description="How long a size read may wait on a table's lock."
    )
    # Issue 20: gentle on the server. Never more than this many connections per instance at any
    # moment (the scrape, the sampler, one for per-database work), and optional work waits while
    # fewer than reserved_connections_headroom connections are free for others.
    max_connections_per_instance: int = Field(
        3, ge=2, le=100, json_schema_extra=GENTLE, description="Connections pgflow holds to one instance at any moment, at most."
    )
    reserved_connections_headroom: int = Field(
        5,
        ge=0,
        le=10_000,
        json_schema_extra=GENTLE,
        description="Optional work waits while fewer than this many connections are free for others.",
    )

    # Where to send.
    new_relic_api_key: SecretStr | None = Field(
        None,
        validation_alias=_env("new_relic_api_key", "NEW_RELIC_API_KEY", "PGFLOW_NEW_RELIC_API_KEY"),
        json_schema_extra=SERVERS,
        description="New Relic license key, sent as the `api-key` header.",
    )
    new_relic_region: Literal["us", "eu"] = Field(
        "us", json_schema_extra=SEND, description="`us` or `eu`: picks New Relic's OTLP endpoint."
    )
    otlp_endpoint: str | None = Field(
        None,
        validation_alias=_env("otlp_endpoint", "PGFLOW_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        json_schema_extra=SEND,
        description="Any OTLP endpoint instead of New Relic's; `http://` means no TLS.",
    )
    otlp_protocol: Literal["grpc", "http"] = Field(
        "http",
        validation_alias=_env("otlp_protocol", "PGFLOW_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
        json_schema_extra=SEND,
        description="`http` (binary protobuf; `http/protobuf` accepted) or `grpc`. When not set: `grpc` "
        "for an endpoint on port 4317 (OTLP/gRPC's port), else `http`, which New Relic recommends and "
        "which loads no gRPC library (about 13 MB and six threads less).",
    )
    otlp_headers: Annotated[dict[str, SecretStr], NoDecode] = Field(
        default_factory=dict,
        validation_alias=_env("otlp_headers", "PGFLOW_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"),
        json_schema_extra=SEND,
        description="Extra export headers (env: `k=v,k2=v2`, values URL-encoded).",
    )
    # Issue 21: TLS, mTLS, proxies, timeout and compression of the export, as the OTel exporters
    # read them (per-signal OTEL_EXPORTER_OTLP_METRICS_* / _LOGS_* variables win: see network()).
    otlp_certificate: Path | None = Field(
        None,
        validation_alias=_env("otlp_certificate", "PGFLOW_OTLP_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE"),
        json_schema_extra=NETWORK,
        description="CA bundle (PEM) the endpoint's certificate must chain to, instead of the system's. This "
        "and the five settings below also have per-signal forms, `OTEL_EXPORTER_OTLP_METRICS_*` and "
        "`OTEL_EXPORTER_OTLP_LOGS_*`, which win.",
    )
    otlp_client_certificate: Path | None = Field(
        None,
        validation_alias=_env("otlp_client_certificate", "PGFLOW_OTLP_CLIENT_CERTIFICATE", "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"),
        json_schema_extra=NETWORK,
        description="Client certificate (PEM) for mTLS; needs `otlp_client_key`.",
    )
    otlp_client_key: Path | None = Field(
        None,
        validation_alias=_env("otlp_client_key", "PGFLOW_OTLP_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY"),
        json_schema_extra=NETWORK,
        description="The client certificate's private key (PEM, unencrypted).",
    )
    otlp_insecure: bool = Field(
        False,
        validation_alias=_env("otlp_insecure", "PGFLOW_OTLP_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE"),
        json_schema_extra=NETWORK,
        description="`true`: an endpoint given without `http://` or `https://` is reached without TLS.",
    )
    otlp_timeout_ms: int | None = Field(
        None,
        gt=0,
        le=3_600_000,
        validation_alias=_env("otlp_timeout_ms", "PGFLOW_OTLP_TIMEOUT_MS", "OTEL_EXPORTER_OTLP_TIMEOUT"),
        json_schema_extra=NETWORK,
        description="Limit on one export call, in milliseconds; unset: `export_timeout_secs`.",
    )
    otlp_compression: Literal["gzip", "none"] = Field(
        "gzip",
        validation_alias=_env("otlp_compression", "PGFLOW_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"),
        json_schema_extra=NETWORK,
        description="`gzip` or `none`: compression of the export requests.",
    )
    otlp_proxy: SecretStr | None = Field(
        None,
        validation_alias=_env("otlp_proxy", "PGFLOW_OTLP_PROXY"),
        json_schema_extra=NETWORK,
        description="HTTP proxy for the export, `http://[user:password@]host:port` (TLS is tunnelled with CONNECT); "
        "`none`: no proxy. Unset: `HTTPS_PROXY` or `HTTP_PROXY` by the endpoint's scheme, unless "
        "`NO_PROXY` covers its host.",
    )
    _signal_env: dict[str, dict[str, tuple[str, str]]] = PrivateAttr(default_factory=dict)
    batch_size: int = Field(
        1000,
        gt=0,
        le=100_000,
        json_schema_extra=BATCHES,
        description="Data points per OTLP request (requests also stay under 1,000,000 bytes).",
    )
    batch_timeout_secs: float = Field(
        10.0, gt=0, json_schema_extra=BATCHES, description="Accepted for the seed's configuration; windows are sent as soon as they close."
    )
    export_timeout_secs: float = Field(10.0, gt=0, json_schema_extra=BATCHES, description="Limit on one export call.")
    retry_initial_delay_secs: float = Field(
        1.0, gt=0, json_schema_extra=BATCHES, description="First pause before retrying an export (then exponential, with jitter)."
    )
    retry_max_delay_secs: float = Field(30.0, gt=0, json_schema_extra=BATCHES, description="Longest pause between export retries.")
    retry_max_attempts: int = Field(
        5,
        gt=0,
        le=100,
        json_schema_extra=BATCHES,
        description="Attempts of one export (retryable answers only); a batch still failing stays in the ledger.",
    )
    service_name: str = Field("pgflow", json_schema_extra=SEND, description="The `service.name` resource attribute.")

    # Issue 12: query samples and explain plans.
    sample_min_duration_ms: float = Field(
        100.0, gt=0, json_schema_extra=SAMPLES, description="Query samples: only statements running longer than this when seen."
    )
    samples_per_fingerprint_per_hour: int = Field(
        15, gt=0, json_schema_extra=SAMPLES, description="Query samples: at most this many per fingerprint per hour."
    )
    max_samples_per_window: int = Field(
        100, gt=0, json_schema_extra=SAMPLES, description="Query samples: at most this many per export window, per instance."
    )
    explains_per_window: int = Field(
        5,
        ge=0,
        le=1000,
        json_schema_extra=SAMPLES,
        description="Plans explained per export window, busiest fingerprints first (0: no plans).",
    )
    explain_ttl_secs: float = Field(
        3600.0, gt=0, json_schema_extra=SAMPLES, description="A fingerprint is explained at most once per this many seconds per database."
    )

    # Running.
    metrics_addr: str = Field(
        "127.0.0.1:9187", json_schema_extra=RUNNING, description="The collector's own `/metrics` and `/healthz` (port 0: any free port)."
    )
    state_dir: Path = Field(
        default_factory=lambda: _default_state_dir(),
        json_schema_extra={**RUNNING, "doc_default": "`$XDG_DATA_HOME/pgflow`, else `~/.local/share/pgflow`"},
        description="Durable state (the ledger); the same directory resumes after a restart.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", json_schema_extra=RUNNING, description="`debug`, `info`, `warning` or `error`."
    )
    log_format: Literal["kv", "json"] = Field("kv", json_schema_extra=RUNNING, description="`kv` (key=value lines) or `json`.")

    # Issue 14 (stream): shutdown bound and refused exports.
    shutdown_timeout_secs: float = Field(
        20.0,
        gt=0,
        le=3600,
        json_schema_extra=RUNNING,
        description="Bound on the whole shutdown after SIGTERM/SIGINT; keep it under the orchestrator's grace period.",
    )
    refused_retry_secs: float = Field(
        60.0,
        gt=0,
        le=86400,
        json_schema_extra=RUNNING,
        description="Pause after the endpoint refuses (401/403, 400, 413) before trying again; doubles while refusals go on.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, loading._JsonFileSource(settings_cls))

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
        return otel_headers(value) if isinstance(value, str) else value

    @field_validator("otlp_compression", mode="before")
    @classmethod
    def _compression(cls, value: Any) -> Any:  # issue 21: the OTel values are lower-case words
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _protocol_from_port(self) -> Settings:
        """Issue 20: OTLP/HTTP is the default (the OTLP specification's and New Relic's advice); an
        endpoint on OTLP/gRPC's own port 4317 with no protocol set still means gRPC, so a setup
        written when gRPC was the default keeps working."""
        if "otlp_protocol" not in self.model_fields_set and self.otlp_endpoint:
            try:
                port = split_endpoint(self.otlp_endpoint, 0)[2]
            except ValueError:  # a port out of range: the transport's own error names it
                port = 0
            if port == 4317:
                self.otlp_protocol = "grpc"
        return self

    @model_validator(mode="after")
    def _otlp_network(self) -> Settings:
        """Issue 21: read the per-signal OTEL variables once and check every TLS file and proxy at start."""
        self._signal_env = signal_env()
        for sig in SIGNALS:
            self.network(sig)  # raises ConfigError naming the file or the proxy variable
        return self

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return None if value is None else checked_endpoint(value)

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

    def network(self, signal: str = "metrics") -> Network:
        """Issue 21: the export's TLS files, proxy, timeout and compression for one signal;
        per-signal OTEL variables win over the general ones. Raises ConfigError (exit 2, one line
        naming it) for an unreadable or invalid file or proxy (:mod:`pgflow.config.network`)."""
        return resolve_network(self, signal)

    def targets(self) -> list[InstanceConfig]:
        """The instances to scrape; raises ConfigError when none is configured."""
        if self.instances:
            return list(self.instances)
        if self.database_url is None:
            raise ConfigError(
                "DATABASE_URL is not set", "set DATABASE_URL=postgresql://user@host:5432/db or list instances in the config file"
            )
        dsn = self.database_url.get_secret_value()
        return [InstanceConfig(name=dsn_instance_name(dsn), database_url=dsn)]

    def without_effect(self) -> list[str]:
        """The settings given that no longer do anything (said once at start: they can be removed)."""
        return sorted(NO_EFFECT & self.model_fields_set)

    def redacted(self) -> dict[str, Any]:
        """The effective configuration with every secret replaced, for the start log line."""
        return redacted_settings(self)

    def __repr__(self) -> str:
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in self.redacted().items())})"

    __str__ = __repr__

    @classmethod
    def load(cls, config_file: str | Path | None = None, **overrides: Any) -> Settings:
        """Build settings from overrides > environment > JSON file > defaults.

        Raises ConfigError (one line, no secret) instead of pydantic's multi-line report.
        """
        return loading.load(cls, config_file, **overrides)


# Settings accepted for configurations written before they lost their effect.
NO_EFFECT = frozenset({"text_cache_size"})  # issue 20: texts are held once per entry the server holds


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "pgflow"
