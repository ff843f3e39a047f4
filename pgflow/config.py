"""Settings: environment variables over a JSON file over defaults, validated and redacted.

Environment names keep the seed's: ``DATABASE_URL``, ``NEW_RELIC_API_KEY``, and
``PGFLOW_<FIELD>`` for everything else. The standard ``OTEL_EXPORTER_OTLP_*`` variables
are honoured as fallbacks. Bad settings raise :class:`ConfigError` with one line that
names the setting and what is expected, and never echoes a secret.
"""

from __future__ import annotations

import contextvars
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import psycopg.conninfo
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
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

_SECRET_FIELDS = {"database_url", "new_relic_api_key", "otlp_headers", "instances"}
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
    """The server address a DSN points at, as used in ``service.instance.id``."""
    parts = psycopg.conninfo.conninfo_to_dict(dsn)
    host = str(parts.get("host") or parts.get("hostaddr") or "localhost").split(",")[0]
    if host.startswith("/"):
        host = "localhost"
    port = int(str(parts.get("port") or "5432").split(",")[0])
    return host, port


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
            raise ConfigError(
                f"unknown setting {unknown[0]!r} in config file {path}",
                f"known settings: {', '.join(sorted(Settings.model_fields))}",
            )
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
    collection_interval_secs: float = Field(30.0, gt=0, le=86400)
    statement_timeout_ms: int = Field(5000, gt=0)
    connect_timeout_secs: int = Field(5, gt=0, le=600)
    text_cache_size: int = Field(50_000, gt=0)
    max_scrapes: int | None = Field(None, gt=0)

    # What to keep.
    fingerprint_cache_size: int = Field(50_000, gt=0)
    max_queries_tracked: int = Field(1000, gt=0)
    max_users_tracked: int = Field(100, gt=0)
    max_databases_tracked: int = Field(100, gt=0)
    slow_query_threshold_ms: float = Field(0.0, ge=0)
    export_interval_secs: float = Field(60.0, gt=0, le=86400)

    # Per-table statistics (issue 13): each database's own catalog, on their own interval, bounded.
    table_stats_interval_secs: float = Field(300.0, gt=0, le=86400)
    max_tables_tracked: int = Field(300, gt=0)
    table_stats_databases: list[str] = Field(default_factory=list)  # names or globs; empty: every database
    table_stats_exclude_databases: list[str] = Field(default_factory=list)  # names or globs
    table_stats_enabled: bool = True
    table_stats_lock_timeout_ms: int = Field(1000, gt=0)  # never wait on a table's lock longer than this

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
    batch_size: int = Field(1000, gt=0, le=100_000)
    batch_timeout_secs: float = Field(10.0, gt=0)
    export_timeout_secs: float = Field(10.0, gt=0)
    retry_initial_delay_secs: float = Field(1.0, gt=0)
    retry_max_delay_secs: float = Field(30.0, gt=0)
    retry_max_attempts: int = Field(5, gt=0, le=100)
    service_name: str = "pgflow"

    # Running.
    metrics_addr: str = "127.0.0.1:9187"
    state_dir: Path = Field(default_factory=lambda: _default_state_dir())
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["kv", "json"] = "kv"

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

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        if not re.match(r"^(https?://)?[A-Za-z0-9.\-\[\]:]+(:\d+)?(/.*)?$", value):
            raise ValueError("expected an endpoint such as https://otlp.nr-data.net:4317 or http://127.0.0.1:4317")
        return value

    @field_validator("metrics_addr")
    @classmethod
    def _addr(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected host:port, e.g. 127.0.0.1:9187")
        return value

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
        host, port = dsn_host_port(dsn)
        return [InstanceConfig(name=f"{host}:{port}", database_url=dsn)]

    def redacted(self) -> dict[str, Any]:
        """The effective configuration with every secret replaced, for the start log line."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name == "database_url":
                value = redact_dsn(value.get_secret_value()) if value else None
            elif name == "instances":
                value = [{"name": i.name, "database_url": redact_dsn(i.dsn)} for i in value]
            elif name == "new_relic_api_key":
                value = "<set>" if value else None
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
        token = _config_file.set(Path(config_file) if config_file else None)
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise _config_error(exc) from None
        except SettingsError as exc:
            field = re.search(r'field "(\w+)"', str(exc))
            name = field.group(1) if field else "settings"
            raise ConfigError(f"invalid setting {name} (env PGFLOW_{name.upper()})", "expected a JSON value of the right type") from None
        finally:
            _config_file.reset(token)


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "pgflow"


_ENV_NAMES = {"database_url": "DATABASE_URL", "new_relic_api_key": "NEW_RELIC_API_KEY"}


def _config_error(exc: ValidationError) -> ConfigError:
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err.get("loc", ())]
    field = loc[0] if loc else "settings"
    field = {"DATABASE_URL": "database_url", "NEW_RELIC_API_KEY": "new_relic_api_key"}.get(field, field).lower()
    if field.startswith("pgflow_"):
        field = field[len("pgflow_"):]
    where = ".".join([field, *loc[1:]])
    env = _ENV_NAMES.get(field, f"PGFLOW_{field.upper()}")
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value"))
    if kind == "extra_forbidden":
        return ConfigError(f"unknown setting {where!r}", f"known settings: {', '.join(sorted(Settings.model_fields))}")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    shown = ""
    if field not in _SECRET_FIELDS and "input" in err and not isinstance(err["input"], (dict, list)):
        shown = f", got {str(err['input'])[:80]!r}"
    return ConfigError(f"invalid setting {where} (env {env}): {msg}{shown}")
