"""Secrets: read from files (issue 15), and never shown.

DATABASE_URL_FILE, NEW_RELIC_API_KEY_FILE and an instance's "database_url_file" name a file
holding the secret (a Kubernetes Secret or Docker secret mount, a systemd credential: the
container convention). A file that is missing or empty stops pgflow (one line, exit 2); one that
other users may read or anyone but its owner may write is used, with one warning line per file.
:func:`redacted_settings` is the configuration as the start log line shows it: DSNs without their
password, the key and headers hidden, a proxy without its credentials.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from pgflow.config.dsn import _check_dsn, redact_dsn
from pgflow.config.network import redact_proxy
from pgflow.errors import ConfigError

if TYPE_CHECKING:
    from pgflow.config.settings import Settings

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
        raise ConfigError(
            f"cannot read {setting} {path} ({exc.strerror})", "check the path and that the user pgflow runs as may read it"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{setting} {path} is not UTF-8 text", "the file must hold only the secret") from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o026 and (str(path), mode) not in _warned_files:
        _warned_files.add((str(path), mode))
        who = "other users may read it" if mode & 0o004 else "others than its owner may change it"
        _config_log.warning(f"{setting} {path} has mode {mode:04o}: {who}; chmod 600 it (or 640 / 440 for the group the service runs in)")
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
        settings.new_relic_api_key = SecretStr(read_secret_file(settings.new_relic_api_key_file, "NEW_RELIC_API_KEY_FILE"))
    return settings


def redacted_settings(settings: Settings) -> dict[str, Any]:
    """The effective configuration with every secret replaced, for the start log line."""
    out: dict[str, Any] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if name == "database_url":
            value = redact_dsn(value.get_secret_value()) if value else None
        elif name == "instances":
            value = [
                {
                    "name": i.name,
                    "database_url": redact_dsn(i.dsn),
                    **({"database_url_file": str(i.database_url_file)} if i.database_url_file else {}),
                }
                for i in value
            ]
        elif name == "new_relic_api_key":
            value = "<set>" if value else None
        elif name == "otlp_proxy":  # issue 21: a proxy URL may carry credentials
            value = redact_proxy(value.get_secret_value()) if value is not None else None
        elif name == "otlp_headers":
            value = {k: "<redacted>" for k in value}
        elif isinstance(value, Path):
            value = str(value)
        out[name] = value
    out["endpoint"] = settings.endpoint
    return out
